//! The generalized task arithmetic pipeline shared by `task_arithmetic`, `ties`, `dare_*`,
//! `breadcrumbs*`, `della*` (methods.md §2-§6; mergekit
//! `mergekit/merge_methods/generalized_task_arithmetic.py`). Sharding class T (E for plain task
//! arithmetic; G when a method adds model-global passes, e.g. `ties` with `trim_scope: model`).
//!
//! Per element, for models `i` with task vectors `δ_i = θ_i − θ_0` (f32):
//!
//! 1. `δ'_i = sparsify_i(δ_i)` (optional, a [`Sparsifier`]), then, with `rescale`, times the
//!    per-tensor factor `‖δ_i‖₁ / ‖δ'_i‖₁` (skipped when either norm is below `1e-7`), as
//!    mergekit's `sparsify.py:rescaled_masked_tensor`.
//! 2. `v_i = w_i · δ'_i`.
//! 3. Sign consensus ([`Consensus`], optional): `s = Σ_i v_i` (`sum`) or `Σ_i sgn v_i` (`count`),
//!    summed in f32 in model order; the majority sign is `+1` where `s ≥ 0`, else `−1` (or, with
//!    [`GtaOptions::zero_sign`], `sgn s` and the given sign where `s == 0`). Model `i` takes part
//!    where `v_i` has the majority sign (zeros never take part): `m_i ∈ {0, 1}`.
//! 4. `mix = Σ_i m_i v_i`, `div = Σ_i m_i w_i` (a divisor of exactly 0 becomes 1). Without
//!    consensus `m_i = 1` and `div = Σ_i w_i`, with `|div| < 1e-8` becoming 1.
//! 5. With `normalize`, `mix /= div`; then `mix *= λ`; the result is `θ_0 + mix`.
//!
//! # Plugging in a method
//!
//! A method parses the shared parameters with [`GtaOptions::from_params`] (giving its mergekit
//! defaults in [`GtaDefaults`]), parses its own (e.g. `density`), and in
//! [`crate::methods::MergeMethod::merge`]:
//!
//! 1. prepares a [`Sparsifier`] for this tensor, making whatever passes it needs over the task
//!    vectors first (use [`for_each_delta_block`], which reads `job.row_blocks()` in order and
//!    rejects non-finite inputs);
//! 2. calls [`merge`]`(&opts, Some(&sparsifier), job, reader, writer)`.
//!
//! [`merge`] reads the tensor in `job.row_blocks()` (whole rows, so a sparsifier may work row by
//! row) and calls [`Sparsifier::apply`] once per model and block, in the rescale pass (when
//! `rescale` is on) and again in the merge pass: `apply` must be a pure function of
//! `(model, start, delta)` — derive randomness from a counter-based RNG keyed by the element
//! index ([`crate::philox`]), and per-tensor thresholds in the preparation passes.
//!
//! Buffers: the base block, one block per model and the output block (`n + 2`), plus whatever
//! the sparsifier keeps. Results do not depend on the block size or thread count: every step is
//! elementwise, and the only tensor reductions (L1 norms) use [`ChunkedSum`].

use crate::error::{MergeError, Result};
use crate::params::TensorParams;
use crate::raw::{for_each_tile, give_f32, take_f32, BlockInputs, RawDtype, STREAM_BLOCK};
use crate::reduce::ChunkedSum;
use crate::select::{Window, WindowScan};
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per parallel work item in the merge loop.
const PAR_CHUNK: usize = 1 << 13;

/// mergekit's `rescaled_masked_tensor` epsilon: below it a norm is treated as zero.
pub const RESCALE_EPS: f64 = 1e-7;

/// How the majority sign is elected (mergekit `ConsensusMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    /// Sign of `Σ_i w_i δ'_i` (TIES "mass"; mergekit's default for every consensus method).
    Sum,
    /// Sign of `Σ_i sgn(w_i δ'_i)` (a vote).
    Count,
}

impl Consensus {
    /// Parse a `consensus_method` value (`sum` or `count`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "sum" => Ok(Consensus::Sum),
            "count" => Ok(Consensus::Count),
            other => Err(MergeError::BadParameter {
                key: "consensus_method".into(),
                message: format!("expected `sum` or `count`, got `{other}`"),
            }),
        }
    }
}

/// mergekit's per-method defaults (`registry.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GtaDefaults {
    /// Sign consensus of the method (`None`: plain weighted sum).
    pub consensus: Option<Consensus>,
    /// Default of `normalize`.
    pub normalize: bool,
    /// Default of `rescale` (L1 rescale of sparsified task vectors).
    pub rescale: bool,
}

/// The shared, resolved parameters of the pipeline for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct GtaOptions {
    /// Method name, for error messages.
    pub method: &'static str,
    /// Per-model `weight` (required by mergekit for every method of the family).
    pub weights: Vec<f32>,
    /// Sign consensus, if any.
    pub consensus: Option<Consensus>,
    /// `normalize`: divide by the (masked) sum of weights.
    pub normalize: bool,
    /// `lambda`: scale of the mixed task vector (default 1.0).
    pub lambda: f32,
    /// `rescale`: L1-rescale each sparsified task vector to its original norm.
    pub rescale: bool,
    /// Sign given to elements whose consensus sum is exactly 0, and `sgn s` elsewhere (the TIES
    /// paper's model-global majority; `Some(0)` reproduces its quirk of then selecting the
    /// negative entries). `None`: mergekit's rule (`s ≥ 0 → +1`).
    pub zero_sign: Option<i8>,
}

