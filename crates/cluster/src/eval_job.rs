//! Evaluation on the cluster (issue 6): the coordinator's [`EvalHost`] and the workers'
//! [`EvalExecutor`].
//!
//! An evaluation is a flat list of scoring requests (`amalgam_eval::ScoreRequest`), cut into
//! batches by [`plan_batches`] before any model runs. A shard is a run of whole batches, so the
//! unit a model scores is the same batch whether one process or many do the work: the gathered
//! scores equal the single-process ones bit for bit. Evaluation jobs ride the merge's leases
//! (heartbeats, expiry, re-lease after a lost worker); their shard specs and results are the
//! `EvalShard` / `EvalResult` messages of `proto/amalgam.proto`. Each worker loads the model once
//! and keeps it for every shard of the job.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use amalgam_eval::{plan_batches, ScoreRequest, Scored, Scorer};
use prost::Message;

use crate::error::{ClusterError, Result};
use crate::lock;
use crate::pb;
use crate::roots::AllowedRoots;
use crate::scheduler::{ShardId, ShardSpec};
use crate::server::JobHost;
use crate::worker::{InputClient, ShardExecutor};

/// The coordinator side of an evaluation: the batches, who scored what, the gathered scores.
pub struct EvalHost {
    model: String,
    requests: Arc<Vec<ScoreRequest>>,
    batches: Vec<Range<usize>>,
    /// Batch indices of each shard (shard id = position).
    shards: Vec<Range<usize>>,
    results: Mutex<Vec<Option<Vec<Scored>>>>,
}

impl std::fmt::Debug for EvalHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalHost")
            .field("model", &self.model)
            .field("requests", &self.requests.len())
            .field("batches", &self.batches.len())
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl EvalHost {
    /// Plans the evaluation of `requests` on `model` (a path every worker can read): batches of
    /// `batch_size` requests, `batches_per_shard` batches leased at a time.
    pub fn new(
        model: impl Into<String>,
        requests: Vec<ScoreRequest>,
        batch_size: usize,
        batches_per_shard: usize,
    ) -> EvalHost {
        let batches = plan_batches(requests.len(), batch_size);
        let shards = plan_batches(batches.len(), batches_per_shard);
        let results = Mutex::new(vec![None; batches.len()]);
        EvalHost {
            model: model.into(),
            requests: Arc::new(requests),
            batches,
            shards,
            results,
        }
    }

    /// Batches scored so far and the total.
    pub fn progress(&self) -> (usize, usize) {
        let r = lock(&self.results);
        (r.iter().filter(|b| b.is_some()).count(), r.len())
    }

    /// Every request's score, in request order; an error if a batch is missing.
    pub fn scores(&self) -> Result<Vec<Scored>> {
        let r = lock(&self.results);
        let mut out = Vec::with_capacity(self.requests.len());
        for (i, b) in r.iter().enumerate() {
            match b {
                Some(s) => out.extend_from_slice(s),
                None => return Err(ClusterError::Host(format!("batch {i} was never scored"))),
            }
        }
        Ok(out)
    }

    fn shard_spec(&self, shard: &Range<usize>) -> Vec<u8> {
        let batches = shard
            .clone()
            .map(|b| pb::EvalBatch {
                index: b as u64,
                requests: self.requests[self.batches[b].clone()]
                    .iter()
                    .map(|r| pb::EvalRequest {
                        context: r.context.clone(),
                        continuation: r.continuation.clone(),
                    })
                    .collect(),
            })
            .collect();
        pb::EvalShard {
            model: self.model.clone(),
            batches,
        }
        .encode_to_vec()
    }
}

impl JobHost for EvalHost {
    fn shards(&self) -> Vec<ShardSpec> {
        self.shards
            .iter()
            .enumerate()
            .map(|(id, s)| ShardSpec {
                id: id as ShardId,
                est_bytes: (s.len() * 16) as u64,
                gang: None,
                spec: self.shard_spec(s),
            })
            .collect()
    }

    fn read_input(&self, key: &str, _offset: u64, _len: u64) -> Result<Vec<u8>> {
        Err(ClusterError::Host(format!(
            "evaluation jobs do not stream inputs (asked for {key}): the model must be readable \
             at the same path on every worker"
        )))
    }

    fn accept(&self, shard_id: ShardId, bytes: Vec<u8>) -> Result<()> {
        let shard = self
            .shards
            .get(shard_id as usize)
            .ok_or_else(|| ClusterError::Host(format!("unknown evaluation shard {shard_id}")))?;
        let result = pb::EvalResult::decode(bytes.as_slice())
            .map_err(|e| ClusterError::Protocol(format!("malformed evaluation result: {e}")))?;
        let expected: Vec<u64> = shard.clone().map(|b| b as u64).collect();
        let got: Vec<u64> = result.batches.iter().map(|b| b.index).collect();
        if got != expected {
            return Err(ClusterError::Protocol(format!(
                "evaluation shard {shard_id}: result holds batches {got:?}, expected {expected:?}"
            )));
        }
        let mut checked = Vec::with_capacity(result.batches.len());
        for b in result.batches {
            let want = self.batches[b.index as usize].len();
            if b.scores.len() != want {
                return Err(ClusterError::Protocol(format!(
                    "evaluation batch {}: {} scores for {want} requests",
                    b.index,
                    b.scores.len()
                )));
            }
            let scores = b
                .scores
                .iter()
                .map(|s| Scored {
                    logprob: s.logprob,
                    tokens: s.tokens,
                })
                .collect::<Vec<_>>();
            checked.push((b.index as usize, scores));
        }
        let mut r = lock(&self.results);
        for (i, s) in checked {
            r[i] = Some(s);
        }
        Ok(())
    }

