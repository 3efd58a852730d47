//! `iso_c` and `iso_cts`: isotropic merging in the common (and task-specific) subspaces
//! (methods.md §13; reference `danielm1405/iso-merging`, `src/utils/iso.py`, functions `iso_c`
//! and `iso_cts`). Sharding class **T**: every 2-D tensor needs whole-matrix SVDs. mergekit has
//! no such methods.
//!
//! Per 2-D tensor whose name does not contain `text_projection`, with task vectors
//! Δ_i = θ_i − θ_0 (f64) of shape m×n, r = min(m, n), T tasks and M = Σ_i Δ_i (the sum, as the
//! reference: it averages and multiplies back by T):
//! - **Iso-C**: M = U S Vᵀ (thin); Δ = U · (mean(S)·I) · Vᵀ, the mean over all r values.
//! - **Iso-CTS**:
//!   1. M = U S Vᵀ; common-space size k_c = ⌊r·f⌋ (f = `common_space_fraction`), then
//!      adjusted as the reference: t_s = round((r − k_c)/T)·T with Python's `round` (ties to
//!      even), k_c = r − t_s, n_t = t_s/T components per task.
//!   2. Per task: W_i = Δ_i − U_c U_cᵀ Δ_i (U_c = U[:, :k_c]); W_i = U_i S_i V_iᵀ, keep the top n_t.
//!   3. Stack [task 1 | … | task T | common] into U (m×r), s (r) and V (n×r) (the common block
//!      holds U_c, S[:k_c], V[:, :k_c]); replace U and V by their polar factors (A = P Σ Qᵀ gives
//!      P Qᵀ) and every s by mean(s).
//!   4. Δ = U · diag(s) · Vᵀ.
//! - Both: θ = θ_0 + α·Δ.
//!
//! Other tensors (not 2-D, or excluded by name): θ = θ_0 + α·mean_i(Δ_i), as the reference
//! (`sum(tvs)/len(tvs)` for Iso-C, a running mean for Iso-CTS), whose merged task vector is then
//! applied as a whole with the scaling coefficient α.
//!
//! Parameters (method-wide): `alpha` (default 1.0, the unscaled merged task vector; the reference
//! picks α on validation data from 0.1, 0.2, …, 3.0; any finite value is accepted);
//! `common_space_fraction` (`iso_cts` only, in (0, 1], default 0.8 as the reference's config).
//! Base model required.
//!
//! Numerics: f64 linear algebra with faer, sequential, inputs read and outputs written in blocks
//! (see [`super::tsv`]): results are bit-identical whatever the block size or thread count.
//!
//! Deviations from the reference: f64 instead of f32 SVDs. Where M is rank-deficient its
//! singular vectors for zero singular values are arbitrary, yet Iso-C gives them weight mean(S);
//! the reference's result then depends on LAPACK's choice and this one on faer's. For Iso-CTS,
//! where the reference's rounding would make t_s exceed r (tiny matrices with k_c < T/2, e.g.
//! r = 3, T = 2, f = 0.2), t_s is lowered by T until it fits instead of slicing with a negative
//! index. With n_t = 0 the per-task SVDs, which contribute nothing, are skipped.

use crate::error::{MergeError, Result};
use crate::methods::tsv::{
    check_job, load_task_vector, polar, read_alpha, require_base, svd_bytes, thin_svd, uses_svd,
    write_mean, write_merged, MEAN_BUFFERS,
};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};
use faer::{Accum, Mat, Par};

/// Static facts about `iso_c`.
pub const INFO_C: MethodInfo = MethodInfo {
    name: "iso_c",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &["alpha"],
    model_params: &[],
    random: false,
    summary: "Iso-C: sum of task vectors with its singular-value spectrum flattened to the mean",
};

/// Static facts about `iso_cts`.
pub const INFO_CTS: MethodInfo = MethodInfo {
    name: "iso_cts",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &["alpha", "common_space_fraction"],
    model_params: &[],
    random: false,
    summary: "Iso-CTS: common subspace plus task-specific subspaces, isotropic spectrum",
};

/// Default `common_space_fraction` (the reference's `config/method/iso_cts.yaml`).
pub const DEFAULT_COMMON_SPACE_FRACTION: f64 = 0.8;

/// Bytes per f64.
const F64: u64 = 8;

