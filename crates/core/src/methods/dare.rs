//! `dare_linear` and `dare_ties`: random drop-and-rescale of task vectors, then task arithmetic
//! (linear) or TIES sign consensus (methods.md §4; mergekit `merge_methods/registry.py`,
//! `merge_methods/generalized_task_arithmetic.py`, `sparsify.py:bernoulli`).
//!
//! Per tensor, with δ_i = θ_i − θ_0:
//! 1. keep-mask m_i ~ Bernoulli(density_i) per element, drawn with [`crate::philox`] keyed by
//!    (seed, model i, tensor name, element index), so masks do not depend on blocks, threads or
//!    device. `density >= 1` leaves δ_i untouched and skips the rescale (as mergekit);
//!    `density <= 0` drops everything.
//! 2. rescale (`rescale`, default true):
//!    - `rescale_mode: l1` (default, mergekit): δ_i ⊙ m_i × ‖δ_i‖₁ / ‖δ_i ⊙ m_i‖₁, skipped when
//!      either norm is below 1e-7 (`sparsify.py:rescaled_masked_tensor`); done by the shared
//!      pipeline ([`crate::methods::gta`]);
//!    - `rescale_mode: inverse_density` (alias `inverse`; the DARE paper): δ_i ⊙ m_i / density_i,
//!      elementwise.
//! 3. mixing by the shared generalized-task-arithmetic pipeline ([`gta::merge`]): weighted deltas
//!    w_i·δ'_i; for `dare_ties` the sign consensus (`consensus_method`, default `sum`); optional
//!    `normalize` and `lambda`.
//!
//! Sharding class: **T** with the L1 rescale (two f64 reductions per model and tensor, one pass
//! over the blocks before the merge pass); **E** with `inverse_density` or no rescale.
//!
//! Parameters (defaults as mergekit `registry.py`): per model `weight` (required), `density`
//! (1.0); method-wide `normalize` (false for both), `rescale` (true), `lambda` (1.0), `int8_mask`
//! (accepted, no effect), `consensus_method` (`dare_ties` only: `sum` or `count`), and the amalgam
//! extension `rescale_mode` (`l1`).

use crate::error::{MergeError, Result};
use crate::methods::gta::{self, Consensus, GtaDefaults, GtaOptions, Sparsifier};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::philox::{keep_threshold, MaskStream};
use crate::tensor::{TensorJob, TensorReader, TensorWriter};
use rayon::prelude::*;

const LINEAR_GLOBAL: &[&str] = &[
    "normalize",
    "rescale",
    "rescale_mode",
    "lambda",
    "int8_mask",
];
const TIES_GLOBAL: &[&str] = &[
    "normalize",
    "rescale",
    "rescale_mode",
    "lambda",
    "int8_mask",
    "consensus_method",
];
const MODEL_PARAMS: &[&str] = &["weight", "density"];

/// Static facts about `dare_linear`.
pub const INFO_LINEAR: MethodInfo = MethodInfo {
    name: "dare_linear",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: LINEAR_GLOBAL,
    model_params: MODEL_PARAMS,
    random: true,
    summary:
        "DARE: random drop of task-vector entries (keep prob. density), L1 rescale, weighted sum",
};

/// Static facts about `dare_ties`.
pub const INFO_TIES: MethodInfo = MethodInfo {
    name: "dare_ties",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: TIES_GLOBAL,
    model_params: MODEL_PARAMS,
    random: true,
    summary: "DARE + TIES: random drop with L1 rescale, sign election, weighted sum",
};

/// How dropped task vectors are rescaled (when `rescale` is true).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RescaleMode {
    /// Match the L1 norm of the unmasked task vector, per tensor (mergekit).
    L1,
    /// Divide kept entries by their keep probability (DARE paper; DELLA paper for `della`).
    Inverse,
}

