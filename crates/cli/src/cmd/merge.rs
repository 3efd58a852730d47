//! `amalgam merge`: run a merge config on this machine.

use crate::progress::Bar;
use crate::size::{human, parse_size};
use amalgam_core::config::{parse_config, MergeConfig, TokenizerSource};
use amalgam_core::plan::Plan;
use amalgam_engine::budget;
use amalgam_engine::inputs::{open_and_plan, Inputs};
use amalgam_engine::run::{self, MergeOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

/// Arguments of `amalgam merge`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  amalgam merge ties.yaml --out merged/\n  amalgam merge ties.yaml --out merged/ --dry-run\n  amalgam merge big.yaml --out merged/ --memory-budget 8GiB --out-shard-size 2GB"
)]
pub struct MergeArgs {
    /// The merge config (mergekit YAML; amalgam's extra keys allowed).
    pub config: PathBuf,
    /// Output directory (also accepted as a second positional argument, as mergekit-yaml takes it).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Output directory, positional form.
    #[arg(hide = true)]
    pub out_positional: Option<PathBuf>,
    /// Print the plan (per tensor: method, parameters, bytes) and the estimated peak memory; merge nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// Worker threads for the merge math (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Merge with this many workers in this process, through the cluster code (gRPC on a
    /// loopback port); the output is byte-identical. 0: merge directly.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Where to merge: `cpu`, or `cuda` / `cuda:N` (an NVIDIA GPU; needs a build with
    /// `--features cuda`). On a GPU, linear, task arithmetic, TIES (per-tensor trim) and DARE
    /// run there bit-identically to the CPU; other methods, and tensors too large for the GPU's
    /// free memory, are merged on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output bytes per shard when merging with `--workers`.
    #[arg(long, default_value_t = amalgam_cluster::merge_job::DEFAULT_SHARD_BYTES, value_parser = parse_size)]
    pub shard_size: u64,
}

/// Options every command that runs a merge takes (`merge`, `coordinator`).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Peak private memory target (e.g. 2GiB, 512MiB). Large tensors are streamed in blocks.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub memory_budget: u64,
    /// Maximum size of one output file (e.g. 5GB, as mergekit's default).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub out_shard_size: u64,
    /// Replace a checkpoint already in the output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// Accept NaN or Inf values in the inputs instead of refusing them.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Treat unknown config keys, and parameters the merge method does not use, as errors
    /// instead of warnings.
    #[arg(long)]
    pub strict: bool,
}

impl RunArgs {
    /// The engine's options for writing into `out_dir`.
    pub fn options(&self, out_dir: PathBuf) -> MergeOptions {
        MergeOptions {
            out_dir,
            memory_budget: self.memory_budget,
            out_shard_size: self.out_shard_size,
            overwrite: self.overwrite,
            allow_nonfinite: self.allow_nonfinite,
            device: Default::default(),
        }
    }
}

/// Read and parse a config file, printing its warnings.
pub fn load_config(path: &Path, strict: bool, quiet: bool) -> Result<MergeConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let (config, warnings) =
        parse_config(&text, strict).with_context(|| format!("config {}", path.display()))?;
    if !quiet {
        for w in warnings {
            eprintln!("warning: {}: {}: {}", path.display(), w.key, w.message);
        }
    }
    if matches!(config.tokenizer_source, Some(TokenizerSource::Union))
        || matches!(
            config.tokenizer.as_ref().and_then(|t| t.source.as_ref()),
            Some(TokenizerSource::Union)
        )
    {
        bail!(
            "config {}: `tokenizer_source: union` is not supported yet; use `base` or a model path",
            path.display()
        );
    }
    Ok(config)
}

/// Open inputs and plan; with `strict`, parameters the method does not use are an error.
pub fn prepare(
    config: &MergeConfig,
    config_path: &Path,
    strict: bool,
    quiet: bool,
) -> Result<(Inputs, Plan)> {
    let dir = config_path.parent().filter(|p| !p.as_os_str().is_empty());
    let (inputs, plan) = open_and_plan(config, dir)
        .with_context(|| format!("planning {}", config_path.display()))?;
    report_plan(&plan, config_path, strict, quiet)?;
    Ok((inputs, plan))
}

