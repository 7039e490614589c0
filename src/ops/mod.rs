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
//! - `patch`: a merge patch or JSON Patch of a stored object, from either side;
//! - `query`: answers from the store, or asks the cloud (`remote_query`);
//! - `relay`: edged's responses and errors, passed on to the cloud;
//! - `answer`: the cloud's responses and errors, to the remote query waiting for them or edged
//!   (an answer to a patch stores the object it carries first);
//! - `connect`: edgehub's report of the cloud connection;
//! - `sync`: `meta-internal-sync`, MetaSync on request;
//! - `api_write`: the local API's writes, through the cloud or, for what the edge owns,
//!   here while the cloud is away.

mod answer;
pub mod api_write;
mod change;
mod connect;
mod patch;
mod query;
mod relay;
mod remote_query;
mod rules;
mod sync;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::cloud::metasync::MetaSync;
use crate::cloud::outbox::Outbox;
use crate::cloud::remote::RemoteQueries;
use crate::cloud::waiting::WaitingPatches;
use crate::cloud::CloudState;
use crate::message::{self, Message, Operation};
use crate::metrics::{ErrorReason, Metrics};
use crate::mqtt::{Inbound, Publisher};
use crate::store::{Store, StoreError};
use crate::topics::{Peer, Topics};

/// What the operations use, given to them at construction.
pub struct Context {
    pub topics: Arc<Topics>,
    /// This node's name: the node whose status, and whose pods' status, the edge owns.
    pub node_id: String,
    pub store: Store,
    pub publisher: Publisher,
    pub outbox: Outbox,
    pub metasync: MetaSync,
    pub remote: Arc<RemoteQueries>,
    /// Patches passed on to the cloud, whose answers are stored.
    pub sent_patches: Arc<WaitingPatches>,
    pub cloud: CloudState,
    pub metrics: Arc<Metrics>,
    /// Types asked of the cloud when edged queries one that is not stored.
    pub remote_types: HashSet<String>,
    /// The largest payload MetaManager accepts (`mqtt.max_payload_bytes`).
    pub max_payload: usize,
    /// `meta.token_refresh_before`: see [`rules::token_state`].
    pub token_refresh_before: std::time::Duration,
}

impl Context {
    /// Everything built here from `settings`, `store` and `publisher`, with the cloud
    /// disconnected.
    pub fn new(
        settings: &crate::config::Settings,
        topics: Arc<Topics>,
        store: Store,
        publisher: Publisher,
    ) -> Self {
        let metrics = Arc::new(Metrics::new(store.metrics().clone()));
        let waiting = store.sent_patches().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read which patches wait for the cloud's answer; their answers will not be stored");
            Vec::new()
        });
        store.track_delivery(publisher.delivery.clone());
        let cloud = CloudState::default();
        let outbox = Outbox::new(store.clone(), publisher.clone(), cloud.clone());
        let metasync = MetaSync::new(
            store.clone(),
            outbox.clone(),
            cloud.clone(),
            metrics.clone(),
        );
        Self {
            topics,
            node_id: settings.node_id.clone(),
            store,
            publisher,
            outbox,
            metasync,
            remote: Arc::new(RemoteQueries::new(settings.meta.remote_query_timeout)),
            sent_patches: Arc::new(WaitingPatches::load(waiting)),
            cloud,
            metrics,
            remote_types: settings.meta.remote_types.iter().cloned().collect(),
            max_payload: settings.mqtt.max_payload_bytes,
            token_refresh_before: settings.meta.token_refresh_before,
        }
    }
}

/// The ordered remainder of one message's handling.
pub type Step = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Validates `publish`, queues its write if it has one, and returns the step that finishes it.
pub async fn dispatch(ctx: &Arc<Context>, publish: Inbound) -> Step {
    let Some(sender) = ctx.topics.sender(&publish.topic) else {
        tracing::warn!(topic = %publish.topic, "message on a topic MetaManager does not serve; ignored");
        return finish(ctx, publish);
    };
    let msg = match Message::decode_bytes(&publish.payload, ctx.max_payload) {
        Ok(msg) => msg,
        Err(e) => {
            ctx.metrics.received(sender.as_str(), "invalid");
            ctx.metrics.error(ErrorReason::Decode);
            let parent = message::salvage_msg_id(&publish.payload);
            let text = e.to_string();
            return refuse(ctx, sender, publish, parent, "", text);
        }
    };
    ctx.metrics
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
            change::change(ctx, sender, publish, msg, change::WriteKind::Put).await
        }
        Operation::Update => {
            change::change(ctx, sender, publish, msg, change::WriteKind::PutIfChanged).await
        }
        Operation::Delete => {
            change::change(ctx, sender, publish, msg, change::WriteKind::Delete).await
        }
        Operation::Patch => patch::patch(ctx, sender, publish, msg).await,
        Operation::Query => query::query(ctx, sender, publish, msg),
        Operation::Response | Operation::Error => match sender {
            Peer::Edged => relay::relay_from_edged(ctx, publish, msg).await,
            Peer::Edgehub => answer::answer_from_cloud(ctx, publish, msg).await,
        },
        Operation::Connect => connect::connect(ctx, sender, publish, msg),
        Operation::MetaInternalSync => sync::sync_now(ctx, sender, publish, msg),
    }
}

/// Marks `msg_id` settled once what was just handed to the MQTT client (its forward) is
/// acknowledged by the broker: with the store's first commit after that. A forward still
/// waiting in the client dies with the process, so until then the id stays unsettled, and a
/// redelivery after a crash is passed on again if it is still current.
pub(super) fn settle(ctx: &Context, msg_id: &str) {
    ctx.store.settle(msg_id, ctx.publisher.delivery.mark());
}

