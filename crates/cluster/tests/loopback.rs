//! Coordinator and workers over real loopback sockets, with a toy job whose shard results are
//! deterministic byte strings computed from the spec and from input bytes read over ReadInput.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amalgam_cluster::client::{connect, connect_with};
use amalgam_cluster::etcd_store::{EtcdStore, LocalEtcd};
use amalgam_cluster::journal::{CommitRecord, JobStore, JournalStore};
use amalgam_cluster::pb;
use amalgam_cluster::scheduler::ShardSpec;
use amalgam_cluster::server::{plan_hash, serve, JobHost, ServerHandle, ServerOptions};
use amalgam_cluster::tls::{ClientTls, PemIdentity, ServerTls};
use amalgam_cluster::worker::{run_worker, InputClient, ShardExecutor, WorkerOptions};
use amalgam_cluster::{ClusterError, Result, MAX_MESSAGE_BYTES};
use sha2::{Digest, Sha256};

const INPUT_KEY: &str = "models/a.safetensors";
const INPUT_LEN: usize = 64 * 1024;

fn input_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 131 + 7) % 253) as u8).collect()
}

/// Shard `id` of the toy plan: result length, gang.
fn toy_plan(n: u64) -> Vec<ShardSpec> {
    (0..n)
        .map(|id| {
            // A few results larger than a chunk.
            let len: u64 = if id % 4 == 1 {
                700 * 1024 + id
            } else {
                5000 + 37 * id
            };
            ShardSpec {
                id,
                est_bytes: len,
                gang: (3..6).contains(&id).then_some(77),
                spec: format!("{id}:{len}").into_bytes(),
            }
        })
        .collect()
}

/// The result the executor must produce for `spec` (independent of any worker state).
fn expected_result(spec: &[u8], input: &[u8]) -> Vec<u8> {
    let (id, len) = parse_spec(spec).unwrap();
    let off = (id as usize * 1000) % (INPUT_LEN - 256);
    (0..len as usize)
        .map(|i| ((id as usize * 31 + i * 7) % 251) as u8 ^ input[off + i % 256])
        .collect()
}

fn parse_spec(spec: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(spec).ok()?;
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

struct ToyHost {
    shards: Vec<ShardSpec>,
    inputs: BTreeMap<String, Vec<u8>>,
    outputs: Mutex<BTreeMap<u64, Vec<u8>>>,
    accepts: Mutex<BTreeMap<u64, u32>>,
}

impl ToyHost {
    fn new(n: u64) -> Arc<Self> {
        let mut inputs = BTreeMap::new();
        inputs.insert(INPUT_KEY.to_string(), input_bytes(INPUT_LEN));
        Arc::new(ToyHost {
            shards: toy_plan(n),
            inputs,
            outputs: Mutex::default(),
            accepts: Mutex::default(),
        })
    }

    fn assembled(&self) -> Vec<u8> {
        self.outputs
            .lock()
            .unwrap()
            .values()
            .flat_map(|v| v.iter().copied())
            .collect()
    }

    fn expected_assembled(&self) -> Vec<u8> {
        let input = &self.inputs[INPUT_KEY];
        self.shards
            .iter()
            .flat_map(|s| expected_result(&s.spec, input))
            .collect()
    }

    fn accept_counts(&self) -> BTreeMap<u64, u32> {
        self.accepts.lock().unwrap().clone()
    }
}

impl JobHost for ToyHost {
    fn shards(&self) -> Vec<ShardSpec> {
        self.shards.clone()
    }

    fn read_input(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let data = self
            .inputs
            .get(key)
            .ok_or_else(|| ClusterError::Host(format!("no input {key}")))?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= data.len() as u64)
            .ok_or_else(|| ClusterError::Host(format!("{key}: range past the end")))?;
        Ok(data[offset as usize..end as usize].to_vec())
    }

    fn accept(&self, shard_id: u64, bytes: Vec<u8>) -> Result<()> {
        *self.accepts.lock().unwrap().entry(shard_id).or_insert(0) += 1;
        self.outputs.lock().unwrap().insert(shard_id, bytes);
        Ok(())
    }
}

struct ToyExecutor {
    delay: Duration,
}

impl ShardExecutor for ToyExecutor {
    fn execute(&self, spec: &[u8], inputs: &InputClient) -> Result<Vec<u8>> {
        let (id, len) =
            parse_spec(spec).ok_or_else(|| ClusterError::Executor("bad spec".into()))?;
        let off = (id as usize * 1000) % (INPUT_LEN - 256);
        let window = inputs.read(INPUT_KEY, off as u64, 256)?;
        std::thread::sleep(self.delay);
        Ok((0..len as usize)
            .map(|i| ((id as usize * 31 + i * 7) % 251) as u8 ^ window[i % 256])
            .collect())
    }
}

