//! Seeded synthetic Llama-shaped checkpoints (demo, tests, benchmarks).
//!
//! Values come from a counter-based generator keyed by (seed, tensor name, element index), so a
//! checkpoint is the same whatever the thread count, and generation is parallel and streaming
//! (a 0.5B-parameter model is written in bounded memory).

use crate::error::EngineError;
use amalgam_io::{CheckpointWriter, DType, OutputLayout, OutputTensor};
use rayon::prelude::*;
use std::path::Path;

/// Shape of a synthetic Llama-family model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key-value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Stored dtype.
    pub dtype: DType,
}

impl SynthSpec {
    /// A tiny model (hidden 64, 4 layers, vocab 256): about 0.1M parameters.
    pub fn tiny() -> Self {
        Self {
            hidden: 64,
            intermediate: 176,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            vocab: 256,
            dtype: DType::F32,
        }
    }

    /// Tensor names and shapes, in Hugging Face Llama order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        let kv = h / self.heads * self.kv_heads;
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            v.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            v.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![self.intermediate, h],
            ));
            v.push((
                format!("{p}.mlp.up_proj.weight"),
                vec![self.intermediate, h],
            ));
            v.push((
                format!("{p}.mlp.down_proj.weight"),
                vec![h, self.intermediate],
            ));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        v
    }

    /// Number of parameters.
    pub fn params(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// A Hugging Face `config.json` for this shape.
    pub fn config_json(&self) -> String {
        let dtype = match self.dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        };
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": dtype,
        });
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
        s.push('\n');
        s
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A uniform value in [-1, 1) for (seed, tensor, index).
pub fn uniform(seed: u64, tensor_hash: u64, i: u64) -> f32 {
    let r = splitmix(seed ^ splitmix(tensor_hash ^ splitmix(i)));
    ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// How a model's values are made.
#[derive(Debug, Clone, Copy)]
pub struct SynthValues {
    /// Seed of the base weights.
    pub base_seed: u64,
    /// Seed of this model's perturbation (ignored when `delta_scale` is 0).
    pub delta_seed: u64,
    /// Perturbation amplitude (0 for the base itself).
    pub delta_scale: f32,
    /// Fraction of elements perturbed (1.0: all), chosen per element by the generator.
    pub delta_density: f32,
}

/// Value of element `i` of tensor `name`.
pub fn value(v: &SynthValues, name: &str, is_norm: bool, i: u64) -> f32 {
    let h = name_hash(name);
    let base = if is_norm {
        1.0 + 0.1 * uniform(v.base_seed, h, i)
    } else {
        0.05 * uniform(v.base_seed, h, i)
    };
    if v.delta_scale == 0.0 {
        return base;
    }
    let gate = (uniform(v.delta_seed ^ 0x5555, h, i) + 1.0) * 0.5;
    if gate >= v.delta_density {
        return base;
    }
    base + v.delta_scale * uniform(v.delta_seed, h, i)
}

/// Write a seeded "fine-tune" of the checkpoint at `from` (a Hugging Face directory, a
/// safetensors file or a GGUF file) into `dir`: every floating-point tensor of two or more
/// dimensions gets `scale · u` added, u uniform in [-1, 1) keyed by (seed, tensor, element);
/// vectors (norms, biases) and other dtypes are copied. Config and tokenizer files come along.
pub fn perturb_model(
    from: &Path,
    dir: &Path,
    seed: u64,
    scale: f32,
    shard_bytes: u64,
    overwrite: bool,
) -> Result<(), EngineError> {
    let src = amalgam_io::Checkpoint::open(from)?;
    let tensors: Vec<OutputTensor> = src
        .tensors()
        .iter()
        .map(|t| OutputTensor {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
        })
        .collect();
    let layout = OutputLayout::plan(tensors.clone(), shard_bytes);
    let mut w = CheckpointWriter::create(dir, layout, overwrite)?;
    let mut buf = vec![0f32; CHUNK];
    for t in &tensors {
        w.begin_tensor(&t.name)?;
        if t.shape.len() < 2 || !t.dtype.is_float_convertible() {
            w.write_raw(src.raw(&t.name)?)?;
            continue;
        }
        let h = name_hash(&t.name);
        write_chunked(&mut w, &mut buf, t, |start, chunk| {
            src.read_f32(&t.name, start..start + chunk.len(), chunk)?;
            chunk.par_iter_mut().enumerate().for_each(|(k, x)| {
                *x += scale * uniform(seed, h, (start + k) as u64);
            });
            Ok(())
        })?;
    }
    w.finish()?;
    match amalgam_io::gguf::gguf_source(&src) {
        Some(g) => amalgam_io::gguf::write_aux_files(g, dir, true, true)?,
        None => amalgam_io::copy_aux_files(src.root(), dir)?,
    };
    Ok(())
}

/// Elements per chunk when generating tensors.
const CHUNK: usize = 1 << 20;

/// Writes tensor `t` (its writer positioned at it) chunk by chunk through `buf`: `fill(start,
/// chunk)` sets the values of elements `start..start + chunk.len()`.
fn write_chunked(
    w: &mut CheckpointWriter,
    buf: &mut [f32],
    t: &OutputTensor,
    mut fill: impl FnMut(usize, &mut [f32]) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let n: usize = t.shape.iter().product();
    let mut start = 0;
    while start < n {
        let len = buf.len().min(n - start);
        fill(start, &mut buf[..len])?;
        w.write_f32(&buf[..len])?;
        start += len;
    }
    Ok(())
}

/// Write a synthetic checkpoint (safetensors files, index, config.json) into `dir`.
pub fn write_model(
    dir: &Path,
    spec: &SynthSpec,
    values: &SynthValues,
    shard_bytes: u64,
    overwrite: bool,
) -> Result<(), EngineError> {
    let tensors: Vec<OutputTensor> = spec
        .tensors()
        .into_iter()
        .map(|(name, shape)| OutputTensor {
            name,
            dtype: spec.dtype.clone(),
            shape,
        })
        .collect();
    let layout = OutputLayout::plan(tensors.clone(), shard_bytes);
    let mut w = CheckpointWriter::create(dir, layout, overwrite)?;
    let mut buf = vec![0f32; CHUNK];
    for t in &tensors {
        w.begin_tensor(&t.name)?;
        let is_norm = t.shape.len() == 1;
        write_chunked(&mut w, &mut buf, t, |start, chunk| {
            chunk.par_iter_mut().enumerate().for_each(|(k, x)| {
                *x = value(values, &t.name, is_norm, (start + k) as u64);
            });
            Ok(())
        })?;
    }
    w.finish()?;
    amalgam_io::write_text_atomic(&dir.join("config.json"), &spec.config_json())?;
    Ok(())
}

/// A tiny family for tests in `dir`: `base`, `a` and `b` ([`SynthSpec::tiny`], f32), the
/// fine-tunes the base plus dense deltas of scale 0.01.
pub fn write_tiny_family(dir: &Path) -> Result<(), EngineError> {
    let spec = SynthSpec::tiny();
    for (i, name) in ["base", "a", "b"].iter().enumerate() {
        let v = SynthValues {
            base_seed: 3,
            delta_seed: 50 + i as u64,
            delta_scale: if i == 0 { 0.0 } else { 0.01 },
            delta_density: 1.0,
        };
        write_model(&dir.join(name), &spec, &v, 1 << 30, true)?;
    }
    Ok(())
}
