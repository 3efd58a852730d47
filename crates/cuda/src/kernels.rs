//! The CUDA C kernel sources, compiled at run time by NVRTC (once per process and device).
//!
//! Every `.cu` file under `kernels/` is appended to `common.cuh` and compiled as one program,
//! so no include path is needed (f16/bf16 conversions are written with PTX `cvt`, not
//! `cuda_fp16.h`). Options: `--fmad=false`, so that `a * b + c` is a multiply then an add as
//! on the CPU, which keeps the elementwise kernels bit-identical to the CPU path; IEEE division
//! and square root (NVRTC's defaults).
//!
//! The same source is also compiled by the host's C++ compiler for the tests' emulator
//! (`crates/cuda/emu/host_emu.h` defines the CUDA built-ins it uses; a kernel that needs
//! another one adds it there, and `DYNAMIC_SHARED` stands for `extern __shared__`).

use crate::error::{CudaError, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// The program's parts, in order.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("merge.cu", include_str!("../kernels/merge.cu")),
    ("select.cu", include_str!("../kernels/select.cu")),
    ("sce.cu", include_str!("../kernels/sce.cu")),
    ("gram.cu", include_str!("../kernels/gram.cu")),
    ("cg.cu", include_str!("../kernels/cg.cu")),
];

/// Every kernel entry point of the program (checked present after loading).
/// (The CG kernels are listed in [`crate::cg::KERNELS`].)
pub const KERNELS: &[&str] = &[
    "linear_merge_2",
    "linear_merge_4",
    "linear_merge_8",
    "linear_merge_any",
    "gta_plain_2",
    "gta_plain_4",
    "gta_plain_8",
    "gta_rank_2",
    "gta_rank_4",
    "gta_rank_8",
    "gta_dare_2",
    "gta_dare_4",
    "gta_dare_8",
    "gta_plain_2_v8",
    "gta_plain_4_v8",
    "gta_rank_2_v8",
    "gta_rank_4_v8",
    "gta_dare_2_v8",
    "gta_dare_4_v8",
    "gta_plain_8_h",
    "gta_rank_8_h",
    "gta_dare_8_h",
    "gta_merge_2",
    "gta_merge_4",
    "gta_merge_8",
    "gta_merge_16",
    "gta_l1",
    "della_ranks",
    "sce_nonzero_4",
    "sce_nonzero_8",
    "sce_nonzero_16",
    "sce_sq_4",
    "sce_sq_8",
    "sce_sq_16",
    "sce_merge_4",
    "sce_merge_8",
    "sce_merge_16",
    "convert",
    "sample_hist",
    "sample_hist_smem",
    "sample_pick",
    "sample_pick_lo",
    "bracket_pass_4",
    "bracket_pass_8",
    "bracket_pass_16",
    "tie_pass_4",
    "tie_pass_8",
    "tie_pass_16",
    "bracket_pass_any_4",
    "bracket_pass_any_8",
    "bracket_pass_any_16",
    "tie_pass_any_4",
    "tie_pass_any_8",
    "tie_pass_any_16",
    "resolve",
    "gram_seq_2",
    "gram_seq_4",
    "gram_seq_8",
    "gram_combine",
    "full_hist",
    "full_pick",
];

/// The whole program's source.
pub fn program() -> String {
    let mut s = String::new();
    for (name, src) in SOURCES {
        s.push_str(&format!("// ---- {name}\n"));
        s.push_str(src);
        s.push('\n');
    }
    s
}

/// The NVRTC `--gpu-architecture` for compute capability `major.minor` (virtual architecture:
/// the driver finishes the compilation for the exact chip).
pub fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, _) => "compute_90",
        (10, _) => "compute_100",
        (12, _) => "compute_120",
        (m, _) if m > 12 => "compute_120",
        _ => "compute_75",
    }
}

/// Whether the NVRTC library can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the shared library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// An error unless libnvrtc can be loaded.
pub(crate) fn require_nvrtc() -> Result<()> {
    if nvrtc_present() {
        return Ok(());
    }
    Err(CudaError::Unavailable(
        "the NVRTC library (libnvrtc.so) was not found; install the CUDA toolkit or the \
         `nvidia-cuda-nvrtc` wheel and add its lib folder to LD_LIBRARY_PATH"
            .into(),
    ))
}

/// NVRTC options of every compilation: the CPU's f32 arithmetic (no contraction into fused
/// multiply-adds, IEEE division and square root, denormals kept).
pub const FLAGS: &[&str] = &[
    "--fmad=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
    "--std=c++17",
];

/// Compile the program to PTX for `arch` (e.g. `compute_90`).
pub fn compile(arch: &'static str) -> Result<Ptx> {
    require_nvrtc()?;
    let opts = CompileOptions {
        arch: Some(arch),
        options: FLAGS.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    };
    compile_ptx_with_opts(program(), opts).map_err(|e| CudaError::Compile {
        arch: arch.to_string(),
        log: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warp-per-segment sums (`sce_sq_*`, `gram_seq_*`) index their shared tiles by the
    /// warp within the block: the block `grid_for` launches must hold exactly SEQ_WARPS warps.
    #[test]
    fn seq_warps_match_the_grid_block() {
        let want = format!("#define SEQ_WARPS {}\n", crate::device::GRID_THREADS / 32);
        assert!(program().contains(&want), "{want}");
    }

    /// CI: every kernel compiles (no GPU needed, only libnvrtc). Skips with a reason otherwise,
    /// unless `AMALGAM_REQUIRE_NVRTC` is set (as `.ci/run` sets it): then a missing NVRTC fails.
    #[test]
    fn kernels_compile_to_ptx() {
        if !nvrtc_present() {
            assert!(
                std::env::var_os("AMALGAM_REQUIRE_NVRTC").is_none(),
                "AMALGAM_REQUIRE_NVRTC is set but libnvrtc was not found on LD_LIBRARY_PATH"
            );
            eprintln!(
                "skipped: libnvrtc not found (set LD_LIBRARY_PATH to the nvidia-cuda-nvrtc \
                 wheel's lib)"
            );
            return;
        }
        for arch in ["compute_75", "compute_90"] {
            let ptx = compile(arch).unwrap_or_else(|e| panic!("{e}"));
            let src = ptx.to_src();
            for k in KERNELS.iter().chain(crate::cg::KERNELS) {
                assert!(
                    src.contains(&format!(".entry {k}(")),
                    "kernel {k} missing from the PTX for {arch}"
                );
            }
        }
    }
}
