//! Inbound messages received on the current connection and not yet acknowledged to the broker.
//!
//! Each holds its share of the inbound budget until its PUBACK is handed to the receiving
//! connection, so the budget bounds everything MetaManager keeps for a message, its waiting ack
//! included. A PUBACK names a packet id, and packet ids belong to one connection: after a
//! reconnect the broker sends what was unacknowledged again, and may give it (or another
//! message) a new packet id. So the record is dropped on every new connection, and an ack asked
//! for a message of an earlier connection is not sent: the broker redelivers that message and
//! it is acknowledged then. Messages are told apart by a receipt number of their own, never by
//! packet id, which the broker reuses.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use crate::budget::Permit;

#[derive(Default)]
pub(crate) struct Unacked {
    state: Mutex<State>,
    /// Acks asked for and not yet handed to the receiving connection, which shutdown waits for.
    pub waiting: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Counts connections, so an ack can tell whether its connection is still the current one.
    connection: u64,
    /// The last receipt given; receipt 0 is never given (see [`super::Inbound::detached`]).
    last_receipt: u64,
    by_receipt: HashMap<u64, Entry>,
}

struct Entry {
    /// The packet id to acknowledge; `None` for a QoS 0 message, which has no ack.
    pkid: Option<u16>,
    permit: Permit,
}

/// What an ack needs from the record: the connection it belongs to, the packet id to name, and
/// the budget share to release once it is sent.
pub(crate) struct Taken {
    pub connection: u64,
    pub pkid: Option<u16>,
    pub permit: Permit,
}

/// An inbound message's broker ack, held until the publishes before it are confirmed.
pub(crate) struct PendingAck {
    pub pkid: u16,
    /// [`crate::delivery::Delivery::mark`] when the ack was asked for.
    pub after: u64,
    /// The connection the message came on, and its share of the inbound budget.
    pub taken: Taken,
}

impl Unacked {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection: whatever the last one left unacknowledged comes again.
    pub fn connected(&self) {
        let mut s = self.lock();
        s.connection += 1;
        s.by_receipt.clear();
    }

    pub fn connection(&self) -> u64 {
        self.lock().connection
    }

    /// Records a received message and returns its receipt.
    pub fn received(&self, pkid: Option<u16>, permit: Permit) -> u64 {
        let mut s = self.lock();
        s.last_receipt += 1;
        let receipt = s.last_receipt;
        s.by_receipt.insert(receipt, Entry { pkid, permit });
        receipt
    }

    /// Takes a message out of the record; `None` when it belongs to an earlier connection.
    pub fn take(&self, receipt: u64) -> Option<Taken> {
        let mut s = self.lock();
        let entry = s.by_receipt.remove(&receipt)?;
        Some(Taken {
            connection: s.connection,
            pkid: entry.pkid,
            permit: entry.permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{InboundBudget, Limits};

    #[test]
    fn an_ack_from_an_earlier_connection_finds_nothing_and_frees_its_share() {
        let budget = InboundBudget::new(Limits::default());
        let unacked = Unacked::default();
        unacked.connected();
        let old = unacked.received(Some(7), budget.try_acquire(5).unwrap());
        unacked.connected();
        assert_eq!(
            budget.messages(),
            0,
            "a new connection releases the old shares"
        );
        // The broker gives packet id 7 to another message on the new connection.
        let new = unacked.received(Some(7), budget.try_acquire(6).unwrap());
        assert!(
            unacked.take(old).is_none(),
            "the old message's ack is not sent"
        );
        let taken = unacked.take(new).expect("the new one is acked");
        assert_eq!((taken.connection, taken.pkid), (2, Some(7)));
        drop(taken);
        assert_eq!(budget.messages(), 0);
    }
}
