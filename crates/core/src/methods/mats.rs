//! `mats`: MaTS, merging by solving (Σ_i C_i) θ = Σ_i C_i θ_i with conjugate gradient
//! (methods.md §11, §15; Tam, Bansal, Raffel, `r-three/mats/src/merging/
//! conjugateGradient_{fisherMerging,diagonalFisher,average}.py`). mergekit has no such method.
//! Sharding class **T** (one block per tensor; a block split into parts reduces its CG scalars
//! across the parts, architecture.md "Split blocks").
//!
//! Every tensor is one block, solved independently. The unknown is kept in the **tensor's own
//! layout** (for a linear weight, W ∈ R^{out×in} row-major, which is the reference's X = Wᵀ
//! stored column by column), so for symmetric factors the reference's A·X becomes W·A:
//!
//! | `objective` | statistic(s) | matvec on W | b |
//! |---|---|---|---|
//! | `gram` (default; RegMean objective) | `gram_in` | W ↦ W·(Σ_i G̃_i) | Σ_i W_i G̃_i |
//! | `kfac` | `gram_in` A_i, `kfac_out` S_i | W ↦ Σ_i S_i W A_i (pairs kept apart) | Σ_i S_i W_i A_i |
//! | `diagonal_fisher` | `fisher` | x ↦ (Σ_i F_i) ⊙ x (no floor) | Σ_i F_i ⊙ θ_i |
//! | `ia3_block` | `fisher_block` (d×d, 1-D tensors) | x ↦ (Σ_i F̃_i) x | Σ_i F̃_i l_i |
//! | `identity` | none | x ↦ N·x | Σ_i θ_i (solution: the average, 1 iteration) |
//!
//! `alpha` (default 1.0, in [0, 1]) scales the off-diagonal entries of every square factor
//! (G̃ = α·G + (1−α)·diag G), as the reference's `model_lambda` does for the Gram, both K-FAC
//! factors and the (IA)^3 block Fisher.
//!
//! Initialisation `init`:
//! - `task_arithmetic`: θ_0 + λ·Σ_i (θ_i − θ_0) with `init_lambda` (default 0.3, the MaTS README
//!   for full models; it uses 0.2 for (IA)^3), needs a base;
//! - `ties`: this crate's `ties` (mergekit semantics) with per-model `density` = `init_density`
//!   (default 0.2), `weight` 1, `lambda` = `init_lambda` (default 1.0 for ties), needs a base;
//! - `average`, `base` (θ_0), `zeros`.
//!
//! With no `init` given, the default is `task_arithmetic` when the merge has a base and
//! `average` otherwise (git-theta's `covariance-mats` falls back to the average likewise).
//!
//! CG ([`crate::solve::cg`], SciPy's algorithm, no preconditioner): `iterations` (maxiter,
//! default 100; the README uses 10 for (IA)^3), `rtol` (1e-5), `atol` (0); stop when
//! ‖r‖ < max(rtol·‖b‖, atol), checked before each step (SciPy's strict test). `cg_parts` (default 1) splits the block
//! into that many parts by output rows (the reference's output columns of X; elements for 1-D
//! tensors), each part computing its slice of the matvec and its partial inner products, summed
//! in part order: the split exercised in one process is the one the cluster runs.
//!
//! When ‖b‖ = 0 (all-zero statistics) x0 is returned unchanged (methods.md's recommendation;
//! SciPy returns zeros); features no model's statistic sees (zero rows of a singular Gram)
//! keep their x0 values, since CG never moves along the null space.
//!
//! Numerics: the iterate, residual and direction are f64, and so is the matvec (the reference
//! computes the matvec in f32 on the GPU and keeps x in f64). An f64 matvec lets CG converge
//! past f32 rounding (the tests check every objective against a dense f64 solve) at twice the
//! memory of the factors and about half the CPU matmul rate. The statistics are read as f32
//! and widened.
//!
//! Each block logs one record through [`TensorWriter::log`]: `tensor`, `objective`, `init`,
//! `parts`, and the solver's fields ([`CgResult::to_log_record`]): `exit_code` (0 converged,
//! else the iteration count reached, as SciPy), `iterations`, `initial_residual` ‖A x0 − b‖,
//! `final_residual` ‖A x − b‖ (a fresh matvec, as the reference), `rhs_norm`, `stop`, ….
//!
//! Tensors without the objective's statistic are not solved: the planner averages them
//! (architecture.md, "Statistics files"); here a missing statistic is an error naming the model
//! and the key.

use crate::error::{MergeError, Result};
use crate::linalg;
use crate::methods::fisher::{read_checked, read_stat_checked, stat_shape};
use crate::methods::regmean::{alpha_param, linear_dims, read_square_stat, PANEL_ROWS};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::{Scalar, TensorParams};
use crate::solve::cg::{cg, CgOptions, CgResult, FnProblem};
use crate::tensor::{Input, MemWriter, TensorJob, TensorReader, TensorWriter};
use std::ops::Range;

/// Static facts about `mats`.
pub const INFO: MethodInfo = MethodInfo {
    name: "mats",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[
        "objective",
        "alpha",
        "init",
        "init_lambda",
        "init_density",
        "iterations",
        "rtol",
        "atol",
        "cg_parts",
    ],
    model_params: &[],
    random: false,
    summary: "MaTS: solve (sum C_i) theta = sum C_i theta_i by conjugate gradient per block",
};

