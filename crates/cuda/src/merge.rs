//! Merges on the device: linear / task arithmetic in one fused pass over all inputs, and the
//! generalized task-arithmetic pipeline (task arithmetic, TIES, DARE linear and TIES) fused per
//! element after an exact per-tensor magnitude selection.
//!
//! Both perform, per element, the f32 operations of the CPU path (`amalgam_core::methods::
//! linear`, `gta::combine`) in the same order, with the kernels compiled with `--fmad=false`:
//! results are bit-identical to the CPU's. The one exception is the L1 rescale factor, whose f64
//! sums are added in a different (fixed, device-independent) order; it agrees to f64 rounding.

use crate::device::Gpu;
use crate::error::{Ctx, CudaError, Result};
use crate::tensor::{DType, DeviceTensor};
use amalgam_core::methods::device::DeviceSparsify;
use amalgam_core::methods::gta::Consensus;
use amalgam_core::philox;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use std::sync::atomic::{AtomicBool, Ordering};

/// One model of the pipeline, as the kernels read it (`struct GtaModel` in `merge.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GtaModel {
    ptr: u64,
    threshold: u64,
    cut: u64,
    k0: u32,
    k1: u32,
    weight: f32,
    factor: f32,
    scale: f32,
    dt: i32,
    mask: i32,
    pad: i32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct GtaModel`.
unsafe impl DeviceRepr for GtaModel {}
// SAFETY: all-zero bits are a valid value.
unsafe impl ValidAsZeroBits for GtaModel {}

/// The pipeline's per-tensor arguments (`struct GtaArgs` in `merge.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GtaArgs {
    base: u64,
    out: u64,
    n: u64,
    name_hash: u64,
    bad: u64,
    base_dt: i32,
    out_dt: i32,
    n_models: i32,
    consensus: i32,
    strict: i32,
    zero_pos: i32,
    normalize: i32,
    pad: i32,
    plain_div: f32,
    lambda: f32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct GtaArgs`.
unsafe impl DeviceRepr for GtaArgs {}

/// Selection state of one model (`struct SelModel` in `select.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SelModel {
    p: u64,
    before: u64,
    count: u64,
    target: u64,
    prefix: u64,
    prefix_mask: u64,
    cand_off: u64,
    lo: u32,
    hi: u32,
    active: i32,
    ok: i32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct SelModel`.
unsafe impl DeviceRepr for SelModel {}
// SAFETY: all-zero bits are a valid value.
unsafe impl ValidAsZeroBits for SelModel {}

const MASK_NONE: i32 = 0;
const MASK_RANK: i32 = 1;
const MASK_DARE: i32 = 2;
/// Histogram bins of one selection round (`HBINS`).
const HBINS: usize = 1 << 16;
/// Elements of one sample chunk (`SAMPLE_CHUNK`).
const SAMPLE_CHUNK: u64 = 256;
/// Sample chunks aimed at (about 4M sampled elements per model).
const SAMPLE_CHUNKS: u64 = 1 << 14;
/// Elements per L1 partial (`L1_CHUNK`).
const L1_CHUNK: u64 = 65536;

static FORCE_EXACT: AtomicBool = AtomicBool::new(false);

/// Skip the sampled bracket of the TIES selection and gather every element (the exact path
/// taken when a bracket misses): for tests and `gpu-check`, which compare both paths.
pub fn force_exact_selection(on: bool) {
    FORCE_EXACT.store(on, Ordering::Relaxed);
}

/// How one model's task vector is sparsified.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsify {
    /// Untouched.
    None,
    /// TIES `magnitude`: keep the `max(1, ⌊density·n⌋)` largest `|δ|` (lowest index first among
    /// equal magnitudes); `density ≥ 1` keeps everything.
    Magnitude {
        /// Fraction kept.
        density: f64,
    },
    /// A magnitude cut computed elsewhere (e.g. a model-global pass): keep the elements whose
    /// composite key `(!bits(|δ|) << 32) | index` is below it.
    Cut(u64),
    /// DARE: keep each element with probability `density` (Philox, as the CPU), scaling kept
    /// ones by `1/density` when `inverse`.
    Dare {
        /// Keep probability.
        density: f64,
        /// Divide kept entries by the density.
        inverse: bool,
    },
}

/// The pipeline's options for one tensor (mirrors `amalgam_core::methods::gta::GtaOptions`).
#[derive(Debug, Clone)]
pub struct GtaSpec {
    /// Tensor name (DARE counters).
    pub name: String,
    /// Merge seed (DARE keys).
    pub seed: u64,
    /// Per-model weights.
    pub weights: Vec<f32>,
    /// Per-model sparsification.
    pub sparsify: Vec<Sparsify>,
    /// Sign consensus.
    pub consensus: Option<Consensus>,
    /// Divide by the (masked) weight sum.
    pub normalize: bool,
    /// Scale of the mixed task vector.
    pub lambda: f32,
    /// L1-rescale each sparsified task vector to its original norm.
    pub rescale: bool,
    /// The TIES paper's zero-sign rule (see `GtaOptions::zero_sign`).
    pub zero_sign: Option<i8>,
    /// Skip the non-finite input check.
    pub allow_nonfinite: bool,
}

impl From<DeviceSparsify> for Sparsify {
    fn from(s: DeviceSparsify) -> Self {
        match s {
            DeviceSparsify::None => Sparsify::None,
            DeviceSparsify::Magnitude { density } => Sparsify::Magnitude { density },
            DeviceSparsify::Dare { density, inverse } => Sparsify::Dare { density, inverse },
        }
    }
}

impl GtaSpec {
    /// A spec from the CPU pipeline's options and a method's device plan, for tensor `name`.
    pub fn from_options(
        opts: &amalgam_core::methods::gta::GtaOptions,
        name: &str,
        seed: u64,
        sparsify: &[DeviceSparsify],
    ) -> Self {
        Self {
            name: name.to_string(),
            seed,
            weights: opts.weights.clone(),
            sparsify: sparsify.iter().map(|&s| s.into()).collect(),
            consensus: opts.consensus,
            normalize: opts.normalize,
            lambda: opts.lambda,
            rescale: opts.rescale,
            zero_sign: opts.zero_sign,
            allow_nonfinite: false,
        }
    }
}

fn launch_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError + '_ {
    move |source| CudaError::Driver {
        what: format!("launching {what}"),
        source,
    }
}

fn check_aligned(gpu: &Gpu, tensors: &[&DeviceTensor]) -> Result<()> {
    for t in tensors {
        if t.addr(&gpu.stream) % 16 != 0 {
            return Err(CudaError::Invalid(
                "a device tensor is not 16-byte aligned".into(),
            ));
        }
    }
    Ok(())
}

/// The lowest non-finite index per input slot, or an error naming the first bad input.
fn check_bad(gpu: &Gpu, bad: &CudaSlice<u64>) -> Result<()> {
    let v = gpu
        .stream
        .clone_dtoh(bad)
        .ctx("reading the finiteness flags")?;
    gpu.sync()?;
    let worst = v
        .iter()
        .enumerate()
        .filter(|(_, &i)| i != u64::MAX)
        .min_by_key(|(s, &i)| (i, *s));
    match worst {
        Some((slot, &index)) => Err(CudaError::NonFinite { slot, index }),
        None => Ok(()),
    }
}

/// `out = Σ_i x_i·w_i` (model order), divided by `divisor` when given: `linear` in one pass
/// over all inputs (any mix of f32/f16/bf16), written as `out_dtype`. Task arithmetic without
/// sparsification is [`gta`] with [`Sparsify::None`]. Input slot `i` of a
/// [`CudaError::NonFinite`] is input `i`.
pub fn linear(
    gpu: &Gpu,
    inputs: &[&DeviceTensor],
    weights: &[f32],
    divisor: Option<f32>,
    out_dtype: DType,
    allow_nonfinite: bool,
) -> Result<DeviceTensor> {
    let n = inputs.first().map_or(0, |t| t.len);
    if inputs.is_empty() || weights.len() != inputs.len() || inputs.iter().any(|t| t.len != n) {
        return Err(CudaError::Invalid(
            "linear: inputs and weights must be non-empty, of one length".into(),
        ));
    }
    let mut out = DeviceTensor::alloc(&gpu.stream, out_dtype, n)?;
    check_aligned(gpu, inputs)?;
    let s = &gpu.stream;
    let ptrs: Vec<u64> = inputs.iter().map(|t| t.addr(s)).collect();
    let dts: Vec<i32> = inputs.iter().map(|t| t.dtype.code()).collect();
    let d_ptrs = s.clone_htod(&ptrs).ctx("uploading pointers")?;
    let d_dts = s.clone_htod(&dts).ctx("uploading dtypes")?;
    let d_w = s.clone_htod(weights).ctx("uploading weights")?;
    let mut bad = s
        .clone_htod(&vec![u64::MAX; inputs.len()])
        .ctx("uploading flags")?;
    let (n_in, has_div, div) = (
        inputs.len() as i32,
        i32::from(divisor.is_some()),
        divisor.unwrap_or(1.0),
    );
    let (nn, out_dt) = (n as u64, out_dtype.code());
    let cfg = gpu.grid((nn / 8).max(1));
    let mut b = s.launch_builder(gpu.function("linear_merge"));
    b.arg(&d_ptrs)
        .arg(&d_dts)
        .arg(&d_w)
        .arg(&n_in)
        .arg(&has_div)
        .arg(&div)
        .arg(&nn)
        .arg(&mut out.data)
        .arg(&out_dt)
        .arg(&mut bad);
    // SAFETY: argument types and order match `linear_merge`; every pointer covers `n` elements.
    unsafe { b.launch(cfg) }.map_err(launch_err("linear_merge"))?;
    if !allow_nonfinite {
        check_bad(gpu, &bad)?;
    }
    Ok(out)
}

/// The number of elements TIES keeps of `n` at `density` (`None`: all of them).
pub fn magnitude_keep(density: f64, n: usize) -> Option<u64> {
    if density >= 1.0 || n == 0 {
        return None;
    }
    let k = amalgam_core::methods::sparsify::frac_count(density, n).max(1);
    (k < n).then_some(k as u64)
}

/// The generalized task-arithmetic pipeline on one tensor: `base` and one tensor per model, all
/// of `base.len` elements. Input slot 0 of a [`CudaError::NonFinite`] is the base, slot `1 + i`
/// model `i`.
pub fn gta(
    gpu: &Gpu,
    base: &DeviceTensor,
    models: &[&DeviceTensor],
    spec: &GtaSpec,
    out_dtype: DType,
) -> Result<DeviceTensor> {
    let n_models = models.len();
    let n = base.len;
    if n_models == 0
        || n_models > 64
        || spec.weights.len() != n_models
        || spec.sparsify.len() != n_models
        || models.iter().any(|t| t.len != n)
    {
        return Err(CudaError::Invalid(format!(
            "gta: {n_models} models (1 to 64), {} weights, {} sparsifiers, lengths must match",
            spec.weights.len(),
            spec.sparsify.len()
        )));
    }
    let s = &gpu.stream;
    let mut out = DeviceTensor::alloc(s, out_dtype, n)?;
    let mut host: Vec<GtaModel> = Vec::with_capacity(n_models);
    let mut select = vec![None; n_models];
    for (i, (t, sp)) in models.iter().zip(&spec.sparsify).enumerate() {
        let key = philox::key(spec.seed, i);
        let mut m = GtaModel {
            ptr: t.addr(s),
            threshold: 0,
            cut: 0,
            k0: key[0],
            k1: key[1],
            weight: spec.weights[i],
            factor: 1.0,
            scale: 1.0,
            dt: t.dtype.code(),
            mask: MASK_NONE,
            pad: 0,
        };
        match *sp {
            Sparsify::None => {}
            Sparsify::Magnitude { density } => {
                if let Some(k) = magnitude_keep(density, n) {
                    m.mask = MASK_RANK;
                    select[i] = Some(k);
                }
            }
            Sparsify::Cut(c) => {
                m.mask = MASK_RANK;
                m.cut = c;
            }
            Sparsify::Dare { density, inverse } => {
                if density < 1.0 {
                    m.mask = MASK_DARE;
                    m.threshold = philox::keep_threshold(density);
                    if inverse && density > 0.0 {
                        m.scale = (1.0 / density) as f32;
                    }
                }
            }
        }
        host.push(m);
    }
    let plain_div = {
        let s: f32 = spec.weights.iter().sum();
        if s.abs() < 1e-8 {
            1.0
        } else {
            s
        }
    };
    let (zero_pos, strict) = match spec.zero_sign {
        None => (1, 0),
        Some(z) => (i32::from(z > 0), 1),
    };
    let mut bad = s
        .clone_htod(&vec![u64::MAX; n_models + 1])
        .ctx("uploading flags")?;
    let mut args = GtaArgs {
        base: base.addr(s),
        out: out.addr(s),
        n: n as u64,
        name_hash: philox::name_hash(&spec.name),
        bad: {
            let (p, _sync) = cudarc::driver::DevicePtr::device_ptr(&bad, s);
            p
        },
        base_dt: base.dtype.code(),
        out_dt: out_dtype.code(),
        n_models: n_models as i32,
        consensus: match spec.consensus {
            None => 0,
            Some(Consensus::Sum) => 1,
            Some(Consensus::Count) => 2,
        },
        strict,
        zero_pos,
        normalize: i32::from(spec.normalize),
        pad: 0,
        plain_div,
        lambda: spec.lambda,
    };
    let mut refs: Vec<&DeviceTensor> = vec![base];
    refs.extend(models.iter().copied());
    check_aligned(gpu, &refs)?;
    let mut d_models = s.clone_htod(&host).ctx("uploading the models")?;
    if select.iter().any(Option::is_some) {
        if n > u32::MAX as usize {
            return Err(CudaError::Invalid(format!(
                "tensor \"{}\" has {n} elements; GPU magnitude selection takes at most 2^32",
                spec.name
            )));
        }
        select_cuts(gpu, &mut d_models, &args, &select)?;
    }
    if spec.rescale && host.iter().any(|m| m.mask != MASK_NONE) {
        let factors = l1_factors(gpu, &d_models, &args, n_models)?;
        let mut cur = s.clone_dtoh(&d_models).ctx("reading the models")?;
        gpu.sync()?;
        for (m, f) in cur.iter_mut().zip(factors) {
            if m.mask != MASK_NONE {
                m.factor = f;
            }
        }
        d_models = s.clone_htod(&cur).ctx("uploading the models")?;
    }
    let kernel = match n_models {
        0..=2 => "gta_merge_2",
        3..=4 => "gta_merge_4",
        5..=8 => "gta_merge_8",
        9..=16 => "gta_merge_16",
        _ => "gta_merge_64",
    };
    args.out = out.addr(s);
    let cfg = gpu.grid(n as u64);
    let mut b = s.launch_builder(gpu.function(kernel));
    b.arg(&d_models).arg(&args);
    // SAFETY: `GtaModel`/`GtaArgs` match the kernel's structs; every pointer covers `n`.
    unsafe { b.launch(cfg) }.map_err(launch_err(kernel))?;
    // Keep the output and flags alive and ordered after the kernel.
    let _ = (&mut out.data, &mut bad);
    if !spec.allow_nonfinite {
        check_bad(gpu, &bad)?;
    } else {
        gpu.sync()?;
    }
    Ok(out)
}

/// Per-model L1 rescale factors `‖δ‖₁ / ‖δ'‖₁` (1 where either is below 1e-7).
fn l1_factors(
    gpu: &Gpu,
    d_models: &CudaSlice<GtaModel>,
    args: &GtaArgs,
    n_models: usize,
) -> Result<Vec<f32>> {
    let s = &gpu.stream;
    let chunks = args.n.div_ceil(L1_CHUNK).max(1);
    let mut partials = s
        .alloc_zeros::<f64>(chunks as usize * n_models * 2)
        .ctx("allocating partial sums")?;
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = s.launch_builder(gpu.function("gta_l1"));
    b.arg(d_models).arg(args).arg(&mut partials);
    // SAFETY: argument types match `gta_l1`; partials hold chunks * n_models * 2 values.
    unsafe { b.launch(cfg) }.map_err(launch_err("gta_l1"))?;
    let p = s.clone_dtoh(&partials).ctx("reading partial sums")?;
    gpu.sync()?;
    let mut before = vec![0.0f64; n_models];
    let mut after = vec![0.0f64; n_models];
    for c in 0..chunks as usize {
        for i in 0..n_models {
            before[i] += p[(c * n_models + i) * 2];
            after[i] += p[(c * n_models + i) * 2 + 1];
        }
    }
    Ok(before
        .iter()
        .zip(&after)
        .map(|(&b, &a)| {
            let (b, a) = (b as f32, a as f32);
            if f64::from(b) >= 1e-7 && f64::from(a) >= 1e-7 {
                b / a
            } else {
                1.0
            }
        })
        .collect())
}

/// Exact TIES cuts for the models with `Some(k)` in `select`, written into `d_models[i].cut`
/// on the device (see `select.cu`). A model whose sampled bracket misses its target position
/// is selected again with its whole tensor gathered.
fn select_cuts(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    args: &GtaArgs,
    select: &[Option<u64>],
) -> Result<()> {
    let s = &gpu.stream;
    let n_models = select.len();
    let n = args.n;
    if FORCE_EXACT.load(Ordering::Relaxed) {
        let all: Vec<usize> = (0..n_models).filter(|&i| select[i].is_some()).collect();
        let p: Vec<u64> = select.iter().map(|k| k.unwrap_or(0)).collect();
        return select_exact(gpu, d_models, args, &p, &all);
    }
    // Candidates: a sixteenth of the tensor per model, at least 64K.
    let cap = (n / 16).max(1 << 16);
    let mut sel: Vec<SelModel> = select
        .iter()
        .enumerate()
        .map(|(i, k)| SelModel {
            p: k.unwrap_or(0),
            active: i32::from(k.is_some()),
            cand_off: i as u64 * cap,
            ..Default::default()
        })
        .collect();
    let mut d_sel = s.clone_htod(&sel).ctx("uploading selection state")?;
    let mut hist = s
        .alloc_zeros::<u32>(n_models * HBINS)
        .ctx("allocating histograms")?;
    // SAFETY: the gather writes every candidate slot before it is read.
    let mut cand =
        unsafe { s.alloc::<u64>(n_models * cap as usize) }.ctx("allocating candidates")?;
    // 1-2: sample histogram and bracket.
    let chunks_total = n.div_ceil(SAMPLE_CHUNK);
    let stride = (chunks_total / SAMPLE_CHUNKS).max(1);
    let n_chunks = chunks_total.div_ceil(stride);
    let sampled: u64 = (0..n_chunks)
        .map(|c| {
            let start = c * stride * SAMPLE_CHUNK;
            (n - start).min(SAMPLE_CHUNK)
        })
        .sum();
    {
        let cfg = LaunchConfig {
            grid_dim: (
                n_chunks.min(u64::from(gpu.sms) * 16) as u32,
                n_models as u32,
                1,
            ),
            block_dim: (SAMPLE_CHUNK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(gpu.function("sample_hist"));
        b.arg(&*d_models)
            .arg(&d_sel)
            .arg(args)
            .arg(&stride)
            .arg(&n_chunks)
            .arg(&mut hist);
        // SAFETY: argument types match `sample_hist`; hist holds n_models * HBINS counters.
        unsafe { b.launch(cfg) }.map_err(launch_err("sample_hist"))?;
        let cfg = LaunchConfig {
            grid_dim: (n_models as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(gpu.function("bracket_pick"));
        b.arg(&mut d_sel).arg(&hist).arg(&n).arg(&sampled);
        // SAFETY: argument types match `bracket_pick`.
        unsafe { b.launch(cfg) }.map_err(launch_err("bracket_pick"))?;
    }
    gather_and_pick(gpu, d_models, &mut d_sel, args, &mut cand, cap, &mut hist)?;
    sel = s.clone_dtoh(&d_sel).ctx("reading selection state")?;
    gpu.sync()?;
    // Fallback: models whose bracket missed, one at a time with everything gathered.
    let missed: Vec<usize> = (0..n_models)
        .filter(|&i| sel[i].active == 1 && sel[i].ok == 0)
        .collect();
    if !missed.is_empty() {
        let p: Vec<u64> = sel.iter().map(|m| m.p).collect();
        select_exact(gpu, d_models, args, &p, &missed)?;
    }
    Ok(())
}

/// The exact path: every element of the `missed` models gathered, then the four rounds.
fn select_exact(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    args: &GtaArgs,
    p: &[u64],
    missed: &[usize],
) -> Result<()> {
    let s = &gpu.stream;
    let n_models = p.len();
    let n = args.n;
    let mut hist = s
        .alloc_zeros::<u32>(n_models * HBINS)
        .ctx("allocating histograms")?;
    {
        let cap = n.max(1);
        // SAFETY: the gather writes every candidate slot before it is read.
        let mut cand = unsafe { s.alloc::<u64>(missed.len() * cap as usize) }
            .ctx("allocating candidates for the exact fallback")?;
        let fallback: Vec<SelModel> = (0..n_models)
            .map(|i| SelModel {
                p: p[i],
                lo: 0,
                hi: u32::MAX,
                active: i32::from(missed.contains(&i)),
                cand_off: missed.iter().position(|&m| m == i).unwrap_or(0) as u64 * cap,
                ..Default::default()
            })
            .collect();
        let mut d_sel = s.clone_htod(&fallback).ctx("uploading selection state")?;
        gather_and_pick(gpu, d_models, &mut d_sel, args, &mut cand, cap, &mut hist)?;
        let again = s.clone_dtoh(&d_sel).ctx("reading selection state")?;
        gpu.sync()?;
        if let Some(i) = missed.iter().find(|&&i| again[i].ok == 0) {
            return Err(CudaError::Invalid(format!(
                "internal error: exact selection failed for model #{i}"
            )));
        }
    }
    Ok(())
}

/// Steps 3-5 of the selection: gather, check, four 16-bit rounds.
fn gather_and_pick(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    d_sel: &mut CudaSlice<SelModel>,
    args: &GtaArgs,
    cand: &mut CudaSlice<u64>,
    cap: u64,
    hist: &mut CudaSlice<u32>,
) -> Result<()> {
    let s = &gpu.stream;
    let n_models = args.n_models;
    let cfg = gpu.grid(args.n);
    let mut b = s.launch_builder(gpu.function("bracket_compact"));
    b.arg(&*d_models)
        .arg(&mut *d_sel)
        .arg(args)
        .arg(&mut *cand)
        .arg(&cap);
    // SAFETY: argument types match `bracket_compact`; cand holds n_models * cap keys.
    unsafe { b.launch(cfg) }.map_err(launch_err("bracket_compact"))?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = s.launch_builder(gpu.function("bracket_check"));
    b.arg(&mut *d_sel).arg(&n_models).arg(&cap);
    // SAFETY: argument types match `bracket_check`.
    unsafe { b.launch(cfg) }.map_err(launch_err("bracket_check"))?;
    let blocks = (cap.div_ceil(256)).min(u64::from(gpu.sms) * 8).max(1) as u32;
    for shift in [48i32, 32, 16, 0] {
        s.memset_zeros(hist).ctx("clearing histograms")?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, n_models as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(gpu.function("cand_hist"));
        b.arg(&*d_sel)
            .arg(&*cand)
            .arg(&cap)
            .arg(&shift)
            .arg(&mut *hist);
        // SAFETY: argument types match `cand_hist`.
        unsafe { b.launch(cfg) }.map_err(launch_err("cand_hist"))?;
        let cfg = LaunchConfig {
            grid_dim: (n_models as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(gpu.function("cand_pick"));
        b.arg(&mut *d_sel)
            .arg(&mut *d_models)
            .arg(&*hist)
            .arg(&shift);
        // SAFETY: argument types match `cand_pick`.
        unsafe { b.launch(cfg) }.map_err(launch_err("cand_pick"))?;
    }
    Ok(())
}
