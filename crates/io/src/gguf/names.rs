//! Tensor names: llama.cpp's GGUF names (`blk.N.attn_q.weight`) to Hugging Face names
//! (`model.layers.N.self_attn.q_proj.weight`), for the Llama-family architectures
//! (`llama`, which llama.cpp also uses for Mistral, and `qwen2`).
//!
//! The map follows gguf-py's `TENSOR_MAPPINGS` (gguf/tensor_mapping.py) for these
//! architectures, read backwards.

/// What to do with a GGUF tensor when reading it as a Hugging Face checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameMapping {
    /// Keep it under this Hugging Face name.
    Keep(String),
    /// Drop it: a tensor llama.cpp computes from the config and Hugging Face does not store
    /// (`rope_freqs.weight`, the Llama 3 RoPE frequency factors; `blk.N.attn_rot_embd`).
    Drop,
}

/// Per-layer tensors: GGUF stem after `blk.N.` → Hugging Face stem after `model.layers.N.`.
const LAYER_MAP: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model tensors: GGUF stem → Hugging Face stem.
const GLOBAL_MAP: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Maps a GGUF tensor name to its Hugging Face name; `None` for a name outside the map.
/// Suffixes `.weight` and `.bias` are kept.
pub fn hf_name(gguf: &str) -> Option<NameMapping> {
    if gguf == "rope_freqs.weight" {
        return Some(NameMapping::Drop);
    }
    let (stem, suffix) = match gguf.rsplit_once('.') {
        Some((s, suf @ ("weight" | "bias"))) => (s, suf),
        _ => return None,
    };
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (layer, part) = rest.split_once('.')?;
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if part == "attn_rot_embd" {
            return Some(NameMapping::Drop);
        }
        let (_, hf) = LAYER_MAP.iter().find(|(g, _)| *g == part)?;
        return Some(NameMapping::Keep(format!(
            "model.layers.{layer}.{hf}.{suffix}"
        )));
    }
    let (_, hf) = GLOBAL_MAP.iter().find(|(g, _)| *g == stem)?;
    Some(NameMapping::Keep(format!("{hf}.{suffix}")))
}

/// Maps a Hugging Face name back to its GGUF name (the inverse of [`hf_name`] on kept
/// tensors); `None` for a name outside the map.
pub fn gguf_name(hf: &str) -> Option<String> {
    let (stem, suffix) = match hf.rsplit_once('.') {
        Some((s, suf @ ("weight" | "bias"))) => (s, suf),
        _ => return None,
    };
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, part) = rest.split_once('.')?;
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (g, _) = LAYER_MAP.iter().find(|(_, h)| *h == part)?;
        return Some(format!("blk.{layer}.{g}.{suffix}"));
    }
    let (g, _) = GLOBAL_MAP.iter().find(|(_, h)| *h == stem)?;
    Some(format!("{g}.{suffix}"))
}

/// Which RoPE row permutation llama.cpp's converter applied to a tensor, to be undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpermute {
    /// Leave the rows as they are.
    None,
    /// Undo `LlamaModel.permute` with this many heads (`n_head` for `q_proj`,
    /// `n_head_kv` for `k_proj`).
    Heads(usize),
}

/// The un-permutation for Hugging Face tensor `hf` in a file of GGUF architecture `arch`:
/// llama.cpp's `convert_hf_to_gguf.py` permutes the rows of `q_proj` and `k_proj` (weights
/// and biases) for architecture `llama` only (its `LlamaModel`, also used for Mistral);
/// `qwen2` keeps Hugging Face's layout (NeoX-style RoPE).
pub fn unpermute_for(arch: &str, hf: &str, n_head: usize, n_head_kv: usize) -> Unpermute {
    if arch != "llama" {
        return Unpermute::None;
    }
    let is = |proj: &str| {
        hf.ends_with(&format!("{proj}.weight")) || hf.ends_with(&format!("{proj}.bias"))
    };
    if is("self_attn.q_proj") {
        Unpermute::Heads(n_head)
    } else if is("self_attn.k_proj") {
        Unpermute::Heads(n_head_kv)
    } else {
        Unpermute::None
    }
}

