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

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Filter, Packet, PubAck, PubAckReason, Publish, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::Notification;
use tokio::sync::mpsc;

use super::publish::{Outgoing, Outlet};
use super::unacked::Unacked;
use super::{confirm_in_order, hand_acks, AckSink, Closing, Connected, Inbound, Link, Tasks};
use crate::broker::OwnLinks;
use crate::budget::{self, InboundBudget};
use crate::delivery::Delivery;
use crate::topics::Topics;

/// Publishes queued for the sending link before `Publisher::send` waits.
const SEND_QUEUE: usize = 1024;

impl AckSink for LinkTx {
    async fn ack(&mut self, pkid: u16) -> bool {
        let ack = PubAck {
            pkid,
            reason: PubAckReason::Success,
        };
        self.send(Packet::PubAck(ack, None)).await.is_ok()
    }
}

pub(super) fn start(
    links: OwnLinks,
    topics: Topics,
    inflight: budget::Limits,
) -> (Link, mpsc::UnboundedReceiver<Inbound>) {
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
    let (confirmed_tx, confirmed_rx) = mpsc::unbounded_channel();
    // Unbounded as a channel, bounded by the budget.
    let (inbound_tx, inbound) = mpsc::unbounded_channel();
    let (outgoing_tx, outgoing_rx) = mpsc::channel(SEND_QUEUE);
    let budget = InboundBudget::new(inflight);

    let tasks = Tasks {
        receive: tokio::spawn(receive_loop(
            receive_rx,
            budget,
            unacked.clone(),
            inbound_tx,
            state.clone(),
        )),
        send: tokio::spawn(send_loop(
            send_tx,
            send_rx,
            outgoing_rx,
            delivery.clone(),
            state.clone(),
        )),
        confirm: tokio::spawn(confirm_in_order(acks_rx, delivery.clone(), confirmed_tx)),
        hand: tokio::spawn(subscribe_then_hand_acks(
            receive_tx,
            topics.clone(),
            confirmed_rx,
            unacked.clone(),
            state,
        )),
    };
    let link = Link {
        publisher: super::Publisher::new(
            Outlet::InProcess(outgoing_tx),
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
    (link, inbound)
}

/// Subscribes the receiving link to the inbound topics, reports both sides up, then hands the
/// confirmed acks to the router.
async fn subscribe_then_hand_acks(
    mut receive_tx: LinkTx,
    topics: Arc<Topics>,
    confirmed: mpsc::UnboundedReceiver<(u16, u64)>,
    unacked: Arc<Unacked>,
    state: Arc<Connected>,
) {
    let filters = topics
        .inbound()
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
    hand_acks(confirmed, receive_tx, unacked).await;
}

/// Takes the router's deliveries to the receiving link, as fast as the inbound budget allows.
async fn receive_loop(
    mut link: LinkRx,
    budget: Arc<InboundBudget>,
    unacked: Arc<Unacked>,
    inbound: mpsc::UnboundedSender<Inbound>,
    state: Arc<Connected>,
) {
    loop {
        let notification = match link.next().await {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                state.set(&state.receiving, false);
                tracing::error!(error = %e, "the embedded broker's router dropped MetaManager's receiving link");
                return;
            }
        };
        match notification {
            Notification::Forward(forward) => {
                let pkid =
                    (forward.publish.qos() != QoS::AtMostOnce).then_some(forward.publish.pkid());
                let Publish { topic, payload, .. } = forward.publish;
                // With the budget spent, wait here: the router holds what is not taken.
                let permit = budget.acquire(payload.len()).await;
                let message = Inbound {
                    // Not UTF-8 cannot match a topic MetaManager serves; it is logged and
                    // acknowledged as such.
                    topic: String::from_utf8_lossy(&topic).into_owned(),
                    payload,
                    receipt: unacked.received(pkid, permit),
                };
                if let Err(refused) = inbound.send(message) {
                    unacked.take(refused.0.receipt);
                    return;
                }
            }
            // The router stopped filling the link's buffer because it was full: now that it
            // is drained, ask for more.
            Notification::Unschedule => {
                if link.wake().await.is_err() {
                    return;
                }
            }
            other => tracing::trace!(?other, "receiving link notification"),
        }
    }
}

/// Passes publishes to the router in the order they were queued, with packet ids of its own,
/// and reports the router's acks to [`Delivery`].
async fn send_loop(
    mut link_tx: LinkTx,
    mut link_rx: LinkRx,
    mut outgoing: mpsc::Receiver<Outgoing>,
    delivery: Arc<Delivery>,
    state: Arc<Connected>,
) {
    // Delivery lets far fewer than 65 535 publishes be outstanding, so a packet id comes round
    // again only long after its ack.
    let mut pkid: u16 = 0;
    loop {
        tokio::select! {
            next = outgoing.recv() => {
                let Some(Outgoing { topic, retain, payload }) = next else { return };
                pkid = pkid.checked_add(1).unwrap_or(1);
                // Recorded first: the router may ack before `send` returns.
                delivery.sent(pkid);
                let publish = Publish::at_least_once(Bytes::from(topic), payload, retain, pkid);
                if let Err(e) = link_tx.send(Packet::Publish(publish, None)).await {
                    state.set(&state.sending, false);
                    tracing::error!(error = %e, "the embedded broker's router dropped MetaManager's sending link");
                    return;
                }
            }
            notification = link_rx.next() => match notification {
                Ok(Some(Notification::Unschedule)) => {
                    if link_rx.wake().await.is_err() {
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
        }
    }
}