/// Prints the plan's warnings, or with `strict` refuses parameters the method does not use.
pub fn report_plan(plan: &Plan, config_path: &Path, strict: bool, quiet: bool) -> Result<()> {
    if strict {
        if let Some(e) = plan.strict_error() {
            bail!("config {}: {e}", config_path.display());
        }
    }
    if !quiet {
        for w in &plan.warnings {
            eprintln!("warning: {}: {w}", config_path.display());
        }
    }
    Ok(())
}

fn print_dry_run(config: &MergeConfig, plan: &Plan, args: &MergeArgs) -> Result<()> {
    println!(
        "plan: {} tensors, method `{}`, seed {}",
        plan.tensors.len(),
        plan.method,
        plan.seed
    );
    println!("models:");
    for (i, m) in plan.models.iter().enumerate() {
        let role = if Some(m) == plan.base_model.as_ref() {
            " (base)"
        } else {
            ""
        };
        println!("  [{i}] {m}{role}");
    }
    let mut peak = 0u64;
    let mut total = 0u64;
    println!(
        "{:<56} {:<16} {:>12} {:>10}  parameters",
        "tensor", "method", "shape", "bytes"
    );
    for t in &plan.tensors {
        let dt = run::output_dtype(config, t)?;
        let numel: usize = t.shape.iter().product();
        let bytes = numel as u64 * dt.size_bytes() as u64;
        total += bytes;
        let method_name = if t.copy_raw {
            "copy".to_string()
        } else if t.note.is_some() {
            format!("{} (avg)", t.method)
        } else {
            t.method.clone()
        };
        let mut parts = None;
        if !t.copy_raw {
            let m = run::build_method(t)?;
            let job = run::job_for(t, m.as_ref(), plan.seed, args.run.memory_budget);
            peak = peak.max(budget::tensor_peak(m.as_ref(), &job));
            parts = amalgam_core::methods::mats::block_parts(&t.method, &t.params, &job)?;
        }
        let mut params: Vec<String> = t
            .params
            .global
            .iter()
            .map(|(k, v)| format!("{k}={}", fmt_scalar(v)))
            .collect();
        if let Some(p) = parts {
            params.push(format!("parts={p}"));
        }
        for (i, m) in t.params.models.iter().enumerate() {
            if !m.is_empty() {
                let inner: Vec<String> = m
                    .iter()
                    .map(|(k, v)| format!("{k}={}", fmt_scalar(v)))
                    .collect();
                params.push(format!("m{}:{{{}}}", t.models[i].model, inner.join(",")));
            }
        }
        println!(
            "{:<56} {:<16} {:>12} {:>10}  {}",
            t.name,
            method_name,
            format!("{:?}", t.shape),
            human(bytes),
            params.join(" ")
        );
    }
    let layout = run::output_layout(config, plan, args.run.out_shard_size)?;
    println!("output: {} in {} file(s)", human(total), layout.files.len());
    println!(
        "estimated peak private memory: {} (budget {})",
        human(peak),
        human(args.run.memory_budget)
    );
    if peak > args.run.memory_budget {
        bail!(
            "the plan needs about {} but --memory-budget is {}; raise the budget",
            human(peak),
            human(args.run.memory_budget)
        );
    }
    Ok(())
}

fn fmt_scalar(v: &amalgam_core::params::Scalar) -> String {
    match v {
        amalgam_core::params::Scalar::Num(x) => format!("{x}"),
        amalgam_core::params::Scalar::Bool(b) => format!("{b}"),
        amalgam_core::params::Scalar::Str(s) => s.clone(),
    }
}

