//! A Llama-family causal language model (llama, mistral, qwen2) on candle, loaded from a
//! Hugging Face safetensors directory or a GGUF file (methods.md §17, architecture.md
//! "Dependencies").
//!
//! # Brief overview
//!
//! - [`ModelConfig`] ([`config`]) parses `config.json`; an unsupported `model_type` or rope
//!   scaling is an [`EvalError::Model`](crate::EvalError::Model) naming it.
//! - [`CausalLm::load`] reads the configuration, the tokenizer ([`crate::tokenizer::Tok`]) and
//!   the weights (through `amalgam_io::Checkpoint::read_f32`, never candle's loader, so GGUF
//!   and safetensors share one path).
//! - [`CausalLm::forward`] maps right-padded token ids `[b, t]` and their mask to f32 logits
//!   `[b, t, vocab]`. Written with plain candle ops (see [`llama`]), so that with
//!   [`LoadOptions::trainable`] `loss.backward()` reaches every parameter, and with a
//!   [`Capture`] every linear layer's input and output are recorded (Gram, K-FAC statistics).
//! - [`CausalLm::set_ia3`] attaches (IA)^3 scalings to a linear layer.

pub mod config;
mod llama;
mod load;

use std::path::Path;

use amalgam_io::Checkpoint;
use candle_core::{DType, Device, Tensor};

pub use config::{ModelConfig, RopeScaling, SUPPORTED_ARCHITECTURES};

use crate::error::{EvalError, Result};
use crate::tokenizer::Tok;
use llama::Network;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The dtype weights and activations are held in (F32 by default; BF16/F16 accepted,
    /// norms and softmax still run in f32).
    pub dtype: DType,
    /// Make every parameter a `candle_core::Var`, so gradients reach it.
    pub trainable: bool,
    /// Where the model runs.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            dtype: DType::F32,
            trainable: false,
            device: Device::Cpu,
        }
    }
}

/// What a forward pass records when asked ([`CausalLm::forward`]): one [`Captured`] per linear
/// layer call, in forward order (per layer q, k, v, o, gate, up, down; then the output head).
#[derive(Clone, Debug, Default)]
pub struct Capture {
    /// The records, in forward order.
    pub records: Vec<Captured>,
    /// When set, each output is `x Wᵀ + b + P` with `P` a zero `Var` kept in
    /// [`Captured::output_probe`], so `loss.backward()?.get(probe)` is the gradient of the loss
    /// with respect to the layer's output (K-FAC's output factor).
    pub probe_outputs: bool,
}

/// One linear layer call seen by a [`Capture`].
#[derive(Clone, Debug)]
pub struct Captured {
    /// The layer's weight name as the checkpoint spells it (e.g.
    /// `model.layers.0.self_attn.q_proj.weight`; the output head is `lm_head.weight`, or
    /// `model.embed_tokens.weight` when tied).
    pub weight: String,
    /// `[b, t, d_in]`: the input as fed to the matmul (after an (IA)^3 input scaling).
    pub input: Tensor,
    /// `[b, t, d_out]`: `x Wᵀ + b`, before an (IA)^3 output scaling.
    pub output: Tensor,
    /// With [`Capture::probe_outputs`], the zero variable added to `output`.
    pub output_probe: Option<Tensor>,
}

/// A loaded causal language model with its tokenizer.
#[derive(Clone, Debug)]
pub struct CausalLm {
    config: ModelConfig,
    tokenizer: Tok,
    device: Device,
    net: Network,
    params: Vec<(String, Tensor)>,
}

