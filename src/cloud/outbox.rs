//! The durable outbox: what is bound for the cloud while the cloud is away.
//!
//! Messages for edgehub (edge inserts, updates, deletes, responses, MetaSync) are written to the
//! `outbox` table in the same transaction as the change they report, whenever the cloud is
//! disconnected or older messages are still queued (sending directly would overtake them). When
//! edgehub reports the cloud connected again, they are sent oldest first at a bounded rate, so a
//! long outage ends in a steady stream rather than a flood. The store bounds the outbox by count
//! (dropping the oldest); this module drops what has grown older than the configured age.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::settings::OutboxSettings;
use super::state::CloudState;
use crate::mqtt::Publisher;
use crate::shutdown::Shutdown;
use crate::store::{Change, CloudMessage, Store, StoreError};
use crate::topics::Peer;

/// The drain sends in small slices ten times a second.
const TICK: Duration = Duration::from_millis(100);

/// The way to the cloud: straight out while it is connected and nothing older waits, else into
/// the durable queue. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    publisher: Publisher,
    cloud: CloudState,
    /// Entries dropped for being older than `outbox.max_age`.
    dropped_expired: Arc<AtomicU64>,
}

/// A message for the cloud, ready to be queued.
pub fn cloud_message(resource: &str, payload: Bytes, coalesce: bool) -> CloudMessage {
    CloudMessage {
        resource: resource.to_owned(),
        payload,
        coalesce,
    }
}

impl Outbox {
    pub fn new(store: Store, publisher: Publisher, cloud: CloudState) -> Self {
        Self {
            store,
            publisher,
            cloud,
            dropped_expired: Arc::default(),
        }
    }

    /// Whether a message for the cloud must wait in the outbox rather than go out now.
    pub fn must_queue(&self) -> bool {
        !self.cloud.connected() || self.store.outbox_len() > 0
    }

    /// The outbox entry for the message `message` makes, to commit with the change it reports,
    /// when it must wait; `None` when it goes straight out once the change is committed
    /// ([`Self::send_to_cloud`]).
    pub fn hold(&self, message: impl FnOnce() -> CloudMessage) -> Option<CloudMessage> {
        self.must_queue().then(message)
    }

    /// Messages waiting for the cloud.
    pub fn len(&self) -> usize {
        self.store.outbox_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries dropped since start because the outbox was full (`outbox.max_messages`; the
    /// store drops the oldest in the transaction that queues one too many).
    pub fn dropped_full(&self) -> u64 {
        self.store.outbox_dropped_full()
    }

    /// Entries dropped since start for being older than `outbox.max_age`.
    pub fn dropped_expired(&self) -> u64 {
        self.dropped_expired.load(Ordering::Relaxed)
    }

    /// Sends to edgehub now, or queues durably when it must wait.
    pub async fn send_to_cloud(&self, message: CloudMessage) -> Result<(), StoreError> {
        if self.must_queue() {
            self.store
                .write(Change {
                    to_cloud: Some(message),
                    ..Change::default()
                })
                .await?;
        } else {
            self.publisher.send(Peer::Edgehub, message.payload).await;
        }
        Ok(())
    }

    /// Sends the outbox whenever the cloud is connected and something is queued.
    pub async fn run_drain(self, settings: OutboxSettings, mut stop: Shutdown) {
        let mut cloud = self.cloud.watch();
        let per_tick = (settings.drain_rate as usize / 10).max(1);
        let max_age_ms = i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX);
        loop {
            while !(self.cloud.connected() && self.store.outbox_len() > 0) {
                tokio::select! {
                    _ = cloud.changed() => {}
                    _ = self.store.outbox_changed() => {}
                    // A queued entry can race a reconnect; look again now and then.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait() => return,
                }
            }
            tracing::info!(
                queued = self.store.outbox_len(),
                rate = settings.drain_rate,
                "cloud connected: sending the outbox"
            );
            match self.drain(per_tick, max_age_ms, &mut stop).await {
                Ok(true) => tracing::info!("outbox sent"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "outbox drain failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if stop.is_shutdown() {
                return;
            }
        }
    }

    /// Sends until the outbox is empty (`true`), the cloud goes away or shutdown starts
    /// (`false`).
    async fn drain(
        &self,
        per_tick: usize,
        max_age_ms: i64,
        stop: &mut Shutdown,
    ) -> Result<bool, StoreError> {
        loop {
            if !self.cloud.connected() || stop.is_shutdown() {
                return Ok(false);
            }
            let batch = self.store.outbox_batch(per_tick).await?;
            if batch.is_empty() {
                return Ok(true);
            }
            let now = crate::message::now_millis();
            let mut done = Vec::with_capacity(batch.len());
            let mut expired = 0u64;
            for entry in batch {
                if !self.cloud.connected() {
                    break;
                }
                if now.saturating_sub(entry.created_ms) > max_age_ms {
                    expired += 1;
                } else {
                    self.publisher.send(Peer::Edgehub, entry.payload).await;
                }
                done.push(entry.seq);
            }
            if expired > 0 {
                self.dropped_expired.fetch_add(expired, Ordering::Relaxed);
                tracing::warn!(expired, "outbox messages older than outbox.max_age dropped");
            }
            // Removed once the broker has acknowledged them: until then they live only in the
            // MQTT client, and a crash in between sends them again (at least once), never loses
            // them.
            let mark = self.publisher.delivery.mark();
            let mut confirmed = self.publisher.delivery.confirmed();
            tokio::select! {
                acked = confirmed.wait_for(|c| *c >= mark) => {
                    if acked.is_err() {
                        return Ok(false);
                    }
                }
                _ = stop.wait() => return Ok(false),
            }
            self.store
                .write(Change {
                    outbox_done: done,
                    ..Change::default()
                })
                .await?;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.wait() => return Ok(false),
            }
        }
    }
}
