//! GGUF input: llama.cpp checkpoints read as Hugging Face ones.
//!
//! A `.gguf` file (llama.cpp's format: metadata key/values, tensor infos, then aligned tensor
//! data, possibly block-quantized) is read with candle's reader
//! (`candle_core::quantized::gguf_file`) and presented as a Hugging Face Llama-family
//! checkpoint:
//!
//! - **Tensors** ([`Checkpoint::open`](crate::Checkpoint::open) on a GGUF file): every tensor
//!   is dequantized (quantized types → F32; F32, F16 and BF16 tensors keep their dtype),
//!   renamed to its Hugging Face name ([`names`]), and, for architecture `llama`, the rows of
//!   `q_proj`/`k_proj` are put back in Hugging Face's order (llama.cpp's converter permutes
//!   them for its RoPE layout; [`names::unpermute_rows`]). The result is laid out as an
//!   in-memory safetensors file (an anonymous `memfd` on Linux), which the ordinary
//!   safetensors reader then maps and validates, so every reader (merge engine, evaluation
//!   loader through `read_f32`) works unchanged. **Memory cost**: the whole dequantized model
//!   lives in memory for as long as the checkpoint is open (4 bytes per parameter of a
//!   quantized tensor: about 0.55 GB for a 135M model, 28 GB for 7B), plus one tensor per
//!   worker thread while it is built.
//! - **Config** ([`hf_config_json`]): a `config.json` equivalent from the GGUF metadata.
//! - **Tokenizer** ([`tokenizer_json`]): a `tokenizer.json` built from the GGUF vocabulary
//!   with candle's `TokenizerFromGguf` (BPE vocabularies, `tokenizer.ggml.model = gpt2`).
//!
//! Supported tensor encodings: every type candle's GGUF reader knows: F32, F16, BF16, Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K. Other types (the IQ*
//! family, TQ*, integer tensors) are refused when the file is opened.
//! Supported architectures: `llama` (also Mistral, which llama.cpp stores as `llama`) and
//! `qwen2`.

pub mod config;
mod image;
pub mod names;
mod scan;
mod tokenizer;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::IoError;
use crate::Checkpoint;

pub use config::hf_config_json;
pub(crate) use image::safetensors_image;
pub use tokenizer::{tokenizer_config_json, tokenizer_json, vocab};

/// The GGUF magic: the file's first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// `__metadata__` key of the in-memory safetensors image naming the GGUF file it came from
/// (see [`gguf_source`]).
pub const SOURCE_KEY: &str = "amalgam.gguf_source";

/// Whether `path` is to be read as a GGUF file: its name ends in `.gguf` (any case; a file
/// with a wrong magic is then reported as a bad GGUF file) or its first four bytes are `GGUF`.
pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).is_ok() && &magic == MAGIC
}

/// The GGUF file a checkpoint was read from, when [`Checkpoint::open`] was given one; `None`
/// for safetensors checkpoints.
pub fn gguf_source(ckpt: &Checkpoint) -> Option<&Path> {
    match ckpt.files() {
        [f] if f.metadata.contains_key(SOURCE_KEY) => Some(&f.path),
        _ => None,
    }
}

/// Writes `config.json` and/or `tokenizer.json` with `tokenizer_config.json` (special tokens
/// and chat template) synthesized from GGUF file `gguf` into
/// directory `out_dir` (each through a temporary name and a rename). Returns the written
/// paths. A tokenizer that cannot be built (no vocabulary in the file, a SentencePiece one)
/// is skipped with a warning rather than failing: the tensors are the merge's product.
pub fn write_aux_files(
    gguf: &Path,
    out_dir: &Path,
    config: bool,
    tokenizer: bool,
) -> Result<Vec<PathBuf>, IoError> {
    let mut written = Vec::new();
    if config {
        let cfg = hf_config_json(gguf)?;
        let mut text = serde_json::to_string_pretty(&cfg).expect("a JSON value always serializes");
        text.push('\n');
        let dst = out_dir.join("config.json");
        crate::write_text_atomic(&dst, &text)?;
        written.push(dst);
    }
    if tokenizer {
        match tokenizer_json(gguf) {
            Ok(text) => {
                let dst = out_dir.join("tokenizer.json");
                crate::write_text_atomic(&dst, &text)?;
                written.push(dst);
                if let Some(cfg) = tokenizer_config_json(gguf)? {
                    let mut text =
                        serde_json::to_string_pretty(&cfg).expect("a JSON value always serializes");
                    text.push('\n');
                    let dst = out_dir.join("tokenizer_config.json");
                    crate::write_text_atomic(&dst, &text)?;
                    written.push(dst);
                }
            }
            Err(e) => tracing::warn!("no tokenizer.json written: {e}"),
        }
    }
    Ok(written)
}

