//! `linear`: weighted average of the models (methods.md §1; mergekit
//! `mergekit/merge_methods/linear.py`). Sharding class **E**.
//!
//! out = Σ_i w_i θ_i / Σ_i w_i (the division only with `normalize`), in f32: the weighted sum is
//! accumulated model by model in config order, then divided, as mergekit does.
//!
//! Parameters:
//! - `weight` (per model, **required**, as in mergekit, where it has no default);
//! - `normalize` (global, default `true`).
//!
//! Inputs: every [`Input::Model`] in config order. `linear` does not use a base
//! (`needs_base = false`, mergekit's base policy "ignored"): a `base_model` that is listed among
//! the models, or that mergekit appends to the inputs when it is not listed, is just one more
//! weighted model, and needs a `weight` like the others.
//!
//! Deviation from mergekit: with `normalize` and |Σ w_i| < 1e-8, mergekit divides anyway
//! (Inf/NaN output); we refuse with an error naming `weight`.

use crate::error::{MergeError, Result};
use crate::methods::gram::map_blocks;
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};

/// Static facts about `linear`.
pub const INFO: MethodInfo = MethodInfo {
    name: "linear",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &["normalize"],
    model_params: &["weight"],
    random: false,
    summary: "weighted average of the models: sum(w_i * theta_i) / sum(w_i)",
};

/// Smallest |Σ w| accepted when normalising.
const MIN_WEIGHT_SUM: f64 = 1e-8;

/// `linear` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Per-model weights, f32 as mergekit casts them.
    weights: Vec<f32>,
    /// Divisor (Σ w) when normalising.
    divisor: Option<f32>,
}

impl Linear {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        if n_models == 0 {
            return Err(MergeError::BadInputs {
                method: "linear".into(),
                message: "needs at least one model".into(),
            });
        }
        let mut p = params.clone();
        p.models.resize(n_models, Default::default());
        let w = p.required_model_nums("weight", "linear")?;
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(MergeError::BadParameter {
                key: "weight".into(),
                message: format!("must be a finite number, got {bad}"),
            });
        }
        let normalize = params.bool("normalize", true)?;
        let weights: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let divisor = if normalize {
            let sum: f64 = weights.iter().map(|&v| f64::from(v)).sum();
            if sum.abs() < MIN_WEIGHT_SUM {
                return Err(MergeError::BadParameter {
                    key: "weight".into(),
                    message: format!(
                        "the weights sum to {sum}, and `normalize: true` divides by that sum; \
                         use weights with a non-zero sum or set `normalize: false`"
                    ),
                });
            }
            Some(sum as f32)
        } else {
            None
        };
        Ok(Self { weights, divisor })
    }
}

impl MergeMethod for Linear {
    fn class(&self) -> ShardClass {
        ShardClass::E
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 1
    }

    fn device_plan(&self) -> Option<crate::methods::device::DevicePlan> {
        Some(crate::methods::device::DevicePlan::Linear {
            weights: self.weights.clone(),
            divisor: self.divisor,
        })
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let inputs: Vec<Input> = (0..self.weights.len()).map(Input::Model).collect();
        map_blocks(job, reader, writer, &inputs, None, |_, b, out| {
            // Model by model over the tile (vectorises); per element the same f32 operations
            // in model order as `Σ_i x_i·w_i`, in the widest build the CPU runs, `crate::simd`.
            crate::simd::run(
                #[inline(always)]
                || self.mix_tile(b, out),
            )
        })
    }
}

impl Linear {
    /// `out = Σ_i w_i·x_i` (model order), divided by the divisor when normalising.
    #[inline(always)]
    fn mix_tile(&self, b: &crate::methods::gram::Tile, out: &mut [f32]) {
        let len = out.len();
        out.fill(0.0);
        for (w, x) in self.weights.iter().zip(&b.x) {
            for (o, v) in out.iter_mut().zip(&x[..len]) {
                *o += v * w;
            }
        }
        if let Some(d) = self.divisor {
            for o in out.iter_mut() {
                *o /= d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::gram::testutil::*;
    use crate::params::Scalar;
    use crate::tensor::MemReader;

    fn reference(models: &[Vec<f32>], w: &[f64], normalize: bool) -> Vec<f64> {
        let n = models[0].len();
        let sum: f64 = w.iter().sum();
        (0..n)
            .map(|e| {
                let s: f64 = models
                    .iter()
                    .zip(w)
                    .map(|(m, wi)| f64::from(m[e]) * wi)
                    .sum();
                if normalize {
                    s / sum
                } else {
                    s
                }
            })
            .collect()
    }

    #[test]
    fn matches_reference() {
        let shape = [37, 129];
        let n = 37 * 129;
        let models: Vec<Vec<f32>> = (0..3).map(|i| rand_vec(10 + i, n)).collect();
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: models.clone(),
        };
        let w = [0.5, 0.3, 1.7];
        for normalize in [true, false] {
            let p = TensorParams::default()
                .with_model_values("weight", &w)
                .with_global("normalize", Scalar::Bool(normalize));
            let m = Linear::from_params(&p, 3).expect("build");
            let got = run_invariant(&m, &job(&shape, 3, false, 64), &r);
            assert_close(&got, &reference(&models, &w, normalize), 1e-6);
        }
    }

    #[test]
    fn weight_is_required() {
        let p = TensorParams::default().with_model_values("weight", &[1.0]);
        let e = Linear::from_params(&p, 2).expect_err("missing weight");
        assert!(e.to_string().contains("weight"), "{e}");
    }

    #[test]
    fn zero_weight_sum_is_refused() {
        let p = TensorParams::default().with_model_values("weight", &[1.0, -1.0]);
        match Linear::from_params(&p, 2) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "weight"),
            other => panic!("expected BadParameter, got {other:?}"),
        }
        // Without normalisation a zero sum is fine.
        let p = p.with_global("normalize", Scalar::Bool(false));
        assert!(Linear::from_params(&p, 2).is_ok());
    }

    #[test]
    fn single_model_is_identity() {
        let x = rand_vec(3, 50);
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![x.clone()],
        };
        let p = TensorParams::default().with_model_values("weight", &[0.3]);
        let m = Linear::from_params(&p, 1).expect("build");
        let got = run(&m, &job(&[50], 1, false, 50), &r);
        assert_close(&got, &f64s(&x), 1e-6);
    }
}
