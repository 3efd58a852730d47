//! `Checkpoint::open` on crafted bad inputs: every validation error is raised, and its
//! message names the file and the tensor (or index entry).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::path::Path;

use amalgam_io::{Checkpoint, IoError, INDEX_FILE};
use support::*;

fn open_err(path: &Path) -> (IoError, String) {
    let e = Checkpoint::open(path).unwrap_err();
    let msg = e.to_string();
    (e, msg)
}

fn single(header: &str, data_len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    write_raw_st(&p, header, &vec![0u8; data_len]);
    (dir, p)
}

#[test]
fn missing_file_and_directory_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (e, msg) = open_err(&dir.path().join("nope.safetensors"));
    assert!(matches!(e, IoError::FileMissing { .. }), "{msg}");
    assert!(msg.contains("nope.safetensors"), "{msg}");

    std::fs::write(dir.path().join("consolidated.safetensors"), b"x").unwrap();
    let (e, msg) = open_err(dir.path());
    assert!(matches!(e, IoError::NoCheckpoint { .. }), "{msg}");
    assert!(
        msg.contains("consolidated.safetensors") && msg.contains("model.safetensors.index.json"),
        "{msg}"
    );
}

#[test]
fn truncated_prefix_and_header_length_beyond_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, [1, 2, 3]).unwrap();
    let (e, msg) = open_err(&p);
    assert!(matches!(e, IoError::FileTooShort { len: 3, .. }), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");

    let mut v = 1000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    std::fs::write(&p, v).unwrap();
    let (e, msg) = open_err(&p);
    assert!(
        matches!(
            e,
            IoError::HeaderTooLarge {
                header_len: 1000,
                file_len: 10,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("model.safetensors") && msg.contains("1000"),
        "{msg}"
    );
}

#[test]
fn header_not_json_or_not_object() {
    let (_d, p) = single("{\"a\": ", 0);
    let (e, msg) = open_err(&p);
    assert!(matches!(e, IoError::HeaderNotJson { .. }), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    let (_d, p) = single("[1,2]", 0);
    let (e, msg) = open_err(&p);
    assert!(
        matches!(e, IoError::HeaderNotJson { .. }) && msg.contains("not an object"),
        "{msg}"
    );
}

#[test]
fn malformed_tensor_entries() {
    for (entry, what) in [
        (r#""w":3"#, "not an object"),
        (r#""w":{"shape":[1],"data_offsets":[0,4]}"#, "dtype"),
        (r#""w":{"dtype":"F32","data_offsets":[0,4]}"#, "shape"),
        (
            r#""w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}"#,
            "shape",
        ),
        (r#""w":{"dtype":"F32","shape":[1]}"#, "data_offsets"),
        (
            r#""w":{"dtype":"F32","shape":[1],"data_offsets":[0]}"#,
            "data_offsets",
        ),
        (
            r#""w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}"#,
            "dtype",
        ),
        (r#""__metadata__":[1]"#, "__metadata__"),
    ] {
        let (_d, p) = single(&format!("{{{entry}}}"), 4);
        let (e, msg) = open_err(&p);
        assert!(
            matches!(e, IoError::MalformedTensor { .. }),
            "{entry}: {msg}"
        );
        assert!(
            msg.contains("model.safetensors") && msg.contains(what),
            "{entry}: {msg}"
        );
        if !entry.contains("__metadata__") {
            assert!(msg.contains("\"w\""), "{msg}");
        }
    }
}

#[test]
fn offsets_out_of_file() {
    let (_d, p) = single(
        r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        12,
    );
    let (e, msg) = open_err(&p);
    assert!(
        matches!(
            e,
            IoError::OffsetsOutOfFile {
                end: 16,
                data_len: 12,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("model.safetensors") && msg.contains("\"w\""),
        "{msg}"
    );
    // begin > end
    let (_d, p) = single(
        r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#,
        12,
    );
    let (e, msg) = open_err(&p);
    assert!(matches!(e, IoError::OffsetsOutOfFile { .. }), "{msg}");
}

#[test]
fn overlapping_tensors() {
    let (_d, p) = single(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        12,
    );
    let (e, msg) = open_err(&p);
    assert!(matches!(e, IoError::OverlappingTensors { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("\"a\"") && msg.contains("\"b\""),
        "{msg}"
    );
    // a tensor nested inside a bigger one
    let (_d, p) = single(
        r#"{"big":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"c":{"dtype":"U8","shape":[1],"data_offsets":[15,16]},"d":{"dtype":"U8","shape":[1],"data_offsets":[8,9]}}"#,
        16,
    );
    let (e, msg) = open_err(&p);
    assert!(
        matches!(e, IoError::OverlappingTensors { .. }) && msg.contains("\"big\""),
        "{msg}"
    );
}

#[test]
fn byte_size_must_match_dtype_and_shape() {
    let (_d, p) = single(
        r#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}}"#,
        10,
    );
    let (e, msg) = open_err(&p);
    assert!(
        matches!(
            e,
            IoError::SizeMismatch {
                expected: 12,
                actual: 10,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("model.safetensors") && msg.contains("\"w\"") && msg.contains("BF16"),
        "{msg}"
    );
}

#[test]
fn unknown_dtype_is_kept_until_converted() {
    let (_d, p) = single(
        r#"{"q":{"dtype":"Q4_K","shape":[32],"data_offsets":[0,18]}}"#,
        18,
    );
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.get("q").unwrap().dtype.as_str(), "Q4_K");
    assert_eq!(ck.raw("q").unwrap().len(), 18);
    ck.check_finite("q").unwrap();
    let e = ck.read_f32("q", 0..1, &mut [0.0]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, IoError::UnsupportedDtype { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("\"q\"") && msg.contains("Q4_K"),
        "{msg}"
    );
}

#[test]
fn non_finite_values_are_found_with_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let mut big = vec![0.5f32; 3 << 20];
    big[(2 << 20) + 5] = f32::INFINITY;
    big[(2 << 20) + 9] = f32::NAN;
    let mut bf = vec![0u8; 8];
    bf[4..6].copy_from_slice(&0x7fc0u16.to_le_bytes()); // bf16 NaN at element 2
    write_st(
        &p,
        &[
            ("big", "F32", vec![3 << 20], f32_bytes(&big)),
            ("bf", "BF16", vec![4], bf),
            ("ok", "F32", vec![2], f32_bytes(&[1.0, 2.0])),
        ],
    );
    let ck = Checkpoint::open(&p).unwrap();
    ck.check_finite("ok").unwrap();
    let e = ck.check_finite("big").unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, IoError::NonFinite { index, .. } if index == (2 << 20) + 5),
        "{msg}"
    );
    assert!(
        msg.contains("model.safetensors") && msg.contains("\"big\"") && msg.contains("inf"),
        "{msg}"
    );
    let e = ck.check_finite("bf").unwrap_err();
    assert!(
        matches!(e, IoError::NonFinite { index: 2, ref value, .. } if value == "NaN"),
        "{e}"
    );
}

/// A valid two-shard HF checkpoint: shard 1 holds a, b; shard 2 holds c.
fn hf_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_st(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[
            ("a", "F32", vec![2], f32_bytes(&[1.0, 2.0])),
            ("b", "F16", vec![1], vec![0, 0x3c]),
        ],
    );
    write_st(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[("c", "BF16", vec![2, 1], vec![0x80, 0x3f, 0x00, 0x40])],
    );
    write_index(
        dir.path(),
        r#"{"metadata":{"total_size":14},"weight_map":{"c":"model-00002-of-00002.safetensors","a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors"}}"#,
    );
    dir
}

fn write_index(dir: &Path, text: &str) {
    std::fs::write(dir.join(INDEX_FILE), text).unwrap();
}

#[test]
fn hf_sharded_directory_opens() {
    let dir = hf_dir();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.root(), dir.path());
    assert_eq!(ck.index_path(), Some(dir.path().join(INDEX_FILE).as_path()));
    let names: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, vec!["a", "b", "c"]);
    assert_eq!(
        ck.get("c").unwrap().file,
        dir.path().join("model-00002-of-00002.safetensors")
    );
    let mut out = [0f32; 2];
    ck.read_f32("c", 0..2, &mut out).unwrap();
    assert_eq!(out, [1.0, 2.0]);
    ck.read_f32("b", 0..1, &mut out[..1]).unwrap();
    assert_eq!(out[0], 1.0);
    assert_eq!(ck.header_sha256().len(), 64);
    // a single shard file opens on its own too, with its parent as root
    let one = Checkpoint::open(&dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!(one.root(), dir.path());
    assert_eq!(one.tensors().len(), 1);
}

#[test]
fn index_malformed() {
    for text in [
        "{",
        "[]",
        r#"{"metadata":{}}"#,
        r#"{"weight_map":[]}"#,
        r#"{"weight_map":{"a":1}}"#,
    ] {
        let dir = hf_dir();
        write_index(dir.path(), text);
        let (e, msg) = open_err(dir.path());
        assert!(matches!(e, IoError::IndexMalformed { .. }), "{text}: {msg}");
        assert!(msg.contains(INDEX_FILE), "{msg}");
    }
}

#[test]
fn index_entries_outside_the_directory() {
    for entry in [
        "../model.safetensors",
        "/etc/passwd",
        "sub/../../x.safetensors",
    ] {
        let dir = hf_dir();
        write_index(
            dir.path(),
            &format!(r#"{{"weight_map":{{"a":"{entry}"}}}}"#),
        );
        let (e, msg) = open_err(dir.path());
        assert!(
            matches!(e, IoError::IndexPathEscapes { .. }),
            "{entry}: {msg}"
        );
        assert!(
            msg.contains(INDEX_FILE) && msg.contains("\"a\"") && msg.contains(entry),
            "{msg}"
        );
    }
}

#[test]
fn index_entry_to_a_missing_file() {
    let dir = hf_dir();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let (e, msg) = open_err(dir.path());
    assert!(matches!(e, IoError::IndexFileMissing { .. }), "{msg}");
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("\"c\""),
        "{msg}"
    );
}

#[test]
fn index_tensor_missing_from_its_file() {
    let dir = hf_dir();
    write_index(
        dir.path(),
        r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#,
    );
    let (e, msg) = open_err(dir.path());
    assert!(matches!(e, IoError::IndexTensorMissing { .. }), "{msg}");
    assert!(
        msg.contains("model-00001-of-00002.safetensors")
            && msg.contains("\"c\"")
            && msg.contains(INDEX_FILE),
        "{msg}"
    );
}

#[test]
fn duplicate_tensor_across_shards() {
    let dir = hf_dir();
    write_st(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[
            ("c", "BF16", vec![2, 1], vec![0; 4]),
            ("a", "F32", vec![1], vec![0; 4]),
        ],
    );
    let (e, msg) = open_err(dir.path());
    assert!(matches!(e, IoError::DuplicateTensor { .. }), "{msg}");
    assert!(
        msg.contains("\"a\"")
            && msg.contains("model-00001-of-00002.safetensors")
            && msg.contains("model-00002-of-00002.safetensors"),
        "{msg}"
    );
}

#[test]
fn bad_shard_header_is_reported_through_the_index() {
    let dir = hf_dir();
    write_raw_st(
        &dir.path().join("model-00002-of-00002.safetensors"),
        r#"{"c":{"dtype":"BF16","shape":[2,1],"data_offsets":[0,6]}}"#,
        &[0; 6],
    );
    let (e, msg) = open_err(dir.path());
    assert!(matches!(e, IoError::SizeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("\"c\""),
        "{msg}"
    );
}
