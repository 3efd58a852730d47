//! The kernels run on the CPU, for tests on machines without a GPU (CI): the CUDA C program
//! ([`crate::kernels::program`]) is compiled by the host's C++ compiler after
//! `emu/host_emu.h`, which emulates a block's threads as cooperative fibers with CUDA's
//! barriers and warp intrinsics, and loaded as a shared library. Device pointers are host
//! addresses there. This checks the kernels' logic against independent references; the GPU
//! parity rows of `amalgam gpu-check` stay the check of the device itself.
//!
//! Tests skip with a printed reason when no C++ compiler is found, unless `AMALGAM_REQUIRE_EMU`
//! is set (as `.ci/run` sets it): then that is a failure.

#[cfg(test)]
mod della_tests;
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod select_tests;

use std::ffi::{c_char, c_void, CString};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// `amalgam_emu_launch(name, gx, gy, gz, bx, by, bz, smem, args)`: 0, or -1 for an unknown name.
type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    usize,
    *mut *mut c_void,
) -> i32;

/// The compiled emulator (one per process; launches are serialised).
pub struct Emu {
    _lib: libloading::Library,
    launch: LaunchFn,
    lock: Mutex<()>,
}

/// The emulator's C++ source: the header, the kernel program, and a launch table of every
/// kernel entry point.
fn source() -> String {
    let mut s = String::from(include_str!("../../emu/host_emu.h"));
    s.push_str(&crate::kernels::program());
    s.push_str(
        "\nextern \"C\" int amalgam_emu_launch(const char* name, unsigned gx, unsigned gy, \
         unsigned gz, unsigned bx, unsigned by, unsigned bz, size_t smem, void** args) {\n\
         emu::Dim3 g{gx, gy, gz}, b{bx, by, bz};\n",
    );
    for k in crate::kernels::KERNELS.iter().chain(crate::cg::KERNELS) {
        s.push_str(&format!(
            "if (!strcmp(name, \"{k}\")) {{ emu::launch(\"{k}\", {k}, g, b, smem, args); return 0; }}\n"
        ));
    }
    s.push_str("return -1;\n}\n");
    s
}

/// The C++ compiler: `$CXX`, else `c++`.
fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// Compile `src` into `dir` (once per source: the library is kept under a hash of it).
fn build(dir: &Path, src: &str) -> Result<PathBuf, String> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut h);
    build_as(dir, src, &format!("amalgam-emu-{:016x}.so", h.finish()))
}

/// Compile `src` into `dir/name` unless it is there.
fn build_as(dir: &Path, src: &str, name: &str) -> Result<PathBuf, String> {
    let lib = dir.join(name);
    if lib.exists() {
        return Ok(lib);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let cpp = dir.join(format!("emu-{}.cpp", std::process::id()));
    std::fs::write(&cpp, src).map_err(|e| format!("writing {}: {e}", cpp.display()))?;
    let tmp = dir.join(format!("emu-{}.so", std::process::id()));
    let out = Command::new(compiler())
        .args([
            "-std=c++20",
            "-O2",
            "-shared",
            "-fPIC",
            "-ffp-contract=off",
            "-w",
            "-o",
        ])
        .arg(&tmp)
        .arg(&cpp)
        .output()
        .map_err(|e| format!("running the C++ compiler `{}`: {e}", compiler()))?;
    if !out.status.success() {
        return Err(format!(
            "the kernels did not compile for the host emulator:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    let _ = std::fs::remove_file(&cpp);
    Ok(lib)
}

/// Whether a C++ compiler runs here; else why not (the caller skips, or fails under
/// `AMALGAM_REQUIRE_EMU`).
fn compiler_reason() -> Option<String> {
    let have = Command::new(compiler()).arg("--version").output().is_ok();
    (!have).then(|| format!("no C++ compiler (`{}`) found", compiler()))
}

/// Print why an emulator test skips, or fail when `AMALGAM_REQUIRE_EMU` is set.
fn skip(why: &str) {
    assert!(
        std::env::var_os("AMALGAM_REQUIRE_EMU").is_none(),
        "AMALGAM_REQUIRE_EMU is set but the host emulator is unavailable: {why}"
    );
    eprintln!("skipped: host kernel emulator unavailable ({why})");
}

/// A folder holding the emulated devices (`emu/emu_driver.cpp` with the kernels) as
/// `libcuda.so`, `libcublas.so` and `libnccl.so`, for a process started with it first on `LD_LIBRARY_PATH`;
/// `None` (the reason printed) without a C++ compiler.
pub fn driver_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        if let Some(why) = compiler_reason() {
            return Err(why);
        }
        let mut src = source();
        src.push_str(include_str!("../../emu/emu_driver.cpp"));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        src.hash(&mut h);
        let dir = std::env::temp_dir().join(format!("amalgam-emu-device-{:016x}", h.finish()));
        build_as(&dir, &src, "libcuda.so").unwrap_or_else(|e| panic!("{e}"));
        for name in ["libcublas.so", "libnccl.so"] {
            let link = dir.join(name);
            if !link.exists() {
                let _ = std::os::unix::fs::symlink("libcuda.so", &link);
            }
        }
        Ok(dir)
    });
    match dir {
        Ok(d) => Some(d.clone()),
        Err(why) => {
            skip(why);
            None
        }
    }
}

impl Emu {
    /// The process's emulator, compiled on first use; `None` (with the reason printed) when
    /// there is no C++ compiler and `AMALGAM_REQUIRE_EMU` is not set. A compile error always
    /// fails.
    pub fn get() -> Option<&'static Emu> {
        static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
        let emu = EMU.get_or_init(|| {
            if let Some(why) = compiler_reason() {
                return Err(why);
            }
            let dir = std::env::temp_dir().join("amalgam-emu");
            let lib = match build(&dir, &source()) {
                Ok(lib) => lib,
                Err(e) => panic!("{e}"),
            };
            // SAFETY: the library is the emulator just built; its initialisers only set up
            // static data.
            let lib = unsafe { libloading::Library::new(&lib) }
                .map_err(|e| format!("loading {}: {e}", lib.display()))?;
            // SAFETY: the symbol is `amalgam_emu_launch`, with `LaunchFn`'s signature.
            let launch = unsafe { lib.get::<LaunchFn>(b"amalgam_emu_launch\0") }
                .map_err(|e| format!("amalgam_emu_launch: {e}"))?;
            let launch = *launch;
            Ok(Emu {
                _lib: lib,
                launch,
                lock: Mutex::new(()),
            })
        });
        match emu {
            Ok(e) => Some(e),
            Err(why) => {
                skip(why);
                None
            }
        }
    }

    /// Run kernel `name` over `grid` blocks of `block` threads with `smem` bytes of dynamic
    /// shared memory; `args` as for `cuLaunchKernel` (pointers to each parameter's value).
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters, and every pointer among them must
    /// address host memory the kernel may read and write as it would the device's.
    pub unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: usize,
        args: &mut [*mut c_void],
    ) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let c = CString::new(name).expect("kernel names have no NUL");
        // SAFETY: the caller's contract; the emulator reads `args` as the kernel's parameters.
        let rc = unsafe {
            (self.launch)(
                c.as_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                smem,
                args.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "no kernel {name} in the emulator");
    }
}

