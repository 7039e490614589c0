//! The local API's writes. The cloud owns every object, so a write is passed on to it and
//! answered with its result; while the cloud is away, only what the edge owns is written here.
//!
//! Connected: the write goes to edgehub as an `insert`, `update`, `patch` or `delete` with
//! source `metaserver` and a new id, and waits up to `meta.remote_query_timeout` for the
//! cloud's answer: an `error`, or a `response` carrying the object (a bare "OK" before it is a
//! receipt; for a delete it is the answer). The object is stored before the caller hears of
//! it, unless the store already holds a newer one (the cloud's own update may arrive first),
//! and passed to edged as a change from the cloud would be, so that the store and edged agree.
//! The wait runs in a task of its own: a client that goes away does not leave the cloud's
//! answer unhandled.
//!
//! Away, or while older messages wait in the outbox (a direct send would overtake them): a
//! status write of this node's pods or of its node is applied here with the keyed merge of an
//! edged patch, queued for the cloud in the same transaction, and answered with the merged
//! object, because the edge owns status; creating an event is queued. Anything else needs the
//! cloud's say, and is refused as unavailable.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::cloud::refusal::{Reason, Refusal};

use crate::cloud::outbox;
use crate::cloud::remote::{Answer, TooManyPending};
use crate::cloud::waiting::{Target, WaitingPatch};
use crate::message::{self, Message, Operation, API_SOURCE};
use crate::metrics::{ApiVerb, ApiWriteOutcome};
use crate::patch::{OpFailure, Patch, PatchError};
use crate::resource::rtype as rtypes;
use crate::resource::{self, Resource};
use crate::store::{Change, Outcome, StoreError, Write};
use crate::topics::Peer;

use super::{rules, Context};

/// What the API asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Create,
    Update,
    Patch,
    Delete,
}

/// One write of the local API.
#[derive(Debug)]
pub struct ApiWrite {
    pub verb: Verb,
    /// The object written, `namespace/type/name`.
    pub resource: Resource,
    /// JSON text. Create and update: the object. Patch: a merge patch (an object; a strategic
    /// merge patch is read as one) or a JSON Patch (an array). Delete: `null`, or an object
    /// with the `metadata.uid` the deleted object must have.
    pub content: String,
    /// The write is of the `status` subresource: only the object's status changes.
    pub status: bool,
    /// Held until the write is finished, also when its caller has gone: the caller's place
    /// under a cap on writes, which so bounds the writes waiting for the cloud.
    pub hold: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a write that succeeded left.
#[derive(Debug)]
pub enum Written {
    /// The object as it now is.
    Object(String),
    /// Nothing to show: the object was deleted, or the cloud accepted a patch of an object
    /// this node does not hold.
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The cloud refused the write for a conflict: `reason` is [`Reason::AlreadyExists`] or
    /// [`Reason::Conflict`].
    #[error("the cloud refused the write of {key}: {text}")]
    Conflict {
        key: String,
        text: String,
        reason: Reason,
    },
    #[error("{text}")]
    NotFound { text: String },
    #[error("the cloud failed the write of {key}: {text}")]
    Cloud { key: String, text: String },
    #[error("the cloud did not answer the write of {key} in time ({timeout})")]
    Timeout { key: String, timeout: String },
    #[error("the cloud is not connected, and {0}")]
    Unavailable(String),
    #[error(transparent)]
    TooMany(#[from] TooManyPending),
    #[error("{0}")]
    Invalid(String),
    #[error("the write of {key} could not be stored: {source}")]
    Store { key: String, source: StoreError },
    /// The store is full (see [`crate::store::space`]): kube-apiserver has no word for it, so
    /// `507 Insufficient Storage`, whose text begins `storage full:`.
    #[error("{0}")]
    StorageFull(crate::store::Full),
    /// The object changed since the client read it (a stale `resourceVersion`).
    #[error("Operation cannot be fulfilled on {key}: the object has been modified; please apply your changes to the latest version and try again")]
    Modified { key: String },
    #[error("the write of {key} failed: {text}")]
    Failed { key: String, text: String },
}

impl Verb {
    /// Its `verb` label in `metamanager_api_writes`.
    fn label(self) -> ApiVerb {
        match self {
            Verb::Create => ApiVerb::Create,
            Verb::Update => ApiVerb::Update,
            Verb::Patch => ApiVerb::Patch,
            Verb::Delete => ApiVerb::Delete,
        }
    }

