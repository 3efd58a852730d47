//! `ties` (methods.md §3; mergekit `mergekit/merge_methods/generalized_task_arithmetic.py` with
//! `sparsify.py:magnitude`, registered in `registry.py` with consensus `sum`, `normalize` true).
//! Sharding class T by default; G with `trim_scope: model`.
//!
//! Default (mergekit): per tensor and per model keep exactly `max(1, ⌊density·d⌋)` entries of the
//! task vector with the largest `|δ|` (exact selection, equal magnitudes at the cut go to the
//! lowest flat index; [`crate::methods::sparsify::magnitude`]), then the shared pipeline
//! ([`crate::methods::gta`]): majority sign `+1` where `Σ_i w_i δ'_i ≥ 0`, disjoint weighted mean
//! divided by `Σ_i w_i m_i` (0 → 1), `θ_0 + λ·mix`.
//!
//! Parameters:
//! - per model: `weight` (required, as in mergekit), `density` (default 1.0 = no trim; must be
//!   in (0, 1]);
//! - method-wide: `normalize` (true), `lambda` (1.0), `rescale` (false: L1 rescale of the
//!   trimmed vectors), `int8_mask` (accepted, no effect), `consensus_method` (`sum` | `count`,
//!   default `sum`; an amalgam extension), `trim_scope` (`tensor` | `model`, default `tensor`).
//!
//! `trim_scope: model` follows the TIES paper's reference code
//! (`prateeky2806/ties-merging/src/utils/merge_utils.py`): each task vector is trimmed over the
//! **whole model** (all tensors merged by this method) with `K = density`: keep
//! `|τ| ≥ thr` where `thr` is the `k'`-th smallest `|τ|`, `k' = d − ⌊d·K⌋` (so ties at `thr` are
//! all kept, `⌊dK⌋ + 1` entries or more; `K = 1` keeps everything); elements whose consensus sum
//! is exactly 0 take the model-global majority `sgn(Σ_all elements γ)`, and when that is 0 too
//! the negative entries are selected, as the reference does. Three global passes (executor-summed
//! [`GlobalStats`]): (0) per-model histograms of the high 16 bits of `|τ|`'s bit pattern, (1)
//! low-16-bit histograms inside the bucket holding the cut, (2) counts of positive and negative
//! consensus sums. Weighting and normalisation stay mergekit's (with every `weight: 1` and
//! `normalize: true` they equal the paper's disjoint mean). Each tensor uses its own resolved
//! `density` against the model-wide count, so give `density` one value per model in this scope.

use crate::error::{MergeError, Result};
use crate::methods::gta::{self, Consensus, GtaDefaults, GtaOptions};
use crate::methods::sparsify::{self, KeyOrder, ModelMask, RankMask, RankSparsifier};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::select::{self, Cut, BUCKETS};
use crate::tensor::{TensorJob, TensorReader, TensorWriter};
use rayon::prelude::*;

/// Static facts about `ties`.
pub const INFO: MethodInfo = MethodInfo {
    name: "ties",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &[
        "normalize",
        "lambda",
        "rescale",
        "int8_mask",
        "consensus_method",
        "trim_scope",
    ],
    model_params: &["weight", "density"],
    random: false,
    summary: "TIES: trim task vectors by magnitude, elect signs, disjoint weighted mean",
};

/// mergekit's defaults for `ties`.
pub const DEFAULTS: GtaDefaults = GtaDefaults {
    consensus: Some(Consensus::Sum),
    normalize: true,
    rescale: false,
};

/// Where the magnitude trim's order statistic is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimScope {
    /// Per tensor, exactly `max(1, ⌊density·d⌋)` kept (mergekit).
    Tensor,
    /// Over the whole model, `|τ| ≥ thr` kept (TIES paper).
    Model,
}

/// `ties` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Ties {
    /// The shared pipeline's options.
    pub opts: GtaOptions,
    /// Per-model `density`.
    pub densities: Vec<f64>,
    /// `trim_scope`.
    pub scope: TrimScope,
}

