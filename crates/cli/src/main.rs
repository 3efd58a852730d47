//! The `amalgam` binary: wires the crates together; all work lives in the library crates.
#![deny(missing_docs)]

mod cmd;
mod interrupt;
mod progress;
mod report;
mod size;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed pages for reuse: a merge allocates and frees block buffers of the same
/// sizes tensor after tensor, and with the system allocator every large buffer is a fresh
/// mapping whose pages fault in one by one (measured: most of a linear merge's time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// amalgam merges fine-tuned models into one, streaming, in bounded memory.
///
/// Configs are mergekit YAML (a superset): existing mergekit configs run unchanged.
#[derive(Debug, Parser)]
#[command(
    name = "amalgam",
    version,
    about = "amalgam merges fine-tuned models into one, streaming, in bounded memory.\nConfigs are mergekit YAML: existing mergekit configs run unchanged.",
    after_help = "Start with `amalgam demo`, then `amalgam merge CONFIG --out DIR [--dry-run]`.",
    propagate_version = true
)]
struct Cli {
    /// Print only errors (no progress bar, no summary).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Merge the models a mergekit-style YAML config names into a Hugging Face checkpoint.
    Merge(cmd::merge::MergeArgs),
    /// Merge PEFT adapters (LoRA or (IA)^3) into one adapter (PEFT's combination types, KnOTS).
    MergeAdapters(cmd::adapters::MergeAdaptersArgs),
    /// Extract a LoRA adapter of a chosen rank from a full fine-tune (truncated SVD).
    ExtractLora(cmd::adapters::ExtractLoraArgs),
    /// List tensors, dtypes, shapes and bytes of a checkpoint, and any validation problems.
    Inspect(cmd::inspect::InspectArgs),
    /// List the merge methods and their parameters.
    Methods,
    /// Generate a tiny Llama-shaped base and fine-tunes, merge them with TIES, print where.
    Demo(cmd::demo::DemoArgs),
    /// Benchmark merges on generated models: linear/TIES vs the I/O floor, or `--suite mats`.
    Bench(cmd::bench::BenchArgs),
    /// Generate a seeded synthetic Llama-shaped checkpoint (for tests and experiments).
    Generate(cmd::generate::GenerateArgs),
    /// Evaluate a model on a suite of tasks (BIG-bench JSON, FIB pairs, JSONL) by rank
    /// classification; held-in and held-out means, as JSON and Markdown.
    Eval(cmd::eval::EvalArgs),
    /// Compute the statistics data-driven merges need (Fisher, Gram, K-FAC, (IA)^3 block
    /// Fisher) from data, as a statistics file the merge config names.
    Stats(cmd::stats::StatsArgs),
    /// Run a scaling study: methods x hyperparameter grids x number of models merged, each
    /// merge evaluated, with cost and quality, as results.csv, PNG plots and report.md.
    Study(cmd::study::StudyArgs),
    /// Serve a merge to cluster workers over gRPC and write the checkpoint they produce.
    Coordinator(cmd::cluster::CoordinatorArgs),
    /// Send a merge job to a long-lived coordinator (`coordinator --serve`) and wait for it.
    Submit(cmd::cluster::SubmitArgs),
    /// Merge shards leased from a coordinator until its job is done.
    Worker(cmd::cluster::WorkerArgs),
    /// Show a coordinator's job progress (shards, leases, workers).
    Status(cmd::cluster::StatusArgs),
    /// Check the GPU kernels against the CPU and print bandwidth figures (`--features cuda`).
    GpuCheck(cmd::gpu_check::GpuCheckArgs),
}

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 option enums).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Never hand freed pages back to the OS: block buffers are freed and reallocated tensor after
    // tensor, and purged pages come back as zero-filled page faults (measured: a quarter of a
    // linear merge's time). Peak memory is unchanged: the budget bounds the live set.
    // SAFETY: sets a process-wide allocator option before any thread starts.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if cli.quiet { "error" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs piped to a file or a collector stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let quiet = cli.quiet;
    interrupt::install();
    let result = match cli.command {
        Command::Merge(a) => cmd::merge::run(a, quiet),
        Command::MergeAdapters(a) => cmd::adapters::run_merge(a, quiet),
        Command::ExtractLora(a) => cmd::adapters::run_extract(a, quiet),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Methods => cmd::methods::run(),
        Command::Demo(a) => cmd::demo::run(a, quiet),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Generate(a) => cmd::generate::run(a, quiet),
        Command::Eval(a) => cmd::eval::run(a, quiet),
        Command::Stats(a) => cmd::stats::run(a, quiet),
        Command::Study(a) => cmd::study::run(a, quiet),
        Command::Coordinator(a) => cmd::cluster::run_coordinator(a, quiet),
        Command::Worker(a) => cmd::cluster::run_worker_cmd(a, quiet),
        Command::Status(a) => cmd::cluster::run_status(a),
        Command::Submit(a) => cmd::cluster::run_submit(a, quiet),
        Command::GpuCheck(a) => cmd::gpu_check::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", report::error_text(&e));
        std::process::exit(1);
    }
}
