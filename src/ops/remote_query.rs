//! A query for an object edged needs and the node does not hold (or holds a token of that is
//! expiring): asked of the cloud, once for all who ask for the same resource meanwhile, and
//! answered to each when the cloud answers or when it does not in time.

use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use serde_json::Value;

use crate::cloud::remote::{Answer, Askers, Joined};
use crate::message::{self, Message, Operation};
use crate::metrics::RemoteOutcome;
use crate::resource::Resource;
use crate::store::{Store, StoreError, Write};
use crate::topics::Peer;

use super::outcome::Outcome;
use super::{Context, Replies};

/// Asks the cloud for the resource of `query`, unless it is being asked already, and answers
/// every asker when the cloud does, or when it does not in time. `fallback` is served instead
/// of an error if the cloud cannot answer (a stored token that has not expired yet).
pub(super) async fn remote_query(
    ctx: &Context,
    query: Message,
    fallback: Option<String>,
) -> Outcome {
    let key = query.resource.key().to_owned();
    let asker = query.msg_id().to_owned();
    let (replies, cloud) = (&ctx.replies, &ctx.cloud);
    if !cloud.state.connected() {
        let text = format!("{key} is not stored on this node and the cloud is not connected");
        tracing::info!(resource = %key, "remote query refused: cloud not connected");
        replies
            .metrics
            .remote_query(RemoteOutcome::Disconnected, None);
        let reply = message::error(Some(&asker), &key, &text);
        return Outcome::Failed {
            reason: None,
            reply,
        };
    }
    let content = query.content_raw();
    let (id, mut answer) = match cloud.remote.join(&key, query, fallback) {
        Ok(Joined::First { id, answer }) => (id, answer),
        Ok(Joined::Waiting) => {
            tracing::debug!(resource = %key, msg_id = %asker, "remote query joins one in flight");
            return Outcome::Quiet;
        }
        Err(e) => {
            tracing::warn!(resource = %key, "{e}");
            replies.metrics.remote_query(RemoteOutcome::Refused, None);
            let reply = message::error(Some(&asker), &key, &e.to_string());
            return Outcome::Failed {
                reason: None,
                reply,
            };
        }
    };
    let ask = message::build_with_id(id, None, Operation::Query, &key, &content);
    replies.publisher.send(Peer::Edgehub, ask).await;
    let timeout = cloud.remote.timeout();
    let sent = Instant::now();
    let (replies, store, remote) = (replies.clone(), ctx.store.clone(), cloud.remote.clone());
    tokio::spawn(async move {
        let waited = tokio::time::timeout(timeout, &mut answer).await;
        let askers = remote.finish(&key);
        let answered = match waited {
            Ok(answered) => answered.ok(),
            Err(_) => answer.try_recv().ok(),
        };
        match answered {
            // Told once the answer is stored and every asker answered: the answer's own step
            // then settles and acknowledges it.
            Some(Answer { message, taken }) => {
                let outcome = match message.operation {
                    Operation::Error => RemoteOutcome::Error,
                    _ => RemoteOutcome::Answered,
                };
                replies.metrics.remote_query(outcome, Some(sent.elapsed()));
                fill_from_cloud(&replies, &store, &key, &askers, message).await;
                let _ = taken.send(());
            }
            None => {
                replies
                    .metrics
                    .remote_query(RemoteOutcome::Timeout, Some(sent.elapsed()));
                timed_out(&replies, &key, &askers, timeout).await;
            }
        }
    });
    Outcome::Quiet
}

async fn timed_out(replies: &Replies, key: &str, askers: &Askers, timeout: Duration) {
    tracing::warn!(resource = %key, ?timeout, "remote query timed out");
    let text = format!(
        "the cloud did not answer the query for {key} in time ({})",
        humantime::format_duration(timeout)
    );
    if !serve_fallback(replies, key, askers).await {
        error_to_all(replies, askers, key, &text).await;
    }
}

