//! Conjugate gradient exactly as SciPy's `scipy.sparse.linalg.cg` runs it (methods.md §11, "CG
//! exactly as run"), over an unknown split into parts (architecture.md, "Split blocks").
//!
//! Reference: SciPy 1.17 `scipy/sparse/linalg/_isolve/iterative.py`, function `cg`, with no
//! preconditioner (`M = I`), as MaTS (`r-three/mats`) calls it through a `LinearOperator`.
//! Sharding class T with per-block distributed reductions.
//!
//! # The iteration
//!
//! ```text
//! ‖b‖ == 0          → return at once (see [`ZeroRhs`])
//! tol = max(atol, rtol·‖b‖)
//! r = b − A x0      (r = b, no product, when x0 is all zeros)
//! for it in 0..maxiter:
//!     ρ = r·r
//!     if √ρ < tol: return x, 0           (checked BEFORE each step; strict `<`)
//!     p = r                  (it = 0)
//!     p = (ρ/ρ_prev)·p + r   (it > 0)
//!     q = A p
//!     α = ρ / (p·q)
//!     x += α p;  r −= α q;  ρ_prev = ρ
//! return x, maxiter                      (the last step's residual is never tested)
//! ```
//!
//! Quirks reproduced (see also the fixtures in `tests/fixtures/scipy_cg/`):
//! - The test is strict (`‖r‖ < tol`), although SciPy's documentation says `<=`. With the
//!   default `atol = 0` and `rtol·‖b‖ = 0` nothing ever converges.
//! - `info` (our `exit_code`) is `maxiter` whenever the loop runs out, even when the last step
//!   reached the tolerance: convergence is only ever detected at the top of an iteration.
//! - `maxiter = 0` returns `x0` with `info = 0`, which reads as "converged" although nothing
//!   was checked; here `exit_code` is `0` as in SciPy but [`CgResult::converged`] is `false`
//!   and [`CgResult::stop`] is [`CgStop::MaxIter`].
//! - `‖b‖ = 0` returns `x = b` (zeros) with `info = 0` whatever `x0` is. methods.md recommends
//!   returning `x0` instead; [`ZeroRhs`] selects either, default [`ZeroRhs::KeepX0`].
//! - SciPy's default `maxiter` is `10·n`; here `maxiter` is always explicit (MaTS always passes
//!   `--num_iterations`), see [`CgOptions::scipy_default_maxiter`].
//!
//! Deviations, only where SciPy produces NaN: when `p·Ap = 0` with `ρ > 0` (e.g. all-zero
//! statistics, `A = 0`) SciPy divides by zero; here the solve stops with the current `x`
//! (`x0` on the first step), [`CgStop::Breakdown`] and `exit_code` [`BREAKDOWN_EXIT_CODE`].
//! When `ρ = 0` exactly (the exact solution, possible only with `tol = 0`) SciPy computes 0/0;
//! here the solve stops as converged. A non-finite `ρ` or `p·Ap` (NaN from the matrix) is an
//! error. `p·Ap < 0` (an indefinite matrix) continues, as SciPy does.
//!
//! # Split blocks
//!
//! The unknown is the concatenation of **parts** (e.g. groups of output columns of one weight).
//! A process may hold all parts (one-process run) or only some (one worker of a gang). Every
//! inner product is computed as f64 **partials**: for each local part in order, one partial per
//! chunk of [`CgOptions::chunk`] elements of that part, each summed sequentially in element
//! order. The partials go to [`CgProblem::reduce`], which must return the global sum over all
//! parts' partials, added sequentially in global part order then chunk order (the cluster's
//! reduction RPC does this across workers; [`sum_in_order`] does it in one process). So the
//! result does not depend on the number of workers nor on which worker ran which part; and when
//! every part length is a multiple of the chunk, a split solve is bit-identical to the unsplit
//! one (otherwise the chunk boundaries differ and they agree to rounding, ~1e-15 relative).
//! Element-wise updates have no reductions and run in parallel (rayon) without changing bits.
//!
//! Reductions per solve: one for `‖b‖`, one to decide whether `x0` is all zeros (when `x0` is
//! given), two per iteration (`r·r`, then `p·Ap`; they depend on each other, so they cannot be
//! fused without changing the arithmetic), and one for the final residual. Every process of a
//! gang makes the same sequence of calls, so they stay in lockstep.

use crate::error::{MergeError, Result};
use crate::linalg::LINALG_TENSOR;
use crate::reduce::REDUCE_CHUNK;
use crate::tensor::LogRecord;
use rayon::prelude::*;
use serde_json::Value;

/// `exit_code` of a solve stopped by a breakdown (`p·Ap = 0`), SciPy's code for a breakdown in
/// its other Krylov solvers (`bicgstab`, `cgs`).
pub const BREAKDOWN_EXIT_CODE: i64 = -10;

/// Which scalar a reduction computes (for logs and for checking that the processes of a gang
/// are in step; the arithmetic is the same for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgScalar {
    /// `b·b`, once at the start.
    RhsNormSq,
    /// The number of nonzero entries of `x0` (partials are counts), once when `x0` is given.
    X0Nonzeros,
    /// `r·r`, at the top of each iteration.
    ResidualNormSq,
    /// `p·Ap`, once per iteration.
    Curvature,
    /// `(b − Ax)·(b − Ax)` or `r·r` for the final log.
    FinalResidualNormSq,
}

impl CgScalar {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            CgScalar::RhsNormSq => "b.b",
            CgScalar::X0Nonzeros => "nnz(x0)",
            CgScalar::ResidualNormSq => "r.r",
            CgScalar::Curvature => "p.Ap",
            CgScalar::FinalResidualNormSq => "final r.r",
        }
    }
}

