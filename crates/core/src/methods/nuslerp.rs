//! `nuslerp`: SLERP of two models by their weights, optionally on task vectors (methods.md §19;
//! mergekit `mergekit/merge_methods/nuslerp.py`). Sharding class **T** (3 reductions per vector:
//! per tensor, per row or per column, then elementwise).
//!
//! t = w₂ / (w₁ + w₂), or 0.5 when |w₁ + w₂| < 1e-6 (mergekit). With a base the two task
//! vectors v_i = θ_i − θ_0 are interpolated and the result added to θ_0; without one the models
//! themselves. Per vector:
//! - unit vectors use norms clamped below at 1e-7;
//! - cos = û₀·û₁ clamped to [−1, 1]; colinear when 1 − cos² ≤ (1e-8)²: out = (1−t)v₀ + t v₁;
//! - else θ = acos(cos): out = (sin((1−t)θ) v₀ + sin(tθ) v₁) / sin θ.
//!
//! Vectors: `nuslerp_flatten: true` (default) makes the whole tensor one vector. Otherwise
//! `nuslerp_row_wise: false` (default) interpolates each row along the last dimension
//! separately, and `nuslerp_row_wise: true` each fibre along dimension 0 (the columns of a
//! matrix): mergekit's names, where "row_wise" means it runs along dim 0.
//!
//! Parameters: `weight` (per model, **required**, as in mergekit), `nuslerp_flatten` (global,
//! default true), `nuslerp_row_wise` (global, default false).
//!
//! Inputs: exactly two [`Input::Model`]s (the base excluded) and, optionally, [`Input::Base`]
//! (mergekit: base optional, exactly 2 non-base inputs).
//!
//! Numerics: the reductions are f64 (mergekit: f32), so the colinearity test, which in f32 fires
//! only when cos rounds to ±1, fires here only for exactly colinear vectors; near it the two
//! branches agree to O(θ²).

use crate::error::{MergeError, Result};
use crate::methods::device::{DevicePlan, GramCombine, GramMatrices};
use crate::methods::gram::{check_gram, gram, write_combination, GroupMap, Grouping};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use std::sync::Arc;

/// Static facts about `nuslerp`. `exact_models` excludes the (optional) base.
pub const INFO: MethodInfo = MethodInfo {
    name: "nuslerp",
    needs_base: false,
    min_models: 2,
    exact_models: Some(2),
    global_params: &["nuslerp_flatten", "nuslerp_row_wise"],
    model_params: &["weight"],
    random: false,
    summary: "SLERP of two models (or their task vectors, with a base) at t = w2/(w1+w2)",
};

/// Norm floor when normalising.
const NORM_EPS: f64 = 1e-7;
/// Colinearity: 1 − cos² ≤ COLINEAR_EPS².
const COLINEAR_EPS: f64 = 1e-8;

/// `nuslerp` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Nuslerp {
    t: f64,
    grouping: Grouping,
    has_base: bool,
}

/// nuslerp's coefficients on (v₀, v₁) from ‖v₀‖², ‖v₁‖² and v₀·v₁.
fn coefs(t: f64, n00: f64, n11: f64, d01: f64) -> (f64, f64) {
    let n0 = n00.max(0.0).sqrt().max(NORM_EPS);
    let n1 = n11.max(0.0).sqrt().max(NORM_EPS);
    let cos = (d01 / (n0 * n1)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= COLINEAR_EPS * COLINEAR_EPS {
        (1.0 - t, t)
    } else {
        let theta = cos.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    }
}

impl Nuslerp {
    /// Build from resolved parameters: exactly two models besides the optional base.
    pub fn from_params(params: &TensorParams, n_models: usize, has_base: bool) -> Result<Self> {
        if n_models != 2 {
            return Err(MergeError::BadInputs {
                method: "nuslerp".into(),
                message: format!(
                    "nuslerp needs exactly 2 models besides the base_model, got {n_models}"
                ),
            });
        }
        let mut p = params.clone();
        p.models.resize(n_models, Default::default());
        let w = p.required_model_nums("weight", "nuslerp")?;
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(MergeError::BadParameter {
                key: "weight".into(),
                message: format!("must be a finite number, got {bad}"),
            });
        }
        let total = w[0] + w[1];
        let t = if total.abs() < 1e-6 {
            0.5
        } else {
            w[1] / total
        };
        let grouping = if params.bool("nuslerp_flatten", true)? {
            Grouping::Whole
        } else if params.bool("nuslerp_row_wise", false)? {
            Grouping::Axis0
        } else {
            Grouping::Rows
        };
        Ok(Self {
            t,
            grouping,
            has_base,
        })
    }

    /// The vectors' inputs: the two models (minus the base when one is set).
    const INPUTS: [Input; 2] = [Input::Model(0), Input::Model(1)];

    /// The coefficients on (v₀, v₁) of every group, from the Gram matrices of [`Self::INPUTS`].
    fn coefficients(&self, g: &GramMatrices) -> Result<Vec<f32>> {
        check_gram(g, 2, "nuslerp")?;
        Ok((0..g.groups)
            .flat_map(|k| {
                let (c0, c1) = coefs(self.t, g.get(k, 0, 0), g.get(k, 1, 1), g.get(k, 0, 1));
                [c0 as f32, c1 as f32]
            })
            .collect())
    }
}

