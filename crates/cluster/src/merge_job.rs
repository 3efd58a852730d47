//! A merge as a cluster job: the engine behind [`JobHost`] and [`ShardExecutor`].
//!
//! - **Shards.** The output tensors, in checkpoint layout order, are cut into consecutive
//!   groups of about `shard_bytes` output bytes ([`partition`]). The cut depends only on the
//!   config and the shard size, never on the number of workers.
//! - **Workers** ([`MergeExecutor`]) get a [`ShardWork`]: the config text, its directory, the
//!   merge options, the results of the method's model-global passes, and the shard's tensor
//!   names. They open the same model paths (shared storage), plan exactly as the coordinator
//!   did, merge each tensor with the engine into its output dtype ([`ShardBytes`]) and return
//!   the bytes ([`encode_result`]).
//! - **The coordinator** ([`MergeHost`]) checks each verified result against the layout
//!   (names and byte lengths), keeps it in a spill file under the output directory, and copies
//!   results into the checkpoint writer strictly in shard order, so the checkpoint is
//!   byte-identical to a single-process `amalgam merge`, whatever the number of workers or
//!   the order results arrive in. Spill files survive a coordinator restart (a journal then
//!   says which shards are committed).
//!
//! - **Model-global passes** (e.g. whole-model TIES thresholds) run on the workers first, as
//!   the earlier phases of the job ([`crate::prepass`]): the merge shards are handed out once
//!   the coordinator has reduced the last pass.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amalgam_core::config::{parse_config, MergeConfig};
use amalgam_core::methods::GlobalStats;
use amalgam_core::plan::Plan;
use amalgam_core::tensor::LogRecord;
use amalgam_engine::inputs::{open_and_plan, Inputs};
use amalgam_engine::run::{self, MergeOptions};
use amalgam_engine::shard::ShardBytes;
use amalgam_io::{CheckpointWriter, OutputLayout};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ClusterError, Result};
use crate::lock;
use crate::roots::AllowedRoots;
use crate::scheduler::{ShardId, ShardSpec};
use crate::server::{serve, JobHost, ServerOptions};
use crate::worker::{run_worker, InputClient, ShardExecutor, WorkerOptions};

/// Verified results the coordinator keeps in memory while they wait for their turn to be
/// written (beyond this they are read back from their spill files).
const HELD_BYTES: usize = 1 << 30;

/// Default output bytes per shard.
pub const DEFAULT_SHARD_BYTES: u64 = 256 << 20;

/// Name of the folder (inside the output directory) holding verified shard results until the
/// checkpoint is finished.
pub const SPILL_DIR: &str = ".amalgam-shards";

/// What every worker needs to merge shards of one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    /// The merge config, as text.
    pub config_yaml: String,
    /// Directory relative model paths resolve against (absolute).
    pub config_dir: Option<PathBuf>,
    /// Peak private memory target per merge, bytes.
    pub memory_budget: u64,
    /// Accept NaN / Inf inputs.
    pub allow_nonfinite: bool,
    /// Output file size (only used to build the layout, which gives dtypes and sizes).
    pub out_shard_size: u64,
    /// Results of the method's model-global passes done so far: `(counts, sums)` per pass
    /// (in JSON: counts sparse, sums as f64 bit patterns, so they arrive exactly).
    #[serde(with = "global_wire")]
    pub global: Vec<PassStats>,
    /// Every input checkpoint as the coordinator opened it (sizes and header checksums), so a
    /// worker can tell whether it sees the same files or must stream them
    /// ([`crate::remote_input`]).
    #[serde(default)]
    pub inputs: Vec<crate::remote_input::InputCheckpoint>,
    /// Every adapter, statistics file and `init:` checkpoint the config names, as the
    /// coordinator resolved them (sizes and sha256), so a worker without them streams them.
    #[serde(default)]
    pub extras: Vec<crate::remote_input::ExtraInput>,
}

/// One model-global pass's result as a job spec carries it: `(counts, sums)`.
pub type PassStats = (Vec<u64>, Vec<f64>);

/// The JSON form of [`JobSpec::global`]: per pass, the counts' length and their nonzero
/// `(index, count)` pairs (histograms are mostly zeros), and the sums as f64 bit patterns
/// (JSON numbers need not parse back to the same f64).
mod global_wire {
    use super::PassStats;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Pass {
        len: usize,
        counts: Vec<(usize, u64)>,
        sums: Vec<u64>,
    }

    pub fn serialize<S: Serializer>(g: &[PassStats], s: S) -> Result<S::Ok, S::Error> {
        g.iter()
            .map(|(c, x)| Pass {
                len: c.len(),
                counts: c
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0)
                    .map(|(i, v)| (i, *v))
                    .collect(),
                sums: x.iter().map(|v| v.to_bits()).collect(),
            })
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PassStats>, D::Error> {
        use serde::de::Error;
        let passes = Vec::<Pass>::deserialize(d)?;
        passes
            .into_iter()
            .map(|p| {
                if p.len > 1 << 26 {
                    return Err(D::Error::custom("more counts than any method makes"));
                }
                let mut counts = vec![0u64; p.len];
                for (i, v) in p.counts {
                    *counts
                        .get_mut(i)
                        .ok_or_else(|| D::Error::custom("a count index past the length"))? = v;
                }
                Ok((counts, p.sums.into_iter().map(f64::from_bits).collect()))
            })
            .collect()
    }
}

/// One shard's work.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardWork {
    /// The job.
    pub job: JobSpec,
    /// Output tensors to merge, in layout order.
    pub tensors: Vec<String>,
    /// Set when this shard is one part of a split MaTS block (its only tensor): the part to
    /// solve, meeting the other parts of its gang in `Reduce`.
    #[serde(default)]
    pub part: Option<GangPart>,
    /// Set on the shards of a model-global pass: compute this pass's statistics of the
    /// tensors (given the job's results of the passes before it) instead of merging them.
    #[serde(default)]
    pub pass: Option<usize>,
}

/// The tensors (name, output bytes) of each shard, in shard id order.
pub type ShardTensors = Vec<Vec<(String, u64)>>;

