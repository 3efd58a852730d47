//! The Gram-based methods (`slerp`, `nuslerp`, `multislerp`, `karcher`) on the device: the
//! Gram matrices of `x_i = input_i − base`, the method's coefficients from them (its own CPU
//! code, through [`CoefficientFn`]), then `Σ_i c_i·x_i (+ base)`.
//!
//! The pair sums are those of the CPU (`amalgam_core::methods::gram`), bit for bit: one thread
//! per `ChunkedSum` chunk (whole-tensor grouping; the chunks are then added in order on the
//! host) or per row (per-row grouping), each summed sequentially in element order in f64. The
//! combination performs the CPU's f32 operations in input order. Fibre grouping (`Axis0`) runs
//! on the CPU.

use crate::device::Gpu;
use crate::error::{Ctx, CudaError, Result};
use crate::merge;
use crate::tensor::{DType, DeviceTensor};
use amalgam_core::methods::device::{CoefficientFn, DeviceGrouping, GramCombine, GramMatrices};
use amalgam_core::reduce::REDUCE_CHUNK;
use cudarc::driver::{DeviceRepr, PushKernelArg};

/// Most inputs the Gram kernels take.
pub const MAX_INPUTS: usize = 8;

/// One input (`struct GramInput` in `gram.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GramInput {
    ptr: u64,
    dt: i32,
    pad: i32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct GramInput`.
unsafe impl DeviceRepr for GramInput {}

/// Per-tensor arguments (`struct GramArgs` in `gram.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GramArgs {
    base: u64,
    n: u64,
    cols: u64,
    bad: u64,
    base_dt: i32,
    n_in: i32,
}

// SAFETY: plain `repr(C)` data with the layout of `struct GramArgs`.
unsafe impl DeviceRepr for GramArgs {}

/// Merge with a Gram-based method: `inputs` (and `base`) of one tensor whose rows are `cols`
/// long. Input slot `i` of a [`CudaError::NonFinite`] is input `i`, slot `inputs.len()` the
/// base.
#[allow(clippy::too_many_arguments)]
pub fn gram_merge(
    gpu: &Gpu,
    inputs: &[&DeviceTensor],
    base: Option<&DeviceTensor>,
    grouping: DeviceGrouping,
    cols: usize,
    coefficients: &CoefficientFn,
    combine: GramCombine,
    out_dtype: DType,
    allow_nonfinite: bool,
) -> Result<DeviceTensor> {
    let n_in = inputs.len();
    if combine == GramCombine::Stock && base.is_none() {
        return Err(CudaError::Invalid("gram: model stock needs a base".into()));
    }
    let n = inputs.first().map_or(0, |t| t.len);
    if n_in == 0
        || n_in > MAX_INPUTS
        || inputs.iter().any(|t| t.len != n)
        || base.is_some_and(|b| b.len != n)
        || n == 0
    {
        return Err(CudaError::Invalid(format!(
            "gram: {n_in} inputs (1 to {MAX_INPUTS}) of one non-zero length"
        )));
    }
    let seg_len = match grouping {
        DeviceGrouping::Whole => REDUCE_CHUNK,
        DeviceGrouping::Rows => cols.max(1),
        DeviceGrouping::Axis0 => {
            return Err(CudaError::Invalid(
                "gram: fibre (axis 0) grouping runs on the CPU".into(),
            ))
        }
    };
    let s = &gpu.stream;
    let table: Vec<GramInput> = inputs
        .iter()
        .map(|t| GramInput {
            ptr: t.addr(s),
            dt: t.dtype.code(),
            pad: 0,
        })
        .collect();
    let d_in = s.clone_htod(&table).ctx("uploading the inputs table")?;
    let bad = merge::bad_flags(gpu, n_in + 1)?;
    let args = GramArgs {
        base: base.map_or(0, |b| b.addr(s)),
        n: n as u64,
        cols: cols.max(1) as u64,
        bad: {
            let (p, _sync) = cudarc::driver::DevicePtr::device_ptr(&bad, s);
            p
        },
        base_dt: base.map_or(0, |b| b.dtype.code()),
        n_in: n_in as i32,
    };
    let width = match n_in {
        1..=2 => 2,
        3..=4 => 4,
        _ => 8,
    };
    let pairs = width * (width + 1) / 2;
    let segs = n.div_ceil(seg_len);
    let mut sums = s
        .alloc_zeros::<f64>(segs * pairs)
        .ctx("allocating pair sums")?;
    let kernel = format!("gram_seq_{width}");
    let seg = seg_len as u64;
    let mut b = s.launch_builder(gpu.function(&kernel));
    b.arg(&d_in).arg(&args).arg(&seg).arg(&mut sums);
    // SAFETY: argument types match `gram_seq_*`; sums holds segs * pairs values; one warp per
    // segment, in blocks of 256 threads (the kernel's shared tiles).
    unsafe { b.launch(gpu.grid(32 * segs as u64)) }.ctx("launching gram_seq")?;
    let host = s.clone_dtoh(&sums).ctx("reading pair sums")?;
    merge::check_bad(gpu, &bad, allow_nonfinite)?;
    let slot = |i: usize, k: usize| i * width - i * (i.saturating_sub(1)) / 2 + (k - i);
    let groups = match grouping {
        DeviceGrouping::Whole => 1,
        _ => segs,
    };
    let mut data = vec![0.0f64; groups * n_in * n_in];
    for g in 0..groups {
        for i in 0..n_in {
            for k in i..n_in {
                let p = slot(i, k);
                let v = match grouping {
                    // ChunkedSum::total: the chunks in order, from 0.0.
                    DeviceGrouping::Whole => (0..segs).fold(0.0f64, |a, c| a + host[c * pairs + p]),
                    _ => host[g * pairs + p],
                };
                data[(g * n_in + i) * n_in + k] = v;
                data[(g * n_in + k) * n_in + i] = v;
            }
        }
    }
    let gram = GramMatrices {
        n: n_in,
        groups,
        data,
    };
    let coefs = coefficients(&gram)?;
    if coefs.len() != groups * n_in {
        return Err(CudaError::Invalid(format!(
            "gram: {} coefficients for {groups} groups of {n_in} inputs",
            coefs.len()
        )));
    }
    let d_coefs = s.clone_htod(&coefs).ctx("uploading coefficients")?;
    let mut out = DeviceTensor::alloc(s, out_dtype, n)?;
    let (rows, out_dt) = (i32::from(groups > 1), out_dtype.code());
    let stock = i32::from(combine == GramCombine::Stock);
    let mut b = s.launch_builder(gpu.function("gram_combine"));
    b.arg(&d_in)
        .arg(&args)
        .arg(&d_coefs)
        .arg(&rows)
        .arg(&stock)
        .arg(&mut out.data)
        .arg(&out_dt);
    // SAFETY: argument types match `gram_combine`; coefs hold groups * n_in values.
    unsafe { b.launch(gpu.grid(n as u64)) }.ctx("launching gram_combine")?;
    gpu.sync()?;
    Ok(out)
}
