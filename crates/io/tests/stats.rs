//! Statistics files (architecture.md "Statistics files"): writing with `StatsWriter` /
//! `write_stats`, opening and validating with `StatsFile::open`, checking against a model
//! with `StatsFile::check_model`, streaming reads; and every rejection, each on a crafted
//! file (written with `CheckpointWriter` or by hand), asserting that the message names the
//! file and the key.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::path::{Path, PathBuf};

use amalgam_io::stats::SYMMETRY_RTOL;
use amalgam_io::{
    write_stats, Checkpoint, CheckpointWriter, DType, IoError, OutputLayout, OutputTensor, StatKey,
    StatKind, StatsFile, StatsMeta, StatsWriter,
};

/// Deterministic pseudo-random values in [-1, 1) (an LCG, independent of the crate).
fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Gram matrix XᵀX (d × d) of `rows` rows of width `d`, summed in f64, exactly symmetric.
fn gram(seed: u64, rows: usize, d: usize) -> Vec<f32> {
    let x = lcg(seed, rows * d);
    let mut g = vec![0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            let s: f64 = (0..rows)
                .map(|r| x[r * d + i] as f64 * x[r * d + j] as f64)
                .sum();
            g[i * d + j] = s as f32;
        }
    }
    g
}

/// Squares of pseudo-random values (a plausible diagonal Fisher).
fn fisher(seed: u64, n: usize) -> Vec<f32> {
    lcg(seed, n).iter().map(|x| x * x).collect()
}

/// The model the statistics are for: a linear weight [3, 4] (d_out 3, d_in 4), a norm
/// vector [4] and an embedding [5, 2].
const Q: &str = "model.layers.0.self_attn.q_proj.weight";
const NORM: &str = "model.layers.0.input_layernorm.weight";
const EMB: &str = "model.embed_tokens.weight";

fn model_tensors() -> Vec<(&'static str, Vec<usize>)> {
    vec![(Q, vec![3, 4]), (NORM, vec![4]), (EMB, vec![5, 2])]
}

/// Writes the model into `dir` (sharded when `max_shard_bytes` is small) and opens it.
fn write_model(dir: &Path, max_shard_bytes: u64) -> Checkpoint {
    let tensors: Vec<OutputTensor> = model_tensors()
        .into_iter()
        .map(|(n, s)| OutputTensor {
            name: n.to_string(),
            dtype: DType::BF16,
            shape: s,
        })
        .collect();
    let layout = OutputLayout::plan(tensors.clone(), max_shard_bytes);
    let order: Vec<OutputTensor> = layout
        .files
        .iter()
        .flat_map(|f| f.tensors.clone())
        .collect();
    let mut w = CheckpointWriter::create(dir, layout, false).unwrap();
    for (i, t) in order.iter().enumerate() {
        w.begin_tensor(&t.name).unwrap();
        w.write_f32(&lcg(100 + i as u64, t.numel())).unwrap();
    }
    w.finish().unwrap();
    Checkpoint::open(dir).unwrap()
}

/// The valid statistics for the model: every kind once.
fn valid_entries() -> Vec<(StatKey, Vec<f32>)> {
    vec![
        (StatKey::new(Q, StatKind::Fisher, vec![3, 4]), fisher(1, 12)),
        (
            StatKey::new(Q, StatKind::GramIn, vec![4, 4]),
            gram(2, 10, 4),
        ),
        (
            StatKey::new(Q, StatKind::KfacOut, vec![3, 3]),
            gram(3, 10, 3),
        ),
        (StatKey::new(NORM, StatKind::Fisher, vec![4]), fisher(4, 4)),
        (
            StatKey::new(NORM, StatKind::FisherBlock, vec![4, 4]),
            gram(5, 10, 4),
        ),
    ]
}

fn as_refs(e: &[(StatKey, Vec<f32>)]) -> Vec<(StatKey, &[f32])> {
    e.iter().map(|(k, v)| (k.clone(), v.as_slice())).collect()
}

