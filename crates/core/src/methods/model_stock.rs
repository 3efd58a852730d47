//! `model_stock`: interpolate between the base and the average of the fine-tunes by their
//! task-vector angles (methods.md §8; mergekit `mergekit/merge_methods/model_stock.py`).
//! Sharding class **T** (N(N+1)/2 reductions per tensor or per row, then elementwise).
//!
//! With δ_i = θ_i − θ_0 (f32) and N ≥ 2 fine-tunes, per vector (the whole tensor, or each row
//! along the last dimension with `filter_wise`):
//! - cos = mean over pairs i<j of clamp(δ_i·δ_j / max(‖δ_i‖‖δ_j‖, 1e-6), −1, 1);
//! - t = N·cos / (1 + (N−1)·cos);
//! - out = t · (Σ_i θ_i / N) + (1 − t) · θ_0, in f32.
//!
//! Denominator guard (as mergekit 0.1.5 does): where |1 + (N−1)·cos| < 1e-6, i.e. at
//! cos = −1/(N−1) where the estimate has no finite value, t = 0 and the base is kept for that
//! vector, instead of dividing by ~0. Near (but outside) that band t is large, as in mergekit.
//! All-zero task vectors give cos = 0, t = 0: the base.
//!
//! Parameters: `filter_wise` (global, default false).
//!
//! Inputs: [`Input::Base`] and at least two [`Input::Model`]s (mergekit: base required, at
//! least 3 inputs counting the base).
//!
//! Numerics: dots and norms are f64 (mergekit: f32); results agree to f32 rounding, except that
//! a denominator within rounding of the ±1e-6 band edge may be classified differently.

use crate::error::{MergeError, Result};
use crate::methods::device::{DevicePlan, GramCombine, GramMatrices};
use crate::methods::gram::{gram, map_blocks, GroupMap, Grouping};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use std::sync::Arc;

/// Static facts about `model_stock`.
pub const INFO: MethodInfo = MethodInfo {
    name: "model_stock",
    needs_base: true,
    min_models: 2,
    exact_models: None,
    global_params: &["filter_wise"],
    model_params: &[],
    random: false,
    summary: "Model Stock: base-to-average interpolation set by the task vectors' angles",
};

/// Floor on ‖δ_i‖‖δ_j‖.
const NORM_PRODUCT_FLOOR: f64 = 1e-6;
/// |1 + (N−1)cos| below this keeps the base (t = 0).
const SINGULAR_DENOMINATOR: f64 = 1e-6;

/// `model_stock` configured for one tensor.
#[derive(Debug, Clone)]
pub struct ModelStock {
    n: usize,
    filter_wise: bool,
}

impl ModelStock {
    /// Build from resolved parameters: needs at least two fine-tuned models besides the base.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        if n_models < 2 {
            return Err(MergeError::BadInputs {
                method: "model_stock".into(),
                message: format!(
                    "model_stock needs a base_model and at least 2 other models, got \
                     {n_models} besides the base"
                ),
            });
        }
        Ok(Self {
            n: n_models,
            filter_wise: params.bool("filter_wise", false)?,
        })
    }

    /// The interpolation ratio t of one vector from its task-vector Gram matrix.
    fn ratio(&self, g: &[f64]) -> f64 {
        let n = self.n;
        let norms: Vec<f64> = (0..n).map(|i| g[i * n + i].max(0.0).sqrt()).collect();
        let mut sum = 0.0;
        let mut count = 0usize;
        for i in 0..n {
            for j in i + 1..n {
                let c = g[i * n + j] / (norms[i] * norms[j]).max(NORM_PRODUCT_FLOOR);
                sum += c.clamp(-1.0, 1.0);
                count += 1;
            }
        }
        let cos = sum / count as f64;
        let nf = n as f64;
        let den = 1.0 + (nf - 1.0) * cos;
        if den.abs() < SINGULAR_DENOMINATOR {
            0.0
        } else {
            nf * cos / den
        }
    }
}

impl ModelStock {
    fn grouping(&self) -> Grouping {
        if self.filter_wise {
            Grouping::Rows
        } else {
            Grouping::Whole
        }
    }

