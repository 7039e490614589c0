//! MetaManager's link to the broker: one side that receives and one that sends.
//!
//! Two backends give the rest of MetaManager the same [`Inbound`] messages and the same
//! [`Publisher`]:
//! - `client`: two MQTT connections through rumqttc, for an external broker;
//! - `in_process`: two in-process links with the embedded broker's router, so MetaManager's
//!   own traffic crosses neither TCP nor MQTT encoding.
//!
//! Either way there are two ways in, not one. A receive side that stopped reading to slow the
//! broker down would also stop the acks of MetaManager's publishes, whose arrival frees the room
//! it waits for. So:
//! - the receiving side (`metamanager-{node_id}`, the session the broker queues for) reads only
//!   as fast as the inbound budget allows ([`crate::budget`]), and sends nothing but
//!   subscriptions and the broker acks of what it received;
//! - the sending side (`metamanager-{node_id}-out`) carries every publish ([`Publisher`]), and
//!   tracks which the broker has acknowledged ([`crate::delivery::Delivery`]).
//!
//! An inbound message is acknowledged to the broker only after every publish queued before the
//! ack was asked for has been acknowledged by the broker, so no forward or reply can be lost
//! behind an ack that was already given.

mod client;
mod in_process;
#[cfg(test)]
pub mod memory;
mod publish;
pub mod settings;
mod unacked;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use client::{probe, LinkOptions};
pub use publish::Publisher;
use unacked::Unacked;

/// How long shutdown waits for acks and publishes still on their way.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// A message received from the broker. Its share of the inbound budget is held until its ack
/// is confirmed (see [`Publisher::ack`]).
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// Its entry in the record of unacknowledged messages; 0 for none.
    receipt: u64,
}

impl Inbound {
    /// A message that no broker delivered: acknowledging it does nothing. For driving the
    /// message path without a broker.
    pub fn detached(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            receipt: 0,
        }
    }
}

/// The inbound messages, in arrival order, each taken only when the inbound budget has room.
pub struct Incoming(Source);

enum Source {
    /// Received by the connection's own loop, which must keep polling rumqttc.
    Queued(mpsc::UnboundedReceiver<Inbound>),
    /// Read from the router's link by whoever asks, with no task in between.
    InProcess(in_process::Receiving),
}

impl Incoming {
    /// The next message; `None` once the link is shut down. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Inbound> {
        match &mut self.0 {
            Source::Queued(queue) => queue.recv().await,
            Source::InProcess(link) => link.recv().await,
        }
    }

    /// A message already received and not yet taken, if any. The in-process link has none:
    /// what the router holds for it is not received yet.
    pub fn try_recv(&mut self) -> Option<Inbound> {
        match &mut self.0 {
            Source::Queued(queue) => queue.try_recv().ok(),
            Source::InProcess(_) => None,
        }
    }
}

/// Where publishes go: the sending connection's client, or the in-process sending link.
#[derive(Clone)]
pub(crate) enum Outlet {
    Client(rumqttc::AsyncClient),
    InProcess(Arc<in_process::Sending>),
    /// The unit tests' broker in memory.
    #[cfg(test)]
    Memory(Arc<memory::MemoryOutlet>),
}

/// The running link.
pub struct Link {
    pub publisher: Publisher,
    /// `true` while both sides are up; changes on every (re)connection and loss.
    pub connected: watch::Receiver<bool>,
    closing: Closing,
    unacked: Arc<Unacked>,
    tasks: Tasks,
}

/// What shutdown must say goodbye to.
enum Closing {
    Client {
        receiver: rumqttc::AsyncClient,
        sender: rumqttc::AsyncClient,
    },
    InProcess,
}

/// The link's tasks.
struct Tasks {
    /// The receiving connection's loop; the in-process receiving side has none.
    receive: Option<JoinHandle<()>>,
    /// The sending connection's loop, or the in-process acknowledging task.
    send: JoinHandle<()>,
    /// Helpers that end with the link: the client backend's two stages of inbound acks.
    helpers: Vec<JoinHandle<()>>,
}

/// Both sides' states, folded into the one flag the rest of MetaManager watches.
struct Connected {
    receiving: AtomicBool,
    sending: AtomicBool,
    both: watch::Sender<bool>,
}

impl Connected {
    fn new() -> (Arc<Self>, watch::Receiver<bool>) {
        let (both, connected) = watch::channel(false);
        let state = Arc::new(Self {
            receiving: AtomicBool::new(false),
            sending: AtomicBool::new(false),
            both,
        });
        (state, connected)
    }

    fn set(&self, which: &AtomicBool, up: bool) -> bool {
        let was = which.swap(up, Ordering::AcqRel);
        let both = self.receiving.load(Ordering::Acquire) && self.sending.load(Ordering::Acquire);
        self.both
            .send_if_modified(|v| std::mem::replace(v, both) != both);
        was
    }
}

impl Link {
    /// Connects to an external broker in the background; also returns the inbound messages, in
    /// arrival order.
    pub fn start(options: LinkOptions, topics: crate::topics::Topics) -> (Self, Incoming) {
        client::start(options, topics)
    }

    /// Uses the embedded broker's in-process links; also returns the inbound messages, in
    /// arrival order.
    pub fn start_in_process(
        links: crate::broker::OwnLinks,
        topics: crate::topics::Topics,
        inflight: crate::budget::Limits,
    ) -> (Self, Incoming) {
        in_process::start(links, topics, inflight)
    }

    /// Lets waiting acks go out, then closes both sides after everything already queued, and
    /// waits for the loops to end.
    pub async fn shutdown(self) {
        let up = *self.connected.borrow();
        if up {
            let deadline = Instant::now() + FLUSH_TIMEOUT;
            while self.unacked.waiting.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let Tasks {
            receive,
            send,
            helpers,
        } = self.tasks;
        for helper in helpers {
            helper.abort();
        }
        match self.closing {
            Closing::Client { receiver, sender } => {
                if up {
                    // Bounded: a connection that went down after the check above has nobody
                    // to tell.
                    let _ = tokio::time::timeout(FLUSH_TIMEOUT, receiver.disconnect()).await;
                    let _ = tokio::time::timeout(FLUSH_TIMEOUT, sender.disconnect()).await;
                }
                for mut task in receive.into_iter().chain([send]) {
                    // Nothing to say goodbye to when down: do not wait out a reconnect attempt.
                    if !up
                        || tokio::time::timeout(FLUSH_TIMEOUT, &mut task)
                            .await
                            .is_err()
                    {
                        task.abort();
                    }
                }
            }
            Closing::InProcess => {
                // The router lives as long as the process: hand it what is queued, so clients
                // of the embedded broker still get the last publishes (the offline status).
                let delivery = &self.publisher.delivery;
                let mark = delivery.mark();
                let mut confirmed = delivery.confirmed();
                let _ =
                    tokio::time::timeout(FLUSH_TIMEOUT, confirmed.wait_for(|c| *c >= mark)).await;
                if let Some(receive) = receive {
                    receive.abort();
                }
                send.abort();
            }
        }
    }
}
