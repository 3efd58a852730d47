//! Conjugate gradient kept on the device: the GPU form of [`amalgam_core::solve::cg::cg`]
//! (SciPy's algorithm, methods.md §11) for the systems MaTS solves
//! (`crates/core/src/methods/mats.rs`; [`DeviceSystem`], [`solve_system`]).
//!
//! # The operators
//!
//! - `gram` (and `ia3_block`, as `x ↦ x·Fᵀ`): `X ↦ X·A`, one DGEMM (below);
//! - `kfac`: `X ↦ Σ_i S_i·X·A_i`, two DGEMMs per model, added in model order;
//! - `diagonal_fisher` (and `identity`): `x ↦ f ⊙ x`, one kernel (`cg_diag`), rounding as the
//!   CPU's product.
//!
//! # Split systems
//!
//! One part of a split block ([`solve_system`] with [`Slots`]) holds its rows
//! of `x`, `r`, `p`, `q`; its per-chunk partials sit in its own slots of a vector holding every
//! part's, zero elsewhere, and before each sum an [`Exchange`] makes that vector the parts'
//! element-wise sum (the coordinator's `Reduce` through the host, or an NCCL all-reduce on the
//! devices, [`crate::nccl`]); every part then adds all slots by the same fixed tree. Parts
//! whose lengths are multiples of [`CHUNK`] have the whole system's slots, so their sums are
//! the whole solve's; their products are their rows' DGEMM (cuBLAS may round a part's rows
//! otherwise than the whole block's).
//!
//! # The system
//!
//! `A` is `n × n` (f64, row-major; symmetric positive semi-definite in MaTS, though the product
//! does not rely on symmetry). The unknown `X`, the right-hand side `B` and the solution are
//! `m × n` row-major, the tensor layout mats.rs uses (a linear weight's `out × in`, so
//! `m = out`, `n = in`; equivalently the reference's `n × m` unknown stored column by column),
//! and the operator is `X ↦ X·A`, one cuBLAS DGEMM. As in mats.rs (one part), CG treats the
//! `m·n` values as **one vector** in its inner products.
//!
//! # The iteration
//!
//! Exactly the CPU solver's (see its module docs): `‖b‖ = 0` returns at once ([`ZeroRhs`]);
//! `tol = max(atol, rtol·‖b‖)`; `r = b − A x0` (`r = b` when `x0` is all zeros); before each
//! step stop when `√ρ < tol` (strict) or `ρ = 0`; stop on `p·Ap = 0` ([`CgStop::Breakdown`],
//! [`BREAKDOWN_EXIT_CODE`]); a non-finite `ρ` or `p·Ap` is a [`MergeError::Numeric`] error; the
//! exit codes, iteration counts, residuals and the counts of products and reductions are the
//! CPU's ([`CgReport::into_result`] gives the CPU's [`CgResult`]).
//!
//! # On the device
//!
//! `x`, `r`, `p`, `q = A p` never leave the device. The scalars `ρ`, `ρ_prev`, `p·Ap`, `α`,
//! `tol` and the stop status live in one device array; the kernels of `kernels/cg.cu` compute
//! `α = ρ/(p·Ap)`, `β = ρ/ρ_prev` and the tests from it, and do nothing once the status says
//! stopped. So the host enqueues iteration `k` and only then reads (on the copy stream) a
//! snapshot of the status after iteration `k − 1`: the device never waits for the host, and a
//! stop costs at most one extra (idle but for the DGEMM) iteration. The setup (`b·b`, whether
//! `x0` is zero, the initial `r·r`) and the final residual read single scalars.
//!
//! Per iteration: one reduction of the `r·r` partials (made by the previous update), the
//! direction update, the DGEMM, the `p·Ap` partials and their reduction, and one fused kernel
//! `x += α p; r −= α q` that also makes the next `r·r` partials.
//!
//! Inner products are deterministic and independent of the device (its multiprocessor count
//! included): one partial per chunk of [`CHUNK`] elements (the CPU's default chunk), each
//! summed by a fixed tree of 256 threads, then the partials added by a fixed tree. They are not
//! the CPU's sequential sums, so GPU and CPU agree to rounding (about 1e-15 relative per
//! scalar), not bitwise; [`CgOptions::chunk`] is not used here. Element-wise updates round as
//! the CPU's (`--fmad=false`: `x + α·p` is a product then a sum). The DGEMM rounds as cuBLAS
//! does (the same bits on every run with one GPU model and cuBLAS version, one stream), so a
//! whole solve is reproducible on one GPU model.

use crate::check::Row;
use crate::device::Gpu;
use crate::error::{Ctx, CudaError, Result};
use amalgam_core::linalg::LINALG_TENSOR;
use amalgam_core::solve::cg::{
    CgOptions, CgResult, CgStop, DeviceSystem, ZeroRhs, BREAKDOWN_EXIT_CODE,
};
use amalgam_core::MergeError;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaViewMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

/// Kernel entry points of `kernels/cg.cu`.
pub const KERNELS: &[&str] = &[
    "cg_dot",
    "cg_nnz",
    "cg_reduce",
    "cg_direction",
    "cg_update",
    "cg_residual",
    "cg_diag",
];

/// Elements per inner-product chunk (one partial each); `CG_CHUNK` in `kernels/cg.cu`.
pub const CHUNK: usize = 16384;

/// Threads per block of the chunked kernels and of `cg_reduce`; `CG_THREADS` in `cg.cu`.
const THREADS: u32 = 256;

/// Slots of the device state array (`CG_*` in `cg.cu`).
const S_RHO: usize = 0;
const S_PQ: usize = 2;
const S_TOL: usize = 4;
const S_STATUS: usize = 5;
const S_ITER: usize = 6;
const S_AUX: usize = 7;
const STATE_LEN: usize = 8;

/// Values of `state[S_STATUS]`.
const RUNNING: f64 = 0.0;
const CONVERGED: f64 = 1.0;
const BREAKDOWN: f64 = 2.0;
const BAD_RHO: f64 = 3.0;
const BAD_PQ: f64 = 4.0;

/// Operations of `cg_reduce`.
const OP_STORE: i32 = 0;
const OP_RHO: i32 = 1;
const OP_PQ: i32 = 2;

/// The outcome of a GPU solve: every field of the CPU's [`CgResult`] but the solution.
#[derive(Debug, Clone, PartialEq)]
pub struct CgReport {
    /// SciPy's `info`, as [`CgResult::exit_code`].
    pub exit_code: i64,
    /// Steps taken.
    pub iterations: usize,
    /// `‖b − A x0‖`.
    pub initial_residual: f64,
    /// `‖b − A x‖` of the returned `x` (the recurrence's `‖r‖` when
    /// [`CgOptions::true_final_residual`] is off).
    pub final_residual: f64,
    /// Whether the stopping test passed.
    pub converged: bool,
    /// Why the solve stopped.
    pub stop: CgStop,
    /// `‖b‖`.
    pub rhs_norm: f64,
    /// `max(atol, rtol·‖b‖)`.
    pub tolerance: f64,
    /// Whether [`CgReport::final_residual`] is the true residual.
    pub final_residual_is_true: bool,
    /// Products with `A` the CPU solver makes for the same solve.
    pub matvecs: usize,
    /// Inner products (reductions) the CPU solver makes for the same solve.
    pub reductions: usize,
}

impl CgReport {
    /// The CPU solver's result type with solution `x` (for its log record).
    pub fn into_result(self, x: Vec<f64>) -> CgResult {
        CgResult {
            x,
            exit_code: self.exit_code,
            iterations: self.iterations,
            initial_residual: self.initial_residual,
            final_residual: self.final_residual,
            converged: self.converged,
            stop: self.stop,
            rhs_norm: self.rhs_norm,
            tolerance: self.tolerance,
            final_residual_is_true: self.final_residual_is_true,
            matvecs: self.matvecs,
            reductions: self.reductions,
        }
    }
}

fn numeric(message: String) -> CudaError {
    CudaError::Merge(MergeError::Numeric {
        tensor: LINALG_TENSOR.to_string(),
        message,
    })
}

fn blas_err(what: &str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> CudaError + '_ {
    move |e| CudaError::Blas {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// The options' checks, as the CPU solver's (`chunk` is not used on the device).
fn check_options(opts: &CgOptions) -> Result<()> {
    for (key, v) in [("rtol", opts.rtol), ("atol", opts.atol)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(CudaError::Merge(MergeError::BadParameter {
                key: key.into(),
                message: format!("must be a finite nonnegative number, got {v}"),
            }));
        }
    }
    Ok(())
}

/// The lengths' checks of [`solve`].
fn check_lengths(a: usize, n: usize, b: usize, m: usize, x0: Option<usize>) -> Result<()> {
    let nn = n.checked_mul(n);
    let nm = n.checked_mul(m);
    if nn != Some(a) {
        return Err(CudaError::Invalid(format!(
            "cg: A has {a} values, expected n·n with n = {n}"
        )));
    }
    if nm != Some(b) {
        return Err(CudaError::Invalid(format!(
            "cg: b has {b} values, expected m·n = {m}·{n}"
        )));
    }
    if let Some(x0) = x0 {
        if x0 != b {
            return Err(CudaError::Invalid(format!(
                "cg: x0 has {x0} values, expected m·n = {m}·{n}"
            )));
        }
    }
    Ok(())
}

/// The dimensions' checks of [`CgSolver::new`] (cuBLAS takes 32-bit sizes; one block per chunk).
fn check_dims(n: usize, m: usize) -> Result<usize> {
    let max = i32::MAX as usize;
    if n == 0 || m == 0 || n > max || m > max {
        return Err(CudaError::Invalid(format!(
            "cg: dimensions n = {n}, m = {m} must be between 1 and {max}"
        )));
    }
    let len = n
        .checked_mul(m)
        .filter(|l| l.div_ceil(CHUNK) <= max)
        .ok_or_else(|| CudaError::Invalid(format!("cg: m·n = {m}·{n} is too large")))?;
    Ok(len)
}

/// Products with `A` and reductions the CPU solver makes for a solve that ended as given
/// (`x0_given`: an `x0` was passed; `x0_nonzero`: it had a nonzero entry).
fn cpu_counts(
    x0_given: bool,
    x0_nonzero: bool,
    stop: CgStop,
    iterations: usize,
    opts: &CgOptions,
) -> (usize, usize) {
    let (loop_mv, loop_red, known) = match stop {
        CgStop::ZeroRhs => (0, 0, false),
        CgStop::Converged => (iterations, 2 * iterations, true),
        CgStop::Breakdown => (iterations + 1, 2 * iterations + 1, true),
        CgStop::MaxIter => (
            opts.maxiter,
            (2 * opts.maxiter).saturating_sub(1),
            opts.maxiter == 0,
        ),
    };
    let final_red = usize::from(opts.true_final_residual || !known);
    let matvecs = usize::from(x0_nonzero) + loop_mv + usize::from(opts.true_final_residual);
    let reductions = 2 + usize::from(x0_given) + loop_red + final_red;
    (matvecs, reductions)
}

/// The report of an empty system (`m·n = 0`), as the CPU solver's.
fn empty_report(opts: &CgOptions, x0_given: bool) -> CgReport {
    let (matvecs, reductions) = cpu_counts(x0_given, false, CgStop::ZeroRhs, 0, opts);
    CgReport {
        exit_code: 0,
        iterations: 0,
        initial_residual: 0.0,
        final_residual: 0.0,
        converged: true,
        stop: CgStop::ZeroRhs,
        rhs_norm: 0.0,
        tolerance: opts.atol.max(0.0),
        final_residual_is_true: opts.true_final_residual,
        matvecs,
        reductions,
    }
}

/// `y = x·A` (`x`, `y`: `m × n` row-major; `A`: `n × n` row-major) as one column-major DGEMM:
/// the memory of row-major `x` is column-major `xᵀ` (`n × m`), that of `A` is `Aᵀ`, and
/// `Aᵀ·xᵀ = (x·A)ᵀ` is row-major `x·A`.
fn gemm(
    blas: &CudaBlas,
    n: usize,
    m: usize,
    a: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    y: &mut CudaSlice<f64>,
) -> Result<()> {
    // n, m <= i32::MAX (check_dims) and the lengths were checked by the callers.
    let (ni, mi) = (n as i32, m as i32);
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: ni,
        n: mi,
        k: ni,
        alpha: 1.0f64,
        lda: ni,
        ldb: ni,
        beta: 0.0f64,
        ldc: ni,
    };
    // SAFETY: `a` holds n·n values, `x` and `y` m·n (checked by the callers), matching the
    // sizes and leading dimensions of `cfg`; `y` is not `a` or `x` (distinct borrows).
    unsafe { blas.gemm(cfg, a, x, y) }.map_err(blas_err("cg: DGEMM x·A"))
}

