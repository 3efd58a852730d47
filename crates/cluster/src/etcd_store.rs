//! [`JobStore`] on etcd (etcd-client 0.21, etcd v3 API): the cluster's durable job state, so
//! that a coordinator killed and restarted elsewhere with the same job id and only etcd to go
//! on re-does only the uncommitted shards.
//!
//! Keys (the prefix defaults to `/amalgam`; job ids may not contain `/`):
//! - `<prefix>/jobs/<job id>/plan`: JSON `{"plan_hash": .., "started_unix_ms": ..}`;
//! - `<prefix>/jobs/<job id>/commits/<shard id>`: JSON [`CommitRecord`].
//!
//! Writes are transactions:
//! - `record_plan` deletes the job's commits and writes the plan key in one transaction;
//! - `record_commit` writes a commit key only if it does not exist (`create_revision == 0`),
//!   so a shard is recorded once; a second record of the same shard is a no-op (with a warning
//!   if its checksum differs: the first record stays, as in the journal). When this store
//!   loaded or wrote the job's plan, the transaction also requires the plan key to hold that
//!   same value, so a coordinator whose job was meanwhile restarted by another one (with
//!   `record_plan`) cannot add commits to the new incarnation: its commits fail.
//! - `load` reads the plan and the commits in one transaction (one consistent revision),
//!   commits in the order they were created.
//!
//! [`JobStore`] is synchronous; the store runs its own small tokio runtime (one thread) and
//! every call waits for its operation on a channel, so it may be called from any thread,
//! including blocking threads of another runtime (the coordinator calls it from
//! `spawn_blocking`). Each operation has a deadline ([`EtcdStoreOptions::op_timeout`]).
//!
//! Worker membership: [`EtcdStore::register_member`] writes
//! `<prefix>/jobs/<job id>/workers/<lease id in hex>` (JSON [`MemberInfo`]) under an etcd lease
//! that a background task keeps alive; dropping the [`Membership`] revokes it, and a worker
//! that dies (kill -9) drops out when the lease's TTL runs out. [`EtcdStore::members`] lists
//! the live ones. Membership is informational (what `amalgam status` shows, what an operator
//! watches); the coordinator's shard leases do not depend on it.
//!
//! etcd lost during a job: `record_commit` fails with an error naming etcd's URL; the
//! coordinator answers the worker `RejectedHost` and puts the shard back in the queue (its
//! result is not counted as committed, because it was not recorded), and keeps serving; once
//! etcd answers again, the shards are committed as workers redo them. Nothing committed is
//! lost and no shard is recorded twice.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use crate::error::{ClusterError, Result};
use crate::journal::{CommitRecord, JobState, JobStore};
use crate::tls::{error_chain, status_chain};

/// Settings of an [`EtcdStore`].
#[derive(Clone, Debug)]
pub struct EtcdStoreOptions {
    /// Key prefix (default `/amalgam`).
    pub prefix: String,
    /// How long connecting (and the first request that proves etcd answers) may take.
    pub connect_timeout: Duration,
    /// Deadline of each store operation.
    pub op_timeout: Duration,
}

