//! `slerp`: spherical interpolation between the base and one model (methods.md §7; mergekit
//! `mergekit/merge_methods/slerp.py`). Sharding class **T** (3 scalar reductions, then
//! elementwise).
//!
//! With v0 = base, v1 = the model (whole tensors, flattened):
//! 1. ‖v0‖, ‖v1‖ (a norm ≤ 1e-8 is replaced by 1, so a zero tensor stays unnormalised);
//! 2. dot = v0·v1 / (‖v0‖‖v1‖), clamped to [−1, 1] (as mergekit 0.1.5 does; the clamp only
//!    matters where the lerp branch is taken anyway);
//! 3. |dot| > 0.9995: out = (1−t)v0 + t v1 on the originals;
//! 4. else θ = acos(dot), out = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1.
//!
//! The three reductions are f64 ([`crate::reduce::ChunkedSum`]); mergekit computes them in f32
//! on normalised copies, so results agree to f32 rounding. The coefficients are computed in
//! f64 and applied in f32.
//!
//! Parameters: `t` (global, **required**; already resolved for the tensor's layer; t=0 gives the
//! base, t=1 the model; values outside [0, 1] extrapolate, unchecked as in mergekit).
//!
//! Inputs: [`Input::Base`] and exactly one [`Input::Model`] (mergekit: base required, exactly 2
//! inputs).

use crate::error::{MergeError, Result};
use crate::methods::device::{DevicePlan, GramCombine, GramMatrices};
use crate::methods::gram::{check_gram, gram, write_combination, GroupMap, Grouping};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use std::sync::Arc;

/// Static facts about `slerp`. `exact_models` counts the base.
pub const INFO: MethodInfo = MethodInfo {
    name: "slerp",
    needs_base: true,
    min_models: 1,
    exact_models: Some(2),
    global_params: &["t"],
    model_params: &[],
    random: false,
    summary: "spherical interpolation from base_model (t=0) to the one other model (t=1)",
};

/// Above this |cos| the two tensors count as colinear and are lerped.
pub(crate) const DOT_THRESHOLD: f64 = 0.9995;
/// Norms at or below this are not normalised.
pub(crate) const NORM_EPS: f64 = 1e-8;

/// `slerp` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Slerp {
    t: f64,
}

/// SLERP coefficients (c0 for v0, c1 for v1) from the squared norms and the dot product, as
/// mergekit's `slerp` computes them.
pub(crate) fn slerp_coefs(t: f64, n00: f64, n11: f64, d01: f64) -> (f64, f64) {
    let norm = |sq: f64| {
        let n = sq.max(0.0).sqrt();
        if n > NORM_EPS {
            n
        } else {
            1.0
        }
    };
    let dot = (d01 / (norm(n00) * norm(n11))).clamp(-1.0, 1.0);
    if dot.abs() > DOT_THRESHOLD {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    }
}

impl Slerp {
    /// Build from resolved parameters: needs the base and exactly one other model.
    pub fn from_params(params: &TensorParams, n_models: usize, has_base: bool) -> Result<Self> {
        if !has_base || n_models != 1 {
            return Err(MergeError::BadInputs {
                method: "slerp".into(),
                message: format!(
                    "slerp needs exactly 2 models (base_model and one other); got {} model(s) \
                     {} a base_model",
                    n_models,
                    if has_base { "besides" } else { "and no" }
                ),
            });
        }
        let t = params
            .opt_num("t")?
            .ok_or_else(|| MergeError::MissingParameter {
                key: "t".into(),
                method: "slerp".into(),
                model: None,
            })?;
        if !t.is_finite() {
            return Err(MergeError::BadParameter {
                key: "t".into(),
                message: format!("must be a finite number, got {t}"),
            });
        }
        Ok(Self { t })
    }

    /// The vectors: v0 = the base, v1 = the model (no base subtracted).
    const INPUTS: [Input; 2] = [Input::Base, Input::Model(0)];
    /// The whole tensor is one vector.
    const GROUPING: Grouping = Grouping::Whole;

    /// The coefficients (c0, c1) on (v0, v1) from the Gram matrix of [`Self::INPUTS`] (one
    /// group).
    fn coefficients(&self, g: &GramMatrices) -> Result<Vec<f32>> {
        check_gram(g, 2, "slerp")?;
        Ok((0..g.groups)
            .flat_map(|k| {
                let (c0, c1) = slerp_coefs(self.t, g.get(k, 0, 0), g.get(k, 1, 1), g.get(k, 0, 1));
                [c0 as f32, c1 as f32]
            })
            .collect())
    }
}

