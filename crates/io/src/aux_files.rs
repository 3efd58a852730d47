//! The non-tensor files of a Hugging Face model directory: config and tokenizer files copied
//! next to a merged checkpoint, and the vocabulary read from `tokenizer.json`.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::atomic::{self, temp_path};
use crate::error::IoError;

/// The files [`copy_aux_files`] copies when present.
pub const AUX_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// The tokenizer files among [`AUX_FILES`] (what `tokenizer_source` takes from its model).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Copies the config and tokenizer files ([`AUX_FILES`]) present in directory `from` into
/// directory `to` (each through a temporary name and a rename). Returns the written paths.
pub fn copy_aux_files(from: &Path, to: &Path) -> Result<Vec<PathBuf>, IoError> {
    copy_files(from, to, AUX_FILES)
}

/// Copies the files `names` present in directory `from` into directory `to`, each through a
/// temporary name and a rename. Returns the written paths.
pub fn copy_files(from: &Path, to: &Path, names: &[&str]) -> Result<Vec<PathBuf>, IoError> {
    let mut written = Vec::new();
    for name in names {
        let src = from.join(name);
        if !src.is_file() {
            continue;
        }
        let dst = to.join(name);
        let tmp = temp_path(&dst);
        let result = (|| {
            let mut r = File::open(&src).map_err(|e| IoError::io(&src, "open", e))?;
            let mut w = atomic::stage(&tmp, || File::create(&tmp))
                .map_err(|e| IoError::io(&tmp, "create", e))?;
            std::io::copy(&mut r, &mut w).map_err(|e| IoError::io(&tmp, "copy", e))?;
            w.sync_all().map_err(|e| IoError::io(&tmp, "fsync", e))?;
            drop(w);
            atomic::rename(&tmp, &dst)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        atomic::unstage(&tmp);
        result?;
        written.push(dst);
    }
    Ok(written)
}

/// Reads the token string of every id from `dir/tokenizer.json`: `model.vocab` (a
/// `{token: id}` map for BPE/WordPiece/WordLevel, or a `[[token, score], ...]` list for
/// Unigram, where the id is the position) plus `added_tokens` (`[{"id", "content"}, ...]`,
/// which win over the model vocabulary). Ids with no token are `None`. Returns `Ok(None)` when
/// there is no `tokenizer.json`.
pub fn read_vocab(dir: &Path) -> Result<Option<Vec<Option<String>>>, IoError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| IoError::io(&path, "read", e))?;
    let bad = |reason: String| IoError::Tokenizer {
        path: path.clone(),
        reason,
    };
    let json: Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let mut pairs: Vec<(usize, String)> = Vec::new();
    match json.get("model").and_then(|m| m.get("vocab")) {
        Some(Value::Object(map)) => {
            for (tok, id) in map {
                let id = id.as_u64().ok_or_else(|| {
                    bad(format!(
                        "model.vocab id of \"{tok}\" is not a non-negative integer"
                    ))
                })?;
                pairs.push((id as usize, tok.clone()));
            }
        }
        Some(Value::Array(list)) => {
            for (id, entry) in list.iter().enumerate() {
                let tok = entry
                    .get(0)
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("model.vocab entry {id} is not [token, score]")))?;
                pairs.push((id, tok.to_string()));
            }
        }
        Some(_) => return Err(bad("model.vocab is neither a map nor a list".into())),
        None => {}
    }
    if let Some(added) = json.get("added_tokens") {
        let Value::Array(list) = added else {
            return Err(bad("added_tokens is not a list".into()));
        };
        for (i, entry) in list.iter().enumerate() {
            let id = entry.get("id").and_then(Value::as_u64);
            let content = entry.get("content").and_then(Value::as_str);
            match (id, content) {
                (Some(id), Some(c)) => pairs.push((id as usize, c.to_string())),
                _ => {
                    return Err(bad(format!(
                        "added_tokens[{i}] lacks \"id\" or \"content\""
                    )))
                }
            }
        }
    }
    let len = pairs.iter().map(|(id, _)| id + 1).max().unwrap_or(0);
    if len > 1 << 26 {
        return Err(bad(format!("token id {} is implausibly large", len - 1)));
    }
    let mut vocab = vec![None; len];
    for (id, tok) in pairs {
        vocab[id] = Some(tok);
    }
    Ok(Some(vocab))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_bpe_and_added() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            r#"{"added_tokens":[{"id":4,"content":"<eos>","special":true}],
                "model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":3}}}"#,
        )
        .unwrap();
        let v = read_vocab(dir.path()).unwrap().unwrap();
        assert_eq!(
            v,
            vec![
                Some("a".into()),
                Some("b".into()),
                None,
                Some("ab".into()),
                Some("<eos>".into())
            ]
        );
    }

    #[test]
    fn vocab_unigram_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_vocab(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join("tokenizer.json"),
            r#"{"model":{"type":"Unigram","vocab":[["<unk>",0.0],["x",-1.5]]}}"#,
        )
        .unwrap();
        let v = read_vocab(dir.path()).unwrap().unwrap();
        assert_eq!(v, vec![Some("<unk>".into()), Some("x".into())]);
        std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
        let e = read_vocab(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }

    #[test]
    fn copies_present_files() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        std::fs::write(from.path().join("config.json"), "{}").unwrap();
        std::fs::write(from.path().join("merges.txt"), "a b").unwrap();
        std::fs::write(from.path().join("other.txt"), "x").unwrap();
        let w = copy_aux_files(from.path(), to.path()).unwrap();
        assert_eq!(
            w,
            vec![to.path().join("config.json"), to.path().join("merges.txt")]
        );
        assert_eq!(
            std::fs::read_to_string(to.path().join("merges.txt")).unwrap(),
            "a b"
        );
        assert!(!to.path().join("other.txt").exists());
        assert_eq!(std::fs::read_dir(to.path()).unwrap().count(), 2);
    }
}
