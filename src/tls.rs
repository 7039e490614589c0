//! TLS to an external broker: a rustls client configuration built from the PEM files named in
//! `mqtt.tls`, and operator-facing reasons for TLS failures while connecting. And the server
//! configuration of the local API's HTTPS, from `http.tls`.
//!
//! Everything that can be checked before connecting is checked at start-up, so that a typo in a
//! path or a wrong file stops the process with an error naming the key and the file, instead of
//! turning into an endless series of failed connection attempts. The crypto provider is rustls's
//! `ring` one, chosen explicitly (no process-wide default is installed or needed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::bounded_read::{self, Holds};

/// Why the TLS settings cannot be used. Each variant names the config key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("config key `{key}`: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config key `{key}`: {} is not valid PEM: {source}", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        source: pem::Error,
    },
    #[error("config key `{key}`: {} holds no {what}", path.display())]
    Missing {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("config key `{key}`: {}: certificate {index} cannot be used as a CA: {reason}", path.display())]
    BadCa {
        key: &'static str,
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error(
        "config keys `mqtt.tls.cert_file` / `mqtt.tls.key_file`: {} and {} cannot be used as a client certificate: {source}",
        cert.display(),
        key.display()
    )]
    ClientCert {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "config keys `http.tls.cert_file` / `http.tls.key_file`: {} and {} cannot be used as the API's certificate: {source}",
        cert.display(),
        key.display()
    )]
    ServerCert {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("config key `mqtt.host`: {host:?} is neither an IP address nor a valid DNS name, so the broker's certificate cannot be checked against it")]
    Host { host: String },
    #[error("config key `http.tls.client_ca_file`: {}: cannot check client certificates with it: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("cannot set up TLS: {0}")]
    Setup(rustls::Error),
}

/// Builds the client configuration for a broker at `host` (the name its certificate must carry:
/// a DNS name, or an IP address that must appear among the certificate's IP SANs), from
/// `mqtt.tls`: the CAs of `ca_file`, and a client certificate chain and key when given.
pub fn client_config(
    ca_file: &Path,
    client_cert: Option<(&Path, &Path)>,
    host: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    if ServerName::try_from(host).is_err() {
        return Err(TlsError::Host { host: host.into() });
    }

    let roots = ca_roots("mqtt.tls.ca_file", ca_file)?;

    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots);

    let config = match client_cert {
        Some((cert_path, key_path)) => {
            let chain = certificates("mqtt.tls.cert_file", cert_path)?;
            let key = private_key("mqtt.tls.key_file", key_path)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::ClientCert {
                    cert: cert_path.to_owned(),
                    key: key_path.to_owned(),
                    source,
                })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The file config key `key` names (certificates, or a key as a secret), with its size cap
/// ([`crate::bounded_read`]).
fn read(key: &'static str, path: &Path, holds: Holds) -> Result<Vec<u8>, TlsError> {
    bounded_read::read(path, holds).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

/// Every `CERTIFICATE` section of a PEM file; at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(key, path, Holds::Certificates)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            key,
            path: path.to_owned(),
            what: "PEM certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

/// The CA certificates of the PEM file config key `key` names.
fn ca_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in certificates(key, path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            key,
            path: path.to_owned(),
            index: index + 1,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The local API's HTTPS configuration: its certificate chain and key (`http.tls`), and with
/// `client_ca` the CAs whose client certificates are credentials. A client certificate is
/// asked for, not required: a client may authenticate with a token instead, and one without
/// either is refused by [`crate::http::auth`], with a Status it can read, not a failed
/// handshake. A certificate that is presented must verify, or the handshake fails.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("http.tls.cert_file", cert_file)?;
    let key = private_key("http.tls.key_file", key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = ca_roots("http.tls.client_ca_file", path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::ServerCert {
                cert: cert_file.to_owned(),
                key: key_file.to_owned(),
                source,
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1; not encrypted), named by
/// config key `key`.
fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(key, path, Holds::Secret { key })?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Missing {
            key,
            path: path.to_owned(),
            what: "unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)",
        },
        source => TlsError::Pem {
            key,
            path: path.to_owned(),
            source,
        },
    })
}

/// The rustls error behind a connection failure, if any. rumqttc wraps TLS failures in I/O
/// errors at varying depths: handshake failures directly, alerts that arrive after the handshake
/// (a TLS 1.3 broker refusing the client certificate) inside its packet-reading errors.
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An I/O error's `source()` skips the error it wraps, so look inside it here.
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = err.source();
    }
    None
}

/// An operator-facing account of a TLS failure, with the config key most likely at fault.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::AlertDescription as Alert;
    let hint = match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "the broker's certificate is not signed by a CA in mqtt.tls.ca_file"
        }
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        ) => "the broker's certificate is not issued for mqtt.host (a host name needs a DNS SAN, an IP address an IP SAN)",
        rustls::Error::InvalidCertificate(_) => {
            "the broker's certificate was rejected; check mqtt.tls.ca_file and the broker's certificate"
        }
        rustls::Error::AlertReceived(Alert::CertificateRequired) => {
            "the broker requires a client certificate: set mqtt.tls.cert_file and mqtt.tls.key_file"
        }
        rustls::Error::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        ) => "the broker rejected MetaManager's client certificate (mqtt.tls.cert_file, mqtt.tls.key_file)",
        rustls::Error::AlertReceived(_) => "the broker ended the TLS handshake",
        rustls::Error::InvalidMessage(_) => {
            "is the broker's port a TLS listener? (mqtt.port)"
        }
        _ => "",
    };
    if hint.is_empty() {
        format!("TLS handshake failed: {e}")
    } else {
        format!("TLS handshake failed: {e} ({hint})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_ca_file_is_named_with_its_key() {
        let e = client_config(Path::new("/nonexistent/ca.pem"), None, "127.0.0.1").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("mqtt.tls.ca_file"), "{text}");
        assert!(text.contains("/nonexistent/ca.pem"), "{text}");
    }

    #[test]
    fn a_host_that_cannot_be_verified_is_refused() {
        let e = client_config(Path::new("/nonexistent/ca.pem"), None, "bad host").unwrap_err();
        assert!(e.to_string().contains("mqtt.host"), "{e}");
    }

    #[test]
    fn tls_failures_are_found_inside_io_errors() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        let e = rumqttc::ConnectionError::MqttState(rumqttc::StateError::Io(io));
        let found = rustls_error(&e).expect("rustls error found");
        assert!(describe(found).contains("mqtt.tls.cert_file"));

        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert_eq!(
            describe(&unknown),
            "TLS handshake failed: invalid peer certificate: UnknownIssuer \
             (the broker's certificate is not signed by a CA in mqtt.tls.ca_file)"
        );
    }
}
