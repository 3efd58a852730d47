//! Distributed merging and evaluation for amalgam (issues 3, 6, 8): the gRPC coordinator and workers, shard leases,
//! the job journal. This crate does not depend on the merge engine; the engine plugs in through
//! [`server::JobHost`] (coordinator side), [`worker::ShardExecutor`] (worker side) and
//! [`journal::JobStore`] (durable job state).
//!
//! - [`scheduler`]: pure lease state machine (deadlines, expiry, gangs, endgame re-issue).
//! - [`server`]: the `Coordinator` gRPC service and [`server::serve`].
//! - [`worker`]: the worker loop [`worker::run_worker`] and the blocking [`worker::InputClient`].
//! - [`auth`]: bearer-token interceptors; [`client`]: connecting with limits and token.
//! - [`journal`]: [`journal::JobStore`] and its JSON-lines file implementation.
//! - [`roots`]: `--allow-root` path checks; [`metrics`]: Prometheus `/metrics`.
//! - [`remote_input`]: workers that do not see the inputs' storage stream them.
//! - [`etcd_store`]: [`journal::JobStore`] on etcd, and a throwaway local etcd for tests.
//! - [`eval_job`]: evaluation on the cluster: batches of scoring requests leased like shards.
//! - [`stats_job`]: statistics on the cluster: chunks of examples leased like shards.
//! - [`adapter_job`]: adapter merges and LoRA extraction on the cluster: modules leased like
//!   shards.
//! - [`tls`]: TLS and mutual TLS settings of the coordinator and its clients.
#![deny(missing_docs)]

/// Generated protobuf and gRPC code for `amalgam.v1` (from `proto/amalgam.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("amalgam.v1");
}

/// Payload chunk size for streamed inputs and results (512 KiB: in the 256 KiB..1 MiB range that
/// streamed fastest on loopback).
pub const CHUNK_BYTES: usize = 512 * 1024;

/// Largest gRPC message either side encodes or decodes (set explicitly on server and clients).
/// Chunks are far below it; a `Reduce` carries at most about 500k doubles.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

pub mod adapter_job;
pub mod auth;
pub mod client;
pub mod error;
pub mod etcd_store;
pub mod eval_job;
pub mod journal;
pub mod merge_job;
pub mod metrics;
pub mod prepass;
pub mod remote_input;
pub mod roots;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod stats_job;
pub mod tls;
pub mod worker;

pub use error::{ClusterError, Result};

/// Locks `m`, recovering the guard of a poisoned lock: a panic while holding one of the
/// crate's locks leaves consistent data (every critical section is a few plain updates).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