/// Undoes llama.cpp's RoPE row permutation in place on a row-major tensor of `rows` rows of
/// `row_bytes` bytes each.
///
/// The converter maps Hugging Face rows to GGUF rows by
/// `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)` with `d = rows / n_head`: within each
/// head, GGUF row `2 i + j` is Hugging Face row `j d/2 + i` (`i < d/2`, `j ∈ {0, 1}`).
/// This writes every Hugging Face row `j d/2 + i` from GGUF row `2 i + j`.
/// Returns `Err` with a reason when `rows` is not a multiple of `2 n_head`.
pub fn unpermute_rows(
    data: &mut [u8],
    rows: usize,
    row_bytes: usize,
    n_head: usize,
) -> Result<(), String> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(format!(
            "{rows} rows cannot be split into {n_head} heads of an even size (needed to undo llama.cpp's RoPE permutation)"
        ));
    }
    if data.len() != rows * row_bytes {
        return Err(format!(
            "{} bytes do not hold {rows} rows of {row_bytes} bytes",
            data.len()
        ));
    }
    let d = rows / n_head;
    let half = d / 2;
    let head_bytes = d * row_bytes;
    let mut scratch = vec![0u8; head_bytes];
    for head in data.chunks_exact_mut(head_bytes) {
        for i in 0..half {
            for j in 0..2 {
                let src = (2 * i + j) * row_bytes;
                let dst = (j * half + i) * row_bytes;
                scratch[dst..dst + row_bytes].copy_from_slice(&head[src..src + row_bytes]);
            }
        }
        head.copy_from_slice(&scratch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.attn_q.weight",
                "model.layers.12.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
            ),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.3.ffn_gate.weight",
                "model.layers.3.mlp.gate_proj.weight",
            ),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_name(g), Some(NameMapping::Keep(h.to_string())), "{g}");
            assert_eq!(gguf_name(h).as_deref(), Some(g), "{h}");
        }
        assert_eq!(hf_name("rope_freqs.weight"), Some(NameMapping::Drop));
        assert_eq!(
            hf_name("blk.1.attn_rot_embd.weight"),
            Some(NameMapping::Drop)
        );
        for bad in [
            "blk.x.attn_q.weight",
            "blk.1.attn_qkv.weight",
            "foo",
            "output.scale",
            "blk..attn_q.weight",
        ] {
            assert_eq!(hf_name(bad), None, "{bad}");
        }
    }

    /// The converter's forward permutation written naively from its definition
    /// (reshape(n_head, 2, d/2, cols).swapaxes(1, 2)): GGUF row (h, i, j) = HF row (h, j, i).
    fn permute_naive(hf: &[f64], rows: usize, cols: usize, n_head: usize) -> Vec<f64> {
        let d = rows / n_head;
        let mut out = vec![0.0; hf.len()];
        for h in 0..n_head {
            for i in 0..d / 2 {
                for j in 0..2 {
                    let g_row = h * d + i * 2 + j;
                    let h_row = h * d + j * (d / 2) + i;
                    for c in 0..cols {
                        out[g_row * cols + c] = hf[h_row * cols + c];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        for (rows, cols, n_head) in [(12, 3, 3), (8, 1, 1), (16, 5, 2), (6, 2, 3)] {
            let hf: Vec<f64> = (0..rows * cols).map(|k| k as f64 * 0.5 - 3.0).collect();
            let gguf = permute_naive(&hf, rows, cols, n_head);
            let mut bytes: Vec<u8> = gguf.iter().flat_map(|v| v.to_le_bytes()).collect();
            unpermute_rows(&mut bytes, rows, cols * 8, n_head).unwrap();
            let back: Vec<f64> = bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(back, hf, "rows {rows} cols {cols} heads {n_head}");
        }
        let mut b = vec![0u8; 10 * 4];
        assert!(unpermute_rows(&mut b, 10, 4, 3).is_err());
        assert!(unpermute_rows(&mut b, 10, 4, 0).is_err());
    }

    #[test]
    fn unpermute_only_llama_q_and_k() {
        let q = "model.layers.0.self_attn.q_proj.weight";
        let k = "model.layers.0.self_attn.k_proj.bias";
        let v = "model.layers.0.self_attn.v_proj.weight";
        assert_eq!(unpermute_for("llama", q, 9, 3), Unpermute::Heads(9));
        assert_eq!(unpermute_for("llama", k, 9, 3), Unpermute::Heads(3));
        assert_eq!(unpermute_for("llama", v, 9, 3), Unpermute::None);
        assert_eq!(unpermute_for("qwen2", q, 9, 3), Unpermute::None);
    }
}
