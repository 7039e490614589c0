//! What every measurement needs: a mosquitto on loopback, MetaManager as a real process, MQTT
//! clients that publish and count, and the process's memory from /proc. The processes are the
//! tests' own harness, so that the bench starts and stops them the way the tests do.

#[path = "../../tests/common/process.rs"]
pub mod process;

/// The hand-played cloud, which tests use too (some of it only they).
#[path = "cloud.rs"]
#[allow(dead_code)]
pub mod cloud;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use process::{free_port, wait_for_port, Launch};
pub use process::{MetaManager, Mosquitto};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, Notify};

/// Messages a bench publisher may have outstanding (sent, not yet answered). A sender that
/// waits for answers is what a real peer is; without a window, a publisher faster than the
/// processor only measures how the broker and the processor behave under a flood.
pub const WINDOW: usize = 1_000;

/// How many answers have come back, shared between a counter and a publisher.
#[derive(Default)]
pub struct Progress {
    done: AtomicUsize,
    changed: Notify,
}

impl Progress {
    fn advance(&self) {
        self.done.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Waits until at most [`WINDOW`] of the first `sent` messages are unanswered.
    pub async fn wait_window(&self, sent: usize) {
        loop {
            let changed = self.changed.notified();
            if sent < self.done.load(Ordering::Acquire) + WINDOW {
                return;
            }
            changed.await;
        }
    }
}

/// Publishes `messages` to `topic`, keeping at most [`WINDOW`] unanswered.
pub fn feed(
    publisher: Client,
    topic: String,
    messages: Vec<String>,
    progress: Arc<Progress>,
) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        for (i, m) in messages.into_iter().enumerate() {
            progress.wait_window(i).await;
            publisher.publish(&topic, m).await;
        }
        publisher
    })
}

/// A mosquitto on a free loopback port, killed on drop. In-flight and queue limits are raised
/// so that the broker's defaults (20 messages in flight per client) do not cap what the
/// processors under test can show; the same broker serves the relay and MetaManager.
pub fn start_mosquitto() -> Mosquitto {
    let binary = process::find_mosquitto()
        .expect("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)");
    Mosquitto::start_with(&binary, |port, _| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_inflight_messages 1000\nmax_queued_messages 1000000\nset_tcp_nodelay true\n"
        )
    })
}

/// Where MetaManager finds its broker.
#[derive(Clone, Copy)]
pub enum Broker {
    /// The bench's mosquitto, on this port.
    External(u16),
    /// MetaManager's own broker, on a free port.
    Embedded,
}

/// MetaManager as a real process for `node`, its database at `db`, its config in `dir`; and
/// the port of its broker, which listens by then.
pub fn start_metamanager(
    broker: Broker,
    node: &str,
    db: &Path,
    synchronous: &str,
    dir: &Path,
) -> (u16, MetaManager) {
    start_metamanager_with(broker, node, db, synchronous, dir, "")
}

/// [`start_metamanager`] with `extra` YAML appended to its config (a `meta:` block, say).
pub fn start_metamanager_with(
    broker: Broker,
    node: &str,
    db: &Path,
    synchronous: &str,
    dir: &Path,
    extra: &str,
) -> (u16, MetaManager) {
    let (mode, port) = match broker {
        Broker::External(port) => ("external", port),
        Broker::Embedded => ("embedded", free_port()),
    };
    let config = dir.join(format!("{node}.yaml"));
    std::fs::write(
        &config,
        format!(
            "node_id: {node}\nmqtt:\n  mode: {mode}\n  host: 127.0.0.1\n  port: {port}\n\
             database:\n  path: {}\n  synchronous: {synchronous}\nhttp:\n  enabled: false\n{extra}",
            db.display()
        ),
    )
    .expect("write config");
    let log = dir.join(format!("{node}.log"));
    let mm = MetaManager::start(Launch {
        config: Some(&config),
        // Quieter than the default, and like it without the embedded broker's own log: with
        // rumqttd at warn, its router formats a span for every publish.
        rust_log: Some("warn,rumqttd=off"),
        // The bench's directory may be relative; the config names paths in it as given.
        cwd: None,
        // Warnings only: kept so that a failed run can show them.
        log: Some(&log),
        open_files: None,
        private_network: false,
    });
    if let Broker::Embedded = broker {
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "embedded broker listening"
        );
    }
    (port, mm)
}

/// An MQTT client whose received messages arrive on a channel, and whose publishes are
/// counted when the broker acknowledges them.
pub struct Client {
    pub client: AsyncClient,
    pub received: mpsc::UnboundedReceiver<(String, bytes::Bytes)>,
    pub accepted: Arc<AtomicUsize>,
}

impl Client {
    pub async fn connect(port: u16, id: &str, subscriptions: &[&str]) -> Self {
        Self::connect_as(port, id, subscriptions, None).await
    }

    /// [`Client::connect`] with a username and password, for a broker that asks for them.
    pub async fn connect_as(
        port: u16,
        id: &str,
        subscriptions: &[&str],
        login: Option<&(String, String)>,
    ) -> Self {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        options
            .set_max_packet_size(512 << 20, 512 << 20)
            .set_inflight(1000)
            .set_keep_alive(Duration::from_secs(60));
        let (client, mut eventloop) = AsyncClient::new(options, 10_000);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (tx, received) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let (suback_tx, mut suback) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Until the client is dropped: a dropped client's connection would otherwise be
            // retried for as long as the process runs, when its broker has gone.
            while !tx.is_closed() {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        for topic in subscriptions {
            client
                .subscribe(*topic, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
            tokio::time::timeout(Duration::from_secs(5), suback.recv())
                .await
                .expect("suback");
        }
        Self {
            client,
            received,
            accepted,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }

    /// Waits for `n` messages on `topic` that satisfy `keep`, reporting each to `progress`;
    /// `None` on timeout.
    pub async fn count(
        &mut self,
        topic: &str,
        n: usize,
        within: Duration,
        progress: &Progress,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = 0;
        while seen < n {
            let (t, payload) = tokio::time::timeout_at(deadline, self.received.recv())
                .await
                .ok()??;
            if t == topic && keep(&payload) {
                seen += 1;
                progress.advance();
            }
        }
        Some(Instant::now())
    }

    /// The next message on `topic` whose payload contains `needle`.
    pub async fn next_containing(&mut self, topic: &str, needle: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let Ok(Some((t, payload))) =
                tokio::time::timeout_at(deadline, self.received.recv()).await
            else {
                return false;
            };
            if t == topic && contains(&payload, needle.as_bytes()) {
                return true;
            }
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Percentiles of a sample of durations, in microseconds.
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

pub fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}
