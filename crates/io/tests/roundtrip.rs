//! Writing checkpoints with `CheckpointWriter` and reading them back with `Checkpoint`:
//! dtype conversions against naive references, sharding, index, header format,
//! determinism, and crash/overwrite safety.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::path::Path;

use amalgam_io::{
    Checkpoint, CheckpointWriter, DType, IoError, OutputLayout, OutputTensor, INDEX_FILE,
};
use support::*;

fn out_tensor(name: &str, dtype: DType, shape: &[usize]) -> OutputTensor {
    OutputTensor {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// Writes `tensors` (each with its f32 data) in `layout` order, feeding data in odd-sized pieces.
fn write_all(
    dir: &Path,
    layout: OutputLayout,
    data: &[(&str, Vec<f32>)],
) -> amalgam_io::OutputSummary {
    let order: Vec<String> = layout
        .files
        .iter()
        .flat_map(|f| f.tensors.iter().map(|t| t.name.clone()))
        .collect();
    let mut w = CheckpointWriter::create(dir, layout, false).unwrap();
    for name in order {
        let v = &data.iter().find(|(n, _)| *n == name).unwrap().1;
        w.begin_tensor(&name).unwrap();
        for piece in v.chunks(7) {
            w.write_f32(piece).unwrap();
        }
    }
    w.finish().unwrap()
}

fn expected_value(dtype: &DType, x: f32) -> f32 {
    match dtype {
        DType::F32 | DType::F64 => x,
        DType::BF16 => bf16_to_f32(naive_bf16_bits(x)),
        DType::F16 => naive_f16_value(x) as f32,
        _ => unreachable!(),
    }
}

#[test]
fn every_float_dtype_round_trips_with_naive_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let vals = test_values(1000);
    let dtypes = [DType::F32, DType::F16, DType::BF16, DType::F64];
    let names: Vec<String> = dtypes.iter().map(|d| format!("t.{d}")).collect();
    let tensors: Vec<OutputTensor> = dtypes
        .iter()
        .zip(&names)
        .map(|(d, n)| out_tensor(n, d.clone(), &[10, 100]))
        .collect();
    let data: Vec<(&str, Vec<f32>)> = names.iter().map(|n| (n.as_str(), vals.clone())).collect();
    let summary = write_all(dir.path(), OutputLayout::plan(tensors, 0), &data);
    assert_eq!(summary.files, vec![dir.path().join("model.safetensors")]);
    assert_eq!(summary.index, None);

    let ck = Checkpoint::open(dir.path()).unwrap();
    for (d, n) in dtypes.iter().zip(&names) {
        let meta = ck.get(n).unwrap();
        assert_eq!(&meta.dtype, d);
        assert_eq!(meta.shape, vec![10, 100]);
        let mut out = vec![0f32; 1000];
        ck.read_f32(n, 0..1000, &mut out).unwrap();
        for (i, (&x, &got)) in vals.iter().zip(&out).enumerate() {
            let want = expected_value(d, x);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{d} element {i}: {x} -> {got}, want {want}"
            );
        }
        // a sub-range reads the same elements
        let mut part = vec![0f32; 13];
        ck.read_f32(n, 500..513, &mut part).unwrap();
        assert_eq!(part, out[500..513]);
    }
    // raw bytes of the bf16 tensor are the naive encoding
    let raw = ck.raw("t.BF16").unwrap();
    let want: Vec<u8> = vals
        .iter()
        .flat_map(|&x| naive_bf16_bits(x).to_le_bytes())
        .collect();
    assert_eq!(raw, &want[..]);
}

