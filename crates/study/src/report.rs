//! `report.md`: the plots, the best setting per method (selected on held-in, reported on
//! held-out), the selected setting per model count, costs per method and count, and failures.

use crate::runner::RunRecord;
use crate::select::{self, mean, Selected};
use std::fmt::Write;
use std::path::PathBuf;

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}"))
        .unwrap_or_else(|| "–".to_string())
}

fn bytes(b: f64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn hp(s: &Selected) -> String {
    if s.hyperparameters.is_empty() {
        "(defaults)".to_string()
    } else {
        format!("`{}`", s.hyperparameters)
    }
}

/// The Markdown report of `records`, embedding `plots` (paths relative to the report).
pub fn to_markdown(records: &[RunRecord], plots: &[PathBuf]) -> String {
    let mut s = String::new();
    let ok = records.iter().filter(|r| r.ok()).count();
    let _ = writeln!(s, "# Scaling study\n");
    let _ = writeln!(
        s,
        "{} merges: {} succeeded, {} failed. Hyperparameters are selected on the **held-in** \
         mean only; the **held-out** mean of the selected setting is the reported figure.\n",
        records.len(),
        ok,
        records.len() - ok
    );
    let _ = writeln!(s, "## Best setting per method\n");
    let _ = writeln!(
        s,
        "| method | selected hyperparameters | held-in mean (selection) | held-out mean (reported) | runs |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for b in select::best_per_method(records) {
        let _ = writeln!(
            s,
            "| {} | {}{} | {} | {} | {} |",
            b.method,
            hp(&b),
            if b.by_held_in {
                ""
            } else {
                " (no held-in score)"
            },
            num(b.held_in),
            num(b.held_out),
            b.runs
        );
    }
    let _ = writeln!(s, "\n## Selected setting per number of models\n");
    let _ = writeln!(
        s,
        "| method | models | selected hyperparameters | held-in mean | held-out mean | subsets |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for b in select::best_per_count(records) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            b.method,
            b.count.unwrap_or(0),
            hp(&b),
            num(b.held_in),
            num(b.held_out),
            b.runs
        );
    }
    let _ = writeln!(s, "\n## Plots\n");
    for p in plots {
        let name = p
            .file_stem()
            .map(|x| x.to_string_lossy().replace('_', " "))
            .unwrap_or_default();
        let _ = writeln!(s, "![{name}]({})\n", p.display());
    }
    let _ = writeln!(
        s,
        "## Cost per method and number of models (means over successful merges)\n"
    );
    let _ = writeln!(
        s,
        "| method | models | merge s | eval s | est. FLOPs | read | written | stats fwd/bwd passes | stats per model | peak memory |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for m in select::methods(records) {
        for c in select::counts(records) {
            let rs: Vec<&RunRecord> = records
                .iter()
                .filter(|r| r.ok() && r.method == m && r.count == c)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let f =
                |g: &dyn Fn(&RunRecord) -> f64| mean(rs.iter().map(|r| Some(g(r)))).unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {m} | {c} | {:.2} | {:.2} | {:.3e} | {} | {} | {:.0}/{:.0} | {} | {} |",
                f(&|r| r.cost.merge_secs),
                f(&|r| r.cost.eval_secs),
                f(&|r| r.cost.flops),
                bytes(f(&|r| r.cost.bytes_read as f64)),
                bytes(f(&|r| r.cost.bytes_written as f64)),
                f(&|r| r.cost.stats_forward_passes as f64),
                f(&|r| r.cost.stats_backward_passes as f64),
                bytes(f(&|r| r.cost.stats_bytes_per_model as f64)),
                bytes(f(&|r| r.cost.peak_memory_bytes() as f64)),
            );
        }
    }
    let failed: Vec<&RunRecord> = records.iter().filter(|r| !r.ok()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failed merges\n");
        for r in failed {
            let _ = writeln!(
                s,
                "- `{}` {} {} (models {}, subset {}): {}",
                r.key,
                r.method,
                r.hyperparameters,
                r.count,
                r.subset,
                r.error
                    .as_deref()
                    .unwrap_or("unknown error")
                    .replace('\n', " ")
            );
        }
    }
    let _ = writeln!(
        s,
        "\nEvery row is in `results.csv`; each merge's config, log and record are under `runs/`."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Cost;

    #[test]
    fn report_has_the_tables_and_plots() {
        let mk = |hp: &str, hin: f64, hout: f64, ok: bool| RunRecord {
            key: format!("k{hp}{hin}"),
            method: "task_arithmetic".into(),
            hyperparameters: hp.into(),
            count: 2,
            subset: 0,
            models: vec!["a".into(), "b".into()],
            status: if ok { "ok" } else { "failed" }.into(),
            error: (!ok).then(|| "merge: boom".to_string()),
            held_in: Some(hin),
            held_out: Some(hout),
            tasks: vec![],
            cost: Cost {
                merge_secs: 2.0,
                bytes_read: 2048,
                ..Cost::default()
            },
        };
        let rs = vec![
            mk("lambda=0.5", 0.25, 0.75, true),
            mk("lambda=1", 0.5, 0.125, true),
            mk("lambda=2", 0.0, 0.0, false),
        ];
        let md = to_markdown(&rs, &[PathBuf::from("plots/cost_time.png")]);
        assert!(
            md.contains("| task_arithmetic | `lambda=1` | 0.5000 | 0.1250 | 1 |"),
            "{md}"
        );
        assert!(md.contains("![cost time](plots/cost_time.png)"), "{md}");
        assert!(md.contains("3 merges: 2 succeeded, 1 failed"), "{md}");
        assert!(md.contains("| task_arithmetic | 2 | 2.00 |"), "{md}");
        assert!(md.contains("2.0 KiB"), "{md}");
        assert!(md.contains("merge: boom"), "{md}");
    }
}
