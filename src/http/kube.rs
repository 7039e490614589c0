//! A read-only subset of the Kubernetes API over the local store, enough for `kubectl get`
//! (and `kubectl get -w`) pointed at the node: discovery, get, list and watch of the core kinds
//! and of every other kind the store holds, under its own group and version
//! ([`super::kinds`]).
//!
//! Objects are served exactly as stored, so what kubectl shows is what edged would be given.
//! Writes belong to the cloud and arrive over MQTT; every write method here is refused.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use std::sync::Arc;

use super::kinds::{self, Kind};
use super::scope::{is_watch, served, ApiError, Scope};
use super::{list_page, table, watch, HttpState};
use crate::resource::Resource;
use crate::store::Store;

/// Discovery, and get, list and watch of every kind, core (`/api/v1`) and grouped
/// (`/apis/{group}/{version}`).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/version", get(version).fallback(not_allowed))
        .route("/api", get(api_versions).fallback(not_allowed))
        .route("/apis", get(api_groups).fallback(not_allowed))
        .route("/api/v1", get(core_resources).fallback(not_allowed))
        .route(
            "/apis/:group/:version",
            get(group_resources).fallback(not_allowed),
        )
        .route(
            "/api/v1/namespaces/:ns/:plural",
            get(core_list_in_namespace).fallback(not_allowed),
        )
        .route(
            "/api/v1/namespaces/:ns/:plural/:name",
            get(core_get_in_namespace).fallback(not_allowed),
        )
        .route("/api/v1/:plural", get(core_list_all).fallback(not_allowed))
        .route(
            "/api/v1/:plural/:name",
            get(core_get_cluster).fallback(not_allowed),
        )
        .route(
            "/apis/:group/:version/namespaces/:ns/:plural",
            get(group_list_in_namespace).fallback(not_allowed),
        )
        .route(
            "/apis/:group/:version/namespaces/:ns/:plural/:name",
            get(group_get_in_namespace).fallback(not_allowed),
        )
        .route(
            "/apis/:group/:version/:plural",
            get(group_list_all).fallback(not_allowed),
        )
        .route(
            "/apis/:group/:version/:plural/:name",
            get(group_get_cluster).fallback(not_allowed),
        )
        .layer(axum::middleware::from_fn(super::accept::json_only))
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

/// The Kubernetes API level this endpoint follows, as `kubectl version` reads it, with
/// MetaManager's own version after the `+`.
async fn version() -> Response {
    Json(json!({
        "major": "1",
        "minor": API_MINOR,
        "gitVersion": format!("v1.{API_MINOR}.0+metamanager-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, go_arch()),
    }))
    .into_response()
}

/// The machine's architecture in the names Kubernetes uses (Go's).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The Kubernetes minor version whose API conventions the endpoint follows; kubectl warns when
/// its own is more than one away.
const API_MINOR: &str = "30";

/// The groups of the stored kinds that are not core, each with the versions stored.
async fn api_groups(State(store): State<Store>) -> Result<Response, ApiError> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for kind in kinds::all(&store).await? {
        if kind.group.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| *g == kind.group) {
            Some((_, versions)) if !versions.contains(&kind.version) => {
                versions.push(kind.version.clone())
            }
            Some(_) => {}
            None => groups.push((kind.group.clone(), vec![kind.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(name, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    Ok(Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})).into_response())
}

async fn core_resources(State(store): State<Store>) -> Result<Response, ApiError> {
    resource_list(&store, "", "v1").await
}

async fn group_resources(
    State(store): State<Store>,
    Path((group, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    resource_list(&store, &group, &version).await
}

/// The `APIResourceList` of one group and version; `NotFound` when nothing is served there.
async fn resource_list(store: &Store, group: &str, version: &str) -> Result<Response, ApiError> {
    let list: Vec<Value> = kinds::all(store)
        .await?
        .iter()
        .filter(|k| k.group == group && k.version == version)
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
    if list.is_empty() {
        return Err(ApiError::NoRoute);
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Ok(Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": list,
    }))
    .into_response())
}

type Params = Query<HashMap<String, String>>;

async fn core_list_in_namespace(
    State(state): State<HttpState>,
    Path((ns, plural)): Path<(String, String)>,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&state.ctx.store, "", "v1", &plural).await?;
    list(state, kind, Some(ns), params, table::wanted(&headers)).await
}

async fn core_list_all(
    State(state): State<HttpState>,
    Path(plural): Path<String>,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&state.ctx.store, "", "v1", &plural).await?;
    list(state, kind, None, params, table::wanted(&headers)).await
}

async fn group_list_in_namespace(
    State(state): State<HttpState>,
    Path((group, version, ns, plural)): Path<(String, String, String, String)>,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&state.ctx.store, &group, &version, &plural).await?;
    list(state, kind, Some(ns), params, table::wanted(&headers)).await
}

async fn group_list_all(
    State(state): State<HttpState>,
    Path((group, version, plural)): Path<(String, String, String)>,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&state.ctx.store, &group, &version, &plural).await?;
    list(state, kind, None, params, table::wanted(&headers)).await
}

