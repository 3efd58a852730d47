//! The engine's [`Accelerator`] on a GPU: inputs read straight into pinned buffers and copied
//! on the copy stream (two buffers, so that reading chunk k+1 from disk overlaps the copy of
//! chunk k), the merge kernels on the compute stream after an event, the output copied back in
//! chunks (writing chunk k to the checkpoint overlaps the copy of chunk k+1), encoded on the
//! device in the output's dtype.

use crate::device::Gpu;
use crate::error::{Ctx, CudaError};
use crate::gram;
use crate::merge::{self, GtaSpec};
use crate::tensor::{DType, DeviceTensor};
use amalgam_core::methods::device::{DeviceGrouping, DevicePlan};
use amalgam_core::solve::cg::{CgOptions, CgResult, GramSolver};
use amalgam_core::tensor::{Input, TensorJob, TensorReader};
use amalgam_core::MergeError;
use amalgam_engine::device::{Accelerator, Preloaded};
use amalgam_engine::error::EngineError;
use amalgam_engine::run::TensorOut;
use cudarc::driver::{CudaEvent, DevicePtr, PinnedHostSlice};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes per pinned transfer buffer.
pub const STAGE_BYTES: usize = 64 << 20;

/// Transfer figures of a run (for `gpu-check` and `--verbose`).
#[derive(Debug, Clone, Default)]
pub struct TransferStats {
    /// Bytes copied host to device.
    pub h2d_bytes: u64,
    /// Time spent reading inputs into the pinned buffers (host side).
    pub read_time: Duration,
    /// Wall time of the uploads (reads and copies, overlapped).
    pub upload_time: Duration,
    /// Bytes copied device to host.
    pub d2h_bytes: u64,
    /// Wall time from the uploads' end to the merge kernels' end (selection included).
    pub compute_time: Duration,
    /// Wall time of the copies back and the writes to the checkpoint.
    pub download_time: Duration,
    /// Tensors merged on the device.
    pub tensors: u64,
    /// Tensors handed back to the CPU (too large for the device's free memory).
    pub declined: u64,
}

/// Pinned buffers and their transfers' events, for one direction.
struct Buffers {
    bufs: [PinnedHostSlice<u8>; 2],
    done: [CudaEvent; 2],
}

/// A tensor's inputs on the device ([`Accelerator::preload`]): usable on the compute stream
/// once it waits for `ready`.
struct Loaded {
    tensors: Vec<DeviceTensor>,
    ready: CudaEvent,
}

/// A GPU merging the tensors whose methods have a device plan.
pub struct GpuAccelerator {
    gpu: Gpu,
    up: Mutex<Buffers>,
    down: Mutex<Buffers>,
    stats: Mutex<TransferStats>,
}

fn engine_err(e: CudaError) -> EngineError {
    match e {
        CudaError::Merge(m) => EngineError::Merge(m),
        other => EngineError::Merge(MergeError::Read(format!("GPU: {other}"))),
    }
}

