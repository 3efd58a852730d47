//! Scoring: the log-likelihood of a continuation given a context (methods.md §17).
//!
//! Every evaluation in this crate reduces to a list of [`ScoreRequest`]s. The list is cut into
//! batches by [`plan_batches`] *before* any model runs, and a batch is the unit of work both in
//! one process and on the cluster: a [`Scorer`] scores whole batches, so the numbers cannot
//! depend on how batches were spread over workers.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use candle_core::{DType, Tensor, D};

use crate::error::{EvalError, Result};
use crate::model::CausalLm;

/// One continuation to score after a context.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ScoreRequest {
    /// The conditioning text (may be empty: then only the BOS token, if the tokenizer adds one).
    pub context: String,
    /// The text whose tokens are scored.
    pub continuation: String,
}

/// The score of one request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Σ_t log p(y_t | x, y_<t) over the continuation's tokens, natural log.
    pub logprob: f64,
    /// The number of continuation tokens scored.
    pub tokens: u32,
}

/// Something that scores batches of requests (a model, or on the cluster, a pool of workers).
pub trait Scorer {
    /// Scores one batch; the result has one entry per request, in order. The score of a request
    /// may depend on the batch it is in (padding), never on anything else.
    fn score_batch(&mut self, batch: &[ScoreRequest]) -> Result<Vec<Scored>>;
}

/// A [`Scorer`] running a [`CausalLm`] in this process.
///
/// Tokenization follows lm-evaluation-harness (`HFLM._encode_pair`): trailing whitespace of
/// the context is moved to the front of the continuation (a BIG-bench prompt ending in
/// `"A: "` scores `" choice"`); then `whole = enc(context + continuation)` and
/// `ctx = enc(context)`, both with special tokens (so with the BOS a Llama-style tokenizer
/// prepends), and the continuation is `whole[len(ctx)..]`; an empty context is thus just the
/// BOS. When `whole` does not start with `ctx` (the merge at the boundary differs, e.g. a
/// word split between context and continuation), the continuation is `enc(continuation)` without special
/// tokens instead. When the context has no tokens at all (a tokenizer that adds no BOS and an
/// empty context), the BOS (else EOS) id is put in front so the first token is conditioned
/// on something, as lm-eval's prefix token does.
///
/// The model reads `ctx + cont` without its last token (lm-eval's input); inputs longer than
/// `max_position_embeddings` are truncated from the left, keeping the continuation whole (a
/// continuation that alone does not fit is an error). A batch is right-padded and run in one
/// forward; each continuation token's log-probability is the f64 `log_softmax` of its
/// position's f32 logits, and the sum is accumulated in f64.
#[derive(Debug)]
pub struct LmScorer {
    model: CausalLm,
}

impl LmScorer {
    /// Wraps a loaded model.
    pub fn new(model: CausalLm) -> LmScorer {
        LmScorer { model }
    }

    /// The model.
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// The model, mutably (e.g. to set (IA)^3 scalings).
    pub fn model_mut(&mut self) -> &mut CausalLm {
        &mut self.model
    }

    /// The request's (context ids, continuation ids), tokenized as described on [`LmScorer`].
    pub fn token_ids(&self, req: &ScoreRequest) -> Result<(Vec<u32>, Vec<u32>)> {
        let tok = self.model.tokenizer();
        // lm-eval moves the context's trailing whitespace to the continuation's front.
        let context = req.context.trim_end();
        let continuation = format!("{}{}", &req.context[context.len()..], req.continuation);
        let whole = tok.encode(&format!("{context}{continuation}"), true)?;
        let mut ctx = tok.encode(context, true)?;
        let cont = if whole.starts_with(&ctx) {
            whole[ctx.len()..].to_vec()
        } else {
            tok.encode(&continuation, false)?
        };
        if ctx.is_empty() {
            if let Some(prefix) = tok.bos_id().or(tok.eos_id()) {
                ctx.push(prefix);
            }
        }
        Ok((ctx, cont))
    }
}

/// One request laid out for the forward pass.
struct Row {
    /// The model input (`ctx + cont` without its last token, left-truncated).
    input: Vec<u32>,
    /// The continuation ids.
    cont: Vec<u32>,
}

