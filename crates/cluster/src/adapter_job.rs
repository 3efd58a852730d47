//! Adapter work on the cluster (issue 8): the coordinator's [`AdapterHost`] and the workers'
//! [`AdapterExecutor`].
//!
//! A `merge-adapters` or `extract-lora` job is opened and planned on the coordinator
//! ([`amalgam_engine::adapter_merge::AdapterTask`]): every input checked, one unit per module,
//! units cut into shards by [`partition`] (input bytes only, never the number of workers), and
//! the method's model-global pass (KnOTS's trim thresholds and majority sign) run once. Each
//! shard spec (`AdapterShard`) carries the job with that pass's result; a worker opens the same
//! job (once, then kept for every shard of it), runs [`AdapterTask::run_unit`] on its units
//! exactly as a single process does, and returns the tensors (`AdapterResult`). The coordinator
//! checks each unit's keys and lengths, keeps the results, and writes the adapter in unit order
//! ([`AdapterHost::write`]): byte-identical to `amalgam merge-adapters` in one process. Shards
//! ride the merge's leases (heartbeats, expiry, re-lease after a lost worker).
//!
//! Every path of the job must be readable at the same path on every worker (adapters are not
//! streamed), and a worker with `--allow-root` refuses a job naming a path outside its roots.

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use amalgam_engine::adapter_merge::job::check_unit_output;
use amalgam_engine::adapter_merge::{
    partition, AdapterJobSpec, AdapterSummary, AdapterTask, AdapterUnit, OutTensor,
};
use amalgam_engine::run::Progress;
use prost::Message;

use crate::error::{ClusterError, Result};
use crate::lock;
use crate::pb;
use crate::roots::AllowedRoots;
use crate::scheduler::{ShardId, ShardSpec};
use crate::server::JobHost;
use crate::worker::{InputClient, ShardExecutor};

/// The coordinator side of an adapter job: the planned task, its shards, the gathered units.
pub struct AdapterHost {
    task: AdapterTask,
    job_json: String,
    shards: Vec<Range<usize>>,
    results: Mutex<Vec<Option<Vec<OutTensor>>>>,
}

impl std::fmt::Debug for AdapterHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterHost")
            .field("method", &self.task.method())
            .field("units", &self.task.units().len())
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl AdapterHost {
    /// Opens `spec`, runs its model-global pass here (reporting to `progress`) and cuts its
    /// units into shards of about `shard_bytes` input bytes.
    pub fn new(
        spec: &AdapterJobSpec,
        shard_bytes: u64,
        progress: &dyn Progress,
    ) -> Result<AdapterHost> {
        let mut task = AdapterTask::open(spec).map_err(|e| ClusterError::Host(e.to_string()))?;
        task.run_global(progress)
            .map_err(|e| ClusterError::Host(e.to_string()))?;
        let shards = partition(task.units(), shard_bytes);
        let results = Mutex::new(vec![None; task.units().len()]);
        Ok(AdapterHost {
            job_json: task.spec().to_json(),
            task,
            shards,
            results,
        })
    }

    /// The job's units.
    pub fn units(&self) -> &[AdapterUnit] {
        self.task.units()
    }

    /// Units done so far and the total.
    pub fn progress(&self) -> (usize, usize) {
        let r = lock(&self.results);
        (r.iter().filter(|u| u.is_some()).count(), r.len())
    }

    /// Writes the adapter into `out` from every unit's tensors (an error if a unit is missing).
    pub fn write(&self, out: &Path, overwrite: bool) -> Result<AdapterSummary> {
        let r = lock(&self.results);
        let mut tensors = Vec::new();
        for (u, t) in r.iter().enumerate() {
            match t {
                Some(t) => tensors.extend(t.iter().cloned()),
                None => {
                    return Err(ClusterError::Host(format!(
                        "module `{}` was never merged",
                        self.task.units()[u].name
                    )))
                }
            }
        }
        self.task
            .write(&tensors, out, overwrite)
            .map_err(|e| ClusterError::Host(e.to_string()))
    }
}

impl JobHost for AdapterHost {
    fn shards(&self) -> Vec<ShardSpec> {
        self.shards
            .iter()
            .enumerate()
            .map(|(id, s)| ShardSpec {
                id: id as ShardId,
                est_bytes: self.task.units()[s.clone()]
                    .iter()
                    .map(|u| u.in_bytes)
                    .sum(),
                gang: None,
                spec: pb::AdapterShard {
                    job_json: self.job_json.clone(),
                    start: s.start as u64,
                    end: s.end as u64,
                }
                .encode_to_vec(),
            })
            .collect()
    }

    fn read_input(&self, key: &str, _offset: u64, _len: u64) -> Result<Vec<u8>> {
        Err(ClusterError::Host(format!(
            "adapter jobs do not stream inputs (asked for {key}): adapters, statistics files \
             and checkpoints must be readable at the same path on every worker"
        )))
    }

