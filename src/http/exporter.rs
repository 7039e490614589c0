//! `/metrics`: the counters the parts keep in [`Metrics`], with the gauges and mirrored counters
//! brought to what their sources keep (the store, the outbox, the remote queries, the cloud's
//! state, the link) at each scrape. Reading those sources is done here, beside the endpoint and
//! above the parts, so that `crate::metrics`, which every part counts into, uses none of them.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::cloud::outbox::Outbox;
use crate::cloud::remote::RemoteQueries;
use crate::cloud::state::CloudState;
use crate::metrics::{Metrics, Readings};
use crate::mqtt::Publisher;
use crate::store::Store;
use crate::watchdog::BrokerServing;

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
    /// Whether the embedded broker accepts new clients, as its watchdog last found.
    pub serving: BrokerServing,
    /// `outbox.max_messages`.
    pub outbox_capacity: usize,
}

impl Exporter {
    /// The Prometheus text exposition of every metric.
    pub async fn render(&self) -> String {
        self.metrics.render(&self.read().await)
    }

    /// What the sources keep now.
    async fn read(&self) -> Readings {
        let space = self.store.space();
        let broker_connected = *self.broker_connected.borrow();
        let serving = self.serving.get();
        let ready = self.store.is_open() && space.full().is_none() && broker_connected && serving;
        Readings {
            ready,
            outbox_messages: self.outbox.len() as u64,
            outbox_capacity: self.outbox_capacity as u64,
            outbox_oldest_age_seconds: self.oldest_waiting().await,
            broker_serving: serving,
            remote_queries_pending: self.remote.len() as u64,
            cloud_connected: self.cloud.connected(),
            broker_connected,
            database_bytes: database_bytes(self.store.path()),
            store_full: space.full().is_some(),
            store_used: space.used(),
            store_quota: space.limit(),
            outbox_dropped_full: self.outbox.dropped_full(),
            outbox_dropped_expired: self.outbox.dropped_expired(),
            resent_publishes: self.publisher.resent_publishes(),
            embedded_broker_skipped: rumqttd::skipped_messages(),
        }
    }
}

impl Exporter {
    /// Seconds since the oldest message waiting in the outbox was queued; 0 when none waits
    /// (or it cannot be read: the store's own error is counted where it is met).
    async fn oldest_waiting(&self) -> u64 {
        if self.outbox.is_empty() {
            return 0;
        }
        let oldest = match self.store.outbox_batch(1).await {
            Ok(batch) => batch.first().map(|entry| entry.created_ms),
            Err(_) => None,
        };
        let now = crate::message::now_millis();
        oldest.map_or(0, |created| {
            (now.saturating_sub(created) / 1000).max(0) as u64
        })
    }
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
    use std::time::Duration;

    use super::*;
    use crate::metrics::{ErrorReason, Metrics, RemoteOutcome, SyncOutcome};
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
            serving: crate::watchdog::BrokerServing::default(),
            outbox_capacity: 10_000,
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

        let text = exporter.render().await;
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
        let dropped_full = |text: String| {
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
        assert_eq!(dropped_full(exporter.render().await), Some(3.0));
        assert_eq!(
            dropped_full(exporter.render().await),
            Some(3.0),
            "a second render adds nothing"
        );
        queue(exporter.store.clone(), 4..6).await;
        assert_eq!(dropped_full(exporter.render().await), Some(5.0));

        let first = with_store(&mut exporter, open("b.db"));
        queue(exporter.store.clone(), 0..2).await;
        assert_eq!(exporter.store.outbox_dropped_full(), 1);
        assert_eq!(
            dropped_full(exporter.render().await),
            Some(5.0),
            "never back"
        );
        first.close().await;
        exporter.store.close().await;
        own.close().await;
    }
}
