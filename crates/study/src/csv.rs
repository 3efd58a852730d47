//! `results.csv`: one row per merge (RFC 4180 quoting).
//!
//! Columns: `key, method, hyperparameters, count, subset, models` (pool names joined by `;`),
//! `status, held_in, held_out`, the cost figures (`merge_secs, eval_secs, stats_secs,
//! bytes_read, bytes_written, flops, stats_forward_passes, stats_backward_passes,
//! stats_bytes_per_model, merge_peak_bytes, eval_peak_bytes, peak_memory_bytes`), `error`, then
//! one `task:<name>` column per task of the suite (in the order first seen). Missing values are
//! empty.

use crate::runner::RunRecord;

/// The fixed columns, in order.
pub const COLUMNS: &[&str] = &[
    "key",
    "method",
    "hyperparameters",
    "count",
    "subset",
    "models",
    "status",
    "held_in",
    "held_out",
    "merge_secs",
    "eval_secs",
    "stats_secs",
    "bytes_read",
    "bytes_written",
    "flops",
    "stats_forward_passes",
    "stats_backward_passes",
    "stats_bytes_per_model",
    "merge_peak_bytes",
    "eval_peak_bytes",
    "peak_memory_bytes",
    "error",
];

/// A CSV field, quoted when it holds a comma, a quote or a line break.
pub fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// The whole CSV text of `records`.
pub fn to_csv(records: &[RunRecord]) -> String {
    let mut tasks: Vec<String> = Vec::new();
    for r in records {
        for t in &r.tasks {
            if !tasks.contains(&t.name) {
                tasks.push(t.name.clone());
            }
        }
    }
    let mut header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    header.extend(tasks.iter().map(|t| format!("task:{t}")));
    let mut out = header
        .iter()
        .map(|h| field(h))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for r in records {
        let c = &r.cost;
        let mut row = vec![
            r.key.clone(),
            r.method.clone(),
            r.hyperparameters.clone(),
            r.count.to_string(),
            r.subset.to_string(),
            r.models.join(";"),
            r.status.clone(),
            opt(r.held_in),
            opt(r.held_out),
            c.merge_secs.to_string(),
            c.eval_secs.to_string(),
            c.stats_secs.to_string(),
            c.bytes_read.to_string(),
            c.bytes_written.to_string(),
            c.flops.to_string(),
            c.stats_forward_passes.to_string(),
            c.stats_backward_passes.to_string(),
            c.stats_bytes_per_model.to_string(),
            c.merge_peak_bytes.to_string(),
            c.eval_peak_bytes.to_string(),
            c.peak_memory_bytes().to_string(),
            r.error.clone().unwrap_or_default(),
        ];
        for t in &tasks {
            row.push(opt(r
                .tasks
                .iter()
                .find(|x| &x.name == t)
                .and_then(|x| x.value)));
        }
        out.push_str(&row.iter().map(|f| field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Cost;
    use crate::runner::TaskScore;

    /// A minimal RFC 4180 reader, written independently of [`field`].
    fn parse(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    cur.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => cur.push(c),
                (false, '"') => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut cur)),
                (false, '\n') => {
                    row.push(std::mem::take(&mut cur));
                    rows.push(std::mem::take(&mut row));
                }
                (false, c) => cur.push(c),
            }
        }
        rows
    }

    #[test]
    fn rows_round_trip() {
        let r = RunRecord {
            key: "k1".into(),
            method: "ties".into(),
            hyperparameters: "density=0.2 lambda=1".into(),
            count: 2,
            subset: 3,
            models: vec!["a".into(), "b".into()],
            status: "failed".into(),
            error: Some("merge: bad \"x\", line\nnext".into()),
            held_in: Some(0.5),
            held_out: None,
            tasks: vec![TaskScore {
                name: "t,1".into(),
                split: "held_in".into(),
                value: Some(0.75),
            }],
            cost: Cost {
                merge_secs: 1.5,
                bytes_read: 10,
                merge_peak_bytes: 7,
                eval_peak_bytes: 9,
                ..Cost::default()
            },
        };
        let rows = parse(&to_csv(&[r]));
        assert_eq!(rows.len(), 2);
        let h = &rows[0];
        assert_eq!(h.len(), COLUMNS.len() + 1);
        assert_eq!(h.last().unwrap(), "task:t,1");
        let get = |name: &str| rows[1][h.iter().position(|c| c == name).unwrap()].clone();
        assert_eq!(get("method"), "ties");
        assert_eq!(get("hyperparameters"), "density=0.2 lambda=1");
        assert_eq!(get("models"), "a;b");
        assert_eq!(get("held_in"), "0.5");
        assert_eq!(get("held_out"), "");
        assert_eq!(get("merge_secs"), "1.5");
        assert_eq!(get("peak_memory_bytes"), "9");
        assert_eq!(get("error"), "merge: bad \"x\", line\nnext");
        assert_eq!(get("task:t,1"), "0.75");
    }
}