impl Default for EtcdStoreOptions {
    fn default() -> Self {
        EtcdStoreOptions {
            prefix: "/amalgam".into(),
            connect_timeout: Duration::from_secs(3),
            op_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PlanValue {
    plan_hash: String,
    started_unix_ms: u64,
}

/// [`JobStore`] on etcd; see the module docs.
pub struct EtcdStore {
    url: String,
    prefix: String,
    op_timeout: Duration,
    client: Client,
    /// Dropped with `shutdown_background` (dropping a runtime may not block in async code).
    rt: Option<tokio::runtime::Runtime>,
    /// The plan value this store loaded or wrote, per job (the fence of `record_commit`).
    plans: Mutex<HashMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl EtcdStore {
    /// Connects to etcd at `url` (several endpoints separated by commas) with default
    /// options, and checks that it answers.
    pub fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, EtcdStoreOptions::default())
    }

    /// Connects with `opts`; an etcd that does not answer within `opts.connect_timeout` is an
    /// error naming the URL (`etcd at http://127.0.0.1:2379 is unreachable: ...`).
    pub fn connect_with(url: &str, opts: EtcdStoreOptions) -> Result<Self> {
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            return Err(ClusterError::Config(format!(
                "etcd key prefix {:?} must start with '/'",
                opts.prefix
            )));
        }
        let endpoints: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err(ClusterError::Config("no etcd URL given".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("amalgam-etcd")
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Store(format!("etcd client runtime: {e}")))?;
        let copts = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.op_timeout);
        let ct = opts.connect_timeout;
        let u = url.to_string();
        let unreachable = move |cause: String| {
            ClusterError::Store(format!("etcd at {u} is unreachable: {cause}"))
        };
        // Run on the store's runtime and wait on a channel (not `block_on`), so that this
        // works from async code too.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let r = async {
                let mut client = tokio::time::timeout(ct, Client::connect(endpoints, Some(copts)))
                    .await
                    .map_err(|_| unreachable(format!("no connection within {ct:?}")))?
                    .map_err(|e| unreachable(etcd_err(&e)))?;
                // The channel connects lazily: a status call proves that etcd answers.
                tokio::time::timeout(ct, client.status())
                    .await
                    .map_err(|_| unreachable(format!("no answer within {ct:?}")))?
                    .map_err(|e| unreachable(etcd_err(&e)))?;
                Ok::<_, ClusterError>(client)
            };
            let _ = tx.send(r.await);
        });
        let client = rx.recv().map_err(|_| {
            ClusterError::Store(format!("etcd at {url}: the client runtime stopped"))
        })??;
        Ok(EtcdStore {
            url: url.to_string(),
            prefix,
            op_timeout: opts.op_timeout,
            client,
            rt: Some(rt),
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The etcd URL(s) this store talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key prefix (no trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn job_key(&self, job_id: &str) -> Result<String> {
        if job_id.is_empty() || job_id.contains('/') {
            return Err(ClusterError::Config(format!(
                "job id {job_id:?} cannot be used as an etcd key: it must be non-empty \
                 without '/'"
            )));
        }
        Ok(format!("{}/jobs/{job_id}", self.prefix))
    }

    /// Runs `f(client)` on the store's runtime and waits for it, with the op deadline.
    fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>> + Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| ClusterError::Store("etcd store is shut down".into()))?;
        let fut = f(self.client.clone());
        let timeout = self.op_timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(tokio::time::timeout(timeout, fut).await);
        });
        match rx.recv() {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(ClusterError::Store(format!(
                "etcd at {}: {what} failed: {}",
                self.url,
                etcd_err(&e)
            ))),
            Ok(Err(_)) => Err(ClusterError::Store(format!(
                "etcd at {}: {what} got no answer within {timeout:?}",
                self.url
            ))),
            Err(_) => Err(ClusterError::Store(format!(
                "etcd at {}: {what}: the client runtime stopped",
                self.url
            ))),
        }
    }

    fn cached_plan(&self, job_id: &str) -> Option<Vec<u8>> {
        self.plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
            .cloned()
    }

    fn cache_plan(&self, job_id: &str, value: Vec<u8>) {
        self.plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job_id.to_string(), value);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a worker publishes about itself in etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Worker name (host or pod name).
    pub name: String,
    /// Device, `cpu` or `cuda`.
    pub device: String,
    /// Threads per shard.
    pub threads: u32,
    /// When the worker registered (ms since the Unix epoch).
    pub started_unix_ms: u64,
}

/// A live membership record; see [`EtcdStore::register_member`]. Dropping it revokes the
/// lease (best effort; otherwise the record expires with the lease's TTL).
pub struct Membership {
    lease_id: i64,
    key: String,
    keeper: tokio::task::JoinHandle<()>,
    client: Client,
    handle: tokio::runtime::Handle,
    revoked: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("lease_id", &self.lease_id)
            .field("key", &self.key)
            .finish()
    }
}

impl Membership {
    /// The etcd lease the record lives under.
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// The record's key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.keeper.abort();
        if self.revoked {
            return;
        }
        let mut c = self.client.clone();
        let id = self.lease_id;
        self.handle.spawn(async move {
            let _ = c.lease_revoke(id).await;
        });
    }
}