/// The linear system's curvature C_i.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Input Gram per linear weight (RegMean objective).
    Gram,
    /// Diagonal Fisher.
    DiagonalFisher,
    /// K-FAC: input Gram ⊗ output-gradient Gram, per model.
    Kfac,
    /// Full Fisher block of an (IA)^3 vector.
    Ia3Block,
    /// C_i = I (the average).
    Identity,
}

impl Objective {
    fn name(self) -> &'static str {
        match self {
            Self::Gram => "gram",
            Self::DiagonalFisher => "diagonal_fisher",
            Self::Kfac => "kfac",
            Self::Ia3Block => "ia3_block",
            Self::Identity => "identity",
        }
    }
}

/// The starting point of CG.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// θ_0 + λ Σ_i τ_i.
    TaskArithmetic {
        /// λ.
        lambda: f64,
    },
    /// This crate's `ties` merge.
    Ties {
        /// Per-model density.
        density: f64,
        /// λ.
        lambda: f64,
    },
    /// Mean of the models.
    Average,
    /// The base model.
    Base,
    /// x0 = 0.
    Zeros,
}

impl Init {
    fn name(self) -> &'static str {
        match self {
            Self::TaskArithmetic { .. } => "task_arithmetic",
            Self::Ties { .. } => "ties",
            Self::Average => "average",
            Self::Base => "base",
            Self::Zeros => "zeros",
        }
    }
}

/// `mats` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Mats {
    n_models: usize,
    objective: Objective,
    alpha: f64,
    init: Init,
    iterations: usize,
    rtol: f64,
    atol: f64,
    parts: usize,
}

fn bad(key: &str, message: String) -> MergeError {
    MergeError::BadParameter {
        key: key.into(),
        message,
    }
}

