//! Discovery, as kube-apiserver serves it: `/version`, `/api`, `/apis` and the resource list
//! of each group and version, built from the kinds served ([`super::kinds`]); and aggregated
//! discovery (`apidiscovery.k8s.io`), all groups in two answers, which kubectl asks for first.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::kinds::{self, Kind};
use super::scope::ApiError;
use crate::store::Store;

/// What every kind takes: reads from the store, writes through the cloud.
const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];
/// What the `status` subresource of every kind takes.
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];

/// `/api`: the core group's versions, or aggregated discovery of the core group.
pub async fn api(State(store): State<Store>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(format) = aggregated(&headers) {
        return aggregated_list(&store, format, true).await;
    }
    // The address clients were told to use is the one they reached us on.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:10550")
        .to_owned();
    Ok(Json(json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
    }))
    .into_response())
}

/// The Kubernetes API level this endpoint follows, as `kubectl version` reads it, with
/// MetaManager's own version after the `+`.
pub async fn version() -> Response {
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

/// `/apis`: the groups of the kinds that are not core, each with its versions, or their
/// aggregated discovery.
pub async fn apis(State(store): State<Store>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(format) = aggregated(&headers) {
        return aggregated_list(&store, format, false).await;
    }
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

pub async fn core_resources(State(store): State<Store>) -> Result<Response, ApiError> {
    resource_list(&store, "", "v1").await
}

pub async fn group_resources(
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
        .flat_map(|k| {
            let status = json!({
                "name": format!("{}/status", k.plural),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": STATUS_VERBS,
            });
            let kind = json!({
                "name": k.plural,
                "singularName": k.rtype,
                "namespaced": k.namespaced,
                "kind": k.kind,
                "shortNames": kinds::short_names(k),
                "verbs": VERBS,
            });
            [kind, status]
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

/// The aggregated discovery version a client asks for in `Accept`, newest first; `None` for
/// the classic answers.
fn aggregated(headers: &HeaderMap) -> Option<&'static str> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    let asks = |version: &str| {
        accept.split(',').any(|range| {
            let params: Vec<String> = range
                .split(';')
                .skip(1)
                .map(|p| p.trim().replace(' ', ""))
                .collect();
            params.iter().any(|p| p == "g=apidiscovery.k8s.io")
                && params.iter().any(|p| *p == format!("v={version}"))
                && params.iter().any(|p| p == "as=APIGroupDiscoveryList")
        })
    };
    ["v2", "v2beta1"].into_iter().find(|v| asks(v))
}

/// One version of a group, and its resources in aggregated discovery.
type Versioned = (String, Vec<Value>);

/// The `APIGroupDiscoveryList` of the core group (`core`) or of every other group, with the
/// content type that tells the client it is the aggregated form.
async fn aggregated_list(
    store: &Store,
    version: &'static str,
    core: bool,
) -> Result<Response, ApiError> {
    let mut groups: Vec<(String, Vec<Versioned>)> = Vec::new();
    for kind in kinds::all(store).await? {
        if kind.group.is_empty() != core {
            continue;
        }
        let resource = discovered_resource(&kind);
        let at = match groups.iter().position(|(g, _)| *g == kind.group) {
            Some(at) => at,
            None => {
                groups.push((kind.group.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        let versions = &mut groups[at].1;
        match versions.iter_mut().find(|(v, _)| *v == kind.version) {
            Some((_, resources)) => resources.push(resource),
            None => versions.push((kind.version.clone(), vec![resource])),
        }
    }
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(name, versions)| {
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|(version, resources)| {
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": name}, "versions": versions})
        })
        .collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    });
    let content_type =
        format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList");
    let mut response = Json(body).into_response();
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
        .headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    Ok(response)
}

/// One kind in aggregated discovery, with its `status` subresource.
fn discovered_resource(kind: &Kind) -> Value {
    let response_kind = json!({"group": kind.group, "version": kind.version, "kind": kind.kind});
    json!({
        "resource": kind.plural,
        "responseKind": response_kind,
        "scope": if kind.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": kind.rtype,
        "shortNames": kinds::short_names(kind),
        "verbs": VERBS,
        "subresources": [{
            "subresource": "status",
            "responseKind": response_kind,
            "verbs": STATUS_VERBS,
        }],
    })
}
