//! Parsing, validation and serialization of one safetensors file's header.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON (an
//! object mapping tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` plus an
//! optional `"__metadata__"` string map), then the data section; offsets are relative to the
//! data section. [`parse`] checks everything a reader relies on, so that later reads can index
//! the file without further checks.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::IoError;
use crate::TensorMeta;

/// Length of the header length prefix.
pub(crate) const PREFIX_LEN: usize = 8;

/// A validated header.
#[derive(Debug)]
pub(crate) struct ParsedHeader {
    /// Byte range of the header JSON in the file (after the length prefix).
    pub header: std::ops::Range<usize>,
    /// `__metadata__` entries (non-string values are kept as their JSON text).
    pub metadata: BTreeMap<String, String>,
    /// The tensors, in data-offset order, with absolute byte ranges.
    pub tensors: Vec<TensorMeta>,
}

fn malformed(file: &Path, tensor: &str, reason: impl Into<String>) -> IoError {
    IoError::MalformedTensor {
        file: file.to_path_buf(),
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

/// Parses and validates the header of `file`, whose whole content is `bytes`.
pub(crate) fn parse(file: &Path, bytes: &[u8]) -> Result<ParsedHeader, IoError> {
    let file_len = bytes.len() as u64;
    let prefix: [u8; PREFIX_LEN] = match bytes.get(..PREFIX_LEN) {
        Some(p) => p.try_into().expect("slice of PREFIX_LEN bytes"),
        None => {
            return Err(IoError::FileTooShort {
                file: file.to_path_buf(),
                len: file_len,
            })
        }
    };
    let header_len = u64::from_le_bytes(prefix);
    if header_len > file_len - PREFIX_LEN as u64 {
        return Err(IoError::HeaderTooLarge {
            file: file.to_path_buf(),
            header_len,
            file_len,
        });
    }
    let header = PREFIX_LEN..PREFIX_LEN + header_len as usize;
    let json: Value =
        serde_json::from_slice(&bytes[header.clone()]).map_err(|e| IoError::HeaderNotJson {
            file: file.to_path_buf(),
            reason: e.to_string(),
        })?;
    let Value::Object(map) = json else {
        return Err(IoError::HeaderNotJson {
            file: file.to_path_buf(),
            reason: "the header is JSON but not an object".to_string(),
        });
    };
    let data_start = header.end;
    let data_len = (bytes.len() - data_start) as u64;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(map.len());
    for (name, entry) in &map {
        if name == "__metadata__" {
            let Value::Object(m) = entry else {
                return Err(malformed(
                    file,
                    name,
                    "__metadata__ must be an object of strings",
                ));
            };
            for (k, v) in m {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                metadata.insert(k.clone(), v);
            }
            continue;
        }
        let (dtype, shape, begin, end) = parse_entry(file, name, entry)?;
        if begin > end || end > data_len {
            return Err(IoError::OffsetsOutOfFile {
                file: file.to_path_buf(),
                tensor: name.clone(),
                begin,
                end,
                data_len,
            });
        }
        let actual = end - begin;
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| malformed(file, name, format!("shape {shape:?} overflows")))?;
        if dtype.bits().is_some() {
            let expected = dtype.byte_len(numel).map(|x| x as u64);
            if expected != Some(actual) {
                return Err(IoError::SizeMismatch {
                    file: file.to_path_buf(),
                    tensor: name.clone(),
                    dtype: dtype.as_str().to_string(),
                    shape,
                    expected: expected.unwrap_or(u64::MAX),
                    actual,
                });
            }
        } else {
            tracing::debug!(file = %file.display(), tensor = %name, dtype = %dtype, "unknown dtype: size not checked");
        }
        tensors.push(TensorMeta {
            name: name.clone(),
            dtype,
            shape,
            file: file.to_path_buf(),
            data_range: data_start + begin as usize..data_start + end as usize,
        });
    }

    tensors.sort_by(|a, b| {
        (a.data_range.start, a.data_range.end, &a.name).cmp(&(
            b.data_range.start,
            b.data_range.end,
            &b.name,
        ))
    });
    // Overlap check: in start order, every non-empty range must begin at or after the
    // furthest end seen so far.
    let mut furthest: Option<(usize, &str)> = None;
    for t in &tensors {
        if t.data_range.is_empty() {
            continue;
        }
        if let Some((end, other)) = furthest {
            if t.data_range.start < end {
                return Err(IoError::OverlappingTensors {
                    file: file.to_path_buf(),
                    tensor: t.name.clone(),
                    other: other.to_string(),
                });
            }
        }
        if furthest.is_none_or(|(end, _)| t.data_range.end > end) {
            furthest = Some((t.data_range.end, &t.name));
        }
    }

    Ok(ParsedHeader {
        header,
        metadata,
        tensors,
    })
}

fn parse_entry(
    file: &Path,
    name: &str,
    entry: &Value,
) -> Result<(DType, Vec<usize>, u64, u64), IoError> {
    let Value::Object(e) = entry else {
        return Err(malformed(file, name, "entry is not an object"));
    };
    let dtype = match e.get("dtype") {
        Some(Value::String(s)) => DType::parse(s),
        Some(_) => return Err(malformed(file, name, "\"dtype\" is not a string")),
        None => return Err(malformed(file, name, "missing \"dtype\"")),
    };
    let shape = match e.get("shape") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| malformed(file, name, "\"shape\" must hold non-negative integers"))?,
        Some(_) => return Err(malformed(file, name, "\"shape\" is not an array")),
        None => return Err(malformed(file, name, "missing \"shape\"")),
    };
    let (begin, end) = match e.get("data_offsets") {
        Some(Value::Array(a)) => match (
            a.len(),
            a.first().and_then(Value::as_u64),
            a.get(1).and_then(Value::as_u64),
        ) {
            (2, Some(b), Some(e)) => (b, e),
            _ => {
                return Err(malformed(
                    file,
                    name,
                    "\"data_offsets\" must be [begin, end] with non-negative integers",
                ))
            }
        },
        Some(_) => return Err(malformed(file, name, "\"data_offsets\" is not an array")),
        None => return Err(malformed(file, name, "missing \"data_offsets\"")),
    };
    Ok((dtype, shape, begin, end))
}

