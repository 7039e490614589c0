//! The versions a write names. On the local API an object's `resourceVersion` is the node's
//! number of its last change (see [`crate::store`]'s feed), while the stored object, and so what
//! edged and the cloud are sent, keeps the cloud's. A write that names a version, as a
//! precondition (an update's `metadata.resourceVersion`, a patch that sets or tests it, a
//! delete's `preconditions.resourceVersion`), names the node's: it is checked here against the
//! stored object's change number, `409` unless they are equal as kube-apiserver would answer a
//! stale write, and what goes to the cloud names the cloud's version of that object instead, so
//! the cloud checks it too against its own.

use serde_json::Value;

use super::scope::ApiError;
use crate::ops::api_write::{Verb, WriteError};
use crate::store::read::Row;

/// The `resourceVersion` of a JSON Patch operation's path.
const VERSION_PATH: &str = "/metadata/resourceVersion";

/// `content` of a write of `verb` to `key`, with any version it names checked against `stored`
/// and replaced by the cloud's version of the stored object (removed, when the stored object
/// has none). Unchanged when it names none, and for a create (the cloud refuses a version in
/// one, as kube-apiserver does).
pub fn translate(
    verb: Verb,
    key: &str,
    content: String,
    stored: Option<&Row>,
) -> Result<String, ApiError> {
    if !matches!(verb, Verb::Update | Verb::Patch) || !content.contains("resourceVersion") {
        return Ok(content);
    }
    let Ok(mut value) = serde_json::from_str::<Value>(&content) else {
        return Ok(content);
    };
    let cloud = stored.and_then(|row| cloud_version(&row.value));
    let mut named = false;
    match &mut value {
        Value::Object(object) => {
            if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                if let Some(version) = meta.get("resourceVersion").and_then(Value::as_str) {
                    if !version.is_empty() {
                        check(key, version, stored)?;
                        named = true;
                        match &cloud {
                            Some(cloud) => {
                                meta.insert("resourceVersion".into(), Value::from(cloud.clone()))
                            }
                            None => meta.remove("resourceVersion"),
                        };
                    }
                }
            }
        }
        Value::Array(operations) => {
            for op in operations.iter_mut() {
                if op.get("path").and_then(Value::as_str) != Some(VERSION_PATH) {
                    continue;
                }
                let Some(version) = op.get("value").and_then(Value::as_str) else {
                    continue;
                };
                check(key, version, stored)?;
                named = true;
                // A test of a version the stored object does not have would fail at the
                // cloud for the wrong reason: the node's check stands for it then.
                op["value"] = Value::from(cloud.clone().unwrap_or_default());
            }
            if cloud.is_none() {
                operations
                    .retain(|op| op.get("path").and_then(Value::as_str) != Some(VERSION_PATH));
            }
        }
        _ => {}
    }
    Ok(if named { value.to_string() } else { content })
}

/// Whether `named`, a version a write names, is the stored object's: `409` otherwise. With no
/// stored object there is nothing to check against; the cloud answers for it.
pub fn check(key: &str, named: &str, stored: Option<&Row>) -> Result<(), ApiError> {
    let Some(row) = stored else {
        return Ok(());
    };
    let number = named.parse::<u64>().map_err(|_| {
        ApiError::BadRequest(format!(
            "resourceVersion {named:?} is not a version this server gave out"
        ))
    })?;
    if number != row.version {
        return Err(ApiError::Write(WriteError::Modified {
            key: key.to_owned(),
        }));
    }
    Ok(())
}

/// The cloud's `metadata.resourceVersion` of a stored object, if it has one.
fn cloud_version(stored: &str) -> Option<String> {
    let value: Value = serde_json::from_str(stored).ok()?;
    value
        .pointer(VERSION_PATH)
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(version: u64) -> Row {
        Row {
            key: "default/pod/p".into(),
            value: json!({"metadata": {"name": "p", "resourceVersion": "482913"}}).to_string(),
            version,
        }
    }

    fn parsed(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn an_update_naming_the_current_number_goes_to_the_cloud_with_the_clouds_version() {
        let row = stored(1796565354970465);
        let body =
            json!({"metadata": {"name": "p", "resourceVersion": "1796565354970465"}, "spec": {}});
        let sent = translate(Verb::Update, "default/pod/p", body.to_string(), Some(&row)).unwrap();
        assert_eq!(parsed(&sent)["metadata"]["resourceVersion"], "482913");
        assert_eq!(parsed(&sent)["spec"], json!({}));
    }

    #[test]
    fn a_stale_number_is_a_conflict() {
        let row = stored(1796565354970465);
        let body = json!({"metadata": {"resourceVersion": "1796565354970464"}});
        let err = translate(Verb::Update, "default/pod/p", body.to_string(), Some(&row));
        assert!(matches!(
            err,
            Err(ApiError::Write(WriteError::Modified { .. }))
        ));
        // The cloud's own version is not the node's either.
        let body = json!({"metadata": {"resourceVersion": "482913"}});
        let err = translate(Verb::Update, "default/pod/p", body.to_string(), Some(&row));
        assert!(matches!(
            err,
            Err(ApiError::Write(WriteError::Modified { .. }))
        ));
        assert!(check("default/pod/p", "1796565354970464", Some(&row)).is_err());
        assert!(check("default/pod/p", "1796565354970465", Some(&row)).is_ok());
    }

    #[test]
    fn json_patch_tests_of_the_version_are_translated() {
        let row = stored(77);
        let body = json!([
            {"op": "test", "path": VERSION_PATH, "value": "77"},
            {"op": "replace", "path": "/spec/x", "value": "77"}
        ]);
        let sent = translate(Verb::Patch, "default/pod/p", body.to_string(), Some(&row)).unwrap();
        assert_eq!(parsed(&sent)[0]["value"], "482913");
        assert_eq!(parsed(&sent)[1]["value"], "77", "other paths untouched");
        let stale = json!([{"op": "test", "path": VERSION_PATH, "value": "76"}]);
        assert!(translate(Verb::Patch, "default/pod/p", stale.to_string(), Some(&row)).is_err());
    }

    #[test]
    fn writes_naming_no_version_pass_unchanged() {
        let row = stored(77);
        let body = r#"{"metadata":{"labels":{"a":"b"}}, "spec": {}}"#.to_owned();
        let sent = translate(Verb::Patch, "default/pod/p", body.clone(), Some(&row)).unwrap();
        assert_eq!(sent, body, "not even re-encoded");
        let create = json!({"metadata": {"resourceVersion": "5"}}).to_string();
        assert_eq!(
            translate(Verb::Create, "default/pod/p", create.clone(), None).unwrap(),
            create
        );
    }
}
