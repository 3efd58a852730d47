//! The Llama-family decoder (llama, mistral, qwen2) written with candle tensor ops, so that
//! every op has a gradient (Fisher statistics) and every linear layer can be observed
//! ([`Capture`]) or rescaled ((IA)^3).
//!
//! It follows Hugging Face transformers' `modeling_llama.py` (and the mistral / qwen2 variants
//! that differ only in biases and sliding windows):
//! RMSNorm computed in f32 (`x / sqrt(mean(x²) + eps) * w`), rotary embeddings in the
//! `rotate_half` convention (`q·cos + rotate_half(q)·sin`, the two halves of the head
//! dimension rotated together), grouped-query attention with the key/value heads repeated,
//! causal + padding (+ sliding window) masking, softmax in f32, SiLU-gated MLP.
//! Positions are 0..t for every row: inputs are right-padded.

use candle_core::{DType, Device, Tensor, Var, D};

use super::config::ModelConfig;
use super::{Capture, Captured};
use crate::error::Result;

/// The additive mask value of a hidden key: finite, so a fully hidden row gives no NaN, and
/// far enough below any score that `exp` of it is exactly 0.
const MASKED: f32 = -1e30;

/// One linear layer `y = x Wᵀ (+ b)`, with optional (IA)^3 scalings of its input or output.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    /// The checkpoint name of the weight (e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub(crate) name: String,
    /// `[d_out, d_in]`.
    pub(crate) weight: Tensor,
    /// `[d_out]`.
    pub(crate) bias: Option<Tensor>,
    /// `[d_in]`, multiplied into the input before the matmul.
    pub(crate) ia3_in: Option<Tensor>,
    /// `[d_out]`, multiplied into the output after the bias.
    pub(crate) ia3_out: Option<Tensor>,
}