impl CausalLm {
    /// Loads the model at `path`: a Hugging Face directory (`config.json`, `tokenizer.json`,
    /// safetensors weights, single or sharded) or a `.gguf` file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<CausalLm> {
        let (config, tokenizer) = load::config_and_tokenizer(path)?;
        let ckpt = Checkpoint::open(path)?;
        let (net, params) = load::load_weights(path, &ckpt, &config, opts)?;
        Ok(CausalLm {
            config,
            tokenizer,
            device: opts.device.clone(),
            net,
            params,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tokenizer loaded with the model.
    pub fn tokenizer(&self) -> &Tok {
        &self.tokenizer
    }

    /// Logits `[b, t, vocab]` (f32) for `input_ids` `[b, t]` (u32; other integer dtypes are
    /// converted) under `attention_mask` `[b, t]` (1 real token, 0 padding; right padding:
    /// positions are 0..t in every row). With `capture`, every linear layer pushes a
    /// [`Captured`] record.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        capture: Option<&mut Capture>,
    ) -> Result<Tensor> {
        let (ids, keep) = self.check_inputs(input_ids, attention_mask)?;
        self.net.forward(&self.config, &ids, &keep, capture)
    }

    /// Logits `[n, vocab]` (f32) at the given `(row, position)` pairs only: the same numbers
    /// as [`CausalLm::forward`] there, without running the output head on other positions
    /// (what scoring needs; the head is a large share of a small model's work).
    pub(crate) fn logits_at(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        at: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (ids, keep) = self.check_inputs(input_ids, attention_mask)?;
        let (b, t) = ids.dims2()?;
        let x = self.net.hidden(&self.config, &ids, &keep, None)?;
        let hidden = x.dim(2)?;
        let flat: Vec<u32> = at.iter().map(|&(r, p)| (r * t + p) as u32).collect();
        if at.iter().any(|&(r, p)| r >= b || p >= t) {
            return Err(EvalError::Other(format!(
                "a position in {at:?} is outside [{b}, {t}]"
            )));
        }
        let index = Tensor::from_vec(flat, at.len(), &self.device)?;
        let picked = x
            .reshape((b * t, hidden))?
            .index_select(&index, 0)?
            .unsqueeze(0)?;
        let logits = self.net.lm_head.forward(&picked, None)?.squeeze(0)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Validates the inputs' shapes; returns the ids as u32 on the model's device and the
    /// mask rows.
    fn check_inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<(Tensor, Vec<Vec<u32>>)> {
        let (b, t) = input_ids.dims2()?;
        if attention_mask.dims2()? != (b, t) {
            return Err(EvalError::Other(format!(
                "attention_mask is {:?} but input_ids is [{b}, {t}]",
                attention_mask.dims()
            )));
        }
        if t > self.config.max_position_embeddings {
            return Err(EvalError::Other(format!(
                "{t} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let keep = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        Ok((ids, keep))
    }

    /// Every parameter by its Hugging Face name, in checkpoint order. With
    /// [`LoadOptions::trainable`], each was made by `Var::from_tensor`, so
    /// `loss.backward()?.get(t)` returns its gradient.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Multiplies the output (or, with `on_input`, the input) of the linear layer whose weight
    /// is `weight_name` by `scale` (a `[d]` vector): the (IA)^3 hook (PEFT scales the k_proj
    /// and v_proj outputs and the down_proj input). Replaces an earlier scaling of that side.
    pub fn set_ia3(&mut self, weight_name: &str, scale: Tensor, on_input: bool) -> Result<()> {
        let lin = self
            .net
            .linears_mut()
            .find(|l| l.name == weight_name)
            .ok_or_else(|| EvalError::Other(format!("no linear layer has weight {weight_name}")))?;
        let (d_out, d_in) = lin.weight.dims2()?;
        let want = if on_input { d_in } else { d_out };
        let got = scale.dims1()?;
        if got != want {
            return Err(EvalError::Other(format!(
                "(IA)^3 scale for {weight_name} ({}) has {got} entries, the layer needs {want}",
                if on_input { "input" } else { "output" }
            )));
        }
        let scale = scale
            .to_dtype(lin.weight.dtype())?
            .to_device(&self.device)?;
        if on_input {
            lin.ia3_in = Some(scale);
        } else {
            lin.ia3_out = Some(scale);
        }
        Ok(())
    }
}
