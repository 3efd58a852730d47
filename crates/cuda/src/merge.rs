//! Merges on the device: linear / task arithmetic in one fused pass over all inputs, and the
//! generalized task-arithmetic pipeline (task arithmetic, TIES, DARE linear and TIES,
//! Breadcrumbs, DELLA) fused per element after an exact per-tensor magnitude selection. DELLA's
//! per-group ranks come first, from sorts in shared memory: whole groups, or segments of long
//! groups merged by binary searches, for rank groups of any shape (see [`DellaGroups`]).
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
use amalgam_core::methods::sparsify::frac_count;
use amalgam_core::philox;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use std::sync::atomic::{AtomicBool, Ordering};

/// One model of the pipeline, as the kernels read it (`struct GtaModel` in `merge.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GtaModel {
    pub(crate) ptr: u64,
    pub(crate) threshold: u64,
    pub(crate) cut: u64,
    pub(crate) k0: u32,
    pub(crate) k1: u32,
    pub(crate) weight: f32,
    pub(crate) factor: f32,
    pub(crate) scale: f32,
    pub(crate) dt: i32,
    pub(crate) mask: i32,
    /// Selection order: `ORDER_DESC` (largest |δ| first) or `ORDER_ASC`.
    pub(crate) order: i32,
    /// DELLA: the ranks (u32 per element, 1-based within its group).
    pub(crate) aux: u64,
    /// DELLA: rank group length.
    pub(crate) group: u32,
    /// DELLA: `f32(density − ε)`.
    pub(crate) dm: f32,
    /// DELLA: `f32(ε)`.
    pub(crate) de: f32,
    /// DELLA: divide kept entries by their keep probability.
    pub(crate) inv: i32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct GtaModel`.
unsafe impl DeviceRepr for GtaModel {}
// SAFETY: all-zero bits are a valid value.
unsafe impl ValidAsZeroBits for GtaModel {}

/// One input of `linear_merge` (`struct LinInput` in `merge.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct LinInput {
    ptr: u64,
    w: f32,
    dt: i32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct LinInput`.
unsafe impl DeviceRepr for LinInput {}

/// Slots of [`LinTable`] (`LIN_TABLE`).
const LIN_TABLE: usize = 8;

/// The inputs of `linear_merge_2/4/8`, passed by value (`struct LinTable` in `merge.cu`); the
/// unused slots repeat input 0, which the kernels load but do not add.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct LinTable {
    inputs: [LinInput; LIN_TABLE],
}

// SAFETY: plain `repr(C)` data with the layout of `struct LinTable`.
unsafe impl DeviceRepr for LinTable {}
const _: () = assert!(std::mem::size_of::<LinTable>() == 128);

impl LinTable {
    /// `table` (1 to [`LIN_TABLE`] inputs) padded with its first input.
    fn padded(table: &[LinInput]) -> LinTable {
        LinTable {
            inputs: std::array::from_fn(|i| table.get(i).copied().unwrap_or(table[0])),
        }
    }
}

/// Slots of [`FastTable`] (`FAST_TABLE`).
const FAST_TABLE: usize = 8;

/// One model of the specialised pipeline kernels (`struct FastModel` in `merge.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FastModel {
    ptr: u64,
    thr: u64,
    cut: u64,
    w: f32,
    f: f32,
    sc: f32,
    dt: i32,
    k0: u32,
    k1: u32,
}

/// The models of `gta_plain/rank/dare_*`, passed by value (`struct FastTable` in `merge.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FastTable {
    models: [FastModel; FAST_TABLE],
}

// SAFETY: plain `repr(C)` data with the layout of `struct FastTable`.
unsafe impl DeviceRepr for FastTable {}
const _: () = assert!(std::mem::size_of::<FastTable>() == 384);

impl FastTable {
    /// The table of `models` (at most [`FAST_TABLE`]) with their rescale `factors` and the
    /// selection's `cuts` (per model; read for the models with a rank mask); unused slots read
    /// the base (`args.base`), which the kernels load but do not add.
    fn new(models: &[GtaModel], factors: &[f32], cuts: &[u64], args: &GtaArgs) -> FastTable {
        FastTable {
            models: std::array::from_fn(|i| match models.get(i) {
                Some(m) => {
                    let dare = m.mask == MASK_DARE;
                    FastModel {
                        ptr: m.ptr,
                        thr: if dare { m.threshold } else { 1 << 32 },
                        cut: if m.mask == MASK_RANK {
                            cuts[i]
                        } else {
                            u64::MAX
                        },
                        w: m.weight,
                        f: factors[i],
                        sc: if dare { m.scale } else { 1.0 },
                        dt: m.dt,
                        k0: m.k0,
                        k1: m.k1,
                    }
                }
                None => FastModel {
                    ptr: args.base,
                    dt: args.base_dt,
                    ..FastModel::default()
                },
            }),
        }
    }
}

