//! Prometheus metrics: what an operator scrapes from `/metrics`.
//!
//! Counters and histograms are updated where things happen (operations, the remote-query task,
//! MetaSync, the store's writer thread). Values that other parts already keep (outbox length
//! and drops, pending remote queries, connection states, database size) are read at render
//! time instead of being mirrored on every change, so they cannot drift from their source.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry, Unit};
use tokio::sync::watch;

use crate::cloud::outbox::Outbox;
use crate::cloud::remote::RemoteQueries;
use crate::cloud::state::CloudState;
use crate::mqtt::Publisher;
use crate::store::{Store, StoreMetrics};

/// Every metric name starts with this.
const PREFIX: &str = "metamanager";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicOperation {
    topic: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiWriteLabel {
    verb: &'static str,
    outcome: &'static str,
}

/// The values of a metric's label, one variant each: the label's text, and every value in
/// order, from which the metric's help text lists them, so the two cannot drift apart.
macro_rules! label_values {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident => $value:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in the order the help text lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }

            /// The values, comma-separated, for the metric's help text.
            pub fn listed() -> String {
                Self::ALL
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }
    };
}

label_values! {
    /// How a remote query ended.
    pub enum RemoteOutcome {
        Answered => "answered",
        Error => "error",
        Timeout => "timeout",
        Disconnected => "disconnected",
        Refused => "refused",
    }
}

label_values! {
    /// Why something counted in `metamanager_errors_total` went wrong.
    pub enum ErrorReason {
        /// A message that is not a valid MetaManager message.
        Decode => "decode",
        /// A valid message that asks for something MetaManager refuses.
        Invalid => "invalid",
        /// A store write or read failed.
        Store => "store",
        /// A write refused because the store is full (see [`crate::store::space`]).
        StorageFull => "storage_full",
        /// A MetaSync run failed.
        Metasync => "metasync",
        RemoteTimeout => "remote_timeout",
        RemoteDisconnected => "remote_disconnected",
        RemoteRefused => "remote_refused",
        /// A lease from edged while the cloud is away (see [`crate::ops`]'s per-type rules).
        LeaseWhileDisconnected => "lease_while_disconnected",
    }
}

label_values! {
    /// Why a valid message was acked but neither stored nor passed on.
    pub enum HeldBack {
        /// An update older than the stored object, by resourceVersion.
        Stale => "stale",
        /// A msg_id handled before in this run.
        Repeat => "repeat",
    }
}

label_values! {
    /// How a MetaSync run ended.
    pub enum SyncOutcome {
        Synced => "synced",
        /// The cloud was disconnected; nothing was sent.
        Skipped => "skipped",
        Failed => "failed",
    }
}

/// A registry being filled: each metric registered under its name and help, and handed back
/// to be kept.
struct Registering<'a>(&'a mut Registry);

impl Registering<'_> {
    fn metric<M: Metric + Clone>(&mut self, name: &str, help: impl Into<String>, metric: M) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }

    fn measured<M: Metric + Clone>(
        &mut self,
        name: &str,
        help: impl Into<String>,
        unit: Unit,
        metric: M,
    ) -> M {
        self.0.register_with_unit(name, help, unit, metric.clone());
        metric
    }
}

/// The gauges, set from their sources at render time (see [`Exporter::render`]).
struct Gauges {
    outbox_len: Gauge,
    remote_pending: Gauge,
    cloud_connected: Gauge,
    broker_connected: Gauge,
    db_bytes: Gauge,
    store_full: Gauge,
    store_used: Gauge,
    store_quota: Gauge,
}

impl Gauges {
    fn register(r: &mut Registering) -> Self {
        Self {
            outbox_len: r.metric(
                "outbox_messages",
                "Messages waiting in the outbox for the cloud",
                Gauge::default(),
            ),
            remote_pending: r.metric(
                "remote_queries_pending",
                "Remote queries waiting for the cloud's answer",
                Gauge::default(),
            ),
            cloud_connected: r.metric(
                "cloud_connected",
                "1 when edgehub last reported the cloud as connected",
                Gauge::default(),
            ),
            broker_connected: r.metric(
                "broker_connected",
                "1 while the MQTT connection to the broker is up",
                Gauge::default(),
            ),
            db_bytes: r.measured(
                "database_size",
                "Size of the database file and its write-ahead log",
                Unit::Bytes,
                Gauge::default(),
            ),
            store_full: r.metric(
                "store_full",
                "1 while the store refuses writes for want of room (database.max_size or the disk); reads and deletes go on",
                Gauge::default(),
            ),
            store_used: r.measured(
                "store_used",
                "What the store's live data uses, as database.max_size counts it: pages in use and the write-ahead log",
                Unit::Bytes,
                Gauge::default(),
            ),
            store_quota: r.measured(
                "store_quota",
                "database.max_size; 0 for none",
                Unit::Bytes,
                Gauge::default(),
            ),
        }
    }
}

