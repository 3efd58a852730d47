//! Dense f64 linear algebra on the CPU, built on faer (issue 4, "Dense linear algebra").
//!
//! Small helpers over **row-major** `&[f64]` matrices for the data-driven methods
//! (methods.md §10 RegMean, §11 MaTS, §12 TSV-Merge, §13 Iso-C/Iso-CTS): thin SVD, polar factor,
//! symmetric positive-definite solve (Cholesky, with an optional ridge), general solve (LU) and
//! matrix products. A matrix with `rows` rows and `cols` columns is a slice of `rows * cols`
//! values, element `(i, j)` at `i * cols + j`. Every function copies its result into a fresh
//! `Vec<f64>`; none keeps references to its inputs.
//!
//! Shapes are the caller's invariant: a slice whose length does not match the dimensions given
//! is a programming error and panics with a message naming the function and the argument.
//! Numerical failures (a matrix that is not positive definite, a singular system, an SVD that
//! does not converge, non-finite input) are [`MergeError::Numeric`] errors whose `tensor` field
//! is [`LINALG_TENSOR`]; callers name the tensor with [`name_tensor`].
//!
//! Determinism: results do not depend on the rayon thread count (tested below). faer's own
//! parallel kernels do not guarantee that (its parallel SVD, and products with a small output
//! and a long inner dimension, change bits with the thread count), so factorizations run with
//! [`Par::Seq`] and products are cut into fixed output tiles computed sequentially and run in
//! parallel with rayon. Results may still differ in the last bits between CPUs with different
//! SIMD widths (faer dispatches its kernels at run time).

use crate::error::{MergeError, Result};
use faer::diag::DiagMut;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt;
use faer::linalg::lu::partial_pivoting as pplu;
use faer::linalg::svd::{self as fsvd, ComputeSvdVectors};
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// Placeholder tensor name in the errors raised here; [`name_tensor`] replaces it.
pub const LINALG_TENSOR: &str = "<linear algebra>";

/// A thin singular value decomposition `A = U · diag(s) · Vᵀ` of a `rows × cols` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    /// Left singular vectors, row-major `rows × k` (orthonormal columns).
    pub u: Vec<f64>,
    /// Singular values, `k` of them, nonnegative and in nonincreasing order.
    pub s: Vec<f64>,
    /// Right singular vectors transposed, row-major `k × cols` (orthonormal rows).
    pub vt: Vec<f64>,
    /// Rows of the decomposed matrix.
    pub rows: usize,
    /// Columns of the decomposed matrix.
    pub cols: usize,
    /// `min(rows, cols)`: the number of singular triplets.
    pub k: usize,
}

/// Replace the [`LINALG_TENSOR`] placeholder of a numeric error raised here by `tensor`; other
/// errors pass through unchanged.
pub fn name_tensor(err: MergeError, tensor: &str) -> MergeError {
    match err {
        MergeError::Numeric { tensor: t, message } if t == LINALG_TENSOR => MergeError::Numeric {
            tensor: tensor.to_string(),
            message,
        },
        other => other,
    }
}

fn numeric(message: String) -> MergeError {
    MergeError::Numeric {
        tensor: LINALG_TENSOR.to_string(),
        message,
    }
}

fn check_len(what: &str, arg: &str, len: usize, rows: usize, cols: usize) {
    assert_eq!(
        len,
        rows * cols,
        "{what}: `{arg}` has {len} values, expected {rows} x {cols}"
    );
}

fn check_finite(what: &str, arg: &str, v: &[f64]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(numeric(format!(
            "{what}: `{arg}` has a non-finite value ({}) at flat index {i}",
            v[i]
        ))),
    }
}

fn view(a: &[f64], rows: usize, cols: usize) -> MatRef<'_, f64> {
    MatRef::from_row_major_slice(a, rows, cols)
}