impl GtaOptions {
    /// Parse the shared parameters: per-model `weight` (required), `normalize`, `lambda`
    /// (default 1.0), `rescale`, `int8_mask` (accepted and ignored: it only changes mergekit's
    /// memory use) and, for methods with a consensus, `consensus_method` (`sum`/`count`).
    ///
    /// With `normalize`, weights summing to (nearly) zero are an error naming `weight`.
    pub fn from_params(
        params: &TensorParams,
        n_models: usize,
        method: &'static str,
        defaults: GtaDefaults,
    ) -> Result<Self> {
        if n_models == 0 {
            return Err(MergeError::BadInputs {
                method: method.into(),
                message: "needs at least one model besides the base model".into(),
            });
        }
        let mut weights = Vec::with_capacity(n_models);
        for i in 0..n_models {
            let w =
                params
                    .model_opt_num(i, "weight")?
                    .ok_or_else(|| MergeError::MissingParameter {
                        key: "weight".into(),
                        method: method.into(),
                        model: Some(i),
                    })?;
            if !w.is_finite() {
                return Err(MergeError::BadParameter {
                    key: "weight".into(),
                    message: format!("model #{i}: weight must be finite, got {w}"),
                });
            }
            weights.push(w as f32);
        }
        let normalize = params.bool("normalize", defaults.normalize)?;
        let lambda = params.num("lambda", 1.0)?;
        if !lambda.is_finite() {
            return Err(MergeError::BadParameter {
                key: "lambda".into(),
                message: format!("must be finite, got {lambda}"),
            });
        }
        let rescale = params.bool("rescale", defaults.rescale)?;
        let _ = params.bool("int8_mask", false)?;
        let consensus = match defaults.consensus {
            Some(c) => Some(match params.opt_str("consensus_method")? {
                Some(s) => Consensus::parse(&s)?,
                None => c,
            }),
            None => None,
        };
        if normalize {
            let sum: f32 = weights.iter().sum();
            if (sum.abs() as f64) < 1e-8 {
                return Err(MergeError::BadParameter {
                    key: "weight".into(),
                    message: format!(
                        "the weights sum to {sum}, so `normalize: true` would divide by zero; \
                         change the weights or set `normalize: false`"
                    ),
                });
            }
        }
        Ok(Self {
            method,
            weights,
            consensus,
            normalize,
            lambda: lambda as f32,
            rescale,
            zero_sign: None,
        })
    }
}

/// One model's sparsification rule, prepared for one tensor.
pub trait Sparsifier: Sync {
    /// Whether model `model` is left untouched (e.g. `density >= 1`); lets the pipeline skip it.
    fn is_identity(&self, model: usize) -> bool {
        let _ = model;
        false
    }

    /// Sparsify a block of model `model`'s task vector in place. `delta` holds the flat elements
    /// `start..start + delta.len()`, always whole rows. Dropped entries become `0.0`; kept
    /// entries may be scaled elementwise (the per-tensor L1 `rescale` is the pipeline's job).
    /// Must give the same result every time it is called on the same block.
    fn apply(&self, model: usize, start: usize, delta: &mut [f32]) -> Result<()>;

    /// Whether each element's result depends only on its own value and flat index, so that
    /// `apply` may also be given any piece of a block (a cache-sized tile); otherwise (the
    /// default) it is only given whole row blocks.
    fn elementwise(&self) -> bool {
        false
    }
}

fn non_finite(job: &TensorJob, input: Input, at: usize) -> MergeError {
    let who = match input {
        Input::Base => "the base model".to_string(),
        Input::Model(i) => format!("model #{i}"),
    };
    MergeError::Numeric {
        tensor: job.name.clone(),
        message: format!("non-finite value in {who} at element {at}"),
    }
}

/// Whether every value is finite: branch-free (vectorisable) per chunk, chunks in parallel.
pub fn all_finite(v: &[f32]) -> bool {
    if v.len() < 2 * PAR_CHUNK {
        crate::raw::all_finite(v)
    } else {
        v.par_chunks(PAR_CHUNK).all(crate::raw::all_finite)
    }
}

fn check_finite(job: &TensorJob, input: Input, start: usize, v: &[f32]) -> Result<()> {
    if all_finite(v) {
        return Ok(());
    }
    let off = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
    Err(non_finite(job, input, start + off))
}

/// Read the base block `range` into `base` (checked finite).
pub fn read_base(
    job: &TensorJob,
    reader: &dyn TensorReader,
    range: Range<usize>,
    base: &mut [f32],
) -> Result<()> {
    reader.read(Input::Base, range.clone(), base)?;
    check_finite(job, Input::Base, range.start, base)
}

/// Read model `model`'s block `range` and turn it into the task vector `delta = θ_i − base`
/// (checked finite). `base` holds the base block of the same range.
pub fn read_delta(
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    range: Range<usize>,
    base: &[f32],
    delta: &mut [f32],
) -> Result<()> {
    reader.read(Input::Model(model), range.clone(), delta)?;
    check_finite(job, Input::Model(model), range.start, delta)?;
    let sub = |(d, b): (&mut [f32], &[f32])| {
        for (d, b) in d.iter_mut().zip(b) {
            *d -= *b;
        }
    };
    if delta.len() < 2 * PAR_CHUNK {
        sub((delta, base));
    } else {
        delta
            .par_chunks_mut(PAR_CHUNK)
            .zip(base.par_chunks(PAR_CHUNK))
            .for_each(sub);
    }
    Ok(())
}

/// Stream model `model`'s task vector over `job.row_blocks()` in order: `f(start, delta)` gets
/// each block. For a sparsifier's preparation passes.
pub fn for_each_delta_block<F>(
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    mut f: F,
) -> Result<()>
where
    F: FnMut(usize, &[f32]) -> Result<()>,
{
    let mut base = Vec::new();
    let mut delta = Vec::new();
    // Inputs lent whole are decoded in place (the same f32 values as the reads below); a
    // block with a non-finite value is read again below, which reports it.
    let lent = views(job, reader)?;
    for r in job.row_blocks() {
        base.resize(r.len(), 0.0);
        delta.resize(r.len(), 0.0);
        let decoded = lent.as_ref().is_some_and(|v| {
            crate::simd::run(
                #[inline(always)]
                || {
                    v.base(r.clone(), &mut base)
                        & v.models[model].decode_sub(r.clone(), &base, &mut delta)
                },
            )
        });
        if !decoded {
            read_base(job, reader, r.clone(), &mut base)?;
            read_delta(job, reader, model, r.clone(), &base, &mut delta)?;
        }
        f(r.start, &delta)?;
    }
    Ok(())
}