/// Only the broker ack is left to do.
pub(super) fn finish(ctx: &Arc<Context>, publish: Inbound) -> Step {
    let ctx = ctx.clone();
    Box::pin(async move { ctx.publisher.ack(&publish) })
}

/// An `error` reply to bad input, which leaves the store untouched.
pub(super) fn refuse(
    ctx: &Arc<Context>,
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
    let ctx = ctx.clone();
    Box::pin(async move {
        send_reply(&ctx, sender, reply, Operation::Error).await;
        ctx.publisher.ack(&publish);
    })
}

pub(super) fn refuse_message(
    ctx: &Arc<Context>,
    sender: Peer,
    publish: Inbound,
    msg: &Message,
    text: String,
) -> Step {
    ctx.metrics.error(ErrorReason::Invalid);
    let parent = Some(msg.msg_id().to_owned());
    refuse(ctx, sender, publish, parent, msg.resource.key(), text)
}

pub(super) fn store_failed(
    ctx: &Arc<Context>,
    sender: Peer,
    publish: Inbound,
    msg: Message,
    e: StoreError,
) -> Step {
    let ctx = ctx.clone();
    Box::pin(async move {
        report_store_error(&ctx, sender, &msg, &e).await;
        ctx.publisher.ack(&publish);
    })
}

/// The message for the cloud could not be queued (the cloud went away after the change was
/// committed, and the outbox write failed). The sender's retry, with the same msg_id, passes it
/// on: its id stays unsettled while its change is the stored state.
pub(super) async fn report_not_queued(ctx: &Context, sender: Peer, msg: &Message) {
    let key = msg.resource.key();
    let text = format!(
        "{} of {key} could not be queued for the cloud; send it again",
        msg.operation.as_str()
    );
    let reply = message::error(Some(msg.msg_id()), key, &text);
    send_reply(ctx, sender, reply, Operation::Error).await;
}

pub(super) async fn report_store_error(ctx: &Context, sender: Peer, msg: &Message, e: &StoreError) {
    let key = msg.resource.key();
    ctx.metrics.error(ErrorReason::Store);
    tracing::error!(resource = %key, operation = msg.operation.as_str(), error = %e, "store failed");
    let text = format!("{} of {key} failed: {e}", msg.operation.as_str());
    let reply = message::error(Some(msg.msg_id()), key, &text);
    send_reply(ctx, sender, reply, Operation::Error).await;
}

/// Sends a reply MetaManager built (an ack, a query result, an error) and counts it.
pub(super) async fn send_reply(ctx: &Context, to: Peer, payload: Vec<u8>, operation: Operation) {
    ctx.metrics.replied(operation.as_str());
    ctx.publisher.send(to, payload).await;
}

/// What the operations' unit tests share: a context with a real store in a temporary directory and
/// an in-memory broker ([`crate::mqtt::memory`]).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::Context;
    use crate::config::Settings;
    use crate::mqtt::memory::{self, MemoryBroker, Published};
    use crate::mqtt::Incoming;
    use crate::topics::{Peer, Topics};

    pub(crate) struct Harness {
        pub ctx: Arc<Context>,
        pub broker: MemoryBroker,
        /// Kept for the exporter of the metrics tests.
        pub connected: tokio::sync::watch::Receiver<bool>,
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
            let ctx = Arc::new(Context::new(
                &settings,
                Arc::new(topics),
                store,
                link.publisher.clone(),
            ));
            Self {
                ctx,
                broker,
                connected: link.connected.clone(),
                incoming,
                _dir: dir,
            }
        }

        /// The topic `peer` publishes to MetaManager on.
        pub fn from(&self, peer: Peer) -> String {
            let [edgehub, edged] = self.ctx.topics.inbound();
            match peer {
                Peer::Edgehub => edgehub.to_owned(),
                Peer::Edged => edged.to_owned(),
            }
        }

        /// The topic MetaManager publishes to `peer` on.
        pub fn to(&self, peer: Peer) -> String {
            self.ctx.topics.to(peer).to_owned()
        }

        /// Delivers `payload` from `peer` and runs its handling to the end, as the dispatcher
        /// and the pipeline do; returns the packet id its ack will name.
        pub async fn handle(&mut self, peer: Peer, payload: impl Into<bytes::Bytes>) -> u16 {
            let pkid = self.broker.deliver(&self.from(peer), payload);
            let message = self.incoming.recv().await.expect("delivered");
            super::dispatch(&self.ctx, message).await.await;
            pkid
        }

        /// edgehub reports the cloud connected (no reply; its ack is taken).
        pub async fn connect_cloud(&mut self) {
            let connect = message("c-1", "connect", "default/node/n", json!("cloud_connected"));
            self.handle(Peer::Edgehub, connect).await;
            self.broker.acked().await;
        }

        /// The next publish, which must go to `peer`.
        pub async fn published_to(&mut self, peer: Peer) -> Published {
            let published = self.broker.published().await;
            assert_eq!(published.topic, self.to(peer), "{:?}", published.json());
            published
        }

        pub async fn stored(&self, key: &str) -> Option<Value> {
            let json = self.ctx.store.get(key).await.expect("store reads")?;
            Some(serde_json::from_str(&json).expect("stored JSON"))
        }
    }

    /// A harness whose store holds the pod `default/pod/p`, its insert passed on, acked and
    /// settled.
    pub(crate) async fn with_pod_p() -> Harness {
        let mut h = Harness::new().await;
        h.handle(
            Peer::Edgehub,
            message("i-1", "insert", "default/pod/p", pod("p")),
        )
        .await;
        h.published_to(Peer::Edged).await;
        h.published_to(Peer::Edgehub).await;
        h.broker.acked().await;
        h
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