/// The kind served at `group`/`version` under `plural`, or the 404 kube-apiserver gives.
async fn find(
    store: &Store,
    group: &str,
    version: &str,
    plural: &str,
) -> Result<Arc<Kind>, ApiError> {
    kinds::find(store, group, version, plural)
        .await?
        .ok_or(ApiError::NoRoute)
}

/// A list, or with `watch=true` a watch, of one kind; with `as_table`, as a Table.
async fn list(
    state: HttpState,
    kind: Arc<Kind>,
    namespace: Option<String>,
    params: HashMap<String, String>,
    as_table: bool,
) -> Result<Response, ApiError> {
    // A cluster-scoped kind has no objects under a namespace: as kube-apiserver, 404, rather
    // than all of them to a client whose access may be limited to that namespace.
    if namespace.is_some() && !kind.namespaced {
        return Err(ApiError::NoRoute);
    }
    let scope = Scope::new(kind, namespace, &params)?;
    if is_watch(&params) {
        let permit = state.caps.watch()?;
        // Without a version the watcher has not listed, so it is first told what exists.
        let version = match params.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "resourceVersion {v:?} is not a version this server gave out"
                ))
            })?),
        };
        let timeout = match params.get("timeoutSeconds").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(t) => Some(std::time::Duration::from_secs(t.parse::<u64>().map_err(
                |_| ApiError::BadRequest(format!("timeoutSeconds {t:?} is not a whole number")),
            )?)),
        };
        let options = watch::WatchOptions {
            version,
            bookmarks: params
                .get("allowWatchBookmarks")
                .is_some_and(|b| matches!(b.as_str(), "true" | "1")),
            timeout,
            table: as_table,
        };
        return watch::respond(state.ctx.store.clone(), state.stop, scope, options, permit).await;
    }
    let limit = match params.get("limit").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!("limit {n:?} is not a non-negative whole number"))
        })?),
    };
    let (version, after) = match params.get("continue").filter(|t| !t.is_empty()) {
        Some(token) => list_page::resume(token)?,
        // Read before the list, so that the list holds every change up to this version.
        None => (state.ctx.store.feed_position(), String::new()),
    };
    let mut pager = scope.pager(&state.ctx.store, after);
    // The first page is read before the answer starts, so a store that cannot be read is
    // an error status, not a cut-off body.
    let first = pager.next().await?;
    Ok(list_page::stream(
        scope, pager, first, version, limit, as_table,
    ))
}

async fn core_get_in_namespace(
    State(store): State<Store>,
    Path((ns, plural, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&store, "", "v1", &plural).await?;
    get_in_namespace(&store, kind, &ns, name, table::wanted(&headers)).await
}

async fn group_get_in_namespace(
    State(store): State<Store>,
    Path((group, version, ns, plural, name)): Path<(String, String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&store, &group, &version, &plural).await?;
    get_in_namespace(&store, kind, &ns, name, table::wanted(&headers)).await
}

async fn core_get_cluster(
    State(store): State<Store>,
    Path((plural, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&store, "", "v1", &plural).await?;
    get_cluster(&store, kind, name, table::wanted(&headers)).await
}

async fn group_get_cluster(
    State(store): State<Store>,
    Path((group, version, plural, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = find(&store, &group, &version, &plural).await?;
    get_cluster(&store, kind, name, table::wanted(&headers)).await
}

async fn get_in_namespace(
    store: &Store,
    kind: Arc<Kind>,
    ns: &str,
    name: String,
    as_table: bool,
) -> Result<Response, ApiError> {
    if !kind.namespaced {
        return Err(ApiError::NoRoute);
    }
    match store.get(&format!("{ns}/{}/{name}", kind.rtype)).await? {
        Some(text) => object(&kind, name, &text, as_table),
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
    if kind.namespaced {
        return Err(ApiError::NoRoute);
    }
    let rows = store.list_type(&kind.rtype).await?;
    let found = rows.into_iter().find(|(key, text)| {
        let stored_name = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["metadata"]["name"].as_str().map(str::to_owned));
        stored_name
            .or_else(|| Resource::parse(key).ok()?.name().map(str::to_owned))
            .is_some_and(|stored| stored == name)
    });
    match found {
        Some((_, text)) => object(&kind, name, &text, as_table),
        None => Err(ApiError::NotFound {
            plural: kind.plural.clone(),
            name,
        }),
    }
}

/// One stored object as served, or with `as_table` as a Table of one row.
fn object(kind: &Kind, name: String, text: &str, as_table: bool) -> Result<Response, ApiError> {
    let value = serde_json::from_str::<Value>(text).map_err(|source| ApiError::NotJson {
        plural: kind.plural.clone(),
        name,
        source,
    })?;
    if as_table {
        let row = table::row(kind, &value, std::time::SystemTime::now());
        return Ok(Json(table::table(kind, vec![row], json!({}))).into_response());
    }
    Ok(Json(served(kind, value)).into_response())
}

async fn not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method)
}
