//! The writes taken here while the cloud is away (or while older messages wait for it in the
//! outbox): a status of this node's pods or of its node, applied as an edged patch would be and
//! queued for the cloud in the same transaction, and a new event, queued.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::cloud::outbox;
use crate::cloud::waiting::{Target, WaitingPatch};
use crate::message::{self, Operation, API_SOURCE};
use crate::patch::{OpFailure, Patch, PatchError};
use crate::resource::rtype as rtypes;
use crate::resource::Resource;
use crate::store::{Change, Outcome, Write};
use crate::topics::Peer;

use super::{ApiWrite, Context, Verb, WriteError, Written};

/// A write of the `status` subresource as the patch that changes only the status:
/// kube-apiserver ignores every other change made through it. An update that names the
/// `metadata.resourceVersion` it read is guarded by a `test` of it (`true`), so a stale one
/// fails as kube-apiserver's would.
pub(super) fn status_only(write: ApiWrite) -> Result<(ApiWrite, bool), WriteError> {
    let invalid = |text: &str| WriteError::Invalid(format!("{}: {text}", write.resource));
    let mut guarded = false;
    let value: Value = serde_json::from_str(&write.content)
        .map_err(|e| invalid(&format!("the body is not JSON: {e}")))?;
    let patch = match (write.verb, value) {
        // The status replaced whole: `add` replaces a member that exists (RFC 6902).
        (Verb::Update, Value::Object(mut object)) => {
            let status = object.remove("status").unwrap_or_else(|| json!({}));
            let replace = json!({"op": "add", "path": "/status", "value": status});
            match object
                .get("metadata")
                .and_then(|m| m.get("resourceVersion"))
                .filter(|v| v.as_str().is_some_and(|v| !v.is_empty()))
            {
                Some(version) => {
                    guarded = true;
                    json!([
                        {"op": "test", "path": "/metadata/resourceVersion", "value": version},
                        replace
                    ])
                }
                None => json!([replace]),
            }
        }
        (Verb::Patch, Value::Object(mut object)) => match object.remove("status") {
            Some(status) => json!({ "status": status }),
            None => json!({}),
        },
        (Verb::Patch, Value::Array(operations)) => {
            let in_status = |p: Option<&Value>| {
                p.and_then(Value::as_str)
                    .is_none_or(|p| p == "/status" || p.starts_with("/status/"))
            };
            // A `test` changes nothing, so it may look anywhere (a resourceVersion guard).
            let allowed = |op: &Value| {
                op.get("path").is_some()
                    && (op.get("op").and_then(Value::as_str) == Some("test")
                        || (in_status(op.get("path")) && in_status(op.get("from"))))
            };
            if !operations.iter().all(allowed) {
                return Err(invalid(
                    "a JSON Patch of the status subresource may change only paths under /status",
                ));
            }
            Value::Array(operations)
        }
        (verb, _) => {
            return Err(invalid(&format!(
                "{verb:?} of the status subresource takes an object"
            )))
        }
    };
    let patch = ApiWrite {
        verb: Verb::Patch,
        content: patch.to_string(),
        ..write
    };
    Ok((patch, guarded))
}

/// The offline status write: merged into the stored object, queued for the cloud with it,
/// passed to edged, and answered with the merged object.
pub(super) async fn patch_status_here(
    ctx: &Context,
    write: ApiWrite,
    guarded: bool,
) -> Result<Written, WriteError> {
    let key = write.resource.key().to_owned();
    let rtype = write.resource.rtype().to_owned();
    let parsed = Patch::parse_shared(write.content.clone().into(), &rtype, ctx.rules.max_payload)
        .map_err(|e| WriteError::Invalid(format!("{key}: {e}")))?;
    let parsed = Arc::new(parsed);
    let id = message::new_msg_id();
    // The version guard is checked here, against the copy the client read; the cloud takes
    // the edge's status as it is written here, in order, the last write winning there as here.
    let queued = match guarded {
        true => without_guard(&write.content),
        false => write.content.clone(),
    };
    let payload = message::build_from(
        API_SOURCE,
        id.clone(),
        Operation::Patch,
        &key,
        &message::raw(queued),
    );
    let change = Change {
        write: Some(Write::Patch {
            key: key.clone(),
            rtype: rtype.clone(),
            patch: parsed.clone(),
        }),
        to_cloud: Some(outbox::cloud_message(&key, payload.clone().into(), false)),
        to_cloud_needs_object: true,
        ..Change::default()
    };
    // The cloud's answer, when it comes, is stored like the answer to an edged patch.
    let target = Target {
        key: key.clone(),
        rtype,
    };
    let (change, waiting) = WaitingPatch::new(&ctx.cloud.patches, &id, target, change);
    let applied = ctx
        .store
        .write(change)
        .await
        .map_err(WriteError::store(&key))?;
    waiting.committed(&applied);
    match applied.outcome {
        Outcome::Rejected(PatchError::Operation {
            op: 0,
            failure: OpFailure::TestFailed | OpFailure::NoPath,
        }) if guarded => Err(WriteError::Modified { key }),
        Outcome::Rejected(e) => Err(WriteError::Invalid(format!(
            "patch of {key} not applied: {}",
            parsed.explain(e)
        ))),
        Outcome::Absent => Err(WriteError::NotFound {
            text: format!("{key} is not stored on this node"),
        }),
        _ => {
            tracing::info!(resource = %key, "status written while the cloud is away; queued for it");
            ctx.replies.publisher.send(Peer::Edged, payload).await;
            let now = ctx.store.get(&key).await.map_err(WriteError::store(&key))?;
            Ok(now.map_or(Written::Done, Written::Object))
        }
    }
}

