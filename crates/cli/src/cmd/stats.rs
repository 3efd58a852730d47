//! `amalgam stats`: the statistics data-driven merges need (Fisher, Gram, K-FAC, (IA)^3 block
//! Fisher), computed from data and written in the statistics-file format the merge reads
//! (architecture.md, "Statistics files").

use crate::cmd::eval::{serve_until_done, ServeOptions, WorkerArgs};
use crate::progress::count_bar;
use amalgam_cluster::stats_job::{StatsHost, StatsJob};
use amalgam_eval::model::{CausalLm, LoadOptions};
use amalgam_eval::stats::{
    compute_stats, examples_used, install_ia3, read_jsonl, GramPositions, StatsKindArg,
    StatsOptions, StatsOutput, DEFAULT_CHUNK, DEFAULT_EXAMPLES,
};
use amalgam_io::{Adapter, Checkpoint};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `amalgam stats`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  amalgam stats --model ft1/ --data train.jsonl --kind fisher --out ft1.fisher.safetensors\n  amalgam stats --model ft1/ --data train.jsonl --kind gram --examples 1000 --out ft1.gram.safetensors\n  amalgam stats --model base/ --adapter ia3-ft1/ --data train.jsonl --kind ia3-block --out ia3-ft1.stats.safetensors\n\n\
DATA is JSONL: {\"input\": ..., \"target\": ...} (the loss is the mean NLL of the target tokens given\n\
the input), a rank-classification task's {\"input\", \"choices\", \"label\"} (the target is the\n\
correct choice) or {\"text\": ...} (every token after BOS). One example per batch, as the MaTS\n\
reference.\n\
Name the output in the merge config as the model's `statistics:`."
)]
pub struct StatsArgs {
    /// The model: a Hugging Face directory or a `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// The data (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// `fisher` (diagonal empirical Fisher of every parameter), `gram` (Gram matrix of every
    /// linear layer's inputs), `kfac` (K-FAC input and output factors) or `ia3-block` (full
    /// Fisher of every (IA)^3 vector; needs --adapter).
    #[arg(long)]
    pub kind: StatsKindArg,
    /// Examples used (the first N; 0 = all).
    #[arg(long, default_value_t = DEFAULT_EXAMPLES)]
    pub examples: usize,
    /// The (IA)^3 adapter (PEFT directory) whose vectors `ia3-block` differentiates.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Positions a Gram / K-FAC factor counts: `all` fed tokens, or only the `scored` ones
    /// (those predicting target tokens).
    #[arg(long, default_value = "all")]
    pub positions: GramPositions,
    /// The statistics file to write (safetensors).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
    /// Examples per unit of work (a chunk); the sums of chunks are added in order, so the file
    /// does not depend on how chunks were spread over workers.
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    pub chunk: usize,
    #[command(flatten)]
    pub workers: WorkerArgs,
}

/// Computes the statistics in this process; also returns the (IA)^3 adapter when one is used.
fn compute_here(
    a: &StatsArgs,
    data: &[amalgam_eval::stats::StatsExample],
    mut opts: StatsOptions,
    n: usize,
    quiet: bool,
) -> Result<(StatsOutput, Option<Adapter>)> {
    let started = Instant::now();
    let load = LoadOptions {
        trainable: a.kind.needs_trainable(),
        ..LoadOptions::default()
    };
    let mut model = CausalLm::load(&a.model, &load)?;
    let adapter = match &a.adapter {
        Some(dir) => {
            let (vectors, adapter) = install_ia3(&mut model, dir)?;
            opts.ia3 = Some(vectors);
            Some(adapter)
        }
        None => None,
    };
    if !quiet {
        eprintln!(
            "loaded {} in {:.1} s",
            a.model.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let bar = count_bar(n, "examples", a.kind.name(), quiet);
    let out = compute_stats(&model, data, &opts, &mut |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    Ok((out, adapter))
}

/// The (IA)^3 adapter named by --adapter, opened (for the digest the file records).
fn adapter_of(a: &StatsArgs) -> Result<Option<Adapter>> {
    a.adapter
        .as_ref()
        .map(|d| Adapter::open(d).with_context(|| format!("reading the adapter {}", d.display())))
        .transpose()
}

/// Computes the statistics on worker processes, one chunk of examples per lease.
fn compute_on_workers(
    a: &StatsArgs,
    n_data: usize,
    opts: &StatsOptions,
    served: &ServeOptions,
    quiet: bool,
) -> Result<StatsOutput> {
    let abs =
        |p: &PathBuf| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
    let job = StatsJob {
        model: abs(&a.model)?,
        data: abs(&a.data)?,
        kind: a.kind,
        positions: a.positions,
        adapter: a.adapter.as_ref().map(abs).transpose()?,
    };
    let host = Arc::new(StatsHost::new(job, n_data, opts));
    let h = Arc::clone(&host);
    serve_until_done(Arc::clone(&host), served, quiet, move || h.progress())?;
    Ok(host.finish()?)
}

/// Run `amalgam stats`.
pub fn run(a: StatsArgs, quiet: bool) -> Result<()> {
    if a.out.exists() && !a.overwrite {
        bail!("{} exists; pass --overwrite to replace it", a.out.display());
    }
    if (a.kind == StatsKindArg::Ia3Block) != a.adapter.is_some() {
        bail!("--adapter is required with --kind ia3-block, and only with it");
    }
    let data = read_jsonl(&a.data)?;
    let mut opts = StatsOptions::new(a.kind);
    opts.examples = a.examples;
    opts.positions = a.positions;
    opts.chunk = a.chunk.max(1);
    let n = examples_used(data.len(), &opts);
    let started = Instant::now();
    let (out, adapter) = match a.workers.serve_options("stats", "chunks")? {
        Some(served) => (
            compute_on_workers(&a, data.len(), &opts, &served, quiet)?,
            adapter_of(&a)?,
        ),
        None => compute_here(&a, &data, opts, n, quiet)?,
    };
    let secs = started.elapsed().as_secs_f64();
    let out = match &adapter {
        Some(ad) => out.for_model(ad.checkpoint()),
        None if !amalgam_io::gguf::is_gguf(&a.model) => {
            let ckpt = Checkpoint::open(&a.model)
                .with_context(|| format!("reading the header of {}", a.model.display()))?;
            out.for_model(&ckpt)
        }
        // A GGUF model has no safetensors header to pin the statistics to.
        None => out,
    };
    let path = out.write(&a.out, a.overwrite)?;
    if !quiet {
        println!(
            "{} statistics of {} tensors from {n} examples ({:.2} examples/s) written to {}",
            a.kind,
            out.tensors.len(),
            n as f64 / secs.max(1e-9),
            path.display()
        );
    }
    Ok(())
}