impl MergeMethod for Nuslerp {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, _n_models: usize) -> usize {
        4
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let inputs = Self::INPUTS;
        let base = (self.has_base && job.has_base).then_some(Input::Base);
        let map = GroupMap::new(job, self.grouping);
        let g = gram(job, reader, &inputs, base, map)?;
        let c = self.coefficients(&g)?;
        write_combination(job, reader, writer, &inputs, base, map, &c)
    }

    /// The base is the one the method was built with (the executor's jobs agree).
    fn device_plan(&self) -> Option<DevicePlan> {
        let method = self.clone();
        Some(DevicePlan::Gram {
            inputs: Self::INPUTS.to_vec(),
            base: self.has_base.then_some(Input::Base),
            grouping: self.grouping.into(),
            coefficients: Arc::new(move |g| method.coefficients(g)),
            combine: GramCombine::Deltas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::device::DeviceGrouping;
    use crate::methods::gram::testutil::*;
    use crate::params::Scalar;
    use crate::tensor::MemReader;

    /// Naive nuslerp of two vectors (f64), following nuslerp.py.
    fn slerp_vec(t: f64, v0: &[f64], v1: &[f64]) -> Vec<f64> {
        let n0 = dot(v0, v0).sqrt().max(1e-7);
        let n1 = dot(v1, v1).sqrt().max(1e-7);
        let cos: f64 = v0
            .iter()
            .zip(v1)
            .map(|(a, b)| (a / n0) * (b / n1))
            .sum::<f64>()
            .clamp(-1.0, 1.0);
        if 1.0 - cos * cos <= 1e-16 {
            return v0
                .iter()
                .zip(v1)
                .map(|(a, b)| (1.0 - t) * a + t * b)
                .collect();
        }
        let th = cos.acos();
        v0.iter()
            .zip(v1)
            .map(|(a, b)| (((1.0 - t) * th).sin() * a + (t * th).sin() * b) / th.sin())
            .collect()
    }

    /// Reference on a [rows, cols] matrix: flatten / per row / per column.
    fn reference(
        t: f64,
        m0: &[f64],
        m1: &[f64],
        base: Option<&[f64]>,
        rows: usize,
        cols: usize,
        mode: Grouping,
    ) -> Vec<f64> {
        let sub = |m: &[f64]| -> Vec<f64> {
            match base {
                Some(b) => m.iter().zip(b).map(|(x, y)| x - y).collect(),
                None => m.to_vec(),
            }
        };
        let (v0, v1) = (sub(m0), sub(m1));
        let mut out = vec![0.0; rows * cols];
        match mode {
            Grouping::Whole => out = slerp_vec(t, &v0, &v1),
            Grouping::Rows => {
                for r in 0..rows {
                    let s = r * cols..(r + 1) * cols;
                    let o = slerp_vec(t, &v0[s.clone()], &v1[s.clone()]);
                    out[s].copy_from_slice(&o);
                }
            }
            Grouping::Axis0 => {
                for c in 0..cols {
                    let a: Vec<f64> = (0..rows).map(|r| v0[r * cols + c]).collect();
                    let b: Vec<f64> = (0..rows).map(|r| v1[r * cols + c]).collect();
                    let o = slerp_vec(t, &a, &b);
                    for r in 0..rows {
                        out[r * cols + c] = o[r];
                    }
                }
            }
        }
        if let Some(b) = base {
            for (o, x) in out.iter_mut().zip(b) {
                *o += x;
            }
        }
        out
    }

    #[test]
    fn matches_reference_all_modes() {
        let (rows, cols) = (131, 129);
        let n = rows * cols;
        let (m0, m1, b) = (rand_vec(1, n), rand_vec(2, n), rand_vec(3, n));
        let w = [0.3, 0.9];
        let t = 0.9 / 1.2;
        for (flatten, row_wise, mode) in [
            (true, false, Grouping::Whole),
            (false, false, Grouping::Rows),
            (false, true, Grouping::Axis0),
        ] {
            for with_base in [false, true] {
                let p = TensorParams::default()
                    .with_model_values("weight", &w)
                    .with_global("nuslerp_flatten", Scalar::Bool(flatten))
                    .with_global("nuslerp_row_wise", Scalar::Bool(row_wise));
                let m = Nuslerp::from_params(&p, 2, with_base).expect("build");
                let r = MemReader {
                    stats: Default::default(),
                    base: with_base.then(|| b.clone()),
                    models: vec![m0.clone(), m1.clone()],
                };
                let fb = f64s(&b);
                let want = reference(
                    t,
                    &f64s(&m0),
                    &f64s(&m1),
                    with_base.then_some(fb.as_slice()),
                    rows,
                    cols,
                    mode,
                );
                let got = run_invariant(&m, &job(&[rows, cols], 2, with_base, 200), &r);
                assert_close(&got, &want, 2e-6);
            }
        }
    }

    #[test]
    fn three_dimensional_tensors() {
        // [a, b, c]: rows run along c (a·b of them); dim-0 fibres are the columns of [a, b·c].
        let (a, b, c) = (9, 7, 11);
        let n = a * b * c;
        let (m0, m1) = (rand_vec(11, n), rand_vec(12, n));
        for (row_wise, mode, rows, cols) in [
            (false, Grouping::Rows, a * b, c),
            (true, Grouping::Axis0, a, b * c),
        ] {
            let p = TensorParams::default()
                .with_model_values("weight", &[1.0, 2.0])
                .with_global("nuslerp_flatten", Scalar::Bool(false))
                .with_global("nuslerp_row_wise", Scalar::Bool(row_wise));
            let m = Nuslerp::from_params(&p, 2, false).expect("build");
            let r = MemReader {
                stats: Default::default(),
                base: None,
                models: vec![m0.clone(), m1.clone()],
            };
            let want = reference(2.0 / 3.0, &f64s(&m0), &f64s(&m1), None, rows, cols, mode);
            let got = run_invariant(&m, &job(&[a, b, c], 2, false, 50), &r);
            assert_close(&got, &want, 2e-6);
        }
    }

    #[test]
    fn zero_weights_and_colinear_and_zero() {
        let n = 300;
        let m0 = rand_vec(4, n);
        let m1: Vec<f32> = m0.iter().map(|x| 3.0 * x).collect();
        // Weights summing to 0: t = 0.5; colinear: lerp.
        let p = TensorParams::default().with_model_values("weight", &[1.0, -1.0]);
        let m = Nuslerp::from_params(&p, 2, false).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![m0.clone(), m1],
        };
        let got = run_invariant(&m, &job(&[n], 2, false, 64), &r);
        let want: Vec<f64> = m0.iter().map(|x| 2.0 * f64::from(*x)).collect();
        assert_close(&got, &want, 1e-6);
        // All-zero task vectors: the base comes back.
        let p = TensorParams::default().with_model_values("weight", &[1.0, 1.0]);
        let m = Nuslerp::from_params(&p, 2, true).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: Some(m0.clone()),
            models: vec![m0.clone(), m0.clone()],
        };
        let got = run_invariant(&m, &job(&[n], 2, true, 64), &r);
        assert_eq!(got, m0);
    }

    #[test]
    fn device_plan_matches_merge() {
        // Every grouping, with and without a base, on 2-D and 3-D tensors; the whole-tensor
        // grouping once within one reduction chunk and once over several.
        let (m0, m1, b) = (
            rand_vec(71, 20_000),
            rand_vec(72, 20_000),
            rand_vec(73, 20_000),
        );
        for shape in [vec![31, 29], vec![9, 7, 11], vec![160, 125]] {
            let n: usize = shape.iter().product();
            for (flatten, row_wise) in [(true, false), (false, false), (false, true)] {
                for with_base in [false, true] {
                    let p = TensorParams::default()
                        .with_model_values("weight", &[0.3, 0.9])
                        .with_global("nuslerp_flatten", Scalar::Bool(flatten))
                        .with_global("nuslerp_row_wise", Scalar::Bool(row_wise));
                    let m = Nuslerp::from_params(&p, 2, with_base).expect("build");
                    let r = MemReader {
                        stats: Default::default(),
                        base: with_base.then(|| b[..n].to_vec()),
                        models: vec![m0[..n].to_vec(), m1[..n].to_vec()],
                    };
                    assert_device_matches(&m, &job(&shape, 2, with_base, 50), &r);
                    let (inputs, base, grouping) = gram_plan_parts(&m);
                    assert_eq!(inputs, [Input::Model(0), Input::Model(1)]);
                    assert_eq!(base, with_base.then_some(Input::Base));
                    let want = match (flatten, row_wise) {
                        (true, _) => DeviceGrouping::Whole,
                        (false, false) => DeviceGrouping::Rows,
                        (false, true) => DeviceGrouping::Axis0,
                    };
                    assert_eq!(grouping, want);
                }
            }
        }
        // Colinear rows (the lerp branch) next to ordinary ones.
        let x = rand_vec(74, 60);
        let mut y: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
        y[30..].copy_from_slice(&rand_vec(75, 30));
        let p = TensorParams::default()
            .with_model_values("weight", &[1.0, 1.0])
            .with_global("nuslerp_flatten", Scalar::Bool(false));
        let m = Nuslerp::from_params(&p, 2, false).expect("build");
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![x, y],
        };
        assert_device_matches(&m, &job(&[6, 10], 2, false, 7), &r);
    }

    #[test]
    fn validation() {
        let p = TensorParams::default().with_model_values("weight", &[1.0, 1.0, 1.0]);
        assert!(Nuslerp::from_params(&p, 3, true).is_err());
        let p = TensorParams::default().with_model_values("weight", &[1.0]);
        let e = Nuslerp::from_params(&p, 2, true).expect_err("missing weight");
        assert!(e.to_string().contains("weight"), "{e}");
    }
}