fn view_mut(a: &mut [f64], rows: usize, cols: usize) -> MatMut<'_, f64> {
    MatMut::from_row_major_slice_mut(a, rows, cols)
}

fn to_row_major(m: MatRef<'_, f64>) -> Vec<f64> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let mut out = vec![0.0; rows * cols];
    view_mut(&mut out, rows, cols).copy_from(m);
    out
}

/// Output rows (or columns) per parallel task of a product.
const TILE: usize = 64;

/// `C = A · B` into row-major `c` (`m × n`), for views `a` (`m × k`) and `b` (`k × n`).
///
/// faer's parallel product splits the inner dimension when the output is small, which changes
/// bits with the thread count. Here the output is cut into fixed tiles of [`TILE`] rows (or,
/// when there are fewer rows than columns, [`TILE`] columns), each computed sequentially, and
/// the tiles run in parallel: the tiling depends only on the shapes.
fn gemm(c: &mut [f64], m: usize, n: usize, a: MatRef<'_, f64>, b: MatRef<'_, f64>) {
    use rayon::prelude::*;
    if m == 0 || n == 0 {
        return;
    }
    if m >= n {
        c.par_chunks_mut(TILE * n).enumerate().for_each(|(t, ct)| {
            let rows = ct.len() / n;
            faer::linalg::matmul::matmul(
                view_mut(ct, rows, n),
                Accum::Replace,
                a.subrows(t * TILE, rows),
                b,
                1.0,
                Par::Seq,
            );
        });
    } else {
        // Tiles of columns: compute Cᵀ = Bᵀ Aᵀ by row tiles, then transpose into `c`.
        let mut ct = vec![0.0; n * m];
        ct.par_chunks_mut(TILE * m)
            .enumerate()
            .for_each(|(t, chunk)| {
                let cols = chunk.len() / m;
                faer::linalg::matmul::matmul(
                    view_mut(chunk, cols, m),
                    Accum::Replace,
                    b.subcols(t * TILE, cols).transpose(),
                    a.transpose(),
                    1.0,
                    Par::Seq,
                );
            });
        view_mut(c, m, n).copy_from(view(&ct, n, m).transpose());
    }
}

/// `C = A · B` for row-major `A` (`m × k`) and `B` (`k × n`); returns row-major `C` (`m × n`).
///
/// # Panics
/// When a slice length does not match its dimensions.
pub fn matmul(a: &[f64], m: usize, k: usize, b: &[f64], n: usize) -> Vec<f64> {
    check_len("matmul", "a", a.len(), m, k);
    check_len("matmul", "b", b.len(), k, n);
    let mut c = vec![0.0; m * n];
    gemm(&mut c, m, n, view(a, m, k), view(b, k, n));
    c
}

/// `C = Aᵀ · B` for row-major `A` (`k × m`) and `B` (`k × n`); returns row-major `C` (`m × n`).
/// (A Gram matrix `XᵀX` is `matmul_tn(x, rows, cols, x, cols)`.)
///
/// # Panics
/// When a slice length does not match its dimensions.
pub fn matmul_tn(a: &[f64], k: usize, m: usize, b: &[f64], n: usize) -> Vec<f64> {
    check_len("matmul_tn", "a", a.len(), k, m);
    check_len("matmul_tn", "b", b.len(), k, n);
    let mut c = vec![0.0; m * n];
    gemm(&mut c, m, n, view(a, k, m).transpose(), view(b, k, n));
    c
}

/// `C = A · Bᵀ` for row-major `A` (`m × k`) and `B` (`n × k`); returns row-major `C` (`m × n`).
///
/// # Panics
/// When a slice length does not match its dimensions.
pub fn matmul_nt(a: &[f64], m: usize, k: usize, b: &[f64], n: usize) -> Vec<f64> {
    check_len("matmul_nt", "a", a.len(), m, k);
    check_len("matmul_nt", "b", b.len(), n, k);
    let mut c = vec![0.0; m * n];
    gemm(&mut c, m, n, view(a, m, k), view(b, n, k).transpose());
    c
}

