//! Evaluating a parameter for one tensor: mergekit 0.1.5's `evaluate_setting`
//! (`mergekit/config.py`) and the scope precedence of `ConfigReader.parameter_sources`
//! (`mergekit/config.py`) with `resolve_parameter` (`mergekit/parameter_resolver.py`).
//!
//! # Gradient position `t`
//!
//! The planner passes the position `t` of the tensor in its slice (mergekit `plan.py`,
//! `MergePlanner.plan_slice`): layer `idx` of a slice of `n` layers has `t = idx / (n - 1)`, and
//! `t = 1` when `n == 1`; `t` restarts at 0 in every slice. Tensors outside the layer stack
//! (embeddings, final norm, output head: `plan_module`'s `pre_weights` / `post_weights`) are
//! planned with `ConfigReader(..., t=0)`, so they get `t = 0`, i.e. the first value of every
//! gradient.
//!
//! # Evaluation
//!
//! - A number, boolean or string is itself.
//! - A gradient `[v_0, ..., v_{K-1}]` of numbers: `s = t * (K - 1)`, `i0 = floor(s)`,
//!   `i1 = min(K - 1, i0 + 1)`, `f = s - i0`, value `(1 - f) * v_i0 + f * v_i1` (all f64, the same
//!   operations in the same order as mergekit, so the result is bit-identical).
//! - A list that is not all numbers picks the step `floor(t * (K - 1))` (no interpolation).
//! - An empty list evaluates to nothing.
//! - A `{filter, value}` list: the first entry whose filter is absent, `*`, or a substring of the
//!   tensor name is evaluated (and its result returned even if empty); no match evaluates to
//!   nothing.
//!
//! # Precedence
//!
//! "Nothing" at one scope falls through to the next. Per-model parameters are looked up in the
//! model's own (source) parameters, then the slice's, then the top level (mergekit's
//! `parameter_sources(model)`: sources, slice, module, top level; a single `modules:` entry is
//! folded into the top level by the parser). Method-wide parameters skip the per-model maps
//! (`parameter_sources(None)`): slice, then top level. Per-model filters match the model's input
//! tensor name, method-wide ones the output tensor name (`resolve_parameters` in
//! `parameter_resolver.py`).

use super::model::{ParamMap, ParamValue};
use super::parse::ConfigError;
use crate::params::{Scalar, TensorParams};
use std::collections::{BTreeMap, BTreeSet};

/// Evaluate `value` for the tensor `tensor_name` at gradient position `t` (in `[0, 1]`; 0 for
/// tensors outside the layer stack). `Ok(None)` when nothing applies (no filter matched, or an
/// empty list), so the caller falls through to the next scope.
pub fn resolve(
    value: &ParamValue,
    tensor_name: &str,
    t: f64,
) -> Result<Option<Scalar>, ConfigError> {
    if !(0.0..=1.0).contains(&t) {
        return Err(ConfigError::new(
            tensor_name,
            format!("gradient position {t} is outside [0, 1] (a planner bug)"),
        ));
    }
    Ok(match value {
        ParamValue::Scalar(s) => Some(s.clone()),
        ParamValue::Gradient(v) => interpolate(v, t).map(Scalar::Num),
        ParamValue::Steps(v) => {
            if v.is_empty() {
                None
            } else {
                Some(v[step_index(v.len(), t)].clone())
            }
        }
        ParamValue::Filtered(entries) => {
            match entries
                .iter()
                .find(|e| filter_matches(e.filter.as_deref(), tensor_name))
            {
                Some(e) => resolve(&e.value, tensor_name, t)?,
                None => None,
            }
        }
    })
}

/// Whether a `{filter, value}` entry applies to `tensor_name` (mergekit: filter absent, `*`, or a
/// substring of a non-empty tensor name).
pub fn filter_matches(filter: Option<&str>, tensor_name: &str) -> bool {
    match filter {
        None | Some("*") => true,
        Some(f) => !tensor_name.is_empty() && tensor_name.contains(f),
    }
}

/// Piecewise-linear interpolation of a gradient at `t` (mergekit `evaluate_setting`).
fn interpolate(values: &[f64], t: f64) -> Option<f64> {
    let k = values.len();
    if k == 0 {
        return None;
    }
    let scaled = t * (k - 1) as f64;
    let i0 = (scaled.floor() as usize).min(k - 1);
    let i1 = (i0 + 1).min(k - 1);
    let frac = scaled - i0 as f64;
    Some((1.0 - frac) * values[i0] + frac * values[i1])
}

fn step_index(len: usize, t: f64) -> usize {
    ((t * (len - 1) as f64).floor() as usize).min(len - 1)
}

