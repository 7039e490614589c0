//! Remote queries waiting for the cloud's answer.
//!
//! Each waits at most the configured timeout, so a cloud that never answers costs edged one
//! `error` reply, never a hung query (a long-standing KubeEdge complaint). The table is bounded:
//! when it is full, new remote queries are refused at once instead of piling up.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::mqtt::Inbound;
use tokio::sync::oneshot;

use crate::message::Message;

/// Remote queries in flight at once.
pub const MAX_PENDING: usize = 1024;

/// The cloud's answer, with the inbound publish to acknowledge once it has been handled.
pub struct Answer {
    pub message: Message,
    pub publish: Inbound,
}

pub struct RemoteQueries {
    timeout: Duration,
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("too many remote queries in flight ({MAX_PENDING}); try again later")]
pub struct TooManyPending;

impl RemoteQueries {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Registers a query forwarded to the cloud under `msg_id`.
    pub fn register(&self, msg_id: &str) -> Result<oneshot::Receiver<Answer>, TooManyPending> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.len() >= MAX_PENDING {
            return Err(TooManyPending);
        }
        let (tx, rx) = oneshot::channel();
        waiting.insert(msg_id.to_owned(), tx);
        Ok(rx)
    }

    /// Hands the cloud's answer to the query it answers; gives it back when none waits.
    pub fn complete(&self, answer: Answer) -> Result<(), Box<Answer>> {
        let Some(parent) = answer.message.header.parent_msg_id.as_deref() else {
            return Err(Box::new(answer));
        };
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(parent);
        match waiter {
            Some(tx) => tx.send(answer).map_err(Box::new),
            None => Err(Box::new(answer)),
        }
    }

    /// Forgets a query that timed out.
    pub fn forget(&self, msg_id: &str) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(msg_id);
    }

    pub fn len(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
