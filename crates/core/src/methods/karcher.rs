//! `karcher`: the Riemannian (Karcher) mean of the models on the unit sphere, rescaled
//! (methods.md §19; mergekit `mergekit/merge_methods/karcher.py`). Sharding class **T**
//! (N(N+1)/2 reductions per tensor, then elementwise).
//!
//! With n_i = ‖θ_i‖, u_i = θ_i / n_i (0 when n_i = 0), the valid models those with n_i > tol,
//! and α_i the weights (α̂_i: normalised over the valid models):
//! 1. μ = Σ α̂_i u_i normalised; the first valid u_i if ‖Σ α̂_i u_i‖ < tol;
//! 2. up to `max_iter` times: d_i = clamp(μ·u_i, −1, 1), θ_i = acos d_i;
//!    T = Σ_{θ_i ≥ tol} α̂_i θ_i / sin θ_i · (u_i − d_i μ); stop if ‖T‖ < tol;
//!    μ ← cos‖T‖ μ + sin‖T‖ T/‖T‖, then μ ← μ/‖μ‖ if ‖μ‖ > tol;
//! 3. out = (Σ_i α_i n_i) · μ. No valid model: zeros. One model: copied.
//!
//! Streaming: μ and T stay in the span of the u_i, so the method gathers the Gram matrix
//! θ_i·θ_j in one f64 pass ([`crate::methods::gram`]), runs the whole fixed-point iteration on
//! N coefficients (every dot product and norm of the iteration is a quadratic form in that
//! matrix, so an iteration needs no pass over the data), then writes Σ c_i θ_i in a second
//! pass. mergekit iterates elementwise in f32; the results agree to f32 rounding (the stopping
//! tests can flip only for values within rounding of `tol`).
//!
//! Parameters: `max_iter` (global, default 10), `tol` (global, default 1e-5). mergekit always
//! uses equal weights α_i = 1/N and has no weight parameter; ours does the same by default.
//! Extension: `karcher_weighted: true` (global, default false) uses the per-model `weight`
//! (default 1.0 each), α_i = w_i / Σ w.
//!
//! Inputs: every [`Input::Model`] in config order. No base (mergekit's base policy "ignored": a
//! `base_model` among the inputs is one more point of the mean).

use crate::error::{MergeError, Result};
use crate::methods::device::{DevicePlan, GramCombine, GramMatrices};
use crate::methods::gram::{
    check_gram, copy_input, gram, matvec, qform, write_combination, GroupMap, Grouping,
};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use std::sync::Arc;

/// Static facts about `karcher`.
pub const INFO: MethodInfo = MethodInfo {
    name: "karcher",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &["max_iter", "tol", "karcher_weighted"],
    model_params: &["weight"],
    random: false,
    summary: "Karcher (Riemannian) mean of the models on the sphere, scaled by the mean norm",
};

/// `karcher` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Karcher {
    /// α_i (sum 1).
    alphas: Vec<f64>,
    max_iter: usize,
    tol: f64,
}

