//! The GPU backend's host code (cudarc, transfers, launches, orchestration, NCCL bootstrap) on
//! the emulated devices of `emu/emu_driver.cpp`: the test re-runs this crate's GPU tests (those
//! named `gpu_…`, which skip without a GPU) in a child process with the emulated libcuda.so,
//! libcublas.so and libnccl.so first on `LD_LIBRARY_PATH` and three emulated devices: parity of
//! every merge method, DELLA's shapes, whole merges through the accelerator, MaTS and the CG
//! solver whole, split (through `Reduce` and through NCCL ranks) and with every operator,
//! against the CPU path. A real GPU is still checked only on a device
//! (`scripts/gpu-check.sh`).

use super::driver_dir;
use crate::Gpu;
use std::process::Command;

/// Set in the child process that runs on the emulated device.
const INNER: &str = "AMALGAM_EMU_DEVICE_RUN";

/// Emulated devices of the first run: one per part of the 3-part split solves, so that they
/// take NCCL.
const DEVICES: usize = 3;

/// The GPU tests of the child process: every test with this in its name.
const FILTER: &str = "gpu_";

#[test]
fn the_gpu_tests_pass_on_the_emulated_device() {
    if std::env::var_os(INNER).is_some() {
        return;
    }
    if !crate::kernels::nvrtc_present() {
        // Gpu::open compiles the kernels with NVRTC before loading them.
        eprintln!("skipped: libnvrtc not found (the emulated device still takes NVRTC's PTX)");
        return;
    }
    let Some(dir) = driver_dir() else { return };
    // Three devices with an H100's shared memory; then one with 48 KiB (the backend's
    // small-shared-memory paths: the sample histogram in global memory, DELLA's segments of
    // 4096 keys) for the merge parity tests.
    child(
        &dir,
        &[FILTER],
        &[("AMALGAM_EMU_DEVICES", &DEVICES.to_string())],
        8,
    );
    child(
        &dir,
        &[
            "check::tests::gpu_della_shapes",
            "check::tests::gpu_matches_cpu_bit",
        ],
        &[("AMALGAM_EMU_SMEM_OPTIN", "49152")],
        2,
    );
    // Free memory for some of the tiny family's tensors and not others.
    child(
        &dir,
        &["emu::device_tests::gpu_tensors_beyond_free_memory"],
        &[("AMALGAM_EMU_FREE_BYTES", &TIGHT_FREE.to_string())],
        1,
    );
}

/// Free device memory of the third run: the accelerator keeps 256 MiB spare and takes a
/// 2-model `linear` tensor of n elements when 12·n bytes fit in the rest: the MLP weights
/// (11264 elements) do, the embeddings (16384) do not.
const TIGHT_FREE: u64 = (256 << 20) + 150_000;

/// Run this test binary's tests matching `args` in a child process on the emulated devices
/// (`env` set), expecting at least `least` of them to pass and none to skip.
fn child(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)], least: usize) {
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .args(["--nocapture", "--test-threads", "1"])
        .env("LD_LIBRARY_PATH", path)
        .envs(env.iter().copied())
        .env(INNER, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{env:?}:\n{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "a GPU test failed on the emulated device ({env:?})"
    );
    assert!(
        !stderr.contains("skipped"),
        "a GPU test skipped on the emulated device"
    );
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split(' ').next()?.parse::<usize>().ok());
    assert!(
        passed.unwrap_or(0) >= least,
        "too few GPU tests ran: {passed:?}"
    );
}

/// In the child process, the GPU the tests open is the emulator (a no-op elsewhere).
#[test]
fn gpu_tests_see_the_emulated_device() {
    if std::env::var_os(INNER).is_none() {
        return;
    }
    let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gpu.name, "amalgam host emulator", "not the emulated device");
}

/// In the child process, a split solve asked for NCCL with a device per part meets through
/// NCCL communicators (the emulated libnccl's counts), in as many ranks as parts, and gives
/// the whole solve's result (a no-op elsewhere).
#[test]
fn gpu_split_solves_meet_through_nccl_ranks() {
    if std::env::var_os(INNER).is_none() {
        return;
    }
    let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("{e}"));
    let count = |sym: &[u8]| -> u64 {
        // SAFETY: libnccl.so is the emulator, already loaded by the solve; the counters take no
        // arguments.
        unsafe {
            let lib = libloading::Library::new("libnccl.so").expect("the emulated libnccl");
            let f = lib
                .get::<unsafe extern "C" fn() -> u64>(sym)
                .expect("an emulator counter");
            f()
        }
    };
    let before = count(b"amalgam_emu_nccl_all_reduces\0");
    let rows = crate::cg::split_rows(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let asked = rows
        .iter()
        .find(|r| r.name.contains("3 parts, NCCL asked"))
        .expect("the 3-part NCCL row");
    assert!(asked.note.contains("sums through NCCL"), "{}", asked.note);
    assert!(
        crate::check::all_passed(&rows),
        "{}",
        crate::check::table(&rows, 1.0)
    );
    assert!(
        count(b"amalgam_emu_nccl_all_reduces\0") > before,
        "no all-reduce through NCCL"
    );
    assert_eq!(count(b"amalgam_emu_nccl_max_ranks\0"), DEVICES as u64);
}

/// `scripts/gpu-check.sh emulate`: with `AMALGAM_EMU_DRIVER_OUT` set, the emulated libraries
/// are copied there (a no-op otherwise).
#[test]
fn driver_for_the_gpu_check() {
    let Some(out) = std::env::var_os("AMALGAM_EMU_DRIVER_OUT") else {
        return;
    };
    let Some(dir) = driver_dir() else { return };
    let out = std::path::PathBuf::from(out);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir.join("libcuda.so"), out.join("libcuda.so")).unwrap();
    for name in ["libcublas.so", "libnccl.so"] {
        let link = out.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("libcuda.so", &link).unwrap();
    }
}

/// In the child process with [`TIGHT_FREE`] bytes free, the tensors that do not fit merge on
/// the CPU in the same run and the checkpoint is the CPU's (a no-op elsewhere).
#[test]
fn gpu_tensors_beyond_free_memory_merge_on_the_cpu() {
    if std::env::var_os(INNER).is_none() || std::env::var_os("AMALGAM_EMU_FREE_BYTES").is_none() {
        return;
    }
    use crate::accel::tests::{family_config, merge_family};
    use amalgam_engine::device::Device;
    let dir = tempfile::tempdir().expect("tempdir");
    amalgam_engine::synth::write_tiny_family(dir.path()).expect("models");
    let acc = std::sync::Arc::new(crate::accel::GpuAccelerator::open(0).expect("accelerator"));
    let yaml = family_config("linear");
    let (cpu, _) = merge_family(dir.path(), &yaml, "cpu", Device::Cpu);
    let (gpu, merged) = merge_family(dir.path(), &yaml, "gpu", Device::Accelerator(acc.clone()));
    assert!(cpu == gpu, "the checkpoint differs from the CPU's");
    let on_gpu = acc.stats().tensors;
    assert!(
        on_gpu > 0 && on_gpu < merged,
        "{on_gpu} of {merged} tensors on the GPU"
    );
}
