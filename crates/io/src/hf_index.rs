//! The Hugging Face sharded layout: `model.safetensors.index.json`, which maps each tensor
//! name to the shard file holding it (`{"metadata": {"total_size": N}, "weight_map": {...}}`).
//!
//! Entries are checked lexically to stay inside the checkpoint directory (no absolute paths,
//! no `..`). Symlinks are deliberately not resolved: the Hugging Face cache links snapshot
//! files to blobs elsewhere, and such checkpoints must open.

use std::path::{Component, Path};

use serde_json::{Map, Value};

use crate::error::IoError;

/// File name of the sharded-checkpoint index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Parses an index, returning `(tensor, relative file)` pairs in the index's order.
/// Every file entry is checked to be a relative path inside the checkpoint directory.
pub(crate) fn parse(index: &Path, bytes: &[u8]) -> Result<Vec<(String, String)>, IoError> {
    let bad = |reason: String| IoError::IndexMalformed {
        index: index.to_path_buf(),
        reason,
    };
    let json: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Value::Object(root) = json else {
        return Err(bad("not a JSON object".into()));
    };
    let Some(map) = root.get("weight_map") else {
        return Err(bad("missing \"weight_map\"".into()));
    };
    let Value::Object(map) = map else {
        return Err(bad("\"weight_map\" is not an object".into()));
    };
    if let Some(m) = root.get("metadata") {
        if !m.is_object() && !m.is_null() {
            return Err(bad("\"metadata\" is not an object".into()));
        }
    }
    let mut out = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let Value::String(file) = file else {
            return Err(bad(format!(
                "weight_map entry for tensor \"{tensor}\" is not a file name string"
            )));
        };
        if !is_inside(file) {
            return Err(IoError::IndexPathEscapes {
                index: index.to_path_buf(),
                tensor: tensor.clone(),
                entry: file.clone(),
            });
        }
        out.push((tensor.clone(), file.clone()));
    }
    Ok(out)
}

/// Whether `entry` is a non-empty relative path made only of normal components
/// (no root, no prefix, no `..`, no `.`-only path) and no backslashes.
pub(crate) fn is_inside(entry: &str) -> bool {
    let p = Path::new(entry);
    !entry.is_empty()
        && !entry.contains('\\')
        && p.components().count() > 0
        && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Serializes an index (pretty-printed, as Hugging Face writes it), entries in the given order.
pub(crate) fn serialize(total_size: u64, weight_map: &[(String, String)]) -> String {
    let mut meta = Map::new();
    meta.insert("total_size".into(), Value::from(total_size));
    let wm: Map<String, Value> = weight_map
        .iter()
        .map(|(t, f)| (t.clone(), Value::String(f.clone())))
        .collect();
    let mut root = Map::new();
    root.insert("metadata".into(), Value::Object(meta));
    root.insert("weight_map".into(), Value::Object(wm));
    let mut s =
        serde_json::to_string_pretty(&Value::Object(root)).expect("a JSON map always serializes");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_checks() {
        assert!(is_inside("model-00001-of-00002.safetensors"));
        assert!(is_inside("sub/x.safetensors"));
        assert!(!is_inside("../x.safetensors"));
        assert!(!is_inside("a/../../x"));
        assert!(!is_inside("/etc/passwd"));
        assert!(!is_inside(""));
        assert!(!is_inside("."));
        assert!(!is_inside("..\\x"));
    }

    #[test]
    fn parse_round_trip() {
        let wm = vec![
            ("b".to_string(), "f2".to_string()),
            ("a".to_string(), "f1".to_string()),
        ];
        let s = serialize(10, &wm);
        assert_eq!(parse(Path::new("i.json"), s.as_bytes()).unwrap(), wm);
        assert!(parse(Path::new("i.json"), b"[1]").is_err());
        assert!(parse(Path::new("i.json"), br#"{"weight_map":{"a":3}}"#).is_err());
    }
}
