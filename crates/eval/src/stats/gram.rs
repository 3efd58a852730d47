//! Gram matrices of linear-layer inputs (methods.md §10, RegMean; §11 block type 2, K-FAC)
//! and the K-FAC output factors, as MaTS `save_gram_matrix.py` computes them: per example
//! (batch size 1), `Xᵀ X` over the positions of the layer's input `X` and `Gᵀ G` over the
//! gradients `G` of the example's mean-token NLL w.r.t. the layer's output; both sums divided
//! by the total number of positions at the end.

use std::collections::HashMap;

use amalgam_io::{StatKey, StatKind};
use candle_core::{DType, Tensor};

use super::{example_loss, Acc, ExampleTokens, GramPositions, PartialSum};
use crate::error::{EvalError, Result};
use crate::model::{Capture, CausalLm};

/// Whether `weight` is the output head (no `kfac_out`: its output is vocabulary-sized).
fn is_head(weight: &str) -> bool {
    weight == "lm_head.weight" || weight.ends_with(".lm_head.weight")
}

/// Whether `weight` is the token embedding (seen as the output head when the two are tied).
fn is_embedding(weight: &str) -> bool {
    weight.ends_with("embed_tokens.weight")
}

/// `Σ_rows x xᵀ` of `x` `[1, t, d]` over the positions `rows`, in f32.
fn gram_of(x: &Tensor, rows: &std::ops::Range<usize>) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let x = x
        .detach()
        .narrow(1, rows.start, rows.len())?
        .to_dtype(DType::F32)?
        .reshape(((), d))?;
    Ok(x.t()?.matmul(&x)?)
}

/// Σ_positions x xᵀ (`W::gram_in` before the division) for every linear weight of `model`, and
/// Σ_positions g gᵀ (`W::kfac_out`) for all but the head when `kfac`, in parameter order.
pub(crate) fn grams(
    model: &CausalLm,
    examples: &[ExampleTokens],
    positions: GramPositions,
    kfac: bool,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<PartialSum>> {
    let params = model.parameters();
    let index: HashMap<&str, usize> = params
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    // Per parameter index: (input Gram, output-gradient Gram, d_in, d_out).
    let mut accs: HashMap<usize, (Acc, Acc, usize, usize)> = HashMap::new();
    for ex in examples {
        let mut cap = Capture {
            probe_outputs: kfac,
            ..Capture::default()
        };
        let loss = example_loss(model, ex, Some(&mut cap))?;
        let grads = if kfac { Some(loss.backward()?) } else { None };
        let rows = ex.counted(positions);
        for rec in &cap.records {
            // A head tied to the embedding has no weight of its own: skipped.
            let Some(&i) = index.get(rec.weight.as_str()) else {
                continue;
            };
            if is_embedding(&rec.weight) {
                continue;
            }
            let d_in = rec.input.dim(candle_core::D::Minus1)?;
            let d_out = rec.output.dim(candle_core::D::Minus1)?;
            let e = accs
                .entry(i)
                .or_insert_with(|| (Acc::new(), Acc::new(), d_in, d_out));
            e.0.add(&gram_of(&rec.input, &rows)?)?;
            if let Some(grads) = &grads {
                if is_head(&rec.weight) {
                    continue;
                }
                let probe = rec.output_probe.as_ref().ok_or_else(|| {
                    EvalError::Other(format!(
                        "K-FAC: the model recorded no output probe for {}",
                        rec.weight
                    ))
                })?;
                // No gradient: the loss does not depend on this output (a zero term).
                if let Some(g) = grads.get(probe) {
                    e.1.add(&gram_of(g, &rows)?)?;
                }
            }
        }
        progress(1);
    }
    let mut order: Vec<usize> = accs.keys().copied().collect();
    order.sort_unstable();
    let mut out = Vec::new();
    for i in order {
        let (gin, gout, d_in, d_out) = accs.remove(&i).expect("index taken from the map");
        let name = &params[i].0;
        out.push(PartialSum::new(
            StatKey::new(name.clone(), StatKind::GramIn, vec![d_in, d_in]),
            gin.into_sum(&[d_in, d_in])?,
        ));
        if kfac && !is_head(name) {
            out.push(PartialSum::new(
                StatKey::new(name.clone(), StatKind::KfacOut, vec![d_out, d_out]),
                gout.into_sum(&[d_out, d_out])?,
            ));
        }
    }
    if out.is_empty() {
        return Err(EvalError::Other(
            "the model recorded no linear layer whose weight is one of its parameters".to_string(),
        ));
    }
    Ok(out)
}
