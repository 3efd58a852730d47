//! `della` and `della_linear`: magnitude-ranked random pruning (MagPrune) of task vectors, then
//! TIES sign consensus (`della`) or a weighted sum (`della_linear`) (methods.md §6; mergekit
//! `sparsify.py:della_magprune`, `merge_methods/generalized_task_arithmetic.py`,
//! `merge_methods/registry.py`).
//!
//! Per model i with 0 < density < 1, for every *rank group* of the tensor:
//! - groups as mergekit's `argsort(dim=1)`: a tensor of shape `[d0, d1, rest..]` is ranked along
//!   axis 1, i.e. one group per `(i0, i_rest)` holding `d1` elements (for a matrix: one row); a
//!   1-D tensor is one group (mergekit's `unsqueeze(0)`), a scalar one group of one element;
//! - r = rank of |δ| in its group, 1..c (ascending; equal magnitudes ranked by flat index — torch's
//!   unstable argsort leaves that order unspecified);
//! - rn = (r − 1)/(c − 1) in f32 (= (r − min r)/(max r − min r)), and rn = 1 when c = 1 (mergekit
//!   would produce NaN there; methods.md §6 guard);
//! - p = f32(density − ε) + (rn·2)·f32(ε), from density − ε to density + ε (f32, in mergekit's
//!   operation order);
//! - kept when the element's Philox word is below `keep_threshold(p)` ([`crate::philox`], keyed by
//!   (seed, model i, tensor name, element index)).
//!
//! `density >= 1` leaves δ_i untouched; `density <= 0` drops it entirely (both before mergekit's
//! ε check). Otherwise density ± ε must lie in (0, 1), else the build fails naming `epsilon`.
//!
//! Rescale (`rescale`, default true): `rescale_mode: l1` (default, mergekit) matches each model's
//! tensor L1 norm (skipped below 1e-7), done by the shared pipeline; `rescale_mode: inverse_prob`
//! (alias `inverse`; the original DELLA code, `rank_magnitude`) divides each kept entry by its p.
//! Mixing: [`crate::methods::gta::merge`] (`della`: consensus `sum`, `normalize` true; `della_linear`:
//! no consensus, `normalize` false).
//!
//! Sharding class **T**: ranks need whole groups (the pipeline reads whole rows; for tensors of
//! three or more dimensions the block size is rounded to whole `d1 × rest` slabs), and the L1
//! rescale needs two reductions per model and tensor.
//!
//! Parameters: per model `weight` (required), `density` (1.0), `epsilon` (0.15); method-wide
//! `normalize`, `rescale` (true), `lambda` (1.0), `int8_mask` (no effect), `consensus_method`
//! (`della` only), `rescale_mode` (amalgam extension, `l1`).

use crate::error::{MergeError, Result};
use crate::methods::dare::options_with_mode;
use crate::methods::gta::{self, Consensus, GtaDefaults, GtaOptions, Sparsifier};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::philox::{keep_threshold, MaskStream};
use crate::tensor::{TensorJob, TensorReader, TensorWriter};
use rayon::prelude::*;

const TIES_GLOBAL: &[&str] = &[
    "normalize",
    "rescale",
    "rescale_mode",
    "lambda",
    "int8_mask",
    "consensus_method",
];
const LINEAR_GLOBAL: &[&str] = &[
    "normalize",
    "rescale",
    "rescale_mode",
    "lambda",
    "int8_mask",
];
const MODEL_PARAMS: &[&str] = &["weight", "density", "epsilon"];

/// mergekit's default `epsilon` (`generalized_task_arithmetic.py`).
pub const DEFAULT_EPSILON: f64 = 0.15;

/// Static facts about `della`.
pub const INFO: MethodInfo = MethodInfo {
    name: "della",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: TIES_GLOBAL,
    model_params: MODEL_PARAMS,
    random: true,
    summary: "DELLA: magnitude-ranked random drop (density ± epsilon), L1 rescale, sign election, normalized sum",
};

/// Static facts about `della_linear`.
pub const INFO_LINEAR: MethodInfo = MethodInfo {
    name: "della_linear",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: LINEAR_GLOBAL,
    model_params: MODEL_PARAMS,
    random: true,
    summary: "DELLA without sign election: magnitude-ranked random drop, L1 rescale, weighted sum",
};

