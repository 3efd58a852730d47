//! The coordinator's gRPC service, generic over the engine side ([`JobHost`]).
//!
//! [`serve`] binds a socket, starts the service behind the bearer-token interceptor and returns
//! a [`ServerHandle`] (bound address, job-done future, status, shutdown).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::ServerAuth;
use crate::error::{ClusterError, Result};
use crate::journal::{CommitRecord, JobStore};
use crate::lock;
use crate::metrics::{serve_metrics, MetricsServer, StatusFn};
use crate::pb;
use crate::pb::coordinator_server::{Coordinator, CoordinatorServer};
use crate::scheduler::{
    LeaseDecision, LeaseId, Scheduler, ShardId, ShardSpec, SubmitDecision, WorkerId,
};
use crate::tls::{error_chain, ServerTls};
use crate::{CHUNK_BYTES, MAX_MESSAGE_BYTES};

/// The engine side of the coordinator: the plan's shards, input bytes, and result storage.
///
/// Methods are called from blocking threads (`spawn_blocking`), never on the async runtime.
pub trait JobHost: Send + Sync + 'static {
    /// The shards of the plan (ids unique; parts of a split block share a gang id).
    fn shards(&self) -> Vec<ShardSpec>;
    /// Exactly `len` bytes of input `key` from `offset` (an error if the input is shorter).
    fn read_input(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Stores the verified result of `shard_id`. Called once per commit; called again for the
    /// same shard only if a previous call (or the journal write after it) failed, so a host
    /// must let a later call replace an earlier one.
    fn accept(&self, shard_id: ShardId, bytes: Vec<u8>) -> Result<()>;
    /// What the shards are (told to workers at registration, so they pick their executor).
    fn job_kind(&self) -> pb::JobKind {
        pb::JobKind::Unspecified
    }
    /// True when the job runs in phases: [`JobHost::shards`] gives the first phase, and
    /// [`JobHost::next_phase`] each later one.
    fn phased(&self) -> bool {
        false
    }
    /// Called (for a phased host) when every shard handed out so far is committed: the
    /// shards of the next phase (ids not used before), or `None` when the job is complete.
    /// An empty list means nothing to hand out now (a long-lived coordinator waiting for a
    /// submission): asked again after the next [`JobHost::submit_job`]. An error fails the job.
    fn next_phase(&self) -> Result<Option<Vec<ShardSpec>>> {
        Ok(None)
    }
    /// Takes a merge job submitted to a long-lived coordinator (`SubmitJob`); the ticket
    /// resolves when the job's checkpoint is written or the job failed. One-job hosts refuse.
    fn submit_job(&self, _req: pb::SubmitJobRequest) -> Result<JobTicket> {
        Err(ClusterError::Config(
            "this coordinator runs one job; start it with `amalgam coordinator --serve` to \
             take submitted jobs"
                .into(),
        ))
    }
}

/// Resolves when a submitted job is done: its summary, or why it failed.
pub type JobTicket = oneshot::Receiver<std::result::Result<pb::SubmitJobResponse, String>>;

/// Coordinator settings.
#[derive(Clone)]
pub struct ServerOptions {
    /// Job id (journal / etcd key prefix).
    pub job_id: String,
    /// Bearer token required on every call; `None` accepts every call.
    pub token: Option<String>,
    /// Lease time-to-live; heartbeats extend a lease to now + ttl.
    pub lease_ttl: Duration,
    /// Heartbeat interval told to workers (should be well under `lease_ttl`).
    pub heartbeat_interval: Duration,
    /// How long a worker told to wait should wait before asking again.
    pub wait_retry: Duration,
    /// Durable job state; `None` keeps state only in memory.
    pub store: Option<Arc<dyn JobStore>>,
    /// How long a `Reduce` call waits for the other parts before failing with
    /// `DeadlineExceeded`.
    pub reduce_timeout: Duration,
    /// Where to serve Prometheus `/metrics` over plain HTTP (port 0 picks a free port);
    /// `None` serves no metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// TLS (and, with a client CA, mutual TLS) on the gRPC port; `None` serves plain HTTP/2.
    pub tls: Option<ServerTls>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("job_id", &self.job_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("lease_ttl", &self.lease_ttl)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("wait_retry", &self.wait_retry)
            .field("store", &self.store.is_some())
            .field("reduce_timeout", &self.reduce_timeout)
            .field("metrics_addr", &self.metrics_addr)
            .field("tls", &self.tls.as_ref().map(|t| t.client_ca_pem.is_some()))
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            job_id: "job".into(),
            token: None,
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            wait_retry: Duration::from_millis(200),
            store: None,
            reduce_timeout: Duration::from_secs(600),
            metrics_addr: None,
            tls: None,
        }
    }
}