/// Counters that mirror a count kept elsewhere, brought up to date at render time.
#[derive(Default)]
struct Mirrored {
    dropped: Family<ReasonLabel, Counter>,
    /// Publishes sent again because the broker answered a reconnect of the sending connection
    /// with a new session (it had lost what it held for MetaManager).
    resent: Counter,
    /// Messages the embedded broker's subscribers skipped by falling a log's length behind.
    skipped: Counter,
}

impl Mirrored {
    fn register(r: &mut Registering) -> Self {
        Self {
            resent: r.metric(
                "broker_resent_publishes",
                "Publishes sent again because the broker started a new session for MetaManager",
                Counter::default(),
            ),
            skipped: r.metric(
                "embedded_broker_skipped_messages",
                "Messages subscribers of the embedded broker skipped by falling more than its log's length behind (never MetaManager's own)",
                Counter::default(),
            ),
            dropped: r.metric(
                "outbox_dropped_messages",
                "Outbox messages dropped, by reason (full, expired)",
                Family::default(),
            ),
        }
    }
}

/// The node's counters, gauges and histograms.
pub struct Metrics {
    registry: Registry,
    received: Family<TopicOperation, Counter>,
    replies: Family<OperationLabel, Counter>,
    errors: Family<ReasonLabel, Counter>,
    remote_seconds: Histogram,
    remote_outcomes: Family<OutcomeLabel, Counter>,
    api_writes: Family<ApiWriteLabel, Counter>,
    metasync_runs: Family<OutcomeLabel, Counter>,
    held_back: Family<ReasonLabel, Counter>,
    gauges: Gauges,
    /// Held while rendering: mirrored counters are read, compared and advanced together.
    mirrored: Mutex<Mirrored>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(StoreMetrics::default())
    }
}

