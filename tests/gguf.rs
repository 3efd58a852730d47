//! GGUF files as merge inputs, through the binary: two synthetic llama GGUF files (written
//! here by a hand-made GGUF v3 writer, independent of the reader's candle dependency) merged
//! with `linear`; the output equals the naive f64 combination of the Hugging Face views,
//! which checks renaming and the q/k un-permutation end to end, and gets a synthesized
//! config.json and tokenizer.json.

use crate::common::*;
use std::path::Path;

/// One tensor: GGUF name, row-major shape, values.
struct T {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

enum V {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// A GGUF v3 file (default alignment 32), every tensor F32.
fn gguf_bytes(meta: &[(&str, V)], tensors: &[T]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        match v {
            V::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            V::F32(x) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            V::Str(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut b, s);
            }
            V::Strs(list) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(list.len() as u64).to_le_bytes());
                for s in list {
                    put_str(&mut b, s);
                }
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            b.extend_from_slice(&(*d as u64).to_le_bytes()); // ne0 = innermost
        }
        b.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (t.values.len() as u64 * 4).next_multiple_of(32);
    }
    b.resize(b.len().next_multiple_of(32), 0);
    for t in tensors {
        for v in &t.values {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32), 0);
    }
    b
}

fn lcg_values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) as f32
        })
        .collect()
}

/// llama.cpp's converter permutation, naively: GGUF row (h, i, j) = HF row (h, j, i).
fn permute(hf: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = hf.len() / rows;
    let d = rows / heads;
    let mut out = vec![0.0; hf.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let (g, src) = (h * d + 2 * i + j, h * d + j * (d / 2) + i);
                out[g * cols..(g + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Writes a llama GGUF (hidden 8, 2 heads, 1 KV head, 1 layer, vocab 4 with a tiny BPE
/// vocabulary) to `path`; returns the Hugging Face view: name → (shape, values).
fn write_model(path: &Path, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let specs: &[(&str, &str, &[usize], usize)] = &[
        ("token_embd.weight", "model.embed_tokens.weight", &[4, 8], 0),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
            &[8],
            0,
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            &[8, 8],
            2,
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            &[4, 8],
            1,
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
            &[4, 8],
            0,
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
            &[8, 8],
            0,
        ),
        (
            "blk.0.ffn_norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            &[8],
            0,
        ),
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            &[6, 8],
            0,
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            &[6, 8],
            0,
        ),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
            &[8, 6],
            0,
        ),
        ("output_norm.weight", "model.norm.weight", &[8], 0),
    ];
    let mut hf = Vec::new();
    let mut tensors = Vec::new();
    for (k, (g, h, shape, heads)) in specs.iter().enumerate() {
        let n: usize = shape.iter().product();
        let v = lcg_values(seed * 100 + k as u64, n);
        let stored = if *heads > 0 {
            permute(&v, shape[0], *heads)
        } else {
            v.clone()
        };
        tensors.push(T {
            name: g.to_string(),
            shape: shape.to_vec(),
            values: stored,
        });
        hf.push((h.to_string(), shape.to_vec(), v));
    }
    let s = |x: &str| V::Str(x.to_string());
    let strs = |x: &[&str]| V::Strs(x.iter().map(|t| t.to_string()).collect());
    let meta = [
        ("general.architecture", s("llama")),
        ("general.name", s("tiny")),
        ("llama.block_count", V::U32(1)),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(8)),
        ("llama.feed_forward_length", V::U32(6)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        ("tokenizer.ggml.tokens", strs(&["<eos>", "a", "b", "ab"])),
        ("tokenizer.ggml.merges", strs(&["a b"])),
        ("tokenizer.ggml.eos_token_id", V::U32(0)),
    ];
    std::fs::write(path, gguf_bytes(&meta, &tensors)).unwrap();
    hf
}

#[test]
fn linear_merge_of_two_gguf_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let a = write_model(&d.join("a.gguf"), 1);
    let b = write_model(&d.join("b.gguf"), 2);
    std::fs::write(
        d.join("lin.yaml"),
        "merge_method: linear\nmodels:\n  - model: a.gguf\n    parameters: {weight: 0.25}\n  - model: b.gguf\n    parameters: {weight: 0.75}\ndtype: float32\n",
    )
    .unwrap();
    run_ok(d, &["merge", "lin.yaml", "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    assert_eq!(out.len(), a.len(), "{:?}", out.keys().collect::<Vec<_>>());
    for ((name, shape, va), (_, _, vb)) in a.iter().zip(&b) {
        let t = out.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(&t.shape, shape, "{name}");
        let want: Vec<f64> = va
            .iter()
            .zip(vb)
            .map(|(&x, &y)| 0.25 * x as f64 + 0.75 * y as f64)
            .collect();
        assert_close(name, &t.values, &want, 1e-6, 1e-3);
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["num_attention_heads"], 2);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["vocab_size"], 4);
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(tok["model"]["type"], "BPE");
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["eos_token"], "<eos>");
    assert_eq!(tok["model"]["vocab"]["ab"], 3);
}

#[test]
fn gguf_with_unknown_tensor_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_model(&d.join("a.gguf"), 1);
    let mut bytes = std::fs::read(d.join("a.gguf")).unwrap();
    // Rename one tensor in place to a name of the same length that has no HF counterpart.
    let from = b"blk.0.ffn_up.weight";
    let to = b"blk.0.ffn_xx.weight";
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(d.join("c.gguf"), bytes).unwrap();
    std::fs::write(
        d.join("lin.yaml"),
        "merge_method: linear\nmodels:\n  - model: a.gguf\n    parameters: {weight: 0.5}\n  - model: c.gguf\n    parameters: {weight: 0.5}\n",
    )
    .unwrap();
    let err = run_err(d, &["merge", "lin.yaml", "--out", "out", "--quiet"]);
    assert!(
        err.contains("c.gguf") && err.contains("blk.0.ffn_xx.weight"),
        "{err}"
    );
}

#[test]
fn gguf_vocabulary_serves_tokenizer_source() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let a = write_model(&d.join("a.gguf"), 3);
    let b = write_model(&d.join("b.gguf"), 4);
    std::fs::write(
        d.join("lin.yaml"),
        "merge_method: linear\nmodels:\n  - model: a.gguf\n    parameters: {weight: 0.5}\n  - model: b.gguf\n    parameters: {weight: 0.5}\ntokenizer_source: b.gguf\ndtype: float32\n",
    )
    .unwrap();
    run_ok(d, &["merge", "lin.yaml", "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let name = "model.embed_tokens.weight";
    let (va, vb) = (
        &a.iter().find(|t| t.0 == name).unwrap().2,
        &b.iter().find(|t| t.0 == name).unwrap().2,
    );
    let want: Vec<f64> = va
        .iter()
        .zip(vb.iter())
        .map(|(&x, &y)| 0.5 * x as f64 + 0.5 * y as f64)
        .collect();
    assert_close(name, &out[name].values, &want, 1e-6, 1e-3);
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(tok["model"]["vocab"]["ab"], 3);
}
