//! Turning `--memory-budget` into per-buffer element counts, and the dry run's estimate.
//!
//! A method holds [`MergeMethod::buffers`] f32 buffers of `block_elems` elements at once (its
//! inputs included). Inputs are memory mapped (file-backed pages, not private memory) and the
//! output goes through a fixed write buffer, so private memory is about
//! `buffers * block_elems * 4` plus [`FIXED_OVERHEAD`].

use amalgam_core::methods::MergeMethod;
use amalgam_core::tensor::TensorJob;

/// Private memory outside the method's buffers: the output write buffer, thread stacks,
/// allocator slack and the plan itself.
pub const FIXED_OVERHEAD: u64 = 48 << 20;

/// Smallest budget accepted.
pub const MIN_BUDGET: u64 = 64 << 20;

/// Elements per buffer for `method` with `n_models` models under `budget` bytes.
pub fn block_elems(method: &dyn MergeMethod, n_models: usize, budget: u64) -> usize {
    let usable = budget.saturating_sub(FIXED_OVERHEAD).max(1 << 20);
    let per_elem = 4 * method.buffers(n_models).max(1) as u64;
    ((usable / per_elem) as usize).max(1)
}

/// Estimated peak private memory for one tensor: the method's whole-tensor need when it has
/// one, else its streaming buffers (a row block is at least one row).
pub fn tensor_peak(method: &dyn MergeMethod, job: &TensorJob) -> u64 {
    if let Some(whole) = method.whole_tensor_bytes(job) {
        return FIXED_OVERHEAD + whole;
    }
    let held = job.numel().min(job.block_elems.max(job.cols())) as u64;
    FIXED_OVERHEAD + held * 4 * method.buffers(job.n_models) as u64
}