impl Scorer for LmScorer {
    fn score_batch(&mut self, batch: &[ScoreRequest]) -> Result<Vec<Scored>> {
        let max_len = self.model.config().max_position_embeddings;
        let mut rows: Vec<Option<Row>> = Vec::with_capacity(batch.len());
        for req in batch {
            let (ctx, cont) = self.token_ids(req)?;
            if cont.is_empty() {
                rows.push(None);
                continue;
            }
            let mut input: Vec<u32> = ctx.iter().chain(&cont).copied().collect();
            input.pop();
            if input.len() > max_len {
                input.drain(..input.len() - max_len);
            }
            if input.len() < cont.len() {
                // Either the continuation alone exceeds the window, or the context is empty
                // and there is no BOS/EOS to put in front of the first token.
                return Err(EvalError::Other(format!(
                    "continuation {:?} ({} tokens) cannot be scored: it needs a context token and at most max_position_embeddings {max_len} tokens",
                    req.continuation,
                    cont.len()
                )));
            }
            rows.push(Some(Row { input, cont }));
        }
        let live: Vec<&Row> = rows.iter().flatten().collect();
        let mut out = vec![
            Scored {
                logprob: 0.0,
                tokens: 0
            };
            batch.len()
        ];
        if live.is_empty() {
            return Ok(out);
        }
        let t = live.iter().map(|r| r.input.len()).max().unwrap_or(0);
        let pad = self.model.tokenizer().pad_id();
        let mut ids = Vec::with_capacity(live.len() * t);
        let mut mask = Vec::with_capacity(live.len() * t);
        for r in &live {
            ids.extend(
                r.input
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, t - r.input.len())),
            );
            mask.extend((0..t).map(|i| u32::from(i < r.input.len())));
        }
        let device = self.model.device().clone();
        let ids = Tensor::from_vec(ids, (live.len(), t), &device)?;
        let mask = Tensor::from_vec(mask, (live.len(), t), &device)?;
        // Only the positions that predict continuation tokens go through the output head.
        let mut at = Vec::new();
        for (li, r) in live.iter().enumerate() {
            let start = r.input.len() - r.cont.len();
            at.extend((start..r.input.len()).map(|p| (li, p)));
        }
        let logits = self.model.logits_at(&ids, &mask, &at)?;
        let mut offset = 0;
        for (slot, row) in out.iter_mut().zip(&rows) {
            let Some(row) = row else { continue };
            let n = row.cont.len();
            let lp = candle_nn::ops::log_softmax(
                &logits.narrow(0, offset, n)?.to_dtype(DType::F64)?,
                D::Minus1,
            )?;
            let target = Tensor::from_vec(row.cont.clone(), (n, 1), &device)?;
            let picked = lp.gather(&target, 1)?.flatten_all()?.to_vec1::<f64>()?;
            *slot = Scored {
                logprob: picked.iter().sum(),
                tokens: n as u32,
            };
            offset += n;
        }
        Ok(out)
    }
}

/// Cuts `n` requests into contiguous batches of at most `batch_size` (≥ 1) requests, in order.
pub fn plan_batches(n: usize, batch_size: usize) -> Vec<Range<usize>> {
    let size = batch_size.max(1);
    (0..n.div_ceil(size))
        .map(|b| b * size..((b + 1) * size).min(n))
        .collect()
}

/// Scores every request with `scorer`, batch by batch as [`plan_batches`] cuts them.
pub fn score_all(
    scorer: &mut dyn Scorer,
    requests: &[ScoreRequest],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Scored>> {
    let mut out = Vec::with_capacity(requests.len());
    for range in plan_batches(requests.len(), batch_size) {
        let n = range.len();
        out.extend(scorer.score_batch(&requests[range])?);
        progress(n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_everything_in_order() {
        assert_eq!(plan_batches(0, 4), Vec::<Range<usize>>::new());
        assert_eq!(plan_batches(5, 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(plan_batches(3, 0), vec![0..1, 1..2, 2..3]);
    }
}