/// Thin SVD of the row-major `rows × cols` matrix `a`: `k = min(rows, cols)` triplets, singular
/// values nonnegative and in nonincreasing order. The signs of singular vector pairs are
/// faer's (unspecified); products such as `U Vᵀ` or `U diag(s) Vᵀ` do not depend on them.
///
/// Errors when `a` has a non-finite value or the iteration does not converge.
///
/// # Panics
/// When `a.len() != rows * cols`.
pub fn svd(a: &[f64], rows: usize, cols: usize) -> Result<Svd> {
    check_len("svd", "a", a.len(), rows, cols);
    check_finite("svd", "a", a)?;
    let k = rows.min(cols);
    if k == 0 {
        return Ok(Svd {
            u: Vec::new(),
            s: Vec::new(),
            vt: Vec::new(),
            rows,
            cols,
            k,
        });
    }
    let mut u = Mat::<f64>::zeros(rows, k);
    let mut v = Mat::<f64>::zeros(cols, k);
    let mut s = vec![0.0; k];
    run_svd(view(a, rows, cols), &mut s, Some((u.as_mut(), v.as_mut())))
        .map_err(|e| numeric(format!("svd of a {rows} x {cols} matrix failed: {e}")))?;
    let u = to_row_major(u.as_ref());
    let vt = to_row_major(v.as_ref().transpose());
    Ok(Svd {
        u,
        s,
        vt,
        rows,
        cols,
        k,
    })
}

/// Singular values of the row-major `rows × cols` matrix `a`, nonincreasing (`min(rows, cols)`
/// of them). Cheaper than [`svd`] when the vectors are not needed.
///
/// # Panics
/// When `a.len() != rows * cols`.
pub fn singular_values(a: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    check_len("singular_values", "a", a.len(), rows, cols);
    check_finite("singular_values", "a", a)?;
    if rows.min(cols) == 0 {
        return Ok(Vec::new());
    }
    let mut s = vec![0.0; rows.min(cols)];
    run_svd(view(a, rows, cols), &mut s, None).map_err(|e| {
        numeric(format!(
            "singular values of a {rows} x {cols} matrix failed: {e}"
        ))
    })?;
    Ok(s)
}

/// faer's SVD, sequential (its parallel SVD changes bits with the thread count).
fn run_svd(
    a: MatRef<'_, f64>,
    s: &mut [f64],
    uv: Option<(MatMut<'_, f64>, MatMut<'_, f64>)>,
) -> std::result::Result<(), String> {
    let (rows, cols) = (a.nrows(), a.ncols());
    let compute = if uv.is_some() {
        ComputeSvdVectors::Thin
    } else {
        ComputeSvdVectors::No
    };
    let mut mem = MemBuffer::try_new(fsvd::svd_scratch::<f64>(
        rows,
        cols,
        compute,
        compute,
        Par::Seq,
        Default::default(),
    ))
    .map_err(|_| "cannot allocate the SVD workspace".to_string())?;
    let (u, v) = match uv {
        Some((u, v)) => (Some(u), Some(v)),
        None => (None, None),
    };
    fsvd::svd(
        a,
        DiagMut::from_slice_mut(s),
        u,
        v,
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| format!("{e:?}"))
}

/// Polar factor `U Vᵀ` of the row-major `rows × cols` matrix `a` (from its thin SVD): the
/// closest matrix with orthonormal columns (`rows ≥ cols`) or rows (`rows < cols`) in the
/// Frobenius norm. Returns a row-major `rows × cols` matrix. Where `a` is rank deficient the
/// factor is not unique; this returns the one from faer's singular vectors.
///
/// # Panics
/// When `a.len() != rows * cols`.
pub fn polar(a: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    let d = svd(a, rows, cols)?;
    Ok(matmul(&d.u, rows, d.k, &d.vt, cols))
}

