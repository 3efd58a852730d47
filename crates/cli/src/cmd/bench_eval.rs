//! `amalgam bench --suite eval`: evaluation throughput in one process and on 1 and 2 worker
//! processes (loopback gRPC), each a child `amalgam eval`, with the reports checked equal.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One measured configuration.
struct Row {
    label: &'static str,
    secs: f64,
    examples: u64,
    report: serde_json::Value,
}

fn run_eval(
    dir: &Path,
    model: &Path,
    suite: &Path,
    label: &'static str,
    workers: usize,
) -> Result<Row> {
    let out = dir.join(format!("{}.json", label.replace(' ', "-")));
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let status = Command::new(exe)
        .args(["--quiet", "eval", "--model"])
        .arg(model)
        .arg("--suite")
        .arg(suite)
        .arg("--out")
        .arg(&out)
        .args(["--workers", &workers.to_string()])
        .status()
        .context("starting amalgam eval")?;
    ensure!(status.success(), "amalgam eval ({label}) failed");
    let secs = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&out).with_context(|| format!("{}", out.display()))?;
    let report: serde_json::Value = serde_json::from_str(&text)?;
    let examples = report["tasks"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["examples"].as_u64()).sum())
        .unwrap_or(0);
    Ok(Row {
        label,
        secs,
        examples,
        report,
    })
}

/// Runs the evaluation benchmark of `model` on `suite`, writing reports under `dir`.
pub fn run(dir: &Path, model: Option<PathBuf>, suite: Option<PathBuf>) -> Result<()> {
    let model = model
        .or_else(|| std::env::var_os("AMALGAM_SMOLLM2_GGUF").map(PathBuf::from))
        .context("--model is required (or set AMALGAM_SMOLLM2_GGUF)")?;
    let suite =
        suite.context("--eval-suite is required, e.g. data/bigbench/suite-navigate.yaml")?;
    std::fs::create_dir_all(dir)?;
    println!(
        "evaluation of {} on {} (wall time of the whole command: load, tokenize, score)",
        model.display(),
        suite.display()
    );
    let rows = [
        run_eval(dir, &model, &suite, "in process", 0)?,
        run_eval(dir, &model, &suite, "1 worker", 1)?,
        run_eval(dir, &model, &suite, "2 workers", 2)?,
    ];
    let base = rows[0].secs;
    println!("| mode | examples | seconds | examples/s | vs in process |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2}x |",
            r.label,
            r.examples,
            r.secs,
            r.examples as f64 / r.secs.max(1e-9),
            base / r.secs.max(1e-9)
        );
    }
    for r in &rows[1..] {
        ensure!(
            r.report == rows[0].report,
            "the {} report differs from the in-process one",
            r.label
        );
    }
    println!("reports identical across modes");
    Ok(())
}