/// Writes a crafted statistics file with `CheckpointWriter` (no stats-level checks) and
/// returns its path. `tensors`: (key, dtype, shape, values).
fn craft(
    dir: &Path,
    meta: &[(&str, &str)],
    tensors: &[(&str, DType, Vec<usize>, Vec<f32>)],
) -> PathBuf {
    let out: Vec<OutputTensor> = tensors
        .iter()
        .map(|(k, d, s, _)| OutputTensor {
            name: k.to_string(),
            dtype: d.clone(),
            shape: s.clone(),
        })
        .collect();
    let meta: Vec<(String, String)> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut w = CheckpointWriter::create(dir, OutputLayout::plan(out, 0), false)
        .unwrap()
        .with_metadata(meta);
    for (k, _, _, v) in tensors {
        w.begin_tensor(k).unwrap();
        w.write_f32(v).unwrap();
    }
    w.finish().unwrap().files[0].clone()
}

/// Standard valid metadata.
const META: &[(&str, &str)] = &[
    ("amalgam.stats", "1"),
    ("kind", "gram"),
    ("examples", "8"),
    ("tokens", "100"),
];

fn f32t<'a>(key: &'a str, shape: &[usize], v: Vec<f32>) -> (&'a str, DType, Vec<usize>, Vec<f32>) {
    (key, DType::F32, shape.to_vec(), v)
}

/// Asserts that `err`'s message contains every one of `parts`.
fn assert_names(err: &IoError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "message lacks {p:?}: {msg}");
    }
}

fn open_err(path: &Path) -> IoError {
    StatsFile::open(path).expect_err("the file must be rejected")
}

fn ps(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn round_trip_open_check_model_and_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"), 0);
    let entries = valid_entries();
    let mut meta = StatsMeta::new("empirical_fisher+gram", 8, 1234).for_model(&model);
    meta.extra
        .insert("dataset".to_string(), "wikitext".to_string());
    let path = tmp.path().join("stats").join("a.stats.safetensors");
    let written = write_stats(&path, &meta, &as_refs(&entries), false).unwrap();
    assert_eq!(written, path);
    // Only the file is left: no staging directory.
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["a.stats.safetensors".to_string()]);

    let s = StatsFile::open(&path).unwrap();
    s.check_model(&model).unwrap();
    assert_eq!(s.path(), path.as_path());
    assert_eq!(s.kind(), "empirical_fisher+gram");
    assert_eq!(s.examples(), 8);
    assert_eq!(s.tokens(), 1234);
    assert_eq!(s.metadata(), &meta);
    assert_eq!(
        s.metadata().model_header_sha256.as_deref(),
        Some(model.header_sha256().as_str())
    );
    let keys: Vec<StatKey> = entries.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(s.keys(), keys.as_slice());
    assert_eq!(s.shape(Q, StatKind::GramIn), Some(&[4usize, 4][..]));
    assert_eq!(s.shape(NORM, StatKind::GramIn), None);
    assert!(s.contains(NORM, StatKind::FisherBlock));
    assert!(!s.contains(EMB, StatKind::Fisher));

    // Whole and partial (streaming) reads give the written values bit for bit.
    for (k, v) in &entries {
        let mut out = vec![0f32; v.len()];
        s.read(&k.name, k.kind, 0..v.len(), &mut out).unwrap();
        assert_eq!(
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let mut part = vec![0f32; 2];
        s.read(&k.name, k.kind, 1..3, &mut part).unwrap();
        assert_eq!(part, v[1..3]);
        assert_eq!(s.raw(&k.name, k.kind).unwrap().len(), v.len() * 4);
    }
    // Out-of-range read: the error names the file and the key.
    let mut out = vec![0f32; 20];
    let e = s.read(Q, StatKind::Fisher, 0..20, &mut out).unwrap_err();
    assert_names(&e, &["a.stats.safetensors", "q_proj.weight::fisher"]);
}

