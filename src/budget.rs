//! Flow control for inbound messages.
//!
//! MQTT 3.1.1 gives a client no way to tell the broker to slow down except to stop reading, and
//! a broker's in-flight window cannot be relied on to keep memory small (mosquitto was seen
//! delivering thousands of unacknowledged QoS 1 messages in one burst). So every message
//! received holds a [`Permit`] from a fixed budget of messages and bytes until its handling is
//! finished, and when the budget is spent the receive loop waits for a permit before it reads
//! the next message. Nothing is refused: the broker queues what MetaManager has not read, and
//! its publishers are slowed. This is possible because replies leave on another connection
//! (see [`crate::mqtt`]), so waiting here never stops the replies that free the budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// How much may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages received and not yet finished, at most.
    pub messages: usize,
    /// Payload bytes received and not yet finished, at most. A single message larger than this
    /// is still taken when nothing else is in flight, so that the size limit, not the budget,
    /// decides about it.
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            messages: 1000,
            bytes: 32 * 1024 * 1024,
        }
    }
}

pub struct InboundBudget {
    limits: Limits,
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// Woken on every release, so a waiting receive loop looks again.
    released: Notify,
}

/// One message's share of the budget, returned when dropped.
pub struct Permit {
    budget: Arc<InboundBudget>,
    bytes: usize,
}

impl InboundBudget {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits: Limits {
                messages: limits.messages.max(1),
                bytes: limits.bytes.max(1),
            },
            messages: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            released: Notify::new(),
        })
    }

    /// Takes a share for a message of `bytes`, waiting while the budget is spent.
    pub async fn acquire(self: &Arc<Self>, bytes: usize) -> Permit {
        loop {
            // Registered before the check, so a release between the check and the wait is
            // not missed.
            let released = self.released.notified();
            if let Some(permit) = self.try_acquire(bytes) {
                return permit;
            }
            released.await;
        }
    }

    /// Takes a share, or `None` when the budget is spent. Only the receive loop takes shares,
    /// so the check and the take cannot race with another taker.
    pub fn try_acquire(self: &Arc<Self>, bytes: usize) -> Option<Permit> {
        let messages = self.messages.load(Ordering::Acquire);
        let held = self.bytes.load(Ordering::Acquire);
        let fits = messages < self.limits.messages
            && (messages == 0 || held.saturating_add(bytes) <= self.limits.bytes);
        if !fits {
            return None;
        }
        self.messages.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        Some(Permit {
            budget: self.clone(),
            bytes,
        })
    }

    fn release(&self, bytes: usize) {
        self.messages.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.released.notify_waiters();
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
    use std::time::Duration;

    use super::*;

    #[test]
    fn bounded_by_count_and_bytes() {
        let limits = Limits {
            messages: 10,
            bytes: 100,
        };
        let budget = InboundBudget::new(limits);
        let permits: Vec<Permit> = (0..10).map(|_| budget.try_acquire(1).unwrap()).collect();
        assert!(budget.try_acquire(1).is_none());
        drop(permits);
        assert_eq!(budget.messages(), 0);
        let big = budget.try_acquire(100).unwrap();
        assert!(budget.try_acquire(1).is_none(), "bytes exhausted");
        drop(big);
        // Alone, even an oversized message gets through to be refused by the size check.
        assert!(budget.try_acquire(1000).is_some());
    }

    #[tokio::test]
    async fn acquire_waits_for_a_release_instead_of_refusing() {
        let budget = InboundBudget::new(Limits {
            messages: 1,
            bytes: 100,
        });
        let held = budget.acquire(10).await;
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire(10).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "must wait while the budget is spent");
        drop(held);
        let second = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a release wakes the waiter")
            .unwrap();
        assert_eq!(budget.messages(), 1);
        drop(second);
        assert_eq!(budget.messages(), 0);
    }
}
