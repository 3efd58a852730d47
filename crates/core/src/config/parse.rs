//! YAML text to [`MergeConfig`], with warnings and static validation.
//!
//! Follows mergekit 0.1.5's pydantic models (`mergekit/config.py`: `MergeConfiguration`,
//! `OutputModuleDefinition`, `OutputSliceDefinition`, `InputSliceDefinition`,
//! `InputModelDefinition`, `ConditionalParameter`; `mergekit/tokenizer/config.py`;
//! `mergekit/common.py`: `ModelReference`, `ModelPath`, `dtype_from_name`). The YAML is read into a
//! [`serde_yaml_ng::Value`] and walked by hand, so unknown keys become warnings naming their dotted
//! path (errors with `strict`), never silent drops.
//!
//! What is checked here (everything that needs no model files):
//! - exactly one of `models`, `slices`, `modules` (an empty list counts as absent, as in
//!   mergekit); a single `modules:` entry is folded into `models`/`slices` and the top-level
//!   parameters (module parameters take precedence, with fall-through as in mergekit); several
//!   modules are refused;
//! - `merge_method` present and known;
//! - the method's input contract as mergekit states it (`InputContract` of each method): base
//!   required / optional / ignored, input counts counting the base (in the `models:` form the
//!   base is appended to the inputs when not listed, as `plan.py` does), base among a slice's
//!   sources, no duplicate inputs;
//! - `layer_range` is `[start, end)` with `start < end`, and all sources of a slice span the same
//!   number of layers;
//! - parameter values have a mergekit shape (number, bool, string, list of those, one or a list
//!   of `{filter, value}` maps); `density` numbers lie in (0, 1];
//! - `linear` (and `multislerp`) with plain-number weights summing to 0 while normalising is an
//!   error (mergekit divides by 0); the non-consensus task-arithmetic family warns instead
//!   (mergekit replaces a zero divisor by 1);
//! - `dtype` / `out_dtype` are floating dtypes mergekit knows (`float32`, `float16`, `bfloat16`,
//!   `float64`, optionally prefixed `torch.`, stored without the prefix);
//! - `random_seed` (amalgam's; mergekit takes it on the command line) is a non-negative integer;
//! - `tokenizer_source` and `tokenizer` are not both given.
//!
//! Parameter names are not checked here: they are method-specific, and the planner checks them
//! against the method's lists.

use super::model::{
    EvaluationConfig, FilteredValue, MergeConfig, ModelRef, ModelSpec, ParamMap, ParamValue,
    SliceSource, SliceSpec, TokenizerConfig, TokenizerSource,
};
use crate::params::Scalar;
use serde_yaml_ng::{Mapping, Value};

/// A config error naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the key (e.g. `models[1].parameters.density`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A non-fatal remark about the config (an unknown or ignored key).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigWarning {
    /// Dotted path of the key.
    pub key: String,
    /// The remark.
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.message)
    }
}

/// Merge methods mergekit 0.1.5 has that amalgam does not implement.
const MERGEKIT_ONLY_METHODS: &[&str] = &["arcee_fusion"];

/// Parse a config. With `strict`, unknown keys are errors.
pub fn parse_config(
    text: &str,
    strict: bool,
) -> Result<(MergeConfig, Vec<ConfigWarning>), ConfigError> {
    let mut root: Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let hint = if msg.contains("more than one document") {
            "; a config holds one merge (mergekit-multimerge files with several `---` documents \
             must be split)"
        } else {
            ""
        };
        ConfigError::new("", format!("invalid YAML: {msg}{hint}"))
    })?;
    root.apply_merge()
        .map_err(|e| ConfigError::new("", format!("invalid YAML merge key: {e}")))?;
    let mut w = Walker {
        strict,
        warnings: Vec::new(),
        config: MergeConfig {
            source_text: text.to_string(),
            ..MergeConfig::default()
        },
    };
    let top = match &root {
        Value::Mapping(m) => m,
        Value::Null => return Err(ConfigError::new("", "the config is empty")),
        other => {
            return Err(ConfigError::new(
                "",
                format!(
                    "the config must be a mapping of keys, found {}",
                    kind(other)
                ),
            ))
        }
    };
    w.top(top)?;
    validate(&mut w)?;
    Ok((w.config, w.warnings))
}

/// Whether `s` has the shape of a Hugging Face hub repository id (`org/name`): exactly one `/`,
/// both parts non-empty and made of ASCII letters, digits, `-`, `_`, `.`, neither starting or
/// ending with `-` or `.`, no `--` or `..`, at most 96 characters. A local directory of that shape
/// also matches: the caller decides by checking the filesystem first.
pub fn looks_like_hub_name(s: &str) -> bool {
    let (path, _) = split_revision(s);
    if path.is_empty() || path.len() > 96 || path.contains("--") || path.contains("..") {
        return false;
    }
    let mut parts = path.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    part_ok(org) && part_ok(name) && !name.ends_with(".safetensors")
}

/// Split mergekit's `path@revision` (`ModelPath`): the path and the revision, if any.
pub fn split_revision(path: &str) -> (&str, Option<&str>) {
    match path.split_once('@') {
        Some((p, r)) => (p, Some(r)),
        None => (path, None),
    }
}

/// Parse a model reference string as mergekit does (`ModelReference.validate_string`):
/// `model` or `model+lora`, each part optionally `path@revision` (kept in the path string).
pub fn parse_model_ref(s: &str, key: &str) -> Result<ModelRef, ConfigError> {
    let chunks: Vec<&str> = s.split('+').collect();
    if chunks.len() > 2 {
        return Err(ConfigError::new(
            key,
            format!("cannot parse model reference \"{s}\": more than one `+` (write `model+lora`)"),
        ));
    }
    for c in &chunks {
        check_model_path(c, key)?;
    }
    Ok(ModelRef {
        path: chunks[0].to_string(),
        adapter: chunks.get(1).map(|a| a.to_string()),
    })
}

fn check_model_path(p: &str, key: &str) -> Result<(), ConfigError> {
    if p.trim().is_empty() {
        return Err(ConfigError::new(key, "empty model path"));
    }
    if p.matches('@').count() > 1 {
        return Err(ConfigError::new(
            key,
            format!("invalid model path \"{p}\": more than one `@` (write `path@revision`)"),
        ));
    }
    Ok(())
}

/// Normalise a dtype name as mergekit's `dtype_from_name` reads it, keeping floating types.
fn parse_dtype(v: &Value, key: &str) -> Result<Option<String>, ConfigError> {
    let s = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.as_str(),
        other => {
            return Err(ConfigError::new(
                key,
                format!("expected a dtype name, found {}", kind(other)),
            ))
        }
    };
    let name = s.strip_prefix("torch.").unwrap_or(s);
    match name {
        "float32" | "float16" | "bfloat16" | "float64" => Ok(Some(name.to_string())),
        _ => {
            let hint = match name {
                "fp32" | "f32" | "float" => " (did you mean float32?)",
                "fp16" | "f16" | "half" => " (did you mean float16?)",
                "bf16" => " (did you mean bfloat16?)",
                "int64" => " (mergekit accepts int64 but merge methods need a floating dtype)",
                _ => "",
            };
            Err(ConfigError::new(
                key,
                format!(
                    "unknown dtype \"{s}\"; use one of float32, float16, bfloat16, float64{hint}"
                ),
            ))
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// An optional positive integer at `key` (absent or null: `None`).
fn positive_int(v: Option<&Value>, key: &str) -> Result<Option<usize>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|x| x > 0) => {
            Ok(n.as_u64().map(|x| x as usize))
        }
        Some(other) => Err(ConfigError::new(
            key,
            format!("expected a positive integer, found {}", describe(other)),
        )),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn key_str(k: &Value, path: &str) -> Result<String, ConfigError> {
    match k {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(ConfigError::new(
            path,
            format!("mapping keys must be names, found {}", kind(other)),
        )),
    }
}

/// PyYAML (YAML 1.1, which mergekit uses) reads these plain words as booleans; YAML 1.2 does not.
fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "True" | "TRUE" => Some(true),
        "no" | "No" | "NO" | "off" | "Off" | "OFF" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// Method contracts, as mergekit 0.1.5 declares them (`InputContract` in each
/// `mergekit/merge_methods/*.py`; the task-arithmetic family in
/// `generalized_task_arithmetic.py`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum BasePolicy {
    Required,
    Optional,
    Ignored,
}

#[derive(Debug, Clone, Copy)]
struct Contract {
    base: BasePolicy,
    min_inputs: usize,
    max_inputs: Option<usize>,
    min_non_base: Option<usize>,
    max_non_base: Option<usize>,
}

