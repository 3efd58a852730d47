//! `fisher`: Fisher-weighted averaging (methods.md §9; Matena & Raffel,
//! `mmatena/model_merging/model_merging/merging.py`, and MaTS
//! `r-three/mats/src/merging/diagonal_fisherMerging.py`). mergekit has no such method.
//! Sharding class **E**; class **G** with `normalize_fishers: true`.
//!
//! Per element: θ = Σ_i c_i F̂_i θ_i / Σ_i c_i F̂_i, where F_i is model i's diagonal Fisher (the
//! statistic `NAME::fisher`, the parameter's shape) and F̂_i = max(F_i, `fisher_floor`).
//! Sums over the models are taken in f64, in model order, per element; the result is cast to
//! f32. No base is used.
//!
//! Parameters:
//! - `weight` (per model, default 1.0, ≥ 0, not all 0): the coefficients c_i;
//! - `fisher_floor` (default 1e-8, ≥ 0): MaTS `set_minimum`, applied to **every** F_i;
//! - `favor_target_model` (default false): mmatena's default behaviour, the floor applied only
//!   to model 0 (the "target" model; the other models' Fishers are used raw). mmatena's own
//!   floor default is 1e-6: set `fisher_floor: 1e-6, favor_target_model: true` to reproduce it;
//! - `normalize_fishers` (default false): mmatena's `normalize_fishers=True`: c_i ← c_i / ‖F_i‖₂
//!   with the norm over the **whole model** (every tensor this method merges), of the raw
//!   Fisher (before the floor), as mmatena computes it. This needs one model-global pass
//!   ([`MergeMethod::global_pass`]) summing F_i² per model with [`ChunkedSum`]; a model whose
//!   Fisher is zero everywhere is an error.
//!
//! Where Σ_i c_i F̂_i = 0 (only possible with `fisher_floor: 0` or `favor_target_model`), the
//! output is the c-weighted average Σ c_i θ_i / Σ c_i rather than git-theta's 0 (methods.md §9
//! calls that a bug). Non-finite or negative Fisher values are errors naming the model and key.
//! Tensors without a statistic are not this method's job: the planner averages them
//! (architecture.md, "Statistics files"); a missing statistic here is an error naming the model
//! and the key.

use crate::error::{MergeError, Result};
use crate::methods::gta::all_finite;
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::reduce::ChunkedSum;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use rayon::prelude::*;

/// Static facts about `fisher`.
pub const INFO: MethodInfo = MethodInfo {
    name: "fisher",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &["fisher_floor", "favor_target_model", "normalize_fishers"],
    model_params: &["weight"],
    random: false,
    summary: "Fisher merging: per-element average weighted by each model's diagonal Fisher",
};

/// Default floor on every Fisher value (MaTS `set_minimum`).
pub const DEFAULT_FLOOR: f64 = 1e-8;

/// The statistic key suffix this method reads.
const KIND: &str = "fisher";

/// `fisher` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Fisher {
    /// Per-model coefficients c_i.
    weights: Vec<f64>,
    /// Floor applied to the Fisher values.
    floor: f64,
    /// Apply the floor to model 0 only (mmatena `favor_target_model`).
    favor_target: bool,
    /// Divide each c_i by the model-global Fisher norm.
    normalize: bool,
}

/// Error for model `model` lacking statistic `kind` of tensor `job.name`.
pub(crate) fn missing_stat(method: &str, job: &TensorJob, model: usize, kind: &str) -> MergeError {
    MergeError::BadInputs {
        method: method.into(),
        message: format!(
            "model #{model} has no statistic `{}::{kind}`; give every model a `statistics:` \
             file holding it, or leave this tensor to be averaged",
            job.name
        ),
    }
}