impl EtcdStore {
    /// Publishes `info` under job `job_id` with a lease of `ttl` (at least 2 s; etcd rounds
    /// shorter ones up) kept alive every `ttl / 3` until the returned [`Membership`] is
    /// dropped.
    pub fn register_member(
        &self,
        job_id: &str,
        info: &MemberInfo,
        ttl: Duration,
    ) -> Result<Membership> {
        let base = self.job_key(job_id)?;
        let ttl_s = ttl.as_secs().max(2) as i64;
        let value = serde_json::to_vec(info)
            .map_err(|e| ClusterError::Store(format!("member encode: {e}")))?;
        let (lease_id, key) = self.run("register_member", move |mut c| async move {
            let lease = c.lease_grant(ttl_s, None).await?;
            let key = format!("{base}/workers/{:x}", lease.id());
            c.put(
                key.clone(),
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease.id())),
            )
            .await?;
            Ok((lease.id(), key))
        })?;
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| ClusterError::Store("etcd store is shut down".into()))?;
        let interval = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(200));
        let mut c = self.client.clone();
        let url = self.url.clone();
        let keeper = rt.spawn(async move {
            loop {
                match c.lease_keep_alive(lease_id).await {
                    Ok((mut keeper, mut stream)) => loop {
                        if let Err(e) = keeper.keep_alive().await {
                            tracing::warn!(%url, error = %etcd_err(&e), "membership keep-alive");
                            break;
                        }
                        match stream.message().await {
                            Ok(Some(r)) if r.ttl() > 0 => {}
                            Ok(Some(_)) => {
                                tracing::warn!(%url, lease_id, "membership lease expired");
                                return;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(%url, error = %etcd_err(&e), "membership keep-alive");
                                break;
                            }
                        }
                        tokio::time::sleep(interval).await;
                    },
                    Err(e) => {
                        tracing::warn!(%url, error = %etcd_err(&e), "membership keep-alive");
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Membership {
            lease_id,
            key,
            keeper,
            client: self.client.clone(),
            handle: rt.handle().clone(),
            revoked: false,
        })
    }

    /// Ends a membership now: stops its keep-alive and revokes its lease, waiting for etcd.
    pub fn deregister_member(&self, mut member: Membership) -> Result<()> {
        member.keeper.abort();
        member.revoked = true;
        let id = member.lease_id;
        self.run("deregister_member", move |mut c| async move {
            c.lease_revoke(id).await.map(|_| ())
        })
    }

    /// The live members of job `job_id`, in registration order.
    pub fn members(&self, job_id: &str) -> Result<Vec<MemberInfo>> {
        let prefix = format!("{}/workers/", self.job_key(job_id)?);
        let resp = self.run("members", move |mut c| async move {
            c.get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            )
            .await
        })?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|e| {
                    ClusterError::Store(format!(
                        "etcd at {}: {}: bad value: {e}",
                        self.url,
                        String::from_utf8_lossy(kv.key())
                    ))
                })
            })
            .collect()
    }
}

/// An etcd client error with its causes (a gRPC status as `message (Code): causes`).
fn etcd_err(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => status_chain(s),
        other => error_chain(other),
    }
}

fn get_kvs(resp: &TxnOpResponse) -> &[etcd_client::KeyValue] {
    match resp {
        TxnOpResponse::Get(g) => g.kvs(),
        _ => &[],
    }
}

impl JobStore for EtcdStore {
    fn load(&self, job_id: &str) -> Result<Option<JobState>> {
        let base = self.job_key(job_id)?;
        let plan_key = format!("{base}/plan");
        let commits = format!("{base}/commits/");
        let txn = Txn::new().and_then([
            TxnOp::get(plan_key.clone(), None),
            TxnOp::get(
                commits,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            ),
        ]);
        let resp = self.run("load", |mut c| async move { c.txn(txn).await })?;
        let ops = resp.op_responses();
        let (Some(plan), Some(commits)) = (ops.first(), ops.get(1)) else {
            return Err(ClusterError::Store(format!(
                "etcd at {}: load of job {job_id}: short transaction answer",
                self.url
            )));
        };
        let Some(plan_kv) = get_kvs(plan).first() else {
            if let Some(kv) = get_kvs(commits).first() {
                return Err(ClusterError::Store(format!(
                    "etcd at {}: job {job_id} has commits ({}) but no plan key {plan_key}",
                    self.url,
                    String::from_utf8_lossy(kv.key())
                )));
            }
            return Ok(None);
        };
        let plan: PlanValue = serde_json::from_slice(plan_kv.value()).map_err(|e| {
            ClusterError::Store(format!("etcd at {}: {plan_key}: bad value: {e}", self.url))
        })?;
        let mut committed = Vec::new();
        for kv in get_kvs(commits) {
            let rec: CommitRecord = serde_json::from_slice(kv.value()).map_err(|e| {
                ClusterError::Store(format!(
                    "etcd at {}: {}: bad value: {e}",
                    self.url,
                    String::from_utf8_lossy(kv.key())
                ))
            })?;
            committed.push(rec);
        }
        self.cache_plan(job_id, plan_kv.value().to_vec());
        Ok(Some(JobState {
            plan_hash: plan.plan_hash,
            committed,
        }))
    }

