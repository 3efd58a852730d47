//! `multislerp`: barycentric interpolation of N models on the hypersphere (methods.md §19;
//! mergekit `mergekit/merge_methods/multislerp.py`). Sharding class **T** (N(N+1)/2 reductions
//! per tensor, then elementwise).
//!
//! With x_i the models (or, with a base, the task vectors θ_i − θ_0), weights w_i (divided by
//! their sum with `normalize_weights`), and eps:
//! 1. n_i = ‖x_i‖, u_i = x_i / (n_i + eps);
//! 2. m = Σ w_i u_i; if ‖m‖ < eps: with two models out = w_1 x_1 + w_2 x_2 (+ base), otherwise
//!    an error (mergekit's); else μ = m / ‖m‖;
//! 3. tangent vectors u_i − (u_i·μ) μ, combined: T = Σ w_i (u_i − (u_i·μ) μ);
//! 4. exponential map: r = μ cos(‖T‖+eps) + T sin(‖T‖+eps)/(‖T‖+eps);
//! 5. out = r · Σ w_i n_i (+ base).
//!
//! Streaming: every vector above lies in the span of the x_i, so the method gathers the Gram
//! matrix G_ij = x_i·x_j in one f64 pass ([`crate::methods::gram`]), carries μ and T as
//! coefficients on the u_i, and writes out = Σ c_i x_i (+ base) in a second pass. mergekit does
//! the same algebra elementwise in f32; the results agree to f32 rounding.
//!
//! Parameters: `weight` (per model, **required**, as in mergekit), `normalize_weights` (global,
//! default true), `eps` (global, default 1e-8).
//!
//! Inputs: N ≥ 1 [`Input::Model`]s (the base excluded) and optionally [`Input::Base`]. One
//! model: it is copied unchanged (mergekit).
//!
//! Deviations from mergekit: weights that sum to ~0 with `normalize_weights` are refused
//! (mergekit divides by zero); when every task vector (or model) with a non-zero weight is
//! exactly zero, the result is the base (zero without one) instead of mergekit's "weighted sum
//! is zero" error for N ≥ 3 (for N = 2 mergekit's fallback gives the same result).

use crate::error::{MergeError, Result};
use crate::methods::device::{DevicePlan, GramCombine, GramMatrices};
use crate::methods::gram::{
    check_gram, copy_input, gram, matvec, qform, write_combination, GroupMap, Grouping,
};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use std::sync::Arc;

/// Static facts about `multislerp`.
pub const INFO: MethodInfo = MethodInfo {
    name: "multislerp",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &["normalize_weights", "eps"],
    model_params: &["weight"],
    random: false,
    summary: "weighted spherical barycentre of N models (of task vectors, with a base)",
};

/// `multislerp` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Multislerp {
    weights: Vec<f64>,
    eps: f64,
    has_base: bool,
}

