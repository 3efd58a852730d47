//! A Hugging Face `config.json` equivalent from GGUF metadata (the keys llama.cpp's
//! `convert_hf_to_gguf.py` writes from `config.json`, read back).

use std::path::Path;

use serde_json::{json, Map, Value};

use super::{read_content, Meta};
use crate::error::IoError;

/// A Hugging Face `config.json` equivalent for GGUF file `path`, from its metadata:
/// `architectures`, `model_type` (`llama`, `mistral` when `general.name` says Mistral (as
/// transformers decides), or `qwen2`), `hidden_size`, `intermediate_size`,
/// `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim` (when the
/// file gives a key length), `rms_norm_eps`, `rope_theta`, `max_position_embeddings`,
/// `vocab_size`, `tie_word_embeddings` (true when the file has no `output.weight`),
/// `attention_bias` (llama), `bos_token_id`, `eos_token_id`, `pad_token_id` when present,
/// `rope_scaling` for linear/yarn scaling, and `torch_dtype`.
pub fn hf_config_json(path: &Path) -> Result<Value, IoError> {
    let ct = read_content(path)?;
    let meta = Meta {
        path,
        map: &ct.metadata,
    };
    let has = |name: &str| ct.tensor_infos.contains_key(name);
    let arch = meta.architecture()?;
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.req_u64(&key("embedding_length"))?;
    let (n_head, n_kv) = meta.heads(arch)?;
    let vocab = match meta.u64(&key("vocab_size"))? {
        Some(v) => v,
        None => match ct.metadata.get("tokenizer.ggml.tokens") {
            Some(candle_core::quantized::gguf_file::Value::Array(a)) => a.len() as u64,
            _ => ct
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .map(|v| v as u64)
                .ok_or_else(|| {
                    super::err(
                        path,
                        format!("metadata \"{}\"", key("vocab_size")),
                        "missing, and neither tokenizer.ggml.tokens nor token_embd.weight gives it",
                    )
                })?,
        },
    };
    let (model_type, class) = match arch {
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        _ => {
            let name = meta.str("general.name")?.unwrap_or("").to_lowercase();
            if name.contains("mistral") {
                ("mistral", "MistralForCausalLM")
            } else {
                ("llama", "LlamaForCausalLM")
            }
        }
    };
    let mut cfg = Map::new();
    cfg.insert("architectures".into(), json!([class]));
    cfg.insert("model_type".into(), json!(model_type));
    cfg.insert("hidden_size".into(), json!(hidden));
    cfg.insert(
        "intermediate_size".into(),
        json!(meta.req_u64(&key("feed_forward_length"))?),
    );
    cfg.insert(
        "num_hidden_layers".into(),
        json!(meta.req_u64(&key("block_count"))?),
    );
    cfg.insert("num_attention_heads".into(), json!(n_head));
    cfg.insert("num_key_value_heads".into(), json!(n_kv));
    if let Some(kl) = meta.u64(&key("attention.key_length"))? {
        cfg.insert("head_dim".into(), json!(kl));
    }
    let eps = meta
        .f64(&key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-6);
    cfg.insert("rms_norm_eps".into(), json!(eps));
    // llama.cpp's default when the key is absent.
    let theta = meta.f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
    cfg.insert("rope_theta".into(), json!(theta));
    if let Some(ctx) = meta.u64(&key("context_length"))? {
        cfg.insert("max_position_embeddings".into(), json!(ctx));
    }
    cfg.insert("vocab_size".into(), json!(vocab));
    cfg.insert("tie_word_embeddings".into(), json!(!has("output.weight")));
    if arch == "llama" {
        cfg.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
        cfg.insert("mlp_bias".into(), json!(false));
    }
    cfg.insert("hidden_act".into(), json!("silu"));
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = meta.u64(gguf_key)? {
            cfg.insert(hf_key.into(), json!(id));
        }
    }
    if let Some(kind) = meta.str(&key("rope.scaling.type"))? {
        if kind == "linear" || kind == "yarn" {
            let mut rs = Map::new();
            rs.insert("type".into(), json!(kind));
            rs.insert("rope_type".into(), json!(kind));
            if let Some(f) = meta.f64(&key("rope.scaling.factor"))? {
                rs.insert("factor".into(), json!(f));
            }
            if let Some(n) = meta.u64(&key("rope.scaling.original_context_length"))? {
                rs.insert("original_max_position_embeddings".into(), json!(n));
            }
            cfg.insert("rope_scaling".into(), Value::Object(rs));
        }
    }
    // general.file_type: 0 = all F32, 1 = mostly F16, 32 = mostly BF16; quantized files are
    // dequantized to F32.
    let dtype = match meta.u64("general.file_type")? {
        Some(1) => "float16",
        Some(32) => "bfloat16",
        _ => "float32",
    };
    cfg.insert("torch_dtype".into(), json!(dtype));
    Ok(Value::Object(cfg))
}
