//! `amalgam bench --suite cluster`: the same TIES merge through the cluster code on loopback,
//! with 1, 2 and 4 worker processes reading the inputs from shared storage
//! (`--stream-inputs auto`: the workers see the coordinator's files), and with 1, 2 and 4
//! worker processes streaming every input from the coordinator (`--stream-inputs always`),
//! against a direct `amalgam merge` measured in the same run.
//!
//! Printed per case: wall time, GB/s of input, parallel efficiency (`T1 / (N · TN)`, against the
//! 1-worker cluster run of the same kind), the bytes moved through the coordinator (results
//! received, plus inputs streamed as the workers report them) and the coordinator's CPU seconds
//! (user + system of the whole process, from `wait4`: the same counts as `utime + stime` in
//! `/proc/<pid>/stat`) per GB moved.

use super::bench::{ensure_models, files_under, timed_merge, BENCH_MODELS};
use amalgam_engine::synth::SynthSpec;
use amalgam_io::DType;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run a coordinator process and `workers` worker processes (streaming their inputs from the
/// coordinator with `stream`); returns (wall, coordinator CPU, input bytes the workers
/// streamed).
fn cluster_run(
    dir: &Path,
    cfg: &Path,
    out: &Path,
    workers: usize,
    stream: bool,
) -> Result<(Duration, Duration, u64)> {
    let exe = std::env::current_exe()?;
    let token = dir.join("token");
    std::fs::write(&token, "bench-token-0123456789abcdef\n")?;
    let start = Instant::now();
    let mut coord = Command::new(&exe)
        .arg("coordinator")
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--overwrite",
            "--shard-size",
            "64MiB",
        ])
        .arg("--token-file")
        .arg(&token)
        .arg("--journal")
        .arg(dir.join("bench-journal.jsonl"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the coordinator")?;
    let stdout = coord.stdout.take().context("coordinator stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => {
                break l
                    .split_whitespace()
                    .find(|w| w.starts_with("http://"))
                    .map(str::to_string)
                    .context("coordinator url")?
            }
            Some(Ok(_)) => {}
            _ => bail!("the coordinator stopped before listening"),
        }
    };
    let mut ws = Vec::new();
    for _ in 0..workers {
        ws.push(
            Command::new(&exe)
                .args(["worker", "--coordinator", &url, "--token-file"])
                .arg(&token)
                .args(["--stream-inputs", if stream { "always" } else { "auto" }])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a worker")?,
        );
    }
    // Drain the coordinator's output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let pid = coord.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for the kernel to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers to locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    anyhow::ensure!(
        r == pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    anyhow::ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the coordinator failed"
    );
    // Each worker prints "worker N: B input bytes streamed from the coordinator" at exit.
    let mut streamed = 0u64;
    for w in ws {
        let out = w.wait_with_output()?;
        streamed += String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("input bytes streamed"))
            .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok((wall, tv(usage.ru_utime) + tv(usage.ru_stime), streamed))
}

fn files_bytes(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.len()))
        .sum()
}

/// Run the cluster benchmark in `dir` with models of `layers` layers.
pub fn run(dir: &Path, layers: usize, budget: u64) -> Result<()> {
    let spec = SynthSpec {
        hidden: 1024,
        intermediate: 2816,
        layers,
        heads: 16,
        kv_heads: 8,
        vocab: 32000,
        dtype: DType::BF16,
    };
    let names = BENCH_MODELS;
    ensure_models(dir, &spec)?;
    let in_bytes: u64 = names.iter().map(|n| files_bytes(&dir.join(n))).sum();
    let models: String = names[1..]
        .iter()
        .map(|n| format!("  - model: {n}\n    parameters: {{weight: 1.0, density: 0.2}}\n"))
        .collect();
    let cfg: PathBuf = dir.join("ties.yaml");
    std::fs::write(
        &cfg,
        format!("merge_method: ties\nbase_model: base\nmodels:\n{models}"),
    )?;
    println!(
        "cluster bench: TIES of 4 bf16 fine-tunes, {} parameters each, {:.2} GB of input",
        spec.params(),
        in_bytes as f64 / 1e9
    );
    let out = dir.join("out");
    let (direct, _) = timed_merge(&cfg, &out, budget)?;
    let out_bytes = files_bytes(&out);
    // (case, wall, Some((workers, coordinator CPU, bytes moved, 1-worker wall of the kind)))
    type Row = (String, Duration, Option<(usize, Duration, u64, Duration)>);
    let mut rows: Vec<Row> = vec![("direct merge".to_string(), direct, None)];
    for stream in [false, true] {
        let mut t1 = None;
        for n in [1usize, 2, 4] {
            let (wall, cpu, streamed) = cluster_run(dir, &cfg, &out, n, stream)?;
            let t1 = *t1.get_or_insert(wall);
            let kind = if stream {
                "inputs streamed"
            } else {
                "shared storage"
            };
            rows.push((
                format!("{n} worker(s), {kind}"),
                wall,
                Some((n, cpu, out_bytes + streamed, t1)),
            ));
        }
    }
    println!();
    println!(
        "| case | wall s | input GB/s | parallel efficiency | GB moved via coordinator | \
         coordinator CPU s per GB moved |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (case, wall, info) in rows {
        let (eff, moved, cpu) = match info {
            Some((n, cpu, moved, t1)) => (
                format!("{:.2}", t1.as_secs_f64() / (n as f64 * wall.as_secs_f64())),
                format!("{:.3}", moved as f64 / 1e9),
                format!("{:.3}", cpu.as_secs_f64() / (moved as f64 / 1e9)),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {case} | {:.2} | {:.2} | {eff} | {moved} | {cpu} |",
            wall.as_secs_f64(),
            in_bytes as f64 / wall.as_secs_f64() / 1e9
        );
    }
    println!(
        "(shared storage: workers read the model files themselves; inputs streamed: workers \
         fetch every input byte range from the coordinator over gRPC; {:.2} GB of results)",
        out_bytes as f64 / 1e9
    );
    Ok(())
}