impl Linear {
    /// `x`: `[b, t, d_in]` → `[b, t, d_out]`. With a capture, records the input as fed to the
    /// matmul (after an input scaling) and the output `x Wᵀ + b` (before an output scaling).
    pub(crate) fn forward(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        let x = match &self.ia3_in {
            Some(s) => x.broadcast_mul(s)?,
            None => x.clone(),
        };
        let (b, t, d_in) = x.dims3()?;
        let d_out = self.weight.dim(0)?;
        let mut y = x.reshape((b * t, d_in))?.matmul(&self.weight.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let mut y = y.reshape((b, t, d_out))?;
        if let Some(cap) = capture {
            let probe = if cap.probe_outputs {
                let p = Var::zeros((b, t, d_out), y.dtype(), y.device())?;
                let p = p.as_tensor().clone();
                y = y.add(&p)?;
                Some(p)
            } else {
                None
            };
            cap.records.push(Captured {
                weight: self.name.clone(),
                input: x.clone(),
                output: y.clone(),
                output_probe: probe,
            });
        }
        match &self.ia3_out {
            Some(s) => Ok(y.broadcast_mul(s)?),
            None => Ok(y),
        }
    }
}

/// RMSNorm in f32: `x / sqrt(mean(x²) + eps)`, cast back to `x`'s dtype, times `weight`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// `cos` and `sin` tables `[t, head_dim]` for positions 0..t (each frequency repeated for the
/// two halves, as Hugging Face's `cat((freqs, freqs))`), computed in f64 then rounded.
pub(crate) fn rope_tables(
    inv_freq: &[f64],
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(t * 2 * half);
    let mut sin = Vec::with_capacity(t * 2 * half);
    for pos in 0..t {
        for _ in 0..2 {
            for f in inv_freq {
                let a = pos as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    let cos = Tensor::from_vec(cos, (t, 2 * half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, 2 * half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Applies rotary embeddings to `x` `[b, heads, t, head_dim]`:
/// `x·cos + rotate_half(x)·sin`, `rotate_half([x1, x2]) = [-x2, x1]`.
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// The additive attention mask `[b, 1, t, t]`: 0 where query i may see key j (j ≤ i, key j
/// not padding, and i − j < window when a window is set), [`MASKED`] elsewhere.
pub(crate) fn attention_mask(
    keep: &[Vec<u32>],
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = keep.len();
    let mut m = vec![MASKED; b * t * t];
    for (r, row) in keep.iter().enumerate() {
        for i in 0..t {
            let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
            for j in lo..=i {
                if row[j] != 0 {
                    m[(r * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, t), device)?)
}

/// One decoder layer's weights.
#[derive(Clone, Debug)]
pub(crate) struct Layer {
    pub(crate) input_norm: Tensor,
    pub(crate) post_norm: Tensor,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

/// The whole network's weights.
#[derive(Clone, Debug)]
pub(crate) struct Network {
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
}

/// Repeats each key/value head `n_rep` times: `[b, kvh, t, d]` → `[b, kvh·n_rep, t, d]`.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kvh, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kvh, n_rep, t, d))?
        .reshape((b, kvh * n_rep, t, d))?)
}

impl Network {
    /// All linear layers, in forward order.
    pub(crate) fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q,
                    &mut l.k,
                    &mut l.v,
                    &mut l.o,
                    &mut l.gate,
                    &mut l.up,
                    &mut l.down,
                ]
            })
            .chain(std::iter::once(&mut self.lm_head))
    }

    /// Logits `[b, t, vocab]` (f32) of `ids` `[b, t]` u32 under `keep` (per row, 1 = real).
    pub(crate) fn forward(
        &self,
        cfg: &ModelConfig,
        ids: &Tensor,
        keep: &[Vec<u32>],
        mut capture: Option<&mut Capture>,
    ) -> Result<Tensor> {
        let x = self.hidden(cfg, ids, keep, capture.as_deref_mut())?;
        let logits = self.lm_head.forward(&x, capture)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// The final hidden states `[b, t, hidden]` (after the last norm, before the output head).
    pub(crate) fn hidden(
        &self,
        cfg: &ModelConfig,
        ids: &Tensor,
        keep: &[Vec<u32>],
        mut capture: Option<&mut Capture>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let device = ids.device();
        let dtype = self.embed.dtype();
        let (h, kvh, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (cos, sin) = rope_tables(&cfg.inv_freq(), t, dtype, device)?;
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, cfg.hidden_size))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let window = cfg
                .sliding_windows
                .get(li)
                .copied()
                .flatten()
                .filter(|&w| w < t);
            let mask = match masks.iter().find(|(w, _)| *w == window) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = attention_mask(keep, t, window, device)?;
                    masks.push((window, m.clone()));
                    m
                }
            };
            let hn = rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps)?;
            let q = layer.q.forward(&hn, capture.as_deref_mut())?;
            let k = layer.k.forward(&hn, capture.as_deref_mut())?;
            let v = layer.v.forward(&hn, capture.as_deref_mut())?;
            let q = q.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
            let q = apply_rope(&q, &cos, &sin)?;
            let k = repeat_kv(apply_rope(&k, &cos, &sin)?, h / kvh)?;
            let v = repeat_kv(v, h / kvh)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?
                .to_dtype(DType::F32)?
                .broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * hd))?;
            let attn = layer.o.forward(&attn, capture.as_deref_mut())?;
            x = (x + attn)?;
            let hn = rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps)?;
            let gate = layer.gate.forward(&hn, capture.as_deref_mut())?;
            let up = layer.up.forward(&hn, capture.as_deref_mut())?;
            let mlp = layer
                .down
                .forward(&(gate.silu()? * up)?, capture.as_deref_mut())?;
            x = (x + mlp)?;
        }
        rms_norm(&x, &self.norm, cfg.rms_norm_eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec")
    }

    #[test]
    fn rms_norm_matches_naive_f64() {
        let dev = Device::Cpu;
        let xs: Vec<f32> = (0..12)
            .map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.37 + 0.01 * i as f32)
            .collect();
        let w: Vec<f32> = (0..4).map(|i| 0.5 + 0.25 * i as f32).collect();
        let x = Tensor::from_vec(xs.clone(), (1, 3, 4), &dev).expect("x");
        let wt = Tensor::from_vec(w.clone(), 4, &dev).expect("w");
        let got = vals(&rms_norm(&x, &wt, 1e-5).expect("norm"));
        for r in 0..3 {
            let row: Vec<f64> = xs[r * 4..r * 4 + 4].iter().map(|&v| v as f64).collect();
            let ms = row.iter().map(|v| v * v).sum::<f64>() / 4.0;
            for c in 0..4 {
                let want = row[c] / (ms + 1e-5).sqrt() * w[c] as f64;
                let g = got[r * 4 + c] as f64;
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{r},{c}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn rope_matches_naive_f64() {
        // head_dim 4, theta 10000: inv_freq = [1, 1/100]; pairs (x_i, x_{i+2}) rotate by pos·f_i.
        let dev = Device::Cpu;
        let inv = [1.0, 0.01];
        let (t, d) = (3, 4);
        let xs: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.3) - 1.1).collect();
        let x = Tensor::from_vec(xs.clone(), (1, 1, t, d), &dev).expect("x");
        let (cos, sin) = rope_tables(&inv, t, DType::F32, &dev).expect("tables");
        let got = vals(&apply_rope(&x, &cos, &sin).expect("rope"));
        for p in 0..t {
            for i in 0..2 {
                let a = p as f64 * inv[i];
                let (x1, x2) = (xs[p * d + i] as f64, xs[p * d + i + 2] as f64);
                let want1 = x1 * a.cos() - x2 * a.sin();
                let want2 = x2 * a.cos() + x1 * a.sin();
                assert!((got[p * d + i] as f64 - want1).abs() < 1e-6, "p{p} i{i}");
                assert!(
                    (got[p * d + i + 2] as f64 - want2).abs() < 1e-6,
                    "p{p} i{i}+2"
                );
            }
        }
    }

    #[test]
    fn mask_is_causal_padded_and_windowed() {
        let dev = Device::Cpu;
        let keep = vec![vec![1, 1, 1, 0]];
        let m = attention_mask(&keep, 4, Some(2), &dev).expect("mask");
        let v = vals(&m);
        let open = |i: usize, j: usize| v[i * 4 + j] == 0.0;
        assert!(open(0, 0) && !open(0, 1));
        assert!(open(2, 1) && open(2, 2) && !open(2, 0), "window 2");
        assert!(!open(3, 3), "padding key hidden");
    }
}
