//! The tokenizer a model is evaluated with: a Hugging Face `tokenizer.json` (or the JSON built
//! from GGUF metadata) through the tokenizers crate, plus the special-token ids scoring needs.
//!
//! Special ids come from the model's `config.json` (`bos_token_id`, `eos_token_id`,
//! `pad_token_id`) and, where it has none, from `tokenizer_config.json`'s `bos_token` /
//! `eos_token` / `pad_token` strings looked up in the vocabulary. The pad id falls back to the
//! EOS id, then to 0: padded positions are masked, so its value never changes a score.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{EvalError, Result};

/// A loaded tokenizer with its special-token ids.
#[derive(Clone)]
pub struct Tok {
    inner: tokenizers::Tokenizer,
    origin: PathBuf,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    adds_bos: bool,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("origin", &self.origin)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("adds_bos", &self.adds_bos)
            .finish()
    }
}

impl Tok {
    /// Loads `tokenizer.json` at `path`; a missing or unreadable file is an
    /// [`EvalError::Tokenizer`] naming it.
    pub fn from_file(path: &Path) -> Result<Tok> {
        if !path.is_file() {
            return Err(EvalError::Tokenizer {
                path: path.to_path_buf(),
                msg: "no tokenizer.json: the model directory must hold the tokenizer it was trained with".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Tok::from_json(&text, path)
    }

    /// Parses a tokenizer from its JSON text; `origin` names where it came from in errors.
    pub fn from_json(json: &str, origin: &Path) -> Result<Tok> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| EvalError::Tokenizer {
            path: origin.to_path_buf(),
            msg: format!("does not load: {e}"),
        })?;
        let mut tok = Tok {
            inner,
            origin: origin.to_path_buf(),
            bos: None,
            eos: None,
            pad: None,
            adds_bos: false,
        };
        tok.refresh_adds_bos()?;
        Ok(tok)
    }

    /// Sets the special-token ids (each `None` leaves the current value).
    pub fn with_special_ids(
        mut self,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
    ) -> Result<Tok> {
        self.bos = bos.or(self.bos);
        self.eos = eos.or(self.eos);
        self.pad = pad.or(self.pad);
        self.refresh_adds_bos()?;
        Ok(self)
    }

    /// Fills special ids still unknown from a `tokenizer_config.json` (token strings looked up
    /// in the vocabulary). A missing file changes nothing; a malformed one is an error.
    pub fn with_tokenizer_config(self, path: &Path) -> Result<Tok> {
        if !path.is_file() {
            return Ok(self);
        }
        let bad = |msg: String| EvalError::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("does not parse: {e}")))?;
        let id_of = |key: &str| -> Option<u32> {
            let s = match v.get(key)? {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            self.inner.token_to_id(s)
        };
        let (bos, eos, pad) = (id_of("bos_token"), id_of("eos_token"), id_of("pad_token"));
        self.with_special_ids(bos, eos, pad)
    }

    fn refresh_adds_bos(&mut self) -> Result<()> {
        let empty = self.encode("", true)?;
        self.adds_bos = match (self.bos, empty.first()) {
            (Some(b), Some(&first)) => first == b,
            _ => false,
        };
        Ok(())
    }

    /// Token ids of `text`, with the post-processor's special tokens (e.g. BOS) when
    /// `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| EvalError::Tokenizer {
                path: self.origin.clone(),
                msg: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The BOS id, when known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS id, when known.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The id padded positions get: the pad token, else EOS, else 0 (padding is masked).
    pub fn pad_id(&self) -> u32 {
        self.pad.or(self.eos).unwrap_or(0)
    }

    /// Whether encoding with special tokens starts with the BOS id (Llama-style tokenizers).
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying tokenizers-crate tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_lm/llama")
    }

    #[test]
    fn missing_file_is_named() {
        let e = Tok::from_file(Path::new("/nonexistent/tokenizer.json")).expect_err("missing");
        assert!(matches!(e, EvalError::Tokenizer { .. }));
        assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
    }

    #[test]
    fn fixture_specials() {
        let dir = fixture();
        let tok = Tok::from_file(&dir.join("tokenizer.json"))
            .expect("loads")
            .with_tokenizer_config(&dir.join("tokenizer_config.json"))
            .expect("config");
        assert_eq!(tok.bos_id(), Some(0));
        assert_eq!(tok.eos_id(), Some(1));
        assert_eq!(tok.pad_id(), 1);
        assert!(tok.adds_bos());
        assert_eq!(tok.encode("", true).expect("enc"), vec![0]);
        assert_eq!(tok.encode("x", false).expect("enc"), vec![89]);
    }
}
