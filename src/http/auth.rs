//! Who may use the local API, in kube-apiserver's own file formats so that existing tooling
//! and habits carry over:
//! - authentication by bearer token, from a static token file (`token,user,uid,"group1,group2"`
//!   a line), or by a client certificate a configured CA signed (subject CN the user, each O a
//!   group), checked in the TLS handshake;
//! - authorization by an ABAC policy file (one JSON `Policy` a line); without one, every
//!   authenticated user may do everything.
//!
//! Without `http.auth`, requests are anonymous, which is allowed only on a loopback listener
//! or with `http.insecure_allow_anonymous` (checked at start-up, see [`check_exposure`]). With
//! it, no or a wrong token is `401 Unauthorized`, a request the policy does not allow `403
//! Forbidden`. The probes stay anonymous, so a service manager or kubelet can always ask.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::scope::ApiError;
use crate::settings_checks::{read_named, ConfigError};

/// The group of every authenticated user.
pub const AUTHENTICATED: &str = "system:authenticated";

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// The tokens and the policy, loaded once at start-up.
#[derive(Debug, Default)]
pub struct Auth {
    /// `None`: no tokens are credentials.
    tokens: Option<HashMap<String, User>>,
    /// Client certificates are credentials (`http.tls.client_ca_file`).
    client_certificates: bool,
    /// `None`: every authenticated user may do everything.
    policy: Option<Vec<Rule>>,
}

/// One ABAC rule's `spec`, as kube-apiserver reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Rule {
    user: String,
    group: String,
    readonly: bool,
    #[serde(rename = "apiGroup")]
    api_group: String,
    namespace: String,
    resource: String,
    #[serde(rename = "nonResourcePath")]
    non_resource_path: String,
}

#[derive(Deserialize)]
struct PolicyLine {
    spec: Rule,
}

/// What a request asks to do, in ABAC's terms.
#[derive(Debug, PartialEq, Eq)]
enum Attributes {
    Resource {
        api_group: String,
        namespace: String,
        resource: String,
        readonly: bool,
    },
    NonResource {
        path: String,
        readonly: bool,
    },
}

impl Auth {
    /// Loads the files the config names; each is read with a size cap.
    pub fn load(
        token_file: Option<&Path>,
        policy_file: Option<&Path>,
        client_certificates: bool,
    ) -> Result<Self, ConfigError> {
        let tokens = token_file
            .map(|path| {
                read_named("http.auth.token_file", path, true).and_then(|t| parse_tokens(&t))
            })
            .transpose()?;
        let policy = policy_file
            .map(|path| {
                read_named("http.auth.policy_file", path, false).and_then(|t| parse_policy(&t))
            })
            .transpose()?;
        Ok(Self {
            tokens,
            client_certificates,
            policy,
        })
    }

    /// Whether requests must say who they are; else they are anonymous.
    pub fn enabled(&self) -> bool {
        self.tokens.is_some() || self.client_certificates
    }

    /// The user of a request: its verified client certificate's, else the one its
    /// `Authorization` header names; `Err` is the 401.
    fn authenticate(
        &self,
        certificate: Option<&ClientCertificate>,
        authorization: Option<&str>,
    ) -> Result<Option<User>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        if let Some(ClientCertificate(user)) = certificate.filter(|_| self.client_certificates) {
            return Ok(Some(user.clone()));
        }
        let Some(tokens) = &self.tokens else {
            return Err(ApiError::Unauthorized(
                "a client certificate is required".into(),
            ));
        };
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
        tokens
            .get(token)
            .cloned()
            .map(Some)
            .ok_or_else(|| ApiError::Unauthorized("the bearer token is not valid".into()))
    }

    /// Whether the policy lets `user` do what `request` asks.
    fn authorize(&self, user: &User, request: &Attributes) -> bool {
        let Some(rules) = &self.policy else {
            return true;
        };
        rules.iter().any(|rule| rule.allows(user, request))
    }
}