/// One tensor entry of a header to serialize: name, dtype, shape, data offsets (relative).
pub(crate) struct HeaderEntry<'a> {
    pub name: &'a str,
    pub dtype: &'a DType,
    pub shape: &'a [usize],
    pub offsets: (u64, u64),
}

/// Serializes a header: `__metadata__` first, then the entries in the given order, compact
/// JSON padded with spaces to a multiple of 8 bytes (as the `safetensors` crate does). The
/// result excludes the 8-byte length prefix. Deterministic: same entries, same bytes.
pub(crate) fn serialize(metadata: &[(&str, &str)], entries: &[HeaderEntry<'_>]) -> Vec<u8> {
    let mut map = Map::new();
    let meta: Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    map.insert("__metadata__".to_string(), Value::Object(meta));
    for e in entries {
        let mut t = Map::new();
        t.insert("dtype".into(), Value::String(e.dtype.as_str().to_string()));
        t.insert(
            "shape".into(),
            Value::Array(e.shape.iter().map(|&d| Value::from(d as u64)).collect()),
        );
        t.insert(
            "data_offsets".into(),
            Value::Array(vec![Value::from(e.offsets.0), Value::from(e.offsets.1)]),
        );
        map.insert(e.name.to_string(), Value::Object(t));
    }
    let mut bytes = serde_json::to_vec(&Value::Object(map)).expect("a JSON map always serializes");
    let padded = bytes.len().next_multiple_of(PREFIX_LEN);
    bytes.resize(padded, b' ');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data_len, 0);
        v
    }

    #[test]
    fn parses_and_sorts_by_offset() {
        let h = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BF16","shape":[],"data_offsets":[8,10]},"__metadata__":{"format":"pt"}}"#;
        let bytes = file_with(h, 10);
        let p = parse(Path::new("x.safetensors"), &bytes).unwrap();
        assert_eq!(p.tensors[0].name, "b");
        assert_eq!(p.tensors[1].name, "a");
        assert_eq!(p.tensors[1].data_range, 8 + h.len() + 8..8 + h.len() + 10);
        assert_eq!(p.metadata["format"], "pt");
    }

    #[test]
    fn zero_sized_tensors_do_not_overlap() {
        let h = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let bytes = file_with(h, 8);
        assert!(parse(Path::new("x"), &bytes).is_ok());
    }

    #[test]
    fn unknown_dtype_is_kept() {
        let h = r#"{"a":{"dtype":"Q4_WEIRD","shape":[3],"data_offsets":[0,7]}}"#;
        let p = parse(Path::new("x"), &file_with(h, 7)).unwrap();
        assert_eq!(p.tensors[0].dtype, DType::Other("Q4_WEIRD".into()));
    }

    #[test]
    fn serialize_is_padded_and_ordered() {
        let dt = DType::F16;
        let s = serialize(
            &[("format", "pt")],
            &[
                HeaderEntry {
                    name: "z",
                    dtype: &dt,
                    shape: &[3],
                    offsets: (0, 6),
                },
                HeaderEntry {
                    name: "a",
                    dtype: &dt,
                    shape: &[1],
                    offsets: (6, 8),
                },
            ],
        );
        assert_eq!(s.len() % 8, 0);
        let text = std::str::from_utf8(&s).unwrap();
        assert!(text.starts_with(r#"{"__metadata__":{"format":"pt"},"z":"#));
        assert!(text.find("\"z\"").unwrap() < text.find("\"a\"").unwrap());
    }
}
