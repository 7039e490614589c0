//! Which of MetaManager's own QoS 1 publishes the broker has acknowledged.
//!
//! Handing a publish to the MQTT client is not delivering it: it may wait in the client's queue
//! and dies with the process. Only the broker's PUBACK says it arrived. Two things wait on that:
//! the broker ack of the inbound message that caused the publish ([`crate::mqtt`]), and the
//! settled mark of its msg_id in the store ([`crate::store::Store::settle`]). The client does not
//! tell which publish a PUBACK answers, so every publish gets a number as it is queued, the
//! connection's events say which packet id each queued publish went out with, and a PUBACK
//! names its packet id. [`Delivery`] keeps the highest number up to which every publish is
//! acknowledged, whatever order the acks come in; a [`Delivery::mark`] read after queueing a
//! publish is reached once that publish and every one before it are acknowledged.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;

/// Publishes queued or awaiting their PUBACK, at most. Half the sending connection's in-flight
/// window: everything outstanding then fits the window when rumqttc sends it again after a
/// reconnect, and a new packet id never lands on one still in use (rumqttc would hold such a
/// publish aside, and a second one would overwrite the first).
pub const MAX_OUTSTANDING: usize = 512;

/// Which publishes the broker has acknowledged.
pub struct Delivery {
    /// Held while a publish is queued, so numbers follow the connection's order.
    pub(crate) enqueue: tokio::sync::Mutex<()>,
    /// One for each publish that may still be queued or outstanding.
    pub(crate) slots: tokio::sync::Semaphore,
    state: Mutex<DeliveryState>,
    /// All publishes numbered up to this are acknowledged.
    confirmed: watch::Sender<u64>,
    /// Publishes sent again because the broker lost the session that held them.
    pub resent: AtomicU64,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            enqueue: Default::default(),
            slots: tokio::sync::Semaphore::new(MAX_OUTSTANDING),
            state: Default::default(),
            confirmed: Default::default(),
            resent: Default::default(),
        }
    }
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

impl Delivery {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn queue(&self) -> u64 {
        let mut s = self.lock();
        s.last += 1;
        let seq = s.last;
        s.queued.push_back(seq);
        seq
    }

    /// The number of the last publish queued: read after queueing a publish, it is reached once
    /// that publish, and every one queued before it, is acknowledged.
    pub fn mark(&self) -> u64 {
        self.lock().last
    }

    pub fn reached(&self, mark: u64) -> bool {
        *self.confirmed.borrow() >= mark
    }

    pub fn confirmed(&self) -> watch::Receiver<u64> {
        self.confirmed.subscribe()
    }

    pub(crate) fn forget_queued(&self, seq: u64) {
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

    /// The broker started a new session, and rumqttc dropped what the old one had not
    /// acknowledged; MetaManager sends it again. `resend` lists those publishes in the order they
    /// will go out again: the packet id each had in the old session, or `None` for one that was
    /// never sent. Numbers follow that order, so the resend's events map to the right publishes.
    pub fn resend(&self, resend: &[Option<u16>]) {
        let mut s = self.lock();
        let mut sent = std::mem::take(&mut s.sent);
        let mut queued = std::mem::take(&mut s.queued);
        let mut order = VecDeque::with_capacity(resend.len() + queued.len());
        for pkid in resend {
            match pkid
                .and_then(|p| sent.remove(&p))
                .or_else(|| queued.pop_front())
            {
                Some(seq) => order.push_back(seq),
                None => tracing::warn!(pkid, "a publish to send again has no number"),
            }
        }
        order.extend(queued);
        s.queued = order;
        // Sent, unacknowledged and not in the resend: nothing will acknowledge it any more.
        for (_, seq) in sent {
            tracing::error!(seq, "a publish the broker did not acknowledge is lost");
            self.finish(&mut s, seq);
        }
        self.resent
            .fetch_add(resend.len() as u64, Ordering::Relaxed);
    }

    fn finish(&self, s: &mut DeliveryState, seq: u64) {
        if seq <= s.confirmed || !s.done.insert(seq) {
            return;
        }
        self.slots.add_permits(1);
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
        let d = Delivery::default();
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
    fn a_lost_session_renumbers_the_resend_in_its_order() {
        let d = Delivery::default();
        let (a, b, c) = (d.queue(), d.queue(), d.queue());
        d.sent(5); // a
        d.sent(6); // b
                   // The session is lost; rumqttc sends b, a (by packet id) and then c, never sent.
        d.resend(&[Some(6), Some(5), None]);
        d.sent(1); // b again
        d.sent(2); // a again
        d.sent(3); // c
        d.acknowledged(2);
        assert_eq!(*d.confirmed().borrow(), a);
        d.acknowledged(1);
        assert_eq!(*d.confirmed().borrow(), b);
        d.acknowledged(3);
        assert_eq!(*d.confirmed().borrow(), c);
        assert_eq!(d.resent.load(Ordering::Relaxed), 3);
    }
}
