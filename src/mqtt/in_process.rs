//! The link through the embedded broker: two in-process links with its router.
//!
//! The embedded broker runs in this process, so MetaManager talks to its router through
//! rumqttd's local links instead of a TCP connection to itself: no socket, no MQTT encoding,
//! and no keep-alive or reconnection, since both ends live and die together. The two sides keep
//! the roles of the two connections of [`super::client`]: the receiving link subscribes and
//! acknowledges, the sending link publishes and reads the router's acks. The router tracks
//! them as it tracks any client: it holds at most its in-flight window of unacknowledged QoS 1
//! messages for the receiving link, and its lossless reading (vendor/rumqttd, PATCHES.md)
//! applies to their client ids.
//!
//! There is no last will: a last will speaks for a client whose broker outlives it, and this
//! one does not.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Filter, Packet, PubAck, PubAckReason, Publish, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::Notification;
use tokio::sync::mpsc;

use super::unacked::{PendingAck, Unacked};
use super::{Closing, Connected, Inbound, Incoming, Link, Outlet, Source, Tasks};
use crate::broker::OwnLinks;
use crate::budget::{self, InboundBudget};
use crate::delivery::Delivery;
use crate::topics::Topics;

pub(super) fn start(links: OwnLinks, topics: Topics, inflight: budget::Limits) -> (Link, Incoming) {
    let OwnLinks {
        receive: (receive_tx, receive_rx),
        send: (send_tx, send_rx),
    } = links;
    let topics = Arc::new(topics);
    let (state, connected) = Connected::new();
    let delivery = Arc::new(Delivery::default());
    let unacked = Arc::new(Unacked::default());
    unacked.connected();
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let sending = Arc::new(Sending {
        link: tokio::sync::Mutex::new((send_tx, 0)),
        state: state.clone(),
    });
    let receiving = Receiving {
        link: receive_rx,
        budget: InboundBudget::new(inflight),
        unacked: unacked.clone(),
        state: state.clone(),
        waiting: None,
        must_wake: false,
        ended: false,
    };

    let tasks = Tasks {
        receive: None,
        send: tokio::spawn(
            Acknowledger {
                receive_tx,
                publish_acks: send_rx,
                acks: acks_rx,
                delivery: delivery.clone(),
                unacked: unacked.clone(),
                state,
            }
            .subscribe_then_run(topics.clone()),
        ),
        helpers: Vec::new(),
    };
    let link = Link {
        publisher: super::Publisher::new(
            Outlet::InProcess(sending),
            topics,
            delivery,
            unacked.clone(),
            acks_tx,
        ),
        connected,
        closing: Closing::InProcess,
        unacked,
        tasks,
    };
    (link, Incoming(Source::InProcess(receiving)))
}

/// The task that acknowledges, in both directions: what it owns.
struct Acknowledger {
    /// The receiving link's way to the router: the subscription, then inbound acks.
    receive_tx: LinkTx,
    /// The sending link's notifications: the router's acks of MetaManager's publishes.
    publish_acks: LinkRx,
    /// Inbound acks asked for, each to be given once what was published before it is acked.
    acks: mpsc::UnboundedReceiver<PendingAck>,
    delivery: Arc<Delivery>,
    unacked: Arc<Unacked>,
    state: Arc<Connected>,
}