/// The pipeline's per-tensor arguments (`struct GtaArgs` in `merge.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GtaArgs {
    pub(crate) base: u64,
    pub(crate) out: u64,
    pub(crate) n: u64,
    pub(crate) name_hash: u64,
    pub(crate) bad: u64,
    pub(crate) base_dt: i32,
    pub(crate) out_dt: i32,
    pub(crate) n_models: i32,
    pub(crate) consensus: i32,
    pub(crate) strict: i32,
    pub(crate) zero_pos: i32,
    pub(crate) normalize: i32,
    /// Selection slots in an order other than `ORDER_DESC` (the `_any` counting kernels).
    pub(crate) any_order: i32,
    pub(crate) plain_div: f32,
    pub(crate) lambda: f32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct GtaArgs`.
unsafe impl DeviceRepr for GtaArgs {}

/// Selection state of one model (`struct SelModel` in `select.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SelModel {
    pub(crate) p: u64,
    pub(crate) before: u64,
    pub(crate) srank: u64,
    pub(crate) less: u64,
    pub(crate) cut: u64,
    pub(crate) lo: u32,
    pub(crate) hi: u32,
    pub(crate) guess: u32,
    pub(crate) key: u32,
    pub(crate) active: i32,
    pub(crate) state: i32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct SelModel`.
unsafe impl DeviceRepr for SelModel {}
// SAFETY: all-zero bits are a valid value.
unsafe impl ValidAsZeroBits for SelModel {}

/// `SelModel.state` values (`ST_*` in `select.cu`).
pub(crate) const ST_DONE: i32 = 1;
/// K was not the sample's guess: its per-chunk counts are taken again.
#[cfg(test)]
pub(crate) const ST_TIES: i32 = 2;
pub(crate) const ST_MISSED: i32 = 3;

/// Most models the pipeline kernels take (more merge on the CPU).
pub const MAX_MODELS: usize = 16;

const MASK_NONE: i32 = 0;
const MASK_RANK: i32 = 1;
const MASK_DARE: i32 = 2;
const MASK_OUTLIER: i32 = 3;
const MASK_DELLA: i32 = 4;
/// `GtaModel.order` of SCE's variance selection (`ORDER_VAR`).
pub(crate) const ORDER_VAR: i32 = 2;
/// Longest DELLA rank group sorted whole in shared memory (128 KiB of 8-byte keys;
/// [`DELLA_SMALL_GROUP`] without the large shared memory opt-in). Longer groups are sorted in
/// segments of this length, whose ranks are then merged (see [`DellaGroups`]).
pub const DELLA_MAX_GROUP: usize = 16384;
/// `GtaModel.order` (`ORDER_*` in `merge.cu`).
pub(crate) const ORDER_ASC: i32 = 1;
/// Bins of a 16-bit histogram (`HBINS`).
pub(crate) const HBINS: usize = 1 << 16;
/// Bins of the full-resolution bracket histogram (`FINE_BINS`).
pub(crate) const FINE_BINS: usize = 4 << 16;
/// Elements per tie-count chunk (`TIE_CHUNK`).
pub(crate) const TIE_CHUNK: u64 = 4096;
/// Elements of one sample chunk (`SAMPLE_CHUNK`).
pub(crate) const SAMPLE_CHUNK: u64 = 256;
/// Sample chunks aimed at (about 1M sampled elements per model).
pub(crate) const SAMPLE_CHUNKS: u64 = 1 << 12;
/// Elements per L1 partial (`L1_CHUNK`).
const L1_CHUNK: u64 = 65536;

static FORCE_EXACT: AtomicBool = AtomicBool::new(false);
static NARROW_LOADS: AtomicBool = AtomicBool::new(false);

/// Keep 2-byte inputs on the pipeline's general instances (4 elements per thread, 8-byte loads,
/// each input decoded as it is loaded) instead of the f16/bf16 ones (`_v8`, `_h`): for
/// `gpu-check`, which times both.
pub fn narrow_loads(on: bool) {
    NARROW_LOADS.store(on, Ordering::Relaxed);
}

/// Whether every tensor is 2 bytes per element and wide loads are not turned off.
fn wide(tensors: &[&DeviceTensor]) -> bool {
    !NARROW_LOADS.load(Ordering::Relaxed) && tensors.iter().all(|t| t.dtype.size() == 2)
}

/// Skip the sampled bracket of the TIES selection and gather every element (the exact path
/// taken when a bracket misses): for tests and `gpu-check`, which compare both paths.
pub fn force_exact_selection(on: bool) {
    FORCE_EXACT.store(on, Ordering::Relaxed);
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
    pub sparsify: Vec<DeviceSparsify>,
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
    /// The tensor's shape (DELLA's rank groups).
    pub shape: Vec<usize>,
}

impl GtaSpec {
    /// A spec from the CPU pipeline's options and a method's device plan, for tensor `name`.
    pub fn from_options(
        opts: &amalgam_core::methods::gta::GtaOptions,
        name: &str,
        shape: &[usize],
        seed: u64,
        sparsify: &[DeviceSparsify],
    ) -> Self {
        Self {
            shape: shape.to_vec(),
            name: name.to_string(),
            seed,
            weights: opts.weights.clone(),
            sparsify: sparsify.to_vec(),
            consensus: opts.consensus,
            normalize: opts.normalize,
            lambda: opts.lambda,
            rescale: opts.rescale,
            zero_sign: opts.zero_sign,
            allow_nonfinite: false,
        }
    }
}

pub(crate) fn launch_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError + '_ {
    move |source| CudaError::Driver {
        what: format!("launching {what}"),
        source,
    }
}

pub(crate) fn check_aligned(gpu: &Gpu, tensors: &[&DeviceTensor]) -> Result<()> {
    for t in tensors {
        if t.addr(&gpu.stream) % 16 != 0 {
            return Err(CudaError::Invalid(
                "a device tensor is not 16-byte aligned".into(),
            ));
        }
    }
    Ok(())
}

/// Zeroed finiteness flags for `slots` inputs (each records `!index` of its lowest
/// non-finite value).
pub(crate) fn bad_flags(gpu: &Gpu, slots: usize) -> Result<CudaSlice<u64>> {
    gpu.stream
        .alloc_zeros::<u64>(slots)
        .ctx("allocating finiteness flags")
}

/// Wait for the stream, then the lowest non-finite index per input slot: an error naming the
/// first bad input, if any.
pub(crate) fn check_bad(gpu: &Gpu, bad: &CudaSlice<u64>, allow: bool) -> Result<()> {
    let v = gpu
        .stream
        .clone_dtoh(bad)
        .ctx("reading the finiteness flags")?;
    gpu.sync()?;
    if allow {
        return Ok(());
    }
    let worst = v
        .iter()
        .enumerate()
        .filter(|(_, &f)| f != 0)
        .map(|(slot, &f)| (!f, slot))
        .min();
    match worst {
        Some((index, slot)) => Err(CudaError::NonFinite { slot, index }),
        None => Ok(()),
    }
}

thread_local! {
    static KERNEL_TIMES: std::cell::RefCell<Option<Vec<f64>>> =
        const { std::cell::RefCell::new(None) };
}

/// Collect (on this thread) the device time of each merge from its first kernel to its last,
/// parameter uploads and result checks excluded: what `gpu-check` reports.
pub fn collect_kernel_times(on: bool) {
    KERNEL_TIMES.with(|t| *t.borrow_mut() = on.then(Vec::new));
}

/// The kernel times collected since the last call, in milliseconds.
pub fn take_kernel_times() -> Vec<f64> {
    KERNEL_TIMES.with(|t| {
        t.borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    })
}

thread_local! {
    static PHASES: std::cell::RefCell<Option<Vec<(&'static str, cudarc::driver::CudaEvent)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Start per-phase device timing of one merge when `AMALGAM_GPU_PROFILE` is set.
pub(crate) fn phases_begin(gpu: &Gpu) {
    if std::env::var_os("AMALGAM_GPU_PROFILE").is_some() {
        PHASES.with(|p| *p.borrow_mut() = Some(Vec::new()));
        mark(gpu, "start");
    }
}

/// Record the end of a phase (a no-op unless profiling).
pub(crate) fn mark(gpu: &Gpu, name: &'static str) {
    PHASES.with(|p| {
        if let Some(v) = p.borrow_mut().as_mut() {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            if let Ok(e) = gpu.ctx.new_event(flags) {
                if e.record(&gpu.stream).is_ok() {
                    v.push((name, e));
                }
            }
        }
    });
}

/// Print the phases' device times to stderr (a no-op unless profiling).
pub(crate) fn phases_end() {
    PHASES.with(|p| {
        if let Some(v) = p.borrow_mut().take() {
            let mut line = String::from("gpu phases (ms):");
            for w in v.windows(2) {
                if let Ok(ms) = w[0].1.elapsed_ms(&w[1].1) {
                    line.push_str(&format!(" {} {:.3}", w[1].0, ms));
                }
            }
            eprintln!("{line}");
        }
    });
}

/// Events around a merge's kernels, when [`collect_kernel_times`] is on.
pub(crate) struct KernelTimer(Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>);

impl KernelTimer {
    pub(crate) fn start(gpu: &Gpu) -> Result<Self> {
        if !KERNEL_TIMES.with(|t| t.borrow().is_some()) {
            return Ok(Self(None));
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = gpu.ctx.new_event(flags).ctx("creating an event")?;
        let b = gpu.ctx.new_event(flags).ctx("creating an event")?;
        a.record(&gpu.stream).ctx("recording an event")?;
        Ok(Self(Some((a, b))))
    }

    pub(crate) fn stop(&self, gpu: &Gpu) -> Result<()> {
        if let Some((_, b)) = &self.0 {
            b.record(&gpu.stream).ctx("recording an event")?;
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<()> {
        if let Some((a, b)) = self.0 {
            let ms = f64::from(a.elapsed_ms(&b).ctx("reading an event")?);
            KERNEL_TIMES.with(|t| {
                if let Some(v) = t.borrow_mut().as_mut() {
                    v.push(ms);
                }
            });
        }
        Ok(())
    }
}

/// `out = Σ_i x_i·w_i` (model order), divided by `divisor` when given: `linear` in one pass
/// over all inputs (any mix of f32/f16/bf16), written as `out_dtype`. Task arithmetic without
/// sparsification is [`gta`] with [`DeviceSparsify::None`]. Input slot `i` of a
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
    let table: Vec<LinInput> = inputs
        .iter()
        .zip(weights)
        .map(|(t, &w)| LinInput {
            ptr: t.addr(s),
            w,
            dt: t.dtype.code(),
        })
        .collect();
    let mut bad = bad_flags(gpu, inputs.len())?;
    let (n_in, has_div, div) = (
        inputs.len() as i32,
        i32::from(divisor.is_some()),
        divisor.unwrap_or(1.0),
    );
    let (nn, out_dt) = (n as u64, out_dtype.code());
    let kernel = match inputs.len() {
        0..=2 => "linear_merge_2",
        3..=4 => "linear_merge_4",
        5..=8 => "linear_merge_8",
        _ => "linear_merge_any",
    };
    // Up to 8 inputs travel in the launch's parameters; more in a device table.
    let d_in = match kernel {
        "linear_merge_any" => Some(s.clone_htod(&table).ctx("uploading the inputs table")?),
        _ => None,
    };
    let by_value = LinTable::padded(&table);
    let timer = KernelTimer::start(gpu)?;
    let mut b = s.launch_builder(gpu.function(kernel));
    match &d_in {
        Some(d) => b.arg(d),
        None => b.arg(&by_value),
    };
    b.arg(&n_in)
        .arg(&has_div)
        .arg(&div)
        .arg(&nn)
        .arg(&mut out.data)
        .arg(&out_dt)
        .arg(&mut bad);
    // SAFETY: argument types and order match `linear_merge_*`; every pointer covers `n`
    // elements.
    unsafe { b.launch(gpu.grid((nn / 8).max(1))) }.map_err(launch_err(kernel))?;
    timer.stop(gpu)?;
    check_bad(gpu, &bad, allow_nonfinite)?;
    timer.finish()?;
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
        || n_models > MAX_MODELS
        || spec.weights.len() != n_models
        || spec.sparsify.len() != n_models
        || models.iter().any(|t| t.len != n)
    {
        return Err(CudaError::Invalid(format!(
            "gta: {n_models} models (1 to {MAX_MODELS}), {} weights, {} sparsifiers, lengths must match",
            spec.weights.len(),
            spec.sparsify.len()
        )));
    }
    let s = &gpu.stream;
    let out = DeviceTensor::alloc(s, out_dtype, n)?;
    let mut host: Vec<GtaModel> = Vec::with_capacity(n_models);
    let mut select = vec![None; n_models];
    // Breadcrumbs: the positions [lo, hi) kept, per model.
    let mut outliers: Vec<Option<(u64, u64)>> = vec![None; n_models];
    // DELLA: the models ranked per group.
    let mut della = vec![false; n_models];
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
            order: 0,
            aux: 0,
            group: 0,
            dm: 0.0,
            de: 0.0,
            inv: 0,
        };
        match *sp {
            DeviceSparsify::None => {}
            DeviceSparsify::Magnitude { density } => {
                if let Some(k) = magnitude_keep(density, n) {
                    m.mask = MASK_RANK;
                    select[i] = Some(k);
                }
            }
            DeviceSparsify::Outliers {
                density,
                gamma,
                legacy,
            } => {
                if density < 1.0 && n > 0 {
                    m.mask = MASK_OUTLIER;
                    m.order = ORDER_ASC;
                    let target = frac_count(density, n);
                    let n_top = frac_count(gamma, n);
                    if target == 0 || (legacy && n_top == 0) {
                        // Nothing kept: [0, 0).
                        outliers[i] = Some((0, 0));
                    } else {
                        let n_bot = n.saturating_sub(target + n_top);
                        outliers[i] = Some((n_bot as u64, (n_bot + target) as u64));
                    }
                }
            }
            DeviceSparsify::MinMagnitude { bits } => {
                // The ascending-order mask with [threshold, cut) = [(bits, 0), end).
                m.mask = MASK_OUTLIER;
                m.order = ORDER_ASC;
                m.threshold = u64::from(bits | 0x8000_0000) << 32;
                m.cut = u64::MAX;
            }
            DeviceSparsify::Della {
                density,
                epsilon,
                inverse,
            } => {
                m.mask = MASK_DELLA;
                m.dm = (density - epsilon) as f32;
                m.de = epsilon as f32;
                m.inv = i32::from(inverse);
                della[i] = true;
            }
            DeviceSparsify::Dare { density, inverse } => {
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
    let bad = bad_flags(gpu, n_models + 1)?;
    let args = GtaArgs {
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
        any_order: i32::from(outliers.iter().any(Option::is_some)),
        plain_div,
        lambda: spec.lambda,
    };
    let mut refs: Vec<&DeviceTensor> = vec![base];
    refs.extend(models.iter().copied());
    check_aligned(gpu, &refs)?;
    // DELLA's ranks, one u32 per element of each ranked model (kept alive until the merge),
    // and for groups sorted in segments one scratch key buffer (u64 per element), shared by
    // the models (ranked one after the other on the stream).
    let mut ranks: Vec<CudaSlice<u32>> = Vec::new();
    let mut della_keys: Option<CudaSlice<u64>> = None;
    let mut groups = None;
    if della.iter().any(|&d| d) {
        let g = della_group(&spec.shape, n, gpu.big_smem).map_err(|e| {
            CudaError::Invalid(format!(
                "tensor \"{}\" of shape {:?}: {e}",
                spec.name, spec.shape
            ))
        })?;
        for (i, m) in host.iter_mut().enumerate() {
            if della[i] {
                // SAFETY: `della_ranks` writes every element before the merge reads it.
                let r = unsafe { s.alloc::<u32>(n.max(1)) }.ctx("allocating DELLA ranks")?;
                m.aux = cudarc::driver::DevicePtr::device_ptr(&r, s).0;
                m.group = g.c;
                ranks.push(r);
            }
        }
        if g.segmented() {
            // SAFETY: `della_ranks` writes every key before it reads one.
            let k = unsafe { s.alloc::<u64>(n.max(1)) }.ctx("allocating DELLA sort keys")?;
            della_keys = Some(k);
        }
        groups = Some(g);
    }
    let mut d_models = s.clone_htod(&host).ctx("uploading the models")?;
    // The selection's cuts per model (also in `d_models`), for the specialised kernels.
    let mut cuts = vec![u64::MAX; n_models];
    let timer = KernelTimer::start(gpu)?;
    phases_begin(gpu);
    if select.iter().any(Option::is_some) {
        if n > u32::MAX as usize {
            return Err(CudaError::Invalid(format!(
                "tensor \"{}\" has {n} elements; GPU magnitude selection takes at most 2^32",
                spec.name
            )));
        }
        cuts = select_cuts(gpu, &mut d_models, &args, &select)?;
    }
    if let Some(g) = &groups {
        let mut slot = 0;
        for (i, &d) in della.iter().enumerate() {
            if d {
                della_ranks(
                    gpu,
                    &d_models,
                    &args,
                    i,
                    g,
                    &mut ranks[slot],
                    della_keys.as_mut(),
                )?;
                slot += 1;
            }
        }
    }
    if outliers.iter().any(Option::is_some) {
        if n > u32::MAX as usize {
            return Err(CudaError::Invalid(format!(
                "tensor \"{}\" has {n} elements; GPU magnitude selection takes at most 2^32",
                spec.name
            )));
        }
        outlier_cuts(gpu, &mut d_models, &args, &outliers)?;
    }
    mark(gpu, "select");
    let mut factors: Vec<f32> = host.iter().map(|m| m.factor).collect();
    if spec.rescale && host.iter().any(|m| m.mask != MASK_NONE) {
        let l1 = l1_factors(gpu, &d_models, &args, n_models)?;
        let mut cur = s.clone_dtoh(&d_models).ctx("reading the models")?;
        gpu.sync()?;
        for ((m, f), slot) in cur.iter_mut().zip(l1).zip(&mut factors) {
            if m.mask != MASK_NONE {
                m.factor = f;
                *slot = f;
            }
        }
        d_models = s.clone_htod(&cur).ctx("uploading the models")?;
    }
    // One mask kind for every model (or none) takes the specialised kernels.
    let kinds: Vec<i32> = host
        .iter()
        .map(|m| m.mask)
        .filter(|&k| k != MASK_NONE)
        .collect();
    let mode = match kinds.first() {
        None => Some("plain"),
        Some(&k) if kinds.iter().all(|&x| x == k) => match k {
            MASK_RANK => Some("rank"),
            MASK_DARE => Some("dare"),
            _ => None,
        },
        Some(_) => None,
    };
    let size = match n_models {
        0..=2 => 2,
        3..=4 => 4,
        5..=8 => 8,
        _ => 16,
    };
    // The specialised kernels: one mask kind, up to 8 models; with a 2-byte base and models,
    // the instances for f16/bf16 alone (`_v8`: up to 4 models, 8 elements per thread, 16-byte
    // loads; `_h`: up to 8 models, 4 per thread).
    let fast = mode.is_some() && size <= FAST_TABLE;
    let half = fast && wide(&refs);
    let v8 = half && size <= 4;
    let kernel = match mode {
        // (Rank masks come from the selection, which takes fewer than 2^32 elements, as the
        // specialised kernels' 32-bit index compare needs.)
        Some(m) if v8 => format!("gta_{m}_{size}_v8"),
        Some(m) if half => format!("gta_{m}_{size}_h"),
        Some(m) if fast => format!("gta_{m}_{size}"),
        _ => format!("gta_merge_{size}"),
    };
    let kernel = kernel.as_str();
    let vec = if v8 { 8u64 } else { 4 };
    let cfg = gpu.grid((n as u64 / vec).max(1));
    let table = FastTable::new(&host, &factors, &cuts, &args);
    let mut b = s.launch_builder(gpu.function(kernel));
    if fast {
        b.arg(&table);
    } else {
        b.arg(&d_models);
    }
    b.arg(&args);
    // SAFETY: `FastTable`/`GtaModel`/`GtaArgs` match the kernel's structs (the specialised
    // kernels take the table, the others the device's models); every pointer covers `n`.
    unsafe { b.launch(cfg) }.map_err(launch_err(kernel))?;
    mark(gpu, "merge");
    timer.stop(gpu)?;
    check_bad(gpu, &bad, spec.allow_nonfinite)?;
    phases_end();
    timer.finish()?;
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
/// on the device (see `select.cu`): a sampled bracket, one counting pass, the resolution of K
/// and of its ties; a model whose bracket misses its target goes through the exact path (the
/// whole key range). Returns the cuts as the host read them back (per model; meaningful for
/// the selected ones).
pub(crate) fn select_cuts(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    args: &GtaArgs,
    select: &[Option<u64>],
) -> Result<Vec<u64>> {
    let s = &gpu.stream;
    let n_models = select.len();
    let n = args.n;
    let force = FORCE_EXACT.load(Ordering::Relaxed);
    let sel: Vec<SelModel> = select
        .iter()
        .map(|k| SelModel {
            p: k.unwrap_or(0),
            active: i32::from(k.is_some()),
            state: if force { ST_MISSED } else { 0 },
            ..Default::default()
        })
        .collect();
    let mut d_sel = s.clone_htod(&sel).ctx("uploading selection state")?;
    let mut hist = s
        .alloc_zeros::<u32>(n_models * HBINS)
        .ctx("allocating histograms")?;
    let sample = Sample::of(n, SAMPLE_CHUNKS);
    let mut bufs = SelBufs::alloc(gpu, n_models, n, sample.n_chunks)?;
    mark(gpu, "alloc");
    let plan = bufs.launch;
    if !force {
        let Sample {
            stride,
            n_chunks,
            sampled,
        } = sample;
        for lo_pass in [0i32, 1] {
            if lo_pass == 1 {
                s.memset_zeros(&mut hist).ctx("clearing histograms")?;
            }
            if lo_pass == 0 && gpu.big_smem {
                let mut b = s.launch_builder(gpu.function("sample_hist_smem"));
                b.arg(&*d_models)
                    .arg(&d_sel)
                    .arg(args)
                    .arg(&stride)
                    .arg(&n_chunks)
                    .arg(&mut hist);
                // SAFETY: argument types match `sample_hist_smem`; hist holds n_models * HBINS.
                unsafe { b.launch(plan.sample_smem) }.map_err(launch_err("sample_hist_smem"))?;
            } else {
                let mut b = s.launch_builder(gpu.function("sample_hist"));
                b.arg(&*d_models)
                    .arg(&d_sel)
                    .arg(args)
                    .arg(&stride)
                    .arg(&n_chunks)
                    .arg(&lo_pass)
                    .arg(&mut hist);
                // SAFETY: argument types match `sample_hist`; hist holds n_models * HBINS counts.
                unsafe { b.launch(plan.sample) }.map_err(launch_err("sample_hist"))?;
            }
            mark(gpu, "sample_hist");
            if lo_pass == 0 {
                let mut b = s.launch_builder(gpu.function("sample_pick"));
                b.arg(&mut d_sel).arg(&hist).arg(&n).arg(&sampled);
                // SAFETY: argument types match `sample_pick`.
                unsafe { b.launch(plan.per_model) }.map_err(launch_err("sample_pick"))?;
            } else {
                let mut b = s.launch_builder(gpu.function("sample_pick_lo"));
                b.arg(&mut d_sel).arg(&hist);
                // SAFETY: argument types match `sample_pick_lo`.
                unsafe { b.launch(plan.per_model) }.map_err(launch_err("sample_pick_lo"))?;
            }
            mark(gpu, "sample_pick");
        }
        count_and_resolve(gpu, d_models, &mut d_sel, args, &mut bufs)?;
    }
    let mut now = s.clone_dtoh(&d_sel).ctx("reading selection state")?;
    gpu.sync()?;
    mark(gpu, "state_read");
    if now.iter().any(|m| m.active == 1 && m.state == ST_MISSED) {
        // The exact path: the high 16 bits of every key give the bracket.
        s.memset_zeros(&mut hist).ctx("clearing histograms")?;
        let mut b = s.launch_builder(gpu.function("full_hist"));
        b.arg(&*d_models).arg(&d_sel).arg(args).arg(&mut hist);
        // SAFETY: argument types match `full_hist`.
        unsafe { b.launch(plan.full) }.map_err(launch_err("full_hist"))?;
        let mut b = s.launch_builder(gpu.function("full_pick"));
        b.arg(&mut d_sel).arg(&hist);
        // SAFETY: argument types match `full_pick`.
        unsafe { b.launch(plan.per_model) }.map_err(launch_err("full_pick"))?;
        s.memset_zeros(&mut bufs.fine).ctx("clearing histograms")?;
        s.memset_zeros(&mut bufs.cand_n)
            .ctx("clearing candidate counts")?;
        count_and_resolve(gpu, d_models, &mut d_sel, args, &mut bufs)?;
        now = s.clone_dtoh(&d_sel).ctx("reading selection state")?;
        gpu.sync()?;
    }
    if let Some(i) = (0..n_models).find(|&i| now[i].active == 1 && now[i].state != ST_DONE) {
        return Err(CudaError::Invalid(format!(
            "internal error: exact selection did not finish for model #{i} (state {})",
            now[i].state
        )));
    }
    Ok(now.iter().map(|m| m.cut).collect())
}

/// The sample of `select_cuts`: every `stride`-th chunk of [`SAMPLE_CHUNK`] elements,
/// `n_chunks` chunks of `sampled` elements in all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) stride: u64,
    pub(crate) n_chunks: u64,
    pub(crate) sampled: u64,
}

impl Sample {
    /// About `chunks` chunks of `n` elements (every chunk when there are fewer).
    pub(crate) fn of(n: u64, chunks: u64) -> Self {
        let chunks_total = n.div_ceil(SAMPLE_CHUNK);
        let stride = (chunks_total / chunks).max(1);
        let n_chunks = chunks_total.div_ceil(stride);
        let sampled = (0..n_chunks)
            .map(|c| (n - c * stride * SAMPLE_CHUNK).min(SAMPLE_CHUNK))
            .sum();
        Self {
            stride,
            n_chunks,
            sampled,
        }
    }
}

/// How the GPU ranks a tensor's DELLA groups (mergekit's `della_magprune` ranks along axis 1:
/// see `amalgam_core::methods::della::RankGroups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DellaGroups {
    /// Group length (the shape's axis 1; a 1-D tensor's length; 1 for a scalar).
    pub c: u32,
    /// Stride between a group's elements (the product of the axes after 1; 1: rows).
    pub inner: u64,
    /// The most keys one block sorts in shared memory ([`DELLA_MAX_GROUP`], or
    /// [`DELLA_SMALL_GROUP`] without the large shared memory opt-in): groups up to this long
    /// are sorted whole, longer ones in segments of this many keys whose ranks are then merged
    /// by binary searches.
    pub seg: u32,
}

impl DellaGroups {
    /// Whether groups are sorted in segments (longer than [`DellaGroups::seg`]): the ranking
    /// then takes a scratch buffer of one u64 per element.
    pub fn segmented(&self) -> bool {
        self.c > self.seg
    }

    /// Segments per group (1 when sorted whole).
    pub fn segments(&self) -> u32 {
        self.c.div_ceil(self.seg)
    }
}

/// Longest DELLA rank group sorted whole without the large shared memory opt-in (32 KiB of
/// 8-byte keys; the default limit is 48 KiB).
pub const DELLA_SMALL_GROUP: usize = 4096;

/// The DELLA rank groups of a tensor of `shape` (`n` elements) as the GPU ranks them: any shape
/// the CPU ranks (scalars, 1-D, rows of a matrix, axis 1 of an N-D tensor, whatever its group
/// length). An error only where a group's positions do not fit the kernels' 32 bits, or when
/// `n` is not the shape's element count.
pub fn della_group(
    shape: &[usize],
    n: usize,
    big_smem: bool,
) -> std::result::Result<DellaGroups, String> {
    let g = amalgam_core::methods::della::RankGroups::of(shape);
    let c = u32::try_from(g.c).map_err(|_| {
        format!(
            "DELLA rank groups of {} elements (axis 1): the GPU ranks groups of at most {} \
             (32-bit positions)",
            g.c,
            u32::MAX
        )
    })?;
    let whole = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if whole != Some(n) || !n.is_multiple_of(g.slab()) {
        return Err(format!(
            "{n} elements do not make a tensor of shape {shape:?} (DELLA rank groups)"
        ));
    }
    let seg = if big_smem {
        DELLA_MAX_GROUP
    } else {
        DELLA_SMALL_GROUP
    } as u32;
    Ok(DellaGroups {
        c,
        inner: g.inner as u64,
        seg,
    })
}

/// Whether [`gta`] takes `plan` on a tensor of `shape` (DELLA: every shape [`della_group`]
/// accepts).
pub fn gta_supports(gpu: &Gpu, sparsify: &[DeviceSparsify], shape: &[usize]) -> bool {
    della_key_bytes(gpu, sparsify, shape).is_some()
}

/// Device bytes of DELLA's sort keys for a tensor of `shape`: one u64 per element when its
/// groups are sorted in segments ([`DellaGroups::segmented`]; the buffer serves every model),
/// else 0 (no DELLA, or groups sorted whole); `None` when the GPU cannot rank the tensor.
pub fn della_key_bytes(gpu: &Gpu, sparsify: &[DeviceSparsify], shape: &[usize]) -> Option<u64> {
    let della = sparsify
        .iter()
        .any(|s| matches!(s, DeviceSparsify::Della { .. }));
    if !della {
        return Some(0);
    }
    let n = shape.iter().product::<usize>();
    let g = della_group(shape, n, gpu.big_smem).ok()?;
    Some(if g.segmented() { n as u64 * 8 } else { 0 })
}

/// Threads per block of `della_ranks`' sorts (its launch bounds).
const DELLA_THREADS: u32 = 1024;

/// `della_ranks`'s modes (`DELLA_*` in `merge.cu`): a whole group per sort, ranks written.
const DELLA_RANK: i32 = 0;
/// Sorted segments written to the scratch keys.
const DELLA_SEGMENTS: i32 = 1;
/// Ranks from the sorted segments (binary searches).
pub(crate) const DELLA_COUNT: i32 = 2;

/// Model `model`'s DELLA ranks (1-based per element within its group, into `ranks`) by
/// `della_ranks`: groups of at most `g.seg` elements sorted whole by (|δ| bits, position) in
/// shared memory, several to a block when short (`DELLA_RANK`); longer groups sorted in
/// segments of `g.seg` keys into `keys` (one u64 per element: [`DellaGroups::segmented`]),
/// then each key's rank counted by binary searches in its group's other segments
/// (`DELLA_SEGMENTS`, then `DELLA_COUNT`).
fn della_ranks(
    gpu: &Gpu,
    d_models: &CudaSlice<GtaModel>,
    args: &GtaArgs,
    model: usize,
    g: &DellaGroups,
    ranks: &mut CudaSlice<u32>,
    keys: Option<&mut CudaSlice<u64>>,
) -> Result<()> {
    let s = &gpu.stream;
    let plan = DellaLaunch::of(args.n, g, gpu.sms);
    let model = model as i32;
    let keys_ptr = match (&keys, g.segmented()) {
        (Some(k), true) if k.len() as u64 >= args.n => {
            cudarc::driver::DevicePtr::device_ptr(*k, s).0
        }
        (_, true) => {
            return Err(CudaError::Invalid(
                "internal error: segmented DELLA ranks without a key per element".into(),
            ))
        }
        _ => 0u64,
    };
    let launch = |mode: i32, cfg: LaunchConfig, ranks: &mut CudaSlice<u32>| -> Result<()> {
        let mut b = s.launch_builder(gpu.function("della_ranks"));
        b.arg(d_models)
            .arg(args)
            .arg(&model)
            .arg(&plan.c)
            .arg(&plan.inner)
            .arg(&plan.seg)
            .arg(&plan.pow2)
            .arg(&mode)
            .arg(ranks)
            .arg(&keys_ptr);
        // SAFETY: argument types match `della_ranks`; ranks holds n elements, and keys too when
        // segmented (checked above); a whole group's keys fit `per * pow2` shared keys, a
        // segment's `pow2 = seg`; the count mode takes no shared memory.
        unsafe { b.launch(cfg) }.map_err(launch_err("della_ranks"))?;
        Ok(())
    };
    launch(plan.mode, plan.sort, ranks)?;
    if let Some(count) = plan.count {
        launch(DELLA_COUNT, count, ranks)?;
    }
    mark(gpu, "della_ranks");
    Ok(())
}

/// The launches of `della_ranks` for one model's tensor of `n` elements in groups `g` on a
/// device of `sms` multiprocessors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DellaLaunch {
    /// Group length (at least 1).
    pub(crate) c: u32,
    /// Stride between a group's elements.
    pub(crate) inner: u64,
    /// Keys per sorted unit (the group, or a segment of it).
    pub(crate) seg: u32,
    /// Keys per unit in shared memory (`seg` rounded up to a power of two).
    pub(crate) pow2: u32,
    /// The sorting launch's mode (`DELLA_RANK` or `DELLA_SEGMENTS`).
    pub(crate) mode: i32,
    /// The sorting launch.
    pub(crate) sort: LaunchConfig,
    /// The counting launch (`DELLA_COUNT`) after a segmented sort.
    pub(crate) count: Option<LaunchConfig>,
}

