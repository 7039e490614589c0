//! Prometheus metrics: what an operator scrapes from `/metrics`.
//!
//! Counters and histograms are updated where things happen (operations, the remote-query task,
//! MetaSync, the store's writer thread through [`StoreMetrics`]). Values that other parts
//! already keep (outbox length and drops, pending remote queries, connection states, database
//! size) are read from them at render time instead of being mirrored on every change, so they
//! cannot drift from their source; what reads them sits above those parts, beside the endpoint
//! (`crate::http::exporter`), and hands them in as [`Readings`]. So this module uses no other
//! part of the crate, and every part may count into it.
//!
//! Every series whose label values are known is shown from start-up, at 0: the values of the
//! label enums here ([`ErrorReason`], [`HeldBack`], [`SyncOutcome`], [`RemoteOutcome`]), and
//! those the counting parts name ([`Metrics::known_received`], [`Metrics::known_replies`]). A
//! series that appears only at its first increase reads as "no data" until then, and a `rate`
//! or `increase` over it misses that first increase.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry, Unit};

/// Every metric name starts with this.
const PREFIX: &str = "metamanager";

mod labels;

pub use labels::{
    ApiVerb, ApiWriteOutcome, DropReason, ErrorReason, HeldBack, RemoteOutcome, SyncOutcome,
};
use labels::{ApiWriteLabel, OperationLabel, OutcomeLabel, ReasonLabel, TopicOperation};

impl StoreMetrics {
    /// Registers the writer thread's histograms: handles onto the values it moves.
    fn register(&self, r: &mut Registering) {
        r.measured(
            "store_commit",
            "Time one store transaction (a group-commit batch) took to commit",
            Unit::Seconds,
            self.commit_seconds.clone(),
        );
        r.metric(
            "store_batch_changes",
            "Changes committed together in one store transaction",
            self.batch_size.clone(),
        );
    }
}

/// What the store's writer thread measures: how long commits take and how many changes each
/// carries. [`Metrics`] registers the same histograms (they are handles onto shared values)
/// and renders them with the rest.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    commit_seconds: Histogram,
    batch_size: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            // 100 µs to about 3 s: an fsync on flash is milliseconds, a stalled disk seconds.
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 1 to 512, the writer's largest batch.
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
        }
    }
}

impl StoreMetrics {
    /// One committed transaction of `changes` changes that took `elapsed`.
    pub fn commit(&self, elapsed: Duration, changes: usize) {
        self.commit_seconds.observe(elapsed.as_secs_f64());
        self.batch_size.observe(changes as f64);
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

/// The gauges, set from their sources' [`Readings`] at render time (see [`Metrics::render`]).
struct Gauges {
    ready: Gauge,
    outbox_len: Gauge,
    outbox_capacity: Gauge,
    outbox_oldest_age: Gauge,
    broker_serving: Gauge,
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
            ready: r.metric(
                "ready",
                "1 while the node can handle messages: the store open and not full, the broker connections up and the embedded broker serving (what /readyz says, but for its fresh connection)",
                Gauge::default(),
            ),
            outbox_len: r.metric(
                "outbox_messages",
                "Messages waiting in the outbox for the cloud",
                Gauge::default(),
            ),
            outbox_capacity: r.metric(
                "outbox_capacity_messages",
                "outbox.max_messages: past it, the oldest waiting message is dropped",
                Gauge::default(),
            ),
            outbox_oldest_age: r.measured(
                "outbox_oldest_message_age",
                "Age of the oldest message waiting in the outbox; 0 when it is empty",
                Unit::Seconds,
                Gauge::default(),
            ),
            broker_serving: r.metric(
                "embedded_broker_serving",
                "1 while the embedded broker accepts new clients, as its watchdog last found (always 1 with an external broker); at 0 for mqtt.watchdog_timeout, MetaManager stops to be restarted",
                Gauge::default(),
            ),
            remote_pending: r.metric(
                "remote_queries_pending",
                "Remote queries waiting for the cloud's answer",
                Gauge::default(),
            ),
            cloud_connected: r.metric(
                "cloud_connected",
                "1 when the cloud counts as connected: edgehub last reported it connected (and, with cloud_link.state_topic, the bridge's link is up)",
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
                format!("Outbox messages dropped, by reason ({})", DropReason::listed()),
                Family::default(),
            ),
        }
    }
}

