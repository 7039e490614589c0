//! The embedded broker: rumqttd, in-process, for nodes that run no broker of their own.
//!
//! rumqttd reports a failed bind only in its own log and then returns, so start-up checks the
//! address first and then waits until the broker accepts connections, turning both failures into
//! an error that names the address.
//!
//! rumqttd is a patched copy (vendor/rumqttd, see its PATCHES.md): MetaManager's own client ids
//! are reserved to its own credentials, and the broker never lets its in-memory log overrun
//! MetaManager's reading, slowing publishers instead. [`probe`] checks from outside that the
//! broker still completes an MQTT handshake, for a watchdog.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Config, ConnectionSettings, ReservedCredentials, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    #[error("embedded broker start-up task failed: {0}")]
    Task(String),
    #[error("embedded broker refused MetaManager's in-process link {client_id}: {reason}")]
    Link { client_id: String, reason: String },
}

/// How the embedded broker is set up.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub host: String,
    pub port: u16,
    /// largest publish relayed
    pub max_payload: usize,
    /// username/password every other client must present, when set
    pub auth: Option<(String, String)>,
    /// most client connections at once (default 1024)
    pub max_connections: usize,
    /// MetaManager's own client id. The broker gives MetaManager in-process links under it and
    /// under `{id}-out` ([`OwnLinks`]). Only a client with `own_credentials` may use these ids
    /// over the network, and the router never lets its commit log overrun their reading.
    pub own_client_id: Option<String>,
    pub own_credentials: (String, String),
}

impl BrokerOptions {
    /// Defaults for everything but the address: 1 MiB payloads, no auth, 1024 connections,
    /// no own client id and empty own credentials.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            max_payload: 1 << 20,
            auth: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            own_client_id: None,
            own_credentials: (String::new(), String::new()),
        }
    }
}

/// Default for [`BrokerOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// A running embedded broker. It lives as long as the process: rumqttd has no shutdown, and
/// MetaManager's clean exit publishes its offline status before the process ends.
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    /// MetaManager's links with the router, when [`BrokerOptions::own_client_id`] is set.
    pub own_links: Option<OwnLinks>,
}

/// MetaManager's two in-process links with the embedded broker's router (see
/// [`crate::mqtt`]): each is the pair rumqttd gives, one half to send into the router and
/// one to receive from it.
pub struct OwnLinks {
    /// `metamanager-{node_id}`: subscribes, receives, acknowledges.
    pub receive: (LinkTx, LinkRx),
    /// `metamanager-{node_id}-out`: publishes and receives the router's acks.
    pub send: (LinkTx, LinkRx),
}

/// MetaManager's ids: the receiving one, and the sending one after it.
fn own_ids(options: &BrokerOptions) -> Vec<String> {
    options
        .own_client_id
        .iter()
        .flat_map(|id| [id.clone(), format!("{id}-out")])
        .collect()
}

/// Registers MetaManager's links with the router. Both may publish to topics nobody has
/// subscribed to yet, as every network client of this broker may.
fn own_links(broker: &rumqttd::Broker, client_id: &str) -> Result<OwnLinks, BrokerError> {
    let link = |id: &str| {
        broker
            .link_builder(id)
            .dynamic_filters(true)
            .build()
            .map(|(tx, rx, _connack)| (tx, rx))
            .map_err(|e| BrokerError::Link {
                client_id: id.to_owned(),
                reason: e.to_string(),
            })
    };
    Ok(OwnLinks {
        receive: link(client_id)?,
        send: link(&format!("{client_id}-out"))?,
    })
}

impl EmbeddedBroker {
    /// Starts rumqttd on `host:port` and returns once it accepts connections.
    /// `max_payload` is the largest publish it relays; MetaManager's own limit sits below it
    /// so that an oversized message reaches MetaManager and gets an error reply.
    /// With `auth`, clients must present that username and password; `own_credentials` are
    /// accepted too, for any client id (so [`probe`] can use them), and are the only ones
    /// accepted for the own client ids.
    pub fn start(options: BrokerOptions) -> Result<Self, BrokerError> {
        let listener = bind(&options.host, options.port)?;
        Self::start_on(options, listener)
    }