    fn record_plan(&self, job_id: &str, plan_hash: &str) -> Result<()> {
        let base = self.job_key(job_id)?;
        let value = serde_json::to_vec(&PlanValue {
            plan_hash: plan_hash.to_string(),
            started_unix_ms: unix_ms(),
        })
        .map_err(|e| ClusterError::Store(format!("plan encode: {e}")))?;
        let txn = Txn::new().and_then([
            TxnOp::delete(
                format!("{base}/commits/"),
                Some(DeleteOptions::new().with_prefix()),
            ),
            TxnOp::put(format!("{base}/plan"), value.clone(), None),
        ]);
        self.run("record_plan", |mut c| async move { c.txn(txn).await })?;
        self.cache_plan(job_id, value);
        Ok(())
    }

    fn record_commit(&self, job_id: &str, commit: &CommitRecord) -> Result<()> {
        let base = self.job_key(job_id)?;
        let key = format!("{base}/commits/{}", commit.shard_id);
        let plan_key = format!("{base}/plan");
        let value = serde_json::to_vec(commit)
            .map_err(|e| ClusterError::Store(format!("commit encode: {e}")))?;
        let plan = self.cached_plan(job_id);
        let mut cmps = vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)];
        if let Some(p) = &plan {
            cmps.push(Compare::value(
                plan_key.clone(),
                CompareOp::Equal,
                p.clone(),
            ));
        }
        let txn = Txn::new()
            .when(cmps)
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key.clone(), None), TxnOp::get(plan_key, None)]);
        let resp = self.run("record_commit", |mut c| async move { c.txn(txn).await })?;
        if resp.succeeded() {
            return Ok(());
        }
        let ops = resp.op_responses();
        let existing = ops.first().and_then(|r| get_kvs(r).first().cloned());
        let current_plan = ops.get(1).and_then(|r| get_kvs(r).first().cloned());
        if let Some(p) = &plan {
            if current_plan.as_ref().map(|kv| kv.value()) != Some(p.as_slice()) {
                return Err(ClusterError::Store(format!(
                    "etcd at {}: job {job_id} was restarted by another coordinator (its plan \
                     key changed); shard {} is not recorded by this one",
                    self.url, commit.shard_id
                )));
            }
        }
        let Some(kv) = existing else {
            return Err(ClusterError::Store(format!(
                "etcd at {}: recording shard {} of job {job_id} failed its transaction",
                self.url, commit.shard_id
            )));
        };
        match serde_json::from_slice::<CommitRecord>(kv.value()) {
            Ok(prev) if prev == *commit => {}
            Ok(prev) => tracing::warn!(job = job_id, shard = commit.shard_id,
                recorded = %prev.sha256, now = %commit.sha256,
                "shard already recorded in etcd with another result; the first record stays"),
            Err(e) => {
                return Err(ClusterError::Store(format!(
                    "etcd at {}: {key}: bad value: {e}",
                    self.url
                )))
            }
        }
        Ok(())
    }
}

/// Environment variable naming the etcd binary [`LocalEtcd`] runs (default: `etcd` on the
/// `PATH`).
pub const ENV_ETCD_BIN: &str = "AMALGAM_ETCD_BIN";

