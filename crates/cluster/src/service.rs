//! A long-lived coordinator (`amalgam coordinator --serve`) that takes merge jobs one after
//! another (`amalgam submit`, the `SubmitJob` RPC).
//!
//! - The server runs one never-ending phased job ([`JobHost::phased`]): each submitted job
//!   adds its phases (its model-global passes, then its merge) when the job before it is
//!   done, so workers stay connected between jobs and simply wait while the queue is empty.
//! - Jobs run in submission order, one at a time; each has its own [`MergeHost`] (output
//!   directory, spill folder) and its shard ids are offset past every earlier job's, so a
//!   late result of an earlier job can never be taken for one of the current job.
//! - A job's checkpoint is finished on the coordinator when its last phase commits, then its
//!   submitter gets the summary. A job that cannot start (bad config, existing output
//!   without `overwrite`) fails alone: the submitter gets the error, the next job starts.
//! - Job state is kept in memory: a restarted service forgets its queue (the submitters'
//!   calls fail with the lost connection and can be submitted again).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use amalgam_core::config::parse_config;
use amalgam_engine::run::MergeOptions;
use tokio::sync::oneshot;

use crate::error::{ClusterError, Result};
use crate::lock;
use crate::merge_job::{finish_job, prepare_job, JobSummary, MergeHost, PreparedJob};
use crate::pb;
use crate::scheduler::{ShardId, ShardSpec};
use crate::server::{JobHost, JobTicket};

type Reply = oneshot::Sender<std::result::Result<pb::SubmitJobResponse, String>>;

struct Queued {
    id: String,
    job: PreparedJob,
    reply: Reply,
    submitted: Instant,
}

struct Running {
    id: String,
    job: PreparedJob,
    host: MergeHost,
    /// Server shard id of the job's shard 0.
    base: ShardId,
    reply: Mutex<Option<Reply>>,
    submitted: Instant,
}

impl Running {
    fn answer(&self, r: std::result::Result<pb::SubmitJobResponse, String>) {
        if let Some(tx) = lock(&self.reply).take() {
            // A submitter that went away no longer wants the answer.
            let _ = tx.send(r);
        }
    }

    fn response(&self, s: &JobSummary) -> pb::SubmitJobResponse {
        pb::SubmitJobResponse {
            job_id: self.id.clone(),
            tensors: self.job.plan.tensors.len() as u64,
            shards: s.shards as u64,
            files: s.files.iter().map(|f| f.display().to_string()).collect(),
            total_bytes: s.total_bytes,
            seconds: self.submitted.elapsed().as_secs_f64(),
        }
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    current: Option<Arc<Running>>,
    next_base: ShardId,
    submitted: u64,
}

/// The engine side of a long-lived coordinator (see the module docs).
pub struct ServiceHost {
    default_shard_bytes: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for ServiceHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("ServiceHost")
            .field("queued", &st.queue.len())
            .field("running", &st.current.as_ref().map(|r| r.id.clone()))
            .finish()
    }
}

impl ServiceHost {
    /// A service whose jobs are cut into shards of `default_shard_bytes` output bytes unless
    /// a submission says otherwise.
    pub fn new(default_shard_bytes: u64) -> Self {
        ServiceHost {
            default_shard_bytes,
            state: Mutex::new(State::default()),
        }
    }

    fn current(&self) -> Result<Arc<Running>> {
        lock(&self.state)
            .current
            .clone()
            .ok_or_else(|| ClusterError::Host("no job is running".into()))
    }

    /// Finish `run` (its last phase is committed) and answer its submitter.
    fn finish(&self, run: &Running) {
        let r = finish_job(&run.job, &run.host);
        match &r {
            Ok(s) => tracing::info!(job = %run.id, files = s.files.len(), "job done"),
            Err(e) => {
                tracing::error!(job = %run.id, error = %e, "job failed");
                run.host.clean_up();
            }
        }
        run.answer(r.map(|s| run.response(&s)).map_err(|e| e.to_string()));
    }
}