/// Row-major `y = p·q + beta·y` (`p` `r × k`, `q` `k × c`, `y` `r × c`) as one column-major
/// DGEMM: `yᵀ = qᵀ·pᵀ`, the memory of each row-major matrix being its transpose's.
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    blas: &CudaBlas,
    (r, k, c): (usize, usize, usize),
    p: &CudaSlice<f64>,
    q: &CudaSlice<f64>,
    beta: f64,
    y: &mut CudaSlice<f64>,
) -> Result<()> {
    let dim = |v: usize| {
        i32::try_from(v)
            .map_err(|_| CudaError::Invalid(format!("cg: dimension {v} is over i32::MAX")))
    };
    let (ri, ki, ci) = (dim(r)?, dim(k)?, dim(c)?);
    if p.len() != r * k || q.len() != k * c || y.len() != r * c {
        return Err(CudaError::Invalid(format!(
            "cg: a {r}x{k} by {k}x{c} product over {}, {} and {} values",
            p.len(),
            q.len(),
            y.len()
        )));
    }
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: ci,
        n: ri,
        k: ki,
        alpha: 1.0f64,
        lda: ci,
        ldb: ki,
        beta,
        ldc: ci,
    };
    // SAFETY: the lengths were checked against the sizes and leading dimensions of `cfg`; `y`
    // is neither `p` nor `q` (distinct borrows).
    unsafe { blas.gemm(cfg, q, p, y) }.map_err(blas_err("cg: DGEMM"))
}

