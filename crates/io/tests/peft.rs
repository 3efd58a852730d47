//! PEFT adapter directories (`amalgam_io::peft`): round trips of LoRA and (IA)^3 adapters
//! through `write_adapter` and `Adapter::open`; the written files read back with the
//! `safetensors` crate and a config JSON holding what PEFT needs; checks against a base model
//! (the tiny Llama fixture and hand-built ones); and every rejection on a hand-crafted
//! adapter, asserting that the message names the file and the key or module.
//!
//! Set `AMALGAM_PEFT_KEEP_DIR` to keep the adapters written for the tiny Llama fixture
//! (`lora/` and `ia3/` under it) for `tests/dev/check_peft_load.py`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use amalgam_io::peft::{
    ia3_key, lora_a_key, lora_b_key, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};
use amalgam_io::{
    write_adapter, Adapter, AdapterConfig, AdapterKind, AdapterModules, AdapterWriter, Checkpoint,
    DType, Ia3Config, IoError, LoraConfig, TargetModules,
};
use serde_json::Value;
use support::{f32_bytes, write_st};

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

fn fixture_base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mergekit/models/base")
}

/// Owned tensors of an adapter: key, shape, data.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn borrow(t: &Tensors) -> Vec<(String, Vec<usize>, &[f32])> {
    t.iter()
        .map(|(k, s, d)| (k.clone(), s.clone(), d.as_slice()))
        .collect()
}

/// A LoRA adapter for the tiny Llama fixture (hidden 16, kv 8, intermediate 32, 4 layers):
/// q_proj, v_proj and down_proj of every layer; r = 4 except layer 1's q_proj (rank_pattern
/// 2); alpha 8 except v_proj (alpha_pattern 3); rsLoRA.
fn tiny_llama_lora() -> (AdapterConfig, Tensors) {
    let mut c = LoraConfig::new(
        4,
        8.0,
        TargetModules::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
    );
    c.rank_pattern
        .insert("model.layers.1.self_attn.q_proj".into(), 2);
    c.alpha_pattern.insert("v_proj".into(), 3.0);
    c.use_rslora = true;
    c.base_model_name_or_path = Some("tests/fixtures/mergekit/models/base".into());
    c.extra
        .insert("task_type".into(), Value::String("CAUSAL_LM".into()));
    let mut tensors = Vec::new();
    let mut seed = 1;
    for layer in 0..4 {
        for (m, out, inp) in [
            ("self_attn.q_proj", 16, 16),
            ("self_attn.v_proj", 8, 16),
            ("mlp.down_proj", 16, 32),
        ] {
            let name = format!("model.layers.{layer}.{m}");
            let r = if layer == 1 && m == "self_attn.q_proj" {
                2
            } else {
                4
            };
            tensors.push((lora_a_key(&name), vec![r, inp], lcg(seed, r * inp)));
            tensors.push((lora_b_key(&name), vec![out, r], lcg(seed + 1, out * r)));
            seed += 2;
        }
    }
    (AdapterConfig::Lora(c), tensors)
}

/// An (IA)^3 adapter for the tiny Llama fixture: k_proj ([8, 1], outputs) and down_proj
/// (feedforward, [1, 32], inputs) of every layer.
fn tiny_llama_ia3() -> (AdapterConfig, Tensors) {
    let mut c = Ia3Config::new(
        TargetModules::List(vec!["k_proj".into(), "down_proj".into()]),
        TargetModules::List(vec!["down_proj".into()]),
    );
    c.base_model_name_or_path = Some("tests/fixtures/mergekit/models/base".into());
    c.extra
        .insert("task_type".into(), Value::String("CAUSAL_LM".into()));
    let mut tensors = Vec::new();
    for layer in 0..4u64 {
        let k = format!("model.layers.{layer}.self_attn.k_proj");
        let d = format!("model.layers.{layer}.mlp.down_proj");
        let shift = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + 0.5 * x).collect::<Vec<_>>();
        tensors.push((ia3_key(&k), vec![8, 1], shift(lcg(100 + layer, 8))));
        tensors.push((ia3_key(&d), vec![1, 32], shift(lcg(200 + layer, 32))));
    }
    (AdapterConfig::Ia3(c), tensors)
}

