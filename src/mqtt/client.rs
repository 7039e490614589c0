//! The link through an external broker: two MQTT connections with rumqttc.
//!
//! rumqttc's event loop must be polled for anything to move, in either direction, which is why
//! the receiving and the sending side are separate connections (see [`super`]). Each connection
//! reconnects on its own with backoff, and a connection that the broker closes soon after it
//! was accepted is reported as a likely session takeover (another client with the same client
//! id) and backed off longer, instead of fighting the other client in a loop.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    Publish, QoS, Request, StateError, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use super::unacked::{PendingAck, Taken, Unacked};
use super::{Closing, Connected, Inbound, Incoming, Link, Outlet, Source, Tasks};
use crate::budget::{self, InboundBudget};
use crate::delivery::{Delivery, MAX_OUTSTANDING};
use crate::topics::Topics;

/// Largest packet rumqttc accepts or sends. Kept well above the message size limit so that an
/// oversized message is received and answered with an error, rather than dropping the
/// connection and being redelivered on every reconnect.
const MAX_PACKET: usize = 256 * 1024 * 1024;
/// Publishes queued for the sending connection before `Publisher::send` waits.
const SEND_QUEUE: usize = 1024;
/// rumqttc's in-flight window of the sending connection: twice what [`Delivery`] lets be
/// outstanding, so that a resend fits and new packet ids never collide.
const SEND_INFLIGHT: u16 = (2 * MAX_OUTSTANDING) as u16;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Backoff cap after the broker closed a connection soon after accepting it: most often
/// another client connected with the same client id, and reconnecting at once would only
/// throw it off to be thrown off again.
const TAKEOVER_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A connection that lasted this long was healthy; its loss starts backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Client id of the receiving connection; the sending one appends `-out`.
    pub client_id: String,
    pub host: String,
    pub port: u16,
    /// Payload of the retained last will on the status topic.
    pub offline_status: Vec<u8>,
    /// Credentials of the receiving connection.
    pub credentials: Option<(String, String)>,
    /// Credentials of the sending connection (the same account unless configured apart).
    pub publish_credentials: Option<(String, String)>,
    /// TLS to the broker (see [`crate::tls::client_config`]); `None` is plain MQTT.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How much received work may be in flight before the receiving connection stops reading.
    pub inflight: budget::Limits,
}

/// Queues the PUBACK of `pkid` on the receiving connection; `false` when it is shut down.
async fn ack(receiver: &AsyncClient, pkid: u16) -> bool {
    let mut ack = Publish::new("", QoS::AtLeastOnce, Vec::new());
    ack.pkid = pkid;
    receiver.ack(&ack).await.is_ok()
}

pub(super) fn start(options: LinkOptions, topics: Topics) -> (Link, Incoming) {
    let topics = Arc::new(topics);
    let out_id = format!("{}-out", options.client_id);

    let mut receive = mqtt_options(&options, options.client_id.clone());
    receive.set_manual_acks(true).set_last_will(LastWill::new(
        &topics.status,
        options.offline_status.clone(),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some((user, password)) = options.credentials.clone() {
        receive.set_credentials(user, password);
    }
    // Acks wait in this queue only while the receive loop is not polling; each has already
    // released its budget share, so the loop is never kept waiting by a full queue.
    let (receiver, receive_loop) =
        AsyncClient::new(receive, options.inflight.messages.saturating_add(16));

    let mut send = mqtt_options(&options, out_id.clone());
    send.set_inflight(SEND_INFLIGHT);
    if let Some((user, password)) = options.publish_credentials.clone() {
        send.set_credentials(user, password);
    }
    let (sender, send_loop) = AsyncClient::new(send, SEND_QUEUE);

    let (state, connected) = Connected::new();
    let deliveries = Arc::new(Delivery::default());
    let unacked = Arc::new(Unacked::default());
    // Unbounded as a channel, bounded by the budget: each entry holds a share.
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    // Confirmed acks waiting for room in the receiving connection's queue; it drains
    // whenever the receive loop polls, which the budget they gave back lets it do.
    let (confirmed_tx, confirmed_rx) = mpsc::unbounded_channel();
    // Unbounded as a channel, bounded by the budget.
    let (inbound_tx, inbound) = mpsc::unbounded_channel();
    let budget = InboundBudget::new(options.inflight);

    let tasks = Tasks {
        receive: Some(tokio::spawn(
            ReceiveLoop {
                eventloop: nodelay(receive_loop),
                client: receiver.clone(),
                topics: topics.clone(),
                budget,
                unacked: unacked.clone(),
                inbound: inbound_tx,
                state: state.clone(),
                client_id: options.client_id.clone(),
            }
            .run(),
        )),
        send: tokio::spawn(send_loop_task(
            nodelay(send_loop),
            deliveries.clone(),
            state,
            out_id,
        )),
        helpers: vec![
            tokio::spawn(confirm_in_order(acks_rx, deliveries.clone(), confirmed_tx)),
            tokio::spawn(hand_acks(confirmed_rx, receiver.clone(), unacked.clone())),
        ],
    };
    let link = Link {
        publisher: super::Publisher::new(
            Outlet::Client(sender.clone()),
            topics,
            deliveries,
            unacked.clone(),
            acks_tx,
        ),
        connected,
        closing: Closing::Client { receiver, sender },
        unacked,
        tasks,
    };
    (link, Incoming(Source::Queued(inbound)))
}

fn mqtt_options(options: &LinkOptions, client_id: String) -> MqttOptions {
    let mut mqtt = MqttOptions::new(client_id, options.host.clone(), options.port);
    // Persistent sessions on both connections and both brokers: the broker keeps what
    // MetaManager has not acknowledged across its restarts (external) and reconnects, and
    // rumqttc keeps what the broker has not acknowledged, unless the broker starts a new
    // session (see `resend`).
    mqtt.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_clean_session(false);
    if let Some(tls) = options.tls.clone() {
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    mqtt
}

/// Connects a new client with `options`' address, TLS and credentials, as edged or edgehub
/// would, waits for the broker's CONNACK, and disconnects: whether the broker takes new
/// clients now, which MetaManager's own long-lived connections cannot tell.
pub async fn probe(options: &LinkOptions, timeout: Duration) -> Result<(), String> {
    let id = format!(
        "{}-ready-{}",
        options.client_id,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut mqtt = mqtt_options(options, id);
    mqtt.set_clean_session(true);
    if let Some((user, password)) = &options.credentials {
        mqtt.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, 1);
    let connack = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(describe(&e)),
            }
        }
    };
    let outcome = match tokio::time::timeout(timeout, connack).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no CONNACK within {timeout:?}")),
    };
    if outcome.is_ok() {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    }
    outcome
}