impl Rule {
    fn allows(&self, user: &User, request: &Attributes) -> bool {
        let subject = (self.user == "*" || (!self.user.is_empty() && self.user == user.name))
            || (self.group == "*" || (!self.group.is_empty() && user.groups.contains(&self.group)));
        if !subject {
            return false;
        }
        let wildcard = |field: &str, value: &str| field == "*" || field == value;
        match request {
            Attributes::Resource {
                api_group,
                namespace,
                resource,
                readonly,
            } => {
                (*readonly || !self.readonly)
                    && wildcard(&self.api_group, api_group)
                    && wildcard(&self.namespace, namespace)
                    && wildcard(&self.resource, resource)
            }
            Attributes::NonResource { path, readonly } => {
                let path_matches = self.non_resource_path == "*"
                    || self.non_resource_path == *path
                    || self
                        .non_resource_path
                        .strip_suffix('*')
                        .is_some_and(|prefix| path.starts_with(prefix));
                (*readonly || !self.readonly) && path_matches
            }
        }
    }
}

/// kube-apiserver's static token file: `token,user,uid` and optionally `"group1,group2"`.
fn parse_tokens(text: &str) -> Result<HashMap<String, User>, ConfigError> {
    let mut tokens = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = split_csv(line);
        let bad = |why: &str| ConfigError::Invalid {
            key: "http.auth.token_file",
            message: format!("line {}: {why}", n + 1),
        };
        if fields.len() < 3 || fields[0].is_empty() || fields[1].is_empty() {
            return Err(bad("expected token,user,uid[,\"group1,group2\"]"));
        }
        // Every authenticated user is also in `system:authenticated`, as in kube-apiserver, so
        // one ABAC line can let them all read discovery (which kubectl needs first).
        let mut groups: Vec<String> = fields
            .get(3)
            .map(|g| {
                g.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        groups.push(AUTHENTICATED.to_owned());
        let user = User {
            name: fields[1].clone(),
            groups,
        };
        tokens.insert(fields[0].clone(), user);
    }
    Ok(tokens)
}

/// Splits one CSV line, with double quotes around fields that hold commas.
fn split_csv(line: &str) -> Vec<String> {
    let (mut fields, mut field, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields.into_iter().map(|f| f.trim().to_owned()).collect()
}

/// kube-apiserver's ABAC policy file: one `{"kind":"Policy","spec":{...}}` a line.
fn parse_policy(text: &str) -> Result<Vec<Rule>, ConfigError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(n, line)| {
            serde_json::from_str::<PolicyLine>(line)
                .map(|p| p.spec)
                .map_err(|e| ConfigError::Invalid {
                    key: "http.auth.policy_file",
                    message: format!("line {}: {e}", n + 1),
                })
        })
        .collect()
}

/// The user a verified client certificate names, put on each request of its connection.
#[derive(Debug, Clone)]
pub struct ClientCertificate(pub User);

impl ClientCertificate {
    /// The user of a certificate (DER) the TLS handshake verified: subject CN the name, each
    /// O a group, as kube-apiserver reads them. `None` without a CN.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
        let mut groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_owned))
            .collect();
        groups.push(AUTHENTICATED.to_owned());
        Some(Self(User { name, groups }))
    }
}

/// Refuses to serve anonymously beyond loopback unless the operator said so: the API serves
/// secrets.
pub fn check_exposure(
    addr: SocketAddr,
    auth: &Auth,
    insecure_allow_anonymous: bool,
) -> Result<(), ConfigError> {
    if addr.ip().is_loopback() || auth.enabled() || insecure_allow_anonymous {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key: "http.listen",
        message: format!(
            "{addr} is beyond loopback and the API has no authentication; set \
             http.auth.token_file or http.tls.client_ca_file, or \
             http.insecure_allow_anonymous: true to serve anyone who reaches it"
        ),
    })
}

/// What the request at `path` with `method` (and `query`) asks, in ABAC's terms.
fn attributes(method: &Method, path: &str) -> Attributes {
    let readonly = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => (String::new(), rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => ((*group).to_owned(), rest),
        _ => {
            return Attributes::NonResource {
                path: path.to_owned(),
                readonly,
            }
        }
    };
    let (namespace, resource) = match rest {
        ["namespaces", ns, resource, ..] => ((*ns).to_owned(), (*resource).to_owned()),
        [resource, ..] => (String::new(), (*resource).to_owned()),
        [] => (String::new(), String::new()),
    };
    Attributes::Resource {
        api_group,
        namespace,
        resource,
        readonly,
    }
}