/// Evaluate `key` through `scopes`, highest precedence first: the first scope that has the key
/// and evaluates to something wins (mergekit `resolve_parameter`).
pub fn resolve_scoped(
    scopes: &[Option<&ParamMap>],
    key: &str,
    tensor_name: &str,
    t: f64,
) -> Result<Option<Scalar>, ConfigError> {
    for scope in scopes.iter().flatten() {
        if let Some(v) = scope.get(key) {
            let r = resolve(v, tensor_name, t).map_err(|e| ConfigError::new(key, e.message))?;
            if r.is_some() {
                return Ok(r);
            }
        }
    }
    Ok(None)
}

/// The parameter maps that apply to one output tensor.
#[derive(Debug, Clone, Copy)]
pub struct ParamScopes<'a> {
    /// Top-level `parameters` (with a single `modules:` entry's folded in by the parser).
    pub top: &'a ParamMap,
    /// The slice's `parameters` (`None` in the `models:` form).
    pub slice: Option<&'a ParamMap>,
}

/// One model input of a tensor: its own parameters and its input tensor name.
#[derive(Debug, Clone, Copy)]
pub struct ModelScope<'a> {
    /// The model's `parameters` (`models[i]` or the slice source).
    pub parameters: Option<&'a ParamMap>,
    /// The name of the tensor read from this model (differs from the output name when a slice
    /// takes layers from another position).
    pub input_name: &'a str,
}

