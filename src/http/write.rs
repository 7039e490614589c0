//! Create, update, patch and delete, and the `status` subresource: the request read and
//! checked as kube-apiserver would, then carried out by [`crate::ops::api_write`] (through the
//! cloud, or here for what the edge owns while the cloud is away).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::Method;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::kinds::Kind;
use super::scope::{served, status_object, ApiError, Refusal};
use super::target::{find_kind, Target};
use super::{versions, HttpState};
use crate::ops::api_write::{ApiWrite, Verb, Written};
use crate::resource::Resource;

type PathParams = Path<HashMap<String, String>>;
type QueryParams = Query<HashMap<String, String>>;

/// The kind a write's path names, once the request is one this server carries out.
async fn begin(
    state: &HttpState,
    path: HashMap<String, String>,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<(Target, Arc<Kind>), ApiError> {
    // A dry run would be carried out for real: the cloud is sent no such flag.
    if query.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return Err(dry_run_refused());
    }
    // What the cloud is sent must fit in one message, with room for its envelope.
    let most = state
        .ctx
        .writes
        .max_payload()
        .saturating_sub(ENVELOPE_BYTES);
    if body.len() > most {
        return Err(ApiError::TooLarge(format!(
            "the request body is {} bytes, more than the {most} bytes a write may carry (mqtt.max_payload_bytes less its envelope)",
            body.len()
        )));
    }
    let target = Target::from(path);
    let kind = find_kind(&state.ctx.store, &target).await?;
    Ok((target, kind))
}

/// Middleware: every write the API refuses is logged with its reason, whether the request
/// itself was refused (bad body, dry run, a cap) or the cloud refused the write. Reads that
/// fail are the client's to report.
pub async fn log_refusals(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    if matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    let code = response.status();
    if !code.is_client_error() && !code.is_server_error() {
        return response;
    }
    // axum's own body cap answers in plain text: given a Status like every other refusal.
    if code == StatusCode::PAYLOAD_TOO_LARGE && response.extensions().get::<Refusal>().is_none() {
        response = ApiError::TooLarge(
            "the request body is larger than a write may carry (mqtt.max_payload_bytes)".into(),
        )
        .into_response();
    }
    let reason = response
        .extensions()
        .get::<Refusal>()
        .map_or("", |r| r.0.as_str());
    tracing::info!(%method, %path, code = code.as_u16(), error = %reason, "API write refused");
    response
}

fn dry_run_refused() -> ApiError {
    ApiError::BadRequest(
        "dryRun is not supported by this server: the write would be carried out".into(),
    )
}

/// Room kept in a message for its header and route around the written content.
const ENVELOPE_BYTES: usize = 1024;

/// `POST` to a collection.
pub async fn create(
    State(state): State<HttpState>,
    Path(path): PathParams,
    Query(query): QueryParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (target, kind) = begin(&state, path, &query, &body).await?;
    // As kube-apiserver: a namespaced kind is created in a namespace, not across all.
    if kind.namespaced && target.namespace.is_none() {
        return Err(ApiError::MethodNotAllowed(axum::http::Method::POST));
    }
    let (mut object, namespace) = object_for(&kind, &target, &body)?;
    let name = match name_of(&object) {
        Some(name) => name,
        None => generate_name(&mut object)?,
    };
    let how = Writing::of(kind, Verb::Create, false);
    write_object(&state, &how, &namespace, &name, object).await
}

/// `PUT` of an object, or with `status` of its status.
pub async fn update(
    State(state): State<HttpState>,
    Path(path): PathParams,
    Query(query): QueryParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    replace(state, path, query, body, false).await
}

pub async fn update_status(
    State(state): State<HttpState>,
    Path(path): PathParams,
    Query(query): QueryParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    replace(state, path, query, body, true).await
}