/// Middleware: authenticates and authorizes every request but the probes.
pub async fn check(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if matches!(path, "/healthz" | "/readyz") || !auth.enabled() {
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let certificate = request.extensions().get::<ClientCertificate>();
    let user = match auth.authenticate(certificate, header) {
        Ok(Some(user)) => user,
        Ok(None) => return next.run(request).await,
        Err(e) => return e.into_response(),
    };
    let asked = attributes(request.method(), path);
    if !auth.authorize(&user, &asked) {
        tracing::info!(user = %user.name, method = %request.method(), path, "API request forbidden by the policy");
        return ApiError::Forbidden(format!(
            "user {:?} may not do this: {} {path}",
            user.name,
            request.method()
        ))
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let tokens = "alice-token,alice,1001,\"viewers,ops\"\nbob-token,bob,1002\n# comment\n";
        let policy = concat!(
            r#"{"apiVersion":"abac.authorization.kubernetes.io/v1beta1","kind":"Policy","spec":{"user":"alice","namespace":"default","resource":"*","apiGroup":"*","readonly":true}}"#,
            "\n",
            r#"{"apiVersion":"abac.authorization.kubernetes.io/v1beta1","kind":"Policy","spec":{"group":"ops","nonResourcePath":"/metrics","readonly":true}}"#,
            "\n",
        );
        Auth {
            tokens: Some(parse_tokens(tokens).unwrap()),
            client_certificates: false,
            policy: Some(parse_policy(policy).unwrap()),
        }
    }

    #[test]
    fn tokens_name_users_and_their_groups() {
        let a = auth();
        let alice = a
            .authenticate(None, Some("Bearer alice-token"))
            .unwrap()
            .unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["viewers", "ops", AUTHENTICATED]);
        assert!(a.authenticate(None, None).is_err());
        assert!(a.authenticate(None, Some("Bearer nope")).is_err());
        assert!(a.authenticate(None, Some("Basic YWxpY2U6eA==")).is_err());
        assert!(parse_tokens("only-a-token\n").is_err());
    }

    #[test]
    fn a_client_certificate_is_taken_only_where_certificates_are_credentials() {
        let carol = ClientCertificate(User {
            name: "carol".into(),
            groups: vec!["ops".into(), AUTHENTICATED.into()],
        });
        let tokens_only = auth();
        assert!(
            tokens_only.authenticate(Some(&carol), None).is_err(),
            "a certificate no CA was configured for is no credential"
        );
        let both = Auth {
            client_certificates: true,
            ..auth()
        };
        let user = both.authenticate(Some(&carol), None).unwrap().unwrap();
        assert_eq!(user, carol.0);
        let certificates_only = Auth {
            tokens: None,
            client_certificates: true,
            policy: None,
        };
        assert!(certificates_only.enabled());
        assert!(certificates_only
            .authenticate(None, Some("Bearer alice-token"))
            .is_err());
    }

    #[test]
    fn the_policy_is_read_as_kube_apiserver_reads_abac() {
        let a = auth();
        let user = |t: &str| a.authenticate(None, Some(t)).unwrap().unwrap();
        let (alice, bob) = (user("Bearer alice-token"), user("Bearer bob-token"));
        let get = |path: &str| attributes(&Method::GET, path);
        assert!(a.authorize(&alice, &get("/api/v1/namespaces/default/pods")));
        assert!(a.authorize(
            &alice,
            &get("/apis/devices.kubeedge.io/v1beta1/namespaces/default/devicemodels/x")
        ));
        assert!(!a.authorize(&alice, &get("/api/v1/namespaces/kube-system/secrets")));
        assert!(
            !a.authorize(&alice, &get("/api/v1/pods")),
            "all namespaces is not default"
        );
        assert!(
            !a.authorize(
                &alice,
                &attributes(&Method::DELETE, "/api/v1/namespaces/default/pods/p")
            ),
            "read-only"
        );
        assert!(a.authorize(&alice, &get("/metrics")), "by group");
        assert!(!a.authorize(&bob, &get("/api/v1/namespaces/default/pods")));
        assert!(!a.authorize(&bob, &get("/metrics")));
    }

    #[test]
    fn anonymous_beyond_loopback_needs_the_operator_s_word() {
        let loopback: SocketAddr = "127.0.0.1:10550".parse().unwrap();
        let open: SocketAddr = "0.0.0.0:10550".parse().unwrap();
        let none = Auth::default();
        assert!(check_exposure(loopback, &none, false).is_ok());
        assert!(check_exposure(open, &none, false).is_err());
        assert!(check_exposure(open, &none, true).is_ok());
        assert!(check_exposure(open, &auth(), false).is_ok());
    }
}