/// Which isotropic merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IsoVariant {
    /// Iso-C: the spectrum of Σ Δ_i made flat.
    Common,
    /// Iso-CTS with this `common_space_fraction`.
    CommonTaskSpecific {
        /// Fraction of the rank given to the common subspace before the divisibility adjustment.
        fraction: f64,
    },
}

/// `iso_c` or `iso_cts` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Iso {
    n: usize,
    alpha: f64,
    variant: IsoVariant,
}

impl Iso {
    /// Build `iso_c` (`task_specific` false) or `iso_cts` from resolved parameters.
    pub fn from_params(
        params: &TensorParams,
        n_models: usize,
        has_base: bool,
        task_specific: bool,
    ) -> Result<Self> {
        let name = if task_specific {
            INFO_CTS.name
        } else {
            INFO_C.name
        };
        require_base(name, has_base, n_models)?;
        let alpha = read_alpha(params)?;
        let variant = if task_specific {
            let f = params.num("common_space_fraction", DEFAULT_COMMON_SPACE_FRACTION)?;
            if !(f > 0.0 && f <= 1.0) {
                return Err(MergeError::BadParameter {
                    key: "common_space_fraction".into(),
                    message: format!(
                        "must be in (0, 1] (the share of the rank kept for the common \
                         subspace; the reference uses 0.8), got {f}"
                    ),
                });
            }
            IsoVariant::CommonTaskSpecific { fraction: f }
        } else {
            IsoVariant::Common
        };
        Ok(Self {
            n: n_models,
            alpha,
            variant,
        })
    }

    /// The variant this instance runs.
    pub fn variant(&self) -> IsoVariant {
        self.variant
    }

    /// Iso-CTS subspace sizes for rank r, T tasks and fraction f: (k_c, n_t), with
    /// k_c + T·n_t = r (see the module docs for the reference's rounding).
    pub fn common_split(r: usize, t: usize, fraction: f64) -> (usize, usize) {
        let k_c = ((r as f64) * fraction).floor() as usize;
        let k_c = k_c.min(r);
        let per_task = ((r - k_c) as f64 / t as f64).round_ties_even() as usize;
        let mut total = per_task * t;
        while total > r {
            total -= t;
        }
        (r - total, total / t)
    }

    fn delta(&self, job: &TensorJob, reader: &dyn TensorReader) -> Result<Mat<f64>> {
        let (m, n) = (job.shape[0], job.shape[1]);
        let r = m.min(n);
        let mut sum = Mat::<f64>::zeros(m, n);
        for i in 0..self.n {
            load_task_vector(job, reader, i, &mut sum, true)?;
        }
        let f = thin_svd(sum.as_ref(), &job.name)?;
        drop(sum);
        let mut out = Mat::<f64>::zeros(m, n);
        match self.variant {
            IsoVariant::Common => {
                let mean = mean(&f.s);
                let mut u = f.u;
                for x in u.as_mut().col_iter_mut().flat_map(|c| c.iter_mut()) {
                    *x *= mean;
                }
                super::tsv::matmul(&mut out, u.as_ref(), f.v.as_ref().transpose());
            }
            IsoVariant::CommonTaskSpecific { fraction } => {
                let (k_c, n_t) = Self::common_split(r, self.n, fraction);
                let common = self.n * n_t;
                let mut u = Mat::<f64>::zeros(m, r);
                let mut v = Mat::<f64>::zeros(n, r);
                let mut s = vec![0.0f64; r];
                for c in 0..k_c {
                    u.col_mut(common + c).copy_from(f.u.col(c));
                    v.col_mut(common + c).copy_from(f.v.col(c));
                    s[common + c] = f.s[c];
                }
                drop(f);
                if n_t > 0 {
                    let mut d = Mat::<f64>::zeros(m, n);
                    let mut proj = Mat::<f64>::zeros(k_c, n);
                    for i in 0..self.n {
                        load_task_vector(job, reader, i, &mut d, false)?;
                        if k_c > 0 {
                            let u_c = u.as_ref().subcols(common, k_c);
                            faer::linalg::matmul::matmul(
                                proj.as_mut(),
                                Accum::Replace,
                                u_c.transpose(),
                                d.as_ref(),
                                1.0,
                                Par::Seq,
                            );
                            faer::linalg::matmul::matmul(
                                d.as_mut(),
                                Accum::Add,
                                u_c,
                                proj.as_ref(),
                                -1.0,
                                Par::Seq,
                            );
                        }
                        let g = thin_svd(d.as_ref(), &job.name)?;
                        for c in 0..n_t {
                            let slot = i * n_t + c;
                            u.col_mut(slot).copy_from(g.u.col(c));
                            v.col_mut(slot).copy_from(g.v.col(c));
                            s[slot] = g.s[c];
                        }
                    }
                }
                let mean = mean(&s);
                let mut pu = polar(u.as_ref(), &job.name)?;
                drop(u);
                let pv = polar(v.as_ref(), &job.name)?;
                drop(v);
                for x in pu.as_mut().col_iter_mut().flat_map(|c| c.iter_mut()) {
                    *x *= mean;
                }
                super::tsv::matmul(&mut out, pu.as_ref(), pv.as_ref().transpose());
            }
        }
        Ok(out)
    }
}