/// One part of a MaTS block split into a gang (architecture.md, "Split blocks").
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct GangPart {
    /// The gang id (shared by the parts of the block).
    pub gang: u64,
    /// This part's index, `0..parts`.
    pub part: usize,
    /// Parts of the block.
    pub parts: usize,
}

/// Cut every tensor solved in several parts (MaTS `cg_parts` / `max_block_bytes`) out of the
/// shards: it becomes one shard per part, sharing a gang id, part k expecting the bytes of
/// its rows (contiguous in the tensor's layout); the other tensors keep their groups, cut
/// around it, in layout order. Depends only on the plan, never on the workers.
pub fn split_gangs(
    plan: &Plan,
    shards: &[Vec<(String, u64)>],
    memory_budget: u64,
) -> Result<(ShardTensors, Vec<Option<GangPart>>)> {
    let by_name: HashMap<&str, &amalgam_core::plan::TensorPlan> =
        plan.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out: Vec<Vec<(String, u64)>> = Vec::new();
    let mut gangs = Vec::new();
    let mut next_gang = 0u64;
    for shard in shards {
        let mut cur: Vec<(String, u64)> = Vec::new();
        for (name, len) in shard {
            let parts = match by_name.get(name.as_str()) {
                Some(t) if !t.copy_raw => {
                    let m = run::build_method(t).map_err(engine_err)?;
                    let job = run::job_for(t, m.as_ref(), plan.seed, memory_budget);
                    amalgam_core::methods::mats::block_part_rows(&t.method, &t.params, &job)
                        .map_err(engine_err)?
                        .filter(|(p, _)| p.len() > 1)
                        .map(|(p, cols)| (p, cols, job.numel()))
                }
                _ => None,
            };
            let Some((rows, cols, numel)) = parts else {
                cur.push((name.clone(), *len));
                continue;
            };
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                gangs.push(None);
            }
            let elem = len / numel.max(1) as u64;
            for (k, r) in rows.iter().enumerate() {
                out.push(vec![(name.clone(), (r.len() * cols) as u64 * elem)]);
                gangs.push(Some(GangPart {
                    gang: next_gang,
                    part: k,
                    parts: rows.len(),
                }));
            }
            next_gang += 1;
        }
        if !cur.is_empty() {
            out.push(cur);
            gangs.push(None);
        }
    }
    Ok((out, gangs))
}

/// Cut the layout's tensors, in order, into groups of about `shard_bytes` output bytes (a
/// tensor larger than that is a shard of its own).
pub fn partition(layout: &OutputLayout, shard_bytes: u64) -> Vec<Vec<(String, u64)>> {
    let mut shards = Vec::new();
    let mut cur: Vec<(String, u64)> = Vec::new();
    let mut bytes = 0u64;
    for t in layout.files.iter().flat_map(|f| f.tensors.iter()) {
        let len = t.byte_len().unwrap_or(0);
        if !cur.is_empty() && bytes + len > shard_bytes.max(1) {
            shards.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push((t.name.clone(), len));
        bytes += len;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

#[derive(Serialize, Deserialize)]
struct ResultHeader {
    tensors: Vec<(String, u64)>,
    logs: Vec<LogRecord>,
}

/// A shard's result: an 8-byte little-endian header length, a JSON header (tensor names and
/// byte lengths, solver log records), then the tensors' bytes back to back.
pub fn encode_result(tensors: &[(String, u64)], logs: &[LogRecord], bytes: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(&ResultHeader {
        tensors: tensors.to_vec(),
        logs: logs.to_vec(),
    })
    .expect("a result header serialises");
    let mut out = Vec::with_capacity(8 + header.len() + bytes.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(bytes);
    out
}

/// A decoded shard result: tensors (name, byte length), solver log records, data bytes.
pub type DecodedResult<'a> = (Vec<(String, u64)>, Vec<LogRecord>, &'a [u8]);

/// Split a result made by [`encode_result`]: tensors, logs and the data bytes.
pub fn decode_result(b: &[u8]) -> Result<DecodedResult<'_>> {
    let bad = |m: &str| ClusterError::Protocol(format!("malformed shard result: {m}"));
    if b.len() < 8 {
        return Err(bad("shorter than its header length"));
    }
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
    if b.len() - 8 < n {
        return Err(bad("header runs past the end"));
    }
    let h: ResultHeader =
        serde_json::from_slice(&b[8..8 + n]).map_err(|e| bad(&format!("header: {e}")))?;
    let data = &b[8 + n..];
    let total: u64 = h.tensors.iter().map(|t| t.1).sum();
    if total != data.len() as u64 {
        return Err(bad(&format!(
            "the header lists {total} bytes of tensors but {} follow",
            data.len()
        )));
    }
    Ok((h.tensors, h.logs, data))
}

/// A job ready to be served: the config, plan and inputs opened on the coordinator, the
/// shards cut.
pub struct PreparedJob {
    /// The parsed config.
    pub config: MergeConfig,
    /// The plan.
    pub plan: Plan,
    /// The opened inputs.
    pub inputs: Inputs,
    /// Directory relative paths resolve against.
    pub config_dir: Option<PathBuf>,
    /// Merge options (output directory, budget, ...).
    pub opts: MergeOptions,
    /// Output layout.
    pub layout: OutputLayout,
    /// What workers get.
    pub job: JobSpec,
    /// Tensors (name, bytes) of each shard, in shard id order.
    pub shards: Vec<Vec<(String, u64)>>,
}

impl std::fmt::Debug for PreparedJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedJob")
            .field("tensors", &self.plan.tensors.len())
            .field("shards", &self.shards.len())
            .finish()
    }
}

fn engine_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Host(e.to_string())
}

