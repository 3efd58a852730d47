//! PEFT adapter directories: reading, validating and writing LoRA and (IA)³ adapters in the
//! format of Hugging Face PEFT (`save_pretrained` / `PeftModel.from_pretrained`; PEFT 0.21:
//! `peft/utils/save_and_load.py`, `peft/tuners/lora/config.py`, `peft/tuners/ia3/config.py`).
//!
//! An adapter directory holds `adapter_config.json` (the config, pretty JSON with sorted keys)
//! and `adapter_model.safetensors` (the weights; `__metadata__ {"format": "pt"}`). Weight
//! keys are the adapted module's path in the `PeftModel` with the adapter name removed:
//!
//! - LoRA on a linear layer: `base_model.model.<module>.lora_A.weight` `[r, in]` and
//!   `base_model.model.<module>.lora_B.weight` `[out, r]`; the layer's update is
//!   `ΔW = scaling · B A` with `scaling = alpha / r` (`alpha / sqrt(r)` with `use_rslora`),
//!   r and alpha per module from `rank_pattern` / `alpha_pattern` or else `r` / `lora_alpha`.
//!   With `fan_in_fan_out` (GPT-2 `Conv1D`) the base weight is stored `[in, out]` and receives
//!   `ΔWᵀ`.
//! - LoRA on an embedding: `<module>.lora_embedding_A` `[r, num_embeddings]` and
//!   `<module>.lora_embedding_B` `[dim, r]`; the weight `[num_embeddings, dim]` receives
//!   `(scaling · B A)ᵀ`.
//! - (IA)³: `base_model.model.<module>.ia3_l`, `[out, 1]` (scales the layer's outputs) or,
//!   for a module in `feedforward_modules`, `[1, in]` (scales its inputs). 1-D vectors are
//!   accepted too.
//!
//! `<module>` (e.g. `model.layers.0.self_attn.q_proj`) is the module's path in the base model,
//! so its weight is `<module>.weight` ([`Adapter::base_weight_name`]). Other tensors (PEFT's
//! `modules_to_save`, trained biases) are kept as [`Adapter::extra_keys`]. DoRA, LoRA biases,
//! AdaLoRA and the other PEFT types are refused by name.
//!
//! [`Adapter::open`] validates everything up front (config fields and patterns, every key,
//! shapes, ranks against `r` / `rank_pattern`, finiteness) and [`Adapter::check_base`] checks
//! the adapter against a base checkpoint; errors name the file and the key or module.
//! [`AdapterWriter`] / [`write_adapter`] write a directory PEFT loads: the weights go through
//! [`CheckpointWriter`] into a staging directory and are renamed into place, then the config
//! is written atomically, so no file is ever half-written under its final name.

mod pattern;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::atomic::{self, write_text_atomic};
use crate::dtype::DType;
use crate::error::IoError;
use crate::safetensors::read::Checkpoint;
use crate::safetensors::write::{CheckpointWriter, OutputFile, OutputLayout, OutputTensor};
use pattern::Pattern;

/// File name of an adapter's config.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// File name of an adapter's weights in safetensors format.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of an adapter's weights in PyTorch pickle format (refused; convert it).
pub const ADAPTER_BIN_FILE: &str = "adapter_model.bin";
/// The prefix PEFT gives every key of a `PeftModel` (`base_model.model.`).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The adapter types amalgam reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    /// Low-rank adaptation (`peft_type: "LORA"`).
    Lora,
    /// (IA)³ scaling vectors (`peft_type: "IA3"`).
    Ia3,
}

impl AdapterKind {
    /// The `peft_type` string in `adapter_config.json`.
    pub fn peft_type(self) -> &'static str {
        match self {
            AdapterKind::Lora => "LORA",
            AdapterKind::Ia3 => "IA3",
        }
    }
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdapterKind::Lora => "LoRA",
            AdapterKind::Ia3 => "(IA)^3",
        })
    }
}

/// `target_modules` (or `feedforward_modules`): a list of names or one regular expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names; a module matches one that equals it or that it ends with after a `.`
    /// (`"q_proj"` matches `model.layers.0.self_attn.q_proj`). `null` reads as an empty list.
    List(Vec<String>),
    /// A Python regular expression matched against the whole module path (`re.fullmatch`),
    /// or PEFT's shorthand `"all-linear"`.
    Regex(String),
}

impl TargetModules {
    /// Whether `module` (a path in the base model) is targeted, by PEFT's rule
    /// (`check_target_module_exists`). `"all-linear"` matches every module. `Err` describes a
    /// regular expression this matcher does not support.
    pub fn matches(&self, module: &str) -> Result<bool, String> {
        match self {
            TargetModules::List(names) => Ok(names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}")))),
            TargetModules::Regex(r) if r == "all-linear" => Ok(true),
            TargetModules::Regex(r) => Ok(Pattern::parse(r)?.full_match(module)),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            TargetModules::List(v) => Value::Array(v.iter().cloned().map(Value::String).collect()),
            TargetModules::Regex(r) => Value::String(r.clone()),
        }
    }
}

/// A LoRA adapter's config (PEFT `LoraConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Default rank (`r`).
    pub r: usize,
    /// Default alpha (`lora_alpha`).
    pub lora_alpha: f64,
    /// The adapted modules (`target_modules`).
    pub target_modules: TargetModules,
    /// Per-module ranks (`rank_pattern`): pattern → rank. A module takes the first pattern
    /// (in key order, which is the order PEFT sees since it saves configs with sorted keys)
    /// that matches by PEFT's rule `re.match(rf"(.*\.)?({pattern})$", module)`.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas (`alpha_pattern`), matched like `rank_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Rank-stabilised scaling `alpha / sqrt(r)` instead of `alpha / r` (`use_rslora`).
    pub use_rslora: bool,
    /// The base layers store weights `[in, out]` (GPT-2 `Conv1D`; `fan_in_fan_out`).
    pub fan_in_fan_out: bool,
    /// Which biases were trained (`bias`: `"none"`, `"all"` or `"lora_only"`).
    pub bias: String,
    /// The base model the adapter was trained on (`base_model_name_or_path`).
    pub base_model_name_or_path: Option<String>,
    /// Every other field of `adapter_config.json`, kept as raw JSON so that a read-write
    /// round trip preserves it (`task_type`, `lora_dropout`, `modules_to_save`, ...).
    pub extra: Map<String, Value>,
}