/// Host memory standing for a device allocation: 16-byte aligned and padded to 16 bytes, as the
/// device allocations the kernels read are.
pub struct Buf {
    words: Vec<u128>,
}

impl Buf {
    /// `bytes` zero bytes.
    pub fn zeros(bytes: usize) -> Self {
        Self {
            words: vec![0; bytes.div_ceil(16).max(1)],
        }
    }

    /// A copy of `v`.
    pub fn of<T: bytemuck::Pod>(v: &[T]) -> Self {
        let b: &[u8] = bytemuck::cast_slice(v);
        let mut s = Self::zeros(b.len());
        bytemuck::cast_slice_mut::<u128, u8>(&mut s.words)[..b.len()].copy_from_slice(b);
        s
    }

    /// The "device pointer".
    pub fn ptr(&mut self) -> u64 {
        self.words.as_mut_ptr() as u64
    }

    /// The first `n` values as T (a type whose size divides 16).
    pub fn read<T: bytemuck::Pod>(&self, n: usize) -> Vec<T> {
        bytemuck::cast_slice::<u128, T>(&self.words)[..n].to_vec()
    }
}

/// A kernel parameter for [`Emu::launch`] (the emulator copies it, as `cuLaunchKernel` does).
pub fn arg<T>(v: &T) -> *mut c_void {
    (v as *const T).cast_mut().cast()
}

impl Buf {
    /// A copy of `v`'s bytes (`repr(C)` kernel structs without padding).
    pub fn of_structs<T: Copy>(v: &[T]) -> Self {
        let len = std::mem::size_of_val(v);
        // SAFETY: `v` is `len` initialised bytes (the structs passed here have no padding).
        let b = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), len) };
        Self::of(b)
    }

    /// The first `n` structs (written by a kernel, or by [`Buf::of_structs`]).
    pub fn read_structs<T: Copy + Default>(&self, n: usize) -> Vec<T> {
        assert!(n * std::mem::size_of::<T>() <= self.words.len() * 16);
        let mut out = vec![T::default(); n];
        // SAFETY: both regions hold n * size_of::<T>() bytes, and any bits are valid for the
        // plain-data kernel structs read here.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.words.as_ptr().cast::<u8>(),
                out.as_mut_ptr().cast::<u8>(),
                n * std::mem::size_of::<T>(),
            );
        }
        out
    }
}

/// A launch configuration as `(grid, block, shared bytes)`.
pub fn dims(c: &cudarc::driver::LaunchConfig) -> ((u32, u32, u32), (u32, u32, u32), usize) {
    (c.grid_dim, c.block_dim, c.shared_mem_bytes as usize)
}
