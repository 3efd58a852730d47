//! Diagonal empirical Fisher (methods.md §9): F = (1/n) Σ_examples (∂loss/∂θ)², the loss of an
//! example the mean NLL of its scored tokens (the gold tokens: the empirical Fisher), one
//! example per batch, as MaTS `save_fisher.py:compute_diagonalFisher` (no floor here; merges
//! apply their own).

use amalgam_io::{StatKey, StatKind};

use super::{example_loss, Acc, ExampleTokens, PartialSum};
use crate::error::{EvalError, Result};
use crate::model::CausalLm;

/// Σ_examples (∂loss/∂θ)² (`NAME::fisher` before the division) for every parameter of
/// `model`, in parameter order. A parameter the loss
/// does not reach gets zeros; a model whose parameters are not variables is an error.
pub(crate) fn diagonal_fisher(
    model: &CausalLm,
    examples: &[ExampleTokens],
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<PartialSum>> {
    let params = model.parameters();
    let mut accs: Vec<Acc> = params.iter().map(|_| Acc::new()).collect();
    for ex in examples {
        let loss = example_loss(model, ex, None)?;
        let grads = loss.backward()?;
        let mut any = false;
        for ((_, p), acc) in params.iter().zip(accs.iter_mut()) {
            if let Some(g) = grads.get(p) {
                acc.add(&g.to_dtype(candle_core::DType::F32)?.sqr()?)?;
                any = true;
            }
        }
        if !any {
            return Err(EvalError::Other(
                "--kind fisher needs gradients, but no parameter got one: load the model trainable"
                    .to_string(),
            ));
        }
        progress(1);
    }
    params
        .iter()
        .zip(accs)
        .map(|((name, p), acc)| {
            let shape = p.dims().to_vec();
            let sum = acc.into_sum(&shape)?;
            Ok(PartialSum::new(
                StatKey::new(name.clone(), StatKind::Fisher, shape),
                sum,
            ))
        })
        .collect()
}