impl Karcher {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        if n_models == 0 {
            return Err(MergeError::BadInputs {
                method: "karcher".into(),
                message: "needs at least one model".into(),
            });
        }
        let max_iter = params.num("max_iter", 10.0)?;
        if !(max_iter >= 0.0 && max_iter.fract() == 0.0 && max_iter <= 1e6) {
            return Err(MergeError::BadParameter {
                key: "max_iter".into(),
                message: format!("must be a whole number from 0 to 1000000, got {max_iter}"),
            });
        }
        let tol = params.num("tol", 1e-5)?;
        if !(tol.is_finite() && tol >= 0.0) {
            return Err(MergeError::BadParameter {
                key: "tol".into(),
                message: format!("must be a finite number >= 0, got {tol}"),
            });
        }
        let alphas = if params.bool("karcher_weighted", false)? {
            let w = params.model_nums("weight", 1.0)?;
            let mut w = w;
            w.resize(n_models, 1.0);
            let sum: f64 = w.iter().sum();
            if w.iter().any(|v| !v.is_finite() || *v < 0.0) || sum <= 1e-8 {
                return Err(MergeError::BadParameter {
                    key: "weight".into(),
                    message: format!(
                        "with `karcher_weighted: true` the weights must be >= 0 with a \
                         positive sum, got {w:?}"
                    ),
                });
            }
            w.iter().map(|v| v / sum).collect()
        } else {
            vec![1.0 / n_models as f64; n_models]
        };
        Ok(Self {
            alphas,
            max_iter: max_iter as usize,
            tol,
        })
    }

    /// The whole tensor is one vector.
    const GROUPING: Grouping = Grouping::Whole;

    /// The vectors' inputs: every model (no base).
    fn inputs(&self) -> Vec<Input> {
        (0..self.alphas.len()).map(Input::Model).collect()
    }

    /// The f32 coefficients of every group (`groups × N`), from the Gram matrices of
    /// [`Self::inputs`].
    fn coefficients(&self, g: &GramMatrices) -> Result<Vec<f32>> {
        check_gram(g, self.alphas.len(), "karcher")?;
        Ok((0..g.groups)
            .flat_map(|k| self.group_coefficients(g.matrix(k)))
            .map(|v| v as f32)
            .collect())
    }

    /// Coefficients c_i such that out = Σ c_i θ_i, from one Gram matrix `g` of the models.
    fn group_coefficients(&self, g: &[f64]) -> Vec<f64> {
        let n = self.alphas.len();
        let tol = self.tol;
        let norms: Vec<f64> = (0..n).map(|i| g[i * n + i].max(0.0).sqrt()).collect();
        let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
        let mut out = vec![0.0; n];
        if valid.is_empty() {
            return out;
        }
        let v = valid.len();
        let asum: f64 = valid.iter().map(|&i| self.alphas[i]).sum();
        let a: Vec<f64> = valid.iter().map(|&i| self.alphas[i] / asum).collect();
        // Gram matrix of the valid unit vectors.
        let mut gu = vec![0.0; v * v];
        for (p, &i) in valid.iter().enumerate() {
            for (q, &j) in valid.iter().enumerate() {
                gu[p * v + q] = g[i * n + j] / (norms[i] * norms[j]);
            }
        }
        let norm_of = |c: &[f64]| qform(&gu, c, c).max(0.0).sqrt();
        // μ = Σ c_p u_p.
        let mut c = a.clone();
        let mn = norm_of(&c);
        if mn < tol {
            c = vec![0.0; v];
            c[0] = 1.0;
        } else {
            c.iter_mut().for_each(|x| *x /= mn);
        }
        for _ in 0..self.max_iter {
            let dots = matvec(&gu, &c);
            let mut tang = vec![0.0; v];
            for p in 0..v {
                let d = dots[p].clamp(-1.0, 1.0);
                let theta = d.acos();
                if theta < tol {
                    continue;
                }
                let f = a[p] * theta / theta.sin();
                tang[p] += f;
                for (t, cq) in tang.iter_mut().zip(&c) {
                    *t -= f * d * cq;
                }
            }
            let tn = norm_of(&tang);
            if tn < tol {
                break;
            }
            let (cs, sn) = (tn.cos(), tn.sin() / tn);
            for (cq, tq) in c.iter_mut().zip(&tang) {
                *cq = cs * *cq + sn * tq;
            }
            let un = norm_of(&c);
            if un > tol {
                c.iter_mut().for_each(|x| *x /= un);
            }
        }
        let scale: f64 = self.alphas.iter().zip(&norms).map(|(al, nm)| al * nm).sum();
        for (p, &i) in valid.iter().enumerate() {
            out[i] = scale * c[p] / norms[i];
        }
        out
    }
}