/// Open and plan `config` (its text `config_yaml`, relative paths against `config_dir`) and
/// cut shards of about `shard_bytes` (the model-global passes are left to the workers).
pub fn prepare_job(
    config: MergeConfig,
    config_yaml: String,
    config_dir: Option<PathBuf>,
    opts: MergeOptions,
    shard_bytes: u64,
) -> Result<PreparedJob> {
    let config_dir = match config_dir {
        Some(d) => Some(std::fs::canonicalize(&d).map_err(|e| ClusterError::io(&d, e))?),
        None => None,
    };
    let (inputs, plan) = open_and_plan(&config, config_dir.as_deref()).map_err(engine_err)?;
    amalgam_engine::inputs::check_output_dir(&config, config_dir.as_deref(), &opts.out_dir)
        .map_err(engine_err)?;
    // Every tensor's sources are checked here, before any worker starts.
    run::plan_checkpoints(&plan, &inputs).map_err(engine_err)?;
    run::resolve_chat_template(&config, &inputs).map_err(engine_err)?;
    run::check_whole_tensor_needs(&plan, opts.memory_budget).map_err(engine_err)?;
    let layout = run::output_layout(&config, &plan, opts.out_shard_size).map_err(engine_err)?;
    let shards = partition(&layout, shard_bytes);
    let job = JobSpec {
        config_yaml,
        config_dir: config_dir.clone(),
        memory_budget: opts.memory_budget,
        allow_nonfinite: opts.allow_nonfinite,
        out_shard_size: opts.out_shard_size,
        global: Vec::new(),
        inputs: crate::remote_input::manifest(&inputs)?,
        extras: crate::remote_input::extra_manifest(&config, config_dir.as_deref())?,
    };
    Ok(PreparedJob {
        config,
        plan,
        inputs,
        config_dir,
        opts,
        layout,
        job,
        shards,
    })
}

struct Drain {
    writer: Option<CheckpointWriter>,
    next: usize,
    ready: BTreeSet<usize>,
    /// Results held in memory (besides their spill file), so the drain need not read them
    /// back; at most [`HELD_BYTES`] in all.
    held: std::collections::BTreeMap<usize, Vec<u8>>,
    logs: Vec<LogRecord>,
    error: Option<String>,
}

/// The coordinator's side of a merge job (see the module docs).
pub struct MergeHost {
    /// What every shard's work starts from (the passes' results are added to it).
    job: JobSpec,
    /// Model-global passes run before the merge (0: the job has one phase, the merge).
    passes: usize,
    /// Tensors of each pre-pass shard (copied tensors left out; empty shards dropped).
    pass_units: Vec<Vec<String>>,
    /// Phases handed out so far (1 at the start).
    phase: Mutex<usize>,
    /// Results of the passes reduced so far.
    done: Mutex<Vec<GlobalStats>>,
    /// Largest pre-pass result accepted, bytes.
    largest_pass_result: std::sync::atomic::AtomicU64,
    /// The tensors of each merge shard (split MaTS blocks cut out).
    tensors: Vec<Vec<String>>,
    /// The gang part of each merge shard (split MaTS blocks), by merge shard index.
    gangs: Vec<Option<GangPart>>,
    expected: Vec<Vec<(String, u64)>>,
    spill: PathBuf,
    inputs: BTreeSet<PathBuf>,
    drain: Mutex<Drain>,
    accepted: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MergeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeHost")
            .field("shards", &self.expected.len())
            .field("passes", &self.passes)
            .field("spill", &self.spill)
            .finish()
    }
}

impl MergeHost {
    /// Create the checkpoint writer for `job` and the spill folder. With `resume`, verified
    /// results left in the spill folder by an earlier run are used; otherwise the folder is
    /// emptied first.
    pub fn new(job: &PreparedJob, resume: bool) -> Result<Self> {
        let out = &job.opts.out_dir;
        let writer = CheckpointWriter::create(out, job.layout.clone(), job.opts.overwrite)
            .map_err(engine_err)?;
        let (shards, gangs) = split_gangs(&job.plan, &job.shards, job.opts.memory_budget)?;
        let passes = run::global_pass_count(&job.plan).map_err(engine_err)?;
        let copied: BTreeSet<&str> = job
            .plan
            .tensors
            .iter()
            .filter(|t| t.copy_raw)
            .map(|t| t.name.as_str())
            .collect();
        let pass_units: Vec<Vec<String>> = if passes == 0 {
            Vec::new()
        } else {
            job.shards
                .iter()
                .map(|sh| {
                    sh.iter()
                        .filter(|t| !copied.contains(t.0.as_str()))
                        .map(|t| t.0.clone())
                        .collect::<Vec<_>>()
                })
                .filter(|u| !u.is_empty())
                .collect()
        };
        let mut host = MergeHost {
            job: job.job.clone(),
            passes,
            pass_units,
            phase: Mutex::new(1),
            done: Mutex::new(Vec::new()),
            largest_pass_result: Default::default(),
            tensors: shards
                .iter()
                .map(|t| t.iter().map(|t| t.0.clone()).collect())
                .collect(),
            gangs,
            expected: shards,
            spill: PathBuf::new(),
            inputs: BTreeSet::new(),
            drain: Mutex::new(Drain {
                writer: Some(writer),
                next: 0,
                ready: BTreeSet::new(),
                held: Default::default(),
                logs: Vec::new(),
                error: None,
            }),
            accepted: Default::default(),
        };
        // One folder per plan (named by the first phase's hash): results of another config
        // never mix with this one's.
        let all = out.join(SPILL_DIR);
        if !resume && all.exists() {
            std::fs::remove_dir_all(&all).map_err(|e| ClusterError::io(&all, e))?;
        }
        let spill = all.join(&crate::server::plan_hash(&host.shards())[..16]);
        let create = || std::fs::create_dir_all(&spill).map_err(|e| ClusterError::io(&spill, e));
        if resume {
            create()?;
        } else {
            // Nothing resumes from it: an interrupted run removes it (`amalgam_io::stage`).
            amalgam_io::stage(&all, create)?;
        }
        let inputs = job
            .inputs
            .checkpoints
            .values()
            .flat_map(|c| c.files().iter().map(|f| f.path.clone()))
            .chain(crate::remote_input::whole_file_keys(
                &job.job.inputs,
                &job.job.extras,
            ))
            .collect();
        if resume {
            let mut d = host.lock_drain()?;
            for i in 0..host.expected.len() {
                if spill_path(&spill, i).exists() {
                    d.ready.insert(i);
                }
            }
        }
        host.inputs = inputs;
        host.spill = spill;
        host.drain_ready()?;
        Ok(host)
    }