/// Answers every asker with the stored copy when there is one to fall back on; `false` when
/// there is none.
async fn serve_fallback(replies: &Replies, key: &str, askers: &Askers) -> bool {
    let Some(stored) = &askers.fallback else {
        return false;
    };
    tracing::info!(resource = %key, "the cloud could not refresh it; serving the stored copy, which has not expired");
    let content = message::raw_array([stored.as_str()]);
    reply_to_all(replies, askers, Operation::Response, &content).await;
    true
}

/// Sends every asker a reply of `operation` with `content`.
async fn reply_to_all(
    replies: &Replies,
    askers: &Askers,
    operation: Operation,
    content: &RawValue,
) {
    for query in &askers.queries {
        let reply = message::reply(query, operation, content);
        replies.send(Peer::Edged, reply, operation).await;
    }
}

/// Sends every asker an `error` of MetaManager's own, saying `text` about `key`.
async fn error_to_all(replies: &Replies, askers: &Askers, key: &str, text: &str) {
    for query in &askers.queries {
        let reply = message::error(Some(query.msg_id()), key, text);
        replies.send(Peer::Edged, reply, Operation::Error).await;
    }
}

/// Stores what the cloud sent for a remote query and answers every asker with it.
async fn fill_from_cloud(
    replies: &Replies,
    store: &Store,
    key: &str,
    askers: &Askers,
    answer: Message,
) {
    let Some(first) = askers.queries.first() else {
        return;
    };
    let resource = &first.resource;
    if answer.operation == Operation::Error {
        if serve_fallback(replies, key, askers).await {
            return;
        }
        let content = answer.content_raw();
        reply_to_all(replies, askers, Operation::Error, &content).await;
        return;
    }
    let Some(objects) = answered_objects(&answer, resource.name()) else {
        let text = format!("the cloud answered the query for {key} with content that is neither an object nor a list");
        error_to_all(replies, askers, key, &text).await;
        return;
    };
    let answered = store_answer(store, key, resource, objects).await;
    let content = message::raw_array(answered.iter().map(String::as_str));
    reply_to_all(replies, askers, Operation::Response, &content).await;
}

/// Stores each object of the cloud's answer to the query of `resource` (at `key` when one
/// object was asked for, else by its name), all submitted before any is waited for; the
/// objects' JSON, in the answer's order. An object not stored is still answered. An object
/// older than the one stored meanwhile (the cloud pushed an update between taking its answer and
/// the answer's arrival) is held back, as any stale update is, and answered as stored.
async fn store_answer(
    store: &Store,
    key: &str,
    resource: &Resource,
    objects: Vec<Value>,
) -> Vec<String> {
    let mut pending = Vec::with_capacity(objects.len());
    let mut answered = Vec::with_capacity(objects.len());
    for object in objects {
        let json = object.to_string();
        let object_key = match resource.name() {
            Some(_) => Some(key.to_owned()),
            None => object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .and_then(|name| {
                    Resource::object(resource.namespace(), resource.rtype(), name).ok()
                })
                .map(|r| r.key().to_owned()),
        };
        if let Some(object_key) = object_key {
            let write = Write::PutIfChanged {
                key: object_key.clone(),
                rtype: resource.rtype().to_owned(),
                value: json.clone().into(),
            };
            if let Ok(committed) = store.submit(write).await {
                pending.push((answered.len(), object_key, committed));
            }
        }
        answered.push(json);
    }
    for (at, object_key, committed) in pending {
        match committed.await.unwrap_or(Err(StoreError::Closed)) {
            Ok(applied) if applied.outcome == crate::store::Outcome::Stale => {
                // At debug level, as a stale update is: a list answer can hold many.
                tracing::debug!(resource = %object_key, "the cloud's answer is older than the object stored meanwhile; answering with the stored one");
                if let Ok(Some(stored)) = store.get(&object_key).await {
                    answered[at] = stored;
                }
            }
            Ok(_) => {}
            // The store logs its full state once; not once per answer.
            Err(StoreError::StorageFull(_)) => {}
            Err(e) => {
                tracing::warn!(resource = %key, error = %e, "could not store the cloud's answer; answering edged anyway");
            }
        }
    }
    answered
}