/// The operator of a device solve, on the device ([`CgSolver::solve`]). The solver's unknown
/// is `m × n`: a part's rows of a split system.
pub enum DeviceOp<'a> {
    /// `X ↦ X·A`, `A` `n × n` row-major (the solver's `n`).
    Gram(&'a CudaSlice<f64>),
    /// `x ↦ f ⊙ x`, one value per element.
    Diagonal(&'a CudaSlice<f64>),
    /// `x ↦ F·x` for a vector of `d` (the solver's unknown: `m` of its elements, `n = 1`): `f`
    /// holds the unknown's `m` rows of `F` (`m × d`).
    Dense {
        /// The rows of `F`.
        f: &'a CudaSlice<f64>,
        /// The vector's length.
        d: usize,
        /// The whole vector, gathered from the parts (`None`: not split).
        gather: Option<Gather>,
    },
    /// `X ↦ Σ_i S_i·X·A_i` for an `out × n` unknown (the solver's: `m` of its rows), summed in
    /// model order: `s` holds the unknown's rows of each `S_i` (`m × out`), `a` the `A_i`
    /// (`n × n`), `t` is `m × n` scratch.
    Kfac {
        /// The input factors `A_i`.
        a: &'a [CudaSlice<f64>],
        /// The rows of the output factors `S_i`.
        s: &'a [CudaSlice<f64>],
        /// Rows of the whole unknown.
        out: usize,
        /// Scratch for `S_i·X`.
        t: CudaSlice<f64>,
        /// The whole direction, gathered from the parts (`None`: not split).
        gather: Option<Gather>,
    },
}

/// The whole direction of a split system, gathered from its parts before each product of an
/// operator that needs it (K-FAC, dense): each part writes its elements into `mine` (zero
/// elsewhere), and the exchange sums the parts' `mine` into `all`.
pub struct Gather {
    start: usize,
    mine: CudaSlice<f64>,
    all: CudaSlice<f64>,
}

impl Gather {
    /// Buffers for a part starting at element `slots.start` of `slots.elements`.
    pub fn new(gpu: &Gpu, slots: &Slots) -> Result<Self> {
        let what = "cg: allocating the gathered direction";
        Ok(Gather {
            start: slots.start,
            mine: gpu.stream.alloc_zeros(slots.elements).ctx(what)?,
            all: gpu.stream.alloc_zeros(slots.elements).ctx(what)?,
        })
    }

    /// The whole direction from this part's `x`, through `ex`.
    fn whole(
        &mut self,
        gpu: &Gpu,
        x: &CudaSlice<f64>,
        ex: &mut Exchange<'_>,
    ) -> Result<&CudaSlice<f64>> {
        let end = self.start + x.len();
        if end > self.mine.len() {
            return Err(CudaError::Invalid(format!(
                "cg: a part of {} elements at {} of {}",
                x.len(),
                self.start,
                self.mine.len()
            )));
        }
        gpu.stream
            .memcpy_dtod(x, &mut self.mine.slice_mut(self.start..end))
            .ctx("cg: placing the part's direction")?;
        exchange(gpu, ex, &self.mine, &mut self.all)?;
        Ok(&self.all)
    }
}

/// `all` = the parts' element-wise sum of `mine` through `ex` (through the host, or an NCCL
/// all-reduce); an error for [`Exchange::Whole`], which has no other parts.
fn exchange(
    gpu: &Gpu,
    ex: &mut Exchange<'_>,
    mine: &CudaSlice<f64>,
    all: &mut CudaSlice<f64>,
) -> Result<()> {
    match ex {
        Exchange::Whole => Err(CudaError::Invalid(
            "cg: an exchange in a solve that is not split".into(),
        )),
        Exchange::Host(f) => {
            let mut host = vec![0.0f64; mine.len()];
            gpu.stream
                .memcpy_dtoh(mine, &mut host)
                .ctx("cg: reading a vector to reduce")?;
            gpu.sync()?;
            let sum = f(&host).map_err(CudaError::Merge)?;
            if sum.len() != host.len() {
                return Err(CudaError::Invalid(format!(
                    "cg: the reduction returned {} values, expected {}",
                    sum.len(),
                    host.len()
                )));
            }
            gpu.stream
                .memcpy_htod(&sum, all)
                .ctx("cg: writing the reduced vector")
        }
        Exchange::Nccl(group) => group.all_reduce_sum(mine, all),
    }
}

/// `y = op(x)` for an unknown of `m × n` (gathering the direction through `ex` when the
/// operator needs the whole of it).
fn apply(
    gpu: &Gpu,
    blas: &CudaBlas,
    op: &mut DeviceOp<'_>,
    (n, m): (usize, usize),
    x: &CudaSlice<f64>,
    y: &mut CudaSlice<f64>,
    ex: &mut Exchange<'_>,
) -> Result<()> {
    match op {
        DeviceOp::Gram(a) => gemm(blas, n, m, a, x, y),
        DeviceOp::Diagonal(f) => {
            // The lengths were checked once per solve (`CgSolver::check_op`).
            let len = (n * m) as u64;
            let mut l = gpu.stream.launch_builder(gpu.function("cg_diag"));
            l.arg(&**f).arg(x).arg(&mut *y).arg(&len);
            // SAFETY: cg_diag(const double*, const double*, double*, u64): all hold `len`
            // values; grid-stride.
            unsafe { l.launch(gpu.grid(len)) }.ctx("launching cg_diag")?;
            Ok(())
        }
        DeviceOp::Dense { f, d, gather } => {
            let p = match gather {
                Some(g) => g.whole(gpu, x, ex)?,
                None => x,
            };
            gemm_rm(blas, (n * m, *d, 1), f, p, 0.0, y)
        }
        DeviceOp::Kfac {
            a,
            s,
            out,
            t,
            gather,
        } => {
            let p = match gather {
                Some(g) => g.whole(gpu, x, ex)?,
                None => x,
            };
            for (i, (ai, si)) in a.iter().zip(s.iter()).enumerate() {
                gemm_rm(blas, (m, *out, n), si, p, 0.0, t)?;
                let beta = if i == 0 { 0.0 } else { 1.0 };
                gemm_rm(blas, (m, n, n), t, ai, beta, y)?;
            }
            Ok(())
        }
    }
}

/// One block of [`THREADS`] threads per chunk (`chunks` <= i32::MAX: `check_dims`).
fn chunk_config(chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `partials` = per-chunk sums of `u ⊙ v` over `len` elements.
fn launch_dot(
    gpu: &Gpu,
    chunks: usize,
    len: usize,
    u: &CudaSlice<f64>,
    v: &CudaSlice<f64>,
    partials: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    let n = len as u64;
    let mut l = gpu.stream.launch_builder(gpu.function("cg_dot"));
    l.arg(u).arg(v).arg(&n).arg(partials);
    // SAFETY: cg_dot(const double*, const double*, u64, double*): `u`, `v` hold `len` values,
    // `partials` one per chunk (`chunks` = ceil(len / CHUNK)), one block per chunk.
    unsafe { l.launch(chunk_config(chunks)) }.ctx("launching cg_dot")?;
    Ok(())
}

/// `y = b − y` over `len` elements.
fn launch_residual(
    gpu: &Gpu,
    len: usize,
    b: &CudaSlice<f64>,
    y: &mut CudaSlice<f64>,
) -> Result<()> {
    let n = len as u64;
    let mut l = gpu.stream.launch_builder(gpu.function("cg_residual"));
    l.arg(b).arg(y).arg(&n);
    // SAFETY: cg_residual(const double*, double*, u64): both hold `len` values; grid-stride.
    unsafe { l.launch(gpu.grid(n)) }.ctx("launching cg_residual")?;
    Ok(())
}

/// Device buffers and the cuBLAS handle for CG solves of one shape (`A`: `n × n`, unknown
/// `m × n`), reusable across solves: a benchmark or a merge calls [`CgSolver::solve`] on device
/// data without host copies.
pub struct CgSolver {
    n: usize,
    m: usize,
    len: usize,
    chunks: usize,
    slots: Slots,
    blas: CudaBlas,
    r: CudaSlice<f64>,
    p: CudaSlice<f64>,
    q: CudaSlice<f64>,
    /// Every part's partials: this part's at `slots.offset`, zeros elsewhere.
    partials: CudaSlice<f64>,
    /// The partials summed over the parts (a split solve's exchange).
    all: CudaSlice<f64>,
    state: CudaSlice<f64>,
    snaps: [CudaSlice<f64>; 2],
}

/// Where a part's inner-product partials sit among all parts' of a split solve: one slot per
/// [`CHUNK`]-element chunk of each part, parts in order. When every part but the last is a
/// multiple of [`CHUNK`] long, the slots are those of the unsplit system, so the sums (one
/// fixed tree over all slots) are the unsplit solve's bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// This part's first slot.
    pub offset: usize,
    /// Slots of all parts together.
    pub total: usize,
    /// This part's first element in the whole unknown.
    pub start: usize,
    /// Elements of all parts together.
    pub elements: usize,
}

impl Slots {
    /// The slots of an unsplit system of `len` elements.
    pub fn whole(len: usize) -> Self {
        Slots {
            offset: 0,
            total: len.div_ceil(CHUNK),
            start: 0,
            elements: len,
        }
    }

    /// The slots of part `part` among parts of `lens` elements each.
    pub fn of(lens: &[usize], part: usize) -> Result<Self> {
        if part >= lens.len() {
            return Err(CudaError::Invalid(format!(
                "cg: part {part} of a system split into {} parts",
                lens.len()
            )));
        }
        let count = |l: &[usize]| l.iter().map(|n| n.div_ceil(CHUNK)).sum::<usize>();
        Ok(Slots {
            offset: count(&lens[..part]),
            total: count(lens),
            start: lens[..part].iter().sum(),
            elements: lens.iter().sum(),
        })
    }
}

/// How a split solve's partials meet the other parts' before each sum
/// ([`CgSolver::solve`]). Each exchange returns the element-wise sum over the parts of their
/// slot vectors (each zero outside its own slots), so every part sums the same values.
pub enum Exchange<'a> {
    /// Not split: the partials are all the sum's.
    Whole,
    /// Through the host: the function returns the element-wise sum over all parts of equally
    /// long vectors (the cluster's `Reduce` RPC); one call per sum, a device-to-host copy
    /// and a wait before it.
    Host(&'a mut dyn FnMut(&[f64]) -> amalgam_core::error::Result<Vec<f64>>),
    /// An NCCL all-reduce on the device (no host round trip).
    Nccl(&'a crate::nccl::Group),
}

impl CgSolver {
    /// Allocate the work vectors (`r`, `p`, `q`: three `m·n` f64 vectors) and a cuBLAS handle
    /// on `gpu.stream`. An error when a dimension is 0 or over `i32::MAX`, or when the cuBLAS
    /// library cannot be found.
    pub fn new(gpu: &Gpu, n: usize, m: usize) -> Result<Self> {
        let len = check_dims(n, m)?;
        Self::new_part(gpu, n, m, Slots::whole(len))
    }

    /// As [`CgSolver::new`], for one part (`m` rows) of a split system whose partials sit at
    /// `slots` ([`Slots::of`]).
    pub fn new_part(gpu: &Gpu, n: usize, m: usize, slots: Slots) -> Result<Self> {
        let len = check_dims(n, m)?;
        let chunks = len.div_ceil(CHUNK);
        if slots.offset + chunks > slots.total {
            return Err(CudaError::Invalid(format!(
                "cg: a part of {chunks} chunks at slot {} of {}",
                slots.offset, slots.total
            )));
        }
        // SAFETY: only tries to open the shared library by its candidate names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "the cuBLAS library (libcublas.so) was not found; install the CUDA toolkit or \
                 the `nvidia-cublas` wheel and add its lib folder to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(gpu.stream.clone()).map_err(blas_err("cg: creating a handle"))?;
        let s = &gpu.stream;
        let what = "cg: allocating the work vectors";
        Ok(Self {
            n,
            m,
            len,
            chunks,
            slots,
            blas,
            r: s.alloc_zeros(len).ctx(what)?,
            p: s.alloc_zeros(len).ctx(what)?,
            q: s.alloc_zeros(len).ctx(what)?,
            partials: s.alloc_zeros(slots.total).ctx(what)?,
            all: s.alloc_zeros(slots.total).ctx(what)?,
            state: s.alloc_zeros(STATE_LEN).ctx(what)?,
            snaps: [
                s.alloc_zeros(STATE_LEN).ctx(what)?,
                s.alloc_zeros(STATE_LEN).ctx(what)?,
            ],
        })
    }

    /// `y = x·A` on `gpu.stream` (one DGEMM of the solve's shape; for benchmarks).
    pub fn matvec(
        &self,
        a: &CudaSlice<f64>,
        x: &CudaSlice<f64>,
        y: &mut CudaSlice<f64>,
    ) -> Result<()> {
        self.check_len("A", a, self.n * self.n)?;
        self.check_len("x", x, self.len)?;
        self.check_len("y", y, self.len)?;
        gemm(&self.blas, self.n, self.m, a, x, y)
    }

    /// The operator's lengths against the solver's shape.
    fn check_op(&self, op: &DeviceOp<'_>) -> Result<()> {
        match op {
            DeviceOp::Gram(a) => self.check_len("A", a, self.n * self.n),
            DeviceOp::Diagonal(f) => self.check_len("f", f, self.len),
            DeviceOp::Dense { f, d, .. } => self.check_len("F rows", f, self.len * d),
            DeviceOp::Kfac { a, s, out, t, .. } => {
                if a.len() != s.len() || a.is_empty() {
                    return Err(CudaError::Invalid(format!(
                        "cg: K-FAC with {} input and {} output factors",
                        a.len(),
                        s.len()
                    )));
                }
                for ai in a.iter() {
                    self.check_len("A_i", ai, self.n * self.n)?;
                }
                for si in s.iter() {
                    self.check_len("S_i rows", si, self.m * out)?;
                }
                self.check_len("scratch", t, self.len)
            }
        }
    }

    fn check_len(&self, what: &str, v: &CudaSlice<f64>, want: usize) -> Result<()> {
        if v.len() != want {
            return Err(CudaError::Invalid(format!(
                "cg: device {what} has {} values, expected {want} (n = {}, m = {})",
                v.len(),
                self.n,
                self.m
            )));
        }
        Ok(())
    }

    /// This part's slots in `partials`.
    fn own(&self) -> std::ops::Range<usize> {
        self.slots.offset..self.slots.offset + self.chunks
    }

    /// This part's partials = per-chunk sums of `u ⊙ v` (`u`, `v` are `len` long, not work
    /// vectors).
    fn dot(&mut self, gpu: &Gpu, u: &CudaSlice<f64>, v: &CudaSlice<f64>) -> Result<()> {
        let own = self.own();
        launch_dot(
            gpu,
            self.chunks,
            self.len,
            u,
            v,
            &mut self.partials.slice_mut(own),
        )
    }

    /// `r·r` partials (`r` is a work vector).
    fn dot_rr(&mut self, gpu: &Gpu) -> Result<()> {
        let own = self.own();
        let mut out = self.partials.slice_mut(own);
        launch_dot(gpu, self.chunks, self.len, &self.r, &self.r, &mut out)
    }

    /// `p·q` partials.
    fn dot_pq(&mut self, gpu: &Gpu) -> Result<()> {
        let own = self.own();
        let mut out = self.partials.slice_mut(own);
        launch_dot(gpu, self.chunks, self.len, &self.p, &self.q, &mut out)
    }

    /// `q·q` partials.
    fn dot_qq(&mut self, gpu: &Gpu) -> Result<()> {
        let own = self.own();
        let mut out = self.partials.slice_mut(own);
        launch_dot(gpu, self.chunks, self.len, &self.q, &self.q, &mut out)
    }

    /// Nonzero-count partials of `x`.
    fn nnz(&mut self, gpu: &Gpu, x: &CudaSlice<f64>) -> Result<()> {
        let cfg = chunk_config(self.chunks);
        let n = self.len as u64;
        let own = self.own();
        let mut out = self.partials.slice_mut(own);
        let mut l = gpu.stream.launch_builder(gpu.function("cg_nnz"));
        l.arg(x).arg(&n).arg(&mut out);
        // SAFETY: cg_nnz(const double*, u64, double*): `x` holds `len` values, `partials` one
        // per chunk, one block per chunk.
        unsafe { l.launch(cfg) }.ctx("launching cg_nnz")?;
        Ok(())
    }

    /// Meet the other parts' partials through `ex`, add all parts' partials and apply `op` to
    /// the state (see `cg_reduce` in `cg.cu`).
    fn reduce(&mut self, gpu: &Gpu, ex: &mut Exchange<'_>, op: i32, arg: i32) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let np = self.slots.total as u64;
        let sums = if matches!(ex, Exchange::Whole) {
            &self.partials
        } else {
            exchange(gpu, ex, &self.partials, &mut self.all)?;
            &self.all
        };
        let mut l = gpu.stream.launch_builder(gpu.function("cg_reduce"));
        l.arg(sums).arg(&np).arg(&mut self.state).arg(&op).arg(&arg);
        // SAFETY: cg_reduce(const double*, u64, double*, int, int): `partials` holds `np`
        // values, `state` STATE_LEN; a store's `arg` is a slot below STATE_LEN.
        unsafe { l.launch(cfg) }.ctx("launching cg_reduce")?;
        Ok(())
    }

    /// `p = r` (first) or `p = β p + r`.
    fn direction(&mut self, gpu: &Gpu, first: bool) -> Result<()> {
        let cfg = gpu.grid(self.len as u64);
        let n = self.len as u64;
        let first = i32::from(first);
        let mut l = gpu.stream.launch_builder(gpu.function("cg_direction"));
        l.arg(&mut self.p)
            .arg(&self.r)
            .arg(&n)
            .arg(&self.state)
            .arg(&first);
        // SAFETY: cg_direction(double*, const double*, u64, const double*, int): `p`, `r` hold
        // `len` values, `state` STATE_LEN; grid-stride.
        unsafe { l.launch(cfg) }.ctx("launching cg_direction")?;
        Ok(())
    }

    /// `x += α p; r −= α q`, and the new `r·r` partials.
    fn update(&mut self, gpu: &Gpu, x: &mut CudaSlice<f64>) -> Result<()> {
        let cfg = chunk_config(self.chunks);
        let n = self.len as u64;
        let own = self.own();
        let mut out = self.partials.slice_mut(own);
        let mut l = gpu.stream.launch_builder(gpu.function("cg_update"));
        l.arg(x)
            .arg(&mut self.r)
            .arg(&self.p)
            .arg(&self.q)
            .arg(&n)
            .arg(&self.state)
            .arg(&mut out);
        // SAFETY: cg_update(double*, double*, const double*, const double*, u64, const double*,
        // double*): the vectors hold `len` values, `state` STATE_LEN, `partials` one per chunk,
        // one block per chunk.
        unsafe { l.launch(cfg) }.ctx("launching cg_update")?;
        Ok(())
    }

    /// The state array, after everything enqueued on `gpu.stream`.
    fn read_state(&self, gpu: &Gpu) -> Result<[f64; STATE_LEN]> {
        let mut out = [0.0f64; STATE_LEN];
        gpu.stream
            .memcpy_dtoh(&self.state, &mut out)
            .ctx("cg: reading the state")?;
        gpu.sync()?;
        Ok(out)
    }

    /// The sum of the partials now enqueued, through `state[S_AUX]`.
    fn read_sum(&mut self, gpu: &Gpu, ex: &mut Exchange<'_>) -> Result<f64> {
        self.reduce(gpu, ex, OP_STORE, S_AUX as i32)?;
        Ok(self.read_state(gpu)?[S_AUX])
    }

    /// Solve `X·A = B` on the device (see the module docs) from `x`'s values when `x0_given`,
    /// else from zeros; `x` receives the solution. `a` is `n × n`, `b` and `x` are `m × n`,
    /// all row-major on `gpu.stream`'s device. Work is on `gpu.stream` (and a status read on
    /// `gpu.copy`); when this returns, everything it enqueued has completed.
    ///
    /// For one part of a split system (a solver from [`CgSolver::new_part`]), `b` and `x` are
    /// the part's rows and `ex` meets the other parts before each sum; every part makes the
    /// same exchanges in the same order, and the report's residuals are global. An unsplit
    /// solve passes [`Exchange::Whole`].
    #[allow(clippy::too_many_arguments)]
    pub fn solve(
        &mut self,
        gpu: &Gpu,
        op: &mut DeviceOp<'_>,
        b: &CudaSlice<f64>,
        x: &mut CudaSlice<f64>,
        x0_given: bool,
        opts: &CgOptions,
        ex: &mut Exchange<'_>,
    ) -> Result<CgReport> {
        check_options(opts)?;
        self.check_op(op)?;
        self.check_len("b", b, self.len)?;
        self.check_len("x", x, self.len)?;
        let (n, m) = (self.n, self.m);

        // ‖b‖ and the tolerance.
        self.dot(gpu, b, b)?;
        let bb = self.read_sum(gpu, ex)?;
        if !bb.is_finite() {
            return Err(numeric(format!("cg: b·b is {bb}")));
        }
        let bnrm = bb.sqrt();
        let tol = opts.atol.max(opts.rtol * bnrm);

        // x0, and r = b − A x0 (r = b when x0 is all zeros, as SciPy).
        let x0_nonzero = if x0_given {
            self.nnz(gpu, x)?;
            self.read_sum(gpu, ex)? > 0.0
        } else {
            gpu.stream
                .memset_zeros(x)
                .ctx("cg: zeroing the initial x")?;
            false
        };
        if x0_nonzero {
            apply(gpu, &self.blas, op, (n, m), x, &mut self.r, ex)?;
            launch_residual(gpu, self.len, b, &mut self.r)?;
        } else {
            gpu.stream
                .memcpy_dtod(b, &mut self.r)
                .ctx("cg: copying b into r")?;
        }
        self.dot_rr(gpu)?;
        self.reduce(gpu, ex, OP_STORE, S_RHO as i32)?;
        let rho0 = self.read_state(gpu)?[S_RHO];
        if !rho0.is_finite() {
            return Err(numeric(format!("cg: initial r·r is {rho0}")));
        }
        let initial_residual = rho0.sqrt();

        let report = |stop: CgStop, exit_code: i64, iterations: usize, final_rr: f64| {
            let (matvecs, reductions) = cpu_counts(x0_given, x0_nonzero, stop, iterations, opts);
            CgReport {
                exit_code,
                iterations,
                initial_residual,
                final_residual: final_rr.sqrt(),
                converged: matches!(stop, CgStop::Converged | CgStop::ZeroRhs),
                stop,
                rhs_norm: bnrm,
                tolerance: tol,
                final_residual_is_true: opts.true_final_residual,
                matvecs,
                reductions,
            }
        };

        if bnrm == 0.0 {
            if opts.zero_rhs == ZeroRhs::ScipyZero {
                gpu.stream.memcpy_dtod(b, x).ctx("cg: copying b into x")?;
            }
            let rr = self.final_rr(gpu, op, b, x, opts, None, ex)?;
            return Ok(report(CgStop::ZeroRhs, 0, 0, rr));
        }

        // The device state: ρ, ρ_prev, p·Ap, α, tol, status, iteration, aux.
        let mut init = [0.0f64; STATE_LEN];
        init[S_RHO] = rho0;
        init[S_TOL] = tol;
        init[S_STATUS] = RUNNING;
        gpu.stream
            .memcpy_htod(&init, &mut self.state)
            .ctx("cg: writing the state")?;

        let iter_arg = |it: usize| {
            i32::try_from(it).map_err(|_| {
                CudaError::Invalid(format!("cg: maxiter {} is over i32::MAX", opts.maxiter))
            })
        };
        for it in 0..opts.maxiter {
            let k = iter_arg(it)?;
            // ρ = r·r (partials made by the previous update, or above for it = 0) and the test.
            self.reduce(gpu, ex, OP_RHO, k)?;
            self.direction(gpu, it == 0)?;
            apply(gpu, &self.blas, op, (n, m), &self.p, &mut self.q, ex)?;
            self.dot_pq(gpu)?;
            self.reduce(gpu, ex, OP_PQ, k)?;
            self.update(gpu, x)?;
            gpu.stream
                .memcpy_dtod(&self.state, &mut self.snaps[it % 2])
                .ctx("cg: snapshot of the state")?;
            if it > 0 {
                // The previous iteration's status, read while this one runs.
                let mut snap = [0.0f64; STATE_LEN];
                gpu.copy
                    .memcpy_dtoh(&self.snaps[(it - 1) % 2], &mut snap)
                    .ctx("cg: reading the status")?;
                gpu.copy.synchronize().ctx("cg: reading the status")?;
                if snap[S_STATUS] != RUNNING {
                    break;
                }
            }
        }
        let st = self.read_state(gpu)?;
        let at = st[S_ITER] as usize;
        let status = st[S_STATUS];
        let (stop, exit_code, iterations, known) = if status == RUNNING {
            let code = i64::try_from(opts.maxiter).unwrap_or(i64::MAX);
            let known = (opts.maxiter == 0).then_some(rho0);
            (CgStop::MaxIter, code, opts.maxiter, known)
        } else if status == CONVERGED {
            (CgStop::Converged, 0, at, Some(st[S_RHO]))
        } else if status == BREAKDOWN {
            (CgStop::Breakdown, BREAKDOWN_EXIT_CODE, at, Some(st[S_RHO]))
        } else if status == BAD_RHO {
            let rho = st[S_RHO];
            return Err(numeric(format!("cg: r·r is {rho} at iteration {at}")));
        } else if status == BAD_PQ {
            let pq = st[S_PQ];
            return Err(numeric(format!("cg: p·Ap is {pq} at iteration {at}")));
        } else {
            return Err(CudaError::Invalid(format!(
                "cg: unexpected device status {status}"
            )));
        };
        let rr = self.final_rr(gpu, op, b, x, opts, known, ex)?;
        Ok(report(stop, exit_code, iterations, rr))
    }

    /// The final `‖·‖²`: of `b − A x` when asked for, else `known` or `r·r`.
    #[allow(clippy::too_many_arguments)]
    fn final_rr(
        &mut self,
        gpu: &Gpu,
        op: &mut DeviceOp<'_>,
        b: &CudaSlice<f64>,
        x: &CudaSlice<f64>,
        opts: &CgOptions,
        known: Option<f64>,
        ex: &mut Exchange<'_>,
    ) -> Result<f64> {
        if opts.true_final_residual {
            apply(gpu, &self.blas, op, (self.n, self.m), x, &mut self.q, ex)?;
            launch_residual(gpu, self.len, b, &mut self.q)?;
            self.dot_qq(gpu)?;
            self.read_sum(gpu, ex)
        } else if let Some(v) = known {
            Ok(v)
        } else {
            self.dot_rr(gpu)?;
            self.read_sum(gpu, ex)
        }
    }
}

/// Solve `X·A = B` by conjugate gradient on the device from host data: `a` is `n × n`, `b`
/// and `x0` (`None`: zeros) are `m × n`, all row-major f64 (see the module docs for the
/// layout, the iteration and how it matches [`amalgam_core::solve::cg::cg`]). Returns the
/// solution (`m × n`) and the solve's report. Errors: wrong lengths or options, a non-finite
/// inner product (as the CPU solver: [`MergeError::Numeric`] naming [`LINALG_TENSOR`]), CUDA
/// or cuBLAS failures.
pub fn solve(
    gpu: &Gpu,
    a: &[f64],
    n: usize,
    b: &[f64],
    m: usize,
    x0: Option<&[f64]>,
    opts: &CgOptions,
) -> Result<(Vec<f64>, CgReport)> {
    check_lengths(a.len(), n, b.len(), m, x0.map(<[f64]>::len))?;
    let sys = DeviceSystem::Gram {
        a: std::borrow::Cow::Borrowed(a),
        n,
    };
    solve_system(gpu, &sys, b, x0, opts, None, &mut Exchange::Whole)
}

/// The solver's shape `(n, m)` (`m` rows of `n`) for `sys` and a right-hand side of `len`
/// values (a part's, at `slots`, or the whole system's), after checking the operator's lengths.
fn system_shape(
    sys: &DeviceSystem<'_>,
    len: usize,
    slots: Option<&Slots>,
) -> Result<(usize, usize)> {
    let bad = |what: String| Err(CudaError::Invalid(format!("cg: {what}")));
    // The part's first element and the whole unknown's length.
    let (start, whole) = slots.map_or((0, len), |s| (s.start, s.elements));
    if start + len > whole {
        return bad(format!("a part of {len} at {start} of {whole} elements"));
    }
    match sys {
        DeviceSystem::Gram { a, n } => {
            if *n == 0 || Some(a.len()) != n.checked_mul(*n) || !len.is_multiple_of(*n) {
                return bad(format!(
                    "A has {} values and b {len}, expected n·n and m·n with n = {n}",
                    a.len()
                ));
            }
            Ok((*n, len / n))
        }
        DeviceSystem::Diagonal { f } => {
            if f.len() != len {
                return bad(format!("a diagonal of {} values for b of {len}", f.len()));
            }
            Ok((len, 1))
        }
        DeviceSystem::Dense { f, d } => {
            if Some(f.len()) != d.checked_mul(*d) || whole != *d {
                return bad(format!(
                    "a dense {d}x{d} matrix of {} values for a vector of {whole}",
                    f.len()
                ));
            }
            Ok((1, len))
        }
        DeviceSystem::Kfac { a, s, out, d } => {
            let ok = a.len() == s.len()
                && !a.is_empty()
                && *d > 0
                && a.iter().all(|v| v.len() == d * d)
                && s.iter().all(|v| v.len() == out * out)
                && whole == out * d
                && start.is_multiple_of(*d)
                && len.is_multiple_of(*d);
            if !ok {
                return bad(format!(
                    "K-FAC factors ({} inputs, {} outputs) do not fit {len} values at {start} of \
                     a {out}x{d} unknown",
                    a.len(),
                    s.len()
                ));
            }
            Ok((*d, len / d))
        }
    }
}

/// Solve `sys` (a MaTS system, [`DeviceSystem`]) by CG on the device from host data: `b` and
/// `x0` (`None`: zeros) in the unknown's layout; for one part of a split system, its rows,
/// its `slots` ([`Slots::of`]) and `ex` meeting the other parts before each sum (the products
/// of K-FAC and dense systems gather the whole direction through `ex` too; every part calls
/// this with the same system and options). Returns the solution and the solve's report.
pub fn solve_system(
    gpu: &Gpu,
    sys: &DeviceSystem<'_>,
    b: &[f64],
    x0: Option<&[f64]>,
    opts: &CgOptions,
    slots: Option<Slots>,
    ex: &mut Exchange<'_>,
) -> Result<(Vec<f64>, CgReport)> {
    check_options(opts)?;
    if let Some(x0) = x0 {
        if x0.len() != b.len() {
            return Err(CudaError::Invalid(format!(
                "cg: x0 has {} values, b {}",
                x0.len(),
                b.len()
            )));
        }
    }
    if b.is_empty() {
        if slots.is_some() {
            return Err(CudaError::Invalid(
                "cg: an empty part of a split system".into(),
            ));
        }
        return Ok((Vec::new(), empty_report(opts, x0.is_some())));
    }
    let (n, m) = system_shape(sys, b.len(), slots.as_ref())?;
    let mut solver = match slots {
        Some(slots) => CgSolver::new_part(gpu, n, m, slots)?,
        None => CgSolver::new(gpu, n, m)?,
    };
    let s = &gpu.stream;
    let what = "cg: copying the system to the device";
    let up = |v: &[f64]| s.clone_htod(v).ctx(what);
    let gather = || slots.as_ref().map(|sl| Gather::new(gpu, sl)).transpose();
    let start = slots.map_or(0, |sl| sl.start);
    let b_d = up(b)?;
    let mut x_d = match x0 {
        Some(x0) => up(x0)?,
        None => s.alloc_zeros(b.len()).ctx(what)?,
    };
    let report = match sys {
        DeviceSystem::Gram { a, .. } => {
            let a_d = up(a)?;
            let mut op = DeviceOp::Gram(&a_d);
            solver.solve(gpu, &mut op, &b_d, &mut x_d, x0.is_some(), opts, ex)?
        }
        DeviceSystem::Diagonal { f } => {
            let f_d = up(f)?;
            let mut op = DeviceOp::Diagonal(&f_d);
            solver.solve(gpu, &mut op, &b_d, &mut x_d, x0.is_some(), opts, ex)?
        }
        DeviceSystem::Dense { f, d } => {
            // The part's rows of F.
            let f_d = up(&f[start * d..(start + b.len()) * d])?;
            let mut op = DeviceOp::Dense {
                f: &f_d,
                d: *d,
                gather: gather()?,
            };
            solver.solve(gpu, &mut op, &b_d, &mut x_d, x0.is_some(), opts, ex)?
        }
        DeviceSystem::Kfac {
            a, s: outs, out, d, ..
        } => {
            // The part's rows of each S_i.
            let (r0, r1) = (start / d, (start + b.len()) / d);
            let a_d = a.iter().map(|v| up(v)).collect::<Result<Vec<_>>>()?;
            let s_d = outs
                .iter()
                .map(|v| up(&v[r0 * out..r1 * out]))
                .collect::<Result<Vec<_>>>()?;
            let t = s.alloc_zeros(b.len()).ctx(what)?;
            let mut op = DeviceOp::Kfac {
                a: &a_d,
                s: &s_d,
                out: *out,
                t,
                gather: gather()?,
            };
            solver.solve(gpu, &mut op, &b_d, &mut x_d, x0.is_some(), opts, ex)?
        }
    };
    let x = s.clone_dtoh(&x_d).ctx("cg: copying the solution back")?;
    gpu.sync()?;
    Ok((x, report))
}

/// A small xorshift64* generator for the check's data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn vec(seed: u64, len: usize) -> Vec<f64> {
        let mut r = Rng::new(seed);
        (0..len).map(|_| r.next()).collect()
    }
}