fn contract(method: &str) -> Contract {
    let c = |base, min_inputs, max_inputs, min_non_base, max_non_base| Contract {
        base,
        min_inputs,
        max_inputs,
        min_non_base,
        max_non_base,
    };
    use BasePolicy::*;
    match method {
        "slerp" | "nearswap" => c(Required, 2, Some(2), None, None),
        "model_stock" => c(Required, 3, None, None, None),
        "nuslerp" => c(Optional, 1, None, Some(2), Some(2)),
        "multislerp" => c(Optional, 1, None, Some(1), None),
        "passthrough" => c(Ignored, 1, Some(1), None, None),
        "linear" | "karcher" => c(Ignored, 1, None, None, None),
        "task_arithmetic" | "ties" | "dare_linear" | "dare_ties" | "breadcrumbs"
        | "breadcrumbs_ties" | "della" | "della_linear" | "sce" => c(Required, 1, None, None, None),
        // A method mergekit lacks: take amalgam's static facts.
        other => match crate::methods::info(other) {
            Ok(i) => c(
                if i.needs_base { Required } else { Optional },
                i.min_models.max(1),
                i.exact_models,
                None,
                None,
            ),
            Err(_) => c(Ignored, 1, None, None, None),
        },
    }
}

struct Walker {
    strict: bool,
    warnings: Vec<ConfigWarning>,
    config: MergeConfig,
}

const TOP_KEYS: &[&str] = &[
    "modules",
    "slices",
    "models",
    "merge_method",
    "base_model",
    "dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "out_dtype",
    "parameters",
    "random_seed",
    "name",
    "evaluation",
];
const EVALUATION_KEYS: &[&str] = &["suite", "out", "batch_size", "dump_scores"];
const MODEL_KEYS: &[&str] = &["model", "parameters", "statistics"];
const SLICE_KEYS: &[&str] = &["sources", "base_model", "residual_weight", "parameters"];
const SOURCE_KEYS: &[&str] = &["model", "layer_range", "parameters", "statistics"];
const MODULE_KEYS: &[&str] = &["slices", "models", "parameters"];
const MODEL_REF_KEYS: &[&str] = &["model", "lora", "override_architecture"];
const MODEL_PATH_KEYS: &[&str] = &["path", "revision"];
const TOKENIZER_KEYS: &[&str] = &["source", "tokens", "pad_to_multiple_of"];
const TOKEN_KEYS: &[&str] = &["source", "force"];
const TOKEN_SOURCE_KEYS: &[&str] = &["kind", "model", "token_id", "token"];
const FILTER_KEYS: &[&str] = &["filter", "value"];

impl Walker {
    fn warn(&mut self, key: String, message: impl Into<String>) {
        self.warnings.push(ConfigWarning {
            key,
            message: message.into(),
        });
    }

    fn ignore(&mut self, key: String, message: impl Into<String>) {
        self.config.ignored_keys.push(key.clone());
        self.warn(key, message);
    }

    /// Warn about (or, strict, refuse) keys of `m` outside `known`.
    fn check_keys(&mut self, m: &Mapping, path: &str, known: &[&str]) -> Result<(), ConfigError> {
        for k in m.keys() {
            let name = key_str(k, path)?;
            if !known.contains(&name.as_str()) {
                let key = join(path, &name);
                let msg = format!(
                    "unknown key (neither mergekit 0.1.5 nor amalgam uses it); known keys here: {}",
                    known.join(", ")
                );
                if self.strict {
                    return Err(ConfigError::new(key, msg));
                }
                self.warn(key, msg);
            }
        }
        Ok(())
    }

