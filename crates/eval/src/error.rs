//! Errors of evaluation and statistics: each names the file, field or tensor at fault.

use std::path::PathBuf;

/// What went wrong while loading a model, reading a task or scoring.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Checkpoint I/O (safetensors, GGUF) failed; the inner error names the file and tensor.
    #[error(transparent)]
    Io(#[from] amalgam_io::IoError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The model cannot be loaded or run (unsupported architecture, missing tensor, bad config).
    #[error("model {path}: {msg}")]
    Model {
        /// The model directory or file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer is missing or cannot be loaded.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// The tokenizer file (or the model it should come with).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A task or suite file does not parse or holds a bad value; `field` names where.
    #[error("{path}: {field}: {msg}")]
    Task {
        /// The task or suite file.
        path: PathBuf,
        /// The field (e.g. `examples[3].target_scores`).
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// A candle operation failed (shapes, dtypes, device).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Other(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
