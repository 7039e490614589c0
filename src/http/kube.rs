//! A read-only subset of the Kubernetes API over the local store, enough for `kubectl get`
//! (and `kubectl get -w`) pointed at the node: discovery, get, list and watch of the stored
//! pods, configmaps, secrets, nodes, services and endpoints.
//!
//! Objects are served exactly as stored, so what kubectl shows is what edged would be given.
//! Writes belong to the cloud and arrive over MQTT; every write method here is refused.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::selector::{FieldSelector, LabelSelector};
use super::{watch, HttpState};
use crate::node::Node;
use crate::store::StoreError;

/// One kind of object the API serves.
#[derive(Debug)]
pub struct Kind {
    /// The URL segment: `pods`.
    pub plural: &'static str,
    /// The store's `type` column, which is also kube's singular name: `pod`.
    pub rtype: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

/// Every kind served, in discovery order.
pub const KINDS: &[Kind] = &[
    Kind {
        plural: "pods",
        rtype: "pod",
        kind: "Pod",
        namespaced: true,
    },
    Kind {
        plural: "configmaps",
        rtype: "configmap",
        kind: "ConfigMap",
        namespaced: true,
    },
    Kind {
        plural: "secrets",
        rtype: "secret",
        kind: "Secret",
        namespaced: true,
    },
    Kind {
        plural: "nodes",
        rtype: "node",
        kind: "Node",
        namespaced: false,
    },
    Kind {
        plural: "services",
        rtype: "service",
        kind: "Service",
        namespaced: true,
    },
    Kind {
        plural: "endpoints",
        rtype: "endpoints",
        kind: "Endpoints",
        namespaced: true,
    },
];

fn kind_of(plural: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.plural == plural)
}

/// The routes of the API: discovery, objects, and a Status answer to every write method.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api", get(api_versions).fallback(not_allowed))
        .route("/apis", get(api_groups).fallback(not_allowed))
        .route("/api/v1", get(resources).fallback(not_allowed))
        .route(
            "/api/v1/namespaces/:ns/:plural",
            get(list_in_namespace).fallback(not_allowed),
        )
        .route(
            "/api/v1/namespaces/:ns/:plural/:name",
            get(get_in_namespace).fallback(not_allowed),
        )
        .route("/api/v1/:plural", get(list_all).fallback(not_allowed))
        .route(
            "/api/v1/:plural/:name",
            get(get_cluster).fallback(not_allowed),
        )
}

async fn api_versions(headers: axum::http::HeaderMap) -> Response {
    // The address clients were told to use is the one they reached us on.
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:10550")
        .to_owned();
    Json(json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
    }))
    .into_response()
}

async fn api_groups() -> Response {
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})).into_response()
}

async fn resources() -> Response {
    let list: Vec<Value> = KINDS
        .iter()
        .map(|k| {
            json!({
                "name": k.plural,
                "singularName": k.rtype,
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "v1",
        "resources": list,
    }))
    .into_response()
}

/// Why a request to the API failed; each becomes a Kubernetes `Status` answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{plural} {name:?} not found")]
    NotFound { plural: &'static str, name: String },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{0} is not allowed: this API is read-only; changes come from the cloud")]
    MethodNotAllowed(Method),
    #[error("reading the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("{plural} {name:?} is stored but is not JSON: {source}")]
    NotJson {
        plural: &'static str,
        name: String,
        source: serde_json::Error,
    },
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
        };
        let details = match &self {
            ApiError::NotFound { plural, name } => Some(json!({"name": name, "kind": plural})),
            _ => None,
        };
        let body = status_object(code, reason, self.to_string(), details);
        (code, Json(body)).into_response()
    }
}