/// Parse `rescale_mode` (only meaningful when `rescale` is true): `l1` (default) or
/// `inverse_density` / `inverse_prob` / `inverse`.
pub(crate) fn parse_rescale_mode(params: &TensorParams) -> Result<RescaleMode> {
    match params.opt_str("rescale_mode")?.as_deref() {
        None | Some("l1") => Ok(RescaleMode::L1),
        Some("inverse_density" | "inverse_prob" | "inverse") => Ok(RescaleMode::Inverse),
        Some(other) => Err(MergeError::BadParameter {
            key: "rescale_mode".into(),
            message: format!(
                "unknown value \"{other}\"; use `l1` (mergekit's norm-matching rescale) or \
                 `inverse_density` (divide by the keep probability)"
            ),
        }),
    }
}

/// Shared options with the rescale mode applied: the pipeline's L1 rescale only for `l1`.
/// Returns the options and whether the sparsifier must divide by the keep probability.
pub(crate) fn options_with_mode(
    params: &TensorParams,
    n_models: usize,
    method: &'static str,
    defaults: GtaDefaults,
) -> Result<(GtaOptions, bool)> {
    let mut opts = GtaOptions::from_params(params, n_models, method, defaults)?;
    let mode = parse_rescale_mode(params)?;
    let inverse = opts.rescale && mode == RescaleMode::Inverse;
    if inverse {
        opts.rescale = false;
    }
    Ok((opts, inverse))
}

/// Bernoulli keep-mask of DARE for one tensor: model `i` keeps element `idx` when its Philox
/// word is below `keep_threshold(density_i)`.
#[derive(Debug, Clone)]
pub struct DareMask {
    streams: Vec<MaskStream>,
    /// Per model: `None` = untouched (density ≥ 1); else (threshold, scale of kept entries).
    models: Vec<Option<(u64, f32)>>,
}

impl DareMask {
    /// Masks for tensor `name` under `seed`; `inverse` scales kept entries by 1/density.
    pub fn new(seed: u64, name: &str, densities: &[f64], inverse: bool) -> Self {
        Self {
            streams: (0..densities.len())
                .map(|i| MaskStream::new(seed, i, name))
                .collect(),
            models: densities
                .iter()
                .map(|&d| {
                    if d >= 1.0 {
                        None
                    } else {
                        let s = if inverse && d > 0.0 {
                            (1.0 / d) as f32
                        } else {
                            1.0
                        };
                        Some((keep_threshold(d), s))
                    }
                })
                .collect(),
        }
    }

    /// Whether model `i` keeps flat element `idx`.
    #[inline]
    pub fn keep(&self, i: usize, idx: usize) -> bool {
        match self.models[i] {
            None => true,
            Some((t, _)) => self.streams[i].keep(idx, t),
        }
    }
}

impl Sparsifier for DareMask {
    fn is_identity(&self, model: usize) -> bool {
        self.models[model].is_none()
    }

    fn elementwise(&self) -> bool {
        true
    }

    fn apply(&self, model: usize, start: usize, delta: &mut [f32]) -> Result<()> {
        let Some((t, s)) = self.models[model] else {
            return Ok(());
        };
        let stream = &self.streams[model];
        delta
            .par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let off = start + c * PAR_CHUNK;
                for (k, x) in chunk.iter_mut().enumerate() {
                    *x = if stream.keep(off + k, t) { *x * s } else { 0.0 };
                }
            });
        Ok(())
    }
}

/// Elements per parallel work item (results do not depend on it).
pub(crate) const PAR_CHUNK: usize = 4096;

/// `dare_linear` / `dare_ties` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Dare {
    opts: GtaOptions,
    /// Per-model keep density (≥ 0; ≥ 1 means untouched).
    densities: Vec<f64>,
    /// `rescale_mode: inverse_density`.
    inverse: bool,
}

impl Dare {
    /// Build from resolved parameters; `ties` selects `dare_ties` (sign consensus).
    pub fn from_params(params: &TensorParams, n_models: usize, ties: bool) -> Result<Self> {
        let (method, consensus) = if ties {
            ("dare_ties", Some(Consensus::Sum))
        } else {
            ("dare_linear", None)
        };
        let defaults = GtaDefaults {
            consensus,
            normalize: false,
            rescale: true,
        };
        let (opts, inverse) = options_with_mode(params, n_models, method, defaults)?;
        let densities = params.model_nums("density", 1.0)?;
        if let Some(d) = densities.iter().find(|d| d.is_nan() || **d < 0.0) {
            return Err(MergeError::BadParameter {
                key: "density".into(),
                message: format!(
                    "must be in [0, 1] (the fraction of task-vector entries kept), got {d}"
                ),
            });
        }
        Ok(Self {
            opts,
            densities,
            inverse,
        })
    }
}