#[test]
fn reads_hand_made_half_precision_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let vals: Vec<f32> = test_values(300)
        .into_iter()
        .filter(|x| x.is_finite())
        .collect();
    let f16: Vec<f64> = vals.iter().map(|&x| naive_f16_value(x)).collect();
    let f16_bytes: Vec<u8> = f16
        .iter()
        .flat_map(|&v| f16_bits_from_value(v).to_le_bytes())
        .collect();
    let bf16_bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&x| naive_bf16_bits(x).to_le_bytes())
        .collect();
    let f64_bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&x| (x as f64 * 1.5).to_le_bytes())
        .collect();
    let n = vals.len();
    write_st(
        &dir.path().join("model.safetensors"),
        &[
            ("h", "F16", vec![n], f16_bytes),
            ("b", "BF16", vec![n], bf16_bytes),
            ("d", "F64", vec![n], f64_bytes),
            ("i", "I32", vec![2], vec![0; 8]),
        ],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let mut out = vec![0f32; n];
    ck.read_f32("h", 0..n, &mut out).unwrap();
    for (i, (&v, &got)) in f16.iter().zip(&out).enumerate() {
        assert_eq!(got as f64, v, "f16 element {i}");
    }
    ck.read_f32("b", 0..n, &mut out).unwrap();
    for (&x, &got) in vals.iter().zip(&out) {
        assert_eq!(got, bf16_to_f32(naive_bf16_bits(x)));
    }
    ck.read_f32("d", 0..n, &mut out).unwrap();
    for (&x, &got) in vals.iter().zip(&out) {
        assert_eq!(got, (x as f64 * 1.5) as f32);
    }
    let e = ck
        .read_f32("i", 0..2, &mut out[..2])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("\"i\"") && e.contains("I32"),
        "{e}"
    );
    let e = ck
        .read_f32("h", 0..n + 1, &mut vec![0f32; n + 1])
        .unwrap_err();
    assert!(matches!(e, IoError::RangeOutOfBounds { .. }), "{e}");
    let e = ck.read_f32("nope", 0..1, &mut out[..1]).unwrap_err();
    assert!(matches!(e, IoError::UnknownTensor { .. }), "{e}");
}

fn sharded_fixture() -> (Vec<OutputTensor>, Vec<(&'static str, Vec<f32>)>) {
    let names = ["embed", "l0.w", "l0.b", "l1.w", "l1.b", "head"];
    let shapes: [&[usize]; 6] = [&[50, 8], &[8, 8], &[8], &[8, 8], &[8], &[50, 8]];
    let dtypes = [
        DType::BF16,
        DType::F32,
        DType::F16,
        DType::F32,
        DType::F16,
        DType::BF16,
    ];
    let mut tensors = Vec::new();
    let mut data = Vec::new();
    for (i, ((n, s), d)) in names.iter().zip(shapes).zip(dtypes).enumerate() {
        tensors.push(out_tensor(n, d, s));
        let numel: usize = s.iter().product();
        data.push((
            *n,
            (0..numel)
                .map(|j| (i * 1000 + j) as f32 * 0.25 - 3.0)
                .collect(),
        ));
    }
    (tensors, data)
}

#[test]
fn sharded_output_reads_back_with_a_correct_index() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, data) = sharded_fixture();
    // embed 800 B, l0.w 256, l0.b 16, l1.w 256, l1.b 16, head 800; limit 600
    let layout = OutputLayout::plan(tensors.clone(), 600);
    let files: Vec<Vec<&str>> = layout
        .files
        .iter()
        .map(|f| f.tensors.iter().map(|t| t.name.as_str()).collect())
        .collect();
    assert_eq!(
        files,
        vec![
            vec!["embed"],
            vec!["l0.w", "l0.b", "l1.w", "l1.b"],
            vec!["head"]
        ]
    );
    let summary = write_all(dir.path(), layout.clone(), &data);
    assert_eq!(summary.total_bytes, 800 + 256 + 16 + 256 + 16 + 800);
    assert_eq!(summary.index, Some(dir.path().join(INDEX_FILE)));

    // the index, checked as plain JSON
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap())
            .unwrap();
    assert_eq!(
        idx["metadata"]["total_size"],
        800 + 256 + 16 + 256 + 16 + 800
    );
    let wm = idx["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), 6);
    assert_eq!(wm["embed"], "model-00001-of-00003.safetensors");
    assert_eq!(wm["l1.b"], "model-00002-of-00003.safetensors");
    assert_eq!(wm["head"], "model-00003-of-00003.safetensors");

    // no temporary files remain
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            INDEX_FILE
        ]
    );

    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.files().len(), 3);
    let order: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(order, vec!["embed", "l0.w", "l0.b", "l1.w", "l1.b", "head"]);
    for (t, (name, vals)) in tensors.iter().zip(&data) {
        let mut out = vec![0f32; vals.len()];
        ck.read_f32(name, 0..vals.len(), &mut out).unwrap();
        let want: Vec<f32> = vals.iter().map(|&x| expected_value(&t.dtype, x)).collect();
        assert_eq!(out, want, "{name}");
        ck.check_finite(name).unwrap();
    }
}

