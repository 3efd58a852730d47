//! Errors of the engine.

use thiserror::Error;

/// An error while preparing or running a merge.
#[derive(Debug, Error)]
pub enum EngineError {
    /// Reading, validating or writing a checkpoint failed.
    #[error(transparent)]
    Io(#[from] amalgam_io::IoError),
    /// The merge math or the planner refused.
    #[error(transparent)]
    Merge(#[from] amalgam_core::MergeError),
    /// A model path in the config cannot be used.
    #[error("model `{model}`: {message}")]
    Model {
        /// The reference as written in the config.
        model: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A config value cannot be honoured.
    #[error("config key `{key}`: {message}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The output directory holds one of the merge's inputs.
    #[error("{}: the output directory is or holds {}, an input of this merge; choose another output directory (writing there would replace or remove it)", dir.display(), input.display())]
    OutputHoldsInput {
        /// The output directory.
        dir: std::path::PathBuf,
        /// The input found there (a model, adapter or statistics file).
        input: std::path::PathBuf,
    },
    /// The memory budget is too small for the plan.
    #[error("--memory-budget {budget} bytes is too small: {message}")]
    Budget {
        /// The budget given.
        budget: u64,
        /// Why.
        message: String,
    },
}
