//! `regmean`: RegMean, the closed-form least-squares merge of linear layers (methods.md §10;
//! Jin et al., ICLR 2023, `bloomberg/dataless-model-merging/src/model_merge/`, and MaTS
//! `r-three/mats/src/merging/regmean.py`). mergekit has no such method. Sharding class **T**.
//!
//! For a linear weight W_i ∈ R^{out×in} (torch layout) and its input Gram G_i (the statistic
//! `NAME::gram_in`, in×in):
//!
//! - G̃_i = c_i · (α·G_i + (1−α)·diag(G_i)): off-diagonal entries scaled by `alpha`;
//! - solve (Σ_i G̃_i) X = Σ_i G̃_i W_iᵀ for X = Wᵀ (in×out) by Cholesky (f64, [`linalg`]), with a
//!   ridge `ridge · mean(live diagonal of Σ G̃)` added to the diagonal;
//! - the result is W = Xᵀ, cast to f32.
//!
//! Parameters:
//! - `alpha` (default 1.0, in [0, 1]): off-diagonal scaling. 1.0 is the reference's default
//!   (`regmean_reduce_nondiag: -1`, disabled); its experiment configs use 0.1 and 0.9;
//! - `weight` (per model, default 1.0, ≥ 0, not all 0): model coefficients c_i. The reference
//!   scales G_i by c_i·N; the common factor N changes nothing here (the ridge is relative to the
//!   diagonal), so G_i is scaled by c_i;
//! - `ridge` (default 1e-8, ≥ 0): relative ridge. `0` gives the plain solve, which fails on a
//!   singular Gram with an error suggesting a ridge;
//! - `regmean_zero_fallback` (default false): see below.
//!
//! Input features with no signal (row k of Σ G̃ all zero, i.e. feature k is zero in every
//! model's inputs) do not enter the system: their output column W[:, k] is the c-weighted
//! average of the models' W_i[:, k] (recommended, methods.md §10). The reference (MaTS and
//! git-theta `matrix_inverse`) drops those rows/columns and leaves **zeros** there; that
//! behaviour is `regmean_zero_fallback: true`. When every feature is dead (all-zero
//! statistics) the whole tensor is that fallback.
//!
//! Memory: Σ G̃ and one model's G̃_i (in² f64 each), the right-hand side (in·out f64), and the
//! solver's copies of both; see [`MergeMethod::whole_tensor_bytes`]. The products G̃_i W_iᵀ run
//! over fixed panels of [`PANEL_ROWS`] output rows, so results do not depend on `block_elems`.
//!
//! Tensors that are not 2-D or have no `gram_in` statistic are not solved: the planner averages
//! them (architecture.md, "Statistics files"); here a missing statistic is an error naming the
//! model and the key.
//!
//! [`linalg`]: crate::linalg

use crate::error::{MergeError, Result};
use crate::linalg;
use crate::methods::fisher::{nonneg_weights, read_checked, read_stat_checked, stat_shape};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};

/// Static facts about `regmean`.
pub const INFO: MethodInfo = MethodInfo {
    name: "regmean",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &["alpha", "ridge", "regmean_zero_fallback"],
    model_params: &["weight"],
    random: false,
    summary: "RegMean: least-squares merge of linear layers from their input Gram matrices",
};

/// Output rows per panel of the G̃_i W_iᵀ products (fixed: changing it may change last bits).
pub const PANEL_ROWS: usize = 64;

/// Default relative ridge.
pub const DEFAULT_RIDGE: f64 = 1e-8;

/// Read model `model`'s square `d×d` statistic `kind` (rows in blocks of at most
/// `job.block_elems` elements), checked finite, as f64 with off-diagonals scaled by `alpha`.
pub(crate) fn read_square_stat(
    method: &str,
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    kind: &str,
    d: usize,
    alpha: f64,
) -> Result<Vec<f64>> {
    stat_shape(method, job, reader, model, kind, Some(&[d, d]))?;
    let mut g = vec![0.0f64; d * d];
    let rows_per = (job.block_elems / d.max(1)).max(1);
    let mut buf = Vec::new();
    let mut r0 = 0;
    while r0 < d {
        let r1 = (r0 + rows_per).min(d);
        let range = r0 * d..r1 * d;
        buf.resize(range.len(), 0.0f32);
        read_stat_checked(job, reader, model, kind, range.clone(), &mut buf)?;
        for (k, v) in buf.iter().enumerate() {
            let e = range.start + k;
            let (r, c) = (e / d, e % d);
            let s = if r == c { 1.0 } else { alpha };
            g[e] = s * f64::from(*v);
        }
        r0 = r1;
    }
    Ok(g)
}

