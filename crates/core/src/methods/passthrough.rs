//! `passthrough`: copy one input tensor, optionally scaled (methods.md §19; mergekit
//! `mergekit/merge_methods/passthrough.py`). Sharding class **E**.
//!
//! out = θ (bit-exact copy) or, with `scale`, θ·scale in f32.
//!
//! Parameters: `scale` (per model, optional, no default: absent means an exact copy; the
//! per-model map already falls back to a top-level `scale` as mergekit does).
//!
//! Inputs: exactly one [`Input::Model`] (mergekit: at most one input per tensor). In
//! `slices`-based frankenmerges the planner gives each output tensor its one source model. The
//! method has no base: a `base_model` that mergekit adds to the inputs counts as a second
//! input, which mergekit refuses, and so do we.

use crate::error::{MergeError, Result};
use crate::methods::gram::{copy_input, map_blocks};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};

/// Static facts about `passthrough`.
pub const INFO: MethodInfo = MethodInfo {
    name: "passthrough",
    needs_base: false,
    min_models: 1,
    exact_models: Some(1),
    global_params: &[],
    model_params: &["scale"],
    random: false,
    summary: "copy the single input tensor (optionally times `scale`); used with slices",
};

/// `passthrough` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Passthrough {
    scale: Option<f32>,
}

impl Passthrough {
    /// Build from resolved parameters: exactly one model.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        if n_models != 1 {
            return Err(MergeError::BadInputs {
                method: "passthrough".into(),
                message: format!(
                    "passthrough takes exactly one model per tensor, got {n_models}; use \
                     `slices` to take different layers from different models"
                ),
            });
        }
        let scale = params.model_opt_num(0, "scale")?;
        if let Some(s) = scale {
            if !s.is_finite() {
                return Err(MergeError::BadParameter {
                    key: "scale".into(),
                    message: format!("must be a finite number, got {s}"),
                });
            }
        }
        Ok(Self {
            scale: scale.map(|s| s as f32),
        })
    }
}

impl MergeMethod for Passthrough {
    fn class(&self) -> ShardClass {
        ShardClass::E
    }

    fn buffers(&self, _n_models: usize) -> usize {
        2
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        match self.scale {
            None => copy_input(job, reader, writer, Input::Model(0)),
            Some(s) => map_blocks(
                job,
                reader,
                writer,
                &[Input::Model(0)],
                None,
                |_, b, out| {
                    out.iter_mut().zip(&b.x[0]).for_each(|(o, x)| *o = x * s);
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::gram::testutil::*;
    use crate::tensor::MemReader;

    #[test]
    fn copies_and_scales() {
        let x = rand_vec(4, 1000);
        let r = MemReader {
            stats: Default::default(),
            base: None,
            models: vec![x.clone()],
        };
        let m = Passthrough::from_params(&TensorParams::default(), 1).expect("build");
        let got = run_invariant(&m, &job(&[10, 100], 1, false, 64), &r);
        assert_eq!(got, x);
        let p = TensorParams::default().with_model_values("scale", &[0.5]);
        let m = Passthrough::from_params(&p, 1).expect("build");
        let got = run_invariant(&m, &job(&[10, 100], 1, false, 64), &r);
        let want: Vec<f64> = x.iter().map(|v| f64::from(*v) * 0.5).collect();
        assert_close(&got, &want, 1e-7);
    }

    #[test]
    fn exactly_one_model() {
        assert!(Passthrough::from_params(&TensorParams::default(), 2).is_err());
        assert!(Passthrough::from_params(&TensorParams::default(), 0).is_err());
    }
}
