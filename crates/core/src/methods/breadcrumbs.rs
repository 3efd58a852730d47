//! `breadcrumbs` and `breadcrumbs_ties` (methods.md §5; mergekit
//! `mergekit/merge_methods/generalized_task_arithmetic.py` with `sparsify.py:magnitude_outliers`,
//! registered in `registry.py`). Sharding class T.
//!
//! Per tensor and per model: drop the `n_top = ⌊γ·d⌋` largest `|δ|` (outliers) and the
//! `n_bot = max(0, d − ⌊density·d⌋ − n_top)` smallest, keeping the `⌊density·d⌋` positions
//! `[n_bot, n_bot + ⌊density·d⌋)` of the ascending magnitude order (exact selection; equal
//! magnitudes ordered by flat index; [`crate::methods::sparsify::magnitude_outliers`]);
//! `density ≥ 1` keeps everything. Then the shared pipeline ([`crate::methods::gta`]):
//! `breadcrumbs` is a weighted sum (`normalize` false), `breadcrumbs_ties` adds the `sum` sign
//! consensus (`normalize` false).
//!
//! **Small tensors.** methods.md §5 describes the reference slicing `[n_bot:-n_top]`, which is
//! empty when `n_top = 0` (every tensor with `γ·d < 1`, e.g. norms and biases with d < 100 at the
//! default γ), dropping the whole task vector. mergekit 0.1.5 — the version whose results
//! existing configs must reproduce — already keeps `[n_bot, n_bot + target)`, i.e. the fixed
//! behaviour, so that is the default here. `breadcrumbs_legacy_slice: true` reproduces the older
//! mergekit bug for configs tuned against it.
//!
//! Parameters: per model `weight` (required), `density` (1.0; in (0, 1]), `gamma` (0.01; in
//! [0, 1]); method-wide `normalize` (false), `lambda` (1.0), `rescale` (false), `int8_mask`
//! (no effect), `breadcrumbs_legacy_slice` (false), and for `breadcrumbs_ties`
//! `consensus_method` (`sum` | `count`, default `sum`).

use crate::error::{MergeError, Result};
use crate::methods::gta::{self, Consensus, GtaDefaults, GtaOptions};
use crate::methods::sparsify;
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `breadcrumbs`.
pub const INFO: MethodInfo = MethodInfo {
    name: "breadcrumbs",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &[
        "normalize",
        "lambda",
        "rescale",
        "int8_mask",
        "breadcrumbs_legacy_slice",
    ],
    model_params: &["weight", "density", "gamma"],
    random: false,
    summary: "Model Breadcrumbs: drop the largest and smallest task-vector entries, weighted sum",
};

/// Static facts about `breadcrumbs_ties`.
pub const INFO_TIES: MethodInfo = MethodInfo {
    name: "breadcrumbs_ties",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &[
        "normalize",
        "lambda",
        "rescale",
        "int8_mask",
        "breadcrumbs_legacy_slice",
        "consensus_method",
    ],
    model_params: &["weight", "density", "gamma"],
    random: false,
    summary: "Model Breadcrumbs with TIES sign consensus and disjoint mixing",
};

/// `breadcrumbs` / `breadcrumbs_ties` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Breadcrumbs {
    /// The shared pipeline's options.
    pub opts: GtaOptions,
    /// Per-model `density`.
    pub densities: Vec<f64>,
    /// Per-model `gamma`.
    pub gammas: Vec<f64>,
    /// `breadcrumbs_legacy_slice`: drop everything when `⌊γ·d⌋ = 0` (old mergekit).
    pub legacy_slice: bool,
}

