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
use amalgam_core::solve::cg::{CgOptions, CgResult, DeviceSolver, DeviceSystem, SplitPart};
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
    nccl: bool,
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
            nccl: false,
            up: Mutex::new(up),
            down: Mutex::new(down),
            stats: Mutex::new(TransferStats::default()),
        })
    }

    /// Sum the partials of split MaTS blocks' parts with NCCL when every part can (see
    /// [`GpuSolver::with_nccl`]); off by default (the coordinator's `Reduce`). An error
    /// when libnccl cannot be loaded.
    pub fn with_nccl(mut self, on: bool) -> crate::Result<Self> {
        if on {
            if let Some(why) = crate::nccl::unavailable_reason() {
                return Err(CudaError::Unavailable(why));
            }
        }
        self.nccl = on;
        Ok(self)
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
        // DELLA's sort keys, or `None`: a shape the GPU does not rank.
        let keys = match plan {
            DevicePlan::Gta { sparsify, .. } => {
                merge::della_key_bytes(&self.gpu, sparsify, &job.shape)
            }
            _ => Some(0),
        };
        let Some(keys) = keys else {
            return false;
        };
        match plan {
            DevicePlan::Gta { .. } | DevicePlan::Sce { .. } if job.n_models > merge::MAX_MODELS => {
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
            // The selection's histograms (1.25 MiB per model), per-chunk tie counts,
            // candidates and DELLA's ranks.
            let cands = u64::from(merge::cand_cap(n)) * 8;
            need += inputs as u64 * ((2 << 20) + n / 1024 + cands + n * 4);
        }
        // DELLA's sort keys of groups sorted in segments (reused by every model).
        need += keys;
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

    fn device_solver(&self) -> Option<Arc<dyn DeviceSolver>> {
        Some(Arc::new(GpuSolver::new(&self.gpu).with_nccl(self.nccl)))
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

/// MaTS's systems solved by the device CG ([`crate::cg::solve_system`]: the vectors stay on the
/// GPU for the whole solve; `X·A` is one DGEMM per iteration, K-FAC's `Σ S_i·X·A_i` two per
/// model, a diagonal one kernel), whole or one part of a split block at a time.
///
/// The parts of a split block meet through the coordinator's `Reduce` (each sum's partials
/// copied to the host and back), or, [`GpuSolver::with_nccl`], through an NCCL all-reduce
/// on the devices: part `k` then runs on device `(ordinal + k) mod count` (NCCL takes one
/// device per rank, so the block needs as many devices as parts), the communicator's id coming
/// from part 0 through the gang's first `Reduce` (see [`crate::nccl`]). The parts use NCCL
/// only when every one of them can; otherwise they all keep `Reduce`. A gang runs on one
/// worker today, so its ranks are that worker's devices.
#[derive(Clone)]
pub struct GpuSolver {
    gpu: Gpu,
    nccl: bool,
}

impl GpuSolver {
    /// A solver on `gpu` (split parts meet through `Reduce`).
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            gpu: gpu.clone(),
            nccl: false,
        }
    }

    /// Let the parts of a split block sum their partials with NCCL when they all can.
    pub fn with_nccl(mut self, on: bool) -> Self {
        self.nccl = on;
        self
    }

    /// The device of part `part` of `parts` for NCCL, or why it has none.
    fn nccl_device(&self, part: usize, parts: usize) -> std::result::Result<Gpu, String> {
        if let Some(why) = crate::nccl::unavailable_reason() {
            return Err(why);
        }
        let count = cudarc::driver::CudaContext::device_count()
            .map_err(|e| format!("counting devices: {e}"))? as usize;
        if parts > count {
            return Err(format!(
                "{parts} parts need as many devices, this worker has {count}"
            ));
        }
        let ordinal = (self.gpu.ctx.ordinal() + part) % count;
        Gpu::open(ordinal).map_err(|e| e.to_string())
    }

    /// Part `part`'s device and NCCL communicator, when every part of the `parts` can join one:
    /// one `reduce` round carries each part's vote and part 0's unique id.
    fn nccl_group(
        &self,
        part: usize,
        parts: usize,
        reduce: &mut dyn FnMut(&[f64]) -> amalgam_core::error::Result<Vec<f64>>,
    ) -> crate::Result<Option<(Gpu, crate::nccl::Group)>> {
        use crate::nccl;
        let mut here = self.nccl_device(part, parts);
        let mut values = vec![0.0f64; 1 + nccl::ID_VALUES];
        if part == 0 {
            if let Ok(gpu) = &here {
                gpu.ctx.bind_to_thread().ctx("binding the context")?;
                match nccl::new_id() {
                    Ok(id) => values[1..].copy_from_slice(&nccl::encode_id(&id)),
                    Err(e) => here = Err(e.to_string()),
                }
            }
        }
        if let Err(why) = &here {
            tracing::warn!(part, parts, "split block: NCCL not used here: {why}");
        }
        values[0] = if here.is_ok() { 1.0 } else { 0.0 };
        let sums = reduce(&values).map_err(CudaError::Merge)?;
        if sums.len() != values.len() {
            return Err(CudaError::Invalid(format!(
                "nccl: the id round returned {} values, expected {}",
                sums.len(),
                values.len()
            )));
        }
        if sums[0] != parts as f64 {
            tracing::info!(
                part,
                parts,
                ready = sums[0],
                "split block: the parts meet through Reduce (not every part can use NCCL)"
            );
            return Ok(None);
        }
        let (Ok(gpu), id) = (here, nccl::decode_id(&sums[1..])?) else {
            return Ok(None);
        };
        let group = nccl::Group::join(&gpu, part, parts, &id)?;
        tracing::info!(part, parts, "split block: the parts meet through NCCL");
        Ok(Some((gpu, group)))
    }
}

impl std::fmt::Debug for GpuSolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSolver")
            .field("gpu", &self.gpu.name)
            .field("nccl", &self.nccl)
            .finish()
    }
}

