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
//! - `bridge_state`: the bridge's report of it, on `cloud_link.state_topic`;
//! - `sync`: `meta-internal-sync`, MetaSync on request;
//! - `versions`: a query for a scope's resourceVersions, a page at a time;
//! - `replace`: the cloud's complete set of a scope, in pages, applied in one transaction;
//! - `api_write`: the local API's writes, through the cloud or, for what the edge owns,
//!   here while the cloud is away.
//!
//! Each operation is given the handles it uses, and its signature says which: [`Replies`] (the
//! way back to the peers, counted), the [`Store`], the [`Cloud`] side, and the node's
//! [`Rules`]. [`Ops`] holds them for the dispatcher; the API's writes have their own handle,
//! [`api_write::ApiWrites`]. `app` builds them.

mod answer;
pub mod api_write;
mod bridge_state;
mod change;
mod connect;
mod patch;
mod query;
mod relay;
mod remote_query;
mod replace;
mod rules;
mod sync;
mod versions;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::cloud::Cloud;
use crate::message::{self, Message, Operation};
use crate::metrics::{ErrorReason, Metrics};
use crate::mqtt::{Inbound, Publisher};
use crate::store::{Store, StoreError};
use crate::topics::{Peer, Topics};

pub use rules::Rules;

/// The way back to the peers: the replies MetaManager builds, counted with what it received,
/// the messages it passes on, and the broker acks of what it received. Cheap to clone.
#[derive(Clone)]
pub struct Replies {
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
}

impl Replies {
    /// Sends a reply MetaManager built (an ack, a query result, an error) and counts it.
    pub(crate) async fn send(&self, to: Peer, payload: Vec<u8>, operation: Operation) {
        self.metrics.replied(operation.as_str());
        self.publisher.send(to, payload).await;
    }

    /// Marks `msg_id` settled in `store` once what was just handed to the MQTT client (its
    /// forward) is acknowledged by the broker: with the store's first commit after that. A
    /// forward still waiting in the client dies with the process, so until then the id stays
    /// unsettled, and a redelivery after a crash is passed on again if it is still current.
    pub(crate) fn settle(&self, store: &Store, msg_id: &str) {
        store.settle(msg_id, self.publisher.delivery.mark());
    }
}

/// What the dispatcher hands each operation, which takes the parts it uses.
pub struct Ops {
    topics: Arc<Topics>,
    replies: Replies,
    store: Store,
    cloud: Cloud,
    rules: Arc<Rules>,
}