/// Per-model L1 rescale factors (1.0 where not rescaled), as mergekit's
/// `rescaled_masked_tensor` with the L1 norm.
fn rescale_factors(
    opts: &GtaOptions,
    sp: Option<&dyn Sparsifier>,
    job: &TensorJob,
    reader: &dyn TensorReader,
) -> Result<Vec<f32>> {
    let n = opts.weights.len();
    let mut factors = vec![1.0f32; n];
    let sp = match sp {
        Some(sp) if opts.rescale => sp,
        _ => return Ok(factors),
    };
    let models: Vec<usize> = (0..n).filter(|&i| !sp.is_identity(i)).collect();
    if models.is_empty() {
        return Ok(factors);
    }
    let numel = job.numel();
    let mut before: Vec<ChunkedSum> = (0..n).map(|_| ChunkedSum::new(numel)).collect();
    let mut after: Vec<ChunkedSum> = (0..n).map(|_| ChunkedSum::new(numel)).collect();
    let mut base = Vec::new();
    let mut delta = Vec::new();
    for r in job.row_blocks() {
        base.resize(r.len(), 0.0);
        delta.resize(r.len(), 0.0);
        read_base(job, reader, r.clone(), &mut base)?;
        for &i in &models {
            read_delta(job, reader, i, r.clone(), &base, &mut delta)?;
            before[i].add_block(r.start, r.len(), |k| delta[k].abs() as f64);
            sp.apply(i, r.start, &mut delta)?;
            after[i].add_block(r.start, r.len(), |k| delta[k].abs() as f64);
        }
    }
    for &i in &models {
        // mergekit holds both norms as f32 tensors and divides in f32: round the exact
        // (f64, fixed-order) sums to f32 first, then divide in f32.
        let (b, a) = (before[i].total() as f32, after[i].total() as f32);
        if b as f64 >= RESCALE_EPS && a as f64 >= RESCALE_EPS {
            factors[i] = b / a;
        }
    }
    Ok(factors)
}

/// Scale one block of model `i`'s task vector in place: sparsify, rescale, weight.
#[inline(always)]
fn weight_block(
    opts: &GtaOptions,
    sp: Option<&dyn Sparsifier>,
    factors: &[f32],
    i: usize,
    start: usize,
    d: &mut [f32],
    sparsified: bool,
) -> Result<()> {
    if let Some(sp) = sp {
        if !sp.is_identity(i) {
            if !sparsified {
                sp.apply(i, start, d)?;
            }
            if factors[i] != 1.0 {
                scale(d, factors[i]);
            }
        }
    }
    // `x · 1.0` is `x` (a NaN, which arithmetic later quiets anyway, aside): skipped.
    if opts.weights[i] != 1.0 {
        scale(d, opts.weights[i]);
    }
    Ok(())
}

/// `d *= f` elementwise: in parallel for a block, inline for a tile of a caller's parallel
/// loop.
#[inline(always)]
fn scale(d: &mut [f32], f: f32) {
    if d.len() <= PAR_CHUNK {
        d.iter_mut().for_each(|x| *x *= f);
    } else {
        d.par_iter_mut()
            .with_min_len(PAR_CHUNK)
            .for_each(|x| *x *= f);
    }
}

/// Read one block: base into `base`, and `w_i · δ'_i` (sparsified, rescaled, weighted) into
/// `deltas[i]`.
#[allow(clippy::too_many_arguments)]
fn weighted_deltas(
    opts: &GtaOptions,
    sp: Option<&dyn Sparsifier>,
    factors: &[f32],
    job: &TensorJob,
    reader: &dyn TensorReader,
    r: Range<usize>,
    base: &mut Vec<f32>,
    deltas: &mut [Vec<f32>],
) -> Result<()> {
    base.resize(r.len(), 0.0);
    read_base(job, reader, r.clone(), base)?;
    for (i, d) in deltas.iter_mut().enumerate() {
        d.resize(r.len(), 0.0);
        read_delta(job, reader, i, r.clone(), base, d)?;
        weight_block(opts, sp, factors, i, r.start, d, false)?;
    }
    Ok(())
}

/// The consensus sum at element `j` (f32, model order).
#[inline]
fn consensus_sum(c: Consensus, deltas: &[Vec<f32>], j: usize) -> f32 {
    let mut s = 0.0f32;
    match c {
        Consensus::Sum => {
            for d in deltas {
                s += d[j];
            }
        }
        Consensus::Count => {
            for d in deltas {
                let v = d[j];
                s += if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                };
            }
        }
    }
    s
}

fn check_job(opts: &GtaOptions, job: &TensorJob) -> Result<()> {
    let n = opts.weights.len();
    if job.n_models != n {
        return Err(MergeError::BadInputs {
            method: opts.method.into(),
            message: format!(
                "configured for {n} models but the tensor has {} inputs",
                job.n_models
            ),
        });
    }
    if !job.has_base {
        return Err(MergeError::BadInputs {
            method: opts.method.into(),
            message: "requires `base_model`".into(),
        });
    }
    Ok(())
}

/// `pos[k]` = the majority sign of consensus sum `s[k]`, `+1.0` or `-1.0` (mergekit: `+1`
/// where `s ≥ 0`; `strict`: `sgn s`, and `+1` for `s == 0` only when `zero_pos`).
#[inline(always)]
fn majority_sign(s: &[f32], pos: &mut [f32], strict: bool, zero_pos: bool) {
    for (p, &x) in pos.iter_mut().zip(s) {
        let up = if strict {
            (x > 0.0) | ((x == 0.0) & zero_pos)
        } else {
            x >= 0.0
        };
        *p = if up { 1.0 } else { -1.0 };
    }
}