/// Build [`TensorParams`] for one output tensor.
///
/// `global_names` / `model_names` are the method's parameter names
/// ([`crate::methods::MethodInfo::global_params`] / `model_params`). When both are empty (a
/// method that does not list them), every key of the slice and top-level maps is method-wide
/// and also inherited by every model, and every key of a per-model map is per-model. `models`
/// excludes the base when the method uses it as a separate input.
pub fn tensor_params(
    scopes: ParamScopes<'_>,
    models: &[ModelScope<'_>],
    output_name: &str,
    t: f64,
    global_names: &[&str],
    model_names: &[&str],
) -> Result<TensorParams, ConfigError> {
    let shared: Vec<Option<&ParamMap>> = vec![scopes.slice, Some(scopes.top)];
    let (globals, per_model): (BTreeSet<String>, BTreeSet<String>) =
        if global_names.is_empty() && model_names.is_empty() {
            let g: BTreeSet<String> = shared
                .iter()
                .flatten()
                .flat_map(|m| m.keys().cloned())
                .collect();
            let mut p = g.clone();
            for m in models {
                if let Some(map) = m.parameters {
                    p.extend(map.keys().cloned());
                }
            }
            (g, p)
        } else {
            (
                global_names.iter().map(|s| s.to_string()).collect(),
                model_names.iter().map(|s| s.to_string()).collect(),
            )
        };
    let mut out = TensorParams::default();
    for key in &globals {
        if let Some(v) = resolve_scoped(&shared, key, output_name, t)? {
            out.global.insert(key.clone(), v);
        }
    }
    for m in models {
        let chain = [m.parameters, scopes.slice, Some(scopes.top)];
        let mut map = BTreeMap::new();
        for key in &per_model {
            if let Some(v) = resolve_scoped(&chain, key, m.input_name, t)? {
                map.insert(key.clone(), v);
            }
        }
        out.models.push(map);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::FilteredValue;

    fn num(x: f64) -> ParamValue {
        ParamValue::Scalar(Scalar::Num(x))
    }

    fn get(v: &ParamValue, name: &str, t: f64) -> Option<Scalar> {
        resolve(v, name, t).unwrap()
    }

    #[test]
    fn gradient_matches_hand_worked_values() {
        // [0, 0.5, 0.3, 0.7, 1] over 5 knots: s = 4t.
        let g = ParamValue::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
        assert_eq!(get(&g, "x", 0.0), Some(Scalar::Num(0.0)));
        assert_eq!(get(&g, "x", 1.0), Some(Scalar::Num(1.0)));
        assert_eq!(get(&g, "x", 0.25), Some(Scalar::Num(0.5)));
        // t = 0.375: s = 1.5, halfway between 0.5 and 0.3 = 0.4.
        let Some(Scalar::Num(v)) = get(&g, "x", 0.375) else {
            panic!()
        };
        assert!((v - 0.4).abs() < 1e-15, "{v}");
        // 40 layers, layer 13: t = 13/39 = 1/3, s = 4/3; between 0.5 and 0.3 at 1/3: 0.5 - 0.2/3.
        let Some(Scalar::Num(v)) = get(&g, "x", 13.0 / 39.0) else {
            panic!()
        };
        assert!((v - (0.5 - 0.2 / 3.0)).abs() < 1e-12, "{v}");
        // Two knots: plain linear ramp.
        let g2 = ParamValue::Gradient(vec![1.0, 0.0]);
        let Some(Scalar::Num(v)) = get(&g2, "x", 0.3) else {
            panic!()
        };
        assert!((v - 0.7).abs() < 1e-15);
        // One knot: constant.
        assert_eq!(
            get(&ParamValue::Gradient(vec![0.25]), "x", 0.6),
            Some(Scalar::Num(0.25))
        );
        // Empty: nothing.
        assert_eq!(get(&ParamValue::Gradient(vec![]), "x", 0.6), None);
    }

    #[test]
    fn steps_pick_floor_index() {
        let s = ParamValue::Steps(vec![Scalar::Bool(true), Scalar::Bool(false)]);
        assert_eq!(get(&s, "x", 0.0), Some(Scalar::Bool(true)));
        assert_eq!(get(&s, "x", 0.99), Some(Scalar::Bool(true)));
        assert_eq!(get(&s, "x", 1.0), Some(Scalar::Bool(false)));
    }

    #[test]
    fn filters_first_match_wins() {
        let f = ParamValue::Filtered(vec![
            FilteredValue {
                filter: Some("self_attn".into()),
                value: ParamValue::Gradient(vec![0.0, 1.0]),
            },
            FilteredValue {
                filter: Some("mlp".into()),
                value: num(0.9),
            },
            FilteredValue {
                filter: None,
                value: num(0.5),
            },
        ]);
        assert_eq!(
            get(&f, "model.layers.3.self_attn.q_proj.weight", 0.5),
            Some(Scalar::Num(0.5))
        );
        assert_eq!(
            get(&f, "model.layers.3.self_attn.q_proj.weight", 1.0),
            Some(Scalar::Num(1.0))
        );
        assert_eq!(
            get(&f, "model.layers.3.mlp.up_proj.weight", 0.1),
            Some(Scalar::Num(0.9))
        );
        assert_eq!(get(&f, "model.norm.weight", 0.0), Some(Scalar::Num(0.5)));
        let no_default = ParamValue::Filtered(vec![FilteredValue {
            filter: Some("mlp".into()),
            value: num(1.0),
        }]);
        assert_eq!(get(&no_default, "model.norm.weight", 0.0), None);
        let star = ParamValue::Filtered(vec![FilteredValue {
            filter: Some("*".into()),
            value: num(2.0),
        }]);
        assert_eq!(get(&star, "anything", 0.0), Some(Scalar::Num(2.0)));
    }

    #[test]
    fn bad_position_is_an_error() {
        assert!(resolve(&num(1.0), "x", 1.5).is_err());
        assert!(resolve(&num(1.0), "x", f64::NAN).is_err());
    }

    #[test]
    fn precedence_model_then_slice_then_top() {
        let mut top = ParamMap::new();
        top.insert("weight".into(), num(1.0));
        top.insert("normalize".into(), ParamValue::Scalar(Scalar::Bool(false)));
        top.insert("density".into(), num(0.3));
        let mut slice = ParamMap::new();
        slice.insert("density".into(), num(0.4));
        let mut m0 = ParamMap::new();
        m0.insert("weight".into(), num(0.2));
        // A filter that does not match falls through to the next scope.
        m0.insert(
            "density".into(),
            ParamValue::Filtered(vec![FilteredValue {
                filter: Some("mlp".into()),
                value: num(0.9),
            }]),
        );
        // A method-wide key at model level is not used for the method-wide value.
        m0.insert("normalize".into(), ParamValue::Scalar(Scalar::Bool(true)));
        let scopes = ParamScopes {
            top: &top,
            slice: Some(&slice),
        };
        let models = [
            ModelScope {
                parameters: Some(&m0),
                input_name: "model.layers.0.self_attn.o_proj.weight",
            },
            ModelScope {
                parameters: None,
                input_name: "model.layers.0.self_attn.o_proj.weight",
            },
        ];
        let p = tensor_params(
            scopes,
            &models,
            "model.layers.0.self_attn.o_proj.weight",
            0.0,
            &["normalize"],
            &["weight", "density"],
        )
        .unwrap();
        assert_eq!(p.global.get("normalize"), Some(&Scalar::Bool(false)));
        assert_eq!(p.models[0].get("weight"), Some(&Scalar::Num(0.2)));
        assert_eq!(p.models[0].get("density"), Some(&Scalar::Num(0.4)));
        assert_eq!(p.models[1].get("weight"), Some(&Scalar::Num(1.0)));
        assert_eq!(p.models[1].get("density"), Some(&Scalar::Num(0.4)));
        // Per-model filters see the input name.
        let models = [ModelScope {
            parameters: Some(&m0),
            input_name: "model.layers.0.mlp.up_proj.weight",
        }];
        let p =
            tensor_params(scopes, &models, "model.layers.9.self_attn.x", 0.0, &[], &[]).unwrap();
        assert_eq!(p.models[0].get("density"), Some(&Scalar::Num(0.9)));
        // Fallback (no name lists): top/slice keys are global and inherited; model keys per-model.
        assert_eq!(p.global.get("density"), Some(&Scalar::Num(0.4)));
        assert_eq!(p.global.get("weight"), Some(&Scalar::Num(1.0)));
        assert_eq!(p.models[0].get("normalize"), Some(&Scalar::Bool(true)));
    }
}