impl Multislerp {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize, has_base: bool) -> Result<Self> {
        if n_models == 0 {
            return Err(MergeError::BadInputs {
                method: "multislerp".into(),
                message: "needs at least one model besides the base_model".into(),
            });
        }
        let mut p = params.clone();
        p.models.resize(n_models, Default::default());
        let mut weights = p.required_model_nums("weight", "multislerp")?;
        if let Some(bad) = weights.iter().find(|v| !v.is_finite()) {
            return Err(MergeError::BadParameter {
                key: "weight".into(),
                message: format!("must be a finite number, got {bad}"),
            });
        }
        let eps = params.num("eps", 1e-8)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(MergeError::BadParameter {
                key: "eps".into(),
                message: format!("must be a finite number >= 0, got {eps}"),
            });
        }
        if params.bool("normalize_weights", true)? && n_models > 1 {
            let sum: f64 = weights.iter().sum();
            if sum.abs() < 1e-8 {
                return Err(MergeError::BadParameter {
                    key: "weight".into(),
                    message: format!(
                        "the weights sum to {sum}, and `normalize_weights: true` divides by \
                         that sum; use weights with a non-zero sum"
                    ),
                });
            }
            for w in &mut weights {
                *w /= sum;
            }
        }
        Ok(Self {
            weights,
            eps,
            has_base,
        })
    }

    /// The whole tensor is one vector.
    const GROUPING: Grouping = Grouping::Whole;

    /// The vectors' inputs: every model (minus the base when one is set).
    fn inputs(&self) -> Vec<Input> {
        (0..self.weights.len()).map(Input::Model).collect()
    }

    /// The f32 coefficients of every group (`groups × N`), from the Gram matrices of
    /// [`Self::inputs`].
    fn coefficients(&self, g: &GramMatrices) -> Result<Vec<f32>> {
        check_gram(g, self.weights.len(), "multislerp")?;
        let mut c = Vec::with_capacity(g.groups * g.n);
        for k in 0..g.groups {
            c.extend(
                self.group_coefficients(g.matrix(k))?
                    .iter()
                    .map(|&v| v as f32),
            );
        }
        Ok(c)
    }

    /// Coefficients c_i such that out = Σ c_i x_i (+ base), from one Gram matrix `g`.
    fn group_coefficients(&self, g: &[f64]) -> Result<Vec<f64>> {
        let n = self.weights.len();
        let w = &self.weights;
        let eps = self.eps;
        let norms: Vec<f64> = (0..n).map(|i| g[i * n + i].max(0.0).sqrt()).collect();
        if (0..n).all(|i| w[i] == 0.0 || norms[i] == 0.0) {
            return Ok(vec![0.0; n]);
        }
        // Gram matrix of the u_i.
        let mut gu = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                gu[i * n + j] = g[i * n + j] / ((norms[i] + eps) * (norms[j] + eps));
            }
        }
        let mean_norm = qform(&gu, w, w).max(0.0).sqrt();
        if mean_norm < eps {
            if n == 2 {
                return Ok(w.clone());
            }
            return Err(MergeError::BadInputs {
                method: "multislerp".into(),
                message: "the weighted sum of the input tensors is zero (antipodal vectors with \
                          weights that balance out); try different weights"
                    .into(),
            });
        }
        // μ = Σ b_i u_i.
        let b: Vec<f64> = w.iter().map(|x| x / mean_norm).collect();
        let dots = matvec(&gu, &b); // u_i·μ
        let s: f64 = w.iter().zip(&dots).map(|(wi, di)| wi * di).sum();
        // T = Σ_i w_i u_i − (Σ_i w_i d_i) μ.
        let tang: Vec<f64> = w.iter().zip(&b).map(|(wi, bi)| wi - s * bi).collect();
        let tn = qform(&gu, &tang, &tang).max(0.0).sqrt() + eps;
        let avg_norm: f64 = norms.iter().zip(w).map(|(ni, wi)| ni * wi).sum();
        Ok((0..n)
            .map(|i| {
                let r = b[i] * tn.cos() + tang[i] * (tn.sin() / tn);
                r * avg_norm / (norms[i] + eps)
            })
            .collect())
    }
}