impl Ties {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        let opts = GtaOptions::from_params(params, n_models, INFO.name, DEFAULTS)?;
        let densities = sparsify::densities(params, n_models)?;
        let scope = match params.opt_str("trim_scope")?.as_deref() {
            None | Some("tensor") => TrimScope::Tensor,
            Some("model") => TrimScope::Model,
            Some(other) => {
                return Err(MergeError::BadParameter {
                    key: "trim_scope".into(),
                    message: format!("expected `tensor` or `model`, got `{other}`"),
                })
            }
        };
        Ok(Self {
            opts,
            densities,
            scope,
        })
    }

    /// Number of models.
    fn n(&self) -> usize {
        self.densities.len()
    }

    /// Model-scope: per model, the cut position `k' − 1` in the ascending order of the model's
    /// `d` magnitudes, or `None` when nothing is trimmed.
    fn model_position(&self, i: usize, d: u64) -> Option<u64> {
        let k = self.densities[i];
        if k >= 1.0 || d == 0 {
            return None;
        }
        let keep = (k * d as f64).floor().max(0.0) as u64;
        let kp = d.saturating_sub(keep);
        if kp == 0 {
            None
        } else {
            Some(kp - 1)
        }
    }

    fn check_stats(&self, prior: &[GlobalStats], passes: usize) -> Result<()> {
        let n = self.n();
        let ok = prior.len() >= passes
            && prior[..passes.min(2)]
                .iter()
                .all(|s| s.counts.len() == n * BUCKETS);
        if ok {
            Ok(())
        } else {
            Err(MergeError::BadInputs {
                method: INFO.name.into(),
                message: "trim_scope: model needs the results of its global passes".into(),
            })
        }
    }

    /// Model-scope: the options with the zero-sign rule from the global sign counts (pass 2).
    fn model_options(&self, global: &[GlobalStats]) -> Result<GtaOptions> {
        let signs = global
            .get(2)
            .filter(|s| s.counts.len() == 2)
            .ok_or_else(|| MergeError::BadInputs {
                method: INFO.name.into(),
                message: "trim_scope: model needs the results of its global passes".into(),
            })?;
        let (pos, neg) = (signs.counts[0], signs.counts[1]);
        let mut opts = self.opts.clone();
        opts.zero_sign = Some(match pos.cmp(&neg) {
            std::cmp::Ordering::Greater => 1,
            std::cmp::Ordering::Less => -1,
            std::cmp::Ordering::Equal => 0,
        });
        Ok(opts)
    }

    /// Model-scope: the sparsifier from the summed histograms of passes 0 and 1.
    fn model_sparsifier(&self, prior: &[GlobalStats]) -> Result<RankSparsifier> {
        self.check_stats(prior, 2)?;
        let masks = (0..self.n())
            .map(|i| {
                let hi = &prior[0].counts[i * BUCKETS..(i + 1) * BUCKETS];
                let lo = &prior[1].counts[i * BUCKETS..(i + 1) * BUCKETS];
                let d: u64 = hi.iter().sum();
                match self.model_position(i, d) {
                    None => ModelMask::All,
                    Some(p) => {
                        let kr = select::key_rank(hi, lo, p);
                        ModelMask::Rank(RankMask {
                            order: KeyOrder::Ascending,
                            lo: Cut {
                                key: kr.key,
                                index: 0,
                            },
                            hi: Cut::END,
                        })
                    }
                }
            })
            .collect();
        Ok(RankSparsifier { masks })
    }
}

impl MergeMethod for Ties {
    fn class(&self) -> ShardClass {
        match self.scope {
            TrimScope::Tensor => ShardClass::T,
            TrimScope::Model => ShardClass::G,
        }
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 3
    }

    /// Per-tensor trimming only: the model-scope cut and zero sign come from global passes
    /// that run on the CPU.
    fn device_plan(&self) -> Option<crate::methods::device::DevicePlan> {
        use crate::methods::device::{DevicePlan, DeviceSparsify};
        (self.scope == TrimScope::Tensor).then(|| DevicePlan::Gta {
            opts: self.opts.clone(),
            sparsify: self
                .densities
                .iter()
                .map(|&density| DeviceSparsify::Magnitude { density })
                .collect(),
        })
    }