/// Hash of a plan: sha256 over every shard's id, gang and spec, in shard id order. A restarted
/// coordinator only reuses a journal whose plan hash matches.
pub fn plan_hash(shards: &[ShardSpec]) -> String {
    let mut sorted: Vec<&ShardSpec> = shards.iter().collect();
    sorted.sort_by_key(|s| s.id);
    let mut h = Sha256::new();
    for s in sorted {
        h.update(s.id.to_le_bytes());
        match s.gang {
            Some(g) => {
                h.update([1u8]);
                h.update(g.to_le_bytes());
            }
            None => h.update([0u8]),
        }
        h.update((s.spec.len() as u64).to_le_bytes());
        h.update(&s.spec);
    }
    hex::encode(h.finalize())
}

type FailureFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

struct WorkerInfo {
    name: String,
    device: String,
    threads: u32,
    allowed_roots: Vec<String>,
    bytes_received: u64,
}

struct Staged {
    bytes: Vec<u8>,
    sha256: String,
}

struct Round {
    parts: Vec<Option<Vec<f64>>>,
    delivered: Vec<bool>,
    tx: watch::Sender<Option<Arc<Vec<f64>>>>,
}

struct Shared<H> {
    host: Arc<H>,
    opts: ServerOptions,
    specs: Mutex<BTreeMap<ShardId, Vec<u8>>>,
    sched: Mutex<Scheduler>,
    /// Shards the job store says are committed that belong to phases not started yet.
    later: BTreeSet<ShardId>,
    /// Held while the next phase is asked for, so that only one caller advances.
    phase_gate: tokio::sync::Mutex<()>,
    /// Why the job failed (a phase could not be made); the job then ends undone.
    failure: Mutex<Option<String>>,
    clock: Instant,
    workers: Mutex<BTreeMap<WorkerId, WorkerInfo>>,
    next_worker: AtomicU64,
    staged: Mutex<HashMap<(LeaseId, ShardId), Staged>>,
    bytes_received: AtomicU64,
    rounds: Mutex<HashMap<(String, u64), Round>>,
    done_tx: watch::Sender<bool>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl<H: JobHost> Shared<H> {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn status(&self) -> pb::JobStatusResponse {
        let (st, done) = {
            let mut sched = lock(&self.sched);
            (sched.status(self.now()), sched.is_done())
        };
        let workers = lock(&self.workers);
        pb::JobStatusResponse {
            job_id: self.opts.job_id.clone(),
            shards_total: st.shards_total,
            shards_committed: st.shards_committed,
            shards_leased: st.shards_leased,
            shards_pending: st.shards_pending,
            lease_expiries: st.lease_expiries,
            re_leases: st.re_leases,
            speculative_leases: st.speculative_leases,
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            results_rejected: st.results_rejected,
            results_dropped: st.results_dropped,
            workers: workers
                .iter()
                .map(|(id, w)| pb::WorkerStatus {
                    worker_id: *id,
                    name: w.name.clone(),
                    shards_done: st.per_worker_done.get(id).copied().unwrap_or(0),
                    bytes_received: w.bytes_received,
                    device: w.device.clone(),
                    threads: w.threads,
                    allowed_roots: w.allowed_roots.clone(),
                })
                .collect(),
            done,
        }
    }

    /// Hands out the next phases of a phased job while every shard so far is committed, and
    /// signals `done` when the job is complete (or failed).
    async fn advance_phases(self: &Arc<Self>) {
        let _gate = self.phase_gate.lock().await;
        loop {
            {
                let sched = lock(&self.sched);
                if !(sched.is_open() && sched.all_committed()) {
                    break;
                }
            }
            let h = Arc::clone(&self.host);
            let next = tokio::task::spawn_blocking(move || h.next_phase())
                .await
                .map_err(|e| ClusterError::Host(format!("phase task failed: {e}")))
                .and_then(|r| r);
            match next {
                Ok(Some(shards)) if shards.is_empty() => break,
                Ok(Some(shards)) => {
                    let n = shards.len();
                    // Specs first: a shard is never leased before its spec is known.
                    lock(&self.specs).extend(shards.iter().map(|s| (s.id, s.spec.clone())));
                    if let Err(e) = lock(&self.sched).add_shards(&shards, &self.later) {
                        self.fail(e.to_string());
                        return;
                    }
                    tracing::info!(shards = n, "next phase of the job");
                }
                Ok(None) => lock(&self.sched).set_open(false),
                Err(e) => {
                    self.fail(e.to_string());
                    return;
                }
            }
        }
        if lock(&self.sched).is_done() {
            self.done_tx.send_replace(true);
        }
    }

    fn fail(&self, msg: String) {
        tracing::error!(error = %msg, "the job failed");
        *lock(&self.failure) = Some(msg);
        self.done_tx.send_replace(true);
    }

    fn check_worker(&self, id: WorkerId) -> Result<(), Status> {
        if lock(&self.workers).contains_key(&id) {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "unknown worker id {id}: register first"
            )))
        }
    }

    /// Drops staged gang parts whose lease is no longer live.
    fn purge_staged(&self) {
        let sched = lock(&self.sched);
        lock(&self.staged).retain(|(lease, _), _| sched.is_live(*lease));
    }

    fn submit_response(
        outcome: pb::SubmitOutcome,
        reason: impl Into<String>,
    ) -> pb::SubmitResponse {
        pb::SubmitResponse {
            outcome: outcome as i32,
            reason: reason.into(),
        }
    }

    async fn handle_submit(
        self: &Arc<Self>,
        mut stream: Streaming<pb::SubmitChunk>,
    ) -> Result<pb::SubmitResponse, Status> {
        use pb::submit_chunk::Kind;
        use pb::SubmitOutcome as O;
        let header = match stream.next().await {
            Some(Ok(pb::SubmitChunk {
                kind: Some(Kind::Header(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "SubmitResult: the first message must be the header",
                ))
            }
            Some(Err(s)) => return Err(s),
            None => return Err(Status::invalid_argument("SubmitResult: empty stream")),
        };
        if !is_sha256_hex(&header.sha256_hex) {
            return Err(Status::invalid_argument(
                "SubmitResult: sha256_hex must be 64 lower-case hex digits",
            ));
        }
        let (lease, shard) = (header.lease_id, header.shard_id);
        let worker = {
            let mut sched = lock(&self.sched);
            if let Err(reason) = sched.check(lease, shard, self.now()) {
                sched.record_drop();
                return Ok(Self::submit_response(O::Dropped, reason.to_string()));
            }
            sched.lease_worker(lease)
        };
        let cap = header.total_bytes.min(64 << 20) as usize;
        let mut bytes = Vec::with_capacity(cap);
        let mut hasher = Sha256::new();
        // A stalled sender whose lease has meanwhile expired is cut off (checked every ttl).
        let idle = self.opts.lease_ttl.max(Duration::from_millis(10));
        loop {
            let msg = match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => {
                    let mut sched = lock(&self.sched);
                    if sched.check(lease, shard, self.now()).is_ok() {
                        continue;
                    }
                    sched.record_drop();
                    return Ok(Self::submit_response(
                        O::Dropped,
                        format!("shard {shard}: result stream stalled and lease {lease} ended"),
                    ));
                }
            };
            match msg?.kind {
                Some(Kind::Data(d)) => {
                    if (bytes.len() + d.len()) as u64 > header.total_bytes {
                        lock(&self.sched).reject(lease);
                        return Ok(Self::submit_response(
                            O::RejectedChecksum,
                            format!(
                                "shard {shard}: more bytes than the header's {}",
                                header.total_bytes
                            ),
                        ));
                    }
                    hasher.update(&d);
                    bytes.extend_from_slice(&d);
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "SubmitResult: only data chunks may follow the header",
                    ))
                }
            }
        }
        self.bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Some(w) = worker {
            if let Some(info) = lock(&self.workers).get_mut(&w) {
                info.bytes_received += bytes.len() as u64;
            }
        }
        let got = hex::encode(hasher.finalize());
        if bytes.len() as u64 != header.total_bytes || got != header.sha256_hex {
            lock(&self.sched).reject(lease);
            tracing::warn!(shard, lease, "result rejected: size or checksum mismatch");
            return Ok(Self::submit_response(
                O::RejectedChecksum,
                format!(
                    "shard {shard}: got {} bytes with sha256 {got}, header says {} bytes with \
                     sha256 {}; the shard will be redone",
                    bytes.len(),
                    header.total_bytes,
                    header.sha256_hex
                ),
            ));
        }
        let decision = lock(&self.sched).submit(lease, shard, self.now());
        let shards = match decision {
            SubmitDecision::Dropped(reason) => {
                return Ok(Self::submit_response(O::Dropped, reason.to_string()))
            }
            SubmitDecision::Staged => {
                lock(&self.staged).insert((lease, shard), Staged { bytes, sha256: got });
                self.purge_staged();
                return Ok(Self::submit_response(O::Staged, "gang part staged"));
            }
            SubmitDecision::Commit(shards) => shards,
        };
        // Gather this part and the staged ones, in shard order.
        let mut parts = Vec::with_capacity(shards.len());
        let mut own = Some(Staged { bytes, sha256: got });
        {
            let mut staged = lock(&self.staged);
            for s in &shards {
                let part = if *s == shard {
                    own.take()
                } else {
                    staged.remove(&(lease, *s))
                };
                parts.push((*s, part));
            }
        }
        let me = Arc::clone(self);
        let stored = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut records = Vec::with_capacity(parts.len());
            for (s, part) in parts {
                let part = part.ok_or_else(|| {
                    ClusterError::Protocol(format!("staged part of shard {s} is missing"))
                })?;
                records.push(CommitRecord {
                    shard_id: s,
                    sha256: part.sha256,
                    bytes: part.bytes.len() as u64,
                });
                me.host.accept(s, part.bytes)?;
            }
            if let Some(store) = &me.opts.store {
                for r in &records {
                    store.record_commit(&me.opts.job_id, r)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| ClusterError::Host(format!("accept task failed: {e}")))
        .and_then(|r| r);
        let ok = stored.is_ok();
        lock(&self.sched).finish_commit(lease, ok);
        if ok {
            // A committed shard is never leased again: its spec can go (a long-lived
            // coordinator would otherwise keep every job's specs).
            let mut specs = lock(&self.specs);
            for s in &shards {
                specs.remove(s);
            }
        }
        self.purge_staged();
        match stored {
            Ok(()) => {
                tracing::debug!(?shards, lease, "committed");
                self.advance_phases().await;
                Ok(Self::submit_response(
                    O::Committed,
                    format!("committed shards {shards:?}"),
                ))
            }
            Err(e) => {
                tracing::error!(?shards, lease, error = %e, "storing a result failed");
                Ok(Self::submit_response(
                    O::RejectedHost,
                    format!("storing shards {shards:?} failed: {e}; they will be redone"),
                ))
            }
        }
    }

    async fn handle_reduce(&self, req: pb::ReduceRequest) -> Result<Vec<f64>, Status> {
        if req.parts_total == 0 || req.part_index >= req.parts_total {
            return Err(Status::invalid_argument(format!(
                "Reduce {}: part_index {} out of range for parts_total {}",
                req.key, req.part_index, req.parts_total
            )));
        }
        let id = (req.key.clone(), req.round);
        let part = req.part_index as usize;
        let mut rx = {
            let mut rounds = lock(&self.rounds);
            let round = rounds.entry(id.clone()).or_insert_with(|| Round {
                parts: vec![None; req.parts_total as usize],
                delivered: vec![false; req.parts_total as usize],
                tx: watch::channel(None).0,
            });
            if round.parts.len() != req.parts_total as usize {
                return Err(Status::invalid_argument(format!(
                    "Reduce {} round {}: parts_total {} differs from {} given by another part",
                    req.key,
                    req.round,
                    req.parts_total,
                    round.parts.len()
                )));
            }
            if let Some(other) = round.parts.iter().flatten().next() {
                if other.len() != req.values.len() {
                    return Err(Status::invalid_argument(format!(
                        "Reduce {} round {}: {} values, another part has {}",
                        req.key,
                        req.round,
                        req.values.len(),
                        other.len()
                    )));
                }
            }
            match &round.parts[part] {
                Some(prev) => {
                    let same = prev.len() == req.values.len()
                        && prev
                            .iter()
                            .zip(&req.values)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                    if !same {
                        return Err(Status::invalid_argument(format!(
                            "Reduce {} round {}: part {} sent twice with different values",
                            req.key, req.round, part
                        )));
                    }
                }
                None => round.parts[part] = Some(req.values),
            }
            if round.parts.iter().all(Option::is_some) && round.tx.borrow().is_none() {
                let n = round.parts[0].as_ref().map_or(0, Vec::len);
                let mut sums = vec![0.0f64; n];
                // Part index order, whatever the arrival order.
                for p in round.parts.iter().flatten() {
                    for (s, v) in sums.iter_mut().zip(p) {
                        *s += *v;
                    }
                }
                round.tx.send_replace(Some(Arc::new(sums)));
            }
            round.tx.subscribe()
        };
        let wait = tokio::time::timeout(self.opts.reduce_timeout, rx.wait_for(Option::is_some));
        let sums = wait
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "Reduce {} round {}: not every part arrived within {:?}",
                    req.key, req.round, self.opts.reduce_timeout
                ))
            })?
            .map_err(|_| Status::internal("reduction round dropped"))?
            .clone()
            .ok_or_else(|| Status::internal("reduction result missing"))?;
        let mut rounds = lock(&self.rounds);
        if let Some(round) = rounds.get_mut(&id) {
            round.delivered[part] = true;
            if round.delivered.iter().all(|d| *d) {
                rounds.remove(&id);
            }
        }
        Ok(sums.as_ref().clone())
    }
}

