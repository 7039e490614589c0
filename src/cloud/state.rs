//! Whether the cloud is reachable, as edgehub last reported it with `connect`.
//!
//! It starts disconnected: until edgehub says otherwise, messages for the cloud wait in the
//! outbox and remote queries fail fast instead of waiting for an answer that cannot come.

use std::sync::Arc;

use tokio::sync::watch;

/// The cloud connection state; cheap to clone, every clone sees the same state.
#[derive(Clone)]
pub struct CloudState(Arc<watch::Sender<bool>>);

impl Default for CloudState {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl CloudState {
    pub fn connected(&self) -> bool {
        *self.0.borrow()
    }

    /// Records the state; `true` when it changed.
    pub fn set(&self, connected: bool) -> bool {
        self.0.send_replace(connected) != connected
    }

    /// Its changes, for tasks that act on them (the outbox drain, the status topic).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}