fn keep_dir(sub: &str) -> Option<PathBuf> {
    std::env::var_os("AMALGAM_PEFT_KEEP_DIR").map(|d| PathBuf::from(d).join(sub))
}

#[test]
fn lora_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora");
    let (config, tensors) = tiny_llama_lora();
    write_adapter(&out, &config, &borrow(&tensors), false).unwrap();
    if let Some(keep) = keep_dir("lora") {
        write_adapter(&keep, &config, &borrow(&tensors), true).unwrap();
    }

    let a = Adapter::open(&out).unwrap();
    assert_eq!(a.kind(), AdapterKind::Lora);
    assert_eq!(a.config(), &config);
    assert!(a.extra_keys().is_empty());
    let ms = a.lora_modules();
    assert_eq!(ms.len(), 12);
    assert!(a.ia3_modules().is_empty());
    let AdapterModules::Lora(same) = a.modules() else {
        panic!("LoRA modules expected")
    };
    assert_eq!(same.len(), 12);
    for m in ms {
        let q1 = m.name == "model.layers.1.self_attn.q_proj";
        let v = m.name.ends_with("v_proj");
        let (r, alpha) = (if q1 { 2 } else { 4 }, if v { 3.0 } else { 8.0 });
        assert_eq!(m.rank, r, "{}", m.name);
        assert_eq!(m.alpha, alpha, "{}", m.name);
        // rsLoRA: alpha / sqrt(r), worked by hand.
        let want = match (q1, v) {
            (true, _) => 8.0 / std::f64::consts::SQRT_2,
            (false, true) => 1.5,
            (false, false) => 4.0,
        };
        assert!((m.scaling - want).abs() < 1e-12, "{}", m.name);
        assert_eq!(m.a_key, lora_a_key(&m.name));
        assert_eq!(m.b_key, lora_b_key(&m.name));
        assert!(!m.transposed && !m.embedding);
        assert_eq!(a.base_weight_name(&m.name), format!("{}.weight", m.name));
        assert_eq!(
            a.base_weight_name(&format!("base_model.model.{}", m.name)),
            format!("{}.weight", m.name)
        );
    }
    // Module order is file order; data round-trips bit for bit.
    assert_eq!(ms[0].name, "model.layers.0.self_attn.q_proj");
    assert_eq!(ms[2].name, "model.layers.0.mlp.down_proj");
    for (key, shape, data) in &tensors {
        assert_eq!(a.shape(key).unwrap(), shape.as_slice());
        let back = a.read(key).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    // Fits the tiny Llama it was made for.
    let base = Checkpoint::open(&fixture_base()).unwrap();
    a.check_base(&base).unwrap();
    assert_eq!(ms[2].base_shape(), [16, 32]);
    // Opening through a file path inside the directory works too.
    let b = Adapter::open(&out.join(ADAPTER_CONFIG_FILE)).unwrap();
    assert_eq!(b.dir(), out.as_path());
}

#[test]
fn ia3_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ia3");
    let (config, tensors) = tiny_llama_ia3();
    write_adapter(&out, &config, &borrow(&tensors), false).unwrap();
    if let Some(keep) = keep_dir("ia3") {
        write_adapter(&keep, &config, &borrow(&tensors), true).unwrap();
    }
    let a = Adapter::open(&out).unwrap();
    assert_eq!(a.kind(), AdapterKind::Ia3);
    assert_eq!(a.config(), &config);
    let ms = a.ia3_modules();
    assert_eq!(ms.len(), 8);
    for m in ms {
        let ff = m.name.ends_with("down_proj");
        assert_eq!(m.is_feedforward, ff, "{}", m.name);
        assert_eq!(m.len, if ff { 32 } else { 8 });
        assert_eq!(m.shape, if ff { vec![1, 32] } else { vec![8, 1] });
        assert_eq!(m.key, ia3_key(&m.name));
    }
    for (key, _, data) in &tensors {
        assert_eq!(&a.read(key).unwrap(), data);
    }
    let base = Checkpoint::open(&fixture_base()).unwrap();
    a.check_base(&base).unwrap();
}