impl GpuAccelerator {
    /// Open device `ordinal` and allocate the pinned buffers.
    pub fn open(ordinal: usize) -> crate::Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        let ev = || gpu.ctx.new_event(None).ctx("creating an event");
        // SAFETY: buffers are written before they are read (uploads) or copied into first
        // (downloads). Write-combined memory only for the upload side, which the host only
        // writes.
        let up = unsafe {
            [
                gpu.ctx.alloc_pinned::<u8>(STAGE_BYTES),
                gpu.ctx.alloc_pinned::<u8>(STAGE_BYTES),
            ]
        };
        let down = unsafe {
            [
                gpu.ctx.alloc_pinned_with_flags::<u8>(STAGE_BYTES, 0),
                gpu.ctx.alloc_pinned_with_flags::<u8>(STAGE_BYTES, 0),
            ]
        };
        let [u0, u1] = up;
        let [d0, d1] = down;
        let up = Buffers {
            bufs: [
                u0.ctx("allocating pinned memory")?,
                u1.ctx("allocating pinned memory")?,
            ],
            done: [ev()?, ev()?],
        };
        let down = Buffers {
            bufs: [
                d0.ctx("allocating pinned memory")?,
                d1.ctx("allocating pinned memory")?,
            ],
            done: [ev()?, ev()?],
        };
        Ok(Self {
            gpu,
            up: Mutex::new(up),
            down: Mutex::new(down),
            stats: Mutex::new(TransferStats::default()),
        })
    }

    /// The open device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Transfer figures so far.
    pub fn stats(&self) -> TransferStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Upload `inputs` of `job` (whole tensors) through the pinned buffers on the copy stream.
    fn upload(
        &self,
        job: &TensorJob,
        reader: &dyn TensorReader,
        inputs: &[Input],
    ) -> crate::Result<Loaded> {
        let mut guard = self.up.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *guard;
        let n = job.numel();
        let copy = &self.gpu.copy;
        let started = Instant::now();
        let mut read_time = Duration::ZERO;
        let mut bytes = 0u64;
        let mut out = Vec::with_capacity(inputs.len());
        let mut k = 0usize;
        for &input in inputs {
            let raw = reader.raw_dtype(input)?;
            let dtype = raw.map_or(DType::F32, DType::from);
            let t = DeviceTensor::alloc(copy, dtype, n)?;
            let base_ptr = t.addr(copy);
            let per = STAGE_BYTES / dtype.size();
            let mut lo = 0usize;
            while lo < n {
                let hi = (lo + per).min(n);
                let len = (hi - lo) * dtype.size();
                let slot = k % 2;
                k += 1;
                b.done[slot].synchronize().ctx("waiting for a transfer")?;
                // SAFETY: the slot's last copy has completed (its event), so the host may write.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(
                        b.bufs[slot].as_mut_ptr().ctx("mapping pinned memory")?,
                        len,
                    )
                };
                let t0 = Instant::now();
                let done = match raw {
                    Some(_) => reader.read_raw_bytes(input, lo..hi, buf)?,
                    None => false,
                };
                if !done {
                    let vals: &mut [f32] = bytemuck::cast_slice_mut(buf);
                    reader.read(input, lo..hi, vals)?;
                }
                read_time += t0.elapsed();
                let dst = base_ptr + (lo * dtype.size()) as u64;
                // SAFETY: `buf` is pinned and stays untouched until `done[slot]` fires;
                // `dst` lies inside the tensor's allocation.
                unsafe { cudarc::driver::result::memcpy_htod_async(dst, buf, copy.cu_stream()) }
                    .ctx("copying to the device")?;
                b.done[slot].record(copy).ctx("recording a transfer")?;
                bytes += len as u64;
                lo = hi;
            }
            out.push(t);
        }
        let ready = self.gpu.ctx.new_event(None).ctx("creating an event")?;
        ready.record(copy).ctx("recording the uploads")?;
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.h2d_bytes += bytes;
        s.read_time += read_time;
        s.upload_time += started.elapsed();
        Ok(Loaded {
            tensors: out,
            ready,
        })
    }

    /// Copy `t` back in chunks and hand them to `writer` (bytes in its dtype, or f32).
    fn download(&self, t: &DeviceTensor, writer: &mut dyn TensorOut) -> Result<(), EngineError> {
        let mut guard = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *guard;
        let s = &self.gpu.stream;
        let size = t.dtype.size();
        let total = t.len * size;
        let src = {
            let (p, _sync) = t.data.device_ptr(s);
            p
        };
        let chunks: Vec<(usize, usize)> = (0..total)
            .step_by(STAGE_BYTES)
            .map(|lo| (lo, (lo + STAGE_BYTES).min(total)))
            .collect();
        let mut pending: Option<(usize, usize)> = None;
        let write = |b: &mut Buffers,
                     (slot, len): (usize, usize),
                     writer: &mut dyn TensorOut|
         -> Result<(), EngineError> {
            b.done[slot]
                .synchronize()
                .ctx("waiting for a transfer")
                .map_err(engine_err)?;
            // SAFETY: the copy into this slot has completed (its event).
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    b.bufs[slot]
                        .as_ptr()
                        .ctx("mapping pinned memory")
                        .map_err(engine_err)?,
                    len,
                )
            };
            if writer.raw_dtype().is_some() {
                writer.write_raw(bytes)
            } else {
                writer.write_f32(bytemuck::cast_slice(bytes))
            }
        };
        for (k, &(lo, hi)) in chunks.iter().enumerate() {
            let slot = k % 2;
            // SAFETY: the slot's previous contents were written out (pending handled below
            // before the slot comes round again); `src + lo` lies inside the tensor.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(
                    b.bufs[slot]
                        .as_mut_ptr()
                        .ctx("mapping pinned memory")
                        .map_err(engine_err)?,
                    hi - lo,
                );
                cudarc::driver::result::memcpy_dtoh_async(dst, src + lo as u64, s.cu_stream())
            }
            .ctx("copying to the host")
            .map_err(engine_err)?;
            b.done[slot]
                .record(s)
                .ctx("recording a transfer")
                .map_err(engine_err)?;
            if let Some(p) = pending.take() {
                write(b, p, writer)?;
            }
            pending = Some((slot, hi - lo));
        }
        if let Some(p) = pending {
            write(b, p, writer)?;
        }
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .d2h_bytes += total as u64;
        Ok(())
    }

    /// Whether the tensor's inputs, output and selection buffers fit the free device memory.
    fn fits(&self, plan: &DevicePlan, job: &TensorJob, inputs: usize) -> bool {
        match plan {
            DevicePlan::Gta { .. } | DevicePlan::Sce { .. } if job.n_models > merge::MAX_MODELS => {
                return false
            }
            DevicePlan::Gta { sparsify, .. }
                if !merge::gta_supports(&self.gpu, sparsify, &job.shape) =>
            {
                return false
            }
            DevicePlan::Gram {
                inputs, grouping, ..
            } if inputs.len() > gram::MAX_INPUTS || *grouping == DeviceGrouping::Axis0 => {
                return false
            }
            _ => {}
        }
        let n = job.numel() as u64;
        let mut need = (inputs as u64 + 1) * n * 4;
        if matches!(plan, DevicePlan::Gta { .. } | DevicePlan::Sce { .. }) {
            // The selection's histograms (1.25 MiB per model), per-chunk tie counts and
            // DELLA's ranks.
            need += inputs as u64 * ((2 << 20) + n / 1024 + n * 4);
        }
        match self.gpu.ctx.mem_get_info() {
            Ok((free, _)) => need + (256 << 20) < free as u64,
            Err(_) => false,
        }
    }
}