/// Replies are small and answer someone who is waiting: send them now, not when Nagle's
/// algorithm has waited for an ACK (tens of milliseconds on loopback).
fn nodelay(mut eventloop: EventLoop) -> EventLoop {
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    eventloop
}

/// The receiving connection's task: what it owns.
struct ReceiveLoop {
    eventloop: EventLoop,
    /// The receiving connection's client, for its subscriptions.
    client: AsyncClient,
    topics: Arc<Topics>,
    budget: Arc<InboundBudget>,
    unacked: Arc<Unacked>,
    /// To the dispatcher.
    inbound: mpsc::UnboundedSender<Inbound>,
    state: Arc<Connected>,
    client_id: String,
}

impl ReceiveLoop {
    async fn run(self) {
        let Self {
            mut eventloop,
            client,
            topics,
            budget,
            unacked,
            inbound,
            state,
            client_id,
        } = self;
        let mut reconnect = Reconnect::new(client_id);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    reconnect.connected("receiving");
                    unacked.connected();
                    subscribe(&client, &topics);
                    state.set(&state.receiving, true);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // With the budget spent, wait here: the broker keeps what is not read.
                    let permit = budget.acquire(publish.payload.len()).await;
                    let pkid = (publish.qos != QoS::AtMostOnce).then_some(publish.pkid);
                    let message = Inbound {
                        topic: publish.topic,
                        payload: publish.payload,
                        receipt: unacked.received(pkid, permit),
                    };
                    if let Err(refused) = inbound.send(message) {
                        // Shutting down: leave it unacknowledged, for the broker to send again.
                        unacked.take(refused.0.receipt);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    for topic in refused_filters(&topics, &ack) {
                        tracing::error!(
                            topic,
                            "the broker refused the subscription (may the account read the topic?)"
                        );
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    state.set(&state.receiving, false);
                    // Give the DISCONNECT packet a chance to be flushed.
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                    return;
                }
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => return,
                Err(e) => {
                    let was_up = state.set(&state.receiving, false);
                    reconnect.failed(&e, was_up).await;
                }
            }
        }
    }
}

/// The topics a SUBACK refuses, in the order [`subscribe`] asked for them: nothing would ever
/// arrive on them, and without a word the node would look idle or, for the bridge's state
/// topic, the cloud would stay disconnected. (mosquitto 2.0 accepts a subscription its ACL
/// denies and delivers nothing; RabbitMQ closes the connection instead.)
fn refused_filters<'a>(topics: &'a Topics, ack: &rumqttc::SubAck) -> Vec<&'a str> {
    topics
        .subscriptions()
        .into_iter()
        .zip(&ack.return_codes)
        .filter(|(_, code)| matches!(code, rumqttc::SubscribeReasonCode::Failure))
        .map(|(topic, _)| topic)
        .collect()
}