fn opts(ttl_ms: u64, token: Option<&str>) -> ServerOptions {
    ServerOptions {
        job_id: "toy".into(),
        token: token.map(str::to_string),
        lease_ttl: Duration::from_millis(ttl_ms),
        heartbeat_interval: Duration::from_millis(ttl_ms / 4),
        wait_retry: Duration::from_millis(10),
        store: None,
        reduce_timeout: Duration::from_secs(5),
        ..ServerOptions::default()
    }
}

fn worker_opts(h: &ServerHandle, name: &str, token: Option<&str>) -> WorkerOptions {
    WorkerOptions {
        url: h.url(),
        token: token.map(str::to_string),
        name: name.into(),
        device: "cpu".into(),
        threads: 1,
        ..WorkerOptions::default()
    }
}

async fn run_job(workers: usize, n: u64) -> (Arc<ToyHost>, pb::JobStatusResponse) {
    let host = ToyHost::new(n);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(2000, Some("tok")),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let o = worker_opts(&h, &format!("w{w}"), Some("tok"));
        let exec = Arc::new(ToyExecutor {
            delay: Duration::from_millis(5),
        });
        tasks.push(tokio::spawn(run_worker(o, exec)));
    }
    tokio::time::timeout(Duration::from_secs(20), h.done())
        .await
        .expect("job finishes");
    let mut committed = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        committed += r.shards_committed;
    }
    assert_eq!(committed, n, "every shard committed once over all workers");
    let st = h.status();
    h.shutdown(Duration::from_secs(1)).await.unwrap();
    (host, st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_and_three_workers_give_identical_output() {
    let n = 14;
    let (h1, st1) = run_job(1, n).await;
    let (h3, st3) = run_job(3, n).await;
    let expected = h1.expected_assembled();
    assert_eq!(h1.assembled(), expected);
    assert_eq!(h3.assembled(), expected);
    for h in [&h1, &h3] {
        let counts = h.accept_counts();
        assert_eq!(counts.len() as u64, n);
        assert!(counts.values().all(|c| *c == 1), "{counts:?}");
    }
    for st in [&st1, &st3] {
        assert!(st.done);
        assert_eq!(st.shards_total, n);
        assert_eq!(st.shards_committed, n);
        assert_eq!(st.shards_pending + st.shards_leased, 0);
        assert_eq!(st.results_rejected, 0);
        assert_eq!(st.lease_expiries, 0);
        let sum: u64 = st.workers.iter().map(|w| w.shards_done).sum();
        assert_eq!(sum, n);
        assert!(st.bytes_received >= expected.len() as u64);
    }
    assert_eq!(st3.workers.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_worker_lease_expires_and_another_finishes() {
    let n = 6;
    let host = ToyHost::new(n);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(600, None),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("worker.pid");
    // Worker A streams one chunk of its first result, then stops (and stops heartbeating).
    let mut a = worker_opts(&h, "stalls", None);
    a.pause_after_bytes = Some(1);
    a.pause_pid_file = Some(pid_file.clone());
    let exec = Arc::new(ToyExecutor {
        delay: Duration::ZERO,
    });
    let a_task = tokio::spawn(run_worker(a, Arc::clone(&exec)));
    tokio::time::timeout(Duration::from_secs(10), async {
        while !pid_file.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("worker A pauses");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        std::process::id().to_string()
    );
    // Let the lease run out, then start worker B.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let st = h.status();
    assert_eq!(st.lease_expiries, 1);
    assert_eq!(st.shards_committed, 0);
    let b = tokio::spawn(run_worker(worker_opts(&h, "finishes", None), exec));
    tokio::time::timeout(Duration::from_secs(10), h.done())
        .await
        .expect("job finishes");
    let rb = b.await.unwrap().unwrap();
    assert_eq!(rb.shards_committed, n);
    let st = h.status();
    assert_eq!(st.lease_expiries, 1);
    assert_eq!(st.re_leases, 1);
    assert_eq!(st.shards_committed, n);
    assert!(!a_task.is_finished(), "worker A is still paused");
    a_task.abort();
    assert_eq!(host.assembled(), host.expected_assembled());
    assert!(host.accept_counts().values().all(|c| *c == 1));
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_results_are_rejected_and_redone() {
    let n = 5;
    let host = ToyHost::new(n);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(2000, None),
    )
    .await
    .unwrap();
    let mut o = worker_opts(&h, "corrupts", None);
    o.corrupt_results = 2;
    let exec = Arc::new(ToyExecutor {
        delay: Duration::ZERO,
    });
    let r = tokio::spawn(run_worker(o, exec)).await.unwrap().unwrap();
    assert_eq!(r.results_rejected, 2);
    assert_eq!(r.shards_committed, n);
    let st = h.status();
    assert_eq!(st.results_rejected, 2);
    assert_eq!(st.re_leases, 2);
    assert!(st.done);
    assert_eq!(host.assembled(), host.expected_assembled());
    assert!(host.accept_counts().values().all(|c| *c == 1));
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_or_wrong_token_is_refused_on_every_rpc_kind() {
    let host = ToyHost::new(2);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(2000, Some("s3cret")),
    )
    .await
    .unwrap();
    for (token, needle) in [
        (None, "missing bearer token"),
        (Some("wrong"), "invalid bearer token"),
    ] {
        let mut c = connect(&h.url(), token).await.unwrap();
        // Unary.
        let e = c
            .register(pb::RegisterRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains(needle), "{}", e.message());
        let e = c.job_status(pb::JobStatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = c
            .submit_job(pb::SubmitJobRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains(needle), "{}", e.message());
        // Server streaming.
        let e = c
            .read_input(pb::ReadInputRequest {
                key: INPUT_KEY.into(),
                offset: 0,
                length: 10,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains(needle));
        // Client streaming.
        let header = pb::SubmitChunk {
            kind: Some(pb::submit_chunk::Kind::Header(pb::ResultHeader {
                lease_id: 1,
                shard_id: 0,
                total_bytes: 0,
                sha256_hex: hex::encode(Sha256::digest(b"")),
            })),
        };
        let e = c
            .submit_result(tokio_stream::iter(vec![header]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains(needle));
    }
    // The right token passes.
    let mut c = connect(&h.url(), Some("s3cret")).await.unwrap();
    let r = c
        .register(pb::RegisterRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.lease_ttl_ms, 2000);
    let st = c
        .job_status(pb::JobStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.shards_total, 2);
    // A one-job coordinator refuses a submitted job, saying how to take them.
    let e = c
        .submit_job(pb::SubmitJobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("--serve"), "{}", e.message());
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reduce_sums_in_part_order_whatever_the_arrival_order() {
    let host = ToyHost::new(1);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(2000, None),
    )
    .await
    .unwrap();
    // Values where the order of f64 additions changes the result.
    let mut parts: Vec<Vec<f64>> = vec![
        vec![1e16, 0.1, 3.0],
        vec![-1e16, 0.2, 1e-17],
        vec![1.0, 0.3, -3.0],
    ];
    for (p, v) in parts.iter_mut().enumerate() {
        for i in 0..200 {
            let x = ((i * 7919 + p * 104729) % 1000) as f64;
            v.push(x.sin() * 10f64.powi((i % 30) as i32 - 15));
        }
    }
    let n = parts[0].len();
    let naive: Vec<f64> = (0..n)
        .map(|i| {
            let mut s = 0.0f64;
            for p in &parts {
                s += p[i];
            }
            s
        })
        .collect();
    // The arrival order below (2, 0, 1) would give a different first element.
    assert_ne!(
        ((parts[2][0] + parts[0][0]) + parts[1][0]).to_bits(),
        naive[0].to_bits()
    );
    let mut tasks = Vec::new();
    for p in [2usize, 0, 1] {
        let url = h.url();
        let values = parts[p].clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&url, None).await.unwrap();
            c.reduce(pb::ReduceRequest {
                key: "ties/hist".into(),
                round: 3,
                part_index: p as u32,
                parts_total: 3,
                values,
            })
            .await
            .unwrap()
            .into_inner()
            .sums
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for t in tasks {
        let sums = t.await.unwrap();
        assert_eq!(sums.len(), n);
        for (a, b) in sums.iter().zip(&naive) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }
    // Bad part index is refused.
    let mut c = connect(&h.url(), None).await.unwrap();
    let e = c
        .reduce(pb::ReduceRequest {
            key: "x".into(),
            round: 0,
            part_index: 3,
            parts_total: 3,
            values: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

struct BigInputHost {
    data: Vec<u8>,
}

impl JobHost for BigInputHost {
    fn shards(&self) -> Vec<ShardSpec> {
        Vec::new()
    }
    fn read_input(&self, _key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.data.len() as u64)
            .ok_or_else(|| ClusterError::Host("range past the end".into()))?;
        Ok(self.data[offset as usize..end as usize].to_vec())
    }
    fn accept(&self, _shard_id: u64, _bytes: Vec<u8>) -> Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_input_larger_than_the_message_limit_arrives_in_chunks() {
    let len = 2 * MAX_MESSAGE_BYTES + 12345;
    let data = input_bytes(len);
    let host = Arc::new(BigInputHost { data: data.clone() });
    let h = serve(host, "127.0.0.1:0".parse().unwrap(), opts(2000, Some("t")))
        .await
        .unwrap();
    // An empty plan is done at once.
    tokio::time::timeout(Duration::from_secs(1), h.done())
        .await
        .unwrap();
    let client = connect(&h.url(), Some("t")).await.unwrap();
    let handle = tokio::runtime::Handle::current();
    let (all, part, past_end) = tokio::task::spawn_blocking(move || {
        let ic = InputClient::new(client, handle);
        (
            ic.read("big", 0, len as u64),
            ic.read("big", 777, 3 * 1024 * 1024 + 5),
            ic.read("big", len as u64 - 10, 20),
        )
    })
    .await
    .unwrap();
    let all = all.unwrap();
    assert_eq!(all.len(), len);
    assert!(all == data);
    assert!(part.unwrap() == data[777..777 + 3 * 1024 * 1024 + 5]);
    let e = past_end.unwrap_err().to_string();
    assert!(e.contains("range past the end"), "{e}");
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn journal_resume_issues_only_uncommitted_shards() {
    let n = 5;
    let host = ToyHost::new(n);
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(JournalStore::open(dir.path().join("toy.journal")).unwrap());
    // A previous coordinator committed shards 1 and 2 before it died.
    journal
        .record_plan("toy", &plan_hash(&host.shards))
        .unwrap();
    let input = input_bytes(INPUT_LEN);
    for id in [1u64, 2] {
        let bytes = expected_result(&host.shards[id as usize].spec, &input);
        journal
            .record_commit(
                "toy",
                &CommitRecord {
                    shard_id: id,
                    sha256: hex::encode(Sha256::digest(&bytes)),
                    bytes: bytes.len() as u64,
                },
            )
            .unwrap();
    }
    let mut o = opts(2000, None);
    o.store = Some(journal.clone());
    let h = serve(Arc::clone(&host), "127.0.0.1:0".parse().unwrap(), o)
        .await
        .unwrap();
    assert_eq!(h.status().shards_committed, 2);
    let exec = Arc::new(ToyExecutor {
        delay: Duration::ZERO,
    });
    let r = run_worker(worker_opts(&h, "w", None), exec).await.unwrap();
    // Shards 3..5 form a gang; 0 and the gang remain: 0, 3, 4.
    assert_eq!(r.shards_committed, 3);
    let counts = host.accept_counts();
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), vec![0, 3, 4]);
    let st = journal.load("toy").unwrap().unwrap();
    let mut ids: Vec<u64> = st.committed.iter().map(|c| c.shard_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    h.shutdown(Duration::from_millis(200)).await.unwrap();
    // A different plan under the same job id is refused.
    let other = ToyHost::new(n + 1);
    let mut o = opts(2000, None);
    o.store = Some(journal);
    let e = serve(other, "127.0.0.1:0".parse().unwrap(), o)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("use a new job id"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_worker_does_not_hold_back_the_end() {
    let n = 3;
    let host = ToyHost::new(n);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(2000, None),
    )
    .await
    .unwrap();
    let slow = tokio::spawn(run_worker(
        worker_opts(&h, "slow", None),
        Arc::new(ToyExecutor {
            delay: Duration::from_millis(1500),
        }),
    ));
    tokio::time::timeout(Duration::from_secs(5), async {
        while h.status().shards_leased == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    let fast = tokio::spawn(run_worker(
        worker_opts(&h, "fast", None),
        Arc::new(ToyExecutor {
            delay: Duration::ZERO,
        }),
    ));
    tokio::time::timeout(Duration::from_secs(5), h.done())
        .await
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "the fast worker re-ran the slow worker's shard: {:?}",
        t0.elapsed()
    );
    let rf = fast.await.unwrap().unwrap();
    assert_eq!(rf.shards_committed, n);
    let rs = slow.await.unwrap().unwrap();
    assert_eq!(rs.shards_committed, 0);
    assert_eq!(rs.leases_abandoned + rs.results_dropped, 1, "{rs:?}");
    let st = h.status();
    assert_eq!(st.speculative_leases, 1);
    assert_eq!(st.lease_expiries, 0);
    assert_eq!(host.assembled(), host.expected_assembled());
    assert!(host.accept_counts().values().all(|c| *c == 1));
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_coordinator_redoes_only_uncommitted_shards() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(JournalStore::open(dir.path().join("toy.journal")).unwrap());
    restart_scenario(journal.clone(), journal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_coordinator_with_only_etcd_redoes_only_uncommitted_shards() {
    if LocalEtcd::binary().is_none() {
        eprintln!("SKIPPED: no etcd binary (apt-get install etcd-server)");
        return;
    }
    let etcd = tokio::task::spawn_blocking(LocalEtcd::start)
        .await
        .unwrap()
        .unwrap();
    let url = etcd.url();
    let (s1, s2) = tokio::task::spawn_blocking(move || {
        (
            EtcdStore::connect(&url).unwrap(),
            EtcdStore::connect(&url).unwrap(),
        )
    })
    .await
    .unwrap();
    // The restarted coordinator gets a store of its own: only etcd carries the state.
    restart_scenario(Arc::new(s1), Arc::new(s2)).await;
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_publish_membership_in_etcd_while_they_run() {
    if LocalEtcd::binary().is_none() {
        eprintln!("SKIPPED: no etcd binary (apt-get install etcd-server)");
        return;
    }
    let etcd = tokio::task::spawn_blocking(LocalEtcd::start)
        .await
        .unwrap()
        .unwrap();
    let url = etcd.url();
    let u = url.clone();
    let store = tokio::task::spawn_blocking(move || EtcdStore::connect(&u).unwrap())
        .await
        .unwrap();
    let store = Arc::new(store);
    let n = 6;
    let host = ToyHost::new(n);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(2000, None),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for name in ["m0", "m1"] {
        let mut wo = worker_opts(&h, name, None);
        wo.etcd = Some(url.clone());
        tasks.push(tokio::spawn(run_worker(
            wo,
            Arc::new(ToyExecutor {
                delay: Duration::from_millis(100),
            }),
        )));
    }
    let s = store.clone();
    let names = tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        loop {
            let mut names: Vec<String> = s
                .members("toy")
                .unwrap()
                .into_iter()
                .map(|m| m.name)
                .collect();
            names.sort();
            if names.len() == 2 || t0.elapsed() > Duration::from_secs(5) {
                return names;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .unwrap();
    assert_eq!(names, vec!["m0", "m1"]);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = store.clone();
    let left = tokio::task::spawn_blocking(move || s.members("toy").unwrap())
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    // An unreachable etcd is a clear error for a worker that asks for it.
    let mut wo = worker_opts(&h, "no-etcd", None);
    wo.etcd = Some("http://127.0.0.1:1".into());
    let e = run_worker(
        wo,
        Arc::new(ToyExecutor {
            delay: Duration::ZERO,
        }),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("etcd at http://127.0.0.1:1 is unreachable"),
        "{e}"
    );
    h.shutdown(Duration::from_millis(200)).await.unwrap();
    drop(etcd);
}

/// A coordinator with `store1` is shut down after some commits; a fresh one (new host, same
/// plan) with `store2` on the same address finishes the job, redoing only the rest.
async fn restart_scenario(store1: Arc<dyn JobStore>, store2: Arc<dyn JobStore>) {
    let n = 10;
    let mut o = opts(1000, None);
    o.store = Some(store1.clone());
    let host1 = ToyHost::new(n);
    let h1 = serve(
        Arc::clone(&host1),
        "127.0.0.1:0".parse().unwrap(),
        o.clone(),
    )
    .await
    .unwrap();
    let addr = h1.local_addr();
    let mut wo = worker_opts(&h1, "w", None);
    wo.reconnect_timeout = Duration::from_secs(10);
    let worker = tokio::spawn(run_worker(
        wo,
        Arc::new(ToyExecutor {
            delay: Duration::from_millis(30),
        }),
    ));
    tokio::time::timeout(Duration::from_secs(10), async {
        while h1.status().shards_committed < 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    h1.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(o);
    let s1 = store1.clone();
    let committed = tokio::task::spawn_blocking(move || s1.load("toy"))
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .committed
        .len() as u64;
    assert!((3..n).contains(&committed), "{committed}");
    assert_eq!(host1.accept_counts().len() as u64, committed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fresh coordinator (new host, same plan) on the same address.
    let host2 = ToyHost::new(n);
    let mut o = opts(1000, None);
    o.store = Some(store2);
    let h2 = serve(Arc::clone(&host2), addr, o).await.unwrap();
    assert_eq!(h2.status().shards_committed, committed);
    let done = tokio::time::timeout(Duration::from_secs(10), h2.done()).await;
    let r = worker.await.unwrap();
    assert!(
        done.is_ok(),
        "job did not finish after the restart; worker: {r:?}"
    );
    let r = r.unwrap();
    assert_eq!(r.reregistrations, 1, "{r:?}");
    let counts2 = host2.accept_counts();
    assert_eq!(counts2.len() as u64, n - committed);
    assert!(counts2.values().all(|c| *c == 1));
    // Old and new results together give the full output.
    let mut all = host1.outputs.lock().unwrap().clone();
    for (k, v) in host2.outputs.lock().unwrap().iter() {
        assert!(all.insert(*k, v.clone()).is_none(), "shard {k} done twice");
    }
    let assembled: Vec<u8> = all.values().flat_map(|v| v.iter().copied()).collect();
    assert_eq!(assembled, host1.expected_assembled());
    assert_eq!(h2.status().shards_committed, n);
    h2.shutdown(Duration::from_millis(200)).await.unwrap();
}

/// Gang parts (shards 3, 4, 5 of the toy plan) meet in a Reduce before producing their bytes:
/// this only finishes if the parts of a lease run concurrently.
struct GangExecutor {
    inner: ToyExecutor,
}

impl ShardExecutor for GangExecutor {
    fn execute(&self, spec: &[u8], inputs: &InputClient) -> Result<Vec<u8>> {
        let (id, _) = parse_spec(spec).unwrap();
        if (3..6).contains(&id) {
            let key = format!("gang77/lease{}", inputs.lease_id());
            let sums = inputs.reduce(&key, 0, (id - 3) as u32, 3, vec![id as f64, 0.5])?;
            assert_eq!(sums, vec![12.0, 1.5]);
        }
        self.inner.execute(spec, inputs)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gang_parts_run_concurrently_and_meet_in_reduce() {
    let n = 8;
    let host = ToyHost::new(n);
    let h = serve(
        Arc::clone(&host),
        "127.0.0.1:0".parse().unwrap(),
        opts(2000, None),
    )
    .await
    .unwrap();
    let exec = Arc::new(GangExecutor {
        inner: ToyExecutor {
            delay: Duration::ZERO,
        },
    });
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        run_worker(worker_opts(&h, "g", None), exec),
    )
    .await
    .expect("no deadlock between gang parts")
    .unwrap();
    assert_eq!(r.shards_committed, n);
    // 8 shards, one gang of 3: 6 leases.
    assert_eq!(r.leases, 6);
    assert_eq!(host.assembled(), host.expected_assembled());
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

/// `GET path` over a plain TCP connection; the whole answer (head and body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_show_the_lease_expiry_and_the_re_lease() {
    let n = 4;
    let host = ToyHost::new(n);
    let mut o = opts(500, Some("tok"));
    o.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let h = serve(Arc::clone(&host), "127.0.0.1:0".parse().unwrap(), o)
        .await
        .unwrap();
    let maddr = h.metrics_addr().expect("metrics listener");
    assert_ne!(maddr.port(), h.local_addr().port());
    let before = http_get(maddr, "/metrics").await;
    assert!(before.starts_with("HTTP/1.1 200 OK\r\n"), "{before}");
    assert!(before.contains("text/plain; version=0.0.4"), "{before}");
    assert!(before.contains("\namalgam_shards_total 4\n"), "{before}");
    assert!(before.contains("\namalgam_shards_pending 4\n"), "{before}");
    assert!(
        before.contains("\namalgam_lease_expiries_total 0\n"),
        "{before}"
    );
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("worker.pid");
    let mut a = worker_opts(&h, "stalls", Some("tok"));
    a.pause_after_bytes = Some(1);
    a.pause_pid_file = Some(pid_file.clone());
    let exec = Arc::new(ToyExecutor {
        delay: Duration::ZERO,
    });
    let a_task = tokio::spawn(run_worker(a, Arc::clone(&exec)));
    tokio::time::timeout(Duration::from_secs(10), async {
        while !pid_file.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("worker A pauses");
    let during = http_get(maddr, "/metrics").await;
    assert!(during.contains("\namalgam_shards_leased 1\n"), "{during}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = tokio::spawn(run_worker(worker_opts(&h, "finishes", Some("tok")), exec));
    tokio::time::timeout(Duration::from_secs(10), h.done())
        .await
        .expect("job finishes");
    b.await.unwrap().unwrap();
    a_task.abort();
    let after = http_get(maddr, "/metrics").await;
    for line in [
        "amalgam_lease_expiries_total 1",
        "amalgam_releases_total 1",
        "amalgam_shards_committed 4",
        "amalgam_shards_pending 0",
        "amalgam_job_done 1",
        "amalgam_results_rejected_total 0",
    ] {
        assert!(after.lines().any(|l| l == line), "missing {line}:\n{after}");
    }
    let done_by_b = after
        .lines()
        .find(|l| l.starts_with("amalgam_worker_shards_done{worker=\"finishes\""))
        .unwrap_or_else(|| panic!("no per-worker line:\n{after}"));
    assert!(done_by_b.ends_with(" 4"), "{done_by_b}");
    assert!(
        after.contains("amalgam_worker_bytes{worker=\"stalls\""),
        "{after}"
    );
    let nf = http_get(maddr, "/nothing").await;
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
    h.shutdown(Duration::from_millis(200)).await.unwrap();
    assert!(tokio::net::TcpStream::connect(maddr).await.is_err());
}

struct Pki {
    ca_pem: Vec<u8>,
    other_ca_pem: Vec<u8>,
    server: PemIdentity,
    client: PemIdentity,
    /// A client certificate signed by the other CA.
    stranger: PemIdentity,
}

/// A CA, a server certificate for localhost and 127.0.0.1 and a client certificate signed by
/// it, and an unrelated CA with a client certificate of its own.
fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }
    fn leaf(
        ca: &CertifiedIssuer<'static, KeyPair>,
        name: &str,
        sans: &[&str],
        eku: ExtendedKeyUsagePurpose,
    ) -> PemIdentity {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, ca).unwrap();
        PemIdentity {
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        }
    }
    let main = ca("amalgam test CA");
    let other = ca("unrelated CA");
    Pki {
        ca_pem: main.pem().into_bytes(),
        other_ca_pem: other.pem().into_bytes(),
        server: leaf(
            &main,
            "coordinator",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(
            &main,
            "worker",
            &["worker"],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        stranger: leaf(
            &other,
            "intruder",
            &["intruder"],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    }
}

/// Connects with `tls` and calls JobStatus; the error message when either step fails.
async fn tls_status(url: &str, tls: &ClientTls) -> std::result::Result<u64, String> {
    let mut c = connect_with(url, Some("tok"), Some(tls))
        .await
        .map_err(|e| e.to_string())?;
    c.job_status(pb::JobStatusRequest {})
        .await
        .map(|r| r.into_inner().shards_total)
        .map_err(|s| ClusterError::rpc("JobStatus", s).to_string())
}

async fn tls_job(pki: &Pki, mutual: bool) -> ServerHandle {
    let mut o = opts(2000, Some("tok"));
    o.tls = Some(ServerTls {
        identity: pki.server.clone(),
        client_ca_pem: mutual.then(|| pki.ca_pem.clone()),
    });
    serve(ToyHost::new(3), "127.0.0.1:0".parse().unwrap(), o)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_passes_with_the_right_ca_and_is_refused_with_another() {
    let pki = pki();
    let h = tls_job(&pki, false).await;
    let url = h.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let trusting = ClientTls {
        ca_pem: Some(pki.ca_pem.clone()),
        ..ClientTls::default()
    };
    // A whole job over TLS.
    let mut wo = worker_opts(&h, "tls", Some("tok"));
    wo.tls = Some(trusting.clone());
    let exec = Arc::new(ToyExecutor {
        delay: Duration::ZERO,
    });
    let r = tokio::time::timeout(Duration::from_secs(10), run_worker(wo, exec))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.shards_committed, 3);
    assert_eq!(tls_status(&url, &trusting).await, Ok(3));
    // By name as well as by IP address.
    let by_name = url.replace("127.0.0.1", "localhost");
    assert_eq!(tls_status(&by_name, &trusting).await, Ok(3));
    // A client that trusts another CA refuses the coordinator's certificate.
    let wrong = ClientTls {
        ca_pem: Some(pki.other_ca_pem.clone()),
        ..ClientTls::default()
    };
    let e = tls_status(&url, &wrong).await.unwrap_err();
    assert!(e.contains(&url), "{e}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // A worker with the wrong CA fails at once instead of retrying for a minute.
    let mut wo = worker_opts(&h, "wrong-ca", Some("tok"));
    wo.tls = Some(wrong);
    let t0 = std::time::Instant::now();
    let e = run_worker(
        wo,
        Arc::new(ToyExecutor {
            delay: Duration::ZERO,
        }),
    )
    .await
    .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(e.to_string().contains("certificate"), "{e}");
    // Plain HTTP/2 to a TLS port fails; https without TLS settings is a config error.
    assert!(tls_status(&url.replace("https", "http"), &trusting)
        .await
        .unwrap_err()
        .contains("not an https:// URL"));
    let e = connect(&url, Some("tok")).await.unwrap_err().to_string();
    assert!(e.contains("--ca-cert"), "{e}");
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = pki();
    let h = tls_job(&pki, true).await;
    let url = h.url();
    let with_cert = ClientTls {
        ca_pem: Some(pki.ca_pem.clone()),
        identity: Some(pki.client.clone()),
        domain: None,
    };
    let mut wo = worker_opts(&h, "mtls", Some("tok"));
    wo.tls = Some(with_cert.clone());
    let exec = Arc::new(ToyExecutor {
        delay: Duration::ZERO,
    });
    let r = tokio::time::timeout(Duration::from_secs(10), run_worker(wo, exec))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.shards_committed, 3);
    assert_eq!(tls_status(&url, &with_cert).await, Ok(3));
    // No client certificate: refused.
    let without = ClientTls {
        ca_pem: Some(pki.ca_pem.clone()),
        ..ClientTls::default()
    };
    let e = tls_status(&url, &without).await.unwrap_err();
    println!("mTLS without a client certificate: {e}");
    assert!(e.contains("requires a client certificate"), "{e}");
    assert!(e.contains("Unauthenticated"), "{e}");
    // A worker without one stops at once (no retrying for a minute).
    let mut wo = worker_opts(&h, "no-cert", Some("tok"));
    wo.tls = Some(without.clone());
    let t0 = std::time::Instant::now();
    let e = run_worker(
        wo,
        Arc::new(ToyExecutor {
            delay: Duration::ZERO,
        }),
    )
    .await
    .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        e.to_string().contains("requires a client certificate"),
        "{e}"
    );
    // A client certificate from another CA: refused.
    let stranger = ClientTls {
        ca_pem: Some(pki.ca_pem.clone()),
        identity: Some(pki.stranger.clone()),
        domain: None,
    };
    let e = tls_status(&url, &stranger).await.unwrap_err();
    println!("mTLS with a certificate from another CA: {e}");
    // The server still works for a good client afterwards.
    assert_eq!(tls_status(&url, &with_cert).await, Ok(3));
    h.shutdown(Duration::from_millis(200)).await.unwrap();
}

/// etcd goes away in the middle of a job: results that cannot be recorded are answered
/// `RejectedHost` and their shards go back to the queue; the coordinator keeps serving; once
/// etcd is back the job completes, every shard recorded once, with the same output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_lost_during_a_job_delays_commits_until_it_returns() {
    use amalgam_cluster::etcd_store::EtcdStoreOptions;
    if LocalEtcd::binary().is_none() {
        eprintln!("SKIPPED: no etcd binary (apt-get install etcd-server)");
        return;
    }
    let mut etcd = tokio::task::spawn_blocking(LocalEtcd::start)
        .await
        .unwrap()
        .unwrap();
    let url = etcd.url();
    let store = tokio::task::spawn_blocking(move || {
        EtcdStore::connect_with(
            &url,
            EtcdStoreOptions {
                op_timeout: Duration::from_millis(500),
                ..EtcdStoreOptions::default()
            },
        )
        .unwrap()
    })
    .await
    .unwrap();
    let store = Arc::new(store);
    let n = 12;
    let host = ToyHost::new(n);
    let mut o = opts(2000, None);
    o.store = Some(store.clone());
    let h = serve(Arc::clone(&host), "127.0.0.1:0".parse().unwrap(), o)
        .await
        .unwrap();
    let worker = tokio::spawn(run_worker(
        worker_opts(&h, "w", None),
        Arc::new(ToyExecutor {
            delay: Duration::from_millis(20),
        }),
    ));
    let wait_for = |pred: &dyn Fn(&pb::JobStatusResponse) -> bool| {
        let t0 = std::time::Instant::now();
        while !pred(&h.status()) {
            assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", h.status());
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    tokio::task::block_in_place(|| wait_for(&|s| s.shards_committed >= 2));
    let mut etcd = tokio::task::spawn_blocking(move || {
        etcd.stop();
        etcd
    })
    .await
    .unwrap();
    let committed_before = h.status().shards_committed;
    tokio::task::block_in_place(|| wait_for(&|s| s.results_rejected >= 2));
    let st = h.status();
    assert!(!st.done);
    // At most the one commit in flight when etcd stopped got through.
    assert!(st.shards_committed <= committed_before + 1, "{st:?}");
    let etcd = tokio::task::spawn_blocking(move || {
        etcd.restart().unwrap();
        etcd
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), h.done())
        .await
        .expect("job finishes once etcd is back");
    let r = worker.await.unwrap().unwrap();
    assert!(r.results_rejected >= 2, "{r:?}");
    assert_eq!(r.shards_committed, n);
    assert_eq!(host.assembled(), host.expected_assembled());
    let s2 = store.clone();
    let st = tokio::task::spawn_blocking(move || s2.load("toy").unwrap().unwrap())
        .await
        .unwrap();
    let mut ids: Vec<u64> = st.committed.iter().map(|c| c.shard_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..n).collect::<Vec<_>>());
    h.shutdown(Duration::from_millis(200)).await.unwrap();
    drop(etcd);
}