impl MergeMethod for Karcher {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 1
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let n = self.alphas.len();
        if n == 1 {
            return copy_input(job, reader, writer, Input::Model(0));
        }
        let inputs = self.inputs();
        let map = GroupMap::new(job, Self::GROUPING);
        let g = gram(job, reader, &inputs, None, map)?;
        let c = self.coefficients(&g)?;
        write_combination(job, reader, writer, &inputs, None, map, &c)
    }

    /// None for a single model (copied unchanged, which keeps −0.0 where Σ c_i θ_i would not).
    fn device_plan(&self) -> Option<DevicePlan> {
        if self.alphas.len() == 1 {
            return None;
        }
        let method = self.clone();
        Some(DevicePlan::Gram {
            inputs: self.inputs(),
            base: None,
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

    /// Naive elementwise f64 Karcher mean following karcher.py.
    fn reference(xs: &[Vec<f64>], alphas: &[f64], max_iter: usize, tol: f64) -> Vec<f64> {
        let d = xs[0].len();
        let norms: Vec<f64> = xs.iter().map(|x| dot(x, x).sqrt()).collect();
        let units: Vec<Vec<f64>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, n)| {
                if *n == 0.0 {
                    vec![0.0; d]
                } else {
                    x.iter().map(|v| v / n).collect()
                }
            })
            .collect();
        let valid: Vec<usize> = (0..xs.len()).filter(|&i| norms[i] > tol).collect();
        if valid.is_empty() {
            return vec![0.0; d];
        }
        let asum: f64 = valid.iter().map(|&i| alphas[i]).sum();
        let mut mean = vec![0.0; d];
        for &i in &valid {
            for k in 0..d {
                mean[k] += alphas[i] / asum * units[i][k];
            }
        }
        let mn = dot(&mean, &mean).sqrt();
        if mn < tol {
            mean = units[valid[0]].clone();
        } else {
            mean.iter_mut().for_each(|v| *v /= mn);
        }
        for _ in 0..max_iter {
            let mut tangent = vec![0.0; d];
            for &i in &valid {
                let dd = dot(&mean, &units[i]).clamp(-1.0, 1.0);
                let th = dd.acos();
                if th < tol {
                    continue;
                }
                for k in 0..d {
                    tangent[k] += alphas[i] / asum * (th / th.sin()) * (units[i][k] - dd * mean[k]);
                }
            }
            let tn = dot(&tangent, &tangent).sqrt();
            if tn < tol {
                break;
            }
            for k in 0..d {
                mean[k] = tn.cos() * mean[k] + tn.sin() * tangent[k] / tn;
            }
            let un = dot(&mean, &mean).sqrt();
            if un > tol {
                mean.iter_mut().for_each(|v| *v /= un);
            }
        }
        let scale: f64 = alphas.iter().zip(&norms).map(|(a, n)| a * n).sum();
        mean.iter().map(|v| v * scale).collect()
    }

    #[test]
    fn matches_reference() {
        let shape = [129, 133];
        let n = 129 * 133;
        // Correlated models (a shared component) so the iteration does real work.
        let common = rand_vec(99, n);
        let models: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                let r = rand_vec(50 + i, n);
                let s = 0.5 + i as f32 * 0.3;
                common
                    .iter()
                    .zip(&r)
                    .map(|(c, x)| s * (c + 0.7 * x))
                    .collect()
            })
            .collect();
        let xs: Vec<Vec<f64>> = models.iter().map(|x| f64s(x)).collect();
        for k in [2usize, 3, 4] {
            let m = Karcher::from_params(&TensorParams::default(), k).expect("build");
            let r = MemReader {
                stats: Default::default(),
                base: None,
                models: models[..k].to_vec(),
            };
            let got = run_invariant(&m, &job(&shape, k, false, 500), &r);
            let al = vec![1.0 / k as f64; k];
            assert_close(&got, &reference(&xs[..k], &al, 10, 1e-5), 2e-6);
        }
        // Weighted extension and a different iteration count.
        let w = [1.0, 3.0, 0.5];
        let p = TensorParams::default()
            .with_global("karcher_weighted", Scalar::Bool(true))
            .with_global("max_iter", Scalar::Num(3.0))
            .with_model_values("weight", &w);
        let m = Karcher::from_params(&p, 3).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: models[..3].to_vec(),
        };
        let got = run_invariant(&m, &job(&shape, 3, false, 500), &r);
        let al: Vec<f64> = w.iter().map(|v| v / 4.5).collect();
        assert_close(&got, &reference(&xs[..3], &al, 3, 1e-5), 2e-6);
    }

    #[test]
    fn zero_and_single_and_identical() {
        let n = 300;
        let x = rand_vec(1, n);
        let z = vec![0.0f32; n];
        let m = Karcher::from_params(&TensorParams::default(), 2).expect("build");
        // All zero: zeros.
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![z.clone(), z.clone()],
        };
        assert_eq!(run_invariant(&m, &job(&[n], 2, false, 64), &r), z);
        // One zero model: direction of the other, half its norm.
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![x.clone(), z],
        };
        let got = run_invariant(&m, &job(&[n], 2, false, 64), &r);
        let want: Vec<f64> = x.iter().map(|v| 0.5 * f64::from(*v)).collect();
        assert_close(&got, &want, 1e-6);
        // Identical models: the model.
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![x.clone(), x.clone()],
        };
        assert_close(
            &run_invariant(&m, &job(&[n], 2, false, 64), &r),
            &f64s(&x),
            1e-6,
        );
        // Single model: copied.
        let m1 = Karcher::from_params(&TensorParams::default(), 1).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![x.clone()],
        };
        assert_eq!(run(&m1, &job(&[n], 1, false, 64), &r), x);
    }

    #[test]
    fn device_plan_matches_merge() {
        // N = 2..4 and the weighted extension, within one reduction chunk and over several.
        for shape in [vec![43, 47], vec![129, 133]] {
            let n: usize = shape.iter().product();
            let common = rand_vec(199, n);
            let models: Vec<Vec<f32>> = (0..4)
                .map(|i| {
                    let r = rand_vec(150 + i, n);
                    let s = 0.5 + i as f32 * 0.3;
                    common
                        .iter()
                        .zip(&r)
                        .map(|(c, x)| s * (c + 0.7 * x))
                        .collect()
                })
                .collect();
            let weighted = TensorParams::default()
                .with_global("karcher_weighted", Scalar::Bool(true))
                .with_global("max_iter", Scalar::Num(3.0))
                .with_model_values("weight", &[1.0, 3.0, 0.5]);
            for (p, k) in [
                (TensorParams::default(), 2usize),
                (TensorParams::default(), 3),
                (TensorParams::default(), 4),
                (weighted, 3),
            ] {
                let m = Karcher::from_params(&p, k).expect("build");
                let r = MemReader {
                    stats: Default::default(),
                    base: None,
                    models: models[..k].to_vec(),
                };
                assert_device_matches(&m, &job(&shape, k, false, 500), &r);
                let (inputs, base, grouping) = gram_plan_parts(&m);
                assert_eq!(inputs, (0..k).map(Input::Model).collect::<Vec<_>>());
                assert_eq!(base, None);
                assert_eq!(grouping, crate::methods::device::DeviceGrouping::Whole);
            }
        }
        // A zero model, all-zero models, identical models.
        let x = rand_vec(201, 300);
        let z = vec![0.0f32; 300];
        let m = Karcher::from_params(&TensorParams::default(), 2).expect("build");
        for models in [
            vec![x.clone(), z.clone()],
            vec![z.clone(), z],
            vec![x.clone(), x],
        ] {
            let r = MemReader {
                stats: Default::default(),
                base: None,
                models,
            };
            assert_device_matches(&m, &job(&[300], 2, false, 64), &r);
        }
        // A single model is copied on the CPU.
        let m = Karcher::from_params(&TensorParams::default(), 1).expect("build");
        assert!(m.device_plan().is_none());
    }

    #[test]
    fn validation() {
        for (k, v) in [("max_iter", 2.5), ("max_iter", -1.0), ("tol", -1.0)] {
            let p = TensorParams::default().with_global(k, Scalar::Num(v));
            let e = Karcher::from_params(&p, 2).expect_err("bad");
            assert!(e.to_string().contains(k), "{e}");
        }
        let p = TensorParams::default()
            .with_global("karcher_weighted", Scalar::Bool(true))
            .with_model_values("weight", &[0.0, 0.0]);
        assert!(Karcher::from_params(&p, 2).is_err());
    }
}
