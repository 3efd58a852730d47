//! Errors raised by merge methods and the planner.

use thiserror::Error;

fn model_suffix(model: Option<usize>) -> String {
    model.map_or_else(String::new, |i| format!(" for model #{i}"))
}

/// An error raised while merging one tensor or building a method.
#[derive(Debug, Error)]
pub enum MergeError {
    /// A parameter has an impossible value; names the key.
    #[error("parameter `{key}`: {message}")]
    BadParameter {
        /// The config key.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A required parameter is missing.
    #[error("parameter `{key}` is required by merge method `{method}`{}", model_suffix(*model))]
    MissingParameter {
        /// The config key.
        key: String,
        /// The method that needs it.
        method: String,
        /// The model (its position among the method's inputs) that lacks a per-model parameter.
        model: Option<usize>,
    },
    /// The method cannot run with this set of inputs.
    #[error("merge method `{method}`: {message}")]
    BadInputs {
        /// The method.
        method: String,
        /// What is wrong.
        message: String,
    },
    /// An unknown merge method.
    #[error("unknown merge method `{0}`; run `amalgam methods` for the list")]
    UnknownMethod(String),
    /// Reading an input failed (I/O layer error converted to text, naming file and tensor).
    #[error("{0}")]
    Read(String),
    /// Writing the output failed.
    #[error("{0}")]
    Write(String),
    /// Non-finite value produced or found.
    #[error("tensor `{tensor}`: {message}")]
    Numeric {
        /// The tensor name.
        tensor: String,
        /// What happened.
        message: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = MergeError> = std::result::Result<T, E>;
