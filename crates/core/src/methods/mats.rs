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
//! ‖r‖ < max(rtol·‖b‖, atol), checked before each step (SciPy's strict test).
//!
//! `cg_parts` (default 1) splits the block into that many parts by output rows (the
//! reference's output columns of X; elements for 1-D tensors), each part computing its slice
//! of the matvec and its partial inner products, summed in part order: the split exercised in
//! one process is the one the cluster runs. `max_block_bytes` (default none: no automatic
//! split; architecture.md "Split blocks") splits a block whose solve needs more than that many
//! bytes ([`MergeMethod::whole_tensor_bytes`]) into `ceil(bytes / max_block_bytes)` parts,
//! rounded so every part starts at a multiple of the reduction chunk ([`REDUCE_CHUNK`]
//! elements) and of the matvec tile ([`MATVEC_TILE_ROWS`] rows): the split solve is then
//! bit-identical to the unsplit one ([`auto_part_rows`]; fewer parts when the rows do not allow
//! as many). An explicit `cg_parts` wins over it.
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
use crate::reduce::REDUCE_CHUNK;
use crate::solve::cg::{cg, CgOptions, CgResult, DeviceSystem, FnProblem};
use crate::tensor::{Input, MemWriter, TensorJob, TensorReader, TensorWriter};
use std::borrow::Cow;
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
        "max_block_bytes",
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
#[derive(Debug, Clone, PartialEq)]
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
    /// x0 = this tensor's namesake in a checkpoint (the path as written in the config), read
    /// through [`TensorReader::read_extra`].
    Checkpoint(String),
}

impl Init {
    fn name(&self) -> &str {
        match self {
            Self::TaskArithmetic { .. } => "task_arithmetic",
            Self::Ties { .. } => "ties",
            Self::Average => "average",
            Self::Base => "base",
            Self::Zeros => "zeros",
            Self::Checkpoint(path) => path,
        }
    }
}

/// The named values of `init` (with their aliases); any other value is a checkpoint path.
pub const NAMED_INITS: &[&str] = &[
    "task_arithmetic",
    "ties",
    "average",
    "base",
    "pretrained",
    "zeros",
    "none",
];

/// The checkpoint path an `init` value names, or `None` for a named initialisation.
pub fn init_checkpoint(value: &str) -> Option<&str> {
    (!NAMED_INITS.contains(&value)).then_some(value)
}

