//! Statistics on the cluster (issue 6): the coordinator's [`StatsHost`] and the workers'
//! [`StatsExecutor`].
//!
//! The examples are cut into chunks (`amalgam_eval::stats::plan_chunks`); a shard is one chunk,
//! and its result is the chunk's f64 sums (`StatsPartial` in `proto/amalgam.proto`). The
//! coordinator adds the chunks in order (`finish_partials`), exactly as one process does, so
//! the statistics file is the same bit for bit whatever the number of workers. Each worker
//! loads the model (and data) once and keeps it for every chunk of the job.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use amalgam_eval::model::{CausalLm, LoadOptions};
use amalgam_eval::stats::{
    finish_partials, install_ia3, plan_chunks, read_jsonl, GramPositions, PartialSum, StatsExample,
    StatsKindArg, StatsOptions, StatsOutput, StatsPartial,
};
use prost::Message;

use crate::error::{ClusterError, Result};
use crate::lock;
use crate::pb;
use crate::roots::AllowedRoots;
use crate::scheduler::{ShardId, ShardSpec};
use crate::server::JobHost;
use crate::worker::{InputClient, ShardExecutor};

/// What a statistics job computes: the model, data and options every chunk shares.
#[derive(Clone, Debug)]
pub struct StatsJob {
    /// The model (a path every worker can read).
    pub model: PathBuf,
    /// The data file (JSONL, a path every worker can read).
    pub data: PathBuf,
    /// Which statistics.
    pub kind: StatsKindArg,
    /// Positions a Gram counts.
    pub positions: GramPositions,
    /// The (IA)^3 adapter (ia3-block).
    pub adapter: Option<PathBuf>,
}

/// The coordinator side: the chunks, and the partial sums gathered so far.
#[derive(Debug)]
pub struct StatsHost {
    job: StatsJob,
    chunks: Vec<std::ops::Range<usize>>,
    parts: Mutex<Vec<Option<StatsPartial>>>,
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

impl StatsHost {
    /// Plans `job` over `n_examples` examples with `opts`' example limit and chunk size.
    pub fn new(job: StatsJob, n_examples: usize, opts: &StatsOptions) -> StatsHost {
        let chunks = plan_chunks(n_examples, opts);
        let parts = Mutex::new(vec![None; chunks.len()]);
        StatsHost { job, chunks, parts }
    }

    /// Chunks done so far and the total.
    pub fn progress(&self) -> (usize, usize) {
        let p = lock(&self.parts);
        (p.iter().filter(|c| c.is_some()).count(), p.len())
    }

    /// The statistics, once every chunk is in (their sums added in chunk order).
    pub fn finish(&self) -> Result<StatsOutput> {
        let p = lock(&self.parts);
        let mut parts = Vec::with_capacity(p.len());
        for (i, c) in p.iter().enumerate() {
            match c {
                Some(c) => parts.push(c.clone()),
                None => return Err(ClusterError::Host(format!("chunk {i} was never computed"))),
            }
        }
        finish_partials(self.job.kind, &parts).map_err(|e| ClusterError::Host(e.to_string()))
    }
}

impl JobHost for StatsHost {
    fn shards(&self) -> Vec<ShardSpec> {
        self.chunks
            .iter()
            .enumerate()
            .map(|(id, r)| ShardSpec {
                id: id as ShardId,
                est_bytes: 0,
                gang: None,
                spec: pb::StatsShard {
                    model: path_str(&self.job.model),
                    data: path_str(&self.job.data),
                    kind: self.job.kind.name().to_string(),
                    positions: self.job.positions.name().to_string(),
                    adapter: self
                        .job
                        .adapter
                        .as_deref()
                        .map(path_str)
                        .unwrap_or_default(),
                    start: r.start as u64,
                    end: r.end as u64,
                }
                .encode_to_vec(),
            })
            .collect()
    }

    fn read_input(&self, key: &str, _offset: u64, _len: u64) -> Result<Vec<u8>> {
        Err(ClusterError::Host(format!(
            "statistics jobs do not stream inputs (asked for {key}): the model and data must be \
             readable at the same paths on every worker"
        )))
    }