/// Which objects a list or watch covers, and how they are filtered.
pub struct Scope {
    pub kind: &'static Kind,
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Scope {
    fn new(
        kind: &'static Kind,
        namespace: Option<String>,
        params: &HashMap<String, String>,
    ) -> Result<Self, ApiError> {
        let param = |name: &str| params.get(name).map_or("", String::as_str);
        let labels = LabelSelector::parse(param("labelSelector")).map_err(ApiError::BadRequest)?;
        let fields = FieldSelector::parse(param("fieldSelector")).map_err(ApiError::BadRequest)?;
        // A cluster-scoped kind has no namespace, whatever segment it is stored under.
        let namespace = namespace.filter(|_| kind.namespaced);
        Ok(Self {
            kind,
            namespace,
            labels,
            fields,
        })
    }

    /// Whether the stored object `key` = `value` is in scope; `value` already parsed.
    pub fn matches(&self, key: &str, value: &Value) -> bool {
        let mut parts = key.splitn(3, '/');
        let (Some(ns), Some(rtype), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
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
        self.fields.matches(name, ns) && self.labels.matches(meta["labels"].as_object())
    }

    /// The stored objects in scope, in key order, as served (kind and apiVersion filled in).
    /// A stored value that is not JSON is skipped: one bad row does not hide the others.
    pub async fn current(&self, node: &Node) -> Result<Vec<Value>, ApiError> {
        let rows = match &self.namespace {
            Some(ns) => node.store.list(ns, self.kind.rtype).await,
            None => node.store.list_type(self.kind.rtype).await,
        }?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, text)| {
                let value: Value = serde_json::from_str(&text).ok()?;
                self.matches(&key, &value).then(|| served(self.kind, value))
            })
            .collect())
    }
}

/// An object as served: `kind` and `apiVersion` added only where the stored one lacks them.
pub fn served(kind: &Kind, mut value: Value) -> Value {
    if let Some(obj) = value.as_object_mut() {
        obj.entry("kind").or_insert_with(|| json!(kind.kind));
        obj.entry("apiVersion").or_insert_with(|| json!("v1"));
    }
    value
}

type Params = Query<HashMap<String, String>>;

async fn list_in_namespace(
    State(state): State<HttpState>,
    Path((ns, plural)): Path<(String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    list(state, &plural, Some(ns), params).await
}

async fn list_all(
    State(state): State<HttpState>,
    Path(plural): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    list(state, &plural, None, params).await
}

/// A list, or with `watch=true` a watch, of one kind.
async fn list(
    state: HttpState,
    plural: &str,
    namespace: Option<String>,
    params: HashMap<String, String>,
) -> Result<Response, ApiError> {
    let kind = kind_of(plural).ok_or(ApiError::NoRoute)?;
    let scope = Scope::new(kind, namespace, &params)?;
    if params
        .get("watch")
        .is_some_and(|w| matches!(w.as_str(), "true" | "1"))
    {
        // Without a version the watcher has not listed, so it is first told what exists.
        let version = match params.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "resourceVersion {v:?} is not a version this server gave out"
                ))
            })?),
        };
        return watch::respond(state.node, state.stop, scope, version).await;
    }
    // Read before the list, so that the list holds every change up to this version.
    let version = state.node.store.feed_position().to_string();
    let items = scope.current(&state.node).await?;
    Ok(Json(json!({
        "kind": format!("{}List", kind.kind),
        "apiVersion": "v1",
        "metadata": {"resourceVersion": version},
        "items": items,
    }))
    .into_response())
}

async fn get_in_namespace(
    State(node): State<Arc<Node>>,
    Path((ns, plural, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let kind = kind_of(&plural)
        .filter(|k| k.namespaced)
        .ok_or(ApiError::NoRoute)?;
    match node
        .store
        .get(&format!("{ns}/{}/{name}", kind.rtype))
        .await?
    {
        Some(text) => object(kind, name, &text),
        None => Err(ApiError::NotFound {
            plural: kind.plural,
            name,
        }),
    }
}

/// `/api/v1/nodes/{name}`: a node may be stored under any namespace segment.
async fn get_cluster(
    State(node): State<Arc<Node>>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let kind = kind_of(&plural)
        .filter(|k| !k.namespaced)
        .ok_or(ApiError::NoRoute)?;
    let rows = node.store.list_type(kind.rtype).await?;
    let found = rows.into_iter().find(|(key, text)| {
        let stored_name = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["metadata"]["name"].as_str().map(str::to_owned));
        stored_name
            .as_deref()
            .unwrap_or(key.rsplit('/').next().unwrap_or_default())
            == name
    });
    match found {
        Some((_, text)) => object(kind, name, &text),
        None => Err(ApiError::NotFound {
            plural: kind.plural,
            name,
        }),
    }
}

fn object(kind: &'static Kind, name: String, text: &str) -> Result<Response, ApiError> {
    let value = serde_json::from_str::<Value>(text).map_err(|source| ApiError::NotJson {
        plural: kind.plural,
        name,
        source,
    })?;
    Ok(Json(served(kind, value)).into_response())
}

async fn not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method)
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
