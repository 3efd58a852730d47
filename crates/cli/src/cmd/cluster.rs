//! `amalgam coordinator`, `amalgam worker`, `amalgam status`: the same merge on a cluster.
//!
//! The coordinator plans, cuts the output into shards and leases them to workers over gRPC;
//! workers open the same model paths (shared storage), merge their shards and stream the bytes
//! back; the coordinator writes the checkpoint, byte-identical to `amalgam merge`. Its job
//! state (the plan hash and the committed shards) is journaled, so a restarted coordinator
//! with the same `--job-id` redoes only the shards not yet committed.

use crate::cmd::merge::{load_config, RunArgs};
use crate::size::{human, parse_size};
use amalgam_cluster::adapter_job::AdapterExecutor;
use amalgam_cluster::etcd_store::EtcdStore;
use amalgam_cluster::eval_job::EvalExecutor;
use amalgam_cluster::journal::{JobStore, JournalStore};
use amalgam_cluster::merge_job::{
    finish_job, prepare_job, MergeExecutor, MergeHost, DEFAULT_SHARD_BYTES,
};
use amalgam_cluster::pb::JobKind;
use amalgam_cluster::server::{serve, ServerOptions};
use amalgam_cluster::stats_job::StatsExecutor;
use amalgam_cluster::tls::{ClientTls, ServerTls};
use amalgam_cluster::worker::{run_worker, ShardExecutor, WorkerOptions};
use amalgam_engine::run::MergeOptions;
use amalgam_eval::Scorer;
use anyhow::{Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `amalgam coordinator`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  amalgam coordinator --config ties.yaml --out merged/ --listen 0.0.0.0:7070 --token-file token\n  amalgam worker --coordinator http://HOST:7070 --token-file token   (on every node)\n  amalgam coordinator --serve --listen 0.0.0.0:7070 --token-file token   (long-lived)\n  amalgam submit ties.yaml --out /shared/merged --coordinator http://HOST:7070 --token-file token"
)]
pub struct CoordinatorArgs {
    /// The merge config (mergekit YAML). Model paths must be the same on every worker.
    #[arg(long, required_unless_present = "serve")]
    pub config: Option<PathBuf>,
    /// Output directory.
    #[arg(long, short, required_unless_present = "serve")]
    pub out: Option<PathBuf>,
    /// Run as a long-lived service that merges the jobs `amalgam submit` sends, one after
    /// another, until stopped (instead of one `--config`). Job state is kept in memory.
    #[arg(long, conflicts_with_all = ["config", "out", "journal", "etcd", "job_id"])]
    pub serve: bool,
    /// Address to serve gRPC on (port 0 picks one; it is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// File holding the bearer token every worker must send.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Job id: a restarted coordinator with the same id resumes the job from its journal.
    #[arg(long, default_value = "merge")]
    pub job_id: String,
    /// Job journal (default: OUT/.amalgam-journal.jsonl). Not used with `--etcd`.
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Keep the job state (plan hash, committed shards) in etcd at this URL instead of a
    /// journal file, so a coordinator restarted anywhere with the same `--job-id` resumes.
    #[arg(long, value_name = "URL")]
    pub etcd: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS certificate (PEM) of the coordinator; with `--tls-key`, gRPC is served over TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the coordinator.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that worker certificates must chain to: mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Output bytes per shard (the unit of work leased to a worker).
    #[arg(long, default_value_t = DEFAULT_SHARD_BYTES, value_parser = parse_size)]
    pub shard_size: u64,
    /// Lease time-to-live in seconds (a worker silent this long loses its shard).
    #[arg(long, default_value_t = 30)]
    pub lease_ttl: u64,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Arguments of `amalgam submit`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  amalgam coordinator --serve --listen 0.0.0.0:7070 --token-file token   (once)\n  amalgam submit ties.yaml --out /shared/merged --coordinator http://HOST:7070 --token-file token"
)]
pub struct SubmitArgs {
    /// The merge config. Its model paths, and the output directory, must mean the same files
    /// on the coordinator (shared storage): they are sent as absolute paths.
    pub config: PathBuf,
    /// Output directory (written by the coordinator).
    #[arg(long, short)]
    pub out: PathBuf,
    /// URL of a coordinator started with `--serve`.
    #[arg(long)]
    pub coordinator: String,
    /// File holding the coordinator's bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Output bytes per shard (default: the coordinator's `--shard-size`).
    #[arg(long, value_parser = parse_size)]
    pub shard_size: Option<u64>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// Arguments of `amalgam worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Coordinator URL, e.g. `http://10.0.0.5:7070`.
    #[arg(long)]
    pub coordinator: String,
    /// File holding the coordinator's bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Device to merge on: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`); on a
    /// GPU the methods with device kernels run there, the rest on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How the parts of a split MaTS block (a gang, solved on this worker) sum their CG
    /// partials: `grpc` through the coordinator's Reduce, or `nccl`, an all-reduce on this
    /// worker's GPUs (needs --device cuda, libnccl, and one GPU per part, else the parts keep
    /// grpc). Both give the same bits.
    #[arg(long, value_name = "KIND", default_value = "grpc")]
    pub collectives: crate::cmd::device::Collectives,
    /// Only read files under this directory (repeatable; compared after resolving `..` and
    /// symlinks). A job naming a file elsewhere is refused, except model checkpoints, which are
    /// streamed from the coordinator instead (see --stream-inputs). Default: no restriction.
    #[arg(long = "allow-root", value_name = "DIR")]
    pub allow_root: Vec<PathBuf>,
    /// Where model checkpoints are read from. `auto`: a file is read locally when its
    /// coordinator path lies under --allow-root (any path without one), exists, and has the
    /// coordinator's size and header checksum; otherwise its byte ranges are streamed from the
    /// coordinator. `always`: every checkpoint file is streamed. `never`: read locally as the
    /// config names them, refusing paths outside --allow-root. Adapters, statistics files and
    /// MaTS `init` checkpoints are always read locally.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub stream_inputs: amalgam_cluster::remote_input::StreamInputs,
    /// Worker name shown in the coordinator's status (default: host name and PID).
    #[arg(long)]
    pub name: Option<String>,
    /// How long to keep retrying while the coordinator is unreachable, in seconds.
    #[arg(long, default_value_t = 60)]
    pub reconnect_timeout: u64,
    /// Publish this worker's membership in etcd at this URL (under a lease) while it runs.
    #[arg(long, value_name = "URL")]
    pub etcd: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS options of a coordinator client (`worker`, `status`).
#[derive(Debug, Args)]
pub struct ClientTlsArgs {
    /// CA (PEM) the coordinator's certificate must chain to (for an `https://` URL).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    fn load(&self) -> Result<Option<ClientTls>> {
        if self.tls_ca.is_none() && self.tls_cert.is_none() {
            return Ok(None);
        }
        Ok(Some(ClientTls::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )?))
    }
}

