//! What MetaManager does with each operation, one file per operation.
//!
//! The ordering invariant, enforced here and nowhere else: messages are submitted in arrival
//! order, their steps run in that order, and a step's commit comes before anything it sends.
//! [`dispatch`] validates a message and queues its store write at once, then returns a [`Step`]:
//! the rest of the work (forward, reply, acknowledge to the broker), which the pipeline runs
//! strictly in arrival order. A step awaits its own commit before anything leaves, so no reply
//! or forward ever announces a change that is not on disk, and a query's step runs only after
//! every earlier write is committed, so edged always reads its own writes. Writes queued one
//! after another share a group commit without losing that order.
//!
//! - `change`: insert, update and delete, from either side;
//! - `query`: answers from the store, or asks the cloud (`remote_query`);
//! - `relay`: edged's responses and errors, passed on to the cloud;
//! - `answer`: the cloud's responses and errors, to the remote query waiting for them or edged;
//! - `connect`: edgehub's report of the cloud connection;
//! - `sync`: `meta-internal-sync`, MetaSync on request.

mod answer;
mod change;
mod connect;
mod query;
mod relay;
mod remote_query;
mod sync;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::message::{self, Message, Operation};
use crate::mqtt::Inbound;
use crate::node::Node;
use crate::store::StoreError;
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
        Operation::Insert => {
            change::change(node, sender, publish, msg, change::WriteKind::Put).await
        }
        Operation::Update => {
            change::change(node, sender, publish, msg, change::WriteKind::PutIfChanged).await
        }
        Operation::Delete => {
            change::change(node, sender, publish, msg, change::WriteKind::Delete).await
        }
        Operation::Query => query::query(node, sender, publish, msg),
        Operation::Response | Operation::Error => match sender {
            Peer::Edged => relay::relay_from_edged(node, publish, msg).await,
            Peer::Edgehub => answer::answer_from_cloud(node, publish, msg).await,
        },
        Operation::Connect => connect::connect(node, sender, publish, msg),
        Operation::MetaInternalSync => sync::sync_now(node, sender, publish, msg),
    }
}

/// Marks `msg_id` settled once what was just handed to the MQTT client (its forward) is
/// acknowledged by the broker: with the store's first commit after that. A forward still
/// waiting in the client dies with the process, so until then the id stays unsettled, and a
/// redelivery after a crash is passed on again if it is still current.
pub(super) fn settle(node: &Node, msg_id: &str) {
    node.store.settle(msg_id, node.publisher.delivery.mark());
}

/// Only the broker ack is left to do.
pub(super) fn finish(node: &Arc<Node>, publish: Inbound) -> Step {
    let node = node.clone();
    Box::pin(async move { node.publisher.ack(&publish) })
}

/// An `error` reply to bad input, which leaves the store untouched.
pub(super) fn refuse(
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

pub(super) fn refuse_message(
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

pub(super) fn store_failed(
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
pub(super) async fn report_not_queued(node: &Node, sender: Peer, msg: &Message) {
    let key = msg.resource.key();
    let text = format!(
        "{} of {key} could not be queued for the cloud; send it again",
        msg.operation.as_str()
    );
    let reply = message::error(Some(msg.msg_id()), key, &text);
    send_reply(node, sender, reply, Operation::Error).await;
}

pub(super) async fn report_store_error(node: &Node, sender: Peer, msg: &Message, e: &StoreError) {
    let key = msg.resource.key();
    node.metrics.error("store");
    tracing::error!(resource = %key, operation = msg.operation.as_str(), error = %e, "store failed");
    let text = format!("{} of {key} failed: {e}", msg.operation.as_str());
    let reply = message::error(Some(msg.msg_id()), key, &text);
    send_reply(node, sender, reply, Operation::Error).await;
}

/// Sends a reply MetaManager built (an ack, a query result, an error) and counts it.
pub(super) async fn send_reply(node: &Node, to: Peer, payload: Vec<u8>, operation: Operation) {
    node.metrics.replied(operation.as_str());
    node.publisher.send(to, payload).await;
}

/// What the operations' unit tests share: a node with a real store in a temporary directory and
/// an in-memory broker ([`crate::mqtt::memory`]).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use crate::config::Settings;
    use crate::mqtt::memory::{self, MemoryBroker, Published};
    use crate::mqtt::Incoming;
    use crate::node::Node;
    use crate::topics::{Peer, Topics};

    pub(crate) struct Harness {
        pub node: Arc<Node>,
        pub broker: MemoryBroker,
        incoming: Incoming,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        pub async fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let settings = Settings::from_yaml("").expect("defaults parse");
            let store = crate::store::Store::open(
                &dir.path().join("m.db"),
                crate::store::StoreOptions::default(),
            )
            .expect("store opens");
            let topics = Topics::new("edge", "test-node");
            let (link, incoming, broker) = memory::link(topics.clone());
            let node = Arc::new(Node::new(
                &settings,
                Arc::new(topics),
                store,
                link.publisher.clone(),
                link.connected.clone(),
            ));
            Self {
                node,
                broker,
                incoming,
                _dir: dir,
            }
        }

        /// The topic `peer` publishes to MetaManager on.
        pub fn from(&self, peer: Peer) -> String {
            let [edgehub, edged] = self.node.topics.inbound();
            match peer {
                Peer::Edgehub => edgehub.to_owned(),
                Peer::Edged => edged.to_owned(),
            }
        }

        /// The topic MetaManager publishes to `peer` on.
        pub fn to(&self, peer: Peer) -> String {
            self.node.topics.to(peer).to_owned()
        }

        /// Delivers `payload` from `peer` and runs its handling to the end, as the dispatcher
        /// and the pipeline do; returns the packet id its ack will name.
        pub async fn handle(&mut self, peer: Peer, payload: impl Into<bytes::Bytes>) -> u16 {
            let pkid = self.broker.deliver(&self.from(peer), payload);
            let message = self.incoming.recv().await.expect("delivered");
            super::dispatch(&self.node, message).await.await;
            pkid
        }

        /// The next publish, which must go to `peer`.
        pub async fn published_to(&mut self, peer: Peer) -> Published {
            let published = self.broker.published().await;
            assert_eq!(published.topic, self.to(peer), "{:?}", published.json());
            published
        }

        pub async fn stored(&self, key: &str) -> Option<Value> {
            let json = self.node.store.get(key).await.expect("store reads")?;
            Some(serde_json::from_str(&json).expect("stored JSON"))
        }
    }

    /// A message as the wire carries it.
    pub(crate) fn message(msg_id: &str, operation: &str, resource: &str, content: Value) -> String {
        let mut m = json!({
            "header": {"msg_id": msg_id},
            "route": {"source": "test", "group": "resource", "operation": operation, "resource": resource},
        });
        if !content.is_null() {
            m["content"] = content;
        }
        m.to_string()
    }

    /// A pod object named `name`.
    pub(crate) fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}})
    }
}
