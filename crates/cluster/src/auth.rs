//! Bearer-token authentication: one interceptor guards every RPC (unary and streaming), and a
//! client-side interceptor attaches the token.
//!
//! The header is `authorization: Bearer <token>`. Tokens are compared in constant time (for a
//! given length). A coordinator without a token accepts every call.

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::{ClusterError, Result};

/// Checks a token for use in a header: non-empty, visible ASCII, no spaces.
pub fn validate_token(token: &str) -> Result<()> {
    if token.is_empty() {
        return Err(ClusterError::Config("the token is empty".into()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClusterError::Config(
            "the token must be visible ASCII without spaces".into(),
        ));
    }
    Ok(())
}

/// Reads a token file (`--token-file`): the whole file, surrounding whitespace trimmed.
pub fn load_token_file(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| ClusterError::io(path, e))?;
    let token = text.trim().to_string();
    validate_token(&token).map_err(|e| ClusterError::Config(format!("{}: {e}", path.display())))?;
    Ok(token)
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the comparison from being short-circuited by the optimiser.
    std::hint::black_box(diff) == 0
}

/// Server-side interceptor: refuses calls without the right bearer token, and (mutual TLS)
/// calls over a connection whose client presented no certificate.
#[derive(Clone, Debug, Default)]
pub struct ServerAuth {
    token: Option<Arc<[u8]>>,
    require_client_cert: bool,
}

impl ServerAuth {
    /// Requires `token` on every call, or nothing when `None`.
    pub fn new(token: Option<&str>) -> Result<Self> {
        if let Some(t) = token {
            validate_token(t)?;
        }
        Ok(ServerAuth {
            token: token.map(|t| Arc::from(t.as_bytes())),
            require_client_cert: false,
        })
    }

    /// Also requires a verified TLS client certificate on the call's connection (mutual TLS;
    /// see [`crate::tls`]: the handshake verifies a certificate when one is offered, this
    /// check refuses connections that offered none, with a clear error).
    pub fn require_client_cert(mut self, required: bool) -> Self {
        self.require_client_cert = required;
        self
    }

    /// Checks the `authorization` metadata of a request.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer <token>` (worker --token-file)",
            ));
        };
        let presented = value.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
            Status::unauthenticated("malformed authorization header: expected `Bearer <token>`")
        })?;
        if constant_time_eq(presented, expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.require_client_cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "mutual TLS: this coordinator requires a client certificate signed by its \
                 client CA (worker --client-cert and --client-key)",
            ));
        }
        self.check(req.metadata())?;
        Ok(req)
    }
}

/// Client-side interceptor: attaches `authorization: Bearer <token>` when a token is set.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl ClientAuth {
    /// Sends `token` with every call, or nothing when `None`.
    pub fn new(token: Option<&str>) -> Result<Self> {
        let header = match token {
            Some(t) => {
                validate_token(t)?;
                let v = format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|e| {
                        ClusterError::Config(format!("token is not a header value: {e}"))
                    })?;
                Some(v)
            }
            None => None,
        };
        Ok(ClientAuth { header })
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req_with(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn server_checks_bearer_token() {
        let mut s = ServerAuth::new(Some("s3cret")).unwrap();
        assert!(s.call(req_with(Some("Bearer s3cret"))).is_ok());
        let e = s.call(req_with(None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("missing bearer token"));
        let e = s.call(req_with(Some("Bearer wrong"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("invalid bearer token"));
        let e = s.call(req_with(Some("Basic s3cret"))).unwrap_err();
        assert!(e.message().contains("malformed"));
        // No token configured: everything passes.
        let mut open = ServerAuth::new(None).unwrap();
        assert!(open.call(req_with(None)).is_ok());
    }

    #[test]
    fn client_attaches_token_and_bad_tokens_are_refused() {
        let mut c = ClientAuth::new(Some("s3cret")).unwrap();
        let r = c.call(Request::new(())).unwrap();
        let mut s = ServerAuth::new(Some("s3cret")).unwrap();
        assert!(s.call(r).is_ok());
        assert!(ClientAuth::new(Some("has space")).is_err());
        assert!(ServerAuth::new(Some("")).is_err());
    }

    #[test]
    fn token_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "  abc123\n").unwrap();
        assert_eq!(load_token_file(&p).unwrap(), "abc123");
        std::fs::write(&p, "\n").unwrap();
        assert!(load_token_file(&p).is_err());
    }
}
