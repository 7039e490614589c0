//! The `Host` check of a loopback listener, a defence against DNS rebinding: a web page in a
//! browser on the node can make a name of its own resolve to 127.0.0.1 and then read the API
//! (secrets included) as a "same-origin" site. Such a request carries the page's name in
//! `Host`, so a loopback listener answers only requests addressed to a loopback name or
//! address, or to a name the operator listed in `http.allowed_hosts`.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::HOST;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::scope::ApiError;

/// Names allowed besides the loopback ones, lower case.
#[derive(Clone, Default)]
pub struct AllowedHosts(Arc<Vec<String>>);

impl AllowedHosts {
    pub fn new(names: &[String]) -> Self {
        Self(Arc::new(
            names.iter().map(|n| n.to_ascii_lowercase()).collect(),
        ))
    }

    /// Whether a request with this `Host` header value is for this server.
    pub fn allows(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        name == "localhost"
            || name.ends_with(".localhost")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.0.iter().any(|allowed| allowed == name)
    }
}

/// The host part of a `Host` value: without the port, and without the brackets of IPv6.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Middleware for a loopback listener. A request without `Host` (HTTP/1.0) is let through: a
/// browser always sends one.
pub async fn check_host(
    State(allowed): State<AllowedHosts>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(HOST)
        .map(|h| h.to_str().unwrap_or(""));
    match host {
        Some(host) if !allowed.allows(host) => ApiError::Forbidden(format!(
            "host {host:?} is not a name of this server; a loopback listener answers only \
             loopback names and http.allowed_hosts"
        ))
        .into_response(),
        _ => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_listed_names_are_allowed() {
        let allowed = AllowedHosts::new(&["Edge-Node.Local".to_owned()]);
        for host in [
            "localhost",
            "localhost:10550",
            "LOCALHOST.",
            "api.localhost",
            "127.0.0.1:10550",
            "127.1.2.3",
            "[::1]:10550",
            "[::1]",
            "edge-node.local:10550",
        ] {
            assert!(allowed.allows(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:10550",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]:10550",
            "",
        ] {
            assert!(!allowed.allows(host), "{host}");
        }
    }
}