/// Check the off-diagonal scaling parameter `alpha` (default 1.0).
pub(crate) fn alpha_param(params: &TensorParams) -> Result<f64> {
    let alpha = params.num("alpha", 1.0)?;
    if !(0.0..=1.0).contains(&alpha) {
        return Err(MergeError::BadParameter {
            key: "alpha".into(),
            message: format!("off-diagonal scaling must be in [0, 1], got {alpha}"),
        });
    }
    Ok(alpha)
}

/// The `[out, in]` dimensions of a linear weight job, or an error naming the method.
pub(crate) fn linear_dims(method: &str, job: &TensorJob) -> Result<(usize, usize)> {
    match job.shape.as_slice() {
        [o, i] => Ok((*o, *i)),
        other => Err(MergeError::BadInputs {
            method: method.into(),
            message: format!(
                "tensor `{}` has shape {other:?}; only 2-D linear weights [out, in] are solved \
                 (leave other tensors to be averaged)",
                job.name
            ),
        }),
    }
}

/// Add `g · W_iᵀ` into the row-major `in × out` matrix `b`, reading model `model`'s weight
/// (`out × in`) in panels of [`PANEL_ROWS`] rows.
pub(crate) fn add_gram_times_weight_t(
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    g: &[f64],
    b: &mut [f64],
) -> Result<()> {
    let (out, d_in) = (job.shape[0], job.shape[1]);
    let mut buf = Vec::new();
    let mut o0 = 0;
    while o0 < out {
        let o1 = (o0 + PANEL_ROWS).min(out);
        let p = o1 - o0;
        buf.resize(p * d_in, 0.0f32);
        read_checked(
            job,
            reader,
            Input::Model(model),
            o0 * d_in..o1 * d_in,
            &mut buf,
        )?;
        let w: Vec<f64> = buf.iter().map(|v| f64::from(*v)).collect();
        // (in × in) · (p × in)ᵀ = in × p
        let gw = linalg::matmul_nt(g, d_in, d_in, &w, p);
        for k in 0..d_in {
            let dst = &mut b[k * out + o0..k * out + o1];
            for (x, y) in dst.iter_mut().zip(&gw[k * p..(k + 1) * p]) {
                *x += y;
            }
        }
        o0 = o1;
    }
    Ok(())
}

/// `regmean` configured for one tensor.
#[derive(Debug, Clone)]
pub struct RegMean {
    /// Per-model coefficients c_i.
    weights: Vec<f64>,
    /// Off-diagonal scaling.
    alpha: f64,
    /// Relative ridge.
    ridge: f64,
    /// Zero (reference) instead of average for features with no signal.
    zero_fallback: bool,
}

impl RegMean {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        if n_models == 0 {
            return Err(MergeError::BadInputs {
                method: INFO.name.into(),
                message: "needs at least one model".into(),
            });
        }
        let ridge = params.num("ridge", DEFAULT_RIDGE)?;
        if !(ridge.is_finite() && ridge >= 0.0) {
            return Err(MergeError::BadParameter {
                key: "ridge".into(),
                message: format!("must be a finite number ≥ 0, got {ridge}"),
            });
        }
        Ok(Self {
            weights: nonneg_weights(params, n_models)?,
            alpha: alpha_param(params)?,
            ridge,
            zero_fallback: params.bool("regmean_zero_fallback", false)?,
        })
    }
}