#[test]
fn files_follow_the_header_format_and_load_with_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, data) = sharded_fixture();
    write_all(dir.path(), OutputLayout::plan(tensors, 600), &data);
    for i in 1..=3 {
        let path = dir
            .path()
            .join(format!("model-{i:05}-of-00003.safetensors"));
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header padded to 8 bytes");
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(
            header.starts_with(r#"{"__metadata__":{"format":"pt"},"#),
            "{header}"
        );
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let ours = Checkpoint::open(&path).unwrap();
            assert_eq!(view.data(), ours.raw(&name).unwrap());
            assert_eq!(view.shape(), &ours.get(&name).unwrap().shape[..]);
            assert_eq!(
                format!("{:?}", view.dtype()),
                ours.get(&name).unwrap().dtype.as_str()
            );
        }
    }
}

#[test]
fn output_is_byte_identical_for_identical_input() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (tensors, data) = sharded_fixture();
    write_all(a.path(), OutputLayout::plan(tensors.clone(), 600), &data);
    write_all(b.path(), OutputLayout::plan(tensors, 600), &data);
    for name in [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        INDEX_FILE,
    ] {
        assert_eq!(
            std::fs::read(a.path().join(name)).unwrap(),
            std::fs::read(b.path().join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        Checkpoint::open(a.path()).unwrap().header_sha256(),
        Checkpoint::open(b.path()).unwrap().header_sha256()
    );
}

#[test]
fn header_sha256_covers_header_bytes_in_file_name_order() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let (tensors, data) = sharded_fixture();
    write_all(dir.path(), OutputLayout::plan(tensors, 600), &data);
    let mut h = Sha256::new();
    for i in 1..=3 {
        let bytes = std::fs::read(
            dir.path()
                .join(format!("model-{i:05}-of-00003.safetensors")),
        )
        .unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        h.update(&bytes[8..8 + n]);
    }
    assert_eq!(
        Checkpoint::open(dir.path()).unwrap().header_sha256(),
        hex::encode(h.finalize())
    );
}

#[test]
fn refuses_an_existing_checkpoint_without_overwrite() {
    let (tensors, data) = sharded_fixture();
    for existing in ["model.safetensors", INDEX_FILE, "other.safetensors"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(existing), b"old").unwrap();
        let e =
            CheckpointWriter::create(dir.path(), OutputLayout::plan(tensors.clone(), 600), false)
                .unwrap_err();
        assert!(matches!(e, IoError::OutputExists { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(existing) && msg.contains("overwrite"), "{msg}");
    }
    // other files (config, README) do not count
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
    write_all(dir.path(), OutputLayout::plan(tensors, 600), &data);
}

#[test]
fn overwrite_replaces_the_old_checkpoint_only_at_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, data) = sharded_fixture();
    write_all(dir.path(), OutputLayout::plan(tensors.clone(), 600), &data);
    // Overwrite with a single-file layout: old shards and index must go, but only at finish.
    let layout = OutputLayout::plan(tensors, 0);
    let mut w = CheckpointWriter::create(dir.path(), layout.clone(), true).unwrap();
    for t in &layout.files[0].tensors {
        w.begin_tensor(&t.name).unwrap();
        w.write_f32(&data.iter().find(|d| d.0 == t.name).unwrap().1)
            .unwrap();
    }
    assert!(dir.path().join(INDEX_FILE).exists());
    assert!(dir.path().join("model-00002-of-00003.safetensors").exists());
    let s = w.finish().unwrap();
    assert_eq!(s.removed.len(), 4);
    assert!(!dir.path().join(INDEX_FILE).exists());
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.files().len(), 1);
    assert_eq!(ck.tensors().len(), 6);
}

