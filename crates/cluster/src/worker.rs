//! The worker loop as a library: connect (with token), register, heartbeat in the background,
//! lease shards, run the engine's [`ShardExecutor`] on blocking threads, stream results back in
//! chunks with their sha256, until the coordinator says the job is done.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::client::{connect_with, Client};
use crate::error::{ClusterError, Result};
use crate::etcd_store::{EtcdStore, MemberInfo, Membership};
use crate::pb;
use crate::scheduler::{LeaseId, ShardId, WorkerId};
use crate::tls::ClientTls;
use crate::CHUNK_BYTES;

/// Environment variable read by [`WorkerOptions::with_test_hooks_from_env`]: pause after this
/// many result bytes have been streamed (see [`WorkerOptions::pause_after_bytes`]).
pub const ENV_PAUSE_AFTER_BYTES: &str = "AMALGAM_TEST_PAUSE_AFTER_BYTES";
/// Environment variable read by [`WorkerOptions::with_test_hooks_from_env`]: where the paused
/// worker writes its PID.
pub const ENV_PAUSE_PID_FILE: &str = "AMALGAM_TEST_PAUSE_PID_FILE";

/// The engine side of a worker: computes a shard's result bytes from its spec.
///
/// Called on a blocking thread; may block (file reads, `inputs.read`, `inputs.reduce`). The
/// parts of a gang run concurrently, one thread each, so they can meet in `reduce`.
pub trait ShardExecutor: Send + Sync + 'static {
    /// The result of the shard described by `spec` (opaque bytes from the planner).
    fn execute(&self, spec: &[u8], inputs: &InputClient) -> Result<Vec<u8>>;
}

/// Blocking access to the coordinator from inside [`ShardExecutor::execute`]: input byte
/// ranges (`ReadInput`) and reductions (`Reduce`).
#[derive(Clone)]
pub struct InputClient {
    client: Client,
    handle: Handle,
    shard_id: ShardId,
    lease_id: LeaseId,
    invalid: Arc<Mutex<BTreeSet<LeaseId>>>,
    job_kind: pb::JobKind,
}

impl std::fmt::Debug for InputClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputClient")
            .field("shard_id", &self.shard_id)
            .field("lease_id", &self.lease_id)
            .finish()
    }
}

impl InputClient {
    /// A client for use outside a lease (tools, tests). Must be used from a thread that is not
    /// running async code (e.g. inside `spawn_blocking`).
    pub fn new(client: Client, handle: Handle) -> Self {
        InputClient {
            client,
            handle,
            shard_id: 0,
            lease_id: 0,
            invalid: Arc::default(),
            job_kind: pb::JobKind::Unspecified,
        }
    }

    /// The kind of job the shard belongs to (the coordinator says so at registration).
    pub fn job_kind(&self) -> pb::JobKind {
        self.job_kind
    }

    /// The shard being executed.
    pub fn shard_id(&self) -> ShardId {
        self.shard_id
    }

    /// The lease the shard runs under. Put it in `reduce` keys shared by the parts of a gang,
    /// so a re-run of the gang never meets parts left over from a dead attempt.
    pub fn lease_id(&self) -> LeaseId {
        self.lease_id
    }

    /// True once the coordinator has said the lease is no longer valid (the result would be
    /// dropped, so the executor may stop early).
    pub fn is_cancelled(&self) -> bool {
        self.invalid
            .lock()
            .map(|s| s.contains(&self.lease_id))
            .unwrap_or(false)
    }