/// `A = GᵀG + n·I` for a seeded random `G` (`n × n`): symmetric positive definite, condition
/// number about 2.3.
fn spd_system(seed: u64, n: usize) -> Vec<f64> {
    let g = Rng::vec(seed, n * n);
    let mut a = amalgam_core::linalg::matmul_tn(&g, n, n, &g, n);
    for i in 0..n {
        a[i * n + i] += n as f64;
    }
    a
}

/// The CPU solver on the same system (`y = x·A` with `amalgam_core::linalg::matmul`).
fn cpu_solve(
    a: &[f64],
    n: usize,
    b: &[f64],
    m: usize,
    x0: Option<&[f64]>,
    opts: &CgOptions,
) -> Result<CgResult> {
    use amalgam_core::solve::cg::{cg, FnProblem};
    let mut problem = FnProblem::local(vec![m * n], |x: &[f64], y: &mut [f64]| {
        y.copy_from_slice(&amalgam_core::linalg::matmul(x, m, n, a, n));
        Ok(())
    });
    Ok(cg(&mut problem, x0, b, opts)?)
}

/// `max |x − y| / max |y|`.
fn rel_err(x: &[f64], y: &[f64]) -> f64 {
    let d = x
        .iter()
        .zip(y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max);
    let s = y.iter().map(|v| v.abs()).fold(0.0, f64::max);
    if s == 0.0 {
        d
    } else {
        d / s
    }
}