/// Solve `(A + ridge·I) X = B` for a symmetric positive-definite row-major `n × n` matrix `A`
/// and a row-major right-hand side `B` (`n × nrhs`), by Cholesky (`L Lᵀ`). Returns row-major `X`
/// (`n × nrhs`).
///
/// Only the **lower triangle** of `a` is read (symmetry is the caller's invariant; statistics
/// files are checked for it when loaded). `ridge` is an absolute value added to the diagonal
/// (`0.0` for none); scale it to the matrix yourself (e.g. `1e-8 · trace(A) / n`).
///
/// Errors, naming the problem, when `ridge` is negative or not finite, when `a` or `b` has a
/// non-finite value, or when `A + ridge·I` is not positive definite (the error gives the index
/// of the first non-positive pivot and suggests a ridge).
///
/// # Panics
/// When a slice length does not match its dimensions.
pub fn cholesky_solve(a: &[f64], n: usize, b: &[f64], nrhs: usize, ridge: f64) -> Result<Vec<f64>> {
    check_len("cholesky_solve", "a", a.len(), n, n);
    check_len("cholesky_solve", "b", b.len(), n, nrhs);
    if !(ridge.is_finite() && ridge >= 0.0) {
        return Err(numeric(format!(
            "cholesky_solve: ridge must be finite and nonnegative, got {ridge}"
        )));
    }
    check_finite("cholesky_solve", "a", a)?;
    check_finite("cholesky_solve", "b", b)?;
    let mut l = view(a, n, n).to_owned();
    if ridge != 0.0 {
        for i in 0..n {
            l[(i, i)] += ridge;
        }
    }
    let mut mem = MemBuffer::try_new(llt::factor::cholesky_in_place_scratch::<f64>(
        n,
        Par::Seq,
        Default::default(),
    ))
    .map_err(|_| {
        numeric(format!(
            "cholesky_solve: cannot allocate the workspace for n = {n}"
        ))
    })?;
    llt::factor::cholesky_in_place(
        l.as_mut(),
        Default::default(),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| {
        let detail = match e {
            llt::factor::LltError::NonPositivePivot { index } => {
                format!("pivot {index} is not positive")
            }
        };
        numeric(format!(
            "cholesky_solve: the {n} x {n} matrix (ridge {ridge:e}) is not symmetric positive \
             definite ({detail}); it may be singular (e.g. all-zero statistics): add a ridge"
        ))
    })?;
    let mut x = b.to_vec();
    let mut mem = MemBuffer::try_new(llt::solve::solve_in_place_scratch::<f64>(n, nrhs, Par::Seq))
        .map_err(|_| numeric("cholesky_solve: cannot allocate the workspace".to_string()))?;
    llt::solve::solve_in_place(
        l.as_ref(),
        view_mut(&mut x, n, nrhs),
        Par::Seq,
        MemStack::new(&mut mem),
    );
    check_finite("cholesky_solve", "result", &x)?;
    Ok(x)
}

