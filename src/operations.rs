//! What MetaManager does with each operation.
//!
//! Handling is split in two so that writes can share a commit without losing order:
//! [`dispatch`] validates a message and queues its store write at once, then returns a [`Step`]:
//! the rest of the work (forward, reply, acknowledge to the broker), which the pipeline runs
//! strictly in arrival order. A step awaits its own commit before anything leaves, so no reply
//! or forward ever announces a change that is not on disk, and a query's step runs only after
//! every earlier write is committed, so edged always reads its own writes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use crate::mqtt::Inbound;
use serde_json::Value;

use crate::message::{self, Message, Operation};
use crate::metrics::RemoteOutcome;
use crate::node::Node;
use crate::outbox;
use crate::remote::Answer;
use crate::store::{self, Applied, Change, Committed, Outcome, StoreError, Write};
use crate::topics::Peer;

/// The ordered remainder of one message's handling.
pub type Step = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Validates `publish`, queues its write if it has one, and returns the step that finishes it.
pub async fn dispatch(node: &Arc<Node>, publish: Inbound) -> Step {
    let Some(sender) = node.topics.sender(&publish.topic) else {
        tracing::warn!(topic = %publish.topic, "message on a topic MetaManager does not serve; ignored");
        return finish(node, publish);
    };
    let msg = match Message::decode_bytes(&publish.payload, node.max_payload) {
        Ok(msg) => msg,
        Err(e) => {
            node.metrics.received(sender.as_str(), "invalid");
            node.metrics.error("decode");
            let parent = message::salvage_msg_id(&publish.payload);
            let text = e.to_string();
            return refuse(node, sender, publish, parent, "", text);
        }
    };
    node.metrics
        .received(sender.as_str(), msg.operation.as_str());
    tracing::debug!(
        from = sender.as_str(),
        operation = msg.operation.as_str(),
        resource = %msg.resource,
        msg_id = msg.msg_id(),
        "message"
    );
    match msg.operation {
        Operation::Insert => change(node, sender, publish, msg, WriteKind::Put).await,
        Operation::Update => change(node, sender, publish, msg, WriteKind::PutIfChanged).await,
        Operation::Delete => change(node, sender, publish, msg, WriteKind::Delete).await,
        Operation::Query => query(node, sender, publish, msg),
        Operation::Response | Operation::Error => match sender {
            Peer::Edged => relay_from_edged(node, publish, msg).await,
            Peer::Edgehub => answer_from_cloud(node, publish, msg).await,
        },
        Operation::Connect => connect(node, sender, publish, msg),
        Operation::MetaInternalSync => sync_now(node, sender, publish, msg),
    }
}

#[derive(Clone, Copy)]
enum WriteKind {
    Put,
    PutIfChanged,
    Delete,
}

/// insert, update, delete: store, then forward to the other side, then ack.
async fn change(
    node: &Arc<Node>,
    sender: Peer,
    publish: Inbound,
    msg: Message,
    kind: WriteKind,
) -> Step {
    let op = msg.operation.as_str();
    let Some(_) = msg.resource.name() else {
        let text = format!(
            "{op} needs a single object (namespace/type/name), not the list {}",
            msg.resource
        );
        return refuse_message(node, sender, publish, &msg, text);
    };
    let key = msg.resource.key().to_owned();
    let rtype = msg.resource.rtype().to_owned();
    let write = match kind {
        WriteKind::Delete => Write::Delete {
            uid: (rtype == "pod")
                .then(|| store::stored_uid(msg.content_json()))
                .flatten(),
            key,
        },
        WriteKind::Put | WriteKind::PutIfChanged => {
            let Some(value) = msg.content.clone() else {
                return refuse_message(node, sender, publish, &msg, format!("{op} needs content"));
            };
            match kind {
                WriteKind::Put => Write::Put { key, rtype, value },
                _ => Write::PutIfChanged { key, rtype, value },
            }
        }
    };
    let change = Change {
        msg_id: Some(msg.msg_id().to_owned()),
        write: Some(write),
        to_cloud: queue_for_cloud(node, sender.other(), &msg, &publish, kind),
        ..Change::default()
    };
    let committed = match node.store.submit(change).await {
        Ok(c) => c,
        Err(e) => return store_failed(node, sender, publish, msg, e),
    };
    let node = node.clone();
    Box::pin(async move {
        match committed.await.unwrap_or(Err(StoreError::Closed)) {
            Ok(applied) => {
                // An update that changes nothing is not news to the other side.
                let passed_on = applied.outcome == Outcome::Unchanged || {
                    let coalesce = matches!(kind, WriteKind::PutIfChanged);
                    forward(&node, sender.other(), &msg, &publish, applied, coalesce).await
                };
                if passed_on {
                    send_reply(&node, sender, message::ack(&msg), Operation::Response).await;
                } else {
                    report_not_queued(&node, sender, &msg).await;
                }
            }
            Err(e) => report_store_error(&node, sender, &msg, &e).await,
        }
        node.publisher.ack(&publish);
    })
}

