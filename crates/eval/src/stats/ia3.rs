//! Full (blockwise) Fisher of (IA)³ vectors (methods.md §11 block type 3, §15): for every
//! vector l, F = (1/n) Σ_examples g gᵀ with g = ∂loss/∂l, the loss the example's mean-token
//! NLL, one example per batch, as MaTS `save_fisher.py:compute_blockwiseFisher`.
//!
//! The vectors come from a PEFT (IA)³ adapter ([`install_ia3`]): each scales its layer's
//! output (attention k/v) or, for a feed-forward module, its input, exactly as PEFT applies
//! it. The statistics are keyed by the adapter's tensor keys (`base_model.model.<module>.ia3_l`),
//! so a statistics file belongs to the adapter (check it with the adapter's checkpoint).

use std::path::Path;

use amalgam_io::{Adapter, StatKey, StatKind};
use candle_core::{DType, Tensor, Var};

use super::{example_loss, Acc, ExampleTokens, PartialSum};
use crate::error::{EvalError, Result};
use crate::model::CausalLm;

/// One installed (IA)³ vector.
#[derive(Clone, Debug)]
pub struct Ia3Vector {
    /// The adapter key (`base_model.model.<module>.ia3_l`).
    pub key: String,
    /// The base-model weight it scales (`<module>.weight`).
    pub weight: String,
    /// Whether it scales the layer's input (feed-forward) rather than its output.
    pub on_input: bool,
    /// The vector `[d]`, a variable (its gradient is what the block Fisher needs).
    pub value: Tensor,
}

/// The (IA)³ vectors of one adapter, installed in a model.
#[derive(Clone, Debug)]
pub struct Ia3Vectors {
    /// The vectors, in adapter file order.
    pub vectors: Vec<Ia3Vector>,
}

/// Opens the PEFT (IA)³ adapter at `adapter` and installs its vectors in `model` as variables
/// (f32). Returns them for [`StatsOptions::ia3`](super::StatsOptions::ia3)
/// and the opened adapter (whose checkpoint the statistics belong to).
pub fn install_ia3(model: &mut CausalLm, adapter: &Path) -> Result<(Ia3Vectors, Adapter)> {
    let ad = Adapter::open(adapter)?;
    if ad.ia3_modules().is_empty() {
        return Err(EvalError::Other(format!(
            "{}: --kind ia3-block needs an (IA)^3 adapter, and this one has no (IA)^3 vectors",
            adapter.display()
        )));
    }
    let mut vectors = Vec::new();
    for m in ad.ia3_modules() {
        let values = ad.read(&m.key)?;
        // An f32 variable; the model casts it to its own dtype inside the graph, so the
        // gradient still reaches this variable.
        let value = Var::from_vec(values, m.len, model.device())?
            .as_tensor()
            .clone();
        let weight = ad.base_weight_name(&m.name);
        model.set_ia3(&weight, value.clone(), m.is_feedforward)?;
        vectors.push(Ia3Vector {
            key: m.key.clone(),
            weight,
            on_input: m.is_feedforward,
            value,
        });
    }
    Ok((Ia3Vectors { vectors }, ad))
}

/// Σ_examples g gᵀ (`KEY::fisher_block` before the division) for every vector of `vectors`,
/// in order.
pub(crate) fn block_fisher(
    model: &CausalLm,
    vectors: &Ia3Vectors,
    examples: &[ExampleTokens],
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<PartialSum>> {
    let mut accs: Vec<Acc> = vectors.vectors.iter().map(|_| Acc::new()).collect();
    for ex in examples {
        let loss = example_loss(model, ex, None)?;
        let grads = loss.backward()?;
        for (v, acc) in vectors.vectors.iter().zip(accs.iter_mut()) {
            let Some(g) = grads.get(&v.value) else {
                return Err(EvalError::Other(format!(
                    "(IA)^3 vector {} got no gradient: is it installed in this model?",
                    v.key
                )));
            };
            let g = g.to_dtype(DType::F32)?.flatten_all()?;
            acc.add(&g.unsqueeze(1)?.matmul(&g.unsqueeze(0)?)?)?;
        }
        progress(1);
    }
    vectors
        .vectors
        .iter()
        .zip(accs)
        .map(|(v, acc)| {
            let d = v.value.elem_count();
            Ok(PartialSum::new(
                StatKey::new(v.key.clone(), StatKind::FisherBlock, vec![d, d]),
                acc.into_sum(&[d, d])?,
            ))
        })
        .collect()
}
