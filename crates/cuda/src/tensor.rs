//! Tensors on the device in their stored encoding.

use crate::device::Gpu;
use crate::error::{Ctx, Result};
use amalgam_core::raw::RawDtype;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// An element encoding the kernels read and write (codes shared with `kernels/common.cuh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// The kernels' code (`DT_F32`, `DT_F16`, `DT_BF16`).
    pub fn code(self) -> i32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Bf16 => 2,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Encode f32 values on the host exactly as the kernels do (round to nearest even).
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(v).to_vec(),
            DType::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
            DType::Bf16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
        }
    }

    /// Decode stored bytes to f32 on the host.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

impl From<RawDtype> for DType {
    fn from(d: RawDtype) -> Self {
        match d {
            RawDtype::F32 => DType::F32,
            RawDtype::F16 => DType::F16,
            RawDtype::Bf16 => DType::Bf16,
        }
    }
}

/// A flat tensor in device memory, stored as `dtype` (16-byte aligned: every allocation is).
pub struct DeviceTensor {
    /// The bytes (`len * dtype.size()`, rounded up to 16).
    pub data: CudaSlice<u8>,
    /// Encoding.
    pub dtype: DType,
    /// Elements.
    pub len: usize,
}

impl DeviceTensor {
    /// Allocate `len` elements of `dtype` (contents undefined) on `stream`.
    pub fn alloc(stream: &std::sync::Arc<CudaStream>, dtype: DType, len: usize) -> Result<Self> {
        let bytes = (len * dtype.size()).next_multiple_of(16).max(16);
        // SAFETY: every kernel writes all `len` elements before they are read.
        let data = unsafe { stream.alloc::<u8>(bytes) }.ctx("allocating a tensor")?;
        Ok(Self { data, dtype, len })
    }

    /// Copy stored bytes (`len * dtype.size()`) to the device on the compute stream.
    pub fn upload(gpu: &Gpu, dtype: DType, bytes: &[u8]) -> Result<Self> {
        let len = bytes.len() / dtype.size();
        let mut t = Self::alloc(&gpu.stream, dtype, len)?;
        let mut view = t.data.slice_mut(0..bytes.len());
        gpu.stream
            .memcpy_htod(bytes, &mut view)
            .ctx("copying a tensor to the device")?;
        Ok(t)
    }

    /// Encode f32 values as `dtype` and copy them to the device.
    pub fn from_f32(gpu: &Gpu, dtype: DType, v: &[f32]) -> Result<Self> {
        Self::upload(gpu, dtype, &dtype.encode(v))
    }

    /// The stored bytes, copied back to the host (synchronises the compute stream).
    pub fn bytes(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let n = self.len * self.dtype.size();
        let mut out = vec![0u8; n];
        gpu.stream
            .memcpy_dtoh(&self.data.slice(0..n), &mut out)
            .ctx("copying a tensor to the host")?;
        gpu.sync()?;
        Ok(out)
    }

    /// The raw device address (for pointer tables passed to kernels). The caller orders the
    /// accesses: everything here runs on one stream unless a caller joins streams.
    pub fn addr(&self, stream: &std::sync::Arc<CudaStream>) -> u64 {
        let (p, _sync) = self.data.device_ptr(stream);
        p
    }
}
