//! MetaSync: tells the cloud the status of the node's pods, and sends the digest.
//!
//! A run sends, per namespace, one `update` of `ns/podstatus` carrying only the statuses that
//! changed since the last run that reached the cloud, leaving out those that already went to
//! the cloud as edged's own update: on an idle node a run sends the digest and nothing else.
//! A full run sends every stored status, as the seed's MetaSync did every interval: when the
//! cloud connects, on `meta-internal-sync`, and every `full_interval`. A podstatus whose pod is
//! gone is deleted instead of sent, so stale statuses do not outlive their pods.
//!
//! What changed is read from the store's recorded change history (the `changes` table), so a
//! run that finds nothing reads nothing else; when the history no longer reaches back to the
//! last run (more changes than it keeps), the run is a full one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::outbox::{self, Outbox};
use super::state::CloudState;
use crate::message::{self, Operation};
use crate::metrics::{ErrorReason, Metrics, SyncOutcome};
use crate::resource::Resource;
use crate::shutdown::Shutdown;
use crate::store::{Outcome, Store, StoreError, Write};

/// The type MetaSync sends.
pub use crate::resource::rtype::PODSTATUS;
/// The types whose changes a run looks at: statuses to send, and pods whose deletion leaves a
/// status to remove.
const WATCHED: &[&str] = &[PODSTATUS, crate::resource::rtype::POD];

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Report {
    /// The cloud is disconnected; nothing was sent.
    #[default]
    Skipped,
    Synced {
        /// Every stored status was sent, not only what changed.
        full: bool,
        namespaces: usize,
        statuses: usize,
        removed: usize,
        /// Messages the digest took (more than one when split).
        digest_parts: usize,
    },
}

/// How a run is logged: `full run: 2 namespaces, 14 statuses, 0 removed, digest in 1 messages`.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Skipped => f.write_str("skipped: the cloud is disconnected"),
            Self::Synced {
                full,
                namespaces,
                statuses,
                removed,
                digest_parts,
            } => write!(
                f,
                "{} run: {namespaces} namespaces, {statuses} statuses, {removed} removed, digest in {digest_parts} messages",
                if *full { "full" } else { "changes-only" },
            ),
        }
    }
}

/// Which run to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// What changed, or everything when `full_interval` has passed since the last full run.
    Periodic,
    /// Every stored status.
    Full,
}

/// What MetaSync needs besides the parts it talks to.
#[derive(Debug, Clone)]
pub struct SyncPlan {
    /// The node's name, for the digest's resource `{node_id}/digest`.
    pub node_id: String,
    /// `mqtt.max_payload_bytes`: a digest larger than this is split.
    pub max_payload: usize,
    /// `meta.sync.podstatus.full_interval`: the longest time between two full runs.
    pub full_interval: Duration,
}

/// What runs remember of each other.
#[derive(Default)]
struct Memory {
    /// The change number the last run that reached the cloud covered; `None` before the first.
    synced_through: Option<u64>,
    last_full: Option<Instant>,
    /// Statuses that reached the cloud as edged's own update, with the change number of that
    /// update; only those numbered after `synced_through` matter, so each run forgets the
    /// others, and at most one entry a status is kept.
    reached: HashMap<String, u64>,
}

/// The sync, with what it reads and where it sends. Cheap to clone; clones share one lock that
/// serialises runs, so the timer and an on-demand `meta-internal-sync` never overlap.
#[derive(Clone)]
pub struct MetaSync {
    store: Store,
    outbox: Outbox,
    cloud: CloudState,
    metrics: Arc<Metrics>,
    plan: Arc<SyncPlan>,
    memory: Arc<Mutex<Memory>>,
    reached: Arc<std::sync::Mutex<HashMap<String, u64>>>,
}

impl MetaSync {
    pub fn new(
        store: Store,
        outbox: Outbox,
        cloud: CloudState,
        metrics: Arc<Metrics>,
        plan: SyncPlan,
    ) -> Self {
        Self {
            store,
            outbox,
            cloud,
            metrics,
            plan: Arc::new(plan),
            memory: Arc::default(),
            reached: Arc::default(),
        }
    }

    /// Records that edged's update of the status `key`, change number `change`, went to the
    /// cloud (sent, or queued in the outbox): a run need not send that status again.
    pub fn reached(&self, key: &str, change: u64) {
        let mut reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
        reached.insert(key.to_owned(), change);
    }