#[test]
fn written_files_are_what_peft_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a");
    let (config, tensors) = tiny_llama_lora();
    write_adapter(&out, &config, &borrow(&tensors), false).unwrap();

    // The weights, with the reference safetensors crate.
    let bytes = std::fs::read(out.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().unwrap();
    assert_eq!(md.get("format").map(String::as_str), Some("pt"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), tensors.len());
    for (key, shape, data) in &tensors {
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        assert_eq!(t.shape(), shape.as_slice());
        assert_eq!(t.data(), f32_bytes(data).as_slice());
    }

    // The config: pretty JSON, sorted keys, the fields PEFT's LoraConfig reads.
    let text = std::fs::read_to_string(out.join(ADAPTER_CONFIG_FILE)).unwrap();
    assert!(text.starts_with("{\n  \""), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let obj = v.as_object().unwrap();
    let keys: Vec<&String> = obj.keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["r"], 4);
    assert_eq!(v["lora_alpha"], 8); // an int, as PEFT writes it
    assert_eq!(v["use_rslora"], true);
    assert_eq!(v["fan_in_fan_out"], false);
    assert_eq!(v["bias"], "none");
    assert_eq!(v["task_type"], "CAUSAL_LM");
    assert_eq!(v["inference_mode"], true);
    assert_eq!(
        v["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(
        v["rank_pattern"],
        serde_json::json!({"model.layers.1.self_attn.q_proj": 2})
    );
    assert_eq!(v["alpha_pattern"], serde_json::json!({"v_proj": 3}));
    assert_eq!(
        v["base_model_name_or_path"],
        "tests/fixtures/mergekit/models/base"
    );

    let (ia3, ia3_tensors) = tiny_llama_ia3();
    let out3 = dir.path().join("b");
    write_adapter(&out3, &ia3, &borrow(&ia3_tensors), false).unwrap();
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out3.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(v["peft_type"], "IA3");
    assert_eq!(v["feedforward_modules"], serde_json::json!(["down_proj"]));
    assert_eq!(
        v["target_modules"],
        serde_json::json!(["k_proj", "down_proj"])
    );
}

#[test]
fn existing_adapter_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a");
    let (config, tensors) = tiny_llama_lora();
    write_adapter(&out, &config, &borrow(&tensors), false).unwrap();
    let err = write_adapter(&out, &config, &borrow(&tensors), false).unwrap_err();
    assert!(matches!(err, IoError::AdapterExists { .. }), "{err}");
    assert!(err.to_string().contains("--overwrite"), "{err}");
    // A .bin alone counts as an adapter too.
    let other = dir.path().join("bin");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("adapter_model.bin"), b"x").unwrap();
    assert!(matches!(
        write_adapter(&other, &config, &borrow(&tensors), false),
        Err(IoError::AdapterExists { .. })
    ));

    // Overwrite with an (IA)^3 adapter: the old one is replaced and nothing is left behind.
    let (ia3, ia3_tensors) = tiny_llama_ia3();
    write_adapter(&out, &ia3, &borrow(&ia3_tensors), true).unwrap();
    assert_eq!(Adapter::open(&out).unwrap().kind(), AdapterKind::Ia3);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]);
}