/// Add the weighted task-vector tile `v` (weight `w`) where it has the majority sign `pos`
/// (`v·sign > 0`, exact: the product only flips the sign bit): to the mix `s` and its
/// weight to `div`.
#[inline(always)]
fn sign_mix(v: &[f32], pos: &[f32], w: f32, s: &mut [f32], div: &mut [f32]) {
    let len = s.len();
    let (v, pos, div) = (&v[..len], &pos[..len], &mut div[..len]);
    for k in 0..len {
        let take = v[k] * pos[k] > 0.0;
        s[k] += if take { v[k] } else { 0.0 };
        div[k] += if take { w } else { 0.0 };
    }
}

/// How [`finish`] divides the mix.
enum Divide<'a> {
    /// No `normalize`.
    None,
    /// By the sum of weights.
    By(f32),
    /// By the per-element masked sum of weights.
    Each(&'a [f32]),
}

/// `out = base + λ·(mix / divisor)`, step 5.
#[inline(always)]
fn finish(mix: &[f32], div: Divide<'_>, lambda: f32, base: &[f32], out: &mut [f32]) {
    let len = out.len();
    let (mix, base) = (&mix[..len], &base[..len]);
    match div {
        Divide::None => {
            for k in 0..len {
                let m = if lambda != 1.0 {
                    mix[k] * lambda
                } else {
                    mix[k]
                };
                out[k] = base[k] + m;
            }
        }
        Divide::By(d) => {
            for k in 0..len {
                let m = mix[k] / d;
                let m = if lambda != 1.0 { m * lambda } else { m };
                out[k] = base[k] + m;
            }
        }
        Divide::Each(d) => {
            let d = &d[..len];
            for k in 0..len {
                let m = mix[k] / d[k];
                let m = if lambda != 1.0 { m * lambda } else { m };
                out[k] = base[k] + m;
            }
        }
    }
}

/// Elements per tile of [`combine`] (per-tile arrays keep its loops in the cache and
/// vectorisable).
const TILE: usize = 512;

/// Distance between the per-tile arrays of [`combine_tiles`]: a tile plus 64 bytes, so that
/// same-index elements of different arrays do not share their low 12 address bits (a store
/// to one would stall loads of the others: "4K aliasing").
const STRIDE: usize = TILE + 16;

/// Steps 1-5 on one block: `out[j] = base[j] + λ·mix(v_·[j])` from the raw task vectors
/// `deltas` (elements `start..`), tile by tile: each model's tile is sparsified (unless
/// `sparsified`: already done in place), rescaled and weighted by [`weight_block`], then
/// mixed.
///
/// Per element it performs exactly the f32 operations of the rule in model order (adding
/// `+0.0` for a model that does not take part leaves the sums' bits unchanged: they start at
/// `+0.0` and never become `-0.0`).
#[allow(clippy::too_many_arguments)]
fn combine(
    opts: &GtaOptions,
    sp: Option<&dyn Sparsifier>,
    factors: &[f32],
    sparsified: bool,
    start: usize,
    base: &[f32],
    deltas: &[Vec<f32>],
    out: &mut [f32],
) -> Result<()> {
    combine_tiles(
        opts,
        sp,
        factors,
        sparsified,
        start,
        out,
        #[inline(always)]
        |r, b, vs| {
            let rel = r.start - start..r.end - start;
            b.copy_from_slice(&base[rel.clone()]);
            for (i, d) in deltas.iter().enumerate() {
                vs[i * STRIDE..i * STRIDE + rel.len()].copy_from_slice(&d[rel.clone()]);
            }
            Ok(())
        },
    )
}

/// [`combine`] with the inputs of each tile supplied by `load(range, base, vs)`: the base
/// values of the absolute elements `range` into `base` and model `i`'s raw task vector into
/// `vs[i * STRIDE..][..range.len()]`. Tiles run in parallel; on failure the error of the first
/// failing tile in index order is returned.
fn combine_tiles<L>(
    opts: &GtaOptions,
    sp: Option<&dyn Sparsifier>,
    factors: &[f32],
    sparsified: bool,
    start: usize,
    out: &mut [f32],
    load: L,
) -> Result<()>
where
    L: Fn(Range<usize>, &mut [f32], &mut [f32]) -> Result<()> + Sync,
{
    let weights = &opts.weights;
    let n = weights.len();
    let plain_div = {
        let s: f32 = weights.iter().sum();
        if s.abs() < 1e-8 {
            1.0
        } else {
            s
        }
    };
    let (zero_pos, strict) = match opts.zero_sign {
        None => (true, false),
        Some(z) => (z > 0, true),
    };
    // One tile, one build per instruction set (`crate::simd`): the same f32 operations.
    let run = |v: &mut Vec<f32>, t: usize, o: &mut [f32]| -> Result<()> {
        crate::simd::run(
            #[inline(always)]
            || {
                let off = t * TILE;
                let len = o.len();
                // v: n model tiles, then the consensus sum, the divisor, the sign and the base.
                let (vs, rest) = v.split_at_mut(n * STRIDE);
                let (s, rest) = rest.split_at_mut(STRIDE);
                let (div, rest) = rest.split_at_mut(STRIDE);
                let (pos, base) = rest.split_at_mut(STRIDE);
                let (s, div, pos, base) = (
                    &mut s[..len],
                    &mut div[..len],
                    &mut pos[..len],
                    &mut base[..len],
                );
                load(start + off..start + off + len, base, vs)?;
                for i in 0..n {
                    let x = &mut vs[i * STRIDE..i * STRIDE + len];
                    weight_block(opts, sp, factors, i, start + off, x, sparsified)?;
                }
                let tile = |i: usize| &vs[i * STRIDE..i * STRIDE + len];
                s.fill(0.0);
                let mut plain = true;
                match opts.consensus {
                    None => {
                        for i in 0..n {
                            for (a, x) in s.iter_mut().zip(tile(i)) {
                                *a += *x;
                            }
                        }
                    }
                    Some(cm) => {
                        plain = false;
                        for i in 0..n {
                            match cm {
                                Consensus::Sum => {
                                    for (a, x) in s.iter_mut().zip(tile(i)) {
                                        *a += *x;
                                    }
                                }
                                Consensus::Count => {
                                    for (a, &v) in s.iter_mut().zip(tile(i)) {
                                        let p = if v > 0.0 { 1.0 } else { 0.0 };
                                        let q = if v < 0.0 { 1.0 } else { 0.0 };
                                        *a += p - q;
                                    }
                                }
                            }
                        }
                        majority_sign(s, pos, strict, zero_pos);
                        s.fill(0.0);
                        div.fill(0.0);
                        for (i, &w) in weights.iter().enumerate() {
                            sign_mix(tile(i), pos, w, s, div);
                        }
                        for x in div.iter_mut() {
                            *x = if *x == 0.0 { 1.0 } else { *x };
                        }
                    }
                }
                let mode = if !opts.normalize {
                    Divide::None
                } else if plain {
                    Divide::By(plain_div)
                } else {
                    Divide::Each(div)
                };
                finish(s, mode, opts.lambda, base, o);
                Ok(())
            },
        )
    };
    let buf = || vec![0.0f32; (n + 4) * STRIDE];
    let res = out
        .par_chunks_mut(TILE)
        .enumerate()
        .try_for_each_init(buf, |v, (t, o)| run(v, t, o));
    if res.is_err() {
        // The first error in index order, whichever thread met one first.
        let mut v = buf();
        for (t, o) in out.chunks_mut(TILE).enumerate() {
            run(&mut v, t, o)?;
        }
    }
    res
}