/// A GPU error as the core's (a merge error stays itself).
fn core_err(e: CudaError) -> MergeError {
    match e {
        CudaError::Merge(m) => m,
        other => MergeError::Read(format!("GPU: {other}")),
    }
}

impl DeviceSolver for GpuSolver {
    fn solve(
        &self,
        sys: &DeviceSystem<'_>,
        b: &[f64],
        x0: &[f64],
        opts: &CgOptions,
    ) -> amalgam_core::error::Result<CgResult> {
        use crate::cg::{solve_system, Exchange};
        self.gpu
            .ctx
            .bind_to_thread()
            .ctx("binding the context")
            .map_err(core_err)?;
        let (x, report) = solve_system(
            &self.gpu,
            sys,
            b,
            Some(x0),
            opts,
            None,
            &mut Exchange::Whole,
        )
        .map_err(core_err)?;
        Ok(report.into_result(x))
    }

    fn solve_part(
        &self,
        sys: &DeviceSystem<'_>,
        b: &[f64],
        x0: &[f64],
        opts: &CgOptions,
        split: &SplitPart,
        reduce: &mut dyn FnMut(&[f64]) -> amalgam_core::error::Result<Vec<f64>>,
    ) -> amalgam_core::error::Result<CgResult> {
        use crate::cg::{solve_system, Exchange, Slots};
        let slots = Slots::of(&split.part_lens, split.part).map_err(core_err)?;
        let parts = split.part_lens.len();
        let group = if self.nccl {
            self.nccl_group(split.part, parts, reduce)
                .map_err(core_err)?
        } else {
            None
        };
        let (x, report) = match &group {
            Some((gpu, group)) => {
                gpu.ctx
                    .bind_to_thread()
                    .ctx("binding the context")
                    .map_err(core_err)?;
                let mut ex = Exchange::Nccl(group);
                solve_system(gpu, sys, b, Some(x0), opts, Some(slots), &mut ex)
            }
            None => {
                self.gpu
                    .ctx
                    .bind_to_thread()
                    .ctx("binding the context")
                    .map_err(core_err)?;
                let mut ex = Exchange::Host(reduce);
                solve_system(&self.gpu, sys, b, Some(x0), opts, Some(slots), &mut ex)
            }
        }
        .map_err(core_err)?;
        Ok(report.into_result(x))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use amalgam_core::config::parse_config;
    use amalgam_engine::device::Device;
    use amalgam_engine::inputs::open_and_plan;
    use amalgam_engine::run::{execute, MergeOptions, NoProgress};
    use std::path::Path;

    /// The config of `method` over `synth::write_tiny_family`'s models.
    pub(crate) fn family_config(method: &str) -> String {
        let base = if method == "linear" {
            ""
        } else {
            "base_model: base\n"
        };
        let extra = if method == "della" {
            "parameters: {epsilon: 0.1}\n"
        } else {
            ""
        };
        format!(
            "merge_method: {method}\n{base}{extra}random_seed: 5\nmodels:\n  \
             - model: a\n    parameters: {{weight: 1.0, density: 0.4}}\n  \
             - model: b\n    parameters: {{weight: 0.5, density: 0.6}}\n"
        )
    }

    /// Merge `yaml` over the models in `dir` into `dir/out` on `device`: the checkpoint's bytes
    /// and the number of tensors merged (not copied).
    pub(crate) fn merge_family(
        dir: &Path,
        yaml: &str,
        out: &str,
        device: Device,
    ) -> (Vec<u8>, u64) {
        let (config, _) = parse_config(yaml, true).expect("config");
        let (inputs, plan) = open_and_plan(&config, Some(dir)).expect("plan");
        let opts = MergeOptions {
            out_dir: dir.join(out),
            memory_budget: 1 << 30,
            out_shard_size: 5_000_000_000,
            overwrite: false,
            allow_nonfinite: false,
            device,
        };
        execute(&config, &plan, &inputs, Some(dir), &opts, &NoProgress).expect("merge");
        let merged = plan.tensors.iter().filter(|t| !t.copy_raw).count() as u64;
        (
            std::fs::read(opts.out_dir.join("model.safetensors")).expect("output"),
            merged,
        )
    }

    /// Whole checkpoints merged by the engine with the GPU accelerator (pinned double-buffered
    /// uploads, the preload thread, the kernels, the downloads) and on the CPU: the same bytes,
    /// for methods of every kernel family, with every tensor merged on the device.
    #[test]
    fn gpu_accelerated_merges_write_the_cpus_bytes() {
        crate::device::with_gpu("gpu_accelerated_merges_write_the_cpus_bytes", |_| {
            let dir = tempfile::tempdir().expect("tempdir");
            amalgam_engine::synth::write_tiny_family(dir.path()).expect("models");
            let acc = Arc::new(GpuAccelerator::open(0).expect("accelerator"));
            for method in [
                "linear",
                "task_arithmetic",
                "ties",
                "dare_ties",
                "della",
                "breadcrumbs",
            ] {
                let yaml = family_config(method);
                let before = acc.stats().tensors;
                let (cpu, _) =
                    merge_family(dir.path(), &yaml, &format!("{method}-cpu"), Device::Cpu);
                let (gpu, merged) = merge_family(
                    dir.path(),
                    &yaml,
                    &format!("{method}-gpu"),
                    Device::Accelerator(acc.clone()),
                );
                assert!(
                    cpu == gpu,
                    "{method}: the GPU's checkpoint differs from the CPU's"
                );
                assert_eq!(
                    acc.stats().tensors - before,
                    merged,
                    "{method}: every merged tensor goes to the GPU"
                );
            }
        });
    }
}
