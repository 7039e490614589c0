//! What the running node shares between its tasks: the store, the way out to the broker, the
//! cloud connection state, and the settings operations need.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::Settings;
use crate::metasync::MetaSync;
use crate::metrics::Metrics;
use crate::mqtt::Publisher;
use crate::outbox::OutboxStats;
use crate::remote::RemoteQueries;
use crate::store::Store;
use crate::topics::Topics;

pub struct Node {
    pub node_id: String,
    pub topics: Arc<Topics>,
    pub store: Store,
    pub publisher: Publisher,
    pub remote: RemoteQueries,
    pub metasync: MetaSync,
    pub remote_types: HashSet<String>,
    pub max_payload: usize,
    pub outbox_stats: OutboxStats,
    pub metrics: Metrics,
    /// Whether the MQTT connection to the broker is up.
    pub broker_connected: watch::Receiver<bool>,
    /// Whether edgehub last reported the cloud as connected. Starts disconnected.
    cloud: watch::Sender<bool>,
    /// Whether the embedded broker passed its watchdog's last check (always true with an
    /// external broker, which has its own supervision).
    broker_serving: AtomicBool,
}

impl Node {
    pub fn new(
        settings: &Settings,
        topics: Arc<Topics>,
        store: Store,
        publisher: Publisher,
        broker_connected: watch::Receiver<bool>,
    ) -> Self {
        let metrics = Metrics::new(store.metrics().clone());
        store.track_delivery(publisher.delivery.clone());
        Self {
            node_id: settings.node_id.clone(),
            topics,
            store,
            publisher,
            remote: RemoteQueries::new(settings.meta.remote_query_timeout),
            metasync: MetaSync::default(),
            remote_types: settings.meta.remote_types.iter().cloned().collect(),
            max_payload: settings.mqtt.max_payload_bytes,
            outbox_stats: OutboxStats::default(),
            metrics,
            broker_connected,
            cloud: watch::channel(false).0,
            broker_serving: AtomicBool::new(true),
        }
    }

    pub fn cloud_connected(&self) -> bool {
        *self.cloud.borrow()
    }

    /// Records the cloud state; `true` when it changed.
    pub fn set_cloud_connected(&self, connected: bool) -> bool {
        self.cloud.send_replace(connected) != connected
    }

    /// Changes of the cloud state, for the task that keeps the status topic current.
    pub fn watch_cloud(&self) -> watch::Receiver<bool> {
        self.cloud.subscribe()
    }

    pub fn broker_serving(&self) -> bool {
        self.broker_serving.load(Ordering::Relaxed)
    }

    pub fn set_broker_serving(&self, serving: bool) {
        self.broker_serving.store(serving, Ordering::Relaxed);
    }

    pub fn remote_query_timeout(&self) -> Duration {
        self.remote.timeout()
    }

    pub fn online_status(&self) -> Vec<u8> {
        status(&self.node_id, true, Some(self.cloud_connected()))
    }

    pub fn offline_status(&self) -> Vec<u8> {
        offline_status(&self.node_id)
    }
}

#[derive(Serialize)]
struct Status<'a> {
    state: &'a str,
    node_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cloud: Option<&'a str>,
    version: &'a str,
    timestamp: i64,
}

fn status(node_id: &str, online: bool, cloud: Option<bool>) -> Vec<u8> {
    serde_json::to_vec(&Status {
        state: if online { "online" } else { "offline" },
        node_id,
        cloud: cloud.map(|c| if c { "connected" } else { "disconnected" }),
        version: env!("CARGO_PKG_VERSION"),
        timestamp: crate::message::now_millis(),
    })
    .unwrap_or_default()
}

/// The status published on a clean exit and registered as the last will.
pub fn offline_status(node_id: &str) -> Vec<u8> {
    status(node_id, false, None)
}
