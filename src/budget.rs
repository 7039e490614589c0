//! Flow control for inbound messages.
//!
//! MQTT 3.1.1 gives a client no way to tell the broker to slow down, and a broker's in-flight
//! limit cannot be relied on (mosquitto was seen delivering thousands of unacknowledged QoS 1
//! messages in one burst). The receive loop must never wait, or the replies that would make
//! room could not be sent. So every message received holds a [`Permit`] from a fixed budget of
//! messages and bytes until its handling is finished (acknowledged); a message that finds the
//! budget spent is refused with an error at once. Memory used by messages in flight is bounded
//! by the budget, whatever the broker sends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Messages received and not yet finished, at most.
pub const MAX_MESSAGES: usize = 10_000;
/// Payload bytes received and not yet finished, at most.
pub const MAX_BYTES: usize = 32 * 1024 * 1024;

#[derive(Default)]
pub struct InboundBudget {
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

/// One message's share of the budget, returned when dropped.
pub struct Permit {
    budget: Arc<InboundBudget>,
    bytes: usize,
}

impl InboundBudget {
    /// Takes a share for a message of `bytes`, or `None` when the budget is spent. A message
    /// larger than the whole byte budget is still admitted when nothing else is in flight, so
    /// that the size limit, not the budget, decides about it.
    pub fn admit(self: &Arc<Self>, bytes: usize) -> Option<Permit> {
        let messages = self.messages.fetch_add(1, Ordering::AcqRel) + 1;
        let total = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if messages > MAX_MESSAGES || (total > MAX_BYTES && messages > 1) {
            self.release(bytes);
            return None;
        }
        Some(Permit {
            budget: self.clone(),
            bytes,
        })
    }

    fn release(&self, bytes: usize) {
        self.messages.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Messages in flight now.
    pub fn messages(&self) -> usize {
        self.messages.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_count_and_bytes() {
        let budget = Arc::new(InboundBudget::default());
        let permits: Vec<Permit> = (0..MAX_MESSAGES)
            .map(|_| budget.admit(1).unwrap())
            .collect();
        assert!(budget.admit(1).is_none());
        drop(permits);
        assert_eq!(budget.messages(), 0);
        let big = budget.admit(MAX_BYTES).unwrap();
        assert!(budget.admit(1).is_none(), "bytes exhausted");
        drop(big);
        // Alone, even an oversized message gets through to be refused by the size check.
        assert!(budget.admit(MAX_BYTES * 2).is_some());
    }
}