/// A throwaway single-member etcd on loopback (for tests and benchmarks): free ports, a
/// temporary data directory, killed when dropped.
#[derive(Debug)]
pub struct LocalEtcd {
    bin: PathBuf,
    dir: PathBuf,
    own_dir: Option<tempfile::TempDir>,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| ClusterError::Config(format!("no free loopback port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::Config(format!("no free loopback port: {e}")))
}

impl LocalEtcd {
    /// The etcd binary: `$AMALGAM_ETCD_BIN`, else `etcd` found on the `PATH`; `None` when
    /// there is none (tests then skip).
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(ENV_ETCD_BIN) {
            let p = PathBuf::from(p);
            return p.is_file().then_some(p);
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    }

    /// Starts etcd in a new temporary data directory and waits until it answers.
    pub fn start() -> Result<Self> {
        let bin = Self::binary().ok_or_else(|| {
            ClusterError::Config(format!(
                "no etcd binary (install Debian's etcd-server, or set {ENV_ETCD_BIN})"
            ))
        })?;
        let tmp = tempfile::Builder::new()
            .prefix("amalgam-etcd")
            .tempdir()
            .map_err(|e| ClusterError::Config(format!("etcd temp dir: {e}")))?;
        let mut me = LocalEtcd {
            bin,
            dir: tmp.path().to_path_buf(),
            own_dir: Some(tmp),
            client_port: free_port()?,
            peer_port: free_port()?,
            child: None,
        };
        me.restart()?;
        Ok(me)
    }

    /// `http://127.0.0.1:PORT`, the client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory (kept across [`LocalEtcd::stop`] and [`LocalEtcd::restart`]).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Kills etcd (SIGKILL) and waits for it; the data directory stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts etcd on the same ports and data directory and waits until it answers
    /// (up to 20 s).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| ClusterError::io(&log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ClusterError::io(&log_path, e))?;
        let child = Command::new(&self.bin)
            .arg("--name=amalgam-test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=amalgam-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| ClusterError::Config(format!("starting {}: {e}", self.bin.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.healthy() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let tail: String = tail.lines().rev().take(10).collect::<Vec<_>>().join("\n");
                    return Err(ClusterError::Config(format!(
                        "etcd exited with {status} at start; last log lines (newest first):\n{tail}"
                    )));
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(ClusterError::Config(format!(
                    "etcd on {client} did not become healthy within 20 s (log: {})",
                    log_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when `GET /health` on the client port answers `"health":"true"`.
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("\"health\":\"true\"")
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.stop();
        drop(self.own_dir.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{LeaseDecision, Scheduler, ShardSpec};

    fn rec(id: u64) -> CommitRecord {
        CommitRecord {
            shard_id: id,
            sha256: format!("{id:064x}"),
            bytes: 100 + id,
        }
    }

    fn etcd_or_skip() -> Option<LocalEtcd> {
        if LocalEtcd::binary().is_none() {
            eprintln!("SKIPPED: no etcd binary (apt-get install etcd-server, or {ENV_ETCD_BIN})");
            return None;
        }
        Some(LocalEtcd::start().unwrap())
    }

    #[test]
    fn commit_two_of_five_reload_from_a_new_store_leaves_three() {
        let Some(etcd) = etcd_or_skip() else { return };
        {
            let s = EtcdStore::connect(&etcd.url()).unwrap();
            assert_eq!(s.load("job1").unwrap(), None);
            s.record_plan("job1", "plan-a").unwrap();
            s.record_commit("job1", &rec(3)).unwrap();
            s.record_commit("job1", &rec(1)).unwrap();
            // Idempotent: the same record again changes nothing.
            s.record_commit("job1", &rec(1)).unwrap();
            // Another job's commits stay apart.
            s.record_plan("job10", "plan-b").unwrap();
            s.record_commit("job10", &rec(2)).unwrap();
        }
        let s = EtcdStore::connect(&etcd.url()).unwrap();
        let st = s.load("job1").unwrap().unwrap();
        assert_eq!(st.plan_hash, "plan-a");
        assert_eq!(st.committed, vec![rec(3), rec(1)], "in commit order");
        let shards: Vec<ShardSpec> = (0..5)
            .map(|id| ShardSpec {
                id,
                est_bytes: 1,
                gang: None,
                spec: Vec::new(),
            })
            .collect();
        let mut sched = Scheduler::with_committed(&shards, &st.committed_ids(), 100).unwrap();
        let mut issued = Vec::new();
        while let LeaseDecision::Granted(g) = sched.lease(1, 0) {
            issued.extend(g.shards);
        }
        assert_eq!(issued, vec![0, 2, 4]);
        // A second record with another checksum keeps the first.
        let mut other = rec(3);
        other.sha256 = "f".repeat(64);
        s.record_commit("job1", &other).unwrap();
        assert_eq!(s.load("job1").unwrap().unwrap().committed[0], rec(3));
        // A new plan starts over.
        s.record_plan("job1", "plan-c").unwrap();
        let st = s.load("job1").unwrap().unwrap();
        assert_eq!(st.plan_hash, "plan-c");
        assert!(st.committed.is_empty());
        assert_eq!(s.load("job10").unwrap().unwrap().committed, vec![rec(2)]);
        // Job ids that would break the key layout are refused.
        assert!(s.load("a/b").is_err());
        assert!(s.record_plan("", "x").is_err());
    }

    #[test]
    fn a_restarted_job_fences_off_the_old_coordinator() {
        let Some(etcd) = etcd_or_skip() else { return };
        let old = EtcdStore::connect(&etcd.url()).unwrap();
        old.record_plan("j", "h1").unwrap();
        old.record_commit("j", &rec(0)).unwrap();
        let new = EtcdStore::connect(&etcd.url()).unwrap();
        new.record_plan("j", "h2").unwrap();
        let e = old.record_commit("j", &rec(1)).unwrap_err().to_string();
        assert!(e.contains("restarted by another coordinator"), "{e}");
        new.record_commit("j", &rec(1)).unwrap();
        let st = new.load("j").unwrap().unwrap();
        assert_eq!(st.plan_hash, "h2");
        assert_eq!(st.committed, vec![rec(1)]);
    }

    #[test]
    fn membership_lives_while_kept_alive_and_ends_when_dropped() {
        let Some(etcd) = etcd_or_skip() else { return };
        let s = EtcdStore::connect(&etcd.url()).unwrap();
        let info = |name: &str| MemberInfo {
            name: name.into(),
            device: "cpu".into(),
            threads: 2,
            started_unix_ms: 1,
        };
        assert!(s.members("j").unwrap().is_empty());
        let a = s
            .register_member("j", &info("a"), Duration::from_secs(2))
            .unwrap();
        let b = s
            .register_member("j", &info("b"), Duration::from_secs(2))
            .unwrap();
        assert_ne!(a.key(), b.key());
        assert!(
            a.key().starts_with("/amalgam/jobs/j/workers/"),
            "{}",
            a.key()
        );
        // Longer than the TTL: only the keep-alive keeps them.
        std::thread::sleep(Duration::from_millis(2600));
        assert_eq!(s.members("j").unwrap(), vec![info("a"), info("b")]);
        drop(a);
        let t0 = Instant::now();
        while s.members("j").unwrap().len() != 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "revoke did not remove a"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(s.members("j").unwrap(), vec![info("b")]);
        assert!(s.members("other").unwrap().is_empty());
    }

    /// The sync API may be called from async code (it never uses `block_on`), dropped there
    /// too, even on a current-thread runtime.
    #[tokio::test]
    async fn usable_from_async_code() {
        let Some(etcd) = etcd_or_skip() else { return };
        let s = EtcdStore::connect(&etcd.url()).unwrap();
        s.record_plan("a", "h").unwrap();
        s.record_commit("a", &rec(4)).unwrap();
        assert_eq!(s.load("a").unwrap().unwrap().committed, vec![rec(4)]);
        let m = s
            .register_member(
                "a",
                &MemberInfo {
                    name: "x".into(),
                    device: "cpu".into(),
                    threads: 1,
                    started_unix_ms: 0,
                },
                Duration::from_secs(2),
            )
            .unwrap();
        drop(m);
        drop(s);
    }

    #[test]
    fn unreachable_etcd_is_a_clear_error() {
        let port = free_port().unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        let e = EtcdStore::connect_with(
            &url,
            EtcdStoreOptions {
                connect_timeout: Duration::from_millis(500),
                ..EtcdStoreOptions::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        println!("{e}");
        assert!(e.contains(&format!("etcd at {url} is unreachable")), "{e}");
        let e = EtcdStore::connect_with(
            "http://127.0.0.1:1",
            EtcdStoreOptions {
                prefix: "no-slash".into(),
                ..EtcdStoreOptions::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must start with '/'"), "{e}");
    }

    #[test]
    fn etcd_lost_and_back_fails_then_resumes() {
        let Some(mut etcd) = etcd_or_skip() else {
            return;
        };
        let s = EtcdStore::connect_with(
            &etcd.url(),
            EtcdStoreOptions {
                op_timeout: Duration::from_millis(800),
                ..EtcdStoreOptions::default()
            },
        )
        .unwrap();
        s.record_plan("j", "h").unwrap();
        s.record_commit("j", &rec(0)).unwrap();
        etcd.stop();
        let e = s.record_commit("j", &rec(1)).unwrap_err().to_string();
        println!("{e}");
        assert!(e.contains(&etcd.url()), "{e}");
        etcd.restart().unwrap();
        // The same client reconnects.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.record_commit("j", &rec(1)) {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for etcd: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            s.load("j").unwrap().unwrap().committed,
            vec![rec(0), rec(1)]
        );
    }
}