/// The outbox entry for a change bound for the cloud, when it must wait for the cloud.
fn queue_for_cloud(
    node: &Node,
    to: Peer,
    msg: &Message,
    publish: &Inbound,
    kind: WriteKind,
) -> Option<store::CloudMessage> {
    (to == Peer::Edgehub && outbox::must_queue(node)).then(|| {
        let coalesce = matches!(kind, WriteKind::PutIfChanged);
        outbox::cloud_message(msg.resource.key(), publish.payload.clone(), coalesce)
    })
}

/// Passes an inbound message on, unchanged, once its change is committed, and settles its id.
///
/// A redelivery (same msg_id) of a settled message passes nothing on. An unsettled one was
/// cut off between its commit and its forward, or its forward was handed on but not yet
/// recorded before a restart: it is passed on again only while its change is still the
/// stored state, so a late copy of an insert never brings back what a later delete removed.
/// `false` when a message for the cloud could not be queued.
async fn forward(
    node: &Node,
    to: Peer,
    msg: &Message,
    publish: &Inbound,
    applied: Applied,
    coalesce: bool,
) -> bool {
    let id = msg.msg_id();
    if applied.settled() {
        return true;
    }
    match applied.outcome {
        Outcome::Duplicate { current: false, .. } => {
            tracing::info!(
                msg_id = id,
                resource = %msg.resource,
                "redelivered message superseded by a later change; acked, not passed on"
            );
            // Nothing to deliver: settled with the next commit.
            node.store.settle(id, 0);
            return true;
        }
        Outcome::Duplicate { .. } => tracing::info!(
            msg_id = id,
            "redelivered message may not have been passed on and is still current; passing it on"
        ),
        _ => {}
    }
    match to {
        Peer::Edged => {
            node.publisher
                .send(Peer::Edged, publish.payload.clone())
                .await
        }
        Peer::Edgehub => {
            let m = outbox::cloud_message(msg.resource.key(), publish.payload.clone(), coalesce);
            if let Err(e) = outbox::send_to_cloud(node, m).await {
                tracing::error!(msg_id = id, error = %e, "could not queue a message for the cloud");
                return false;
            }
        }
    }
    settle(node, id);
    true
}

/// Marks `msg_id` settled once what was just handed to the MQTT client (its forward) is
/// acknowledged by the broker: with the store's first commit after that. A forward still
/// waiting in the client dies with the process, so until then the id stays unsettled, and a
/// redelivery after a crash is passed on again if it is still current.
fn settle(node: &Node, msg_id: &str) {
    node.store.settle(msg_id, node.publisher.delivery.mark());
}