/// Whether the whole tensor is one row block of `job`: its inputs may then be held whole
/// (the base, `n` task vectors and the output are the `n + 2` buffers a streaming pass holds
/// anyway), so each input is read once ([`load_task_vectors`], [`merge_loaded`]).
pub fn single_block(job: &TensorJob) -> bool {
    job.row_blocks().nth(1).is_none()
}

/// A whole tensor's base and raw task vectors in memory ([`load_task_vectors`]); the buffers
/// go back to the thread's pool when dropped.
pub struct Loaded {
    /// The base values.
    pub base: Vec<f32>,
    /// `δ_i = θ_i − θ_0`, one per model.
    pub deltas: Vec<Vec<f32>>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        give_f32(std::mem::take(&mut self.base));
        for d in self.deltas.drain(..) {
            give_f32(d);
        }
    }
}

/// Read the whole base and every model's raw task vector `δ_i = θ_i − θ_0` (checked finite),
/// each input read once, in its stored encoding, and decoded tile by tile. Only for
/// [`single_block`] jobs (the caller checks memory).
pub fn load_task_vectors(job: &TensorJob, reader: &dyn TensorReader) -> Result<Loaded> {
    let numel = job.numel();
    let mut inputs = vec![Input::Base];
    inputs.extend((0..job.n_models).map(Input::Model));
    let mut blocks = BlockInputs::new(reader, &job.name, &inputs);
    let mut loaded = Loaded {
        base: take_f32(numel),
        deltas: (0..job.n_models).map(|_| take_f32(numel)).collect(),
    };
    let step = STREAM_BLOCK;
    for lo in (0..numel).step_by(step) {
        let range = lo..(lo + step).min(numel);
        blocks.read(range.clone())?;
        let blocks = &blocks;
        let base = &mut loaded.base[range.clone()];
        for_each_tile(base, lo, |r, b| blocks.decode(0, r, b))?;
        let base = &loaded.base[range.clone()];
        for (i, d) in loaded.deltas.iter_mut().enumerate() {
            let d = &mut d[range.clone()];
            for_each_tile(d, lo, |r, d| {
                blocks.decode(i + 1, r.clone(), d)?;
                let b = &base[r.start - lo..r.end - lo];
                crate::simd::run(
                    #[inline(always)]
                    || {
                        for (x, b) in d.iter_mut().zip(b) {
                            *x -= *b;
                        }
                    },
                );
                Ok(())
            })?;
        }
    }
    Ok(loaded)
}

/// Run the pipeline on a whole tensor already in memory (`deltas[i]` the raw task vectors of
/// [`load_task_vectors`], consumed in place) and write the result. Bit-identical to [`merge`]:
/// every step is the same elementwise f32 arithmetic and the L1 norms use [`ChunkedSum`].
pub fn merge_loaded(
    opts: &GtaOptions,
    sparsifier: Option<&dyn Sparsifier>,
    job: &TensorJob,
    base: &[f32],
    deltas: &mut [Vec<f32>],
    writer: &mut dyn TensorWriter,
) -> Result<()> {
    check_job(opts, job)?;
    let n = opts.weights.len();
    let numel = job.numel();
    let mut factors = vec![1.0f32; n];
    let mut sparsified = false;
    if let Some(sp) = sparsifier {
        for (i, d) in deltas.iter_mut().enumerate() {
            if sp.is_identity(i) {
                continue;
            }
            if opts.rescale {
                let mut before = ChunkedSum::new(numel);
                before.add_block(0, numel, |k| d[k].abs() as f64);
                sp.apply(i, 0, d)?;
                let mut after = ChunkedSum::new(numel);
                after.add_block(0, numel, |k| d[k].abs() as f64);
                let (b, a) = (before.total() as f32, after.total() as f32);
                if b as f64 >= RESCALE_EPS && a as f64 >= RESCALE_EPS {
                    factors[i] = b / a;
                }
            } else {
                sp.apply(i, 0, d)?;
            }
        }
        sparsified = true;
    }
    let mut out = take_f32(numel);
    let res = combine(
        opts, sparsifier, &factors, sparsified, 0, base, deltas, &mut out,
    )
    .and_then(|()| writer.write(0..numel, &out));
    give_f32(out);
    res
}

