//! Hyperparameter selection on held-in tasks, reported on held-out tasks (methods.md §16).
//!
//! For a method (and, per count, a method and a model count), each hyperparameter setting's
//! score is the mean of its successful runs' held-in means (over subsets, and over counts for
//! the per-method choice). The setting with the highest such score is selected (ties: the first
//! in sweep order); its held-out mean over the same runs is what is reported. Held-out scores
//! never influence the choice. With no held-in score at all, the first setting is taken and
//! [`Selected::by_held_in`] is false.

use crate::runner::RunRecord;

/// A selected setting and its scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    /// The method.
    pub method: String,
    /// The model count (`None` for a choice over all counts).
    pub count: Option<usize>,
    /// The selected hyperparameters.
    pub hyperparameters: String,
    /// Mean held-in score of the selected setting (the selection criterion).
    pub held_in: Option<f64>,
    /// Mean held-out score of the selected setting (the reported figure).
    pub held_out: Option<f64>,
    /// Successful runs of the selected setting.
    pub runs: usize,
    /// Whether a held-in score decided (false: no held-in score, first setting taken).
    pub by_held_in: bool,
}

/// Mean of the present values, `None` if there is none.
pub fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let (mut s, mut n) = (0.0, 0usize);
    for v in values.into_iter().flatten() {
        s += v;
        n += 1;
    }
    (n > 0).then(|| s / n as f64)
}

/// Methods in order of first appearance.
pub fn methods(records: &[RunRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in records {
        if !out.contains(&r.method) {
            out.push(r.method.clone());
        }
    }
    out
}

/// Model counts, ascending.
pub fn counts(records: &[RunRecord]) -> Vec<usize> {
    let mut c: Vec<usize> = records.iter().map(|r| r.count).collect();
    c.sort_unstable();
    c.dedup();
    c
}

fn select(records: &[&RunRecord], method: &str, count: Option<usize>) -> Option<Selected> {
    let mut settings: Vec<&str> = Vec::new();
    for r in records {
        if !settings.contains(&r.hyperparameters.as_str()) {
            settings.push(&r.hyperparameters);
        }
    }
    let mut best: Option<Selected> = None;
    for s in settings {
        let runs: Vec<&&RunRecord> = records.iter().filter(|r| r.hyperparameters == s).collect();
        let cand = Selected {
            method: method.to_string(),
            count,
            hyperparameters: s.to_string(),
            held_in: mean(runs.iter().map(|r| r.held_in)),
            held_out: mean(runs.iter().map(|r| r.held_out)),
            runs: runs.len(),
            by_held_in: false,
        };
        best = match best {
            None => Some(cand),
            Some(b) => match (b.held_in, cand.held_in) {
                (None, Some(_)) => Some(cand),
                (Some(x), Some(y)) if y > x => Some(cand),
                _ => Some(b),
            },
        };
    }
    best.map(|mut b| {
        b.by_held_in = b.held_in.is_some();
        b
    })
}

/// The best setting of each method over all counts (methods in order of appearance).
pub fn best_per_method(records: &[RunRecord]) -> Vec<Selected> {
    methods(records)
        .iter()
        .filter_map(|m| {
            let rs: Vec<&RunRecord> = records
                .iter()
                .filter(|r| r.ok() && &r.method == m)
                .collect();
            select(&rs, m, None)
        })
        .collect()
}

/// The best setting of each method at each count.
pub fn best_per_count(records: &[RunRecord]) -> Vec<Selected> {
    let mut out = Vec::new();
    for m in methods(records) {
        for c in counts(records) {
            let rs: Vec<&RunRecord> = records
                .iter()
                .filter(|r| r.ok() && r.method == m && r.count == c)
                .collect();
            out.extend(select(&rs, &m, Some(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Cost;

    fn rec(method: &str, hp: &str, count: usize, hin: f64, hout: f64) -> RunRecord {
        RunRecord {
            key: format!("{method}{hp}{count}{hin}"),
            method: method.into(),
            hyperparameters: hp.into(),
            count,
            subset: 0,
            models: vec![],
            status: "ok".into(),
            error: None,
            held_in: Some(hin),
            held_out: Some(hout),
            tasks: vec![],
            cost: Cost::default(),
        }
    }

    #[test]
    fn selection_uses_held_in_only() {
        // lambda=1 wins held-in (mean 0.7 vs 0.6) although lambda=0.5 is better held-out.
        let mut rs = vec![
            rec("ta", "lambda=0.5", 2, 0.6, 0.9),
            rec("ta", "lambda=0.5", 2, 0.6, 0.9),
            rec("ta", "lambda=1", 2, 0.8, 0.1),
            rec("ta", "lambda=1", 3, 0.6, 0.3),
            rec("ta", "lambda=0.5", 3, 0.7, 0.8),
            rec("linear", "", 2, 0.1, 0.2),
        ];
        let mut failed = rec("ta", "lambda=2", 2, 1.0, 1.0);
        failed.status = "failed".into();
        rs.push(failed);
        let best = best_per_method(&rs);
        assert_eq!(best.len(), 2);
        // Over all counts: lambda=0.5 mean held-in (0.6+0.6+0.7)/3 = 0.6333 < lambda=1 0.7.
        assert_eq!(best[0].hyperparameters, "lambda=1");
        assert!((best[0].held_out.unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(best[0].runs, 2);
        assert!(best[0].by_held_in);
        let per = best_per_count(&rs);
        let at3 = per
            .iter()
            .find(|s| s.method == "ta" && s.count == Some(3))
            .unwrap();
        assert_eq!(at3.hyperparameters, "lambda=0.5");
        assert_eq!(at3.held_out, Some(0.8));
        assert_eq!(per.len(), 3, "linear has no run at count 3");
    }

    #[test]
    fn ties_keep_the_first_setting() {
        let rs = vec![rec("ta", "a", 2, 0.5, 0.1), rec("ta", "b", 2, 0.5, 0.9)];
        assert_eq!(best_per_method(&rs)[0].hyperparameters, "a");
    }
}
