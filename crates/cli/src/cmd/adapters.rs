//! `amalgam merge-adapters` (PEFT adapters into one adapter) and `amalgam extract-lora` (a LoRA
//! from a full fine-tune). The work is `amalgam_engine::adapter_merge`.

//!
//! Both run as units of work (one per module) cut into shards: here, or with `--workers N` /
//! `--listen ADDR` on worker processes through the cluster's adapter job
//! (`amalgam_cluster::adapter_job`), with the same bytes either way.

use crate::cmd::eval::{serve_until_done, WorkerArgs};
use crate::progress::Bar;
use crate::size::parse_size;
use amalgam_cluster::adapter_job::AdapterHost;
use amalgam_engine::adapter_merge::{
    check_out, run_local, AdapterJobSpec, AdapterSummary, ExtractLoraOptions,
    DEFAULT_ADAPTER_SHARD_BYTES,
};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the work runs and how it is cut: shared by both commands.
#[derive(Debug, Args)]
pub struct AdapterWorkArgs {
    /// Input bytes per shard of modules (the unit a worker leases).
    #[arg(long, default_value_t = DEFAULT_ADAPTER_SHARD_BYTES, value_parser = parse_size)]
    pub shard_size: u64,
    #[command(flatten)]
    pub workers: WorkerArgs,
}

/// Arguments of `amalgam merge-adapters`.
#[derive(Debug, Args)]
#[command(
    after_help = "Config (YAML), PEFT's add_weighted_adapter arguments:\n  combination_type: svd        # linear, cat, svd, ties_svd, dare_linear_svd, dare_ties_svd,\n                               # magnitude_prune_svd, ties, dare_linear, dare_ties, magnitude_prune,\n                               # knots_ties, knots_dare; (IA)^3: linear, task_arithmetic, ties,\n                               # dare_linear, dare_ties, magnitude_prune, fisher, mats\n                               # (fisher, mats: `statistics: FILE` on every adapter)\n  adapters:\n    - {path: lora-a, weight: 0.7}\n    - {path: lora-b, weight: 0.3}\n  density: 0.5                 # pruning types\n  majority_sign_method: total  # or frequency\n  svd_rank: 16                 # SVD types (default: the largest rank)\n  svd_clamp: 0.99              # optional quantile\n  seed: 0                      # DARE masks\n  top_k: 20                    # KnOTS: percent kept; also alpha (0.6),\n                               # sign_mode (sum_of_values), drop_rate (0.1, knots_dare)\n\nExamples:\n  amalgam merge-adapters merge.yaml --out merged-adapter/\n  amalgam merge-adapters merge.yaml --out merged-adapter/ --workers 2   # on 2 worker processes"
)]
pub struct MergeAdaptersArgs {
    /// The config (YAML: `combination_type`, `adapters`, `density`, ...).
    pub config: PathBuf,
    /// The adapter directory to write.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Replace an adapter already in the output directory.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub work: AdapterWorkArgs,
}

/// Arguments of `amalgam extract-lora`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  amalgam extract-lora --base base/ --model finetuned/ --rank 32 --out lora/ --modules 'self_attn'\n  amalgam extract-lora --base base/ --model finetuned/ --rank 32 --out lora/ --workers 2"
)]
pub struct ExtractLoraArgs {
    /// The base checkpoint (directory or .safetensors file).
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Maximum rank of each module's LoRA.
    #[arg(long)]
    pub rank: usize,
    /// The adapter directory to write.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Only modules whose path matches this regular expression (searched, as mergekit's
    /// `--include-regex`).
    #[arg(long)]
    pub modules: Option<String>,
    /// Put the singular values on A instead of splitting √S between A and B.
    #[arg(long)]
    pub no_distribute_scale: bool,
    /// Drop singular values at or below this (0: keep `--rank` of them).
    #[arg(long, default_value_t = 0.0)]
    pub sv_epsilon: f64,
    /// Replace an adapter already in the output directory.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub work: AdapterWorkArgs,
}

fn report(s: &AdapterSummary, quiet: bool) {
    if !quiet {
        println!(
            "wrote {} adapter ({}, {} modules{}) to {}",
            s.kind,
            s.method,
            s.modules,
            if s.rank > 0 {
                format!(", r = {}", s.rank)
            } else {
                String::new()
            },
            s.out_dir.display()
        );
    }
}

/// Runs `spec` here or on workers, as `work` says, writing the adapter into `out`.
fn run_job(
    spec: &AdapterJobSpec,
    out: &Path,
    overwrite: bool,
    work: &AdapterWorkArgs,
    quiet: bool,
) -> Result<AdapterSummary> {
    let bar = Bar::new(quiet);
    let Some(served) = work.workers.serve_options("adapters", "modules")? else {
        return Ok(run_local(spec, out, overwrite, work.shard_size, &bar)?);
    };
    // Refuse an existing adapter before the global pass and the workers, as run_local does.
    check_out(out, overwrite, spec)?;
    let host = Arc::new(AdapterHost::new(spec, work.shard_size, &bar)?);
    let h = Arc::clone(&host);
    serve_until_done(Arc::clone(&host), &served, quiet, move || h.progress())?;
    Ok(host.write(out, overwrite)?)
}

/// Run `amalgam merge-adapters`.
pub fn run_merge(a: MergeAdaptersArgs, quiet: bool) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let spec = AdapterJobSpec::merge(&text, a.config.parent())
        .with_context(|| format!("{}", a.config.display()))?;
    let s = run_job(&spec, &a.out, a.overwrite, &a.work, quiet)?;
    report(&s, quiet);
    Ok(())
}

/// Run `amalgam extract-lora`.
pub fn run_extract(a: ExtractLoraArgs, quiet: bool) -> Result<()> {
    let opts = ExtractLoraOptions {
        base: a.base,
        model: a.model,
        rank: a.rank,
        out: a.out,
        modules: a.modules,
        distribute_scale: !a.no_distribute_scale,
        sv_epsilon: a.sv_epsilon,
        overwrite: a.overwrite,
    };
    let spec = AdapterJobSpec::extract(&opts)?;
    let s = run_job(&spec, &opts.out, opts.overwrite, &a.work, quiet)?;
    report(&s, quiet);
    Ok(())
}
