//! TLS for the coordinator's gRPC port (rustls with the `ring` provider, through tonic).
//!
//! - Server: [`ServerTls`], a certificate chain and its private key (PEM), and optionally a
//!   client CA: with one, every client must present a certificate signed by it (mutual TLS).
//!   A certificate from another CA fails the TLS handshake. A client that offers no
//!   certificate completes the handshake, and the interceptor that guards every RPC
//!   ([`crate::auth::ServerAuth::require_client_cert`]) refuses each of its calls with
//!   `Unauthenticated` and a message that says what is missing: with TLS 1.3 a handshake
//!   refusal reaches the client only as a race between an alert and a closed connection.
//! - Client: [`ClientTls`], the CA that signed the coordinator's certificate (there are no
//!   built-in web roots: a cluster uses its own CA), optionally a client identity for mutual
//!   TLS, and optionally the name to verify (by default the URL's host, which may be an IP
//!   address when the certificate lists it).
//!
//! TLS is used when the coordinator URL starts with `https://`; an `https://` URL without a
//! [`ClientTls`], or an `http://` URL with one, is a configuration error rather than a silent
//! downgrade. The bearer token still applies on top of TLS.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::{ClusterError, Result};

/// A certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct PemIdentity {
    /// The certificate chain (leaf first), PEM.
    pub cert_pem: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for PemIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemIdentity")
            .field("cert_pem_bytes", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl PemIdentity {
    /// Reads a certificate file and a key file; checks that each holds the PEM block it should.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self> {
        let id = PemIdentity {
            cert_pem: read_pem(cert, "certificate", &["CERTIFICATE"])?,
            key_pem: read_pem(key, "private key", &["PRIVATE KEY"])?,
        };
        Ok(id)
    }

    fn validate(&self, what: &str) -> Result<()> {
        check_pem(&self.cert_pem, &["CERTIFICATE"])
            .map_err(|e| ClusterError::Config(format!("{what} certificate: {e}")))?;
        check_pem(&self.key_pem, &["PRIVATE KEY"])
            .map_err(|e| ClusterError::Config(format!("{what} private key: {e}")))
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// TLS settings of the coordinator (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// The coordinator's certificate chain and key.
    pub identity: PemIdentity,
    /// CA certificate(s) (PEM) that client certificates must chain to; `Some` turns on
    /// mutual TLS (a client certificate is required).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    /// Reads `--tls-cert`, `--tls-key` and the optional `--client-ca` files.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self> {
        Ok(ServerTls {
            identity: PemIdentity::from_files(cert, key)?,
            client_ca_pem: client_ca
                .map(|p| read_pem(p, "client CA certificate", &["CERTIFICATE"]))
                .transpose()?,
        })
    }

    /// The tonic server configuration. With a client CA, client certificates are verified
    /// when offered but not demanded by the handshake: [`crate::server::serve`] pairs this
    /// with [`crate::auth::ServerAuth::require_client_cert`].
    pub(crate) fn config(&self) -> Result<ServerTlsConfig> {
        self.identity.validate("server")?;
        let mut cfg = ServerTlsConfig::new().identity(self.identity.identity());
        if let Some(ca) = &self.client_ca_pem {
            check_pem(ca, &["CERTIFICATE"])
                .map_err(|e| ClusterError::Config(format!("client CA: {e}")))?;
            cfg = cfg
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        Ok(cfg)
    }
}

/// TLS settings of a client of the coordinator (workers, `submit`, `status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate(s) (PEM) the coordinator's certificate must chain to. Required for an
    /// `https://` URL (no web roots are built in).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key for mutual TLS.
    pub identity: Option<PemIdentity>,
    /// Name to verify the coordinator's certificate against; default: the URL's host.
    pub domain: Option<String>,
}

impl ClientTls {
    /// Reads `--ca-cert` and the optional `--client-cert` / `--client-key` pair.
    pub fn from_files(
        ca: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> Result<Self> {
        let identity = match (client_cert, client_key) {
            (Some(c), Some(k)) => Some(PemIdentity::from_files(c, k)?),
            (None, None) => None,
            _ => {
                return Err(ClusterError::Config(
                    "a client certificate needs its key and a key its certificate \
                     (--client-cert with --client-key)"
                        .into(),
                ))
            }
        };
        Ok(ClientTls {
            ca_pem: ca
                .map(|p| read_pem(p, "CA certificate", &["CERTIFICATE"]))
                .transpose()?,
            identity,
            domain: None,
        })
    }

    /// The tonic client configuration.
    pub fn config(&self) -> Result<ClientTlsConfig> {
        let Some(ca) = &self.ca_pem else {
            return Err(ClusterError::Config(
                "TLS to the coordinator needs the CA certificate that signed its certificate \
                 (--ca-cert)"
                    .into(),
            ));
        };
        check_pem(ca, &["CERTIFICATE"])
            .map_err(|e| ClusterError::Config(format!("CA certificate: {e}")))?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(id) = &self.identity {
            id.validate("client")?;
            cfg = cfg.identity(id.identity());
        }
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}

/// Checks that `pem` holds at least one PEM block whose label ends with one of `labels`.
fn check_pem(pem: &[u8], labels: &[&str]) -> std::result::Result<(), String> {
    let text = String::from_utf8_lossy(pem);
    let found = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|r| r.strip_suffix("-----"))
            .is_some_and(|label| labels.iter().any(|want| label.ends_with(want)))
    });
    if found {
        Ok(())
    } else {
        Err(format!("no PEM block labelled {}", labels.join(" or ")))
    }
}

fn read_pem(path: &Path, what: &str, labels: &[&str]) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| ClusterError::io(path, e))?;
    check_pem(&bytes, labels)
        .map_err(|e| ClusterError::Config(format!("{what} {}: {e}", path.display())))?;
    Ok(bytes)
}

/// An error and its causes, `outer: inner: innermost` (tonic's transport errors say little
/// without their sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// A gRPC status as `message (Code)`, followed by the causes of a client-side transport
/// failure (such as a TLS alert) when there are any.
pub fn status_chain(status: &tonic::Status) -> String {
    let mut out = format!("{} ({:?})", status.message(), status.code());
    if let Some(src) = std::error::Error::source(status) {
        let chain = error_chain(src);
        if !chain.is_empty() && chain != status.message() {
            out.push_str(": ");
            out.push_str(&chain);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_labels_are_checked_with_clear_errors() {
        assert!(check_pem(b"-----BEGIN CERTIFICATE-----\nabc\n", &["CERTIFICATE"]).is_ok());
        assert!(check_pem(b"-----BEGIN EC PRIVATE KEY-----\n", &["PRIVATE KEY"]).is_ok());
        let e = check_pem(b"hello", &["CERTIFICATE"]).unwrap_err();
        assert!(e.contains("no PEM block labelled CERTIFICATE"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cert.pem");
        std::fs::write(&p, "not a pem").unwrap();
        let e = ServerTls::from_files(&p, &p, None).unwrap_err().to_string();
        assert!(e.contains("cert.pem") && e.contains("certificate"), "{e}");
        let e = ClientTls::from_files(None, Some(&p), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--client-key"), "{e}");
        let e = ClientTls::default().config().unwrap_err().to_string();
        assert!(e.contains("--ca-cert"), "{e}");
    }

    #[test]
    fn error_chain_joins_sources() {
        let inner = std::io::Error::other("innermost");
        let outer = ClusterError::io("/x", inner);
        assert_eq!(error_chain(&outer), "/x: innermost");
    }
}