/// Parity row: a random SPD system solved on the GPU and by the CPU solver.
fn parity_row(gpu: &Gpu, n: usize, m: usize, maxiter: usize) -> Result<Row> {
    let a = spd_system(1, n);
    let b = Rng::vec(2, m * n);
    let x0 = Rng::vec(3, m * n);
    let opts = CgOptions {
        rtol: 0.0,
        atol: 0.0,
        maxiter,
        ..CgOptions::default()
    };
    let cpu = cpu_solve(&a, n, &b, m, Some(&x0), &opts)?;
    let t = std::time::Instant::now();
    let (x, rep) = solve(gpu, &a, n, &b, m, Some(&x0), &opts)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let err = rel_err(&x, &cpu.x);
    let same = (rep.exit_code, rep.iterations) == (cpu.exit_code, cpu.iterations);
    let ok = err <= 1e-6 && same;
    Ok(Row {
        name: format!("cg parity {n}^2 x{m} ({maxiter} it)"),
        ms,
        bytes: 0.0,
        flops: 0.0,
        rel_err: Some(err),
        bitwise: None,
        note: format!(
            "{}: target <= 1e-6; exit/iterations GPU {}/{} CPU {}/{}; final residual GPU {:.3e} \
             CPU {:.3e}; ms: host wall time of the GPU solve with its copies",
            if ok { "ok" } else { "MISMATCH" },
            rep.exit_code,
            rep.iterations,
            cpu.exit_code,
            cpu.iterations,
            rep.final_residual,
            cpu.final_residual
        ),
    })
}

/// Entry `(i, j)` of the timing matrix: symmetric, off-diagonal `|a_ij| < 1/64`, diagonal
/// `65 + 10⁴·i/n`, so strictly diagonally dominant (positive definite) with a spread spectrum:
/// CG does not reach `ρ = 0` in 100 steps.
fn timing_entry(i: usize, j: usize, n: usize) -> f64 {
    if i == j {
        return 65.0 + 1e4 * i as f64 / n as f64;
    }
    let (lo, hi) = if i < j { (i, j) } else { (j, i) };
    let mut h = ((lo as u64) << 32 | hi as u64) ^ 0xA076_1D64_78BD_642F;
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    ((h >> 11) as f64 / (1u64 << 53) as f64 - 0.5) / 32.0
}

/// Milliseconds between two timing events around `f`, run on `gpu.stream`.
fn time_ms(gpu: &Gpu, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.ctx.new_event(flags).ctx("cg: creating an event")?;
    let end = gpu.ctx.new_event(flags).ctx("cg: creating an event")?;
    start.record(&gpu.stream).ctx("cg: recording an event")?;
    f()?;
    end.record(&gpu.stream).ctx("cg: recording an event")?;
    let ms = start.elapsed_ms(&end).ctx("cg: reading an event")?;
    Ok(f64::from(ms))
}

/// Timing rows: one DGEMM of the shape (median of 5) and a whole solve of `iters` steps
/// (`tol = 0`, no early exit; `x0 = 0`, recurrence final residual, so exactly `iters`
/// DGEMMs), after one warm-up of each.
fn timing_rows(gpu: &Gpu, n: usize, m: usize, iters: usize) -> Result<Vec<Row>> {
    let mut a = vec![0.0f64; n * n];
    a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        row.iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = timing_entry(i, j, n))
    });
    let mut b = vec![0.0f64; m * n];
    b.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let mut r = Rng::new(1000 + i as u64);
        row.iter_mut().for_each(|v| *v = r.next());
    });
    let s = &gpu.stream;
    let what = "cg: copying the timing system";
    let a_d = s.clone_htod(&a).ctx(what)?;
    let b_d = s.clone_htod(&b).ctx(what)?;
    drop((a, b));
    let mut x_d = s.alloc_zeros::<f64>(m * n).ctx(what)?;
    let mut y_d = s.alloc_zeros::<f64>(m * n).ctx(what)?;
    let mut solver = CgSolver::new(gpu, n, m)?;

    solver.matvec(&a_d, &b_d, &mut y_d)?;
    gpu.sync()?;
    let mut gemm_ms = Vec::new();
    for _ in 0..5 {
        gemm_ms.push(time_ms(gpu, || solver.matvec(&a_d, &b_d, &mut y_d))?);
    }
    gemm_ms.sort_by(f64::total_cmp);
    let gemm = gemm_ms[gemm_ms.len() / 2];

    let opts = CgOptions {
        rtol: 0.0,
        atol: 0.0,
        maxiter: iters,
        true_final_residual: false,
        ..CgOptions::default()
    };
    solver.solve(
        gpu,
        &mut DeviceOp::Gram(&a_d),
        &b_d,
        &mut x_d,
        false,
        &opts,
        &mut Exchange::Whole,
    )?;
    let mut rep = None;
    let total = time_ms(gpu, || {
        rep = Some(solver.solve(
            gpu,
            &mut DeviceOp::Gram(&a_d),
            &b_d,
            &mut x_d,
            false,
            &opts,
            &mut Exchange::Whole,
        )?);
        Ok(())
    })?;
    let rep = rep.expect("time_ms ran the solve");
    let per_iter = total / iters.max(1) as f64;
    let (nf, mf) = (n as f64, m as f64);
    let flops = 2.0 * nf * nf * mf;
    let ratio = per_iter / gemm;
    let mut note = format!("iteration / GEMM = {ratio:.2}x (target <= 1.5x)");
    if rep.iterations != iters || rep.stop != CgStop::MaxIter {
        note.push_str(&format!(
            "; stopped early ({} after {} steps): timing not comparable",
            rep.stop.name(),
            rep.iterations
        ));
    }
    Ok(vec![
        Row {
            name: format!("cg {n}^2 x{iters}"),
            ms: per_iter,
            // DGEMM (A, p, q) + direction (r, p, p) + p·q (p, q) + update (x, r, p, q, x, r)
            bytes: 8.0 * (nf * nf + 13.0 * nf * mf),
            flops,
            rel_err: None,
            bitwise: None,
            note,
        },
        Row {
            name: format!("dgemm {n}^3"),
            ms: gemm,
            bytes: 8.0 * (nf * nf + 2.0 * nf * mf),
            flops,
            rel_err: None,
            bitwise: None,
            note: format!("x·A, {m} x {n} by {n} x {n}, f64 (median of 5)"),
        },
    ])
}