    /// Id of merge shard `i`: after every pre-pass shard.
    fn merge_id(&self, i: usize) -> ShardId {
        (self.passes * self.pass_units.len() + i) as ShardId
    }

    /// The shards of pass `pass`, each carrying the results of the passes before it.
    fn pass_specs(&self, pass: usize, done: &[GlobalStats]) -> Vec<ShardSpec> {
        let job = self.job_with(&done[..pass]);
        self.pass_units
            .iter()
            .enumerate()
            .map(|(s, tensors)| {
                let work = ShardWork {
                    job: job.clone(),
                    tensors: tensors.clone(),
                    part: None,
                    pass: Some(pass),
                };
                ShardSpec {
                    id: (pass * self.pass_units.len() + s) as ShardId,
                    est_bytes: 0,
                    gang: None,
                    spec: serde_json::to_vec(&work).expect("shard work serialises"),
                }
            })
            .collect()
    }

    /// The merge shards, carrying the results of every pass.
    fn merge_specs(&self, done: &[GlobalStats]) -> Vec<ShardSpec> {
        let job = self.job_with(done);
        self.tensors
            .iter()
            .zip(&self.gangs)
            .zip(&self.expected)
            .enumerate()
            .map(|(i, ((tensors, part), expected))| {
                let work = ShardWork {
                    job: job.clone(),
                    tensors: tensors.clone(),
                    part: *part,
                    pass: None,
                };
                ShardSpec {
                    id: self.merge_id(i),
                    est_bytes: expected.iter().map(|t| t.1).sum(),
                    gang: part.map(|p| p.gang),
                    spec: serde_json::to_vec(&work).expect("shard work serialises"),
                }
            })
            .collect()
    }

    fn job_with(&self, done: &[GlobalStats]) -> JobSpec {
        let mut job = self.job.clone();
        job.global = done
            .iter()
            .map(|g| (g.counts.clone(), g.sums.clone()))
            .collect();
        job
    }

    /// Reduce pass `pass` from its shards' stored results, in shard order.
    fn reduce_stored_pass(&self, pass: usize) -> Result<GlobalStats> {
        let mut results = Vec::with_capacity(self.pass_units.len());
        for (s, unit) in self.pass_units.iter().enumerate() {
            let path = pass_path(&self.spill, pass, s);
            let bytes = std::fs::read(&path).map_err(|e| {
                ClusterError::Host(format!(
                    "pass {pass} shard {s} is committed but its result is missing ({}); an \
                     earlier run's results were lost: start again with a new job id",
                    ClusterError::io(&path, e)
                ))
            })?;
            let r = crate::prepass::decode_pass_result(&bytes)?;
            if r.sums.len() != unit.len() {
                return Err(ClusterError::Host(format!(
                    "{}: {} tensors' results for a shard of {}",
                    path.display(),
                    r.sums.len(),
                    unit.len()
                )));
            }
            results.push(r);
        }
        Ok(crate::prepass::reduce_pass(results))
    }

    /// Shard ids this job uses, `0..id_count()` (its pre-pass shards, then its merge shards).
    pub fn id_count(&self) -> ShardId {
        self.merge_id(self.expected.len())
    }

    /// Model-global passes of this job (run on the workers before the merge).
    pub fn passes(&self) -> usize {
        self.passes
    }

    /// Shards of each model-global pass (ids `pass * pass_shards + k`; the merge shards come
    /// after them).
    pub fn pass_shards(&self) -> usize {
        self.pass_units.len()
    }

    /// Largest pre-pass result accepted so far, bytes (0 without a pre-pass).
    pub fn largest_pass_result(&self) -> u64 {
        self.largest_pass_result
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock_drain(&self) -> Result<std::sync::MutexGuard<'_, Drain>> {
        self.drain
            .lock()
            .map_err(|_| ClusterError::Host("drain lock poisoned".into()))
    }

    /// Copy every result that is next in shard order into the checkpoint.
    fn drain_ready(&self) -> Result<()> {
        let mut d = self.lock_drain()?;
        if let Some(e) = &d.error {
            return Err(ClusterError::Host(e.clone()));
        }
        while d.ready.contains(&d.next) {
            let i = d.next;
            let path = spill_path(&self.spill, i);
            let held = d.held.remove(&i);
            let res = (|| -> Result<Vec<LogRecord>> {
                let bytes = match held {
                    Some(b) => b,
                    None => std::fs::read(&path).map_err(|e| ClusterError::io(&path, e))?,
                };
                let (tensors, logs, data) = decode_result(&bytes)?;
                let writer = d.writer.as_mut().expect("the writer lives until finish");
                // Parts after the first of a split block continue its tensor.
                let continues = self
                    .gangs
                    .get(i)
                    .copied()
                    .flatten()
                    .is_some_and(|g| g.part > 0);
                let mut off = 0usize;
                for (name, len) in &tensors {
                    let len = *len as usize;
                    if !continues {
                        writer.begin_tensor(name).map_err(engine_err)?;
                    }
                    writer
                        .write_raw(&data[off..off + len])
                        .map_err(engine_err)?;
                    off += len;
                }
                Ok(logs)
            })();
            match res {
                Ok(logs) => {
                    d.logs.extend(logs);
                    d.ready.remove(&i);
                    d.next += 1;
                }
                Err(e) => {
                    // The checkpoint writer is in an unknown state: the job cannot finish.
                    let msg = format!("writing shard {i} into the checkpoint: {e}");
                    d.error = Some(msg.clone());
                    return Err(ClusterError::Host(msg));
                }
            }
        }
        Ok(())
    }

    /// After every shard is committed: the checkpoint writer (all tensors written) and the
    /// solver log records, in shard order.
    pub fn finish(&self) -> Result<(CheckpointWriter, Vec<LogRecord>)> {
        self.drain_ready()?;
        let mut d = self.lock_drain()?;
        if d.next != self.expected.len() {
            let missing: Vec<usize> = (d.next..self.expected.len())
                .filter(|i| !d.ready.contains(i))
                .collect();
            return Err(ClusterError::Host(format!(
                "shards {missing:?} are committed but their results are missing from {}; \
                 an earlier run's results were lost: start again with a new job id",
                self.spill.display()
            )));
        }
        let writer = d
            .writer
            .take()
            .ok_or_else(|| ClusterError::Host("the job was already finished".into()))?;
        Ok((writer, std::mem::take(&mut d.logs)))
    }

