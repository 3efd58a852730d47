//! The model configuration, parsed from a Hugging Face `config.json` (or the equivalent JSON
//! built from GGUF metadata).
//!
//! Supported architectures (`model_type`): `llama`, `mistral`, `qwen2`. Both config layouts
//! Hugging Face has written are read: transformers 4 (`rope_theta` + `rope_scaling`) and
//! transformers 5 (`rope_parameters`). Rope scaling types `default`, `linear` and `llama3`
//! are supported; any other type is refused with an error naming it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{EvalError, Result};

/// The architectures this runtime implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

/// How rotary position embeddings are scaled (Hugging Face `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// No scaling (`default`).
    None,
    /// `linear`: positions divided by `factor` (every inverse frequency divided by it).
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// The scaling factor.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
}

/// A Llama-family decoder's shape and hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `model_type`: one of [`SUPPORTED_ARCHITECTURES`].
    pub model_type: String,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` (the MLP width).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta` (or `rope_parameters.rope_theta`; default 10000).
    pub rope_theta: f64,
    /// Rope scaling.
    pub rope_scaling: RopeScaling,
    /// `max_position_embeddings` (default 2048): longer inputs are truncated from the left.
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings`: the output head reuses `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `bos_token_id` (the first one when a list).
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (the first one when a list).
    pub eos_token_id: Option<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// Whether q/k/v projections carry biases (qwen2 always; llama/mistral `attention_bias`).
    pub qkv_bias: bool,
    /// Whether the output projection carries a bias (llama `attention_bias`).
    pub o_bias: bool,
    /// Whether the MLP projections carry biases (llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per layer, the sliding attention window (`None`: full causal attention).
    pub sliding_windows: Vec<Option<usize>>,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn get_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