impl MergeMethod for Multislerp {
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
        let n = self.weights.len();
        if n == 1 {
            return copy_input(job, reader, writer, Input::Model(0));
        }
        let inputs = self.inputs();
        let base = (self.has_base && job.has_base).then_some(Input::Base);
        let map = GroupMap::new(job, Self::GROUPING);
        let g = gram(job, reader, &inputs, base, map)?;
        let c = self.coefficients(&g)?;
        write_combination(job, reader, writer, &inputs, base, map, &c)
    }

    /// None for a single model (copied unchanged, which keeps −0.0 where Σ c_i x_i would not);
    /// otherwise the base is the one the method was built with (the executor's jobs agree).
    fn device_plan(&self) -> Option<DevicePlan> {
        if self.weights.len() == 1 {
            return None;
        }
        let method = self.clone();
        Some(DevicePlan::Gram {
            inputs: self.inputs(),
            base: self.has_base.then_some(Input::Base),
            grouping: Self::GROUPING.into(),
            coefficients: Arc::new(move |g| method.coefficients(g)),
            combine: GramCombine::Deltas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::gram::testutil::*;
    use crate::params::Scalar;
    use crate::tensor::MemReader;

    /// Naive f64 multislerp following multislerp.py, on whole vectors.
    fn reference(
        xs: &[Vec<f64>],
        w: &[f64],
        base: Option<&[f64]>,
        eps: f64,
        normalize: bool,
    ) -> Vec<f64> {
        let d = xs[0].len();
        let sub: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| match base {
                Some(b) => x.iter().zip(b).map(|(a, c)| a - c).collect(),
                None => x.clone(),
            })
            .collect();
        let sum: f64 = if normalize { w.iter().sum() } else { 1.0 };
        let w: Vec<f64> = w.iter().map(|x| x / sum).collect();
        let norms: Vec<f64> = sub.iter().map(|x| dot(x, x).sqrt()).collect();
        let units: Vec<Vec<f64>> = sub
            .iter()
            .zip(&norms)
            .map(|(x, n)| x.iter().map(|v| v / (n + eps)).collect())
            .collect();
        let mut mean = vec![0.0; d];
        for (u, wi) in units.iter().zip(&w) {
            for (m, v) in mean.iter_mut().zip(u) {
                *m += wi * v;
            }
        }
        let mn = dot(&mean, &mean).sqrt();
        assert!(mn >= eps);
        let mean: Vec<f64> = mean.iter().map(|v| v / mn).collect();
        let mut tangent = vec![0.0; d];
        for (u, wi) in units.iter().zip(&w) {
            let dd = dot(u, &mean);
            for k in 0..d {
                tangent[k] += wi * (u[k] - dd * mean[k]);
            }
        }
        let tn = dot(&tangent, &tangent).sqrt() + eps;
        let avg: f64 = norms.iter().zip(&w).map(|(n, wi)| n * wi).sum();
        (0..d)
            .map(|k| {
                let r = (mean[k] * tn.cos() + tangent[k] * (tn.sin() / tn)) * avg;
                r + base.map_or(0.0, |b| b[k])
            })
            .collect()
    }

    fn params(w: &[f64]) -> TensorParams {
        TensorParams::default().with_model_values("weight", w)
    }

    #[test]
    fn matches_reference() {
        let shape = [140, 131];
        let n = 140 * 131;
        let models: Vec<Vec<f32>> = (0..4).map(|i| rand_vec(20 + i, n)).collect();
        let base = rand_vec(30, n);
        let w = [0.4, 1.0, 0.7, 0.2];
        for with_base in [false, true] {
            for k in [2usize, 3, 4] {
                let m = Multislerp::from_params(&params(&w[..k]), k, with_base).expect("build");
                let r = MemReader {
                    stats: Default::default(),
                    base: with_base.then(|| base.clone()),
                    models: models[..k].to_vec(),
                };
                let fb = f64s(&base);
                let xs: Vec<Vec<f64>> = models[..k].iter().map(|x| f64s(x)).collect();
                let want = reference(&xs, &w[..k], with_base.then_some(fb.as_slice()), 1e-8, true);
                let got = run_invariant(&m, &job(&shape, k, with_base, 300), &r);
                assert_close(&got, &want, 2e-6);
            }
        }
    }

    #[test]
    fn unnormalized_weights_and_eps() {
        let n = 500;
        let models: Vec<Vec<f32>> = (0..3).map(|i| rand_vec(40 + i, n)).collect();
        let p = params(&[0.5, 0.5, 0.5])
            .with_global("normalize_weights", Scalar::Bool(false))
            .with_global("eps", Scalar::Num(1e-6));
        let m = Multislerp::from_params(&p, 3, false).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: models.clone(),
        };
        let xs: Vec<Vec<f64>> = models.iter().map(|x| f64s(x)).collect();
        let got = run_invariant(&m, &job(&[n], 3, false, 64), &r);
        assert_close(
            &got,
            &reference(&xs, &[0.5, 0.5, 0.5], None, 1e-6, false),
            2e-6,
        );
    }

    #[test]
    fn single_model_copied() {
        let x = rand_vec(1, 100);
        let m = Multislerp::from_params(&params(&[0.3]), 1, true).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: Some(rand_vec(2, 100)),
            models: vec![x.clone()],
        };
        assert_eq!(run(&m, &job(&[100], 1, true, 7), &r), x);
    }

    #[test]
    fn antipodal_and_zero() {
        let n = 200;
        let a = rand_vec(3, n);
        let neg: Vec<f32> = a.iter().map(|x| -x).collect();
        // Two antipodal models with equal weights: mergekit's linear fallback (zero here).
        let m = Multislerp::from_params(&params(&[1.0, 1.0]), 2, false).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![a.clone(), neg.clone()],
        };
        let got = run_invariant(&m, &job(&[n], 2, false, 64), &r);
        assert!(got.iter().all(|v| v.abs() < 1e-7), "{:?}", &got[..4]);
        // Three models summing to zero on the sphere: error, as mergekit.
        let m = Multislerp::from_params(&params(&[1.0, 1.0, 2.0]), 3, false).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![a.clone(), a.clone(), neg],
        };
        assert!(merge_err(&m, &job(&[n], 3, false, 64), &r));
        // All-zero task vectors: the base.
        let m = Multislerp::from_params(&params(&[1.0, 1.0, 1.0]), 3, true).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: Some(a.clone()),
            models: vec![a.clone(), a.clone(), a.clone()],
        };
        assert_eq!(run_invariant(&m, &job(&[n], 3, true, 64), &r), a);
    }

    fn merge_err(m: &dyn MergeMethod, j: &TensorJob, r: &MemReader) -> bool {
        crate::tensor::merge_in_memory(m, j, r).is_err()
    }

    #[test]
    fn device_plan_matches_merge() {
        // N = 2..4, with and without a base, within one reduction chunk and over several.
        let w = [0.4, 1.0, 0.7, 0.2];
        for shape in [vec![37, 41], vec![150, 131]] {
            let n: usize = shape.iter().product();
            let models: Vec<Vec<f32>> = (0..4).map(|i| rand_vec(80 + i, n)).collect();
            let base = rand_vec(90, n);
            for with_base in [false, true] {
                for k in [2usize, 3, 4] {
                    let m = Multislerp::from_params(&params(&w[..k]), k, with_base).expect("build");
                    let r = MemReader {
                        stats: Default::default(),
                        base: with_base.then(|| base.clone()),
                        models: models[..k].to_vec(),
                    };
                    assert_device_matches(&m, &job(&shape, k, with_base, 300), &r);
                    let (inputs, base, grouping) = gram_plan_parts(&m);
                    assert_eq!(inputs, (0..k).map(Input::Model).collect::<Vec<_>>());
                    assert_eq!(base, with_base.then_some(Input::Base));
                    assert_eq!(grouping, crate::methods::device::DeviceGrouping::Whole);
                }
            }
        }
        // The two-model fallback, all-zero task vectors, and mergekit's error.
        let a = rand_vec(91, 200);
        let neg: Vec<f32> = a.iter().map(|x| -x).collect();
        let m = Multislerp::from_params(&params(&[1.0, 1.0]), 2, false).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![a.clone(), neg.clone()],
        };
        assert_device_matches(&m, &job(&[200], 2, false, 64), &r);
        let m = Multislerp::from_params(&params(&[1.0, 1.0, 1.0]), 3, true).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: Some(a.clone()),
            models: vec![a.clone(), a.clone(), a.clone()],
        };
        assert_device_matches(&m, &job(&[200], 3, true, 64), &r);
        let m = Multislerp::from_params(&params(&[1.0, 1.0, 2.0]), 3, false).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![a.clone(), a, neg],
        };
        let plan = m.device_plan().expect("plan");
        assert!(emulate_gram_plan(&plan, &[200], &r).is_err());
        // A single model is copied on the CPU.
        let m = Multislerp::from_params(&params(&[0.3]), 1, true).expect("build");
        assert!(m.device_plan().is_none());
    }

    #[test]
    fn validation() {
        let e = Multislerp::from_params(&params(&[1.0, -1.0]), 2, false).expect_err("zero sum");
        assert!(e.to_string().contains("weight"), "{e}");
        let e = Multislerp::from_params(&params(&[1.0]), 2, false).expect_err("missing");
        assert!(e.to_string().contains("weight"), "{e}");
        let p = params(&[1.0, 1.0]).with_global("eps", Scalar::Num(-1.0));
        let e = Multislerp::from_params(&p, 2, false).expect_err("eps");
        assert!(e.to_string().contains("eps"), "{e}");
    }
}
