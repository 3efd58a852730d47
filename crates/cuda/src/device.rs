//! Opening a GPU: library checks, context, streams, the compiled kernels.

use crate::error::{Ctx, CudaError, Result};
use crate::kernels;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the shared library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Why no GPU can be used here, or `None` when one can. Never panics: the libraries are looked
/// for before cudarc touches them.
pub fn unavailable_reason() -> Option<String> {
    if !driver_present() {
        return Some(
            "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine"
                .into(),
        );
    }
    if !kernels::nvrtc_present() {
        return Some(
            "the NVRTC library (libnvrtc.so) was not found; install the CUDA toolkit or the \
             `nvidia-cuda-nvrtc` wheel and add its lib folder to LD_LIBRARY_PATH"
                .into(),
        );
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no device".into()),
        Err(e) => Some(format!("the CUDA driver failed to initialise: {e}")),
    }
}

/// An open GPU: its context, a compute stream and a copy stream, and the loaded kernels.
#[derive(Clone)]
pub struct Gpu {
    /// The device's primary context.
    pub ctx: Arc<CudaContext>,
    /// Stream for kernels.
    pub stream: Arc<CudaStream>,
    /// Stream for host-device copies (overlapping the kernels of the compute stream).
    pub copy: Arc<CudaStream>,
    module: Arc<Loaded>,
    /// Device name.
    pub name: String,
    /// Compute capability.
    pub cc: (i32, i32),
    /// Multiprocessors.
    pub sms: u32,
    /// Whether a block may take 128 KiB of shared memory (the sampled TIES histogram).
    pub big_smem: bool,
}

/// Dynamic shared memory of `sample_hist_smem` (and the most `della_ranks` takes).
pub const SAMPLE_SMEM: u32 = 128 << 10;

/// The compiled program loaded in one context.
struct Loaded {
    _module: Arc<CudaModule>,
    functions: HashMap<&'static str, CudaFunction>,
}

/// Loaded programs by device ordinal (each compiled once per architecture: `ptx_for`).
fn cache() -> &'static Mutex<HashMap<usize, Arc<Loaded>>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Loaded>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The program compiled for `arch`: NVRTC runs once per process and architecture, whatever
/// the number of devices.
fn ptx_for(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    static PTX: OnceLock<Mutex<HashMap<&'static str, cudarc::nvrtc::Ptx>>> = OnceLock::new();
    let mut c = PTX
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = c.get(arch) {
        return Ok(p.clone());
    }
    let p = kernels::compile(arch)?;
    c.insert(arch, p.clone());
    Ok(p)
}

impl Gpu {
    /// Open device `ordinal`, compiling the kernels on first use. A clear error, never a panic,
    /// when there is no driver, no NVRTC or no such device.
    pub fn open(ordinal: usize) -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            return Err(CudaError::Unavailable(why));
        }
        let count = CudaContext::device_count().ctx("counting devices")?;
        if ordinal >= count as usize {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} asked for, but the driver reports {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).ctx("creating the context")?;
        let cc = ctx
            .compute_capability()
            .ctx("reading the compute capability")?;
        let name = ctx.name().ctx("reading the device name")?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .ctx("reading the multiprocessor count")? as u32;
        let optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .unwrap_or(0);
        let big_smem = optin >= SAMPLE_SMEM as i32;
        let module = {
            let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
            match c.get(&ordinal) {
                Some(m) => m.clone(),
                None => {
                    let ptx = ptx_for(kernels::arch_for(cc.0, cc.1))?;
                    let module = ctx.load_module(ptx).ctx("loading the kernels")?;
                    let mut functions = HashMap::new();
                    for &k in kernels::KERNELS.iter().chain(crate::cg::KERNELS) {
                        let f = module
                            .load_function(k)
                            .ctx(&format!("loading kernel {k}"))?;
                        functions.insert(k, f);
                    }
                    if big_smem {
                        for k in ["sample_hist_smem", "della_ranks"] {
                            if let Some(f) = functions.get(k) {
                                f.set_attribute(
                                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    SAMPLE_SMEM as i32,
                                )
                                .ctx("raising the shared memory of a kernel")?;
                            }
                        }
                    }
                    let m = Arc::new(Loaded {
                        _module: module,
                        functions,
                    });
                    c.insert(ordinal, m.clone());
                    m
                }
            }
        };
        let stream = ctx.new_stream().ctx("creating the compute stream")?;
        let copy = ctx.new_stream().ctx("creating the copy stream")?;
        Ok(Self {
            ctx,
            stream,
            copy,
            module,
            name,
            cc,
            sms,
            big_smem,
        })
    }

    /// Kernel `name` of the program.
    pub fn function(&self, name: &str) -> &CudaFunction {
        self.module
            .functions
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not in kernels::KERNELS"))
    }

    /// A grid-stride launch over `n` items: 256 threads per block, at most 8 blocks per
    /// multiprocessor.
    pub fn grid(&self, n: u64) -> cudarc::driver::LaunchConfig {
        grid_for(n, self.sms)
    }

    /// Wait for the compute stream.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().ctx("synchronising")
    }
}

/// One GPU test's verdict: run `f` on device 0, or print why it is skipped.
pub fn with_gpu(test: &str, f: impl FnOnce(&Gpu)) {
    match unavailable_reason() {
        Some(why) => eprintln!("skipped {test}: {why}"),
        None => match Gpu::open(0) {
            Ok(g) => f(&g),
            Err(e) => panic!("{test}: a GPU is present but could not be opened: {e}"),
        },
    }
}

/// Threads per block of [`grid_for`]'s launches (the warp-per-segment sums' shared tiles hold
/// `SEQ_WARPS` = this / 32 warps).
pub(crate) const GRID_THREADS: u64 = 256;

/// Blocks of [`GRID_THREADS`] threads over `n` items, at most 8 per multiprocessor of `sms`
/// (grid-stride kernels).
pub(crate) fn grid_for(n: u64, sms: u32) -> cudarc::driver::LaunchConfig {
    let threads = GRID_THREADS;
    let blocks = n.div_ceil(threads).clamp(1, u64::from(sms) * 8);
    cudarc::driver::LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}