/// How a tensor splits into rank groups: `outer` slabs of `c × inner` elements; group
/// `(slab, g)` holds the elements `slab·c·inner + r·inner + g` for `r` in `0..c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankGroups {
    /// Group length (mergekit's axis 1).
    pub c: usize,
    /// Stride between a group's elements (product of the axes after 1).
    pub inner: usize,
}

impl RankGroups {
    /// Groups of a tensor of `shape`, as mergekit's `della_magprune`.
    pub fn of(shape: &[usize]) -> Self {
        match shape.len() {
            0 => Self { c: 1, inner: 1 },
            1 => Self {
                c: shape[0].max(1),
                inner: 1,
            },
            _ => Self {
                c: shape[1].max(1),
                inner: shape[2..].iter().product::<usize>().max(1),
            },
        }
    }

    /// Elements per slab (`c × inner`).
    pub fn slab(&self) -> usize {
        self.c * self.inner
    }
}

/// Keep probability of rank `rank` (1-based) in a group of `c`, in f32 as mergekit computes it.
#[inline]
pub fn keep_prob(rank: usize, c: usize, density: f64, epsilon: f64) -> f32 {
    let rn = if c <= 1 {
        1.0f32
    } else {
        ((rank as f32 - 1.0) / (c as f32 - 1.0)).clamp(0.0, 1.0)
    };
    (density - epsilon) as f32 + rn * 2.0 * epsilon as f32
}

/// Ranks (1-based, ascending |x|, ties by position) of `vals`, written into `ranks`; `order`
/// is scratch.
fn ranks_of(vals: &[f32], order: &mut Vec<u32>, ranks: &mut [u32]) {
    order.clear();
    order.extend(0..vals.len() as u32);
    // Stable sort: equal magnitudes keep position order.
    order.sort_by(|&a, &b| vals[a as usize].abs().total_cmp(&vals[b as usize].abs()));
    for (pos, &k) in order.iter().enumerate() {
        ranks[k as usize] = pos as u32 + 1;
    }
}

/// What happens to one model's task vector.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Prune {
    /// density ≥ 1: untouched.
    Identity,
    /// density ≤ 0: everything dropped.
    DropAll,
    /// MagPrune with (density, epsilon).
    Rank(f64, f64),
}

/// DELLA's MagPrune sparsifier for one tensor (blocks must hold whole slabs).
#[derive(Debug, Clone)]
pub struct MagPrune {
    groups: RankGroups,
    streams: Vec<MaskStream>,
    models: Vec<Prune>,
    inverse: bool,
}

impl MagPrune {
    fn new(job: &TensorJob, models: &[Prune], inverse: bool) -> Self {
        Self {
            groups: RankGroups::of(&job.shape),
            streams: (0..models.len())
                .map(|i| MaskStream::new(job.seed, i, &job.name))
                .collect(),
            models: models.to_vec(),
            inverse,
        }
    }
}

impl Sparsifier for MagPrune {
    fn is_identity(&self, model: usize) -> bool {
        self.models[model] == Prune::Identity
    }

    fn apply(&self, model: usize, start: usize, delta: &mut [f32]) -> Result<()> {
        let (density, epsilon) = match self.models[model] {
            Prune::Identity => return Ok(()),
            Prune::DropAll => {
                delta.iter_mut().for_each(|x| *x = 0.0);
                return Ok(());
            }
            Prune::Rank(d, e) => (d, e),
        };
        let RankGroups { c, inner } = self.groups;
        let slab = self.groups.slab();
        if !start.is_multiple_of(slab) || !delta.len().is_multiple_of(slab) {
            return Err(MergeError::BadInputs {
                method: "della".into(),
                message: format!(
                    "internal: block {start}+{} is not aligned to rank groups of {slab}",
                    delta.len()
                ),
            });
        }
        let stream = &self.streams[model];
        let inverse = self.inverse;
        delta.par_chunks_mut(slab).enumerate().for_each(|(s, sl)| {
            let base_idx = start + s * slab;
            let mut vals = vec![0.0f32; c];
            let mut ranks = vec![0u32; c];
            let mut order = Vec::with_capacity(c);
            for g in 0..inner {
                for (r, v) in vals.iter_mut().enumerate() {
                    *v = sl[r * inner + g];
                }
                ranks_of(&vals, &mut order, &mut ranks);
                for (r, &rank) in ranks.iter().enumerate() {
                    let k = r * inner + g;
                    let p = keep_prob(rank as usize, c, density, epsilon);
                    sl[k] = if stream.keep(base_idx + k, keep_threshold(f64::from(p))) {
                        if inverse {
                            sl[k] / p
                        } else {
                            sl[k]
                        }
                    } else {
                        0.0
                    };
                }
            }
        });
        Ok(())
    }
}