/// Check that model `model` has statistic `kind` for this tensor and return its shape; when
/// `want` is given, the shape must equal it. Errors name the model and the key `NAME::kind`.
pub(crate) fn stat_shape(
    method: &str,
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    kind: &str,
    want: Option<&[usize]>,
) -> Result<Vec<usize>> {
    let shape = reader
        .stat_shape(model, kind)?
        .ok_or_else(|| missing_stat(method, job, model, kind))?;
    if let Some(w) = want {
        if shape != w {
            return Err(MergeError::BadInputs {
                method: method.into(),
                message: format!(
                    "statistic `{}::{kind}` of model #{model} has shape {shape:?}, expected {w:?}",
                    job.name
                ),
            });
        }
    }
    Ok(shape)
}

/// Read elements `range` of model `model`'s statistic `kind`, rejecting non-finite values.
pub(crate) fn read_stat_checked(
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    kind: &str,
    range: std::ops::Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    reader.read_stat(model, kind, range.clone(), out)?;
    if !all_finite(out) {
        let at = out.iter().position(|v| !v.is_finite()).unwrap_or(0) + range.start;
        return Err(MergeError::Numeric {
            tensor: job.name.clone(),
            message: format!(
                "non-finite value in statistic `{}::{kind}` of model #{model} at element {at}",
                job.name
            ),
        });
    }
    Ok(())
}

/// Read elements `range` of `input`, rejecting non-finite values.
pub(crate) fn read_checked(
    job: &TensorJob,
    reader: &dyn TensorReader,
    input: Input,
    range: std::ops::Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    reader.read(input, range.clone(), out)?;
    if !all_finite(out) {
        let at = out.iter().position(|v| !v.is_finite()).unwrap_or(0) + range.start;
        let who = match input {
            Input::Base => "the base model".to_string(),
            Input::Model(i) => format!("model #{i}"),
        };
        return Err(MergeError::Numeric {
            tensor: job.name.clone(),
            message: format!("non-finite value in {who} at element {at}"),
        });
    }
    Ok(())
}

/// Per-model `weight` (default 1.0): finite, ≥ 0, not all zero.
pub(crate) fn nonneg_weights(params: &TensorParams, n_models: usize) -> Result<Vec<f64>> {
    let w: Vec<f64> = (0..n_models)
        .map(|i| params.model_num(i, "weight", 1.0))
        .collect::<Result<_>>()?;
    if let Some(bad) = w.iter().find(|v| !v.is_finite() || **v < 0.0) {
        return Err(MergeError::BadParameter {
            key: "weight".into(),
            message: format!("must be a finite number ≥ 0, got {bad}"),
        });
    }
    if w.iter().all(|v| *v == 0.0) {
        return Err(MergeError::BadParameter {
            key: "weight".into(),
            message: "every model has weight 0; give at least one a positive weight".into(),
        });
    }
    Ok(w)
}

impl Fisher {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        if n_models == 0 {
            return Err(MergeError::BadInputs {
                method: INFO.name.into(),
                message: "needs at least one model".into(),
            });
        }
        let weights = nonneg_weights(params, n_models)?;
        let floor = params.num("fisher_floor", DEFAULT_FLOOR)?;
        if !(floor.is_finite() && floor >= 0.0) {
            return Err(MergeError::BadParameter {
                key: "fisher_floor".into(),
                message: format!("must be a finite number ≥ 0, got {floor}"),
            });
        }
        Ok(Self {
            weights,
            floor,
            favor_target: params.bool("favor_target_model", false)?,
            normalize: params.bool("normalize_fishers", false)?,
        })
    }

    /// The coefficients after the optional global normalisation.
    fn coefficients(&self, global: &[GlobalStats]) -> Result<Vec<f64>> {
        if !self.normalize {
            return Ok(self.weights.clone());
        }
        let sums = global
            .first()
            .map(|g| g.sums.as_slice())
            .filter(|s| s.len() == self.weights.len())
            .ok_or_else(|| MergeError::BadInputs {
                method: INFO.name.into(),
                message: "normalize_fishers needs the model-global Fisher norms; the global \
                          pass did not run"
                    .into(),
            })?;
        self.weights
            .iter()
            .zip(sums)
            .enumerate()
            .map(|(i, (c, s))| {
                if *s > 0.0 && s.is_finite() {
                    Ok(c / s.sqrt())
                } else {
                    Err(MergeError::BadInputs {
                        method: INFO.name.into(),
                        message: format!(
                            "model #{i}'s Fisher is zero over the whole model, so \
                             `normalize_fishers` cannot divide by its norm"
                        ),
                    })
                }
            })
            .collect()
    }

    fn check_fisher_values(job: &TensorJob, model: usize, start: usize, f: &[f32]) -> Result<()> {
        if let Some(k) = f.iter().position(|v| *v < 0.0) {
            return Err(MergeError::Numeric {
                tensor: job.name.clone(),
                message: format!(
                    "negative value {} in statistic `{}::{KIND}` of model #{model} at element {}",
                    f[k],
                    job.name,
                    start + k
                ),
            });
        }
        Ok(())
    }
}

