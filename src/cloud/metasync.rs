//! MetaSync: periodically tells the cloud the status of the node's pods.
//!
//! For each namespace with stored `podstatus` objects, one `update` of `ns/podstatus` carries
//! them all, so the cloud gets one message per namespace rather than one per pod. A podstatus
//! whose pod is gone is deleted instead of sent, so stale statuses do not outlive their pods.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::Mutex;

use super::outbox::{self, Outbox};
use super::state::CloudState;
use crate::message::{self, Operation};
use crate::metrics::{ErrorReason, Metrics, SyncOutcome};
use crate::resource::Resource;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError, Write};

const PODSTATUS: &str = "podstatus";

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Report {
    /// The cloud is disconnected; nothing was sent.
    #[default]
    Skipped,
    Synced {
        namespaces: usize,
        statuses: usize,
        removed: usize,
    },
}

/// The sync, with what it reads and where it sends. Cheap to clone; clones share one lock that
/// serialises runs, so the timer and an on-demand `meta-internal-sync` never overlap.
#[derive(Clone)]
pub struct MetaSync {
    store: Store,
    outbox: Outbox,
    cloud: CloudState,
    metrics: Arc<Metrics>,
    running: Arc<Mutex<()>>,
}

impl MetaSync {
    pub fn new(store: Store, outbox: Outbox, cloud: CloudState, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            outbox,
            cloud,
            metrics,
            running: Arc::default(),
        }
    }

    pub async fn run(&self) -> Result<Report, StoreError> {
        let result = self.run_once().await;
        self.metrics.metasync(match &result {
            Ok(Report::Synced { .. }) => SyncOutcome::Synced,
            Ok(Report::Skipped) => SyncOutcome::Skipped,
            Err(_) => {
                self.metrics.error(ErrorReason::Metasync);
                SyncOutcome::Failed
            }
        });
        result
    }

    async fn run_once(&self) -> Result<Report, StoreError> {
        let _guard = self.running.lock().await;
        if !self.cloud.connected() {
            return Ok(Report::Skipped);
        }
        let statuses = self.store.list_type(PODSTATUS).await?;
        // Each key parsed once: for its pod's key and for its namespace.
        let resources: Vec<Option<Resource>> = statuses
            .iter()
            .map(|(key, _)| Resource::parse(key).ok())
            .collect();
        let pod_keys: Vec<String> = resources
            .iter()
            .map(|r| r.as_ref().and_then(pod_key).unwrap_or_default())
            .collect();
        let pod_exists = self.store.existing(pod_keys).await?;

        let mut by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut removed = 0;
        for (((key, value), resource), exists) in statuses.iter().zip(&resources).zip(pod_exists) {
            if exists {
                let namespace = resource.as_ref().map_or("", Resource::namespace);
                by_namespace.entry(namespace).or_default().push(value);
            } else {
                self.store
                    .write(Write::Delete {
                        key: key.clone(),
                        uid: None,
                    })
                    .await?;
                removed += 1;
            }
        }
        for (namespace, values) in &by_namespace {
            let payload = message::build(
                None,
                Operation::Update,
                &format!("{namespace}/{PODSTATUS}"),
                &message::raw_array(values.iter().copied()),
            );
            let resource = format!("{namespace}/{PODSTATUS}");
            let message = outbox::cloud_message(&resource, payload.into(), true);
            self.outbox.send_to_cloud(message).await?;
        }
        let report = Report::Synced {
            namespaces: by_namespace.len(),
            statuses: statuses.len() - removed,
            removed,
        };
        tracing::debug!(?report, "metasync");
        Ok(report)
    }
}

/// `ns/podstatus/name` → `ns/pod/name`.
fn pod_key(podstatus: &Resource) -> Option<String> {
    Some(format!(
        "{}/pod/{}",
        podstatus.namespace(),
        podstatus.name()?
    ))
}

impl MetaSync {
    /// Runs MetaSync every `interval` until shutdown.
    pub async fn run_periodic(self, interval: Duration, mut shutdown: Shutdown) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(e) = self.run().await {
                        tracing::warn!(error = %e, "metasync failed");
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    }
}
