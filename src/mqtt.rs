//! The MQTT connection, wrapped so that receiving and sending never wait on each other.
//!
//! rumqttc's event loop must be polled for anything to move, and its request channel is bounded:
//! a task that polls the loop and also awaits a publish can stall forever once that channel
//! fills. So one task does nothing but poll (the receive loop) and hands inbound publishes on
//! without waiting; everything else sends through [`Publisher`]. The receive loop also owns
//! reconnection: it backs off between attempts and reports each (re)connection, on which the
//! application resubscribes, since rumqttc does not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    Publish, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::budget::{self, InboundBudget, Permit};
use crate::delivery::Delivery;
use crate::topics::{Peer, Topics};

/// A received publish and its share of the inbound budget, held until it is finished.
pub type Inbound = (Publish, Permit);

/// Largest packet rumqttc accepts or sends. Kept well above the message size limit so that an
/// oversized message is received and answered with an error, rather than dropping the
/// connection and being redelivered on every reconnect.
const MAX_PACKET: usize = 256 * 1024 * 1024;
const REQUEST_CHANNEL: usize = 1024;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    /// Payload of the retained last will on the status topic.
    pub offline_status: Vec<u8>,
    /// `false` keeps the session at the broker while MetaManager is away, so the broker
    /// queues and redelivers what MetaManager has not acknowledged.
    pub clean_session: bool,
    pub credentials: Option<(String, String)>,
    /// TLS to the broker (see [`crate::tls::client_config`]); `None` is plain MQTT.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Sends to the broker; cheap to clone and safe to use from any task.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Arc<Topics>,
    /// Messages the receive loop refused because the inbound budget was spent. Kept here
    /// because the publisher is what the node holds of the connection.
    refused: Arc<AtomicU64>,
    /// Which of its QoS 1 publishes the broker has acknowledged.
    pub delivery: Arc<Delivery>,
}

impl Publisher {
    /// Publishes `payload` at QoS 1 on the topic that reaches `peer`. Takes `Bytes` so a
    /// forwarded message goes out without copying its payload.
    pub async fn send(&self, peer: Peer, payload: impl Into<Bytes>) {
        self.publish(self.topics.to(peer), false, payload.into())
            .await;
    }

    /// Publishes the retained status object.
    pub async fn status(&self, payload: Vec<u8>) {
        self.publish(&self.topics.status, true, payload.into())
            .await;
    }

    async fn publish(&self, topic: &str, retain: bool, payload: Bytes) {
        self.delivery.handing();
        if let Err(e) = self
            .client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
            .await
        {
            self.delivery.not_handed();
            tracing::warn!(topic, error = %e, "publish dropped: MQTT client is shut down");
        }
    }

    /// Acknowledges an inbound QoS 1 publish to the broker.
    /// Messages refused for overload since start.
    pub fn refused_overloaded(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub async fn ack(&self, publish: &Publish) {
        if let Err(e) = self.client.ack(publish).await {
            tracing::debug!(error = %e, "ack dropped: MQTT client is shut down");
        }
    }

    /// Subscribes to the inbound topics; called on every connection.
    pub async fn subscribe(&self) {
        let filters = self
            .topics
            .inbound()
            .map(|t| rumqttc::SubscribeFilter::new(t.to_owned(), QoS::AtLeastOnce));
        if let Err(e) = self.client.subscribe_many(filters).await {
            tracing::warn!(error = %e, "subscribe dropped: MQTT client is shut down");
        }
    }
}

/// The running connection.
pub struct Link {
    pub publisher: Publisher,
    /// `true` while connected; changes on every (re)connection and loss.
    pub connected: watch::Receiver<bool>,
    client: AsyncClient,
    receive_loop: JoinHandle<()>,
}

impl Link {
    /// Connects in the background; also returns the inbound publishes, in arrival order.
    pub fn start(options: LinkOptions, topics: Topics) -> (Self, mpsc::UnboundedReceiver<Inbound>) {
        let mut mqtt = MqttOptions::new(options.client_id, options.host, options.port);
        mqtt.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_request_channel_capacity(REQUEST_CHANNEL)
            .set_manual_acks(true)
            .set_clean_session(options.clean_session)
            .set_last_will(LastWill::new(
                &topics.status,
                options.offline_status,
                QoS::AtLeastOnce,
                true,
            ));
        if let Some((user, password)) = options.credentials {
            mqtt.set_credentials(user, password);
        }
        if let Some(tls) = options.tls {
            mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, REQUEST_CHANNEL);
        // Replies are small and answer someone who is waiting: send them now, not when
        // Nagle's algorithm has waited for an ACK (tens of milliseconds on loopback).
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        // Unbounded as a channel, bounded by the budget: the receive loop never waits.
        let (inbound_tx, inbound) = mpsc::unbounded_channel();
        let (connected_tx, connected) = watch::channel(false);
        let topics = Arc::new(topics);
        let refused = Arc::new(AtomicU64::new(0));
        let delivery = Arc::new(Delivery::default());
        let receive_loop = tokio::spawn(receive_loop(
            eventloop,
            client.clone(),
            topics.clone(),
            inbound_tx,
            connected_tx,
            refused.clone(),
            delivery.clone(),
        ));
        let link = Self {
            publisher: Publisher {
                client: client.clone(),
                topics,
                refused,
                delivery,
            },
            connected,
            client,
            receive_loop,
        };
        (link, inbound)
    }