/// Run the pipeline on one tensor and write the result.
pub fn merge(
    opts: &GtaOptions,
    sparsifier: Option<&dyn Sparsifier>,
    job: &TensorJob,
    reader: &dyn TensorReader,
    writer: &mut dyn TensorWriter,
) -> Result<()> {
    check_job(opts, job)?;
    if single_block(job) {
        let mut l = load_task_vectors(job, reader)?;
        return merge_loaded(opts, sparsifier, job, &l.base, &mut l.deltas, writer);
    }
    merge_streaming(opts, sparsifier, job, reader, writer)
}

/// [`merge`] block by block, whatever the tensor size (each input read once, twice with
/// `rescale`).
pub fn merge_streaming(
    opts: &GtaOptions,
    sparsifier: Option<&dyn Sparsifier>,
    job: &TensorJob,
    reader: &dyn TensorReader,
    writer: &mut dyn TensorWriter,
) -> Result<()> {
    check_job(opts, job)?;
    let n = opts.weights.len();
    let factors = rescale_factors(opts, sparsifier, job, reader)?;
    let mut base = Vec::new();
    let mut deltas: Vec<Vec<f32>> = vec![Vec::new(); n];
    let mut out = Vec::new();
    // A sparsifier that needs whole rows (DELLA's rank groups) is applied to the whole block;
    // an elementwise one tile by tile inside `combine`, while the tile is in the cache.
    let by_block = sparsifier.filter(|sp| !sp.elementwise());
    for r in job.row_blocks() {
        base.resize(r.len(), 0.0);
        read_base(job, reader, r.clone(), &mut base)?;
        for (i, d) in deltas.iter_mut().enumerate() {
            d.resize(r.len(), 0.0);
            read_delta(job, reader, i, r.clone(), &base, d)?;
            if let Some(sp) = by_block.filter(|sp| !sp.is_identity(i)) {
                sp.apply(i, r.start, d)?;
            }
        }
        out.resize(r.len(), 0.0f32);
        let sparsified = by_block.is_some();
        combine(
            opts, sparsifier, &factors, sparsified, r.start, &base, &deltas, &mut out,
        )?;
        writer.write(r, &out)?;
    }
    Ok(())
}

/// One input's whole stored tensor, lent by the reader ([`TensorReader::raw_view`]).
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    dtype: RawDtype,
    bytes: &'a [u8],
}

impl View<'_> {
    /// Decode elements `range` into `out` (same length): exact, as [`crate::raw::RawBlock`].
    #[inline(always)]
    pub fn decode(&self, range: Range<usize>, out: &mut [f32]) {
        self.decode_with(range, out, |o, x| *o = x);
    }

    /// `out[k] = value(range.start + k) − base[k]` (the raw task vector of a tile, in f32 as
    /// [`read_delta`] computes it); returns whether every decoded value was finite.
    #[inline(always)]
    pub fn decode_sub(&self, range: Range<usize>, base: &[f32], out: &mut [f32]) -> bool {
        debug_assert_eq!(range.len(), out.len());
        let size = self.dtype.size();
        let b = &self.bytes[range.start * size..range.end * size];
        let base = &base[..out.len()];
        let bad = |x: f32| u32::from(x.to_bits() & 0x7F80_0000 == 0x7F80_0000);
        let mut any_bad = 0u32;
        match self.dtype {
            RawDtype::F32 => {
                for ((o, c), z) in out.iter_mut().zip(b.as_chunks::<4>().0).zip(base) {
                    let x = f32::from_le_bytes(*c);
                    any_bad |= bad(x);
                    *o = x - *z;
                }
            }
            RawDtype::Bf16 => {
                for ((o, c), z) in out.iter_mut().zip(b.as_chunks::<2>().0).zip(base) {
                    let x = f32::from_bits(u32::from(u16::from_le_bytes(*c)) << 16);
                    any_bad |= bad(x);
                    *o = x - *z;
                }
            }
            RawDtype::F16 => {
                for ((o, c), z) in out.iter_mut().zip(b.as_chunks::<2>().0).zip(base) {
                    let x = half::f16::from_bits(u16::from_le_bytes(*c)).to_f32();
                    any_bad |= bad(x);
                    *o = x - *z;
                }
            }
        }
        any_bad == 0
    }

    /// Add the [`KeyOrder::Descending`](crate::methods::sparsify::KeyOrder) keys of the raw
    /// task vector `value(range.start + k) − base[k]` to `scan` ([`WindowScan::add_mapped`]:
    /// decoded, subtracted and counted in one loop, as [`View::decode_sub`] and
    /// [`crate::methods::sparsify::KeyOrder::key`] compute them); returns whether every decoded
    /// value was finite.
    #[inline(always)]
    pub fn scan_delta(
        &self,
        range: Range<usize>,
        base: &[f32],
        w: Window,
        scan: &mut WindowScan,
        cap: usize,
    ) -> bool {
        let size = self.dtype.size();
        let b = &self.bytes[range.start * size..range.end * size];
        let base = &base[..range.len()];
        let key = |x: f32, z: f32| crate::methods::sparsify::KeyOrder::Descending.key(x - z);
        match self.dtype {
            RawDtype::F32 => {
                let c = b.as_chunks::<4>().0;
                let bad = c.iter().fold(0u32, |a, c| {
                    a | u32::from(u32::from_le_bytes(*c) & 0x7F80_0000 == 0x7F80_0000)
                });
                scan.add_mapped(w, range.start, c, base, cap, |c, z| {
                    key(f32::from_le_bytes(c), z)
                });
                bad == 0
            }
            RawDtype::Bf16 => {
                let c = b.as_chunks::<2>().0;
                let bad = c.iter().fold(0u16, |a, c| {
                    a | u16::from(u16::from_le_bytes(*c) & 0x7F80 == 0x7F80)
                });
                scan.add_mapped(w, range.start, c, base, cap, |c, z| {
                    key(f32::from_bits(u32::from(u16::from_le_bytes(c)) << 16), z)
                });
                bad == 0
            }
            RawDtype::F16 => {
                let c = b.as_chunks::<2>().0;
                let bad = c.iter().fold(0u16, |a, c| {
                    a | u16::from(u16::from_le_bytes(*c) & 0x7C00 == 0x7C00)
                });
                scan.add_mapped(w, range.start, c, base, cap, |c, z| {
                    key(half::f16::from_bits(u16::from_le_bytes(c)).to_f32(), z)
                });
                bad == 0
            }
        }
    }

    /// Decode elements `range` and hand each value to `f` with its slot of `out`, in order.
    #[inline(always)]
    fn decode_with<F: FnMut(&mut f32, f32)>(&self, range: Range<usize>, out: &mut [f32], mut f: F) {
        debug_assert_eq!(range.len(), out.len());
        let size = self.dtype.size();
        let b = &self.bytes[range.start * size..range.end * size];
        match self.dtype {
            RawDtype::F32 => {
                for (o, c) in out.iter_mut().zip(b.as_chunks::<4>().0) {
                    f(o, f32::from_le_bytes(*c));
                }
            }
            RawDtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(b.as_chunks::<2>().0) {
                    f(o, f32::from_bits(u32::from(u16::from_le_bytes(*c)) << 16));
                }
            }
            RawDtype::F16 => {
                for (o, c) in out.iter_mut().zip(b.as_chunks::<2>().0) {
                    f(o, half::f16::from_bits(u16::from_le_bytes(*c)).to_f32());
                }
            }
        }
    }
}