impl MergeMethod for Slerp {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, _n_models: usize) -> usize {
        3
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let inputs = Self::INPUTS;
        let map = GroupMap::new(job, Self::GROUPING);
        let g = gram(job, reader, &inputs, None, map)?;
        let c = self.coefficients(&g)?;
        write_combination(job, reader, writer, &inputs, None, map, &c)
    }

    fn device_plan(&self) -> Option<DevicePlan> {
        let method = self.clone();
        Some(DevicePlan::Gram {
            inputs: Self::INPUTS.to_vec(),
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

    /// Naive f64 SLERP following slerp.py.
    fn reference(t: f64, v0: &[f64], v1: &[f64]) -> Vec<f64> {
        let n0 = dot(v0, v0).sqrt();
        let n1 = dot(v1, v1).sqrt();
        let u0: Vec<f64> = v0
            .iter()
            .map(|x| if n0 > 1e-8 { x / n0 } else { *x })
            .collect();
        let u1: Vec<f64> = v1
            .iter()
            .map(|x| if n1 > 1e-8 { x / n1 } else { *x })
            .collect();
        let d = dot(&u0, &u1);
        if d.abs() > 0.9995 {
            return v0
                .iter()
                .zip(v1)
                .map(|(a, b)| (1.0 - t) * a + t * b)
                .collect();
        }
        let th = d.acos();
        let s0 = ((1.0 - t) * th).sin() / th.sin();
        let s1 = (t * th).sin() / th.sin();
        v0.iter().zip(v1).map(|(a, b)| s0 * a + s1 * b).collect()
    }

    fn build(t: f64) -> Slerp {
        let p = TensorParams::default().with_global("t", Scalar::Num(t));
        Slerp::from_params(&p, 1, true).expect("build")
    }

    fn check(t: f64, base: Vec<f32>, model: Vec<f32>, shape: &[usize]) -> Vec<f32> {
        let want = reference(t, &f64s(&base), &f64s(&model));
        let r = MemReader {
            stats: Default::default(),
            base: Some(base),
            models: vec![model],
        };
        let got = run_invariant(&build(t), &job(shape, 1, true, 64), &r);
        assert_close(&got, &want, 2e-6);
        got
    }

    #[test]
    fn matches_reference_random() {
        // Larger than one reduction chunk so chunk boundaries fall inside blocks.
        let n = 150 * 130;
        for t in [0.3, 0.5, 0.9, -0.2, 1.3] {
            check(t, rand_vec(1, n), rand_vec(2, n), &[150, 130]);
        }
    }

    #[test]
    fn endpoints() {
        let (b, m) = (rand_vec(5, 300), rand_vec(6, 300));
        let got = check(0.0, b.clone(), m.clone(), &[300]);
        assert_close(&got, &f64s(&b), 1e-6);
        let got = check(1.0, b, m.clone(), &[300]);
        assert_close(&got, &f64s(&m), 1e-6);
    }

    #[test]
    fn colinear_lerps() {
        let b = rand_vec(7, 500);
        // Same direction, different scale: |dot| = 1 > 0.9995.
        let m: Vec<f32> = b.iter().map(|x| x * 2.5).collect();
        let got = check(0.25, b.clone(), m.clone(), &[500]);
        let lerp: Vec<f64> = b
            .iter()
            .zip(&m)
            .map(|(a, c)| 0.75 * f64::from(*a) + 0.25 * f64::from(*c))
            .collect();
        assert_close(&got, &lerp, 1e-6);
        // Antiparallel also lerps.
        let m: Vec<f32> = b.iter().map(|x| -x).collect();
        let got = check(0.5, b, m, &[500]);
        assert!(got.iter().all(|v| v.abs() < 1e-6));
    }

    #[test]
    fn zero_tensor() {
        let m = rand_vec(8, 200);
        let z = vec![0.0f32; 200];
        // dot = 0, θ = π/2: out = sin(tπ/2) · model.
        let got = check(0.5, z.clone(), m.clone(), &[10, 20]);
        assert!(got.iter().all(|v| v.is_finite()));
        let got2 = check(0.5, m, z.clone(), &[10, 20]);
        assert!(got2.iter().all(|v| v.is_finite()));
        let got3 = check(0.5, z.clone(), z, &[10, 20]);
        assert!(got3.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn device_plan_matches_merge() {
        // One reduction chunk (bit-identical) and several (whole-tensor sums may differ in
        // the last bit), a lerped pair, and a zero tensor.
        for (shape, t, seed) in [
            (vec![40, 50], 0.3, 61),
            (vec![7], -0.4, 63),
            (vec![150, 130], 0.7, 65),
        ] {
            let n: usize = shape.iter().product();
            let r = MemReader {
                stats: Default::default(),
                base: Some(rand_vec(seed, n)),
                models: vec![rand_vec(seed + 1, n)],
            };
            assert_device_matches(&build(t), &job(&shape, 1, true, 64), &r);
        }
        let b = rand_vec(67, 300);
        let r = MemReader {
            stats: Default::default(),
            base: Some(b.clone()),
            models: vec![b.iter().map(|x| 1.5 * x).collect()],
        };
        assert_device_matches(&build(0.25), &job(&[300], 1, true, 64), &r);
        let r = MemReader {
            stats: Default::default(),
            base: Some(vec![0.0; 300]),
            models: vec![b],
        };
        assert_device_matches(&build(0.5), &job(&[3, 100], 1, true, 64), &r);
        let (inputs, base, grouping) = gram_plan_parts(&build(0.5));
        assert_eq!(inputs, [Input::Base, Input::Model(0)]);
        assert_eq!(base, None);
        assert_eq!(grouping, crate::methods::device::DeviceGrouping::Whole);
        // Gram matrices of the wrong size are an error, not a panic.
        let plan = build(0.5).device_plan().expect("plan");
        let DevicePlan::Gram { coefficients, .. } = plan else {
            panic!("no Gram plan")
        };
        for (n, groups, len) in [(3, 1, 9), (2, 2, 4), (2, usize::MAX, 4)] {
            let g = GramMatrices {
                n,
                groups,
                data: vec![1.0; len],
            };
            assert!(coefficients(&g).is_err(), "{n} {groups} {len}");
        }
        let c = coefficients(&GramMatrices {
            n: 2,
            groups: 1,
            data: vec![1.0, 0.0, 0.0, 1.0],
        })
        .expect("coefficients");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn wrong_inputs() {
        let p = TensorParams::default().with_global("t", Scalar::Num(0.5));
        for (n, base) in [(1, false), (2, true), (0, true), (2, false)] {
            let e = Slerp::from_params(&p, n, base).expect_err("bad inputs");
            assert!(
                e.to_string()
                    .contains("slerp needs exactly 2 models (base_model and one other)"),
                "{e}"
            );
        }
        let e = Slerp::from_params(&TensorParams::default(), 1, true).expect_err("no t");
        assert!(e.to_string().contains("`t`"), "{e}");
    }
}