impl DellaLaunch {
    /// The launches for `n` elements in groups `g` on `sms` multiprocessors.
    pub(crate) fn of(n: u64, g: &DellaGroups, sms: u32) -> Self {
        let (c, inner) = (g.c.max(1), g.inner);
        let units = n / u64::from(c) * u64::from(g.segments());
        let (mode, seg, pow2) = if g.segmented() {
            (DELLA_SEGMENTS, g.seg, g.seg)
        } else {
            (DELLA_RANK, c, c.next_power_of_two())
        };
        // Short groups are sorted several to a block: 2048 keys at least, a pair per thread
        // (`della_ranks` takes the same count from its block size).
        let per = (2 * DELLA_THREADS / pow2).max(1);
        let sort = LaunchConfig {
            grid_dim: (
                units.div_ceil(u64::from(per)).clamp(1, u64::from(sms) * 8) as u32,
                1,
                1,
            ),
            block_dim: (DELLA_THREADS, 1, 1),
            shared_mem_bytes: per * pow2 * 8,
        };
        let count = g.segmented().then(|| crate::device::grid_for(n, sms));
        Self {
            c,
            inner,
            seg,
            pow2,
            mode,
            sort,
            count,
        }
    }
}

/// Breadcrumbs' two cuts per model (`outliers[i]`: the positions `[lo, hi)` kept of the
/// ascending order): the lower cut, kept in `threshold`, then the upper one in `cut`, each by
/// [`select_cuts`] (position 0 is the first position, position n the end).
fn outlier_cuts(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    args: &GtaArgs,
    outliers: &[Option<(u64, u64)>],
) -> Result<()> {
    let s = &gpu.stream;
    let n = args.n;
    let inner = |p: u64| (p > 0 && p < n).then_some(p);
    let at = |p: u64, cut: u64| match p {
        0 => 0,
        p if p >= n => u64::MAX,
        _ => cut,
    };
    let lo: Vec<Option<u64>> = outliers
        .iter()
        .map(|o| o.and_then(|o| inner(o.0)))
        .collect();
    if lo.iter().any(Option::is_some) {
        select_cuts(gpu, d_models, args, &lo)?;
    }
    let mut cur = s.clone_dtoh(d_models).ctx("reading the models")?;
    gpu.sync()?;
    for (m, o) in cur.iter_mut().zip(outliers) {
        if let Some((l, h)) = *o {
            m.threshold = if l == h { 0 } else { at(l, m.cut) };
            m.cut = if l == h { 0 } else { at(h, 0) };
        }
    }
    *d_models = s.clone_htod(&cur).ctx("uploading the models")?;
    let hi: Vec<Option<u64>> = outliers
        .iter()
        .map(|o| o.and_then(|o| (o.0 < o.1).then_some(o.1)).and_then(inner))
        .collect();
    if hi.iter().any(Option::is_some) {
        select_cuts(gpu, d_models, args, &hi)?;
    }
    Ok(())
}

