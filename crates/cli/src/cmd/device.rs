//! `--device`: where tensors are merged.

use amalgam_engine::device::Device;
use anyhow::{bail, Result};

/// How the parts of a split MaTS block on GPU workers sum their partials (`--collectives`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Collectives {
    /// Through the coordinator's `Reduce` RPC (the default, and the fallback).
    #[default]
    Grpc,
    /// An NCCL all-reduce on the worker's GPUs, when every part has a device of its own.
    Nccl,
}

/// Parse `cpu`, `cuda` or `cuda:N` and open the device (`cuda` needs a build with
/// `--features cuda` and an NVIDIA GPU; the error says which is missing).
pub fn open(spec: &str) -> Result<Device> {
    open_with(spec, Collectives::Grpc)
}

/// [`open`], with the collectives of split blocks' parts (`nccl` needs `--device cuda` and
/// libnccl; the error says which is missing).
pub fn open_with(spec: &str, collectives: Collectives) -> Result<Device> {
    let spec = spec.trim();
    let nccl = collectives == Collectives::Nccl;
    if spec == "cpu" {
        if nccl {
            bail!("--collectives nccl: needs --device cuda (NCCL sums on GPUs)");
        }
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("--device {spec}: expected `cpu`, `cuda` or `cuda:N`"),
        },
        None => bail!("--device {spec}: expected `cpu`, `cuda` or `cuda:N`"),
    };
    open_cuda(ordinal, nccl)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, nccl: bool) -> Result<Device> {
    let acc = amalgam_cuda::accel::GpuAccelerator::open(ordinal)
        .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"))?
        .with_nccl(nccl)
        .map_err(|e| anyhow::anyhow!("--collectives nccl: {e}"))?;
    Ok(Device::Accelerator(std::sync::Arc::new(acc)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize, _nccl: bool) -> Result<Device> {
    bail!(
        "--device cuda:{ordinal}: this amalgam was built without GPU support; rebuild with \
         `cargo build --release --features cuda` (no CUDA toolkit needed to build)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_bad_specs() {
        assert!(matches!(open("cpu"), Ok(Device::Cpu)));
        let e = open("gpu").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("expected `cpu`, `cuda` or `cuda:N`"), "{e}");
        let e = open("cuda:x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cuda:N"), "{e}");
        let e = open_with("cpu", Collectives::Nccl)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("--collectives nccl") && e.contains("--device cuda"),
            "{e}"
        );
    }

    /// Without a GPU (or without the feature) `--device cuda` is a clear error, never a panic.
    #[test]
    fn cuda_without_gpu_is_an_error() {
        #[cfg(feature = "cuda")]
        if amalgam_cuda::device::unavailable_reason().is_none() {
            eprintln!("skipped: a GPU is present");
            return;
        }
        let e = open("cuda")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("--device cuda:0")
                && (e.contains("without GPU support") || e.contains("no usable CUDA GPU")),
            "{e}"
        );
    }
}