/// Every checkpoint path a `mats` config's `init` parameter names (top-level and slice
/// parameters, every filtered or stepped value), as written, in first-seen order; empty for
/// other methods. The engine opens these as extra inputs and serves them through
/// [`TensorReader::read_extra`].
pub fn init_checkpoint_paths(config: &crate::config::MergeConfig) -> Vec<String> {
    use crate::config::ParamValue;
    let mut out: Vec<String> = Vec::new();
    if config.merge_method != INFO.name {
        return out;
    }
    let mut add = |v: &Scalar| {
        if let Scalar::Str(s) = v {
            if let Some(p) = init_checkpoint(s) {
                if !out.iter().any(|o| o == p) {
                    out.push(p.to_string());
                }
            }
        }
    };
    let maps =
        std::iter::once(&config.parameters).chain(config.slices.iter().map(|s| &s.parameters));
    for map in maps {
        match map.get("init") {
            Some(ParamValue::Scalar(v)) => add(v),
            Some(ParamValue::Filtered(list)) => {
                for f in list {
                    if let ParamValue::Scalar(v) = &f.value {
                        add(v);
                    }
                }
            }
            Some(ParamValue::Steps(list)) => list.iter().for_each(&mut add),
            Some(ParamValue::Gradient(_)) | None => {}
        }
    }
    out
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
    /// Explicit `cg_parts`.
    parts: Option<usize>,
    /// `max_block_bytes`: split a block whose solve needs more into parts.
    max_block_bytes: Option<u64>,
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
        let init =
            match name.as_str() {
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
                "" => return Err(bad(
                    "init",
                    "expected task_arithmetic, ties, average, base, zeros or a checkpoint path, \
                     got an empty string"
                        .into(),
                )),
                path => Init::Checkpoint(path.to_string()),
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
        let parts = params.opt_num("cg_parts")?;
        if let Some(parts) = parts {
            if !(parts >= 1.0 && parts.fract() == 0.0 && parts <= 1e6) {
                return Err(bad(
                    "cg_parts",
                    format!("must be a whole number ≥ 1, got {parts}"),
                ));
            }
        }
        let max_block_bytes = params.opt_num("max_block_bytes")?;
        if let Some(m) = max_block_bytes {
            if !(m >= 1.0 && m.fract() == 0.0 && m < 1.8e19) {
                return Err(bad(
                    "max_block_bytes",
                    format!("must be a whole number of bytes ≥ 1, got {m}"),
                ));
            }
        }
        Ok(Self {
            n_models,
            objective,
            alpha: alpha_param(params)?,
            init,
            iterations: iterations as usize,
            rtol,
            atol,
            parts: parts.map(|p| p as usize),
            max_block_bytes: max_block_bytes.map(|m| m as u64),
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
        match &self.init {
            Init::Zeros => {}
            Init::Checkpoint(path) => read_init_checkpoint(job, reader, path, &mut x)?,
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
            &Init::TaskArithmetic { lambda } => {
                let mut base = vec![0.0f64; numel];
                read_input(job, reader, Input::Base, |e, v| base[e] = v)?;
                for i in 0..n {
                    read_input(job, reader, Input::Model(i), |e, v| x[e] += v - base[e])?;
                }
                for (xe, be) in x.iter_mut().zip(&base) {
                    *xe = be + lambda * *xe;
                }
            }
            &Init::Ties { density, lambda } => {
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

    /// The block's log record (the solver's fields plus `tensor`, `objective`, `init`,
    /// `parts`); an error when the solution holds a non-finite value.
    pub fn log_record(&self, job: &TensorJob, res: &CgResult) -> Result<crate::tensor::LogRecord> {
        let mut rec = res.to_log_record();
        rec.insert("tensor".into(), job.name.clone().into());
        rec.insert("objective".into(), self.objective.name().into());
        rec.insert("init".into(), self.init.name().into());
        rec.insert("parts".into(), self.part_rows(job)?.len().into());
        if let Some(e) = res.x.iter().position(|v| !v.is_finite()) {
            return Err(MergeError::Numeric {
                tensor: job.name.clone(),
                message: format!("conjugate gradient produced a non-finite value at element {e}"),
            });
        }
        Ok(rec)
    }

    /// Solve part `part` of this tensor's block ([`Mats::part_rows`]) as one member of a gang
    /// whose other parts run elsewhere (other threads or processes), meeting in `reduce`.
    ///
    /// `reduce(values)` must return the element-wise sum of every part's `values` (all parts
    /// pass vectors of the same length), added in part order: the cluster's Reduce RPC. Each
    /// inner product sends a vector with one slot per chunk of every part, this part's partials
    /// in its own slots and zeros elsewhere, so the sum is the concatenation of all parts'
    /// partials and the scalar is summed from it in chunk order exactly as in one process: the
    /// result is bit-identical to [`Mats::solve_block`]'s rows. Operators whose rows need the
    /// whole direction (`kfac`, `ia3_block`) gather it with one more `reduce` per product (each
    /// part contributes its rows). Every part makes the same sequence of calls.
    ///
    /// Returns the part's row range and the CG result; its `x` holds the part's rows only, its
    /// residuals are global.
    pub fn solve_part(
        &self,
        job: &TensorJob,
        reader: &dyn TensorReader,
        part: usize,
        reduce: &mut dyn FnMut(&[f64]) -> Result<Vec<f64>>,
    ) -> Result<(Range<usize>, CgResult)> {
        let (_, cols) = self.dims(job)?;
        let parts = self.part_rows(job)?;
        let rows = parts.get(part).cloned().ok_or_else(|| {
            bad(
                "cg_parts",
                format!(
                    "tensor \"{}\" has {} parts, no part #{part}",
                    job.name,
                    parts.len()
                ),
            )
        })?;
        let (op, b) = self.assemble(job, reader)?;
        let x0 = self.initial(job, reader)?;
        let (lo, hi) = (rows.start * cols, rows.end * cols);
        let opts = self.cg_options();
        // A part on a device that solves it (the GPU's CG, the vectors kept on the device;
        // its partials, and the gathered directions of `kfac` and `ia3_block`, meet the other
        // parts' through `reduce` or a device collective).
        if let Some(dev) = reader.device_solver() {
            let sys = op.part_system(lo, hi);
            let split = crate::solve::cg::SplitPart {
                part,
                part_lens: parts.iter().map(|r| r.len() * cols).collect(),
            };
            let res = dev
                .solve_part(&sys, &b[lo..hi], &x0[lo..hi], &opts, &split, reduce)
                .map_err(|e| linalg::name_tensor(e, &job.name))?;
            return Ok((rows, res));
        }
        let chunk = REDUCE_CHUNK;
        let slots: Vec<usize> = parts
            .iter()
            .map(|r| (r.len() * cols).div_ceil(chunk))
            .collect();
        let total: usize = slots.iter().sum();
        let offset: usize = slots[..part].iter().sum();
        let numel = job.numel();
        let gather = matches!(op, Operator::Kfac { .. } | Operator::Dense { .. });
        let reduce = std::cell::RefCell::new(reduce);
        let mut full = vec![0.0f64; numel];
        let matvec = |x: &[f64], y: &mut [f64]| -> Result<()> {
            full[lo..hi].copy_from_slice(x);
            if gather {
                let mut mine = vec![0.0f64; numel];
                mine[lo..hi].copy_from_slice(x);
                let all = (reduce.borrow_mut())(&mine)?;
                if all.len() != numel {
                    return Err(MergeError::Read(format!(
                        "reduction returned {} values, expected {numel}",
                        all.len()
                    )));
                }
                full.copy_from_slice(&all);
            }
            y.copy_from_slice(&op.apply_rows(&full, rows.clone(), cols));
            Ok(())
        };
        let sum = |partials: &[f64]| -> Result<f64> {
            let mut v = vec![0.0f64; total];
            v[offset..offset + partials.len()].copy_from_slice(partials);
            let all = (reduce.borrow_mut())(&v)?;
            if all.len() != total {
                return Err(MergeError::Read(format!(
                    "reduction returned {} values, expected {total}",
                    all.len()
                )));
            }
            Ok(crate::solve::cg::sum_in_order(&all))
        };
        let mut problem = FnProblem {
            parts: vec![hi - lo],
            matvec,
            reduce: sum,
        };
        let res = cg(&mut problem, Some(&x0[lo..hi]), &b[lo..hi], &opts)
            .map_err(|e| linalg::name_tensor(e, &job.name))?;
        Ok((rows, res))
    }

    /// Assemble and solve this tensor's block: the f64 solution (tensor layout) and the CG
    /// result. The block is split into [`Mats::part_rows`] parts; the matvec computes each
    /// part's rows separately and the inner products are summed per part in part order.
    pub(crate) fn solve_block(
        &self,
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<CgResult> {
        let (_, cols) = self.dims(job)?;
        let (op, b) = self.assemble(job, reader)?;
        let x0 = self.initial(job, reader)?;
        let parts = self.part_rows(job)?;
        let opts = self.cg_options();
        // On a device that solves it (the GPU's CG), the block whole: one process holds every
        // part, and the device's partials of parts starting at multiples of its chunk are
        // those of the whole block.
        if let Some(dev) = reader.device_solver() {
            return dev
                .solve(&op.device_system(b.len()), &b, &x0, &opts)
                .map_err(|e| linalg::name_tensor(e, &job.name));
        }
        let lens: Vec<usize> = parts.iter().map(|r| r.len() * cols).collect();
        let mut problem = FnProblem::local(lens, |x: &[f64], y: &mut [f64]| {
            for r in &parts {
                let v = op.apply_rows(x, r.clone(), cols);
                y[r.start * cols..r.end * cols].copy_from_slice(&v);
            }
            Ok(())
        });
        cg(&mut problem, Some(&x0), &b, &opts).map_err(|e| linalg::name_tensor(e, &job.name))
    }

    /// The CG options of this block's solves.
    fn cg_options(&self) -> CgOptions {
        CgOptions {
            rtol: self.rtol,
            atol: self.atol,
            maxiter: self.iterations,
            ..CgOptions::default()
        }
    }

    /// Row ranges of this block's parts: `cg_parts` when given (an even split), else the
    /// split `max_block_bytes` asks for ([`Mats::auto_part_rows`]), else one part.
    pub fn part_rows(&self, job: &TensorJob) -> Result<Vec<Range<usize>>> {
        let (rows, cols) = self.dims(job)?;
        Ok(match (self.parts, self.max_block_bytes) {
            (Some(p), _) => even_rows(rows, p),
            (None, Some(max)) => {
                let bytes = self.whole_tensor_bytes(job).unwrap_or(0);
                auto_part_rows(rows, cols, bytes.div_ceil(max.max(1)) as usize)
            }
            (None, None) => even_rows(rows, 1),
        })
    }
}

/// How many parts a `mats` tensor's block is solved in (`cg_parts`, else `max_block_bytes`),
/// for the dry run and the cluster's shard construction; `None` for other methods.
pub fn block_parts(method: &str, params: &TensorParams, job: &TensorJob) -> Result<Option<usize>> {
    if method != INFO.name {
        return Ok(None);
    }
    let m = Mats::from_params(params, job.n_models, job.has_base)?;
    Ok(Some(m.part_rows(job)?.len()))
}

/// The row ranges a `mats` tensor's block is solved in ([`Mats::part_rows`]; rows of the
/// unknown, whose elements are contiguous in the tensor's layout) and the elements per row;
/// `None` for other methods.
pub fn block_part_rows(
    method: &str,
    params: &TensorParams,
    job: &TensorJob,
) -> Result<Option<(Vec<Range<usize>>, usize)>> {
    if method != INFO.name {
        return Ok(None);
    }
    let m = Mats::from_params(params, job.n_models, job.has_base)?;
    let (_, cols) = m.dims(job)?;
    Ok(Some((m.part_rows(job)?, cols)))
}

/// Rows of one matvec tile: the operator is applied in tiles of this many rows at fixed
/// (global) row offsets, so a part starting at a multiple of it computes exactly the bits the
/// unsplit block does.
pub const MATVEC_TILE_ROWS: usize = 64;

/// Row ranges splitting `rows` rows of `cols` elements into about `want` parts, each part
/// starting at a multiple of both [`MATVEC_TILE_ROWS`] rows and [`REDUCE_CHUNK`] elements (the
/// last part takes the remainder), so the split solve is bit-identical to the unsplit one.
/// Fewer parts when the rows do not allow `want`.
pub fn auto_part_rows(rows: usize, cols: usize, want: usize) -> Vec<Range<usize>> {
    let cols = cols.max(1);
    let chunk_rows = REDUCE_CHUNK / gcd(cols, REDUCE_CHUNK);
    let unit = lcm(chunk_rows, MATVEC_TILE_ROWS);
    let want = want.max(1);
    let per = rows.div_ceil(want).div_ceil(unit).max(1) * unit;
    let mut out = Vec::new();
    let mut r = 0;
    while r < rows {
        out.push(r..(r + per).min(rows));
        r += per;
    }
    if out.is_empty() {
        out.push(0..rows);
    }
    out
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// `rows` split evenly into `parts` ranges (at least one row each; fewer parts when there are
/// fewer rows).
fn even_rows(rows: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.min(rows).max(1);
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

/// Read x0 from the init checkpoint `path` (served by the reader as an extra input): the
/// tensor must exist there with the job's shape and hold finite values.
fn read_init_checkpoint(
    job: &TensorJob,
    reader: &dyn TensorReader,
    path: &str,
    x: &mut [f64],
) -> Result<()> {
    match reader.extra_shape(path)? {
        None => {
            return Err(bad(
                "init",
                format!(
                    "init checkpoint `{path}` has no tensor \"{}\" (or was not opened); `init` \
                     is a checkpoint path unless it is one of {}",
                    job.name,
                    NAMED_INITS.join(", ")
                ),
            ))
        }
        Some(shape) if shape != job.shape => {
            return Err(bad(
                "init",
                format!(
                    "init checkpoint `{path}`: tensor \"{}\" has shape {shape:?}, the merge \
                     needs {:?}",
                    job.name, job.shape
                ),
            ))
        }
        Some(_) => {}
    }
    let mut buf = Vec::new();
    for range in job.blocks() {
        buf.resize(range.len(), 0.0f32);
        reader.read_extra(path, range.clone(), &mut buf)?;
        if let Some(k) = buf.iter().position(|v| !v.is_finite()) {
            return Err(bad(
                "init",
                format!(
                    "init checkpoint `{path}`: tensor \"{}\" holds a non-finite value ({}) at \
                     element {}",
                    job.name,
                    buf[k],
                    range.start + k
                ),
            ));
        }
        for (xe, v) in x[range].iter_mut().zip(&buf) {
            *xe = f64::from(*v);
        }
    }
    Ok(())
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
    /// The system a device solves for the whole block (`len` elements).
    fn device_system(&self, len: usize) -> DeviceSystem<'_> {
        match self {
            Self::Scaled(c) => DeviceSystem::Diagonal {
                f: Cow::Owned(vec![*c; len]),
            },
            Self::Diagonal(f) => DeviceSystem::Diagonal {
                f: Cow::Borrowed(f),
            },
            Self::Gram { g, d } => DeviceSystem::Gram {
                a: Cow::Borrowed(g),
                n: *d,
            },
            Self::Kfac { a, s, out, d } => DeviceSystem::Kfac {
                a,
                s,
                out: *out,
                d: *d,
            },
            Self::Dense { f, d } => DeviceSystem::Dense { f, d: *d },
        }
    }

    /// The system of the elements `lo..hi` of a split block: a diagonal's own values, else
    /// the whole block's operator (the device gathers the direction for K-FAC and dense
    /// products).
    fn part_system(&self, lo: usize, hi: usize) -> DeviceSystem<'_> {
        match self {
            Self::Scaled(c) => DeviceSystem::Diagonal {
                f: Cow::Owned(vec![*c; hi - lo]),
            },
            Self::Diagonal(f) => DeviceSystem::Diagonal {
                f: Cow::Borrowed(&f[lo..hi]),
            },
            other => other.device_system(hi - lo),
        }
    }

    /// Rows `rows` (of `cols` elements) of A·p, given the whole of `p`, computed in tiles of
    /// [`MATVEC_TILE_ROWS`] rows at global offsets (cut at `rows`' ends), in parallel.
    fn apply_rows(&self, p: &[f64], rows: Range<usize>, cols: usize) -> Vec<f64> {
        use rayon::prelude::*;
        let t = MATVEC_TILE_ROWS;
        let mut tiles = Vec::new();
        let mut r = rows.start;
        while r < rows.end {
            let end = ((r / t + 1) * t).min(rows.end);
            tiles.push(r..end);
            r = end;
        }
        let parts: Vec<Vec<f64>> = tiles
            .into_par_iter()
            .map(|tile| self.apply_tile(p, tile, cols))
            .collect();
        parts.concat()
    }

    /// Rows `rows` of A·p in one piece.
    fn apply_tile(&self, p: &[f64], rows: Range<usize>, cols: usize) -> Vec<f64> {
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
        let rec = self.log_record(job, &res)?;
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
            ("init", Scalar::Str(String::new())),
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

    /// A reader serving extra checkpoints (by key) besides a [`MemReader`]'s inputs.
    struct ExtraReader {
        inner: MemReader,
        extras: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    }

    impl TensorReader for ExtraReader {
        fn read(&self, input: Input, range: Range<usize>, out: &mut [f32]) -> Result<()> {
            self.inner.read(input, range, out)
        }
        fn stat_shape(&self, model: usize, kind: &str) -> Result<Option<Vec<usize>>> {
            self.inner.stat_shape(model, kind)
        }
        fn read_stat(
            &self,
            model: usize,
            kind: &str,
            range: Range<usize>,
            out: &mut [f32],
        ) -> Result<()> {
            self.inner.read_stat(model, kind, range, out)
        }
        fn extra_shape(&self, key: &str) -> Result<Option<Vec<usize>>> {
            Ok(self.extras.get(key).map(|e| e.0.clone()))
        }
        fn read_extra(&self, key: &str, range: Range<usize>, out: &mut [f32]) -> Result<()> {
            out.copy_from_slice(&self.extras[key].1[range]);
            Ok(())
        }
    }

    fn with_init_ckpt(c: &Case, shape: &[usize], values: Vec<f32>) -> ExtraReader {
        let mut extras = std::collections::BTreeMap::new();
        extras.insert(
            "ckpt/init.safetensors".to_string(),
            (shape.to_vec(), values),
        );
        ExtraReader {
            inner: c.reader.clone(),
            extras,
        }
    }

    fn ckpt_params(objective: &str) -> TensorParams {
        params(objective, "ckpt/init.safetensors")
    }

    /// The assembled Gram system M vec(W) = b (row-major vec, M = Σ_i I ⊗ G_i), written
    /// independently of the code under test.
    fn dense_gram_system(c: &Case) -> (Vec<f64>, Vec<f64>) {
        let (out, d) = (c.shape[0], c.shape[1]);
        let nn = out * d;
        let mut m = vec![0.0; nn * nn];
        let mut b = vec![0.0; nn];
        for i in 0..c.n {
            let g = stat(c, i, "gram_in");
            let w = &c.reader.models[i];
            for o in 0..out {
                for r in 0..d {
                    for q in 0..d {
                        let gv = f64::from(g[r * d + q]);
                        m[(o * d + r) * nn + o * d + q] += gv;
                        b[o * d + r] += gv * f64::from(w[o * d + q]);
                    }
                }
            }
        }
        (m, b)
    }

    #[test]
    fn init_checkpoint_at_the_solution_takes_no_step() {
        let c = linear_case(4, 3, 2, false);
        let (m, b) = dense_gram_system(&c);
        let sol: Vec<f32> = gauss_solve(&m, &b, 12, 1)
            .iter()
            .map(|v| *v as f32)
            .collect();
        // Precondition, computed here: the f32-rounded solution is within rtol.
        let ax = mv(&m, &f64s(&sol));
        let res: f64 = ax.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        let bn: f64 = b.iter().map(|v| v * v).sum::<f64>();
        assert!(res.sqrt() < 1e-4 * bn.sqrt());
        let reader = with_init_ckpt(&c, &[4, 3], sol.clone());
        let p = with(ckpt_params("gram"), "rtol", 1e-4);
        let mm = Mats::from_params(&p, 2, true).unwrap();
        assert_eq!(
            mm.init,
            Init::Checkpoint("ckpt/init.safetensors".to_string())
        );
        let mut w = MemWriter::default();
        mm.merge(&job(&[4, 3], 2, true, 5), &[], &reader, &mut w)
            .unwrap();
        assert_eq!(w.data, sol);
        assert_eq!(w.logs[0]["iterations"], 0);
        assert_eq!(w.logs[0]["exit_code"], 0);
        assert_eq!(w.logs[0]["init"], "ckpt/init.safetensors");
    }

    #[test]
    fn init_checkpoint_matches_textbook_cg_from_that_x0() {
        let c = linear_case(5, 4, 3, false);
        let x0 = rand_vec(77, 20);
        let reader = with_init_ckpt(&c, &[5, 4], x0.clone());
        let (m, b) = dense_gram_system(&c);
        // Textbook CG (methods.md §11 recurrence) from x0, 3 steps, in f64.
        let mut x = f64s(&x0);
        let ax = mv(&m, &x);
        let mut r: Vec<f64> = b.iter().zip(&ax).map(|(bi, ai)| bi - ai).collect();
        let mut p = r.clone();
        let mut rho: f64 = r.iter().map(|v| v * v).sum();
        for _ in 0..3 {
            let q = mv(&m, &p);
            let alpha = rho / p.iter().zip(&q).map(|(a, b)| a * b).sum::<f64>();
            for k in 0..20 {
                x[k] += alpha * p[k];
                r[k] -= alpha * q[k];
            }
            let rho2: f64 = r.iter().map(|v| v * v).sum();
            for k in 0..20 {
                p[k] = r[k] + rho2 / rho * p[k];
            }
            rho = rho2;
        }
        let p = with(ckpt_params("gram"), "iterations", 3.0);
        let mm = Mats::from_params(&p, 3, true).unwrap();
        let got = mm.solve_block(&job(&[5, 4], 3, true, 7), &reader).unwrap();
        assert_eq!(got.iterations, 3);
        assert_eq!(got.exit_code, 3);
        assert!(rel_diff(&got.x, &x) < 1e-9, "{}", rel_diff(&got.x, &x));
        // Not the same as starting anywhere else.
        let other = solve(&c, &with(params("gram", "average"), "iterations", 3.0));
        assert!(rel_diff(&other.x, &x) > 1e-6);
        // No base is needed for a checkpoint init.
        assert!(Mats::from_params(&p, 3, false).is_ok());
    }

    #[test]
    fn init_checkpoint_errors_name_file_and_tensor() {
        let c = linear_case(3, 2, 2, false);
        let j = job(&[3, 2], 2, true, 6);
        let m = Mats::from_params(&ckpt_params("gram"), 2, true).unwrap();
        type Extra = Option<(Vec<usize>, Vec<f32>)>;
        let cases: [(Extra, &str); 3] = [
            (None, "has no tensor"),
            (Some((vec![2, 3], vec![0.0; 6])), "shape [2, 3]"),
            (
                Some((vec![3, 2], vec![0.0, 1.0, f32::NAN, 0.0, 0.0, 0.0])),
                "non-finite value (NaN) at element 2",
            ),
        ];
        for (extra, want) in cases {
            let mut reader = with_init_ckpt(&c, &[3, 2], vec![0.0; 6]);
            reader.extras.clear();
            if let Some(e) = extra {
                reader.extras.insert("ckpt/init.safetensors".into(), e);
            }
            let mut w = MemWriter::default();
            match m.merge(&j, &[], &reader, &mut w) {
                Err(MergeError::BadParameter { key, message }) => {
                    assert_eq!(key, "init");
                    assert!(
                        message.contains("ckpt/init.safetensors")
                            && message.contains("up_proj.weight")
                            && message.contains(want),
                        "{message}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn init_checkpoint_paths_of_a_config() {
        let cfg = crate::config::parse_config(
            "merge_method: mats\nbase_model: b\nmodels: [{model: a}, {model: c}]\n\
             parameters:\n  init:\n    - filter: mlp\n      value: ckpt/x\n    - value: average\n",
            false,
        )
        .unwrap()
        .0;
        assert_eq!(init_checkpoint_paths(&cfg), vec!["ckpt/x".to_string()]);
        assert_eq!(init_checkpoint("ties"), None);
        assert_eq!(init_checkpoint("dir/m"), Some("dir/m"));
    }

    #[test]
    fn auto_part_rows_align_to_chunks_and_tiles() {
        for (rows, cols, want) in [(1000, 4096, 3), (300, 128, 3), (5, 7, 4), (64, 100, 2)] {
            let parts = auto_part_rows(rows, cols, want);
            assert!(parts.len() <= want.max(1));
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts.last().unwrap().end, rows);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for p in &parts {
                assert!(!p.is_empty());
                assert_eq!(p.start % 64, 0, "{rows}x{cols}: {parts:?}");
                assert_eq!((p.start * cols) % 16384, 0, "{rows}x{cols}: {parts:?}");
            }
        }
        assert_eq!(
            auto_part_rows(1000, 4096, 3),
            vec![0..384, 384..768, 768..1000]
        );
        // 7 columns need 16384 rows per chunk boundary: one part.
        assert_eq!(auto_part_rows(5, 7, 4), vec![0..5]);
    }

    #[test]
    fn max_block_bytes_split_is_bit_identical_to_unsplit() {
        let (out, d) = (300, 128);
        let lin = linear_case(out, d, 2, true);
        let fishers: Vec<Vec<f32>> = (5..7)
            .map(|s| rand_vec(s, out * d).into_iter().map(|v| v.abs()).collect())
            .collect();
        let mut diag = reader_with(&lin.reader.models, "fisher", &fishers, &[out, d]);
        diag.base = lin.reader.base.clone();
        let j = job(&[out, d], 2, true, 4097);
        for (objective, reader) in [
            ("gram", &lin.reader),
            ("kfac", &lin.reader),
            ("diagonal_fisher", &diag),
        ] {
            let p = with(params(objective, "task_arithmetic"), "iterations", 4.0);
            let whole = Mats::from_params(&p, 2, true).unwrap();
            let bytes = whole.whole_tensor_bytes(&j).unwrap();
            let split = Mats::from_params(
                &with(p.clone(), "max_block_bytes", (bytes / 3 + 1) as f64),
                2,
                true,
            )
            .unwrap();
            assert_eq!(
                split.part_rows(&j).unwrap(),
                vec![0..128, 128..256, 256..300]
            );
            let (mut w1, mut w2) = (MemWriter::default(), MemWriter::default());
            whole.merge(&j, &[], reader, &mut w1).unwrap();
            split.merge(&j, &[], reader, &mut w2).unwrap();
            assert_eq!(w1.logs[0]["parts"], 1);
            assert_eq!(w2.logs[0]["parts"], 3);
            assert_eq!(w1.logs[0]["iterations"], 4);
            let r1 = whole.solve_block(&j, reader).unwrap();
            let r2 = split.solve_block(&j, reader).unwrap();
            assert!(
                r1.x.iter()
                    .zip(&r2.x)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{objective}: split differs"
            );
            assert_eq!(w1.data, w2.data);
            // Under the limit: one part. An explicit cg_parts wins over max_block_bytes.
            let big = Mats::from_params(&with(p.clone(), "max_block_bytes", bytes as f64), 2, true)
                .unwrap();
            assert_eq!(big.part_rows(&j).unwrap().len(), 1);
            let both = Mats::from_params(
                &with(with(p.clone(), "max_block_bytes", 1.0), "cg_parts", 2.0),
                2,
                true,
            )
            .unwrap();
            assert_eq!(both.part_rows(&j).unwrap(), vec![0..150, 150..300]);
        }
        match Mats::from_params(
            &with(TensorParams::default(), "max_block_bytes", 0.5),
            2,
            true,
        ) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "max_block_bytes"),
            other => panic!("{other:?}"),
        }
    }

    /// Run every part of a block on its own thread, meeting in an element-wise reduction
    /// summed in part order (what the cluster's Reduce RPC does); returns the reassembled x and
    /// the number of reductions each part made.
    fn gang_solve(m: &Mats, j: &TensorJob, reader: &dyn TensorReader) -> (Vec<f64>, Vec<usize>) {
        use std::sync::{Condvar, Mutex};
        let parts = m.part_rows(j).unwrap().len();
        // Rounds: per round, the parts' vectors; the sum once all arrived.
        type Round = (Vec<Option<Vec<f64>>>, Option<Vec<f64>>);
        let state: Mutex<Vec<Round>> = Mutex::new(Vec::new());
        let cv = Condvar::new();
        let results: Vec<(Range<usize>, CgResult, usize)> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..parts)
                .map(|k| {
                    let (state, cv) = (&state, &cv);
                    sc.spawn(move || {
                        let mut round = 0usize;
                        let mut reduce = |v: &[f64]| -> Result<Vec<f64>> {
                            let mut st = state.lock().unwrap();
                            while st.len() <= round {
                                st.push((vec![None; parts], None));
                            }
                            st[round].0[k] = Some(v.to_vec());
                            if st[round].0.iter().all(Option::is_some) {
                                let mut sum = vec![0.0; v.len()];
                                for p in st[round].0.iter().flatten() {
                                    for (s, x) in sum.iter_mut().zip(p) {
                                        *s += x;
                                    }
                                }
                                st[round].1 = Some(sum);
                                cv.notify_all();
                            }
                            while st[round].1.is_none() {
                                st = cv.wait(st).unwrap();
                            }
                            let out = st[round].1.clone().unwrap();
                            round += 1;
                            Ok(out)
                        };
                        let (r, res) = m.solve_part(j, reader, k, &mut reduce).unwrap();
                        (r, res, round)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let cols = j.numel() / j.shape[0];
        let mut x = vec![f64::NAN; j.numel()];
        let mut rounds = Vec::new();
        for (r, res, n) in results {
            x[r.start * cols..r.end * cols].copy_from_slice(&res.x);
            rounds.push(n);
        }
        (x, rounds)
    }

    /// A second device solver (this crate's CPU CG on the dense factor) standing where a GPU's
    /// would, recording what `Mats` hands it: the plumbing from a block or part to a reader's
    /// device solver.
    #[derive(Debug, Default)]
    struct RecordingGram {
        calls: std::sync::Mutex<Vec<(Option<crate::solve::cg::SplitPart>, usize)>>,
    }

    impl RecordingGram {
        /// Elements `lo..hi` of `A(x)` on the CPU, given the whole direction `full` (a
        /// diagonal holds the part's values only).
        fn apply_rows(
            sys: &DeviceSystem<'_>,
            full: &[f64],
            (lo, hi): (usize, usize),
            y: &mut [f64],
        ) -> Result<()> {
            let v = match sys {
                DeviceSystem::Gram { a, n } => {
                    linalg::matmul(&full[lo..hi], (hi - lo) / n, *n, a, *n)
                }
                DeviceSystem::Diagonal { f } => {
                    f.iter().zip(&full[lo..hi]).map(|(f, x)| f * x).collect()
                }
                DeviceSystem::Dense { f, d } => {
                    linalg::matmul(&f[lo * d..hi * d], hi - lo, *d, full, 1)
                }
                DeviceSystem::Kfac { a, s, out, d } => {
                    let (r0, r1) = (lo / d, hi / d);
                    let mut y = vec![0.0; hi - lo];
                    for (ai, si) in a.iter().zip(s.iter()) {
                        let sp = linalg::matmul(&si[r0 * out..r1 * out], r1 - r0, *out, full, *d);
                        let spa = linalg::matmul(&sp, r1 - r0, *d, ai, *d);
                        y.iter_mut().zip(&spa).for_each(|(y, v)| *y += v);
                    }
                    y
                }
            };
            y.copy_from_slice(&v);
            Ok(())
        }
    }

    impl crate::solve::cg::DeviceSolver for RecordingGram {
        fn solve(
            &self,
            sys: &DeviceSystem<'_>,
            b: &[f64],
            x0: &[f64],
            opts: &CgOptions,
        ) -> Result<CgResult> {
            self.calls.lock().unwrap().push((None, b.len()));
            let mut p = FnProblem::local(vec![b.len()], |x: &[f64], y: &mut [f64]| {
                Self::apply_rows(sys, x, (0, x.len()), y)
            });
            cg(&mut p, Some(x0), b, opts)
        }

        fn solve_part(
            &self,
            sys: &DeviceSystem<'_>,
            b: &[f64],
            x0: &[f64],
            opts: &CgOptions,
            split: &crate::solve::cg::SplitPart,
            reduce: &mut dyn FnMut(&[f64]) -> Result<Vec<f64>>,
        ) -> Result<CgResult> {
            self.calls
                .lock()
                .unwrap()
                .push((Some(split.clone()), b.len()));
            let slots = |l: &[usize]| l.iter().map(|v| v.div_ceil(REDUCE_CHUNK)).sum::<usize>();
            let offset = slots(&split.part_lens[..split.part]);
            let total = slots(&split.part_lens);
            let lo: usize = split.part_lens[..split.part].iter().sum();
            let (hi, numel) = (lo + b.len(), split.part_lens.iter().sum::<usize>());
            let gather = matches!(sys, DeviceSystem::Kfac { .. } | DeviceSystem::Dense { .. });
            let reduce = std::cell::RefCell::new(reduce);
            let mut p = FnProblem {
                parts: vec![b.len()],
                matvec: |x: &[f64], y: &mut [f64]| {
                    let mut full = vec![0.0; numel];
                    full[lo..hi].copy_from_slice(x);
                    if gather {
                        full = (reduce.borrow_mut())(&full)?;
                    }
                    Self::apply_rows(sys, &full, (lo, hi), y)
                },
                reduce: |partials: &[f64]| {
                    let mut v = vec![0.0; total];
                    v[offset..offset + partials.len()].copy_from_slice(partials);
                    Ok(crate::solve::cg::sum_in_order(&(reduce.borrow_mut())(&v)?))
                },
            };
            cg(&mut p, Some(x0), b, opts)
        }
    }

    /// A reader offering `dev` as its device solver.
    struct DeviceReader<'a> {
        inner: &'a MemReader,
        dev: &'a RecordingGram,
    }

    impl TensorReader for DeviceReader<'_> {
        fn read(&self, input: Input, range: Range<usize>, out: &mut [f32]) -> Result<()> {
            self.inner.read(input, range, out)
        }
        fn stat_shape(&self, model: usize, kind: &str) -> Result<Option<Vec<usize>>> {
            self.inner.stat_shape(model, kind)
        }
        fn read_stat(
            &self,
            model: usize,
            kind: &str,
            range: Range<usize>,
            out: &mut [f32],
        ) -> Result<()> {
            self.inner.read_stat(model, kind, range, out)
        }
        fn device_solver(&self) -> Option<&dyn crate::solve::cg::DeviceSolver> {
            Some(self.dev)
        }
    }

    #[test]
    fn gram_blocks_and_parts_go_to_the_readers_device_solver() {
        let (out, d) = (300, 128);
        let lin = linear_case(out, d, 2, false);
        let j = job(&[out, d], 2, true, 4097);
        let p = with(
            with(params("gram", "task_arithmetic"), "iterations", 5.0),
            "max_block_bytes",
            1.0,
        );
        let m = Mats::from_params(&p, 2, true).unwrap();
        let parts = m.part_rows(&j).unwrap();
        assert_eq!(parts.len(), 3);
        let (cpu, _) = gang_solve(&m, &j, &lin.reader);
        let dev = RecordingGram::default();
        let reader = DeviceReader {
            inner: &lin.reader,
            dev: &dev,
        };
        let (x, rounds) = gang_solve(&m, &j, &reader);
        assert!(rel_diff(&x, &cpu) <= 1e-12, "{}", rel_diff(&x, &cpu));
        assert!(rounds.iter().all(|n| *n == rounds[0]), "{rounds:?}");
        let mut calls = dev.calls.lock().unwrap().clone();
        calls.sort_by_key(|c| c.0.as_ref().map(|s| s.part));
        let lens: Vec<usize> = parts.iter().map(|r| r.len() * d).collect();
        assert_eq!(lens.iter().sum::<usize>(), out * d);
        for (k, (split, b_len)) in calls.iter().enumerate() {
            let split = split.as_ref().expect("a part solve");
            assert_eq!((split.part, &split.part_lens), (k, &lens));
            assert_eq!(*b_len, lens[k]);
        }
        assert_eq!(calls.len(), 3);

        // In one process the device solves the block whole, whatever the parts.
        dev.calls.lock().unwrap().clear();
        let whole = m.solve_block(&j, &reader).unwrap();
        assert_eq!(*dev.calls.lock().unwrap(), vec![(None, out * d)]);
        assert!(rel_diff(&whole.x, &cpu) <= 1e-12);
    }

    #[test]
    fn every_objective_goes_to_the_device_whole_and_in_parts() {
        let (out, d) = (300, 128);
        let dev = RecordingGram::default();
        for objective in ["gram", "diagonal_fisher", "identity", "kfac", "ia3_block"] {
            let (shape, reader) = if objective == "ia3_block" {
                // A 1-D (IA)^3 vector of 200 with 200 x 200 block Fishers.
                let n = 200;
                let models: Vec<Vec<f32>> = (1..3).map(|s| rand_vec(s, n)).collect();
                let blocks: Vec<Vec<f32>> = (10..12).map(|s| gram(s, 2 * n, n)).collect();
                let mut r = reader_with(&models, "fisher_block", &blocks, &[n, n]);
                r.base = Some(vec![1.0; n]);
                (vec![n], r)
            } else {
                let mut r = linear_case(out, d, 2, objective == "kfac").reader;
                for i in 0..2 {
                    let f = rand_vec(30 + i as u64, out * d);
                    let f = f.into_iter().map(|v| v.abs() + 0.1).collect();
                    r.stats.insert((i, "fisher".into()), (vec![out, d], f));
                }
                (vec![out, d], r)
            };
            let numel: usize = shape.iter().product();
            let j = job(&shape, 2, true, 4097);
            let on_dev = DeviceReader {
                inner: &reader,
                dev: &dev,
            };
            let p = with(params(objective, "task_arithmetic"), "iterations", 5.0);
            let m = Mats::from_params(&p, 2, true).unwrap();
            let cpu = m.solve_block(&j, &reader).unwrap();
            dev.calls.lock().unwrap().clear();
            let got = m.solve_block(&j, &on_dev).unwrap();
            assert!(rel_diff(&got.x, &cpu.x) <= 1e-12, "{objective}");
            assert_eq!(got.iterations, cpu.iterations, "{objective}");
            let calls = dev.calls.lock().unwrap().clone();
            assert_eq!(calls, vec![(None, numel)], "{objective}");
            // Split parts, every one on the device (K-FAC and ia3_block gathering the
            // direction through the reduction).
            let split = Mats::from_params(&with(p.clone(), "cg_parts", 3.0), 2, true).unwrap();
            dev.calls.lock().unwrap().clear();
            let (x, rounds) = gang_solve(&split, &j, &on_dev);
            let (x_cpu, cpu_rounds) = gang_solve(&split, &j, &reader);
            assert!(rel_diff(&x, &x_cpu) <= 1e-12, "{objective}");
            assert_eq!(rounds, cpu_rounds, "{objective}");
            assert_eq!(dev.calls.lock().unwrap().len(), 3, "{objective}");
        }
    }

    #[test]
    fn gang_parts_meeting_in_a_reduction_equal_the_one_process_solve() {
        let (out, d) = (300, 128);
        let lin = linear_case(out, d, 2, true);
        let j = job(&[out, d], 2, true, 4097);
        for objective in ["gram", "kfac"] {
            let p = with(
                with(params(objective, "task_arithmetic"), "iterations", 5.0),
                "max_block_bytes",
                1.0,
            );
            let m = Mats::from_params(&p, 2, true).unwrap();
            assert_eq!(m.part_rows(&j).unwrap().len(), 3);
            let whole = Mats::from_params(&with(p.clone(), "cg_parts", 1.0), 2, true)
                .unwrap()
                .solve_block(&j, &lin.reader)
                .unwrap();
            let (x, rounds) = gang_solve(&m, &j, &lin.reader);
            assert!(
                x.iter()
                    .zip(&whole.x)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{objective}"
            );
            // b.b, nnz(x0), r0 product (gathered for kfac), then 2 scalars (+1 gather) per
            // step, then the final residual's product and scalar: the same count in each part.
            assert!(rounds.iter().all(|n| *n == rounds[0]), "{rounds:?}");
            let per_matvec = usize::from(objective == "kfac");
            assert_eq!(
                rounds[0],
                whole.reductions + whole.matvecs * per_matvec,
                "{objective}"
            );
        }
    }
}