    /// The operation the cloud is sent for it.
    pub fn operation(self) -> Operation {
        match self {
            Verb::Create => Operation::Insert,
            Verb::Update => Operation::Update,
            Verb::Patch => Operation::Patch,
            Verb::Delete => Operation::Delete,
        }
    }
}

impl WriteError {
    /// Its `outcome` label in `metamanager_api_writes`.
    fn outcome(&self) -> ApiWriteOutcome {
        match self {
            WriteError::Conflict { .. } | WriteError::Modified { .. } => ApiWriteOutcome::Conflict,
            WriteError::NotFound { .. } => ApiWriteOutcome::NotFound,
            WriteError::Cloud { .. } => ApiWriteOutcome::CloudError,
            WriteError::Timeout { .. } => ApiWriteOutcome::Timeout,
            WriteError::Unavailable(_) => ApiWriteOutcome::Unavailable,
            WriteError::TooMany(_) => ApiWriteOutcome::TooMany,
            WriteError::Invalid(_) => ApiWriteOutcome::Invalid,
            WriteError::Store { .. } | WriteError::Failed { .. } => ApiWriteOutcome::Failed,
            WriteError::StorageFull(_) => ApiWriteOutcome::StorageFull,
        }
    }

    /// The answer a write of `key` gets from the cloud's refusal, by its reason.
    fn from_cloud(key: &str, refusal: Refusal) -> Self {
        let Refusal { reason, text } = refusal;
        let key = key.to_owned();
        match reason {
            Reason::NotFound => WriteError::NotFound { text },
            Reason::AlreadyExists | Reason::Conflict => WriteError::Conflict { key, text, reason },
            Reason::Failed => WriteError::Cloud { key, text },
        }
    }

    fn store(key: &str) -> impl FnOnce(StoreError) -> Self + '_ {
        move |source| match source {
            StoreError::StorageFull(full) => WriteError::StorageFull(full),
            source => WriteError::Store {
                key: key.to_owned(),
                source,
            },
        }
    }
}

/// What the API's writes are carried out with: the operations' context; cheap to clone.
#[derive(Clone)]
pub struct ApiWrites {
    ctx: Arc<Context>,
}

impl ApiWrites {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    /// The largest message MetaManager takes, which a write's request must fit in.
    pub fn max_payload(&self) -> usize {
        self.ctx.rules.max_payload
    }

