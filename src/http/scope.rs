//! What the Kubernetes-style API serves and how a request selects it: the kinds, the scope of
//! a list or watch, the objects as served, and the `Status` answer to a failure. Shared by the
//! request handlers ([`super::kube`]) and the watch streams ([`super::watch`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

pub use super::kinds::Kind;
use super::selector::{FieldSelector, LabelSelector};
use crate::cloud::refusal::Reason;
use crate::ops::api_write::WriteError;
use crate::resource::Resource;
use crate::store::read::{Range, Row};
use crate::store::{Store, StoreError};

/// How long a client told 429 waits before it tries again, as kube-apiserver says it.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// Whether list parameters ask for a watch (`watch=true` or `watch=1`, decoded, the last of
/// repeated ones): the one reading of it, for the handler and the request cap alike.
pub fn is_watch(params: &HashMap<String, String>) -> bool {
    params
        .get("watch")
        .is_some_and(|w| matches!(w.as_str(), "true" | "1"))
}

/// Why a request to the API failed; each becomes a Kubernetes `Status` answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{plural} {name:?} not found")]
    NotFound { plural: String, name: String },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{0} is not allowed here")]
    MethodNotAllowed(Method),
    /// A write whose object cannot be valid: kube-apiserver's 422.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    TooLarge(String),
    /// A write that was refused, failed, or was not answered: see [`crate::ops::api_write`].
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("reading the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("{plural} {name:?} is stored but is not JSON: {source}")]
    NotJson {
        plural: String,
        name: String,
        source: serde_json::Error,
    },
    /// A cap on concurrent requests or watches is reached: kube-apiserver's 429, which
    /// clients retry after `Retry-After`.
    #[error("{0}; try again later")]
    TooManyRequests(String),
    /// No or a wrong credential: see [`super::auth`].
    #[error("{0}")]
    Unauthorized(String),
    /// The request is not for this server: see [`super::host`].
    #[error("{0}")]
    Forbidden(String),
    /// The client accepts no type this API serves: see [`super::accept`].
    #[error("only application/json is served, and the request accepts only {0:?}")]
    NotAcceptable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, reason) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            ApiError::NotFound { .. } | ApiError::NoRoute => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            ApiError::Store(_) | ApiError::NotJson { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "InternalError")
            }
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            ApiError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, "NotAcceptable"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType")
            }
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge"),
            ApiError::Write(e) => write_status(e),
        };
        let details = match &self {
            ApiError::NotFound { plural, name } => Some(json!({"name": name, "kind": plural})),
            _ => None,
        };
        let details = match &self {
            ApiError::TooManyRequests(_) | ApiError::Write(WriteError::TooMany(_)) => {
                Some(json!({"retryAfterSeconds": RETRY_AFTER_SECONDS}))
            }
            _ => details,
        };
        let message = self.to_string();
        let body = status_object(code, reason, message.clone(), details);
        let mut response = (code, Json(body)).into_response();
        response.extensions_mut().insert(Refusal(message));
        if code == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// The code and reason of a failed write, as kube-apiserver gives them.
fn write_status(e: &WriteError) -> (StatusCode, &'static str) {
    match e {
        WriteError::Conflict {
            reason: Reason::AlreadyExists,
            ..
        } => (StatusCode::CONFLICT, "AlreadyExists"),
        WriteError::Conflict { .. } | WriteError::Modified { .. } => {
            (StatusCode::CONFLICT, "Conflict")
        }
        WriteError::NotFound { .. } => (StatusCode::NOT_FOUND, "NotFound"),
        WriteError::Cloud { .. } | WriteError::Store { .. } | WriteError::Failed { .. } => {
            (StatusCode::INTERNAL_SERVER_ERROR, "InternalError")
        }
        WriteError::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "InsufficientStorage"),
        WriteError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "Timeout"),
        WriteError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        WriteError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
        WriteError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid"),
    }
}

/// The message of an error answer, kept on the response for the log (see
/// [`super::write::log_refusals`]).
#[derive(Debug, Clone)]
pub struct Refusal(pub String);