/// The device buffers of one selection, and its launches: the fine histograms, the per-chunk
/// tie counts and the candidates (`select.cu`).
struct SelBufs {
    /// `[n_models][FINE_BINS]` counts of the keys inside each bracket.
    fine: CudaSlice<u32>,
    /// `[n_models][n_tchunks]` counts of the guess (or K) per chunk.
    tie: CudaSlice<u32>,
    /// `[n_models][cand_cap]` candidates, `(key << 32) | index`.
    cand: CudaSlice<u64>,
    /// Candidates listed per model (past `cand_cap` when the list overflowed).
    cand_n: CudaSlice<u32>,
    /// Candidates one model's list holds.
    cand_cap: u32,
    /// The selection's launches.
    launch: SelectLaunch,
}

impl SelBufs {
    /// Zeroed buffers for `n_models` models of `n` elements sampled in `sample_chunks` chunks.
    fn alloc(gpu: &Gpu, n_models: usize, n: u64, sample_chunks: u64) -> Result<Self> {
        let s = &gpu.stream;
        let launch = SelectLaunch::of(n, n_models, sample_chunks, gpu.sms);
        let cand_cap = cand_cap(n);
        Ok(Self {
            fine: s
                .alloc_zeros::<u32>(n_models * FINE_BINS)
                .ctx("allocating histograms")?,
            tie: s
                .alloc_zeros::<u32>(n_models * launch.n_tchunks as usize)
                .ctx("allocating tie counts")?,
            cand: s
                .alloc_zeros::<u64>(n_models * cand_cap as usize)
                .ctx("allocating candidates")?,
            cand_n: s
                .alloc_zeros::<u32>(n_models)
                .ctx("allocating candidate counts")?,
            cand_cap,
            launch,
        })
    }
}