impl LoraConfig {
    /// A config with PEFT's defaults for everything but `r`, `lora_alpha` and the targets
    /// (`inference_mode: true`, `lora_dropout: 0.0`, `bias: "none"`).
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> LoraConfig {
        let mut extra = Map::new();
        extra.insert("inference_mode".into(), Value::Bool(true));
        extra.insert("lora_dropout".into(), Value::from(0.0));
        LoraConfig {
            r,
            lora_alpha,
            target_modules,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            fan_in_fan_out: false,
            bias: "none".into(),
            base_model_name_or_path: None,
            extra,
        }
    }

    /// The rank of `module` (a path in the base model): its `rank_pattern` entry, else `r`.
    pub fn rank_for(&self, module: &str) -> Result<usize, String> {
        Ok(first_match(&self.rank_pattern, module)?.unwrap_or(self.r))
    }

    /// The alpha of `module`: its `alpha_pattern` entry, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> Result<f64, String> {
        Ok(first_match(&self.alpha_pattern, module)?.unwrap_or(self.lora_alpha))
    }

    /// The factor PEFT multiplies `B A` by for a module of rank `r` and alpha `alpha`:
    /// `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// An (IA)³ adapter's config (PEFT `IA3Config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    /// The adapted modules (`target_modules`).
    pub target_modules: TargetModules,
    /// The modules whose vector scales the input rather than the output
    /// (`feedforward_modules`); `None` when the file has `null` (PEFT then uses its
    /// per-architecture default, and amalgam infers it from the vector's shape).
    pub feedforward_modules: Option<TargetModules>,
    /// The base layers store weights `[in, out]` (`fan_in_fan_out`).
    pub fan_in_fan_out: bool,
    /// The base model the adapter was trained on (`base_model_name_or_path`).
    pub base_model_name_or_path: Option<String>,
    /// Every other field of `adapter_config.json`, kept as raw JSON.
    pub extra: Map<String, Value>,
}

impl Ia3Config {
    /// A config with PEFT's defaults for everything but the targets (`inference_mode: true`).
    pub fn new(target_modules: TargetModules, feedforward_modules: TargetModules) -> Ia3Config {
        let mut extra = Map::new();
        extra.insert("inference_mode".into(), Value::Bool(true));
        Ia3Config {
            target_modules,
            feedforward_modules: Some(feedforward_modules),
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            extra,
        }
    }

    /// Whether `module` is a feedforward module by PEFT's rule (`_check_target_module_feedforward`:
    /// a list entry matches when the path ends with it, with no `.` required; a string is a
    /// full-match regular expression); `None` without `feedforward_modules`.
    pub fn is_feedforward(&self, module: &str) -> Result<Option<bool>, String> {
        match &self.feedforward_modules {
            None => Ok(None),
            Some(TargetModules::List(names)) => {
                Ok(Some(names.iter().any(|n| module.ends_with(n.as_str()))))
            }
            Some(TargetModules::Regex(r)) => Ok(Some(Pattern::parse(r)?.full_match(module))),
        }
    }
}

/// An adapter's config: `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterConfig {
    /// A LoRA config.
    Lora(LoraConfig),
    /// An (IA)³ config.
    Ia3(Ia3Config),
}