/// Arguments of `amalgam status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Coordinator URL, e.g. `http://10.0.0.5:7070`.
    #[arg(long)]
    pub coordinator: String,
    /// File holding the coordinator's bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

pub fn read_token(path: &Option<PathBuf>) -> Result<Option<String>> {
    path.as_ref()
        .map(|p| {
            amalgam_cluster::auth::load_token_file(p)
                .with_context(|| format!("token file {}", p.display()))
        })
        .transpose()
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Load, plan and cut `config` into shards (global passes included).
pub fn prepare(
    config_path: &Path,
    strict: bool,
    quiet: bool,
    opts: MergeOptions,
    shard_size: u64,
) -> Result<amalgam_cluster::merge_job::PreparedJob> {
    let config = load_config(config_path, strict, quiet)?;
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read config {}", config_path.display()))?;
    let dir = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok());
    let job = prepare_job(config, text, dir, opts, shard_size)
        .with_context(|| format!("planning {}", config_path.display()))?;
    super::merge::report_plan(&job.plan, config_path, strict, quiet)?;
    Ok(job)
}

fn server_tls(a: &CoordinatorArgs) -> Result<Option<ServerTls>> {
    Ok(match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(ServerTls::from_files(c, k, a.tls_client_ca.as_deref())?),
        _ => None,
    })
}

