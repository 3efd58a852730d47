//! `tsv`: TSV-Merge, Task Singular Vectors (methods.md §12; reference
//! `AntoAndGar/task_singular_vectors`, `src/utils/TSVM_utils.py`,
//! `compute_and_sum_svd_mem_reduction`, the function its `TSVM` method runs). Sharding class
//! **T**: every 2-D tensor needs whole-matrix SVDs. mergekit has no such method.
//!
//! Per 2-D tensor whose name does not contain `text_projection`, with task vectors
//! Δ_i = θ_i − θ_0 (f64) of shape m×n, r = min(m, n) and T tasks:
//! 1. Δ_i = U_i S_i V_iᵀ (thin SVD); k = ⌊r·(1/T)⌋, computed in f64 exactly as the reference's
//!    `int(s.shape[0] * (1 / T))` (this differs from ⌊r/T⌋ only for a few task counts, such as
//!    T = 49 with r a multiple of 49, where the product rounds below the integer).
//! 2. Û = [U_1[:, :k] | … | U_T[:, :k]], Ŝ = [S_1[:k], …], V̂ = [V_1[:, :k] | …]; the reference's
//!    r − T·k remainder slots are zero and are left out here (with Û of full column rank the
//!    result is the same; see "Deviations").
//! 3. Û = P Σ Qᵀ gives U⊥ = P Qᵀ, likewise V⊥ (polar / Procrustes factors).
//! 4. Δ = U⊥ · diag(Ŝ) · V⊥ᵀ; θ = θ_0 + α·Δ.
//!
//! Other tensors (not 2-D, or excluded by name): θ = θ_0 + α·mean_i(Δ_i). The reference keeps a
//! running mean of the Δ_i for them and its merged task vector is then applied as a whole with
//! the scaling coefficient (`apply_to(..., scaling_coef=α)`), so α applies to them too.
//!
//! Parameters (method-wide): `alpha` (default 1.0: the unscaled merged task vector, the paper's
//! untuned default; the reference picks α on validation data from 0.1, 0.2, …, 3.0). Any finite
//! value is accepted. Base model required.
//!
//! Numerics and determinism: all linear algebra is f64 with faer, run sequentially
//! ([`faer::Par::Seq`]): faer's parallel kernels split reductions by thread count, which would
//! make results depend on the rayon pool. Inputs are read in blocks of `block_elems` into the
//! f64 matrices and the output is written in blocks, so results are bit-identical whatever the
//! block size. Non-finite inputs are rejected.
//!
//! Deviations from the reference: f64 instead of the reference's f32 SVDs; where Û or V̂ is
//! rank-deficient (identical or overlapping task subspaces, or tasks of rank below k) the polar
//! factor is not unique and the reference's result depends on LAPACK's arbitrary choices, as
//! does this one on faer's; the non-2-D mean is an f64 mean, not an f32 running mean.
//!
//! This file also holds the dense helpers that [`super::iso`] shares: task-vector loading,
//! SVD and polar factors, and the blockwise output writer.

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::ComputeSvdVectors;
use faer::{Accum, Mat, MatRef, Par};

/// Static facts about `tsv`.
pub const INFO: MethodInfo = MethodInfo {
    name: "tsv",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &["alpha"],
    model_params: &[],
    random: false,
    summary: "TSV-Merge: top-1/T singular vectors of each task vector, decorrelated, summed",
};

/// Name fragment of 2-D tensors the SVD methods average instead (the reference skips CLIP's
/// `text_projection`).
pub const EXCLUDED_NAME: &str = "text_projection";

/// Bytes per f64.
const F64: u64 = 8;

/// `tsv` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Tsv {
    n: usize,
    alpha: f64,
}

impl Tsv {
    /// Build from resolved parameters: needs a base model and a finite `alpha`.
    pub fn from_params(params: &TensorParams, n_models: usize, has_base: bool) -> Result<Self> {
        require_base(INFO.name, has_base, n_models)?;
        Ok(Self {
            n: n_models,
            alpha: read_alpha(params)?,
        })
    }