    /// Merge shard results this host has accepted (merged by this run's workers; pre-pass
    /// results not counted).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Remove the spill folder (after the checkpoint is finished).
    pub fn clean_up(&self) {
        let _ = std::fs::remove_dir_all(&self.spill);
        if let Some(all) = self.spill.parent() {
            // Only when no other plan's results are left in it.
            let _ = std::fs::remove_dir(all);
            amalgam_io::unstage(all);
        }
    }
}

fn spill_path(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("{shard:06}.bin"))
}

fn pass_path(dir: &Path, pass: usize, shard: usize) -> PathBuf {
    dir.join(format!("pass{pass}-{shard:06}.bin"))
}

/// Write `bytes` to `path` through a temporary file, fsynced, renamed into place.
fn write_spill(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial"));
    // Written around the page cache (O_DIRECT where possible) and fsynced: the copy into
    // fresh cache pages was most of the coordinator's CPU time.
    let mut sink = amalgam_io::safetensors::sink::FileSink::create(&tmp).map_err(engine_err)?;
    sink.write_all(bytes).map_err(engine_err)?;
    sink.finish().map_err(engine_err)?;
    std::fs::rename(&tmp, path).map_err(|e| ClusterError::io(path, e))
}

impl MergeHost {
    /// Store pre-pass shard `s` of pass `pass` (checked to decode, one sums entry per tensor).
    fn accept_pass(&self, pass: usize, s: usize, bytes: &[u8]) -> Result<()> {
        let r = crate::prepass::decode_pass_result(bytes)?;
        if r.sums.len() != self.pass_units[s].len() {
            return Err(ClusterError::Host(format!(
                "pass {pass} shard {s}: results for {} tensors, the shard has {}",
                r.sums.len(),
                self.pass_units[s].len()
            )));
        }
        write_spill(&self.spill, &pass_path(&self.spill, pass, s), bytes)?;
        self.largest_pass_result
            .fetch_max(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl JobHost for MergeHost {
    fn shards(&self) -> Vec<ShardSpec> {
        if self.passes > 0 {
            self.pass_specs(0, &[])
        } else {
            self.merge_specs(&[])
        }
    }

    fn phased(&self) -> bool {
        self.passes > 0
    }

    fn next_phase(&self) -> Result<Option<Vec<ShardSpec>>> {
        let mut phase = lock(&self.phase);
        // Phases 0..passes are the passes, phase `passes` the merge.
        let finished = *phase - 1;
        if finished >= self.passes {
            return Ok(None);
        }
        let stats = self.reduce_stored_pass(finished)?;
        let mut done = lock(&self.done);
        done.truncate(finished);
        done.push(stats);
        *phase += 1;
        tracing::info!(pass = finished, "model-global pass reduced");
        Ok(Some(if finished + 1 < self.passes {
            self.pass_specs(finished + 1, &done)
        } else {
            self.merge_specs(&done)
        }))
    }

    fn read_input(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let path = PathBuf::from(key);
        // Workers name inputs by their canonical paths (remote_input::manifest).
        let known = self.inputs.contains(&path)
            || self
                .inputs
                .iter()
                .any(|p| std::fs::canonicalize(p).is_ok_and(|c| c == path));
        if !known {
            return Err(ClusterError::Host(format!(
                "{key} is not an input file of this job"
            )));
        }
        let f = std::fs::File::open(&path).map_err(|e| ClusterError::io(&path, e))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| ClusterError::io(&path, e))?;
        crate::metrics::INPUT_BYTES_STREAMED.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        Ok(buf)
    }

    fn accept(&self, shard_id: ShardId, bytes: Vec<u8>) -> Result<()> {
        let pre = self.merge_id(0);
        if shard_id < pre {
            let n = self.pass_units.len() as u64;
            return self.accept_pass((shard_id / n) as usize, (shard_id % n) as usize, &bytes);
        }
        let i = (shard_id - pre) as usize;
        let expected = self
            .expected
            .get(i)
            .ok_or_else(|| ClusterError::Host(format!("no shard {shard_id} in this job")))?;
        let (tensors, _, _) = decode_result(&bytes)?;
        if &tensors != expected {
            return Err(ClusterError::Host(format!(
                "shard {shard_id}: the result holds tensors {:?} but the layout expects {:?}",
                tensors.iter().map(|t| (&t.0, t.1)).collect::<Vec<_>>(),
                expected.iter().map(|t| (&t.0, t.1)).collect::<Vec<_>>()
            )));
        }
        {
            let d = self.lock_drain()?;
            if i < d.next {
                // Already in the checkpoint (a repeated commit): the bytes are the same.
                return Ok(());
            }
        }
        write_spill(&self.spill, &spill_path(&self.spill, i), &bytes)?;
        self.accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut d = self.lock_drain()?;
            let held: usize = d.held.values().map(Vec::len).sum();
            if held + bytes.len() <= HELD_BYTES {
                d.held.insert(i, bytes);
            }
            d.ready.insert(i);
        }
        self.drain_ready()
    }
}

/// Solve one part of a split MaTS block (the shard's only tensor), meeting the other parts of
/// its gang through `Reduce` (keyed by lease and tensor, so a re-run never meets parts of a
/// dead attempt; one round per call), and return the bytes of its rows in the output dtype.
/// Part 0 carries the block's solver log record.
fn execute_part(
    job: &WorkerJob,
    ckpts: &[&amalgam_io::Checkpoint],
    extras: &run::ReadExtras<'_>,
    work: &ShardWork,
    part: GangPart,
    inputs: &InputClient,
) -> Result<Vec<u8>> {
    let exec = |e: &dyn std::fmt::Display| ClusterError::Executor(e.to_string());
    let [name] = work.tensors.as_slice() else {
        return Err(ClusterError::Executor(format!(
            "a gang part holds one tensor, this one {:?}",
            work.tensors
        )));
    };
    let t = job.tensor(name)?;
    let method = run::build_method(t).map_err(|e| exec(&e))?;
    let tj = run::job_for(t, method.as_ref(), job.plan.seed, job.opts.memory_budget);
    let m = amalgam_core::methods::mats::Mats::from_params(&t.params, tj.n_models, tj.has_base)
        .map_err(|e| exec(&e))?;
    let mut reader = extras.reader(t, ckpts, job.opts.allow_nonfinite);
    // On a GPU worker the part is solved on the device (its partials still meet the other
    // parts' through `Reduce`, or through NCCL when the worker was asked for it).
    if let amalgam_engine::device::Device::Accelerator(dev) = &job.opts.device {
        reader = reader.with_device_solver(dev.device_solver());
    }
    let key = format!("mats/{}/{}", inputs.lease_id(), t.name);
    let mut round = 0u64;
    let mut reduce = |v: &[f64]| -> std::result::Result<Vec<f64>, amalgam_core::MergeError> {
        tracing::info!(
            key = %key,
            round,
            part = part.part,
            parts = part.parts,
            values = v.len(),
            "Reduce"
        );
        let r = inputs
            .reduce(&key, round, part.part as u32, part.parts as u32, v.to_vec())
            .map_err(|e| amalgam_core::MergeError::Read(e.to_string()));
        round += 1;
        r
    };
    let (_, res) = m
        .solve_part(&tj, &reader, part.part, &mut reduce)
        .map_err(|e| exec(&e))?;
    let mut rec = m.log_record(&tj, &res).map_err(|e| exec(&e))?;
    rec.insert("method".into(), t.method.clone().into());
    let dtype = job
        .layout
        .files
        .iter()
        .flat_map(|f| f.tensors.iter())
        .find(|o| o.name == *name)
        .map(|o| o.dtype.clone())
        .ok_or_else(|| ClusterError::Executor(format!("tensor \"{name}\" is not in the layout")))?;
    let values: Vec<f32> = res.x.iter().map(|v| *v as f32).collect();
    let mut bytes = Vec::new();
    if !amalgam_io::encode_f32(&dtype, &values, &mut bytes) {
        return Err(ClusterError::Executor(format!(
            "cannot write dtype {dtype} from f32"
        )));
    }
    let logs = if part.part == 0 {
        vec![rec]
    } else {
        Vec::new()
    };
    Ok(encode_result(
        &[(name.clone(), bytes.len() as u64)],
        &logs,
        &bytes,
    ))
}

/// Pass `pass` of the model-global pre-pass over the shard's tensors (see [`crate::prepass`]).
fn execute_pass(
    job: &WorkerJob,
    ckpts: &[&amalgam_io::Checkpoint],
    extras: &run::ReadExtras<'_>,
    work: &ShardWork,
    pass: usize,
) -> Result<Vec<u8>> {
    if job.global.len() != pass {
        return Err(ClusterError::Executor(format!(
            "a pass-{pass} shard needs the results of {pass} earlier passes, the job has {}",
            job.global.len()
        )));
    }
    let mut r = crate::prepass::PassResult::default();
    for name in &work.tensors {
        let t = job.tensor(name)?;
        let stats = run::global_pass_tensor(
            t,
            pass,
            &job.global,
            job.plan.seed,
            ckpts,
            &job.opts,
            extras,
        )
        .map_err(|e| ClusterError::Executor(e.to_string()))?;
        r.push(stats);
    }
    Ok(crate::prepass::encode_pass_result(&r))
}

struct WorkerJob {
    plan: Plan,
    inputs: Inputs,
    layout: OutputLayout,
    global: Vec<GlobalStats>,
    opts: MergeOptions,
    index: HashMap<String, usize>,
    /// Inputs streamed from the coordinator (see [`crate::remote_input`]).
    streamed: Option<crate::remote_input::StreamedInputs>,
}

impl WorkerJob {
    /// The planned tensor `name` (an error if this worker's plan lacks it).
    fn tensor(&self, name: &str) -> Result<&amalgam_core::plan::TensorPlan> {
        let i = *self.index.get(name).ok_or_else(|| {
            ClusterError::Executor(format!("tensor \"{name}\" is not in this worker's plan"))
        })?;
        Ok(&self.plan.tensors[i])
    }
}

/// The worker's side of a merge job: merges a shard's tensors (see the module docs). The last
/// job opened is kept, so consecutive shards of one job plan once.
#[derive(Default)]
pub struct MergeExecutor {
    cache: Mutex<Option<(String, Arc<WorkerJob>)>>,
    roots: Option<AllowedRoots>,
    device: amalgam_engine::device::Device,
    stream: crate::remote_input::StreamInputs,
    streamed_bytes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MergeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeExecutor").finish()
    }
}