/// An error about GGUF file `file`; `item` says what it concerns (`header`,
/// `tensor "blk.0.attn_q.weight"`, `metadata "llama.block_count"`).
pub(crate) fn err(file: &Path, item: impl Into<String>, reason: impl Into<String>) -> IoError {
    IoError::Gguf {
        file: file.to_path_buf(),
        item: item.into(),
        reason: reason.into(),
    }
}

/// Reads a GGUF file's header (metadata and tensor infos) with candle's reader.
pub(crate) fn read_content(path: &Path) -> Result<Content, IoError> {
    let f = std::fs::File::open(path).map_err(|e| IoError::io(path, "open", e))?;
    let mut r = std::io::BufReader::new(f);
    Content::read(&mut r).map_err(|e| {
        let reason = e.to_string();
        if reason.contains("unknown dtype") {
            if let Some((tensor, ty)) = scan::first_unsupported_tensor(path) {
                return err(
                    path,
                    format!("tensor \"{tensor}\""),
                    format!(
                        "encoding {} (ggml type {ty}) is not supported; supported: {}; \
                         requantize the model with llama.cpp's llama-quantize to one of these",
                        scan::ggml_type_name(ty),
                        SUPPORTED_TYPES
                    ),
                );
            }
        }
        let hint = if reason.contains("magic") {
            "; this is not a GGUF file (a GGUF file starts with the bytes \"GGUF\")"
        } else {
            ""
        };
        err(path, "header", format!("{reason}{hint}"))
    })
}

/// Metadata accessors over a GGUF header, with errors naming the file and key.
pub(crate) struct Meta<'a> {
    pub path: &'a Path,
    pub map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    /// An integer value (any GGUF integer type), `None` when absent.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, IoError> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            err(
                self.path,
                format!("metadata \"{key}\""),
                format!("expected a non-negative integer, found {v:?}"),
            )
        })
    }

    /// A required integer value.
    pub fn req_u64(&self, key: &str) -> Result<u64, IoError> {
        self.u64(key)?
            .ok_or_else(|| err(self.path, format!("metadata \"{key}\""), "missing"))
    }

    /// A float value (F32 values are given by their shortest decimal form, so `1e-5` stored
    /// as f32 reads as `1e-5`, not `9.99999974e-6`), `None` when absent.
    pub fn f64(&self, key: &str) -> Result<Option<f64>, IoError> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        match v {
            Value::F32(x) => Ok(Some(x.to_string().parse::<f64>().unwrap_or(*x as f64))),
            Value::F64(x) => Ok(Some(*x)),
            _ => match self.u64(key)? {
                Some(n) => Ok(Some(n as f64)),
                None => Ok(None),
            },
        }
    }

    /// A string value, `None` when absent.
    pub fn str(&self, key: &str) -> Result<Option<&str>, IoError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(err(
                self.path,
                format!("metadata \"{key}\""),
                format!("expected a string, found a {:?}", v.value_type()),
            )),
        }
    }

    /// `general.architecture`, checked to be one this module reads.
    pub fn architecture(&self) -> Result<&str, IoError> {
        let key = "general.architecture";
        let arch = self
            .str(key)?
            .ok_or_else(|| err(self.path, format!("metadata \"{key}\""), "missing"))?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(err(
                self.path,
                format!("metadata \"{key}\""),
                format!(
                    "architecture \"{arch}\" is not supported; GGUF input reads {} (Mistral \
                     models are stored as llama)",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ));
        }
        Ok(arch)
    }

    /// `(n_head, n_head_kv)` of architecture `arch`.
    pub fn heads(&self, arch: &str) -> Result<(usize, usize), IoError> {
        let n_head = self.req_u64(&format!("{arch}.attention.head_count"))? as usize;
        let n_kv = self
            .u64(&format!("{arch}.attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        Ok((n_head, n_kv))
    }
}

/// The tensor encodings GGUF input reads (those of candle's GGUF reader).
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// The GGUF architectures (`general.architecture`) this module reads.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

#[cfg(test)]
mod tests;