impl MergeMethod for Dare {
    fn class(&self) -> ShardClass {
        if self.opts.rescale && self.densities.iter().any(|&d| d < 1.0) {
            ShardClass::T
        } else {
            ShardClass::E
        }
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 2
    }

    fn device_plan(&self) -> Option<crate::methods::device::DevicePlan> {
        use crate::methods::device::{DevicePlan, DeviceSparsify};
        Some(DevicePlan::Gta {
            opts: self.opts.clone(),
            sparsify: self
                .densities
                .iter()
                .map(|&density| DeviceSparsify::Dare {
                    density,
                    inverse: self.inverse,
                })
                .collect(),
        })
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let mask = DareMask::new(job.seed, &job.name, &self.densities, self.inverse);
        gta::merge(&self.opts, Some(&mask), job, reader, writer)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    /// Deterministic pseudo-random test data (not the code under test's RNG).
    pub fn data(n: usize, salt: u64) -> Vec<f32> {
        let mut s = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    pub fn job(name: &str, shape: &[usize], n: usize, block: usize, seed: u64) -> TensorJob {
        TensorJob {
            name: name.into(),
            shape: shape.to_vec(),
            n_models: n,
            has_base: true,
            block_elems: block,
            seed,
        }
    }

    pub fn reader(numel: usize, n: usize) -> MemReader {
        let base = data(numel, 1000);
        MemReader {
            stats: Default::default(),
            models: (0..n)
                .map(|i| {
                    data(numel, i as u64 + 1)
                        .iter()
                        .zip(&base)
                        .map(|(d, b)| b + 0.1 * d)
                        .collect()
                })
                .collect(),
            base: Some(base),
        }
    }

    pub fn assert_close(got: &[f32], want: &[f64], scale: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (k, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
            let tol = 2e-6 * s.max(1e-30);
            assert!(
                ((*g as f64) - w).abs() <= tol,
                "element {k}: got {g}, want {w} (tol {tol})"
            );
        }
    }

    /// Naive f64 generalized task arithmetic mixing of already-sparsified deltas; also returns a
    /// magnitude scale for tolerances.
    pub fn naive_mix(
        base: &[f32],
        deltas: &[Vec<f64>],
        w: &[f64],
        consensus: bool,
        normalize: bool,
        lambda: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut out = Vec::new();
        let mut scale = Vec::new();
        for j in 0..base.len() {
            let wd: Vec<f64> = (0..w.len()).map(|i| w[i] * deltas[i][j]).collect();
            let (mut mixed, mut div) = (0.0, 0.0);
            let mut mag = base[j].abs() as f64;
            if consensus {
                let s: f64 = wd.iter().sum();
                let sign = if s >= 0.0 { 1.0 } else { -1.0 };
                for i in 0..w.len() {
                    if wd[i] != 0.0 && wd[i].signum() == sign {
                        mixed += wd[i];
                        div += w[i];
                    }
                }
                if div == 0.0 {
                    div = 1.0;
                }
            } else {
                mixed = wd.iter().sum();
                div = w.iter().sum();
                if div.abs() < 1e-8 {
                    div = 1.0;
                }
            }
            let norm = if normalize { div.abs() } else { 1.0 };
            mag += wd.iter().map(|x| x.abs()).sum::<f64>() * lambda.abs() / norm;
            if normalize {
                mixed /= div;
            }
            out.push(base[j] as f64 + lambda * mixed);
            scale.push(mag);
        }
        (out, scale)
    }

    fn params(w: &[f64], dens: &[f64]) -> TensorParams {
        TensorParams::default()
            .with_model_values("weight", w)
            .with_model_values("density", dens)
    }

    /// Naive DARE: philox mask (the contract), everything else in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive_dare(
        job: &TensorJob,
        r: &MemReader,
        w: &[f64],
        dens: &[f64],
        ties: bool,
        normalize: bool,
        mode: Option<RescaleMode>,
        lambda: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let base = r.base.clone().unwrap();
        let mut deltas = Vec::new();
        for (i, m) in r.models.iter().enumerate() {
            let d: Vec<f64> = m.iter().zip(&base).map(|(a, b)| (a - b) as f64).collect();
            if dens[i] >= 1.0 {
                deltas.push(d);
                continue;
            }
            let s = MaskStream::new(job.seed, i, &job.name);
            let t = keep_threshold(dens[i]);
            let masked: Vec<f64> = d
                .iter()
                .enumerate()
                .map(|(k, x)| if s.keep(k, t) { *x } else { 0.0 })
                .collect();
            let b: f64 = d.iter().map(|x| x.abs()).sum();
            let a: f64 = masked.iter().map(|x| x.abs()).sum();
            let f = match mode {
                Some(RescaleMode::L1) if b >= 1e-7 && a >= 1e-7 => b / a,
                Some(RescaleMode::Inverse) if dens[i] > 0.0 => 1.0 / dens[i],
                _ => 1.0,
            };
            deltas.push(masked.iter().map(|x| x * f).collect());
        }
        naive_mix(&base, &deltas, w, ties, normalize, lambda)
    }

    #[test]
    fn matches_naive_reference() {
        let shape = [37, 53];
        let numel = 37 * 53;
        let r = reader(numel, 3);
        let w = [0.5, 0.3, 0.8];
        let dens = [0.3, 0.7, 1.0];
        for ties in [false, true] {
            for (normalize, mode, lambda) in [
                (false, Some(RescaleMode::L1), 1.0),
                (true, Some(RescaleMode::L1), 1.3),
                (false, Some(RescaleMode::Inverse), 1.0),
                (false, None, 0.7),
            ] {
                let mut p = params(&w, &dens)
                    .with_global("normalize", Scalar::Bool(normalize))
                    .with_global("lambda", Scalar::Num(lambda));
                match mode {
                    None => p = p.with_global("rescale", Scalar::Bool(false)),
                    Some(RescaleMode::Inverse) => {
                        p = p.with_global("rescale_mode", Scalar::Str("inverse_density".into()))
                    }
                    Some(RescaleMode::L1) => {}
                }
                let m = Dare::from_params(&p, 3, ties).unwrap();
                let j = job(
                    "model.layers.0.self_attn.q_proj.weight",
                    &shape,
                    3,
                    1 << 20,
                    7,
                );
                let got = merge_in_memory(&m, &j, &r).unwrap();
                let (want, scale) = naive_dare(&j, &r, &w, &dens, ties, normalize, mode, lambda);
                assert_close(&got, &want, &scale);
            }
        }
    }

    #[test]
    fn bit_identical_across_blocks_and_threads() {
        let shape = [3, 20_000];
        let numel = 60_000;
        let r = reader(numel, 2);
        let p = params(&[1.0, 0.6], &[0.4, 0.2]);
        for ties in [false, true] {
            let m = Dare::from_params(&p, 2, ties).unwrap();
            let whole = merge_in_memory(&m, &job("t", &shape, 2, numel, 3), &r).unwrap();
            for block in [1usize, 7, 4099, 20_001] {
                let got = merge_in_memory(&m, &job("t", &shape, 2, block, 3), &r).unwrap();
                assert!(
                    got.iter()
                        .zip(&whole)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "block {block}"
                );
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let single =
                pool.install(|| merge_in_memory(&m, &job("t", &shape, 2, 999, 3), &r).unwrap());
            assert!(single
                .iter()
                .zip(&whole)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn mask_fraction_and_seed_dependence() {
        // With lambda 1, no rescale, a single weight-1 model: output = base + δ⊙m.
        let numel = 100_000;
        let r = reader(numel, 1);
        let p = params(&[1.0], &[0.25]).with_global("rescale", Scalar::Bool(false));
        let m = Dare::from_params(&p, 1, false).unwrap();
        let a = merge_in_memory(&m, &job("x", &[numel], 1, 4096, 1), &r).unwrap();
        let b = merge_in_memory(&m, &job("x", &[numel], 1, 4096, 2), &r).unwrap();
        let base = r.base.as_ref().unwrap();
        let kept = a.iter().zip(base).filter(|(x, y)| x != y).count() as f64 / numel as f64;
        assert!((kept - 0.25).abs() < 0.01, "kept {kept}");
        assert!(a.iter().zip(&b).any(|(x, y)| x != y));
    }

    #[test]
    fn density_one_is_task_arithmetic() {
        let numel = 500;
        let r = reader(numel, 2);
        let w = [0.4, 0.9];
        let m = Dare::from_params(&params(&w, &[1.0, 1.0]), 2, false).unwrap();
        assert_eq!(m.class(), ShardClass::E);
        let j = job("y", &[numel], 2, 64, 0);
        let got = merge_in_memory(&m, &j, &r).unwrap();
        let base = r.base.clone().unwrap();
        let deltas: Vec<Vec<f64>> = r
            .models
            .iter()
            .map(|m| m.iter().zip(&base).map(|(a, b)| (a - b) as f64).collect())
            .collect();
        let (want, scale) = naive_mix(&base, &deltas, &w, false, false, 1.0);
        assert_close(&got, &want, &scale);
    }

    #[test]
    fn zero_task_vectors_skip_rescale() {
        // All-zero task vectors: output = base.
        let numel = 300;
        let base = data(numel, 5);
        let r = MemReader {
            stats: Default::default(),
            models: vec![base.clone(), base.clone()],
            base: Some(base.clone()),
        };
        let m = Dare::from_params(&params(&[1.0, 1.0], &[0.5, 0.5]), 2, true).unwrap();
        let got = merge_in_memory(&m, &job("z", &[numel], 2, 100, 9), &r).unwrap();
        assert_eq!(got, base);
        // Tiny task vector (‖δ‖₁ = 3e-9 < 1e-7): masked but not rescaled.
        let r = MemReader {
            stats: Default::default(),
            models: vec![vec![1e-11; numel]],
            base: Some(vec![0.0; numel]),
        };
        let m = Dare::from_params(&params(&[1.0], &[0.5]), 1, false).unwrap();
        let j = job("tiny", &[numel], 1, 7, 9);
        let got = merge_in_memory(&m, &j, &r).unwrap();
        let s = MaskStream::new(9, 0, "tiny");
        let t = keep_threshold(0.5);
        for (k, g) in got.iter().enumerate() {
            assert_eq!(*g, if s.keep(k, t) { 1e-11 } else { 0.0 });
        }
        assert!(got.contains(&0.0) && got.iter().any(|g| *g != 0.0));
    }

    #[test]
    fn density_zero_drops_all() {
        let numel = 50;
        let r = reader(numel, 1);
        let base = r.base.clone().unwrap();
        let m = Dare::from_params(&params(&[1.0], &[0.0]), 1, false).unwrap();
        assert_eq!(
            merge_in_memory(&m, &job("a", &[numel], 1, 8, 0), &r).unwrap(),
            base
        );
    }

    #[test]
    fn bad_parameters_name_the_key() {
        let e = Dare::from_params(&params(&[1.0], &[-0.1]), 1, false).unwrap_err();
        assert!(e.to_string().contains("density"), "{e}");
        let e = Dare::from_params(
            &TensorParams::default().with_model_values("density", &[0.5]),
            1,
            true,
        )
        .unwrap_err();
        assert!(e.to_string().contains("weight"), "{e}");
        let p = params(&[1.0], &[0.5]).with_global("rescale_mode", Scalar::Str("l7".into()));
        let e = Dare::from_params(&p, 1, true).unwrap_err();
        assert!(e.to_string().contains("rescale_mode"), "{e}");
        const { assert!(INFO_TIES.random && INFO_LINEAR.random && INFO_TIES.needs_base) };
    }
}