fn first_match<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Result<Option<T>, String> {
    for (k, v) in patterns {
        if Pattern::parse_key(k)?.full_match(module) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// A number as JSON: an integer when it is one (PEFT's `lora_alpha` is an `int`).
fn num_json(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// Reads config fields, naming the file and field in errors.
struct Fields<'a> {
    file: &'a Path,
    map: Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> IoError {
        IoError::AdapterConfig {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Removes a field; `null` counts as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
        match self.map.remove(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn bool(&mut self, key: &str, default: bool) -> Result<bool, IoError> {
        match self.take(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(v) => Err(self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    fn rank(&self, key: &str, v: &Value) -> Result<usize, IoError> {
        match v.as_u64() {
            Some(n) if n >= 1 => Ok(n as usize),
            _ => Err(self.err(key, format!("a rank must be an integer >= 1, found {v}"))),
        }
    }

    fn number(&self, key: &str, v: &Value) -> Result<f64, IoError> {
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(self.err(key, format!("expected a number, found {v}"))),
        }
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, IoError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
        }
    }

    fn targets(&mut self, key: &str) -> Result<Option<TargetModules>, IoError> {
        let t = match self.take(key) {
            None => return Ok(None),
            Some(Value::String(s)) => TargetModules::Regex(s),
            Some(Value::Array(items)) => {
                let mut names = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Value::String(s) => names.push(s),
                        other => {
                            return Err(self.err(
                                key,
                                format!("expected a list of module names, found an entry {other}"),
                            ))
                        }
                    }
                }
                TargetModules::List(names)
            }
            Some(v) => Err(self.err(
                key,
                format!("expected a list of module names or a regular expression, found {v}"),
            ))?,
        };
        if let TargetModules::Regex(r) = &t {
            if r != "all-linear" {
                Pattern::parse(r).map_err(|e| self.err(key, e))?;
            }
        }
        Ok(Some(t))
    }

    fn patterns<T>(
        &mut self,
        key: &str,
        value: impl Fn(&Self, &str, &Value) -> Result<T, IoError>,
    ) -> Result<BTreeMap<String, T>, IoError> {
        let mut out = BTreeMap::new();
        match self.take(key) {
            None => {}
            Some(Value::Object(m)) => {
                for (k, v) in &m {
                    Pattern::parse_key(k).map_err(|e| self.err(key, e))?;
                    out.insert(k.clone(), value(self, &format!("{key}.{k}"), v)?);
                }
            }
            Some(v) => return Err(self.err(key, format!("expected an object, found {v}"))),
        }
        Ok(out)
    }
}

impl AdapterConfig {
    /// The adapter type.
    pub fn kind(&self) -> AdapterKind {
        match self {
            AdapterConfig::Lora(_) => AdapterKind::Lora,
            AdapterConfig::Ia3(_) => AdapterKind::Ia3,
        }
    }

    /// The base model the adapter was trained on, when the config records it.
    pub fn base_model_name_or_path(&self) -> Option<&str> {
        match self {
            AdapterConfig::Lora(c) => c.base_model_name_or_path.as_deref(),
            AdapterConfig::Ia3(c) => c.base_model_name_or_path.as_deref(),
        }
    }

    /// Whether the base layers store weights `[in, out]` (`fan_in_fan_out`).
    pub fn fan_in_fan_out(&self) -> bool {
        match self {
            AdapterConfig::Lora(c) => c.fan_in_fan_out,
            AdapterConfig::Ia3(c) => c.fan_in_fan_out,
        }
    }

    /// Reads and validates an `adapter_config.json` file.
    pub fn read(file: &Path) -> Result<AdapterConfig, IoError> {
        let text = std::fs::read_to_string(file).map_err(|e| IoError::io(file, "read", e))?;
        AdapterConfig::parse(file, &text)
    }

    /// Parses and validates the text of an `adapter_config.json` (`file` names it in errors).
    /// Unknown `peft_type`s and unsupported options (`use_dora`, `lora_bias`) are refused.
    pub fn parse(file: &Path, text: &str) -> Result<AdapterConfig, IoError> {
        let bad = |key: &str, reason: String| IoError::AdapterConfig {
            file: file.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let map = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad("", "the config is not a JSON object".into())),
            Err(e) => return Err(bad("", format!("not valid JSON: {e}"))),
        };
        let mut f = Fields { file, map };
        let peft_type = match f.take("peft_type") {
            Some(Value::String(s)) => s,
            None => {
                return Err(f.err(
                    "peft_type",
                    "missing; an adapter config names its type (\"LORA\" or \"IA3\")",
                ))
            }
            Some(v) => return Err(f.err("peft_type", format!("expected a string, found {v}"))),
        };
        match peft_type.as_str() {
            "LORA" => Ok(AdapterConfig::Lora(Self::parse_lora(f)?)),
            "IA3" => Ok(AdapterConfig::Ia3(Self::parse_ia3(f)?)),
            other => Err(f.err(
                "peft_type",
                format!("adapter type \"{other}\" is not supported; amalgam reads LORA and IA3 adapters (merge such an adapter into its base with PEFT's merge_and_unload and merge the full model instead)"),
            )),
        }
    }

    fn parse_lora(mut f: Fields<'_>) -> Result<LoraConfig, IoError> {
        let r = match f.take("r") {
            None => 8,
            Some(v) => f.rank("r", &v)?,
        };
        let lora_alpha = match f.take("lora_alpha") {
            None => 8.0,
            Some(v) => f.number("lora_alpha", &v)?,
        };
        let target_modules = f
            .targets("target_modules")?
            .unwrap_or(TargetModules::List(Vec::new()));
        let rank_pattern = f.patterns("rank_pattern", |f, k, v| f.rank(k, v))?;
        let alpha_pattern = f.patterns("alpha_pattern", |f, k, v| f.number(k, v))?;
        let use_rslora = f.bool("use_rslora", false)?;
        let fan_in_fan_out = f.bool("fan_in_fan_out", false)?;
        let bias = f.string("bias")?.unwrap_or_else(|| "none".into());
        if !matches!(bias.as_str(), "none" | "all" | "lora_only") {
            return Err(f.err(
                "bias",
                format!("expected \"none\", \"all\" or \"lora_only\", found \"{bias}\""),
            ));
        }
        let base_model_name_or_path = f.string("base_model_name_or_path")?;
        for (key, what) in [
            (
                "use_dora",
                "DoRA adapters (weight-decomposed LoRA) are not supported",
            ),
            (
                "lora_bias",
                "LoRA adapters with a trained lora_B bias are not supported",
            ),
        ] {
            if f.map.get(key) == Some(&Value::Bool(true)) {
                return Err(f.err(
                    key,
                    format!("{what}; merge the adapter into its base with PEFT's merge_and_unload and merge the full model instead"),
                ));
            }
        }
        Ok(LoraConfig {
            r,
            lora_alpha,
            target_modules,
            rank_pattern,
            alpha_pattern,
            use_rslora,
            fan_in_fan_out,
            bias,
            base_model_name_or_path,
            extra: f.map,
        })
    }

    fn parse_ia3(mut f: Fields<'_>) -> Result<Ia3Config, IoError> {
        let target_modules = f
            .targets("target_modules")?
            .unwrap_or(TargetModules::List(Vec::new()));
        let feedforward_modules = f.targets("feedforward_modules")?;
        let fan_in_fan_out = f.bool("fan_in_fan_out", false)?;
        let base_model_name_or_path = f.string("base_model_name_or_path")?;
        Ok(Ia3Config {
            target_modules,
            feedforward_modules,
            fan_in_fan_out,
            base_model_name_or_path,
            extra: f.map,
        })
    }

    /// The config as PEFT writes it: pretty JSON (2-space indent) with sorted keys. Holds
    /// `peft_type`, every typed field and every `extra` field (typed fields win).
    pub fn to_json(&self) -> String {
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        let (extra, typed): (&Map<String, Value>, Vec<(&str, Value)>) = match self {
            AdapterConfig::Lora(c) => (
                &c.extra,
                vec![
                    ("r", Value::from(c.r)),
                    ("lora_alpha", num_json(c.lora_alpha)),
                    ("target_modules", c.target_modules.to_json()),
                    (
                        "rank_pattern",
                        Value::Object(
                            c.rank_pattern
                                .iter()
                                .map(|(k, v)| (k.clone(), Value::from(*v)))
                                .collect(),
                        ),
                    ),
                    (
                        "alpha_pattern",
                        Value::Object(
                            c.alpha_pattern
                                .iter()
                                .map(|(k, v)| (k.clone(), num_json(*v)))
                                .collect(),
                        ),
                    ),
                    ("use_rslora", Value::Bool(c.use_rslora)),
                    ("fan_in_fan_out", Value::Bool(c.fan_in_fan_out)),
                    ("bias", Value::String(c.bias.clone())),
                    (
                        "base_model_name_or_path",
                        c.base_model_name_or_path
                            .clone()
                            .map_or(Value::Null, Value::String),
                    ),
                ],
            ),
            AdapterConfig::Ia3(c) => (
                &c.extra,
                vec![
                    ("target_modules", c.target_modules.to_json()),
                    (
                        "feedforward_modules",
                        c.feedforward_modules
                            .as_ref()
                            .map_or(Value::Null, TargetModules::to_json),
                    ),
                    ("fan_in_fan_out", Value::Bool(c.fan_in_fan_out)),
                    (
                        "base_model_name_or_path",
                        c.base_model_name_or_path
                            .clone()
                            .map_or(Value::Null, Value::String),
                    ),
                ],
            ),
        };
        for (k, v) in extra {
            out.insert(k.clone(), sort_value(v));
        }
        for (k, v) in typed {
            out.insert(k.to_string(), v);
        }
        out.insert(
            "peft_type".into(),
            Value::String(self.kind().peft_type().into()),
        );
        serde_json::to_string_pretty(&out).expect("a JSON value always serializes")
    }
}

/// `v` with every object's keys sorted (PEFT writes with `sort_keys=True`).
fn sort_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, sort_value(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sort_value).collect()),
        other => other.clone(),
    }
}

