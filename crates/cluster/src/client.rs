//! Connecting to a coordinator: a tonic client with the bearer token attached and explicit
//! message size limits.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::ClientAuth;
use crate::error::{ClusterError, Result};
use crate::pb::coordinator_client::CoordinatorClient;
use crate::tls::{error_chain, ClientTls};
use crate::MAX_MESSAGE_BYTES;

/// A coordinator client whose every call carries the bearer token (if any).
pub type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

/// Connects to the coordinator at `url` (e.g. `http://127.0.0.1:7000`), attaching `token`.
/// Plain HTTP/2; see [`connect_with`] for TLS.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Client> {
    connect_with(url, token, None).await
}

/// Connects to the coordinator at `url`, attaching `token`; with `tls`, over TLS (the URL
/// must then be `https://`, and an `https://` URL needs `tls`: see [`crate::tls`]).
pub async fn connect_with(
    url: &str,
    token: Option<&str>,
    tls: Option<&ClientTls>,
) -> Result<Client> {
    let auth = ClientAuth::new(token)?;
    let https = url.starts_with("https://");
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| ClusterError::Config(format!("bad coordinator url {url:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .http2_adaptive_window(true);
    match (https, tls) {
        (true, Some(t)) => {
            endpoint = endpoint.tls_config(t.config()?).map_err(|e| {
                ClusterError::Config(format!("TLS settings for {url}: {}", error_chain(&e)))
            })?;
        }
        (true, None) => {
            return Err(ClusterError::Config(format!(
                "{url} uses TLS: give the CA certificate that signed the coordinator's \
                 certificate (--ca-cert)"
            )))
        }
        (false, Some(_)) => {
            return Err(ClusterError::Config(format!(
                "TLS settings were given but {url} is not an https:// URL"
            )))
        }
        (false, None) => {}
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ClusterError::Connect {
            url: url.to_string(),
            source,
        })?;
    Ok(CoordinatorClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
