//! A Hugging Face `tokenizer.json` from a GGUF file's vocabulary (`tokenizer.ggml.*`).
//!
//! candle's `TokenizerFromGguf` builds the BPE model (tokens, merges, special tokens) and a
//! pre-tokenizer for the Qwen2 and Llama 3 split patterns; for the other byte-level
//! vocabularies it falls back to GPT-2's ByteLevel with a prefix space, which Hugging Face's
//! GPT-2-style tokenizers do not add. This module fixes the pre-tokenizer after the fact for
//! the llama.cpp pre-tokenizer names it knows (`tokenizer.ggml.pre`):
//!
//! - `gpt2`, `default`: ByteLevel (GPT-2 regex, no prefix space);
//! - `smollm`: Digits (each digit alone) then ByteLevel (no prefix space), as SmolLM's own
//!   `tokenizer.json` does (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_SMOLLM` splits `\p{N}` first,
//!   then the GPT-2 regex);
//! - `llama-bpe` (llama.cpp's name for Llama 3): candle's `llama3` pipeline;
//! - `qwen2`, `llama3`, `smaug-bpe`: candle's own pipelines.
//!
//! Other names are read with candle's fallback and a warning. SentencePiece vocabularies
//! (`tokenizer.ggml.model = llama`) are not supported by candle and are refused.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

use super::{err, read_content};
use crate::error::IoError;

/// The `tokenizer.json` content (compact JSON) for GGUF file `path`, built from its
/// `tokenizer.ggml.*` metadata. Errors name the file: no vocabulary, a SentencePiece
/// vocabulary, malformed tokens or merges.
pub fn tokenizer_json(path: &Path) -> Result<String, IoError> {
    let ct = read_content(path)?;
    let tok = build(path, &ct)?;
    tok.to_string(false)
        .map_err(|e| err(path, "tokenizer", format!("cannot serialize: {e}")))
}

/// The token string of every id of GGUF file `path` (`tokenizer.ggml.tokens`, the ids
/// being positions), as [`read_vocab`](crate::read_vocab) gives them from a `tokenizer.json`;
/// `Ok(None)` when the file holds no vocabulary.
pub fn vocab(path: &Path) -> Result<Option<Vec<Option<String>>>, IoError> {
    let ct = read_content(path)?;
    let key = "tokenizer.ggml.tokens";
    let Some(v) = ct.metadata.get(key) else {
        return Ok(None);
    };
    let bad = || {
        err(
            path,
            format!("metadata \"{key}\""),
            "expected an array of strings",
        )
    };
    let Value::Array(list) = v else {
        return Err(bad());
    };
    list.iter()
        .map(|t| match t {
            Value::String(s) => Ok(Some(s.clone())),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A Hugging Face `tokenizer_config.json` for GGUF file `path`: `tokenizer_class`
/// (`PreTrainedTokenizerFast`), the `bos_token`, `eos_token`, `pad_token` and `unk_token`
/// strings of the ids `tokenizer.ggml.{bos,eos,padding,unknown}_token_id` name,
/// `add_bos_token` / `add_eos_token` when given, and `chat_template`
/// (`tokenizer.chat_template`) when present. `Ok(None)` when the file holds no vocabulary.
pub fn tokenizer_config_json(path: &Path) -> Result<Option<serde_json::Value>, IoError> {
    let Some(tokens) = vocab(path)? else {
        return Ok(None);
    };
    let ct = read_content(path)?;
    let meta = super::Meta {
        path,
        map: &ct.metadata,
    };
    let mut cfg = serde_json::Map::new();
    cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    for (key, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
    ] {
        let tok = meta
            .u64(key)?
            .and_then(|id| usize::try_from(id).ok())
            .and_then(|id| tokens.get(id).cloned().flatten());
        if let Some(tok) = tok {
            cfg.insert(hf.into(), tok.into());
        }
    }
    for (key, hf) in [
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ] {
        if let Some(Value::Bool(b)) = ct.metadata.get(key) {
            cfg.insert(hf.into(), (*b).into());
        }
    }
    if let Some(t) = meta.str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), t.into());
    }
    Ok(Some(serde_json::Value::Object(cfg)))
}

fn build(path: &Path, ct: &Content) -> Result<Tokenizer, IoError> {
    let model = match ct.metadata.get("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.to_lowercase(),
        _ => {
            return Err(err(
                path,
                "metadata \"tokenizer.ggml.model\"",
                "missing: the file holds no tokenizer",
            ))
        }
    };
    if model != "gpt2" {
        return Err(err(
            path,
            "metadata \"tokenizer.ggml.model\"",
            format!(
                "tokenizer type \"{model}\" is not supported (only byte-level BPE, \"gpt2\"); \
                 give the model's tokenizer.json from its Hugging Face repository instead"
            ),
        ));
    }
    let mut tok = Tokenizer::from_gguf(ct).map_err(|e| err(path, "tokenizer", e.to_string()))?;
    let pre = match ct.metadata.get("tokenizer.ggml.pre") {
        Some(Value::String(s)) => s.as_str(),
        _ => "default",
    };
    match pre {
        "gpt2" | "default" => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        "smollm" => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        "llama-bpe" => {
            // candle knows this pipeline as "llama3": rebuild with that name.
            let mut renamed = Content {
                magic: ct.magic,
                metadata: ct.metadata.clone(),
                tensor_infos: Default::default(),
                tensor_data_offset: ct.tensor_data_offset,
            };
            renamed
                .metadata
                .insert("tokenizer.ggml.pre".into(), Value::String("llama3".into()));
            tok = Tokenizer::from_gguf(&renamed)
                .map_err(|e| err(path, "tokenizer", e.to_string()))?;
        }
        "qwen2" | "llama3" | "smaug-bpe" => {}
        other => tracing::warn!(
            file = %path.display(),
            pre = other,
            "GGUF pre-tokenizer type is not known to amalgam; using a GPT-2 ByteLevel \
             pre-tokenizer, which may split text differently from the original tokenizer"
        ),
    }
    Ok(tok)
}