#[test]
fn sharded_model_digest_matches_and_no_digest_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"), 16);
    assert!(
        model.files().len() > 1,
        "the model must be sharded for this test"
    );
    let entries = valid_entries();
    let meta = StatsMeta::new("gram", 1, 1).for_model(&model);
    let p = tmp.path().join("s.safetensors");
    write_stats(&p, &meta, &as_refs(&entries), false).unwrap();
    StatsFile::open(&p).unwrap().check_model(&model).unwrap();
    // Without a recorded digest only the shapes are checked.
    let p2 = tmp.path().join("s2.safetensors");
    write_stats(
        &p2,
        &StatsMeta::new("gram", 1, 1),
        &as_refs(&entries),
        false,
    )
    .unwrap();
    let s2 = StatsFile::open(&p2).unwrap();
    assert_eq!(s2.metadata().model_header_sha256, None);
    s2.check_model(&model).unwrap();
}

#[test]
fn header_hash_mismatch_names_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"), 0);
    let other = write_model(&tmp.path().join("other"), 16);
    assert_ne!(model.header_sha256(), other.header_sha256());
    let p = tmp.path().join("s.safetensors");
    let meta = StatsMeta::new("gram", 1, 1).for_model(&other);
    write_stats(&p, &meta, &as_refs(&valid_entries()), false).unwrap();
    let e = StatsFile::open(&p)
        .unwrap()
        .check_model(&model)
        .unwrap_err();
    assert!(matches!(e, IoError::StatsWrongModel { .. }), "{e}");
    assert_names(
        &e,
        &[
            &ps(&p),
            &ps(&tmp.path().join("model").join("model.safetensors")),
            "model_header_sha256",
            "different model",
            &model.header_sha256(),
        ],
    );
}

#[test]
fn wrong_shapes_name_stats_model_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"), 0);
    let model_file = ps(&tmp.path().join("model").join("model.safetensors"));
    let cases: Vec<(&str, Vec<usize>, &str)> = vec![
        // gram_in must be d_in x d_in = [4, 4]
        (
            "model.layers.0.self_attn.q_proj.weight::gram_in",
            vec![3, 3],
            "[4, 4]",
        ),
        // kfac_out must be d_out x d_out = [3, 3]
        (
            "model.layers.0.self_attn.q_proj.weight::kfac_out",
            vec![4, 4],
            "[3, 3]",
        ),
        // fisher must be the parameter's shape
        (
            "model.layers.0.self_attn.q_proj.weight::fisher",
            vec![4, 3],
            "[3, 4]",
        ),
        // fisher_block is for vectors
        (
            "model.layers.0.self_attn.q_proj.weight::fisher_block",
            vec![4, 4],
            "1-D",
        ),
        // gram_in is for 2-D weights
        (
            "model.layers.0.input_layernorm.weight::gram_in",
            vec![4, 4],
            "2-D",
        ),
    ];
    for (i, (key, shape, want)) in cases.into_iter().enumerate() {
        let d = tmp.path().join(format!("case{i}"));
        let n = shape.iter().product();
        let v = if shape.len() == 2 && shape[0] == shape[1] {
            gram(7, 5, shape[0])
        } else {
            fisher(7, n)
        };
        let p = craft(&d, META, &[f32t(key, &shape, v)]);
        let s = StatsFile::open(&p).unwrap();
        let e = s.check_model(&model).unwrap_err();
        assert!(matches!(e, IoError::StatsShape { .. }), "{e}");
        assert_names(&e, &[&ps(&p), &model_file, key, want]);
    }
}

#[test]
fn key_for_missing_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"), 0);
    let key = "model.layers.7.mlp.up_proj.weight::gram_in";
    let p = craft(tmp.path(), META, &[f32t(key, &[4, 4], gram(1, 5, 4))]);
    let e = StatsFile::open(&p)
        .unwrap()
        .check_model(&model)
        .unwrap_err();
    assert!(matches!(e, IoError::StatsUnknownParameter { .. }), "{e}");
    assert_names(&e, &[&ps(&p), "model.safetensors", key, "different model"]);
}

#[test]
fn nan_and_inf_name_file_key_and_index() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "w::fisher";
    let mut v = fisher(1, 12);
    v[5] = f32::NAN;
    let p = craft(
        &tmp.path().join("a"),
        META,
        &[
            f32t("v::fisher", &[2], vec![1.0, 2.0]),
            f32t(key, &[3, 4], v),
        ],
    );
    let e = open_err(&p);
    assert!(matches!(e, IoError::StatsValue { index: 5, .. }), "{e}");
    assert_names(&e, &[&ps(&p), key, "element 5", "NaN"]);

    let mut g = gram(2, 6, 4);
    g[9] = f32::NEG_INFINITY;
    let p = craft(
        &tmp.path().join("b"),
        META,
        &[f32t("w::gram_in", &[4, 4], g)],
    );
    let e = open_err(&p);
    assert_names(&e, &[&ps(&p), "w::gram_in", "element 9", "-inf"]);
}