/// query: answer from the store; fetch from the cloud what edged may not have locally.
fn query(node: &Arc<Node>, sender: Peer, publish: Inbound, msg: Message) -> Step {
    let node = node.clone();
    Box::pin(async move {
        let r = &msg.resource;
        let found = match r.name() {
            Some(_) => node
                .store
                .get(r.key())
                .await
                .map(|v| v.into_iter().collect()),
            None => node
                .store
                .list(r.namespace(), r.rtype())
                .await
                .map(|rows| rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>()),
        };
        match found {
            Ok(objects)
                if objects.is_empty()
                    && sender == Peer::Edged
                    && node.remote_types.contains(r.rtype()) =>
            {
                remote_query(&node, msg).await;
            }
            Ok(objects) => {
                let content = message::raw_array(objects.iter().map(String::as_str));
                let reply = message::reply(&msg, Operation::Response, &content);
                send_reply(&node, sender, reply, Operation::Response).await;
            }
            Err(e) => report_store_error(&node, sender, &msg, &e).await,
        }
        node.publisher.ack(&publish);
    })
}

/// Asks the cloud for an object edged needs and the node does not hold, and answers edged when
/// the cloud does, or when it does not in time.
async fn remote_query(node: &Arc<Node>, query: Message) {
    let key = query.resource.key().to_owned();
    if !node.cloud_connected() {
        let text = format!("{key} is not stored on this node and the cloud is not connected");
        tracing::info!(resource = %key, "remote query refused: cloud not connected");
        node.metrics.remote_query(RemoteOutcome::Disconnected, None);
        let reply = message::error(Some(query.msg_id()), &key, &text);
        send_reply(node, Peer::Edged, reply, Operation::Error).await;
        return;
    }
    let id = message::new_msg_id();
    let answer = match node.remote.register(&id) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!(resource = %key, "{e}");
            node.metrics.remote_query(RemoteOutcome::Refused, None);
            let reply = message::error(Some(query.msg_id()), &key, &e.to_string());
            send_reply(node, Peer::Edged, reply, Operation::Error).await;
            return;
        }
    };
    let content = query.content_raw();
    let ask = message::build_with_id(id.clone(), None, Operation::Query, &key, &content);
    node.publisher.send(Peer::Edgehub, ask).await;
    let timeout = node.remote_query_timeout();
    let sent = Instant::now();
    let node = node.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answer)) => {
                let outcome = match answer.message.operation {
                    Operation::Error => RemoteOutcome::Error,
                    _ => RemoteOutcome::Answered,
                };
                node.metrics.remote_query(outcome, Some(sent.elapsed()));
                let answer_id = answer.message.msg_id().to_owned();
                fill_from_cloud(&node, &query, answer.message).await;
                // Settled once the reply to edged, queued just now, is acknowledged.
                settle(&node, &answer_id);
                node.publisher.ack(&answer.publish);
            }
            _ => {
                node.remote.forget(&id);
                node.metrics
                    .remote_query(RemoteOutcome::Timeout, Some(sent.elapsed()));
                tracing::warn!(resource = %key, ?timeout, "remote query timed out");
                let text = format!(
                    "the cloud did not answer the query for {key} in time ({})",
                    humantime::format_duration(timeout)
                );
                let reply = message::error(Some(query.msg_id()), &key, &text);
                send_reply(&node, Peer::Edged, reply, Operation::Error).await;
            }
        }
    });
}