async fn replace(
    state: HttpState,
    path: HashMap<String, String>,
    query: HashMap<String, String>,
    body: Bytes,
    status: bool,
) -> Result<Response, ApiError> {
    let (target, kind) = begin(&state, path, &query, &body).await?;
    let name = target.name.clone().unwrap_or_default();
    let (mut object, namespace) = object_for(&kind, &target, &body)?;
    match name_of(&object) {
        Some(given) if given != name => {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )))
        }
        Some(_) => {}
        None => {
            metadata(&mut object)?.insert("name".into(), json!(name));
        }
    }
    let how = Writing::of(kind, Verb::Update, status);
    write_object(&state, &how, &namespace, &name, object).await
}

/// The object a create or update sends, of the URL's kind and namespace, and that namespace.
fn object_for(
    kind: &Kind,
    target: &Target,
    body: &[u8],
) -> Result<(Map<String, Value>, String), ApiError> {
    let mut object = body_object(body)?;
    fill_kind(kind, &mut object)?;
    let namespace = fill_namespace(kind, target, &mut object)?;
    Ok((object, namespace))
}

/// What a write does, and to which kind: `status`, only to the status of its object.
struct Writing {
    kind: Arc<Kind>,
    verb: Verb,
    status: bool,
}

impl Writing {
    fn of(kind: Arc<Kind>, verb: Verb, status: bool) -> Self {
        Self { kind, verb, status }
    }
}

/// Writes `object` as `name` in `namespace`.
async fn write_object(
    state: &HttpState,
    how: &Writing,
    namespace: &str,
    name: &str,
    object: Map<String, Value>,
) -> Result<Response, ApiError> {
    let resource = resource(state, &how.kind, namespace, name).await?;
    let content = Value::Object(object).to_string();
    run(state, how, resource, content).await
}

/// `PATCH` of an object, or with `status` of its status.
pub async fn patch(
    State(state): State<HttpState>,
    Path(path): PathParams,
    Query(query): QueryParams,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = PatchRequest {
        path,
        query,
        headers,
        body,
    };
    patch_object(state, request, false).await
}

pub async fn patch_status(
    State(state): State<HttpState>,
    Path(path): PathParams,
    Query(query): QueryParams,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = PatchRequest {
        path,
        query,
        headers,
        body,
    };
    patch_object(state, request, true).await
}

/// A `PATCH` request, as received.
struct PatchRequest {
    path: HashMap<String, String>,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
}

/// The patch types kube-apiserver takes, as the patch contents the cloud is sent: a merge
/// patch (an object) or a JSON Patch (an array). A strategic merge patch is sent as it is,
/// read as a merge patch, when that means the same (see [`not_a_merge_patch`]).
async fn patch_object(
    state: HttpState,
    request: PatchRequest,
    status: bool,
) -> Result<Response, ApiError> {
    let PatchRequest {
        path,
        query,
        headers,
        body,
    } = request;
    let (target, kind) = begin(&state, path, &query, &body).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    const TYPES: [&str; 3] = [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
    ];
    if !TYPES.contains(&content_type.as_str()) {
        return Err(ApiError::UnsupportedMediaType(format!(
            "the patch type {content_type:?} is not supported; use application/merge-patch+json, application/strategic-merge-patch+json or application/json-patch+json"
        )));
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the patch is not JSON: {e}")))?;
    match (content_type.as_str(), value.is_object()) {
        ("application/merge-patch+json", true) => {}
        ("application/json-patch+json", false) if value.is_array() => {}
        ("application/strategic-merge-patch+json", true) => {
            if let Some(what) = not_a_merge_patch(&value, &kind.rtype) {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "this strategic merge patch has {what}, which only the lists of a pod's or node's status may have here; send a JSON Patch (application/json-patch+json), or a merge patch (application/merge-patch+json) to replace lists whole"
                )));
            }
        }
        ("application/merge-patch+json" | "application/strategic-merge-patch+json", false) => {
            return Err(ApiError::BadRequest(
                "a merge patch must be a JSON object".into(),
            ))
        }
        _ => {
            return Err(ApiError::BadRequest(
                "a JSON Patch must be a JSON array".into(),
            ))
        }
    }
    let namespace = target.namespace_of(&kind);
    let name = target.name.as_deref().unwrap_or_default();
    let resource = resource(&state, &kind, &namespace, name).await?;
    let how = Writing::of(kind, Verb::Patch, status);
    run(&state, &how, resource, value.to_string()).await
}