/// The linear system `A x = b` as CG sees it: the local parts of the unknown, the product with
/// `A`, and the reduction of inner-product partials.
pub trait CgProblem {
    /// Lengths of the parts of the unknown held by this process, in global part order. Their
    /// sum is the length of the `x0`, `b` and the vectors given to [`CgProblem::matvec`].
    fn parts(&self) -> &[usize];

    /// `y = A x` over the local parts (`y` is fully overwritten). In a gang, this is where the
    /// matrix's own communication happens (e.g. gathering `x` for K-FAC).
    fn matvec(&mut self, x: &[f64], y: &mut [f64]) -> Result<()>;

    /// The global inner product from this process's `partials` (per local part, per chunk, in
    /// order): the sum of all processes' partials added sequentially in global part order. The
    /// default, for a process holding every part, is [`sum_in_order`].
    fn reduce(&mut self, scalar: CgScalar, partials: &[f64]) -> Result<f64> {
        let _ = scalar;
        Ok(sum_in_order(partials))
    }
}

/// Sum the partials sequentially from the first to the last (the one-process reduction).
pub fn sum_in_order(partials: &[f64]) -> f64 {
    partials.iter().fold(0.0, |acc, &p| acc + p)
}

/// A [`CgProblem`] from closures: `matvec(x, y)` computes `y = A x`; `reduce(partials)` returns
/// the global sum (use [`sum_in_order`] in one process).
pub struct FnProblem<M, R> {
    /// Local part lengths, in global part order.
    pub parts: Vec<usize>,
    /// `y = A x`.
    pub matvec: M,
    /// Global sum of the partials.
    pub reduce: R,
}

impl<M> FnProblem<M, fn(&[f64]) -> Result<f64>>
where
    M: FnMut(&[f64], &mut [f64]) -> Result<()>,
{
    /// A problem held entirely by this process: the reduction is [`sum_in_order`].
    pub fn local(parts: Vec<usize>, matvec: M) -> Self {
        fn sum(p: &[f64]) -> Result<f64> {
            Ok(sum_in_order(p))
        }
        FnProblem {
            parts,
            matvec,
            reduce: sum,
        }
    }
}

impl<M, R> CgProblem for FnProblem<M, R>
where
    M: FnMut(&[f64], &mut [f64]) -> Result<()>,
    R: FnMut(&[f64]) -> Result<f64>,
{
    fn parts(&self) -> &[usize] {
        &self.parts
    }
    fn matvec(&mut self, x: &[f64], y: &mut [f64]) -> Result<()> {
        (self.matvec)(x, y)
    }
    fn reduce(&mut self, _scalar: CgScalar, partials: &[f64]) -> Result<f64> {
        (self.reduce)(partials)
    }
}

/// What to return when `‖b‖ = 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroRhs {
    /// Return `x0` unchanged (methods.md's recommendation: a layer whose statistics are all zero
    /// keeps its initialisation, e.g. the task-arithmetic merge).
    #[default]
    KeepX0,
    /// Return `x = b` (all zeros) whatever `x0` is, as SciPy does.
    ScipyZero,
}

/// Options of [`cg`]; the defaults are SciPy's (`rtol = 1e-5`, `atol = 0`) with MaTS's
/// full-model iteration count.
#[derive(Debug, Clone, PartialEq)]
pub struct CgOptions {
    /// Relative tolerance: stop when `‖r‖ < max(rtol·‖b‖, atol)`. Default `1e-5`.
    pub rtol: f64,
    /// Absolute tolerance. Default `0`.
    pub atol: f64,
    /// Maximum number of iterations (steps). Default 100 (MaTS README, full-model runs; 10 for
    /// (IA)³ blocks). SciPy's own default is `10·n`: [`CgOptions::scipy_default_maxiter`].
    pub maxiter: usize,
    /// Behaviour when `‖b‖ = 0`. Default [`ZeroRhs::KeepX0`].
    pub zero_rhs: ZeroRhs,
    /// Elements per reduction chunk within a part. Default [`REDUCE_CHUNK`]. Changing it
    /// changes results in the last bits; a split solve is bit-identical to the unsplit one when
    /// every part length is a multiple of it.
    pub chunk: usize,
    /// Report the final residual as the true `‖b − A x‖` (one extra product) rather than the
    /// recurrence's `‖r‖`. Default `true`.
    pub true_final_residual: bool,
}

impl Default for CgOptions {
    fn default() -> Self {
        CgOptions {
            rtol: 1e-5,
            atol: 0.0,
            maxiter: 100,
            zero_rhs: ZeroRhs::KeepX0,
            chunk: REDUCE_CHUNK,
            true_final_residual: true,
        }
    }
}

impl CgOptions {
    /// SciPy's default `maxiter` for a system of `n` unknowns (all parts together): `10·n`.
    pub fn scipy_default_maxiter(n: usize) -> usize {
        n.saturating_mul(10)
    }
}

/// Why the solve stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgStop {
    /// `‖r‖ < tol` at the top of an iteration (or `r = 0` exactly).
    Converged,
    /// `‖b‖ = 0`: returned at once (see [`ZeroRhs`]).
    ZeroRhs,
    /// `maxiter` steps ran (or `maxiter = 0`).
    MaxIter,
    /// `p·Ap = 0` with `r ≠ 0` (e.g. `A = 0`): stopped before dividing by zero.
    Breakdown,
}

impl CgStop {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            CgStop::Converged => "converged",
            CgStop::ZeroRhs => "zero_rhs",
            CgStop::MaxIter => "maxiter",
            CgStop::Breakdown => "breakdown",
        }
    }
}

