//! What MetaManager does with each operation, one file per operation.
//!
//! A message's way through, in three parts:
//! 1. `request::read` reads it once into a `request::Request`, one variant per operation
//!    holding exactly its valid input. Every refusal of malformed input is made there.
//! 2. The request's operation starts: it checks what depends on the node's state at that
//!    moment (a lease while the cloud is away, a replace out of sequence) and queues its store
//!    write at once, then returns the rest of its work, which ends in an `Outcome`: what
//!    happened, not how to answer it.
//! 3. `Context::finish` (in `outcome`) acts on the outcome: the reply to the sender, then
//!    the broker ack. It is the one place a received message is acknowledged.
//!
//! The ordering invariant, enforced here and nowhere else: messages are submitted in arrival
//! order, their steps run in that order, and a step's commit comes before anything it sends.
//! [`Ops::dispatch`] runs parts 1 and 2 and returns a [`Step`]: the rest, which the pipeline
//! runs strictly in arrival order. A step awaits its own commit before anything leaves, so no
//! reply or forward ever announces a change that is not on disk, and a query's step runs only
//! after every earlier write is committed, so edged always reads its own writes. Writes queued
//! one after another share a group commit without losing that order.
//!
//! - `change`: insert, update and delete, from either side;
//! - `patch`: a merge patch or JSON Patch of a stored object, from either side;
//! - `query`: answers from the store, or asks the cloud (`remote_query`);
//! - `versions`: a query for a scope's resourceVersions, a page at a time;
//! - `relay`: edged's responses and errors, passed on to the cloud;
//! - `answer`: the cloud's responses and errors, to the remote query waiting for them or edged
//!   (an answer to a patch stores the object it carries first);
//! - `connect`: edgehub's report of the cloud connection, and the bridge's, on
//!   `cloud_link.state_topic`;
//! - `sync`: `meta-internal-sync`, MetaSync on request;
//! - `replace`: the cloud's complete set of a scope, in pages, applied in one transaction;
//! - `api_write`: the local API's writes, through the cloud or, for what the edge owns,
//!   here while the cloud is away.
//!
//! Every operation is given its request and one borrowed [`Context`]: the way back to the
//! peers ([`Replies`]), the store, the cloud side and the node's [`Rules`]. The API's writes
//! share the same context through [`api_write::ApiWrites`]. `app` builds it.

mod answer;
pub mod api_write;
mod change;
mod connect;
mod forward;
mod outcome;
mod patch;
mod query;
mod relay;
mod remote_query;
mod replace;
mod request;
mod rules;
mod sync;
mod versions;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::cloud::Cloud;
use crate::message::{Message, Operation};
use crate::metrics::Metrics;
use crate::mqtt::{Inbound, Publisher};
use crate::store::{Applied, Change, Committed, Store, StoreError};
use crate::topics::{Peer, Topics};

use outcome::{Envelope, Outcome};
use request::Request;

pub use rules::Rules;

/// The way back to the peers: the replies MetaManager builds, counted with what it received,
/// and the messages it passes on. Cheap to clone.
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
}

/// What every operation shares: one value, borrowed, in place of a list of handles.
pub struct Context {
    pub replies: Replies,
    pub store: Store,
    pub cloud: Cloud,
    pub rules: Arc<Rules>,
}

impl Context {
    pub fn new(replies: Replies, store: Store, cloud: Cloud, rules: Arc<Rules>) -> Self {
        Self {
            replies,
            store,
            cloud,
            rules,
        }
    }

    /// Queues `change`, which `msg` asked for: what its step awaits, or the outcome of a store
    /// that takes nothing now.
    async fn queue(&self, msg: &Message, change: Change) -> Result<Committed, Outcome> {
        let queued = self.store.submit(change).await;
        queued.map_err(|e| Outcome::store_failed(msg, &e))
    }

    /// Marks `msg_id` settled in the store once what was just handed to the MQTT client (its
    /// forward) is acknowledged by the broker: with the store's first commit after that. A
    /// forward still waiting in the client dies with the process, so until then the id stays
    /// unsettled, and a redelivery after a crash is passed on again if it is still current.
    fn settle(&self, msg_id: &str) {
        self.store
            .settle(msg_id, self.replies.publisher.delivery.mark());
    }
}