impl MergeMethod for Fisher {
    fn class(&self) -> ShardClass {
        if self.normalize {
            ShardClass::G
        } else {
            ShardClass::E
        }
    }

    fn buffers(&self, n_models: usize) -> usize {
        2 * n_models + 1
    }

    fn global_passes(&self) -> usize {
        usize::from(self.normalize)
    }

    fn global_pass(
        &self,
        _pass: usize,
        _prior: &[GlobalStats],
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<GlobalStats> {
        let n = self.weights.len();
        let numel = job.numel();
        let mut sums = Vec::with_capacity(n);
        let mut buf = Vec::new();
        for i in 0..n {
            stat_shape(INFO.name, job, reader, i, KIND, Some(&job.shape))?;
            let mut s = ChunkedSum::new(numel);
            for range in job.blocks() {
                buf.resize(range.len(), 0.0f32);
                read_stat_checked(job, reader, i, KIND, range.clone(), &mut buf)?;
                Self::check_fisher_values(job, i, range.start, &buf)?;
                let b = &buf;
                s.add_block(range.start, range.len(), |k| {
                    let v = f64::from(b[k]);
                    v * v
                });
            }
            sums.push(s.total());
        }
        Ok(GlobalStats {
            counts: Vec::new(),
            sums,
        })
    }

    fn merge(
        &self,
        job: &TensorJob,
        global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let n = self.weights.len();
        let c = self.coefficients(global)?;
        let c_sum: f64 = c.iter().sum();
        for i in 0..n {
            stat_shape(INFO.name, job, reader, i, KIND, Some(&job.shape))?;
        }
        let floors: Vec<f64> = (0..n)
            .map(|i| {
                if !self.favor_target || i == 0 {
                    self.floor
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let mut x = vec![Vec::new(); n];
        let mut f = vec![Vec::new(); n];
        let mut out = Vec::new();
        for range in job.blocks() {
            for i in 0..n {
                x[i].resize(range.len(), 0.0f32);
                f[i].resize(range.len(), 0.0f32);
                read_checked(job, reader, Input::Model(i), range.clone(), &mut x[i])?;
                read_stat_checked(job, reader, i, KIND, range.clone(), &mut f[i])?;
                Self::check_fisher_values(job, i, range.start, &f[i])?;
            }
            out.resize(range.len(), 0.0f32);
            out.par_iter_mut().enumerate().for_each(|(k, o)| {
                let mut num = 0.0f64;
                let mut den = 0.0f64;
                let mut avg = 0.0f64;
                for i in 0..n {
                    let fi = f64::from(f[i][k]).max(floors[i]);
                    let xi = f64::from(x[i][k]);
                    let w = c[i] * fi;
                    num += w * xi;
                    den += w;
                    avg += c[i] * xi;
                }
                *o = if den > 0.0 {
                    (num / den) as f32
                } else {
                    (avg / c_sum) as f32
                };
            });
            writer.write(range, &out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::gram::testutil::{job, rand_vec, run_invariant};
    use crate::params::Scalar;
    use crate::tensor::MemReader;

    fn reader(models: &[Vec<f32>], fishers: &[Vec<f32>], shape: &[usize]) -> MemReader {
        let mut r = MemReader {
            base: None,
            models: models.to_vec(),
            stats: Default::default(),
        };
        for (i, f) in fishers.iter().enumerate() {
            r.stats
                .insert((i, "fisher".into()), (shape.to_vec(), f.clone()));
        }
        r
    }

    fn naive(models: &[Vec<f32>], fishers: &[Vec<f32>], c: &[f64], floor: &[f64]) -> Vec<f64> {
        (0..models[0].len())
            .map(|e| {
                let mut num = 0.0;
                let mut den = 0.0;
                for i in 0..models.len() {
                    let f = f64::from(fishers[i][e]).max(floor[i]);
                    num += c[i] * f * f64::from(models[i][e]);
                    den += c[i] * f;
                }
                num / den
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "element {k}: got {g}, want {w}"
            );
        }
    }

    fn abs_vec(v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(|x| x.abs()).collect()
    }

    #[test]
    fn weighted_mean_with_floor() {
        let shape = [5, 7];
        let n = 35;
        let models: Vec<Vec<f32>> = (1..4).map(|s| rand_vec(s, n)).collect();
        let mut fishers: Vec<Vec<f32>> = (10..13).map(|s| abs_vec(rand_vec(s, n))).collect();
        // Some zeros so the floor matters, including an element zero in every model.
        for f in &mut fishers {
            f[3] = 0.0;
            f[11] = 0.0;
        }
        fishers[1][20] = 0.0;
        let r = reader(&models, &fishers, &shape);
        let w = [0.5, 1.0, 2.0];
        let p = TensorParams::default().with_model_values("weight", &w);
        let m = Fisher::from_params(&p, 3).unwrap();
        let got = run_invariant(&m, &job(&shape, 3, false, n), &r);
        close(&got, &naive(&models, &fishers, &w, &[1e-8; 3]));
        // Element 3 is zero in every Fisher: the floor makes it the weighted average.
        let avg = (0.5 * f64::from(models[0][3])
            + f64::from(models[1][3])
            + 2.0 * f64::from(models[2][3]))
            / 3.5;
        assert!((f64::from(got[3]) - avg).abs() < 1e-6);

        // mmatena: floor 1e-6 on model 0 only.
        let p = p
            .with_global("fisher_floor", Scalar::Num(1e-6))
            .with_global("favor_target_model", Scalar::Bool(true));
        let m = Fisher::from_params(&p, 3).unwrap();
        let got = run_invariant(&m, &job(&shape, 3, false, n), &r);
        close(&got, &naive(&models, &fishers, &w, &[1e-6, 0.0, 0.0]));
    }

    #[test]
    fn zero_floor_all_zero_falls_back_to_average() {
        let models = vec![vec![1.0f32, 2.0], vec![3.0, 6.0]];
        let fishers = vec![vec![0.0f32, 1.0], vec![0.0, 3.0]];
        let r = reader(&models, &fishers, &[2]);
        let p = TensorParams::default().with_global("fisher_floor", Scalar::Num(0.0));
        let m = Fisher::from_params(&p, 2).unwrap();
        let got = run_invariant(&m, &job(&[2], 2, false, 2), &r);
        assert_eq!(got, vec![2.0, 5.0]);
    }

    #[test]
    fn global_normalisation_over_two_tensors() {
        // Two tensors of the same model set; norms are over both.
        let (na, nb) = (12usize, 9usize);
        let ma: Vec<Vec<f32>> = (1..3).map(|s| rand_vec(s, na)).collect();
        let mb: Vec<Vec<f32>> = (3..5).map(|s| rand_vec(s, nb)).collect();
        let fa: Vec<Vec<f32>> = (5..7).map(|s| abs_vec(rand_vec(s, na))).collect();
        // Model 1's Fisher is 100× larger: without normalisation it dominates.
        let fb: Vec<Vec<f32>> = (7..9)
            .map(|s| abs_vec(rand_vec(s, nb)))
            .enumerate()
            .map(|(i, v)| {
                v.into_iter()
                    .map(|x| x * if i == 1 { 100.0 } else { 1.0 })
                    .collect()
            })
            .collect();
        let ra = reader(&ma, &fa, &[3, 4]);
        let rb = reader(&mb, &fb, &[9]);
        let w = [1.0, 3.0];
        let p = TensorParams::default()
            .with_model_values("weight", &w)
            .with_global("normalize_fishers", Scalar::Bool(true));
        let m = Fisher::from_params(&p, 2).unwrap();
        assert_eq!(m.class(), ShardClass::G);
        let ja = job(&[3, 4], 2, false, 5);
        let jb = job(&[9], 2, false, 4);
        // The executor: sum each tensor's global stats, then merge each tensor.
        let mut g = m.global_pass(0, &[], &ja, &ra).unwrap();
        g.accumulate(&m.global_pass(0, &[], &jb, &rb).unwrap());
        let mut wa = crate::tensor::MemWriter::default();
        m.merge(&ja, std::slice::from_ref(&g), &ra, &mut wa)
            .unwrap();
        let mut wb = crate::tensor::MemWriter::default();
        m.merge(&jb, std::slice::from_ref(&g), &rb, &mut wb)
            .unwrap();
        // Independent reference: norms over both tensors, raw Fishers.
        let norm = |i: usize| -> f64 {
            fa[i]
                .iter()
                .chain(&fb[i])
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let c = [w[0] / norm(0), w[1] / norm(1)];
        close(&wa.data, &naive(&ma, &fa, &c, &[1e-8; 2]));
        close(&wb.data, &naive(&mb, &fb, &c, &[1e-8; 2]));
        // Different from the unnormalised merge.
        let un = naive(&mb, &fb, &w, &[1e-8; 2]);
        assert!(wb
            .data
            .iter()
            .zip(&un)
            .any(|(a, b)| (f64::from(*a) - b).abs() > 1e-3));
    }

    #[test]
    fn errors_name_model_and_key() {
        let models = vec![vec![1.0f32, 2.0], vec![3.0, 6.0]];
        let mut r = reader(&models, &[vec![1.0, 1.0]], &[2]);
        let m = Fisher::from_params(&TensorParams::default(), 2).unwrap();
        let err = merge_err(&m, &r);
        assert!(
            err.contains("model #1") && err.contains("w::fisher"),
            "{err}"
        );
        r.stats
            .insert((1, "fisher".into()), (vec![2], vec![1.0, f32::NAN]));
        let err = merge_err(&m, &r);
        assert!(
            err.contains("non-finite") && err.contains("model #1"),
            "{err}"
        );
        r.stats
            .insert((1, "fisher".into()), (vec![3], vec![1.0; 3]));
        let err = merge_err(&m, &r);
        assert!(err.contains("shape"), "{err}");
        for (key, p) in [
            (
                "fisher_floor",
                TensorParams::default().with_global("fisher_floor", Scalar::Num(-1.0)),
            ),
            (
                "weight",
                TensorParams::default().with_model_values("weight", &[-1.0, 1.0]),
            ),
            (
                "weight",
                TensorParams::default().with_model_values("weight", &[0.0, 0.0]),
            ),
        ] {
            match Fisher::from_params(&p, 2) {
                Err(MergeError::BadParameter { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{other:?}"),
            }
        }
    }

    fn merge_err(m: &Fisher, r: &MemReader) -> String {
        let mut j = job(&[2], 2, false, 2);
        j.name = "w".into();
        crate::tensor::merge_in_memory(m, &j, r)
            .unwrap_err()
            .to_string()
    }
}