impl MergeExecutor {
    /// An executor that opens only files under `roots` (compared after canonicalisation) and
    /// refuses a job that names anything else; `None`: no restriction.
    pub fn with_roots(roots: Option<AllowedRoots>) -> Self {
        MergeExecutor {
            cache: Mutex::default(),
            roots,
            device: Default::default(),
            stream: Default::default(),
            streamed_bytes: Default::default(),
        }
    }

    /// Read inputs under `mode` (see [`crate::remote_input`] for the rule).
    pub fn with_stream_inputs(mut self, mode: crate::remote_input::StreamInputs) -> Self {
        self.stream = mode;
        self
    }

    /// Input bytes this executor has streamed from coordinators (headers included).
    pub fn input_bytes_streamed(&self) -> u64 {
        self.streamed_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Merge on `device` (a GPU) the tensors whose methods have a device plan.
    pub fn with_device(mut self, device: amalgam_engine::device::Device) -> Self {
        self.device = device;
        self
    }

    /// Refuse the job unless every file it reads lies under the allowed roots.
    fn check_paths(&self, inputs: &Inputs) -> Result<()> {
        let Some(roots) = &self.roots else {
            return Ok(());
        };
        // The config's own directory is not read (the config travels in the job spec); only
        // the files the merge opens are checked.
        for c in inputs.checkpoints.values() {
            for f in c.files() {
                roots.check(&f.path)?;
            }
        }
        for s in inputs.stats.values() {
            roots.check(s.path())?;
        }
        Ok(())
    }

    /// Open the config's paths as they are (`--stream-inputs never`, or a job without an
    /// input list), refusing any outside the roots.
    fn open_local(&self, config: &MergeConfig, job: &JobSpec) -> Result<(Inputs, Plan)> {
        // Refuse before any header outside the roots is opened; then check the files the
        // checkpoints turned out to hold (an index's shards, which could point elsewhere).
        if let Some(roots) = &self.roots {
            let paths = amalgam_engine::inputs::referenced_paths(config, job.config_dir.as_deref())
                .map_err(|e| ClusterError::Executor(e.to_string()))?;
            roots.check_all(paths)?;
        }
        let (inputs, plan) = open_and_plan(config, job.config_dir.as_deref())
            .map_err(|e| ClusterError::Executor(e.to_string()))?;
        self.check_paths(&inputs)?;
        Ok((inputs, plan))
    }

    fn open(&self, job: &JobSpec, client: Option<&InputClient>) -> Result<Arc<WorkerJob>> {
        let key = hex::encode(Sha256::digest(
            serde_json::to_vec(job).expect("job spec serialises"),
        ));
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| ClusterError::Executor("job cache lock poisoned".into()))?;
        if let Some((k, j)) = cache.as_ref() {
            if *k == key {
                return Ok(Arc::clone(j));
            }
        }
        let (config, _warnings) = parse_config(&job.config_yaml, false)
            .map_err(|e| ClusterError::Executor(format!("the job's config: {e}")))?;
        let (inputs, plan, streamed) =
            if self.stream != crate::remote_input::StreamInputs::Never && !job.inputs.is_empty() {
                // Each checkpoint file read locally or streamed (remote_input's rule); every
                // local file is checked against the roots there.
                let o = crate::remote_input::open_and_plan(
                    &config,
                    job.config_dir.as_deref(),
                    &job.inputs,
                    &job.extras,
                    self.roots.as_ref(),
                    self.stream,
                    client,
                )?;
                (o.inputs, o.plan, o.streamed)
            } else {
                let (inputs, plan) = self.open_local(&config, job)?;
                (inputs, plan, None)
            };
        if let Some(s) = &streamed {
            self.streamed_bytes
                .fetch_add(s.bytes_streamed(), std::sync::atomic::Ordering::Relaxed);
        }
        let layout = run::output_layout(&config, &plan, job.out_shard_size)
            .map_err(|e| ClusterError::Executor(e.to_string()))?;
        let index = plan
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let opts = MergeOptions {
            out_dir: PathBuf::new(),
            memory_budget: job.memory_budget,
            out_shard_size: job.out_shard_size,
            overwrite: false,
            allow_nonfinite: job.allow_nonfinite,
            device: self.device.clone(),
        };
        let global = job
            .global
            .iter()
            .map(|(c, s)| GlobalStats {
                counts: c.clone(),
                sums: s.clone(),
            })
            .collect();
        let j = Arc::new(WorkerJob {
            plan,
            inputs,
            layout,
            global,
            opts,
            index,
            streamed,
        });
        *cache = Some((key, Arc::clone(&j)));
        Ok(j)
    }
}