/// Solve the general square system `A X = B` by LU with partial pivoting: row-major `A`
/// (`n × n`), `B` (`n × nrhs`); returns row-major `X` (`n × nrhs`). Meant for tests and small
/// reference solves.
///
/// Errors when `a` or `b` has a non-finite value, or when the matrix is singular (a zero pivot,
/// seen as a non-finite solution).
///
/// # Panics
/// When a slice length does not match its dimensions.
pub fn lu_solve(a: &[f64], n: usize, b: &[f64], nrhs: usize) -> Result<Vec<f64>> {
    check_len("lu_solve", "a", a.len(), n, n);
    check_len("lu_solve", "b", b.len(), n, nrhs);
    check_finite("lu_solve", "a", a)?;
    check_finite("lu_solve", "b", b)?;
    let mut lu = view(a, n, n).to_owned();
    let mut fwd = vec![0usize; n];
    let mut bwd = vec![0usize; n];
    let alloc = |_| {
        numeric(format!(
            "lu_solve: cannot allocate the workspace for n = {n}"
        ))
    };
    let mut mem = MemBuffer::try_new(pplu::factor::lu_in_place_scratch::<usize, f64>(
        n,
        n,
        Par::Seq,
        Default::default(),
    ))
    .map_err(alloc)?;
    let (_, perm) = pplu::factor::lu_in_place(
        lu.as_mut(),
        &mut fwd,
        &mut bwd,
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    );
    let mut x = b.to_vec();
    let mut mem = MemBuffer::try_new(pplu::solve::solve_in_place_scratch::<usize, f64>(
        n,
        nrhs,
        Par::Seq,
    ))
    .map_err(alloc)?;
    // L (unit lower) and U share the factored matrix.
    pplu::solve::solve_in_place(
        lu.as_ref(),
        lu.as_ref(),
        perm,
        view_mut(&mut x, n, nrhs),
        Par::Seq,
        MemStack::new(&mut mem),
    );
    if x.iter().any(|v| !v.is_finite()) {
        return Err(numeric(format!(
            "lu_solve: the {n} x {n} matrix is singular"
        )));
    }
    Ok(x)
}