    /// Sends DISCONNECT after everything already queued, and waits for the receive loop to end.
    pub async fn shutdown(self) {
        if !*self.connected.borrow() {
            // Nothing to say goodbye to; do not wait out a reconnect attempt.
            self.receive_loop.abort();
            return;
        }
        let _ = self.client.disconnect().await;
        let mut receive_loop = self.receive_loop;
        if tokio::time::timeout(Duration::from_secs(3), &mut receive_loop)
            .await
            .is_err()
        {
            receive_loop.abort();
        }
    }
}

async fn receive_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    topics: Arc<Topics>,
    inbound: mpsc::UnboundedSender<Inbound>,
    connected: watch::Sender<bool>,
    refused: Arc<AtomicU64>,
    delivery: Arc<Delivery>,
) {
    let budget = Arc::new(InboundBudget::default());
    let mut backoff = BACKOFF_START;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("connected to MQTT broker");
                backoff = BACKOFF_START;
                connected.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                match budget.admit(publish.payload.len()) {
                    Some(permit) => {
                        if inbound.send((publish, permit)).is_err() {
                            return;
                        }
                    }
                    // Never wait here: waiting would stall the event loop that the
                    // consumers of this queue need to publish their replies.
                    None => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        refuse_overflow(&client, &topics, &publish, &delivery);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => delivery.acked(),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                connected.send_replace(false);
                // Give the DISCONNECT packet a chance to be flushed.
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                let reason = describe(&e);
                if connected.send_replace(false) {
                    tracing::warn!(%reason, "lost MQTT broker connection");
                } else {
                    tracing::warn!(%reason, retry_in = ?backoff, "cannot connect to MQTT broker");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
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

/// Answers a message that arrived with the inbound budget spent: an `error` to its sender,
/// and a broker ack so it is not redelivered into the same overload. Nothing here waits.
fn refuse_overflow(client: &AsyncClient, topics: &Topics, publish: &Publish, delivery: &Delivery) {
    tracing::error!(
        topic = %publish.topic,
        max_messages = budget::MAX_MESSAGES,
        max_bytes = budget::MAX_BYTES,
        "inbound queue full; message refused"
    );
    if let Some(sender) = topics.sender(&publish.topic) {
        let parent = crate::message::salvage_msg_id(&publish.payload);
        let text = format!(
            "MetaManager is overloaded ({} messages or {} bytes in flight); send again later",
            budget::MAX_MESSAGES,
            budget::MAX_BYTES
        );
        let reply = crate::message::error(parent.as_deref(), "", &text);
        delivery.handing();
        if client
            .try_publish(topics.to(sender), QoS::AtLeastOnce, false, reply)
            .is_err()
        {
            delivery.not_handed();
        }
    }
    let _ = client.try_ack(publish);
}
