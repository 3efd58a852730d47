//! `amalgam eval`: rank-classification evaluation of a model on a suite of tasks.
//!
//! The suite's tasks are rendered into one list of scoring requests, cut into batches before
//! any model runs, and scored either here (one process) or by worker processes through the
//! cluster's leases (`--workers N` starts them locally, `--listen` waits for external ones).
//! Either way the batches are the same, so the report is the same, bit for bit.

use crate::cmd::cluster::read_token;
use crate::progress::count_bar;
use amalgam_cluster::eval_job::EvalHost;
use amalgam_cluster::server::{serve, JobHost, ServerOptions};
use amalgam_eval::model::{CausalLm, LoadOptions};
use amalgam_eval::report::Report;
use amalgam_eval::score::{score_all, LmScorer};
use amalgam_eval::suite::{PreparedSuite, Suite};
use amalgam_eval::{ScoreRequest, Scored};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `amalgam eval`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  amalgam eval --model merged/ --suite suite.yaml --out results.json\n\n\
A suite (YAML) lists tasks: BIG-bench JSON tasks, FIB-style pairs or plain JSONL, each marked\n\
`split: held_in` or `held_out`, with an optional `limit` of examples. The report gives each\n\
task's metric and the held-in and held-out means, as JSON (--out) and a Markdown table."
)]
pub struct EvalArgs {
    /// The model: a Hugging Face directory (config.json, tokenizer.json, safetensors) or a
    /// `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// The suite file (YAML).
    #[arg(long)]
    pub suite: PathBuf,
    /// Where to write the report (JSON).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Where to write the Markdown report (default: the JSON path with `.md`).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Also write every example's per-choice log-likelihood and token count (JSONL).
    #[arg(long, value_name = "FILE")]
    pub dump_scores: Option<PathBuf>,
    /// Requests scored per forward pass (default: the suite's `batch_size`, else 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    pub workers: WorkerArgs,
    /// Batches leased to a worker at a time.
    #[arg(long, default_value_t = 4)]
    pub batches_per_shard: usize,
}

/// Run `amalgam eval`.
pub fn run(a: EvalArgs, quiet: bool) -> Result<()> {
    let suite = Suite::load(&a.suite)?;
    let batch_size = a.batch_size.unwrap_or_else(|| suite.batch_size()).max(1);
    let out = EvalOutputs {
        json: a.out.clone(),
        markdown: a.markdown.clone(),
        dump_scores: a.dump_scores.clone(),
    };
    let mode = match a.workers.serve_options("eval", "batches")? {
        Some(o) => Mode::Serve(o),
        None => Mode::Local,
    };
    let report = evaluate(
        &a.model,
        &suite,
        batch_size,
        a.batches_per_shard,
        &mode,
        &out,
        quiet,
    )?;
    if !quiet {
        println!("{}", report.to_markdown());
        println!("report written to {}", out.json.display());
    }
    Ok(())
}

/// Where an evaluation writes its results.
#[derive(Debug, Clone)]
pub struct EvalOutputs {
    /// The JSON report.
    pub json: PathBuf,
    /// The Markdown report (default: the JSON path with `.md`).
    pub markdown: Option<PathBuf>,
    /// Per-example scores (JSONL), if wanted.
    pub dump_scores: Option<PathBuf>,
}

/// How the requests are scored.
#[derive(Debug, Clone)]
pub enum Mode {
    /// In this process.
    Local,
    /// By workers leasing batches from a coordinator served here.
    Serve(ServeOptions),
}

/// Where the work of `eval` / `stats` runs: here, or on worker processes.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Run on this many local worker processes through the cluster path (0: in this process).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Serve the work to external workers (`amalgam worker --coordinator URL`) on this address.
    /// Every path the job names (model, data, adapters, checkpoints) must be the same on every
    /// worker.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token workers must send (with --listen).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Lease time-to-live in seconds: a worker silent this long loses its work to another.
    #[arg(long, default_value_t = 30)]
    pub lease_ttl: u64,
}

impl WorkerArgs {
    /// How to serve the job (`job_id` counting `unit`s), or `None` to run in this process.
    pub fn serve_options(
        &self,
        job_id: &'static str,
        unit: &'static str,
    ) -> Result<Option<ServeOptions>> {
        if self.workers == 0 && self.listen.is_none() {
            return Ok(None);
        }
        Ok(Some(ServeOptions {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            token: read_token(&self.token_file)?,
            local_workers: self.workers,
            lease_ttl: Duration::from_secs(self.lease_ttl.max(1)),
            job_id,
            unit,
        }))
    }
}

