//! The planner: from a config and the inputs' tensor lists to one [`TensorPlan`] per output
//! tensor.
//!
//! It follows mergekit 0.1.5's `plan.py`:
//! - `models:` becomes one slice whose sources span every layer of each model; when a base model
//!   is given but not listed, it is appended as a source (for methods that treat the base as an
//!   ordinary input, such as `linear`, it then takes part with the top-level parameters).
//! - Tensors outside the layer stack are "pre" (embeddings, planned from the first slice's
//!   sources) or "post" (final norm, output head, planned from the last slice's sources), with
//!   gradient position 0.
//! - Layer `idx` of a slice of `n` layers has gradient position `idx / (n - 1)` (1 when `n` is 1),
//!   and is renumbered consecutively across slices in the output names.
//! - Parameters are looked up from the source (per-model), then the slice, then the top level;
//!   per-model filters match the input tensor name, method-wide ones the output name.
//!
//! Layer tensors are recognised by name (`<prefix>.<layers|h|layer|blocks>.<index>.<rest>`), so
//! any transformer family works without an architecture table.

use crate::config::{MergeConfig, ModelRef, ParamMap, SliceSource, SliceSpec};
use crate::error::MergeError;
use crate::methods::{self, MethodInfo};
use crate::params::{Scalar, TensorParams};
use std::collections::{BTreeMap, BTreeSet};

/// One tensor of an input model, as the planner needs it (no data).
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Stored dtype, as safetensors writes it (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Whether the dtype is one amalgam merges (F32, F16, BF16).
    pub mergeable: bool,
}

/// An input model's tensor list, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct InputModel {
    /// Where it came from (for messages).
    pub display: String,
    /// Its tensors.
    pub tensors: Vec<InputTensor>,
}

/// Where one input of an output tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSource {
    /// Index into [`Plan::models`].
    pub model: usize,
    /// Tensor name in that model.
    pub tensor: String,
}

/// What to do for one output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// Output tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Stored dtype of the first input (the default output dtype).
    pub input_dtype: String,
    /// Merge method name (as in [`methods::registry`]).
    pub method: String,
    /// Resolved parameters.
    pub params: TensorParams,
    /// The base input, if the method uses one.
    pub base: Option<TensorSource>,
    /// The model inputs ([`crate::tensor::Input::Model`] order).
    pub models: Vec<TensorSource>,
    /// Gradient position of this tensor (layer fraction; 0 outside the layer stack).
    pub layer_pos: f64,
    /// `true` for a tensor whose dtype is not merged: its bytes are copied from the first input.
    pub copy_raw: bool,
    /// Why this tensor uses a different method than the config's (e.g. a data-driven method
    /// averaging a tensor it does not solve); `None` when it uses the config's method.
    pub note: Option<String>,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Every distinct input model, in first-use order.
    pub models: Vec<ModelRef>,
    /// The base model of the (first) slice, if any.
    pub base_model: Option<ModelRef>,
    /// Output tensors, in output order.
    pub tensors: Vec<TensorPlan>,
    /// Merge method.
    pub method: String,
    /// Random seed (0 when the config gives none).
    pub seed: u64,
    /// Number of layers in the output, when the models have a layer stack.
    pub out_layers: Option<usize>,
    /// Remarks for the user (parameters the method does not use, ignored keys).
    pub warnings: Vec<String>,
    /// Parameters the config gives that the method does not use (often a misspelling), sorted.
    pub unused_parameters: Vec<String>,
}

impl Plan {
    /// The error `--strict` gives for parameters the method does not use, if there are any.
    pub fn strict_error(&self) -> Option<String> {
        if self.unused_parameters.is_empty() {
            return None;
        }
        let names: Vec<String> = self
            .unused_parameters
            .iter()
            .map(|k| format!("`{k}`"))
            .collect();
        Some(format!(
            "merge method `{}` does not use the parameter(s) {} (strict mode refuses them: \
             check their spelling with `amalgam methods`, or remove them)",
            self.method,
            names.join(", ")
        ))
    }
}

