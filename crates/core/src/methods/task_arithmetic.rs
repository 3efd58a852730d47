//! `task_arithmetic` (methods.md §2; mergekit `mergekit/merge_methods/generalized_task_arithmetic.py`
//! registered in `registry.py` without consensus or sparsification). Sharding class E.
//!
//! `θ = θ_0 + λ · Σ_i w_i δ_i` (divided by `Σ_i w_i` with `normalize`; a divisor with
//! `|Σ w| < 1e-8` is replaced by 1 as mergekit does, but `normalize: true` with weights summing
//! to zero is rejected up front naming `weight`).
//!
//! Parameters: per-model `weight` (required, as in mergekit); `lambda` 1.0; `normalize` false;
//! `rescale` and `int8_mask` accepted and without effect (nothing is sparsified).

use crate::error::Result;
use crate::methods::gta::{self, GtaDefaults, GtaOptions};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `task_arithmetic`.
pub const INFO: MethodInfo = MethodInfo {
    name: "task_arithmetic",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &["lambda", "normalize", "rescale", "int8_mask"],
    model_params: &["weight"],
    random: false,
    summary: "Task arithmetic: base + lambda * weighted sum of task vectors (model - base)",
};

/// mergekit's defaults for `task_arithmetic`.
pub const DEFAULTS: GtaDefaults = GtaDefaults {
    consensus: None,
    normalize: false,
    rescale: false,
};

/// `task_arithmetic` configured for one tensor.
#[derive(Debug, Clone)]
pub struct TaskArithmetic {
    /// The shared pipeline's options.
    pub opts: GtaOptions,
}

impl TaskArithmetic {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        Ok(Self {
            opts: GtaOptions::from_params(params, n_models, INFO.name, DEFAULTS)?,
        })
    }
}

impl MergeMethod for TaskArithmetic {
    fn class(&self) -> ShardClass {
        ShardClass::E
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 2
    }

    fn device_plan(&self) -> Option<crate::methods::device::DevicePlan> {
        Some(crate::methods::device::DevicePlan::Gta {
            opts: self.opts.clone(),
            sparsify: vec![crate::methods::device::DeviceSparsify::None; self.opts.weights.len()],
        })
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        gta::merge(&self.opts, None, job, reader, writer)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::MergeError;
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    /// Deterministic pseudo-random values in about [-1, 1].
    pub(crate) fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    pub(crate) fn job(shape: &[usize], n_models: usize, block: usize) -> TensorJob {
        TensorJob {
            name: "w".into(),
            shape: shape.to_vec(),
            n_models,
            has_base: true,
            block_elems: block,
            seed: 0,
        }
    }

    pub(crate) fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!(
                ((*g as f64) - w).abs() <= tol,
                "element {i}: got {g}, want {w}"
            );
        }
    }

    #[test]
    fn matches_naive_reference() {
        let n = 6 * 7;
        let base = rand_vec(1, n);
        let models: Vec<Vec<f32>> = (2..5).map(|s| rand_vec(s, n)).collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        let w = [0.5, -0.3, 1.2];
        for (normalize, lambda) in [(false, 1.0), (true, 1.0), (false, 0.7), (true, 2.5)] {
            let p = TensorParams::default()
                .with_model_values("weight", &w)
                .with_global("normalize", Scalar::Bool(normalize))
                .with_global("lambda", Scalar::Num(lambda));
            let m = TaskArithmetic::from_params(&p, 3).unwrap();
            let sw: f64 = w.iter().sum();
            let want: Vec<f64> = (0..n)
                .map(|j| {
                    let b = base[j] as f64;
                    let mut mix: f64 = (0..3).map(|i| w[i] * (models[i][j] as f64 - b)).sum();
                    if normalize {
                        mix /= sw;
                    }
                    b + lambda * mix
                })
                .collect();
            let whole = merge_in_memory(&m, &job(&[6, 7], 3, n), &reader).unwrap();
            assert_close(&whole, &want);
            let small = merge_in_memory(&m, &job(&[6, 7], 3, 5), &reader).unwrap();
            assert_eq!(
                whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                small.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn weight_required_and_zero_sum() {
        let p = TensorParams::default().with_model_values("weight", &[1.0]);
        match TaskArithmetic::from_params(&p, 2) {
            Err(MergeError::MissingParameter { key, .. }) => assert_eq!(key, "weight"),
            other => panic!("{other:?}"),
        }
        // Zero-sum weights: fine without normalize, an error with it.
        let p = TensorParams::default().with_model_values("weight", &[1.0, -1.0]);
        let m = TaskArithmetic::from_params(&p, 2).unwrap();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(vec![1.0, 2.0]),
            models: vec![vec![2.0, 2.0], vec![1.5, 3.0]],
        };
        let out = merge_in_memory(&m, &job(&[2], 2, 2), &reader).unwrap();
        assert_eq!(out, vec![1.5, 1.0]);
        let p = p.with_global("normalize", Scalar::Bool(true));
        match TaskArithmetic::from_params(&p, 2) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "weight"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_nan_and_missing_base() {
        let p = TensorParams::default().with_model_values("weight", &[1.0]);
        let m = TaskArithmetic::from_params(&p, 1).unwrap();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(vec![1.0, f32::INFINITY]),
            models: vec![vec![2.0, 2.0]],
        };
        assert!(matches!(
            merge_in_memory(&m, &job(&[2], 1, 2), &reader),
            Err(MergeError::Numeric { .. })
        ));
        let mut j = job(&[2], 1, 2);
        j.has_base = false;
        let reader = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![vec![2.0, 2.0]],
        };
        assert!(merge_in_memory(&m, &j, &reader).is_err());
    }
}