/// `DELETE` of an object; the `DeleteOptions` body's `preconditions.uid`, if any, goes with it.
pub async fn delete(
    State(state): State<HttpState>,
    Path(path): PathParams,
    Query(query): QueryParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (target, kind) = begin(&state, path, &query, &body).await?;
    let options = match body.iter().any(|b| !b.is_ascii_whitespace()) {
        true => serde_json::from_slice::<Value>(&body)
            .map_err(|e| ApiError::BadRequest(format!("the DeleteOptions are not JSON: {e}")))?,
        false => Value::Null,
    };
    // kubectl sends a delete's dry run in its options, not in the URL.
    if options
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|d| !d.is_empty())
    {
        return Err(dry_run_refused());
    }
    let namespace = target.namespace_of(&kind);
    let name = target.name.as_deref().unwrap_or_default();
    let resource = resource(&state, &kind, &namespace, name).await?;
    if let Some(named) = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        let stored = state.ctx.store.get_row(resource.key()).await?;
        versions::check(resource.key(), named, stored.as_ref())?;
    }
    let uid = options
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let content = match uid {
        Some(uid) => json!({"metadata": {"uid": uid}}).to_string(),
        None => "null".to_owned(),
    };
    let how = Writing::of(kind, Verb::Delete, false);
    run(&state, &how, resource, content).await
}

/// Carries out the write and answers as kube-apiserver: 201 with the object for a create, 200
/// with it otherwise, a success Status for an object that is gone. A version the write names
/// is the node's, checked and translated for the cloud ([`versions`]).
async fn run(
    state: &HttpState,
    how: &Writing,
    resource: Resource,
    content: String,
) -> Result<Response, ApiError> {
    let Writing { kind, verb, status } = how;
    let (verb, status) = (*verb, *status);
    let name = resource.name().unwrap_or_default().to_owned();
    let key = resource.key().to_owned();
    let content = if content.contains("resourceVersion") {
        let stored = state.ctx.store.get_row(&key).await?;
        versions::translate(verb, &key, content, stored.as_ref())?
    } else {
        content
    };
    let write = ApiWrite {
        verb,
        resource,
        content,
        status,
        // Moved into the write, which may outlive this request (a client that hangs up).
        hold: Some(state.caps.write()?),
    };
    let written = state.ctx.writes.write(write).await?;
    let code = match verb {
        Verb::Create => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    match written {
        Written::Object(text) => {
            // As a read would serve it now, with its version; an object that is not stored
            // (an event) with the version the node is at.
            let (text, version) = match state.ctx.store.get_row(&key).await? {
                Some(row) => (row.value, row.version),
                None => (text, state.ctx.store.feed_position()),
            };
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            Ok((code, Json(served(kind, value, version))).into_response())
        }
        Written::Done => {
            let mut body = status_object(
                StatusCode::OK,
                "",
                String::new(),
                Some(json!({"name": name, "kind": kind.plural})),
            );
            body["status"] = json!("Success");
            if let Some(object) = body.as_object_mut() {
                object.remove("reason");
                object.remove("message");
            }
            Ok((StatusCode::OK, Json(body)).into_response())
        }
    }
}

fn body_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!("the body is not JSON: {e}"))),
    }
}

/// `apiVersion` and `kind` as the URL says, filled in when absent.
fn fill_kind(kind: &Kind, object: &mut Map<String, Value>) -> Result<(), ApiError> {
    for (field, want) in [
        ("apiVersion", kind.api_version()),
        ("kind", kind.kind.clone()),
    ] {
        match object.get(field).and_then(Value::as_str) {
            Some(given) if given != want => {
                return Err(ApiError::BadRequest(format!(
                    "the object's {field} is {given:?}, but the URL is for {want:?}"
                )))
            }
            Some(_) => {}
            None => {
                object.insert(field.into(), json!(want));
            }
        }
    }
    Ok(())
}