impl Acknowledger {
    /// Subscribes the receiving link to the inbound topics and reports both sides up, then runs
    /// [`Self::run`].
    async fn subscribe_then_run(mut self, topics: Arc<Topics>) {
        let state = self.state.clone();
        let receive_tx = &mut self.receive_tx;
        let filters = topics
            .subscriptions()
            .into_iter()
            .map(|t| Filter {
                path: t.to_owned(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                // What an MQTT 3.1.1 subscription gets.
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        let subscribe = Subscribe { pkid: 1, filters };
        if let Err(e) = receive_tx.send(Packet::Subscribe(subscribe, None)).await {
            tracing::error!(error = %e, "cannot subscribe to the inbound topics on the embedded broker");
            return;
        }
        tracing::info!("linked to the embedded broker in-process");
        state.set(&state.receiving, true);
        state.set(&state.sending, true);
        self.run().await;
    }

    /// Both directions of acknowledgement in one task: it reads the router's acks of the sending
    /// link's publishes, and gives the router the acks of inbound messages as soon as everything
    /// published before each was acknowledged, in the order they were asked for.
    ///
    /// The client backend needs three tasks for this, because handing an ack to rumqttc may wait on
    /// its receive loop, which may wait on the budget these acks give back. Handing an ack to the
    /// router waits on nothing but the router, so here an ack is released the moment it is
    /// confirmed, without a hand-over between tasks.
    async fn run(self) {
        let Self {
            mut receive_tx,
            mut publish_acks,
            mut acks,
            delivery,
            unacked,
            state,
        } = self;
        let mut pending: VecDeque<PendingAck> = VecDeque::new();
        let mut asking = true;
        loop {
            tokio::select! {
                notification = publish_acks.next() => match notification {
                    Ok(Some(Notification::Unschedule)) => {
                        if publish_acks.wake().await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(other)) => {
                        if let Some(Packet::PubAck(ack, _)) = Option::<Packet>::from(other) {
                            delivery.acknowledged(ack.pkid);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        state.set(&state.sending, false);
                        tracing::error!(error = %e, "the embedded broker's router dropped MetaManager's sending link");
                        return;
                    }
                },
                ack = acks.recv(), if asking => match ack {
                    Some(ack) => pending.push_back(ack),
                    None => asking = false,
                },
            }
            while pending.front().is_some_and(|a| delivery.reached(a.after)) {
                let Some(PendingAck { pkid, taken, .. }) = pending.pop_front() else {
                    break;
                };
                drop(taken.permit);
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                let sent = receive_tx.send(Packet::PubAck(ack, None)).await;
                unacked.waiting.fetch_sub(1, Ordering::AcqRel);
                if sent.is_err() {
                    state.set(&state.receiving, false);
                    tracing::error!(
                        "the embedded broker's router dropped MetaManager's receiving link"
                    );
                    return;
                }
            }
        }
    }
}

/// The receiving link, read by the task that handles the messages: no task of its own stands
/// between the router and the dispatcher.
pub(crate) struct Receiving {
    link: LinkRx,
    budget: Arc<InboundBudget>,
    unacked: Arc<Unacked>,
    state: Arc<Connected>,
    /// A delivery taken from the link and waiting for budget; kept here so that a `recv`
    /// cancelled while it waits loses nothing.
    waiting: Option<Publish>,
    /// The router unscheduled the link (its buffer was full) and has not been asked for more
    /// yet; kept here so that a `recv` cancelled while it asks still asks next time.
    must_wake: bool,
    /// The router dropped the link; nothing more comes.
    ended: bool,
}

impl Receiving {
    /// The next message, once the inbound budget has room for it (while it has none, the
    /// router holds what follows). `None` once the router dropped the link. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Option<Inbound> {
        loop {
            if let Some(publish) = &self.waiting {
                let permit = self.budget.acquire(publish.payload.len()).await;
                let publish = self.waiting.take()?;
                let pkid = (publish.qos() != QoS::AtMostOnce).then_some(publish.pkid());
                let Publish { topic, payload, .. } = publish;
                return Some(Inbound {
                    // Not UTF-8 cannot match a topic MetaManager serves; it is logged and
                    // acknowledged as such.
                    topic: String::from_utf8_lossy(&topic).into_owned(),
                    payload,
                    receipt: self.unacked.received(pkid, permit),
                });
            }
            if self.ended {
                return None;
            }
            if self.must_wake {
                if self.link.wake().await.is_err() {
                    self.lost();
                    continue;
                }
                self.must_wake = false;
            }
            match self.link.next().await {
                Ok(Some(Notification::Forward(forward))) => self.waiting = Some(forward.publish),
                // The router stopped filling the link's buffer because it was full: now that
                // it is drained, ask for more.
                Ok(Some(Notification::Unschedule)) => self.must_wake = true,
                Ok(Some(other)) => tracing::trace!(?other, "receiving link notification"),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "the embedded broker's router dropped MetaManager's receiving link");
                    self.lost();
                }
            }
        }
    }

    fn lost(&mut self) {
        self.state.set(&self.state.receiving, false);
        self.ended = true;
    }
}

/// The sending link's way in: publishes go straight to the router from the publishing task,
/// under [`Delivery`]'s queueing order, with packet ids of the link's own.
pub(crate) struct Sending {
    link: tokio::sync::Mutex<(LinkTx, u16)>,
    state: Arc<Connected>,
}

impl Sending {
    /// Hands one publish to the router; `false` when the router is gone. Called with
    /// `Delivery::enqueue` held, so publishes reach the router in the order they were numbered.
    pub(crate) async fn publish(
        &self,
        delivery: &Delivery,
        topic: &str,
        retain: bool,
        payload: Bytes,
    ) -> bool {
        let mut guard = self.link.lock().await;
        let (link, pkid) = &mut *guard;
        // Delivery lets far fewer than 65 535 publishes be outstanding, so a packet id comes
        // round again only long after its ack.
        *pkid = pkid.checked_add(1).unwrap_or(1);
        // Recorded first: the router may ack before `send` returns.
        delivery.sent(*pkid);
        let topic = Bytes::copy_from_slice(topic.as_bytes());
        let publish = Publish::at_least_once(topic, payload, retain, *pkid);
        match link.send(Packet::Publish(publish, None)).await {
            Ok(_) => true,
            Err(e) => {
                self.state.set(&self.state.sending, false);
                tracing::error!(error = %e, "the embedded broker's router dropped MetaManager's sending link");
                false
            }
        }
    }
}