/// What other parts keep, read from them at render time: the gauges' values, and the totals the
/// mirrored counters follow.
#[derive(Clone, Copy, Debug, Default)]
pub struct Readings {
    pub ready: bool,
    pub outbox_messages: u64,
    /// `outbox.max_messages`.
    pub outbox_capacity: u64,
    pub outbox_oldest_age_seconds: u64,
    pub broker_serving: bool,
    pub remote_queries_pending: u64,
    pub cloud_connected: bool,
    pub broker_connected: bool,
    /// The database file and its write-ahead log, on disk.
    pub database_bytes: u64,
    pub store_full: bool,
    pub store_used: u64,
    /// `database.max_size`; 0 for none.
    pub store_quota: u64,
    pub outbox_dropped_full: u64,
    pub outbox_dropped_expired: u64,
    /// Publishes the link sent again to a broker that had started a new session.
    pub resent_publishes: u64,
    /// Messages the embedded broker's subscribers skipped.
    pub embedded_broker_skipped: u64,
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
    digest_messages: Counter,
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
        store.register(&mut r);
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
            format!(
                "Writes to the local API, by verb ({}) and outcome ({}; cloud: done by the cloud, here: a status or event taken while it is away)",
                ApiVerb::listed(),
                ApiWriteOutcome::listed()
            ),
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
        let digest_messages = r.metric(
            "digest_messages",
            "Digest messages sent or queued for the cloud (one a MetaSync run, more when the digest is sent in parts)",
            Counter::default(),
        );
        let gauges = Gauges::register(&mut r);
        let metrics = Self {
            digest_messages,
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
        };
        metrics.label_values_at_zero();
        metrics
    }

    /// Every series of the label enums, shown at 0 until counted.
    fn label_values_at_zero(&self) {
        for reason in ErrorReason::ALL {
            at_zero(&self.errors, reason_label(reason.as_str()));
        }
        for reason in HeldBack::ALL {
            at_zero(&self.held_back, reason_label(reason.as_str()));
        }
        for outcome in SyncOutcome::ALL {
            at_zero(&self.metasync_runs, outcome_label(outcome.as_str()));
        }
        for outcome in RemoteOutcome::ALL {
            at_zero(&self.remote_outcomes, outcome_label(outcome.as_str()));
        }
        for verb in ApiVerb::ALL {
            for outcome in ApiWriteOutcome::ALL {
                at_zero(&self.api_writes, api_write_label(*verb, *outcome));
            }
        }
    }

    /// Shows the messages from `topic` of each of `operations` at 0 until they are counted: the
    /// operations it may send, which the parts that count them know.
    pub fn known_received(&self, topic: &str, operations: &[&str]) {
        for operation in operations {
            let labels = TopicOperation {
                topic: topic.to_owned(),
                operation: (*operation).to_owned(),
            };
            at_zero(&self.received, labels);
        }
    }

    /// Shows the replies of each of `operations` at 0 until they are counted.
    pub fn known_replies(&self, operations: &[&str]) {
        for operation in operations {
            let labels = OperationLabel {
                operation: (*operation).to_owned(),
            };
            at_zero(&self.replies, labels);
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
            .get_or_create(&reason_label(reason.as_str()))
            .inc();
    }

    /// Something went wrong, for `reason`.
    pub fn error(&self, reason: ErrorReason) {
        self.errors
            .get_or_create(&reason_label(reason.as_str()))
            .inc();
    }

    /// One write of the local API ended with `outcome` (see `metamanager_api_writes`).
    pub fn api_write(&self, verb: ApiVerb, outcome: ApiWriteOutcome) {
        self.api_writes
            .get_or_create(&api_write_label(verb, outcome))
            .inc();
    }

    /// A remote query ended with `outcome`; `elapsed` is `None` when it was never sent.
    pub fn remote_query(&self, outcome: RemoteOutcome, elapsed: Option<Duration>) {
        if let Some(elapsed) = elapsed {
            self.remote_seconds.observe(elapsed.as_secs_f64());
        }
        self.remote_outcomes
            .get_or_create(&outcome_label(outcome.as_str()))
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
            .get_or_create(&outcome_label(outcome.as_str()))
            .inc();
    }

    /// A digest of `parts` messages went to the cloud (or into the outbox for it).
    pub fn digest_sent(&self, parts: usize) {
        self.digest_messages.inc_by(parts as u64);
    }

    /// The Prometheus text exposition of every metric, with the gauges and mirrored counters
    /// brought to what their sources keep (`readings`).
    pub fn render(&self, readings: &Readings) -> String {
        let mirrored = self.mirrored.lock().unwrap_or_else(|p| p.into_inner());
        let gauges = &self.gauges;
        gauges.ready.set(i64::from(readings.ready));
        gauges.outbox_len.set(gauge(readings.outbox_messages));
        gauges.outbox_capacity.set(gauge(readings.outbox_capacity));
        gauges
            .outbox_oldest_age
            .set(gauge(readings.outbox_oldest_age_seconds));
        gauges
            .broker_serving
            .set(i64::from(readings.broker_serving));
        gauges
            .remote_pending
            .set(gauge(readings.remote_queries_pending));
        gauges
            .cloud_connected
            .set(i64::from(readings.cloud_connected));
        gauges
            .broker_connected
            .set(i64::from(readings.broker_connected));
        gauges.db_bytes.set(gauge(readings.database_bytes));
        gauges.store_full.set(i64::from(readings.store_full));
        gauges.store_used.set(gauge(readings.store_used));
        gauges.store_quota.set(gauge(readings.store_quota));
        for (reason, total) in [
            (DropReason::Full, readings.outbox_dropped_full),
            (DropReason::Expired, readings.outbox_dropped_expired),
        ] {
            advance(
                &mirrored
                    .dropped
                    .get_or_create(&reason_label(reason.as_str())),
                total,
            );
        }
        advance(&mirrored.resent, readings.resent_publishes);
        advance(&mirrored.skipped, readings.embedded_broker_skipped);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        out
    }
}