impl Metrics {
    /// Registers every metric; `store` is the writer thread's share.
    pub fn new(store: StoreMetrics) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let mut r = Registering(&mut registry);
        let received = r.metric(
            "messages_received",
            "Messages received, by sending peer's topic (edgehub, edged) and operation (invalid when undecodable)",
            Family::<TopicOperation, Counter>::default(),
        );
        let replies = r.metric(
            "replies_sent",
            "Replies MetaManager sent (response, error), by operation",
            Family::<OperationLabel, Counter>::default(),
        );
        let errors = r.metric(
            "errors",
            format!("Errors, by reason ({})", ErrorReason::listed()),
            Family::<ReasonLabel, Counter>::default(),
        );
        r.measured(
            "store_commit",
            "Time one store transaction (a group-commit batch) took to commit",
            Unit::Seconds,
            store.commit_seconds.clone(),
        );
        r.metric(
            "store_batch_changes",
            "Changes committed together in one store transaction",
            store.batch_size.clone(),
        );
        let mirrored = Mirrored::register(&mut r);
        // 5 ms to about 80 s: the default remote_query_timeout is 60 s.
        let remote_seconds = r.measured(
            "remote_query_duration",
            "Time from sending a remote query to the cloud until it ended, whatever the outcome",
            Unit::Seconds,
            Histogram::new(exponential_buckets(0.005, 2.0, 15)),
        );
        let remote_outcomes = r.metric(
            "remote_queries",
            format!("Remote queries, by outcome ({})", RemoteOutcome::listed()),
            Family::<OutcomeLabel, Counter>::default(),
        );
        let api_writes = r.metric(
            "api_writes",
            "Writes to the local API, by verb (create, update, patch, delete) and outcome (cloud: done by the cloud; here: status or event taken while it is away; conflict, not_found, cloud_error, timeout, unavailable, invalid, too_many, failed, storage_full)",
            Family::<ApiWriteLabel, Counter>::default(),
        );
        let metasync_runs = r.metric(
            "metasync_runs",
            format!("MetaSync runs, by outcome ({})", SyncOutcome::listed()),
            Family::<OutcomeLabel, Counter>::default(),
        );
        let held_back = r.metric(
            "messages_held_back",
            format!(
                "Valid messages acked but neither stored nor passed on, by reason ({}; stale: an update older than the stored object by resourceVersion, repeat: a msg_id handled before in this run)",
                HeldBack::listed()
            ),
            Family::<ReasonLabel, Counter>::default(),
        );
        let gauges = Gauges::register(&mut r);
        Self {
            registry,
            received,
            replies,
            errors,
            remote_seconds,
            remote_outcomes,
            api_writes,
            metasync_runs,
            held_back,
            gauges,
            mirrored: Mutex::new(mirrored),
        }
    }

    /// A message arrived from `topic` (the peer) with `operation` (`invalid` if undecodable).
    pub fn received(&self, topic: &str, operation: &str) {
        self.received
            .get_or_create(&TopicOperation {
                topic: topic.to_owned(),
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// A reply (`response` or `error`) went out.
    pub fn replied(&self, operation: &str) {
        self.replies
            .get_or_create(&OperationLabel {
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// A valid message was acked but held back, for `reason`.
    pub fn held_back(&self, reason: HeldBack) {
        self.held_back
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    /// Something went wrong, for `reason`.
    pub fn error(&self, reason: ErrorReason) {
        self.errors
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    /// One write of the local API ended with `outcome` (see `metamanager_api_writes`).
    pub fn api_write(&self, verb: &'static str, outcome: &'static str) {
        self.api_writes
            .get_or_create(&ApiWriteLabel { verb, outcome })
            .inc();
    }

    /// A remote query ended with `outcome`; `elapsed` is `None` when it was never sent.
    pub fn remote_query(&self, outcome: RemoteOutcome, elapsed: Option<Duration>) {
        if let Some(elapsed) = elapsed {
            self.remote_seconds.observe(elapsed.as_secs_f64());
        }
        self.remote_outcomes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
        match outcome {
            RemoteOutcome::Timeout => self.error(ErrorReason::RemoteTimeout),
            RemoteOutcome::Disconnected => self.error(ErrorReason::RemoteDisconnected),
            RemoteOutcome::Refused => self.error(ErrorReason::RemoteRefused),
            RemoteOutcome::Answered | RemoteOutcome::Error => {}
        }
    }

    /// A MetaSync run ended: `synced`, `skipped` or `failed`.
    pub fn metasync(&self, outcome: SyncOutcome) {
        self.metasync_runs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }
}

/// What `/metrics` reads besides the counters: the gauges' and mirrored counters' sources,
/// read at render time.
#[derive(Clone)]
pub struct Exporter {
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub outbox: Outbox,
    pub remote: Arc<RemoteQueries>,
    pub cloud: CloudState,
    pub broker_connected: watch::Receiver<bool>,
    pub publisher: Publisher,
}

impl Exporter {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let m = &self.metrics;
        let mirrored = m.mirrored.lock().unwrap_or_else(|p| p.into_inner());
        m.gauges.outbox_len.set(gauge(self.outbox.len() as u64));
        m.gauges.remote_pending.set(gauge(self.remote.len() as u64));
        m.gauges
            .cloud_connected
            .set(i64::from(self.cloud.connected()));
        m.gauges
            .broker_connected
            .set(i64::from(*self.broker_connected.borrow()));
        m.gauges
            .db_bytes
            .set(gauge(database_bytes(self.store.path())));
        let space = self.store.space();
        m.gauges.store_full.set(i64::from(space.full().is_some()));
        m.gauges.store_used.set(gauge(space.used()));
        m.gauges.store_quota.set(gauge(space.limit()));
        for (reason, total) in [
            ("full", self.outbox.dropped_full()),
            ("expired", self.outbox.dropped_expired()),
        ] {
            let counter = mirrored.dropped.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let resent = &mirrored.resent;
        resent.inc_by(
            self.publisher
                .resent_publishes()
                .saturating_sub(resent.get()),
        );
        let skipped = &mirrored.skipped;
        skipped.inc_by(rumqttd::skipped_messages().saturating_sub(skipped.get()));
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &m.registry) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        out
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Bytes on disk of the database and its write-ahead log; a file that is missing counts 0.
fn database_bytes(path: &Path) -> u64 {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    [path, Path::new(&wal)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::memory::{self, MemoryBroker};
    use crate::store::Write;

    /// Every family the exposition must carry, as the parser names them.
    const FAMILIES: &[&str] = &[
        "metamanager_messages_received_total",
        "metamanager_replies_sent_total",
        "metamanager_errors_total",
        "metamanager_store_commit_seconds",
        "metamanager_store_batch_changes",
        "metamanager_outbox_messages",
        "metamanager_outbox_dropped_messages_total",
        "metamanager_remote_queries_pending",
        "metamanager_remote_query_duration_seconds",
        "metamanager_remote_queries_total",
        "metamanager_cloud_connected",
        "metamanager_broker_connected",
        "metamanager_database_size_bytes",
        "metamanager_metasync_runs_total",
    ];

    /// An exporter over a real store in a temporary directory and an in-memory broker, with
    /// what it must outlive.
    fn exporter() -> (Exporter, MemoryBroker, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("m.db");
        let store = Store::open(&db, Default::default()).expect("store opens");
        let topics = crate::topics::Topics::new("edge", "test-node");
        let (link, _, broker) = memory::link(topics);
        let cloud = CloudState::default();
        let exporter = Exporter {
            metrics: Arc::new(Metrics::new(store.metrics().clone())),
            outbox: Outbox::new(store.clone(), link.publisher.clone(), cloud.clone()),
            remote: Arc::new(RemoteQueries::new(Duration::from_secs(1))),
            cloud,
            broker_connected: link.connected.clone(),
            publisher: link.publisher,
            store,
        };
        (exporter, broker, dir)
    }

    fn sample<'a>(
        scrape: &'a prometheus_parse::Scrape,
        name: &str,
        label: (&str, &str),
    ) -> Option<&'a prometheus_parse::Sample> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
    }

    fn value(s: &prometheus_parse::Sample) -> f64 {
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        }
    }

    /// Each labelled family's help lists exactly the values the code counts under it.
    #[tokio::test(flavor = "multi_thread")]
    async fn help_texts_list_every_label_value_the_code_has() {
        let (exporter, _broker, _dir) = exporter();
        // A family is rendered once it has a series.
        let metrics = &exporter.metrics;
        metrics.error(ErrorReason::Decode);
        metrics.held_back(HeldBack::Stale);
        metrics.metasync(SyncOutcome::Synced);
        metrics.remote_query(RemoteOutcome::Answered, None);
        let text = exporter.render();
        let help = |family: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("# HELP metamanager_{family} ")))
                .unwrap_or_default()
                .to_owned()
        };
        let listed = |help: &str| -> Vec<String> {
            let inside = help.split_once('(').map_or("", |(_, rest)| rest);
            let inside = inside.split([')', ';']).next().unwrap_or_default();
            inside.split(", ").map(str::to_owned).collect()
        };
        let values = |all: &[&str]| all.iter().map(|v| v.to_string()).collect::<Vec<_>>();
        assert_eq!(
            listed(&help("errors")),
            values(
                &ErrorReason::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
            )
        );
        assert_eq!(
            listed(&help("messages_held_back")),
            values(&HeldBack::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>())
        );
        assert_eq!(
            listed(&help("metasync_runs")),
            ["synced", "skipped", "failed"]
        );
        assert_eq!(
            listed(&help("remote_queries")),
            ["answered", "error", "timeout", "disconnected", "refused"]
        );
        assert!(ErrorReason::ALL.contains(&ErrorReason::LeaseWhileDisconnected));
        exporter.store.close().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn render_parses_as_prometheus_text_and_carries_every_family() {
        let (exporter, _broker, _dir) = exporter();
        let metrics = &exporter.metrics;
        exporter
            .store
            .write(Write::Put {
                key: "default/pod/a".into(),
                rtype: "pod".into(),
                value: r#"{"a":1}"#.into(),
            })
            .await
            .expect("write commits");
        metrics.received("edged", "insert");
        metrics.received("edged", "invalid");
        metrics.replied("response");
        metrics.error(ErrorReason::Decode);
        metrics.remote_query(RemoteOutcome::Timeout, Some(Duration::from_millis(20)));
        metrics.metasync(SyncOutcome::Skipped);
        exporter.cloud.report(crate::cloud::Source::Edgehub, true);

        let text = exporter.render();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("exposition parses");
        for family in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {family}"))
                    || text.contains(&format!("# TYPE {}", family.trim_end_matches("_total"))),
                "family {family} missing from:\n{text}"
            );
        }
        let received = sample(
            &scrape,
            "metamanager_messages_received_total",
            ("operation", "invalid"),
        )
        .expect("invalid counted");
        assert_eq!(value(received), 1.0);
        let errors = sample(
            &scrape,
            "metamanager_errors_total",
            ("reason", "remote_timeout"),
        )
        .expect("timeout counted as an error");
        assert_eq!(value(errors), 1.0);
        let cloud = scrape
            .samples
            .iter()
            .find(|s| s.metric == "metamanager_cloud_connected")
            .expect("cloud gauge");
        assert_eq!(value(cloud), 1.0);
        let size = scrape
            .samples
            .iter()
            .find(|s| s.metric == "metamanager_database_size_bytes")
            .expect("size gauge");
        assert!(value(size) > 0.0, "database size is read from disk");
        assert!(
            text.contains("metamanager_broker_resent_publishes_total 0"),
            "resends are shown before they first happen:\n{text}"
        );
        assert!(
            text.contains("metamanager_store_commit_seconds_count 1"),
            "the writer recorded its commit:\n{text}"
        );
        exporter.store.close().await;
    }

    /// The outbox's "full" drops are counted by the store; `/metrics` shows that count, not
    /// a sum of the counts seen at each render, and a source that starts again from 0 (another
    /// store behind the same metrics) does not take the counter back.
    #[tokio::test(flavor = "multi_thread")]
    async fn mirrored_counters_advance_to_their_source_and_never_back() {
        let (exporter, _broker, _dir) = exporter();
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |file: &str| {
            let options = crate::store::StoreOptions {
                outbox_max: 1,
                ..Default::default()
            };
            crate::store::Store::open(&dir.path().join(file), options).expect("store opens")
        };
        let queue = |store: crate::store::Store, keys: std::ops::Range<usize>| async move {
            for i in keys {
                let change = crate::store::Change {
                    write: Some(Write::Put {
                        key: format!("default/pod/p{i}"),
                        rtype: "pod".into(),
                        value: format!(r#"{{"n":{i}}}"#).into(),
                    }),
                    to_cloud: Some(crate::store::CloudMessage {
                        resource: format!("default/pod/p{i}"),
                        payload: bytes::Bytes::from_static(b"{}"),
                        coalesce: false,
                    }),
                    ..Default::default()
                };
                store.write(change).await.expect("write commits");
            }
        };
        let dropped_full = |exporter: &Exporter| {
            let text = exporter.render();
            let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
                .expect("exposition parses");
            let name = "metamanager_outbox_dropped_messages_total";
            sample(&scrape, name, ("reason", "full")).map(value)
        };
        // The outbox's counters are read from its own store.
        let with_store = |exporter: &mut Exporter, store: crate::store::Store| {
            let (publisher, cloud) = (exporter.publisher.clone(), exporter.cloud.clone());
            exporter.outbox = Outbox::new(store.clone(), publisher, cloud);
            std::mem::replace(&mut exporter.store, store)
        };
        let mut exporter = exporter;
        let own = with_store(&mut exporter, open("a.db"));
        // An outbox of one: every message queued after the first drops the oldest.
        queue(exporter.store.clone(), 0..4).await;
        assert_eq!(exporter.store.outbox_dropped_full(), 3);
        assert_eq!(dropped_full(&exporter), Some(3.0));
        assert_eq!(
            dropped_full(&exporter),
            Some(3.0),
            "a second render adds nothing"
        );
        queue(exporter.store.clone(), 4..6).await;
        assert_eq!(dropped_full(&exporter), Some(5.0));

        let first = with_store(&mut exporter, open("b.db"));
        queue(exporter.store.clone(), 0..2).await;
        assert_eq!(exporter.store.outbox_dropped_full(), 1);
        assert_eq!(dropped_full(&exporter), Some(5.0), "never back");
        first.close().await;
        exporter.store.close().await;
        own.close().await;
    }
}
