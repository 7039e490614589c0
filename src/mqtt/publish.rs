//! The sending half: [`Publisher`] puts everything MetaManager publishes on its second MQTT
//! connection, and takes the requests for inbound acks, which wait for those publishes.
//!
//! Replies and forwards leave here rather than on the receiving connection so that the receive
//! loop can stop reading under load without stopping the replies that make room (see
//! [`crate::budget`]). Because the two connections are independent, an inbound message may be
//! acknowledged to the broker only once everything published because of it has been accepted
//! by the broker: otherwise a crash could lose a forward whose trigger was already acked
//! ([`Delivery`] keeps count).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::mpsc;

use super::unacked::{Taken, Unacked};
use crate::delivery::Delivery;
use crate::topics::{Peer, Topics};

/// An inbound message's broker ack, held until the publishes before it are confirmed.
pub(crate) struct PendingAck {
    pub ack: Publish,
    /// [`Delivery::mark`] when the ack was asked for.
    pub after: u64,
    /// The receiving connection the message came on, and its share of the inbound budget.
    pub taken: Taken,
}

/// Sends to the broker; cheap to clone and safe to use from any task.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Arc<Topics>,
    /// What the broker has acknowledged of this publisher's publishes.
    pub delivery: Arc<Delivery>,
    unacked: Arc<Unacked>,
    acks: mpsc::UnboundedSender<PendingAck>,
}

impl Publisher {
    pub(crate) fn new(
        client: AsyncClient,
        topics: Arc<Topics>,
        delivery: Arc<Delivery>,
        unacked: Arc<Unacked>,
        acks: mpsc::UnboundedSender<PendingAck>,
    ) -> Self {
        Self {
            client,
            topics,
            delivery,
            unacked,
            acks,
        }
    }

    /// Publishes `payload` at QoS 1 on the topic that reaches `peer`. Takes `Bytes` so a
    /// forwarded message goes out without copying its payload. Waits only while the sending
    /// connection's queue is full: that is how a slow broker slows MetaManager down.
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
        // Held while the request is queued, so sequence numbers follow the connection's order.
        let _order = self.delivery.enqueue.lock().await;
        let seq = self.delivery.queue();
        if let Err(e) = self
            .client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
            .await
        {
            tracing::warn!(topic, error = %e, "publish dropped: MQTT client is shut down");
            self.delivery.forget_queued(seq);
        }
    }

    /// Publishes sent again since start because the broker lost the sending connection's
    /// session.
    pub fn resent_publishes(&self) -> u64 {
        self.delivery.resent.load(Ordering::Relaxed)
    }

    /// Acknowledges an inbound QoS 1 publish to the broker, once everything published before
    /// this call has been accepted by the broker, and releases its share of the inbound budget
    /// then. Never waits. A message that came on an earlier connection is not acknowledged: the
    /// broker sends it again.
    pub fn ack(&self, publish: &Publish) {
        let Some(taken) = self.unacked.take(publish) else {
            tracing::debug!(
                pkid = publish.pkid,
                "ack of a message from an earlier connection dropped; the broker redelivers it"
            );
            return;
        };
        if publish.qos == QoS::AtMostOnce {
            return;
        }
        let mut ack = Publish::new("", publish.qos, Vec::new());
        ack.pkid = publish.pkid;
        let after = self.delivery.mark();
        self.unacked.waiting.fetch_add(1, Ordering::AcqRel);
        if self.acks.send(PendingAck { ack, after, taken }).is_err() {
            self.unacked.waiting.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("ack dropped: MQTT link is shut down");
        }
    }
}