    /// k, the number of singular triplets each task keeps: ⌊r·(1/T)⌋ in f64 as the reference.
    pub fn per_task_rank(r: usize, t: usize) -> usize {
        ((r as f64) * (1.0 / t as f64)).floor() as usize
    }

    /// The merged task vector Δ (m×n, f64) of a 2-D tensor.
    fn delta(&self, job: &TensorJob, reader: &dyn TensorReader) -> Result<Mat<f64>> {
        let (m, n) = (job.shape[0], job.shape[1]);
        let r = m.min(n);
        let k = Self::per_task_rank(r, self.n);
        let p = k * self.n;
        let mut u_hat = Mat::<f64>::zeros(m, p);
        let mut v_hat = Mat::<f64>::zeros(n, p);
        let mut s_hat = vec![0.0f64; p];
        if k > 0 {
            let mut d = Mat::<f64>::zeros(m, n);
            for i in 0..self.n {
                load_task_vector(job, reader, i, &mut d, false)?;
                let f = thin_svd(d.as_ref(), &job.name)?;
                for c in 0..k {
                    let slot = i * k + c;
                    s_hat[slot] = f.s[c];
                    u_hat.col_mut(slot).copy_from(f.u.col(c));
                    v_hat.col_mut(slot).copy_from(f.v.col(c));
                }
            }
        }
        let mut u_orth = polar(u_hat.as_ref(), &job.name)?;
        drop(u_hat);
        let v_orth = polar(v_hat.as_ref(), &job.name)?;
        drop(v_hat);
        for (c, s) in s_hat.iter().enumerate() {
            for x in u_orth.col_mut(c).iter_mut() {
                *x *= *s;
            }
        }
        let mut out = Mat::<f64>::zeros(m, n);
        matmul(&mut out, u_orth.as_ref(), v_orth.as_ref().transpose());
        Ok(out)
    }
}