    /// The whole-model trim: each model's threshold from the global passes as a minimum
    /// magnitude (the mask keeps `key ≥ K` in the ascending order, with no index tie-break).
    fn device_plan_global(
        &self,
        global: &[GlobalStats],
    ) -> Option<crate::methods::device::DevicePlan> {
        use crate::methods::device::{DevicePlan, DeviceSparsify};
        if self.scope == TrimScope::Tensor {
            return self.device_plan();
        }
        let sp = self.model_sparsifier(global).ok()?;
        let opts = self.model_options(global).ok()?;
        let sparsify = sp
            .masks
            .iter()
            .map(|m| match m {
                ModelMask::Rank(RankMask {
                    order: KeyOrder::Ascending,
                    lo,
                    hi,
                }) if lo.index == 0 && *hi == Cut::END => {
                    Some(DeviceSparsify::MinMagnitude { bits: lo.key })
                }
                ModelMask::All => Some(DeviceSparsify::None),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(DevicePlan::Gta { opts, sparsify })
    }

    fn global_passes(&self) -> usize {
        match self.scope {
            TrimScope::Tensor => 0,
            TrimScope::Model => 3,
        }
    }

    fn global_pass(
        &self,
        pass: usize,
        prior: &[GlobalStats],
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<GlobalStats> {
        let n = self.n();
        match pass {
            0 | 1 => {
                let buckets: Vec<Option<u32>> = if pass == 0 {
                    vec![None; n]
                } else {
                    self.check_stats(prior, 1)?;
                    (0..n)
                        .map(|i| {
                            let hi = &prior[0].counts[i * BUCKETS..(i + 1) * BUCKETS];
                            let d: u64 = hi.iter().sum();
                            self.model_position(i, d)
                                .map(|p| select::locate(hi, p).0 as u32)
                        })
                        .collect()
                };
                // One histogram per model, the models in parallel (the first error in model
                // order is reported).
                let hists: Vec<Vec<u64>> = buckets
                    .par_iter()
                    .enumerate()
                    .map(|(i, b)| {
                        let mut hist = vec![0u64; BUCKETS];
                        if pass == 1 && b.is_none() {
                            return Ok(hist);
                        }
                        let mut keys = Vec::new();
                        gta::for_each_delta_block(job, reader, i, |_, delta| {
                            keys.clear();
                            keys.extend(delta.iter().map(|x| KeyOrder::Ascending.key(*x)));
                            match b {
                                None => select::add_hist_hi(&keys, &mut hist),
                                Some(h) => select::add_hist_lo(&keys, *h, &mut hist),
                            }
                            Ok(())
                        })?;
                        Ok(hist)
                    })
                    .collect::<Vec<Result<_>>>()
                    .into_iter()
                    .collect::<Result<_>>()?;
                let counts = hists.concat();
                Ok(GlobalStats {
                    counts,
                    sums: Vec::new(),
                })
            }
            2 => {
                let sp = self.model_sparsifier(prior)?;
                let c = gta::consensus_sign_counts(&self.opts, Some(&sp), job, reader)?;
                Ok(GlobalStats {
                    counts: c.to_vec(),
                    sums: Vec::new(),
                })
            }
            _ => Ok(GlobalStats::default()),
        }
    }

    fn merge(
        &self,
        job: &TensorJob,
        global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        if self.scope == TrimScope::Tensor && !self.opts.rescale {
            // Inputs lent whole (memory-mapped files): one selection pass and one merge pass,
            // decoding tiles where they are used. A non-finite input falls through to the
            // block path, which reports it.
            if let Some(v) = gta::views(job, reader)? {
                // Candidates of the selection: 8 bytes each, at most half a block per model
                // (within the budget of the n + 3 block buffers this method reports).
                let max_cands = job.block_elems / 2;
                if let Some(sp) = sparsify::magnitude_views(&v, &self.densities, max_cands) {
                    return gta::merge_views(&self.opts, Some(&sp), job, &v, writer);
                }
            }
        }
        match self.scope {
            TrimScope::Tensor if gta::single_block(job) => {
                // The whole tensor fits the budget: read every input once and select in memory.
                let mut l = gta::load_task_vectors(job, reader)?;
                let sp = sparsify::magnitude_loaded(&l.deltas, &self.densities);
                gta::merge_loaded(&self.opts, Some(&sp), job, &l.base, &mut l.deltas, writer)
            }
            TrimScope::Tensor => {
                let sp = sparsify::magnitude(job, reader, &self.densities)?;
                gta::merge_streaming(&self.opts, Some(&sp), job, reader, writer)
            }
            TrimScope::Model => {
                let sp = self.model_sparsifier(global)?;
                let opts = self.model_options(global)?;
                gta::merge(&opts, Some(&sp), job, reader, writer)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::task_arithmetic::tests::{assert_close, job, rand_vec};
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    /// Naive mergekit TIES in f64: per-tensor trim by a stable sort, sum consensus, weighted
    /// disjoint mean.
    fn naive_ties(
        base: &[f32],
        models: &[Vec<f32>],
        w: &[f64],
        dens: &[f64],
        normalize: bool,
        lambda: f64,
        count: bool,
    ) -> Vec<f64> {
        let n = base.len();
        let trimmed: Vec<Vec<f64>> = models
            .iter()
            .zip(dens)
            .map(|(m, &dn)| {
                let d: Vec<f64> = m.iter().zip(base).map(|(a, b)| (a - b) as f64).collect();
                if dn >= 1.0 {
                    return d;
                }
                let k = ((dn * n as f64).floor() as usize).max(1);
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&a, &b| d[b].abs().partial_cmp(&d[a].abs()).unwrap().then(a.cmp(&b)));
                let mut out = vec![0.0; n];
                for &i in &idx[..k] {
                    out[i] = d[i];
                }
                out
            })
            .collect();
        (0..n)
            .map(|j| {
                let v: Vec<f64> = (0..models.len()).map(|i| w[i] * trimmed[i][j]).collect();
                let s: f64 = if count {
                    v.iter()
                        .map(|x| {
                            if *x > 0.0 {
                                1.0
                            } else if *x < 0.0 {
                                -1.0
                            } else {
                                0.0
                            }
                        })
                        .sum()
                } else {
                    v.iter().sum()
                };
                let maj = if s >= 0.0 { 1.0 } else { -1.0 };
                let (mut mix, mut div) = (0.0, 0.0);
                for i in 0..v.len() {
                    let sg = if v[i] > 0.0 {
                        1.0
                    } else if v[i] < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    if sg == maj {
                        mix += v[i];
                        div += w[i];
                    }
                }
                if div == 0.0 {
                    div = 1.0;
                }
                if normalize {
                    mix /= div;
                }
                base[j] as f64 + lambda * mix
            })
            .collect()
    }

    fn params(w: &[f64], dens: &[f64]) -> TensorParams {
        TensorParams::default()
            .with_model_values("weight", w)
            .with_model_values("density", dens)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matches_naive_reference_and_block_size() {
        let shape = [9, 13];
        let n = 9 * 13;
        let base = rand_vec(10, n);
        let models: Vec<Vec<f32>> = (11..14).map(|s| rand_vec(s, n)).collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        let w = [1.0, 0.6, -0.4];
        for (dens, normalize, lambda, count) in [
            ([0.3, 0.5, 0.9], true, 1.0, false),
            ([1.0, 1.0, 1.0], true, 1.0, false),
            ([0.2, 0.01, 1.0], false, 1.3, false),
            ([0.5, 0.5, 0.5], true, 0.8, true),
        ] {
            let mut p = params(&w, &dens)
                .with_global("normalize", Scalar::Bool(normalize))
                .with_global("lambda", Scalar::Num(lambda));
            if count {
                p = p.with_global("consensus_method", Scalar::Str("count".into()));
            }
            let m = Ties::from_params(&p, 3).unwrap();
            let want = naive_ties(&base, &models, &w, &dens, normalize, lambda, count);
            let whole = merge_in_memory(&m, &job(&shape, 3, n), &reader).unwrap();
            assert_close(&whole, &want);
            for block in [1, 13, 27, 50] {
                let small = merge_in_memory(&m, &job(&shape, 3, block), &reader).unwrap();
                assert_eq!(bits(&whole), bits(&small), "block {block}");
            }
        }
    }

    #[test]
    fn sign_ties_zeros_and_equal_magnitudes() {
        // Task vectors: exact sign ties (sum 0 → +1), all-zero columns, many equal magnitudes.
        let base = vec![0.5f32; 8];
        let d = [
            [1.0f32, 0.0, 0.5, -0.5, 0.5, 0.5, 0.0, -2.0],
            [-1.0, 0.0, -0.5, 0.5, 0.5, 0.5, 0.0, 2.0],
            [0.0, 0.0, 0.0, 0.0, -0.5, 0.5, 0.0, 1.0],
        ];
        let models: Vec<Vec<f32>> = d
            .iter()
            .map(|r| r.iter().zip(&base).map(|(x, b)| x + b).collect())
            .collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        let w = [1.0, 1.0, 1.0];
        for dens in [[1.0, 1.0, 1.0], [0.5, 0.5, 0.25], [0.125, 0.3, 0.6]] {
            let m = Ties::from_params(&params(&w, &dens), 3).unwrap();
            let got = merge_in_memory(&m, &job(&[8], 3, 3), &reader).unwrap();
            assert_close(
                &got,
                &naive_ties(&base, &models, &w, &dens, true, 1.0, false),
            );
        }
        // Hand-checked, density 1: element 0: sum 0 → +1, only model 0 (+1) → 1.5;
        // element 3: +0.5 wins the tie → 1.0; element 7: +3 → mean(2, 1) = 1.5 → 2.0.
        let m = Ties::from_params(&params(&w, &[1.0; 3]), 3).unwrap();
        let got = merge_in_memory(&m, &job(&[8], 3, 8), &reader).unwrap();
        assert_eq!(got, vec![1.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 2.0]);
    }

    /// The in-memory path (whole tensor in one block) against the streaming path (several
    /// blocks, several passes), on a tensor large enough for the parallel chunks, with many
    /// equal magnitudes at the cut and every option.
    #[test]
    fn in_memory_path_matches_streaming_bits() {
        let (rows, cols) = (97, 1031);
        let n = rows * cols;
        let base = rand_vec(20, n);
        let models: Vec<Vec<f32>> = (21..25)
            .map(|s| {
                let r = rand_vec(s, n);
                // Quantised task vectors: many exactly equal magnitudes.
                r.iter()
                    .zip(&base)
                    .map(|(x, b)| b + (x * 8.0).round() / 8.0)
                    .collect()
            })
            .collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        let w = [1.0, 0.7, -0.3, 0.45];
        for (dens, rescale, count, lambda) in [
            ([0.2, 0.2, 0.2, 0.2], false, false, 1.0),
            ([0.1, 0.5, 1.0, 0.33], true, false, 0.9),
            ([0.25, 0.6, 0.05, 0.8], false, true, 1.0),
        ] {
            let mut p = params(&w, &dens)
                .with_global("rescale", Scalar::Bool(rescale))
                .with_global("lambda", Scalar::Num(lambda));
            if count {
                p = p.with_global("consensus_method", Scalar::Str("count".into()));
            }
            let m = Ties::from_params(&p, 4).unwrap();
            let whole = merge_in_memory(&m, &job(&[rows, cols], 4, n), &reader).unwrap();
            // (Quantised task vectors put many consensus sums near 0, where the f64 reference
            // may elect the other sign: `matches_naive_reference_and_block_size` checks values.)
            for block in [cols * 13 + 5, cols * 50] {
                let small = merge_in_memory(&m, &job(&[rows, cols], 4, block), &reader).unwrap();
                assert_eq!(bits(&whole), bits(&small), "block {block}");
            }
        }
    }

    #[test]
    fn all_zero_task_vectors_give_base() {
        let base = rand_vec(5, 20);
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![base.clone(), base.clone(), base.clone()],
        };
        let m = Ties::from_params(&params(&[1.0, 2.0, 3.0], &[0.2, 0.5, 1.0]), 3).unwrap();
        assert_eq!(
            merge_in_memory(&m, &job(&[20], 3, 7), &reader).unwrap(),
            base
        );
    }

    #[test]
    fn parameter_errors() {
        let bad = |p: TensorParams, key: &str| match Ties::from_params(&p, 2) {
            Err(MergeError::BadParameter { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{other:?}"),
        };
        bad(params(&[1.0, 1.0], &[0.0, 0.5]), "density");
        bad(params(&[1.0, 1.0], &[1.01, 0.5]), "density");
        bad(params(&[1.0, -1.0], &[0.5, 0.5]), "weight");
        bad(
            params(&[1.0, 1.0], &[0.5, 0.5]).with_global("trim_scope", Scalar::Str("x".into())),
            "trim_scope",
        );
        bad(
            params(&[1.0, 1.0], &[0.5, 0.5])
                .with_global("consensus_method", Scalar::Str("max".into())),
            "consensus_method",
        );
        assert!(matches!(
            Ties::from_params(
                &TensorParams::default().with_model_values("density", &[0.5, 0.5]),
                2
            ),
            Err(MergeError::MissingParameter { .. })
        ));
        // int8_mask accepted.
        let p = params(&[1.0, 1.0], &[0.5, 0.5]).with_global("int8_mask", Scalar::Bool(true));
        assert!(Ties::from_params(&p, 2).is_ok());
    }

    /// Naive paper TIES over a whole model (tensors concatenated), weights as mergekit.
    fn naive_model_ties(
        base: &[Vec<f32>],
        models: &[Vec<Vec<f32>>],
        w: &[f64],
        dens: &[f64],
    ) -> Vec<Vec<f64>> {
        let nm = w.len();
        let flat_b: Vec<f32> = base.concat();
        let d = flat_b.len();
        let trimmed: Vec<Vec<f64>> = (0..nm)
            .map(|i| {
                let fm: Vec<f32> = models[i].concat();
                let t: Vec<f64> = fm
                    .iter()
                    .zip(&flat_b)
                    .map(|(a, b)| (a - b) as f64)
                    .collect();
                if dens[i] >= 1.0 {
                    return t;
                }
                let kp = d - (d as f64 * dens[i]).floor() as usize;
                let mut mags: Vec<f64> = t.iter().map(|x| x.abs()).collect();
                mags.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let thr = mags[kp - 1];
                t.iter()
                    .map(|&x| if x.abs() >= thr { x } else { 0.0 })
                    .collect()
            })
            .collect();
        let v = |j: usize| -> Vec<f64> { (0..nm).map(|i| w[i] * trimmed[i][j]).collect() };
        let sgn = |x: f64| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        };
        let gamma: Vec<f64> = (0..d).map(|j| sgn(v(j).iter().sum())).collect();
        let maj = sgn(gamma.iter().sum());
        let out: Vec<f64> = (0..d)
            .map(|j| {
                let g = if gamma[j] == 0.0 { maj } else { gamma[j] };
                let vj = v(j);
                let (mut mix, mut div) = (0.0, 0.0);
                for i in 0..nm {
                    if (g > 0.0 && vj[i] > 0.0) || (g <= 0.0 && vj[i] < 0.0) {
                        mix += vj[i];
                        div += w[i];
                    }
                }
                flat_b[j] as f64 + mix / if div == 0.0 { 1.0 } else { div }
            })
            .collect();
        let mut res = Vec::new();
        let mut off = 0;
        for b in base {
            res.push(out[off..off + b.len()].to_vec());
            off += b.len();
        }
        res
    }

    fn run_model_scope<R: TensorReader>(
        m: &Ties,
        jobs: &[TensorJob],
        readers: &[R],
    ) -> Vec<Vec<f32>> {
        let mut prior: Vec<GlobalStats> = Vec::new();
        for pass in 0..m.global_passes() {
            let mut acc = GlobalStats::default();
            for (j, r) in jobs.iter().zip(readers) {
                acc.accumulate(&m.global_pass(pass, &prior, j, r).unwrap());
            }
            prior.push(acc);
        }
        jobs.iter()
            .zip(readers)
            .map(|(j, r)| {
                let mut w = crate::tensor::MemWriter::default();
                m.merge(j, &prior, r, &mut w).unwrap();
                w.data
            })
            .collect()
    }

    #[test]
    fn model_scope_matches_paper_reference() {
        let sizes = [
            (vec![7usize, 5], 35usize),
            (vec![12], 12),
            (vec![3, 11], 33),
        ];
        let w = [1.0, 0.7, 1.5];
        let dens = [0.2, 0.5, 0.35];
        let mut bases = Vec::new();
        let mut models: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
        for (t, (_, n)) in sizes.iter().enumerate() {
            bases.push(rand_vec(100 + t as u64, *n));
            for (i, m) in models.iter_mut().enumerate() {
                // Quantised values: many equal magnitudes across tensors.
                let v: Vec<f32> = rand_vec(200 + 10 * t as u64 + i as u64, *n)
                    .iter()
                    .zip(&bases[t])
                    .map(|(x, b)| b + (x * 8.0).round() / 8.0)
                    .collect();
                m.push(v);
            }
        }
        let p = params(&w, &dens).with_global("trim_scope", Scalar::Str("model".into()));
        let m = Ties::from_params(&p, 3).unwrap();
        assert_eq!(m.class(), ShardClass::G);
        let want = naive_model_ties(&bases, &models, &w, &dens);
        let readers: Vec<MemReader> = (0..sizes.len())
            .map(|t| MemReader {
                stats: Default::default(),
                base: Some(bases[t].clone()),
                models: (0..3).map(|i| models[i][t].clone()).collect(),
            })
            .collect();
        let mk_jobs = |block: usize| -> Vec<TensorJob> {
            sizes.iter().map(|(s, _)| job(s, 3, block)).collect()
        };
        let got = run_model_scope(&m, &mk_jobs(1000), &readers);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w);
        }
        let small = run_model_scope(&m, &mk_jobs(4), &readers);
        for (a, b) in got.iter().zip(&small) {
            assert_eq!(bits(a), bits(b));
        }
    }

    #[test]
    fn model_scope_zero_sign_uses_global_majority() {
        // Element 0 cancels exactly (+1, −1); the rest is mostly negative, so the global
        // majority is −1 and element 0 takes model 1's −1. With density 1, nothing is trimmed.
        let base = vec![0.0f32; 4];
        let models = vec![vec![1.0f32, -1.0, -1.0, 0.5], vec![-1.0, -1.0, -2.0, 0.0]];
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base),
            models,
        };
        let p =
            params(&[1.0, 1.0], &[1.0, 1.0]).with_global("trim_scope", Scalar::Str("model".into()));
        let m = Ties::from_params(&p, 2).unwrap();
        let got = run_model_scope(&m, &[job(&[4], 2, 4)], std::slice::from_ref(&reader));
        assert_eq!(got[0], vec![-1.0, -1.0, -1.5, 0.5]);
        // Default (mergekit) scope: the tie goes to +1.
        let m = Ties::from_params(&params(&[1.0, 1.0], &[1.0, 1.0]), 2).unwrap();
        let got = merge_in_memory(&m, &job(&[4], 2, 4), &reader).unwrap();
        assert_eq!(got, vec![1.0, -1.0, -1.5, 0.5]);
    }

    /// A reader lending its inputs whole as stored bytes, as memory-mapped checkpoints do
    /// (`lend: false` hides the views, so the block path runs on the same bytes).
    struct ViewReader {
        dtype: crate::raw::RawDtype,
        base: Vec<u8>,
        models: Vec<Vec<u8>>,
        lend: bool,
    }

    impl ViewReader {
        fn new(dtype: crate::raw::RawDtype, base: &[f32], models: &[Vec<f32>]) -> Self {
            use crate::raw::RawDtype;
            let enc = |v: &[f32]| -> Vec<u8> {
                v.iter()
                    .flat_map(|&x| match dtype {
                        RawDtype::F32 => x.to_le_bytes().to_vec(),
                        RawDtype::Bf16 => ((x.to_bits() >> 16) as u16).to_le_bytes().to_vec(),
                        RawDtype::F16 => half::f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
                    })
                    .collect()
            };
            Self {
                dtype,
                base: enc(base),
                models: models.iter().map(|m| enc(m)).collect(),
                lend: true,
            }
        }

        fn bytes(&self, input: crate::tensor::Input) -> &[u8] {
            match input {
                crate::tensor::Input::Base => &self.base,
                crate::tensor::Input::Model(i) => &self.models[i],
            }
        }

        /// The stored values, decoded (an f32 reader of the same inputs).
        fn decoded(&self) -> MemReader {
            let dec = |b: &[u8]| {
                let mut blk = crate::raw::RawBlock::new();
                let n = b.len() / self.dtype.size();
                blk.fill(self.dtype, n).copy_from_slice(b);
                let mut out = vec![0.0f32; n];
                blk.decode(0..n, &mut out);
                out
            };
            MemReader {
                stats: Default::default(),
                base: Some(dec(&self.base)),
                models: self.models.iter().map(|m| dec(m)).collect(),
            }
        }
    }

    impl TensorReader for ViewReader {
        fn read(
            &self,
            input: crate::tensor::Input,
            range: std::ops::Range<usize>,
            out: &mut [f32],
        ) -> Result<()> {
            let mut blk = crate::raw::RawBlock::new();
            self.read_raw(input, range.clone(), &mut blk)?;
            blk.decode(0..range.len(), out);
            Ok(())
        }

        fn read_raw(
            &self,
            input: crate::tensor::Input,
            range: std::ops::Range<usize>,
            out: &mut crate::raw::RawBlock,
        ) -> Result<bool> {
            let s = self.dtype.size();
            out.fill(self.dtype, range.len())
                .copy_from_slice(&self.bytes(input)[range.start * s..range.end * s]);
            Ok(true)
        }

        fn raw_dtype(&self, _: crate::tensor::Input) -> Result<Option<crate::raw::RawDtype>> {
            Ok(Some(self.dtype))
        }

        fn raw_view(
            &self,
            input: crate::tensor::Input,
        ) -> Result<Option<(crate::raw::RawDtype, &[u8])>> {
            Ok(self.lend.then(|| (self.dtype, self.bytes(input))))
        }
    }

    fn run_reader(m: &Ties, j: &TensorJob, r: &dyn TensorReader) -> Result<Vec<f32>> {
        let mut w = crate::tensor::MemWriter::default();
        m.merge(j, &[], r, &mut w)?;
        Ok(w.data)
    }

    /// Quantised task vectors (many equal magnitudes at the cut) on top of random bases.
    fn quantised(seed: u64, n: usize, models: usize, step: f32) -> (Vec<f32>, Vec<Vec<f32>>) {
        let base = rand_vec(seed, n);
        let models = (0..models as u64)
            .map(|s| {
                rand_vec(seed + 1 + s, n)
                    .iter()
                    .zip(&base)
                    .map(|(x, b)| b + (x / step).round() * step * 0.1)
                    .collect()
            })
            .collect();
        (base, models)
    }

    /// The whole-input path (one selection pass over lent bytes, sampled windows) gives the
    /// block path's bits in every stored encoding, every option and thread count, and the
    /// naive f64 reference's values.
    #[test]
    fn lent_inputs_match_block_path_bits() {
        use crate::raw::RawDtype;
        // Weights exact in f32, so that the f64 reference elects the same signs where
        // task vectors cancel exactly.
        let w = [1.0, 0.75, -0.25, 0.5];
        for (rows, cols) in [(9usize, 13usize), (97, 1031), (300, 257)] {
            let n = rows * cols;
            for (dtype, step) in [
                (RawDtype::F32, 0.125f32),
                (RawDtype::Bf16, 0.0f32),
                (RawDtype::F16, 0.25),
            ] {
                let (base, models) = if step > 0.0 {
                    quantised(30 + rows as u64, n, 4, step)
                } else {
                    (
                        rand_vec(40, n),
                        (41..45).map(|s| rand_vec(s, n)).collect::<Vec<_>>(),
                    )
                };
                let mut vr = ViewReader::new(dtype, &base, &models);
                let mem = vr.decoded();
                for (dens, count, lambda, normalize) in [
                    ([0.2, 0.2, 0.2, 0.2], false, 1.0, true),
                    ([0.1, 0.5, 1.0, 0.33], false, 0.9, true),
                    ([0.25, 0.6, 0.05, 0.8], true, 1.0, false),
                    ([1.0, 1.0, 1.0, 1.0], false, 1.0, true),
                    ([1e-9, 0.999, 0.5, 0.01], false, 1.0, true),
                ] {
                    let mut p = params(&w, &dens)
                        .with_global("lambda", Scalar::Num(lambda))
                        .with_global("normalize", Scalar::Bool(normalize));
                    if count {
                        p = p.with_global("consensus_method", Scalar::Str("count".into()));
                    }
                    let m = Ties::from_params(&p, 4).unwrap();
                    let jb = job(&[rows, cols], 4, n);
                    vr.lend = true;
                    let lent = run_reader(&m, &jb, &vr).unwrap();
                    let one = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .unwrap()
                        .install(|| run_reader(&m, &jb, &vr).unwrap());
                    assert_eq!(bits(&lent), bits(&one), "{dtype:?} {n} one thread");
                    vr.lend = false;
                    for block in [n, cols * 7 + 3] {
                        let jb = job(&[rows, cols], 4, block);
                        let blockwise = run_reader(&m, &jb, &vr).unwrap();
                        assert_eq!(bits(&lent), bits(&blockwise), "{dtype:?} {n} {block}");
                    }
                    if !count && step == 0.0 {
                        let want = naive_ties(
                            mem.base.as_ref().unwrap(),
                            &mem.models,
                            &w,
                            &dens,
                            normalize,
                            lambda,
                            false,
                        );
                        assert_close(&lent, &want);
                    }
                }
            }
        }
    }

    /// Structured task vectors (large magnitudes in every 1024-element stretch's first 128)
    /// and a budget too small for the candidates: the exact selection gives the block path's
    /// bits and the reference's values.
    #[test]
    fn model_scope_lent_inputs_give_the_read_path_bits() {
        use crate::raw::RawDtype;
        let p = params(&[1.0, 0.7, 1.2], &[0.3, 0.5, 0.2])
            .with_global("trim_scope", Scalar::Str("model".into()));
        let m = Ties::from_params(&p, 3).unwrap();
        let shapes = [[40usize, 300], [7, 51]];
        // Blocks of a few rows: the global passes stream several blocks per tensor.
        let jobs: Vec<TensorJob> = shapes.iter().map(|s| job(s, 3, 3 * s[1])).collect();
        for dtype in [RawDtype::F32, RawDtype::Bf16] {
            let mut readers: Vec<ViewReader> = shapes
                .iter()
                .enumerate()
                .map(|(t, s)| {
                    let (base, models) = quantised(90 + t as u64, s[0] * s[1], 3, 0.25);
                    ViewReader::new(dtype, &base, &models)
                })
                .collect();
            let lent = run_model_scope(&m, &jobs, &readers);
            readers.iter_mut().for_each(|r| r.lend = false);
            let read = run_model_scope(&m, &jobs, &readers);
            for (a, b) in lent.iter().zip(&read) {
                assert_eq!(bits(a), bits(b), "{dtype:?}");
            }
        }
    }

    #[test]
    fn lent_inputs_window_miss_is_exact() {
        use crate::raw::RawDtype;
        let (rows, cols) = (211, 997);
        let n = rows * cols;
        let base = rand_vec(50, n);
        // The first 128 elements of each 1024 are large: sample blocks see a distribution
        // that depends on where they fall.
        let models: Vec<Vec<f32>> = (51..54)
            .map(|s| {
                rand_vec(s, n)
                    .iter()
                    .enumerate()
                    .zip(&base)
                    .map(|((j, x), b)| b + if j % 1024 < 128 { x * 10.0 } else { x * 0.01 })
                    .collect()
            })
            .collect();
        let mut vr = ViewReader::new(RawDtype::F32, &base, &models);
        let w = [1.0, 1.0, 1.0];
        for dens in [[0.01, 0.1, 0.3], [0.9, 0.95, 0.5]] {
            let m = Ties::from_params(&params(&w, &dens), 3).unwrap();
            vr.lend = true;
            let lent = run_reader(&m, &job(&[rows, cols], 3, n), &vr).unwrap();
            // A small budget caps the candidates: the streaming selection takes over.
            let capped = run_reader(&m, &job(&[rows, cols], 3, 2 * cols), &vr).unwrap();
            assert_eq!(bits(&lent), bits(&capped));
            vr.lend = false;
            let blockwise = run_reader(&m, &job(&[rows, cols], 3, n), &vr).unwrap();
            assert_eq!(bits(&lent), bits(&blockwise));
            let mem = vr.decoded();
            let want = naive_ties(
                mem.base.as_ref().unwrap(),
                &mem.models,
                &w,
                &dens,
                true,
                1.0,
                false,
            );
            assert_close(&lent, &want);
        }
    }

    /// A non-finite input is reported as the block path reports it (nothing written first),
    /// also in a model left untrimmed.
    #[test]
    fn lent_inputs_non_finite_error() {
        use crate::raw::RawDtype;
        let n = 40_000;
        let (base, mut models) = quantised(60, n, 3, 0.5);
        for (who, at, dens) in [
            (2usize, 39_000usize, [0.3, 0.3, 1.0]),
            (0, 5, [0.3, 0.3, 0.3]),
        ] {
            let mut ms = models.clone();
            ms[who][at] = f32::NAN;
            let mut vr = ViewReader::new(RawDtype::Bf16, &base, &ms);
            let m = Ties::from_params(&params(&[1.0; 3], &dens), 3).unwrap();
            let mut w = crate::tensor::MemWriter::default();
            let e1 = m.merge(&job(&[n], 3, n), &[], &vr, &mut w).unwrap_err();
            assert!(w.data.is_empty());
            vr.lend = false;
            let e2 = run_reader(&m, &job(&[n], 3, n), &vr).unwrap_err();
            assert_eq!(e1.to_string(), e2.to_string());
            assert!(e1.to_string().contains(&format!("element {at}")), "{e1}");
        }
        models.clear();
    }

    /// The AVX-512 and AVX2 builds of the kernels (`crate::simd`, where the CPU has them) give
    /// the baseline builds' bits: TIES (several densities, both consensus methods, `rescale`,
    /// lent and block inputs), `task_arithmetic` and `linear`, from f32, bf16 and f16 inputs.
    /// Each side runs in its own thread pool whose threads are capped at one build.
    #[test]
    fn avx512_avx2_and_baseline_kernels_give_the_same_bits() {
        use crate::methods::{linear::Linear, task_arithmetic::TaskArithmetic, MergeMethod};
        use crate::raw::RawDtype;
        // Each pool's threads capped at one build: 0 plain, 1 AVX2, 2 the widest there is.
        let pool = |cap: u8| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .start_handler(move |_| match cap {
                    0 => crate::simd::force_plain(true),
                    1 => crate::simd::force_avx2(true),
                    _ => {}
                })
                .build()
                .unwrap()
        };
        let (plain, avx2, simd) = (pool(0), pool(1), pool(2));
        assert!(!avx2.install(crate::simd::avx512));
        assert!(!plain.install(crate::simd::avx2));
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("AMALGAM_NO_AVX2").is_none() {
            assert_eq!(
                simd.install(crate::simd::avx2),
                std::arch::is_x86_feature_detected!("avx2")
            );
        }
        let w = [0.6, 1.3, -0.45, 0.8];
        let (rows, cols) = (203, 509);
        let n = rows * cols;
        for (dtype, step) in [
            (RawDtype::F32, 0.0f32),
            (RawDtype::F32, 0.125),
            (RawDtype::Bf16, 0.0),
            (RawDtype::Bf16, 0.25),
            (RawDtype::F16, 0.0),
        ] {
            let (base, mut models) = if step > 0.0 {
                quantised(70, n, 4, step)
            } else {
                (
                    rand_vec(71, n),
                    (72..76).map(|s| rand_vec(s, n)).collect::<Vec<_>>(),
                )
            };
            // Exact zeros and tiny values in the task vectors.
            for (k, x) in models[1].iter_mut().enumerate().step_by(17) {
                *x = if k % 2 == 0 { base[k] } else { base[k] + 1e-30 };
            }
            let mut vr = ViewReader::new(dtype, &base, &models);
            let mut methods: Vec<(String, Box<dyn MergeMethod>)> = Vec::new();
            for (dens, extra) in [
                ([0.2, 0.2, 0.2, 0.2], None),
                ([0.05, 0.5, 1.0, 0.33], Some(("lambda", Scalar::Num(0.7)))),
                (
                    [0.7, 0.01, 0.3, 0.9],
                    Some(("consensus_method", Scalar::Str("count".into()))),
                ),
                ([0.3, 0.4, 0.5, 0.6], Some(("rescale", Scalar::Bool(true)))),
                (
                    [0.5, 0.5, 0.5, 0.5],
                    Some(("normalize", Scalar::Bool(false))),
                ),
            ] {
                let mut p = params(&w, &dens);
                if let Some((k, v)) = extra.clone() {
                    p = p.with_global(k, v);
                }
                let name = format!("ties {dens:?} {extra:?}");
                methods.push((name, Box::new(Ties::from_params(&p, 4).unwrap())));
            }
            let p = TensorParams::default().with_model_values("weight", &w);
            methods.push((
                "task_arithmetic".into(),
                Box::new(TaskArithmetic::from_params(&p, 4).unwrap()),
            ));
            for normalize in [true, false] {
                let p = p.clone().with_global("normalize", Scalar::Bool(normalize));
                let name = format!("linear normalize {normalize}");
                methods.push((name, Box::new(Linear::from_params(&p, 4).unwrap())));
            }
            for (name, m) in &methods {
                for (lend, block) in [(true, n), (false, n), (false, cols * 5 + 3)] {
                    vr.lend = lend;
                    let jb = job(&[rows, cols], 4, block);
                    let run = |pool: &rayon::ThreadPool| {
                        pool.install(|| {
                            let mut out = crate::tensor::MemWriter::default();
                            m.merge(&jb, &[], &vr, &mut out).unwrap();
                            bits(&out.data)
                        })
                    };
                    let (a, b, c) = (run(&plain), run(&avx2), run(&simd));
                    assert_eq!(a.len(), n);
                    assert!(
                        a == b && a == c,
                        "{name} {dtype:?} step {step} lend {lend} block {block}"
                    );
                }
            }
        }
    }
}
