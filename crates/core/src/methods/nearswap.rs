//! `nearswap`: take the model's value where it is near the base's (methods.md §19; mergekit
//! `mergekit/merge_methods/nearswap.py`). Sharding class **E**.
//!
//! Elementwise, in f32 (t rounded to f32 as torch does with a Python scalar):
//! w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1); out = w·θ_1 + (1 − w)·θ_0.
//! (methods.md describes |·| = 0 as w = 1; mergekit 0.1.5 clamps the distance at 1e-6 instead,
//! which gives w = 1 there whenever t ≥ 1e-6. We follow mergekit.)
//!
//! Parameters: `t` (global, **required**; t ≤ 0 gives the base, larger t swaps in more of the
//! model).
//!
//! Inputs: [`Input::Base`] and exactly one [`Input::Model`] (mergekit: base required, exactly 2
//! inputs).

use crate::error::{MergeError, Result};
use crate::methods::gram::map_blocks;
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};

/// Static facts about `nearswap`. `exact_models` counts the base.
pub const INFO: MethodInfo = MethodInfo {
    name: "nearswap",
    needs_base: true,
    min_models: 1,
    exact_models: Some(2),
    global_params: &["t"],
    model_params: &[],
    random: false,
    summary: "take the model's value where it is within t of the base's, blend elsewhere",
};

/// Floor on |θ_0 − θ_1| (mergekit's clamp).
const MIN_DIFF: f32 = 1e-6;

/// `nearswap` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Nearswap {
    t: f32,
}

impl Nearswap {
    /// Build from resolved parameters: needs the base and exactly one other model.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        if n_models != 1 {
            return Err(MergeError::BadInputs {
                method: "nearswap".into(),
                message: format!(
                    "nearswap needs exactly 2 models (base_model and one other); got {n_models} \
                     besides the base"
                ),
            });
        }
        let t = params
            .opt_num("t")?
            .ok_or_else(|| MergeError::MissingParameter {
                key: "t".into(),
                method: "nearswap".into(),
                model: None,
            })?;
        if t.is_nan() {
            return Err(MergeError::BadParameter {
                key: "t".into(),
                message: "must be a number, got NaN".into(),
            });
        }
        Ok(Self { t: t as f32 })
    }
}

impl MergeMethod for Nearswap {
    fn class(&self) -> ShardClass {
        ShardClass::E
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
        if !job.has_base {
            return Err(MergeError::BadInputs {
                method: "nearswap".into(),
                message: "nearswap needs a base_model".into(),
            });
        }
        let inputs = [Input::Base, Input::Model(0)];
        let t = self.t;
        map_blocks(job, reader, writer, &inputs, None, |_, b, out| {
            let (a, m) = (&b.x[0], &b.x[1]);
            out.iter_mut().enumerate().for_each(|(k, o)| {
                let w = (t / (a[k] - m[k]).abs().max(MIN_DIFF)).clamp(0.0, 1.0);
                *o = w * m[k] + (1.0 - w) * a[k];
            });
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::gram::testutil::*;
    use crate::params::Scalar;
    use crate::tensor::MemReader;

    fn reference(t: f64, a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let w = (t / (x - y).abs().max(1e-6)).clamp(0.0, 1.0);
                w * y + (1.0 - w) * x
            })
            .collect()
    }

    #[test]
    fn matches_reference() {
        let n = 33 * 65;
        let a = rand_vec(1, n);
        let mut b = rand_vec(2, n);
        b[3] = a[3]; // equal entries
        let r = MemReader {
            stats: Default::default(),
            base: Some(a.clone()),
            models: vec![b.clone()],
        };
        for t in [0.0, 0.05, 0.3, 2.0, -1.0] {
            let p = TensorParams::default().with_global("t", Scalar::Num(t));
            let m = Nearswap::from_params(&p, 1).expect("build");
            let got = run_invariant(&m, &job(&[33, 65], 1, true, 64), &r);
            assert_close(&got, &reference(t, &f64s(&a), &f64s(&b)), 1e-6);
            assert_eq!(got[3], a[3]);
        }
    }

    #[test]
    fn t_required() {
        let e = Nearswap::from_params(&TensorParams::default(), 1).expect_err("no t");
        assert!(e.to_string().contains("`t`"), "{e}");
        let p = TensorParams::default().with_global("t", Scalar::Num(0.1));
        assert!(Nearswap::from_params(&p, 2).is_err());
    }
}
