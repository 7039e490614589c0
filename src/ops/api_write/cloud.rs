//! The writes the cloud carries out: sent to edgehub, then the cloud's answer waited for,
//! stored and passed to edged before the caller hears of it.

use std::sync::Arc;

use serde_json::Value;

use crate::cloud::refusal::Refusal;
use crate::cloud::remote::Answer;
use crate::message::{self, Message, Operation, API_SOURCE};
use crate::resource;
use crate::store::{Outcome, Write};
use crate::topics::Peer;

use super::super::rules;
use super::{ApiWrite, Context, Verb, WriteError, Written};

/// Sends the write to the cloud and waits for its answer, in a task that finishes the write
/// whether or not the caller still waits.
pub(super) async fn through_cloud(
    ctx: &Arc<Context>,
    write: ApiWrite,
) -> Result<Written, WriteError> {
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
        let Some(Answer { message, taken }) = answered else {
            tracing::warn!(resource = %key, ?timeout, "the cloud did not answer a write in time");
            return Err(WriteError::Timeout {
                key,
                timeout: humantime::format_duration(timeout).to_string(),
            });
        };
        let result = take_answer(&ctx, &write, &message).await;
        // Handled (its object stored and passed to edged): the answer's own step now settles
        // and acknowledges it.
        let _ = taken.send(());
        result
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
