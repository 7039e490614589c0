//! The sending half: [`Publisher`] puts everything MetaManager publishes on the link's sending
//! side, and takes the requests for inbound acks, which wait for those publishes.
//!
//! Replies and forwards leave on the sending side rather than the receiving one so that the
//! receive loop can stop reading under load without stopping the replies that make room (see
//! [`crate::budget`]). Because the two sides are independent, an inbound message may be
//! acknowledged to the broker only once everything published because of it has been accepted
//! by the broker: otherwise a crash could lose a forward whose trigger was already acked
//! ([`Delivery`] keeps count).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::QoS;
use tokio::sync::mpsc;

use super::unacked::{PendingAck, Unacked};
use super::{Inbound, Outlet};
use crate::delivery::Delivery;
use crate::topics::{Peer, Topics};

/// Sends to the broker; cheap to clone and safe to use from any task.
#[derive(Clone)]
pub struct Publisher {
    outlet: Outlet,
    topics: Arc<Topics>,
    /// What the broker has acknowledged of this publisher's publishes.
    pub delivery: Arc<Delivery>,
    unacked: Arc<Unacked>,
    acks: mpsc::UnboundedSender<PendingAck>,
}

impl Publisher {
    pub(crate) fn new(
        outlet: Outlet,
        topics: Arc<Topics>,
        delivery: Arc<Delivery>,
        unacked: Arc<Unacked>,
        acks: mpsc::UnboundedSender<PendingAck>,
    ) -> Self {
        Self {
            outlet,
            topics,
            delivery,
            unacked,
            acks,
        }
    }

    /// Publishes `payload` at QoS 1 on the topic that reaches `peer`. Takes `Bytes` so a
    /// forwarded message goes out without copying its payload. Waits only while the sending
    /// side's queue is full: that is how a slow broker slows MetaManager down.
    pub async fn send(&self, peer: Peer, payload: impl Into<Bytes>) {
        self.publish(self.topics.to(peer), false, payload.into())
            .await;
    }

    /// Publishes the retained status object.
    pub async fn status(&self, payload: Vec<u8>) {
        self.publish(&self.topics.status, true, payload.into())
            .await;
    }

    async fn publish(&self, topic: &str, retain: bool, payload: Bytes) {
        // Given back when the broker acknowledges this publish (Delivery::finish).
        match self.delivery.slots.acquire().await {
            Ok(slot) => slot.forget(),
            Err(_) => return,
        }
        // Held while the request is queued, so sequence numbers follow the link's order.
        let _order = self.delivery.enqueue.lock().await;
        let seq = self.delivery.queue();
        let queued = match &self.outlet {
            Outlet::Client(client) => client
                .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .is_ok(),
            Outlet::InProcess(link) => link.publish(&self.delivery, topic, retain, payload).await,
            #[cfg(test)]
            Outlet::Memory(broker) => broker.publish(&self.delivery, topic, retain, payload),
        };
        if !queued {
            tracing::warn!(
                topic,
                "publish dropped: the link to the broker is shut down"
            );
            self.delivery.forget_queued(seq);
        }
    }

    /// Publishes sent again since start because the broker lost the sending connection's
    /// session.
    pub fn resent_publishes(&self) -> u64 {
        self.delivery.resent.load(Ordering::Relaxed)
    }

    /// Acknowledges an inbound QoS 1 message to the broker, once everything published before
    /// this call has been accepted by the broker, and releases its share of the inbound budget
    /// then. Never waits. A message that came on an earlier connection is not acknowledged: the
    /// broker sends it again.
    pub fn ack(&self, message: &Inbound) {
        if message.receipt == 0 {
            return;
        }
        let Some(taken) = self.unacked.take(message.receipt) else {
            tracing::debug!(
                "ack of a message from an earlier connection dropped; the broker redelivers it"
            );
            return;
        };
        let Some(pkid) = taken.pkid else {
            // QoS 0: nothing to acknowledge; its share goes back now.
            return;
        };
        let after = self.delivery.mark();
        self.unacked.waiting.fetch_add(1, Ordering::AcqRel);
        if self.acks.send(PendingAck { pkid, after, taken }).is_err() {
            self.unacked.waiting.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("ack dropped: the link to the broker is shut down");
        }
    }
}
