//! What a resource path names (group, version, namespace, plural, name), and the kind it is
//! of: shared by the reads of [`super::kube`] and the writes of [`super::write`].

use std::collections::HashMap;
use std::sync::Arc;

use super::kinds::{self, Kind};
use super::scope::ApiError;
use crate::resource::CLUSTER_NAMESPACE;
use crate::store::Store;

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
    /// The namespace segment an object of `kind` is stored under: a new cluster-scoped
    /// object's is [`CLUSTER_NAMESPACE`].
    pub fn namespace_of(&self, kind: &Kind) -> String {
        match (&self.namespace, kind.namespaced) {
            (Some(ns), true) => ns.clone(),
            _ => CLUSTER_NAMESPACE.into(),
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
