//! Whether a new client can connect to the broker now: the part of `/readyz` that MetaManager's
//! own connections cannot answer. They were made at start-up and may stay up while the broker
//! refuses every new client (out of connection slots or descriptors, or an external broker
//! that lost its listener), and then edged and edgehub cannot reach the node's metadata.
//!
//! The check connects a fresh client, with a short timeout. Its result is kept for a few
//! seconds, and concurrent probes share one check, so frequent probes cost one connection per
//! few seconds, not one each.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::broker;
use crate::mqtt::{self, LinkOptions};

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a result is served without a new check.
const FRESH_FOR: Duration = Duration::from_secs(5);

/// How to connect as a new client.
pub enum Target {
    /// The embedded broker, with MetaManager's own account on it.
    Embedded {
        addr: SocketAddr,
        credentials: Option<(String, String)>,
    },
    /// An external broker, with the address, TLS and account MetaManager itself uses.
    External(Box<LinkOptions>),
}

pub struct Readiness {
    target: Target,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            last: Mutex::new(None),
        }
    }

    /// Whether a new client could connect, as of at most [`FRESH_FOR`] ago; the error says why
    /// not.
    pub async fn fresh_connection(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, outcome)) = &*last {
            if at.elapsed() < FRESH_FOR {
                return outcome.clone();
            }
        }
        let outcome = match &self.target {
            Target::Embedded { addr, credentials } => {
                broker::probe(*addr, CHECK_TIMEOUT, credentials.clone())
                    .await
                    .map_err(|e| e.to_string())
            }
            Target::External(options) => mqtt::probe(options, CHECK_TIMEOUT).await,
        };
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, "readiness: a new client cannot connect to the broker");
        }
        *last = Some((Instant::now(), outcome.clone()));
        outcome
    }
}
