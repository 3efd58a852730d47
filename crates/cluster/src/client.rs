//! Connecting to a coordinator: a tonic client with the bearer token attached and explicit
//! message size limits.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::ClientAuth;
use crate::error::{ClusterError, Result};
use crate::pb::coordinator_client::CoordinatorClient;
use crate::MAX_MESSAGE_BYTES;

/// A coordinator client whose every call carries the bearer token (if any).
pub type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

/// Connects to the coordinator at `url` (e.g. `http://127.0.0.1:7000`), attaching `token`.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Client> {
    let auth = ClientAuth::new(token)?;
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| ClusterError::Config(format!("bad coordinator url {url:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .http2_adaptive_window(true);
    let channel = endpoint.connect().await?;
    Ok(CoordinatorClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