/// One round of a [`LocalGang`]: each part's vector, then the sum (or why there is none).
type GangRound = (
    Vec<Option<Vec<f64>>>,
    Option<std::result::Result<Vec<f64>, String>>,
);

/// Parts meeting in one process, as the coordinator's `Reduce` meets a gang's parts: each
/// round, every part's vector is added element-wise in part order, and every part gets the sum.
pub struct LocalGang {
    parts: usize,
    rounds: std::sync::Mutex<Vec<GangRound>>,
    done: std::sync::Condvar,
}

impl LocalGang {
    /// A meeting of `parts` parts.
    pub fn new(parts: usize) -> Self {
        LocalGang {
            parts,
            rounds: std::sync::Mutex::new(Vec::new()),
            done: std::sync::Condvar::new(),
        }
    }

    /// Part `part`'s vector for round `round`; blocks until every part has sent its own, then
    /// returns the sum. An error when the parts' lengths differ.
    pub fn reduce(
        &self,
        part: usize,
        round: usize,
        values: &[f64],
    ) -> amalgam_core::error::Result<Vec<f64>> {
        let mut st = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        while st.len() <= round {
            st.push((vec![None; self.parts], None));
        }
        st[round].0[part] = Some(values.to_vec());
        if st[round].0.iter().all(Option::is_some) {
            let mut sum = Ok(vec![0.0f64; values.len()]);
            for v in st[round].0.iter().flatten() {
                match &mut sum {
                    Ok(s) if s.len() == v.len() => {
                        s.iter_mut().zip(v).for_each(|(s, x)| *s += x);
                    }
                    Ok(s) => {
                        let msg = format!(
                            "round {round}: parts sent {} and {} values",
                            v.len(),
                            s.len()
                        );
                        sum = Err(msg);
                    }
                    Err(_) => {}
                }
            }
            st[round].1 = Some(sum);
            self.done.notify_all();
        }
        loop {
            match &st[round].1 {
                Some(Ok(sum)) => return Ok(sum.clone()),
                Some(Err(e)) => return Err(MergeError::Read(e.clone())),
                None => st = self.done.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// The reduction a part's solve meets the others through.
type Reduce<'a> = dyn FnMut(&[f64]) -> amalgam_core::error::Result<Vec<f64>> + 'a;

/// One part's solve for [`gang_solve`]: `(part, b rows, x0 rows, reduce)`.
type PartSolve<'a> =
    dyn Fn(usize, &[f64], &[f64], &mut Reduce<'_>) -> Result<(Vec<f64>, CgReport)> + Sync + 'a;

/// Solve a split system part by part, each part on its own thread meeting the others through
/// a [`LocalGang`]: `solve_one(part, b_rows, x0_rows, reduce)` solves one part. Returns the
/// solution (all rows) and each part's report.
fn gang_solve(
    n: usize,
    b: &[f64],
    x0: &[f64],
    rows: &[usize],
    solve_one: &PartSolve<'_>,
) -> Result<(Vec<f64>, Vec<CgReport>)> {
    let gang = LocalGang::new(rows.len());
    let mut starts = vec![0usize];
    for r in rows {
        starts.push(starts.last().copied().unwrap_or(0) + r * n);
    }
    let results: Vec<Result<(Vec<f64>, CgReport)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..rows.len())
            .map(|k| {
                let (gang, starts) = (&gang, &starts);
                sc.spawn(move || {
                    let (lo, hi) = (starts[k], starts[k + 1]);
                    let mut round = 0usize;
                    let mut reduce = |v: &[f64]| {
                        let r = gang.reduce(k, round, v);
                        round += 1;
                        r
                    };
                    solve_one(k, &b[lo..hi], &x0[lo..hi], &mut reduce)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CudaError::Invalid("a part's thread panicked".into())))
            })
            .collect()
    });
    let mut x = Vec::with_capacity(b.len());
    let mut reports = Vec::new();
    for r in results {
        let (xk, rep) = r?;
        x.extend_from_slice(&xk);
        reports.push(rep);
    }
    Ok((x, reports))
}

/// Parity rows of split solves against the whole GPU solve of the same system: parts through
/// the host exchange, through the MaTS part solver with NCCL asked for (NCCL when there is a
/// device per part, else `Reduce`), and one part through NCCL (one rank).
pub(crate) fn split_rows(gpu: &Gpu) -> Result<Vec<Row>> {
    use crate::accel::GpuSolver;
    use amalgam_core::solve::cg::{DeviceSolver, SplitPart};
    // Parts of 64 rows x 256 = one chunk each (the last shorter): the whole solve's slots.
    let (n, rows) = (256usize, [64usize, 64, 32]);
    let m: usize = rows.iter().sum();
    let a = spd_system(21, n);
    let b = Rng::vec(22, m * n);
    let x0 = Rng::vec(23, m * n);
    let opts = CgOptions {
        rtol: 1e-10,
        maxiter: 60,
        ..CgOptions::default()
    };
    let (whole, wrep) = solve(gpu, &a, n, &b, m, Some(&x0), &opts)?;
    let lens: Vec<usize> = rows.iter().map(|r| r * n).collect();
    let row = |name: String, ms: f64, got: &[f64], reps: &[CgReport], how: &str| {
        let same = got
            .iter()
            .zip(&whole)
            .all(|(p, q)| p.to_bits() == q.to_bits());
        let err = rel_err(got, &whole);
        let steps = reps
            .iter()
            .all(|r| (r.exit_code, r.iterations) == (wrep.exit_code, wrep.iterations));
        Row {
            name,
            ms,
            rel_err: Some(if steps { err } else { f64::INFINITY }),
            bitwise: Some(same && steps),
            note: format!(
                "{how}; against the whole GPU solve: {}; exit/iterations {}/{} (whole {}/{})",
                if same {
                    "bit-identical".to_string()
                } else {
                    format!("max rel err {err:.2e} (target <= 1e-6)")
                },
                reps.first().map_or(-1, |r| r.exit_code),
                reps.first().map_or(0, |r| r.iterations),
                wrep.exit_code,
                wrep.iterations
            ),
            ..Default::default()
        }
    };
    let mut out = Vec::new();

    // Parts meeting through the host (the cluster's Reduce path).
    let t = std::time::Instant::now();
    let (x, reps) = gang_solve(n, &b, &x0, &rows, &|k, bk, xk, reduce| {
        gpu.ctx.bind_to_thread().ctx("binding the context")?;
        let slots = Slots::of(&lens, k)?;
        let mut ex = Exchange::Host(reduce);
        let sys = DeviceSystem::Gram {
            a: std::borrow::Cow::Borrowed(&a),
            n,
        };
        solve_system(gpu, &sys, bk, Some(xk), &opts, Some(slots), &mut ex)
    })?;
    out.push(row(
        format!("parity cg split {n}^2 x{m}, 3 parts via Reduce"),
        t.elapsed().as_secs_f64() * 1e3,
        &x,
        &reps,
        "each sum's partials through the host",
    ));

    // The MaTS part solver with NCCL asked for: NCCL with a device per part, else Reduce.
    let devices = cudarc::driver::CudaContext::device_count().unwrap_or(1) as usize;
    let nccl_why = crate::nccl::unavailable_reason();
    let solver = GpuSolver::new(gpu).with_nccl(true);
    let via = |parts: usize| match (&nccl_why, parts <= devices) {
        (None, true) => "NCCL".to_string(),
        (Some(why), _) => format!("Reduce ({why})"),
        (None, false) => format!("Reduce ({parts} parts, {devices} device(s))"),
    };
    let part_solve = |k: usize,
                      part_lens: &[usize],
                      bk: &[f64],
                      xk: &[f64],
                      reduce: &mut dyn FnMut(&[f64]) -> amalgam_core::error::Result<Vec<f64>>|
     -> Result<(Vec<f64>, CgReport)> {
        let split = SplitPart {
            part: k,
            part_lens: part_lens.to_vec(),
        };
        let sys = DeviceSystem::Gram {
            a: std::borrow::Cow::Borrowed(&a),
            n,
        };
        let r = solver.solve_part(&sys, bk, xk, &opts, &split, reduce)?;
        let x = r.x.clone();
        Ok((x, report_of(&r)))
    };
    let t = std::time::Instant::now();
    let (x, reps) = gang_solve(n, &b, &x0, &rows, &|k, bk, xk, reduce| {
        part_solve(k, &lens, bk, xk, reduce)
    })?;
    out.push(row(
        format!("parity cg split {n}^2 x{m}, 3 parts, NCCL asked"),
        t.elapsed().as_secs_f64() * 1e3,
        &x,
        &reps,
        &format!("MaTS part solver, sums through {}", via(3)),
    ));

    // One part, one rank: the NCCL path itself on any GPU.
    let t = std::time::Instant::now();
    let (x, reps) = gang_solve(n, &b, &x0, &[m], &|k, bk, xk, reduce| {
        part_solve(k, &[m * n], bk, xk, reduce)
    })?;
    out.push(row(
        format!("parity cg split {n}^2 x{m}, 1 part, NCCL asked"),
        t.elapsed().as_secs_f64() * 1e3,
        &x,
        &reps,
        &format!("MaTS part solver, one rank, sums through {}", via(1)),
    ));
    Ok(out)
}

/// Parity rows of the other MaTS operators against the CPU solver on the same system: a
/// diagonal (`diagonal_fisher`, `identity`), K-FAC's `Σ_i S_i·X·A_i` (two models) and a dense
/// `F·x` (`ia3_block`), the last two also split in 3 parts gathering the direction.
fn operator_rows(gpu: &Gpu) -> Result<Vec<Row>> {
    use amalgam_core::linalg::matmul;
    use amalgam_core::solve::cg::{cg, FnProblem};
    let opts = CgOptions {
        rtol: 0.0,
        maxiter: 40,
        ..CgOptions::default()
    };
    let mut out = Vec::new();
    // A row from a solve (whole: one report; split: one per part) against the CPU's result.
    let mut push =
        |name: String, ms: f64, got: Result<(Vec<f64>, Vec<CgReport>)>, cpu: &CgResult| {
            out.push(match got {
                Ok((x, reps)) => {
                    let err = rel_err(&x, &cpu.x);
                    let same = reps
                        .iter()
                        .all(|r| (r.exit_code, r.iterations) == (cpu.exit_code, cpu.iterations));
                    let rep = &reps[0];
                    Row {
                        name,
                        ms,
                        rel_err: Some(if same { err } else { f64::INFINITY }),
                        bitwise: Some(same && x.iter().zip(&cpu.x).all(|(p, q)| p == q)),
                        note: format!(
                            "against the CPU solver: max rel err {err:.2e} (target <= 1e-6); \
                         exit/iterations GPU {}/{} CPU {}/{}",
                            rep.exit_code, rep.iterations, cpu.exit_code, cpu.iterations
                        ),
                        ..Default::default()
                    }
                }
                Err(e) => crate::check::failed(&name, &e),
            });
        };
    let whole = |sys: &DeviceSystem<'_>, b: &[f64], x0: &[f64]| {
        let t = std::time::Instant::now();
        let r = solve_system(gpu, sys, b, Some(x0), &opts, None, &mut Exchange::Whole)
            .map(|(x, rep)| (x, vec![rep]));
        (t.elapsed().as_secs_f64() * 1e3, r)
    };
    // Parts of `rows` rows of `cols`, meeting through the host.
    let split = |sys: &DeviceSystem<'_>, b: &[f64], x0: &[f64], cols: usize, rows: &[usize]| {
        let lens: Vec<usize> = rows.iter().map(|r| r * cols).collect();
        let t = std::time::Instant::now();
        let r = gang_solve(cols, b, x0, rows, &|k, bk, xk, reduce| {
            gpu.ctx.bind_to_thread().ctx("binding the context")?;
            let slots = Slots::of(&lens, k)?;
            let mut ex = Exchange::Host(reduce);
            solve_system(gpu, sys, bk, Some(xk), &opts, Some(slots), &mut ex)
        });
        (t.elapsed().as_secs_f64() * 1e3, r)
    };