/// Evaluates `model` on `suite`, writes the report files, returns the report.
pub fn evaluate(
    model: &Path,
    suite: &Suite,
    batch_size: usize,
    batches_per_shard: usize,
    mode: &Mode,
    out: &EvalOutputs,
    quiet: bool,
) -> Result<Report> {
    let prepared = PreparedSuite::prepare(suite)?;
    let requests = prepared.requests();
    let started = Instant::now();
    let scores = match mode {
        Mode::Local => score_here(model, requests, batch_size, quiet)?,
        Mode::Serve(o) => {
            score_on_workers(model, requests, batch_size, batches_per_shard, o, quiet)?
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let report = prepared.grade(&scores)?;
    if !quiet {
        let examples: usize = report.tasks.iter().map(|t| t.examples).sum();
        eprintln!(
            "scored {examples} examples ({} requests) in {secs:.1} s: {:.2} examples/s",
            requests.len(),
            examples as f64 / secs.max(1e-9)
        );
    }
    amalgam_io::write_text_atomic(&out.json, &report.to_json()?)
        .with_context(|| format!("writing {}", out.json.display()))?;
    let md = out
        .markdown
        .clone()
        .unwrap_or_else(|| out.json.with_extension("md"));
    amalgam_io::write_text_atomic(&md, &report.to_markdown())
        .with_context(|| format!("writing {}", md.display()))?;
    if let Some(path) = &out.dump_scores {
        let mut buf = Vec::new();
        prepared.dump_scores(&scores, &mut buf)?;
        let text = String::from_utf8(buf).context("score dump is not UTF-8")?;
        amalgam_io::write_text_atomic(path, &text)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Loads `model` (a Hugging Face directory or a `.gguf` file) for scoring, in f32 on the CPU.
pub fn load_scorer(model: &Path) -> Result<LmScorer> {
    let lm = CausalLm::load(model, &LoadOptions::default())?;
    Ok(LmScorer::new(lm))
}

fn score_here(
    model: &Path,
    requests: &[ScoreRequest],
    batch_size: usize,
    quiet: bool,
) -> Result<Vec<Scored>> {
    let started = Instant::now();
    let mut scorer = load_scorer(model)?;
    if !quiet {
        eprintln!(
            "loaded {} in {:.1} s",
            model.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let pb = count_bar(requests.len(), "requests", "scoring", quiet);
    let scores = score_all(&mut scorer, requests, batch_size, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    Ok(scores)
}

fn score_on_workers(
    model: &Path,
    requests: &[ScoreRequest],
    batch_size: usize,
    batches_per_shard: usize,
    served: &ServeOptions,
    quiet: bool,
) -> Result<Vec<Scored>> {
    let model =
        std::path::absolute(model).with_context(|| format!("resolving {}", model.display()))?;
    if !model.exists() {
        bail!("model {} does not exist", model.display());
    }
    let host = Arc::new(EvalHost::new(
        model.display().to_string(),
        requests.to_vec(),
        batch_size,
        batches_per_shard.max(1),
    ));
    let h = Arc::clone(&host);
    serve_until_done(host.clone(), served, quiet, move || h.progress())?;
    Ok(host.scores()?)
}

/// How [`serve_until_done`] serves a job.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to serve on (port 0 picks one).
    pub listen: SocketAddr,
    /// Bearer token workers must send.
    pub token: Option<String>,
    /// Worker processes to start here.
    pub local_workers: usize,
    /// Lease time-to-live.
    pub lease_ttl: Duration,
    /// Job id shown to workers.
    pub job_id: &'static str,
    /// What the progress bar counts (the host's units of work).
    pub unit: &'static str,
}

/// Serves `host` to workers (starting `local_workers` of them here) until every shard is
/// committed; `progress` returns (units done, total).
pub fn serve_until_done<H: JobHost>(
    host: Arc<H>,
    o: &ServeOptions,
    quiet: bool,
    progress: impl Fn() -> (usize, usize),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let opts = ServerOptions {
            job_id: o.job_id.into(),
            token: o.token.clone(),
            lease_ttl: o.lease_ttl,
            heartbeat_interval: (o.lease_ttl / 3).max(Duration::from_millis(100)),
            ..ServerOptions::default()
        };
        let server = serve(host, o.listen, opts)
            .await
            .with_context(|| format!("serving on {}", o.listen))?;
        let url = server.url();
        if !quiet {
            // On stdout, like `amalgam coordinator`'s line: scripts read the URL from it.
            println!(
                "{} coordinator listening on {url} ({} {}); workers: amalgam worker --coordinator {url}",
                o.job_id,
                progress().1,
                o.unit
            );
        }
        let mut children = Vec::new();
        for i in 0..o.local_workers {
            children.push(spawn_worker(&url, o.token.as_deref(), i, o.local_workers)?);
        }
        let pb = count_bar(progress().1, o.unit, o.job_id, quiet);
        let done = server.done();
        tokio::pin!(done);
        loop {
            tokio::select! {
                _ = &mut done => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    pb.set_position(progress().0 as u64);
                    for c in children.iter_mut() {
                        if let Some(st) = c.try_wait().context("waiting for a worker")? {
                            if !st.success() {
                                bail!("a local worker process exited with {st}");
                            }
                        }
                    }
                }
            }
        }
        pb.finish_and_clear();
        // Keep serving until the local workers have heard `done` (one may still be loading the
        // model when the others finish), and linger for external ones.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        for c in children.iter_mut() {
            while c.try_wait().context("waiting for a worker")?.is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.shutdown(Duration::from_secs(5)).await?;
        for mut c in children {
            let _ = tokio::task::block_in_place(|| c.wait());
        }
        if o.token.is_some() && o.local_workers > 0 {
            let _ = std::fs::remove_dir_all(token_dir());
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// Where local workers' token file lives (private to this process).
fn token_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("amalgam-token-{}", std::process::id()))
}

/// Starts local worker `i` of `n`, with its share of the cores (candle's matmuls and rayon
/// both size their pools from `RAYON_NUM_THREADS`; without it, n workers each take every core).
fn spawn_worker(url: &str, token: Option<&str>, i: usize, n: usize) -> Result<std::process::Child> {
    let exe = std::env::current_exe().context("locating the amalgam binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--quiet", "worker", "--coordinator", url])
        .args(["--name", &format!("local-{i}")]);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let share = cores / n.max(1) + usize::from(i < cores % n.max(1));
        cmd.env("RAYON_NUM_THREADS", share.max(1).to_string());
    }
    if let Some(t) = token {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = token_dir();
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("token");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&f)
            .with_context(|| format!("writing {}", f.display()))?;
        std::io::Write::write_all(&mut file, t.as_bytes())?;
        cmd.arg("--token-file").arg(f);
    }
    cmd.stdin(std::process::Stdio::null());
    cmd.spawn().context("starting a local worker process")
}
