//! amalgam-eval: what a merged model can do, and the statistics data-driven merges need.
//!
//! - [`model`]: a Llama-family causal LM (llama, mistral, qwen2) on candle, loaded from a
//!   Hugging Face safetensors directory (with `config.json`) or a GGUF file.
//! - [`tokenizer`]: `tokenizer.json` (or GGUF metadata) through the tokenizers crate.
//! - [`score`]: the one question evaluation asks of a model: the log-likelihood of a
//!   continuation given a context ([`score::ScoreRequest`] → [`score::Scored`]), in batches fixed
//!   before any model runs ([`score::plan_batches`]), so that one process and N workers give
//!   identical numbers.
//! - [`tasks`]: BIG-bench JSON tasks, FIB-style pairs and plain JSONL rendered into requests and
//!   graded from their scores (methods.md §17).
//! - [`suite`] and [`report`]: a suite of held-in / held-out tasks, and its JSON / Markdown report.
//! - [`stats`]: diagonal Fisher, Gram matrices, K-FAC factors and (IA)^3 block Fishers computed
//!   from data, written in the statistics-file format of architecture.md.

#![deny(missing_docs)]

pub mod error;
pub mod model;
pub mod report;
pub mod score;
pub mod stats;
pub mod suite;
pub mod tasks;
pub mod tokenizer;

pub use error::EvalError;
pub use score::{plan_batches, ScoreRequest, Scored, Scorer};