#[test]
fn negative_fisher_or_diagonal_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let p = craft(
        &tmp.path().join("a"),
        META,
        &[f32t("w::fisher", &[3], vec![0.5, -0.25, 1.0])],
    );
    assert_names(
        &open_err(&p),
        &[&ps(&p), "w::fisher", "element 1", "never negative"],
    );
    // Negative off-diagonal Gram entries are fine; a negative diagonal entry is not.
    let mut g = gram(3, 6, 3);
    g[4] = -g[4];
    let p = craft(
        &tmp.path().join("b"),
        META,
        &[f32t("w::kfac_out", &[3, 3], g)],
    );
    assert_names(
        &open_err(&p),
        &[&ps(&p), "w::kfac_out", "element 4", "(1, 1)"],
    );
}

#[test]
fn non_symmetric_gram_names_file_key_and_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let d = 5;
    let mut g = gram(4, 8, d);
    g[3 * d + 1] += 0.5; // (3, 1) differs from (1, 3)
    let p = craft(
        tmp.path(),
        META,
        &[f32t("layer.weight::gram_in", &[d, d], g)],
    );
    let e = open_err(&p);
    assert!(
        matches!(e, IoError::StatsNotSymmetric { row: 1, col: 3, .. }),
        "{e}"
    );
    assert_names(
        &e,
        &[&ps(&p), "layer.weight::gram_in", "(1, 3)", "not symmetric"],
    );
}

#[test]
fn asymmetry_within_tolerance_is_accepted() {
    // Rounding-level asymmetry (as from a blocked f32 GEMM) passes; 100x the tolerance fails.
    let tmp = tempfile::tempdir().unwrap();
    let d = 4;
    let g = gram(5, 8, d);
    let scale = |i: usize, j: usize| ((g[i * d + i] as f64) * (g[j * d + j] as f64)).sqrt();
    let mut ok = g.clone();
    ok[2 * d] += (0.5 * SYMMETRY_RTOL * scale(0, 2)) as f32;
    let p = craft(
        &tmp.path().join("a"),
        META,
        &[f32t("w::fisher_block", &[d, d], ok)],
    );
    StatsFile::open(&p).unwrap();
    let mut bad = g.clone();
    bad[2 * d] += (100.0 * SYMMETRY_RTOL * scale(0, 2)) as f32;
    let p = craft(
        &tmp.path().join("b"),
        META,
        &[f32t("w::fisher_block", &[d, d], bad)],
    );
    assert_names(&open_err(&p), &[&ps(&p), "w::fisher_block", "(0, 2)"]);
}

#[test]
fn zero_token_count_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = &[
        ("amalgam.stats", "1"),
        ("kind", "gram"),
        ("examples", "8"),
        ("tokens", "0"),
    ];
    let p = craft(tmp.path(), meta, &[f32t("w::fisher", &[2], vec![1.0, 2.0])]);
    let e = open_err(&p);
    assert!(matches!(e, IoError::StatsMetadata { .. }), "{e}");
    assert_names(&e, &[&ps(&p), "\"tokens\"", "is 0"]);
    // The writer refuses it too.
    let e = write_stats(
        &tmp.path().join("w.safetensors"),
        &StatsMeta::new("gram", 8, 0),
        &[(
            StatKey::new("w", StatKind::Fisher, vec![2]),
            &[1.0f32, 2.0][..],
        )],
        false,
    )
    .unwrap_err();
    assert_names(&e, &["w.safetensors", "\"tokens\"", "is 0"]);
}

