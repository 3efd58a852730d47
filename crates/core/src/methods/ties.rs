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
                let mut counts = vec![0u64; n * BUCKETS];
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
                let mut keys = Vec::new();
                for (i, b) in buckets.iter().enumerate() {
                    if pass == 1 && b.is_none() {
                        continue;
                    }
                    let hist = &mut counts[i * BUCKETS..(i + 1) * BUCKETS];
                    gta::for_each_delta_block(job, reader, i, |_, delta| {
                        keys.clear();
                        keys.extend(delta.iter().map(|x| KeyOrder::Ascending.key(*x)));
                        match b {
                            None => select::add_hist_hi(&keys, hist),
                            Some(h) => select::add_hist_lo(&keys, *h, hist),
                        }
                        Ok(())
                    })?;
                }
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

    fn run_model_scope(m: &Ties, jobs: &[TensorJob], readers: &[MemReader]) -> Vec<Vec<f32>> {
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
}