/// Run `amalgam coordinator`.
pub fn run_coordinator(a: CoordinatorArgs, quiet: bool) -> Result<()> {
    if a.serve {
        return run_service(a, quiet);
    }
    let (Some(config), Some(out)) = (a.config.clone(), a.out.clone()) else {
        anyhow::bail!("a coordinator needs --config and --out (or --serve)");
    };
    let token = read_token(&a.token_file)?;
    let opts = a.run.options(out.clone());
    let job = prepare(&config, a.run.strict, quiet, opts, a.shard_size)?;
    let tls = server_tls(&a)?;
    let host = Arc::new(MergeHost::new(&job, true)?);
    let journal = a
        .journal
        .clone()
        .unwrap_or_else(|| out.join(".amalgam-journal.jsonl"));
    let store: Arc<dyn JobStore> = match &a.etcd {
        Some(url) => Arc::new(EtcdStore::connect(url).with_context(|| "the job store")?),
        None => Arc::new(
            JournalStore::open(&journal)
                .with_context(|| format!("job journal {}", journal.display()))?,
        ),
    };
    let rt = runtime()?;
    let (summary, already) = rt.block_on(async {
        let opts = ServerOptions {
            job_id: a.job_id.clone(),
            token,
            lease_ttl: Duration::from_secs(a.lease_ttl.max(1)),
            heartbeat_interval: Duration::from_millis((a.lease_ttl.max(1) * 1000 / 3).max(100)),
            store: Some(store),
            metrics_addr: a.metrics_listen,
            tls,
            ..ServerOptions::default()
        };
        let server = serve(Arc::clone(&host), a.listen, opts)
            .await
            .with_context(|| format!("serving on {}", a.listen))?;
        let already = server.status().shards_committed;
        if !quiet {
            println!(
                "coordinator: job `{}`, {} shards ({already} already committed), listening on {}",
                a.job_id,
                job.shards.len(),
                server.url()
            );
            if let Some(m) = server.metrics_addr() {
                println!("metrics on http://{m}/metrics");
            }
        }
        server.done().await;
        let failure = server.failure();
        // Linger so that waiting workers hear `done` from us instead of finding us gone.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.shutdown(Duration::from_secs(5)).await?;
        if let Some(f) = failure {
            anyhow::bail!("job `{}` failed: {f}", a.job_id);
        }
        let h = Arc::clone(&host);
        let j = &job;
        let summary = tokio::task::block_in_place(|| finish_job(j, &h))?;
        Ok::<_, anyhow::Error>((summary, already))
    })?;
    if a.etcd.is_none() {
        let _ = std::fs::remove_file(&journal);
    }
    if !quiet && host.passes() > 0 {
        println!(
            "model-global pre-pass: {} passes of {} shards on the workers, largest shard result {} bytes",
            host.passes(),
            host.pass_shards(),
            host.largest_pass_result()
        );
    }
    if !quiet {
        println!(
            "merged {} tensors in {} shards ({already} committed before this run, {} merged by this run) into {} ({} in {} file(s))",
            job.plan.tensors.len(),
            summary.shards,
            host.accepted(),
            out.display(),
            human(summary.total_bytes),
            summary.files.len()
        );
    }
    Ok(())
}

