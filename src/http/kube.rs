//! The Kubernetes API over the local store, enough for kubectl and client libraries pointed at
//! the node: discovery, get, list and watch of the core kinds and of every other kind the
//! store holds, under its own group and version ([`super::kinds`]), and the routes of the
//! writes ([`super::write`]).
//!
//! Objects are served exactly as stored, so what kubectl shows is what edged would be given.

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
use super::{discovery, list_page, table, watch, write, HttpState};
use crate::resource::Resource;
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

/// What a resource path names; the core group's paths have no group or version segment.
pub struct Target {
    pub group: String,
    pub version: String,
    pub namespace: Option<String>,
    pub plural: String,
    pub name: Option<String>,
}

impl From<HashMap<String, String>> for Target {
    fn from(mut path: HashMap<String, String>) -> Self {
        Self {
            group: path.remove("group").unwrap_or_default(),
            version: path.remove("version").unwrap_or_else(|| "v1".into()),
            namespace: path.remove("ns"),
            plural: path.remove("plural").unwrap_or_default(),
            name: path.remove("name"),
        }
    }
}

impl Target {
    /// The namespace segment an object of `kind` is stored under: a cluster-scoped kind's are
    /// under `default` (see [`super::kinds`]).
    pub fn namespace_of(&self, kind: &Kind) -> String {
        match (&self.namespace, kind.namespaced) {
            (Some(ns), true) => ns.clone(),
            _ => "default".into(),
        }
    }
}

/// The kind a path names, or the 404 kube-apiserver gives; also for a namespaced path of a
/// cluster-scoped kind and the reverse, whose objects are not there.
pub async fn find_kind(store: &Store, target: &Target) -> Result<Arc<Kind>, ApiError> {
    let kind = kinds::find(store, &target.group, &target.version, &target.plural)
        .await?
        .ok_or(ApiError::NoRoute)?;
    match (target.namespace.is_some(), kind.namespaced, &target.name) {
        // A cluster-scoped kind has no objects under a namespace: as kube-apiserver, 404,
        // rather than all of them to a client whose access may be limited to that namespace.
        (true, false, _) => Err(ApiError::NoRoute),
        (false, true, Some(_)) => Err(ApiError::NoRoute),
        _ => Ok(kind),
    }
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
    match stored_cluster_object(store, &kind, &name).await? {
        Some((_, text)) => object(&kind, name, &text, as_table),
        None => Err(ApiError::NotFound {
            plural: kind.plural.clone(),
            name,
        }),
    }
}

/// The key and value of the cluster-scoped object `name` of `kind`, under whatever namespace
/// segment it is stored.
pub async fn stored_cluster_object(
    store: &Store,
    kind: &Kind,
    name: &str,
) -> Result<Option<(String, String)>, ApiError> {
    let rows = store.list_type(&kind.rtype).await?;
    Ok(rows.into_iter().find(|(key, text)| {
        let stored_name = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["metadata"]["name"].as_str().map(str::to_owned));
        stored_name
            .or_else(|| Resource::parse(key).ok()?.name().map(str::to_owned))
            .is_some_and(|stored| stored == name)
    }))
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