    pub async fn run(&self, kind: RunKind) -> Result<Report, StoreError> {
        let result = self.run_once(kind).await;
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

    async fn run_once(&self, kind: RunKind) -> Result<Report, StoreError> {
        let mut memory = self.memory.lock().await;
        if !self.cloud.connected() {
            return Ok(Report::Skipped);
        }
        // Every change up to here is committed and recorded; later ones are the next run's.
        let through = self.store.feed_position();
        {
            let mut reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
            memory.reached.extend(reached.drain());
        }
        let full_due = memory
            .last_full
            .is_none_or(|at| at.elapsed() >= self.plan.full_interval);
        let changed = match (kind, memory.synced_through) {
            (RunKind::Periodic, Some(after)) if !full_due => {
                self.store.changed_keys(after, through, WATCHED).await?
            }
            _ => None,
        };
        let full = changed.is_none();
        let candidates: Vec<Candidate> = match changed {
            None => self
                .store
                .list_type(PODSTATUS)
                .await?
                .into_iter()
                .map(|(key, value)| Candidate {
                    key,
                    value: Some(value),
                    send: true,
                })
                .collect(),
            Some(keys) => {
                let mut by_key: BTreeMap<String, bool> = BTreeMap::new();
                for (key, rtype, last) in keys {
                    if rtype == PODSTATUS {
                        let already = memory.reached.get(&key).is_some_and(|r| *r >= last);
                        *by_key.entry(key).or_default() |= !already;
                    } else if let Some(status) =
                        Resource::parse(&key).ok().as_ref().and_then(status_key)
                    {
                        // A changed pod: its status is looked at only to remove an orphan.
                        by_key.entry(status).or_default();
                    }
                }
                by_key
                    .into_iter()
                    .map(|(key, send)| Candidate {
                        key,
                        value: None,
                        send,
                    })
                    .collect()
            }
        };
        let (namespaces, statuses, removed) = self.sync(candidates).await?;
        memory.synced_through = Some(through);
        memory.reached.retain(|_, change| *change > through);
        if full {
            memory.last_full = Some(Instant::now());
        }
        let digest_parts = super::digest::publish(
            &self.store,
            &self.outbox,
            &self.plan.node_id,
            self.plan.max_payload,
        )
        .await?;
        self.metrics.digest_sent(digest_parts);
        let report = Report::Synced {
            full,
            namespaces,
            statuses,
            removed,
            digest_parts,
        };
        tracing::debug!(%report, "metasync");
        Ok(report)
    }

    /// Sends the candidates marked to be sent, grouped by namespace, and removes those whose
    /// pod is gone. Returns the namespaces and statuses sent and the statuses removed.
    async fn sync(&self, candidates: Vec<Candidate>) -> Result<(usize, usize, usize), StoreError> {
        if candidates.is_empty() {
            return Ok((0, 0, 0));
        }
        let resources: Vec<Option<Resource>> = candidates
            .iter()
            .map(|c| Resource::parse(&c.key).ok())
            .collect();
        let pod_keys: Vec<String> = resources
            .iter()
            .map(|r| r.as_ref().and_then(pod_key).unwrap_or_default())
            .collect();
        let pod_exists = self.store.existing(pod_keys).await?;
        let mut by_namespace: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let (mut removed, mut sent) = (0, 0);
        for ((candidate, resource), exists) in
            candidates.into_iter().zip(&resources).zip(pod_exists)
        {
            if !exists {
                let deleted = self
                    .store
                    .write(Write::Delete {
                        key: candidate.key,
                        uid: None,
                    })
                    .await?;
                if deleted.outcome == Outcome::Deleted {
                    removed += 1;
                }
                continue;
            }
            if !candidate.send {
                continue;
            }
            // Read now when not read with the list: a status changed since its key was found
            // is sent as it is now, and one deleted since is not sent.
            let value = match candidate.value {
                Some(value) => value,
                None => match self.store.get(&candidate.key).await? {
                    Some(value) => value,
                    None => continue,
                },
            };
            let namespace = resource.as_ref().map_or("", Resource::namespace);
            by_namespace
                .entry(namespace.to_owned())
                .or_default()
                .push(value);
            sent += 1;
        }
        for (namespace, values) in &by_namespace {
            let resource = format!("{namespace}/{PODSTATUS}");
            let payload = message::build(
                None,
                Operation::Update,
                &resource,
                &message::raw_array(values.iter().map(String::as_str)),
            );
            let message = outbox::cloud_message(&resource, payload.into(), true);
            self.outbox.send_to_cloud(message).await?;
        }
        Ok((by_namespace.len(), sent, removed))
    }
}

/// A status a run looks at.
struct Candidate {
    key: String,
    /// Its value, when read with the list.
    value: Option<String>,
    /// Sent (when its pod is stored); else only removed when its pod is gone.
    send: bool,
}

/// `ns/podstatus/name` → `ns/pod/name`.
fn pod_key(podstatus: &Resource) -> Option<String> {
    Some(format!(
        "{}/pod/{}",
        podstatus.namespace(),
        podstatus.name()?
    ))
}

/// `ns/pod/name` → `ns/podstatus/name`.
fn status_key(pod: &Resource) -> Option<String> {
    Some(format!("{}/{PODSTATUS}/{}", pod.namespace(), pod.name()?))
}

impl MetaSync {
    /// Runs MetaSync every `interval`, and a full run each time the cloud connects, until
    /// shutdown.
    pub async fn run_periodic(self, interval: Duration, mut shutdown: Shutdown) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cloud = self.cloud.watch();
        // The cloud may have connected before this task started watching: a bridge's retained
        // state arrives as soon as MetaManager subscribes. That connect gets its full run now.
        let mut connected_before = *cloud.borrow_and_update();
        loop {
            let kind = if std::mem::take(&mut connected_before) {
                RunKind::Full
            } else {
                tokio::select! {
                    _ = ticker.tick() => RunKind::Periodic,
                    changed = cloud.changed() => {
                        if changed.is_err() || !*cloud.borrow_and_update() {
                            continue;
                        }
                        RunKind::Full
                    }
                    _ = shutdown.wait() => return,
                }
            };
            match self.run(kind).await {
                Ok(report) if kind == RunKind::Full => {
                    tracing::info!(%report, "metasync: cloud connected");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "metasync failed"),
            }
        }
    }
}