/// Stores what the cloud sent for a remote query and answers edged with it.
async fn fill_from_cloud(node: &Node, query: &Message, answer: Message) {
    let key = query.resource.key();
    if answer.operation == Operation::Error {
        let content = answer.content_raw();
        let reply = message::reply(query, Operation::Error, &content);
        send_reply(node, Peer::Edged, reply, Operation::Error).await;
        return;
    }
    let mut objects = match serde_json::from_str::<Value>(answer.content_json()) {
        Ok(Value::Array(items)) => items,
        Ok(Value::Null) => Vec::new(),
        Ok(object @ Value::Object(_)) => vec![object],
        _ => {
            let text = format!("the cloud answered the query for {key} with content that is neither an object nor a list");
            let reply = message::error(Some(query.msg_id()), key, &text);
            send_reply(node, Peer::Edged, reply, Operation::Error).await;
            return;
        }
    };
    if let Some(name) = query.resource.name() {
        // One object was asked for: keep the one of that name, else the first.
        let named = objects
            .iter()
            .position(|o| o.pointer("/metadata/name").and_then(Value::as_str) == Some(name));
        objects = objects
            .into_iter()
            .nth(named.unwrap_or(0))
            .into_iter()
            .collect();
    }
    let mut pending = Vec::with_capacity(objects.len());
    let mut answered = Vec::with_capacity(objects.len());
    for object in objects {
        let json = object.to_string();
        let object_key = match query.resource.name() {
            Some(_) => Some(key.to_owned()),
            None => object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .and_then(|name| {
                    crate::resource::Resource::object(
                        query.resource.namespace(),
                        query.resource.rtype(),
                        name,
                    )
                    .ok()
                })
                .map(|r| r.key().to_owned()),
        };
        if let Some(object_key) = object_key {
            let write = Write::Put {
                key: object_key,
                rtype: query.resource.rtype().to_owned(),
                value: json.clone().into(),
            };
            if let Ok(committed) = node.store.submit(write).await {
                pending.push(committed);
            }
        }
        answered.push(json);
    }
    for committed in pending {
        if let Err(e) = committed.await.unwrap_or(Err(StoreError::Closed)) {
            tracing::warn!(resource = %key, error = %e, "could not store the cloud's answer; answering edged anyway");
        }
    }
    let content = message::raw_array(answered.iter().map(String::as_str));
    let reply = message::reply(query, Operation::Response, &content);
    send_reply(node, Peer::Edged, reply, Operation::Response).await;
}

/// edged's response or error: stored when it carries an object, relayed to the cloud unchanged.
async fn relay_from_edged(node: &Arc<Node>, publish: Inbound, msg: Message) -> Step {
    let stores = msg.operation == Operation::Response
        && msg.resource.name().is_some()
        && msg.content_json().starts_with('{');
    let write = stores.then(|| Write::Put {
        key: msg.resource.key().to_owned(),
        rtype: msg.resource.rtype().to_owned(),
        value: msg.content.clone().unwrap_or_default(),
    });
    let change = Change {
        msg_id: Some(msg.msg_id().to_owned()),
        write,
        to_cloud: queue_for_cloud(node, Peer::Edgehub, &msg, &publish, WriteKind::Put),
        ..Change::default()
    };
    let committed: Committed = match node.store.submit(change).await {
        Ok(c) => c,
        Err(e) => return store_failed(node, Peer::Edged, publish, msg, e),
    };
    let node = node.clone();
    Box::pin(async move {
        match committed.await.unwrap_or(Err(StoreError::Closed)) {
            Ok(applied) => {
                if !forward(&node, Peer::Edgehub, &msg, &publish, applied, false).await {
                    report_not_queued(&node, Peer::Edged, &msg).await;
                }
            }
            Err(e) => report_store_error(&node, Peer::Edged, &msg, &e).await,
        }
        node.publisher.ack(&publish);
    })
}

/// The cloud's response or error: completes the remote query it answers, else goes to edged.
async fn answer_from_cloud(node: &Arc<Node>, publish: Inbound, message: Message) -> Step {
    let change = Change {
        msg_id: Some(message.msg_id().to_owned()),
        ..Change::default()
    };
    let committed = match node.store.submit(change).await {
        Ok(c) => c,
        Err(e) => return store_failed(node, Peer::Edgehub, publish, message, e),
    };
    let node = node.clone();
    Box::pin(async move {
        // Nothing stored, so nothing can supersede an answer: an unsettled redelivery is
        // always handled again, a settled one only acked.
        if let Ok(Ok(applied)) = committed.await {
            if applied.settled() {
                node.publisher.ack(&publish);
                return;
            }
        }
        let id = message.msg_id().to_owned();
        // A claimed answer is settled by the query waiting for it, once it has replied.
        if let Err(unclaimed) = node.remote.complete(Answer { message, publish }) {
            node.publisher
                .send(Peer::Edged, unclaimed.publish.payload.clone())
                .await;
            settle(&node, &id);
            node.publisher.ack(&unclaimed.publish);
        }
    })
}

