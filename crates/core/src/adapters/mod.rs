//! Adapter math (issue 8): merging parameter-efficient fine-tunes, free of I/O.
//!
//! methods.md §14 (KnOTS), §15 ((IA)³), §3-§4 (TIES / DARE as PEFT's `merge_utils` runs them).
//! Everything here works on one module (one LoRA pair, one (IA)³ vector, one weight matrix) held
//! in memory as row-major `f64` (LoRA factors and their products) or `f32` (checkpoint weights);
//! reading and writing PEFT directories (`adapter_config.json`, `adapter_model.safetensors`)
//! belongs to the I/O crate, which converts tensors to these slices and back.
//!
//! - [`combine`]: PEFT's `LoraModel.add_weighted_adapter` (every `combination_type`) as a pure
//!   function of one module's adapters (sharding class **T**: one module at a time).
//! - [`knots`]: KnOTS, SVD alignment of the concatenated task updates followed by TIES or DARE on
//!   the aligned representations (class **G**: the top-k and the zero-sign rule are global).
//! - [`extract`]: a LoRA of a chosen rank from a full fine-tune (truncated SVD of the
//!   difference), following `mergekit-extract-lora` (class **T**).
//! - [`ia3`]: (IA)³ task vectors, PEFT's weighted sum, and folding a vector into its weight
//!   (class **E**).
//! - [`merge_ops`]: PEFT's `utils/merge_utils.py` operations (magnitude and random pruning,
//!   majority sign, disjoint merge) over `f64` tensors, shared by [`combine`].
//!
//! LoRA conventions (PEFT's `Linear`): `A` is `r × in` (`lora_A.weight`), `B` is `out × r`
//! (`lora_B.weight`), and the module's update is `ΔW = scaling · B · A` with
//! `scaling = lora_alpha / r` (or `lora_alpha / √r` with rsLoRA). PEFT's embedding LoRA
//! (`lora_embedding_A` `r × num_embeddings`, `lora_embedding_B` `embedding_dim × r`) fits the
//! same functions with `in = num_embeddings`, `out = embedding_dim`; its `ΔW` is the transpose of
//! the embedding weight's update, exactly as PEFT's own SVD path treats it.

pub mod combine;
pub mod extract;
pub mod ia3;
pub mod knots;
pub mod merge_ops;
#[cfg(test)]
mod test_util;

use crate::error::{MergeError, Result};

/// `scaling · B · A` for `A` (`rank × in`) and `B` (`out × rank`), row-major `out × in`, in
/// `f64` (PEFT's `get_delta_weight` for a `Linear` LoRA).
///
/// Errors (naming `module`) when a slice does not have the size its dimensions give.
pub fn lora_delta(
    module: &str,
    a: &[f64],
    b: &[f64],
    rank: usize,
    out_features: usize,
    in_features: usize,
    scaling: f64,
) -> Result<Vec<f64>> {
    check_shape(module, "lora_A", a.len(), rank, in_features)?;
    check_shape(module, "lora_B", b.len(), out_features, rank)?;
    let mut d = crate::linalg::matmul(b, out_features, rank, a, in_features);
    if scaling != 1.0 {
        d.iter_mut().for_each(|x| *x *= scaling);
    }
    Ok(d)
}

/// An input-shape error naming the module and the tensor.
pub(crate) fn check_shape(
    module: &str,
    what: &str,
    len: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if len == rows * cols {
        Ok(())
    } else {
        Err(MergeError::BadInputs {
            method: "adapters".to_string(),
            message: format!(
                "module `{module}`: `{what}` has {len} values, expected {rows} x {cols}; \
                 all adapters must target the same base model"
            ),
        })
    }
}

/// A non-finite-value error naming the module and the tensor.
pub(crate) fn check_finite(module: &str, what: &str, v: &[f64]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(MergeError::Numeric {
            tensor: module.to_string(),
            message: format!(
                "`{what}` has a non-finite value ({}) at flat index {i}",
                v[i]
            ),
        }),
    }
}

/// Zero-pad `a` (`used × in`) to `rank` rows and `b` (`out × used`) to `rank` columns.
pub(crate) fn pad_rank(
    mut a: Vec<f64>,
    b: Vec<f64>,
    used: usize,
    rank: usize,
    in_f: usize,
    out_f: usize,
) -> (Vec<f64>, Vec<f64>) {
    if used == rank {
        return (a, b);
    }
    a.resize(rank * in_f, 0.0);
    let mut pb = vec![0.0; out_f * rank];
    for o in 0..out_f {
        pb[o * rank..o * rank + used].copy_from_slice(&b[o * used..(o + 1) * used]);
    }
    (a, pb)
}