    /// [`Self::start`] on a listener bound already (`host` and `port` are not used): for a
    /// caller that binds port 0 itself, or holds the port from before.
    pub fn start_on(options: BrokerOptions, listener: TcpListener) -> Result<Self, BrokerError> {
        let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), options.port),
            source,
        })?;
        if !addr.ip().is_loopback() && options.auth.is_none() {
            tracing::warn!(%addr, "embedded broker listens beyond loopback without authentication: anyone who reaches this address can read and write the node's metadata");
        }

        let mut config = config(addr, &options);
        if let Some(server) = config
            .v4
            .as_mut()
            .and_then(|servers| servers.values_mut().next())
        {
            server.bound = Some(std::sync::Arc::new(listener));
        }
        let own_id = options.own_client_id.clone();
        let (links_tx, links_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                // Registered before the listener opens, so no client can take their ids first.
                let links = own_id.map(|id| own_links(&broker, &id)).transpose();
                let linked = links.is_ok();
                if links_tx.send(links).is_err() || !linked {
                    return;
                }
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        let own_links = links_rx
            .recv()
            .map_err(|_| BrokerError::Stopped { addr })??;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if handle.is_finished() {
                return Err(BrokerError::Stopped { addr });
            }
            if TcpStream::connect_timeout(&connect_addr(addr), Duration::from_millis(200)).is_ok() {
                tracing::info!(%addr, "embedded broker listening");
                return Ok(Self { addr, own_links });
            }
            if Instant::now() > deadline {
                return Err(BrokerError::NotReady { addr });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Binds the embedded broker's address. MetaManager binds it and hands it to rumqttd: a failure
/// carries the OS's reason (address in use, permission) rather than only rumqttd's log line, no
/// other process can take the port between a check and rumqttd's bind, and port 0 gets a free
/// port whose number is known.
pub fn bind(host: &str, port: u16) -> Result<TcpListener, BrokerError> {
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
    TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })
}

/// Where a client on this host reaches a listener on `addr`: the loopback address for a
/// listener on every address.
pub fn connect_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

/// Size at which the embedded broker closes a segment of a filter's log.
const SEGMENT_SIZE: usize = 1 << 19;

fn config(addr: SocketAddr, options: &BrokerOptions) -> Config {
    // RouterConfig::default() is all zeros, which rumqttd takes literally.
    let router = RouterConfig {
        // Each connection costs a slab slot and two buffers of at most 200 packets.
        max_connections: options.max_connections,
        // Most QoS 0 publishes handed to one subscriber in one go.
        max_outgoing_packet_count: 200,
        // Each filter (subscription) keeps its messages in an in-memory log of at most
        // `max_segment_count` segments of about `max_segment_size` bytes; the oldest segment
        // goes when a new one starts. A segment is closed once it reaches the size, so one
        // message larger than that fills a segment alone: the size bounds memory, not the
        // message. About 3 MiB per filter, whatever the payload limit. The length is a trade:
        // the logs are most of the broker's memory under a burst, while a longer log holds
        // publishers back less often (MetaManager's lossless reading, below) and lets other
        // subscribers lag further before they skip. For 100 000 inserts from two
        // `mosquitto_pub -l` (release build, by hand): 4 x 512 KiB peaked at 44 MiB and took
        // 6.6 s, 6 x 512 KiB 55 MiB and 3.9 s, 8 x 512 KiB 66 MiB and 3.8 s.
        max_segment_size: SEGMENT_SIZE,
        max_segment_count: 6,
        // MetaManager commits to SQLite before it acks, so under a burst it reads slower than a
        // publisher writes: rather than dropping a segment it has not read, the router holds
        // the publisher back (which stops reading its socket, so TCP slows it down).
        lossless_clients: own_ids(options),
        ..RouterConfig::default()
    };
    let (user, password) = options.own_credentials.clone();
    let reserved = own_ids(options)
        .into_iter()
        .map(|id| {
            let credentials = ReservedCredentials {
                username: user.clone(),
                password: password.clone(),
            };
            (id, credentials)
        })
        .collect::<HashMap<_, _>>();
    let connections = ConnectionSettings {
        // A client has this long to send CONNECT after the TCP handshake.
        connection_timeout_ms: 10_000,
        max_payload_size: options.max_payload,
        // Most packets read from one client's socket in one go.
        max_inflight_count: 200,
        auth: options
            .auth
            .clone()
            .map(|(user, password)| HashMap::from([(user, password)])),
        external_auth: None,
        // Without this, a publish to a topic nobody subscribed to disconnects the publisher.
        dynamic_filters: true,
        reserved_clients: (!reserved.is_empty()).then_some(reserved),
    };
    let server = ServerSettings {
        name: "metamanager-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
        bound: None,
    };
    Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Why [`probe`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to the broker at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker at {addr} did not answer CONNECT within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connection to the broker at {addr} failed during the handshake: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker at {addr} closed the connection before CONNACK")]
    Closed { addr: SocketAddr },
    #[error("broker at {addr} answered CONNECT with something other than CONNACK: {bytes:02x?}")]
    Malformed { addr: SocketAddr, bytes: [u8; 4] },
    #[error("broker at {addr} refused the connection: CONNACK return code {code}")]
    Refused { addr: SocketAddr, code: u8 },
}

/// Checks that the broker at `addr` completes an MQTT 3.1.1 handshake within `timeout`: a fresh
/// TCP connection, CONNECT with a fresh random client id and a clean session (with
/// `credentials` when given), a successful CONNACK, then DISCONNECT. Against the embedded
/// broker, MetaManager passes its own credentials, which it accepts for any client id.
pub async fn probe(
    addr: SocketAddr,
    timeout: Duration,
    credentials: Option<(String, String)>,
) -> Result<(), ProbeError> {
    let client_id = format!("metamanager-probe-{}", uuid::Uuid::new_v4().simple());
    let connect = connect_packet(&client_id, credentials.as_ref(), timeout);
    let handshake = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let io = |source| ProbeError::Io { addr, source };
        stream.write_all(&connect).await.map_err(io)?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ProbeError::Closed { addr }
            } else {
                io(e)
            }
        })?;
        if connack[..2] != [0x20, 0x02] {
            return Err(ProbeError::Malformed {
                addr,
                bytes: connack,
            });
        }
        if connack[3] != 0 {
            return Err(ProbeError::Refused {
                addr,
                code: connack[3],
            });
        }
        stream.write_all(&[0xe0, 0x00]).await.map_err(io)?;
        let _ = stream.shutdown().await;
        Ok(())
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| ProbeError::Timeout { addr, timeout })?
}

