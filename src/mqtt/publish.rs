//! The sending half: MetaManager's second MQTT connection, which carries everything it
//! publishes, and the record of which of those publishes the broker has acknowledged.
//!
//! Replies and forwards leave here rather than on the receiving connection so that the receive
//! loop can stop reading under load without stopping the replies that make room (see
//! [`crate::budget`]). Because the two connections are independent, an inbound message may be
//! acknowledged to the broker only once everything published because of it has been accepted
//! by the broker: otherwise a crash could lose a forward whose trigger was already acked. Every
//! publish gets a sequence number, and [`Deliveries`] keeps the highest number up to which all
//! publishes are acknowledged; an inbound ack waits for the number current when it was asked for.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::{mpsc, watch};

use crate::topics::{Peer, Topics};

/// An inbound message's broker ack, held until the publishes before it are confirmed.
pub(crate) struct PendingAck {
    pub ack: Publish,
    /// [`Deliveries::enqueued`] when the ack was asked for.
    pub after: u64,
}

/// Sends to the broker; cheap to clone and safe to use from any task.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Arc<Topics>,
    deliveries: Arc<Deliveries>,
    acks: mpsc::UnboundedSender<PendingAck>,
}

impl Publisher {
    pub(crate) fn new(
        client: AsyncClient,
        topics: Arc<Topics>,
        deliveries: Arc<Deliveries>,
        acks: mpsc::UnboundedSender<PendingAck>,
    ) -> Self {
        Self {
            client,
            topics,
            deliveries,
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
        // Held while the request is queued, so sequence numbers follow the connection's order.
        let _order = self.deliveries.enqueue.lock().await;
        let seq = self.deliveries.queue();
        if let Err(e) = self
            .client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
            .await
        {
            tracing::warn!(topic, error = %e, "publish dropped: MQTT client is shut down");
            self.deliveries.forget_queued(seq);
        }
    }

    /// Publishes given up since start because the broker lost the sending connection's session.
    pub fn lost_publishes(&self) -> u64 {
        self.deliveries.lost.load(Ordering::Relaxed)
    }

    /// Acknowledges an inbound QoS 1 publish to the broker, once everything published before
    /// this call has been accepted by the broker. Never waits.
    pub fn ack(&self, publish: &Publish) {
        if publish.qos == QoS::AtMostOnce {
            return;
        }
        let mut ack = Publish::new("", publish.qos, Vec::new());
        ack.pkid = publish.pkid;
        let after = self.deliveries.enqueued();
        self.deliveries.acks_waiting.fetch_add(1, Ordering::AcqRel);
        if self.acks.send(PendingAck { ack, after }).is_err() {
            self.deliveries.acks_waiting.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("ack dropped: MQTT link is shut down");
        }
    }
}

/// Which publishes the broker has acknowledged.
#[derive(Default)]
pub(crate) struct Deliveries {
    enqueue: tokio::sync::Mutex<()>,
    state: Mutex<DeliveryState>,
    /// All publishes numbered up to this are acknowledged (or known lost).
    confirmed: watch::Sender<u64>,
    /// Inbound acks asked for and not yet handed to the receiving connection.
    pub acks_waiting: AtomicU64,
    /// Publishes given up because the broker lost the session that held them.
    pub lost: AtomicU64,
}

#[derive(Default)]
struct DeliveryState {
    /// Number of the last publish queued.
    last: u64,
    /// Queued publishes the connection has not yet sent, in order.
    queued: VecDeque<u64>,
    /// Sent publishes by packet id, awaiting the broker's PUBACK.
    sent: HashMap<u16, u64>,
    /// Acknowledged numbers above `confirmed`, waiting for the gap below them to close.
    done: BTreeSet<u64>,
    confirmed: u64,
}

impl Deliveries {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> u64 {
        let mut s = self.lock();
        s.last += 1;
        let seq = s.last;
        s.queued.push_back(seq);
        seq
    }

    /// The number of the last publish queued.
    pub fn enqueued(&self) -> u64 {
        self.lock().last
    }

    pub fn confirmed(&self) -> watch::Receiver<u64> {
        self.confirmed.subscribe()
    }

    fn forget_queued(&self, seq: u64) {
        let mut s = self.lock();
        s.queued.retain(|&q| q != seq);
        self.finish(&mut s, seq);
    }

    /// The connection sent a publish with packet id `pkid`. A packet id already awaiting its
    /// ack is a retransmission; any other is the oldest queued publish, since publishes are
    /// sent in the order they were queued.
    pub fn sent(&self, pkid: u16) {
        let mut s = self.lock();
        if s.sent.contains_key(&pkid) {
            return;
        }
        if let Some(seq) = s.queued.pop_front() {
            s.sent.insert(pkid, seq);
        }
    }

    pub fn acknowledged(&self, pkid: u16) {
        let mut s = self.lock();
        if let Some(seq) = s.sent.remove(&pkid) {
            self.finish(&mut s, seq);
        }
    }

    /// The broker started a new session: rumqttc drops what the old one had not delivered,
    /// so nothing outstanding will be acknowledged any more.
    pub fn session_lost(&self) -> usize {
        let mut s = self.lock();
        let outstanding: Vec<u64> = s.sent.drain().map(|(_, seq)| seq).collect();
        let queued: Vec<u64> = s.queued.drain(..).collect();
        let n = outstanding.len() + queued.len();
        for seq in outstanding.into_iter().chain(queued) {
            self.finish(&mut s, seq);
        }
        self.lost.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    fn finish(&self, s: &mut DeliveryState, seq: u64) {
        if seq <= s.confirmed {
            return;
        }
        s.done.insert(seq);
        let before = s.confirmed;
        while s.done.remove(&(s.confirmed + 1)) {
            s.confirmed += 1;
        }
        if s.confirmed != before {
            self.confirmed.send_replace(s.confirmed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_in_order_whatever_order_the_acks_come_in() {
        let d = Deliveries::default();
        let (a, b, c) = (d.queue(), d.queue(), d.queue());
        assert_eq!((a, b, c), (1, 2, 3));
        d.sent(7);
        d.sent(8);
        d.sent(7); // a retransmission takes no new number
        d.sent(9);
        d.acknowledged(9);
        d.acknowledged(8);
        assert_eq!(*d.confirmed().borrow(), 0, "1 is not acknowledged yet");
        d.acknowledged(7);
        assert_eq!(*d.confirmed().borrow(), 3);
        // An ack for a packet id nobody waits for changes nothing.
        d.acknowledged(7);
        assert_eq!(*d.confirmed().borrow(), 3);
    }

    #[test]
    fn a_lost_session_releases_every_waiting_ack() {
        let d = Deliveries::default();
        d.queue();
        d.queue();
        d.sent(1);
        assert_eq!(d.session_lost(), 2);
        assert_eq!(*d.confirmed().borrow(), 2);
        assert_eq!(d.lost.load(Ordering::Relaxed), 2);
    }
}