/// A system MaTS hands a device ([`DeviceSolver`]): the operator of `A(X) = B`, the unknown `X`
/// being the right-hand side's shape (row-major).
#[derive(Debug, Clone)]
pub enum DeviceSystem<'a> {
    /// `X ↦ X·A`, `A` `n × n` row-major, `X` `m × n` (`gram`).
    Gram {
        /// The factor.
        a: std::borrow::Cow<'a, [f64]>,
        /// Its order.
        n: usize,
    },
    /// `x ↦ f ⊙ x` (`diagonal_fisher`; `identity` with every `f` the model count).
    Diagonal {
        /// One value per element of the unknown.
        f: std::borrow::Cow<'a, [f64]>,
    },
    /// `x ↦ F·x`, `F` `d × d` row-major, `x` `d` long (`ia3_block`).
    Dense {
        /// The matrix.
        f: &'a [f64],
        /// Its order.
        d: usize,
    },
    /// `X ↦ Σ_i S_i·X·A_i`, `S_i` `out × out`, `A_i` `d × d`, `X` `out × d` (`kfac`).
    Kfac {
        /// The input factors `A_i`.
        a: &'a [Vec<f64>],
        /// The output factors `S_i`.
        s: &'a [Vec<f64>],
        /// Rows of the unknown.
        out: usize,
        /// Columns of the unknown.
        d: usize,
    },
}

/// A device that solves MaTS's systems ([`DeviceSystem`]) with this module's CG (the same
/// options, stopping rule, exit codes and iteration counts; inner products summed in another
/// order, so results agree to rounding), e.g. a GPU keeping the vectors on the device for the
/// whole solve.
pub trait DeviceSolver: Send + Sync + std::fmt::Debug {
    /// Solve `A(X) = B` (`b` and `x0` in the unknown's layout) from `x0` under `opts`.
    fn solve(
        &self,
        sys: &DeviceSystem<'_>,
        b: &[f64],
        x0: &[f64],
        opts: &CgOptions,
    ) -> Result<CgResult>;

    /// Solve part `split.part` of a split system: `b`, `x0` and the returned `x` are this
    /// part's rows (elements `lo..hi` of the unknown, from `split.part_lens`), and `sys` is the
    /// operator: a [`DeviceSystem::Diagonal`] holds the part's values, the other systems are
    /// the whole block's (the products of [`DeviceSystem::Kfac`] and [`DeviceSystem::Dense`]
    /// need the whole direction: each product gathers it from the parts). The inner products
    /// and the gathers meet the other parts' through `reduce`, which returns the element-wise
    /// sum over all parts of equally long vectors (the cluster's reduction, as for
    /// [`crate::methods::mats::Mats::solve_part`]), or through a device collective that the
    /// parts set up with it. Every part makes the same sequence of `reduce` calls. The
    /// residuals of the result are global.
    fn solve_part(
        &self,
        sys: &DeviceSystem<'_>,
        b: &[f64],
        x0: &[f64],
        opts: &CgOptions,
        split: &SplitPart,
        reduce: &mut dyn FnMut(&[f64]) -> Result<Vec<f64>>,
    ) -> Result<CgResult>;
}

/// Where one part of a split block sits among its gang (for [`DeviceSolver::solve_part`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPart {
    /// This part's index, in global part order.
    pub part: usize,
    /// Every part's length in elements (its rows times the row length), in global part order.
    pub part_lens: Vec<usize>,
}

/// The result of [`cg`].
#[derive(Debug, Clone, PartialEq)]
pub struct CgResult {
    /// The solution (local parts), kept in f64.
    pub x: Vec<f64>,
    /// SciPy's `info`: `0` converged (or `‖b‖ = 0`, or `maxiter = 0`), else the iteration count
    /// reached (`maxiter`); [`BREAKDOWN_EXIT_CODE`] on a breakdown.
    pub exit_code: i64,
    /// Steps taken (SciPy's callback count).
    pub iterations: usize,
    /// `‖b − A x0‖` (global).
    pub initial_residual: f64,
    /// `‖b − A x‖` for the returned `x` (global); the recurrence's `‖r‖` when
    /// [`CgOptions::true_final_residual`] is off.
    pub final_residual: f64,
    /// Whether the stopping test passed ([`CgStop::Converged`] or [`CgStop::ZeroRhs`]).
    pub converged: bool,
    /// Why the solve stopped.
    pub stop: CgStop,
    /// `‖b‖` (global).
    pub rhs_norm: f64,
    /// The tolerance used, `max(atol, rtol·‖b‖)`.
    pub tolerance: f64,
    /// Whether [`CgResult::final_residual`] is the true residual (else the recurrence's).
    pub final_residual_is_true: bool,
    /// Products with `A` made.
    pub matvecs: usize,
    /// Calls to [`CgProblem::reduce`] made.
    pub reductions: usize,
}

impl CgResult {
    /// The per-block log record (methods.md §11, "Per-block log"): exit code, iterations,
    /// initial and final residuals, and the rest of the fields. Non-finite numbers become
    /// `null`.
    pub fn to_log_record(&self) -> LogRecord {
        let mut m = LogRecord::new();
        let f = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
        m.insert("solver".into(), Value::from("cg"));
        m.insert("exit_code".into(), Value::from(self.exit_code));
        m.insert("converged".into(), Value::from(self.converged));
        m.insert("stop".into(), Value::from(self.stop.name()));
        m.insert("iterations".into(), Value::from(self.iterations));
        m.insert("initial_residual".into(), f(self.initial_residual));
        m.insert("final_residual".into(), f(self.final_residual));
        m.insert(
            "final_residual_kind".into(),
            Value::from(if self.final_residual_is_true {
                "true"
            } else {
                "recursive"
            }),
        );
        m.insert("rhs_norm".into(), f(self.rhs_norm));
        m.insert("tolerance".into(), f(self.tolerance));
        m.insert("matvecs".into(), Value::from(self.matvecs));
        m.insert("reductions".into(), Value::from(self.reductions));
        m
    }
}

/// Per-part, per-chunk partials of an element-wise product sum, and the reduction driver.
struct Reducer<'p> {
    problem: &'p mut dyn CgProblem,
    /// (start, len) of every chunk, in part order then chunk order.
    chunks: Vec<(usize, usize)>,
    partials: Vec<f64>,
    calls: usize,
    matvecs: usize,
}