/// Every input of a tensor lent as stored bytes ([`views`]): the task vectors are decoded
/// tile by tile where they are used, so no whole-tensor buffer is filled or held.
#[derive(Debug, Clone)]
pub struct Views<'a> {
    /// The base model.
    pub base: View<'a>,
    /// The models, in order.
    pub models: Vec<View<'a>>,
    /// Number of elements.
    pub numel: usize,
}

impl Views<'_> {
    /// Decode the base over `range` into `base` and model `i`'s raw task vector
    /// `θ_i − θ_0` into `delta`; `false` when a value of either is not finite.
    #[inline(always)]
    pub fn delta(&self, i: usize, range: Range<usize>, base: &[f32], delta: &mut [f32]) -> bool {
        self.models[i].decode_sub(range, base, delta)
    }

    /// Decode the base over `range` into `base`; `false` when a value is not finite.
    #[inline(always)]
    pub fn base(&self, range: Range<usize>, base: &mut [f32]) -> bool {
        self.base.decode(range, base);
        crate::raw::all_finite(base)
    }
}

/// The inputs of `job` lent whole by `reader` ([`TensorReader::raw_view`]), when every input
/// (the base included) is, non-finite values are refused and the tensor has fewer than 2^32
/// elements; `None` otherwise (the caller reads blocks instead).
pub fn views<'a>(job: &TensorJob, reader: &'a dyn TensorReader) -> Result<Option<Views<'a>>> {
    let numel = job.numel();
    if !job.has_base || reader.allows_nonfinite() || numel >= u32::MAX as usize {
        return Ok(None);
    }
    let view = |input: Input| -> Result<Option<View<'a>>> {
        Ok(reader
            .raw_view(input)?
            .filter(|(dt, b)| b.len() == numel * dt.size())
            .map(|(dtype, bytes)| View { dtype, bytes }))
    };
    let Some(base) = view(Input::Base)? else {
        return Ok(None);
    };
    let mut models = Vec::with_capacity(job.n_models);
    for i in 0..job.n_models {
        let Some(v) = view(Input::Model(i))? else {
            return Ok(None);
        };
        models.push(v);
    }
    Ok(Some(Views {
        base,
        models,
        numel,
    }))
}

/// [`merge`] from inputs lent whole ([`views`]), without `rescale`: one pass, each tile of
/// every input decoded where it is used. Bit-identical to [`merge`] (the same [`combine`]
/// arithmetic). The caller has checked every input finite.
pub fn merge_views(
    opts: &GtaOptions,
    sparsifier: Option<&dyn Sparsifier>,
    job: &TensorJob,
    views: &Views<'_>,
    writer: &mut dyn TensorWriter,
) -> Result<()> {
    check_job(opts, job)?;
    if opts.rescale {
        return Err(MergeError::BadInputs {
            method: opts.method.into(),
            message: "internal error: `rescale` needs the streaming pipeline".into(),
        });
    }
    let n = opts.weights.len();
    let factors = vec![1.0f32; n];
    let numel = job.numel();
    let mut out = take_f32(STREAM_BLOCK.min(numel));
    let mut res = Ok(());
    for lo in (0..numel).step_by(STREAM_BLOCK) {
        let r = lo..(lo + STREAM_BLOCK).min(numel);
        let o = &mut out[..r.len()];
        res = combine_tiles(
            opts,
            sparsifier,
            &factors,
            false,
            lo,
            o,
            #[inline(always)]
            |t, b, vs| {
                views.base.decode(t.clone(), b);
                for i in 0..n {
                    let d = &mut vs[i * STRIDE..i * STRIDE + t.len()];
                    // Finite: checked by the selection pass.
                    let _ = views.models[i].decode_sub(t.clone(), b, d);
                }
                Ok(())
            },
        )
        .and_then(|()| writer.write(r, o));
        if res.is_err() {
            break;
        }
    }
    give_f32(out);
    res
}

