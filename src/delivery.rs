//! Which of MetaManager's own QoS 1 publishes the broker has acknowledged.
//!
//! Handing a publish to the MQTT client is not delivering it: it may wait in the client's queue
//! (behind its in-flight window) and dies with the process. Only the broker's PUBACK says it
//! arrived. The client does not tell which publish a PUBACK answers, but order does: publishes
//! go out in the order they entered the client's queue, and a broker acknowledges QoS 1
//! publishes in the order it received them (MQTT 3.1.1, 4.6). So two counters are enough.
//! `handed` is raised *before* a publish enters the queue, so once that call returns, every
//! publish queued up to and including it is counted: the count read then (its [`mark`]) is at
//! least its position. When `acked` reaches the mark, the publish is acknowledged.
//!
//! A publish counted but never acknowledged (the connection shut down) only keeps later marks
//! waiting, the safe direction: what waits on a mark is a claim that something arrived.
//!
//! [`mark`]: Delivery::mark

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Delivery {
    handed: AtomicU64,
    acked: AtomicU64,
}

impl Delivery {
    /// Called just before a QoS 1 publish is handed to the client.
    pub fn handing(&self) {
        self.handed.fetch_add(1, Ordering::SeqCst);
    }

    /// The publish announced with [`Delivery::handing`] did not enter the client's queue.
    pub fn not_handed(&self) {
        self.handed.fetch_sub(1, Ordering::SeqCst);
    }

    /// The broker acknowledged one of MetaManager's QoS 1 publishes.
    pub fn acked(&self) {
        self.acked.fetch_add(1, Ordering::SeqCst);
    }

    /// Read after handing a publish: once [`Delivery::reached`] holds for this mark, that
    /// publish, and every one handed before it, is acknowledged by the broker.
    pub fn mark(&self) -> u64 {
        self.handed.load(Ordering::SeqCst)
    }

    pub fn reached(&self, mark: u64) -> bool {
        self.acked.load(Ordering::SeqCst) >= mark
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_reached_when_everything_handed_up_to_it_is_acked() {
        let d = Delivery::default();
        assert!(d.reached(d.mark()), "nothing handed, nothing to wait for");
        d.handing();
        d.handing();
        let mark = d.mark();
        d.handing();
        d.not_handed();
        assert!(!d.reached(mark));
        d.acked();
        assert!(!d.reached(mark));
        d.acked();
        assert!(d.reached(mark));
    }
}