/// Run `amalgam merge`.
/// `--workers N`: the embedded coordinator and `N` workers.
fn run_embedded(args: &MergeArgs, opts: MergeOptions, quiet: bool) -> Result<()> {
    let out = opts.out_dir.clone();
    let job = super::cluster::prepare(&args.config, args.run.strict, true, opts, args.shard_size)?;
    let tensors = job.plan.tensors.len();
    let method = job.plan.method.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let t = std::time::Instant::now();
    let summary = rt
        .block_on(amalgam_cluster::merge_job::run_embedded(job, args.workers))
        .with_context(|| format!("merging {} into {}", args.config.display(), out.display()))?;
    if !quiet {
        println!(
            "merged {tensors} tensors with `{method}` into {} ({} in {} file(s), {} shards, {} workers, {:.2} s)",
            out.display(),
            human(summary.total_bytes),
            summary.files.len(),
            summary.shards,
            args.workers,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

pub fn run(args: MergeArgs, quiet: bool) -> Result<()> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting the thread count")?;
    }
    let config = load_config(&args.config, args.run.strict, quiet)?;
    let (inputs, plan) = prepare(&config, &args.config, args.run.strict, quiet)?;
    if args.dry_run {
        return print_dry_run(&config, &plan, &args);
    }
    let out = match (&args.out, &args.out_positional) {
        (Some(o), None) | (None, Some(o)) => o.clone(),
        (Some(_), Some(_)) => {
            bail!("give the output directory once (either --out DIR or a second argument)")
        }
        (None, None) => bail!("no output directory: pass --out DIR"),
    };
    let mut opts = args.run.options(out.clone());
    opts.device = crate::cmd::device::open(&args.device)?;
    if args.workers > 0 && args.device != "cpu" {
        bail!("--device applies to direct merges; with --workers, give each worker its device");
    }
    if args.workers > 0 {
        drop(inputs);
        run_embedded(&args, opts, quiet)?;
        return run_evaluation(&config, &args.config, &out, quiet);
    }
    let bar = Bar::new(quiet);
    let dir = args.config.parent().filter(|p| !p.as_os_str().is_empty());
    let summary = run::execute(&config, &plan, &inputs, dir, &opts, &bar)
        .with_context(|| format!("merging {} into {}", args.config.display(), out.display()))?;
    if !quiet {
        let secs = (summary.global_time + summary.merge_time).as_secs_f64();
        println!(
            "merged {} tensors with `{}` into {} ({} in {} file(s), {:.2} s, {:.2} GB/s of input)",
            plan.tensors.len(),
            plan.method,
            out.display(),
            human(summary.total_bytes),
            summary.files.len(),
            secs,
            summary.input_bytes as f64 / secs.max(1e-9) / 1e9
        );
        if let amalgam_engine::device::Device::Accelerator(a) = &opts.device {
            if let Some(line) = a.report() {
                println!("{line}");
            }
        }
    }
    run_evaluation(&config, &args.config, &out, quiet)
}

/// Runs the config's `evaluation:` suite (if any) on the merged model in `out`.
fn run_evaluation(config: &MergeConfig, config_path: &Path, out: &Path, quiet: bool) -> Result<()> {
    let Some(ev) = &config.evaluation else {
        return Ok(());
    };
    let dir = config_path.parent().unwrap_or(Path::new(""));
    let suite_path = dir.join(&ev.suite);
    let suite = amalgam_eval::suite::Suite::load(&suite_path)?;
    let batch_size = ev.batch_size.unwrap_or_else(|| suite.batch_size());
    let outputs = crate::cmd::eval::EvalOutputs {
        json: out.join(ev.out.as_deref().unwrap_or("evaluation.json")),
        markdown: None,
        dump_scores: ev.dump_scores.as_ref().map(|d| out.join(d)),
    };
    let report = crate::cmd::eval::evaluate(
        out,
        &suite,
        batch_size,
        1,
        &crate::cmd::eval::Mode::Local,
        &outputs,
        quiet,
    )
    .with_context(|| format!("evaluating {} on {}", out.display(), suite_path.display()))?;
    if !quiet {
        println!("{}", report.to_markdown());
        println!("evaluation written to {}", outputs.json.display());
    }
    Ok(())
}
