//! Parameters resolved for one output tensor.
//!
//! The config layer (gradients over layers, `{filter, value}` lists, per-model then per-slice
//! then top-level lookup as mergekit does) reduces every parameter to a [`Scalar`] for the tensor
//! at hand. Methods read them through typed accessors and turn them into their own parameter
//! structs; they never see YAML.

use crate::error::{MergeError, Result};
use std::collections::BTreeMap;

/// One resolved parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// A number (integers included).
    Num(f64),
    /// A boolean.
    Bool(bool),
    /// A string (e.g. `consensus_method: count`).
    Str(String),
}

/// Parameters for one tensor: method-wide ones and one map per model (base excluded, config
/// order). Per-model maps already include the fallbacks to slice- and top-level values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorParams {
    /// Method-wide parameters (e.g. `normalize`, `lambda`, `t`).
    pub global: BTreeMap<String, Scalar>,
    /// Per-model parameters (e.g. `weight`, `density`), one map per model.
    pub models: Vec<BTreeMap<String, Scalar>>,
}

fn as_num(key: &str, v: &Scalar) -> Result<f64> {
    match v {
        Scalar::Num(x) => Ok(*x),
        Scalar::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        Scalar::Str(s) => Err(MergeError::BadParameter {
            key: key.into(),
            message: format!("expected a number, got \"{s}\""),
        }),
    }
}

fn as_bool(key: &str, v: &Scalar) -> Result<bool> {
    match v {
        Scalar::Bool(b) => Ok(*b),
        Scalar::Num(x) if *x == 0.0 || *x == 1.0 => Ok(*x == 1.0),
        other => Err(MergeError::BadParameter {
            key: key.into(),
            message: format!("expected true or false, got {other:?}"),
        }),
    }
}

impl TensorParams {
    /// A method-wide number, or `default` when absent.
    pub fn num(&self, key: &str, default: f64) -> Result<f64> {
        self.global.get(key).map_or(Ok(default), |v| as_num(key, v))
    }

    /// A method-wide number that may be absent.
    pub fn opt_num(&self, key: &str) -> Result<Option<f64>> {
        self.global.get(key).map(|v| as_num(key, v)).transpose()
    }

    /// A method-wide boolean, or `default` when absent.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        self.global
            .get(key)
            .map_or(Ok(default), |v| as_bool(key, v))
    }

    /// A method-wide string that may be absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.global.get(key) {
            None => Ok(None),
            Some(Scalar::Str(s)) => Ok(Some(s.clone())),
            Some(other) => Err(MergeError::BadParameter {
                key: key.into(),
                message: format!("expected a string, got {other:?}"),
            }),
        }
    }

    /// Model `i`'s number for `key`, or `default` when absent.
    pub fn model_num(&self, i: usize, key: &str, default: f64) -> Result<f64> {
        Ok(self.model_opt_num(i, key)?.unwrap_or(default))
    }

    /// Model `i`'s number for `key`, if given.
    pub fn model_opt_num(&self, i: usize, key: &str) -> Result<Option<f64>> {
        self.models
            .get(i)
            .and_then(|m| m.get(key))
            .map(|v| as_num(key, v))
            .transpose()
    }

    /// Every model's number for `key` (`default` where absent).
    pub fn model_nums(&self, key: &str, default: f64) -> Result<Vec<f64>> {
        (0..self.models.len())
            .map(|i| self.model_num(i, key, default))
            .collect()
    }

    /// Every model's number for `key`; an error naming the method when one lacks it.
    pub fn required_model_nums(&self, key: &str, method: &str) -> Result<Vec<f64>> {
        (0..self.models.len())
            .map(|i| {
                self.model_opt_num(i, key)?
                    .ok_or_else(|| MergeError::MissingParameter {
                        key: key.into(),
                        method: method.into(),
                        model: Some(i),
                    })
            })
            .collect()
    }

    /// Set a method-wide value (builder style, for tests and the planner).
    pub fn with_global(mut self, key: &str, v: Scalar) -> Self {
        self.global.insert(key.into(), v);
        self
    }

    /// Params for `n` models with per-model `key` set to the given values (tests).
    pub fn with_model_values(mut self, key: &str, values: &[f64]) -> Self {
        if self.models.len() < values.len() {
            self.models.resize(values.len(), BTreeMap::new());
        }
        for (m, v) in self.models.iter_mut().zip(values) {
            m.insert(key.into(), Scalar::Num(*v));
        }
        self
    }
}