/// One LoRA-adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// The module's path in the base model (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// Key of the down projection A (`…lora_A.weight`, `[rank, in]`).
    pub a_key: String,
    /// Key of the up projection B (`…lora_B.weight`, `[out, rank]`).
    pub b_key: String,
    /// The rank (A's rows, B's columns).
    pub rank: usize,
    /// Input features (A's columns).
    pub in_features: usize,
    /// Output features (B's rows).
    pub out_features: usize,
    /// The module's alpha (`alpha_pattern` or `lora_alpha`).
    pub alpha: f64,
    /// The factor of `B A` in the update: `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA).
    pub scaling: f64,
    /// An embedding LoRA (`lora_embedding_A` / `lora_embedding_B`).
    pub embedding: bool,
    /// The base weight is stored `[in, out]` and receives `(scaling · B A)ᵀ` (embeddings, and
    /// layers under `fan_in_fan_out`).
    pub transposed: bool,
}

impl LoraModule {
    /// The shape the base weight must have: `[out, in]`, or `[in, out]` when `transposed`.
    pub fn base_shape(&self) -> [usize; 2] {
        if self.transposed {
            [self.in_features, self.out_features]
        } else {
            [self.out_features, self.in_features]
        }
    }
}

/// One (IA)³-adapted module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ia3Module {
    /// The module's path in the base model (`model.layers.0.mlp.down_proj`).
    pub name: String,
    /// Key of the vector (`…ia3_l`).
    pub key: String,
    /// The vector's length (the layer's inputs when `is_feedforward`, else its outputs).
    pub len: usize,
    /// The vector scales the layer's inputs (columns of `[out, in]`) rather than its outputs (rows).
    pub is_feedforward: bool,
    /// The stored shape (`[out, 1]`, `[1, in]` or `[len]`).
    pub shape: Vec<usize>,
    /// The base weight is stored `[in, out]` (`fan_in_fan_out`).
    pub transposed: bool,
}

/// An adapter's modules.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterModules {
    /// LoRA modules, in the order their first tensor appears in the file.
    Lora(Vec<LoraModule>),
    /// (IA)³ modules, in file order.
    Ia3(Vec<Ia3Module>),
}

impl AdapterModules {
    /// The module names, in order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            AdapterModules::Lora(m) => m.iter().map(|m| m.name.as_str()).collect(),
            AdapterModules::Ia3(m) => m.iter().map(|m| m.name.as_str()).collect(),
        }
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        match self {
            AdapterModules::Lora(m) => m.len(),
            AdapterModules::Ia3(m) => m.len(),
        }
    }

    /// Whether there are no modules (never for an opened adapter).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The module path of a key: without [`KEY_PREFIX`] and without `suffix`.
fn module_of<'k>(key: &'k str, suffix: &str) -> Option<&'k str> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    rest.strip_suffix(suffix).filter(|m| !m.is_empty())
}

/// The key of LoRA's A for `module` (a base-model path): `base_model.model.<module>.lora_A.weight`.
pub fn lora_a_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_A.weight")
}

/// The key of LoRA's B for `module`: `base_model.model.<module>.lora_B.weight`.
pub fn lora_b_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_B.weight")
}

/// The key of the (IA)³ vector for `module`: `base_model.model.<module>.ia3_l`.
pub fn ia3_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.ia3_l")
}

/// Whether a key holds a path component of an adapter tensor (`lora_…` or `ia3_…`).
fn adapter_component(key: &str, stem: &str) -> bool {
    key.split('.').any(|c| c.starts_with(stem))
}