    // A diagonal system of 100000 unknowns.
    let len = 100_000;
    let f: Vec<f64> = Rng::vec(31, len).iter().map(|v| v.abs() + 0.1).collect();
    let b = Rng::vec(32, len);
    let x0 = Rng::vec(33, len);
    let mut p = FnProblem::local(vec![len], |x: &[f64], y: &mut [f64]| {
        for ((y, f), x) in y.iter_mut().zip(&f).zip(x) {
            *y = f * x;
        }
        Ok(())
    });
    let cpu = cg(&mut p, Some(&x0), &b, &opts)?;
    let sys = DeviceSystem::Diagonal {
        f: std::borrow::Cow::Borrowed(&f),
    };
    let (ms, r) = whole(&sys, &b, &x0);
    push(format!("parity cg diagonal x{len}"), ms, r, &cpu);

    // K-FAC: 2 models, a 96 x 64 unknown.
    let (m, n) = (96usize, 64usize);
    let a: Vec<Vec<f64>> = (0..2).map(|i| spd_system(40 + i, n)).collect();
    let s_f: Vec<Vec<f64>> = (0..2).map(|i| spd_system(50 + i, m)).collect();
    let b = Rng::vec(34, m * n);
    let x0 = Rng::vec(35, m * n);
    let mut p = FnProblem::local(vec![m * n], |x: &[f64], y: &mut [f64]| {
        y.iter_mut().for_each(|v| *v = 0.0);
        for (ai, si) in a.iter().zip(&s_f) {
            let t = matmul(si, m, m, x, n);
            let sxa = matmul(&t, m, n, ai, n);
            for (y, v) in y.iter_mut().zip(&sxa) {
                *y += v;
            }
        }
        Ok(())
    });
    let cpu = cg(&mut p, Some(&x0), &b, &opts)?;
    let sys = DeviceSystem::Kfac {
        a: &a,
        s: &s_f,
        out: m,
        d: n,
    };
    let (ms, r) = whole(&sys, &b, &x0);
    push(format!("parity cg kfac {m}x{n} x2 models"), ms, r, &cpu);
    let (ms, r) = split(&sys, &b, &x0, n, &[32, 32, 32]);
    push(
        format!("parity cg kfac {m}x{n}, 3 parts via Reduce"),
        ms,
        r,
        &cpu,
    );

    // Dense (ia3_block): x ↦ F x over a vector of 300.
    let d = 300usize;
    let f = spd_system(60, d);
    let b = Rng::vec(36, d);
    let x0 = Rng::vec(37, d);
    let mut p = FnProblem::local(vec![d], |x: &[f64], y: &mut [f64]| {
        y.copy_from_slice(&matmul(&f, d, d, x, 1));
        Ok(())
    });
    let cpu = cg(&mut p, Some(&x0), &b, &opts)?;
    let sys = DeviceSystem::Dense { f: &f, d };
    let (ms, r) = whole(&sys, &b, &x0);
    push(format!("parity cg dense {d}^2"), ms, r, &cpu);
    let (ms, r) = split(&sys, &b, &x0, 1, &[100, 100, 100]);
    push(
        format!("parity cg dense {d}^2, 3 parts via Reduce"),
        ms,
        r,
        &cpu,
    );
    Ok(out)
}

/// The report fields of a [`CgResult`].
fn report_of(r: &CgResult) -> CgReport {
    CgReport {
        exit_code: r.exit_code,
        iterations: r.iterations,
        initial_residual: r.initial_residual,
        final_residual: r.final_residual,
        converged: r.converged,
        stop: r.stop,
        rhs_norm: r.rhs_norm,
        tolerance: r.tolerance,
        final_residual_is_true: r.final_residual_is_true,
        matvecs: r.matvecs,
        reductions: r.reductions,
    }
}

