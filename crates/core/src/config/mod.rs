//! The mergekit-compatible config model.
//!
//! A config file is a superset of mergekit 0.1.5's YAML: every key mergekit accepts is accepted,
//! unknown keys are warnings naming the key (errors with `--strict`). The YAML is parsed once
//! into the typed [`MergeConfig`]; nothing outside this module sees untyped YAML.
//!
//! - [`model`]: the typed config ([`MergeConfig`], [`ModelRef`], [`ParamValue`], ...).
//! - [`parse`]: YAML text to [`MergeConfig`] with warnings, and static validation.
//! - [`resolve`]: evaluating a [`ParamValue`] for one tensor (gradients over the layer index,
//!   `{filter, value}` lists).

pub mod model;
pub mod parse;
pub mod resolve;

pub use model::*;
pub use parse::{parse_config, ConfigError, ConfigWarning};
