//! The Kubernetes API over the local store, enough for kubectl and client libraries pointed at
//! the node: discovery, get, list and watch of the core kinds and of every other kind the
//! store holds, under its own group and version ([`super::kinds`]), and the routes of the
//! writes ([`super::write`]).
//!
//! Objects are served as stored, so what kubectl shows is what edged would be given, except
//! `metadata.resourceVersion`: the node's number of the object's last change (see
//! [`crate::store`]'s feed), the one version space informers need.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use std::sync::Arc;

use super::kinds::Kind;
use super::scope::{is_watch, served, ApiError, Scope};
use super::target::{find_kind, Target};
use super::{discovery, list_page, table, watch, write, HttpState};
use crate::store::read::Row;
use crate::store::Store;

/// Discovery; get, list and watch of every kind, core (`/api/v1`) and grouped
/// (`/apis/{group}/{version}`); and the writes of [`super::write`].
pub fn routes() -> Router<HttpState> {
    let mut router = Router::new()
        .route("/version", get(discovery::version).fallback(not_allowed))
        .route("/api", get(discovery::api).fallback(not_allowed))
        .route("/apis", get(discovery::apis).fallback(not_allowed))
        .route(
            "/api/v1",
            get(discovery::core_resources).fallback(not_allowed),
        )
        .route(
            "/apis/:group/:version",
            get(discovery::group_resources).fallback(not_allowed),
        );
    for prefix in ["/api/v1", "/apis/:group/:version"] {
        for scope in ["/namespaces/:ns", ""] {
            let collection = format!("{prefix}{scope}/:plural");
            let object = format!("{collection}/:name");
            let status = format!("{object}/status");
            router = router
                .route(
                    &collection,
                    get(list_objects).post(write::create).fallback(not_allowed),
                )
                .route(
                    &object,
                    get(get_object)
                        .put(write::update)
                        .patch(write::patch)
                        .delete(write::delete)
                        .fallback(not_allowed),
                )
                .route(
                    &status,
                    get(get_object)
                        .put(write::update_status)
                        .patch(write::patch_status)
                        .fallback(not_allowed),
                );
        }
    }
    router.layer(axum::middleware::from_fn(super::accept::json_only))
}

type Params = Query<HashMap<String, String>>;

/// A list, or a watch, of one kind in one namespace or all.
async fn list_objects(
    State(state): State<HttpState>,
    Path(path): Path<HashMap<String, String>>,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let target = Target::from(path);
    let kind = find_kind(&state.ctx.store, &target).await?;
    list(
        state,
        kind,
        target.namespace,
        params,
        table::wanted(&headers),
    )
    .await
}

/// A list, or with `watch=true` a watch, of one kind; with `as_table`, as a Table.
async fn list(
    state: HttpState,
    kind: Arc<Kind>,
    namespace: Option<String>,
    params: HashMap<String, String>,
    as_table: bool,
) -> Result<Response, ApiError> {
    let scope = Scope::new(kind, namespace, &params)?;
    if is_watch(&params) {
        let permit = state.caps.watch()?;
        let start = watch_start(&params, state.ctx.store.feed_position())?;
        let timeout = number(&params, "timeoutSeconds", "a whole number")?;
        let options = watch::WatchOptions {
            start,
            bookmarks: params
                .get("allowWatchBookmarks")
                .is_some_and(|b| matches!(b.as_str(), "true" | "1")),
            timeout: timeout.map(std::time::Duration::from_secs),
            table: as_table,
        };
        return watch::respond(state.ctx.store.clone(), state.stop, scope, options, permit).await;
    }
    let limit = number(&params, "limit", "a non-negative whole number")?;
    let (version, after) = match params.get("continue").filter(|t| !t.is_empty()) {
        Some(token) => list_page::resume(token)?,
        // Read before the list, so that the list holds every change up to this version.
        None => (state.ctx.store.feed_position(), String::new()),
    };
    let mut pager = scope.pager(&state.ctx.store, after);
    // The first page is read before the answer starts, so a store that cannot be read is
    // an error status, not a cut-off body.
    let first = pager.next().await?;
    let answer = list_page::Answer {
        version,
        limit,
        table: as_table,
    };
    Ok(list_page::stream(scope, pager, first, answer))
}