/// Subscribes to the inbound topics and the bridge's state topic (rumqttc does not resubscribe
/// on a new session).
fn subscribe(client: &AsyncClient, topics: &Topics) {
    let filters: Vec<_> = topics
        .subscriptions()
        .into_iter()
        .map(|t| rumqttc::SubscribeFilter::new(t.to_owned(), QoS::AtLeastOnce))
        .collect();
    if client.try_subscribe_many(filters.clone()).is_err() {
        // The queue is full of acks for now: wait for room rather than not subscribe.
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.subscribe_many(filters).await {
                tracing::error!(error = %e, "cannot subscribe to the inbound topics");
            }
        });
    }
}

async fn send_loop_task(
    mut eventloop: EventLoop,
    delivery: Arc<Delivery>,
    state: Arc<Connected>,
    client_id: String,
) {
    let mut reconnect = Reconnect::new(client_id);
    // What rumqttc held to send again when the connection was lost: it forgets it if the
    // broker answers the reconnect with a new session.
    let mut held: VecDeque<Request> = VecDeque::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                reconnect.connected("sending");
                // Events of publishes whose writing failed with the old connection; the
                // publishes themselves are sent again and report again.
                eventloop
                    .state
                    .events
                    .retain(|e| !matches!(e, Event::Outgoing(Outgoing::Publish(_))));
                if !ack.session_present {
                    resend(&mut eventloop, &delivery, std::mem::take(&mut held));
                }
                held.clear();
                state.set(&state.sending, true);
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => delivery.sent(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => delivery.acknowledged(ack.pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                state.set(&state.sending, false);
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                if !eventloop.pending.is_empty() {
                    held = eventloop.pending.clone();
                }
                let was_up = state.set(&state.sending, false);
                reconnect.failed(&e, was_up).await;
            }
        }
    }
}

/// Puts back what the broker's new session lost: the publishes it had not acknowledged, the one
/// rumqttc held aside for a packet id still in use, then those never sent, in that order, with
/// fresh packet ids.
fn resend(eventloop: &mut EventLoop, delivery: &Delivery, held: VecDeque<Request>) {
    let mut with_id = Vec::new();
    let mut without_id = Vec::new();
    for request in held {
        match request {
            Request::Publish(p) if p.pkid != 0 => with_id.push(p),
            Request::Publish(p) => without_id.push(p),
            _ => {}
        }
    }
    let aside = eventloop.state.collision.take();
    let order: Vec<Option<u16>> = with_id
        .iter()
        .map(|p| Some(p.pkid))
        .chain(aside.iter().map(|_| None))
        .chain(without_id.iter().map(|_| None))
        .collect();
    if order.is_empty() {
        return;
    }
    tracing::warn!(
        count = order.len(),
        "the broker started a new session for the sending connection; sending again what it had not acknowledged"
    );
    delivery.resend(&order);
    for mut publish in with_id.into_iter().chain(aside).chain(without_id) {
        publish.pkid = 0;
        eventloop.pending.push_back(Request::Publish(publish));
    }
}

/// Passes inbound acks on in the order they were asked for, each once the publishes queued
/// before it are acknowledged by the broker, and gives back its budget share then.
///
/// Handing an ack to the receiving side may wait for room in its queue, which drains only
/// while the receive loop polls, and the receive loop may be waiting for budget. So the shares
/// go back here, at confirmation, and the waiting for room happens in [`hand_acks`], which holds
/// none: however full that queue is, the receive loop gets its budget back and drains it.
async fn confirm_in_order(
    mut acks: mpsc::UnboundedReceiver<PendingAck>,
    delivery: Arc<Delivery>,
    confirmed_acks: mpsc::UnboundedSender<(u16, u64)>,
) {
    let mut confirmed = delivery.confirmed();
    while let Some(PendingAck { pkid, after, taken }) = acks.recv().await {
        if confirmed.wait_for(|c| *c >= after).await.is_err() {
            return;
        }
        let Taken {
            connection, permit, ..
        } = taken;
        drop(permit);
        if confirmed_acks.send((pkid, connection)).is_err() {
            return;
        }
    }
}

/// Queues confirmed acks on the receiving side, in order. An ack from an earlier connection is
/// dropped: its packet id means nothing on this one, and the broker sends that message again.
async fn hand_acks(
    mut confirmed_acks: mpsc::UnboundedReceiver<(u16, u64)>,
    receiver: AsyncClient,
    unacked: Arc<Unacked>,
) {
    while let Some((pkid, connection)) = confirmed_acks.recv().await {
        let sent = connection != unacked.connection() || ack(&receiver, pkid).await;
        unacked.waiting.fetch_sub(1, Ordering::AcqRel);
        if !sent {
            return;
        }
    }
}

/// Backoff between connection attempts, and the operator-facing account of each failure.
struct Reconnect {
    client_id: String,
    delay: Duration,
    connected_at: Option<Instant>,
    /// Whether the broker closed the last connection soon after accepting it, when it closed
    /// it: one close says nothing of why, what the broker does next does.
    closed_soon: Option<bool>,
}