impl ShardExecutor for MergeExecutor {
    fn execute(&self, spec: &[u8], inputs: &InputClient) -> Result<Vec<u8>> {
        let work: ShardWork = serde_json::from_slice(spec)
            .map_err(|e| ClusterError::Executor(format!("malformed shard spec: {e}")))?;
        let job = self.open(&work.job, Some(inputs))?;
        if let Some(s) = &job.streamed {
            // Fetch the shard's streamed input ranges before merging (few large reads).
            let tensors = work.tensors.iter().filter_map(|n| job.index.get(n));
            let n = s.prefetch(
                &job.plan,
                &job.inputs,
                tensors.map(|&i| &job.plan.tensors[i]),
                inputs,
            )?;
            self.streamed_bytes
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(bytes = n, "input bytes streamed from the coordinator");
        }
        let ckpts = run::plan_checkpoints(&job.plan, &job.inputs)
            .map_err(|e| ClusterError::Executor(e.to_string()))?;
        let extras = run::read_extras(&job.plan, &job.inputs);
        if let Some(pass) = work.pass {
            return execute_pass(&job, &ckpts, &extras, &work, pass);
        }
        if let Some(part) = work.part {
            return execute_part(&job, &ckpts, &extras, &work, part, inputs);
        }
        let mut out = ShardBytes::new(&job.layout);
        let mut logs = Vec::new();
        for name in &work.tensors {
            let t = job.tensor(name)?;
            logs.extend(
                run::merge_tensor(
                    t,
                    job.plan.seed,
                    &job.global,
                    &ckpts,
                    &job.opts,
                    &extras,
                    &mut out,
                )
                .map_err(|e| ClusterError::Executor(e.to_string()))?,
            );
        }
        let (bytes, tensors) = out
            .finish()
            .map_err(|e| ClusterError::Executor(e.to_string()))?;
        let tensors: Vec<(String, u64)> = tensors.into_iter().map(|t| (t.name, t.len)).collect();
        Ok(encode_result(&tensors, &logs, &bytes))
    }
}

/// A random hex token for an embedded job's loopback server.
pub fn random_token() -> String {
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(now.as_nanos().to_le_bytes());
    let local = 0u8;
    h.update((std::ptr::addr_of!(local) as usize).to_le_bytes());
    hex::encode(h.finalize())
}

/// What [`finish_job`] wrote.
#[derive(Debug, Clone)]
pub struct JobSummary {
    /// Checkpoint files.
    pub files: Vec<PathBuf>,
    /// Tensor bytes written.
    pub total_bytes: u64,
    /// Config, tokenizer, card and log files.
    pub aux_files: Vec<PathBuf>,
    /// Shards in the job.
    pub shards: usize,
}

/// Finish the checkpoint of a job whose shards are all committed: rename the files into place,
/// write the auxiliary files, remove the spill folder.
pub fn finish_job(job: &PreparedJob, host: &MergeHost) -> Result<JobSummary> {
    let (writer, logs) = host.finish()?;
    let (files, total_bytes, aux_files) = run::finish_outputs(
        &job.config,
        &job.plan,
        &job.inputs,
        job.config_dir.as_deref(),
        &job.opts.out_dir,
        writer,
        &logs,
    )
    .map_err(engine_err)?;
    host.clean_up();
    Ok(JobSummary {
        files,
        total_bytes,
        aux_files,
        shards: job.shards.len(),
    })
}