    fn top(&mut self, m: &Mapping) -> Result<(), ConfigError> {
        self.check_keys(m, "", TOP_KEYS)?;
        match m.get("merge_method") {
            None | Some(Value::Null) => {
                return Err(ConfigError::new(
                    "merge_method",
                    format!("missing; known methods: {}", known_methods()),
                ))
            }
            Some(Value::String(s)) => {
                if crate::methods::info(s).is_err() {
                    let msg = if MERGEKIT_ONLY_METHODS.contains(&s.as_str()) {
                        format!(
                            "mergekit's `{s}` is not implemented by amalgam; known methods: {}",
                            known_methods()
                        )
                    } else {
                        format!(
                            "unknown merge method `{s}`; known methods: {}",
                            known_methods()
                        )
                    };
                    return Err(ConfigError::new("merge_method", msg));
                }
                self.config.merge_method = s.clone();
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "merge_method",
                    format!("expected a method name, found {}", kind(other)),
                ))
            }
        }
        if let Some(v) = m.get("base_model") {
            self.config.base_model = self.opt_model_ref(v, "base_model")?;
        }
        if let Some(v) = m.get("dtype") {
            self.config.dtype = parse_dtype(v, "dtype")?;
        }
        if let Some(v) = m.get("out_dtype") {
            self.config.out_dtype = parse_dtype(v, "out_dtype")?;
        }
        if let Some(v) = m.get("parameters") {
            self.config.parameters = self.param_map(v, "parameters")?;
        }
        if let Some(v) = m.get("models") {
            self.config.models = self.models(v, "models")?;
        }
        if let Some(v) = m.get("slices") {
            self.config.slices = self.slices(v, "slices")?;
        }
        if let Some(v) = m.get("modules") {
            self.modules(v)?;
        }
        if let Some(v) = m.get("tokenizer_source") {
            self.config.tokenizer_source = self.tokenizer_source(v, "tokenizer_source")?;
        }
        if let Some(v) = m.get("tokenizer") {
            self.config.tokenizer = self.tokenizer(v, "tokenizer")?;
        }
        match m.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => self.config.chat_template = Some(s.clone()),
            Some(other) => {
                return Err(ConfigError::new(
                    "chat_template",
                    format!(
                        "expected a template name or Jinja text, found {}",
                        kind(other)
                    ),
                ))
            }
        }
        if let Some(v) = m.get("evaluation") {
            self.config.evaluation = self.evaluation(v, "evaluation")?;
        }
        match m.get("random_seed") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                let seed = n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|x| *x >= 0.0 && x.fract() == 0.0 && *x < 1.8e19)
                        .map(|x| x as u64)
                });
                match seed {
                    Some(s) => self.config.random_seed = Some(s),
                    None => {
                        return Err(ConfigError::new(
                            "random_seed",
                            format!("expected a non-negative integer, found {n}"),
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "random_seed",
                    format!("expected a non-negative integer, found {}", kind(other)),
                ))
            }
        }
        if m.contains_key("name") {
            self.ignore(
                "name".into(),
                "mergekit-multimerge's merge name; amalgam merges one config and ignores it",
            );
        }
        Ok(())
    }

    fn opt_model_ref(&mut self, v: &Value, path: &str) -> Result<Option<ModelRef>, ConfigError> {
        match v {
            Value::Null => Ok(None),
            _ => self.model_ref(v, path).map(Some),
        }
    }

    /// A model reference: a string, or mergekit's mapping form
    /// `{model: <path or {path, revision}>, lora: ..., override_architecture: ...}`.
    fn model_ref(&mut self, v: &Value, path: &str) -> Result<ModelRef, ConfigError> {
        match v {
            Value::String(s) => parse_model_ref(s, path),
            Value::Mapping(m) => {
                self.check_keys(m, path, MODEL_REF_KEYS)?;
                let model = match m.get("model") {
                    Some(x) => self.model_path(x, &join(path, "model"))?,
                    None => return Err(ConfigError::new(join(path, "model"), "missing")),
                };
                let adapter = match m.get("lora") {
                    None | Some(Value::Null) => None,
                    Some(x) => Some(self.model_path(x, &join(path, "lora"))?),
                };
                if let Some(a) = m.get("override_architecture") {
                    if !matches!(a, Value::Null) {
                        self.ignore(
                            join(path, "override_architecture"),
                            "amalgam merges by tensor name and does not use architecture overrides",
                        );
                    }
                }
                Ok(ModelRef {
                    path: model,
                    adapter,
                })
            }
            other => Err(ConfigError::new(
                path,
                format!("expected a model path, found {}", kind(other)),
            )),
        }
    }

    /// mergekit's `ModelPath`: `path@revision` or `{path, revision}`; kept as `path@revision`.
    fn model_path(&mut self, v: &Value, path: &str) -> Result<String, ConfigError> {
        match v {
            Value::String(s) => {
                check_model_path(s, path)?;
                Ok(s.clone())
            }
            Value::Mapping(m) => {
                self.check_keys(m, path, MODEL_PATH_KEYS)?;
                let p = match m.get("path") {
                    Some(Value::String(s)) => s.clone(),
                    _ => {
                        return Err(ConfigError::new(
                            join(path, "path"),
                            "expected a path string",
                        ))
                    }
                };
                let full = match m.get("revision") {
                    None | Some(Value::Null) => p,
                    Some(Value::String(r)) => format!("{p}@{r}"),
                    Some(other) => {
                        return Err(ConfigError::new(
                            join(path, "revision"),
                            format!("expected a string, found {}", kind(other)),
                        ))
                    }
                };
                check_model_path(&full, path)?;
                Ok(full)
            }
            other => Err(ConfigError::new(
                path,
                format!("expected a model path, found {}", kind(other)),
            )),
        }
    }

    fn statistics(&mut self, m: &Mapping, model: &ModelRef, path: &str) -> Result<(), ConfigError> {
        match m.get("statistics") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) => {
                self.config.statistics.insert(model.clone(), s.clone());
                Ok(())
            }
            Some(other) => Err(ConfigError::new(
                join(path, "statistics"),
                format!("expected a path, found {}", kind(other)),
            )),
        }
    }

    fn models(&mut self, v: &Value, path: &str) -> Result<Vec<ModelSpec>, ConfigError> {
        let seq = match v {
            Value::Null => return Ok(Vec::new()),
            Value::Sequence(s) => s,
            other => {
                return Err(ConfigError::new(
                    path,
                    format!("expected a list of models, found {}", kind(other)),
                ))
            }
        };
        let mut out = Vec::new();
        for (i, e) in seq.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Value::Mapping(m) = e else {
                return Err(ConfigError::new(
                    p,
                    format!(
                        "expected a mapping with `model:` (and optional `parameters:`), found {}",
                        kind(e)
                    ),
                ));
            };
            self.check_keys(m, &p, MODEL_KEYS)?;
            let model = match m.get("model") {
                Some(x) => self.model_ref(x, &join(&p, "model"))?,
                None => return Err(ConfigError::new(join(&p, "model"), "missing")),
            };
            let parameters = match m.get("parameters") {
                Some(x) => self.param_map(x, &join(&p, "parameters"))?,
                None => ParamMap::new(),
            };
            self.statistics(m, &model, &p)?;
            out.push(ModelSpec { model, parameters });
        }
        Ok(out)
    }

    fn slices(&mut self, v: &Value, path: &str) -> Result<Vec<SliceSpec>, ConfigError> {
        let seq = match v {
            Value::Null => return Ok(Vec::new()),
            Value::Sequence(s) => s,
            other => {
                return Err(ConfigError::new(
                    path,
                    format!("expected a list of slices, found {}", kind(other)),
                ))
            }
        };
        let mut out = Vec::new();
        for (i, e) in seq.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Value::Mapping(m) = e else {
                return Err(ConfigError::new(
                    p,
                    format!("expected a mapping with `sources:`, found {}", kind(e)),
                ));
            };
            self.check_keys(m, &p, SLICE_KEYS)?;
            let sources = match m.get("sources") {
                Some(Value::Sequence(s)) if !s.is_empty() => {
                    let mut v = Vec::new();
                    for (j, s) in s.iter().enumerate() {
                        v.push(self.source(s, &format!("{p}.sources[{j}]"))?);
                    }
                    v
                }
                Some(Value::Sequence(_)) => {
                    return Err(ConfigError::new(
                        join(&p, "sources"),
                        "a slice needs at least one source",
                    ))
                }
                Some(other) => {
                    return Err(ConfigError::new(
                        join(&p, "sources"),
                        format!("expected a list of sources, found {}", kind(other)),
                    ))
                }
                None => return Err(ConfigError::new(join(&p, "sources"), "missing")),
            };
            let base_model = match m.get("base_model") {
                Some(x) => self.opt_model_ref(x, &join(&p, "base_model"))?,
                None => None,
            };
            let residual_weight = match m.get("residual_weight") {
                None | Some(Value::Null) => None,
                Some(x) => Some(finite_number(x, &join(&p, "residual_weight"))?),
            };
            let parameters = match m.get("parameters") {
                Some(x) => self.param_map(x, &join(&p, "parameters"))?,
                None => ParamMap::new(),
            };
            out.push(SliceSpec {
                sources,
                base_model,
                parameters,
                residual_weight,
            });
        }
        Ok(out)
    }

    fn source(&mut self, v: &Value, path: &str) -> Result<SliceSource, ConfigError> {
        let Value::Mapping(m) = v else {
            return Err(ConfigError::new(
                path,
                format!(
                    "expected a mapping with `model:` and `layer_range:`, found {}",
                    kind(v)
                ),
            ));
        };
        self.check_keys(m, path, SOURCE_KEYS)?;
        let model = match m.get("model") {
            Some(x) => self.model_ref(x, &join(path, "model"))?,
            None => return Err(ConfigError::new(join(path, "model"), "missing")),
        };
        let lr_key = join(path, "layer_range");
        let layer_range = match m.get("layer_range") {
            None | Some(Value::Null) => None,
            Some(Value::Sequence(s)) if s.len() == 2 => {
                let a = layer_index(&s[0], &lr_key)?;
                let b = layer_index(&s[1], &lr_key)?;
                if a >= b {
                    return Err(ConfigError::new(
                        lr_key,
                        format!(
                            "[{a}, {b}] is empty; a layer range is [start, end) with start < end"
                        ),
                    ));
                }
                Some((a, b))
            }
            Some(other) => {
                return Err(ConfigError::new(
                    lr_key,
                    format!("expected [start, end), found {}", describe(other)),
                ))
            }
        };
        let parameters = match m.get("parameters") {
            Some(x) => self.param_map(x, &join(path, "parameters"))?,
            None => ParamMap::new(),
        };
        self.statistics(m, &model, path)?;
        Ok(SliceSource {
            model,
            layer_range,
            parameters,
        })
    }

    fn modules(&mut self, v: &Value) -> Result<(), ConfigError> {
        let m = match v {
            Value::Null => return Ok(()),
            Value::Mapping(m) => m,
            other => {
                return Err(ConfigError::new(
                    "modules",
                    format!("expected a mapping of module names, found {}", kind(other)),
                ))
            }
        };
        if m.is_empty() {
            return Ok(());
        }
        if m.len() > 1 {
            let names: Vec<String> = m
                .keys()
                .filter_map(|k| key_str(k, "modules").ok())
                .collect();
            return Err(ConfigError::new(
                "modules",
                format!(
                    "{} modules ({}); amalgam merges a checkpoint as one module; use `models:` or \
                     `slices:` (tensor-name filters in `parameters` can treat parts differently)",
                    m.len(),
                    names.join(", ")
                ),
            ));
        }
        let (k, body) = m.iter().next().expect("one module, checked above");
        let path = format!("modules.{}", key_str(k, "modules")?);
        let Value::Mapping(body) = body else {
            return Err(ConfigError::new(
                path,
                format!(
                    "expected a mapping with `models:` or `slices:`, found {}",
                    kind(body)
                ),
            ));
        };
        self.check_keys(body, &path, MODULE_KEYS)?;
        let models = match body.get("models") {
            Some(x) => self.models(x, &join(&path, "models"))?,
            None => Vec::new(),
        };
        let slices = match body.get("slices") {
            Some(x) => self.slices(x, &join(&path, "slices"))?,
            None => Vec::new(),
        };
        if models.is_empty() == slices.is_empty() {
            return Err(ConfigError::new(
                path,
                "a module needs exactly one of `models:` or `slices:`",
            ));
        }
        if !self.config.models.is_empty() || !self.config.slices.is_empty() {
            return Err(ConfigError::new(
                "modules",
                "exactly one of `models`, `slices` or `modules` may be given",
            ));
        }
        let params = match body.get("parameters") {
            Some(x) => self.param_map(x, &join(&path, "parameters"))?,
            None => ParamMap::new(),
        };
        // Module parameters sit between slice and top-level ones: fold them over the top level.
        for (key, mv) in params {
            let merged = match self.config.parameters.remove(&key) {
                Some(tv) => over(mv, &tv),
                None => mv,
            };
            self.config.parameters.insert(key, merged);
        }
        self.config.models = models;
        self.config.slices = slices;
        Ok(())
    }

    fn tokenizer_source(
        &mut self,
        v: &Value,
        path: &str,
    ) -> Result<Option<TokenizerSource>, ConfigError> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) if s == "union" => Some(TokenizerSource::Union),
            Value::String(s) if s == "base" => Some(TokenizerSource::Base),
            other => Some(TokenizerSource::Model(self.model_ref(other, path)?)),
        })
    }

    /// The `evaluation:` section (amalgam; null means none).
    fn evaluation(
        &mut self,
        v: &Value,
        path: &str,
    ) -> Result<Option<EvaluationConfig>, ConfigError> {
        let m = match v {
            Value::Null => return Ok(None),
            Value::Mapping(m) => m,
            other => {
                return Err(ConfigError::new(
                    path,
                    format!("expected a mapping with `suite`, found {}", kind(other)),
                ))
            }
        };
        self.check_keys(m, path, EVALUATION_KEYS)?;
        let text = |key: &str| -> Result<Option<String>, ConfigError> {
            match m.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(other) => Err(ConfigError::new(
                    join(path, key),
                    format!("expected a path, found {}", describe(other)),
                )),
            }
        };
        let suite = text("suite")?.ok_or_else(|| {
            ConfigError::new(
                join(path, "suite"),
                "required: the suite file to run on the output",
            )
        })?;
        let batch_size = positive_int(m.get("batch_size"), &join(path, "batch_size"))?;
        Ok(Some(EvaluationConfig {
            suite,
            out: text("out")?,
            batch_size,
            dump_scores: text("dump_scores")?,
        }))
    }

    fn tokenizer(&mut self, v: &Value, path: &str) -> Result<Option<TokenizerConfig>, ConfigError> {
        let m = match v {
            Value::Null => return Ok(None),
            Value::Mapping(m) => m,
            other => {
                return Err(ConfigError::new(
                    path,
                    format!(
                        "expected a mapping (source, tokens, pad_to_multiple_of), found {}",
                        kind(other)
                    ),
                ))
            }
        };
        self.check_keys(m, path, TOKENIZER_KEYS)?;
        let source = match m.get("source") {
            // mergekit's default (`TokenizerConfig.source = "union"`).
            None => Some(TokenizerSource::Union),
            Some(x) => match self.tokenizer_source(x, &join(path, "source"))? {
                Some(s) => Some(s),
                None => {
                    return Err(ConfigError::new(
                        join(path, "source"),
                        "expected `union`, `base` or a model",
                    ))
                }
            },
        };
        let pad_to_multiple_of = positive_int(
            m.get("pad_to_multiple_of"),
            &join(path, "pad_to_multiple_of"),
        )?;
        let tokens = match m.get("tokens") {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(t)) => {
                let tpath = join(path, "tokens");
                for (name, cfg) in t {
                    let p = join(&tpath, &key_str(name, &tpath)?);
                    self.token_config(cfg, &p)?;
                }
                if !t.is_empty() {
                    self.ignore(
                        tpath.clone(),
                        "per-token embedding sources are not implemented; only `source` and \
                         `pad_to_multiple_of` are honoured",
                    );
                }
                Some(serde_json::to_value(t).map_err(|e| ConfigError::new(tpath, e.to_string()))?)
            }
            Some(other) => {
                return Err(ConfigError::new(
                    join(path, "tokens"),
                    format!("expected a mapping of tokens, found {}", kind(other)),
                ))
            }
        };
        Ok(Some(TokenizerConfig {
            source,
            pad_to_multiple_of,
            tokens,
        }))
    }

    /// mergekit's `TokenEmbeddingConfig`: `{source, force}`, `source` being a model, a
    /// `{kind: model_token, model, token | token_id}` or `{kind: zero}`.
    fn token_config(&mut self, v: &Value, path: &str) -> Result<(), ConfigError> {
        let Value::Mapping(m) = v else {
            return Err(ConfigError::new(
                path,
                format!("expected a mapping (source, force), found {}", kind(v)),
            ));
        };
        self.check_keys(m, path, TOKEN_KEYS)?;
        if let Some(f) = m.get("force") {
            if !matches!(f, Value::Bool(_) | Value::Null) {
                return Err(ConfigError::new(
                    join(path, "force"),
                    "expected true or false",
                ));
            }
        }
        let spath = join(path, "source");
        match m.get("source") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(s)) if s.contains_key("kind") => {
                self.check_keys(s, &spath, TOKEN_SOURCE_KEYS)?;
                match s.get("kind") {
                    Some(Value::String(k)) if k == "zero" => {}
                    Some(Value::String(k)) if k == "model_token" => {
                        match s.get("model") {
                            Some(x) => {
                                self.model_ref(x, &join(&spath, "model"))?;
                            }
                            None => return Err(ConfigError::new(join(&spath, "model"), "missing")),
                        }
                        let has_id = !matches!(s.get("token_id"), None | Some(Value::Null));
                        let has_tok = !matches!(s.get("token"), None | Some(Value::Null));
                        if has_id == has_tok {
                            return Err(ConfigError::new(
                                spath,
                                "give exactly one of `token_id` or `token`",
                            ));
                        }
                    }
                    _ => {
                        return Err(ConfigError::new(
                            join(&spath, "kind"),
                            "expected `model_token` or `zero`",
                        ))
                    }
                }
            }
            Some(other) => {
                self.model_ref(other, &spath)?;
            }
        }
        Ok(())
    }

    fn param_map(&mut self, v: &Value, path: &str) -> Result<ParamMap, ConfigError> {
        let m = match v {
            Value::Null => return Ok(ParamMap::new()),
            Value::Mapping(m) => m,
            other => {
                return Err(ConfigError::new(
                    path,
                    format!(
                        "expected a mapping of parameter names to values, found {}",
                        kind(other)
                    ),
                ))
            }
        };
        let mut out = ParamMap::new();
        for (k, v) in m {
            let name = match k {
                Value::String(s) => s.clone(),
                other => {
                    return Err(ConfigError::new(
                        path,
                        format!("parameter names must be strings, found {}", describe(other)),
                    ))
                }
            };
            let p = join(path, &name);
            let value = self.param_value(v, &p)?;
            if name == "density" {
                check_density(&value, &p)?;
            }
            out.insert(name, value);
        }
        Ok(out)
    }

    /// mergekit's `ParameterSetting`: a scalar, a list of scalars, one `{filter, value}` map or a
    /// list of them.
    fn param_value(&mut self, v: &Value, path: &str) -> Result<ParamValue, ConfigError> {
        match v {
            Value::Mapping(m) => Ok(ParamValue::Filtered(vec![self.filtered(m, path)?])),
            Value::Sequence(s) if s.iter().any(|e| matches!(e, Value::Mapping(_))) => {
                let mut entries = Vec::new();
                for (i, e) in s.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    let Value::Mapping(m) = e else {
                        return Err(ConfigError::new(
                            p,
                            format!(
                                "a list of `{{filter, value}}` entries cannot also hold {}",
                                kind(e)
                            ),
                        ));
                    };
                    entries.push(self.filtered(m, &p)?);
                }
                Ok(ParamValue::Filtered(entries))
            }
            other => scalar_or_gradient(other, path),
        }
    }

    fn filtered(&mut self, m: &Mapping, path: &str) -> Result<FilteredValue, ConfigError> {
        self.check_keys(m, path, FILTER_KEYS)?;
        let filter = match m.get("filter") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(ConfigError::new(
                    join(path, "filter"),
                    format!("expected a tensor-name substring, found {}", kind(other)),
                ))
            }
        };
        let value = match m.get("value") {
            Some(v) => scalar_or_gradient(v, &join(path, "value"))?,
            None => return Err(ConfigError::new(join(path, "value"), "missing")),
        };
        Ok(FilteredValue { filter, value })
    }
}

