//! `amalgam bench`: merge throughput and memory against the I/O floor.
//!
//! Generates a base and 4 fine-tunes (about 0.5B parameters each by default) in f32 and bf16,
//! then for each dtype and method measures (all in this run, on a warm page cache):
//! - the floor: reading every input of that merge once plus writing an output-sized file;
//! - `linear` and `ties` merges, each as a child `amalgam merge` process whose RssAnon is
//!   sampled from /proc.
//!
//! It prints wall time, GB/s of input, peak anonymous memory and the ratio to the floor.

use crate::size::{human, parse_size};
use amalgam_engine::synth::{write_model, SynthSpec, SynthValues};
use amalgam_io::DType;
use anyhow::{Context, Result};
use clap::Args;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Arguments of `amalgam bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Working directory for generated models and outputs (needs about 16 GB for the default size).
    #[arg(long, default_value = "amalgam-bench")]
    pub dir: PathBuf,
    /// Decoder layers of the generated models (36 gives about 0.49B parameters).
    #[arg(long, default_value_t = 36)]
    pub layers: usize,
    /// Memory budget passed to the merges.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub memory_budget: u64,
    /// Dtypes to run (comma separated).
    #[arg(long, default_value = "float32,bfloat16")]
    pub dtypes: String,
    /// Methods to run (comma separated).
    #[arg(long, default_value = "linear,ties")]
    pub methods: String,
    /// `merge` (linear and TIES against the I/O floor), `mats` (MaTS conjugate gradient
    /// against the matmul floor and task arithmetic) or `cluster` (TIES through a coordinator
    /// and 1, 2, 4 worker processes on loopback, against a direct merge).
    /// `eval` (evaluation throughput in one process and on 1 and 2 worker processes) is the
    /// fourth suite.
    #[arg(long, default_value = "merge")]
    pub suite: String,
    /// The model `--suite eval` evaluates (default: $AMALGAM_SMOLLM2_GGUF).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The evaluation suite (YAML) `--suite eval` runs.
    #[arg(long)]
    pub eval_suite: Option<PathBuf>,
}

/// The base and fine-tunes every merge benchmark uses.
pub(crate) const BENCH_MODELS: [&str; 5] = ["base", "ft1", "ft2", "ft3", "ft4"];

/// Generate [`BENCH_MODELS`] of `spec` under `root` (a base and 4 dense fine-tunes), keeping
/// any already there.
pub(crate) fn ensure_models(root: &Path, spec: &SynthSpec) -> Result<()> {
    for (i, n) in BENCH_MODELS.iter().enumerate() {
        let d = root.join(n);
        if d.join("config.json").exists() {
            continue;
        }
        let v = SynthValues {
            base_seed: 3,
            delta_seed: 100 + i as u64,
            delta_scale: if i == 0 { 0.0 } else { 0.01 },
            delta_density: 1.0,
        };
        write_model(&d, spec, &v, 2_000_000_000, true)?;
    }
    Ok(())
}

/// The `.safetensors` files directly under `dir`, sorted.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    v.sort();
    v
}

/// Read every file once (warming the page cache); the bytes read.
pub(crate) fn read_all(files: &[PathBuf]) -> Result<u64> {
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    for f in files {
        let mut h = std::fs::File::open(f).with_context(|| format!("open {}", f.display()))?;
        loop {
            let n = h.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

fn write_file(path: &Path, bytes: u64) -> Result<()> {
    let buf = vec![0u8; 8 << 20];
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}

fn rss_anon(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Run a child `amalgam merge` and return (wall time, peak RssAnon).
pub(crate) fn timed_merge(config: &Path, out: &Path, budget: u64) -> Result<(Duration, u64)> {
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(["merge", "--quiet", "--overwrite", "--memory-budget"])
        .arg(budget.to_string())
        .arg(config)
        .arg("--out")
        .arg(out)
        .spawn()
        .context("starting amalgam merge")?;
    let pid = child.id();
    let mut peak = 0u64;
    loop {
        if let Some(r) = rss_anon(pid) {
            peak = peak.max(r);
        }
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(status.success(), "merge {} failed", config.display());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((start.elapsed(), peak))
}

/// Run `amalgam bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    println!("amalgam bench: {} cores", rayon::current_num_threads());
    if a.suite == "mats" {
        return super::bench_mats::run(&a.dir.join("mats"), a.memory_budget);
    }
    if a.suite == "cluster" {
        return super::bench_cluster::run(&a.dir.join("cluster"), a.layers, a.memory_budget);
    }
    if a.suite == "eval" {
        return super::bench_eval::run(&a.dir.join("eval"), a.model, a.eval_suite);
    }
    anyhow::ensure!(
        a.suite == "merge",
        "--suite must be `merge`, `mats`, `cluster` or `eval`"
    );
    let mut rows = Vec::new();
    for dt_name in a.dtypes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let dtype =
            DType::from_config_name(dt_name).with_context(|| format!("unknown dtype {dt_name}"))?;
        let spec = SynthSpec {
            hidden: 1024,
            intermediate: 2816,
            layers: a.layers,
            heads: 16,
            kv_heads: 8,
            vocab: 32000,
            dtype,
        };
        let root = a.dir.join(dt_name);
        let names = BENCH_MODELS;
        let t = Instant::now();
        ensure_models(&root, &spec)?;
        println!(
            "{dt_name}: {} parameters per model; inputs ready in {:.1} s",
            spec.params(),
            t.elapsed().as_secs_f64()
        );
        let all_inputs: Vec<PathBuf> = names
            .iter()
            .flat_map(|n| files_under(&root.join(n)))
            .collect();
        let model_bytes = read_all(&all_inputs)? / names.len() as u64; // also warms the cache
        for method in a
            .methods
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            // `linear` reads the 4 fine-tunes; the others read the base too.
            let used: Vec<&str> = if method == "linear" {
                names[1..].to_vec()
            } else {
                names.to_vec()
            };
            let inputs: Vec<PathBuf> = used
                .iter()
                .flat_map(|n| files_under(&root.join(n)))
                .collect();
            // Floor: read every input of this merge once (warm cache) + write an output-sized file.
            // Best of 3: the machine is shared and fsync times vary.
            let mut floor = Duration::MAX;
            let mut in_bytes = 0;
            for _ in 0..3 {
                let t = Instant::now();
                in_bytes = read_all(&inputs)?;
                let scratch = root.join("floor.bin");
                write_file(&scratch, model_bytes)?;
                floor = floor.min(t.elapsed());
                let _ = std::fs::remove_file(&scratch);
            }
            rows.push((
                dt_name.to_string(),
                format!("floor ({} inputs)", used.len()),
                floor,
                0u64,
                in_bytes,
                floor,
            ));
            let models: String = names[1..]
                .iter()
                .map(|n| format!("  - model: {n}\n    parameters: {{weight: 1.0, density: 0.2}}\n"))
                .collect();
            let cfg = match method {
                "linear" => format!("merge_method: linear\nmodels:\n{models}"),
                other => format!("merge_method: {other}\nbase_model: base\nmodels:\n{models}"),
            };
            let cfg_path = root.join(format!("{method}.yaml"));
            std::fs::write(&cfg_path, cfg)?;
            let out = root.join(format!("out-{method}"));
            // Best of 2 runs, for the same reason.
            let (w1, p1) = timed_merge(&cfg_path, &out, a.memory_budget)?;
            let (w2, p2) = timed_merge(&cfg_path, &out, a.memory_budget)?;
            let (wall, peak) = (w1.min(w2), p1.max(p2));
            rows.push((
                dt_name.to_string(),
                method.to_string(),
                wall,
                peak,
                in_bytes,
                floor,
            ));
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    println!();
    println!("| dtype | case | wall s | input GB/s | peak RssAnon | x floor |");
    println!("|---|---|---:|---:|---:|---:|");
    for (dt, case, wall, peak, read, floor) in &rows {
        println!(
            "| {dt} | {case} | {:.2} | {:.2} | {} | {:.2} |",
            wall.as_secs_f64(),
            *read as f64 / wall.as_secs_f64() / 1e9,
            if *peak > 0 { human(*peak) } else { "-".into() },
            wall.as_secs_f64() / floor.as_secs_f64()
        );
    }
    Ok(())
}
