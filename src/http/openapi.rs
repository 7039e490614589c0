//! The OpenAPI v3 documents kubectl reads before it writes.
//!
//! kubectl validates an object either on the server, when the server's OpenAPI says its paths
//! take the `fieldValidation` parameter, or itself against the server's OpenAPI v2 schemas
//! (fetched as protobuf). This server has no schemas: every kind is kept as it comes, like a
//! custom resource that preserves unknown fields, and the cloud validates what it applies. So
//! each group and version's document names the write paths of its kinds with the parameter,
//! and under any `fieldValidation` no field is unknown. No v2 document is served.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::kinds;
use super::scope::ApiError;
use crate::store::Store;

/// `/openapi/v3`: a document for each group and version served.
pub async fn index(State(store): State<Store>) -> Result<Response, ApiError> {
    let mut paths = Map::new();
    for kind in kinds::all(&store).await? {
        let gv = group_version_path(&kind.group, &kind.version);
        paths
            .entry(gv.clone())
            .or_insert_with(|| json!({"serverRelativeURL": format!("/openapi/v3/{gv}")}));
    }
    Ok(Json(json!({ "paths": paths })).into_response())
}

/// `/openapi/v3/api/v1` and `/openapi/v3/apis/{group}/{version}`.
pub async fn document(
    State(store): State<Store>,
    Path(rest): Path<String>,
) -> Result<Response, ApiError> {
    let mut paths = Map::new();
    for kind in kinds::all(&store).await? {
        if group_version_path(&kind.group, &kind.version) != rest {
            continue;
        }
        let gvk = json!({"group": kind.group, "version": kind.version, "kind": kind.kind});
        let operation = json!({
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
        });
        let prefix = format!("/{rest}");
        let collection = match kind.namespaced {
            true => format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural),
            false => format!("{prefix}/{}", kind.plural),
        };
        paths.insert(collection.clone(), json!({"post": operation}));
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({"put": operation, "patch": operation}),
        );
    }
    if paths.is_empty() {
        return Err(ApiError::NoRoute);
    }
    Ok(Json(json!({
        "openapi": "3.0.0",
        "info": {"title": "MetaManager", "version": env!("CARGO_PKG_VERSION")},
        "paths": Value::Object(paths),
        // No schemas: `kubectl explain` finds none and says so, rather than failing to read
        // a document without them.
        "components": {"schemas": {}},
    }))
    .into_response())
}

/// `api/v1`, or `apis/{group}/{version}`: the document's name in the index.
fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}