/// The ordered remainder of one message's handling.
pub type Step = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Ops {
    pub fn new(
        topics: Arc<Topics>,
        replies: Replies,
        store: Store,
        cloud: Cloud,
        rules: Arc<Rules>,
    ) -> Self {
        Self {
            topics,
            replies,
            store,
            cloud,
            rules,
        }
    }

    /// The first step of a run, before any message's: what the last run left to send edged
    /// (a replace's forwards the broker had not acknowledged).
    pub fn resend_forwards(&self) -> Step {
        replace::resend_forwards(&self.replies, &self.store)
    }

    /// Validates `publish`, queues its write if it has one, and returns the step that
    /// finishes it.
    pub async fn dispatch(&self, publish: Inbound) -> Step {
        let Self {
            topics,
            replies,
            store,
            cloud,
            rules,
        } = self;
        if topics.is_bridge_state(&publish.topic) {
            return bridge_state::bridge_state(replies, cloud, publish);
        }
        let Some(sender) = topics.sender(&publish.topic) else {
            tracing::warn!(topic = %publish.topic, "message on a topic MetaManager does not serve; ignored");
            return finish(replies, publish);
        };
        let msg = match Message::decode_bytes(&publish.payload, rules.max_payload) {
            Ok(msg) => msg,
            Err(e) => {
                replies.metrics.received(sender.as_str(), "invalid");
                replies.metrics.error(ErrorReason::Decode);
                let parent = message::salvage_msg_id(&publish.payload);
                let text = e.to_string();
                return refuse(replies, sender, publish, parent, "", text);
            }
        };
        replies
            .metrics
            .received(sender.as_str(), msg.operation.as_str());
        tracing::debug!(
            from = sender.as_str(),
            operation = msg.operation.as_str(),
            resource = %msg.resource,
            msg_id = msg.msg_id(),
            "message"
        );
        let kind = match msg.operation {
            Operation::Insert => change::WriteKind::Put,
            Operation::Update => change::WriteKind::PutIfChanged,
            Operation::Delete => change::WriteKind::Delete,
            Operation::Patch => {
                let max_payload = rules.max_payload;
                return patch::patch(replies, store, cloud, max_payload, sender, publish, msg)
                    .await;
            }
            Operation::Query => {
                return query::query(replies, store, cloud, rules, sender, publish, msg)
            }
            Operation::Response | Operation::Error => {
                return match sender {
                    Peer::Edged => {
                        relay::relay_from_edged(replies, store, cloud, publish, msg).await
                    }
                    Peer::Edgehub => {
                        answer::answer_from_cloud(replies, store, cloud, publish, msg).await
                    }
                }
            }
            Operation::Connect => return connect::connect(replies, cloud, sender, publish, msg),
            Operation::MetaInternalSync => {
                return sync::sync_now(replies, &cloud.metasync, sender, publish, msg)
            }
            Operation::Replace => {
                return replace::replace(replies, store, &cloud.replaces, sender, publish, msg)
                    .await
            }
            // Never parsed from a message (see `Operation::Digest`); refused all the same.
            Operation::Digest => {
                let text = "digest is sent by MetaManager, not accepted".to_owned();
                return refuse_message(replies, sender, publish, &msg, text);
            }
        };
        change::change(replies, store, cloud, sender, publish, msg, kind).await
    }
}

/// Only the broker ack is left to do.
pub(super) fn finish(replies: &Replies, publish: Inbound) -> Step {
    let replies = replies.clone();
    Box::pin(async move { replies.publisher.ack(&publish) })
}

/// An `error` reply to bad input, which leaves the store untouched.
pub(super) fn refuse(
    replies: &Replies,
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
    let replies = replies.clone();
    Box::pin(async move {
        replies.send(sender, reply, Operation::Error).await;
        replies.publisher.ack(&publish);
    })
}

pub(super) fn refuse_message(
    replies: &Replies,
    sender: Peer,
    publish: Inbound,
    msg: &Message,
    text: String,
) -> Step {
    replies.metrics.error(ErrorReason::Invalid);
    let parent = Some(msg.msg_id().to_owned());
    refuse(replies, sender, publish, parent, msg.resource.key(), text)
}

pub(super) fn store_failed(
    replies: &Replies,
    sender: Peer,
    publish: Inbound,
    msg: Message,
    e: StoreError,
) -> Step {
    let replies = replies.clone();
    Box::pin(async move {
        report_store_error(&replies, sender, &msg, &e).await;
        replies.publisher.ack(&publish);
    })
}

/// The end of an operation answered from the store: a `response` with `content`, or an `error`
/// reply for the store's failure; then the broker ack.
pub(super) async fn respond(
    replies: &Replies,
    sender: Peer,
    publish: &Inbound,
    msg: &Message,
    content: Result<Box<RawValue>, StoreError>,
) {
    match content {
        Ok(content) => {
            let reply = message::reply(msg, Operation::Response, &content);
            replies.send(sender, reply, Operation::Response).await;
        }
        Err(e) => report_store_error(replies, sender, msg, &e).await,
    }
    replies.publisher.ack(publish);
}

/// The message for the cloud could not be queued (the cloud went away after the change was
/// committed, and the outbox write failed). The sender's retry, with the same msg_id, passes it
/// on: its id stays unsettled while its change is the stored state.
pub(super) async fn report_not_queued(replies: &Replies, sender: Peer, msg: &Message) {
    let key = msg.resource.key();
    let text = format!(
        "{} of {key} could not be queued for the cloud; send it again",
        msg.operation.as_str()
    );
    let reply = message::error(Some(msg.msg_id()), key, &text);
    replies.send(sender, reply, Operation::Error).await;
}