/// `della` / `della_linear` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Della {
    opts: GtaOptions,
    models: Vec<Prune>,
    inverse: bool,
}

impl Della {
    /// Build from resolved parameters; `ties` selects `della` (sign consensus, normalize).
    pub fn from_params(params: &TensorParams, n_models: usize, ties: bool) -> Result<Self> {
        let (method, defaults) = if ties {
            (
                "della",
                GtaDefaults {
                    consensus: Some(Consensus::Sum),
                    normalize: true,
                    rescale: true,
                },
            )
        } else {
            (
                "della_linear",
                GtaDefaults {
                    consensus: None,
                    normalize: false,
                    rescale: true,
                },
            )
        };
        let (opts, inverse) = options_with_mode(params, n_models, method, defaults)?;
        let densities = params.model_nums("density", 1.0)?;
        let epsilons = params.model_nums("epsilon", DEFAULT_EPSILON)?;
        let mut models = Vec::with_capacity(n_models);
        for (i, (&d, &e)) in densities.iter().zip(&epsilons).enumerate() {
            if d.is_nan() {
                return Err(MergeError::BadParameter {
                    key: "density".into(),
                    message: format!("model #{i}: density must be a number in [0, 1], got NaN"),
                });
            }
            models.push(if d >= 1.0 {
                Prune::Identity
            } else if d <= 0.0 {
                Prune::DropAll
            } else if !e.is_finite() || d + e >= 1.0 || d - e <= 0.0 {
                return Err(MergeError::BadParameter {
                    key: "epsilon".into(),
                    message: format!(
                        "model #{i}: density ± epsilon must lie in (0, 1), got density {d} and \
                         epsilon {e}; choose epsilon < min(density, 1 - density)"
                    ),
                });
            } else {
                Prune::Rank(d, e)
            });
        }
        Ok(Self {
            opts,
            models,
            inverse,
        })
    }
}