    fn accept(&self, shard_id: ShardId, bytes: Vec<u8>) -> Result<()> {
        let shard = self
            .shards
            .get(shard_id as usize)
            .ok_or_else(|| ClusterError::Host(format!("unknown adapter shard {shard_id}")))?;
        let result = pb::AdapterResult::decode(bytes.as_slice())
            .map_err(|e| ClusterError::Protocol(format!("malformed adapter result: {e}")))?;
        if result.start != shard.start as u64 || result.units.len() != shard.len() {
            return Err(ClusterError::Protocol(format!(
                "adapter shard {shard_id}: result holds {} units from {}, expected units {:?}",
                result.units.len(),
                result.start,
                shard
            )));
        }
        let mut checked = Vec::with_capacity(shard.len());
        for (u, unit) in shard.clone().zip(result.units) {
            let tensors = decode_unit(unit)?;
            check_unit_output(&self.task.units()[u], &tensors)
                .map_err(|e| ClusterError::Protocol(format!("adapter shard {shard_id}: {e}")))?;
            checked.push((u, tensors));
        }
        let mut r = lock(&self.results);
        for (u, t) in checked {
            r[u] = Some(t);
        }
        Ok(())
    }

    fn job_kind(&self) -> pb::JobKind {
        pb::JobKind::Adapter
    }
}

fn decode_unit(unit: pb::AdapterUnitResult) -> Result<Vec<OutTensor>> {
    unit.tensors
        .into_iter()
        .map(|t| {
            if t.data.len() % 4 != 0 {
                return Err(ClusterError::Protocol(format!(
                    "tensor `{}`: {} bytes is not a whole number of float32 values",
                    t.key,
                    t.data.len()
                )));
            }
            let values = t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = t.shape.iter().map(|&d| d as usize).collect();
            Ok((t.key, shape, values))
        })
        .collect()
}

fn encode_unit(tensors: Vec<OutTensor>) -> pb::AdapterUnitResult {
    pb::AdapterUnitResult {
        tensors: tensors
            .into_iter()
            .map(|(key, shape, values)| pb::AdapterTensor {
                key,
                shape: shape.iter().map(|&d| d as u64).collect(),
                data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            })
            .collect(),
    }
}

/// The worker side: opens a job once (kept for its later shards) and runs the units of each
/// leased shard.
pub struct AdapterExecutor {
    roots: Option<AllowedRoots>,
    opened: Mutex<Option<(String, AdapterTask)>>,
}

impl std::fmt::Debug for AdapterExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterExecutor")
            .field("opened", &lock(&self.opened).is_some())
            .finish()
    }
}

impl AdapterExecutor {
    /// An executor reading only under `roots` when given.
    pub fn new(roots: Option<AllowedRoots>) -> AdapterExecutor {
        AdapterExecutor {
            roots,
            opened: Mutex::new(None),
        }
    }

    /// Runs one shard spec (an encoded `AdapterShard`) into an encoded `AdapterResult`;
    /// `cancelled` is polled between units.
    pub fn run_spec(&self, spec: &[u8], cancelled: &dyn Fn() -> bool) -> Result<Vec<u8>> {
        let shard = pb::AdapterShard::decode(spec)
            .map_err(|e| ClusterError::Executor(format!("malformed adapter shard: {e}")))?;
        let mut opened = lock(&self.opened);
        if opened.as_ref().map(|(j, _)| j.as_str()) != Some(shard.job_json.as_str()) {
            *opened = None;
            let job = AdapterJobSpec::from_json(&shard.job_json)
                .map_err(|e| ClusterError::Executor(e.to_string()))?;
            if let Some(roots) = &self.roots {
                roots.check_all(job.paths())?;
            }
            let task =
                AdapterTask::open(&job).map_err(|e| ClusterError::Executor(e.to_string()))?;
            *opened = Some((shard.job_json.clone(), task));
        }
        let (_, task) = opened.as_ref().expect("opened just above");
        let (start, end) = (shard.start as usize, shard.end as usize);
        if start > end || end > task.units().len() {
            return Err(ClusterError::Executor(format!(
                "adapter shard units {start}..{end} outside the job's {} units",
                task.units().len()
            )));
        }
        let mut out = pb::AdapterResult {
            start: shard.start,
            units: Vec::with_capacity(end - start),
        };
        for u in start..end {
            if cancelled() {
                return Err(ClusterError::Executor("lease lost; shard abandoned".into()));
            }
            let tensors = task.run_unit(u).map_err(|e| {
                ClusterError::Executor(format!("module `{}`: {e}", task.units()[u].name))
            })?;
            out.units.push(encode_unit(tensors));
        }
        Ok(out.encode_to_vec())
    }
}

