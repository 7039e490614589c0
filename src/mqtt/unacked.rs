//! Inbound messages received on the current connection and not yet acknowledged to the broker.
//!
//! Each holds its share of the inbound budget until its PUBACK is handed to the receiving
//! connection, so the budget bounds everything MetaManager keeps for a message, its waiting ack
//! included. A PUBACK names a packet id, and packet ids belong to one connection: after a
//! reconnect the broker sends what was unacknowledged again, and may give it (or another
//! message) a new packet id. So the record is dropped on every new connection, and an ack asked
//! for a message of an earlier connection is not sent: the broker redelivers that message and
//! it is acknowledged then.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use rumqttc::Publish;

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
    by_pkid: HashMap<u16, Entry>,
}

struct Entry {
    /// The payload's address and length tell this message from another that was given the same
    /// packet id on a later connection.
    payload: (usize, usize),
    permit: Permit,
}

/// What an ack needs from the record: the connection it belongs to and the budget share to
/// release once it is sent.
pub(crate) struct Taken {
    pub connection: u64,
    pub permit: Permit,
}

fn identity(publish: &Publish) -> (usize, usize) {
    (publish.payload.as_ptr() as usize, publish.payload.len())
}

impl Unacked {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection: whatever the last one left unacknowledged comes again.
    pub fn connected(&self) {
        let mut s = self.lock();
        s.connection += 1;
        s.by_pkid.clear();
    }

    pub fn connection(&self) -> u64 {
        self.lock().connection
    }

    pub fn received(&self, publish: &Publish, permit: Permit) {
        let entry = Entry {
            payload: identity(publish),
            permit,
        };
        self.lock().by_pkid.insert(publish.pkid, entry);
    }

    /// Takes `publish` out of the record; `None` when it belongs to an earlier connection.
    pub fn take(&self, publish: &Publish) -> Option<Taken> {
        let mut s = self.lock();
        let ours = s
            .by_pkid
            .get(&publish.pkid)
            .is_some_and(|e| e.payload == identity(publish));
        if !ours {
            return None;
        }
        let entry = s.by_pkid.remove(&publish.pkid)?;
        Some(Taken {
            connection: s.connection,
            permit: entry.permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rumqttc::QoS;

    use super::*;
    use crate::budget::{InboundBudget, Limits};

    fn publish(pkid: u16, payload: &Bytes) -> Publish {
        let mut p = Publish::from_bytes("t", QoS::AtLeastOnce, payload.clone());
        p.pkid = pkid;
        p
    }

    #[test]
    fn an_ack_from_an_earlier_connection_finds_nothing_and_frees_its_share() {
        let budget = InboundBudget::new(Limits::default());
        let unacked = Unacked::default();
        unacked.connected();
        let first = Bytes::from_static(b"first");
        let m = publish(7, &first);
        unacked.received(&m, budget.try_acquire(5).unwrap());
        unacked.connected();
        assert_eq!(
            budget.messages(),
            0,
            "a new connection releases the old shares"
        );
        // The broker gives packet id 7 to another message on the new connection.
        let second = Bytes::from(b"second".to_vec());
        let other = publish(7, &second);
        unacked.received(&other, budget.try_acquire(6).unwrap());
        assert!(
            unacked.take(&m).is_none(),
            "the old message's ack is not sent"
        );
        let taken = unacked.take(&other).expect("the new one is acked");
        assert_eq!(taken.connection, 2);
        drop(taken);
        assert_eq!(budget.messages(), 0);
    }
}