/// The tonic service object.
struct Service<H> {
    shared: Arc<Shared<H>>,
}

type ChunkStream = ReceiverStream<Result<pb::DataChunk, Status>>;

#[tonic::async_trait]
impl<H: JobHost> Coordinator for Service<H> {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let s = &self.shared;
        let id = s.next_worker.fetch_add(1, Ordering::Relaxed);
        let caps = req.capabilities.unwrap_or_default();
        tracing::info!(worker = id, name = %req.name, device = %caps.device, "worker registered");
        lock(&s.workers).insert(
            id,
            WorkerInfo {
                name: req.name,
                device: caps.device,
                threads: caps.threads,
                allowed_roots: req.allowed_roots,
                bytes_received: 0,
            },
        );
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: s.opts.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: s.opts.lease_ttl.as_millis() as u64,
            job_id: s.opts.job_id.clone(),
            job_kind: s.host.job_kind() as i32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let s = &self.shared;
        s.check_worker(req.worker_id)?;
        let mut sched = lock(&s.sched);
        let (valid, invalid) = sched.heartbeat(req.worker_id, &req.lease_ids, s.now());
        Ok(Response::new(pb::HeartbeatResponse {
            valid_lease_ids: valid,
            invalid_lease_ids: invalid,
            job_done: sched.is_done(),
        }))
    }

    async fn lease_shard(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        use pb::lease_response::Outcome;
        let req = request.into_inner();
        let s = &self.shared;
        s.check_worker(req.worker_id)?;
        let now = s.now();
        let decision = lock(&s.sched).lease(req.worker_id, now);
        let outcome = match decision {
            LeaseDecision::Done => Outcome::Done(pb::Done {}),
            LeaseDecision::Wait => Outcome::Wait(pb::Wait {
                retry_after_ms: s.opts.wait_retry.as_millis() as u64,
            }),
            LeaseDecision::Granted(g) => {
                tracing::debug!(worker = req.worker_id, lease = g.lease_id, shards = ?g.shards,
                    attempt = g.attempt, speculative = g.speculative, "lease granted");
                Outcome::Lease(pb::Lease {
                    lease_id: g.lease_id,
                    attempt: g.attempt,
                    deadline_unix_ms: unix_ms() + g.deadline.saturating_sub(now),
                    gang_id: g.gang,
                    shards: g
                        .shards
                        .iter()
                        .map(|id| pb::LeasedShard {
                            shard_id: *id,
                            spec: lock(&s.specs).get(id).cloned().unwrap_or_default(),
                        })
                        .collect(),
                    speculative: g.speculative,
                })
            }
        };
        Ok(Response::new(pb::LeaseResponse {
            outcome: Some(outcome),
        }))
    }

    type ReadInputStream = ChunkStream;

    async fn read_input(
        &self,
        request: Request<pb::ReadInputRequest>,
    ) -> Result<Response<Self::ReadInputStream>, Status> {
        let req = request.into_inner();
        req.offset.checked_add(req.length).ok_or_else(|| {
            Status::invalid_argument(format!("ReadInput {}: offset + length overflows", req.key))
        })?;
        let (tx, rx) = mpsc::channel(4);
        let host = Arc::clone(&self.shared.host);
        tokio::spawn(async move {
            let mut off = req.offset;
            let end = req.offset + req.length;
            while off < end {
                let n = (end - off).min(CHUNK_BYTES as u64);
                let h = Arc::clone(&host);
                let key = req.key.clone();
                let res = tokio::task::spawn_blocking(move || h.read_input(&key, off, n)).await;
                let msg = match res {
                    Ok(Ok(data)) if data.len() as u64 == n => {
                        Ok(pb::DataChunk { offset: off, data })
                    }
                    Ok(Ok(data)) => Err(Status::out_of_range(format!(
                        "input {}: wanted {n} bytes at offset {off}, got {}",
                        req.key,
                        data.len()
                    ))),
                    Ok(Err(e)) => Err(Status::not_found(format!("input {}: {e}", req.key))),
                    Err(e) => Err(Status::internal(format!("read task failed: {e}"))),
                };
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
                off += n;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn submit_result(
        &self,
        request: Request<Streaming<pb::SubmitChunk>>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let resp = self.shared.handle_submit(request.into_inner()).await?;
        Ok(Response::new(resp))
    }

    async fn reduce(
        &self,
        request: Request<pb::ReduceRequest>,
    ) -> Result<Response<pb::ReduceResponse>, Status> {
        let sums = self.shared.handle_reduce(request.into_inner()).await?;
        Ok(Response::new(pb::ReduceResponse { sums }))
    }

    async fn job_status(
        &self,
        _request: Request<pb::JobStatusRequest>,
    ) -> Result<Response<pb::JobStatusResponse>, Status> {
        Ok(Response::new(self.shared.status()))
    }

    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = request.into_inner();
        let h = Arc::clone(&self.shared.host);
        let ticket = tokio::task::spawn_blocking(move || h.submit_job(req))
            .await
            .map_err(|e| Status::internal(format!("submit task failed: {e}")))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // An idle coordinator hands the job's first phase out now.
        self.shared.advance_phases().await;
        match ticket.await {
            Ok(Ok(r)) => Ok(Response::new(r)),
            Ok(Err(m)) => Err(Status::aborted(m)),
            Err(_) => Err(Status::internal("the coordinator dropped the job")),
        }
    }
}

/// A running coordinator.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    done_rx: watch::Receiver<bool>,
    status: StatusFn,
    failure: FailureFn,
    metrics: Option<MetricsServer>,
    tls: bool,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr())
            .finish()
    }
}