fn metadata(object: &mut Map<String, Value>) -> Result<&mut Map<String, Value>, ApiError> {
    object
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("metadata must be an object".into()))
}

/// The namespace the object is stored under: the URL's, which the object's must equal (and is
/// set to when absent); a cluster-scoped kind's objects are stored under `default`.
fn fill_namespace(
    kind: &Kind,
    target: &Target,
    object: &mut Map<String, Value>,
) -> Result<String, ApiError> {
    let namespace = target.namespace_of(kind);
    let meta = metadata(object)?;
    if !kind.namespaced {
        // As kube-apiserver: a cluster-scoped object has no namespace.
        meta.remove("namespace");
        return Ok(namespace);
    }
    match meta.get("namespace").and_then(Value::as_str) {
        Some(given) if given != namespace => Err(ApiError::BadRequest(format!(
            "the namespace of the object ({given}) does not match the namespace on the URL ({namespace})"
        ))),
        Some(_) => Ok(namespace),
        None => {
            meta.insert("namespace".into(), json!(namespace));
            Ok(namespace)
        }
    }
}

fn name_of(object: &Map<String, Value>) -> Option<String> {
    object
        .get("metadata")?
        .get("name")?
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

/// A name from `metadata.generateName` and five random characters, as kube-apiserver makes.
fn generate_name(object: &mut Map<String, Value>) -> Result<String, ApiError> {
    let meta = metadata(object)?;
    let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
        return Err(ApiError::Invalid(
            "metadata.name or metadata.generateName is required".into(),
        ));
    };
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let random = uuid::Uuid::new_v4();
    let suffix: String = random.as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    let name = format!("{prefix}{suffix}");
    meta.insert("name".into(), json!(name));
    Ok(name)
}

/// The key written: in the namespace for a namespaced kind; for a cluster-scoped one, the key
/// the object is stored under, whatever its namespace segment, else `default`.
async fn resource(
    state: &HttpState,
    kind: &Kind,
    namespace: &str,
    name: &str,
) -> Result<Resource, ApiError> {
    let invalid = |e: crate::resource::ResourceError| {
        ApiError::Invalid(format!("{} {name:?}: {e}", kind.plural))
    };
    if !kind.namespaced {
        if let Some(row) = state.ctx.store.cluster_object(&kind.rtype, name).await? {
            return Resource::parse(&row.key).map_err(invalid);
        }
    }
    Resource::object(namespace, &kind.rtype, name).map_err(invalid)
}

/// Why a strategic merge patch of a `rtype` object cannot be sent as a merge patch, if it
/// cannot: the cloud applies a `patch` as a merge patch with the keyed status lists of pods
/// and nodes merged by key ([`crate::patch`]), so a list anywhere else would replace the
/// whole list where the client meant to merge into it, and a directive anywhere else would be
/// stored as a field.
fn not_a_merge_patch(value: &Value, rtype: &str) -> Option<String> {
    let Value::Object(top) = value else {
        return None;
    };
    let keyed: Vec<&str> = crate::patch::keyed_status_lists(rtype).collect();
    for (field, value) in top {
        if let ("status", Value::Object(status)) = (field.as_str(), value) {
            for (field, value) in status {
                let list = field.strip_prefix("$setElementOrder/").unwrap_or(field);
                if keyed.contains(&list) {
                    continue;
                }
                if let Some(why) = plain(value, &format!("status.{field}"), field) {
                    return Some(why);
                }
            }
            continue;
        }
        if let Some(why) = plain(value, field, field) {
            return Some(why);
        }
    }
    None
}

/// Why `value`, at `at` under the key `key`, is not plain merge patch content: a list, or a
/// `$` directive.
fn plain(value: &Value, at: &str, key: &str) -> Option<String> {
    if key.starts_with('$') {
        return Some(format!("the directive {at:?}"));
    }
    match value {
        Value::Array(_) => Some(format!("the list {at}")),
        Value::Object(fields) => fields
            .iter()
            .find_map(|(k, v)| plain(v, &format!("{at}.{k}"), k)),
        _ => None,
    }
}