impl MergeMethod for Tsv {
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
        let p = (Self::per_task_rank(r as usize, self.n) * self.n) as u64;
        // Phase 1: one task vector, its SVD, and the growing Û, Ŝ, V̂.
        let phase1 = m * n * F64 + svd_bytes(m, n) + (m + n + 1) * p * F64;
        // Phase 2: polar factors of Û then V̂ (each an SVD), then the product.
        let phase2 = (m + n + 1) * p * F64
            + svd_bytes(m, p).max(svd_bytes(n, p))
            + (m + n) * p * F64
            + m * n * F64;
        Some(phase1.max(phase2))
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        check_job(INFO.name, job)?;
        if !uses_svd(job) {
            return write_mean(job, reader, self.n, self.alpha, writer);
        }
        let delta = self.delta(job, reader)?;
        write_merged(job, reader, self.alpha, delta.as_ref(), writer)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared by `tsv`, `iso_c` and `iso_cts`.

/// f32 buffers of `block_elems` the SVD methods hold besides their whole-tensor matrices: the
/// base block, one model block, an f64 accumulator (two units) and the output block.
pub(crate) const MEAN_BUFFERS: usize = 5;

/// Whether a tensor takes the SVD path: 2-D, non-empty, and not named `text_projection`.
pub(crate) fn uses_svd(job: &TensorJob) -> bool {
    job.shape.len() == 2 && job.numel() > 0 && !job.name.contains(EXCLUDED_NAME)
}

/// `alpha`: finite, default 1.0.
pub(crate) fn read_alpha(params: &TensorParams) -> Result<f64> {
    let alpha = params.num("alpha", 1.0)?;
    if !alpha.is_finite() {
        return Err(MergeError::BadParameter {
            key: "alpha".into(),
            message: format!("must be a finite number (the task-vector scale), got {alpha}"),
        });
    }
    Ok(alpha)
}

/// A base model and at least one other model are required.
pub(crate) fn require_base(method: &str, has_base: bool, n_models: usize) -> Result<()> {
    if !has_base {
        return Err(MergeError::BadInputs {
            method: method.into(),
            message: format!(
                "{method} merges task vectors (model − base): set `base_model` in the config"
            ),
        });
    }
    if n_models == 0 {
        return Err(MergeError::BadInputs {
            method: method.into(),
            message: format!("{method} needs at least one model besides the base"),
        });
    }
    Ok(())
}

/// The job must provide the base model.
pub(crate) fn check_job(method: &str, job: &TensorJob) -> Result<()> {
    if !job.has_base {
        return Err(MergeError::BadInputs {
            method: method.into(),
            message: format!(
                "tensor `{}`: {method} needs the base model, which this merge lacks",
                job.name
            ),
        });
    }
    Ok(())
}

fn non_finite(job: &TensorJob, input: Input) -> MergeError {
    let which = match input {
        Input::Base => "the base model".to_string(),
        Input::Model(i) => format!("model #{i}"),
    };
    MergeError::Numeric {
        tensor: job.name.clone(),
        message: format!("{which} holds a non-finite value (NaN or infinity)"),
    }
}

/// Read Δ = θ_model − θ_0 (f64) into the m×n matrix `d` block by block (`accumulate`: add it
/// to `d` instead of overwriting). Rejects non-finite inputs.
pub(crate) fn load_task_vector(
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    d: &mut Mat<f64>,
    accumulate: bool,
) -> Result<()> {
    let n = job.shape[1];
    let cap = job.block_elems.max(1).min(job.numel());
    let mut base = vec![0.0f32; cap];
    let mut x = vec![0.0f32; cap];
    for range in job.blocks() {
        let len = range.len();
        reader.read(Input::Base, range.clone(), &mut base[..len])?;
        reader.read(Input::Model(model), range.clone(), &mut x[..len])?;
        for (k, (xv, bv)) in x[..len].iter().zip(&base[..len]).enumerate() {
            if !bv.is_finite() {
                return Err(non_finite(job, Input::Base));
            }
            if !xv.is_finite() {
                return Err(non_finite(job, Input::Model(model)));
            }
            let e = range.start + k;
            let (row, col) = (e / n, e % n);
            let v = *xv as f64 - *bv as f64;
            if accumulate {
                d[(row, col)] += v;
            } else {
                d[(row, col)] = v;
            }
        }
    }
    Ok(())
}

/// Write θ_0 + α·Δ for a 2-D tensor in blocks (f64, rounded once to f32).
pub(crate) fn write_merged(
    job: &TensorJob,
    reader: &dyn TensorReader,
    alpha: f64,
    delta: MatRef<'_, f64>,
    writer: &mut dyn TensorWriter,
) -> Result<()> {
    let n = job.shape[1];
    let cap = job.block_elems.max(1).min(job.numel());
    let mut base = vec![0.0f32; cap];
    let mut out = vec![0.0f32; cap];
    for range in job.blocks() {
        let len = range.len();
        reader.read(Input::Base, range.clone(), &mut base[..len])?;
        for (k, (o, b)) in out[..len].iter_mut().zip(&base[..len]).enumerate() {
            let e = range.start + k;
            *o = (*b as f64 + alpha * delta[(e / n, e % n)]) as f32;
        }
        writer.write(range, &out[..len])?;
    }
    Ok(())
}

/// Tensors off the SVD path: θ_0 + α·mean_i(θ_i − θ_0), elementwise in f64, in blocks.
pub(crate) fn write_mean(
    job: &TensorJob,
    reader: &dyn TensorReader,
    n_models: usize,
    alpha: f64,
    writer: &mut dyn TensorWriter,
) -> Result<()> {
    let cap = job.block_elems.max(1).min(job.numel().max(1));
    let mut base = vec![0.0f32; cap];
    let mut x = vec![0.0f32; cap];
    let mut acc = vec![0.0f64; cap];
    let mut out = vec![0.0f32; cap];
    let t = n_models as f64;
    for range in job.blocks() {
        let len = range.len();
        reader.read(Input::Base, range.clone(), &mut base[..len])?;
        if base[..len].iter().any(|v| !v.is_finite()) {
            return Err(non_finite(job, Input::Base));
        }
        acc[..len].fill(0.0);
        for i in 0..n_models {
            reader.read(Input::Model(i), range.clone(), &mut x[..len])?;
            if x[..len].iter().any(|v| !v.is_finite()) {
                return Err(non_finite(job, Input::Model(i)));
            }
            for ((a, xv), bv) in acc[..len].iter_mut().zip(&x[..len]).zip(&base[..len]) {
                *a += *xv as f64 - *bv as f64;
            }
        }
        for ((o, a), b) in out[..len].iter_mut().zip(&acc[..len]).zip(&base[..len]) {
            *o = (*b as f64 + alpha * (*a / t)) as f32;
        }
        writer.write(range, &out[..len])?;
    }
    Ok(())
}

/// A thin SVD A = U diag(s) Vᵀ, singular values non-increasing.
pub(crate) struct SvdFactors {
    /// Left singular vectors (m×r).
    pub u: Mat<f64>,
    /// Singular values (r).
    pub s: Vec<f64>,
    /// Right singular vectors (n×r).
    pub v: Mat<f64>,
}

/// Thin SVD with faer, sequential (see the module docs on determinism).
pub(crate) fn thin_svd(a: MatRef<'_, f64>, tensor: &str) -> Result<SvdFactors> {
    let (m, n) = a.shape();
    let r = m.min(n);
    let mut u = Mat::<f64>::zeros(m, r);
    let mut v = Mat::<f64>::zeros(n, r);
    let mut s = faer::diag::Diag::<f64>::zeros(r);
    if r > 0 {
        let req = faer::linalg::svd::svd_scratch::<f64>(
            m,
            n,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            Par::Seq,
            Default::default(),
        );
        let mut mem = MemBuffer::new(req);
        faer::linalg::svd::svd(
            a,
            s.as_mut(),
            Some(u.as_mut()),
            Some(v.as_mut()),
            Par::Seq,
            MemStack::new(&mut mem),
            Default::default(),
        )
        .map_err(|e| MergeError::Numeric {
            tensor: tensor.into(),
            message: format!("SVD of a {m}×{n} matrix failed: {e:?}"),
        })?;
    }
    let s = s.column_vector().iter().copied().collect();
    Ok(SvdFactors { u, s, v })
}

/// Bytes a thin SVD of an m×n matrix holds: U, V, s and faer's workspace.
pub(crate) fn svd_bytes(m: u64, n: u64) -> u64 {
    let r = m.min(n);
    if r == 0 {
        return 0;
    }
    let req = faer::linalg::svd::svd_scratch::<f64>(
        m as usize,
        n as usize,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        Par::Seq,
        Default::default(),
    );
    (m + n + 1) * r * F64 + req.size_bytes() as u64
}

/// The orthogonal polar factor of an m×p matrix with p ≤ m: A = P Σ Qᵀ gives P Qᵀ (the
/// nearest matrix with orthonormal columns).
pub(crate) fn polar(a: MatRef<'_, f64>, tensor: &str) -> Result<Mat<f64>> {
    let (m, p) = a.shape();
    let mut out = Mat::<f64>::zeros(m, p);
    if p == 0 || m == 0 {
        return Ok(out);
    }
    let f = thin_svd(a, tensor)?;
    matmul(&mut out, f.u.as_ref(), f.v.as_ref().transpose());
    Ok(out)
}

/// dst = lhs · rhs, sequential.
pub(crate) fn matmul(dst: &mut Mat<f64>, lhs: MatRef<'_, f64>, rhs: MatRef<'_, f64>) {
    faer::linalg::matmul::matmul(dst.as_mut(), Accum::Replace, lhs, rhs, 1.0, Par::Seq);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    /// Deterministic pseudo-random values in about [-1, 1].
    pub(crate) fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    pub(crate) fn job(name: &str, shape: &[usize], n_models: usize, block: usize) -> TensorJob {
        TensorJob {
            name: name.into(),
            shape: shape.to_vec(),
            n_models,
            has_base: true,
            block_elems: block,
            seed: 0,
        }
    }

    pub(crate) fn reader(seed: u64, numel: usize, t: usize) -> MemReader {
        MemReader {
            stats: Default::default(),
            base: Some(rand_vec(seed, numel)),
            models: (0..t as u64)
                .map(|i| rand_vec(seed + 100 + i, numel))
                .collect(),
        }
    }

    pub(crate) fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!(
                ((*g as f64) - w).abs() <= tol,
                "element {i}: got {g}, want {w}"
            );
        }
    }

    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Run with the whole tensor as one block and with small odd blocks; assert identical bits.
    pub(crate) fn run_all_blocks(
        m: &dyn MergeMethod,
        name: &str,
        shape: &[usize],
        r: &MemReader,
    ) -> Vec<f32> {
        let numel: usize = shape.iter().product();
        let t = r.models.len();
        let whole = merge_in_memory(m, &job(name, shape, t, numel), r).unwrap();
        for b in [1, 3, 7] {
            let small = merge_in_memory(m, &job(name, shape, t, b), r).unwrap();
            assert_eq!(bits(&whole), bits(&small), "block size {b}");
        }
        whole
    }

    // ---- An independent dense f64 reference: row-major matrices and one-sided Jacobi SVD.

    /// Row-major dense matrix.
    #[derive(Clone, Debug)]
    pub(crate) struct Dense {
        pub r: usize,
        pub c: usize,
        pub a: Vec<f64>,
    }

    impl Dense {
        pub(crate) fn zeros(r: usize, c: usize) -> Self {
            Self {
                r,
                c,
                a: vec![0.0; r * c],
            }
        }
        pub(crate) fn at(&self, i: usize, j: usize) -> f64 {
            self.a[i * self.c + j]
        }
        pub(crate) fn set(&mut self, i: usize, j: usize, v: f64) {
            self.a[i * self.c + j] = v;
        }
        pub(crate) fn t(&self) -> Dense {
            let mut o = Dense::zeros(self.c, self.r);
            for i in 0..self.r {
                for j in 0..self.c {
                    o.set(j, i, self.at(i, j));
                }
            }
            o
        }
        pub(crate) fn mul(&self, b: &Dense) -> Dense {
            assert_eq!(self.c, b.r);
            let mut o = Dense::zeros(self.r, b.c);
            for i in 0..self.r {
                for j in 0..b.c {
                    let mut s = 0.0;
                    for k in 0..self.c {
                        s += self.at(i, k) * b.at(k, j);
                    }
                    o.set(i, j, s);
                }
            }
            o
        }
        /// Columns `cols` of self.
        pub(crate) fn cols(&self, cols: std::ops::Range<usize>) -> Dense {
            let mut o = Dense::zeros(self.r, cols.len());
            for i in 0..self.r {
                for (jj, j) in cols.clone().enumerate() {
                    o.set(i, jj, self.at(i, j));
                }
            }
            o
        }
        /// [self | b].
        pub(crate) fn hcat(&self, b: &Dense) -> Dense {
            assert_eq!(self.r, b.r);
            let mut o = Dense::zeros(self.r, self.c + b.c);
            for i in 0..self.r {
                for j in 0..self.c {
                    o.set(i, j, self.at(i, j));
                }
                for j in 0..b.c {
                    o.set(i, self.c + j, b.at(i, j));
                }
            }
            o
        }
        /// self with column j scaled by s[j].
        pub(crate) fn scale_cols(&self, s: &[f64]) -> Dense {
            let mut o = self.clone();
            for i in 0..self.r {
                for (j, sj) in s.iter().enumerate() {
                    o.set(i, j, self.at(i, j) * sj);
                }
            }
            o
        }
        pub(crate) fn sub(&self, b: &Dense) -> Dense {
            let mut o = self.clone();
            for (x, y) in o.a.iter_mut().zip(&b.a) {
                *x -= y;
            }
            o
        }
    }

    /// Thin SVD by one-sided Jacobi (Hestenes): returns (U m×r, s, V n×r), s non-increasing.
    pub(crate) fn jacobi_svd(a: &Dense) -> (Dense, Vec<f64>, Dense) {
        if a.r < a.c {
            let (u, s, v) = jacobi_svd(&a.t());
            return (v, s, u);
        }
        let (m, n) = (a.r, a.c);
        let mut w = a.clone();
        let mut v = Dense::zeros(n, n);
        for i in 0..n {
            v.set(i, i, 1.0);
        }
        for _sweep in 0..100 {
            let mut off = 0.0f64;
            for p in 0..n {
                for q in p + 1..n {
                    let (mut al, mut be, mut ga) = (0.0, 0.0, 0.0);
                    for i in 0..m {
                        al += w.at(i, p) * w.at(i, p);
                        be += w.at(i, q) * w.at(i, q);
                        ga += w.at(i, p) * w.at(i, q);
                    }
                    if ga.abs() <= 1e-300 || ga.abs() <= 1e-15 * (al * be).sqrt() {
                        continue;
                    }
                    off = off.max(ga.abs() / (al * be).sqrt());
                    let zeta = (be - al) / (2.0 * ga);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let c = 1.0 / (1.0 + t * t).sqrt();
                    let s = c * t;
                    for i in 0..m {
                        let (x, y) = (w.at(i, p), w.at(i, q));
                        w.set(i, p, c * x - s * y);
                        w.set(i, q, s * x + c * y);
                    }
                    for i in 0..n {
                        let (x, y) = (v.at(i, p), v.at(i, q));
                        v.set(i, p, c * x - s * y);
                        v.set(i, q, s * x + c * y);
                    }
                }
            }
            if off < 1e-15 {
                break;
            }
        }
        let norms: Vec<f64> = (0..n)
            .map(|j| (0..m).map(|i| w.at(i, j).powi(2)).sum::<f64>().sqrt())
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]));
        let mut u = Dense::zeros(m, n);
        let mut vs = Dense::zeros(n, n);
        let mut s = vec![0.0; n];
        for (jj, &j) in order.iter().enumerate() {
            s[jj] = norms[j];
            for i in 0..m {
                u.set(
                    i,
                    jj,
                    if norms[j] > 0.0 {
                        w.at(i, j) / norms[j]
                    } else {
                        0.0
                    },
                );
            }
            for i in 0..n {
                vs.set(i, jj, v.at(i, j));
            }
        }
        (u, s, vs)
    }

    /// Polar factor P Qᵀ of a tall matrix, via the Jacobi SVD.
    pub(crate) fn naive_polar(a: &Dense) -> Dense {
        let (u, _, v) = jacobi_svd(a);
        u.mul(&v.t())
    }

    /// Task vectors of model i as dense m×n f64.
    pub(crate) fn deltas(r: &MemReader, m: usize, n: usize) -> Vec<Dense> {
        let base = r.base.as_ref().unwrap();
        r.models
            .iter()
            .map(|x| Dense {
                r: m,
                c: n,
                a: x.iter()
                    .zip(base)
                    .map(|(a, b)| *a as f64 - *b as f64)
                    .collect(),
            })
            .collect()
    }

    /// θ_0 + α·Δ as f64.
    pub(crate) fn apply(r: &MemReader, alpha: f64, d: &Dense) -> Vec<f64> {
        let base = r.base.as_ref().unwrap();
        base.iter()
            .zip(&d.a)
            .map(|(b, x)| *b as f64 + alpha * x)
            .collect()
    }

    /// θ_0 + α·mean(Δ_i), the non-SVD path.
    pub(crate) fn naive_mean(r: &MemReader, alpha: f64) -> Vec<f64> {
        let base = r.base.as_ref().unwrap();
        let t = r.models.len() as f64;
        (0..base.len())
            .map(|j| {
                let s: f64 = r.models.iter().map(|x| x[j] as f64 - base[j] as f64).sum();
                base[j] as f64 + alpha * s / t
            })
            .collect()
    }

    /// TSV written from the reference's description, with k = r // T.
    fn naive_tsv(ds: &[Dense]) -> Dense {
        let (m, n) = (ds[0].r, ds[0].c);
        let t = ds.len();
        let k = m.min(n) / t;
        if k == 0 {
            return Dense::zeros(m, n);
        }
        let mut uh: Option<Dense> = None;
        let mut vh: Option<Dense> = None;
        let mut sh = Vec::new();
        for d in ds {
            let (u, s, v) = jacobi_svd(d);
            let (uk, vk) = (u.cols(0..k), v.cols(0..k));
            uh = Some(uh.map_or(uk.clone(), |x| x.hcat(&uk)));
            vh = Some(vh.map_or(vk.clone(), |x| x.hcat(&vk)));
            sh.extend_from_slice(&s[..k]);
        }
        let pu = naive_polar(&uh.unwrap());
        let pv = naive_polar(&vh.unwrap());
        pu.scale_cols(&sh).mul(&pv.t())
    }

    fn tsv(alpha: Option<f64>, t: usize) -> Tsv {
        let mut p = TensorParams::default();
        if let Some(a) = alpha {
            p = p.with_global("alpha", Scalar::Num(a));
        }
        Tsv::from_params(&p, t, true).unwrap()
    }

    #[test]
    fn jacobi_reference_reconstructs() {
        let a = Dense {
            r: 4,
            c: 6,
            a: rand_vec(9, 24).iter().map(|x| *x as f64).collect(),
        };
        let (u, s, v) = jacobi_svd(&a);
        let back = u.scale_cols(&s).mul(&v.t());
        for (x, y) in back.a.iter().zip(&a.a) {
            assert!((x - y).abs() < 1e-12);
        }
        assert!(s.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn matches_naive_reference() {
        // (shape, tasks): divisible, remainder (r = 5, T = 3: k = 1, 2 slots zero), wide, T = 2.
        for (shape, t, alpha) in [
            ([6usize, 9usize], 3usize, 1.0f64),
            ([7, 5], 3, 1.0),
            ([5, 8], 2, 0.7),
            ([9, 9], 4, 2.0),
        ] {
            let numel = shape[0] * shape[1];
            let r = reader(shape[0] as u64 * 31 + t as u64, numel, t);
            let m = tsv(Some(alpha), t);
            let got = run_all_blocks(&m, "layer.weight", &shape, &r);
            let want = apply(&r, alpha, &naive_tsv(&deltas(&r, shape[0], shape[1])));
            assert_close(&got, &want);
        }
    }

    #[test]
    fn orthogonal_task_vectors_sum() {
        // Δ_i with mutually orthogonal column and row spaces, each of rank k: TSV = Σ Δ_i.
        let (m, n, t, k) = (6usize, 7usize, 3usize, 2usize);
        let orth = |seed: u64, rows: usize| {
            let a = Dense {
                r: rows,
                c: rows,
                a: rand_vec(seed, rows * rows)
                    .iter()
                    .map(|x| *x as f64)
                    .collect(),
            };
            jacobi_svd(&a).0
        };
        let (qu, qv) = (orth(1, m), orth(2, n));
        let base = rand_vec(3, m * n);
        let mut models = Vec::new();
        let mut sum = Dense::zeros(m, n);
        for i in 0..t {
            let s = [3.0 - i as f64 * 0.5, 0.25 + i as f64 * 0.1];
            let d = qu
                .cols(i * k..i * k + k)
                .scale_cols(&s)
                .mul(&qv.cols(i * k..i * k + k).t());
            for (a, b) in sum.a.iter_mut().zip(&d.a) {
                *a += b;
            }
            models.push(
                base.iter()
                    .zip(&d.a)
                    .map(|(b, x)| (*b as f64 + x) as f32)
                    .collect(),
            );
        }
        let r = MemReader {
            stats: Default::default(),
            base: Some(base),
            models,
        };
        // Use the exact f32 task vectors for the expected sum.
        let exact: Dense = deltas(&r, m, n)
            .iter()
            .fold(Dense::zeros(m, n), |mut acc, d| {
                for (a, b) in acc.a.iter_mut().zip(&d.a) {
                    *a += b;
                }
                acc
            });
        assert!(exact
            .a
            .iter()
            .zip(&sum.a)
            .all(|(a, b)| (a - b).abs() < 1e-6));
        let got = run_all_blocks(&tsv(Some(0.5), t), "w", &[m, n], &r);
        let want = apply(&r, 0.5, &exact);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn one_task_is_task_arithmetic_and_too_many_tasks_keep_base() {
        let r = reader(5, 20, 1);
        let got = run_all_blocks(&tsv(None, 1), "w", &[4, 5], &r);
        assert_close(&got, &naive_mean(&r, 1.0));
        // r = 2 < T = 3: k = 0, Δ = 0.
        let r = reader(6, 6, 3);
        let got = run_all_blocks(&tsv(Some(2.0), 3), "w", &[2, 3], &r);
        assert_eq!(bits(&got), bits(r.base.as_ref().unwrap()));
    }

    #[test]
    fn per_task_rank_follows_the_reference_float_product() {
        assert_eq!(Tsv::per_task_rank(768, 8), 96);
        assert_eq!(Tsv::per_task_rank(768, 14), 54);
        assert_eq!(Tsv::per_task_rank(5, 3), 1);
        // Python: int(49 * (1 / 49)) == 0.
        assert_eq!(Tsv::per_task_rank(49, 49), 0);
    }

    #[test]
    fn other_tensors_get_the_mean() {
        let t = 3;
        for (name, shape) in [
            ("layer.bias", vec![7usize]),
            ("conv.weight", vec![2, 3, 4]),
            ("model.text_projection", vec![4, 5]),
            ("scalar", vec![]),
        ] {
            let numel: usize = shape.iter().product();
            let r = reader(numel as u64 + 3, numel, t);
            let m = tsv(Some(1.5), t);
            assert!(m.whole_tensor_bytes(&job(name, &shape, t, 4)).is_none());
            let got = run_all_blocks(&m, name, &shape, &r);
            assert_close(&got, &naive_mean(&r, 1.5));
        }
    }

    #[test]
    fn whole_tensor_bytes_counts_the_matrices() {
        let m = tsv(None, 3);
        let b = m.whole_tensor_bytes(&job("w", &[64, 48], 3, 16)).unwrap();
        // At least one task vector, its SVD factors and the output.
        assert!(b >= (2 * 64 * 48 + (64 + 48) * 48) * 8, "{b}");
    }

    #[test]
    fn independent_of_thread_count() {
        let (shape, t) = ([40usize, 33usize], 3);
        let r = reader(77, shape[0] * shape[1], t);
        let m = tsv(None, t);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| merge_in_memory(&m, &job("w", &shape, t, 50), &r).unwrap())
        };
        assert_eq!(bits(&run(1)), bits(&run(3)));
    }

    #[test]
    fn errors_name_the_key_and_the_method() {
        match Tsv::from_params(&TensorParams::default(), 2, false) {
            Err(MergeError::BadInputs { method, .. }) => assert_eq!(method, "tsv"),
            other => panic!("{other:?}"),
        }
        let p = TensorParams::default().with_global("alpha", Scalar::Num(f64::NAN));
        match Tsv::from_params(&p, 2, true) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "alpha"),
            other => panic!("{other:?}"),
        }
        let p = TensorParams::default().with_global("alpha", Scalar::Str("x".into()));
        assert!(matches!(
            Tsv::from_params(&p, 2, true),
            Err(MergeError::BadParameter { .. })
        ));
        // A job without the base, and a NaN input.
        let m = tsv(None, 2);
        let mut r = reader(1, 12, 2);
        let mut j = job("w", &[3, 4], 2, 5);
        j.has_base = false;
        assert!(matches!(
            merge_in_memory(&m, &j, &r),
            Err(MergeError::BadInputs { .. })
        ));
        r.models[1][5] = f32::NAN;
        assert!(matches!(
            merge_in_memory(&m, &job("w", &[3, 4], 2, 5), &r),
            Err(MergeError::Numeric { .. })
        ));
        assert!(matches!(
            merge_in_memory(&m, &job("b", &[12], 2, 5), &r),
            Err(MergeError::Numeric { .. })
        ));
    }
}
