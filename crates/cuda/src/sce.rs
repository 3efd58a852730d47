//! SCE on the GPU (`amalgam_core::methods::sce`, methods.md §19): the variance selection
//! through the exact selection of [`crate::merge`] (slot 0 keyed by the variance across models),
//! the weights from per-chunk f64 sums of the masked squared task vectors (one warp per chunk,
//! each summed in element order; the chunks added on the host in chunk order, as
//! `ChunkedSum`), then one merge pass (`sce.cu`). Bit-identical to the CPU.

use crate::device::Gpu;
use crate::error::{Ctx, CudaError, Result};
use crate::merge::{self, GtaArgs, GtaModel, KernelTimer, MAX_MODELS, ORDER_VAR};
use crate::tensor::{DType, DeviceTensor};
use amalgam_core::reduce::REDUCE_CHUNK;
use cudarc::driver::{DevicePtr, PushKernelArg};

/// `sce.cu`'s selection modes.
const SEL_ALL: i32 = 0;
const SEL_NONE: i32 = 1;
const SEL_TOP: i32 = 2;

/// Below this the weight sum falls back to uniform weights (as the CPU).
const WEIGHT_EPS: f64 = 1e-6;

/// Merge `models` (task vectors against `base`) with SCE at `select_topk`, written as
/// `out_dtype`. Input slot 0 of a [`CudaError::NonFinite`] is the base, slot `1 + i` model `i`.
pub fn sce(
    gpu: &Gpu,
    base: &DeviceTensor,
    models: &[&DeviceTensor],
    select_topk: f64,
    out_dtype: DType,
    allow_nonfinite: bool,
) -> Result<DeviceTensor> {
    let n_models = models.len();
    let n = base.len;
    if n_models == 0 || n_models > MAX_MODELS || models.iter().any(|t| t.len != n) {
        return Err(CudaError::Invalid(format!(
            "sce: {n_models} models (1 to {MAX_MODELS}) of the base's length"
        )));
    }
    let s = &gpu.stream;
    let out = DeviceTensor::alloc(s, out_dtype, n)?;
    let mut host: Vec<GtaModel> = models
        .iter()
        .map(|t| GtaModel {
            ptr: t.addr(s),
            dt: t.dtype.code(),
            ..Default::default()
        })
        .collect();
    let mut refs: Vec<&DeviceTensor> = vec![base];
    refs.extend(models.iter().copied());
    merge::check_aligned(gpu, &refs)?;
    let bad = merge::bad_flags(gpu, n_models + 1)?;
    let args = GtaArgs {
        base: base.addr(s),
        out: out.addr(s),
        n: n as u64,
        bad: bad.device_ptr(s).0,
        base_dt: base.dtype.code(),
        out_dt: out_dtype.code(),
        n_models: n_models as i32,
        any_order: 1,
        ..Default::default()
    };
    let size = match n_models {
        0..=4 => 4,
        5..=8 => 8,
        _ => 16,
    };
    let timer = KernelTimer::start(gpu)?;
    // 1. The selection.
    let mut sel = if select_topk >= 1.0 {
        SEL_ALL
    } else if select_topk <= 0.0 {
        SEL_NONE
    } else {
        SEL_TOP
    };
    let mut d_models = s.clone_htod(&host).ctx("uploading the models")?;
    if sel == SEL_TOP {
        let mut count = s.alloc_zeros::<u64>(1).ctx("allocating a counter")?;
        let kernel = format!("sce_nonzero_{size}");
        let mut b = s.launch_builder(gpu.function(&kernel));
        b.arg(&d_models).arg(&args).arg(&mut count);
        // SAFETY: argument types match `sce_nonzero_*`.
        unsafe { b.launch(gpu.grid(n as u64)) }.ctx("launching sce_nonzero")?;
        let nonzero = s.clone_dtoh(&count).ctx("reading the count")?;
        gpu.sync()?;
        // As torch: int(count_nonzero(var) * density), an f32 product.
        let k = (nonzero[0] as f32 * select_topk as f32).floor() as u64;
        if k == 0 {
            sel = SEL_NONE;
        } else if k < n as u64 {
            if n > u32::MAX as usize {
                return Err(CudaError::Invalid(format!(
                    "sce: {n} elements; the GPU selection takes at most 2^32"
                )));
            }
            host[0].order = ORDER_VAR;
            d_models = s.clone_htod(&host).ctx("uploading the models")?;
            let mut select = vec![None; n_models];
            select[0] = Some(k);
            merge::select_cuts(gpu, &mut d_models, &args, &select)?;
        } else {
            sel = SEL_ALL;
        }
    }
    // 2. The weights: per chunk and model, the selected squared task-vector values.
    let chunks = n.div_ceil(REDUCE_CHUNK).max(1);
    let mut partials = s
        .alloc_zeros::<f64>(chunks * n_models)
        .ctx("allocating partial sums")?;
    let (kernel, chunk) = (format!("sce_sq_{size}"), REDUCE_CHUNK as u64);
    let mut b = s.launch_builder(gpu.function(&kernel));
    b.arg(&d_models)
        .arg(&args)
        .arg(&sel)
        .arg(&chunk)
        .arg(&mut partials);
    // SAFETY: argument types match `sce_sq_*`; partials hold chunks * n_models values; one warp
    // per chunk, in blocks of 256 threads (the kernel's shared tiles).
    unsafe { b.launch(gpu.grid(32 * chunks as u64)) }.ctx("launching sce_sq")?;
    let sums = s.clone_dtoh(&partials).ctx("reading partial sums")?;
    merge::check_bad(gpu, &bad, allow_nonfinite)?;
    let w: Vec<f64> = (0..n_models)
        .map(|i| (0..chunks).fold(0.0f64, |a, c| a + sums[c * n_models + i]) / n.max(1) as f64)
        .collect();
    let total: f64 = w.iter().sum();
    let weights: Vec<f32> = if total.abs() < WEIGHT_EPS {
        vec![1.0 / n_models as f32; n_models]
    } else {
        w.iter().map(|x| (x / total) as f32).collect()
    };
    // 3. The merge, with the weights and the selection's cut.
    let mut cur = s.clone_dtoh(&d_models).ctx("reading the models")?;
    gpu.sync()?;
    for (m, w) in cur.iter_mut().zip(&weights) {
        m.weight = *w;
    }
    let d_models = s.clone_htod(&cur).ctx("uploading the models")?;
    let kernel = format!("sce_merge_{size}");
    let mut b = s.launch_builder(gpu.function(&kernel));
    b.arg(&d_models).arg(&args).arg(&sel);
    // SAFETY: argument types match `sce_merge_*`; every pointer covers `n` elements.
    unsafe { b.launch(gpu.grid(n as u64)) }.ctx("launching sce_merge")?;
    timer.stop(gpu)?;
    gpu.sync()?;
    timer.finish()?;
    Ok(out)
}
