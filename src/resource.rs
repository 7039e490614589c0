//! The `route.resource` string: `namespace/type/name` for one object, `namespace/type` for all
//! objects of a type in a namespace. The whole string is the storage key, so it is validated
//! before anything touches the store.

use std::fmt;

/// The namespace segment a new cluster-scoped object (a node, or a kind whose objects name no
/// namespace) is stored under. Its key still has three segments, as in KubeEdge, and an object
/// keeps the segment it came with (`edge/node/n` is node `n`): a cluster-scoped object is one
/// per type and name, whatever its segment, and is found by those
/// ([`crate::store::Store::cluster_object`]), not by its key.
pub const CLUSTER_NAMESPACE: &str = "default";

/// The resource types something is decided by, named once: those with rules of their own
/// (topics.md, section 5.9), the one MetaSync sends, and those whose status the edge owns.
pub mod rtype {
    pub const POD: &str = "pod";
    pub const NODE: &str = "node";
    /// Pod statuses from edged, which MetaSync sends to the cloud.
    pub const PODSTATUS: &str = "podstatus";
    /// Passed on, never stored.
    pub const EVENT: &str = "event";
    /// Refused from edged while the cloud is away.
    pub const LEASE: &str = "lease";
    /// Fetched again from the cloud when a stored one has expired or soon will.
    pub const SERVICE_ACCOUNT_TOKEN: &str = "serviceaccounttoken";
}

/// Longest resource string accepted. Kubernetes names are at most 253 bytes and namespaces 63,
/// so this leaves room without letting a key grow unbounded.
pub const MAX_KEY_LEN: usize = 512;
const MAX_SEGMENT_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    key: String,
    type_start: usize,
    name_start: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("resource is empty")]
    Empty,
    #[error("resource is {len} bytes long; at most {MAX_KEY_LEN} are allowed")]
    TooLong { len: usize },
    #[error("resource {0:?} must be namespace/type or namespace/type/name")]
    Shape(String),
    #[error("resource {0:?} has an empty segment")]
    EmptySegment(String),
    #[error("resource segment {segment:?} is longer than {MAX_SEGMENT_LEN} bytes")]
    SegmentTooLong { segment: String },
    #[error("resource {0:?} contains a control character")]
    ControlCharacter(String),
}

impl Resource {
    pub fn parse(text: &str) -> Result<Self, ResourceError> {
        if text.is_empty() {
            return Err(ResourceError::Empty);
        }
        if text.len() > MAX_KEY_LEN {
            return Err(ResourceError::TooLong { len: text.len() });
        }
        if text.chars().any(char::is_control) {
            return Err(ResourceError::ControlCharacter(text.into()));
        }
        let segments: Vec<&str> = text.split('/').collect();
        if !(2..=3).contains(&segments.len()) {
            return Err(ResourceError::Shape(text.into()));
        }
        if segments.iter().any(|s| s.is_empty()) {
            return Err(ResourceError::EmptySegment(text.into()));
        }
        if let Some(s) = segments.iter().find(|s| s.len() > MAX_SEGMENT_LEN) {
            return Err(ResourceError::SegmentTooLong {
                segment: (*s).into(),
            });
        }
        let type_start = segments[0].len() + 1;
        let name_start = (segments.len() == 3).then(|| type_start + segments[1].len() + 1);
        Ok(Self {
            key: text.into(),
            type_start,
            name_start,
        })
    }

    /// Builds the key of one object; the parts come from the store or a validated resource.
    pub fn object(namespace: &str, rtype: &str, name: &str) -> Result<Self, ResourceError> {
        Self::parse(&format!("{namespace}/{rtype}/{name}"))
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn namespace(&self) -> &str {
        &self.key[..self.type_start - 1]
    }

    pub fn rtype(&self) -> &str {
        match self.name_start {
            Some(n) => &self.key[self.type_start..n - 1],
            None => &self.key[self.type_start..],
        }
    }

    /// `None` for a list resource (`namespace/type`).
    pub fn name(&self) -> Option<&str> {
        self.name_start.map(|n| &self.key[n..])
    }

    pub fn is_list(&self) -> bool {
        self.name_start.is_none()
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// Why an object's `metadata.uid` cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    /// The object is not JSON, or its `metadata` is not an object.
    #[error("{0}")]
    Metadata(String),
    /// The uid is there but is not a string: its JSON, at most 64 characters of it.
    #[error("metadata.uid must be a string, not {0}")]
    NotAString(String),
}

/// The `metadata.uid` of the object whose JSON is `json`: `None` when it has none, or is no
/// object at all (`null`, a list). The one reading of it, for deletes that name a uid and for
/// the store's check of the object it deletes.
pub fn metadata_uid(json: &str) -> Result<Option<String>, UidError> {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(default, deserialize_with = "present")]
        uid: Option<Box<serde_json::value::RawValue>>,
    }
    #[derive(serde::Deserialize)]
    struct Object {
        metadata: Option<Meta>,
    }
    /// `Some` even for `null`, which serde's `Option` would read as absent.
    fn present<'de, D: serde::Deserializer<'de>>(
        de: D,
    ) -> Result<Option<Box<serde_json::value::RawValue>>, D::Error> {
        serde::Deserialize::deserialize(de).map(Some)
    }
    if !json.trim_start().starts_with('{') {
        return Ok(None);
    }
    let object: Object =
        serde_json::from_str(json).map_err(|e| UidError::Metadata(e.to_string()))?;
    match object.metadata.and_then(|m| m.uid) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| UidError::NotAString(raw.get().chars().take(64).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_object_and_list() {
        let r = Resource::parse("default/pod/nginx").unwrap();
        assert_eq!(
            (r.namespace(), r.rtype(), r.name()),
            ("default", "pod", Some("nginx"))
        );
        assert!(!r.is_list());
        let r = Resource::parse("kube-system/configmap").unwrap();
        assert_eq!(
            (r.namespace(), r.rtype(), r.name()),
            ("kube-system", "configmap", None)
        );
        assert!(r.is_list());
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Resource::parse(""), Err(ResourceError::Empty));
        assert!(matches!(
            Resource::parse("default"),
            Err(ResourceError::Shape(_))
        ));
        assert!(matches!(
            Resource::parse("a/b/c/d"),
            Err(ResourceError::Shape(_))
        ));
        assert!(matches!(
            Resource::parse("a//c"),
            Err(ResourceError::EmptySegment(_))
        ));
        assert!(matches!(
            Resource::parse("a/b/"),
            Err(ResourceError::EmptySegment(_))
        ));
        assert!(matches!(
            Resource::parse("a/b\n/c"),
            Err(ResourceError::ControlCharacter(_))
        ));
        let long = format!("a/b/{}", "x".repeat(300));
        assert!(matches!(
            Resource::parse(&long),
            Err(ResourceError::SegmentTooLong { .. })
        ));
        let longer = format!("a/b/{}", "x".repeat(600));
        assert!(matches!(
            Resource::parse(&longer),
            Err(ResourceError::TooLong { .. })
        ));
    }
}
