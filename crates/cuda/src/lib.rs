//! GPU backend of amalgam (issue 5): merge kernels written in CUDA C and compiled at run time
//! by NVRTC, driven through cudarc with every CUDA library loaded at run time, so that building
//! needs no CUDA toolkit and a machine without a GPU gets a clear error, never a panic.
//!
//! - [`device`]: finding and opening a GPU ([`device::Gpu`]), the compiled kernels;
//! - [`kernels`]: the CUDA C program and its NVRTC compilation;
//! - [`tensor`]: tensors on the device in their stored encoding (f32, f16, bf16);
//! - [`merge`]: linear / task arithmetic in one fused pass, and the task-arithmetic family
//!   (TIES with exact per-tensor magnitude selection, DARE with the CPU's Philox masks);
//! - [`accel`]: the engine's accelerator: pinned, double-buffered transfers around the kernels;
//! - [`gram`]: the Gram-based methods (SLERP family, Karcher mean) with the CPU's exact sums;
//! - [`cg`]: conjugate gradient kept on the device, matvecs through cuBLAS, split systems;
//! - [`nccl`]: NCCL collectives for the parts of a split solve;
//! - [`occupancy`]: each kernel's registers (from a cubin, without a GPU) and what they allow;
//! - [`load_order`]: whether a kernel's main loop has all its loads in flight together (from
//!   the cubin's SASS, without a GPU);
//! - [`check`]: parity against the CPU path and the figures table of `amalgam gpu-check`;
//! - `emu` (tests only): the kernels and an emulated driver on the CPU, so that the GPU tests
//!   run without a GPU (`crates/cuda/emu`).

pub mod accel;
pub mod cg;
pub mod check;
pub mod device;
#[cfg(test)]
mod emu;
pub mod error;
pub mod gram;
pub mod kernels;
pub mod load_order;
pub mod merge;
pub mod nccl;
pub mod occupancy;
pub mod sce;
pub mod tensor;

pub use device::Gpu;
pub use error::{CudaError, Result};