/// Mean of the values, summed in order.
fn mean(s: &[f64]) -> f64 {
    if s.is_empty() {
        0.0
    } else {
        s.iter().sum::<f64>() / s.len() as f64
    }
}

impl MergeMethod for Iso {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, _n_models: usize) -> usize {
        MEAN_BUFFERS
    }

    fn whole_tensor_bytes(&self, job: &TensorJob) -> Option<u64> {
        if !uses_svd(job) {
            return None;
        }
        let (m, n) = (job.shape[0] as u64, job.shape[1] as u64);
        let r = m.min(n);
        let mn = m * n * F64;
        // Phase 1: M and its SVD.
        let phase1 = mn + svd_bytes(m, n);
        let last = match self.variant {
            // U scaled, V, and the output.
            IsoVariant::Common => (m + n + 1) * r * F64 + mn,
            IsoVariant::CommonTaskSpecific { .. } => {
                let stacked = (m + n + 1) * r * F64;
                // One task vector, its projection onto U_c and its SVD, beside the stack.
                let tasks = stacked + mn + r * n * F64 + svd_bytes(m, n);
                // Polar factors (one SVD at a time) and the output.
                let polars =
                    stacked + svd_bytes(m, r).max(svd_bytes(n, r)) + (m + n) * r * F64 + mn;
                tasks.max(polars)
            }
        };
        Some(phase1.max(last))
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let name = match self.variant {
            IsoVariant::Common => INFO_C.name,
            IsoVariant::CommonTaskSpecific { .. } => INFO_CTS.name,
        };
        check_job(name, job)?;
        if !uses_svd(job) {
            return write_mean(job, reader, self.n, self.alpha, writer);
        }
        let delta = self.delta(job, reader)?;
        write_merged(job, reader, self.alpha, delta.as_ref(), writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::tsv::tests::{
        apply, assert_close, bits, deltas, jacobi_svd, job, naive_mean, naive_polar, reader,
        run_all_blocks, Dense,
    };
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    fn iso(task_specific: bool, alpha: Option<f64>, f: Option<f64>, t: usize) -> Iso {
        let mut p = TensorParams::default();
        if let Some(a) = alpha {
            p = p.with_global("alpha", Scalar::Num(a));
        }
        if let Some(f) = f {
            p = p.with_global("common_space_fraction", Scalar::Num(f));
        }
        Iso::from_params(&p, t, true, task_specific).unwrap()
    }

    fn sum(ds: &[Dense]) -> Dense {
        ds.iter()
            .fold(Dense::zeros(ds[0].r, ds[0].c), |mut acc, d| {
                for (a, b) in acc.a.iter_mut().zip(&d.a) {
                    *a += b;
                }
                acc
            })
    }

    fn naive_iso_c(ds: &[Dense]) -> Dense {
        let (u, s, v) = jacobi_svd(&sum(ds));
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        u.scale_cols(&vec![mean; s.len()]).mul(&v.t())
    }

    /// Python's `round` on a non-negative float: ties to even, written out.
    fn py_round(x: f64) -> usize {
        let fl = x.floor();
        let frac = x - fl;
        let fl = fl as usize;
        if frac > 0.5 || (frac == 0.5 && fl % 2 == 1) {
            fl + 1
        } else {
            fl
        }
    }

    fn naive_iso_cts(ds: &[Dense], f: f64) -> Dense {
        let t = ds.len();
        let (m, n) = (ds[0].r, ds[0].c);
        let r = m.min(n);
        let kc0 = (r as f64 * f) as usize;
        let mut ts = py_round((r - kc0) as f64 / t as f64) * t;
        while ts > r {
            ts -= t;
        }
        let (kc, nt) = (r - ts, ts / t);
        let (u, s, v) = jacobi_svd(&sum(ds));
        let uc = u.cols(0..kc);
        let mut us: Option<Dense> = None;
        let mut vs: Option<Dense> = None;
        let mut ss = Vec::new();
        for d in ds {
            if nt == 0 {
                break;
            }
            let w = d.sub(&uc.mul(&uc.t().mul(d)));
            let (a, b, c) = jacobi_svd(&w);
            let (a, c) = (a.cols(0..nt), c.cols(0..nt));
            us = Some(us.map_or(a.clone(), |x| x.hcat(&a)));
            vs = Some(vs.map_or(c.clone(), |x| x.hcat(&c)));
            ss.extend_from_slice(&b[..nt]);
        }
        let us = us.map_or(uc.clone(), |x| x.hcat(&uc));
        let vs = vs.map_or(v.cols(0..kc), |x| x.hcat(&v.cols(0..kc)));
        ss.extend_from_slice(&s[..kc]);
        assert_eq!(ss.len(), r);
        let mean = ss.iter().sum::<f64>() / r as f64;
        naive_polar(&us)
            .scale_cols(&vec![mean; r])
            .mul(&naive_polar(&vs).t())
    }

    #[test]
    fn iso_c_matches_naive_reference() {
        for (shape, t, alpha) in [
            ([6usize, 9usize], 3usize, 1.0f64),
            ([7, 5], 3, 0.4),
            ([4, 4], 2, 1.0),
        ] {
            let numel = shape[0] * shape[1];
            let r = reader(shape[1] as u64 * 7 + t as u64, numel, t);
            let got = run_all_blocks(&iso(false, Some(alpha), None, t), "w", &shape, &r);
            let want = apply(&r, alpha, &naive_iso_c(&deltas(&r, shape[0], shape[1])));
            assert_close(&got, &want);
        }
    }

    #[test]
    fn iso_c_spectrum_is_flat_on_the_same_subspaces() {
        let (m, n, t, alpha) = (8usize, 6usize, 3usize, 2.0f64);
        let r = reader(42, m * n, t);
        let got = run_all_blocks(&iso(false, Some(alpha), None, t), "w", &[m, n], &r);
        let base = r.base.as_ref().unwrap();
        let d = Dense {
            r: m,
            c: n,
            a: got
                .iter()
                .zip(base)
                .map(|(o, b)| (*o as f64 - *b as f64) / alpha)
                .collect(),
        };
        let (um, sm, vm) = jacobi_svd(&sum(&deltas(&r, m, n)));
        let mean = sm.iter().sum::<f64>() / sm.len() as f64;
        let (_, sd, _) = jacobi_svd(&d);
        for s in &sd {
            assert!((s - mean).abs() < 1e-5 * mean, "{s} vs {mean}");
        }
        // Same singular subspaces: Uᵀ Δ V = mean · I.
        let core = um.t().mul(&d).mul(&vm);
        for i in 0..core.r {
            for j in 0..core.c {
                let want = if i == j { mean } else { 0.0 };
                assert!((core.at(i, j) - want).abs() < 1e-5 * mean);
            }
        }
    }

    #[test]
    fn iso_cts_matches_naive_reference() {
        // (shape, T, f, expected (k_c, n_t)).
        for (shape, t, f, split) in [
            ([10usize, 12usize], 3usize, 0.8f64, (7usize, 1usize)),
            ([9, 11], 2, 0.5, (5, 2)),
            ([12, 12], 3, 0.5, (6, 2)),
            ([7, 5], 3, 0.2, (2, 1)),
        ] {
            let r = shape[0].min(shape[1]);
            assert_eq!(Iso::common_split(r, t, f), split);
            let numel = shape[0] * shape[1];
            let rd = reader(shape[0] as u64 * 13 + t as u64, numel, t);
            let got = run_all_blocks(&iso(true, Some(1.3), Some(f), t), "w", &shape, &rd);
            let want = apply(
                &rd,
                1.3,
                &naive_iso_cts(&deltas(&rd, shape[0], shape[1]), f),
            );
            assert_close(&got, &want);
        }
    }

    #[test]
    fn iso_cts_full_common_space_is_iso_c() {
        let (shape, t) = ([6usize, 8usize], 3usize);
        let r = reader(5, 48, t);
        let a = run_all_blocks(&iso(true, None, Some(1.0), t), "w", &shape, &r);
        let b = run_all_blocks(&iso(false, None, None, t), "w", &shape, &r);
        let b: Vec<f64> = b.iter().map(|x| *x as f64).collect();
        assert_close(&a, &b);
    }

    #[test]
    fn common_split_follows_the_reference() {
        // ViT-B: r = 768, 8 tasks: k_c = 614, (154 / 8 = 19.25) → 19 → k_c = 616.
        assert_eq!(Iso::common_split(768, 8, 0.8), (616, 19));
        // 2 / 4 = 0.5 rounds to 0 (ties to even): everything common.
        assert_eq!(Iso::common_split(10, 4, 0.8), (10, 0));
        // 5 / 2 = 2.5 rounds to 2.
        assert_eq!(Iso::common_split(5, 2, 0.1), (1, 2));
        // 3 / 4 = 0.75 rounds to 1.
        assert_eq!(Iso::common_split(6, 4, 0.5), (2, 1));
        // 3 / 2 = 1.5 rounds to 2 → 4 > r = 3: lowered to 2.
        assert_eq!(Iso::common_split(3, 2, 0.2), (1, 1));
        for r in 1..40 {
            for t in 1..7 {
                for f in [0.05, 0.3, 0.8, 1.0] {
                    let (kc, nt) = Iso::common_split(r, t, f);
                    assert_eq!(kc + nt * t, r);
                }
            }
        }
    }

    #[test]
    fn other_tensors_get_the_mean() {
        let t = 3;
        for task_specific in [false, true] {
            for (name, shape) in [
                ("layer.bias", vec![7usize]),
                ("conv.weight", vec![2, 3, 4]),
                ("model.text_projection", vec![4, 5]),
            ] {
                let numel: usize = shape.iter().product();
                let r = reader(numel as u64, numel, t);
                let m = iso(task_specific, Some(0.6), None, t);
                assert!(m.whole_tensor_bytes(&job(name, &shape, t, 4)).is_none());
                let got = run_all_blocks(&m, name, &shape, &r);
                assert_close(&got, &naive_mean(&r, 0.6));
            }
        }
    }

    #[test]
    fn whole_tensor_bytes_and_threads() {
        let (shape, t) = ([36usize, 30usize], 3);
        let r = reader(11, shape[0] * shape[1], t);
        for task_specific in [false, true] {
            let m = iso(task_specific, None, None, t);
            let b = m.whole_tensor_bytes(&job("w", &shape, t, 8)).unwrap();
            assert!(b >= 2 * 36 * 30 * 8);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| merge_in_memory(&m, &job("w", &shape, t, 45), &r).unwrap())
            };
            assert_eq!(bits(&run(1)), bits(&run(4)));
        }
    }

    #[test]
    fn errors_name_the_key_and_the_method() {
        for f in [0.0, -0.1, 1.5, f64::NAN] {
            let p = TensorParams::default().with_global("common_space_fraction", Scalar::Num(f));
            match Iso::from_params(&p, 2, true, true) {
                Err(MergeError::BadParameter { key, .. }) => {
                    assert_eq!(key, "common_space_fraction")
                }
                other => panic!("{f}: {other:?}"),
            }
        }
        let p = TensorParams::default().with_global("alpha", Scalar::Num(f64::INFINITY));
        match Iso::from_params(&p, 2, true, false) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "alpha"),
            other => panic!("{other:?}"),
        }
        for (ts, name) in [(false, "iso_c"), (true, "iso_cts")] {
            match Iso::from_params(&TensorParams::default(), 2, false, ts) {
                Err(MergeError::BadInputs { method, .. }) => assert_eq!(method, name),
                other => panic!("{other:?}"),
            }
        }
        let r = MemReader {
            base: None,
            ..reader(1, 6, 2)
        };
        let mut j = job("w", &[2, 3], 2, 6);
        j.has_base = false;
        assert!(merge_in_memory(&iso(true, None, None, 2), &j, &r).is_err());
    }
}
