//! Typed merge configuration (mergekit 0.1.5 keys plus amalgam's extensions).

use std::collections::BTreeMap;

/// A reference to an input model: a local path, optionally with a LoRA adapter (`path+adapter`,
/// as mergekit writes it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRef {
    /// Path to a `.safetensors` file or a Hugging Face checkpoint directory, as written.
    pub path: String,
    /// Optional adapter path (`model+adapter`).
    pub adapter: Option<String>,
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.adapter {
            Some(a) => write!(f, "{}+{}", self.path, a),
            None => write!(f, "{}", self.path),
        }
    }
}

/// One `{filter, value}` entry of a parameter list.
#[derive(Debug, Clone, PartialEq)]
pub struct FilteredValue {
    /// Substring of the tensor name this entry applies to; `None` (or `"*"`) matches every tensor.
    pub filter: Option<String>,
    /// The value (a scalar or a gradient).
    pub value: ParamValue,
}

/// A parameter as written in the config, before it is evaluated for a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A plain value.
    Scalar(crate::params::Scalar),
    /// A gradient: a list of numbers interpolated over the layer index (methods.md §7, §19).
    Gradient(Vec<f64>),
    /// A list of `{filter, value}` entries; the first whose filter matches wins.
    Filtered(Vec<FilteredValue>),
    /// A list that is not all numbers (booleans or strings): mergekit picks the step at index
    /// `floor(t * (len - 1))` instead of interpolating.
    Steps(Vec<crate::params::Scalar>),
}

/// Parameters by name, as written at one level of the config.
pub type ParamMap = BTreeMap<String, ParamValue>;

/// A model entry of `models:`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The model.
    pub model: ModelRef,
    /// Per-model parameters (`weight`, `density`, ...).
    pub parameters: ParamMap,
}

/// One source of a slice (`slices[].sources[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    /// The model.
    pub model: ModelRef,
    /// Half-open layer range `[start, end)`; `None` means every layer of the model.
    pub layer_range: Option<(usize, usize)>,
    /// Per-source parameters.
    pub parameters: ParamMap,
}

/// One output slice (`slices[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSpec {
    /// Its sources; all must cover the same number of layers.
    pub sources: Vec<SliceSource>,
    /// Slice-level base model, overriding the top-level one.
    pub base_model: Option<ModelRef>,
    /// Slice-level parameters.
    pub parameters: ParamMap,
    /// mergekit's `residual_weight` (accepted; see the module docs of the planner).
    pub residual_weight: Option<f64>,
}

/// `tokenizer_source`: which vocabulary the output uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model's tokenizer.
    Base,
    /// The union of every model's vocabulary (refused for now, with a clear error).
    Union,
    /// A given model's tokenizer.
    Model(ModelRef),
}

/// The `tokenizer:` section (mergekit's `TokenizerConfig`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizerConfig {
    /// `source`: like `tokenizer_source`. The parser fills in mergekit's default,
    /// [`TokenizerSource::Union`], when a `tokenizer:` section omits it.
    pub source: Option<TokenizerSource>,
    /// `pad_to_multiple_of`.
    pub pad_to_multiple_of: Option<usize>,
    /// `tokens`: per-token embedding sources (accepted; only `source` and padding are honoured).
    pub tokens: Option<serde_json::Value>,
}

/// The `evaluation:` section (amalgam): a suite run on the merged model once it is written.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvaluationConfig {
    /// `suite`: the suite file, relative to the config file's directory.
    pub suite: String,
    /// `out`: the JSON report (default `evaluation.json` in the output directory); relative to
    /// the output directory.
    pub out: Option<String>,
    /// `batch_size`: overrides the suite's.
    pub batch_size: Option<usize>,
    /// `dump_scores`: per-example scores (JSONL), relative to the output directory.
    pub dump_scores: Option<String>,
}

/// A whole merge configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergeConfig {
    /// `merge_method`.
    pub merge_method: String,
    /// `base_model`.
    pub base_model: Option<ModelRef>,
    /// `models:` (empty when `slices:` is used).
    pub models: Vec<ModelSpec>,
    /// `slices:` (empty when `models:` is used).
    pub slices: Vec<SliceSpec>,
    /// Top-level `parameters`.
    pub parameters: ParamMap,
    /// `dtype`: the dtype arithmetic is nominally done in (amalgam always computes in f32) and
    /// the default output dtype.
    pub dtype: Option<String>,
    /// `out_dtype`: the output dtype.
    pub out_dtype: Option<String>,
    /// `tokenizer_source`.
    pub tokenizer_source: Option<TokenizerSource>,
    /// `tokenizer`.
    pub tokenizer: Option<TokenizerConfig>,
    /// `chat_template`: a template name or a Jinja string, written to the output tokenizer config.
    pub chat_template: Option<String>,
    /// `random_seed` (default 0 when a random method runs).
    pub random_seed: Option<u64>,
    /// Per-model statistics files (amalgam's `statistics:` key of a `models[]` entry or a slice
    /// source), by model.
    pub statistics: BTreeMap<ModelRef, String>,
    /// `evaluation:` (amalgam): the suite to run on the output.
    pub evaluation: Option<EvaluationConfig>,
    /// Keys accepted for mergekit compatibility but not acted on (e.g. `modules`), by name.
    pub ignored_keys: Vec<String>,
    /// The original YAML text, for the model card.
    pub source_text: String,
}