#[test]
fn drop_without_finish_leaves_no_final_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (tensors, data) = sharded_fixture();
    let layout = OutputLayout::plan(tensors, 600);
    {
        let mut w = CheckpointWriter::create(&out, layout.clone(), false).unwrap();
        // finish the first file completely and start the second
        for t in layout.files[0]
            .tensors
            .iter()
            .chain(&layout.files[1].tensors[..1])
        {
            w.begin_tensor(&t.name).unwrap();
            w.write_f32(&data.iter().find(|d| d.0 == t.name).unwrap().1)
                .unwrap();
        }
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.is_empty());
        assert!(
            names
                .iter()
                .all(|n| n.starts_with('.') && n.ends_with(".partial")),
            "{names:?}"
        );
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn writer_rejects_misuse() {
    let dir = tempfile::tempdir().unwrap();
    let layout = OutputLayout::plan(
        vec![
            out_tensor("a", DType::F32, &[4]),
            out_tensor("b", DType::I32, &[2]),
        ],
        0,
    );
    let mut w = CheckpointWriter::create(dir.path(), layout, false).unwrap();
    assert!(matches!(
        w.write_f32(&[1.0]).unwrap_err(),
        IoError::WriteOrder { .. }
    ));
    let e = w.begin_tensor("b").unwrap_err().to_string();
    assert!(e.contains("\"a\" comes next"), "{e}");
    w.begin_tensor("a").unwrap();
    w.write_f32(&[1.0; 3]).unwrap();
    let e = w.write_f32(&[1.0; 2]).unwrap_err();
    assert!(
        matches!(
            e,
            IoError::TensorSize {
                written: 20,
                expected: 16,
                ..
            }
        ),
        "{e}"
    );
    let e = w.begin_tensor("b").unwrap_err().to_string();
    assert!(
        e.contains("\"a\"") && e.contains("12 bytes written but 16"),
        "{e}"
    );
    w.write_f32(&[1.0]).unwrap();
    w.begin_tensor("b").unwrap();
    let e = w.write_f32(&[1.0, 2.0]).unwrap_err().to_string();
    assert!(e.contains("\"b\"") && e.contains("I32"), "{e}");
    w.write_raw(&[1, 0, 0, 0]).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(
        e.contains("\"b\"") && e.contains("4 bytes written but 8"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // finish before all tensors are begun
    let layout = OutputLayout::plan(
        vec![
            out_tensor("a", DType::F16, &[1]),
            out_tensor("b", DType::F16, &[1]),
        ],
        0,
    );
    let mut w = CheckpointWriter::create(dir.path(), layout, false).unwrap();
    w.begin_tensor("a").unwrap();
    w.write_f32(&[1.0]).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("1 of 2") && e.contains("\"b\""), "{e}");

    // duplicate names and unknown-size dtypes are refused at create
    let e = CheckpointWriter::create(
        dir.path(),
        OutputLayout::plan(
            vec![
                out_tensor("a", DType::F16, &[1]),
                out_tensor("a", DType::F16, &[1]),
            ],
            0,
        ),
        false,
    )
    .unwrap_err();
    assert!(matches!(e, IoError::InvalidLayout { .. }), "{e}");
    let e = CheckpointWriter::create(
        dir.path(),
        OutputLayout::plan(vec![out_tensor("q", DType::Other("Q4_K".into()), &[32])], 0),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"q\"") && e.contains("Q4_K"), "{e}");
}

#[test]
fn raw_passthrough_of_non_float_dtypes() {
    let src = tempfile::tempdir().unwrap();
    let ids: Vec<u8> = (0..40u8).collect();
    write_st(
        &src.path().join("model.safetensors"),
        &[
            ("pos", "I64", vec![5], ids.clone()),
            ("mask", "BOOL", vec![3], vec![1, 0, 1]),
        ],
    );
    let ck = Checkpoint::open(src.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let tensors: Vec<OutputTensor> = ck
        .tensors()
        .iter()
        .map(|t| out_tensor(&t.name, t.dtype.clone(), &t.shape))
        .collect();
    let layout = OutputLayout::plan(tensors, 0);
    let mut w = CheckpointWriter::create(out.path(), layout.clone(), false).unwrap();
    for t in &layout.files[0].tensors {
        w.begin_tensor(&t.name).unwrap();
        w.write_raw(ck.raw(&t.name).unwrap()).unwrap();
    }
    w.finish().unwrap();
    let back = Checkpoint::open(out.path()).unwrap();
    assert_eq!(back.raw("pos").unwrap(), &ids[..]);
    assert_eq!(back.raw("mask").unwrap(), &[1, 0, 1]);
    assert_eq!(back.get("mask").unwrap().dtype, DType::Bool);
}

#[test]
fn extra_metadata_follows_format_and_stale_partials_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".model-00001-of-00009.safetensors.partial"),
        b"junk",
    )
    .unwrap();
    let layout = OutputLayout::plan(vec![out_tensor("w", DType::F32, &[2])], 0);
    let mut w = CheckpointWriter::create(dir.path(), layout, false)
        .unwrap()
        .with_metadata(vec![
            ("amalgam.stats".into(), "1".into()),
            ("format".into(), "ignored".into()),
            ("kind".into(), "fisher".into()),
        ]);
    w.begin_tensor("w").unwrap();
    w.write_f32(&[1.0, 2.0]).unwrap();
    w.finish().unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let header = std::str::from_utf8(ck.files()[0].header_bytes()).unwrap();
    assert!(
        header
            .starts_with(r#"{"__metadata__":{"format":"pt","amalgam.stats":"1","kind":"fisher"},"#),
        "{header}"
    );
    assert_eq!(ck.files()[0].metadata["kind"], "fisher");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