impl Reducer<'_> {
    fn sum_of(&mut self, scalar: CgScalar, f: impl Fn(usize) -> f64 + Sync) -> Result<f64> {
        let chunks = &self.chunks;
        self.partials
            .par_iter_mut()
            .zip(chunks.par_iter())
            .for_each(|(slot, &(start, len))| {
                let mut s = 0.0;
                for i in start..start + len {
                    s += f(i);
                }
                *slot = s;
            });
        self.calls += 1;
        let v = self.problem.reduce(scalar, &self.partials)?;
        Ok(v)
    }

    fn dot(&mut self, scalar: CgScalar, a: &[f64], b: &[f64]) -> Result<f64> {
        self.sum_of(scalar, |i| a[i] * b[i])
    }

    fn matvec(&mut self, x: &[f64], y: &mut [f64]) -> Result<()> {
        self.matvecs += 1;
        self.problem.matvec(x, y)
    }
}

fn numeric(message: String) -> MergeError {
    MergeError::Numeric {
        tensor: LINALG_TENSOR.to_string(),
        message,
    }
}

/// Elements per parallel task of the element-wise updates (no reductions there, so bit-exact).
const PAR_MIN: usize = 1 << 14;

fn axpy_update(x: &mut [f64], r: &mut [f64], p: &[f64], q: &[f64], alpha: f64) {
    let body = |(xs, rs, ps, qs): (&mut [f64], &mut [f64], &[f64], &[f64])| {
        for i in 0..xs.len() {
            xs[i] += alpha * ps[i];
            rs[i] -= alpha * qs[i];
        }
    };
    if x.len() < PAR_MIN {
        body((x, r, p, q));
    } else {
        x.par_chunks_mut(PAR_MIN)
            .zip(r.par_chunks_mut(PAR_MIN))
            .zip(p.par_chunks(PAR_MIN).zip(q.par_chunks(PAR_MIN)))
            .for_each(|((xs, rs), (ps, qs))| body((xs, rs, ps, qs)));
    }
}

fn direction_update(p: &mut [f64], r: &[f64], beta: f64) {
    let body = |(ps, rs): (&mut [f64], &[f64])| {
        for i in 0..ps.len() {
            ps[i] *= beta;
            ps[i] += rs[i];
        }
    };
    if p.len() < PAR_MIN {
        body((p, r));
    } else {
        p.par_chunks_mut(PAR_MIN)
            .zip(r.par_chunks(PAR_MIN))
            .for_each(body);
    }
}

/// `r = b − y` element-wise.
fn residual_from(b: &[f64], y: &mut [f64]) {
    y.par_iter_mut()
        .with_min_len(PAR_MIN)
        .zip(b.par_iter())
        .for_each(|(yi, &bi)| *yi = bi - *yi);
}