pub(super) async fn report_store_error(
    replies: &Replies,
    sender: Peer,
    msg: &Message,
    e: &StoreError,
) {
    let key = msg.resource.key();
    let text = match e {
        // The store logs the state, once; its text leads, as topics.md promises.
        StoreError::StorageFull(full) => {
            replies.metrics.error(ErrorReason::StorageFull);
            format!("{full} ({} of {key} refused)", msg.operation.as_str())
        }
        e => {
            replies.metrics.error(ErrorReason::Store);
            tracing::error!(resource = %key, operation = msg.operation.as_str(), error = %e, "store failed");
            format!("{} of {key} failed: {e}", msg.operation.as_str())
        }
    };
    let reply = message::error(Some(msg.msg_id()), key, &text);
    replies.send(sender, reply, Operation::Error).await;
}

/// What the operations' unit tests share: the parts of a node with a real store in a temporary directory and
/// an in-memory broker ([`crate::mqtt::memory`]).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::{Ops, Replies, Rules};
    use crate::cloud::settings::{CloudLinkSettings, MetaSettings};
    use crate::cloud::Cloud;
    use crate::metrics::Metrics;
    use crate::mqtt::memory::{self, MemoryBroker, Published};
    use crate::mqtt::settings::MqttSettings;
    use crate::mqtt::Incoming;
    use crate::store::Store;
    use crate::topics::{Peer, Topics};

    /// The sections of the config file the operations are given, read as the file's are. Not
    /// `crate::config::Settings`: that gathers the HTTP endpoint's settings too, and the
    /// endpoint uses the operations.
    #[derive(Default, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Settings {
        mqtt: MqttSettings,
        meta: MetaSettings,
        cloud_link: CloudLinkSettings,
    }

    impl Settings {
        fn from_yaml(yaml: &str) -> Self {
            if yaml.trim().is_empty() {
                return Self::default();
            }
            serde_saphyr::from_str(yaml).expect("settings parse")
        }
    }

    /// The parts of a node the operations are given, each kept for the tests to look at.
    pub(crate) struct Harness {
        pub ops: Ops,
        pub topics: Arc<Topics>,
        pub store: Store,
        pub cloud: Cloud,
        pub replies: Replies,
        pub broker: MemoryBroker,
        incoming: Incoming,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        pub async fn new() -> Self {
            Self::with_settings("").await
        }

        /// A harness whose settings are the defaults with `yaml` on top.
        pub async fn with_settings(yaml: &str) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let settings = Settings::from_yaml(yaml);
            let db = dir.path().join("m.db");
            let store = Store::open(&db, Default::default()).expect("store opens");
            let topics = Arc::new(
                Topics::new("edge", "test-node")
                    .with_bridge_state(settings.cloud_link.state_topic.clone()),
            );
            let (link, incoming, broker) = memory::link((*topics).clone());
            store.track_delivery(link.publisher.delivery.clone());
            let replies = Replies {
                metrics: Arc::new(Metrics::new(store.metrics().clone())),
                publisher: link.publisher.clone(),
            };
            let timeout = settings.meta.remote_query_timeout;
            let sync = crate::cloud::metasync::SyncPlan {
                node_id: "test-node".into(),
                max_payload: settings.mqtt.max_payload_bytes,
                full_interval: settings.meta.sync.podstatus.full_interval,
            };
            let cloud = Cloud::new(
                &store,
                &link.publisher,
                replies.metrics.clone(),
                timeout,
                sync,
                settings.cloud_link.bridge_words(),
            );
            // The config file's default node name, which the rules have always had here.
            let rules = Arc::new(Rules::new("edge-node", &settings.meta, &settings.mqtt));
            Self {
                ops: Ops::new(
                    topics.clone(),
                    replies.clone(),
                    store.clone(),
                    cloud.clone(),
                    rules,
                ),
                topics,
                store,
                cloud,
                replies,
                broker,
                incoming,
                _dir: dir,
            }
        }

        /// The topic `peer` publishes to MetaManager on.
        pub fn from(&self, peer: Peer) -> String {
            let [edgehub, edged] = self.topics.inbound();
            match peer {
                Peer::Edgehub => edgehub.to_owned(),
                Peer::Edged => edged.to_owned(),
            }
        }

        /// The next publish to `peer`, which must be an `error` reply: its text.
        pub async fn error_to(&mut self, peer: Peer) -> String {
            let reply = self.published_to(peer).await.json();
            assert_eq!(reply["route"]["operation"], "error", "{reply}");
            reply["content"].as_str().unwrap_or_default().to_owned()
        }

        /// The topic MetaManager publishes to `peer` on.
        pub fn to(&self, peer: Peer) -> String {
            self.topics.to(peer).to_owned()
        }

        /// Delivers `payload` from `peer` and runs its handling to the end, as the dispatcher
        /// and the pipeline do; returns the packet id its ack will name.
        pub async fn handle(&mut self, peer: Peer, payload: impl Into<bytes::Bytes>) -> u16 {
            let topic = self.from(peer);
            self.handle_on(&topic, payload).await
        }

        /// As [`Self::handle`], for a publish on any topic, as it is.
        pub async fn handle_raw(&mut self, topic: &str, payload: &[u8]) -> u16 {
            self.handle_on(topic, bytes::Bytes::copy_from_slice(payload))
                .await
        }

        async fn handle_on(&mut self, topic: &str, payload: impl Into<bytes::Bytes>) -> u16 {
            let pkid = self.broker.deliver(topic, payload);
            let message = self.incoming.recv().await.expect("delivered");
            self.ops.dispatch(message).await.await;
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
            let json = self.store.get(key).await.expect("store reads")?;
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

#[cfg(test)]
mod tests {
    use super::testing::Harness;
    use crate::metrics::Readings;

    /// Messages handled by the real operations code move the counters they should.
    #[tokio::test(flavor = "multi_thread")]
    async fn handled_messages_are_counted_by_topic_operation_and_reason() {
        let h = Harness::new().await;
        let [from_edgehub, from_edged] = h.topics.inbound().map(str::to_owned);
        let publish = |topic: &str, payload: &str| {
            crate::mqtt::Inbound::detached(topic, payload.as_bytes().to_vec())
        };
        let insert = r#"{"header":{"msg_id":"m1"},"route":{"source":"edgecontroller","group":"resource","operation":"insert","resource":"default/pod/a"},"content":{"metadata":{"name":"a"}}}"#;
        let query = r#"{"header":{"msg_id":"m2"},"route":{"source":"edged","group":"meta","operation":"query","resource":"default/pod/a"}}"#;
        let remote = r#"{"header":{"msg_id":"m3"},"route":{"source":"edged","group":"meta","operation":"query","resource":"default/secret/s"}}"#;
        for (topic, payload) in [
            (&from_edgehub, insert),
            (&from_edged, query),
            (&from_edged, "not json"),
            (&from_edged, remote),
        ] {
            h.ops.dispatch(publish(topic, payload)).await.await;
        }
        // Only counters are read: the gauges' sources are not this test's.
        let text = h.replies.metrics.render(&Readings::default());
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("exposition parses");
        let count = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .map(|s| match s.value {
                    // The parser takes the `_total` samples of a counter for untyped ones.
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
        };
        let received = "metamanager_messages_received_total";
        assert_eq!(
            count(received, &[("topic", "edgehub"), ("operation", "insert")]),
            Some(1.0)
        );
        assert_eq!(
            count(received, &[("topic", "edged"), ("operation", "query")]),
            Some(2.0)
        );
        assert_eq!(
            count(received, &[("topic", "edged"), ("operation", "invalid")]),
            Some(1.0)
        );
        let replies = "metamanager_replies_sent_total";
        assert_eq!(
            count(replies, &[("operation", "response")]),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            count(replies, &[("operation", "error")]),
            Some(2.0),
            "{text}"
        );
        let errors = "metamanager_errors_total";
        assert_eq!(count(errors, &[("reason", "decode")]), Some(1.0));
        assert_eq!(
            count(errors, &[("reason", "remote_disconnected")]),
            Some(1.0)
        );
        let remote = "metamanager_remote_queries_total";
        assert_eq!(count(remote, &[("outcome", "disconnected")]), Some(1.0));
        h.store.close().await;
    }
}