    /// Carries out `write`: through the cloud while it is there, else locally when the edge
    /// owns what it changes; counted in `metamanager_api_writes`.
    pub async fn write(&self, write: ApiWrite) -> Result<Written, WriteError> {
        let verb = write.verb.label();
        // A full store takes deletes, which make room, and refuses the rest before the cloud
        // is asked: what the cloud accepted could not be kept here.
        let full = self
            .ctx
            .store
            .space()
            .full()
            .filter(|_| write.verb != Verb::Delete);
        let (result, by_cloud) = match full {
            Some(full) => (Err(WriteError::StorageFull(full)), false),
            None => carry_out(&self.ctx, write).await,
        };
        let outcome = match &result {
            Ok(_) if by_cloud => ApiWriteOutcome::Cloud,
            Ok(_) => ApiWriteOutcome::Here,
            Err(e) => e.outcome(),
        };
        self.ctx.replies.metrics.api_write(verb, outcome);
        result
    }
}

/// [`ApiWrites::write`], and whether it went to the cloud.
async fn carry_out(ctx: &Arc<Context>, write: ApiWrite) -> (Result<Written, WriteError>, bool) {
    match decide(ctx, write).await {
        Ok(Route::Here(done)) => (done, false),
        Ok(Route::Cloud(write)) => (through_cloud(ctx, write).await, true),
        Err(e) => (Err(e), false),
    }
}

/// Where a write is carried out.
enum Route {
    /// Here, already: its result.
    Here(Result<Written, WriteError>),
    /// Through the cloud, as this write.
    Cloud(ApiWrite),
}

async fn decide(ctx: &Context, write: ApiWrite) -> Result<Route, WriteError> {
    let (write, guarded) = if write.status {
        status_only(write)?
    } else {
        (write, false)
    };
    // Local while the cloud is away, and while older messages wait in the outbox: a status
    // write sent directly would overtake the ones queued before it.
    if ctx.cloud.outbox.must_queue() {
        let rtype = write.resource.rtype();
        let connected = ctx.cloud.state.connected();
        if write.status && (rtype == rtypes::POD || rtype == rtypes::NODE) {
            let key = write.resource.key();
            let stored = ctx.store.get(key).await.map_err(WriteError::store(key))?;
            match stored {
                Some(stored) if of_this_node(ctx, &write.resource, &stored) => {
                    return Ok(Route::Here(patch_status_here(ctx, write, guarded).await))
                }
                _ if connected => {}
                None => {
                    return Err(WriteError::NotFound {
                        text: format!("{key} is not stored on this node"),
                    })
                }
                Some(_) => {
                    return Err(WriteError::Unavailable(format!(
                        "{key} is not of this node ({}), so its status is the cloud's to change",
                        ctx.rules.node_id
                    )))
                }
            }
        } else if write.verb == Verb::Create && rtype == rules::EVENT {
            return Ok(Route::Here(queue_event(ctx, write).await));
        } else if !connected {
            return Err(WriteError::Unavailable(format!(
                "only status writes of this node's pods and node, and new events, are taken while it is away; {} is refused",
                write.resource
            )));
        }
    }
    Ok(Route::Cloud(write))
}

/// A write of the `status` subresource as the patch that changes only the status:
/// kube-apiserver ignores every other change made through it. An update that names the
/// `metadata.resourceVersion` it read is guarded by a `test` of it (`true`), so a stale one
/// fails as kube-apiserver's would.
fn status_only(write: ApiWrite) -> Result<(ApiWrite, bool), WriteError> {
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
async fn patch_status_here(
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
fn of_this_node(ctx: &Context, resource: &Resource, stored: &str) -> bool {
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
async fn queue_event(ctx: &Context, write: ApiWrite) -> Result<Written, WriteError> {
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

/// Sends the write to the cloud and waits for its answer, in a task that finishes the write
/// whether or not the caller still waits.
async fn through_cloud(ctx: &Arc<Context>, write: ApiWrite) -> Result<Written, WriteError> {
    let (id, mut answer) = ctx.cloud.remote.request(write.verb != Verb::Delete)?;
    let ctx = ctx.clone();
    let key = write.resource.key().to_owned();
    let task = tokio::spawn(async move {
        let operation = write.verb.operation();
        let key = write.resource.key().to_owned();
        let content = message::raw(write.content.clone());
        let payload = message::build_from(API_SOURCE, id.clone(), operation, &key, &content);
        ctx.replies.publisher.send(Peer::Edgehub, payload).await;
        let timeout = ctx.cloud.remote.timeout();
        let mut cloud = ctx.cloud.state.watch();
        let gone = cloud.wait_for(|connected| !*connected);
        let waited = tokio::select! {
            answered = tokio::time::timeout(timeout, &mut answer) => answered.map_err(|_| false),
            _ = gone => Err(true),
        };
        let answered = match waited {
            Ok(answered) => answered.ok(),
            // An answer handed over just as the wait ended is still taken, not dropped
            // unacknowledged.
            Err(disconnected) => {
                ctx.cloud.remote.forget(&id);
                match answer.try_recv() {
                    Ok(answer) => Some(answer),
                    Err(_) if disconnected => {
                        tracing::warn!(resource = %key, "the cloud went away while a write waited for it");
                        return Err(WriteError::Unavailable(format!(
                            "it went away while the write of {key} waited for its answer; the write may or may not have been carried out"
                        )));
                    }
                    Err(_) => None,
                }
            }
        };
        // `taken` is dropped when this task ends, the answer handled: its own step then
        // settles and acknowledges it.
        let Some(Answer {
            message,
            taken: _taken,
        }) = answered
        else {
            tracing::warn!(resource = %key, ?timeout, "the cloud did not answer a write in time");
            return Err(WriteError::Timeout {
                key,
                timeout: humantime::format_duration(timeout).to_string(),
            });
        };
        take_answer(&ctx, &write, &message).await
    });
    task.await.unwrap_or_else(|e| {
        Err(WriteError::Failed {
            key,
            text: e.to_string(),
        })
    })
}

/// The cloud's answer to `write`: its error as the caller's, or its object stored, passed to
/// edged and returned.
async fn take_answer(
    ctx: &Context,
    write: &ApiWrite,
    answer: &Message,
) -> Result<Written, WriteError> {
    let key = write.resource.key();
    if answer.operation == Operation::Error {
        let refusal = Refusal::read(answer.content_json());
        tracing::info!(resource = %key, error = %refusal.text, "the cloud refused a write");
        let refused = WriteError::from_cloud(key, refusal);
        // The cloud has no such object: neither has the node, from now on.
        if write.verb == Verb::Delete && matches!(refused, WriteError::NotFound { .. }) {
            delete_here(ctx, write).await?;
        }
        return Err(refused);
    }
    let object = answered_object(answer.content_json(), write.resource.name());
    if write.verb == Verb::Delete
        && object
            .as_ref()
            .is_none_or(|o| o.pointer("/metadata/deletionTimestamp").is_none())
    {
        return delete_here(ctx, write).await;
    }
    let Some(object) = object else {
        return Err(WriteError::Failed {
            key: key.to_owned(),
            text: "the cloud answered without the object".into(),
        });
    };
    let named = object.pointer("/metadata/name").and_then(Value::as_str);
    if named != write.resource.name() {
        return Err(WriteError::Failed {
            key: key.to_owned(),
            text: format!(
                "the cloud answered with an object named {named:?}, not {:?}; nothing was stored",
                write.resource.name().unwrap_or_default()
            ),
        });
    }
    let text = object.to_string();
    let rtype = write.resource.rtype();
    if rtype != rules::EVENT {
        let put = Write::PutIfChanged {
            key: key.to_owned(),
            rtype: rtype.to_owned(),
            value: text.clone().into(),
        };
        let applied = ctx.store.write(put).await.map_err(WriteError::store(key))?;
        // Not passed on when the store holds it already, or holds a newer one.
        if applied.outcome == Outcome::Stored {
            // edged is told of the object as it now is: created, or else updated whole (a
            // patch's result included), not the request's operation.
            let operation = match write.verb {
                Verb::Create => Operation::Insert,
                _ => Operation::Update,
            };
            let forward = message::build(None, operation, key, &message::raw(text.clone()));
            ctx.replies.publisher.send(Peer::Edged, forward).await;
        }
    }
    Ok(Written::Object(text))
}

/// A delete the cloud carried out: removed here too (only the object of the uid the request
/// named, if it named one), and edged told.
async fn delete_here(ctx: &Context, write: &ApiWrite) -> Result<Written, WriteError> {
    let key = write.resource.key();
    let uid = resource::metadata_uid(&write.content).ok().flatten();
    let before = ctx.store.get(key).await.map_err(WriteError::store(key))?;
    let removal = Write::Delete {
        key: key.to_owned(),
        uid,
    };
    let applied = ctx
        .store
        .write(removal)
        .await
        .map_err(WriteError::store(key))?;
    if let (Outcome::Deleted, Some(before)) = (applied.outcome, before) {
        let forward = message::build(None, Operation::Delete, key, &message::raw(before));
        ctx.replies.publisher.send(Peer::Edged, forward).await;
    }
    Ok(Written::Done)
}

/// The object in a `response`'s content: the object itself, or from a list the one named
/// `name`, else the first.
fn answered_object(content: &str, name: Option<&str>) -> Option<Value> {
    match serde_json::from_str::<Value>(content).ok()? {
        object @ Value::Object(_) => Some(object),
        Value::Array(items) => {
            let named = items
                .iter()
                .position(|o| o.pointer("/metadata/name").and_then(Value::as_str) == name);
            items
                .into_iter()
                .nth(named.unwrap_or(0))
                .filter(Value::is_object)
        }
        _ => None,
    }
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

    #[test]
    fn the_clouds_reason_chooses_the_error() {
        let k = "default/configmap/c";
        let from = |content: &str| WriteError::from_cloud(k, Refusal::read(content));
        assert!(matches!(
            from(r#""configmaps \"c\" already exists""#),
            WriteError::Conflict {
                reason: Reason::AlreadyExists,
                ..
            }
        ));
        assert!(matches!(
            from(r#""Operation cannot be fulfilled: the object has been modified (Conflict)""#),
            WriteError::Conflict {
                reason: Reason::Conflict,
                ..
            }
        ));
        assert!(matches!(
            from(r#""configmaps \"c\" not found""#),
            WriteError::NotFound { .. }
        ));
        assert!(matches!(
            from(r#""etcd is down""#),
            WriteError::Cloud { .. }
        ));
    }
}