/// Where a watch starts, from `resourceVersion`, `sendInitialEvents` and
/// `resourceVersionMatch`, checked as kube-apiserver checks them; `position` is the node's
/// version now.
fn watch_start(params: &HashMap<String, String>, position: u64) -> Result<watch::Start, ApiError> {
    let param = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let version = match param("resourceVersion") {
        None | Some("0") => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "resourceVersion {v:?} is not a version this server gave out"
            ))
        })?),
    };
    let initial_events = match param("sendInitialEvents") {
        None => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "sendInitialEvents {other:?} is neither true nor false"
            )))
        }
    };
    match (initial_events, param("resourceVersionMatch")) {
        (Some(_), Some("NotOlderThan")) | (None, None) => {}
        (Some(_), _) => {
            return Err(ApiError::Invalid(
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(ApiError::Invalid(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"
                    .into(),
            ))
        }
    }
    Ok(match (initial_events, version) {
        // The current objects are as new as any version given out, whatever it was.
        (Some(true), Some(v)) if v > position => watch::Start::After(v),
        (Some(true), _) => watch::Start::Streaming,
        // No initial events: from the version, or from now.
        (Some(false), None) => watch::Start::After(position),
        (Some(false), Some(v)) | (None, Some(v)) => watch::Start::After(v),
        // Without a version the watcher has not listed, so it is first told what exists.
        (None, None) => watch::Start::Listing,
    })
}

/// One object (also as its `status` subresource, which is the whole object).
async fn get_object(
    State(store): State<Store>,
    Path(path): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let target = Target::from(path);
    let kind = find_kind(&store, &target).await?;
    let name = target.name.unwrap_or_default();
    let as_table = table::wanted(&headers);
    match target.namespace {
        Some(ns) => get_in_namespace(&store, kind, &ns, name, as_table).await,
        None => get_cluster(&store, kind, name, as_table).await,
    }
}

async fn get_in_namespace(
    store: &Store,
    kind: Arc<Kind>,
    ns: &str,
    name: String,
    as_table: bool,
) -> Result<Response, ApiError> {
    match store
        .get_row(&format!("{ns}/{}/{name}", kind.rtype))
        .await?
    {
        Some(row) => object(&kind, name, &row, as_table),
        None => Err(ApiError::NotFound {
            plural: kind.plural.clone(),
            name,
        }),
    }
}

/// A cluster-scoped object may be stored under any namespace segment (`default/node/n`).
async fn get_cluster(
    store: &Store,
    kind: Arc<Kind>,
    name: String,
    as_table: bool,
) -> Result<Response, ApiError> {
    match store.cluster_object(&kind.rtype, &name).await? {
        Some(row) => object(&kind, name, &row, as_table),
        None => Err(ApiError::NotFound {
            plural: kind.plural.clone(),
            name,
        }),
    }
}

/// The number a query parameter gives, parsed once here for every parameter that takes one:
/// none when the parameter is absent, empty or `0`, which clients send for "not set".
fn number<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("") | Some("0") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} {v:?} is not {what}"))),
    }
}

/// One stored object as served, or with `as_table` as a Table of one row.
fn object(kind: &Kind, name: String, row: &Row, as_table: bool) -> Result<Response, ApiError> {
    let value = serde_json::from_str::<Value>(&row.value).map_err(|source| ApiError::NotJson {
        plural: kind.plural.clone(),
        name,
        source,
    })?;
    let value = served(kind, value, row.version);
    if as_table {
        let cells = table::row(kind, &value, std::time::SystemTime::now());
        let metadata = json!({"resourceVersion": row.version.to_string()});
        return Ok(Json(table::table(kind, vec![cells], metadata)).into_response());
    }
    Ok(Json(value).into_response())
}

async fn not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method)
}