/// The launch shapes of one selection ([`select_cuts`]; the emulator's selection test launches
/// the same).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SelectLaunch {
    /// TIE_CHUNK chunks of the tensor.
    pub(crate) n_tchunks: u64,
    /// `sample_hist`: the sample's chunks (x, at most 16 blocks per multiprocessor) by models
    /// (y), a chunk per block.
    pub(crate) sample: LaunchConfig,
    /// `sample_hist_smem`: blocks of 4 sample chunks in shared memory (x, at most one per
    /// multiprocessor) by models (y).
    pub(crate) sample_smem: LaunchConfig,
    /// `sample_pick`, `sample_pick_lo`, `resolve`, `full_pick`: a block of 1024 per model.
    pub(crate) per_model: LaunchConfig,
    /// `bracket_pass`, `tie_pass`: blocks of 256 over the TIE_CHUNK chunks, at most 8 per
    /// multiprocessor.
    pub(crate) count: LaunchConfig,
    /// `full_hist`: a grid-stride launch over the elements.
    pub(crate) full: LaunchConfig,
}

impl SelectLaunch {
    /// The launches for `n_models` models of `n` elements, `sample_chunks` of them sampled, on
    /// `sms` multiprocessors.
    pub(crate) fn of(n: u64, n_models: usize, sample_chunks: u64, sms: u32) -> Self {
        let n_tchunks = n.div_ceil(TIE_CHUNK).max(1);
        let sms64 = u64::from(sms);
        let block = |x: u64, y: usize, threads: u32, smem: u32| LaunchConfig {
            grid_dim: (x as u32, y as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        Self {
            n_tchunks,
            sample: block(
                sample_chunks.min(sms64 * 16),
                n_models,
                SAMPLE_CHUNK as u32,
                0,
            ),
            sample_smem: block(
                sample_chunks.div_ceil(4).min(sms64),
                n_models,
                1024,
                crate::device::SAMPLE_SMEM,
            ),
            per_model: block(n_models as u64, 1, 1024, 0),
            count: block(n_tchunks.min(sms64 * 8), 1, 256, 0),
            full: crate::device::grid_for(n, sms),
        }
    }
}

/// Candidates listed per model for a tensor of `n` elements: the keys within CAND_SPAN of the
/// guess hold n / 600 to n / 300 elements of normal f32 task vectors cut at 20-50%; a list
/// that overflows (data with fewer distinct keys) falls back to the tie pass.
pub(crate) fn cand_cap(n: u64) -> u32 {
    (n / 128 + 4096).min(u64::from(u32::MAX)) as u32
}

/// The counting pass, the resolution, the tie counts of a K that was not the guess (unless the
/// candidates held it), and the resolution again.
fn count_and_resolve(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    d_sel: &mut CudaSlice<SelModel>,
    args: &GtaArgs,
    bufs: &mut SelBufs,
) -> Result<()> {
    let s = &gpu.stream;
    let pass = counting_kernel("bracket_pass", args);
    let pass = pass.as_str();
    let mut b = s.launch_builder(gpu.function(pass));
    b.arg(&*d_models)
        .arg(&mut *d_sel)
        .arg(args)
        .arg(&mut bufs.fine)
        .arg(&mut bufs.tie)
        .arg(&bufs.launch.n_tchunks)
        .arg(&mut bufs.cand)
        .arg(&mut bufs.cand_n)
        .arg(&bufs.cand_cap);
    // SAFETY: argument types match `bracket_pass`; fine, tie and cand hold n_models rows.
    unsafe { b.launch(bufs.launch.count) }.map_err(launch_err(pass))?;
    mark(gpu, "bracket_pass");
    resolve(gpu, d_models, d_sel, args, bufs)?;
    tie_round(gpu, d_models, d_sel, args, bufs)
}

/// The `bracket_pass` / `tie_pass` instance for the args' model count and slot orders.
pub(crate) fn counting_kernel(pass: &str, args: &GtaArgs) -> String {
    let size = match args.n_models {
        0..=4 => 4,
        5..=8 => 8,
        _ => 16,
    };
    let any = if args.any_order != 0 { "_any" } else { "" };
    format!("{pass}{any}_{size}")
}

/// `resolve`: K and the cut of every model in ST_PENDING or ST_TIES.
fn resolve(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    d_sel: &mut CudaSlice<SelModel>,
    args: &GtaArgs,
    bufs: &mut SelBufs,
) -> Result<()> {
    let mut b = gpu.stream.launch_builder(gpu.function("resolve"));
    b.arg(&mut *d_models)
        .arg(&mut *d_sel)
        .arg(args)
        .arg(&mut bufs.fine)
        .arg(&bufs.tie)
        .arg(&bufs.launch.n_tchunks)
        .arg(&bufs.cand)
        .arg(&bufs.cand_n)
        .arg(&bufs.cand_cap);
    // SAFETY: argument types match `resolve`.
    unsafe { b.launch(bufs.launch.per_model) }.map_err(launch_err("resolve"))?;
    mark(gpu, "resolve");
    Ok(())
}

/// The per-chunk counts of K for the models in ST_TIES (`tie_pass_*`), then `resolve`.
fn tie_round(
    gpu: &Gpu,
    d_models: &mut CudaSlice<GtaModel>,
    d_sel: &mut CudaSlice<SelModel>,
    args: &GtaArgs,
    bufs: &mut SelBufs,
) -> Result<()> {
    let ties = counting_kernel("tie_pass", args);
    let ties = ties.as_str();
    let mut b = gpu.stream.launch_builder(gpu.function(ties));
    b.arg(&*d_models)
        .arg(&*d_sel)
        .arg(args)
        .arg(&mut bufs.tie)
        .arg(&bufs.launch.n_tchunks);
    // SAFETY: argument types match `tie_pass`.
    unsafe { b.launch(bufs.launch.count) }.map_err(launch_err(ties))?;
    mark(gpu, "tie_pass");
    resolve(gpu, d_models, d_sel, args, bufs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amalgam_core::methods::della::RankGroups;

    /// `della_ranks`'s key of task-vector value `d` at position `p` of its group.
    fn key(d: f32, p: usize) -> u64 {
        (u64::from(d.to_bits() & 0x7fff_ffff) << 32) | p as u64
    }

    /// The kernel's bitonic sort of one unit (`sk.len()` a power of two), step for step.
    fn bitonic(sk: &mut [u64]) {
        let pow2 = sk.len();
        let mut k = 2;
        while k <= pow2 {
            let dir = k & (pow2 - 1);
            let mut h = k >> 1;
            while h > 0 {
                // Pair t: keys i (bit h clear) and i + h.
                for t in 0..pow2 / 2 {
                    let i = ((t & !(h - 1)) << 1) | (t & (h - 1));
                    if (sk[i] > sk[i + h]) == (i & dir == 0) {
                        sk.swap(i, i + h);
                    }
                }
                h >>= 1;
            }
            k <<= 1;
        }
    }

    /// `della_below`: the number of keys of the sorted `s` below `k` (a binary search).
    fn below(s: &[u64], k: u64) -> u32 {
        let (mut lo, mut hi) = (0usize, s.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if s[mid] < k {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo as u32
    }

    /// A host model of `della_ranks` on the task vector `d` with its index arithmetic: whole
    /// groups sorted and ranked (`DELLA_RANK`), or segments sorted into the scratch keys
    /// (`DELLA_SEGMENTS`), then rank = 1 + position in its segment + binary-search counts in
    /// the group's other segments (`DELLA_COUNT`).
    fn model_ranks(d: &[f32], g: &DellaGroups) -> Vec<u32> {
        let n = d.len();
        let (c, inner, seg) = (g.c as usize, g.inner as usize, g.seg as usize);
        let elem = |grp: usize, p: usize| {
            if inner == 1 {
                grp * c + p
            } else {
                (grp / inner) * c * inner + p * inner + grp % inner
            }
        };
        let mut ranks = vec![0u32; n];
        let groups = n / c;
        if !g.segmented() {
            for grp in 0..groups {
                let mut sk = vec![u64::MAX; c.next_power_of_two()];
                for (p, k) in sk.iter_mut().enumerate().take(c) {
                    *k = key(d[elem(grp, p)], p);
                }
                bitonic(&mut sk);
                for (r, &k) in sk.iter().enumerate().take(c) {
                    ranks[elem(grp, (k & 0xffff_ffff) as usize)] = r as u32 + 1;
                }
            }
            return ranks;
        }
        let nseg = g.segments() as usize;
        let mut keys = vec![0u64; n];
        for u in 0..groups * nseg {
            let (grp, s) = (u / nseg, u % nseg);
            let mut sk = vec![u64::MAX; seg];
            for (r, k) in sk.iter_mut().enumerate() {
                let p = s * seg + r;
                if p < c {
                    *k = key(d[elem(grp, p)], p);
                }
            }
            bitonic(&mut sk);
            for (r, &k) in sk.iter().enumerate() {
                let slot = s * seg + r;
                if slot < c {
                    keys[grp * c + slot] = k;
                }
            }
        }
        for t in 0..n {
            let grp = t / c;
            let w = t - grp * c;
            let s = w / seg;
            let k = keys[t];
            let group = &keys[grp * c..(grp + 1) * c];
            let mut rank = 1 + (w - s * seg) as u32;
            for o in (0..nseg).filter(|&o| o != s) {
                let lo = o * seg;
                rank += below(&group[lo..(lo + seg).min(c)], k);
            }
            ranks[elem(grp, (k & 0xffff_ffff) as usize)] = rank;
        }
        ranks
    }

    /// The CPU's ranks (`della::ranks_of` per group of `RankGroups::of(shape)`): a stable sort
    /// by |d|, ties in position order.
    fn cpu_ranks(d: &[f32], shape: &[usize]) -> Vec<u32> {
        let RankGroups { c, inner } = RankGroups::of(shape);
        let mut ranks = vec![0u32; d.len()];
        for (o, slab) in d.chunks(c * inner).enumerate() {
            for j in 0..inner {
                let mut order: Vec<usize> = (0..c).collect();
                order.sort_by(|&a, &b| {
                    slab[a * inner + j]
                        .abs()
                        .total_cmp(&slab[b * inner + j].abs())
                });
                for (pos, &k) in order.iter().enumerate() {
                    ranks[o * c * inner + k * inner + j] = pos as u32 + 1;
                }
            }
        }
        ranks
    }

    /// Values with many equal magnitudes of both signs (±0 included).
    fn tied_values(n: usize, salt: u64) -> Vec<f32> {
        let mut s = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let level = (s >> 40) % 7;
                let v = level as f32 * 0.125;
                if (s >> 20) & 1 == 1 {
                    -v
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn segment_ranks_match_a_sort() {
        let mut checked = 0;
        for c in [1usize, 2, 3, 7, 16, 33, 100, 255, 1000] {
            for shape in [vec![c], vec![3, c], vec![2, c, 3], vec![2, c, 1, 2]] {
                let n: usize = shape.iter().product();
                let d = tied_values(n, (c * 31 + shape.len()) as u64);
                let want = cpu_ranks(&d, &shape);
                for seg in [1u32, 2, 4, 8, 64, 4096] {
                    let g = DellaGroups {
                        seg,
                        ..della_group(&shape, n, false).expect("a valid shape")
                    };
                    assert_eq!(
                        model_ranks(&d, &g),
                        want,
                        "shape {shape:?}, segments of {seg}"
                    );
                    checked += 1;
                }
            }
        }
        // The real segment lengths, on groups that are not a multiple of them.
        for (shape, big) in [
            (vec![10_000], false),
            (vec![2, 9_000], false),
            (vec![2, 5_000, 2], false),
            (vec![40_000], true),
        ] {
            let n: usize = shape.iter().product();
            let d = tied_values(n, n as u64);
            let g = della_group(&shape, n, big).expect("a valid shape");
            assert!(g.segmented(), "{shape:?}");
            assert_eq!(model_ranks(&d, &g), cpu_ranks(&d, &shape), "{shape:?}");
            checked += 1;
        }
        assert_eq!(checked, 9 * 4 * 6 + 4);
    }

    #[test]
    fn della_groups_of_every_shape() {
        let g = |shape: &[usize], big| della_group(shape, shape.iter().product(), big);
        let ok = |shape: &[usize], big| g(shape, big).expect("a valid shape");
        assert_eq!(
            ok(&[], true),
            DellaGroups {
                c: 1,
                inner: 1,
                seg: DELLA_MAX_GROUP as u32
            }
        );
        assert_eq!(
            (ok(&[70_000], true).c, ok(&[70_000], true).inner),
            (70_000, 1)
        );
        assert!(ok(&[70_000], true).segmented());
        assert_eq!(ok(&[70_000], true).segments(), 5);
        assert!(!ok(&[3, 16_384], true).segmented());
        assert!(ok(&[3, 16_384], false).segmented());
        assert_eq!(ok(&[3, 16_384], false).segments(), 4);
        assert!(ok(&[3, 40_000], true).segmented());
        let t = ok(&[6, 40, 7], true);
        assert_eq!((t.c, t.inner, t.segmented()), (40, 7, false));
        let t = ok(&[2, 3, 4, 5], false);
        assert_eq!((t.c, t.inner, t.seg), (3, 20, DELLA_SMALL_GROUP as u32));
        // Empty tensors.
        assert!(g(&[0, 5], true).is_ok());
        assert!(g(&[4, 0, 3], true).is_ok());
        // Positions beyond 32 bits, and a length that is not the shape's.
        let e = g(&[1, 1 << 32], true).expect_err("too long");
        assert!(e.contains("32-bit"), "{e}");
        assert!(della_group(&[3, 5], 16, true).is_err());
        assert!(della_group(&[3, 5], 15, true).is_ok());
    }

    #[test]
    fn kernel_constants_match_the_source() {
        let src = include_str!("../kernels/merge.cu");
        for (name, v) in [
            ("MASK_NONE", MASK_NONE),
            ("MASK_RANK", MASK_RANK),
            ("MASK_DARE", MASK_DARE),
            ("MASK_OUTLIER", MASK_OUTLIER),
            ("MASK_DELLA", MASK_DELLA),
            ("ORDER_ASC", ORDER_ASC),
            ("ORDER_VAR", ORDER_VAR),
            ("DELLA_RANK", DELLA_RANK),
            ("DELLA_SEGMENTS", DELLA_SEGMENTS),
            ("DELLA_COUNT", DELLA_COUNT),
        ] {
            assert!(src.contains(&format!("#define {name} {v}\n")), "{name}");
        }
        assert!(src.contains(&format!("#define L1_CHUNK {L1_CHUNK}\n")));
        let select = include_str!("../kernels/select.cu");
        for (name, v) in [
            ("ST_DONE", ST_DONE as u64),
            ("ST_MISSED", ST_MISSED as u64),
            ("HBINS", HBINS as u64),
            ("TIE_CHUNK", TIE_CHUNK),
            ("SAMPLE_CHUNK", SAMPLE_CHUNK),
        ] {
            assert!(select.contains(&format!("#define {name} {v}\n")), "{name}");
        }
        // The argument list `della_ranks` is launched with.
        let flat = src.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains(
            "della_ranks(const GtaModel* models, GtaArgs a, int model, u32 c, u64 inner, \
             u32 seg, u32 pow2, int mode, u32* ranks, u64* keys)"
        ));
        // Its block size, which its shared keys per step follow (`DellaLaunch::of`).
        assert!(flat.contains(&format!("__launch_bounds__({DELLA_THREADS}) della_ranks(")));
        // Whole groups and segments are sorted as powers of two in the dynamic shared memory
        // `device.rs` grants `della_ranks` (the default 48 KiB without the opt-in).
        const {
            assert!(DELLA_MAX_GROUP.is_power_of_two() && DELLA_SMALL_GROUP.is_power_of_two());
            assert!(DELLA_MAX_GROUP * 8 == crate::device::SAMPLE_SMEM as usize);
            assert!(DELLA_SMALL_GROUP * 8 <= 48 << 10);
        }
    }
}