/// A tensor name split around its layer index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LayerName<'a> {
    prefix: &'a str,
    index: usize,
    rest: &'a str,
}

const LAYER_WORDS: [&str; 4] = ["layers", "h", "layer", "blocks"];

fn split_layer(name: &str) -> Option<LayerName<'_>> {
    let mut offset = 0;
    let parts: Vec<&str> = name.split('.').collect();
    for (k, part) in parts.iter().enumerate() {
        if k + 2 < parts.len() && LAYER_WORDS.contains(part) {
            let num = parts[k + 1];
            if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(index) = num.parse::<usize>() {
                    let prefix_end = offset + part.len();
                    let rest_start = prefix_end + 1 + num.len() + 1;
                    return Some(LayerName {
                        prefix: &name[..prefix_end],
                        index,
                        rest: &name[rest_start..],
                    });
                }
            }
        }
        offset += part.len() + 1;
    }
    None
}

fn layer_count(model: &InputModel) -> usize {
    model
        .tensors
        .iter()
        .filter_map(|t| split_layer(&t.name))
        .map(|l| l.index + 1)
        .max()
        .unwrap_or(0)
}

/// Whether a tensor is a linear layer's weight (torch layout `[d_out, d_in]`): 2-D, and not an
/// embedding, output head or norm. These are the tensors Gram-based methods solve.
pub fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && !name.contains("embed")
        && !name.contains("norm")
        && name != "lm_head.weight"
        && !name.contains(".wte.")
        && !name.contains(".wpe.")
}

/// Whether a data-driven method solves this tensor (needs statistics for it), or averages it as
/// the references do (methods.md §10, §11: parameters without a statistic are averaged).
pub fn is_solved(method: &str, objective: Option<&str>, name: &str, shape: &[usize]) -> bool {
    match (method, objective) {
        ("regmean", _) => is_linear_weight(name, shape),
        ("mats", None | Some("gram") | Some("kfac")) => is_linear_weight(name, shape),
        ("mats", Some("ia3_block")) => shape.len() == 1 && name.contains("ia3"),
        _ => true,
    }
}

fn is_pre_weight(name: &str) -> bool {
    name.contains("embed") || name.contains(".wte.") || name.contains(".wpe.")
}

/// Whether the method treats `base_model` as the separate base input ([`crate::tensor::Input::Base`])
/// rather than as one more model.
pub fn base_is_separate(method: &str) -> bool {
    !matches!(method, "linear" | "karcher" | "passthrough")
}

fn resolve_in(
    scopes: &[Option<&ParamMap>],
    key: &str,
    tensor: &str,
    t: f64,
) -> Result<Option<Scalar>, MergeError> {
    for scope in scopes.iter().flatten() {
        if let Some(v) = scope.get(key) {
            let r = crate::config::resolve::resolve(v, tensor, t).map_err(|e| {
                MergeError::BadParameter {
                    key: key.into(),
                    message: e.to_string(),
                }
            })?;
            if r.is_some() {
                return Ok(r);
            }
        }
    }
    Ok(None)
}

fn keys_of(scopes: &[Option<&ParamMap>]) -> BTreeSet<String> {
    scopes
        .iter()
        .flatten()
        .flat_map(|m| m.keys().cloned())
        .collect()
}

/// Look up an input model's tensor list.
pub trait ModelLookup {
    /// The tensors of `model`, or an error when it cannot be read.
    fn model(&self, model: &ModelRef) -> Result<&InputModel, MergeError>;
}

impl ModelLookup for BTreeMap<ModelRef, InputModel> {
    fn model(&self, model: &ModelRef) -> Result<&InputModel, MergeError> {
        self.get(model)
            .ok_or_else(|| MergeError::Read(format!("model {model} was not loaded")))
    }
}