/// connect: edgehub reports whether the cloud is reachable. No reply.
fn connect(node: &Arc<Node>, sender: Peer, publish: Inbound, msg: Message) -> Step {
    if sender != Peer::Edgehub {
        let text = "connect is accepted only from edgehub".to_owned();
        return refuse_message(node, sender, publish, &msg, text);
    }
    let connected = match serde_json::from_str::<String>(msg.content_json()).as_deref() {
        Ok("cloud_connected") => true,
        Ok("cloud_disconnected") => false,
        _ => {
            let text = format!(
                "connect content must be \"cloud_connected\" or \"cloud_disconnected\", not {}",
                msg.content_json()
            );
            return refuse_message(node, sender, publish, &msg, text);
        }
    };
    if node.set_cloud_connected(connected) {
        tracing::info!(connected, "cloud connection changed");
    }
    finish(node, publish)
}

/// meta-internal-sync: run MetaSync now, then ack.
fn sync_now(node: &Arc<Node>, sender: Peer, publish: Inbound, msg: Message) -> Step {
    let node = node.clone();
    Box::pin(async move {
        match node.metasync.run(&node).await {
            Ok(report) => {
                tracing::info!(?report, "metasync on request");
                send_reply(&node, sender, message::ack(&msg), Operation::Response).await;
            }
            Err(e) => report_store_error(&node, sender, &msg, &e).await,
        }
        node.publisher.ack(&publish);
    })
}

/// Only the broker ack is left to do.
fn finish(node: &Arc<Node>, publish: Inbound) -> Step {
    let node = node.clone();
    Box::pin(async move { node.publisher.ack(&publish) })
}

/// An `error` reply to bad input, which leaves the store untouched.
fn refuse(
    node: &Arc<Node>,
    sender: Peer,
    publish: Inbound,
    parent: Option<String>,
    resource: &str,
    text: String,
) -> Step {
    tracing::warn!(
        from = sender.as_str(),
        msg_id = parent.as_deref().unwrap_or("-"),
        "rejected message: {text}"
    );
    let reply = message::error(parent.as_deref(), resource, &text);
    let node = node.clone();
    Box::pin(async move {
        send_reply(&node, sender, reply, Operation::Error).await;
        node.publisher.ack(&publish);
    })
}

fn refuse_message(
    node: &Arc<Node>,
    sender: Peer,
    publish: Inbound,
    msg: &Message,
    text: String,
) -> Step {
    node.metrics.error("invalid");
    let parent = Some(msg.msg_id().to_owned());
    refuse(node, sender, publish, parent, msg.resource.key(), text)
}

fn store_failed(
    node: &Arc<Node>,
    sender: Peer,
    publish: Inbound,
    msg: Message,
    e: StoreError,
) -> Step {
    let node = node.clone();
    Box::pin(async move {
        report_store_error(&node, sender, &msg, &e).await;
        node.publisher.ack(&publish);
    })
}

/// The message for the cloud could not be queued (the cloud went away after the change was
/// committed, and the outbox write failed). The sender's retry, with the same msg_id, passes it
/// on: its id stays unsettled while its change is the stored state.
async fn report_not_queued(node: &Node, sender: Peer, msg: &Message) {
    let key = msg.resource.key();
    let text = format!(
        "{} of {key} could not be queued for the cloud; send it again",
        msg.operation.as_str()
    );
    let reply = message::error(Some(msg.msg_id()), key, &text);
    send_reply(node, sender, reply, Operation::Error).await;
}

async fn report_store_error(node: &Node, sender: Peer, msg: &Message, e: &StoreError) {
    let key = msg.resource.key();
    node.metrics.error("store");
    tracing::error!(resource = %key, operation = msg.operation.as_str(), error = %e, "store failed");
    let text = format!("{} of {key} failed: {e}", msg.operation.as_str());
    let reply = message::error(Some(msg.msg_id()), key, &text);
    send_reply(node, sender, reply, Operation::Error).await;
}

/// Sends a reply MetaManager built (an ack, a query result, an error) and counts it.
async fn send_reply(node: &Node, to: Peer, payload: Vec<u8>, operation: Operation) {
    node.metrics.replied(operation.as_str());
    node.publisher.send(to, payload).await;
}