    fn accept(&self, shard_id: ShardId, bytes: Vec<u8>) -> Result<()> {
        let range = self
            .chunks
            .get(shard_id as usize)
            .ok_or_else(|| ClusterError::Host(format!("unknown statistics shard {shard_id}")))?;
        let m = pb::StatsPartial::decode(bytes.as_slice())
            .map_err(|e| ClusterError::Protocol(format!("malformed statistics result: {e}")))?;
        if (m.start as usize, m.end as usize) != (range.start, range.end) {
            return Err(ClusterError::Protocol(format!(
                "statistics shard {shard_id}: result for examples {}..{}, expected {range:?}",
                m.start, m.end
            )));
        }
        let part = StatsPartial {
            range: range.clone(),
            counted: self.job.positions,
            positions: m.positions,
            loss_tokens: m.loss_tokens,
            sums: m
                .sums
                .into_iter()
                .map(|s| PartialSum {
                    name: s.name,
                    suffix: s.suffix,
                    shape: s.shape.into_iter().map(|d| d as usize).collect(),
                    sum: s.sum,
                })
                .collect(),
        };
        lock(&self.parts)[shard_id as usize] = Some(part);
        Ok(())
    }

    fn job_kind(&self) -> pb::JobKind {
        pb::JobKind::Stats
    }
}

/// A model loaded for one (model, kind, adapter), and the data read for one path.
struct Loaded {
    key: (String, String, String),
    model: CausalLm,
    opts: StatsOptions,
    data_path: String,
    data: Vec<StatsExample>,
}

/// The worker side: computes the sums of each leased chunk.
pub struct StatsExecutor {
    roots: Option<AllowedRoots>,
    loaded: Mutex<Option<Loaded>>,
}

impl std::fmt::Debug for StatsExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = lock(&self.loaded).as_ref().map(|l| l.key.clone());
        f.debug_struct("StatsExecutor")
            .field("loaded", &key)
            .finish()
    }
}

fn exec_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Executor(e.to_string())
}

impl StatsExecutor {
    /// An executor reading only under `roots` when given.
    pub fn new(roots: Option<AllowedRoots>) -> StatsExecutor {
        StatsExecutor {
            roots,
            loaded: Mutex::new(None),
        }
    }

    /// Computes one shard spec (an encoded `StatsShard`) into an encoded `StatsPartial`.
    pub fn compute_spec(&self, spec: &[u8]) -> Result<Vec<u8>> {
        let s = pb::StatsShard::decode(spec)
            .map_err(|e| exec_err(format!("malformed statistics shard: {e}")))?;
        if let Some(roots) = &self.roots {
            roots.check(&s.model)?;
            roots.check(&s.data)?;
            if !s.adapter.is_empty() {
                roots.check(&s.adapter)?;
            }
        }
        let kind: StatsKindArg = s.kind.parse().map_err(exec_err)?;
        let positions: GramPositions = s.positions.parse().map_err(exec_err)?;
        let key = (s.model.clone(), s.kind.clone(), s.adapter.clone());
        let mut guard = lock(&self.loaded);
        if guard.as_ref().map(|l| &l.key) != Some(&key) {
            *guard = None;
            let load = LoadOptions {
                trainable: kind.needs_trainable(),
                ..LoadOptions::default()
            };
            let mut model = CausalLm::load(Path::new(&s.model), &load).map_err(exec_err)?;
            let mut opts = StatsOptions::new(kind);
            if !s.adapter.is_empty() {
                let (vectors, _) =
                    install_ia3(&mut model, Path::new(&s.adapter)).map_err(exec_err)?;
                opts.ia3 = Some(vectors);
            }
            *guard = Some(Loaded {
                key,
                model,
                opts,
                data_path: String::new(),
                data: Vec::new(),
            });
        }
        let l = guard.as_mut().expect("loaded just above");
        if l.data_path != s.data {
            l.data = read_jsonl(Path::new(&s.data)).map_err(exec_err)?;
            l.data_path = s.data.clone();
        }
        l.opts.positions = positions;
        let range = s.start as usize..s.end as usize;
        let part =
            amalgam_eval::stats::compute_partial(&l.model, &l.data, range, &l.opts, &mut |_| {})
                .map_err(exec_err)?;
        Ok(pb::StatsPartial {
            start: part.range.start as u64,
            end: part.range.end as u64,
            positions: part.positions,
            loss_tokens: part.loss_tokens,
            sums: part
                .sums
                .into_iter()
                .map(|p| pb::StatsSum {
                    name: p.name,
                    suffix: p.suffix,
                    shape: p.shape.into_iter().map(|d| d as u64).collect(),
                    sum: p.sum,
                })
                .collect(),
        }
        .encode_to_vec())
    }
}

impl ShardExecutor for StatsExecutor {
    fn execute(&self, spec: &[u8], _inputs: &InputClient) -> Result<Vec<u8>> {
        self.compute_spec(spec)
    }
}