/// Every model a config reads, base included, in first-use order.
pub fn referenced_models(config: &MergeConfig) -> Vec<ModelRef> {
    let mut out: Vec<ModelRef> = Vec::new();
    let mut push = |m: &ModelRef| {
        if !out.contains(m) {
            out.push(m.clone());
        }
    };
    if let Some(b) = &config.base_model {
        push(b);
    }
    for m in &config.models {
        push(&m.model);
    }
    for s in &config.slices {
        if let Some(b) = &s.base_model {
            push(b);
        }
        for src in &s.sources {
            push(&src.model);
        }
    }
    if let Some(crate::config::TokenizerSource::Model(m)) = &config.tokenizer_source {
        push(m);
    }
    out
}

/// Normalise `models:` into one slice, as mergekit does.
fn normalized_slices(
    config: &MergeConfig,
    lookup: &dyn ModelLookup,
) -> Result<Vec<SliceSpec>, MergeError> {
    if !config.slices.is_empty() {
        let mut slices = config.slices.clone();
        for s in &mut slices {
            for src in &mut s.sources {
                if src.layer_range.is_none() {
                    let n = layer_count(lookup.model(&src.model)?);
                    src.layer_range = Some((0, n));
                }
            }
        }
        return Ok(slices);
    }
    let mut sources = Vec::new();
    let mut base_included = false;
    // All models of a `models:` merge must have the same layer stack; name the first missing tensor.
    let mut counts: Vec<(&ModelRef, usize)> = Vec::new();
    for m in config
        .models
        .iter()
        .map(|m| &m.model)
        .chain(config.base_model.iter())
    {
        counts.push((m, layer_count(lookup.model(m)?)));
    }
    if let Some(&(big, most)) = counts.iter().max_by_key(|c| c.1) {
        if let Some(&(small, fewer)) = counts.iter().find(|c| c.1 < most) {
            let missing = lookup
                .model(big)?
                .tensors
                .iter()
                .find(|t| split_layer(&t.name).is_some_and(|l| l.index >= fewer))
                .map(|t| t.name.clone())
                .unwrap_or_default();
            return Err(MergeError::BadInputs {
                method: config.merge_method.clone(),
                message: format!(
                    "{small}: has {fewer} layers but {big} has {most}: tensor \"{missing}\" is missing; \
                     all inputs must share one architecture (use `slices:` to combine layer ranges)"
                ),
            });
        }
    }
    for m in &config.models {
        if config.base_model.as_ref() == Some(&m.model) {
            base_included = true;
        }
        let n = layer_count(lookup.model(&m.model)?);
        sources.push(SliceSource {
            model: m.model.clone(),
            layer_range: Some((0, n)),
            parameters: m.parameters.clone(),
        });
    }
    if let (Some(b), false) = (&config.base_model, base_included) {
        let n = layer_count(lookup.model(b)?);
        sources.push(SliceSource {
            model: b.clone(),
            layer_range: Some((0, n)),
            parameters: ParamMap::new(),
        });
    }
    Ok(vec![SliceSpec {
        sources,
        base_model: None,
        parameters: ParamMap::new(),
        residual_weight: None,
    }])
}

struct Planner<'a> {
    config: &'a MergeConfig,
    info: MethodInfo,
    lookup: &'a dyn ModelLookup,
    models: Vec<ModelRef>,
    tensors: Vec<TensorPlan>,
    unused: BTreeSet<String>,
}