/// Run `job` with `workers` worker tasks in this process, over gRPC on a loopback port with a
/// random token: the same code paths as a cluster, without etcd.
pub async fn run_embedded(job: PreparedJob, workers: usize) -> Result<JobSummary> {
    let job = Arc::new(job);
    let j = Arc::clone(&job);
    let host = Arc::new(
        tokio::task::spawn_blocking(move || MergeHost::new(&j, false))
            .await
            .map_err(|e| ClusterError::Host(format!("setup task failed: {e}")))??,
    );
    let token = random_token();
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("a valid address");
    let opts = ServerOptions {
        job_id: "embedded".into(),
        token: Some(token.clone()),
        lease_ttl: Duration::from_secs(120),
        heartbeat_interval: Duration::from_secs(5),
        ..ServerOptions::default()
    };
    let server = serve(Arc::clone(&host), addr, opts).await?;
    let stream = match std::env::var(crate::remote_input::ENV_STREAM_INPUTS) {
        Ok(v) => v.parse().map_err(|e| {
            ClusterError::Config(format!("{}: {e}", crate::remote_input::ENV_STREAM_INPUTS))
        })?,
        Err(_) => crate::remote_input::StreamInputs::default(),
    };
    let exec = Arc::new(MergeExecutor::default().with_stream_inputs(stream));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..workers.max(1) {
        let wo = WorkerOptions {
            url: server.url(),
            token: Some(token.clone()),
            name: format!("embedded-{i}"),
            reconnect_timeout: Duration::from_secs(5),
            ..WorkerOptions::default()
        };
        let e = Arc::clone(&exec);
        tasks.spawn(async move { run_worker(wo, e).await });
    }
    let done = server.done();
    tokio::pin!(done);
    let mut first_err = None;
    loop {
        tokio::select! {
            _ = &mut done => break,
            r = tasks.join_next() => match r {
                None => break,
                Some(Ok(Ok(_))) => {}
                Some(Ok(Err(e))) => { first_err.get_or_insert(e); }
                Some(Err(e)) => {
                    first_err.get_or_insert(ClusterError::Executor(format!("worker task: {e}")));
                }
            },
        }
    }
    let complete = server.status().done;
    let failure = server.failure();
    // Workers see `done` on their next call and exit.
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            first_err.get_or_insert(e);
        }
    }
    server.shutdown(Duration::from_secs(2)).await?;
    if let Some(f) = failure {
        return Err(ClusterError::Host(f));
    }
    if !complete {
        return Err(first_err.unwrap_or_else(|| {
            ClusterError::Host("every worker stopped before the job was done".into())
        }));
    }
    let (j, h) = (Arc::clone(&job), Arc::clone(&host));
    tokio::task::spawn_blocking(move || finish_job(&j, &h))
        .await
        .map_err(|e| ClusterError::Host(format!("finish task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job naming a model outside the roots is refused before its header is read: the model
    /// here is not even a valid checkpoint, and the error is the refusal, not a parse error.
    #[test]
    fn roots_are_checked_before_any_header_is_opened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (inside, outside) = (tmp.path().join("data"), tmp.path().join("data2"));
        std::fs::create_dir_all(&inside).expect("dir");
        std::fs::create_dir_all(&outside).expect("dir");
        std::fs::write(outside.join("bad.safetensors"), b"not a checkpoint").expect("write");
        let roots = AllowedRoots::new([&inside]).expect("roots");
        let exec = MergeExecutor::with_roots(Some(roots));
        let job = JobSpec {
            config_yaml: format!(
                "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
                outside.join("bad.safetensors").display()
            ),
            config_dir: None,
            memory_budget: 1 << 30,
            allow_nonfinite: false,
            out_shard_size: 1 << 30,
            global: Vec::new(),
            inputs: Vec::new(),
            extras: Vec::new(),
        };
        let err = exec
            .open(&job, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("outside the allowed roots") && err.contains("data2"),
            "refused before opening: {err}"
        );
    }

    #[test]
    fn global_results_travel_exactly_and_sparsely() {
        let mut counts = vec![0u64; 1 << 16];
        counts[7] = 3;
        counts[65535] = u64::MAX;
        let sums = vec![
            0.1 + 0.2,
            -1.0 / 3.0,
            f64::MIN_POSITIVE / 7.0,
            1.797_693_134_862_315_7e308,
            -0.0,
        ];
        let job = JobSpec {
            config_yaml: String::new(),
            config_dir: None,
            memory_budget: 1,
            allow_nonfinite: false,
            out_shard_size: 1,
            global: vec![(counts, sums), (Vec::new(), Vec::new())],
            inputs: Vec::new(),
            extras: Vec::new(),
        };
        let text = serde_json::to_vec(&job).unwrap();
        assert!(text.len() < 400, "{} bytes", text.len());
        let back: JobSpec = serde_json::from_slice(&text).unwrap();
        assert_eq!(back.global[0].0, job.global[0].0);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.global[0].1), bits(&job.global[0].1));
        assert_eq!(back.global[1], job.global[1]);
        let bad = String::from_utf8(text)
            .unwrap()
            .replace("[65535,", "[65536,");
        assert!(serde_json::from_str::<JobSpec>(&bad).is_err());
    }

    #[test]
    fn results_round_trip_and_reject_bad_lengths() {
        let tensors = vec![("a".to_string(), 3u64), ("b".to_string(), 2)];
        let mut log = LogRecord::new();
        log.insert("iters".into(), 4.into());
        let r = encode_result(&tensors, std::slice::from_ref(&log), b"abcde");
        let (t, l, d) = decode_result(&r).expect("decodes");
        assert_eq!(t, tensors);
        assert_eq!(l, vec![log]);
        assert_eq!(d, b"abcde");
        let short = encode_result(&tensors, &[], b"abcd");
        assert!(decode_result(&short).is_err());
        assert!(decode_result(&r[..5]).is_err());
    }
}