impl Mats {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize, has_base: bool) -> Result<Self> {
        if n_models == 0 {
            return Err(MergeError::BadInputs {
                method: INFO.name.into(),
                message: "needs at least one model".into(),
            });
        }
        let objective = match params.opt_str("objective")?.as_deref() {
            None | Some("gram") | Some("regmean") => Objective::Gram,
            Some("diagonal_fisher") => Objective::DiagonalFisher,
            Some("kfac") => Objective::Kfac,
            Some("ia3_block") => Objective::Ia3Block,
            Some("identity") | Some("average") => Objective::Identity,
            Some(other) => {
                return Err(bad(
                    "objective",
                    format!(
                        "expected gram, diagonal_fisher, kfac, ia3_block or identity, got \
                         `{other}`"
                    ),
                ))
            }
        };
        let given = params.opt_str("init")?;
        let name = given.clone().unwrap_or_else(|| {
            if has_base {
                "task_arithmetic"
            } else {
                "average"
            }
            .into()
        });
        let lambda = |default: f64| -> Result<f64> {
            let l = params.num("init_lambda", default)?;
            if l.is_finite() {
                Ok(l)
            } else {
                Err(bad("init_lambda", format!("must be finite, got {l}")))
            }
        };
        let init = match name.as_str() {
            "task_arithmetic" => Init::TaskArithmetic {
                lambda: lambda(0.3)?,
            },
            "ties" => {
                let density = params.num("init_density", 0.2)?;
                if !(density > 0.0 && density <= 1.0) {
                    return Err(bad(
                        "init_density",
                        format!("must be in (0, 1], got {density}"),
                    ));
                }
                Init::Ties {
                    density,
                    lambda: lambda(1.0)?,
                }
            }
            "average" => Init::Average,
            "base" | "pretrained" => Init::Base,
            "zeros" | "none" => Init::Zeros,
            other => {
                return Err(bad(
                    "init",
                    format!(
                        "expected task_arithmetic, ties, average, base or zeros, got `{other}`"
                    ),
                ))
            }
        };
        if matches!(
            init,
            Init::TaskArithmetic { .. } | Init::Ties { .. } | Init::Base
        ) && !has_base
        {
            return Err(bad(
                "init",
                format!(
                    "`init: {name}` needs a `base_model`; give one, or use `init: average` or \
                     `init: zeros`"
                ),
            ));
        }
        let iterations = params.num("iterations", 100.0)?;
        if !(iterations >= 0.0 && iterations.fract() == 0.0 && iterations <= 1e9) {
            return Err(bad(
                "iterations",
                format!("must be a whole number ≥ 0, got {iterations}"),
            ));
        }
        let rtol = params.num("rtol", 1e-5)?;
        let atol = params.num("atol", 0.0)?;
        for (k, v) in [("rtol", rtol), ("atol", atol)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(k, format!("must be a finite number ≥ 0, got {v}")));
            }
        }
        let parts = params.num("cg_parts", 1.0)?;
        if !(parts >= 1.0 && parts.fract() == 0.0 && parts <= 1e6) {
            return Err(bad(
                "cg_parts",
                format!("must be a whole number ≥ 1, got {parts}"),
            ));
        }
        Ok(Self {
            n_models,
            objective,
            alpha: alpha_param(params)?,
            init,
            iterations: iterations as usize,
            rtol,
            atol,
            parts: parts as usize,
        })
    }

    /// Unknown's shape as (rows, cols): rows are the split unit.
    fn dims(&self, job: &TensorJob) -> Result<(usize, usize)> {
        match self.objective {
            Objective::Gram | Objective::Kfac => linear_dims(INFO.name, job),
            Objective::Ia3Block => match job.shape.as_slice() {
                [d] => Ok((*d, 1)),
                other => Err(MergeError::BadInputs {
                    method: INFO.name.into(),
                    message: format!(
                        "objective ia3_block solves 1-D (IA)^3 vectors; tensor `{}` has shape \
                         {other:?}",
                        job.name
                    ),
                }),
            },
            Objective::DiagonalFisher | Objective::Identity => Ok((job.rows(), job.cols())),
        }
    }

    /// Assemble the system: the operator and b (tensor layout, f64).
    fn assemble(&self, job: &TensorJob, reader: &dyn TensorReader) -> Result<(Operator, Vec<f64>)> {
        let n = self.n_models;
        let numel = job.numel();
        let (rows, cols) = self.dims(job)?;
        let mut b = vec![0.0f64; numel];
        let op = match self.objective {
            Objective::Identity => {
                for i in 0..n {
                    add_model(job, reader, i, &mut b)?;
                }
                Operator::Scaled(n as f64)
            }
            Objective::DiagonalFisher => {
                let mut f = vec![0.0f64; numel];
                for i in 0..n {
                    stat_shape(INFO.name, job, reader, i, "fisher", Some(&job.shape))?;
                }
                let mut x = Vec::new();
                let mut s = Vec::new();
                for range in job.blocks() {
                    x.resize(range.len(), 0.0f32);
                    s.resize(range.len(), 0.0f32);
                    for i in 0..n {
                        read_checked(job, reader, Input::Model(i), range.clone(), &mut x)?;
                        read_stat_checked(job, reader, i, "fisher", range.clone(), &mut s)?;
                        for (k, e) in range.clone().enumerate() {
                            let fi = f64::from(s[k]);
                            f[e] += fi;
                            b[e] += fi * f64::from(x[k]);
                        }
                    }
                }
                Operator::Diagonal(f)
            }
            Objective::Gram => {
                let d = cols;
                let mut g = vec![0.0f64; d * d];
                for i in 0..n {
                    stat_shape(INFO.name, job, reader, i, "gram_in", Some(&[d, d]))?;
                }
                for i in 0..n {
                    let gi = read_square_stat(INFO.name, job, reader, i, "gram_in", d, self.alpha)?;
                    for (x, y) in g.iter_mut().zip(&gi) {
                        *x += y;
                    }
                    add_weight_times(job, reader, i, &gi, None, &mut b)?;
                }
                Operator::Gram { g, d }
            }
            Objective::Kfac => {
                let (out, d) = (rows, cols);
                for i in 0..n {
                    stat_shape(INFO.name, job, reader, i, "gram_in", Some(&[d, d]))?;
                    stat_shape(INFO.name, job, reader, i, "kfac_out", Some(&[out, out]))?;
                }
                let mut a = Vec::with_capacity(n);
                let mut s = Vec::with_capacity(n);
                for i in 0..n {
                    let ai = read_square_stat(INFO.name, job, reader, i, "gram_in", d, self.alpha)?;
                    let si =
                        read_square_stat(INFO.name, job, reader, i, "kfac_out", out, self.alpha)?;
                    add_weight_times(job, reader, i, &ai, Some(&si), &mut b)?;
                    a.push(ai);
                    s.push(si);
                }
                Operator::Kfac { a, s, out, d }
            }
            Objective::Ia3Block => {
                let d = rows;
                let mut f = vec![0.0f64; d * d];
                let mut l = vec![0.0f32; d];
                for i in 0..n {
                    stat_shape(INFO.name, job, reader, i, "fisher_block", Some(&[d, d]))?;
                }
                for i in 0..n {
                    let fi =
                        read_square_stat(INFO.name, job, reader, i, "fisher_block", d, self.alpha)?;
                    read_checked(job, reader, Input::Model(i), 0..d, &mut l)?;
                    let li: Vec<f64> = l.iter().map(|v| f64::from(*v)).collect();
                    let fl = linalg::matmul(&fi, d, d, &li, 1);
                    for (x, y) in b.iter_mut().zip(&fl) {
                        *x += y;
                    }
                    for (x, y) in f.iter_mut().zip(&fi) {
                        *x += y;
                    }
                }
                Operator::Dense { f, d }
            }
        };
        Ok((op, b))
    }

    /// The initial iterate x0 (tensor layout, f64).
    fn initial(&self, job: &TensorJob, reader: &dyn TensorReader) -> Result<Vec<f64>> {
        let n = self.n_models;
        let numel = job.numel();
        let mut x = vec![0.0f64; numel];
        match self.init {
            Init::Zeros => {}
            Init::Average => {
                for i in 0..n {
                    add_model(job, reader, i, &mut x)?;
                }
                for v in &mut x {
                    *v /= n as f64;
                }
            }
            Init::Base => {
                read_input(job, reader, Input::Base, |e, v| x[e] = v)?;
            }
            Init::TaskArithmetic { lambda } => {
                let mut base = vec![0.0f64; numel];
                read_input(job, reader, Input::Base, |e, v| base[e] = v)?;
                for i in 0..n {
                    read_input(job, reader, Input::Model(i), |e, v| x[e] += v - base[e])?;
                }
                for (xe, be) in x.iter_mut().zip(&base) {
                    *xe = be + lambda * *xe;
                }
            }
            Init::Ties { density, lambda } => {
                let mut p = TensorParams::default()
                    .with_model_values("weight", &vec![1.0; n])
                    .with_model_values("density", &vec![density; n])
                    .with_global("lambda", Scalar::Num(lambda));
                p.models.truncate(n);
                let ties = crate::methods::build("ties", &p, n, true)?;
                let mut w = MemWriter::default();
                ties.merge(job, &[], reader, &mut w)?;
                for (xe, v) in x.iter_mut().zip(&w.data) {
                    *xe = f64::from(*v);
                }
            }
        }
        Ok(x)
    }

    /// Assemble and solve this tensor's block: the f64 solution (tensor layout) and the CG
    /// result. The block is split into [`Mats::part_rows`] parts; the matvec computes each
    /// part's rows separately and the inner products are summed per part in part order.
    pub(crate) fn solve_block(
        &self,
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<CgResult> {
        let (rows, cols) = self.dims(job)?;
        let (op, b) = self.assemble(job, reader)?;
        let x0 = self.initial(job, reader)?;
        let parts = self.part_rows(rows);
        let lens: Vec<usize> = parts.iter().map(|r| r.len() * cols).collect();
        let mut problem = FnProblem::local(lens, |x: &[f64], y: &mut [f64]| {
            for r in &parts {
                let v = op.apply_rows(x, r.clone(), cols);
                y[r.start * cols..r.end * cols].copy_from_slice(&v);
            }
            Ok(())
        });
        let opts = CgOptions {
            rtol: self.rtol,
            atol: self.atol,
            maxiter: self.iterations,
            ..CgOptions::default()
        };
        cg(&mut problem, Some(&x0), &b, &opts).map_err(|e| linalg::name_tensor(e, &job.name))
    }

    /// Row ranges of the parts (at least one row each; fewer parts when there are fewer rows).
    fn part_rows(&self, rows: usize) -> Vec<Range<usize>> {
        let parts = self.parts.min(rows).max(1);
        let base = rows / parts;
        let extra = rows % parts;
        let mut out = Vec::with_capacity(parts);
        let mut r = 0;
        for k in 0..parts {
            let len = base + usize::from(k < extra);
            out.push(r..r + len);
            r += len;
        }
        out
    }
}

