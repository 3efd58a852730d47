//! Streaming: private memory stays under `--memory-budget` for inputs much larger than it, and
//! a merge killed mid-write leaves no final-named file.

use crate::common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn rss_anon(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("RssAnon:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn wait_sampling(mut child: Child) -> (bool, u64) {
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Some(r) = rss_anon(pid) {
            peak = peak.max(r);
        }
        if let Some(st) = child.try_wait().expect("wait") {
            return (st.success(), peak);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A base and 3 fine-tunes of about 160 MB each (f32): 640 MB of inputs, 10x a 64 MiB budget.
/// The embedding and head alone (32000 x 1024 f32, 131 MB each) exceed the budget.
fn big_family(d: &Path) {
    let shape = [
        "--vocab",
        "32000",
        "--hidden",
        "1024",
        "--intermediate",
        "1024",
        "--layers",
        "1",
        "--heads",
        "8",
        "--kv-heads",
        "8",
    ];
    tiny_family(d, 3, &shape);
}

#[test]
fn memory_stays_under_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    big_family(d);
    let input_bytes: u64 = ["base", "ft1", "ft2", "ft3"]
        .iter()
        .flat_map(|m| {
            file_names(&d.join(m))
                .into_iter()
                .map(move |f| d.join(m).join(f))
        })
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let budget: u64 = 64 << 20;
    assert!(
        input_bytes >= 8 * budget,
        "inputs {input_bytes} must be at least 8x the budget"
    );
    let configs = [
        ("linear", "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\n  - model: ft3\n    parameters: {weight: 1.0}\n"),
        ("ties", "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0, density: 0.3}\n  - model: ft2\n    parameters: {weight: 1.0, density: 0.3}\n  - model: ft3\n    parameters: {weight: 1.0, density: 0.3}\n"),
        ("slerp", "merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n  - model: ft1\nparameters: {t: 0.4}\n"),
    ];
    for (name, text) in configs {
        let cfg = format!("{name}.yaml");
        std::fs::write(d.join(&cfg), text).unwrap();
        let child = amalgam()
            .current_dir(d)
            .args([
                "merge",
                &cfg,
                "--out",
                &format!("out-{name}"),
                "--quiet",
                "--memory-budget",
                "64MiB",
            ])
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (ok, peak) = wait_sampling(child);
        assert!(ok, "{name} merge failed");
        println!(
            "{name}: peak RssAnon {} MiB with --memory-budget 64MiB over {} MiB of inputs",
            peak >> 20,
            input_bytes >> 20
        );
        assert!(
            peak <= budget + (64 << 20),
            "{name}: peak RssAnon {peak} exceeds budget + 64 MiB"
        );
    }
}

#[test]
fn killed_merge_leaves_no_final_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    big_family(d);
    std::fs::write(
        d.join("t.yaml"),
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0, density: 0.3}\n  - model: ft2\n    parameters: {weight: 1.0, density: 0.3}\n",
    )
    .unwrap();
    let mut child = amalgam()
        .current_dir(d)
        .args([
            "merge",
            "t.yaml",
            "--out",
            "out",
            "--quiet",
            "--memory-budget",
            "64MiB",
            "--threads",
            "1",
        ])
        .spawn()
        .unwrap();
    // Wait until a temporary output file exists (the merge is writing), then kill it.
    let start = Instant::now();
    let out = d.join("out");
    loop {
        let started = file_names(&out).iter().any(|f| f.starts_with('.'));
        if started || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(50));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the merge finished before it could be killed; make the inputs larger"
    );
    let finals = final_outputs(&out);
    assert!(
        finals.is_empty(),
        "final-named files after a kill: {finals:?} (all: {:?})",
        file_names(&out)
    );
}