    fn job_kind(&self) -> pb::JobKind {
        pb::JobKind::Eval
    }
}

/// Loads the scorer of a model path (a worker calls it once per model).
pub type ScorerLoader =
    dyn Fn(&Path) -> std::result::Result<Box<dyn Scorer + Send>, String> + Send + Sync + 'static;

/// The worker side: scores the batches of each leased shard with a model loaded once.
pub struct EvalExecutor {
    load: Box<ScorerLoader>,
    roots: Option<AllowedRoots>,
    loaded: Mutex<Option<(String, Box<dyn Scorer + Send>)>>,
}

impl std::fmt::Debug for EvalExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let model = lock(&self.loaded).as_ref().map(|(m, _)| m.clone());
        f.debug_struct("EvalExecutor")
            .field("model", &model)
            .finish()
    }
}

impl EvalExecutor {
    /// An executor that loads models with `load`, reading only under `roots` when given.
    pub fn new(load: Box<ScorerLoader>, roots: Option<AllowedRoots>) -> EvalExecutor {
        EvalExecutor {
            load,
            roots,
            loaded: Mutex::new(None),
        }
    }

    /// Scores one shard spec (an encoded `EvalShard`) into an encoded `EvalResult`; `cancelled`
    /// is polled between batches.
    pub fn score_spec(&self, spec: &[u8], cancelled: &dyn Fn() -> bool) -> Result<Vec<u8>> {
        let shard = pb::EvalShard::decode(spec)
            .map_err(|e| ClusterError::Executor(format!("malformed evaluation shard: {e}")))?;
        if let Some(roots) = &self.roots {
            roots.check(&shard.model)?;
        }
        let mut loaded = lock(&self.loaded);
        if loaded.as_ref().map(|(m, _)| m.as_str()) != Some(shard.model.as_str()) {
            *loaded = None;
            let started = std::time::Instant::now();
            let scorer = (self.load)(Path::new(&shard.model)).map_err(ClusterError::Executor)?;
            tracing::info!(model = %shard.model, secs = started.elapsed().as_secs_f64(), "model loaded");
            *loaded = Some((shard.model.clone(), scorer));
        }
        let (_, scorer) = loaded.as_mut().expect("loaded just above");
        let mut out = pb::EvalResult::default();
        for b in shard.batches {
            if cancelled() {
                return Err(ClusterError::Executor("lease lost; shard abandoned".into()));
            }
            let requests: Vec<ScoreRequest> = b
                .requests
                .into_iter()
                .map(|r| ScoreRequest {
                    context: r.context,
                    continuation: r.continuation,
                })
                .collect();
            let scores = scorer
                .score_batch(&requests)
                .map_err(|e| ClusterError::Executor(format!("batch {}: {e}", b.index)))?;
            out.batches.push(pb::EvalBatchResult {
                index: b.index,
                scores: scores
                    .iter()
                    .map(|s| pb::EvalScore {
                        logprob: s.logprob,
                        tokens: s.tokens,
                    })
                    .collect(),
            });
        }
        Ok(out.encode_to_vec())
    }
}

impl ShardExecutor for EvalExecutor {
    fn execute(&self, spec: &[u8], inputs: &InputClient) -> Result<Vec<u8>> {
        self.score_spec(spec, &|| inputs.is_cancelled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores a request by its text alone (a stand-in model with known numbers).
    struct LenScorer;
    impl Scorer for LenScorer {
        fn score_batch(
            &mut self,
            batch: &[ScoreRequest],
        ) -> amalgam_eval::error::Result<Vec<Scored>> {
            Ok(batch
                .iter()
                .map(|r| Scored {
                    logprob: -(r.context.len() as f64) - 0.5 * r.continuation.len() as f64,
                    tokens: r.continuation.len() as u32,
                })
                .collect())
        }
    }

    fn requests(n: usize) -> Vec<ScoreRequest> {
        (0..n)
            .map(|i| ScoreRequest {
                context: "x".repeat(i % 7),
                continuation: "y".repeat(i % 5 + 1),
            })
            .collect()
    }

    #[test]
    fn shards_round_trip_in_any_order() {
        let host = EvalHost::new("m", requests(23), 4, 2);
        let shards = host.shards();
        assert_eq!(shards.len(), 3); // 6 batches, 2 per shard
        let exec = EvalExecutor::new(Box::new(|_| Ok(Box::new(LenScorer))), None);
        for s in shards.iter().rev() {
            assert!(host.scores().is_err());
            let bytes = exec.score_spec(&s.spec, &|| false).unwrap();
            host.accept(s.id, bytes).unwrap();
        }
        let got = host.scores().unwrap();
        let want = LenScorer.score_batch(&requests(23)).unwrap();
        assert_eq!(got, want);
        assert_eq!(host.progress(), (6, 6));
    }

    #[test]
    fn a_result_for_other_batches_is_refused() {
        let host = EvalHost::new("m", requests(10), 2, 2);
        let shards = host.shards();
        let exec = EvalExecutor::new(Box::new(|_| Ok(Box::new(LenScorer))), None);
        let bytes = exec.score_spec(&shards[0].spec, &|| false).unwrap();
        let err = host.accept(shards[1].id, bytes).unwrap_err().to_string();
        assert!(err.contains("expected [2, 3]"), "{err}");
    }
}