impl Breadcrumbs {
    /// Build from resolved parameters; `ties` selects `breadcrumbs_ties`.
    pub fn from_params(params: &TensorParams, n_models: usize, ties: bool) -> Result<Self> {
        let (name, consensus) = if ties {
            (INFO_TIES.name, Some(Consensus::Sum))
        } else {
            (INFO.name, None)
        };
        let defaults = GtaDefaults {
            consensus,
            normalize: false,
            rescale: false,
        };
        let opts = GtaOptions::from_params(params, n_models, name, defaults)?;
        let densities = sparsify::densities(params, n_models)?;
        let gammas = (0..n_models)
            .map(|i| {
                let g = params.model_num(i, "gamma", 0.01)?;
                if (0.0..=1.0).contains(&g) {
                    Ok(g)
                } else {
                    Err(MergeError::BadParameter {
                        key: "gamma".into(),
                        message: format!(
                            "model #{i}: gamma is the fraction of largest entries dropped and \
                             must be in [0, 1], got {g}"
                        ),
                    })
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let legacy_slice = params.bool("breadcrumbs_legacy_slice", false)?;
        Ok(Self {
            opts,
            densities,
            gammas,
            legacy_slice,
        })
    }
}

impl MergeMethod for Breadcrumbs {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 3
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let sp = sparsify::magnitude_outliers(
            job,
            reader,
            &self.densities,
            &self.gammas,
            self.legacy_slice,
        )?;
        gta::merge(&self.opts, Some(&sp), job, reader, writer)
    }

    fn device_plan(&self) -> Option<crate::methods::device::DevicePlan> {
        use crate::methods::device::{DevicePlan, DeviceSparsify};
        Some(DevicePlan::Gta {
            opts: self.opts.clone(),
            sparsify: self
                .densities
                .iter()
                .zip(&self.gammas)
                .map(|(&density, &gamma)| DeviceSparsify::Outliers {
                    density,
                    gamma,
                    legacy: self.legacy_slice,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::task_arithmetic::tests::{assert_close, job, rand_vec};
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    /// Naive mergekit 0.1.5 breadcrumbs in f64 (stable ascending sort, index tie-break).
    #[allow(clippy::too_many_arguments)]
    fn naive(
        base: &[f32],
        models: &[Vec<f32>],
        w: &[f64],
        dens: &[f64],
        gam: &[f64],
        ties: bool,
        normalize: bool,
        legacy: bool,
    ) -> Vec<f64> {
        let n = base.len();
        let sparse: Vec<Vec<f64>> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let d: Vec<f64> = m.iter().zip(base).map(|(a, b)| (a - b) as f64).collect();
                if dens[i] >= 1.0 {
                    return d;
                }
                let target = (dens[i] * n as f64).floor() as i64;
                let n_top = (gam[i] * n as f64).floor() as i64;
                let n_bot = (n as i64 - target - n_top).max(0) as usize;
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&a, &b| d[a].abs().partial_cmp(&d[b].abs()).unwrap().then(a.cmp(&b)));
                let mut out = vec![0.0; n];
                if legacy && n_top == 0 {
                    return out;
                }
                for &k in &idx[n_bot..n_bot + target as usize] {
                    out[k] = d[k];
                }
                out
            })
            .collect();
        (0..n)
            .map(|j| {
                let v: Vec<f64> = (0..w.len()).map(|i| w[i] * sparse[i][j]).collect();
                let (mut mix, mut div);
                if ties {
                    let pos = v.iter().sum::<f64>() >= 0.0;
                    mix = 0.0;
                    div = 0.0;
                    for i in 0..v.len() {
                        if (pos && v[i] > 0.0) || (!pos && v[i] < 0.0) {
                            mix += v[i];
                            div += w[i];
                        }
                    }
                    if div == 0.0 {
                        div = 1.0;
                    }
                } else {
                    mix = v.iter().sum();
                    div = w.iter().sum();
                }
                if normalize {
                    mix /= div;
                }
                base[j] as f64 + mix
            })
            .collect()
    }

    fn params(w: &[f64], dens: &[f64], gam: &[f64]) -> TensorParams {
        TensorParams::default()
            .with_model_values("weight", w)
            .with_model_values("density", dens)
            .with_model_values("gamma", gam)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matches_naive_reference_both_variants() {
        let shape = [11, 19];
        let n = 11 * 19;
        let base = rand_vec(30, n);
        let models: Vec<Vec<f32>> = (31..34)
            .map(|s| {
                // Quantised task vectors: many equal magnitudes at the cuts.
                rand_vec(s, n)
                    .iter()
                    .zip(&base)
                    .map(|(x, b)| b + (x * 16.0).round() / 16.0)
                    .collect()
            })
            .collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        let w = [1.0, 0.5, 0.8];
        for ties in [false, true] {
            for (dens, gam, normalize) in [
                ([0.5, 0.9, 0.3], [0.01, 0.05, 0.1], false),
                ([1.0, 0.7, 0.2], [0.01, 0.0, 0.5], true),
                ([0.9, 0.9, 0.9], [0.2, 0.2, 0.2], false),
            ] {
                let p = params(&w, &dens, &gam).with_global("normalize", Scalar::Bool(normalize));
                let m = Breadcrumbs::from_params(&p, 3, ties).unwrap();
                let want = naive(&base, &models, &w, &dens, &gam, ties, normalize, false);
                let whole = merge_in_memory(&m, &job(&shape, 3, n), &reader).unwrap();
                assert_close(&whole, &want);
                for block in [1, 19, 40] {
                    let small = merge_in_memory(&m, &job(&shape, 3, block), &reader).unwrap();
                    assert_eq!(bits(&whole), bits(&small));
                }
            }
        }
    }

    #[test]
    fn small_tensor_gamma_below_one_element() {
        // d = 50, γ = 0.01: ⌊γ·d⌋ = 0. mergekit 0.1.5 keeps the ⌊0.5·50⌋ = 25 largest; the
        // legacy slice drops the whole task vector (result = base).
        let n = 50;
        let base = rand_vec(40, n);
        let models: Vec<Vec<f32>> = (41..44).map(|s| rand_vec(s, n)).collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        let w = [1.0, 1.0, 1.0];
        let (dens, gam) = ([0.5; 3], [0.01; 3]);
        for ties in [false, true] {
            let m = Breadcrumbs::from_params(&params(&w, &dens, &gam), 3, ties).unwrap();
            let got = merge_in_memory(&m, &job(&[n], 3, n), &reader).unwrap();
            assert_close(
                &got,
                &naive(&base, &models, &w, &dens, &gam, ties, false, false),
            );
            assert_ne!(got, base);
            let p =
                params(&w, &dens, &gam).with_global("breadcrumbs_legacy_slice", Scalar::Bool(true));
            let m = Breadcrumbs::from_params(&p, 3, ties).unwrap();
            let got = merge_in_memory(&m, &job(&[n], 3, 7), &reader).unwrap();
            assert_eq!(got, base);
            assert_close(
                &got,
                &naive(&base, &models, &w, &dens, &gam, ties, false, true),
            );
        }
    }

    #[test]
    fn density_one_is_task_arithmetic_and_errors() {
        let n = 30;
        let base = rand_vec(50, n);
        let models: Vec<Vec<f32>> = (51..54).map(|s| rand_vec(s, n)).collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        let w = [0.3, 0.3, 0.4];
        let m = Breadcrumbs::from_params(&params(&w, &[1.0; 3], &[0.5; 3]), 3, false).unwrap();
        let got = merge_in_memory(&m, &job(&[n], 3, 4), &reader).unwrap();
        let want: Vec<f64> = (0..n)
            .map(|j| {
                base[j] as f64
                    + (0..3)
                        .map(|i| w[i] * (models[i][j] - base[j]) as f64)
                        .sum::<f64>()
            })
            .collect();
        assert_close(&got, &want);
        match Breadcrumbs::from_params(&params(&w, &[0.5; 3], &[-0.1, 0.0, 0.0]), 3, true) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "gamma"),
            other => panic!("{other:?}"),
        }
        match Breadcrumbs::from_params(&params(&w, &[0.5, 2.0, 0.5], &[0.0; 3]), 3, false) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "density"),
            other => panic!("{other:?}"),
        }
    }
}