/// Classifies every key of an adapter and checks shapes against the config. `keys` are in
/// file order; returns the modules and the extra (non-adapter) keys.
fn parse_modules(
    file: &Path,
    config: &AdapterConfig,
    keys: &[(&str, &[usize])],
) -> Result<(AdapterModules, Vec<String>), IoError> {
    let bad = |key: &str, reason: String| IoError::AdapterTensor {
        file: file.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let mut extra = Vec::new();
    match config {
        AdapterConfig::Lora(c) => {
            // module -> (A: (key, shape, embedding), B: ...)
            type Half<'k> = Option<(&'k str, &'k [usize], bool)>;
            let mut order: Vec<&str> = Vec::new();
            let mut halves: HashMap<&str, (Half<'_>, Half<'_>)> = HashMap::new();
            for &(key, shape) in keys {
                let found = [
                    (".lora_A.weight", false, false),
                    (".lora_B.weight", true, false),
                    (".lora_embedding_A", false, true),
                    (".lora_embedding_B", true, true),
                ]
                .into_iter()
                .find_map(|(suffix, is_b, emb)| module_of(key, suffix).map(|m| (m, is_b, emb)));
                let Some((module, is_b, emb)) = found else {
                    if adapter_component(key, "lora_") {
                        return Err(bad(key, "not a LoRA weight amalgam reads: expected <module>.lora_A.weight, <module>.lora_B.weight, <module>.lora_embedding_A or <module>.lora_embedding_B (DoRA magnitude vectors, LoRA biases and keys that still hold an adapter name such as lora_A.default.weight are not supported)".into()));
                    }
                    extra.push(key.to_string());
                    continue;
                };
                let entry = halves.entry(module).or_insert_with(|| {
                    order.push(module);
                    (None, None)
                });
                let slot = if is_b { &mut entry.1 } else { &mut entry.0 };
                if let Some((other, _, _)) = slot {
                    return Err(bad(
                        key,
                        format!("module \"{module}\" already has this factor in \"{other}\""),
                    ));
                }
                *slot = Some((key, shape, emb));
            }
            let mut modules = Vec::with_capacity(order.len());
            for name in order {
                let (a, b) = halves[name];
                let (Some((a_key, a_shape, a_emb)), Some((b_key, b_shape, b_emb))) = (a, b) else {
                    let (have, missing) = match (a, b) {
                        (Some((k, _, emb)), None) => (
                            k,
                            if emb {
                                format!("{KEY_PREFIX}{name}.lora_embedding_B")
                            } else {
                                lora_b_key(name)
                            },
                        ),
                        (None, Some((k, _, emb))) => (
                            k,
                            if emb {
                                format!("{KEY_PREFIX}{name}.lora_embedding_A")
                            } else {
                                lora_a_key(name)
                            },
                        ),
                        _ => unreachable!("a module enters the map with one factor"),
                    };
                    let what = if missing.contains("_B") { "B" } else { "A" };
                    return Err(bad(
                        have,
                        format!("module \"{name}\" has no LoRA {what} factor: \"{missing}\" is missing; every adapted module needs both lora_A and lora_B"),
                    ));
                };
                if a_emb != b_emb {
                    return Err(bad(
                        b_key,
                        format!("module \"{name}\" mixes an embedding factor with a linear one (\"{a_key}\")"),
                    ));
                }
                for (k, s, what) in [
                    (a_key, a_shape, "[rank, in]"),
                    (b_key, b_shape, "[out, rank]"),
                ] {
                    if s.len() != 2 || s.contains(&0) {
                        return Err(bad(
                            k,
                            format!("shape {s:?}: a LoRA factor must be a non-empty 2-D matrix {what} (convolution LoRA is not supported)"),
                        ));
                    }
                }
                let rank = a_shape[0];
                if b_shape[1] != rank {
                    return Err(bad(
                        b_key,
                        format!("shape {b_shape:?} has {} columns but \"{a_key}\" {a_shape:?} has rank {rank}; lora_B [out, r] and lora_A [r, in] must share r", b_shape[1]),
                    ));
                }
                let want = c.rank_for(name).map_err(|e| bad(a_key, e))?;
                if want != rank {
                    return Err(bad(
                        a_key,
                        format!("rank {rank} (shape {a_shape:?}) but adapter_config.json gives module \"{name}\" rank {want} (from {}); the config and weights disagree", if first_match(&c.rank_pattern, name).ok().flatten().is_some() { "rank_pattern" } else { "r" }),
                    ));
                }
                let alpha = c.alpha_for(name).map_err(|e| bad(a_key, e))?;
                modules.push(LoraModule {
                    name: name.to_string(),
                    a_key: a_key.to_string(),
                    b_key: b_key.to_string(),
                    rank,
                    in_features: a_shape[1],
                    out_features: b_shape[0],
                    alpha,
                    scaling: c.scaling(rank, alpha),
                    embedding: a_emb,
                    transposed: a_emb || c.fan_in_fan_out,
                });
            }
            if modules.is_empty() {
                return Err(IoError::AdapterEmpty {
                    file: file.to_path_buf(),
                    what: "LoRA (lora_A/lora_B)",
                });
            }
            Ok((AdapterModules::Lora(modules), extra))
        }
        AdapterConfig::Ia3(c) => {
            let mut modules = Vec::new();
            let mut seen: HashMap<&str, &str> = HashMap::new();
            for &(key, shape) in keys {
                let Some(name) = module_of(key, ".ia3_l") else {
                    if adapter_component(key, "ia3_") {
                        return Err(bad(key, "not an (IA)^3 vector amalgam reads: expected <module>.ia3_l (keys that still hold an adapter name such as ia3_l.default are not supported)".into()));
                    }
                    extra.push(key.to_string());
                    continue;
                };
                if let Some(other) = seen.insert(name, key) {
                    return Err(bad(
                        key,
                        format!("module \"{name}\" already has a vector in \"{other}\""),
                    ));
                }
                let len: usize = shape.iter().product();
                let shape_ff = match shape {
                    [n] if *n > 0 => None,
                    [1, n] if *n > 1 => Some(true),
                    [n, 1] if *n > 1 => Some(false),
                    [1, 1] => None,
                    _ => {
                        return Err(bad(
                            key,
                            format!("shape {shape:?}: an (IA)^3 vector must be 1-D, [out, 1] or [1, in] (convolution (IA)^3 is not supported)"),
                        ))
                    }
                };
                let config_ff = c.is_feedforward(name).map_err(|e| bad(key, e))?;
                let is_feedforward = match (config_ff, shape_ff) {
                    (Some(cf), Some(sf)) if cf != sf => {
                        return Err(bad(
                            key,
                            format!("shape {shape:?} is that of a {} module but adapter_config.json's feedforward_modules says \"{name}\" {} one (PEFT stores [1, in] for feedforward modules, [out, 1] otherwise)",
                                if sf { "feedforward" } else { "non-feedforward" },
                                if cf { "is" } else { "is not" }),
                        ))
                    }
                    (Some(cf), _) => cf,
                    (None, Some(sf)) => sf,
                    (None, None) => false,
                };
                modules.push(Ia3Module {
                    name: name.to_string(),
                    key: key.to_string(),
                    len,
                    is_feedforward,
                    shape: shape.to_vec(),
                    transposed: c.fan_in_fan_out,
                });
            }
            if modules.is_empty() {
                return Err(IoError::AdapterEmpty {
                    file: file.to_path_buf(),
                    what: "(IA)^3 (ia3_l)",
                });
            }
            Ok((AdapterModules::Ia3(modules), extra))
        }
    }
}

/// A validated PEFT adapter directory: its config, its modules and its weights (memory-mapped).
#[derive(Debug)]
pub struct Adapter {
    dir: PathBuf,
    config_path: PathBuf,
    weights_path: PathBuf,
    config: AdapterConfig,
    ckpt: Checkpoint,
    modules: AdapterModules,
    extra_keys: Vec<String>,
}

impl Adapter {
    /// Opens and validates an adapter directory (or the directory of a path to its
    /// `adapter_config.json` or `adapter_model.safetensors`): the config (known `peft_type`,
    /// well-formed fields and patterns), every tensor (float dtype, finite, a known key with
    /// a valid shape, both LoRA factors with one rank that matches `r` / `rank_pattern`).
    /// Weights only in `adapter_model.bin` are refused with a conversion hint.
    pub fn open(path: &Path) -> Result<Adapter, IoError> {
        let dir = if path.is_file()
            && path
                .file_name()
                .is_some_and(|n| n == ADAPTER_CONFIG_FILE || n == ADAPTER_WEIGHTS_FILE)
        {
            match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            }
        } else {
            path.to_path_buf()
        };
        let no = |reason: &str| IoError::NoAdapter {
            dir: dir.clone(),
            reason: reason.to_string(),
        };
        if !dir.is_dir() {
            return Err(no("no such directory"));
        }
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        if !config_path.is_file() {
            return Err(no("adapter_config.json is missing"));
        }
        let config = AdapterConfig::read(&config_path)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        if !weights_path.is_file() {
            let bin = dir.join(ADAPTER_BIN_FILE);
            if bin.is_file() {
                return Err(IoError::AdapterNotSafetensors { file: bin });
            }
            return Err(no("adapter_model.safetensors is missing"));
        }
        let ckpt = Checkpoint::open(&weights_path)?;
        for t in ckpt.tensors() {
            if !t.dtype.is_float_convertible() {
                return Err(IoError::AdapterTensor {
                    file: weights_path.clone(),
                    key: t.name.clone(),
                    reason: format!(
                        "dtype {} is not a float type; adapter tensors are F32, F16, BF16 or F64",
                        t.dtype
                    ),
                });
            }
            ckpt.check_finite(&t.name)?;
        }
        let keys: Vec<(&str, &[usize])> = ckpt
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let (modules, extra_keys) = parse_modules(&weights_path, &config, &keys)?;
        Ok(Adapter {
            dir,
            config_path,
            weights_path,
            config,
            ckpt,
            modules,
            extra_keys,
        })
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `adapter_config.json`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Path of `adapter_model.safetensors`.
    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }

    /// The adapter type.
    pub fn kind(&self) -> AdapterKind {
        self.config.kind()
    }

    /// The config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The adapted modules.
    pub fn modules(&self) -> &AdapterModules {
        &self.modules
    }

    /// The LoRA modules (empty for an (IA)³ adapter).
    pub fn lora_modules(&self) -> &[LoraModule] {
        match &self.modules {
            AdapterModules::Lora(m) => m,
            AdapterModules::Ia3(_) => &[],
        }
    }

    /// The (IA)³ modules (empty for a LoRA adapter).
    pub fn ia3_modules(&self) -> &[Ia3Module] {
        match &self.modules {
            AdapterModules::Ia3(m) => m,
            AdapterModules::Lora(_) => &[],
        }
    }

    /// Tensors that are not adapter weights (PEFT `modules_to_save`, trained biases), in file
    /// order. Their keys carry the `base_model.model.` prefix as stored.
    pub fn extra_keys(&self) -> &[String] {
        &self.extra_keys
    }

    /// The weights file as a checkpoint (for streaming reads or raw bytes).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The shape of a tensor.
    pub fn shape(&self, key: &str) -> Result<&[usize], IoError> {
        self.ckpt
            .get(key)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| IoError::UnknownTensor {
                root: self.weights_path.clone(),
                tensor: key.to_string(),
            })
    }

    /// A whole tensor as f32 (row-major; adapters are small).
    pub fn read(&self, key: &str) -> Result<Vec<f32>, IoError> {
        let numel: usize = self.shape(key)?.iter().product();
        let mut out = vec![0.0f32; numel];
        self.ckpt.read_f32(key, 0..numel, &mut out)?;
        Ok(out)
    }

    /// The base model's weight adapted by `module`: `<module>.weight`, with PEFT's
    /// `base_model.model.` prefix removed if present.
    pub fn base_weight_name(&self, module: &str) -> String {
        base_weight_name(module)
    }

    /// Checks the adapter against a base checkpoint: every adapted module's weight exists
    /// with the shape the adapter needs (LoRA: `[B rows, A cols]`, transposed for
    /// embeddings and `fan_in_fan_out`; (IA)³: a 2-D weight whose input (feedforward) or
    /// output dimension equals the vector's length).
    pub fn check_base(&self, base: &Checkpoint) -> Result<(), IoError> {
        let check = |module: &str, need: &dyn Fn(&[usize]) -> Result<(), String>| {
            let wname = base_weight_name(module);
            let err = |base_file: PathBuf, reason: String| IoError::AdapterBase {
                adapter: self.weights_path.clone(),
                module: module.to_string(),
                base: base_file,
                reason,
            };
            match base.get(&wname) {
                None => Err(err(
                    base.root().to_path_buf(),
                    format!("the base has no tensor \"{wname}\""),
                )),
                Some(t) => need(&t.shape).map_err(|r| {
                    err(
                        t.file.clone(),
                        format!("base tensor \"{wname}\" has shape {:?} but {r}", t.shape),
                    )
                }),
            }
        };
        match &self.modules {
            AdapterModules::Lora(ms) => {
                for m in ms {
                    let want = m.base_shape();
                    check(&m.name, &|s: &[usize]| {
                        if s == want {
                            Ok(())
                        } else {
                            Err(format!(
                                "the adapter's lora_B {:?} · lora_A {:?} needs {want:?}",
                                [m.out_features, m.rank],
                                [m.rank, m.in_features]
                            ))
                        }
                    })?;
                }
            }
            AdapterModules::Ia3(ms) => {
                for m in ms {
                    check(&m.name, &|s: &[usize]| {
                        let [d0, d1] = s else {
                            return Err("(IA)^3 adapts 2-D linear weights".to_string());
                        };
                        let (out, inp) = if m.transposed { (*d1, *d0) } else { (*d0, *d1) };
                        let (dim, what) = if m.is_feedforward {
                            (inp, "input features (feedforward module)")
                        } else {
                            (out, "output features")
                        };
                        if dim == m.len {
                            Ok(())
                        } else {
                            Err(format!(
                                "the (IA)^3 vector \"{}\" has {} elements, which must equal its {what}, {dim}",
                                m.key, m.len
                            ))
                        }
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// The base weight adapted by `module`: `<module>.weight`, without `base_model.model.`.
fn base_weight_name(module: &str) -> String {
    format!(
        "{}.weight",
        module.strip_prefix(KEY_PREFIX).unwrap_or(module)
    )
}

/// Files in `dir` that make it an adapter directory.
fn existing_adapter(dir: &Path) -> Option<String> {
    [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_BIN_FILE]
        .into_iter()
        .find(|f| dir.join(f).exists())
        .map(str::to_string)
}

/// Name of the staging directory of a writer (inside the output directory).
const STAGING_DIR: &str = ".adapter.partial";

/// Streams an adapter into a directory: tensors in the order given to
/// [`create`](Self::create), then [`finish`](Self::finish) renames the weights into place and
/// writes `adapter_config.json`. Dropping an unfinished writer removes its staging files.
#[derive(Debug)]
pub struct AdapterWriter {
    dir: PathBuf,
    staging: PathBuf,
    config_json: String,
    inner: Option<CheckpointWriter>,
}

impl AdapterWriter {
    /// Prepares to write an adapter with `config` and `tensors` (key and shape, in write
    /// order, stored as `dtype`) into `dir` (created if missing). The tensors are validated
    /// against the config as [`Adapter::open`] would (adapter keys must carry PEFT's
    /// `base_model.model.` prefix, or PEFT would silently not load them). Refuses a directory
    /// holding an adapter (`adapter_config.json`, `adapter_model.safetensors` or `.bin`)
    /// unless `overwrite`.
    pub fn create(
        dir: &Path,
        config: &AdapterConfig,
        tensors: Vec<(String, Vec<usize>)>,
        dtype: DType,
        overwrite: bool,
    ) -> Result<AdapterWriter, IoError> {
        let target = dir.join(ADAPTER_WEIGHTS_FILE);
        if !dtype.is_float_convertible() {
            return Err(IoError::InvalidLayout {
                reason: format!(
                    "{}: adapter tensors are written as F32, F16, BF16 or F64, not {dtype}",
                    target.display()
                ),
            });
        }
        // Validate the config the way a reader will (patterns, peft_type).
        let config_json = config.to_json();
        AdapterConfig::parse(&dir.join(ADAPTER_CONFIG_FILE), &config_json)?;
        let keys: Vec<(&str, &[usize])> = tensors
            .iter()
            .map(|(k, s)| (k.as_str(), s.as_slice()))
            .collect();
        let (modules, _) = parse_modules(&target, config, &keys)?;
        let adapter_keys: Vec<&str> = match &modules {
            AdapterModules::Lora(m) => m
                .iter()
                .flat_map(|m| [m.a_key.as_str(), m.b_key.as_str()])
                .collect(),
            AdapterModules::Ia3(m) => m.iter().map(|m| m.key.as_str()).collect(),
        };
        if let Some(k) = adapter_keys.iter().find(|k| !k.starts_with(KEY_PREFIX)) {
            return Err(IoError::AdapterTensor {
                file: target,
                key: k.to_string(),
                reason: format!("PEFT adapter keys start with \"{KEY_PREFIX}\" (PeftModel.from_pretrained would not load this tensor); use lora_a_key / lora_b_key / ia3_key"),
            });
        }
        if !overwrite {
            if let Some(found) = existing_adapter(dir) {
                return Err(IoError::AdapterExists {
                    dir: dir.to_path_buf(),
                    found,
                });
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| IoError::io(dir, "create directory", e))?;
        let staging = dir.join(STAGING_DIR);
        if staging.exists() {
            // Left by a killed writer: the name is ours.
            std::fs::remove_dir_all(&staging)
                .map_err(|e| IoError::io(&staging, "remove stale staging directory", e))?;
        }
        let layout = OutputLayout {
            files: vec![OutputFile {
                name: ADAPTER_WEIGHTS_FILE.to_string(),
                tensors: tensors
                    .into_iter()
                    .map(|(name, shape)| OutputTensor {
                        name,
                        dtype: dtype.clone(),
                        shape,
                    })
                    .collect(),
            }],
        };
        let inner = atomic::stage(&staging, || {
            CheckpointWriter::create(&staging, layout, true)
        })?;
        Ok(AdapterWriter {
            dir: dir.to_path_buf(),
            staging,
            config_json,
            inner: Some(inner),
        })
    }

    fn inner(&mut self) -> &mut CheckpointWriter {
        self.inner
            .as_mut()
            .expect("inner is only taken by finish, which consumes self")
    }

    /// Names the adapter file, not the staging file, in the inner writer's usage errors.
    fn retarget(&self, e: IoError) -> IoError {
        let file = self.dir.join(ADAPTER_WEIGHTS_FILE);
        match e {
            IoError::WriteOrder { reason, .. } => IoError::WriteOrder { file, reason },
            IoError::TensorSize {
                tensor,
                written,
                expected,
                ..
            } => IoError::TensorSize {
                file,
                tensor,
                written,
                expected,
            },
            other => other,
        }
    }

    /// Starts the next tensor, which must be `key` (in the order given to `create`); the
    /// previous one must be complete.
    pub fn begin(&mut self, key: &str) -> Result<(), IoError> {
        let r = self.inner().begin_tensor(key);
        r.map_err(|e| self.retarget(e))
    }

    /// Appends values (row-major) to the current tensor, rounded to the writer's dtype.
    pub fn write(&mut self, data: &[f32]) -> Result<(), IoError> {
        let r = self.inner().write_f32(data);
        r.map_err(|e| self.retarget(e))
    }

    /// Completes the adapter: checks every tensor was fully written, renames the weights
    /// into place, writes `adapter_config.json` atomically and removes the staging
    /// directory. Returns the adapter directory.
    pub fn finish(mut self) -> Result<PathBuf, IoError> {
        let inner = self
            .inner
            .take()
            .expect("inner is only taken here, and finish consumes self");
        let summary = inner.finish().map_err(|e| self.retarget(e))?;
        let written = summary
            .files
            .first()
            .cloned()
            .ok_or_else(|| IoError::WriteOrder {
                file: self.dir.join(ADAPTER_WEIGHTS_FILE),
                reason: "no file was written".to_string(),
            })?;
        atomic::rename(&written, &self.dir.join(ADAPTER_WEIGHTS_FILE))?;
        // Byte for byte what PEFT writes for the same config (no trailing newline).
        write_text_atomic(&self.dir.join(ADAPTER_CONFIG_FILE), &self.config_json)?;
        let _ = std::fs::remove_dir_all(&self.staging);
        Ok(self.dir.clone())
    }
}

impl Drop for AdapterWriter {
    fn drop(&mut self) {
        drop(self.inner.take());
        if self.staging.exists() {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
        atomic::unstage(&self.staging);
    }
}

/// Writes a whole adapter from in-memory tensors (`(key, shape, data)`, data row-major with
/// `numel` elements) as F32 through [`AdapterWriter`]: `adapter_config.json` (pretty JSON,
/// sorted keys, every field PEFT reads) and `adapter_model.safetensors`
/// (`__metadata__ {"format": "pt"}`). Refuses an existing adapter unless `overwrite`.
pub fn write_adapter(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &[(String, Vec<usize>, &[f32])],
    overwrite: bool,
) -> Result<(), IoError> {
    let layout = tensors
        .iter()
        .map(|(k, s, _)| (k.clone(), s.clone()))
        .collect();
    let mut w = AdapterWriter::create(dir, config, layout, DType::F32, overwrite)?;
    for (key, _, data) in tensors {
        w.begin(key)?;
        w.write(data)?;
    }
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parse_defaults_and_errors() {
        let f = Path::new("adapter_config.json");
        let c = AdapterConfig::parse(f, r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#)
            .unwrap();
        let AdapterConfig::Lora(c) = c else { panic!() };
        assert_eq!((c.r, c.lora_alpha), (8, 8.0));
        assert_eq!(c.bias, "none");
        for (text, key) in [
            (r#"{"peft_type": "ADALORA"}"#, "peft_type"),
            (r#"{"r": 4}"#, "peft_type"),
            (r#"{"peft_type": "LORA", "r": 0}"#, "r"),
            (r#"{"peft_type": "LORA", "use_dora": true}"#, "use_dora"),
            (
                r#"{"peft_type": "LORA", "rank_pattern": {"(q": 4}}"#,
                "rank_pattern",
            ),
            (
                r#"{"peft_type": "LORA", "alpha_pattern": {"q": "x"}}"#,
                "alpha_pattern.q",
            ),
            (
                r#"{"peft_type": "IA3", "target_modules": 3}"#,
                "target_modules",
            ),
        ] {
            match AdapterConfig::parse(f, text) {
                Err(IoError::AdapterConfig { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn rank_and_alpha_patterns() {
        let mut c = LoraConfig::new(8, 16.0, TargetModules::List(vec!["q_proj".into()]));
        c.rank_pattern.insert("layers.0.self_attn.q_proj".into(), 4);
        c.rank_pattern.insert("q_proj".into(), 2);
        c.alpha_pattern.insert("^model.layers.1.*".into(), 3.0);
        // first match in key order: "layers..." < "q_proj"
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj").unwrap(), 4);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj").unwrap(), 2);
        assert_eq!(c.rank_for("model.layers.1.self_attn.k_proj").unwrap(), 8);
        assert_eq!(c.alpha_for("model.layers.1.self_attn.k_proj").unwrap(), 3.0);
        assert_eq!(
            c.alpha_for("model.layers.0.self_attn.k_proj").unwrap(),
            16.0
        );
        c.use_rslora = true;
        assert_eq!(c.scaling(4, 16.0), 8.0);
        c.use_rslora = false;
        assert_eq!(c.scaling(4, 16.0), 4.0);
    }

    #[test]
    fn target_and_feedforward_rules() {
        let t = TargetModules::List(vec!["q_proj".into()]);
        assert!(t.matches("model.layers.0.self_attn.q_proj").unwrap());
        assert!(!t.matches("model.layers.0.self_attn.xq_proj").unwrap());
        let c = Ia3Config::new(
            TargetModules::List(vec!["down_proj".into()]),
            TargetModules::List(vec!["down_proj".into()]),
        );
        // PEFT's feedforward rule is a plain suffix test.
        assert_eq!(
            c.is_feedforward("model.layers.0.mlp.xdown_proj").unwrap(),
            Some(true)
        );
        assert_eq!(
            c.is_feedforward("model.layers.0.mlp.up_proj").unwrap(),
            Some(false)
        );
    }

    #[test]
    fn json_round_trip_keeps_extra() {
        let f = Path::new("adapter_config.json");
        let text = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
            "target_modules": ".*\\.(q|v)_proj", "loftq_config": {"b": 1, "a": 2}, "lora_dropout": 0.05}"#;
        let c = AdapterConfig::parse(f, text).unwrap();
        let again = AdapterConfig::parse(f, &c.to_json()).unwrap();
        assert_eq!(c, again);
        let v: Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(v["lora_alpha"], Value::from(8));
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["target_modules"], ".*\\.(q|v)_proj");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
