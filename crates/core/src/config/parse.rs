//! YAML to [`MergeConfig`] (stub: to be implemented).
use super::model::MergeConfig;

/// A config error naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the key (e.g. `models[1].parameters.density`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// A non-fatal remark about the config (an unknown or ignored key).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigWarning {
    /// Dotted path of the key.
    pub key: String,
    /// The remark.
    pub message: String,
}

/// Parse a config. With `strict`, unknown keys are errors.
pub fn parse_config(text: &str, strict: bool) -> Result<(MergeConfig, Vec<ConfigWarning>), ConfigError> {
    let _ = (text, strict);
    Err(ConfigError { key: String::new(), message: "not implemented".into() })
}