impl ServerHandle {
    /// The bound address (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound `/metrics` address, when `ServerOptions::metrics_addr` was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// `http://ADDR`, or `https://ADDR` with TLS, for [`crate::client::connect_with`].
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Resolves when every shard is committed (at once if the job was complete on start), or
    /// when the job failed ([`ServerHandle::failure`]).
    pub fn done(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.done_rx.clone();
        async move {
            // An error means the server is gone; nothing more can complete.
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// The job counters, as `JobStatus` returns them.
    pub fn status(&self) -> pb::JobStatusResponse {
        (self.status)()
    }

    /// Why the job failed, if it did (a phased job whose next phase could not be made).
    pub fn failure(&self) -> Option<String> {
        (self.failure)()
    }

    /// Stops accepting calls, waits up to `grace` for calls in flight, then aborts the rest.
    pub async fn shutdown(mut self, grace: Duration) -> Result<()> {
        if let Some(m) = self.metrics.take() {
            m.shutdown().await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(Ok(r)) => r.map_err(ClusterError::from),
            Ok(Err(e)) if e.is_cancelled() => Ok(()),
            Ok(Err(e)) => Err(ClusterError::Host(format!("server task failed: {e}"))),
            Err(_) => {
                self.task.abort();
                Ok(())
            }
        }
    }
}

/// Starts the coordinator for `host` on `addr` (port 0 picks a free port).
///
/// With a store in `opts`, a job already in the store with the same plan hash resumes: only its
/// uncommitted shards are issued. A different plan hash under the same job id is an error.
pub async fn serve<H: JobHost>(
    host: Arc<H>,
    addr: SocketAddr,
    opts: ServerOptions,
) -> Result<ServerHandle> {
    let mutual_tls = opts.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some());
    let auth = ServerAuth::new(opts.token.as_deref())?.require_client_cert(mutual_tls);
    if opts.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "coordinator listens beyond loopback without a token");
    }
    let h = Arc::clone(&host);
    let shards = tokio::task::spawn_blocking(move || h.shards())
        .await
        .map_err(|e| ClusterError::Host(format!("shards task failed: {e}")))?;
    let hash = plan_hash(&shards);
    let committed = match &opts.store {
        Some(store) => {
            let (store, job, hash2) = (Arc::clone(store), opts.job_id.clone(), hash.clone());
            tokio::task::spawn_blocking(move || -> Result<_> {
                match store.load(&job)? {
                    Some(st) if st.plan_hash == hash2 => Ok(st.committed_ids()),
                    Some(st) => Err(ClusterError::Store(format!(
                        "job {job} was started with plan {} but the plan now hashes to {hash2}; \
                         use a new job id",
                        st.plan_hash
                    ))),
                    None => {
                        store.record_plan(&job, &hash2)?;
                        Ok(Default::default())
                    }
                }
            })
            .await
            .map_err(|e| ClusterError::Store(format!("store task failed: {e}")))??
        }
        None => Default::default(),
    };
    let ttl_ms = opts.lease_ttl.as_millis() as u64;
    let phased = host.phased();
    let (now_ids, later): (BTreeSet<ShardId>, BTreeSet<ShardId>) = {
        let ids: BTreeSet<ShardId> = shards.iter().map(|s| s.id).collect();
        committed
            .iter()
            .copied()
            .partition(|id| ids.contains(id) || !phased)
    };
    let mut sched = Scheduler::with_committed(&shards, &now_ids, ttl_ms)?;
    sched.set_open(phased);
    // Ids unique per coordinator incarnation: a worker or lease id from before a restart never
    // names one of this run (ms since the epoch, times 1000, leaves room for 1000 ids per ms).
    let first_id = unix_ms().saturating_mul(1000).max(1);
    sched.set_first_lease_id(first_id);
    if !committed.is_empty() {
        tracing::info!(job = %opts.job_id, committed = committed.len(), total = shards.len(),
            "resuming job");
    }
    let (done_tx, done_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        host,
        specs: Mutex::new(shards.into_iter().map(|s| (s.id, s.spec)).collect()),
        later,
        phase_gate: tokio::sync::Mutex::new(()),
        failure: Mutex::new(None),
        opts,
        sched: Mutex::new(sched),
        clock: Instant::now(),
        workers: Mutex::new(BTreeMap::new()),
        next_worker: AtomicU64::new(first_id),
        staged: Mutex::new(HashMap::new()),
        bytes_received: AtomicU64::new(0),
        rounds: Mutex::new(HashMap::new()),
        done_tx,
    });
    // A resumed job may have whole phases committed already (or be complete).
    shared.advance_phases().await;
    let st = Arc::clone(&shared);
    let status: StatusFn = Arc::new(move || st.status());
    let fl = Arc::clone(&shared);
    let failure: FailureFn = Arc::new(move || lock(&fl.failure).clone());
    // Bound first: if the gRPC bind below fails, dropping it stops it.
    let metrics = match shared.opts.metrics_addr {
        Some(maddr) => Some(serve_metrics(maddr, Arc::clone(&status)).await?),
        None => None,
    };
    let incoming = TcpIncoming::bind(addr)
        .map_err(|e| ClusterError::Config(format!("cannot listen on {addr}: {e}")))?
        .with_nodelay(Some(true));
    let bound = incoming
        .local_addr()
        .map_err(|e| ClusterError::Config(format!("listen address of {addr}: {e}")))?;
    let svc = CoordinatorServer::new(Service {
        shared: Arc::clone(&shared),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &shared.opts.tls {
        builder = builder.tls_config(tls.config()?).map_err(|e| {
            ClusterError::Config(format!("coordinator TLS settings: {}", error_chain(&e)))
        })?;
    }
    let router = builder
        .http2_adaptive_window(Some(true))
        .add_service(InterceptedService::new(svc, auth));
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = rx.await;
    }));
    tracing::info!(addr = %bound, "coordinator listening");
    Ok(ServerHandle {
        addr: bound,
        shutdown: Some(tx),
        task,
        done_rx,
        status,
        failure,
        metrics,
        tls: shared.opts.tls.is_some(),
    })
}