/// The dispatcher's side of the operations: the node's topics, to tell the sender, and the
/// context every operation is given.
pub struct Ops {
    topics: Arc<Topics>,
    ctx: Arc<Context>,
}

/// The ordered remainder of one message's handling.
pub type Step = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The rest of an operation, after its write is queued: what it comes to.
type Later = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// What a queued change came to: the store's answer, or `Closed` if the writer ended first.
async fn applied(committed: Committed) -> Result<Applied, StoreError> {
    committed.await.unwrap_or(Err(StoreError::Closed))
}

/// An operation that ended before anything was queued.
fn now(outcome: Outcome) -> Later {
    Box::pin(std::future::ready(outcome))
}

impl Ops {
    pub fn new(topics: Arc<Topics>, ctx: Arc<Context>) -> Self {
        Self { topics, ctx }
    }

    /// The first step of a run, before any message's: what the last run left to send edged
    /// (a replace's forwards the broker had not acknowledged).
    pub fn resend_forwards(&self) -> Step {
        replace::resend_forwards(self.ctx.clone())
    }

    /// Reads `publish`, starts its operation (which queues its write if it has one), and
    /// returns the step that finishes it.
    pub async fn dispatch(&self, publish: Inbound) -> Step {
        let (from, read) = request::read(&publish, &self.topics, &self.ctx);
        let later = match read {
            Ok(request) => start(request, &self.ctx).await,
            Err(refusal) => now(Outcome::Refused(refusal)),
        };
        let ctx = self.ctx.clone();
        let envelope = Envelope { from, publish };
        Box::pin(async move {
            let outcome = later.await;
            // Boxed once reached, so that a step waiting in the queue (up to 4096 of them in a
            // burst) does not carry room for the reply's send beside its operation's own.
            Box::pin(ctx.finish(envelope, outcome)).await;
        })
    }
}

/// Starts `request`'s operation: its immediate part now, the rest returned.
async fn start(request: Request, ctx: &Arc<Context>) -> Later {
    match request {
        Request::Change(r) => r.start(ctx).await,
        Request::Patch(r) => r.start(ctx).await,
        Request::Query(r) => r.start(ctx),
        Request::Versions(r) => r.start(ctx),
        Request::Relay(r) => r.start(ctx).await,
        Request::Answer(r) => r.start(ctx).await,
        Request::Connect(r) => now(r.apply(ctx)),
        Request::Sync(r) => r.start(ctx),
        Request::Replace(r) => r.start(ctx).await,
    }
}

/// What the operations' unit tests share: the parts of a node with a real store in a temporary directory and
/// an in-memory broker ([`crate::mqtt::memory`]).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::{Context, Ops, Replies, Rules};
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
            let plan = crate::cloud::CloudPlan {
                remote_timeout: settings.meta.remote_query_timeout,
                sync: crate::cloud::metasync::SyncPlan {
                    node_id: "test-node".into(),
                    max_payload: settings.mqtt.max_payload_bytes,
                    full_interval: settings.meta.sync.podstatus.full_interval,
                },
                bridge: settings.cloud_link.bridge_words(),
            };
            let cloud = Cloud::new(&store, &link.publisher, replies.metrics.clone(), plan);
            // The config file's default node name, which the rules have always had here.
            let rules = Arc::new(Rules::new("edge-node", &settings.meta, &settings.mqtt));
            let ctx = Context::new(replies.clone(), store.clone(), cloud.clone(), rules);
            Self {
                ops: Ops::new(topics.clone(), Arc::new(ctx)),
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

        /// The cloud's `operation` of `object` at `key`, handled: its forward to edged and its
        /// `OK` to edgehub taken. The publish's packet id, for its broker ack.
        pub async fn cloud_writes(
            &mut self,
            msg_id: &str,
            operation: &str,
            key: &str,
            object: Value,
        ) -> u16 {
            let pkid = self
                .handle(Peer::Edgehub, message(msg_id, operation, key, object))
                .await;
            self.published_to(Peer::Edged).await;
            self.published_to(Peer::Edgehub).await;
            pkid
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
        h.cloud_writes("i-1", "insert", "default/pod/p", pod("p"))
            .await;
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