#[test]
fn streaming_writer_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a");
    let (config, tensors) = tiny_llama_lora();
    let layout = tensors
        .iter()
        .map(|(k, s, _)| (k.clone(), s.clone()))
        .collect();
    let mut w = AdapterWriter::create(&out, &config, layout, DType::BF16, false).unwrap();
    for (k, _, d) in &tensors {
        w.begin(k).unwrap();
        let (x, y) = d.split_at(d.len() / 2);
        w.write(x).unwrap();
        w.write(y).unwrap();
    }
    w.finish().unwrap();
    let a = Adapter::open(&out).unwrap();
    let (k, _, d) = &tensors[0];
    let back = a.read(k).unwrap();
    for (b, x) in back.iter().zip(d) {
        assert_eq!(*b, support::bf16_to_f32(support::naive_bf16_bits(*x)));
    }
    // Too little data for a tensor: the error names the adapter file, not the staging one.
    let out2 = dir.path().join("b");
    let layout = tensors
        .iter()
        .map(|(k, s, _)| (k.clone(), s.clone()))
        .collect();
    let mut w = AdapterWriter::create(&out2, &config, layout, DType::F32, false).unwrap();
    w.begin(&tensors[0].0).unwrap();
    w.write(&[1.0]).unwrap();
    let err = w.begin(&tensors[1].0).unwrap_err();
    assert!(matches!(err, IoError::TensorSize { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("b/{ADAPTER_WEIGHTS_FILE}")),
        "{err}"
    );
    drop(w);
    assert!(!out2.join(ADAPTER_WEIGHTS_FILE).exists());
    assert!(!out2.join(".adapter.partial").exists());
}

// ---------------------------------------------------------------------------------------
// Hand-crafted bad adapters.

/// Writes an adapter directory by hand: a config JSON and an F32 safetensors file.
fn craft(dir: &Path, config: &str, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(ADAPTER_CONFIG_FILE), config).unwrap();
    let entries: Vec<support::Entry<'_>> = tensors
        .iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            (*k, "F32", s.clone(), f32_bytes(&vec![0.5; n]))
        })
        .collect();
    write_st(&dir.join(ADAPTER_WEIGHTS_FILE), &entries);
    dir.to_path_buf()
}

const LORA_R2: &str =
    r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#;
const QA: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const QB: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const QMOD: &str = "model.layers.0.self_attn.q_proj";

/// Asserts `err` displays every one of `needles`.
fn names(err: &IoError, needles: &[&str]) {
    let s = err.to_string();
    for n in needles {
        assert!(s.contains(n), "message {s:?} lacks {n:?}");
    }
}

#[test]
fn missing_lora_b() {
    let dir = tempfile::tempdir().unwrap();
    let d = craft(dir.path(), LORA_R2, &[(QA, vec![2, 16])]);
    let err = Adapter::open(&d).unwrap_err();
    assert!(matches!(err, IoError::AdapterTensor { .. }), "{err}");
    names(&err, &[ADAPTER_WEIGHTS_FILE, QA, QB, QMOD, "lora_B"]);
}

#[test]
fn rank_mismatch_between_factors() {
    let dir = tempfile::tempdir().unwrap();
    let d = craft(dir.path(), LORA_R2, &[(QA, vec![2, 16]), (QB, vec![16, 3])]);
    let err = Adapter::open(&d).unwrap_err();
    assert!(matches!(err, IoError::AdapterTensor { .. }), "{err}");
    names(&err, &[ADAPTER_WEIGHTS_FILE, QB, QA, "[16, 3]"]);
}

#[test]
fn rank_disagrees_with_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = craft(dir.path(), LORA_R2, &[(QA, vec![4, 16]), (QB, vec![16, 4])]);
    let err = Adapter::open(&d).unwrap_err();
    names(
        &err,
        &[ADAPTER_WEIGHTS_FILE, QA, QMOD, "rank 4", "rank 2", "from r"],
    );
    // The same tensors with a matching rank_pattern open.
    let cfg = r#"{"peft_type": "LORA", "r": 2, "rank_pattern": {"q_proj": 4}}"#;
    let d = craft(
        &dir.path().join("ok"),
        cfg,
        &[(QA, vec![4, 16]), (QB, vec![16, 4])],
    );
    let a = Adapter::open(&d).unwrap();
    assert_eq!(a.lora_modules()[0].rank, 4);
    assert_eq!(a.lora_modules()[0].scaling, 8.0 / 4.0); // lora_alpha default 8
                                                        // ... and a rank_pattern that disagrees is named.
    let cfg = r#"{"peft_type": "LORA", "r": 4, "rank_pattern": {"layers.0.self_attn.q_proj": 3}}"#;
    let d = craft(
        &dir.path().join("bad"),
        cfg,
        &[(QA, vec![4, 16]), (QB, vec![16, 4])],
    );
    names(&Adapter::open(&d).unwrap_err(), &[QA, "rank_pattern"]);
}