fn offset(mut specs: Vec<ShardSpec>, base: ShardId) -> Vec<ShardSpec> {
    for s in &mut specs {
        s.id += base;
    }
    specs
}

fn absolute(what: &str, p: &str) -> Result<PathBuf> {
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(ClusterError::Config(format!(
            "{what} {p:?} must be an absolute path on the coordinator"
        )));
    }
    Ok(path)
}

impl JobHost for ServiceHost {
    fn shards(&self) -> Vec<ShardSpec> {
        Vec::new()
    }

    fn phased(&self) -> bool {
        true
    }

    fn next_phase(&self) -> Result<Option<Vec<ShardSpec>>> {
        loop {
            let current = lock(&self.state).current.clone();
            if let Some(run) = current {
                match run.host.next_phase() {
                    Ok(Some(specs)) => return Ok(Some(offset(specs, run.base))),
                    Ok(None) => self.finish(&run),
                    Err(e) => {
                        tracing::error!(job = %run.id, error = %e, "job failed");
                        run.answer(Err(e.to_string()));
                        run.host.clean_up();
                    }
                }
                lock(&self.state).current = None;
            }
            let Some(q) = lock(&self.state).queue.pop_front() else {
                return Ok(Some(Vec::new()));
            };
            let host = match MergeHost::new(&q.job, false) {
                Ok(h) => h,
                Err(e) => {
                    let _ = q.reply.send(Err(format!("starting {}: {e}", q.id)));
                    continue;
                }
            };
            let specs = host.shards();
            let mut st = lock(&self.state);
            let base = st.next_base;
            st.next_base += host.id_count();
            tracing::info!(job = %q.id, first_shard = base, "job started");
            st.current = Some(Arc::new(Running {
                id: q.id,
                job: q.job,
                host,
                base,
                reply: Mutex::new(Some(q.reply)),
                submitted: q.submitted,
            }));
            if !specs.is_empty() {
                return Ok(Some(offset(specs, base)));
            }
            // A job without shards: finished on the next turn of the loop.
        }
    }

    fn read_input(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.current()?.host.read_input(key, offset, len)
    }

    fn accept(&self, shard_id: ShardId, bytes: Vec<u8>) -> Result<()> {
        let run = self.current()?;
        if shard_id < run.base {
            return Err(ClusterError::Host(format!(
                "shard {shard_id} belongs to a job before {}",
                run.id
            )));
        }
        run.host.accept(shard_id - run.base, bytes)
    }

    fn submit_job(&self, req: pb::SubmitJobRequest) -> Result<JobTicket> {
        let submitted = Instant::now();
        let config_dir = absolute("config_dir", &req.config_dir)?;
        let out_dir = absolute("out_dir", &req.out_dir)?;
        if req.memory_budget == 0 || req.out_shard_size == 0 {
            return Err(ClusterError::Config(
                "memory_budget and out_shard_size must be more than 0 bytes".into(),
            ));
        }
        let (config, _warnings) = parse_config(&req.config_yaml, req.strict)
            .map_err(|e| ClusterError::Config(format!("the submitted config: {e}")))?;
        let opts = MergeOptions {
            out_dir,
            memory_budget: req.memory_budget,
            out_shard_size: req.out_shard_size,
            overwrite: req.overwrite,
            allow_nonfinite: req.allow_nonfinite,
            device: Default::default(),
        };
        let shard_bytes = match req.shard_bytes {
            0 => self.default_shard_bytes,
            n => n,
        };
        let job = prepare_job(config, req.config_yaml, Some(config_dir), opts, shard_bytes)?;
        if req.strict {
            if let Some(e) = job.plan.strict_error() {
                return Err(ClusterError::Config(format!("the submitted config: {e}")));
            }
        }
        let (tx, rx) = oneshot::channel();
        let mut st = lock(&self.state);
        st.submitted += 1;
        let id = format!("job-{}", st.submitted);
        tracing::info!(job = %id, shards = job.shards.len(), "job queued");
        st.queue.push_back(Queued {
            id,
            job,
            reply: tx,
            submitted,
        });
        Ok(rx)
    }
}
