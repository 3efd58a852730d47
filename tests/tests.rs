//! Process-level tests of the `amalgam` binary: real files on disk, real child processes.
//!
//! One test binary built from modules (as ripgrep does); `common` holds the helpers.
#![allow(clippy::unwrap_used)]

mod common;

mod adapters;
mod cli_merge;
mod cli_validation;
mod cluster;
mod data_driven;
mod deploy_manifests;
mod mergekit_parity;
mod streaming;