#[test]
fn unknown_peft_type() {
    let dir = tempfile::tempdir().unwrap();
    let d = craft(
        dir.path(),
        r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}"#,
        &[("prompt_embeddings", vec![20, 16])],
    );
    let err = Adapter::open(&d).unwrap_err();
    assert!(matches!(err, IoError::AdapterConfig { .. }), "{err}");
    names(
        &err,
        &[
            ADAPTER_CONFIG_FILE,
            "peft_type",
            "PREFIX_TUNING",
            "LORA",
            "IA3",
        ],
    );
}

#[test]
fn bin_only_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), LORA_R2).unwrap();
    std::fs::write(dir.path().join("adapter_model.bin"), b"PK\x03\x04").unwrap();
    let err = Adapter::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, IoError::AdapterNotSafetensors { .. }),
        "{err}"
    );
    names(&err, &["adapter_model.bin", "convert", "safetensors"]);
}

#[test]
fn not_an_adapter_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = Adapter::open(dir.path()).unwrap_err();
    assert!(matches!(err, IoError::NoAdapter { .. }), "{err}");
    names(&err, &["adapter_config.json"]);
    std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), LORA_R2).unwrap();
    names(
        &Adapter::open(dir.path()).unwrap_err(),
        &[ADAPTER_WEIGHTS_FILE],
    );
    names(
        &Adapter::open(&dir.path().join("nope")).unwrap_err(),
        &["nope", "no such directory"],
    );
}

#[test]
fn unsupported_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // DoRA magnitude vector.
    let mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    let d = craft(
        &dir.path().join("dora"),
        LORA_R2,
        &[(QA, vec![2, 16]), (QB, vec![16, 2]), (mag, vec![16])],
    );
    names(
        &Adapter::open(&d).unwrap_err(),
        &[ADAPTER_WEIGHTS_FILE, mag],
    );
    // A key that still holds the adapter name.
    let named = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
    let d = craft(&dir.path().join("named"), LORA_R2, &[(named, vec![2, 16])]);
    names(
        &Adapter::open(&d).unwrap_err(),
        &[named, "lora_A.default.weight"],
    );
    // A 3-D factor.
    let d = craft(
        &dir.path().join("conv"),
        LORA_R2,
        &[(QA, vec![2, 16, 1]), (QB, vec![16, 2])],
    );
    names(&Adapter::open(&d).unwrap_err(), &[QA, "2-D"]);
    // An (IA)^3 vector that is a matrix.
    let k = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l";
    let d = craft(
        &dir.path().join("ia3"),
        r#"{"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []}"#,
        &[(k, vec![2, 8])],
    );
    let err = Adapter::open(&d).unwrap_err();
    assert!(matches!(err, IoError::AdapterTensor { .. }), "{err}");
    names(&err, &[ADAPTER_WEIGHTS_FILE, k, "[2, 8]"]);
    // An (IA)^3 vector whose orientation contradicts feedforward_modules.
    let d = craft(
        &dir.path().join("ia3ff"),
        r#"{"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["k_proj"]}"#,
        &[(k, vec![8, 1])],
    );
    names(&Adapter::open(&d).unwrap_err(), &[k, "feedforward_modules"]);
    // DoRA in the config.
    let d = craft(
        &dir.path().join("dora_cfg"),
        r#"{"peft_type": "LORA", "r": 2, "use_dora": true}"#,
        &[(QA, vec![2, 16]), (QB, vec![16, 2])],
    );
    names(
        &Adapter::open(&d).unwrap_err(),
        &[ADAPTER_CONFIG_FILE, "use_dora", "DoRA"],
    );
    // No adapter tensors at all (only modules_to_save).
    let d = craft(
        &dir.path().join("empty"),
        LORA_R2,
        &[("base_model.model.score.weight", vec![2, 16])],
    );
    let err = Adapter::open(&d).unwrap_err();
    assert!(matches!(err, IoError::AdapterEmpty { .. }), "{err}");
}

