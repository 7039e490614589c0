//! The local HTTP endpoint's settings (`http`): where it listens, its bounds, HTTPS and who may
//! use the API.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::settings_checks::{
    self, at_most_bytes, duration_within, invalid, within, ConfigError, MAX_HOST_BYTES,
    MIN_DURATION,
};

/// HTTP connections: far more than a node's local clients need, and each costs a descriptor.
pub const MAX_HTTP_CONNECTIONS: usize = 65_536;
/// Requests or watches at once; each holds a page or a watch budget of memory.
pub const MAX_HTTP_REQUESTS: usize = 4096;
pub const MAX_HTTP_WATCHES: usize = 4096;
/// The longest header or idle timeout: a slow client may hold a connection at most this long.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(3600);

/// `http`: the local HTTP endpoint: probes, metrics and the Kubernetes-style API, which serves
/// the store's objects and takes writes (carried out through the cloud, or here for what the
/// edge owns while the cloud is away).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub enabled: bool,
    /// `host:port` to listen on. Loopback by default: the API serves secrets, unauthenticated.
    pub listen: String,
    /// Connections open at once; over it, `503`. Kept to a quarter of the open-files limit.
    pub max_connections: usize,
    /// Time for a new connection's first request head; over it, `408`.
    #[serde(deserialize_with = "settings_checks::duration")]
    pub header_timeout: Duration,
    /// Time a keep-alive connection may stay idle between requests.
    #[serde(deserialize_with = "settings_checks::duration")]
    pub idle_timeout: Duration,
    /// API requests in progress at once, watches apart; over it, `429`.
    pub max_requests: usize,
    /// Watches open at once; over it, `429`.
    pub max_watches: usize,
    /// Names a loopback listener answers besides the loopback ones (DNS rebinding defence).
    pub allowed_hosts: Vec<String>,
    /// HTTPS: the API's certificate chain and key (PEM).
    pub tls: Option<HttpTlsSettings>,
    /// Authentication and authorization of the API, in kube-apiserver's file formats.
    pub auth: Option<HttpAuthSettings>,
    /// Serve anonymous requests beyond loopback (the API serves secrets).
    pub insecure_allow_anonymous: bool,
}

/// `http.tls`: HTTPS for the API (kubectl sends a token only over HTTPS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CAs whose client certificates are credentials: subject CN the user, O the groups.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// `http.auth`: see [`crate::http::auth`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthSettings {
    /// kube-apiserver's static token file: `token,user,uid,"group1,group2"` a line. Optional
    /// when client certificates are the credentials (`http.tls.client_ca_file`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// kube-apiserver's ABAC policy file, one JSON policy a line; without it every
    /// authenticated user may do everything.
    pub policy_file: Option<PathBuf>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:10550".into(),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_requests: 64,
            max_watches: 64,
            allowed_hosts: Vec::new(),
            tls: None,
            auth: None,
            insecure_allow_anonymous: false,
        }
    }
}

impl HttpSettings {
    /// The listen address; `validate` has already checked that it parses.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.listen
            .trim()
            .parse()
            .map_err(|e| ConfigError::Invalid {
                key: "http.listen",
                message: format!(
                    "{:?} is not a socket address ({e}); use host:port, e.g. 127.0.0.1:10550",
                    self.listen
                ),
            })
    }

    /// Whether client certificates are credentials (`http.tls.client_ca_file`).
    pub fn client_certificates(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some())
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        within(
            "http.max_connections",
            self.max_connections,
            1,
            MAX_HTTP_CONNECTIONS,
        )?;
        within("http.max_requests", self.max_requests, 1, MAX_HTTP_REQUESTS)?;
        within("http.max_watches", self.max_watches, 1, MAX_HTTP_WATCHES)?;
        duration_within(
            "http.header_timeout",
            self.header_timeout,
            MIN_DURATION,
            MAX_HTTP_TIMEOUT,
        )?;
        duration_within(
            "http.idle_timeout",
            self.idle_timeout,
            MIN_DURATION,
            MAX_HTTP_TIMEOUT,
        )?;
        for host in &self.allowed_hosts {
            if host.is_empty() || host.contains(['/', ':', ' ']) {
                return invalid(
                    "http.allowed_hosts",
                    format!("{host:?} is not a host name; give names without port or scheme, e.g. edge-node.local"),
                );
            }
            at_most_bytes("http.allowed_hosts", host, MAX_HOST_BYTES)?;
        }
        let client_certificates = self.client_certificates();
        if self
            .auth
            .as_ref()
            .is_some_and(|a| a.token_file.is_none() && !client_certificates)
        {
            return invalid(
                "http.auth.token_file",
                "http.auth needs a token_file, or client certificates (http.tls.client_ca_file), to know who asks".into(),
            );
        }
        Ok(())
    }
}