/// Add model `i`'s values into `acc`.
fn add_model(job: &TensorJob, reader: &dyn TensorReader, i: usize, acc: &mut [f64]) -> Result<()> {
    read_input(job, reader, Input::Model(i), |e, v| acc[e] += v)
}

/// Stream `input` in blocks, calling `f(element, value)` in element order.
fn read_input(
    job: &TensorJob,
    reader: &dyn TensorReader,
    input: Input,
    mut f: impl FnMut(usize, f64),
) -> Result<()> {
    let mut buf = Vec::new();
    for range in job.blocks() {
        buf.resize(range.len(), 0.0f32);
        read_checked(job, reader, input, range.clone(), &mut buf)?;
        for (k, e) in range.enumerate() {
            f(e, f64::from(buf[k]));
        }
    }
    Ok(())
}

/// Add `W_i · g` (or `s · W_i · g` when `s` is given) into `acc` (`out × in`, row-major),
/// reading model `i`'s weight in panels of [`PANEL_ROWS`] rows.
fn add_weight_times(
    job: &TensorJob,
    reader: &dyn TensorReader,
    i: usize,
    g: &[f64],
    s: Option<&[f64]>,
    acc: &mut [f64],
) -> Result<()> {
    let (out, d) = (job.shape[0], job.shape[1]);
    let mut wg = if s.is_some() {
        vec![0.0f64; out * d]
    } else {
        Vec::new()
    };
    let mut buf = Vec::new();
    let mut o0 = 0;
    while o0 < out {
        let o1 = (o0 + PANEL_ROWS).min(out);
        let p = o1 - o0;
        buf.resize(p * d, 0.0f32);
        read_checked(job, reader, Input::Model(i), o0 * d..o1 * d, &mut buf)?;
        let w: Vec<f64> = buf.iter().map(|v| f64::from(*v)).collect();
        let prod = linalg::matmul(&w, p, d, g, d);
        let dst = if s.is_some() {
            &mut wg[o0 * d..o1 * d]
        } else {
            &mut acc[o0 * d..o1 * d]
        };
        for (x, y) in dst.iter_mut().zip(&prod) {
            *x += y;
        }
        o0 = o1;
    }
    if let Some(s) = s {
        let swg = linalg::matmul(s, out, out, &wg, d);
        for (x, y) in acc.iter_mut().zip(&swg) {
            *x += y;
        }
    }
    Ok(())
}

/// The operator A of one block, in the tensor's layout.
#[derive(Debug, Clone)]
enum Operator {
    /// x ↦ c·x.
    Scaled(f64),
    /// x ↦ f ⊙ x.
    Diagonal(Vec<f64>),
    /// W (out × d) ↦ W·g.
    Gram { g: Vec<f64>, d: usize },
    /// W (out × d) ↦ Σ_i s_i W a_i.
    Kfac {
        a: Vec<Vec<f64>>,
        s: Vec<Vec<f64>>,
        out: usize,
        d: usize,
    },
    /// x (d) ↦ f x.
    Dense { f: Vec<f64>, d: usize },
}