impl Planner<'_> {
    fn model_index(&mut self, m: &ModelRef) -> usize {
        if let Some(i) = self.models.iter().position(|x| x == m) {
            return i;
        }
        self.models.push(m.clone());
        self.models.len() - 1
    }

    fn find<'m>(
        &self,
        model: &'m InputModel,
        name: &str,
        reference: &ModelRef,
    ) -> Result<&'m InputTensor, MergeError> {
        model
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| MergeError::BadInputs {
                method: self.info.name.into(),
                message: format!(
                    "{}: tensor \"{name}\" is missing; all inputs must share one architecture",
                    reference
                ),
            })
    }

    /// Plan one output tensor from `inputs` (source, input tensor name).
    fn plan_tensor(
        &mut self,
        out_name: String,
        inputs: &[(&SliceSource, String)],
        slice: &SliceSpec,
        t: f64,
    ) -> Result<(), MergeError> {
        let method = self.config.merge_method.clone();
        let base_ref = slice
            .base_model
            .clone()
            .or_else(|| self.config.base_model.clone());
        let separate = base_is_separate(&method);

        // Shape and dtype checks against the first input.
        let first_model = self.lookup.model(&inputs[0].0.model)?;
        let first = self
            .find(first_model, &inputs[0].1, &inputs[0].0.model)?
            .clone();
        for (src, name) in inputs.iter().skip(1) {
            let m = self.lookup.model(&src.model)?;
            let tensor = self.find(m, name, &src.model)?;
            if tensor.shape != first.shape {
                let vocab_only = crate::tensor::is_vocab_tensor(name, &tensor.shape)
                    && crate::tensor::is_vocab_tensor(name, &first.shape)
                    && tensor.shape[1..] == first.shape[1..];
                let advice = if vocab_only {
                    "the models' vocabularies differ: set `tokenizer_source` (`base` or a model \
                     path) to re-index the vocabulary tensors to one tokenizer"
                } else {
                    "all inputs must share one architecture"
                };
                return Err(MergeError::BadInputs {
                    method: method.clone(),
                    message: format!(
                        "{}: tensor \"{name}\" is {:?} but {} has {:?} for \"{}\"; {advice}",
                        src.model, tensor.shape, inputs[0].0.model, first.shape, inputs[0].1
                    ),
                });
            }
            if tensor.mergeable != first.mergeable
                || (!tensor.mergeable && tensor.dtype != first.dtype)
            {
                return Err(MergeError::BadInputs {
                    method: method.clone(),
                    message: format!(
                        "{}: tensor \"{name}\" has dtype {} but {} has {}",
                        src.model, tensor.dtype, inputs[0].0.model, first.dtype
                    ),
                });
            }
        }

        let top = Some(&self.config.parameters);
        let slice_scope = Some(&slice.parameters);
        let shared_scopes = [slice_scope, top];
        let mut params = TensorParams::default();
        for key in keys_of(&shared_scopes) {
            if let Some(v) = resolve_in(&shared_scopes, &key, &out_name, t)? {
                params.global.insert(key, v);
            }
        }
        let mut base = None;
        let mut models = Vec::new();
        for (src, name) in inputs {
            let idx = self.model_index(&src.model);
            let source = TensorSource {
                model: idx,
                tensor: name.clone(),
            };
            if separate && base_ref.as_ref() == Some(&src.model) {
                if base.is_none() {
                    base = Some(source);
                }
                continue;
            }
            let scopes = [Some(&src.parameters), slice_scope, top];
            let mut map = BTreeMap::new();
            for key in keys_of(&scopes) {
                if let Some(v) = resolve_in(&scopes, &key, name, t)? {
                    map.insert(key, v);
                }
            }
            params.models.push(map);
            models.push(source);
        }
        if separate && self.info.needs_base && base.is_none() {
            return Err(MergeError::BadInputs {
                method: method.clone(),
                message: match &base_ref {
                    None => "needs `base_model`".into(),
                    Some(b) => {
                        format!("base model {b} is not among the inputs of tensor \"{out_name}\"")
                    }
                },
            });
        }
        if !first.mergeable && method != "passthrough" {
            return Err(MergeError::BadInputs {
                method: method.clone(),
                message: format!(
                    "{}: tensor \"{}\" has dtype {}, which cannot be merged (only F32, F16 and BF16 are); \
                     use merge_method: passthrough for models with such tensors",
                    inputs[0].0.model, inputs[0].1, first.dtype
                ),
            });
        }
        let all_known: BTreeSet<&str> = self
            .info
            .global_params
            .iter()
            .chain(self.info.model_params)
            .copied()
            .collect();
        if !all_known.is_empty() {
            for k in params
                .global
                .keys()
                .chain(params.models.iter().flat_map(|m| m.keys()))
            {
                if !all_known.contains(k.as_str()) {
                    self.unused.insert(k.clone());
                }
            }
        }
        // Data-driven methods average the tensors they do not solve.
        let objective = match params.global.get("objective") {
            Some(Scalar::Str(s)) => Some(s.as_str()),
            _ => None,
        };
        let mut method = method;
        let mut note = None;
        if first.mergeable && !is_solved(&method, objective, &out_name, &first.shape) {
            note = Some(format!(
                "averaged: `{method}` solves only linear-layer weights"
            ));
            method = "linear".into();
            let n = params.models.len();
            params = TensorParams::default()
                .with_model_values("weight", &vec![1.0; n])
                .with_global("normalize", Scalar::Bool(true));
        }
        // Build the method now so that bad parameters fail before any work.
        if first.mergeable {
            methods::build(&method, &params, models.len(), base.is_some()).map_err(
                |e| match e {
                    MergeError::BadParameter { key, message } => MergeError::BadParameter {
                        key,
                        message: format!("{message} (tensor \"{out_name}\")"),
                    },
                    MergeError::MissingParameter {
                        key,
                        method,
                        model: Some(i),
                    } if i < models.len() => {
                        let name = &self.models[models[i].model];
                        let role = if base_ref.as_ref() == Some(name) {
                            format!(
                                " (the base model: `{method}` merges it with the others, so list \
                                 it under `models:` with its own `{key}`)"
                            )
                        } else {
                            String::new()
                        };
                        MergeError::BadParameter {
                            key,
                            message: format!(
                                "merge method `{method}` needs it for model {name}{role}"
                            ),
                        }
                    }
                    other => other,
                },
            )?;
        }
        self.tensors.push(TensorPlan {
            name: out_name,
            shape: first.shape.clone(),
            input_dtype: first.dtype.clone(),
            method,
            params,
            base,
            models,
            layer_pos: t,
            copy_raw: !first.mergeable,
            note,
        });
        Ok(())
    }
}