/// Inverse of a symmetric positive-definite row-major `n × n` matrix (lower triangle read), by
/// Cholesky with the same `ridge` and errors as [`cholesky_solve`].
pub fn spd_inverse(a: &[f64], n: usize, ridge: f64) -> Result<Vec<f64>> {
    let mut eye = vec![0.0; n * n];
    for i in 0..n {
        eye[i * n + i] = 1.0;
    }
    cholesky_solve(a, n, &eye, n, ridge)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift-based uniform values in [-1, 1).
    fn rand_vec(seed: u64, len: usize) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    fn naive_mm(a: &[f64], m: usize, k: usize, b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    s += a[i * k + l] * b[l * n + j];
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    fn transpose(a: &[f64], r: usize, c: usize) -> Vec<f64> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        t
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn spd(seed: u64, n: usize) -> Vec<f64> {
        let x = rand_vec(seed, (n + 3) * n);
        let mut g = naive_mm(&transpose(&x, n + 3, n), n, n + 3, &x, n);
        for i in 0..n {
            g[i * n + i] += 0.1;
        }
        g
    }

    #[test]
    fn products_match_naive() {
        // both tilings (rows when m >= n, columns otherwise), tiles crossing TILE
        for &(m, k, n) in &[
            (7, 5, 4),
            (3, 5, 150),
            (150, 9, 70),
            (1, 40, 1),
            (2, 3, 200),
        ] {
            let a = rand_vec(1 + m as u64, m * k);
            let b = rand_vec(2 + n as u64, k * n);
            let c = naive_mm(&a, m, k, &b, n);
            assert!(max_abs_diff(&matmul(&a, m, k, &b, n), &c) < 1e-13);
            let at = transpose(&a, m, k);
            assert!(max_abs_diff(&matmul_tn(&at, k, m, &b, n), &c) < 1e-13);
            let bt = transpose(&b, k, n);
            assert!(max_abs_diff(&matmul_nt(&a, m, k, &bt, n), &c) < 1e-13);
        }
        assert!(matmul(&[], 0, 3, &rand_vec(3, 6), 2).is_empty());
        assert_eq!(matmul(&[], 3, 0, &[], 2), vec![0.0; 6]);
    }

    #[test]
    fn products_independent_of_threads() {
        let (m, k, n) = (97, 301, 83);
        let a = rand_vec(4, m * k);
        let b = rand_vec(5, k * n);
        let par = matmul(&a, m, k, &b, n);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let seq = pool.install(|| matmul(&a, m, k, &b, n));
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&par), bits(&seq));
        let pool3 = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let three = pool3.install(|| matmul_tn(&a, m, k, &a, k));
        let one = pool.install(|| matmul_tn(&a, m, k, &a, k));
        assert_eq!(bits(&three), bits(&one));
        // tall-skinny Gram (large inner dimension) and a matrix-vector product
        let (rows, cols) = (40_000, 6);
        let x = rand_vec(9, rows * cols);
        let g3 = pool3.install(|| matmul_tn(&x, rows, cols, &x, cols));
        let g1 = pool.install(|| matmul_tn(&x, rows, cols, &x, cols));
        assert_eq!(bits(&g3), bits(&g1));
        let v = rand_vec(10, rows);
        let y3 = pool3.install(|| matmul_tn(&x, rows, cols, &v, 1));
        let y1 = pool.install(|| matmul_tn(&x, rows, cols, &v, 1));
        assert_eq!(bits(&y3), bits(&y1));
        let w = rand_vec(11, 700 * 900);
        let u = rand_vec(12, 900);
        let z3 = pool3.install(|| matmul(&w, 700, 900, &u, 1));
        let z1 = pool.install(|| matmul(&w, 700, 900, &u, 1));
        assert_eq!(bits(&z3), bits(&z1));
    }

    #[test]
    fn factorizations_independent_of_threads() {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (r, c) = (300, 260);
        let a = rand_vec(6, r * c);
        let n = 280;
        let g = spd(7, n);
        let rhs = rand_vec(8, n * 3);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let d = svd(&a, r, c).unwrap();
                let x = cholesky_solve(&g, n, &rhs, 3, 1e-3).unwrap();
                let y = lu_solve(&g, n, &rhs, 3).unwrap();
                (bits(&d.u), bits(&d.s), bits(&d.vt), bits(&x), bits(&y))
            })
        };
        let (p, q) = (run(1), run(4));
        assert!(p.0 == q.0, "u");
        assert!(p.1 == q.1, "s");
        assert!(p.2 == q.2, "vt");
        assert!(p.3 == q.3, "chol");
        assert!(p.4 == q.4, "lu");
    }

    #[test]
    fn svd_reconstructs_and_is_sorted() {
        for &(r, c) in &[(6usize, 4usize), (4, 6), (5, 5), (1, 3)] {
            let a = rand_vec(10 + r as u64 * 7 + c as u64, r * c);
            let d = svd(&a, r, c).unwrap();
            assert_eq!(d.k, r.min(c));
            assert_eq!(d.u.len(), r * d.k);
            assert_eq!(d.vt.len(), d.k * c);
            assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
            assert!(d.s.iter().all(|&s| s >= 0.0));
            // U diag(s) Vt == A
            let mut us = d.u.clone();
            for i in 0..r {
                for j in 0..d.k {
                    us[i * d.k + j] *= d.s[j];
                }
            }
            assert!(max_abs_diff(&naive_mm(&us, r, d.k, &d.vt, c), &a) < 1e-12);
            // orthonormal columns of U and rows of Vt
            let utu = naive_mm(&transpose(&d.u, r, d.k), d.k, r, &d.u, d.k);
            let vvt = naive_mm(&d.vt, d.k, c, &transpose(&d.vt, d.k, c), d.k);
            for i in 0..d.k {
                for j in 0..d.k {
                    let e = if i == j { 1.0 } else { 0.0 };
                    assert!((utu[i * d.k + j] - e).abs() < 1e-12);
                    assert!((vvt[i * d.k + j] - e).abs() < 1e-12);
                }
            }
            let sv = singular_values(&a, r, c).unwrap();
            assert!(max_abs_diff(&sv, &d.s) < 1e-12);
        }
        // hand-worked: diag(3, -2) has singular values 3, 2
        let d = svd(&[3.0, 0.0, 0.0, -2.0], 2, 2).unwrap();
        assert!(max_abs_diff(&d.s, &[3.0, 2.0]) < 1e-14);
        assert!(svd(&[1.0, f64::NAN], 1, 2).is_err());
        assert_eq!(svd(&[], 0, 4).unwrap().k, 0);
    }

    #[test]
    fn polar_is_orthogonal_and_closest() {
        // hand-worked: polar factor of diag(3, -2) is diag(1, -1)
        let p = polar(&[3.0, 0.0, 0.0, -2.0], 2, 2).unwrap();
        assert!(max_abs_diff(&p, &[1.0, 0.0, 0.0, -1.0]) < 1e-14);
        // a = Q S with Q orthogonal (rotation), S symmetric positive definite -> polar factor Q
        let t: f64 = 0.3;
        let q = [t.cos(), -t.sin(), t.sin(), t.cos()];
        let s = [2.0, 0.5, 0.5, 1.0];
        let a = naive_mm(&q, 2, 2, &s, 2);
        assert!(max_abs_diff(&polar(&a, 2, 2).unwrap(), &q) < 1e-13);
        // tall: orthonormal columns
        let a = rand_vec(20, 6 * 3);
        let p = polar(&a, 6, 3).unwrap();
        let ptp = naive_mm(&transpose(&p, 6, 3), 3, 6, &p, 3);
        assert!(max_abs_diff(&ptp, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]) < 1e-12);
    }

    #[test]
    fn cholesky_matches_lu_and_residual() {
        let n = 9;
        let a = spd(30, n);
        let b = rand_vec(31, n * 2);
        let x = cholesky_solve(&a, n, &b, 2, 0.0).unwrap();
        assert!(max_abs_diff(&naive_mm(&a, n, n, &x, 2), &b) < 1e-10);
        let y = lu_solve(&a, n, &b, 2).unwrap();
        assert!(max_abs_diff(&x, &y) < 1e-10);
        // ridge: equals solving with the diagonal shifted
        let mut ar = a.clone();
        for i in 0..n {
            ar[i * n + i] += 0.5;
        }
        let xr = cholesky_solve(&a, n, &b, 2, 0.5).unwrap();
        assert!(max_abs_diff(&xr, &lu_solve(&ar, n, &b, 2).unwrap()) < 1e-12);
        // only the lower triangle is read
        let mut upper_garbage = a.clone();
        upper_garbage[1] = 1e6;
        assert_eq!(cholesky_solve(&upper_garbage, n, &b, 2, 0.0).unwrap(), x);
        // inverse
        let inv = spd_inverse(&a, n, 0.0).unwrap();
        let eye = naive_mm(&a, n, n, &inv, n);
        for i in 0..n {
            for j in 0..n {
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((eye[i * n + j] - e).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn cholesky_errors_name_the_problem() {
        let zero = vec![0.0; 9];
        let b = vec![1.0; 3];
        let e = cholesky_solve(&zero, 3, &b, 1, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not symmetric positive definite"), "{e}");
        assert!(e.contains("pivot 0"), "{e}");
        // all-zero statistics with a ridge: x = b / ridge
        let x = cholesky_solve(&zero, 3, &b, 1, 0.25).unwrap();
        assert!(max_abs_diff(&x, &[4.0, 4.0, 4.0]) < 1e-15);
        // indefinite
        let e = cholesky_solve(&[1.0, 0.0, 0.0, -1.0], 2, &[1.0, 1.0], 1, 0.0).unwrap_err();
        assert!(e.to_string().contains("pivot 1"), "{e}");
        assert!(cholesky_solve(&[1.0], 1, &[1.0], 1, -1.0).is_err());
        assert!(cholesky_solve(&[f64::INFINITY], 1, &[1.0], 1, 0.0).is_err());
        let named = name_tensor(
            cholesky_solve(&zero, 3, &b, 1, 0.0).unwrap_err(),
            "model.layers.0.mlp.up_proj.weight",
        );
        assert!(named
            .to_string()
            .starts_with("tensor `model.layers.0.mlp.up_proj.weight`"));
        assert!(lu_solve(&zero, 3, &b, 1).is_err());
    }
}