fn api_write_label(verb: ApiVerb, outcome: ApiWriteOutcome) -> ApiWriteLabel {
    ApiWriteLabel {
        verb: verb.as_str(),
        outcome: outcome.as_str(),
    }
}

/// Creates the series of `labels` in `family`, at 0, so that it is rendered before its first
/// count.
fn at_zero<L: Clone + Eq + std::hash::Hash>(family: &Family<L, Counter>, labels: L) {
    let _created = family.get_or_create(&labels);
}

/// Brings a mirrored counter up to its source's `total`; never back, should a source start
/// again from 0.
fn advance(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

fn reason_label(reason: &str) -> ReasonLabel {
    ReasonLabel {
        reason: reason.to_owned(),
    }
}

fn outcome_label(outcome: &str) -> OutcomeLabel {
    OutcomeLabel {
        outcome: outcome.to_owned(),
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("exposition parses")
    }

    /// The value of the sample of `name` whose labels include `labels`.
    fn value(
        scrape: &prometheus_parse::Scrape,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    /// Each labelled family's help lists exactly the values the code counts under it.
    #[test]
    fn help_texts_list_every_label_value_the_code_has() {
        let text = Metrics::default().render(&Readings::default());
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
    }

    /// Before anything is counted, every series whose label values are known is there at 0;
    /// counting moves the one series it names.
    #[test]
    fn known_series_are_shown_at_zero_until_counted() {
        let metrics = Metrics::default();
        metrics.known_received("edged", &["insert", "invalid"]);
        metrics.known_replies(&["response", "error"]);
        let fresh = scrape(&metrics.render(&Readings::default()));
        let by_label = |name: &str, label: &str, values: Vec<&'static str>| {
            values
                .into_iter()
                .map(|v| value(&fresh, name, &[(label, v)]))
                .collect::<Vec<_>>()
        };
        let zeros = |n: usize| vec![Some(0.0); n];
        let errors: Vec<_> = ErrorReason::ALL.iter().map(|r| r.as_str()).collect();
        let held: Vec<_> = HeldBack::ALL.iter().map(|r| r.as_str()).collect();
        let syncs: Vec<_> = SyncOutcome::ALL.iter().map(|r| r.as_str()).collect();
        let remote: Vec<_> = RemoteOutcome::ALL.iter().map(|r| r.as_str()).collect();
        for (name, label, values) in [
            ("metamanager_errors_total", "reason", errors),
            ("metamanager_messages_held_back_total", "reason", held),
            ("metamanager_metasync_runs_total", "outcome", syncs),
            ("metamanager_remote_queries_total", "outcome", remote),
            (
                "metamanager_replies_sent_total",
                "operation",
                vec!["response", "error"],
            ),
            (
                "metamanager_outbox_dropped_messages_total",
                "reason",
                DropReason::ALL.iter().map(|r| r.as_str()).collect(),
            ),
        ] {
            let n = values.len();
            assert_eq!(by_label(name, label, values), zeros(n), "{name}");
        }
        for operation in ["insert", "invalid"] {
            let labels = [("topic", "edged"), ("operation", operation)];
            let received = value(&fresh, "metamanager_messages_received_total", &labels);
            assert_eq!(received, Some(0.0), "{operation}");
        }

        metrics.error(ErrorReason::Store);
        metrics.received("edged", "insert");
        let counted = scrape(&metrics.render(&Readings::default()));
        let errors = "metamanager_errors_total";
        assert_eq!(value(&counted, errors, &[("reason", "store")]), Some(1.0));
        assert_eq!(value(&counted, errors, &[("reason", "decode")]), Some(0.0));
        let received = "metamanager_messages_received_total";
        let labels = [("topic", "edged"), ("operation", "insert")];
        assert_eq!(value(&counted, received, &labels), Some(1.0));
    }

    /// A mirrored counter follows its source's total, and does not go back when a source
    /// starts again from 0; the gauges show what they are handed.
    #[test]
    fn mirrored_counters_follow_their_source_and_never_go_back() {
        let metrics = Metrics::default();
        let dropped = |readings: Readings| {
            let scrape = scrape(&metrics.render(&readings));
            let name = "metamanager_outbox_dropped_messages_total";
            value(&scrape, name, &[("reason", "full")])
        };
        let at = |full| Readings {
            outbox_dropped_full: full,
            ..Readings::default()
        };
        assert_eq!(dropped(at(3)), Some(3.0));
        assert_eq!(dropped(at(3)), Some(3.0), "a second render adds nothing");
        assert_eq!(dropped(at(5)), Some(5.0));
        assert_eq!(dropped(at(1)), Some(5.0), "never back");
        let readings = Readings {
            store_quota: 1 << 20,
            store_full: true,
            ..Readings::default()
        };
        let shown = scrape(&metrics.render(&readings));
        assert_eq!(
            value(&shown, "metamanager_store_quota_bytes", &[]),
            Some(1048576.0)
        );
        assert_eq!(value(&shown, "metamanager_store_full", &[]), Some(1.0));
    }
}