fn known_methods() -> String {
    crate::methods::registry()
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("\"{s}\""),
        Value::Bool(b) => b.to_string(),
        other => kind(other).to_string(),
    }
}

fn finite_number(v: &Value, path: &str) -> Result<f64, ConfigError> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(ConfigError::new(
                path,
                format!("{n} is not a finite number"),
            )),
        },
        other => Err(ConfigError::new(
            path,
            format!("expected a number, found {}", describe(other)),
        )),
    }
}

fn layer_index(v: &Value, path: &str) -> Result<usize, ConfigError> {
    match v {
        Value::Number(n) if n.as_u64().is_some() => {
            Ok(n.as_u64().expect("checked by the guard") as usize)
        }
        other => Err(ConfigError::new(
            path,
            format!(
                "layer indices must be non-negative integers, found {}",
                describe(other)
            ),
        )),
    }
}

fn scalar(v: &Value, path: &str) -> Result<Scalar, ConfigError> {
    match v {
        Value::Bool(b) => Ok(Scalar::Bool(*b)),
        Value::Number(_) => Ok(Scalar::Num(finite_number(v, path)?)),
        Value::String(s) => Ok(match yaml11_bool(s) {
            Some(b) => Scalar::Bool(b),
            None => Scalar::Str(s.clone()),
        }),
        other => Err(ConfigError::new(
            path,
            format!(
                "expected a number, boolean, string, list of them, or `{{filter, value}}` entries; found {}",
                kind(other)
            ),
        )),
    }
}