/// Plan a merge. `lookup` gives each referenced model's tensor list.
pub fn plan(config: &MergeConfig, lookup: &dyn ModelLookup) -> Result<Plan, MergeError> {
    let info = methods::info(&config.merge_method)?;
    let slices = normalized_slices(config, lookup)?;
    if slices.is_empty() || slices.iter().any(|s| s.sources.is_empty()) {
        return Err(MergeError::BadInputs {
            method: info.name.into(),
            message: "no input models".into(),
        });
    }
    let mut p = Planner {
        config,
        info,
        lookup,
        models: Vec::new(),
        tensors: Vec::new(),
        unused: BTreeSet::new(),
    };
    if let Some(b) = &config.base_model {
        p.model_index(b);
    }

    // Pre and post (non-layer) tensors come from the first source of the first / last slice.
    let first_src = &slices[0].sources[0];
    let template_model = lookup.model(&first_src.model)?;
    let non_layer: Vec<String> = template_model
        .tensors
        .iter()
        .filter(|t| split_layer(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    let (pre, post): (Vec<String>, Vec<String>) =
        non_layer.into_iter().partition(|n| is_pre_weight(n));

    for name in &pre {
        let inputs: Vec<(&SliceSource, String)> = slices[0]
            .sources
            .iter()
            .map(|s| (s, name.clone()))
            .collect();
        p.plan_tensor(name.clone(), &inputs, &slices[0], 0.0)?;
    }

    let mut out_layer = 0usize;
    let mut has_layers = false;
    for (si, slice) in slices.iter().enumerate() {
        let lens: Vec<usize> = slice
            .sources
            .iter()
            .map(|s| {
                let (a, b) = s.layer_range.unwrap_or((0, 0));
                b.saturating_sub(a)
            })
            .collect();
        if lens.iter().any(|&l| l != lens[0]) {
            return Err(MergeError::BadParameter {
                key: format!("slices[{si}].sources"),
                message: format!(
                    "all sources of a slice must cover the same number of layers, got {lens:?}"
                ),
            });
        }
        for src in &slice.sources {
            let n = layer_count(lookup.model(&src.model)?);
            if let Some((a, b)) = src.layer_range {
                if (a, b) != (0, 0) && (b > n || a >= b) {
                    return Err(MergeError::BadParameter {
                        key: format!("slices[{si}].sources.layer_range"),
                        message: format!(
                            "[{a}, {b}] is outside {} which has {n} layers",
                            src.model
                        ),
                    });
                }
            }
        }
        let n = lens[0];
        for idx in 0..n {
            has_layers = true;
            let t = if n > 1 {
                idx as f64 / (n - 1) as f64
            } else {
                1.0
            };
            let src0 = &slice.sources[0];
            let in_layer0 = src0.layer_range.map_or(0, |r| r.0) + idx;
            let m0 = lookup.model(&src0.model)?;
            let layer_tensors: Vec<(String, String)> = m0
                .tensors
                .iter()
                .filter_map(|t| {
                    split_layer(&t.name)
                        .filter(|l| l.index == in_layer0)
                        .map(|l| (l.prefix.to_string(), l.rest.to_string()))
                })
                .collect();
            for (prefix, rest) in layer_tensors {
                let out_name = format!("{prefix}.{out_layer}.{rest}");
                let inputs: Vec<(&SliceSource, String)> = slice
                    .sources
                    .iter()
                    .map(|s| {
                        let li = s.layer_range.map_or(0, |r| r.0) + idx;
                        (s, format!("{prefix}.{li}.{rest}"))
                    })
                    .collect();
                p.plan_tensor(out_name, &inputs, slice, t)?;
            }
            out_layer += 1;
        }
    }

    let last = &slices[slices.len() - 1];
    for name in &post {
        let inputs: Vec<(&SliceSource, String)> =
            last.sources.iter().map(|s| (s, name.clone())).collect();
        p.plan_tensor(name.clone(), &inputs, last, 0.0)?;
    }

    let mut warnings: Vec<String> = p
        .unused
        .iter()
        .map(|k| {
            format!(
                "parameter `{k}` is not used by merge method `{}`",
                info.name
            )
        })
        .collect();
    if slices.iter().any(|s| s.residual_weight.is_some()) {
        warnings.push(
            "`residual_weight` is accepted for mergekit compatibility but has no effect (as in mergekit 0.1.5)"
                .into(),
        );
    }
    Ok(Plan {
        models: p.models,
        base_model: slices[0]
            .base_model
            .clone()
            .or_else(|| config.base_model.clone()),
        tensors: p.tensors,
        method: config.merge_method.clone(),
        seed: config.random_seed.unwrap_or(0),
        out_layers: has_layers.then_some(out_layer),
        warnings,
        unused_parameters: p.unused.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_split() {
        let l = split_layer("model.layers.12.mlp.up_proj.weight").expect("layer");
        assert_eq!(l.prefix, "model.layers");
        assert_eq!(l.index, 12);
        assert_eq!(l.rest, "mlp.up_proj.weight");
        let g = split_layer("transformer.h.3.attn.c_attn.bias").expect("layer");
        assert_eq!(
            (g.prefix, g.index, g.rest),
            ("transformer.h", 3, "attn.c_attn.bias")
        );
        assert!(split_layer("model.embed_tokens.weight").is_none());
        assert!(split_layer("model.norm.weight").is_none());
        assert!(split_layer("lm_head.weight").is_none());
    }
}