    /// Per group the coefficients of [`GramCombine::Stock`]: `[t, 0, …]`.
    fn coefficients(&self, g: &GramMatrices) -> Result<Vec<f32>> {
        let mut c = vec![0.0f32; g.groups * g.n];
        for k in 0..g.groups {
            c[k * g.n] = self.ratio(g.matrix(k)) as f32;
        }
        Ok(c)
    }
}

impl MergeMethod for ModelStock {
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
        if !job.has_base {
            return Err(MergeError::BadInputs {
                method: "model_stock".into(),
                message: "model_stock needs a base_model".into(),
            });
        }
        let models: Vec<Input> = (0..self.n).map(Input::Model).collect();
        let map = GroupMap::new(job, self.grouping());
        let g = gram(job, reader, &models, Some(Input::Base), map)?;
        let t: Vec<f32> = (0..map.groups())
            .map(|k| self.ratio(g.matrix(k)) as f32)
            .collect();
        // Second pass on the raw models: t·mean + (1−t)·base, as mergekit writes it.
        let mut inputs = models;
        inputs.push(Input::Base);
        let count = self.n as f32;
        map_blocks(job, reader, writer, &inputs, None, |range, b, out| {
            let (xs, base) = b.x.split_at(self.n);
            let base = &base[0];
            let start = range.start;
            out.iter_mut().enumerate().for_each(|(k, o)| {
                let tk = t[map.group_of(start + k)];
                let mut s = 0.0f32;
                for x in xs {
                    s += x[k];
                }
                *o = tk * (s / count) + (1.0 - tk) * base[k];
            });
        })
    }

    fn device_plan(&self) -> Option<DevicePlan> {
        let method = self.clone();
        Some(DevicePlan::Gram {
            inputs: (0..self.n).map(Input::Model).collect(),
            base: Some(Input::Base),
            grouping: self.grouping().into(),
            coefficients: Arc::new(move |g| method.coefficients(g)),
            combine: GramCombine::Stock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::gram::testutil::*;
    use crate::params::Scalar;
    use crate::tensor::MemReader;

    /// Naive f64 Model Stock on one vector.
    fn stock_vec(w0: &[f64], ws: &[Vec<f64>]) -> Vec<f64> {
        let n = ws.len();
        let d: Vec<Vec<f64>> = ws
            .iter()
            .map(|w| w.iter().zip(w0).map(|(a, b)| a - b).collect())
            .collect();
        let mut cs = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let np = dot(&d[i], &d[i]).sqrt() * dot(&d[j], &d[j]).sqrt();
                cs.push((dot(&d[i], &d[j]) / np.max(1e-6)).clamp(-1.0, 1.0));
            }
        }
        let cos = cs.iter().sum::<f64>() / cs.len() as f64;
        let den = 1.0 + (n as f64 - 1.0) * cos;
        let t = if den.abs() < 1e-6 {
            0.0
        } else {
            n as f64 * cos / den
        };
        (0..w0.len())
            .map(|k| {
                let avg = ws.iter().map(|w| w[k]).sum::<f64>() / n as f64;
                t * avg + (1.0 - t) * w0[k]
            })
            .collect()
    }

    fn reference(base: &[f64], ws: &[Vec<f64>], rows: usize, cols: usize, fw: bool) -> Vec<f64> {
        if !fw {
            return stock_vec(base, ws);
        }
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let s = r * cols..(r + 1) * cols;
            let sub: Vec<Vec<f64>> = ws.iter().map(|w| w[s.clone()].to_vec()).collect();
            out.extend(stock_vec(&base[s], &sub));
        }
        out
    }

    fn build(n: usize, fw: bool) -> ModelStock {
        let p = TensorParams::default().with_global("filter_wise", Scalar::Bool(fw));
        ModelStock::from_params(&p, n).expect("build")
    }

    #[test]
    fn matches_reference() {
        let (rows, cols) = (130, 127);
        let n = rows * cols;
        let base = rand_vec(1, n);
        // Task vectors sharing a component, so cos is clearly positive.
        let shared = rand_vec(2, n);
        let models: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                let r = rand_vec(10 + i, n);
                base.iter()
                    .zip(&shared)
                    .zip(&r)
                    .map(|((b, s), x)| b + 0.1 * (s + x))
                    .collect()
            })
            .collect();
        let fb = f64s(&base);
        let xs: Vec<Vec<f64>> = models.iter().map(|x| f64s(x)).collect();
        for k in [2usize, 3, 4] {
            for fw in [false, true] {
                let r = MemReader {
                    stats: Default::default(),
                    base: Some(base.clone()),
                    models: models[..k].to_vec(),
                };
                let got = run_invariant(&build(k, fw), &job(&[rows, cols], k, true, 300), &r);
                assert_close(&got, &reference(&fb, &xs[..k], rows, cols, fw), 2e-6);
            }
        }
    }

    #[test]
    fn singular_denominator_keeps_base() {
        // N = 2, δ_2 = −δ_1: cos = −1 = −1/(N−1).
        let n = 400;
        let base = rand_vec(3, n);
        let d = rand_vec(4, n);
        let m1: Vec<f32> = base.iter().zip(&d).map(|(b, x)| b + x).collect();
        let m2: Vec<f32> = base.iter().zip(&d).map(|(b, x)| b - x).collect();
        let r = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![m1, m2],
        };
        for fw in [false, true] {
            let got = run_invariant(&build(2, fw), &job(&[20, 20], 2, true, 64), &r);
            assert!(got.iter().all(|v| v.is_finite()));
            assert_eq!(got, base);
        }
        // N = 3 at 120°: cos = −1/2 = −1/(N−1).
        let (e1, e2) = (rand_vec(5, n), rand_vec(6, n));
        // Orthonormalise e2 against e1 in f64, then build three unit-ish deltas at 120°.
        let (a, b) = (f64s(&e1), f64s(&e2));
        let na = dot(&a, &a).sqrt();
        let a: Vec<f64> = a.iter().map(|v| v / na).collect();
        let pr = dot(&a, &b);
        let b: Vec<f64> = b.iter().zip(&a).map(|(x, y)| x - pr * y).collect();
        let nb = dot(&b, &b).sqrt();
        let b: Vec<f64> = b.iter().map(|v| v / nb).collect();
        let s3 = 3f64.sqrt() / 2.0;
        let deltas: [Vec<f64>; 3] = [
            a.clone(),
            a.iter().zip(&b).map(|(x, y)| -0.5 * x + s3 * y).collect(),
            a.iter().zip(&b).map(|(x, y)| -0.5 * x - s3 * y).collect(),
        ];
        let zero = vec![0.0f32; n];
        let models: Vec<Vec<f32>> = deltas
            .iter()
            .map(|d| d.iter().map(|v| *v as f32).collect())
            .collect();
        let r = MemReader {
            stats: Default::default(),
            base: Some(zero.clone()),
            models,
        };
        let got = run_invariant(&build(3, false), &job(&[n], 3, true, 64), &r);
        assert!(got.iter().all(|v| v.is_finite()));
        assert!(got.iter().all(|v| v.abs() < 1e-3), "{:?}", &got[..4]);
    }

    #[test]
    fn device_plan_matches_merge() {
        for (shape, seed) in [(vec![40usize, 50], 3u64), (vec![150, 130], 5), (vec![7], 9)] {
            let n: usize = shape.iter().product();
            let base = rand_vec(seed, n);
            let shared = rand_vec(seed + 1, n);
            let models: Vec<Vec<f32>> = (0..3)
                .map(|i| {
                    let r = rand_vec(seed + 10 + i, n);
                    base.iter()
                        .zip(&shared)
                        .zip(&r)
                        .map(|((b, s), x)| b + 0.1 * (s + x))
                        .collect()
                })
                .collect();
            for (k, fw) in [(2usize, false), (3, false), (3, true)] {
                let r = MemReader {
                    stats: Default::default(),
                    base: Some(base.clone()),
                    models: models[..k].to_vec(),
                };
                assert_device_matches(&build(k, fw), &job(&shape, k, true, 64), &r);
            }
        }
    }

    #[test]
    fn zero_task_vectors_keep_base() {
        let base = rand_vec(7, 300);
        let r = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![base.clone(), base.clone(), base.clone()],
        };
        for fw in [false, true] {
            assert_eq!(
                run_invariant(&build(3, fw), &job(&[3, 100], 3, true, 64), &r),
                base
            );
        }
    }

    #[test]
    fn needs_two_models() {
        let e = ModelStock::from_params(&TensorParams::default(), 1).expect_err("one");
        assert!(e.to_string().contains("model_stock"), "{e}");
    }
}