impl MergeMethod for Della {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 2
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let sp = MagPrune::new(job, &self.models, self.inverse);
        // The pipeline reads whole rows; rank groups of ≥3-D tensors span a whole slab of rows,
        // so round the block to whole slabs (at least one). Results do not depend on the block.
        let slab = sp.groups.slab();
        let mut job = job.clone();
        job.block_elems = (job.block_elems / slab).max(1) * slab;
        gta::merge(&self.opts, Some(&sp), &job, reader, writer)
    }

    fn device_plan(&self) -> Option<crate::methods::device::DevicePlan> {
        use crate::methods::device::{DevicePlan, DeviceSparsify};
        Some(DevicePlan::Gta {
            opts: self.opts.clone(),
            sparsify: self
                .models
                .iter()
                .map(|m| match *m {
                    Prune::Identity => DeviceSparsify::None,
                    // A keep probability of 0: DARE's mask drops everything.
                    Prune::DropAll => DeviceSparsify::Dare {
                        density: 0.0,
                        inverse: false,
                    },
                    Prune::Rank(density, epsilon) => DeviceSparsify::Della {
                        density,
                        epsilon,
                        inverse: self.inverse,
                    },
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::dare::tests::{assert_close, data, job, naive_mix, reader};
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    fn params(w: &[f64], dens: &[f64], eps: &[f64]) -> TensorParams {
        TensorParams::default()
            .with_model_values("weight", w)
            .with_model_values("density", dens)
            .with_model_values("epsilon", eps)
    }

    /// Naive reference: ranks by a full f64 sort per group (independent of the code under test),
    /// probabilities in f64, the Philox mask as the contract, rescale and mixing in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        j: &TensorJob,
        r: &MemReader,
        w: &[f64],
        dens: &[f64],
        eps: &[f64],
        ties: bool,
        normalize: bool,
        inverse: bool,
        rescale: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let base = r.base.clone().unwrap();
        let numel = base.len();
        // Group membership from the shape, computed by index arithmetic on the full shape.
        let shape = &j.shape;
        let (c, inner) = match shape.len() {
            0 => (1, 1),
            1 => (shape[0], 1),
            _ => (shape[1], shape[2..].iter().product()),
        };
        let mut deltas = Vec::new();
        for (i, m) in r.models.iter().enumerate() {
            let d: Vec<f64> = m.iter().zip(&base).map(|(a, b)| (a - b) as f64).collect();
            if dens[i] >= 1.0 {
                deltas.push(d);
                continue;
            }
            let stream = MaskStream::new(j.seed, i, &j.name);
            let mut masked = vec![0.0f64; numel];
            for slab in 0..numel / (c * inner) {
                for g in 0..inner {
                    let idx: Vec<usize> =
                        (0..c).map(|q| slab * c * inner + q * inner + g).collect();
                    for &k in &idx {
                        // rank = 1 + number of elements smaller, or equal and earlier.
                        let rank = 1 + idx
                            .iter()
                            .filter(|&&o| {
                                d[o].abs() < d[k].abs() || (d[o].abs() == d[k].abs() && o < k)
                            })
                            .count();
                        let rn = if c == 1 {
                            1.0
                        } else {
                            (rank - 1) as f64 / (c - 1) as f64
                        };
                        let p = dens[i] - eps[i] + 2.0 * eps[i] * rn;
                        // Threshold from the f32 probability, as the contract specifies.
                        let p32 = keep_prob(rank, c, dens[i], eps[i]);
                        assert!((p32 as f64 - p).abs() < 1e-6);
                        if stream.keep(k, keep_threshold(p32 as f64)) {
                            masked[k] = if inverse { d[k] / p } else { d[k] };
                        }
                    }
                }
            }
            let b: f64 = d.iter().map(|x| x.abs()).sum();
            let a: f64 = masked.iter().map(|x| x.abs()).sum();
            let f = if rescale && !inverse && b >= 1e-7 && a >= 1e-7 {
                b / a
            } else {
                1.0
            };
            deltas.push(masked.iter().map(|x| x * f).collect());
        }
        naive_mix(&base, &deltas, w, ties, normalize, 1.0)
    }

    #[test]
    fn matches_naive_reference() {
        let w = [0.7, 0.4, 1.0];
        let dens = [0.5, 0.3, 1.0];
        let eps = [0.2, 0.1, 0.15];
        for shape in [vec![23usize, 31], vec![97], vec![4, 6, 5], vec![2, 3, 2, 3]] {
            let numel: usize = shape.iter().product();
            let r = reader(numel, 3);
            for ties in [true, false] {
                for (inverse, rescale) in [(false, true), (true, true), (false, false)] {
                    let mut p =
                        params(&w, &dens, &eps).with_global("rescale", Scalar::Bool(rescale));
                    if inverse {
                        p = p.with_global("rescale_mode", Scalar::Str("inverse_prob".into()));
                    }
                    let m = Della::from_params(&p, 3, ties).unwrap();
                    let j = job("model.layers.1.mlp.down_proj.weight", &shape, 3, 17, 11);
                    let got = merge_in_memory(&m, &j, &r).unwrap();
                    let (want, scale) =
                        naive(&j, &r, &w, &dens, &eps, ties, ties, inverse, rescale);
                    assert_close(&got, &want, &scale);
                }
            }
        }
    }

    #[test]
    fn bit_identical_across_blocks_and_threads() {
        // Rows longer than a tile of the mixing loop: rank groups must still be whole.
        for shape in [vec![40usize, 300], vec![6, 5, 7], vec![8, 3000]] {
            let numel: usize = shape.iter().product();
            let r = reader(numel, 2);
            let p = params(&[1.0, 0.5], &[0.4, 0.6], &[0.1, 0.3]);
            for ties in [true, false] {
                let m = Della::from_params(&p, 2, ties).unwrap();
                let whole = merge_in_memory(&m, &job("t", &shape, 2, numel, 5), &r).unwrap();
                for block in [1usize, 13, 301, 1000] {
                    let got = merge_in_memory(&m, &job("t", &shape, 2, block, 5), &r).unwrap();
                    assert!(got
                        .iter()
                        .zip(&whole)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                let one =
                    pool.install(|| merge_in_memory(&m, &job("t", &shape, 2, 77, 5), &r).unwrap());
                assert!(one
                    .iter()
                    .zip(&whole)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn keep_fraction_follows_rank() {
        // One long row: the smallest third is kept at ≈ density − ε, the largest at ≈ density + ε.
        let c = 30_000;
        let vals: Vec<f32> = (0..c).map(|k| ((k * 7919) % c) as f32 + 1.0).collect();
        let r = MemReader {
            stats: Default::default(),
            base: Some(vec![0.0; c]),
            models: vec![vals.clone()],
        };
        let p = params(&[1.0], &[0.5], &[0.3]).with_global("rescale", Scalar::Bool(false));
        let m = Della::from_params(&p, 1, false).unwrap();
        let got = merge_in_memory(&m, &job("row", &[1, c], 1, 4096, 1), &r).unwrap();
        let frac = |lo: f32, hi: f32| {
            let sel: Vec<usize> = (0..c).filter(|&k| vals[k] > lo && vals[k] <= hi).collect();
            sel.iter().filter(|&&k| got[k] != 0.0).count() as f64 / sel.len() as f64
        };
        let third = c as f32 / 3.0;
        assert!(
            (frac(0.0, third) - 0.3).abs() < 0.03,
            "{}",
            frac(0.0, third)
        );
        assert!(
            (frac(2.0 * third, c as f32) - 0.7).abs() < 0.03,
            "{}",
            frac(2.0 * third, c as f32)
        );
    }

    #[test]
    fn one_column_and_scalar() {
        // c = 1: rn = 1, p = density + ε, no NaN.
        assert!((keep_prob(1, 1, 0.5, 0.2) - 0.7).abs() < 1e-6);
        for shape in [vec![50usize, 1], vec![], vec![1]] {
            let numel: usize = shape.iter().product::<usize>().max(1);
            let r = reader(numel, 2);
            let m = Della::from_params(&params(&[1.0, 1.0], &[0.5, 0.5], &[0.2, 0.2]), 2, true)
                .unwrap();
            let got = merge_in_memory(&m, &job("c1", &shape, 2, 3, 2), &r).unwrap();
            assert!(got.iter().all(|x| x.is_finite()));
            let (want, scale) = naive(
                &job("c1", &shape, 2, 3, 2),
                &r,
                &[1.0, 1.0],
                &[0.5, 0.5],
                &[0.2, 0.2],
                true,
                true,
                false,
                true,
            );
            assert_close(&got, &want, &scale);
        }
    }

    #[test]
    fn density_one_and_zero_task_vectors() {
        let numel = 200;
        let r = reader(numel, 2);
        let base = r.base.clone().unwrap();
        // density 1: plain weighted sum (epsilon not checked).
        let m =
            Della::from_params(&params(&[0.5, 0.5], &[1.0, 1.0], &[0.9, 0.9]), 2, false).unwrap();
        let got = merge_in_memory(&m, &job("d1", &[10, 20], 2, 40, 0), &r).unwrap();
        let deltas: Vec<Vec<f64>> = r
            .models
            .iter()
            .map(|m| m.iter().zip(&base).map(|(a, b)| (a - b) as f64).collect())
            .collect();
        let (want, scale) = naive_mix(&base, &deltas, &[0.5, 0.5], false, false, 1.0);
        assert_close(&got, &want, &scale);
        // All-zero task vectors: norms below 1e-7, no rescale, output = base.
        let zr = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![base.clone(), base.clone()],
        };
        let m =
            Della::from_params(&params(&[1.0, 1.0], &[0.5, 0.5], &[0.1, 0.1]), 2, true).unwrap();
        assert_eq!(
            merge_in_memory(&m, &job("z", &[10, 20], 2, 40, 0), &zr).unwrap(),
            base
        );
        let _ = data(1, 1);
    }

    #[test]
    fn epsilon_window_is_validated() {
        for (d, e) in [(0.5, 0.5), (0.9, 0.15), (0.1, 0.2), (0.5, f64::NAN)] {
            let err = Della::from_params(&params(&[1.0], &[d], &[e]), 1, true).unwrap_err();
            let s = err.to_string();
            assert!(s.contains("epsilon") && s.contains("density"), "{s}");
        }
        // Density outside (0, 1) skips the window check, as mergekit.
        assert!(Della::from_params(&params(&[1.0], &[0.0], &[0.5]), 1, true).is_ok());
        assert!(Della::from_params(&params(&[1.0], &[1.0], &[0.5]), 1, true).is_ok());
        // Default epsilon 0.15 with density 0.9 fails.
        let p = TensorParams::default()
            .with_model_values("weight", &[1.0])
            .with_model_values("density", &[0.9]);
        assert!(Della::from_params(&p, 1, false).is_err());
        const { assert!(INFO.random && INFO_LINEAR.random) };
    }
}