/// The CG rows of `amalgam gpu-check`: parity against the CPU solver (n = 256, m = 32, 50
/// steps, `tol = 0`; `rel_err` is `max |x_gpu − x_cpu| / max |x_cpu|`, target ≤ 1e-6) and the
/// timing of 100 steps at n = m = 4096 against one DGEMM of the same shape (target: an
/// iteration ≤ 1.5 DGEMMs); split solves against the whole one; the K-FAC and diagonal operators.
pub fn check_rows(gpu: &Gpu) -> Result<Vec<Row>> {
    let mut rows = vec![parity_row(gpu, 256, 32, 50)?];
    rows.extend(split_rows(gpu)?);
    rows.extend(operator_rows(gpu)?);
    rows.extend(timing_rows(gpu, 4096, 4096, 100)?);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::with_gpu;

    fn opts(rtol: f64, maxiter: usize) -> CgOptions {
        CgOptions {
            rtol,
            maxiter,
            ..CgOptions::default()
        }
    }

    #[test]
    fn kernel_constants_match_the_source() {
        let src = include_str!("../kernels/cg.cu");
        assert!(src.contains(&format!("#define CG_CHUNK {CHUNK}")));
        assert!(src.contains(&format!("#define CG_THREADS {THREADS}")));
        assert_eq!(CHUNK, amalgam_core::reduce::REDUCE_CHUNK);
        for k in KERNELS {
            assert!(src.contains(&format!("__global__ void {k}(")), "{k}");
        }
        for (name, v) in [
            ("CG_RHO", S_RHO as i64),
            ("CG_PQ", S_PQ as i64),
            ("CG_TOL", S_TOL as i64),
            ("CG_STATUS", S_STATUS as i64),
            ("CG_ITER", S_ITER as i64),
            ("CG_AUX", S_AUX as i64),
            ("CG_OP_STORE", i64::from(OP_STORE)),
            ("CG_OP_RHO", i64::from(OP_RHO)),
            ("CG_OP_PQ", i64::from(OP_PQ)),
        ] {
            assert!(src.contains(&format!("#define {name} {v}\n")), "{name}");
        }
        for (name, v) in [
            ("CG_RUNNING", RUNNING),
            ("CG_CONVERGED", CONVERGED),
            ("CG_BREAKDOWN", BREAKDOWN),
            ("CG_BAD_RHO", BAD_RHO),
            ("CG_BAD_PQ", BAD_PQ),
        ] {
            assert!(src.contains(&format!("#define {name} {v:.1}\n")), "{name}");
        }
    }

    #[test]
    fn argument_errors() {
        assert!(check_lengths(9, 3, 6, 2, None).is_ok());
        assert!(check_lengths(9, 3, 6, 2, Some(6)).is_ok());
        assert!(check_lengths(8, 3, 6, 2, None).is_err());
        assert!(check_lengths(9, 3, 5, 2, None).is_err());
        assert!(check_lengths(9, 3, 6, 2, Some(5)).is_err());
        assert!(check_lengths(0, 0, 0, 7, None).is_ok());
        assert!(check_lengths(usize::MAX, usize::MAX, 0, 0, None).is_err());
        assert!(check_dims(0, 3).is_err());
        assert!(check_dims(3, 0).is_err());
        assert!(check_dims(1 << 31, 1).is_err());
        assert_eq!(check_dims(4096, 4096).unwrap(), 4096 * 4096);
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let e = check_options(&CgOptions {
                rtol: bad,
                ..CgOptions::default()
            })
            .unwrap_err();
            assert!(e.to_string().contains("rtol"), "{e}");
            let e = check_options(&CgOptions {
                atol: bad,
                ..CgOptions::default()
            })
            .unwrap_err();
            assert!(e.to_string().contains("atol"), "{e}");
        }
        assert!(check_options(&CgOptions::default()).is_ok());
    }

    /// The counts of products and reductions reported for each way a solve ends equal the CPU
    /// solver's.
    #[test]
    fn counts_match_the_cpu_solver() {
        let (n, m) = (6, 2);
        let a = spd_system(5, n);
        let b = Rng::vec(6, m * n);
        let x0 = Rng::vec(7, m * n);
        let zeros = vec![0.0; m * n];
        let zero_a = vec![0.0; n * n];
        let mut cases = Vec::new();
        for true_final in [true, false] {
            for (x0, x0_nonzero) in [
                (None, false),
                (Some(&x0[..]), true),
                (Some(&zeros[..]), false),
            ] {
                for (a, b, o) in [
                    (&a, &b, opts(1e-8, 100)),     // converged
                    (&a, &b, opts(0.0, 3)),        // maxiter
                    (&a, &b, opts(1e-5, 0)),       // maxiter = 0
                    (&zero_a, &b, opts(1e-5, 10)), // breakdown
                    (&a, &zeros, opts(1e-5, 10)),  // zero rhs
                ] {
                    let o = CgOptions {
                        true_final_residual: true_final,
                        ..o
                    };
                    cases.push((a.clone(), b.clone(), x0.map(<[f64]>::to_vec), x0_nonzero, o));
                }
            }
        }
        let mut stops = Vec::new();
        for (a, b, x0, x0_nonzero, o) in cases {
            let cpu = cpu_solve(&a, n, &b, m, x0.as_deref(), &o).unwrap();
            // a zero x0 with a zero matrix: x0_nonzero only decides the first product
            let got = cpu_counts(x0.is_some(), x0_nonzero, cpu.stop, cpu.iterations, &o);
            assert_eq!(got, (cpu.matvecs, cpu.reductions), "{:?} {o:?}", cpu.stop);
            stops.push(cpu.stop);
        }
        for s in [
            CgStop::Converged,
            CgStop::MaxIter,
            CgStop::Breakdown,
            CgStop::ZeroRhs,
        ] {
            assert!(stops.contains(&s), "{s:?} not covered");
        }
        // the empty system
        for x0 in [None, Some(&[][..])] {
            let o = CgOptions::default();
            let cpu = cpu_solve(&[], 0, &[], 3, x0, &o).unwrap();
            let rep = empty_report(&o, x0.is_some());
            assert_eq!(rep.into_result(Vec::new()), cpu);
        }
    }

    #[test]
    fn timing_matrix_is_symmetric_and_dominant() {
        let n = 64;
        for i in 0..n {
            let mut off = 0.0;
            for j in 0..n {
                assert_eq!(timing_entry(i, j, n), timing_entry(j, i, n));
                if i != j {
                    off += timing_entry(i, j, n).abs();
                }
            }
            assert!(off < timing_entry(i, i, n));
        }
    }

    /// Compare one GPU solve with the CPU solver.
    fn compare(
        gpu: &Gpu,
        a: &[f64],
        n: usize,
        b: &[f64],
        m: usize,
        x0: Option<&[f64]>,
        o: &CgOptions,
    ) {
        let cpu = cpu_solve(a, n, b, m, x0, o).unwrap();
        let (x, rep) = solve(gpu, a, n, b, m, x0, o).unwrap();
        assert_eq!(
            (rep.exit_code, rep.iterations, rep.stop),
            (cpu.exit_code, cpu.iterations, cpu.stop),
            "{o:?}"
        );
        assert_eq!((rep.matvecs, rep.reductions), (cpu.matvecs, cpu.reductions));
        let err = rel_err(&x, &cpu.x);
        assert!(err <= 1e-10, "{o:?}: {err:e}");
        // relative, or absolute against ‖b‖ where the residual is near the rounding floor
        let close = |p: f64, q: f64| (p - q).abs() <= 1e-6 * q.abs() + 1e-12 * cpu.rhs_norm;
        assert!(close(rep.initial_residual, cpu.initial_residual));
        assert!(close(rep.rhs_norm, cpu.rhs_norm));
        assert!(
            close(rep.final_residual, cpu.final_residual),
            "{} vs {}",
            rep.final_residual,
            cpu.final_residual
        );
    }

    #[test]
    fn gpu_matches_cpu_solver() {
        with_gpu("cg::gpu_matches_cpu_solver", |gpu| {
            // sizes that are and are not multiples of the chunk
            for (n, m) in [(40, 7), (128, 200), (300, 3)] {
                let a = spd_system(11, n);
                let b = Rng::vec(12, m * n);
                let x0 = Rng::vec(13, m * n);
                for o in [opts(1e-8, 500), opts(0.0, 7), opts(1e-5, 0)] {
                    compare(gpu, &a, n, &b, m, None, &o);
                    compare(gpu, &a, n, &b, m, Some(&x0), &o);
                    let o = CgOptions {
                        true_final_residual: false,
                        ..o
                    };
                    compare(gpu, &a, n, &b, m, Some(&x0), &o);
                }
            }
            // breakdown (A = 0) keeps x0; zero rhs keeps x0 or returns zeros
            let (n, m) = (20, 3);
            let x0 = Rng::vec(21, m * n);
            let b = Rng::vec(22, m * n);
            compare(gpu, &vec![0.0; n * n], n, &b, m, Some(&x0), &opts(1e-5, 10));
            compare(gpu, &vec![0.0; n * n], n, &b, m, None, &opts(1e-5, 10));
            let a = spd_system(23, n);
            let zb = vec![0.0; m * n];
            compare(gpu, &a, n, &zb, m, Some(&x0), &opts(1e-5, 10));
            let scipy = CgOptions {
                zero_rhs: ZeroRhs::ScipyZero,
                ..opts(1e-5, 10)
            };
            compare(gpu, &a, n, &zb, m, Some(&x0), &scipy);
            // the identity converges in one step
            let mut eye = vec![0.0; n * n];
            for i in 0..n {
                eye[i * n + i] = 1.0;
            }
            compare(gpu, &eye, n, &b, m, Some(&x0), &opts(1e-5, 10));
            compare(gpu, &eye, n, &b, m, None, &opts(0.0, 10));
        });
    }

    #[test]
    fn gpu_solve_is_deterministic_and_rejects_nan() {
        with_gpu("cg::gpu_solve_is_deterministic_and_rejects_nan", |gpu| {
            let (n, m) = (96, 400);
            let a = spd_system(31, n);
            let b = Rng::vec(32, m * n);
            let o = opts(0.0, 20);
            let (x1, r1) = solve(gpu, &a, n, &b, m, None, &o).unwrap();
            let (x2, r2) = solve(gpu, &a, n, &b, m, None, &o).unwrap();
            assert_eq!(r1, r2);
            assert!(x1.iter().zip(&x2).all(|(p, q)| p.to_bits() == q.to_bits()));
            let mut bad = a.clone();
            bad[5] = f64::NAN;
            let e = solve(gpu, &bad, n, &b, m, None, &o).unwrap_err();
            assert!(e.to_string().contains("p·Ap"), "{e}");
            let mut bad_b = b.clone();
            bad_b[3] = f64::INFINITY;
            let e = solve(gpu, &a, n, &bad_b, m, None, &o).unwrap_err();
            assert!(e.to_string().contains("b·b"), "{e}");
            assert!(solve(gpu, &a, n, &b[1..], m, None, &o).is_err());
        });
    }

    #[test]
    fn gpu_parity_row() {
        with_gpu("cg::gpu_parity_row", |gpu| {
            let row = parity_row(gpu, 256, 32, 50).unwrap();
            assert!(row.rel_err.unwrap() <= 1e-6, "{row:?}");
            assert!(row.note.starts_with("ok"), "{row:?}");
        });
    }

    #[test]
    fn gpu_split_solves_match_the_whole_solve() {
        with_gpu("cg::gpu_split_solves_match_the_whole_solve", |gpu| {
            for row in split_rows(gpu).unwrap() {
                assert!(row.rel_err.unwrap() <= 1e-6, "{row:?}");
            }
        });
    }

    #[test]
    fn gpu_operators_match_the_cpu_solver() {
        with_gpu("cg::gpu_operators_match_the_cpu_solver", |gpu| {
            for row in operator_rows(gpu).unwrap() {
                assert!(row.rel_err.unwrap() <= 1e-6, "{row:?}");
            }
        });
    }

    #[test]
    fn system_shapes_are_checked() {
        use std::borrow::Cow;
        let a = vec![0.0; 9];
        let g = DeviceSystem::Gram {
            a: Cow::Borrowed(&a),
            n: 3,
        };
        assert_eq!(system_shape(&g, 12, None).unwrap(), (3, 4));
        assert!(system_shape(&g, 10, None).is_err());
        let f = vec![1.0; 5];
        let d = DeviceSystem::Diagonal {
            f: Cow::Borrowed(&f),
        };
        assert_eq!(system_shape(&d, 5, None).unwrap(), (5, 1));
        assert!(system_shape(&d, 6, None).is_err());
        let (ai, si) = (vec![vec![0.0; 4]], vec![vec![0.0; 9]]);
        let k = DeviceSystem::Kfac {
            a: &ai,
            s: &si,
            out: 3,
            d: 2,
        };
        assert_eq!(system_shape(&k, 6, None).unwrap(), (2, 3));
        // Part 1 of rows [1, 2] of the 3 x 2 unknown: its 2 rows.
        let part = Slots::of(&[2, 4], 1).unwrap();
        assert_eq!(system_shape(&k, 4, Some(&part)).unwrap(), (2, 2));
        // A part that does not start at a row is refused.
        let odd = Slots::of(&[3, 3], 1).unwrap();
        assert!(system_shape(&k, 3, Some(&odd)).is_err());
        let fd = vec![0.0; 16];
        let dense = DeviceSystem::Dense { f: &fd, d: 4 };
        assert_eq!(system_shape(&dense, 4, None).unwrap(), (1, 4));
        let part = Slots::of(&[1, 3], 1).unwrap();
        assert_eq!(system_shape(&dense, 3, Some(&part)).unwrap(), (1, 3));
        assert!(system_shape(&dense, 5, None).is_err());
        let e = system_shape(&k, 7, None).unwrap_err().to_string();
        assert!(e.contains("K-FAC"), "{e}");
    }

    #[test]
    fn slots_follow_the_parts_chunks() {
        let c = CHUNK;
        let sl = |offset, total, start, elements| Slots {
            offset,
            total,
            start,
            elements,
        };
        assert_eq!(Slots::whole(2 * c + 1), sl(0, 3, 0, 2 * c + 1));
        let lens = [c, 2 * c, 5];
        let all = 3 * c + 5;
        assert_eq!(Slots::of(&lens, 0).unwrap(), sl(0, 4, 0, all));
        assert_eq!(Slots::of(&lens, 1).unwrap(), sl(1, 4, c, all));
        assert_eq!(Slots::of(&lens, 2).unwrap(), sl(3, 4, 3 * c, all));
        // Chunk-aligned parts have the whole system's slots.
        assert_eq!(Slots::whole(lens.iter().sum()).total, 4);
        // Unaligned parts take a slot more than the whole system.
        assert_eq!(Slots::of(&[c + 1, c - 1], 1).unwrap().total, 3);
        assert!(Slots::of(&lens, 3).is_err());
    }

    #[test]
    fn a_local_gang_adds_in_part_order() {
        let gang = LocalGang::new(3);
        let sums: Vec<Vec<f64>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..3)
                .map(|k| {
                    let gang = &gang;
                    sc.spawn(move || {
                        let mut v = vec![0.0; 3];
                        v[k] = (k + 1) as f64;
                        let a = gang.reduce(k, 0, &v).unwrap();
                        let b = gang.reduce(k, 1, &[1e16, 1.0, -1e16][k..k + 1]).unwrap();
                        [a, b].concat()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for s in sums {
            // (0 + 1e16) + 1 rounds to 1e16; then − 1e16 gives 0: part order, not another.
            assert_eq!(s, vec![1.0, 2.0, 3.0, 0.0]);
        }
        // Unequal lengths fail every part, none is left waiting.
        let gang = LocalGang::new(2);
        let errs: Vec<bool> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2)
                .map(|k| {
                    let gang = &gang;
                    sc.spawn(move || gang.reduce(k, 0, &vec![1.0; k + 1]).is_err())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errs, vec![true, true]);
    }
}