/// The inputs a plan reads: the models for `linear`, the base then the models for the pipeline.
fn plan_inputs(plan: &DevicePlan, job: &TensorJob) -> Vec<Input> {
    match plan {
        DevicePlan::Linear { .. } => (0..job.n_models).map(Input::Model).collect(),
        DevicePlan::Gta { .. } | DevicePlan::Sce { .. } => std::iter::once(Input::Base)
            .chain((0..job.n_models).map(Input::Model))
            .collect(),
        // The inputs, then the base.
        DevicePlan::Gram { inputs, base, .. } => inputs.iter().copied().chain(*base).collect(),
    }
}

impl Accelerator for GpuAccelerator {
    fn describe(&self) -> String {
        format!("cuda:{} {}", self.gpu.ctx.ordinal(), self.gpu.name)
    }

    fn gram_solver(&self) -> Option<Arc<dyn GramSolver>> {
        Some(Arc::new(GpuGramSolver::new(&self.gpu)))
    }

    fn report(&self) -> Option<String> {
        let st = self.stats();
        Some(format!(
            "{}: {} tensor(s) merged on the GPU, {} handed back to the CPU (too large); the \
             methods without GPU kernels merge on the CPU",
            self.describe(),
            st.tensors,
            st.declined
        ))
    }

    fn preload(
        &self,
        plan: &DevicePlan,
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<Option<Preloaded>, EngineError> {
        let inputs = plan_inputs(plan, job);
        if job.numel() == 0 || !self.fits(plan, job, inputs.len()) {
            return Ok(None);
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .ctx("binding the context")
            .map_err(engine_err)?;
        let loaded = self.upload(job, reader, &inputs).map_err(engine_err)?;
        Ok(Some(Preloaded(Box::new(loaded))))
    }

    fn merge(
        &self,
        plan: &DevicePlan,
        job: &TensorJob,
        reader: &dyn TensorReader,
        writer: &mut dyn TensorOut,
        preloaded: Option<Preloaded>,
    ) -> Result<bool, EngineError> {
        // Raw driver calls below need the context current on this thread.
        self.gpu
            .ctx
            .bind_to_thread()
            .ctx("binding the context")
            .map_err(engine_err)?;
        let inputs = plan_inputs(plan, job);
        let loaded = preloaded.and_then(|p| p.0.downcast::<Loaded>().ok());
        if loaded.is_none() && (job.numel() == 0 || !self.fits(plan, job, inputs.len())) {
            self.stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .declined += 1;
            return Ok(false);
        }
        let out_dtype = writer.raw_dtype().map_or(DType::F32, DType::from);
        let loaded = match loaded {
            Some(l) => *l,
            None => self.upload(job, reader, &inputs).map_err(engine_err)?,
        };
        let gpu = &self.gpu;
        gpu.stream
            .wait(&loaded.ready)
            .ctx("ordering the uploads")
            .map_err(engine_err)?;
        let tensors = &loaded.tensors;
        let t_compute = Instant::now();
        let allow = reader.allows_nonfinite();
        let result = match plan {
            DevicePlan::Linear { weights, divisor } => {
                let refs: Vec<&DeviceTensor> = tensors.iter().collect();
                merge::linear(gpu, &refs, weights, *divisor, out_dtype, allow)
            }
            DevicePlan::Gta { opts, sparsify } => {
                let refs: Vec<&DeviceTensor> = tensors[1..].iter().collect();
                let mut spec =
                    GtaSpec::from_options(opts, &job.name, &job.shape, job.seed, sparsify);
                spec.allow_nonfinite = allow;
                merge::gta(gpu, &tensors[0], &refs, &spec, out_dtype)
            }
            DevicePlan::Sce { select_topk } => {
                let refs: Vec<&DeviceTensor> = tensors[1..].iter().collect();
                crate::sce::sce(gpu, &tensors[0], &refs, *select_topk, out_dtype, allow)
            }
            DevicePlan::Gram {
                inputs: ins,
                base,
                grouping,
                coefficients,
                combine,
            } => {
                let refs: Vec<&DeviceTensor> = tensors[..ins.len()].iter().collect();
                let base = base.map(|_| &tensors[ins.len()]);
                gram::gram_merge(
                    gpu,
                    &refs,
                    base,
                    *grouping,
                    job.cols(),
                    coefficients,
                    *combine,
                    out_dtype,
                    allow,
                )
            }
        };
        let out = match result {
            Ok(o) => o,
            Err(CudaError::NonFinite { slot, index }) => {
                let input = inputs[slot];
                let mut v = [0.0f32];
                let i = index as usize;
                reader.read(input, i..i + 1, &mut v)?;
                return Err(reader.non_finite_error(&job.name, input, i, v[0]).into());
            }
            Err(e) => return Err(engine_err(e)),
        };
        let compute = t_compute.elapsed();
        let t_down = Instant::now();
        self.download(&out, writer)?;
        gpu.sync().map_err(engine_err)?;
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.tensors += 1;
        st.compute_time += compute;
        st.download_time += t_down.elapsed();
        Ok(true)
    }
}

/// MaTS's dense Gram systems solved by the device CG ([`crate::cg::solve`]: the vectors stay on
/// the GPU for the whole solve, `X·A` is one DGEMM per iteration).
#[derive(Clone)]
pub struct GpuGramSolver {
    gpu: Gpu,
}

impl GpuGramSolver {
    /// A solver on `gpu`.
    pub fn new(gpu: &Gpu) -> Self {
        Self { gpu: gpu.clone() }
    }
}

impl std::fmt::Debug for GpuGramSolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuGramSolver")
            .field("gpu", &self.gpu.name)
            .finish()
    }
}

impl GramSolver for GpuGramSolver {
    fn solve_gram(
        &self,
        a: &[f64],
        n: usize,
        b: &[f64],
        m: usize,
        x0: &[f64],
        opts: &CgOptions,
    ) -> amalgam_core::error::Result<CgResult> {
        let gpu_err = |e: CudaError| match e {
            CudaError::Merge(m) => m,
            other => MergeError::Read(format!("GPU: {other}")),
        };
        self.gpu
            .ctx
            .bind_to_thread()
            .ctx("binding the context")
            .map_err(gpu_err)?;
        let (x, report) =
            crate::cg::solve(&self.gpu, a, n, b, m, Some(x0), opts).map_err(gpu_err)?;
        Ok(report.into_result(x))
    }
}