impl Operator {
    /// Rows `rows` (of `cols` elements) of A·p, given the whole of `p`.
    fn apply_rows(&self, p: &[f64], rows: Range<usize>, cols: usize) -> Vec<f64> {
        let lo = rows.start * cols;
        let hi = rows.end * cols;
        match self {
            Self::Scaled(c) => p[lo..hi].iter().map(|v| c * v).collect(),
            Self::Diagonal(f) => p[lo..hi]
                .iter()
                .zip(&f[lo..hi])
                .map(|(v, fi)| fi * v)
                .collect(),
            Self::Gram { g, d } => linalg::matmul(&p[lo..hi], rows.len(), *d, g, *d),
            Self::Kfac { a, s, out, d } => {
                let r = rows.len();
                let mut y = vec![0.0f64; r * d];
                for (ai, si) in a.iter().zip(s) {
                    // S_i[rows, :] · P · A_i
                    let sp = linalg::matmul(&si[rows.start * out..rows.end * out], r, *out, p, *d);
                    let spa = linalg::matmul(&sp, r, *d, ai, *d);
                    for (x, v) in y.iter_mut().zip(&spa) {
                        *x += v;
                    }
                }
                y
            }
            Self::Dense { f, d } => {
                linalg::matmul(&f[rows.start * d..rows.end * d], rows.len(), *d, p, 1)
            }
        }
    }
}

