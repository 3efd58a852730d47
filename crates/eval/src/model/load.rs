//! Loading a model: its configuration, tokenizer and weights.
//!
//! A Hugging Face directory holds `config.json`, `tokenizer.json` (+ `tokenizer_config.json`)
//! and safetensors weights (single or sharded). A `.gguf` file carries all three; the
//! configuration and tokenizer JSON are rebuilt from its metadata by `amalgam_io::gguf`, and
//! the weights are read dequantized under their Hugging Face names by the same
//! [`amalgam_io::Checkpoint`] reader. Weights always go through `Checkpoint::read_f32`, then
//! to the requested dtype and device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use amalgam_io::Checkpoint;
use candle_core::{Tensor, Var};

use super::config::ModelConfig;
use super::llama::{Layer, Linear, Network};
use super::LoadOptions;
use crate::error::{EvalError, Result};
use crate::tokenizer::Tok;

/// Whether `path` is read as a GGUF file (a `.gguf` name or the GGUF magic).
pub(crate) fn is_gguf(path: &Path) -> bool {
    path.is_file() && amalgam_io::gguf::is_gguf(path)
}

/// Reads the configuration and tokenizer of the model at `path`.
pub(crate) fn config_and_tokenizer(path: &Path) -> Result<(ModelConfig, Tok)> {
    if is_gguf(path) {
        let (json, text) = gguf_sources(path)?;
        let cfg = ModelConfig::from_json(&json, path)?;
        let tok = Tok::from_json(&text, path)?.with_special_ids(
            cfg.bos_token_id,
            cfg.eos_token_id,
            cfg.pad_token_id,
        )?;
        return Ok((cfg, tok));
    }
    let dir: PathBuf = if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path.to_path_buf()
    };
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(EvalError::Model {
            path: path.to_path_buf(),
            msg: "no config.json beside the weights (a Hugging Face model directory or a .gguf file is expected)".into(),
        });
    }
    let cfg = ModelConfig::from_file(&config_path)?;
    let tok = Tok::from_file(&dir.join("tokenizer.json"))?
        .with_special_ids(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)?
        .with_tokenizer_config(&dir.join("tokenizer_config.json"))?;
    Ok((cfg, tok))
}

/// The Hugging Face `config.json` value and `tokenizer.json` text rebuilt from a GGUF file's
/// metadata.
fn gguf_sources(path: &Path) -> Result<(serde_json::Value, String)> {
    Ok((
        amalgam_io::gguf::hf_config_json(path)?,
        amalgam_io::gguf::tokenizer_json(path)?,
    ))
}

/// Loads the weights of `ckpt` for `cfg`. Returns the network and every parameter by name
/// in checkpoint order. Tensors the network does not use (e.g. old `rotary_emb.inv_freq`
/// buffers) are skipped; a missing or misshapen one is an error naming it.
pub(crate) fn load_weights(
    path: &Path,
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    opts: &LoadOptions,
) -> Result<(Network, Vec<(String, Tensor)>)> {
    let expected = expected_shapes(cfg);
    let mut params: Vec<(String, Tensor)> = Vec::new();
    let mut by_name: HashMap<String, Tensor> = HashMap::new();
    for meta in ckpt.tensors() {
        let Some(shape) = expected.get(meta.name.as_str()) else {
            continue;
        };
        if &meta.shape != shape {
            return Err(EvalError::Model {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor {} is {:?} but config.json implies {:?}",
                    meta.name, meta.shape, shape
                ),
            });
        }
        let mut data = vec![0f32; meta.numel()];
        ckpt.read_f32(&meta.name, 0..meta.numel(), &mut data)?;
        let t =
            Tensor::from_vec(data, meta.shape.as_slice(), &opts.device)?.to_dtype(opts.dtype)?;
        let t = if opts.trainable {
            Var::from_tensor(&t)?.as_tensor().clone()
        } else {
            t
        };
        by_name.insert(meta.name.clone(), t.clone());
        params.push((meta.name.clone(), t));
    }
    let take = |name: &str| -> Result<Tensor> {
        by_name.get(name).cloned().ok_or_else(|| EvalError::Model {
            path: path.to_path_buf(),
            msg: format!("tensor {name} is missing from the checkpoint"),
        })
    };
    let linear = |name: String, bias: bool| -> Result<Linear> {
        let weight = take(&format!("{name}.weight"))?;
        let bias = if bias {
            Some(take(&format!("{name}.bias"))?)
        } else {
            None
        };
        Ok(Linear {
            name: format!("{name}.weight"),
            weight,
            bias,
            ia3_in: None,
            ia3_out: None,
        })
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        layers.push(Layer {
            q: linear(format!("{p}.self_attn.q_proj"), cfg.qkv_bias)?,
            k: linear(format!("{p}.self_attn.k_proj"), cfg.qkv_bias)?,
            v: linear(format!("{p}.self_attn.v_proj"), cfg.qkv_bias)?,
            o: linear(format!("{p}.self_attn.o_proj"), cfg.o_bias)?,
            gate: linear(format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
            up: linear(format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
            down: linear(format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
            input_norm: take(&format!("{p}.input_layernorm.weight"))?,
            post_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
        });
    }
    let embed = take("model.embed_tokens.weight")?;
    let norm = take("model.norm.weight")?;
    // Tied heads reuse the embedding tensor itself (so its gradient collects both uses). A
    // GGUF file of a tied model may simply omit `output.weight`: then the head is tied too.
    let head_name =
        if cfg.tie_word_embeddings || (is_gguf(path) && ckpt.get("lm_head.weight").is_none()) {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
    let lm_head = Linear {
        name: head_name.to_string(),
        weight: take(head_name)?,
        bias: None,
        ia3_in: None,
        ia3_out: None,
    };
    Ok((
        Network {
            embed,
            layers,
            norm,
            lm_head,
        },
        params,
    ))
}

/// The shape of every tensor the network reads, by checkpoint name.
fn expected_shapes(cfg: &ModelConfig) -> HashMap<String, Vec<usize>> {
    let (hid, inter, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let q = cfg.num_attention_heads * hd;
    let kv = cfg.num_key_value_heads * hd;
    let mut m = HashMap::new();
    m.insert(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, hid],
    );
    m.insert("model.norm.weight".to_string(), vec![hid]);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![cfg.vocab_size, hid]);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| {
            m.insert(format!("{p}.{name}.weight"), vec![out, inp]);
            if bias {
                m.insert(format!("{p}.{name}.bias"), vec![out]);
            }
        };
        lin("self_attn.q_proj", q, hid, cfg.qkv_bias);
        lin("self_attn.k_proj", kv, hid, cfg.qkv_bias);
        lin("self_attn.v_proj", kv, hid, cfg.qkv_bias);
        lin("self_attn.o_proj", hid, q, cfg.o_bias);
        lin("mlp.gate_proj", inter, hid, cfg.mlp_bias);
        lin("mlp.up_proj", inter, hid, cfg.mlp_bias);
        lin("mlp.down_proj", hid, inter, cfg.mlp_bias);
        m.insert(format!("{p}.input_layernorm.weight"), vec![hid]);
        m.insert(format!("{p}.post_attention_layernorm.weight"), vec![hid]);
    }
    m
}
