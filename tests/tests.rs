//! Process-level tests of the `amalgam` binary: real files on disk, real child processes.
//!
//! One test binary built from modules (as ripgrep does); `common` holds the helpers.
#![allow(clippy::unwrap_used)]

mod common;

mod adapter_merge;
mod adapters;
mod cli_merge;
mod cli_validation;
mod cluster;
mod cluster_mats;
mod cluster_stream;
mod data_driven;
mod deploy_manifests;
mod eval_cli;
mod gguf;
mod mergekit_parity;
mod streaming;
mod study;
