//! NCCL collectives for the parts of a split CG solve (issue 5, "multi-GPU collectives"):
//! where the parts of a split MaTS block are solved on GPUs, their inner-product partials can
//! be summed by an NCCL all-reduce on the devices instead of going through the host and the
//! coordinator's `Reduce` RPC (the default, and the fallback).
//!
//! # Bootstrap
//!
//! An NCCL communicator is joined by every rank with the same 128-byte unique id, made by one
//! rank (`ncclGetUniqueId`). Part 0 of a gang makes it and the coordinator hands it to the
//! others over gRPC: it travels through the gang's first `Reduce` round, two bytes per value
//! ([`encode_id`], [`decode_id`]; the other parts send zeros, so the element-wise sum is part
//! 0's id), together with one "ready" vote per part, so that the parts use NCCL only when every
//! one of them can (else they all keep the `Reduce` path, with no further round).
//!
//! # Determinism
//!
//! Each part's partials sit in its own slots of a vector that is zero elsewhere
//! ([`crate::cg::Slots`]), so the all-reduce adds each slot's one value to zeros: the summed
//! vector is the concatenation of all parts' partials, exactly what `Reduce` returns, whatever
//! order NCCL adds in. The solve's sums are then made from it by the same fixed tree on every
//! part: an NCCL solve gives the bits of a `Reduce` solve.
//!
//! # Loading
//!
//! libnccl is loaded at run time like the other CUDA libraries (cudarc's `dynamic-loading`),
//! under the name `libnccl.so` (the NCCL packages' development link; a runtime-only install,
//! such as PyTorch's `nvidia-nccl` wheel, ships `libnccl.so.2` alone: link it as `libnccl.so`
//! in a folder on `LD_LIBRARY_PATH`, as `scripts/gpu-check.sh` does). [`unavailable_reason`]
//! says why it cannot be used, before cudarc would panic on a missing library.

use crate::device::Gpu;
use crate::error::{CudaError, Result};
use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// Values of an encoded id ([`encode_id`]): two bytes per value.
pub const ID_VALUES: usize = ID_BYTES / 2;

/// Why NCCL cannot be used here, or `None` when libnccl loads.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only tries to open the shared library by its candidate names.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        None
    } else {
        Some(
            "the NCCL library (libnccl.so) was not found; install NCCL 2 (libnccl-dev), or \
             link the libnccl.so.2 of the `nvidia-nccl` wheel as libnccl.so in a folder on \
             LD_LIBRARY_PATH"
                .into(),
        )
    }
}

fn nccl_err(what: &str) -> impl FnOnce(cudarc::nccl::result::NcclError) -> CudaError + '_ {
    move |e| CudaError::Nccl {
        what: what.to_string(),
        message: format!("{e:?}"),
    }
}

/// A new unique id (`ncclGetUniqueId`; this process then hosts the communicator's bootstrap
/// until every rank has joined). An error when libnccl is missing.
pub fn new_id() -> Result<[u8; ID_BYTES]> {
    if let Some(why) = unavailable_reason() {
        return Err(CudaError::Unavailable(why));
    }
    let id = Id::new().map_err(nccl_err("making a unique id"))?;
    Ok(id.internal().map(|c| c as u8))
}

/// `id` as [`ID_VALUES`] values, each two of its bytes as an integer in `0..65536` (exact in
/// f64, so the values survive a sum with zeros bit for bit).
pub fn encode_id(id: &[u8; ID_BYTES]) -> Vec<f64> {
    id.chunks_exact(2)
        .map(|p| f64::from(u16::from_le_bytes([p[0], p[1]])))
        .collect()
}

/// The id [`encode_id`] wrote; an error when `values` are not [`ID_VALUES`] integers in
/// `0..65536` (e.g. two parts sent an id).
pub fn decode_id(values: &[f64]) -> Result<[u8; ID_BYTES]> {
    if values.len() != ID_VALUES {
        return Err(CudaError::Invalid(format!(
            "nccl: an id of {} values, expected {ID_VALUES}",
            values.len()
        )));
    }
    let mut id = [0u8; ID_BYTES];
    for (i, &v) in values.iter().enumerate() {
        if !(v.fract() == 0.0 && (0.0..65536.0).contains(&v)) {
            return Err(CudaError::Invalid(format!(
                "nccl: id value {i} is {v}, not an integer in 0..65536"
            )));
        }
        let b = (v as u16).to_le_bytes();
        id[2 * i] = b[0];
        id[2 * i + 1] = b[1];
    }
    Ok(id)
}

/// One rank's NCCL communicator, on one GPU's compute stream (so its collectives are ordered
/// with that stream's kernels).
pub struct Group {
    comm: Comm,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world_size())
            .finish()
    }
}

impl Group {
    /// Join the communicator of `world` ranks with unique id `id` as rank `rank`, on `gpu`
    /// (each rank on its own device). Blocks until every rank has joined.
    pub fn join(gpu: &Gpu, rank: usize, world: usize, id: &[u8; ID_BYTES]) -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            return Err(CudaError::Unavailable(why));
        }
        if rank >= world || i32::try_from(world).is_err() {
            return Err(CudaError::Invalid(format!(
                "nccl: rank {rank} of a communicator of {world}"
            )));
        }
        gpu.ctx
            .bind_to_thread()
            .map_err(|source| CudaError::Driver {
                what: "binding the context".into(),
                source,
            })?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(gpu.stream.clone(), rank, world, id)
            .map_err(nccl_err("joining the communicator"))?;
        Ok(Group { comm })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks in the communicator.
    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// `recv` = the element-wise sum of every rank's `send` (equally long on every rank),
    /// enqueued on the group's stream.
    pub fn all_reduce_sum(&self, send: &CudaSlice<f64>, recv: &mut CudaSlice<f64>) -> Result<()> {
        if send.len() != recv.len() {
            return Err(CudaError::Invalid(format!(
                "nccl: all-reduce of {} values into {}",
                send.len(),
                recv.len()
            )));
        }
        self.comm
            .all_reduce(send, recv, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_the_reduction_encoding() {
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        id[0] = 0xff;
        id[1] = 0xff;
        let v = encode_id(&id);
        assert_eq!(v.len(), ID_VALUES);
        assert_eq!(v[0], 65535.0);
        assert_eq!(v[1], f64::from(u16::from_le_bytes([id[2], id[3]])));
        // The other parts' zeros added in part order, as `Reduce` does.
        let summed: Vec<f64> = v.iter().map(|x| 0.0 + x + 0.0).collect();
        assert_eq!(decode_id(&summed).unwrap(), id);
    }

    #[test]
    fn bad_ids_are_refused() {
        let mut v = encode_id(&[7u8; ID_BYTES]);
        assert!(decode_id(&v[1..]).is_err());
        v[3] = 70000.0;
        let e = decode_id(&v).unwrap_err().to_string();
        assert!(e.contains("id value 3"), "{e}");
        v[3] = 1.5;
        assert!(decode_id(&v).is_err());
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        match unavailable_reason() {
            Some(why) => {
                assert!(why.contains("libnccl.so"), "{why}");
                let e = new_id().unwrap_err().to_string();
                assert!(e.contains("libnccl.so"), "{e}");
            }
            None => println!("libnccl is present here: nothing to check"),
        }
    }
}
