//! The kinds the API serves: the built-in core ones, and every other type the store holds,
//! found from a stored object of that type (its `apiVersion` and `kind`). So a custom resource
//! the cloud inserts over MQTT, such as a KubeEdge `DeviceModel`, is served under its own group
//! and version, listed by `kubectl api-resources` and read with `kubectl get devicemodels`,
//! without MetaManager knowing it in advance.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    /// The URL segment: `pods`.
    pub plural: String,
    /// The store's `type` column, which is also kube's singular name: `pod`.
    pub rtype: String,
    pub kind: String,
    /// `""` for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    pub namespaced: bool,
}

impl Kind {
    /// `v1`, or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// The kinds served whether or not the store holds any: (group, plural, type, kind,
/// namespaced), all of version `v1`. Events are never stored, and leases are written by
/// leader election, so both are known here to be created.
const BUILTIN: &[(&str, &str, &str, &str, bool)] = &[
    ("", "pods", "pod", "Pod", true),
    ("", "configmaps", "configmap", "ConfigMap", true),
    ("", "secrets", "secret", "Secret", true),
    ("", "nodes", "node", "Node", false),
    ("", "services", "service", "Service", true),
    ("", "endpoints", "endpoints", "Endpoints", true),
    ("", "events", "event", "Event", true),
    ("coordination.k8s.io", "leases", "lease", "Lease", true),
    // Where client-go's newer event recorder writes events.
    ("events.k8s.io", "events", "event", "Event", true),
];

/// The short names kubectl accepts for a built-in kind (`kubectl get cm`), as kube-apiserver
/// lists them.
pub fn short_names(kind: &Kind) -> &'static [&'static str] {
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("", "pods") => &["po"],
        ("", "configmaps") => &["cm"],
        ("", "nodes") => &["no"],
        ("", "services") => &["svc"],
        ("", "endpoints") => &["ep"],
        ("", "events") => &["ev"],
        ("events.k8s.io", "events") => &["ev"],
        _ => &[],
    }
}

/// The built-in kinds, in discovery order.
pub fn builtins() -> &'static [Arc<Kind>] {
    static BUILTINS: OnceLock<Vec<Arc<Kind>>> = OnceLock::new();
    BUILTINS.get_or_init(|| {
        BUILTIN
            .iter()
            .map(|&(group, plural, rtype, kind, namespaced)| {
                Arc::new(Kind {
                    plural: plural.into(),
                    rtype: rtype.into(),
                    kind: kind.into(),
                    group: group.into(),
                    version: "v1".into(),
                    namespaced,
                })
            })
            .collect()
    })
}

/// Every kind served: the built-in ones, then those of the other stored types, in type order.
pub async fn all(store: &Store) -> Result<Vec<Arc<Kind>>, StoreError> {
    let mut kinds: Vec<Arc<Kind>> = builtins().to_vec();
    for (rtype, sample) in store.type_samples().await? {
        if kinds.iter().any(|k| k.rtype == rtype) {
            continue;
        }
        if let Some(kind) = from_sample(&rtype, &sample) {
            if !kinds
                .iter()
                .any(|k| k.plural == kind.plural && k.group == kind.group)
            {
                kinds.push(Arc::new(kind));
            }
        }
    }
    Ok(kinds)
}

/// The kind served at `group`/`version` under `plural`, if any.
pub async fn find(
    store: &Store,
    group: &str,
    version: &str,
    plural: &str,
) -> Result<Option<Arc<Kind>>, StoreError> {
    let builtin = builtins()
        .iter()
        .find(|k| k.plural == plural && k.group == group && k.version == version);
    if let Some(kind) = builtin {
        return Ok(Some(kind.clone()));
    }
    Ok(all(store)
        .await?
        .into_iter()
        .find(|k| k.plural == plural && k.group == group && k.version == version))
}

/// The kind of stored type `rtype`, from one of its objects: its `apiVersion` and `kind`; it is
/// namespaced when the object names a namespace. `None` when the object says neither.
fn from_sample(rtype: &str, json: &str) -> Option<Kind> {
    let object: Value = serde_json::from_str(json).ok()?;
    let kind = object["kind"].as_str().filter(|k| !k.is_empty())?;
    let api_version = object["apiVersion"].as_str().filter(|v| !v.is_empty())?;
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    };
    let namespaced = object["metadata"]["namespace"]
        .as_str()
        .is_some_and(|ns| !ns.is_empty());
    Some(Kind {
        plural: plural_of(kind),
        rtype: rtype.to_owned(),
        kind: kind.to_owned(),
        group: group.to_owned(),
        version: version.to_owned(),
        namespaced,
    })
}

/// The plural resource name of a kind, as the English plural of its lower-case name (`s`,
/// `es`, `ies`), which is what custom resource definitions use in practice (`devicemodels`,
/// `policies`, `ingresses`); MetaManager has only the objects, not their definitions.
pub fn plural_of(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if let Some(stem) = lower.strip_suffix('y') {
        if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) {
            return format!("{stem}ies");
        }
    }
    if lower.ends_with(['s', 'x', 'z']) || lower.ends_with("ch") || lower.ends_with("sh") {
        return format!("{lower}es");
    }
    format!("{lower}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_as_kubernetes_derives_them() {
        for (kind, plural) in [
            ("DeviceModel", "devicemodels"),
            ("Policy", "policies"),
            ("Gateway", "gateways"),
            ("Ingress", "ingresses"),
            ("Lease", "leases"),
        ] {
            assert_eq!(plural_of(kind), plural, "{kind}");
        }
    }

    #[test]
    fn a_stored_object_gives_its_kind_group_version_and_scope() {
        let device_model = r#"{"apiVersion":"devices.kubeedge.io/v1beta1","kind":"DeviceModel","metadata":{"name":"thermo","namespace":"default"}}"#;
        let kind = from_sample("devicemodel", device_model).unwrap();
        assert_eq!(kind.plural, "devicemodels");
        assert_eq!(kind.group, "devices.kubeedge.io");
        assert_eq!(kind.version, "v1beta1");
        assert_eq!(kind.api_version(), "devices.kubeedge.io/v1beta1");
        assert!(kind.namespaced);

        let class = r#"{"apiVersion":"storage.k8s.io/v1","kind":"StorageClass","metadata":{"name":"local"}}"#;
        assert!(!from_sample("storageclass", class).unwrap().namespaced);
        let core = r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"pv"}}"#;
        let pv = from_sample("persistentvolume", core).unwrap();
        assert_eq!((pv.group.as_str(), pv.version.as_str()), ("", "v1"));
        assert!(
            from_sample("podstatus", r#"{"UID":"x"}"#).is_none(),
            "no kind"
        );
    }
}
