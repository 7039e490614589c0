//! The embedded broker's watchdog.
//!
//! rumqttd runs on threads MetaManager cannot look into. If its router stopped, or it ran out
//! of connection slots, MetaManager's own connections could stay up while no other client can
//! reach the node's metadata, and nothing would say so. So a fresh client connects now and then,
//! the way edged would. While that fails, the health probes fail; once it has failed for the
//! configured time, MetaManager stops with a non-zero status so that its service manager
//! starts it again, with a new broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker;
use crate::shutdown::Shutdown;

/// How long one check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
#[error("the embedded broker on {addr} has not accepted a connection for {failing_for:?} (last reason: {reason})")]
pub struct BrokerUnresponsive {
    pub addr: SocketAddr,
    pub failing_for: Duration,
    pub reason: String,
}

impl BrokerUnresponsive {
    /// The watchdog itself stopped before MetaManager did (a panic): the broker is no longer
    /// watched, which is treated like a broker that stopped serving.
    pub fn watchdog_ended(addr: Option<SocketAddr>, reason: String) -> Self {
        Self {
            addr: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            failing_for: Duration::ZERO,
            reason: format!("the watchdog stopped: {reason}"),
        }
    }
}

/// Whether the embedded broker passed the watchdog's last check. Starts, and with an external
/// broker (which has its own supervision) stays, true. Cheap to clone.
#[derive(Clone)]
pub struct BrokerServing(Arc<AtomicBool>);

impl Default for BrokerServing {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl BrokerServing {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, serving: bool) {
        self.0.store(serving, Ordering::Relaxed);
    }
}

pub struct Watchdog {
    pub addr: SocketAddr,
    pub credentials: Option<(String, String)>,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Watchdog {
    /// Checks until shutdown; returns an error when the broker failed every check for `timeout`.
    pub async fn run(
        self,
        serving: BrokerServing,
        mut stop: Shutdown,
    ) -> Result<(), BrokerUnresponsive> {
        let mut failing_since: Option<Instant> = None;
        let mut skipped = rumqttd::skipped_messages();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.wait() => return Ok(()),
            }
            // The one bound of the embedded broker that loses messages, made loud.
            let now = rumqttd::skipped_messages();
            if now > skipped {
                tracing::warn!(
                    skipped = now - skipped,
                    "subscribers of the embedded broker fell more than its log's length behind and skipped messages (edged or edgehub not reading fast enough)"
                );
                skipped = now;
            }
            match broker::probe(self.addr, PROBE_TIMEOUT, self.credentials.clone()).await {
                Ok(()) => {
                    if failing_since.take().is_some() {
                        tracing::info!(addr = %self.addr, "embedded broker accepts connections again");
                    }
                    serving.set(true);
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    serving.set(false);
                    let failing_for = since.elapsed();
                    tracing::error!(addr = %self.addr, error = %e, ?failing_for, "embedded broker check failed");
                    if failing_for >= self.timeout {
                        return Err(BrokerUnresponsive {
                            addr: self.addr,
                            failing_for,
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
    }
}