/// Which objects a list or watch covers, and how they are filtered.
pub struct Scope {
    pub kind: Arc<Kind>,
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Scope {
    pub(super) fn new(
        kind: Arc<Kind>,
        namespace: Option<String>,
        params: &HashMap<String, String>,
    ) -> Result<Self, ApiError> {
        let param = |name: &str| params.get(name).map_or("", String::as_str);
        let labels = LabelSelector::parse(param("labelSelector")).map_err(ApiError::BadRequest)?;
        let fields = FieldSelector::parse(param("fieldSelector"), &kind.rtype)
            .map_err(ApiError::BadRequest)?;
        // A cluster-scoped kind has no namespace, whatever segment it is stored under.
        let namespace = namespace.filter(|_| kind.namespaced);
        Ok(Self {
            kind,
            namespace,
            labels,
            fields,
        })
    }

    /// Whether the key `key` is of this scope's kind and namespace (what can be told of an
    /// object whose value is not known).
    pub fn holds_key(&self, key: &str) -> bool {
        let Ok(resource) = Resource::parse(key) else {
            return false;
        };
        resource.rtype() == self.kind.rtype
            && (!self.kind.namespaced
                || self
                    .namespace
                    .as_deref()
                    .is_none_or(|want| want == resource.namespace()))
    }

    /// Whether the stored object `key` = `value` is in scope; `value` already parsed.
    pub fn matches(&self, key: &str, value: &Value) -> bool {
        let Ok(resource) = Resource::parse(key) else {
            return false;
        };
        let (ns, rtype) = (resource.namespace(), resource.rtype());
        let Some(name) = resource.name() else {
            return false;
        };
        if rtype != self.kind.rtype {
            return false;
        }
        let meta = &value["metadata"];
        let name = meta["name"].as_str().unwrap_or(name);
        let ns = if self.kind.namespaced {
            meta["namespace"].as_str().unwrap_or(ns)
        } else {
            ""
        };
        if self.namespace.as_deref().is_some_and(|want| want != ns) {
            return false;
        }
        self.fields.matches(name, ns, value) && self.labels.matches(meta["labels"].as_object())
    }

    /// Reads the objects in scope a page at a time, from after the key `after`.
    pub fn pager(&self, store: &Store, after: String) -> Pager {
        let range = match &self.namespace {
            Some(ns) => Range::InNamespace {
                namespace: ns.clone(),
                rtype: self.kind.rtype.to_owned(),
            },
            None => Range::OfType(self.kind.rtype.to_owned()),
        };
        Pager {
            store: store.clone(),
            range,
            after,
            done: false,
        }
    }
}

/// Rows read per page: enough that a page costs one read, few enough that a page of large
/// objects stays small (see also [`PAGE_BYTES`]).
const PAGE_ROWS: usize = 256;
/// Stored JSON read per page, at most (and one row at least).
pub const PAGE_BYTES: usize = 128 * 1024;

/// The objects of a scope, read a page at a time so that no list or watch holds the whole
/// store (50 lists of a 10 MB store at once would otherwise hold it 50 times, twice).
pub struct Pager {
    store: Store,
    range: Range,
    after: String,
    done: bool,
}

/// One page: the feed position read before it (every change up to there is in it), the last
/// key it read (in scope or not), and its stored rows.
pub struct Page {
    pub position: u64,
    pub last_key: Option<String>,
    pub rows: Vec<Row>,
}

impl Pager {
    /// The next page, or `None` once the range is read to its end.
    pub async fn next(&mut self) -> Result<Option<Page>, ApiError> {
        if self.done {
            return Ok(None);
        }
        let position = self.store.feed_position();
        let rows = self
            .store
            .page(
                self.range.clone(),
                self.after.clone(),
                PAGE_ROWS,
                PAGE_BYTES,
            )
            .await?;
        let last_key = rows.last().map(|r| r.key.clone());
        match &last_key {
            Some(k) => self.after.clone_from(k),
            None => self.done = true,
        }
        Ok(Some(Page {
            position,
            last_key,
            rows,
        }))
    }
}

impl Scope {
    /// The object as served when the stored `row` is in scope; `None` when it is not, or is
    /// not JSON (one bad row does not hide the others).
    pub fn served_if_matches(&self, row: &Row) -> Option<Value> {
        let value: Value = serde_json::from_str(&row.value).ok()?;
        self.matches(&row.key, &value)
            .then(|| served(&self.kind, value, row.version))
    }
}

/// An object as served: `kind` and `apiVersion` added only where the stored one lacks them,
/// and `metadata.resourceVersion` the node's `version` of it, the number of its last change
/// (see [`crate::store`]'s feed). The stored object, and so what edged and the cloud see over
/// MQTT, keeps the cloud's version.
pub fn served(kind: &Kind, mut value: Value, version: u64) -> Value {
    if let Some(obj) = value.as_object_mut() {
        obj.entry("kind").or_insert_with(|| json!(kind.kind));
        obj.entry("apiVersion")
            .or_insert_with(|| json!(kind.api_version()));
        let meta = obj.entry("metadata").or_insert_with(|| json!({}));
        if let Some(meta) = meta.as_object_mut() {
            meta.insert("resourceVersion".into(), json!(version.to_string()));
        }
    }
    value
}

/// A Kubernetes `Status` object, the body kubectl expects with every failure.
pub fn status_object(
    code: StatusCode,
    reason: &str,
    message: String,
    details: Option<Value>,
) -> Value {
    let mut s = Map::new();
    s.insert("kind".into(), json!("Status"));
    s.insert("apiVersion".into(), json!("v1"));
    s.insert("metadata".into(), json!({}));
    s.insert("status".into(), json!("Failure"));
    s.insert("message".into(), json!(message));
    s.insert("reason".into(), json!(reason));
    if let Some(d) = details {
        s.insert("details".into(), d);
    }
    s.insert("code".into(), json!(code.as_u16()));
    Value::Object(s)
}