/// Solve `A x = b` by conjugate gradient as SciPy runs it (see the module docs), from `x0`
/// (`None`: zeros). `b` and `x0` are this process's parts of the vectors (see
/// [`CgProblem::parts`]). Errors from the problem's `matvec` or `reduce` are returned as they
/// are; a non-finite inner product is a [`MergeError::Numeric`] error (tensor
/// [`LINALG_TENSOR`], rename it with [`crate::linalg::name_tensor`]).
pub fn cg(
    problem: &mut dyn CgProblem,
    x0: Option<&[f64]>,
    b: &[f64],
    opts: &CgOptions,
) -> Result<CgResult> {
    let n: usize = problem.parts().iter().sum();
    if b.len() != n {
        return Err(MergeError::BadInputs {
            method: "cg".into(),
            message: format!("b has {} values but the parts hold {n}", b.len()),
        });
    }
    if let Some(x0) = x0 {
        if x0.len() != n {
            return Err(MergeError::BadInputs {
                method: "cg".into(),
                message: format!("x0 has {} values but the parts hold {n}", x0.len()),
            });
        }
    }
    if opts.chunk == 0 {
        return Err(MergeError::BadParameter {
            key: "cg.chunk".into(),
            message: "must be at least 1".into(),
        });
    }
    for (key, v) in [("rtol", opts.rtol), ("atol", opts.atol)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(MergeError::BadParameter {
                key: key.into(),
                message: format!("must be a finite nonnegative number, got {v}"),
            });
        }
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    for &len in problem.parts() {
        let mut off = 0;
        while off < len {
            let l = opts.chunk.min(len - off);
            chunks.push((start + off, l));
            off += l;
        }
        start += len;
    }
    let nchunks = chunks.len();
    let mut red = Reducer {
        problem,
        chunks,
        partials: vec![0.0; nchunks],
        calls: 0,
        matvecs: 0,
    };

    let bb = red.dot(CgScalar::RhsNormSq, b, b)?;
    if !bb.is_finite() {
        return Err(numeric(format!("cg: b·b is {bb}")));
    }
    let bnrm = bb.sqrt();
    let tol = opts.atol.max(opts.rtol * bnrm);

    let mut x: Vec<f64> = match x0 {
        Some(x0) => x0.to_vec(),
        None => vec![0.0; n],
    };
    // SciPy: r = b - A x if x.any() else b. Global decision, so every process of a gang does
    // the same number of products.
    let x0_nonzero = match x0 {
        None => false,
        Some(_) => {
            let xr = &x;
            red.sum_of(CgScalar::X0Nonzeros, |i| f64::from(u8::from(xr[i] != 0.0)))? > 0.0
        }
    };
    let mut r = if x0_nonzero {
        let mut y = vec![0.0; n];
        red.matvec(&x, &mut y)?;
        residual_from(b, &mut y);
        y
    } else {
        b.to_vec()
    };
    let mut rho = red.dot(CgScalar::ResidualNormSq, &r, &r)?;
    if !rho.is_finite() {
        return Err(numeric(format!("cg: initial r·r is {rho}")));
    }
    let initial_residual = rho.sqrt();

    let finish = |red: &mut Reducer<'_>,
                  x: Vec<f64>,
                  r: &[f64],
                  exit_code: i64,
                  iterations: usize,
                  stop: CgStop,
                  known_rr: Option<f64>|
     -> Result<CgResult> {
        let (final_rr, is_true) = if opts.true_final_residual {
            let mut y = vec![0.0; n];
            red.matvec(&x, &mut y)?;
            residual_from(b, &mut y);
            (red.dot(CgScalar::FinalResidualNormSq, &y, &y)?, true)
        } else {
            match known_rr {
                Some(v) => (v, false),
                None => (red.dot(CgScalar::FinalResidualNormSq, r, r)?, false),
            }
        };
        Ok(CgResult {
            x,
            exit_code,
            iterations,
            initial_residual,
            final_residual: final_rr.sqrt(),
            converged: matches!(stop, CgStop::Converged | CgStop::ZeroRhs),
            stop,
            rhs_norm: bnrm,
            tolerance: tol,
            final_residual_is_true: is_true,
            matvecs: red.matvecs,
            reductions: red.calls,
        })
    };

    if bnrm == 0.0 {
        let x = match opts.zero_rhs {
            ZeroRhs::KeepX0 => x,
            ZeroRhs::ScipyZero => b.to_vec(),
        };
        return finish(&mut red, x, &r, 0, 0, CgStop::ZeroRhs, None);
    }

    let mut p = vec![0.0; n];
    let mut q = vec![0.0; n];
    let mut rho_prev = 0.0;
    for it in 0..opts.maxiter {
        if it > 0 {
            rho = red.dot(CgScalar::ResidualNormSq, &r, &r)?;
            if !rho.is_finite() {
                return Err(numeric(format!("cg: r·r is {rho} at iteration {it}")));
            }
        }
        if rho.sqrt() < tol || rho == 0.0 {
            return finish(&mut red, x, &r, 0, it, CgStop::Converged, Some(rho));
        }
        if it == 0 {
            p.copy_from_slice(&r);
        } else {
            direction_update(&mut p, &r, rho / rho_prev);
        }
        red.matvec(&p, &mut q)?;
        let pq = red.dot(CgScalar::Curvature, &p, &q)?;
        if !pq.is_finite() {
            return Err(numeric(format!("cg: p·Ap is {pq} at iteration {it}")));
        }
        if pq == 0.0 {
            return finish(
                &mut red,
                x,
                &r,
                BREAKDOWN_EXIT_CODE,
                it,
                CgStop::Breakdown,
                Some(rho),
            );
        }
        let alpha = rho / pq;
        axpy_update(&mut x, &mut r, &p, &q, alpha);
        rho_prev = rho;
    }
    let maxiter = i64::try_from(opts.maxiter).unwrap_or(i64::MAX);
    // With maxiter = 0, `rho` is still r·r of the returned x0.
    let known = (opts.maxiter == 0).then_some(rho);
    finish(
        &mut red,
        x,
        &r,
        maxiter,
        opts.maxiter,
        CgStop::MaxIter,
        known,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, Mutex};

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

    /// Random SPD matrix X^T X / m + shift I (row-major n x n), built naively.
    fn spd(seed: u64, n: usize, shift: f64) -> Vec<f64> {
        let m = n + 5;
        let x = rand_vec(seed, m * n);
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0;
                for k in 0..m {
                    s += x[k * n + i] * x[k * n + j];
                }
                a[i * n + j] = s / m as f64;
            }
        }
        for i in 0..n {
            a[i * n + i] += shift;
        }
        a
    }

    fn dense_mv(a: &[f64], x: &[f64], y: &mut [f64]) {
        let n = x.len();
        for i in 0..y.len() {
            let mut s = 0.0;
            for j in 0..n {
                s += a[i * n + j] * x[j];
            }
            y[i] = s;
        }
    }

    fn rel_err(x: &[f64], y: &[f64]) -> f64 {
        let d: f64 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
        let n: f64 = y.iter().map(|b| b * b).sum();
        (d / n.max(f64::MIN_POSITIVE)).sqrt()
    }

    fn solve_dense(
        a: &[f64],
        parts: Vec<usize>,
        x0: Option<&[f64]>,
        b: &[f64],
        opts: &CgOptions,
    ) -> CgResult {
        let mut prob = FnProblem::local(parts, |x: &[f64], y: &mut [f64]| {
            dense_mv(a, x, y);
            Ok(())
        });
        cg(&mut prob, x0, b, opts).unwrap()
    }

    /// Textbook CG (Shewchuk / Wikipedia), written independently.
    fn textbook_cg(a: &[f64], b: &[f64], x0: &[f64], k: usize) -> Vec<f64> {
        let n = b.len();
        let mut x = x0.to_vec();
        let mut ax = vec![0.0; n];
        dense_mv(a, &x, &mut ax);
        let mut r: Vec<f64> = (0..n).map(|i| b[i] - ax[i]).collect();
        let mut p = r.clone();
        let mut rs: f64 = r.iter().map(|v| v * v).sum();
        for _ in 0..k {
            let mut ap = vec![0.0; n];
            dense_mv(a, &p, &mut ap);
            let pap: f64 = p.iter().zip(&ap).map(|(u, v)| u * v).sum();
            let alpha = rs / pap;
            for i in 0..n {
                x[i] += alpha * p[i];
                r[i] -= alpha * ap[i];
            }
            let rs_new: f64 = r.iter().map(|v| v * v).sum();
            for i in 0..n {
                p[i] = r[i] + rs_new / rs * p[i];
            }
            rs = rs_new;
        }
        x
    }

    #[test]
    fn converges_to_dense_solution() {
        for (seed, n) in [(1u64, 5usize), (2, 17), (3, 40), (4, 64)] {
            let a = spd(seed, n, 0.3);
            let b = rand_vec(seed + 100, n);
            let exact = crate::linalg::lu_solve(&a, n, &b, 1).unwrap();
            let opts = CgOptions {
                rtol: 1e-13,
                maxiter: 10 * n,
                ..CgOptions::default()
            };
            let x0 = rand_vec(seed + 200, n);
            for x0 in [None, Some(&x0[..])] {
                let res = solve_dense(&a, vec![n], x0, &b, &opts);
                assert_eq!(res.exit_code, 0, "n={n}");
                assert!(res.converged);
                assert_eq!(res.stop, CgStop::Converged);
                assert!(
                    rel_err(&res.x, &exact) <= 1e-8,
                    "n={n}: {}",
                    rel_err(&res.x, &exact)
                );
                assert!(res.final_residual < 1e-12 * res.rhs_norm.max(1.0) * 10.0);
                assert!(res.initial_residual > res.final_residual);
            }
        }
    }

    #[test]
    fn default_tolerance_and_residuals() {
        let n = 30;
        let a = spd(7, n, 0.2);
        let b = rand_vec(8, n);
        let res = solve_dense(&a, vec![n], None, &b, &CgOptions::default());
        assert_eq!(res.exit_code, 0);
        let bn = b.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((res.rhs_norm - bn).abs() < 1e-12 * bn);
        assert_eq!(res.tolerance, 1e-5 * res.rhs_norm);
        assert!(
            (res.initial_residual - bn).abs() < 1e-12 * bn,
            "x0 = 0: r0 = b"
        );
        // true final residual, computed independently
        let mut ax = vec![0.0; n];
        dense_mv(&a, &res.x, &mut ax);
        let tr = (0..n).map(|i| (b[i] - ax[i]).powi(2)).sum::<f64>().sqrt();
        assert!((res.final_residual - tr).abs() <= 1e-12 * bn);
        assert!(res.final_residual < res.tolerance * 1.001);
        // products: one per iteration + the final residual; no product for x0 = 0
        assert_eq!(res.matvecs, res.iterations + 1);
        // reductions: b.b, r0.r0, then per step p.Ap and r.r, then the final residual
        assert_eq!(res.reductions, 2 + 2 * res.iterations + 1);
        let rec = res.to_log_record();
        for key in [
            "exit_code",
            "iterations",
            "initial_residual",
            "final_residual",
            "converged",
            "stop",
        ] {
            assert!(rec.contains_key(key), "{key}");
        }
        assert_eq!(rec["exit_code"], serde_json::json!(0));
        assert_eq!(rec["stop"], serde_json::json!("converged"));
    }

    #[test]
    fn matches_textbook_after_k_iterations() {
        let n = 25;
        let a = spd(11, n, 0.05);
        let b = rand_vec(12, n);
        let x0 = rand_vec(13, n);
        for k in 1..=8 {
            let opts = CgOptions {
                rtol: 0.0,
                maxiter: k,
                ..CgOptions::default()
            };
            let res = solve_dense(&a, vec![n], Some(&x0), &b, &opts);
            assert_eq!(res.exit_code, k as i64);
            assert_eq!(res.iterations, k);
            assert_eq!(res.stop, CgStop::MaxIter);
            assert!(!res.converged);
            let want = textbook_cg(&a, &b, &x0, k);
            assert!(
                rel_err(&res.x, &want) < 1e-10,
                "k={k}: {}",
                rel_err(&res.x, &want)
            );
        }
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn split_equals_unsplit() {
        let n = 60;
        let a = spd(21, n, 0.1);
        let b = rand_vec(22, n);
        let x0 = rand_vec(23, n);
        // chunk 7 does not divide the parts: agreement to rounding
        let opts = CgOptions {
            rtol: 1e-12,
            maxiter: 200,
            chunk: 7,
            ..CgOptions::default()
        };
        let whole = solve_dense(&a, vec![n], Some(&x0), &b, &opts);
        for parts in [vec![25, 35], vec![13, 30, 17], vec![9, 14, 11, 20, 6]] {
            let s = solve_dense(&a, parts.clone(), Some(&x0), &b, &opts);
            assert!(
                rel_err(&s.x, &whole.x) <= 1e-12,
                "{parts:?}: {}",
                rel_err(&s.x, &whole.x)
            );
            assert_eq!(s.exit_code, whole.exit_code);
        }
        // chunk 5 divides every part: bit-identical, also with maxiter reached
        for maxiter in [200, 7] {
            let opts = CgOptions {
                rtol: 1e-12,
                maxiter,
                chunk: 5,
                ..CgOptions::default()
            };
            let whole = solve_dense(&a, vec![n], Some(&x0), &b, &opts);
            for parts in [vec![25, 35], vec![15, 30, 15], vec![10, 15, 10, 20, 5]] {
                let s = solve_dense(&a, parts.clone(), Some(&x0), &b, &opts);
                assert_eq!(bits(&s.x), bits(&whole.x), "{parts:?}");
                assert_eq!(s.final_residual.to_bits(), whole.final_residual.to_bits());
                assert_eq!(
                    (s.exit_code, s.iterations),
                    (whole.exit_code, whole.iterations)
                );
            }
        }
    }

    /// A gang of worker threads, each holding some parts, exchanging partials and `x` through
    /// shared slots (standing in for the cluster's reduction RPC): same bytes as one process.
    #[test]
    fn gang_of_workers_equals_one_process() {
        let n = 48;
        let a = Arc::new(spd(31, n, 0.1));
        let b = rand_vec(32, n);
        let x0 = rand_vec(33, n);
        let parts = vec![8usize, 11, 6, 13, 10];
        // worker w holds parts owned[w]
        let owned: Vec<Vec<usize>> = vec![vec![0, 1], vec![2], vec![3, 4]];
        let opts = CgOptions {
            rtol: 1e-10,
            maxiter: 100,
            chunk: 4,
            ..CgOptions::default()
        };
        let one = solve_dense(&a, parts.clone(), Some(&x0), &b, &opts);

        let workers = owned.len();
        let barrier = Arc::new(Barrier::new(workers));
        let slots: Arc<Mutex<Vec<Vec<f64>>>> = Arc::new(Mutex::new(vec![Vec::new(); workers]));
        let calls: Arc<Mutex<Vec<(usize, CgScalar)>>> = Arc::new(Mutex::new(Vec::new()));
        let offsets: Vec<usize> = parts
            .iter()
            .scan(0, |s, &l| {
                let o = *s;
                *s += l;
                Some(o)
            })
            .collect();
        struct Worker {
            w: usize,
            parts: Vec<usize>,
            rows: Vec<usize>,
            a: Arc<Vec<f64>>,
            barrier: Arc<Barrier>,
            slots: Arc<Mutex<Vec<Vec<f64>>>>,
            calls: Arc<Mutex<Vec<(usize, CgScalar)>>>,
        }
        impl Worker {
            fn all_gather(&self, local: &[f64]) -> Vec<f64> {
                self.slots.lock().unwrap()[self.w] = local.to_vec();
                self.barrier.wait();
                let all: Vec<f64> = self.slots.lock().unwrap().concat();
                self.barrier.wait();
                all
            }
        }
        impl CgProblem for Worker {
            fn parts(&self) -> &[usize] {
                &self.parts
            }
            fn matvec(&mut self, x: &[f64], y: &mut [f64]) -> Result<()> {
                let full = self.all_gather(x);
                let n = full.len();
                for (k, &row) in self.rows.iter().enumerate() {
                    let arow = &self.a[row * n..(row + 1) * n];
                    let mut s = 0.0;
                    for (aj, xj) in arow.iter().zip(&full) {
                        s += aj * xj;
                    }
                    y[k] = s;
                }
                Ok(())
            }
            fn reduce(&mut self, scalar: CgScalar, partials: &[f64]) -> Result<f64> {
                self.calls.lock().unwrap().push((self.w, scalar));
                Ok(sum_in_order(&self.all_gather(partials)))
            }
        }
        let mut handles = Vec::new();
        for (w, own) in owned.iter().enumerate() {
            let rows: Vec<usize> = own
                .iter()
                .flat_map(|&p| offsets[p]..offsets[p] + parts[p])
                .collect();
            let mut worker = Worker {
                w,
                parts: own.iter().map(|&p| parts[p]).collect(),
                rows: rows.clone(),
                a: a.clone(),
                barrier: barrier.clone(),
                slots: slots.clone(),
                calls: calls.clone(),
            };
            let bl: Vec<f64> = rows.iter().map(|&i| b[i]).collect();
            let xl: Vec<f64> = rows.iter().map(|&i| x0[i]).collect();
            let opts = opts.clone();
            handles.push(std::thread::spawn(move || {
                (rows, cg(&mut worker, Some(&xl), &bl, &opts).unwrap())
            }));
        }
        let mut x = vec![f64::NAN; n];
        for h in handles {
            let (rows, res) = h.join().unwrap();
            assert_eq!(res.exit_code, one.exit_code);
            assert_eq!(res.iterations, one.iterations);
            assert_eq!(res.final_residual.to_bits(), one.final_residual.to_bits());
            assert_eq!(res.reductions, one.reductions);
            for (k, &i) in rows.iter().enumerate() {
                x[i] = res.x[k];
            }
        }
        assert_eq!(bits(&x), bits(&one.x));
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), workers * one.reductions);
    }

    #[test]
    fn zero_rhs_keeps_x0_or_returns_zero() {
        let n = 6;
        let a = spd(41, n, 0.5);
        let b = vec![0.0; n];
        let x0 = rand_vec(42, n);
        let keep = solve_dense(&a, vec![n], Some(&x0), &b, &CgOptions::default());
        assert_eq!(keep.x, x0);
        assert_eq!((keep.exit_code, keep.iterations), (0, 0));
        assert_eq!(keep.stop, CgStop::ZeroRhs);
        assert!(keep.converged);
        // residual of x0 against b = 0 is |A x0|
        let mut ax = vec![0.0; n];
        dense_mv(&a, &x0, &mut ax);
        let nax = ax.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((keep.initial_residual - nax).abs() < 1e-12 * nax);
        assert!((keep.final_residual - nax).abs() < 1e-12 * nax);
        let opts = CgOptions {
            zero_rhs: ZeroRhs::ScipyZero,
            ..CgOptions::default()
        };
        let zero = solve_dense(&a, vec![n], Some(&x0), &b, &opts);
        assert_eq!(zero.x, vec![0.0; n]);
        assert_eq!(zero.exit_code, 0);
        assert_eq!(zero.final_residual, 0.0);
    }

    #[test]
    fn zero_matrix_breaks_down_without_nan() {
        let n = 5;
        let a = vec![0.0; n * n];
        let b = rand_vec(51, n);
        let x0 = rand_vec(52, n);
        for x0 in [None, Some(&x0[..])] {
            let res = solve_dense(&a, vec![n], x0, &b, &CgOptions::default());
            assert_eq!(res.x, x0.map_or(vec![0.0; n], <[f64]>::to_vec));
            assert_eq!(res.exit_code, BREAKDOWN_EXIT_CODE);
            assert_ne!(res.exit_code, 0);
            assert_eq!(res.stop, CgStop::Breakdown);
            assert!(!res.converged);
            assert_eq!(res.iterations, 0);
            assert!(res.final_residual.is_finite());
            assert!(res.x.iter().all(|v| v.is_finite()));
            let rec = res.to_log_record();
            assert_eq!(rec["stop"], serde_json::json!("breakdown"));
        }
        // all-zero statistics and b = 0: the zero-rhs rule applies first
        let res = solve_dense(&a, vec![n], None, &vec![0.0; n], &CgOptions::default());
        assert_eq!((res.exit_code, res.stop), (0, CgStop::ZeroRhs));
    }

    #[test]
    fn maxiter_zero_returns_x0_with_scipy_code() {
        let n = 7;
        let a = spd(61, n, 0.5);
        let b = rand_vec(62, n);
        let x0 = rand_vec(63, n);
        let opts = CgOptions {
            maxiter: 0,
            ..CgOptions::default()
        };
        let res = solve_dense(&a, vec![n], Some(&x0), &b, &opts);
        assert_eq!(res.x, x0);
        assert_eq!(res.exit_code, 0, "SciPy's info for maxiter = 0");
        assert_eq!(res.iterations, 0);
        assert_eq!(res.stop, CgStop::MaxIter);
        assert!(!res.converged);
        assert!((res.initial_residual - res.final_residual).abs() <= 1e-12 * res.initial_residual);
    }

    #[test]
    fn exact_start_and_identity() {
        let n = 9;
        let a = spd(71, n, 0.5);
        let xs = rand_vec(72, n);
        let mut b = vec![0.0; n];
        dense_mv(&a, &xs, &mut b);
        // a start within tolerance: converged before the first step
        let res = solve_dense(&a, vec![n], Some(&xs), &b, &CgOptions::default());
        assert_eq!((res.exit_code, res.iterations), (0, 0));
        assert_eq!(res.x, xs);
        // A = I (average objective) converges in one step
        let mut eye = vec![0.0; n * n];
        for i in 0..n {
            eye[i * n + i] = 1.0;
        }
        let res = solve_dense(
            &eye,
            vec![n],
            Some(&rand_vec(73, n)),
            &b,
            &CgOptions::default(),
        );
        assert_eq!((res.exit_code, res.iterations), (0, 1));
        assert!(rel_err(&res.x, &b) < 1e-15);
        // rtol = atol = 0 with an exact answer: r = 0 stops (SciPy would compute 0/0)
        let opts = CgOptions {
            rtol: 0.0,
            ..CgOptions::default()
        };
        let res = solve_dense(&eye, vec![n], None, &b, &opts);
        assert_eq!((res.exit_code, res.iterations), (0, 1));
        assert!(res.x.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = spd(81, 3, 0.5);
        let mut prob = FnProblem::local(vec![3], |x: &[f64], y: &mut [f64]| {
            dense_mv(&a, x, y);
            Ok(())
        });
        let o = CgOptions::default();
        assert!(cg(&mut prob, None, &[1.0, 2.0], &o).is_err());
        assert!(cg(&mut prob, Some(&[1.0]), &[1.0, 2.0, 3.0], &o).is_err());
        let bad = CgOptions {
            chunk: 0,
            ..CgOptions::default()
        };
        assert!(cg(&mut prob, None, &[1.0, 2.0, 3.0], &bad).is_err());
        let bad = CgOptions {
            rtol: f64::NAN,
            ..CgOptions::default()
        };
        assert!(cg(&mut prob, None, &[1.0, 2.0, 3.0], &bad).is_err());
        // a NaN from the product is an error naming the scalar, not a NaN result
        let mut nan = FnProblem::local(vec![3], |_x: &[f64], y: &mut [f64]| {
            y.fill(f64::NAN);
            Ok(())
        });
        let e = cg(&mut nan, None, &[1.0, 2.0, 3.0], &o).unwrap_err();
        let e = crate::linalg::name_tensor(e, "w");
        assert!(e.to_string().contains("p·Ap"), "{e}");
        assert!(e.to_string().starts_with("tensor `w`"), "{e}");
        // errors from the problem pass through
        let mut failing = FnProblem::local(vec![3], |_x: &[f64], _y: &mut [f64]| {
            Err(MergeError::Read("rpc failed".into()))
        });
        let e = cg(&mut failing, Some(&[1.0, 0.0, 0.0]), &[1.0, 2.0, 3.0], &o).unwrap_err();
        assert_eq!(e.to_string(), "rpc failed");
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<FixtureCase>,
    }

    #[derive(serde::Deserialize)]
    struct FixtureCase {
        name: String,
        n: usize,
        a: Vec<f64>,
        b: Vec<f64>,
        x0: Option<Vec<f64>>,
        rtol: f64,
        atol: f64,
        maxiter: usize,
        x: Vec<f64>,
        info: i64,
        iterations: usize,
    }

    #[test]
    fn matches_scipy_fixtures() {
        let text = include_str!("../../../../tests/fixtures/scipy_cg/scipy_cg.json");
        let fx: Fixture = serde_json::from_str(text).unwrap();
        assert!(fx.cases.len() >= 4);
        for c in &fx.cases {
            let opts = CgOptions {
                rtol: c.rtol,
                atol: c.atol,
                maxiter: c.maxiter,
                zero_rhs: ZeroRhs::ScipyZero,
                ..CgOptions::default()
            };
            let res = solve_dense(&c.a, vec![c.n], c.x0.as_deref(), &c.b, &opts);
            assert_eq!(res.exit_code, c.info, "{}: exit code", c.name);
            assert_eq!(res.iterations, c.iterations, "{}: iterations", c.name);
            let scale = c.x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0);
            let diff = res
                .x
                .iter()
                .zip(&c.x)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            assert!(
                diff <= 1e-10 * scale,
                "{}: |x - x_scipy| = {diff:e}",
                c.name
            );
            // split the same system in 3 parts: same iterations (skipped where ill-conditioning
            // lets the last bits of the reductions change the iteration count)
            if c.n >= 3 && !c.name.starts_with("ill_conditioned") {
                let parts = vec![c.n / 3, c.n / 3, c.n - 2 * (c.n / 3)];
                let s = solve_dense(&c.a, parts, c.x0.as_deref(), &c.b, &opts);
                assert_eq!((s.exit_code, s.iterations), (res.exit_code, res.iterations));
            }
        }
    }
}