impl ShardExecutor for AdapterExecutor {
    fn execute(&self, spec: &[u8], inputs: &InputClient) -> Result<Vec<u8>> {
        self.run_spec(spec, &|| inputs.is_cancelled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amalgam_engine::run::NoProgress;
    use amalgam_io::peft::{ia3_key, write_adapter};
    use amalgam_io::{AdapterConfig, Ia3Config, TargetModules};

    const K: &str = "model.layers.0.self_attn.k_proj";
    const V: &str = "model.layers.0.self_attn.v_proj";

    fn ia3(dir: &Path, k: [f32; 3], v: [f32; 2]) {
        let cfg = Ia3Config::new(
            TargetModules::List(vec!["k_proj".into(), "v_proj".into()]),
            TargetModules::List(vec![]),
        );
        let t = [
            (ia3_key(K), vec![3, 1], &k[..]),
            (ia3_key(V), vec![2, 1], &v[..]),
        ];
        let refs: Vec<(String, Vec<usize>, &[f32])> = t
            .iter()
            .map(|(k, s, v)| (k.clone(), s.clone(), *v))
            .collect();
        write_adapter(dir, &AdapterConfig::Ia3(cfg), &refs, false).unwrap();
    }

    /// One shard per module, results accepted in reverse order, checked and written in module
    /// order: PEFT's (IA)³ `linear` is the weighted sum, worked by hand here.
    #[test]
    fn adapter_shards_round_trip_and_bad_results_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        ia3(&d.join("a"), [1.0, 2.0, 0.5], [1.5, 1.0]);
        ia3(&d.join("b"), [3.0, 0.0, 1.5], [0.5, 2.0]);
        let yaml = "adapters: [{path: a, weight: 0.5}, {path: b, weight: 0.25}]\n";
        let spec = AdapterJobSpec::merge(yaml, Some(d)).unwrap();
        let host = AdapterHost::new(&spec, 1, &NoProgress).unwrap();
        let shards = host.shards();
        assert_eq!(shards.len(), 2);
        let exec = AdapterExecutor::new(None);
        let results: Vec<Vec<u8>> = shards
            .iter()
            .map(|s| exec.run_spec(&s.spec, &|| false).unwrap())
            .collect();
        // A shard's result offered for the other shard, and a truncated tensor, are refused.
        let e = host.accept(1, results[0].clone()).unwrap_err().to_string();
        assert!(e.contains("expected units 1..2"), "{e}");
        let mut bad = pb::AdapterResult::decode(results[1].as_slice()).unwrap();
        bad.units[0].tensors[0].data.truncate(4);
        let e = host.accept(1, bad.encode_to_vec()).unwrap_err().to_string();
        assert!(e.contains("1 values for shape [2, 1]"), "{e}");
        let mut renamed = pb::AdapterResult::decode(results[1].as_slice()).unwrap();
        renamed.units[0].tensors[0].key = ia3_key(K);
        let e = host
            .accept(1, renamed.encode_to_vec())
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected"), "{e}");
        assert!(
            host.write(&d.join("early"), false).is_err(),
            "units missing"
        );
        for (s, r) in shards.iter().zip(results).rev() {
            host.accept(s.id, r).unwrap();
        }
        assert_eq!(host.progress(), (2, 2));
        host.write(&d.join("out"), false).unwrap();
        let out = amalgam_io::Adapter::open(&d.join("out")).unwrap();
        assert_eq!(out.read(&ia3_key(K)).unwrap(), vec![1.25, 1.0, 0.625]);
        assert_eq!(out.read(&ia3_key(V)).unwrap(), vec![0.875, 1.0]);
        // The same job in one process gives the same file.
        amalgam_engine::adapter_merge::run_local(&spec, &d.join("local"), false, 1, &NoProgress)
            .unwrap();
        assert_eq!(
            std::fs::read(d.join("out/adapter_model.safetensors")).unwrap(),
            std::fs::read(d.join("local/adapter_model.safetensors")).unwrap()
        );
    }

    /// A worker whose `--allow-root` does not hold the adapters refuses the job.
    #[test]
    fn adapter_executor_refuses_paths_outside_its_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        ia3(&d.join("a"), [1.0, 2.0, 0.5], [1.5, 1.0]);
        let spec = AdapterJobSpec::merge("adapters: [a]\n", Some(d)).unwrap();
        let host = AdapterHost::new(&spec, 1 << 20, &NoProgress).unwrap();
        let other = tempfile::tempdir().unwrap();
        let roots = AllowedRoots::new(&[other.path().to_path_buf()]).unwrap();
        let exec = AdapterExecutor::new(Some(roots));
        let e = exec
            .run_spec(&host.shards()[0].spec, &|| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside"), "{e}");
    }
}