    /// Exactly `len` bytes of input `key` from `offset`, streamed from the coordinator in
    /// chunks. Blocks the calling thread.
    pub fn read(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut client = self.client.clone();
        let req = pb::ReadInputRequest {
            key: key.to_string(),
            offset,
            length: len,
        };
        self.handle.block_on(async move {
            let mut stream = client
                .read_input(req)
                .await
                .map_err(|s| ClusterError::rpc("ReadInput", s))?
                .into_inner();
            let cap = len.min(256 << 20) as usize;
            let mut out = Vec::with_capacity(cap);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|s| ClusterError::rpc("ReadInput", s))?;
                if chunk.offset != offset + out.len() as u64 {
                    return Err(ClusterError::Protocol(format!(
                        "ReadInput {key}: chunk at offset {}, expected {}",
                        chunk.offset,
                        offset + out.len() as u64
                    )));
                }
                out.extend_from_slice(&chunk.data);
                if out.len() as u64 > len {
                    return Err(ClusterError::Protocol(format!(
                        "ReadInput {key}: more than the {len} bytes asked for"
                    )));
                }
            }
            if out.len() as u64 != len {
                return Err(ClusterError::Protocol(format!(
                    "ReadInput {key}: got {} of {len} bytes",
                    out.len()
                )));
            }
            Ok(out)
        })
    }

    /// Element-wise sum of `values` with the other `parts_total - 1` parts of reduction
    /// `(key, round)`, added in part index order. Blocks until every part has arrived.
    pub fn reduce(
        &self,
        key: &str,
        round: u64,
        part_index: u32,
        parts_total: u32,
        values: Vec<f64>,
    ) -> Result<Vec<f64>> {
        let mut client = self.client.clone();
        let req = pb::ReduceRequest {
            key: key.to_string(),
            round,
            part_index,
            parts_total,
            values,
        };
        self.handle.block_on(async move {
            client
                .reduce(req)
                .await
                .map(|r| r.into_inner().sums)
                .map_err(|s| ClusterError::rpc("Reduce", s))
        })
    }
}

/// Worker settings.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Coordinator URL, e.g. `http://10.0.0.5:7000`.
    pub url: String,
    /// Bearer token sent with every call.
    pub token: Option<String>,
    /// Worker name (host name, pod name).
    pub name: String,
    /// Device, `cpu` or `cuda`.
    pub device: String,
    /// Threads per shard.
    pub threads: u32,
    /// Roots the worker may read and write (reported to the coordinator).
    pub allowed_roots: Vec<String>,
    /// Test hook: once this many result bytes have been streamed (counted over the worker's
    /// life), write the PID to `pause_pid_file`, stop heartbeating and hang forever (a
    /// controlled point for kill -9 and lease-expiry tests).
    pub pause_after_bytes: Option<u64>,
    /// Where the paused worker writes its PID (see `pause_after_bytes`).
    pub pause_pid_file: Option<PathBuf>,
    /// Fault-injection hook: corrupt (flip one byte after hashing) the first this-many results.
    pub corrupt_results: u32,
    /// How long to keep retrying while the coordinator is unreachable (at start, or after it
    /// went away); a restarted coordinator is re-registered with.
    pub reconnect_timeout: Duration,
    /// TLS to the coordinator (for an `https://` URL).
    pub tls: Option<ClientTls>,
    /// etcd URL: when set, the worker publishes its membership there under a lease for as
    /// long as it runs (see [`crate::etcd_store`]); an unreachable etcd is an error.
    pub etcd: Option<String>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            url: String::new(),
            token: None,
            name: String::new(),
            device: "cpu".into(),
            threads: 1,
            allowed_roots: Vec::new(),
            pause_after_bytes: None,
            pause_pid_file: None,
            corrupt_results: 0,
            reconnect_timeout: Duration::from_secs(60),
            tls: None,
            etcd: None,
        }
    }
}

impl WorkerOptions {
    /// Fills the pause hook from [`ENV_PAUSE_AFTER_BYTES`] and [`ENV_PAUSE_PID_FILE`].
    pub fn with_test_hooks_from_env(mut self) -> Result<Self> {
        if let Ok(v) = std::env::var(ENV_PAUSE_AFTER_BYTES) {
            let n = v
                .trim()
                .parse::<u64>()
                .map_err(|e| ClusterError::Config(format!("{ENV_PAUSE_AFTER_BYTES}={v:?}: {e}")))?;
            self.pause_after_bytes = Some(n);
        }
        if let Ok(p) = std::env::var(ENV_PAUSE_PID_FILE) {
            self.pause_pid_file = Some(PathBuf::from(p));
        }
        Ok(self)
    }
}

