//! Error type of the cluster crate.

/// Everything that can go wrong in the coordinator, a worker, or the job store.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The shard plan is inconsistent (duplicate shard ids, a gang id reused, ...).
    #[error("bad shard plan: {0}")]
    Plan(String),
    /// The job host (the engine side of the coordinator) failed.
    #[error("job host: {0}")]
    Host(String),
    /// A shard executor (the engine side of a worker) failed.
    #[error("shard executor: {0}")]
    Executor(String),
    /// The job store (journal file, etcd) failed or holds data that does not fit.
    #[error("job store: {0}")]
    Store(String),
    /// The peer broke the protocol (unexpected message, wrong sizes, ...).
    #[error("protocol: {0}")]
    Protocol(String),
    /// A gRPC call failed.
    #[error("rpc {rpc} failed: {}", crate::tls::status_chain(status))]
    Rpc {
        /// RPC name.
        rpc: &'static str,
        /// The status the server (or the client library) returned.
        status: Box<tonic::Status>,
    },
    /// Connecting or serving failed at the transport level.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Connecting to the coordinator failed (refused, unreachable, TLS handshake failed).
    #[error("cannot connect to the coordinator at {url}: {}", crate::tls::error_chain(.source))]
    Connect {
        /// The coordinator URL.
        url: String,
        /// The transport error (its causes are part of the message).
        #[source]
        source: tonic::transport::Error,
    },
    /// Bad server or client configuration (token, address, ...).
    #[error("config: {0}")]
    Config(String),
    /// A path outside the allowed roots (`--allow-root`), or one that cannot be resolved.
    #[error("path refused: {0}")]
    PathRefused(String),
    /// File system error with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl ClusterError {
    /// Wraps a tonic status returned by RPC `rpc`.
    pub fn rpc(rpc: &'static str, status: tonic::Status) -> Self {
        ClusterError::Rpc {
            rpc,
            status: Box::new(status),
        }
    }

    /// Wraps an I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        ClusterError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// Result alias of the cluster crate.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;