impl Reconnect {
    fn new(client_id: String) -> Self {
        Self {
            client_id,
            delay: BACKOFF_START,
            connected_at: None,
            closed_soon: None,
        }
    }

    fn connected(&mut self, role: &str) {
        tracing::info!(client_id = %self.client_id, role, "connected to MQTT broker");
        self.connected_at = Some(Instant::now());
    }

    /// Logs the failure `e` by its likely cause. A broker that closes the connection and then
    /// refuses new ones has stopped. One that closes it soon after accepting it, accepts the
    /// next and closes that one soon too, is throwing MetaManager out: another client takes
    /// its client id over, or the broker refuses one of its subscriptions. A single close soon
    /// after connecting is no sign of either (a broker stopped then would look the same).
    async fn failed(&mut self, e: &ConnectionError, was_up: bool) {
        let lasted = self.connected_at.take().map(|at| at.elapsed());
        let closed_soon = matches!(lasted, Some(d) if d < STABLE_AFTER) && closed_by_peer(e);
        let closed = (lasted.is_some() && closed_by_peer(e)).then_some(closed_soon);
        let before = std::mem::replace(&mut self.closed_soon, closed);
        let cap = if closed_soon {
            TAKEOVER_BACKOFF_CAP
        } else {
            if matches!(lasted, Some(d) if d >= STABLE_AFTER) {
                self.delay = BACKOFF_START;
            }
            BACKOFF_CAP
        };
        let retry_in = self.delay;
        if closed_soon && before == Some(true) {
            tracing::warn!(
                client_id = %self.client_id,
                ?retry_in,
                "the broker closed the connection soon after accepting it: another client connected with client id {} (session takeover), or the broker refuses this client or one of its subscriptions (RabbitMQ closes the connection of a client that subscribes to a topic it may not read, cloud_link.state_topic included); backing off",
                self.client_id
            );
        } else if before.is_some() && refused(e) {
            tracing::warn!(client_id = %self.client_id, reason = %describe(e), ?retry_in, "the MQTT broker has stopped: it closed the connection and refuses new ones");
        } else if was_up {
            tracing::warn!(client_id = %self.client_id, reason = %describe(e), ?retry_in, "lost MQTT broker connection");
        } else {
            tracing::warn!(client_id = %self.client_id, reason = %describe(e), ?retry_in, "cannot connect to MQTT broker");
        }
        tokio::time::sleep(retry_in).await;
        self.delay = (self.delay * 2).min(cap);
    }
}

/// Whether the broker ended the connection itself, as it does when another client takes over
/// the client id.
fn closed_by_peer(e: &ConnectionError) -> bool {
    use std::io::ErrorKind;
    match e {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}
/// Whether nothing listens at the broker's address (any more).
fn refused(e: &ConnectionError) -> bool {
    let io = match e {
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) => io,
        _ => return false,
    };
    io.kind() == std::io::ErrorKind::ConnectionRefused
}

/// An operator-facing reason for a connection failure.
fn describe(e: &ConnectionError) -> String {
    use rumqttc::ConnectReturnCode as Code;
    match e {
        ConnectionError::ConnectionRefused(Code::BadUserNamePassword) => {
            "broker refused the connection: bad username or password (mqtt.username, mqtt.password or mqtt.password_file)".into()
        }
        // Mosquitto answers a wrong password with this code in MQTT 3.1.1.
        ConnectionError::ConnectionRefused(Code::NotAuthorized) => {
            "broker refused the connection: not authorized (wrong username or password, or the broker does not let this user connect: check mqtt.username, mqtt.password or mqtt.password_file, and the broker's password file and ACLs)".into()
        }
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {code:?}")
        }
        other => match crate::tls::rustls_error(other) {
            Some(tls) => crate::tls::describe(tls),
            // The broker closed the connection in the middle of the handshake: most often a
            // plain MQTT port.
            None => match other {
                ConnectionError::Tls(inner) => format!(
                    "TLS handshake failed: {inner} (is mqtt.port the broker's TLS listener?)"
                ),
                _ => other.to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::{SubAck, SubscribeReasonCode};

    use super::*;

    #[test]
    fn a_refused_subscription_is_named_by_its_topic() {
        let state = "$SYS/broker/connection/bridge-n/state";
        let topics = Topics::new("edge", "n").with_bridge_state(Some(state.into()));
        let granted = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        let ack = SubAck::new(1, vec![granted, granted, SubscribeReasonCode::Failure]);
        assert_eq!(refused_filters(&topics, &ack), vec![state]);
        let ack = SubAck::new(1, vec![granted; 3]);
        assert!(refused_filters(&topics, &ack).is_empty());
    }
}