#[test]
fn missing_or_bad_metadata_names_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let t = [f32t("w::fisher", &[2], vec![1.0, 2.0])];
    let all = META.to_vec();
    for (i, missing) in ["amalgam.stats", "kind", "examples", "tokens"]
        .into_iter()
        .enumerate()
    {
        let meta: Vec<(&str, &str)> = all.iter().copied().filter(|(k, _)| *k != missing).collect();
        let p = craft(&tmp.path().join(format!("m{i}")), &meta, &t);
        let e = open_err(&p);
        assert!(matches!(e, IoError::StatsMetadata { .. }), "{e}");
        assert_names(&e, &[&ps(&p), &format!("\"{missing}\""), "missing"]);
    }
    let bad: Vec<(&str, &str, &str)> = vec![
        ("amalgam.stats", "2", "not supported"),
        ("examples", "0", "is 0"),
        ("examples", "-3", "not a non-negative integer"),
        ("tokens", "1.5", "not a non-negative integer"),
        ("kind", "", "empty"),
        ("model_header_sha256", "abc", "not a SHA-256"),
    ];
    for (i, (key, value, want)) in bad.into_iter().enumerate() {
        let mut meta: Vec<(&str, &str)> = all.iter().copied().filter(|(k, _)| *k != key).collect();
        meta.push((key, value));
        let p = craft(&tmp.path().join(format!("b{i}")), &meta, &t);
        let e = open_err(&p);
        assert_names(&e, &[&ps(&p), &format!("\"{key}\""), want]);
    }
}

#[test]
fn json_typed_metadata() {
    // Integers written as JSON numbers are accepted; a non-string kind is not.
    let tmp = tempfile::tempdir().unwrap();
    let data = support::f32_bytes(&[1.0, 2.0]);
    let t = r#""w::fisher":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    let p = tmp.path().join("num.safetensors");
    support::write_raw_st(
        &p,
        &format!(
            r#"{{"__metadata__":{{"amalgam.stats":"1","kind":"fisher","examples":3,"tokens":40}},{t}}}"#
        ),
        &data,
    );
    let s = StatsFile::open(&p).unwrap();
    assert_eq!((s.examples(), s.tokens()), (3, 40));
    let p = tmp.path().join("kind.safetensors");
    support::write_raw_st(
        &p,
        &format!(
            r#"{{"__metadata__":{{"amalgam.stats":"1","kind":7,"examples":"3","tokens":"40"}},{t}}}"#
        ),
        &data,
    );
    assert_names(&open_err(&p), &[&ps(&p), "\"kind\"", "not a string"]);
}

#[test]
fn model_checkpoint_is_not_a_statistics_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), 0);
    let p = tmp.path().join("model.safetensors");
    let e = open_err(&p);
    assert_names(&e, &[&ps(&p), "\"amalgam.stats\"", "not a statistics file"]);
}

#[test]
fn unknown_suffix_bad_dtype_and_non_square() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "model.layers.0.mlp.down_proj.weight::hessian";
    let p = craft(
        &tmp.path().join("a"),
        META,
        &[f32t(key, &[2], vec![1.0, 2.0])],
    );
    let e = open_err(&p);
    assert!(matches!(e, IoError::StatsKey { .. }), "{e}");
    assert_names(&e, &[&ps(&p), key, "unknown suffix", "::gram_in"]);

    let p = craft(
        &tmp.path().join("b"),
        META,
        &[f32t("plain.weight", &[2], vec![1.0, 2.0])],
    );
    assert_names(&open_err(&p), &[&ps(&p), "plain.weight", "no \"::\""]);

    let p = craft(
        &tmp.path().join("c"),
        META,
        &[("w::fisher", DType::BF16, vec![2], vec![1.0, 2.0])],
    );
    assert_names(&open_err(&p), &[&ps(&p), "w::fisher", "BF16", "F32"]);

    let p = craft(
        &tmp.path().join("d"),
        META,
        &[f32t("w::gram_in", &[2, 3], fisher(1, 6))],
    );
    assert_names(&open_err(&p), &[&ps(&p), "w::gram_in", "[2, 3]", "square"]);
}