/// An MQTT 3.1.1 CONNECT packet with a clean session (what [`probe`] sends; tests use it to
/// play misbehaving clients).
pub fn connect_packet(
    client_id: &str,
    credentials: Option<&(String, String)>,
    keep_alive: Duration,
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        // MQTT strings are at most 65535 bytes; longer credentials are cut (and then refused).
        let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut body = Vec::with_capacity(64);
    string(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    let mut flags = 0x02; // clean session
    if credentials.is_some() {
        flags |= 0x80 | 0x40; // username, password
    }
    body.push(flags);
    let keep_alive = keep_alive.as_secs().clamp(1, u64::from(u16::MAX)) as u16;
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(&mut body, client_id);
    if let Some((user, password)) = credentials {
        string(&mut body, user);
        string(&mut body, password);
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_is_mqtt_3_1_1_with_clean_session() {
        let packet = connect_packet("abc", None, Duration::from_secs(5));
        assert_eq!(
            packet,
            [0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 5, 0, 3, b'a', b'b', b'c']
        );
        let credentials = ("u".to_string(), "p".repeat(200));
        let packet = connect_packet("abc", Some(&credentials), Duration::from_secs(5));
        // Fixed header (3 bytes here), protocol name (6), level (1), then the flags.
        assert_eq!(
            packet[10], 0xc2,
            "username, password and clean session flags"
        );
        // 15 + (2 + 1) + (2 + 200) = 220 bytes: a two-byte remaining length.
        assert_eq!(&packet[1..3], &[(220 - 128) | 0x80, 1]);
        assert_eq!(packet.len(), 3 + 220);
    }

    /// CONNECT as `client_id` with `credentials`; the CONNACK return code, `None` when the
    /// broker closes the connection without one.
    async fn connack_code(
        addr: SocketAddr,
        client_id: &str,
        credentials: Option<&(String, String)>,
    ) -> Option<u8> {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connect = connect_packet(client_id, credentials, Duration::from_secs(5));
        stream.write_all(&connect).await.unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.ok()?;
        Some(connack[3])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn own_credentials_are_reserved_to_own_ids_and_good_for_the_probe() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let auth = ("user".to_string(), "secret".to_string());
        let own = ("metamanager".to_string(), uuid::Uuid::new_v4().to_string());
        let options = BrokerOptions {
            auth: Some(auth.clone()),
            own_client_id: Some("metamanager-n1".into()),
            own_credentials: own.clone(),
            ..BrokerOptions::new("127.0.0.1", port)
        };
        let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start(options))
            .await
            .unwrap()
            .unwrap();
        let addr = broker.addr;
        let timeout = Duration::from_secs(5);

        // The probe's random client id is not reserved: own or normal credentials both work.
        probe(addr, timeout, Some(own.clone())).await.unwrap();
        probe(addr, timeout, Some(auth.clone())).await.unwrap();
        let err = probe(addr, timeout, None).await.unwrap_err();
        assert!(
            matches!(err, ProbeError::Closed { .. } | ProbeError::Io { .. }),
            "{err}"
        );

        // The reserved id takes only its own credentials, not the normal ones, not none.
        assert_eq!(
            connack_code(addr, "metamanager-n1", Some(&own)).await,
            Some(0)
        );
        assert_eq!(
            connack_code(addr, "metamanager-n1", Some(&auth)).await,
            Some(5)
        );
        assert_eq!(connack_code(addr, "metamanager-n1", None).await, Some(5));
        let wrong = (own.0.clone(), "guess".to_string());
        assert_eq!(
            connack_code(addr, "metamanager-n1", Some(&wrong)).await,
            Some(5)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn port_zero_gets_a_free_port_that_serves() {
        let options = BrokerOptions::new("127.0.0.1", 0);
        let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start(options))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(broker.addr.port(), 0);
        probe(broker.addr, Duration::from_secs(5), None)
            .await
            .expect("the broker serves on the port it reports");
    }

    #[tokio::test]
    async fn probe_reports_a_refused_connection() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let err = probe(addr, Duration::from_secs(2), None).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn probe_times_out_on_a_silent_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let err = probe(addr, Duration::from_millis(200), None)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout { .. }), "{err}");
        drop(listener);
    }
}