/// A guarded status update's JSON Patch without its leading version `test`.
fn without_guard(content: &str) -> String {
    match serde_json::from_str::<Value>(content) {
        Ok(Value::Array(mut operations)) if !operations.is_empty() => {
            operations.remove(0);
            Value::Array(operations).to_string()
        }
        _ => content.to_owned(),
    }
}

/// Whether `resource`, stored as `stored`, is this node or a pod bound to it.
pub(super) fn of_this_node(ctx: &Context, resource: &Resource, stored: &str) -> bool {
    let Ok(object) = serde_json::from_str::<Value>(stored) else {
        return false;
    };
    let node = ctx.rules.node_id.as_str();
    match resource.rtype() {
        rtypes::POD => object.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node),
        rtypes::NODE => {
            object.pointer("/metadata/name").and_then(Value::as_str) == Some(node)
                || resource.name() == Some(node)
        }
        _ => false,
    }
}

/// An event created while the cloud is away: queued for it (events are never stored), the
/// newest of one name replacing an older one still waiting.
pub(super) async fn queue_event(ctx: &Context, write: ApiWrite) -> Result<Written, WriteError> {
    let key = write.resource.key().to_owned();
    let payload = message::build_from(
        API_SOURCE,
        message::new_msg_id(),
        Operation::Insert,
        &key,
        &message::raw(write.content.clone()),
    );
    let change = Change {
        to_cloud: Some(outbox::cloud_message(&key, payload.into(), true)),
        ..Change::default()
    };
    ctx.store
        .write(change)
        .await
        .map_err(WriteError::store(&key))?;
    tracing::info!(resource = %key, "event created while the cloud is away; queued for it");
    Ok(Written::Object(write.content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(verb: Verb, content: Value) -> ApiWrite {
        ApiWrite {
            verb,
            resource: Resource::parse("default/pod/p").unwrap(),
            content: content.to_string(),
            status: true,
            hold: None,
        }
    }

    #[test]
    fn a_status_update_replaces_only_the_status() {
        let (w, guarded) = status_only(write(
            Verb::Update,
            json!({"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Running"}}),
        ))
        .unwrap();
        assert_eq!(w.verb, Verb::Patch);
        assert!(!guarded);
        let patch: Value = serde_json::from_str(&w.content).unwrap();
        assert_eq!(
            patch,
            json!([{"op": "add", "path": "/status", "value": {"phase": "Running"}}])
        );
        // With the version it read, the update holds only if the object is still that one.
        let (w, guarded) = status_only(write(
            Verb::Update,
            json!({"metadata": {"resourceVersion": "7"}, "status": {"phase": "Running"}}),
        ))
        .unwrap();
        assert!(guarded);
        let patch: Value = serde_json::from_str(&w.content).unwrap();
        assert_eq!(
            patch[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "7"})
        );
    }

    #[test]
    fn a_status_merge_patch_keeps_only_the_status() {
        let w = status_only(write(
            Verb::Patch,
            json!({"spec": {"nodeName": "x"}, "status": {"phase": "Failed"}}),
        ))
        .unwrap()
        .0;
        let patch: Value = serde_json::from_str(&w.content).unwrap();
        assert_eq!(patch, json!({"status": {"phase": "Failed"}}));
    }

    #[test]
    fn a_status_json_patch_outside_status_is_invalid() {
        let outside = write(
            Verb::Patch,
            json!([{"op": "replace", "path": "/spec/nodeName", "value": "x"}]),
        );
        assert!(matches!(status_only(outside), Err(WriteError::Invalid(_))));
        let sneaky = write(
            Verb::Patch,
            json!([{"op": "move", "from": "/spec", "path": "/status/x"}]),
        );
        assert!(matches!(status_only(sneaky), Err(WriteError::Invalid(_))));
        let inside = write(
            Verb::Patch,
            json!([{"op": "replace", "path": "/status/phase", "value": "Failed"}]),
        );
        assert!(status_only(inside).is_ok());
    }
}