#[test]
fn missing_statistic_names_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s.safetensors");
    write_stats(
        &p,
        &StatsMeta::new("fisher", 1, 1),
        &as_refs(&valid_entries()),
        false,
    )
    .unwrap();
    let s = StatsFile::open(&p).unwrap();
    let e = s.require(EMB, StatKind::Fisher).unwrap_err();
    assert!(matches!(e, IoError::StatsMissing { .. }), "{e}");
    assert_names(&e, &[&ps(&p), "model.embed_tokens.weight::fisher"]);
    let mut out = [0f32; 1];
    let e = s.read(NORM, StatKind::GramIn, 0..1, &mut out).unwrap_err();
    assert_names(
        &e,
        &[&ps(&p), "model.layers.0.input_layernorm.weight::gram_in"],
    );
}

#[test]
fn writer_rejects_bad_values_and_existing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s.safetensors");
    let meta = StatsMeta::new("fisher", 1, 1);
    let key = StatKey::new("w", StatKind::Fisher, vec![4]);

    // A NaN in the second piece: the index counts from the start of the key.
    let mut w = StatsWriter::create(&p, &meta, vec![key.clone()], false).unwrap();
    w.begin("w", StatKind::Fisher).unwrap();
    w.write(&[1.0, 2.0]).unwrap();
    let e = w.write(&[3.0, f32::NAN]).unwrap_err();
    assert_names(&e, &[&ps(&p), "w::fisher", "element 3", "NaN"]);
    drop(w);
    // Nothing is left behind by an unfinished writer.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

    // Wrong order is refused, naming the expected key.
    let k2 = StatKey::new("v", StatKind::GramIn, vec![2, 2]);
    let mut w = StatsWriter::create(&p, &meta, vec![key.clone(), k2.clone()], false).unwrap();
    let e = w.begin("v", StatKind::GramIn).unwrap_err();
    assert_names(&e, &[&ps(&p), "v::gram_in", "w::fisher"]);
    assert!(!e.to_string().contains("partial"), "{e}");
    drop(w);

    // A non-square matrix key is refused at create.
    let e = StatsWriter::create(
        &p,
        &meta,
        vec![StatKey::new("v", StatKind::KfacOut, vec![2, 3])],
        false,
    )
    .unwrap_err();
    assert_names(&e, &[&ps(&p), "v::kfac_out", "square"]);

    // An existing file is refused without overwrite and replaced with it.
    write_stats(
        &p,
        &meta,
        &[(key.clone(), &[1.0f32, 2.0, 3.0, 4.0][..])],
        false,
    )
    .unwrap();
    let e = write_stats(&p, &meta, &[(key.clone(), &[5.0f32; 4][..])], false).unwrap_err();
    assert!(matches!(e, IoError::StatsExists { .. }), "{e}");
    assert_names(&e, &[&ps(&p), "--overwrite"]);
    write_stats(&p, &meta, &[(key.clone(), &[5.0f32; 4][..])], true).unwrap();
    let mut out = [0f32; 4];
    StatsFile::open(&p)
        .unwrap()
        .read("w", StatKind::Fisher, 0..4, &mut out)
        .unwrap();
    assert_eq!(out, [5.0; 4]);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // An incomplete key fails finish and leaves the old file untouched.
    let mut w = StatsWriter::create(&p, &meta, vec![key], true).unwrap();
    w.begin("w", StatKind::Fisher).unwrap();
    w.write(&[9.0]).unwrap();
    assert_names(&w.finish().unwrap_err(), &[&ps(&p), "w::fisher"]);
    StatsFile::open(&p)
        .unwrap()
        .read("w", StatKind::Fisher, 0..4, &mut out)
        .unwrap();
    assert_eq!(out, [5.0; 4]);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn large_matrix_symmetry_check_spans_tiles() {
    // d = 130 spans three 64-wide tiles; the one asymmetric pair sits in the last tile pair.
    let tmp = tempfile::tempdir().unwrap();
    let d = 130;
    let mut g = gram(9, 3, d);
    g[129 * d + 100] += 10.0;
    let p = craft(tmp.path(), META, &[f32t("big::gram_in", &[d, d], g)]);
    let e = open_err(&p);
    assert!(
        matches!(
            e,
            IoError::StatsNotSymmetric {
                row: 100,
                col: 129,
                ..
            }
        ),
        "{e}"
    );
}