/// Run `amalgam coordinator --serve`: take submitted jobs until stopped.
fn run_service(a: CoordinatorArgs, quiet: bool) -> Result<()> {
    let token = read_token(&a.token_file)?;
    let tls = server_tls(&a)?;
    let host = Arc::new(amalgam_cluster::service::ServiceHost::new(a.shard_size));
    let rt = runtime()?;
    rt.block_on(async {
        let opts = ServerOptions {
            job_id: "service".into(),
            token,
            lease_ttl: Duration::from_secs(a.lease_ttl.max(1)),
            heartbeat_interval: Duration::from_millis((a.lease_ttl.max(1) * 1000 / 3).max(100)),
            metrics_addr: a.metrics_listen,
            tls,
            ..ServerOptions::default()
        };
        let server = serve(host, a.listen, opts)
            .await
            .with_context(|| format!("serving on {}", a.listen))?;
        if !quiet {
            println!(
                "coordinator: serving submitted jobs (amalgam submit) on {}",
                server.url()
            );
            if let Some(m) = server.metrics_addr() {
                println!("metrics on http://{m}/metrics");
            }
        }
        // Runs until the process is stopped.
        server.done().await;
        let failure = server.failure();
        server.shutdown(Duration::from_secs(5)).await?;
        match failure {
            Some(f) => anyhow::bail!("the service failed: {f}"),
            None => Ok(()),
        }
    })
}

/// Run `amalgam submit`: send a merge job to a `--serve` coordinator and wait for it.
pub fn run_submit(a: SubmitArgs, quiet: bool) -> Result<()> {
    let token = read_token(&a.token_file)?;
    let tls = a.tls.load()?;
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read config {}", a.config.display()))?;
    // Checked here first, so a typo fails before anything is sent.
    load_config(&a.config, a.run.strict, quiet)?;
    let config_abs = std::path::absolute(&a.config)
        .with_context(|| format!("resolving {}", a.config.display()))?;
    let config_dir = config_abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let out =
        std::path::absolute(&a.out).with_context(|| format!("resolving {}", a.out.display()))?;
    let req = amalgam_cluster::pb::SubmitJobRequest {
        config_yaml: text,
        config_dir: config_dir.display().to_string(),
        out_dir: out.display().to_string(),
        shard_bytes: a.shard_size.unwrap_or(0),
        memory_budget: a.run.memory_budget,
        out_shard_size: a.run.out_shard_size,
        overwrite: a.run.overwrite,
        allow_nonfinite: a.run.allow_nonfinite,
        strict: a.run.strict,
    };
    if !quiet {
        println!(
            "submitting {} to {}; waiting for the merge",
            a.config.display(),
            a.coordinator
        );
    }
    let rt = runtime()?;
    let r = rt
        .block_on(async {
            let mut c = amalgam_cluster::client::connect_with(
                &a.coordinator,
                token.as_deref(),
                tls.as_ref(),
            )
            .await?;
            let r = c
                .submit_job(req)
                .await
                .map_err(|s| amalgam_cluster::ClusterError::rpc("SubmitJob", s))?;
            Ok::<_, amalgam_cluster::ClusterError>(r.into_inner())
        })
        .with_context(|| format!("job {} on {}", a.config.display(), a.coordinator))?;
    if !quiet {
        println!(
            "{}: merged {} tensors in {} shards into {} ({} in {} file(s)) in {:.1} s",
            r.job_id,
            r.tensors,
            r.shards,
            out.display(),
            human(r.total_bytes),
            r.files.len(),
            r.seconds
        );
    }
    Ok(())
}

