//! amalgam-engine: runs a merge on one machine.
//!
//! It owns the glue between the pure merge math (`amalgam-core`) and checkpoint I/O
//! (`amalgam-io`), and nothing networked:
//! - [`inputs`]: resolves the config's model paths and opens (and validates) every checkpoint;
//! - [`reader`]: a [`amalgam_core::tensor::TensorReader`] over memory-mapped inputs for one
//!   planned tensor, with the non-finite check;
//! - [`finite`]: the non-finite scans of inputs and of merged values;
//! - [`budget`]: how many elements a method may hold per buffer under `--memory-budget`, and the
//!   dry run's peak estimate;
//! - [`run`]: executes a plan (global passes, then every tensor in order) into a
//!   [`amalgam_io::CheckpointWriter`], then copies config and tokenizer files and writes the card;
//! - [`card`]: the README.md model card.
//!
//! The cluster's workers will call the same per-tensor code ([`run::merge_tensor`]).
#![deny(missing_docs)]

pub mod adapter;
pub mod adapter_merge;
pub mod budget;
pub mod card;
pub mod device;
pub mod error;
pub mod finite;
pub mod inputs;
pub mod reader;
pub mod run;
pub mod shard;
pub mod synth;
pub mod vocab;

pub use error::EngineError;