/// What a worker did, returned when the job is done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// The id the coordinator gave this worker.
    pub worker_id: WorkerId,
    /// Leases received.
    pub leases: u64,
    /// Shard results the coordinator committed (gang parts count one each).
    pub shards_committed: u64,
    /// Results dropped (lease expired or shard committed by another worker).
    pub results_dropped: u64,
    /// Results rejected (checksum, host failure).
    pub results_rejected: u64,
    /// Leases abandoned because the coordinator said they were no longer valid, or because the
    /// coordinator went away while the result was being sent.
    pub leases_abandoned: u64,
    /// Times the worker registered again (the coordinator restarted).
    pub reregistrations: u64,
    /// Result bytes streamed.
    pub bytes_sent: u64,
}

struct Hooks {
    pause_after: Option<u64>,
    pid_file: Option<PathBuf>,
    corrupt_left: AtomicU32,
    streamed: AtomicU64,
    paused: AtomicBool,
}

impl Hooks {
    /// Called after a chunk has been handed to the stream; hangs forever once past the limit.
    async fn after_chunk(&self, n: u64) {
        let total = self.streamed.fetch_add(n, Ordering::SeqCst) + n;
        if let Some(limit) = self.pause_after {
            if total >= limit {
                self.paused.store(true, Ordering::SeqCst);
                if let Some(p) = &self.pid_file {
                    let pid = std::process::id().to_string();
                    let tmp = p.with_extension("tmp");
                    if std::fs::write(&tmp, &pid)
                        .and_then(|_| std::fs::rename(&tmp, p))
                        .is_err()
                    {
                        tracing::error!(path = %p.display(), "test hook: cannot write pid file");
                    }
                }
                tracing::warn!(bytes = total, "test hook: worker paused");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// True for errors that mean "the coordinator is (temporarily) not there". A coordinator that
/// shuts down sends HTTP/2 GOAWAY, which reaches a call in flight as `Internal` "h2 protocol
/// error": that is a coordinator going away (to be restarted), not a broken protocol.
fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
    ) || (status.code() == tonic::Code::Internal
        && status.message().starts_with("h2 protocol error"))
}

/// True when a connection error says the TLS handshake or a certificate was refused.
fn is_tls_failure(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("certificate") || m.contains("handshake") || m.contains("alert")
}

async fn register(
    client: &mut Client,
    opts: &WorkerOptions,
) -> Result<pb::RegisterResponse, tonic::Status> {
    client
        .register(pb::RegisterRequest {
            name: opts.name.clone(),
            capabilities: Some(pb::Capabilities {
                device: opts.device.clone(),
                threads: opts.threads,
            }),
            allowed_roots: opts.allowed_roots.clone(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Connects and registers, retrying transient failures for `opts.reconnect_timeout`.
async fn connect_and_register(opts: &WorkerOptions) -> Result<(Client, pb::RegisterResponse)> {
    let deadline = tokio::time::Instant::now() + opts.reconnect_timeout;
    let mut backoff = Duration::from_millis(20);
    loop {
        let attempt = async {
            let mut client =
                connect_with(&opts.url, opts.token.as_deref(), opts.tls.as_ref()).await?;
            let reg = register(&mut client, opts)
                .await
                .map_err(|s| ClusterError::rpc("Register", s))?;
            Ok::<_, ClusterError>((client, reg))
        };
        match attempt.await {
            Ok(r) => return Ok(r),
            Err(e) => {
                let transient = match &e {
                    ClusterError::Transport(_) => true,
                    // A refused certificate does not fix itself: fail at once.
                    ClusterError::Connect { .. } => !is_tls_failure(&e.to_string()),
                    ClusterError::Rpc { status, .. } => {
                        is_transient(status) && !is_tls_failure(&e.to_string())
                    }
                    _ => false,
                };
                if !transient || tokio::time::Instant::now() + backoff > deadline {
                    return Err(e);
                }
                tracing::warn!(error = %e, "coordinator not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Runs a worker until the job is done. Returns an error when the coordinator cannot be
/// reached within `opts.reconnect_timeout` or the executor fails (executor errors are fatal:
/// they are usually a plan or input problem that every worker would hit).
pub async fn run_worker<E: ShardExecutor>(
    opts: WorkerOptions,
    executor: Arc<E>,
) -> Result<WorkerReport> {
    let (client, reg) = connect_and_register(&opts).await?;
    tracing::info!(worker_id = reg.worker_id, job = %reg.job_id, "registered");
    let presence = match &opts.etcd {
        Some(url) => Some(join_etcd(url.clone(), &opts, &reg).await?),
        None => None,
    };
    let hooks = Arc::new(Hooks {
        pause_after: opts.pause_after_bytes,
        pid_file: opts.pause_pid_file.clone(),
        corrupt_left: AtomicU32::new(opts.corrupt_results),
        streamed: AtomicU64::new(0),
        paused: AtomicBool::new(false),
    });
    let state = Arc::new(LoopState {
        worker_id: AtomicU64::new(reg.worker_id),
        held: Mutex::default(),
        invalid: Arc::default(),
    });
    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
    let hb = tokio::spawn(heartbeat_loop(
        client.clone(),
        interval,
        Arc::clone(&state),
        Arc::clone(&hooks),
    ));
    let job_kind = reg.job_kind();
    let result = lease_loop(client, &opts, executor, &state, &hooks, job_kind).await;
    hb.abort();
    if let Some((store, member)) = presence {
        let left = tokio::task::spawn_blocking(move || store.deregister_member(member)).await;
        if let Ok(Err(e)) = left {
            tracing::warn!(error = %e, "leaving etcd membership");
        }
    }
    result
}

/// Publishes this worker's membership in etcd under job `reg.job_id`, with a lease TTL of
/// the coordinator's lease TTL (at least 2 s).
async fn join_etcd(
    url: String,
    opts: &WorkerOptions,
    reg: &pb::RegisterResponse,
) -> Result<(EtcdStore, Membership)> {
    let info = MemberInfo {
        name: opts.name.clone(),
        device: opts.device.clone(),
        threads: opts.threads,
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    let job = reg.job_id.clone();
    let ttl = Duration::from_millis(reg.lease_ttl_ms).max(Duration::from_secs(2));
    tokio::task::spawn_blocking(move || {
        let store = EtcdStore::connect(&url)?;
        let member = store.register_member(&job, &info, ttl)?;
        Ok((store, member))
    })
    .await
    .map_err(|e| ClusterError::Store(format!("etcd membership task failed: {e}")))?
}

struct LoopState {
    worker_id: AtomicU64,
    held: Mutex<BTreeSet<LeaseId>>,
    invalid: Arc<Mutex<BTreeSet<LeaseId>>>,
}

async fn heartbeat_loop(
    mut client: Client,
    interval: Duration,
    state: Arc<LoopState>,
    hooks: Arc<Hooks>,
) {
    loop {
        tokio::time::sleep(interval).await;
        if hooks.paused.load(Ordering::SeqCst) {
            continue;
        }
        let ids: Vec<LeaseId> = lock_set(&state.held).iter().copied().collect();
        if ids.is_empty() {
            continue;
        }
        let worker_id = state.worker_id.load(Ordering::SeqCst);
        match client
            .heartbeat(pb::HeartbeatRequest {
                worker_id,
                lease_ids: ids,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if !r.invalid_lease_ids.is_empty() {
                    tracing::info!(leases = ?r.invalid_lease_ids, "leases no longer valid");
                    lock_set(&state.invalid).extend(r.invalid_lease_ids);
                }
            }
            Err(s) => tracing::warn!(status = %s, "heartbeat failed"),
        }
    }
}

async fn lease_loop<E: ShardExecutor>(
    mut client: Client,
    opts: &WorkerOptions,
    executor: Arc<E>,
    state: &Arc<LoopState>,
    hooks: &Arc<Hooks>,
    job_kind: pb::JobKind,
) -> Result<WorkerReport> {
    use pb::lease_response::Outcome;
    let mut report = WorkerReport {
        worker_id: state.worker_id.load(Ordering::SeqCst),
        ..WorkerReport::default()
    };
    let handle = Handle::current();
    let mut last_ok = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        let worker_id = state.worker_id.load(Ordering::SeqCst);
        let resp = match client.lease_shard(pb::LeaseRequest { worker_id }).await {
            Ok(r) => {
                last_ok = tokio::time::Instant::now();
                backoff = Duration::from_millis(20);
                r.into_inner()
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                // The coordinator does not know us: it restarted. Register again.
                tracing::warn!(status = %s, "coordinator forgot this worker; registering again");
                let reg = register(&mut client, opts)
                    .await
                    .map_err(|s| ClusterError::rpc("Register", s))?;
                state.worker_id.store(reg.worker_id, Ordering::SeqCst);
                report.worker_id = reg.worker_id;
                report.reregistrations += 1;
                continue;
            }
            Err(s) if is_transient(&s) && last_ok.elapsed() < opts.reconnect_timeout => {
                tracing::warn!(status = %s, "coordinator unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(s) => return Err(ClusterError::rpc("LeaseShard", s)),
        };
        let lease = match resp.outcome {
            Some(Outcome::Done(_)) => return Ok(report),
            Some(Outcome::Wait(w)) => {
                tokio::time::sleep(Duration::from_millis(w.retry_after_ms.clamp(5, 5000))).await;
                continue;
            }
            Some(Outcome::Lease(l)) => l,
            None => {
                return Err(ClusterError::Protocol(
                    "LeaseShard answered without an outcome".into(),
                ))
            }
        };
        report.leases += 1;
        let lease_id = lease.lease_id;
        lock_set(&state.held).insert(lease_id);
        tracing::debug!(
            lease_id,
            attempt = lease.attempt,
            shards = lease.shards.len(),
            "leased"
        );
        // Run every shard of the lease concurrently (gang parts meet in Reduce).
        let mut tasks = Vec::with_capacity(lease.shards.len());
        for sh in lease.shards {
            let exec = Arc::clone(&executor);
            let inputs = InputClient {
                client: client.clone(),
                handle: handle.clone(),
                shard_id: sh.shard_id,
                lease_id,
                invalid: Arc::clone(&state.invalid),
                job_kind,
            };
            let shard_id = sh.shard_id;
            // One span per shard: its merge's events (and a subscriber's timings) carry the
            // shard, lease and attempt.
            let span = tracing::info_span!("shard", shard_id, lease_id, attempt = lease.attempt);
            tasks.push((
                shard_id,
                tokio::task::spawn_blocking(move || {
                    let _enter = span.enter();
                    let started = std::time::Instant::now();
                    let r = exec.execute(&sh.spec, &inputs);
                    tracing::info!(
                        ok = r.is_ok(),
                        bytes = r.as_ref().map_or(0, |b| b.len()),
                        secs = started.elapsed().as_secs_f64(),
                        "shard merged"
                    );
                    r
                }),
            ));
        }
        let mut results = Vec::with_capacity(tasks.len());
        let mut abandon = false;
        for (shard_id, t) in tasks {
            let res = t.await.map_err(|e| {
                ClusterError::Executor(format!("shard {shard_id}: task failed: {e}"))
            })?;
            match res {
                Ok(bytes) => results.push((shard_id, bytes)),
                // The coordinator went away mid-shard (or the lease was revoked and the
                // executor stopped early): give the lease up, keep working.
                Err(ClusterError::Rpc { status, .. }) if is_transient(&status) => {
                    tracing::warn!(shard_id, status = %status, "coordinator unreachable during \
                        the shard; lease abandoned");
                    abandon = true;
                }
                Err(_) if lock_set(&state.invalid).contains(&lease_id) => abandon = true,
                Err(e) => return Err(ClusterError::Executor(format!("shard {shard_id}: {e}"))),
            }
        }
        if abandon {
            report.leases_abandoned += 1;
            results.clear();
        }
        let mut staged = 0;
        for (shard_id, bytes) in results {
            if lock_set(&state.invalid).contains(&lease_id) {
                report.leases_abandoned += 1;
                tracing::info!(shard_id, lease_id, "lease no longer valid; result not sent");
                break;
            }
            let n = bytes.len() as u64;
            let resp = match submit(&mut client, lease_id, shard_id, bytes, hooks).await {
                Ok(r) => r,
                Err(ClusterError::Rpc { status, .. }) if is_transient(&status) => {
                    report.leases_abandoned += 1;
                    tracing::warn!(shard_id, status = %status, "coordinator went away while \
                        sending a result; lease abandoned");
                    break;
                }
                Err(e) => return Err(e),
            };
            report.bytes_sent += n;
            match pb::SubmitOutcome::try_from(resp.outcome) {
                Ok(pb::SubmitOutcome::Committed) => {
                    report.shards_committed += 1 + staged;
                    staged = 0;
                }
                Ok(pb::SubmitOutcome::Staged) => staged += 1,
                Ok(pb::SubmitOutcome::Dropped) => {
                    report.results_dropped += 1;
                    tracing::info!(shard_id, reason = %resp.reason, "result dropped");
                    break;
                }
                _ => {
                    report.results_rejected += 1;
                    tracing::warn!(shard_id, reason = %resp.reason, "result rejected");
                    break;
                }
            }
        }
        lock_set(&state.held).remove(&lease_id);
        lock_set(&state.invalid).remove(&lease_id);
    }
}

fn lock_set(m: &Mutex<BTreeSet<LeaseId>>) -> std::sync::MutexGuard<'_, BTreeSet<LeaseId>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Streams one result: header (size, sha256), then chunks of [`CHUNK_BYTES`].
async fn submit(
    client: &mut Client,
    lease_id: LeaseId,
    shard_id: ShardId,
    mut bytes: Vec<u8>,
    hooks: &Arc<Hooks>,
) -> Result<pb::SubmitResponse> {
    use pb::submit_chunk::Kind;
    let sha = hex::encode(Sha256::digest(&bytes));
    if !bytes.is_empty()
        && hooks
            .corrupt_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        tracing::warn!(shard_id, "fault injection: corrupting result bytes");
        bytes[0] ^= 0xff;
    }
    let header = pb::ResultHeader {
        lease_id,
        shard_id,
        total_bytes: bytes.len() as u64,
        sha256_hex: sha,
    };
    let (tx, rx) = mpsc::channel::<pb::SubmitChunk>(4);
    let hooks = Arc::clone(hooks);
    let producer = tokio::spawn(async move {
        if tx
            .send(pb::SubmitChunk {
                kind: Some(Kind::Header(header)),
            })
            .await
            .is_err()
        {
            return;
        }
        for chunk in bytes.chunks(CHUNK_BYTES) {
            if tx
                .send(pb::SubmitChunk {
                    kind: Some(Kind::Data(chunk.to_vec())),
                })
                .await
                .is_err()
            {
                return;
            }
            hooks.after_chunk(chunk.len() as u64).await;
        }
    });
    let resp = client
        .submit_result(ReceiverStream::new(rx))
        .await
        .map_err(|s| ClusterError::rpc("SubmitResult", s));
    producer.abort();
    Ok(resp?.into_inner())
}