/// Run `amalgam worker`.
pub fn run_worker_cmd(a: WorkerArgs, quiet: bool) -> Result<()> {
    let device = crate::cmd::device::open_with(&a.device, a.collectives)?;
    let token = read_token(&a.token_file)?;
    let roots = if a.allow_root.is_empty() {
        None
    } else {
        Some(amalgam_cluster::roots::AllowedRoots::new(&a.allow_root)?)
    };
    let name = a.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let opts = WorkerOptions {
        url: a.coordinator.clone(),
        token,
        name,
        device: a.device.clone(),
        threads: rayon::current_num_threads() as u32,
        allowed_roots: a
            .allow_root
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        reconnect_timeout: Duration::from_secs(a.reconnect_timeout),
        tls: a.tls.load()?,
        etcd: a.etcd.clone(),
        ..WorkerOptions::default()
    }
    .with_test_hooks_from_env()?;
    let rt = runtime()?;
    let exec = Arc::new(JobExecutor {
        merge: MergeExecutor::with_roots(roots.clone())
            .with_device(device)
            .with_stream_inputs(a.stream_inputs),
        eval: EvalExecutor::new(Box::new(load_scorer), roots.clone()),
        stats: StatsExecutor::new(roots.clone()),
        adapter: AdapterExecutor::new(roots),
    });
    let report = rt
        .block_on(run_worker(opts, Arc::clone(&exec)))
        .with_context(|| format!("worker of {}", a.coordinator))?;
    if !quiet {
        println!(
            "worker {}: {} shards committed, {} dropped, {} rejected",
            report.worker_id,
            report.shards_committed,
            report.results_dropped,
            report.results_rejected
        );
        println!(
            "worker {}: {} input bytes streamed from the coordinator",
            report.worker_id,
            exec.merge.input_bytes_streamed()
        );
    }
    Ok(())
}

/// A worker's executor: merge shards, evaluation batches, statistics chunks or adapter modules,
/// as the coordinator's job kind says.
struct JobExecutor {
    merge: MergeExecutor,
    eval: EvalExecutor,
    stats: StatsExecutor,
    adapter: AdapterExecutor,
}

impl ShardExecutor for JobExecutor {
    fn execute(
        &self,
        spec: &[u8],
        inputs: &amalgam_cluster::worker::InputClient,
    ) -> amalgam_cluster::Result<Vec<u8>> {
        match inputs.job_kind() {
            JobKind::Eval => self.eval.execute(spec, inputs),
            JobKind::Stats => self.stats.execute(spec, inputs),
            JobKind::Adapter => self.adapter.execute(spec, inputs),
            JobKind::Unspecified => self.merge.execute(spec, inputs),
        }
    }
}

/// Loads a model for evaluation shards (once per worker and model).
fn load_scorer(path: &Path) -> std::result::Result<Box<dyn Scorer + Send>, String> {
    crate::cmd::eval::load_scorer(path)
        .map(|s| Box::new(s) as Box<dyn Scorer + Send>)
        .map_err(|e| format!("{e:#}"))
}

/// Run `amalgam status`.
pub fn run_status(a: StatusArgs) -> Result<()> {
    let token = read_token(&a.token_file)?;
    let tls = a.tls.load()?;
    let rt = runtime()?;
    let st = rt.block_on(async {
        let mut c =
            amalgam_cluster::client::connect_with(&a.coordinator, token.as_deref(), tls.as_ref())
                .await?;
        let r = c
            .job_status(amalgam_cluster::pb::JobStatusRequest {})
            .await
            .map_err(|s| amalgam_cluster::ClusterError::rpc("JobStatus", s))?;
        Ok::<_, amalgam_cluster::ClusterError>(r.into_inner())
    })?;
    println!(
        "job `{}`: {}/{} shards committed, {} leased, {} pending; {} lease expiries, {} re-leases; {} received{}",
        st.job_id,
        st.shards_committed,
        st.shards_total,
        st.shards_leased,
        st.shards_pending,
        st.lease_expiries,
        st.re_leases,
        human(st.bytes_received),
        if st.done { "; done" } else { "" }
    );
    for w in &st.workers {
        println!(
            "  {} (#{}, {}, {} threads): {} shards, {}",
            w.name,
            w.worker_id,
            w.device,
            w.threads,
            w.shards_done,
            human(w.bytes_received)
        );
    }
    Ok(())
}