fn scalar_or_gradient(v: &Value, path: &str) -> Result<ParamValue, ConfigError> {
    match v {
        Value::Sequence(s) => {
            let items = s
                .iter()
                .enumerate()
                .map(|(i, e)| match e {
                    Value::Sequence(_) | Value::Mapping(_) => Err(ConfigError::new(
                        format!("{path}[{i}]"),
                        format!(
                            "a gradient holds numbers (or booleans or strings), found {}",
                            kind(e)
                        ),
                    )),
                    _ => scalar(e, &format!("{path}[{i}]")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let nums: Vec<f64> = items
                .iter()
                .filter_map(|x| match x {
                    Scalar::Num(n) => Some(*n),
                    _ => None,
                })
                .collect();
            if nums.len() == items.len() {
                Ok(ParamValue::Gradient(nums))
            } else {
                Ok(ParamValue::Steps(items))
            }
        }
        other => Ok(ParamValue::Scalar(scalar(other, path)?)),
    }
}

/// Every number written for `density` must lie in (0, 1] (interpolation between such endpoints
/// stays inside).
fn check_density(v: &ParamValue, path: &str) -> Result<(), ConfigError> {
    let bad = |x: f64| !(x > 0.0 && x <= 1.0);
    let msg = |x: f64| {
        format!("density {x} is outside (0, 1]; it is the fraction of each task vector kept")
    };
    match v {
        ParamValue::Scalar(Scalar::Num(x)) if bad(*x) => Err(ConfigError::new(path, msg(*x))),
        ParamValue::Gradient(g) => match g.iter().position(|x| bad(*x)) {
            Some(i) => Err(ConfigError::new(format!("{path}[{i}]"), msg(g[i]))),
            None => Ok(()),
        },
        ParamValue::Steps(s) => {
            for (i, x) in s.iter().enumerate() {
                if let Scalar::Num(x) = x {
                    if bad(*x) {
                        return Err(ConfigError::new(format!("{path}[{i}]"), msg(*x)));
                    }
                }
            }
            Ok(())
        }
        ParamValue::Filtered(f) => {
            for (i, e) in f.iter().enumerate() {
                check_density(&e.value, &format!("{path}[{i}].value"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A value that evaluates to `high` where `high` gives something and to `low` elsewhere
/// (mergekit's fall-through from the module scope to the top level).
fn over(high: ParamValue, low: &ParamValue) -> ParamValue {
    match high {
        ParamValue::Gradient(ref g) if g.is_empty() => low.clone(),
        ParamValue::Steps(ref s) if s.is_empty() => low.clone(),
        ParamValue::Filtered(entries) => {
            let mut out: Vec<FilteredValue> = entries
                .into_iter()
                .map(|e| FilteredValue {
                    filter: e.filter,
                    value: over(e.value, low),
                })
                .collect();
            out.push(FilteredValue {
                filter: None,
                value: low.clone(),
            });
            ParamValue::Filtered(out)
        }
        other => other,
    }
}

/// One merge group (the `models:` list, or one slice) as mergekit validates it.
struct Group<'a> {
    /// Key naming the inputs in errors.
    key: String,
    /// Key naming the base in errors.
    base_key: String,
    /// Inputs with their own parameters, in order (the appended base has none).
    inputs: Vec<(&'a ModelRef, Option<&'a ParamMap>)>,
    base: Option<&'a ModelRef>,
    slice_params: Option<&'a ParamMap>,
}

fn validate(w: &mut Walker) -> Result<(), ConfigError> {
    let c = &w.config;
    match (c.models.is_empty(), c.slices.is_empty()) {
        (false, false) => {
            return Err(ConfigError::new(
                "models",
                "both `models` and `slices` are given; use exactly one",
            ))
        }
        (true, true) => {
            return Err(ConfigError::new(
                "models",
                "neither `models` nor `slices` (nor `modules`) is given; list the models to merge",
            ))
        }
        _ => {}
    }
    if c.tokenizer_source.is_some() && c.tokenizer.is_some() {
        return Err(ConfigError::new(
            "tokenizer_source",
            "give either `tokenizer_source` or `tokenizer`, not both",
        ));
    }
    let method = c.merge_method.as_str();
    let con = contract(method);
    let mut groups = Vec::new();
    if !c.models.is_empty() {
        let mut inputs: Vec<(&ModelRef, Option<&ParamMap>)> = c
            .models
            .iter()
            .map(|m| (&m.model, Some(&m.parameters)))
            .collect();
        if let Some(b) = &c.base_model {
            if !inputs.iter().any(|(m, _)| *m == b) {
                inputs.push((b, None));
            }
        }
        groups.push(Group {
            key: "models".into(),
            base_key: "base_model".into(),
            inputs,
            base: c.base_model.as_ref(),
            slice_params: None,
        });
    } else {
        for (i, s) in c.slices.iter().enumerate() {
            let lens: Vec<usize> = s
                .sources
                .iter()
                .filter_map(|x| x.layer_range.map(|(a, b)| b - a))
                .collect();
            if lens.windows(2).any(|p| p[0] != p[1]) {
                return Err(ConfigError::new(
                    format!("slices[{i}].sources"),
                    format!(
                        "sources span different numbers of layers ({lens:?}); all sources of a \
                         slice must cover the same number of layers"
                    ),
                ));
            }
            groups.push(Group {
                key: format!("slices[{i}].sources"),
                base_key: if s.base_model.is_some() {
                    format!("slices[{i}].base_model")
                } else {
                    "base_model".into()
                },
                inputs: s
                    .sources
                    .iter()
                    .map(|x| (&x.model, Some(&x.parameters)))
                    .collect(),
                base: s.base_model.as_ref().or(c.base_model.as_ref()),
                slice_params: Some(&s.parameters),
            });
        }
    }
    let mut warnings = Vec::new();
    for g in &groups {
        check_group(method, &con, g)?;
        check_weight_sum(method, &con, g, &c.parameters, &mut warnings)?;
    }
    w.warnings.extend(warnings);
    Ok(())
}

fn check_group(method: &str, con: &Contract, g: &Group<'_>) -> Result<(), ConfigError> {
    for (i, (m, _)) in g.inputs.iter().enumerate() {
        if g.inputs[..i].iter().any(|(x, _)| x == m) {
            return Err(ConfigError::new(
                g.key.clone(),
                format!("model {m} is listed twice; mergekit refuses duplicate merge inputs"),
            ));
        }
    }
    let base = if con.base == BasePolicy::Ignored {
        None
    } else {
        g.base
    };
    let has_base = base.is_some_and(|b| g.inputs.iter().any(|(m, _)| *m == b));
    if let (Some(b), false) = (base, has_base) {
        return Err(ConfigError::new(
            g.base_key.clone(),
            format!(
                "base model {b} is not among the inputs of `{}`; list it as a source",
                g.key
            ),
        ));
    }
    if con.base == BasePolicy::Required && !has_base {
        return Err(ConfigError::new(
            g.base_key.clone(),
            format!("merge method `{method}` needs `base_model`"),
        ));
    }
    let count = g.inputs.len();
    let non_base = count - usize::from(has_base);
    let range = |what: &str, n: usize, min: usize, max: Option<usize>| -> Result<(), ConfigError> {
        let expect = match max {
            Some(x) if x == min => format!("exactly {min}"),
            Some(x) if n > x => format!("at most {x}"),
            _ => format!("at least {min}"),
        };
        if n < min || max.is_some_and(|x| n > x) {
            let base_note = if g.key == "models" && base.is_some() {
                " (the base model counts, and is added when not listed)"
            } else {
                ""
            };
            return Err(ConfigError::new(
                g.key.clone(),
                format!("merge method `{method}` needs {expect} {what}{base_note}; got {n}"),
            ));
        }
        Ok(())
    };
    range("models", count, con.min_inputs, con.max_inputs)?;
    if con.min_non_base.is_some() || con.max_non_base.is_some() {
        range(
            "models besides the base",
            non_base,
            con.min_non_base.unwrap_or(0),
            con.max_non_base,
        )?;
    }
    Ok(())
}

/// The plain number for `key` of one input (model, then slice, then top level), or `None` when
/// it is not a plain number anywhere it applies (a gradient or a filter decides per tensor).
fn plain_num(scopes: &[Option<&ParamMap>], key: &str) -> Option<Option<f64>> {
    for s in scopes.iter().flatten() {
        if let Some(v) = s.get(key) {
            return match v {
                ParamValue::Scalar(Scalar::Num(x)) => Some(Some(*x)),
                _ => None,
            };
        }
    }
    Some(None)
}

fn plain_bool(scopes: &[Option<&ParamMap>], key: &str, default: bool) -> Option<bool> {
    for s in scopes.iter().flatten() {
        if let Some(v) = s.get(key) {
            return match v {
                ParamValue::Scalar(Scalar::Bool(b)) => Some(*b),
                ParamValue::Scalar(Scalar::Num(x)) if *x == 0.0 || *x == 1.0 => Some(*x == 1.0),
                _ => None,
            };
        }
    }
    Some(default)
}

fn check_weight_sum(
    method: &str,
    con: &Contract,
    g: &Group<'_>,
    top: &ParamMap,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<(), ConfigError> {
    // (normalising flag, its default, whether a zero sum is an error, whether the base is weighted)
    let (flag, default, fatal, base_weighted) = match method {
        "linear" => ("normalize", true, true, true),
        "multislerp" => ("normalize_weights", true, true, false),
        "task_arithmetic" | "dare_linear" | "breadcrumbs" | "della_linear" => {
            ("normalize", false, false, false)
        }
        _ => return Ok(()),
    };
    let shared = [g.slice_params, Some(top)];
    if plain_bool(&shared, flag, default) != Some(true) {
        return Ok(());
    }
    let base = if con.base == BasePolicy::Ignored {
        None
    } else {
        g.base
    };
    let mut sum = 0.0f64;
    let mut weights = Vec::new();
    for (m, p) in &g.inputs {
        if !base_weighted && base == Some(*m) {
            continue;
        }
        match plain_num(&[*p, g.slice_params, Some(top)], "weight") {
            Some(Some(x)) => {
                sum += x;
                weights.push(x);
            }
            // Missing weights are the planner's error; gradients and filters vary per tensor.
            _ => return Ok(()),
        }
    }
    // linear divides by any non-zero sum; the task-arithmetic family replaces |sum| < 1e-8 by 1.
    let zero = if fatal { sum == 0.0 } else { sum.abs() < 1e-8 };
    if weights.is_empty() || !zero {
        return Ok(());
    }
    let key = format!("{}[].parameters.weight", g.key);
    let list = weights
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if fatal {
        Err(ConfigError::new(
            key,
            format!(
                "weights {list} sum to 0, and `{method}` divides by their sum ({flag}: true is \
                 the default); change the weights or set `{flag}: false`"
            ),
        ))
    } else {
        warnings.push(ConfigWarning {
            key,
            message: format!(
                "weights {list} sum to 0 with `normalize: true`; like mergekit, the division is \
                 skipped (a zero divisor is replaced by 1)"
            ),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> (MergeConfig, Vec<ConfigWarning>) {
        parse_config(text, false).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> ConfigError {
        match parse_config(text, false) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    fn num(x: f64) -> ParamValue {
        ParamValue::Scalar(Scalar::Num(x))
    }

    fn mref(p: &str) -> ModelRef {
        ModelRef {
            path: p.into(),
            adapter: None,
        }
    }

    // mergekit's examples/linear.yml
    const LINEAR: &str = "\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
";

    // mergekit's examples/gradient-slerp.yml
    const GRADIENT_SLERP: &str = "\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
";

    // mergekit's examples/orcamini-platy-44layer.yml
    const PASSTHROUGH: &str = "\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
";

    // mergekit's examples/bio-merge.yml
    const BIO_TIES: &str = "\
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16";

    // mergekit's examples/vlm-ties.yml
    const VLM_TIES: &str = "\
models:
  # - model: impactframes/Qwen2-VL-7B-Captioner
  - model: maxiw/Florence-2-ScreenQA-base
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  # - model: Qwen/Qwen2-VL-7B-Instruct
  - model: microsoft/Florence-2-base
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
merge_method: ties
# base_model: Qwen/Qwen2-VL-7B-Instruct
base_model: microsoft/Florence-2-base
parameters:
  normalize: true
  int8_mask: true
dtype: float16";

    // Second document of mergekit's examples/mega.yml (minus mergekit-mega's `out_path`).
    const MEGA_TIES: &str = "\
models:
  - model: ./models/gradient-slerp
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
";

    // mergekit's examples/gpt2-small.yml
    const GPT2_SMALL: &str = "\
slices:
  - sources:
    - model: gpt2
      layer_range: [0, 8]
merge_method: passthrough
dtype: float16
";

    #[test]
    fn mergekit_examples_parse_without_warnings() {
        for (name, text) in [
            ("linear", LINEAR),
            ("gradient-slerp", GRADIENT_SLERP),
            ("orcamini-platy-44layer", PASSTHROUGH),
            ("bio-merge", BIO_TIES),
            ("vlm-ties", VLM_TIES),
            ("mega (ties)", MEGA_TIES),
            ("gpt2-small", GPT2_SMALL),
        ] {
            let (c, w) = parse_config(text, true).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(w.is_empty(), "{name}: {w:?}");
            assert!(c.ignored_keys.is_empty(), "{name}");
            assert_eq!(c.source_text, text);
        }
    }

    #[test]
    fn amalgam_demo_config_parses_strictly() {
        let text = "merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/math\n    parameters: {weight: 1.0, density: 0.5}\n  - model: models/chat\n    parameters:\n      weight: 0.5\n      density: [0.3, 0.7]\nparameters:\n  normalize: true\ndtype: float32\n";
        let (c, w) = parse_config(text, true).unwrap();
        assert!(w.is_empty());
        assert_eq!(
            c.models[1].parameters.get("density"),
            Some(&ParamValue::Gradient(vec![0.3, 0.7]))
        );
    }

    #[test]
    fn models_form() {
        let (c, w) = ok(LINEAR);
        assert!(w.is_empty());
        assert_eq!(c.merge_method, "linear");
        assert_eq!(c.dtype.as_deref(), Some("float16"));
        assert_eq!(c.models.len(), 3);
        assert!(c.slices.is_empty());
        assert_eq!(c.models[1].model, mref("WizardLM/WizardLM-13B-V1.2"));
        assert_eq!(c.models[1].parameters.get("weight"), Some(&num(0.3)));
        assert_eq!(c.base_model, None);
    }

    #[test]
    fn slices_with_layer_ranges() {
        let (c, _) = ok(PASSTHROUGH);
        assert!(c.models.is_empty());
        assert_eq!(c.slices.len(), 2);
        assert_eq!(c.slices[0].sources[0].layer_range, Some((0, 24)));
        assert_eq!(c.slices[1].sources[0].layer_range, Some((20, 40)));
        assert_eq!(
            c.slices[1].sources[0].model,
            mref("garage-bAInd/Platypus2-13B")
        );
        let (c, _) = ok(GRADIENT_SLERP);
        assert_eq!(c.base_model, Some(mref("psmathur/orca_mini_v3_13b")));
        assert_eq!(c.slices[0].sources.len(), 2);

        let bad = PASSTHROUGH.replace("[20, 40]", "[40, 20]");
        assert_eq!(err(&bad).key, "slices[1].sources[0].layer_range");
        let bad = PASSTHROUGH.replace("[20, 40]", "[20, 20]");
        assert_eq!(err(&bad).key, "slices[1].sources[0].layer_range");
        let bad = PASSTHROUGH.replace("[20, 40]", "[20, 30, 40]");
        assert_eq!(err(&bad).key, "slices[1].sources[0].layer_range");
        let bad = PASSTHROUGH.replace("[20, 40]", "[-1, 40]");
        assert_eq!(err(&bad).key, "slices[1].sources[0].layer_range");
        let bad = GRADIENT_SLERP.replace(
            "layer_range: [0, 40]\n      - model: garage",
            "layer_range: [0, 30]\n      - model: garage",
        );
        assert_eq!(err(&bad).key, "slices[0].sources");
        // Slice-level base and parameters, residual_weight.
        let text = "\
merge_method: slerp
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [4, 8]}
    base_model: b
    residual_weight: 0.25
    parameters: {t: 0.3}
";
        let (c, w) = ok(text);
        assert!(w.is_empty());
        assert_eq!(c.slices[0].base_model, Some(mref("b")));
        assert_eq!(c.slices[0].residual_weight, Some(0.25));
        assert_eq!(c.slices[0].parameters.get("t"), Some(&num(0.3)));
        // The slice's base must be one of its sources.
        let bad = text.replace("base_model: b", "base_model: c");
        assert_eq!(err(&bad).key, "slices[0].base_model");
    }

    #[test]
    fn filter_lists() {
        let (c, _) = ok(GRADIENT_SLERP);
        let ParamValue::Filtered(f) = c.parameters.get("t").unwrap() else {
            panic!()
        };
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].filter.as_deref(), Some("self_attn"));
        assert_eq!(
            f[0].value,
            ParamValue::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0])
        );
        assert_eq!(f[1].filter.as_deref(), Some("mlp"));
        assert_eq!(f[2].filter, None);
        assert_eq!(f[2].value, num(0.5));
        let (c, _) = ok(MEGA_TIES);
        let ParamValue::Filtered(f) = c.models[1].parameters.get("weight").unwrap() else {
            panic!()
        };
        assert_eq!(
            f[0],
            FilteredValue {
                filter: Some("mlp".into()),
                value: num(0.5)
            }
        );
        assert_eq!(
            f[1],
            FilteredValue {
                filter: None,
                value: num(0.0)
            }
        );
        // A single {filter, value} map (not in a list) is accepted, as in mergekit.
        let (c, _) = ok("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: {filter: mlp, value: 2}\n");
        assert_eq!(
            c.parameters.get("weight"),
            Some(&ParamValue::Filtered(vec![FilteredValue {
                filter: Some("mlp".into()),
                value: num(2.0)
            }]))
        );
        // Mixed lists and nested filters are errors naming the key.
        let e = err(
            "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: [{value: 1}, 2]\n",
        );
        assert_eq!(e.key, "parameters.weight[1]");
        let e = err("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: [{value: [{value: 1}]}]\n");
        assert_eq!(e.key, "parameters.weight[0].value[0]");
        let e = err("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: null\n");
        assert_eq!(e.key, "parameters.weight");
        let e =
            err("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: [[1, 2]]\n");
        assert_eq!(e.key, "parameters.weight[0]");
        let e = err(
            "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: [{filter: mlp}]\n",
        );
        assert_eq!(e.key, "parameters.weight[0].value");
        // `pattern` (an old spelling) is not a mergekit key: warned, and the entry matches all.
        let (_, w) = ok(&GRADIENT_SLERP.replace("filter: mlp", "pattern: mlp"));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].key, "parameters.t[1].pattern");
    }

    #[test]
    fn per_model_gradients() {
        let (c, w) = ok(VLM_TIES);
        assert!(w.is_empty());
        assert_eq!(
            c.models[0].parameters.get("density"),
            Some(&ParamValue::Gradient(vec![1.0, 0.7, 0.1]))
        );
        assert_eq!(
            c.models[1].parameters.get("weight"),
            Some(&ParamValue::Gradient(vec![0.0, 0.3, 0.7, 1.0]))
        );
        assert_eq!(
            c.parameters.get("int8_mask"),
            Some(&ParamValue::Scalar(Scalar::Bool(true)))
        );
        // Non-numeric lists are steps; YAML 1.1 words are booleans as PyYAML reads them.
        let (c, _) = ok("merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\n\
                         parameters:\n  nuslerp_flatten: [yes, false]\n  nuslerp_row_wise: off\n");
        assert_eq!(
            c.parameters.get("nuslerp_flatten"),
            Some(&ParamValue::Steps(vec![
                Scalar::Bool(true),
                Scalar::Bool(false)
            ]))
        );
        assert_eq!(
            c.parameters.get("nuslerp_row_wise"),
            Some(&ParamValue::Scalar(Scalar::Bool(false)))
        );
        // Scientific notation is a number.
        let (c, _) = ok("merge_method: karcher\nmodels: [{model: a}, {model: b}]\nparameters: {tol: [1e-5, 1.0e-3]}\n");
        assert_eq!(
            c.parameters.get("tol"),
            Some(&ParamValue::Gradient(vec![1e-5, 1e-3]))
        );
    }

    #[test]
    fn evaluation_section() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n";
        let (c, _) = ok(&format!(
            "{base}evaluation:\n  suite: suite.yaml\n  batch_size: 4\n  dump_scores: s.jsonl\n"
        ));
        let e = c.evaluation.unwrap();
        assert_eq!(e.suite, "suite.yaml");
        assert_eq!(e.batch_size, Some(4));
        assert_eq!(e.out, None);
        assert_eq!(e.dump_scores.as_deref(), Some("s.jsonl"));
        let err = parse_config(&format!("{base}evaluation:\n  batch_size: 4\n"), true).unwrap_err();
        assert!(err.to_string().contains("evaluation.suite"), "{err}");
        let err = parse_config(
            &format!("{base}evaluation:\n  suite: s\n  batch_size: 0\n"),
            true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("evaluation.batch_size"), "{err}");
    }

    #[test]
    fn tokenizer_sources() {
        let base = "merge_method: linear\nmodels: [{model: a}, {model: b}]\n";
        let (c, _) = ok(&format!("{base}tokenizer_source: base\n"));
        assert_eq!(c.tokenizer_source, Some(TokenizerSource::Base));
        let (c, _) = ok(&format!("{base}tokenizer_source: union\n"));
        assert_eq!(c.tokenizer_source, Some(TokenizerSource::Union));
        let (c, _) = ok(&format!("{base}tokenizer_source: org/chat-model\n"));
        assert_eq!(
            c.tokenizer_source,
            Some(TokenizerSource::Model(mref("org/chat-model")))
        );
        let (c, w) = ok(&format!(
            "{base}tokenizer:\n  source: b\n  pad_to_multiple_of: 64\n"
        ));
        assert!(w.is_empty());
        let t = c.tokenizer.unwrap();
        assert_eq!(t.source, Some(TokenizerSource::Model(mref("b"))));
        assert_eq!(t.pad_to_multiple_of, Some(64));
        // mergekit's default source is union.
        let (c, _) = ok(&format!("{base}tokenizer:\n  pad_to_multiple_of: 8\n"));
        assert_eq!(c.tokenizer.unwrap().source, Some(TokenizerSource::Union));
        // Per-token sources are accepted and reported as ignored.
        let (c, w) = ok(&format!(
            "{base}tokenizer:\n  source: union\n  tokens:\n    <|im_start|>:\n      source: a\n    <|x|>:\n      source:\n        kind: model_token\n        model: b\n        token: <|y|>\n    <|z|>:\n      source: {{kind: zero}}\n      force: true\n"
        ));
        assert_eq!(c.ignored_keys, vec!["tokenizer.tokens".to_string()]);
        assert_eq!(w.len(), 1);
        assert!(c.tokenizer.unwrap().tokens.is_some());
        let e = err(&format!(
            "{base}tokenizer_source: base\ntokenizer: {{source: base}}\n"
        ));
        assert_eq!(e.key, "tokenizer_source");
        let (_, w) = ok(&format!("{base}chat_template: chatml\n"));
        assert!(w.is_empty());
    }

    #[test]
    fn unknown_keys_warn_and_strict_refuses() {
        let text = "\
merge_method: linear
frobnicate: 3
models:
  - model: a
    parameters: {weight: 1, foo: 2}
    colour: red
  - model: b
    parameters: {weight: 1}
";
        let (c, w) = ok(text);
        let keys: Vec<&str> = w.iter().map(|x| x.key.as_str()).collect();
        assert_eq!(keys, vec!["frobnicate", "models[0].colour"]);
        // Parameter names are the planner's business.
        assert_eq!(c.models[0].parameters.get("foo"), Some(&num(2.0)));
        let e = parse_config(text, true).unwrap_err();
        assert_eq!(e.key, "frobnicate");
        let e = parse_config(&text.replace("frobnicate: 3\n", ""), true).unwrap_err();
        assert_eq!(e.key, "models[0].colour");
        let (_, w) = ok(&PASSTHROUGH.replace(
            "layer_range: [0, 24]",
            "layer_range: [0, 24]\n      extra: 1",
        ));
        assert_eq!(w[0].key, "slices[0].sources[0].extra");
        // mergekit-multimerge's `name` is known but ignored.
        let (c, w) = ok(&format!("name: stage1\n{LINEAR}"));
        assert_eq!(c.ignored_keys, vec!["name".to_string()]);
        assert_eq!(w.len(), 1);
        assert!(parse_config(&format!("name: stage1\n{LINEAR}"), true).is_ok());
    }

    #[test]
    fn density_out_of_range_names_the_key() {
        let e = err(&BIO_TIES.replacen("density: 0.5", "density: 1.5", 1));
        assert_eq!(e.key, "models[0].parameters.density");
        let e = err(&BIO_TIES.replacen("density: 0.5", "density: 0", 1));
        assert_eq!(e.key, "models[0].parameters.density");
        let e = err(&VLM_TIES.replace("[1, 0.7, 0.1]", "[1, -0.7, 0.1]"));
        assert_eq!(e.key, "models[0].parameters.density[1]");
        let e = err(&BIO_TIES.replace(
            "  int8_mask: true",
            "  int8_mask: true\n  density: [{filter: mlp, value: 2}]",
        ));
        assert_eq!(e.key, "parameters.density[0].value");
        assert!(parse_config(&BIO_TIES.replacen("density: 0.5", "density: 1", 1), false).is_ok());
    }

    #[test]
    fn slerp_needs_two_models_counting_the_base() {
        let two = "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}\n";
        ok(two);
        // The base is added when not listed: still 2.
        ok("merge_method: slerp\nbase_model: a\nmodels: [{model: b}]\nparameters: {t: 0.5}\n");
        let e = err(
            "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\n",
        );
        assert_eq!(e.key, "models");
        assert!(e.message.contains("exactly 2"), "{}", e.message);
        let e = err("merge_method: slerp\nbase_model: a\nmodels: [{model: b}, {model: c}]\n");
        assert_eq!(e.key, "models");
        let e = err("merge_method: slerp\nmodels: [{model: a}, {model: b}]\n");
        assert_eq!(e.key, "base_model");
        let e = err("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: a}]\n");
        assert_eq!(e.key, "models");
        // passthrough takes one input per slice.
        let e = err("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]\n");
        assert_eq!(e.key, "slices[0].sources");
    }

    #[test]
    fn model_stock_needs_two_fine_tunes() {
        let e = err("merge_method: model_stock\nbase_model: base\nmodels: [{model: a}]\n");
        assert_eq!(e.key, "models");
        let e = err(
            "merge_method: model_stock\nbase_model: base\nmodels: [{model: base}, {model: a}]\n",
        );
        assert_eq!(e.key, "models");
        ok("merge_method: model_stock\nbase_model: base\nmodels: [{model: a}, {model: b}]\n");
        // nuslerp: exactly two besides the optional base.
        let e = err("merge_method: nuslerp\nmodels: [{model: a}, {model: b}, {model: c}]\n");
        assert_eq!(e.key, "models");
        ok("merge_method: nuslerp\nbase_model: c\nmodels: [{model: a}, {model: b}]\n");
    }

    #[test]
    fn zero_weight_sum_with_normalize() {
        let text = "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: b, parameters: {weight: -1}}\n";
        let e = err(text);
        assert_eq!(e.key, "models[].parameters.weight");
        // normalize: false accepts.
        ok(&format!("{text}parameters: {{normalize: false}}\n"));
        // Top-level weight inherited by every model: 1 + (-1) from the model's own = 0.
        let e = err("merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - {model: a}\n  - {model: b, parameters: {weight: -1}}\n");
        assert_eq!(e.key, "models[].parameters.weight");
        // Gradients vary per layer: not checked here.
        ok("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: [1, 0]}}\n  - {model: b, parameters: {weight: -1}}\n");
        // Slices form.
        let e = err("merge_method: linear\nslices:\n  - sources:\n    - {model: a, layer_range: [0, 2], parameters: {weight: 0}}\n    - {model: b, layer_range: [0, 2], parameters: {weight: 0}}\n");
        assert_eq!(e.key, "slices[0].sources[].parameters.weight");
        // task_arithmetic without normalize accepts; with normalize, mergekit skips the division.
        let ta = "merge_method: task_arithmetic\nbase_model: c\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: b, parameters: {weight: -1}}\n";
        let (_, w) = ok(ta);
        assert!(w.is_empty());
        let (_, w) = ok(&format!("{ta}parameters: {{normalize: true}}\n"));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].key, "models[].parameters.weight");
        // ties divides by the masked weight sum (0 -> 1): accepted.
        let (_, w) = ok(&ta.replace("task_arithmetic", "ties"));
        assert!(w.is_empty());
    }

    #[test]
    fn hub_names() {
        assert!(looks_like_hub_name("mistralai/Mistral-7B-v0.1"));
        assert!(looks_like_hub_name("garage-bAInd/Platypus2-13B"));
        assert!(looks_like_hub_name("org/name@main"));
        assert!(!looks_like_hub_name("gpt2"));
        assert!(!looks_like_hub_name("./models/a"));
        assert!(!looks_like_hub_name("/abs/path"));
        assert!(!looks_like_hub_name("models/a/b"));
        assert!(!looks_like_hub_name("../a"));
        assert!(!looks_like_hub_name("~/a"));
        assert!(!looks_like_hub_name("dir/model.safetensors"));
        assert!(!looks_like_hub_name("org/"));
        assert!(!looks_like_hub_name("org/na--me"));
        assert!(!looks_like_hub_name("org/na me"));
    }

    #[test]
    fn model_references() {
        let (c, _) = ok("merge_method: linear\nmodels:\n  - model: base+lora/adapter\n  - model: org/m@v2\n  - model: {model: {path: x, revision: r1}, lora: y}\n");
        assert_eq!(
            c.models[0].model,
            ModelRef {
                path: "base".into(),
                adapter: Some("lora/adapter".into())
            }
        );
        assert_eq!(c.models[0].model.to_string(), "base+lora/adapter");
        assert_eq!(c.models[1].model, mref("org/m@v2"));
        assert_eq!(
            split_revision(&c.models[1].model.path),
            ("org/m", Some("v2"))
        );
        assert_eq!(
            c.models[2].model,
            ModelRef {
                path: "x@r1".into(),
                adapter: Some("y".into())
            }
        );
        assert_eq!(
            err("merge_method: linear\nmodels: [{model: a+b+c}]\n").key,
            "models[0].model"
        );
        assert_eq!(
            err("merge_method: linear\nmodels: [{model: a@b@c}]\n").key,
            "models[0].model"
        );
        assert_eq!(
            err("merge_method: linear\nmodels: [a, b]\n").key,
            "models[0]"
        );
        let (c, w) = ok("merge_method: linear\nmodels: [{model: {model: a, override_architecture: LlamaForCausalLM}}]\n");
        assert_eq!(
            c.ignored_keys,
            vec!["models[0].model.override_architecture".to_string()]
        );
        assert_eq!(w.len(), 1);
        let (c, w) =
            ok("merge_method: linear\nmodels: [{model: a, statistics: a.stats.safetensors}]\n");
        assert!(w.is_empty());
        assert_eq!(
            c.statistics.get(&mref("a")).map(String::as_str),
            Some("a.stats.safetensors")
        );
    }

    #[test]
    fn structure_errors() {
        let both = "merge_method: passthrough\nmodels: [{model: a}]\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n";
        assert_eq!(err(both).key, "models");
        assert_eq!(err("merge_method: linear\n").key, "models");
        // An empty list counts as absent (pydantic truthiness in mergekit).
        assert_eq!(
            err("merge_method: linear\nmodels: []\nslices: []\n").key,
            "models"
        );
        let e = err("models: [{model: a}]\n");
        assert_eq!(e.key, "merge_method");
        assert!(
            e.message.contains("linear") && e.message.contains("ties"),
            "{}",
            e.message
        );
        let e = err("merge_method: frankenstein\nmodels: [{model: a}]\n");
        assert!(e.message.contains("known methods"), "{}", e.message);
        let e =
            err("merge_method: arcee_fusion\nbase_model: a\nmodels: [{model: a}, {model: b}]\n");
        assert!(e.message.contains("not implemented"), "{}", e.message);
        assert_eq!(err("").key, "");
        assert!(err("a: 1\n---\nb: 2\n").message.contains("one merge"));
        assert_eq!(err("- 1\n").key, "");
    }

    #[test]
    fn dtypes_and_seed() {
        let base = "merge_method: linear\nmodels: [{model: a}]\n";
        let (c, _) = ok(&format!(
            "{base}dtype: torch.bfloat16\nout_dtype: float32\nrandom_seed: 42\n"
        ));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.out_dtype.as_deref(), Some("float32"));
        assert_eq!(c.random_seed, Some(42));
        let e = err(&format!("{base}dtype: bf16\n"));
        assert_eq!(e.key, "dtype");
        assert!(e.message.contains("bfloat16"));
        assert_eq!(err(&format!("{base}out_dtype: int64\n")).key, "out_dtype");
        assert_eq!(err(&format!("{base}random_seed: -1\n")).key, "random_seed");
        assert_eq!(err(&format!("{base}random_seed: 1.5\n")).key, "random_seed");
        assert_eq!(err(&format!("{base}random_seed: x\n")).key, "random_seed");
        // `parameters:` with no value (mergekit's examples/ties.yml) is an empty map.
        let (c, _) = ok(&format!("{base}parameters:\n"));
        assert!(c.parameters.is_empty());
    }

    #[test]
    fn single_module_folds_into_the_top_level() {
        let text = "\
merge_method: linear
parameters: {weight: 1, normalize: true}
modules:
  text_decoder:
    models: [{model: a}, {model: b}]
    parameters:
      weight: [{filter: mlp, value: 3}]
";
        let (c, w) = ok(text);
        assert!(w.is_empty());
        assert_eq!(c.models.len(), 2);
        let v = c.parameters.get("weight").unwrap();
        // Module value where its filter matches, top-level value elsewhere.
        use crate::config::resolve::resolve;
        assert_eq!(
            resolve(v, "model.layers.0.mlp.up_proj.weight", 0.0).unwrap(),
            Some(Scalar::Num(3.0))
        );
        assert_eq!(
            resolve(v, "model.layers.0.self_attn.q_proj.weight", 0.0).unwrap(),
            Some(Scalar::Num(1.0))
        );
        assert_eq!(
            c.parameters.get("normalize"),
            Some(&ParamValue::Scalar(Scalar::Bool(true)))
        );
        let e = err("merge_method: linear\nmodules:\n  a: {models: [{model: x}]}\n  b: {models: [{model: x}]}\n");
        assert_eq!(e.key, "modules");
        let e = err(
            "merge_method: linear\nmodels: [{model: x}]\nmodules:\n  a: {models: [{model: x}]}\n",
        );
        assert_eq!(e.key, "modules");
    }
}