impl MergeMethod for RegMean {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 2
    }

    fn whole_tensor_bytes(&self, job: &TensorJob) -> Option<u64> {
        let (out, d_in) = linear_dims(INFO.name, job).ok()?;
        let (o, i) = (out as u64, d_in as u64);
        // Σ G̃, G̃_i and the solver's copy (in² f64 each); rhs and solution (in·out f64 each);
        // one panel of the weight (f32 and f64).
        Some(8 * (3 * i * i + 2 * i * o) + 12 * PANEL_ROWS as u64 * i)
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let (out, d_in) = linear_dims(INFO.name, job)?;
        let n = self.weights.len();
        for i in 0..n {
            stat_shape(INFO.name, job, reader, i, "gram_in", Some(&[d_in, d_in]))?;
        }
        let mut a = vec![0.0f64; d_in * d_in];
        let mut b = vec![0.0f64; d_in * out];
        for (i, &c) in self.weights.iter().enumerate() {
            if c == 0.0 {
                continue;
            }
            let mut g = read_square_stat(INFO.name, job, reader, i, "gram_in", d_in, self.alpha)?;
            if c != 1.0 {
                for v in &mut g {
                    *v *= c;
                }
            }
            for (x, y) in a.iter_mut().zip(&g) {
                *x += y;
            }
            add_gram_times_weight_t(job, reader, i, &g, &mut b)?;
        }
        let dead: Vec<bool> = (0..d_in)
            .map(|k| a[k * d_in..(k + 1) * d_in].iter().all(|v| *v == 0.0))
            .collect();
        let live = dead.iter().filter(|d| !**d).count();
        let x = if live == 0 {
            None
        } else {
            let mean_diag = (0..d_in)
                .filter(|k| !dead[*k])
                .map(|k| a[k * d_in + k])
                .sum::<f64>()
                / live as f64;
            for k in (0..d_in).filter(|k| dead[*k]) {
                // Decoupled unknowns: pin them to 0, replaced below.
                a[k * d_in + k] = 1.0;
                b[k * out..(k + 1) * out].fill(0.0);
            }
            let ridge = self.ridge * mean_diag.abs();
            Some(
                linalg::cholesky_solve(&a, d_in, &b, out, ridge)
                    .map_err(|e| linalg::name_tensor(e, &job.name))
                    .map_err(|e| match e {
                        MergeError::Numeric { tensor, message } => MergeError::Numeric {
                            tensor,
                            message: format!(
                                "{message} (regmean `ridge` is {}), or scale the off-diagonal \
                                 entries with `alpha` below 1 (the paper's experiments use 0.9 \
                                 and 0.1); Gram matrices from fewer examples than the layer's \
                                 inputs are singular",
                                self.ridge
                            ),
                        },
                        other => other,
                    })?,
            )
        };
        drop(a);
        drop(b);
        let any_dead = live < d_in;
        let c_sum: f64 = self.weights.iter().sum();
        let mut rows = vec![Vec::new(); if any_dead { n } else { 0 }];
        let mut buf = Vec::new();
        for range in job.row_blocks() {
            let o0 = range.start / d_in;
            let o1 = range.end / d_in;
            if any_dead && !self.zero_fallback {
                for (i, r) in rows.iter_mut().enumerate() {
                    r.resize(range.len(), 0.0f32);
                    read_checked(job, reader, Input::Model(i), range.clone(), r)?;
                }
            }
            buf.resize(range.len(), 0.0f32);
            for o in o0..o1 {
                for (k, &dead_k) in dead.iter().enumerate() {
                    let e = (o - o0) * d_in + k;
                    buf[e] = if !dead_k {
                        x.as_ref().expect("a live feature implies a solve")[k * out + o] as f32
                    } else if self.zero_fallback {
                        0.0
                    } else {
                        let s: f64 = self
                            .weights
                            .iter()
                            .zip(&rows)
                            .map(|(c, r)| c * f64::from(r[e]))
                            .sum();
                        (s / c_sum) as f32
                    };
                }
            }
            writer.write(range, &buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::methods::gram::testutil::{job, rand_vec, run_invariant};
    use crate::params::Scalar;
    use crate::tensor::MemReader;

    /// Dense Gaussian elimination with partial pivoting (f64), solving A X = B for row-major
    /// A (n×n) and B (n×m): the tests' independent reference.
    pub(crate) fn gauss_solve(a: &[f64], b: &[f64], n: usize, m: usize) -> Vec<f64> {
        let mut a = a.to_vec();
        let mut b = b.to_vec();
        for col in 0..n {
            let piv = (col..n)
                .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
                .unwrap();
            if piv != col {
                for j in 0..n {
                    a.swap(col * n + j, piv * n + j);
                }
                for j in 0..m {
                    b.swap(col * m + j, piv * m + j);
                }
            }
            let p = a[col * n + col];
            assert!(p != 0.0, "singular");
            for r in col + 1..n {
                let f = a[r * n + col] / p;
                if f == 0.0 {
                    continue;
                }
                for j in col..n {
                    a[r * n + j] -= f * a[col * n + j];
                }
                for j in 0..m {
                    b[r * m + j] -= f * b[col * m + j];
                }
            }
        }
        let mut x = vec![0.0; n * m];
        for r in (0..n).rev() {
            for j in 0..m {
                let mut s = b[r * m + j];
                for k in r + 1..n {
                    s -= a[r * n + k] * x[k * m + j];
                }
                x[r * m + j] = s / a[r * n + r];
            }
        }
        x
    }

    /// A random PSD Gram XᵀX / rows of `rows × d` inputs (f32 values).
    pub(crate) fn gram(seed: u64, rows: usize, d: usize) -> Vec<f32> {
        let x = rand_vec(seed, rows * d);
        let mut g = vec![0.0f32; d * d];
        for i in 0..d {
            for j in 0..d {
                let s: f64 = (0..rows)
                    .map(|r| f64::from(x[r * d + i]) * f64::from(x[r * d + j]))
                    .sum();
                g[i * d + j] = (s / rows as f64) as f32;
            }
        }
        g
    }

    pub(crate) fn reader_with(
        models: &[Vec<f32>],
        kind: &str,
        stats: &[Vec<f32>],
        shape: &[usize],
    ) -> MemReader {
        let mut r = MemReader {
            base: None,
            models: models.to_vec(),
            stats: Default::default(),
        };
        for (i, s) in stats.iter().enumerate() {
            r.stats
                .insert((i, kind.into()), (shape.to_vec(), s.clone()));
        }
        r
    }

    /// Independent reference: assemble Σ c_i G̃_i and Σ c_i G̃_i W_iᵀ naively, add the ridge,
    /// solve by Gaussian elimination, transpose.
    fn naive(
        models: &[Vec<f32>],
        grams: &[Vec<f32>],
        c: &[f64],
        alpha: f64,
        ridge_rel: f64,
        out: usize,
        d: usize,
    ) -> Vec<f64> {
        let mut a = vec![0.0; d * d];
        let mut b = vec![0.0; d * out];
        for i in 0..models.len() {
            for r in 0..d {
                for k in 0..d {
                    let s = if r == k { 1.0 } else { alpha };
                    let g = c[i] * s * f64::from(grams[i][r * d + k]);
                    a[r * d + k] += g;
                    for o in 0..out {
                        b[r * out + o] += g * f64::from(models[i][o * d + k]);
                    }
                }
            }
        }
        let mean = (0..d).map(|k| a[k * d + k]).sum::<f64>() / d as f64;
        for k in 0..d {
            a[k * d + k] += ridge_rel * mean;
        }
        let x = gauss_solve(&a, &b, d, out);
        let mut w = vec![0.0; out * d];
        for o in 0..out {
            for k in 0..d {
                w[o * d + k] = x[k * out + o];
            }
        }
        w
    }

    fn close(got: &[f32], want: &[f64], rel: f64) {
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= rel * scale,
                "element {k}: got {g}, want {w}"
            );
        }
    }

    #[test]
    fn closed_form_matches_dense_solve() {
        let (out, d) = (70, 6);
        let models: Vec<Vec<f32>> = (1..4).map(|s| rand_vec(s, out * d)).collect();
        let grams: Vec<Vec<f32>> = (10..13).map(|s| gram(s, 20, d)).collect();
        let r = reader_with(&models, "gram_in", &grams, &[d, d]);
        for (alpha, w) in [
            (1.0, [1.0, 1.0, 1.0]),
            (0.3, [0.5, 2.0, 1.0]),
            (0.0, [1.0, 0.0, 1.0]),
        ] {
            let p = TensorParams::default()
                .with_model_values("weight", &w)
                .with_global("alpha", Scalar::Num(alpha));
            let m = RegMean::from_params(&p, 3).unwrap();
            let got = run_invariant(&m, &job(&[out, d], 3, false, out * d), &r);
            close(&got, &naive(&models, &grams, &w, alpha, 1e-8, out, d), 1e-5);
        }
    }

    #[test]
    fn singular_gram_and_dead_features() {
        let (out, d) = (5, 4);
        let models: Vec<Vec<f32>> = (1..3).map(|s| rand_vec(s, out * d)).collect();
        // Rank-1 Grams (singular), feature 2 zero in every model's inputs.
        let mk = |v: [f32; 4]| -> Vec<f32> { (0..16).map(|e| v[e / 4] * v[e % 4]).collect() };
        let grams = vec![mk([1.0, 0.5, 0.0, -1.0]), mk([0.2, 1.0, 0.0, 0.3])];
        let r = reader_with(&models, "gram_in", &grams, &[d, d]);
        let m = RegMean::from_params(&TensorParams::default(), 2).unwrap();
        let got = run_invariant(&m, &job(&[out, d], 2, false, 7), &r);
        // Reference: the live 3×3 system with the ridge on the live mean diagonal.
        let live = [0usize, 1, 3];
        let sub = |g: &Vec<f32>| -> Vec<f32> {
            let mut s = Vec::new();
            for &i in &live {
                for &j in &live {
                    s.push(g[i * 4 + j]);
                }
            }
            s
        };
        let sub_models: Vec<Vec<f32>> = models
            .iter()
            .map(|m| {
                let mut s = Vec::new();
                for o in 0..out {
                    for &k in &live {
                        s.push(m[o * 4 + k]);
                    }
                }
                s
            })
            .collect();
        let want = naive(
            &sub_models,
            &[sub(&grams[0]), sub(&grams[1])],
            &[1.0, 1.0],
            1.0,
            1e-8,
            out,
            3,
        );
        for o in 0..out {
            for (j, &k) in live.iter().enumerate() {
                let (g, w) = (f64::from(got[o * 4 + k]), want[o * 3 + j]);
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "({o},{k}): {g} vs {w}"
                );
            }
            let avg = (f64::from(models[0][o * 4 + 2]) + f64::from(models[1][o * 4 + 2])) / 2.0;
            assert!((f64::from(got[o * 4 + 2]) - avg).abs() < 1e-7);
        }
        // The solution satisfies the (singular) normal equations: A x ≈ b.
        // Reference zeroing.
        let p = TensorParams::default().with_global("regmean_zero_fallback", Scalar::Bool(true));
        let m = RegMean::from_params(&p, 2).unwrap();
        let z = run_invariant(&m, &job(&[out, d], 2, false, 7), &r);
        for o in 0..out {
            assert_eq!(z[o * 4 + 2], 0.0);
            assert_eq!(z[o * 4], got[o * 4]);
        }
        // Without a ridge the singular system is an error naming the tensor and `ridge`.
        let p = TensorParams::default().with_global("ridge", Scalar::Num(0.0));
        let m = RegMean::from_params(&p, 2).unwrap();
        let e = crate::tensor::merge_in_memory(&m, &job(&[out, d], 2, false, 7), &r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("up_proj") && e.contains("ridge"), "{e}");
    }

    #[test]
    fn all_zero_statistics_average_or_zero() {
        let (out, d) = (3, 2);
        let models: Vec<Vec<f32>> = (1..3).map(|s| rand_vec(s, out * d)).collect();
        let grams = vec![vec![0.0f32; 4]; 2];
        let r = reader_with(&models, "gram_in", &grams, &[d, d]);
        let p = TensorParams::default().with_model_values("weight", &[1.0, 3.0]);
        let m = RegMean::from_params(&p, 2).unwrap();
        let got = run_invariant(&m, &job(&[out, d], 2, false, 6), &r);
        let want: Vec<f64> = (0..6)
            .map(|e| (f64::from(models[0][e]) + 3.0 * f64::from(models[1][e])) / 4.0)
            .collect();
        close(&got, &want, 1e-7);
        let p = p.with_global("regmean_zero_fallback", Scalar::Bool(true));
        let m = RegMean::from_params(&p, 2).unwrap();
        assert_eq!(
            run_invariant(&m, &job(&[out, d], 2, false, 6), &r),
            vec![0.0; 6]
        );
    }

    #[test]
    fn errors_name_model_key_and_parameters() {
        let models = vec![vec![1.0f32; 4], vec![2.0; 4]];
        let r = reader_with(&models, "gram_in", &[vec![1.0, 0.0, 0.0, 1.0]], &[2, 2]);
        let m = RegMean::from_params(&TensorParams::default(), 2).unwrap();
        let e = crate::tensor::merge_in_memory(&m, &job(&[2, 2], 2, false, 4), &r)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model #1") && e.contains("up_proj.weight::gram_in"),
            "{e}"
        );
        let e = crate::tensor::merge_in_memory(&m, &job(&[4], 2, false, 4), &r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2-D"), "{e}");
        for (key, p) in [
            (
                "alpha",
                TensorParams::default().with_global("alpha", Scalar::Num(1.5)),
            ),
            (
                "ridge",
                TensorParams::default().with_global("ridge", Scalar::Num(-1.0)),
            ),
            (
                "weight",
                TensorParams::default().with_model_values("weight", &[-1.0, 1.0]),
            ),
        ] {
            match RegMean::from_params(&p, 2) {
                Err(MergeError::BadParameter { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{other:?}"),
            }
        }
        assert!(m.whole_tensor_bytes(&job(&[4, 2], 2, false, 4)).is_some());
    }
}