impl MergeMethod for Mats {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 2
    }

    fn whole_tensor_bytes(&self, job: &TensorJob) -> Option<u64> {
        let numel = job.numel() as u64;
        // x, r, p, q, b, x0/temporaries: about 7 f64 vectors of the tensor.
        let vectors = 8 * 7 * numel;
        let n = self.n_models as u64;
        let factors = match self.objective {
            Objective::Identity => 0,
            Objective::DiagonalFisher => 8 * numel,
            Objective::Gram => {
                let (_, d) = self.dims(job).ok()?;
                8 * 2 * (d as u64).pow(2)
            }
            Objective::Kfac => {
                let (o, d) = self.dims(job).ok()?;
                8 * (n * ((d as u64).pow(2) + (o as u64).pow(2)) + numel)
            }
            Objective::Ia3Block => {
                let (d, _) = self.dims(job).ok()?;
                8 * 2 * (d as u64).pow(2)
            }
        };
        Some(vectors + factors)
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let res = self.solve_block(job, reader)?;
        let mut rec = res.to_log_record();
        rec.insert("tensor".into(), job.name.clone().into());
        rec.insert("objective".into(), self.objective.name().into());
        rec.insert("init".into(), self.init.name().into());
        rec.insert(
            "parts".into(),
            self.part_rows(self.dims(job)?.0).len().into(),
        );
        if let Some(e) = res.x.iter().position(|v| !v.is_finite()) {
            return Err(MergeError::Numeric {
                tensor: job.name.clone(),
                message: format!("conjugate gradient produced a non-finite value at element {e}"),
            });
        }
        writer.log(rec);
        let mut buf = Vec::new();
        for range in job.blocks() {
            buf.clear();
            buf.extend(res.x[range.clone()].iter().map(|v| *v as f32));
            writer.write(range, &buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::gram::testutil::{job, rand_vec, run_invariant};
    use crate::methods::regmean::tests::{gauss_solve, gram, reader_with};
    use crate::tensor::{merge_in_memory, MemReader};

    fn params(objective: &str, init: &str) -> TensorParams {
        TensorParams::default()
            .with_global("objective", Scalar::Str(objective.into()))
            .with_global("init", Scalar::Str(init.into()))
            .with_global("iterations", Scalar::Num(500.0))
            .with_global("rtol", Scalar::Num(1e-12))
    }

    fn with(p: TensorParams, key: &str, v: f64) -> TensorParams {
        p.with_global(key, Scalar::Num(v))
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|x| f64::from(*x)).collect()
    }

    /// Max-norm relative difference.
    fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
            / scale
    }

    /// Dense matrix-vector product, row-major n×n.
    fn mv(m: &[f64], x: &[f64]) -> Vec<f64> {
        let n = x.len();
        (0..n)
            .map(|r| (0..n).map(|c| m[r * n + c] * x[c]).sum())
            .collect()
    }

    /// Off-diagonal scaling written independently: G̃ = α G + (1 − α) diag(G).
    fn scale_offdiag(g: &[f32], d: usize, alpha: f64) -> Vec<f64> {
        let mut out = vec![0.0; d * d];
        for r in 0..d {
            for c in 0..d {
                let v = f64::from(g[r * d + c]);
                out[r * d + c] = alpha * v + if r == c { (1.0 - alpha) * v } else { 0.0 };
            }
        }
        out
    }

    /// Kronecker product kron(P (p×p), Q (q×q)), row-major (pq)×(pq).
    fn kron(pm: &[f64], p: usize, qm: &[f64], q: usize) -> Vec<f64> {
        let n = p * q;
        let mut k = vec![0.0; n * n];
        for i in 0..p {
            for j in 0..p {
                for a in 0..q {
                    for b in 0..q {
                        k[(i * q + a) * n + j * q + b] = pm[i * p + j] * qm[a * q + b];
                    }
                }
            }
        }
        k
    }

    fn transpose(m: &[f64], n: usize) -> Vec<f64> {
        let mut t = vec![0.0; n * n];
        for r in 0..n {
            for c in 0..n {
                t[c * n + r] = m[r * n + c];
            }
        }
        t
    }

    struct Case {
        reader: MemReader,
        shape: Vec<usize>,
        n: usize,
    }

    /// Two or three models of a [out, d] weight with full-rank Grams that differ per model.
    fn linear_case(out: usize, d: usize, n: usize, kfac: bool) -> Case {
        let models: Vec<Vec<f32>> = (0..n as u64).map(|s| rand_vec(s + 1, out * d)).collect();
        let grams: Vec<Vec<f32>> = (0..n as u64).map(|s| gram(s + 10, 3 * d, d)).collect();
        let mut reader = reader_with(&models, "gram_in", &grams, &[d, d]);
        reader.base = Some(rand_vec(99, out * d));
        if kfac {
            for i in 0..n {
                reader.stats.insert(
                    (i, "kfac_out".into()),
                    (vec![out, out], gram(i as u64 + 20, 3 * out, out)),
                );
            }
        }
        Case {
            reader,
            shape: vec![out, d],
            n,
        }
    }

    fn stat(c: &Case, i: usize, kind: &str) -> Vec<f32> {
        c.reader.stats[&(i, kind.to_string())].1.clone()
    }

    fn solve(c: &Case, p: &TensorParams) -> CgResult {
        let m = Mats::from_params(p, c.n, c.reader.base.is_some()).unwrap();
        m.solve_block(&job(&c.shape, c.n, c.reader.base.is_some(), 64), &c.reader)
            .unwrap()
    }

    #[test]
    fn gram_objective_matches_assembled_system() {
        let (out, d) = (5, 4);
        let c = linear_case(out, d, 3, false);
        let alpha = 0.7;
        // Assembled: M = Σ_i I_out ⊗ G̃_i over vec(W) (row-major), b = Σ_i M_i vec(W_i).
        let nn = out * d;
        let eye: Vec<f64> = (0..out * out)
            .map(|e| if e / out == e % out { 1.0 } else { 0.0 })
            .collect();
        let mut m = vec![0.0; nn * nn];
        let mut b = vec![0.0; nn];
        for i in 0..c.n {
            let mi = kron(
                &eye,
                out,
                &scale_offdiag(&stat(&c, i, "gram_in"), d, alpha),
                d,
            );
            let bi = mv(&mi, &f64s(&c.reader.models[i]));
            for (x, y) in m.iter_mut().zip(&mi) {
                *x += y;
            }
            for (x, y) in b.iter_mut().zip(&bi) {
                *x += y;
            }
        }
        let want = gauss_solve(&m, &b, nn, 1);
        let p = with(params("gram", "task_arithmetic"), "alpha", alpha);
        let res = solve(&c, &p);
        assert_eq!(res.exit_code, 0);
        assert!(
            rel_diff(&res.x, &want) < 1e-9,
            "{}",
            rel_diff(&res.x, &want)
        );
        // The streamed f32 output is block- and thread-invariant and matches too.
        let mm = Mats::from_params(&p, c.n, true).unwrap();
        let got = run_invariant(&mm, &job(&c.shape, c.n, true, 64), &c.reader);
        assert!(rel_diff(&f64s(&got), &want) < 1e-6);
    }

    #[test]
    fn kfac_objective_matches_kronecker_system() {
        let (out, d) = (4, 3);
        let c = linear_case(out, d, 2, true);
        let alpha = 0.5;
        let nn = out * d;
        // X = Wᵀ (d×out); column-major vec(X) = row-major vec(W); vec(A X S) = (Sᵀ ⊗ A) vec(X).
        let mut m = vec![0.0; nn * nn];
        let mut b = vec![0.0; nn];
        let mut a_sum = vec![0.0; d * d];
        let mut s_sum = vec![0.0; out * out];
        for i in 0..c.n {
            let a = scale_offdiag(&stat(&c, i, "gram_in"), d, alpha);
            let s = scale_offdiag(&stat(&c, i, "kfac_out"), out, alpha);
            let mi = kron(&transpose(&s, out), out, &a, d);
            let bi = mv(&mi, &f64s(&c.reader.models[i]));
            for (x, y) in m.iter_mut().zip(&mi) {
                *x += y;
            }
            for (x, y) in b.iter_mut().zip(&bi) {
                *x += y;
            }
            for (x, y) in a_sum.iter_mut().zip(&a) {
                *x += y;
            }
            for (x, y) in s_sum.iter_mut().zip(&s) {
                *x += y;
            }
        }
        let want = gauss_solve(&m, &b, nn, 1);
        let res = solve(&c, &with(params("kfac", "average"), "alpha", alpha));
        assert_eq!(res.exit_code, 0);
        assert!(
            rel_diff(&res.x, &want) < 1e-9,
            "{}",
            rel_diff(&res.x, &want)
        );
        // Summing the factors first is a different (wrong) system: the test tells them apart.
        let wrong = gauss_solve(&kron(&transpose(&s_sum, out), out, &a_sum, d), &b, nn, 1);
        assert!(rel_diff(&wrong, &want) > 1e-3);
    }

    #[test]
    fn diagonal_fisher_objective_matches_assembled_system() {
        let shape = [3, 5];
        let n = 15;
        let models: Vec<Vec<f32>> = (1..3).map(|s| rand_vec(s, n)).collect();
        let mut fishers: Vec<Vec<f32>> = (5..7)
            .map(|s| rand_vec(s, n).into_iter().map(|v| v.abs() + 0.1).collect())
            .collect();
        fishers[0][4] = 0.0; // no floor: a zero stays zero, model 1 decides alone
        let reader = reader_with(&models, "fisher", &fishers, &shape);
        let c = Case {
            reader,
            shape: shape.to_vec(),
            n: 2,
        };
        let mut m = vec![0.0; n * n];
        let mut b = vec![0.0; n];
        for i in 0..2 {
            for e in 0..n {
                let f = f64::from(fishers[i][e]);
                m[e * n + e] += f;
                b[e] += f * f64::from(models[i][e]);
            }
        }
        let want = gauss_solve(&m, &b, n, 1);
        let res = solve(&c, &params("diagonal_fisher", "zeros"));
        assert!(rel_diff(&res.x, &want) < 1e-9);
        assert!((res.x[4] - f64::from(models[1][4])).abs() < 1e-9);
    }

    #[test]
    fn ia3_block_objective_matches_assembled_system() {
        let d = 6;
        let models: Vec<Vec<f32>> = (1..4)
            .map(|s| rand_vec(s, d).into_iter().map(|v| 1.0 + 0.1 * v).collect())
            .collect();
        let blocks: Vec<Vec<f32>> = (10..13).map(|s| gram(s, 2 * d, d)).collect();
        let mut reader = reader_with(&models, "fisher_block", &blocks, &[d, d]);
        reader.base = Some(vec![1.0; d]);
        let c = Case {
            reader,
            shape: vec![d],
            n: 3,
        };
        let alpha = 0.9;
        let mut m = vec![0.0; d * d];
        let mut b = vec![0.0; d];
        for i in 0..3 {
            let f = scale_offdiag(&blocks[i], d, alpha);
            let fl = mv(&f, &f64s(&models[i]));
            for (x, y) in m.iter_mut().zip(&f) {
                *x += y;
            }
            for (x, y) in b.iter_mut().zip(&fl) {
                *x += y;
            }
        }
        let want = gauss_solve(&m, &b, d, 1);
        let res = solve(
            &c,
            &with(
                with(params("ia3_block", "task_arithmetic"), "alpha", alpha),
                "init_lambda",
                0.2,
            ),
        );
        assert!(rel_diff(&res.x, &want) < 1e-9);
        // A 2-D tensor is not an (IA)^3 vector.
        let m = Mats::from_params(&params("ia3_block", "zeros"), 3, true).unwrap();
        let e = merge_in_memory(&m, &job(&[2, 3], 3, true, 6), &c.reader).unwrap_err();
        assert!(e.to_string().contains("1-D"), "{e}");
    }

    #[test]
    fn identity_objective_is_the_average_in_one_iteration() {
        let c = linear_case(4, 3, 3, false);
        let p = params("identity", "task_arithmetic");
        let m = Mats::from_params(&p, 3, true).unwrap();
        let mut w = crate::tensor::MemWriter::default();
        m.merge(&job(&c.shape, 3, true, 5), &[], &c.reader, &mut w)
            .unwrap();
        let avg: Vec<f64> = (0..12)
            .map(|e| c.reader.models.iter().map(|m| f64::from(m[e])).sum::<f64>() / 3.0)
            .collect();
        assert!(rel_diff(&f64s(&w.data), &avg) < 1e-6);
        assert_eq!(w.logs.len(), 1);
        let log = &w.logs[0];
        assert_eq!(log["iterations"], 1);
        assert_eq!(log["exit_code"], 0);
        assert_eq!(log["tensor"], "model.layers.0.mlp.up_proj.weight");
        assert_eq!(log["objective"], "identity");
        assert!(log["initial_residual"].as_f64().unwrap() > 0.0);
        assert!(log["final_residual"].as_f64().unwrap() < 1e-5);
    }

    #[test]
    fn split_solves_equal_unsplit() {
        let lin = linear_case(10, 4, 3, true);
        let fishers: Vec<Vec<f32>> = (5..8)
            .map(|s| rand_vec(s, 40).into_iter().map(|v| v.abs()).collect())
            .collect();
        let mut diag = reader_with(&lin.reader.models, "fisher", &fishers, &[10, 4]);
        diag.base = lin.reader.base.clone();
        let d = 9;
        let blocks: Vec<Vec<f32>> = (10..13).map(|s| gram(s, 2 * d, d)).collect();
        let ia3 = reader_with(
            &(1..4).map(|s| rand_vec(s, d)).collect::<Vec<_>>(),
            "fisher_block",
            &blocks,
            &[d, d],
        );
        let cases = [
            (
                "gram",
                Case {
                    reader: lin.reader.clone(),
                    shape: vec![10, 4],
                    n: 3,
                },
                "task_arithmetic",
            ),
            (
                "kfac",
                Case {
                    reader: lin.reader.clone(),
                    shape: vec![10, 4],
                    n: 3,
                },
                "ties",
            ),
            (
                "diagonal_fisher",
                Case {
                    reader: diag,
                    shape: vec![10, 4],
                    n: 3,
                },
                "average",
            ),
            (
                "ia3_block",
                Case {
                    reader: ia3,
                    shape: vec![d],
                    n: 3,
                },
                "zeros",
            ),
        ];
        for (objective, c, init) in &cases {
            // A few iterations, not converged: the whole trajectory must agree.
            let p = with(params(objective, init), "iterations", 4.0);
            let whole = solve(c, &p);
            for parts in [2.0, 3.0, 5.0] {
                let split = solve(c, &with(p.clone(), "cg_parts", parts));
                let r = rel_diff(&split.x, &whole.x);
                assert!(r <= 1e-12, "{objective} with {parts} parts: {r}");
                assert_eq!(split.iterations, whole.iterations);
            }
        }
    }

    #[test]
    fn all_zero_statistics_keep_the_initialisation() {
        let mut c = linear_case(3, 2, 2, false);
        for i in 0..2 {
            c.reader
                .stats
                .insert((i, "gram_in".into()), (vec![2, 2], vec![0.0; 4]));
        }
        let p = params("gram", "task_arithmetic");
        let res = solve(&c, &p);
        let base = f64s(c.reader.base.as_ref().unwrap());
        let want: Vec<f64> = (0..6)
            .map(|e| {
                base[e]
                    + 0.3
                        * (0..2)
                            .map(|i| f64::from(c.reader.models[i][e]) - base[e])
                            .sum::<f64>()
            })
            .collect();
        assert!(rel_diff(&res.x, &want) < 1e-12);
        assert_eq!(res.exit_code, 0);
        assert_eq!(res.iterations, 0);
    }

    #[test]
    fn singular_gram_keeps_dead_features_at_init() {
        let (out, d) = (4, 4);
        let mut c = linear_case(out, d, 2, false);
        // Feature 1 never fires: row/column 1 of every Gram is zero.
        for i in 0..2 {
            let g = c.reader.stats.get_mut(&(i, "gram_in".into())).unwrap();
            for k in 0..d {
                g.1[k * d + 1] = 0.0;
                g.1[d + k] = 0.0;
            }
        }
        let res = solve(&c, &params("gram", "average"));
        assert_eq!(res.exit_code, 0, "a consistent singular system converges");
        for o in 0..out {
            let avg = (f64::from(c.reader.models[0][o * d + 1])
                + f64::from(c.reader.models[1][o * d + 1]))
                / 2.0;
            assert!((res.x[o * d + 1] - avg).abs() < 1e-12);
        }
        // The live features solve the 3×3 subsystem, written out densely.
        let live = [0usize, 2, 3];
        let mut a = vec![0.0; 9];
        let mut b = vec![0.0; 3 * out];
        for i in 0..2 {
            let g = stat(&c, i, "gram_in");
            for (r, &kr) in live.iter().enumerate() {
                for (q, &kq) in live.iter().enumerate() {
                    let v = f64::from(g[kr * d + kq]);
                    a[r * 3 + q] += v;
                    for o in 0..out {
                        b[r * out + o] += v * f64::from(c.reader.models[i][o * d + kq]);
                    }
                }
            }
        }
        let x = gauss_solve(&a, &b, 3, out);
        for o in 0..out {
            for (r, &k) in live.iter().enumerate() {
                let (got, want) = (res.x[o * d + k], x[r * out + o]);
                assert!(
                    (got - want).abs() < 1e-8 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn initialisations() {
        let c = linear_case(3, 4, 2, false);
        let n = 12;
        let base = f64s(c.reader.base.as_ref().unwrap());
        let zero_iters = |init: &str| {
            let p = with(params("gram", init), "iterations", 0.0);
            solve(&c, &p).x
        };
        let ta: Vec<f64> = (0..n)
            .map(|e| {
                base[e]
                    + 0.3
                        * (0..2)
                            .map(|i| f64::from(c.reader.models[i][e]) - base[e])
                            .sum::<f64>()
            })
            .collect();
        assert!(rel_diff(&zero_iters("task_arithmetic"), &ta) < 1e-12);
        assert_eq!(zero_iters("base"), base);
        assert_eq!(zero_iters("zeros"), vec![0.0; n]);
        // ties: this crate's `ties` with density 0.2, weight 1, lambda 1.
        let tp = TensorParams::default()
            .with_model_values("weight", &[1.0, 1.0])
            .with_model_values("density", &[0.2, 0.2]);
        let ties = crate::methods::build("ties", &tp, 2, true).unwrap();
        let want = merge_in_memory(ties.as_ref(), &job(&[3, 4], 2, true, 12), &c.reader).unwrap();
        assert_eq!(zero_iters("ties"), f64s(&want));
        // No base: the default is the average; a base-needing init is an error naming `init`.
        let m = Mats::from_params(&TensorParams::default(), 2, false).unwrap();
        assert_eq!(m.init, Init::Average);
        match Mats::from_params(&params("gram", "task_arithmetic"), 2, false) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "init"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_model_key_and_parameters() {
        let mut c = linear_case(3, 2, 2, true);
        c.reader.stats.remove(&(1, "kfac_out".to_string()));
        let m = Mats::from_params(&params("kfac", "average"), 2, true).unwrap();
        let e = merge_in_memory(&m, &job(&c.shape, 2, true, 6), &c.reader)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model #1") && e.contains("up_proj.weight::kfac_out"),
            "{e}"
        );
        c.reader.stats.remove(&(0, "gram_in".to_string()));
        let m = Mats::from_params(&params("gram", "average"), 2, true).unwrap();
        let e = merge_in_memory(&m, &job(&c.shape, 2, true, 6), &c.reader)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model #0") && e.contains("::gram_in"), "{e}");
        for (key, v) in [
            ("objective", Scalar::Str("hessian".into())),
            ("init", Scalar::Str("nope".into())),
            ("cg_parts", Scalar::Num(0.0)),
            ("iterations", Scalar::Num(-1.0)),
            ("rtol", Scalar::Num(-1.0)),
            ("alpha", Scalar::Num(2.0)),
        ] {
            let p = TensorParams::default().with_global(key, v);
            match Mats::from_params(&p, 2, true) {
                Err(MergeError::BadParameter { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        let m = Mats::from_params(&params("kfac", "average"), 2, true).unwrap();
        assert!(m.whole_tensor_bytes(&job(&[3, 2], 2, true, 6)).is_some());
    }
}