/// Count the elements whose consensus sum is positive and negative (`[pos, neg]`), for the
/// TIES paper's model-global zero-sign majority (a global pass). Requires a consensus.
pub fn consensus_sign_counts(
    opts: &GtaOptions,
    sparsifier: Option<&dyn Sparsifier>,
    job: &TensorJob,
    reader: &dyn TensorReader,
) -> Result<[u64; 2]> {
    let cm = opts.consensus.ok_or_else(|| MergeError::BadInputs {
        method: opts.method.into(),
        message: "sign counts need a consensus method".into(),
    })?;
    let factors = rescale_factors(opts, sparsifier, job, reader)?;
    let n = opts.weights.len();
    let mut base = Vec::new();
    let mut deltas: Vec<Vec<f32>> = vec![Vec::new(); n];
    let mut counts = [0u64; 2];
    for r in job.row_blocks() {
        weighted_deltas(
            opts,
            sparsifier,
            &factors,
            job,
            reader,
            r.clone(),
            &mut base,
            &mut deltas,
        )?;
        let deltas = &deltas;
        let (p, q) = (0..r.len())
            .into_par_iter()
            .with_min_len(PAR_CHUNK)
            .map(|j| {
                let s = consensus_sum(cm, deltas, j);
                ((s > 0.0) as u64, (s < 0.0) as u64)
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        counts[0] += p;
        counts[1] += q;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::task_arithmetic::tests::{assert_close, job, rand_vec};
    use crate::tensor::{MemReader, MemWriter};

    /// Keeps elements whose index is not a multiple of `model + 2` (a pure function of index).
    struct EveryOther;

    impl Sparsifier for EveryOther {
        fn is_identity(&self, model: usize) -> bool {
            model == 2
        }
        fn apply(&self, model: usize, start: usize, delta: &mut [f32]) -> Result<()> {
            for (k, x) in delta.iter_mut().enumerate() {
                if (start + k).is_multiple_of(model + 2) {
                    *x = 0.0;
                }
            }
            Ok(())
        }
    }

    fn opts(consensus: Option<Consensus>, normalize: bool, rescale: bool) -> GtaOptions {
        GtaOptions {
            method: "test",
            weights: vec![0.8, 1.1, -0.5],
            consensus,
            normalize,
            lambda: 0.7,
            rescale,
            zero_sign: None,
        }
    }

    /// Naive f64 pipeline with the same sparsifier rule.
    fn naive(o: &GtaOptions, base: &[f32], models: &[Vec<f32>]) -> Vec<f64> {
        let n = base.len();
        let w: Vec<f64> = o.weights.iter().map(|&x| x as f64).collect();
        let v: Vec<Vec<f64>> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let d: Vec<f64> = m.iter().zip(base).map(|(a, b)| (a - b) as f64).collect();
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        if i != 2 && j % (i + 2) == 0 {
                            0.0
                        } else {
                            d[j]
                        }
                    })
                    .collect();
                let (b1, a1): (f64, f64) = (
                    d.iter().map(|x| x.abs()).sum(),
                    s.iter().map(|x| x.abs()).sum(),
                );
                let f = if o.rescale && b1 >= 1e-7 && a1 >= 1e-7 {
                    b1 / a1
                } else {
                    1.0
                };
                s.iter().map(|x| x * f * w[i]).collect()
            })
            .collect();
        (0..n)
            .map(|j| {
                let (mut mix, mut div) = (0.0, 0.0);
                match o.consensus {
                    None => {
                        mix = (0..3).map(|i| v[i][j]).sum();
                        div = w.iter().sum();
                    }
                    Some(c) => {
                        let s: f64 = (0..3)
                            .map(|i| match c {
                                Consensus::Sum => v[i][j],
                                Consensus::Count => {
                                    (v[i][j] > 0.0) as i32 as f64 - (v[i][j] < 0.0) as i32 as f64
                                }
                            })
                            .sum();
                        for i in 0..3 {
                            if (s >= 0.0 && v[i][j] > 0.0) || (s < 0.0 && v[i][j] < 0.0) {
                                mix += v[i][j];
                                div += w[i];
                            }
                        }
                        if div == 0.0 {
                            div = 1.0;
                        }
                    }
                }
                if o.normalize {
                    mix /= div;
                }
                base[j] as f64 + o.lambda as f64 * mix
            })
            .collect()
    }

    fn run(o: &GtaOptions, j: &TensorJob, r: &MemReader) -> Vec<f32> {
        let mut w = MemWriter::default();
        merge(o, Some(&EveryOther), j, r, &mut w).unwrap();
        w.data
    }

    #[test]
    fn pipeline_matches_naive_with_rescale() {
        let n = 3 * PAR_CHUNK + 37;
        let base = rand_vec(60, n);
        let mut models: Vec<Vec<f32>> = (61..64).map(|s| rand_vec(s, n)).collect();
        models[1][5] = base[5]; // an exact zero task-vector entry
        let r = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        for o in [
            opts(None, false, true),
            opts(None, true, false),
            opts(Some(Consensus::Sum), true, true),
            opts(Some(Consensus::Count), false, true),
        ] {
            let whole = run(&o, &job(&[n], 3, n), &r);
            assert_close(&whole, &naive(&o, &base, &models));
            let small = run(&o, &job(&[n], 3, 1001), &r);
            assert_eq!(whole, small);
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| run(&o, &job(&[n], 3, 4099), &r));
            assert_eq!(
                whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                one.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn rescale_skipped_for_zero_task_vector() {
        let base = rand_vec(70, 12);
        let r = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![base.clone(), rand_vec(71, 12), base.clone()],
        };
        let o = opts(Some(Consensus::Sum), true, true);
        let got = run(&o, &job(&[3, 4], 3, 5), &r);
        assert_close(&got, &naive(&o, &base, &r.models));
    }

    #[test]
    fn sign_counts() {
        let r = MemReader {
            stats: Default::default(),
            base: Some(vec![0.0; 4]),
            models: vec![vec![1.0, -1.0, 0.0, 2.0], vec![-1.0, -1.0, 0.0, 0.0]],
        };
        let mut o = opts(Some(Consensus::Sum), true, false);
        o.weights = vec![1.0, 1.0];
        let c = consensus_sign_counts(&o, None, &job(&[4], 2, 3), &r).unwrap();
        assert_eq!(c, [1, 1]);
    }
}