/// The objects in the cloud's answer to a query, `None` when its content is neither an object
/// nor a list; when one object was asked for (`name`), only the one of that name, else the
/// first.
fn answered_objects(answer: &Message, name: Option<&str>) -> Option<Vec<Value>> {
    let objects = match serde_json::from_str::<Value>(answer.content_json()) {
        Ok(Value::Array(items)) => items,
        Ok(Value::Null) => Vec::new(),
        Ok(object @ Value::Object(_)) => vec![object],
        _ => return None,
    };
    let Some(name) = name else {
        return Some(objects);
    };
    let named = objects
        .iter()
        .position(|o| o.pointer("/metadata/name").and_then(Value::as_str) == Some(name));
    Some(
        objects
            .into_iter()
            .nth(named.unwrap_or(0))
            .into_iter()
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::ops::testing::{message, Harness};
    use crate::topics::Peer;

    fn configmap(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}, "data": {"k": "v"}})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_the_cloud_a_missing_configmap_is_an_error_at_once() {
        let mut h = Harness::new().await;
        let pkid = h
            .handle(
                Peer::Edged,
                message("q-1", "query", "default/configmap/c", Value::Null),
            )
            .await;
        let text = h.error_to(Peer::Edged).await;
        assert!(text.contains("cloud is not connected"), "{text}");
        assert_eq!(h.broker.acked().await, pkid);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cloud_is_asked_and_its_answer_is_stored_and_given_to_edged() {
        let mut h = Harness::new().await;
        h.connect_cloud().await;
        let asked = h
            .handle(
                Peer::Edged,
                message("q-1", "query", "default/configmap/c", Value::Null),
            )
            .await;
        let ask = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(ask["route"]["operation"], "query");
        assert_eq!(ask["route"]["resource"], "default/configmap/c");
        let asked_id = ask["header"]["msg_id"].as_str().unwrap().to_owned();

        let answer = json!({
            "header": {"msg_id": "cloud-1", "parent_msg_id": asked_id},
            "route": {"source": "cloud", "group": "meta", "operation": "response", "resource": "default/configmap/c"},
            "content": [configmap("c")],
        });
        let answered = h.handle(Peer::Edgehub, answer.to_string()).await;
        let reply = h.published_to(Peer::Edged).await.json();
        assert_eq!(reply["header"]["parent_msg_id"], "q-1");
        assert_eq!(reply["content"], json!([configmap("c")]));
        assert_eq!(h.stored("default/configmap/c").await, Some(configmap("c")));
        // The query is acked once asked; the answer once stored and answered, beside the
        // pipeline.
        let acked = [h.broker.acked().await, h.broker.acked().await];
        assert!(acked.contains(&asked), "the query is acked: {acked:?}");
        assert!(acked.contains(&answered), "the answer is acked: {acked:?}");
    }

    /// The cloud can change an object between taking its answer and the answer's arrival: an
    /// update pushed meanwhile reaches the node first. The late answer must not overwrite it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_older_than_an_update_stored_meanwhile_is_not_stored() {
        let at = |rv: &str| {
            let mut c = configmap("c");
            c["metadata"]["resourceVersion"] = json!(rv);
            c
        };
        let mut h = Harness::new().await;
        h.connect_cloud().await;
        h.handle(
            Peer::Edged,
            message("q-1", "query", "default/configmap/c", Value::Null),
        )
        .await;
        let ask = h.published_to(Peer::Edgehub).await.json();
        let asked_id = ask["header"]["msg_id"].as_str().unwrap().to_owned();

        h.cloud_writes("u-1", "update", "default/configmap/c", at("6"))
            .await;
        assert_eq!(h.stored("default/configmap/c").await, Some(at("6")));

        let answer = json!({
            "header": {"msg_id": "cloud-1", "parent_msg_id": asked_id},
            "route": {"source": "cloud", "group": "meta", "operation": "response", "resource": "default/configmap/c"},
            "content": [at("5")],
        });
        h.handle(Peer::Edgehub, answer.to_string()).await;
        let reply = h.published_to(Peer::Edged).await.json();
        assert_eq!(reply["header"]["parent_msg_id"], "q-1");
        assert_eq!(
            reply["content"],
            json!([at("6")]),
            "edged gets the newer object"
        );
        assert_eq!(h.stored("default/configmap/c").await, Some(at("6")));
    }
}