#[test]
fn extra_tensors_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let score = "base_model.model.score.weight";
    let d = craft(
        dir.path(),
        LORA_R2,
        &[(QA, vec![2, 16]), (QB, vec![16, 2]), (score, vec![3, 16])],
    );
    let a = Adapter::open(&d).unwrap();
    assert_eq!(a.extra_keys(), &[score.to_string()]);
    assert_eq!(a.read(score).unwrap(), vec![0.5; 48]);
    assert!(matches!(a.read("nope"), Err(IoError::UnknownTensor { .. })));
}

/// A base checkpoint holding `q_proj` of layer 0 with the given shape.
fn base_with(dir: &Path, shape: Vec<usize>) -> Checkpoint {
    std::fs::create_dir_all(dir).unwrap();
    let n: usize = shape.iter().product();
    write_st(
        &dir.join("model.safetensors"),
        &[(
            "model.layers.0.self_attn.q_proj.weight",
            "F32",
            shape,
            f32_bytes(&vec![0.0; n]),
        )],
    );
    Checkpoint::open(dir).unwrap()
}

#[test]
fn module_not_in_base() {
    let dir = tempfile::tempdir().unwrap();
    let kb = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight";
    let ka = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    let d = craft(
        &dir.path().join("a"),
        LORA_R2,
        &[
            (QA, vec![2, 16]),
            (QB, vec![16, 2]),
            (ka, vec![2, 16]),
            (kb, vec![8, 2]),
        ],
    );
    let a = Adapter::open(&d).unwrap();
    let base = base_with(&dir.path().join("base"), vec![16, 16]);
    let err = a.check_base(&base).unwrap_err();
    assert!(matches!(err, IoError::AdapterBase { .. }), "{err}");
    names(
        &err,
        &[
            ADAPTER_WEIGHTS_FILE,
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.k_proj.weight",
            "base",
        ],
    );
}

#[test]
fn shape_mismatch_with_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = craft(
        &dir.path().join("a"),
        LORA_R2,
        &[(QA, vec![2, 16]), (QB, vec![16, 2])],
    );
    let a = Adapter::open(&d).unwrap();
    let base = base_with(&dir.path().join("base"), vec![16, 12]);
    let err = a.check_base(&base).unwrap_err();
    assert!(matches!(err, IoError::AdapterBase { .. }), "{err}");
    names(
        &err,
        &[
            ADAPTER_WEIGHTS_FILE,
            QMOD,
            "base/model.safetensors",
            "[16, 12]",
            "[16, 16]",
        ],
    );
    // fan_in_fan_out stores the base transposed: [in, out].
    let cfg = r#"{"peft_type": "LORA", "r": 2, "fan_in_fan_out": true}"#;
    let d = craft(
        &dir.path().join("t"),
        cfg,
        &[(QA, vec![2, 12]), (QB, vec![16, 2])],
    );
    let a = Adapter::open(&d).unwrap();
    let base_t = base_with(&dir.path().join("base_t"), vec![12, 16]);
    a.check_base(&base_t).unwrap();
    assert!(a.check_base(&base).is_err());

    // (IA)^3: a feedforward vector must match the inputs, others the outputs.
    let k = "base_model.model.model.layers.0.self_attn.q_proj.ia3_l";
    let cfg =
        r#"{"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": ["q_proj"]}"#;
    let d = craft(&dir.path().join("ia3"), cfg, &[(k, vec![1, 12])]);
    Adapter::open(&d).unwrap().check_base(&base).unwrap();
    let d = craft(&dir.path().join("ia3b"), cfg, &[(k, vec![1, 16])]);
    let err = Adapter::open(&d).unwrap().check_base(&base).unwrap_err();
    names(&err, &[QMOD, k, "16 elements", "input features", "12"]);
}

