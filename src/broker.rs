//! The embedded broker: rumqttd, in-process, for nodes that run no broker of their own.
//!
//! rumqttd reports a failed bind only in its own log and then returns, so start-up checks the
//! address first and then waits until the broker accepts connections, turning both failures into
//! an error that names the address.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

const READY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker address {addr:?} does not resolve: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("embedded broker cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded broker on {addr} stopped during start-up (see its log above)")]
    Stopped { addr: SocketAddr },
    #[error("embedded broker on {addr} did not accept connections within {READY_TIMEOUT:?}")]
    NotReady { addr: SocketAddr },
    #[error("cannot start embedded broker thread: {0}")]
    Thread(std::io::Error),
}

/// A running embedded broker. It lives as long as the process: rumqttd has no shutdown, and
/// MetaManager's clean exit publishes its offline status before the process ends.
#[derive(Debug)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `host:port` and returns once it accepts connections.
    /// `max_payload` is the largest publish it relays; MetaManager's own limit sits below it
    /// so that an oversized message reaches MetaManager and gets an error reply.
    /// With `auth`, clients must present that username and password.
    pub fn start(
        host: &str,
        port: u16,
        max_payload: usize,
        auth: Option<(String, String)>,
    ) -> Result<Self, BrokerError> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| BrokerError::Resolve {
                addr: format!("{host}:{port}"),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| BrokerError::Resolve {
                addr: format!("{host}:{port}"),
                reason: "no address".into(),
            })?;
        if !addr.ip().is_loopback() && auth.is_none() {
            tracing::warn!(%addr, "embedded broker listens beyond loopback without authentication: anyone who reaches this address can read and write the node's metadata");
        }
        // Fail with the OS's reason (address in use, permission) rather than rumqttd's log line.
        drop(TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?);

        let config = config(addr, max_payload, auth);
        let handle = std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if handle.is_finished() {
                return Err(BrokerError::Stopped { addr });
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                // Another process could have taken the port in the gap after the check above;
                // rumqttd then ends its server thread, so look once more.
                std::thread::sleep(Duration::from_millis(20));
                if handle.is_finished() {
                    return Err(BrokerError::Stopped { addr });
                }
                tracing::info!(%addr, "embedded broker listening");
                return Ok(Self { addr });
            }
            if Instant::now() > deadline {
                return Err(BrokerError::NotReady { addr });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn config(addr: SocketAddr, max_payload: usize, auth: Option<(String, String)>) -> Config {
    // RouterConfig::default() is all zeros, which rumqttd takes literally.
    let router = RouterConfig {
        max_connections: 1024,
        max_outgoing_packet_count: 200,
        // A segment must hold at least one maximal message; a few segments per topic bound the
        // broker's memory on a small device.
        max_segment_size: (max_payload * 2).max(1 << 20),
        max_segment_count: 4,
        ..RouterConfig::default()
    };
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload,
        max_inflight_count: 200,
        auth: auth.map(|(user, password)| HashMap::from([(user, password)])),
        external_auth: None,
        // Without this, a publish to a topic nobody subscribed to disconnects the publisher.
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "metamanager-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}