/// A token id that may be written as a number or a list of numbers (the first is taken).
fn get_token_id(v: &Value, key: &str) -> Option<u32> {
    match v.get(key)? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads and parses `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| EvalError::Model {
            path: path.to_path_buf(),
            msg: format!("config.json does not parse: {e}"),
        })?;
        ModelConfig::from_json(&value, path)
    }

    /// Parses a config JSON value; `origin` names the file (or model) in errors.
    pub fn from_json(v: &Value, origin: &Path) -> Result<ModelConfig> {
        let err = |msg: String| EvalError::Model {
            path: PathBuf::from(origin),
            msg,
        };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| err("config has no `model_type`".into()))?
            .to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&model_type.as_str()) {
            return Err(err(format!(
                "unsupported architecture `{model_type}` (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let need =
            |key: &str| get_usize(v, key).ok_or_else(|| err(format!("config has no `{key}`")));
        let hidden_size = need("hidden_size")?;
        let intermediate_size = need("intermediate_size")?;
        let num_hidden_layers = need("num_hidden_layers")?;
        let num_attention_heads = need("num_attention_heads")?;
        let vocab_size = need("vocab_size")?;
        let num_key_value_heads =
            get_usize(v, "num_key_value_heads").unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = match get_usize(v, "head_dim") {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(err(format!(
                        "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and no head_dim is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(err(format!(
                "head_dim {head_dim} is odd; rotary embeddings need it even"
            )));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" && act != "swish" {
                return Err(err(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        let rms_norm_eps = get_f64(v, "rms_norm_eps").unwrap_or(1e-6);
        let (rope_theta, rope_scaling) = parse_rope(v).map_err(err)?;
        let max_position_embeddings = get_usize(v, "max_position_embeddings").unwrap_or(2048);
        let tie_word_embeddings = get_bool(v, "tie_word_embeddings").unwrap_or(false);
        let attention_bias = get_bool(v, "attention_bias").unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = if model_type == "qwen2" {
            (true, false, false)
        } else {
            (
                attention_bias,
                attention_bias,
                get_bool(v, "mlp_bias").unwrap_or(false),
            )
        };
        let sliding_windows = parse_windows(v, &model_type, num_hidden_layers);
        Ok(ModelConfig {
            model_type,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            vocab_size,
            bos_token_id: get_token_id(v, "bos_token_id"),
            eos_token_id: get_token_id(v, "eos_token_id"),
            pad_token_id: get_token_id(v, "pad_token_id"),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_windows,
        })
    }

    /// The inverse rotary frequencies (`head_dim / 2` of them), scaling applied, in f64.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Reads `rope_theta` and the scaling from either config layout.
fn parse_rope(v: &Value) -> std::result::Result<(f64, RopeScaling), String> {
    // transformers 5 writes `rope_parameters` (theta inside); transformers 4 `rope_theta` and
    // `rope_scaling` at the top level.
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let theta = params
        .and_then(|p| get_f64(p, "rope_theta"))
        .or_else(|| get_f64(v, "rope_theta"))
        .unwrap_or(10000.0);
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor =
        || get_f64(s, "factor").ok_or_else(|| format!("rope scaling `{kind}` has no `factor`"));
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => {
            let field = |k: &str| {
                get_f64(s, k).ok_or_else(|| format!("rope scaling `llama3` has no `{k}`"))
            };
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(format!(
                "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
            ))
        }
    };
    Ok((theta, scaling))
}

/// Per-layer sliding windows: `layer_types` when present (transformers 5), else mistral's
/// `sliding_window` on every layer, or qwen2's `use_sliding_window` on layers from
/// `max_window_layers` on.
fn parse_windows(v: &Value, model_type: &str, layers: usize) -> Vec<Option<usize>> {
    let window = get_usize(v, "sliding_window");
    if let Some(types) = v.get("layer_types").and_then(Value::as_array) {
        if types.len() == layers {
            return types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => window,
                    _ => None,
                })
                .collect();
        }
    }
    match model_type {
        "mistral" => vec![window; layers],
        "qwen2" if get_bool(v, "use_sliding_window").unwrap_or(false) => {
            let from = get_usize(v, "max_window_layers").unwrap_or(layers);
            (0..layers)
                .map(|i| if i >= from { window } else { None })
                .collect()
        }
        _ => vec![None; layers],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "eos_token_id": [5, 6]
        })
    }

    #[test]
    fn defaults_and_lists() {
        let c = ModelConfig::from_json(&base(), Path::new("x")).expect("parses");
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_id, Some(5));
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.sliding_windows, vec![None, None]);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let mut v = base();
        v["model_type"] = json!("gpt2");
        let e = ModelConfig::from_json(&v, Path::new("x")).expect_err("refused");
        assert!(e.to_string().contains("gpt2"), "{e}");
    }

    #[test]
    fn unsupported_rope_scaling_is_named() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_json(&v, Path::new("x")).expect_err("refused");
        assert!(e.to_string().contains("yarn"), "{e}");
    }

    #[test]
    fn llama3_inv_freq_matches_hand_formula() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_json(&v, Path::new("x")).expect("parses");
        let got = c.inv_freq();
        for (i, g) in got.iter().enumerate() {
            let f = 1.0 / 500000f64.powf(2.0 * i as f64 / 16.0);
            let wl = 2.0 * std::f64::consts::PI / f;
            // low-frequency band: wavelength above 8192; high: below 2048.
            let want = if wl > 8192.0 {
                f / 8.0
            } else if wl < 2048.0 {
                f
            } else {
                let s = (8192.0 / wl - 1.0) / 3.0;
                (1.0 - s) * f / 8.0 + s * f
            };
            assert!((g - want).abs() <= 1e-15 * want.abs(), "{i}: {g} vs {want}");
        }
    }

    #[test]
    fn transformers5_rope_parameters() {
        let mut v = base();
        v.as_object_mut().expect("object").remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1234.0});
        let c = ModelConfig::from_json(&v, Path::new("x")).expect("parses");
        assert_eq!(c.rope_theta, 1234.0);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_windows() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        v["use_sliding_window"] = json!(true);
        v["sliding_window"] = json!(4);
        v["max_window_layers"] = json!(1);
        let c = ModelConfig::from_json(&v, Path::new("x")).expect("parses");
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.sliding_windows, vec![None, Some(4)]);
    }
}