#[test]
fn writer_validates_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = tiny_llama_lora();
    let a = vec![0.0f32; 64];
    let b = vec![0.0f32; 64];
    // Keys without PEFT's prefix would not load in PEFT.
    let bare = "model.layers.0.self_attn.q_proj.lora_A.weight";
    let bare_b = "model.layers.0.self_attn.q_proj.lora_B.weight";
    let t = vec![
        (bare.to_string(), vec![4, 16], a.as_slice()),
        (bare_b.to_string(), vec![16, 4], b.as_slice()),
    ];
    let err = write_adapter(&dir.path().join("x"), &config, &t, false).unwrap_err();
    names(&err, &[bare, "base_model.model."]);
    // Rank disagreeing with the config is refused before any file is written.
    let t = vec![
        (lora_a_key(QMOD), vec![2, 16], &a[..32]),
        (lora_b_key(QMOD), vec![16, 2], &b[..32]),
    ];
    let out = dir.path().join("y");
    let err = write_adapter(&out, &config, &t, false).unwrap_err();
    names(&err, &[ADAPTER_WEIGHTS_FILE, QA, "rank 2"]);
    assert!(!out.exists());
    // Data of the wrong length.
    let t = vec![
        (lora_a_key(QMOD), vec![4, 16], &a[..63]),
        (lora_b_key(QMOD), vec![16, 4], b.as_slice()),
    ];
    let err = write_adapter(&dir.path().join("z"), &config, &t, false).unwrap_err();
    assert!(matches!(err, IoError::TensorSize { .. }), "{err}");
}

#[test]
fn reads_half_precision_and_patterns_from_peft_files() {
    // A config as PEFT 0.21 writes it (sorted keys, many fields we keep raw).
    let cfg = r#"{
  "alpha_pattern": {"^model.layers.0.self_attn.q_proj": 32},
  "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "lora_alpha": 16,
  "lora_dropout": 0.05,
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 2,
  "rank_pattern": {},
  "revision": null,
  "target_modules": "model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj",
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
}"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), cfg).unwrap();
    let a_vals: Vec<f32> = lcg(7, 32);
    let b_vals: Vec<f32> = lcg(8, 32);
    let f16 = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect()
    };
    write_st(
        &dir.path().join(ADAPTER_WEIGHTS_FILE),
        &[
            (QA, "F16", vec![2, 16], f16(&a_vals)),
            (QB, "F16", vec![16, 2], f16(&b_vals)),
        ],
    );
    let a = Adapter::open(dir.path()).unwrap();
    let m = &a.lora_modules()[0];
    assert_eq!((m.rank, m.alpha, m.scaling), (2, 32.0, 16.0));
    let AdapterConfig::Lora(c) = a.config() else {
        panic!("LoRA config expected")
    };
    assert!(c.target_modules.matches(QMOD).unwrap());
    assert!(!c
        .target_modules
        .matches("model.layers.0.self_attn.k_proj")
        .unwrap());
    assert_eq!(c.extra["lora_dropout"], 0.05);
    assert_eq!(c.extra["layers_pattern"], Value::Null);
    let back = a.read(QA).unwrap();
    for (x, y) in back.iter().zip(&a_vals) {
        assert_eq!(*x, half::f16::from_f32(*y).to_f32());
    }
    // Round trip of the config keeps every field, nulls included.
    let again: BTreeMap<String, Value> = serde_json::from_str(&a.config().to_json()).unwrap();
    let orig: BTreeMap<String, Value> = serde_json::from_str(cfg).unwrap();
    assert_eq!(again, orig);
}
