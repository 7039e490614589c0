//! Create, update, patch and delete, and the `status` subresource: the request read and
//! checked as kube-apiserver would, then carried out by [`crate::ops::api_write`] (through the
//! cloud, or here for what the edge owns while the cloud is away).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::kinds::Kind;
use super::kube::{find_kind, Target};
use super::scope::{served, status_object, ApiError};
use super::HttpState;
use crate::ops::api_write::{self, ApiWrite, Verb, Written};
use crate::resource::Resource;

type PathParams = Path<std::collections::HashMap<String, String>>;

/// `POST` to a collection.
pub async fn create(
    State(state): State<HttpState>,
    Path(path): PathParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    let target = Target::from(path);
    let kind = find_kind(&state.ctx.store, &target).await?;
    // As kube-apiserver: a namespaced kind is created in a namespace, not across all.
    if kind.namespaced && target.namespace.is_none() {
        return Err(ApiError::MethodNotAllowed(axum::http::Method::POST));
    }
    let mut object = body_object(&body)?;
    fill_kind(&kind, &mut object)?;
    let namespace = fill_namespace(&kind, &target, &mut object)?;
    let name = match name_of(&object) {
        Some(name) => name,
        None => generate_name(&mut object)?,
    };
    let resource = resource(&kind, &namespace, &name)?;
    let content = Value::Object(object).to_string();
    run(&state, &kind, Verb::Create, resource, content, false).await
}

/// `PUT` of an object, or with `status` of its status.
pub async fn update(
    state: State<HttpState>,
    Path(path): PathParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    replace(state, path, body, false).await
}

pub async fn update_status(
    state: State<HttpState>,
    Path(path): PathParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    replace(state, path, body, true).await
}

async fn replace(
    State(state): State<HttpState>,
    path: std::collections::HashMap<String, String>,
    body: Bytes,
    status: bool,
) -> Result<Response, ApiError> {
    let target = Target::from(path);
    let kind = find_kind(&state.ctx.store, &target).await?;
    let name = target.name.clone().unwrap_or_default();
    let mut object = body_object(&body)?;
    fill_kind(&kind, &mut object)?;
    let namespace = fill_namespace(&kind, &target, &mut object)?;
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
    let resource = resource(&kind, &namespace, &name)?;
    let content = Value::Object(object).to_string();
    run(&state, &kind, Verb::Update, resource, content, status).await
}

/// `PATCH` of an object, or with `status` of its status.
pub async fn patch(
    state: State<HttpState>,
    Path(path): PathParams,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    patch_object(state, path, headers, body, false).await
}

pub async fn patch_status(
    state: State<HttpState>,
    Path(path): PathParams,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    patch_object(state, path, headers, body, true).await
}

/// The patch types kube-apiserver takes, as the patch contents the cloud is sent: a merge
/// patch (an object) or a JSON Patch (an array). A strategic merge patch is sent as a merge
/// patch: the lists Kubernetes merges by key in a pod's or node's status are merged by key
/// either way (see [`strategic_to_merge`] for its directives); other lists are replaced.
async fn patch_object(
    State(state): State<HttpState>,
    path: std::collections::HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
    status: bool,
) -> Result<Response, ApiError> {
    let target = Target::from(path);
    let kind = find_kind(&state.ctx.store, &target).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the patch is not JSON: {e}")))?;
    match (content_type.as_str(), value.is_object()) {
        ("application/merge-patch+json", true) => {}
        ("application/json-patch+json", false) if value.is_array() => {}
        ("application/strategic-merge-patch+json", true) => {
            if let Some(directive) = strategic_to_merge(&mut value, false) {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "the strategic merge patch directive {directive:?} is not supported; send a merge patch (application/merge-patch+json) or a JSON Patch"
                )));
            }
        }
        ("application/merge-patch+json" | "application/strategic-merge-patch+json", false) => {
            return Err(ApiError::BadRequest("a merge patch must be a JSON object".into()))
        }
        ("application/json-patch+json", _) => {
            return Err(ApiError::BadRequest("a JSON Patch must be a JSON array".into()))
        }
        (other, _) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the patch type {other:?} is not supported; use application/merge-patch+json, application/strategic-merge-patch+json or application/json-patch+json"
            )))
        }
    }
    let namespace = target.namespace_of(&kind);
    let resource = resource(
        &kind,
        &namespace,
        target.name.as_deref().unwrap_or_default(),
    )?;
    run(
        &state,
        &kind,
        Verb::Patch,
        resource,
        value.to_string(),
        status,
    )
    .await
}

/// `DELETE` of an object; the `DeleteOptions` body's `preconditions.uid`, if any, goes with it.
pub async fn delete(
    State(state): State<HttpState>,
    Path(path): PathParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    let target = Target::from(path);
    let kind = find_kind(&state.ctx.store, &target).await?;
    let uid = match body.iter().any(|b| !b.is_ascii_whitespace()) {
        true => serde_json::from_slice::<Value>(&body)
            .map_err(|e| ApiError::BadRequest(format!("the DeleteOptions are not JSON: {e}")))?
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned),
        false => None,
    };
    let content = match uid {
        Some(uid) => json!({"metadata": {"uid": uid}}).to_string(),
        None => "null".to_owned(),
    };
    let namespace = target.namespace_of(&kind);
    let resource = resource(
        &kind,
        &namespace,
        target.name.as_deref().unwrap_or_default(),
    )?;
    run(&state, &kind, Verb::Delete, resource, content, false).await
}

/// Carries out the write and answers as kube-apiserver: 201 with the object for a create, 200
/// with it otherwise, a success Status for an object that is gone.
async fn run(
    state: &HttpState,
    kind: &Arc<Kind>,
    verb: Verb,
    resource: Resource,
    content: String,
    status: bool,
) -> Result<Response, ApiError> {
    let name = resource.name().unwrap_or_default().to_owned();
    let key = resource.key().to_owned();
    let write = ApiWrite {
        verb,
        resource,
        content,
        status,
    };
    let written = match api_write::write(&state.ctx.ops, write).await {
        Ok(written) => written,
        Err(e) => {
            tracing::info!(resource = %key, ?verb, error = %e, "API write refused");
            return Err(e.into());
        }
    };
    let code = match verb {
        Verb::Create => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    match written {
        Written::Object(text) => {
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            Ok((code, Json(served(kind, value))).into_response())
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
    if !kind.namespaced {
        return Ok(namespace);
    }
    let meta = metadata(object)?;
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

fn resource(kind: &Kind, namespace: &str, name: &str) -> Result<Resource, ApiError> {
    Resource::object(namespace, &kind.rtype, name)
        .map_err(|e| ApiError::Invalid(format!("{} {name:?}: {e}", kind.plural)))
}

/// A strategic merge patch made a merge patch: `$setElementOrder` lists dropped (order is
/// all they say), `$patch` kept in list entries (the keyed status lists act on it); any other
/// directive is returned, to be refused.
fn strategic_to_merge(value: &mut Value, in_list: bool) -> Option<String> {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with("$setElementOrder/"));
            for (k, v) in map.iter_mut() {
                if k.starts_with('$') && !(in_list && k == "$patch") {
                    return Some(k.clone());
                }
                if let Some(found) = strategic_to_merge(v, false) {
                    return Some(found);
                }
            }
            None
        }
        Value::Array(items) => items.iter_mut().find_map(|v| strategic_to_merge(v, true)),
        _ => None,
    }
}
