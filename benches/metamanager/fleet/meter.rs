//! A byte-counting TCP proxy in front of the central broker: every client of the central
//! broker (the nodes' bridges, the cloud's clients) connects to the meter, which forwards each
//! connection to the broker unchanged and reads the MQTT packets that cross it, both ways. What
//! it counts is what the central broker's listener receives and sends, packet by packet: the
//! whole packet (fixed header, topic, packet id, payload), and for a publish also its payload
//! and a label saying what it carries. A PUBACK is matched by its packet id to the QoS 1 publish
//! it acknowledges, which crossed the same connection the other way, and counted under that
//! publish's label too (each chunk read is counted before it is forwarded, so that the publish
//! is known when its PUBACK comes back).
//!
//! It also plays the network between a node and the centre: `cut` closes a client's
//! connections and refuses its new ones (after reading their CONNECT, which is not forwarded
//! and not counted), `restore` lets it in again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// MQTT control packet types (MQTT 3.1.1, section 2.2.1), as the meter names them.
pub const CONNECT: usize = 1;
pub const CONNACK: usize = 2;
pub const PUBLISH: usize = 3;
pub const PUBACK: usize = 4;
pub const SUBSCRIBE: usize = 8;
pub const SUBACK: usize = 9;
pub const UNSUBSCRIBE: usize = 10;
pub const UNSUBACK: usize = 11;
pub const PINGREQ: usize = 12;
pub const PINGRESP: usize = 13;

/// What a publish carries, from its topic and payload: the report's rows.
pub type Labeller = Arc<dyn Fn(&str, &[u8]) -> String + Send + Sync>;

/// Publishes of one label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kind {
    pub count: u64,
    /// Whole packets.
    pub mqtt_bytes: u64,
    pub payload_bytes: u64,
}

/// One direction of one or more connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    /// Packets and their bytes, by packet type.
    pub packets: [u64; 16],
    pub bytes: [u64; 16],
    /// Publishes by label.
    pub publishes: BTreeMap<String, Kind>,
    /// Publishes with the retain flag.
    pub retained: u64,
    /// PUBACKs in this direction, by the label of the publish each acknowledges (which went the
    /// other way on the same connection), [`UNMATCHED`] for one whose publish the meter did not
    /// see. Their `payload_bytes` are 0.
    pub acks: BTreeMap<String, Kind>,
}

/// The label of a PUBACK whose publish the meter did not see.
pub const UNMATCHED: &str = "(publish not seen)";

impl Flow {
    pub fn all_packets(&self) -> u64 {
        self.packets.iter().sum()
    }

    pub fn all_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    pub fn payload_bytes(&self) -> u64 {
        self.publishes.values().map(|k| k.payload_bytes).sum()
    }

    fn add(&mut self, other: &Flow, sign: i64) {
        let apply = |a: &mut u64, b: u64| *a = (*a as i64 + sign * b as i64) as u64;
        for t in 0..16 {
            apply(&mut self.packets[t], other.packets[t]);
            apply(&mut self.bytes[t], other.bytes[t]);
        }
        apply(&mut self.retained, other.retained);
        for (label, k) in &other.publishes {
            let mine = self.publishes.entry(label.clone()).or_default();
            apply(&mut mine.count, k.count);
            apply(&mut mine.mqtt_bytes, k.mqtt_bytes);
            apply(&mut mine.payload_bytes, k.payload_bytes);
        }
        self.publishes.retain(|_, k| *k != Kind::default());
        for (label, k) in &other.acks {
            let mine = self.acks.entry(label.clone()).or_default();
            apply(&mut mine.count, k.count);
            apply(&mut mine.mqtt_bytes, k.mqtt_bytes);
        }
        self.acks.retain(|_, k| *k != Kind::default());
    }

    /// The same with packets of the types in `types` left out (a cloud process's keepalive,
    /// say, which is its own and not a node's).
    pub fn without(&self, types: &[usize]) -> Flow {
        let mut f = self.clone();
        for &t in types {
            f.packets[t] = 0;
            f.bytes[t] = 0;
        }
        if types.contains(&PUBACK) {
            f.acks.clear();
        }
        f
    }
}

/// Both directions, seen from the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Client to broker: what the broker receives.
    pub to_broker: Flow,
    /// Broker to client: what the broker sends.
    pub from_broker: Flow,
}

impl Traffic {
    pub fn plus(&self, other: &Traffic) -> Traffic {
        let mut t = self.clone();
        t.to_broker.add(&other.to_broker, 1);
        t.from_broker.add(&other.from_broker, 1);
        t
    }

    pub fn minus(&self, other: &Traffic) -> Traffic {
        let mut t = self.clone();
        t.to_broker.add(&other.to_broker, -1);
        t.from_broker.add(&other.from_broker, -1);
        t
    }

    pub fn without(&self, types: &[usize]) -> Traffic {
        Traffic {
            to_broker: self.to_broker.without(types),
            from_broker: self.from_broker.without(types),
        }
    }
}

/// Every connection's traffic so far, by client id (a client that reconnected has one entry
/// for all its connections).
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub BTreeMap<String, Traffic>);

impl Snapshot {
    /// The traffic of the clients whose id `keep` takes.
    pub fn of(&self, keep: impl Fn(&str) -> bool) -> Traffic {
        self.0
            .iter()
            .filter(|(id, _)| keep(id))
            .fold(Traffic::default(), |sum, (_, t)| sum.plus(t))
    }

    pub fn all(&self) -> Traffic {
        self.of(|_| true)
    }
}

struct Connection {
    client_id: String,
    counts: Arc<Mutex<Counts>>,
    pumps: [AbortHandle; 2],
}

/// One connection's traffic, and the labels of its QoS 1 publishes not yet acknowledged, by
/// packet id: those to the broker, and those from it.
#[derive(Default)]
struct Counts {
    traffic: Traffic,
    unacked: [HashMap<u16, String>; 2],
}

impl Counts {
    fn add(&mut self, to_broker: bool, p: Packet) {
        let (flow, mine, theirs) = if to_broker {
            let [up, down] = &mut self.unacked;
            (&mut self.traffic.to_broker, up, down)
        } else {
            let [up, down] = &mut self.unacked;
            (&mut self.traffic.from_broker, down, up)
        };
        flow.packets[p.kind] += 1;
        flow.bytes[p.kind] += p.len;
        flow.retained += u64::from(p.retained);
        if let Some((label, payload)) = p.publish {
            if let Some(id) = p.id {
                mine.insert(id, label.clone());
            }
            let k = flow.publishes.entry(label).or_default();
            k.count += 1;
            k.mqtt_bytes += p.len;
            k.payload_bytes += payload;
        } else if p.kind == PUBACK {
            let label =
                p.id.and_then(|id| theirs.remove(&id))
                    .unwrap_or_else(|| UNMATCHED.to_owned());
            let k = flow.acks.entry(label).or_default();
            k.count += 1;
            k.mqtt_bytes += p.len;
        }
    }
}

struct Shared {
    broker: u16,
    labeller: Labeller,
    connections: Mutex<Vec<Connection>>,
    /// Client ids whose connections are refused.
    cut: Mutex<HashSet<String>>,
}

pub struct Meter {
    /// Where clients connect instead of the broker.
    pub port: u16,
    shared: Arc<Shared>,
    accepting: AbortHandle,
}

impl Meter {
    /// A meter on a free loopback port, forwarding to the broker on `broker`.
    pub async fn start(broker: u16, labeller: Labeller) -> Meter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("meter port");
        let port = listener.local_addr().expect("meter address").port();
        let shared = Arc::new(Shared {
            broker,
            labeller,
            connections: Mutex::new(Vec::new()),
            cut: Mutex::new(HashSet::new()),
        });
        let s = shared.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move { accept(s, client).await });
            }
        })
        .abort_handle();
        Meter {
            port,
            shared,
            accepting,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut all: BTreeMap<String, Traffic> = BTreeMap::new();
        for c in lock(&self.shared.connections).iter() {
            let t = lock(&c.counts).traffic.clone();
            let entry = all.entry(c.client_id.clone()).or_default();
            *entry = entry.plus(&t);
        }
        Snapshot(all)
    }

    /// Closes `client_id`'s connections and refuses its new ones, as a network outage would.
    pub fn cut(&self, client_id: &str) {
        lock(&self.shared.cut).insert(client_id.to_owned());
        for c in lock(&self.shared.connections).iter() {
            if c.client_id == client_id {
                c.pumps.iter().for_each(AbortHandle::abort);
            }
        }
    }

    pub fn restore(&self, client_id: &str) {
        lock(&self.shared.cut).remove(client_id);
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.accepting.abort();
        for c in lock(&self.shared.connections).iter() {
            c.pumps.iter().for_each(AbortHandle::abort);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the client's CONNECT, refuses it if the client is cut off, else connects to the
/// broker and starts the two pumps.
async fn accept(shared: Arc<Shared>, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    let client_id = loop {
        if let Some((header, total)) = packet_length(&first) {
            if first.len() >= total {
                break connect_client_id(&first[header..total]).unwrap_or_default();
            }
        }
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => first.extend_from_slice(&buf[..n]),
        }
    };
    if lock(&shared.cut).contains(&client_id) {
        return;
    }
    let Ok(broker) = TcpStream::connect(("127.0.0.1", shared.broker)).await else {
        return;
    };
    let _ = broker.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (broker_read, mut broker_write) = broker.into_split();
    if broker_write.write_all(&first).await.is_err() {
        return;
    }
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut to_broker = Parser::default();
    to_broker.feed(&first, &shared.labeller, |p| lock(&counts).add(true, p));
    let up = tokio::spawn(pump(
        client_read,
        broker_write,
        to_broker,
        counts.clone(),
        shared.labeller.clone(),
        true,
    ));
    let down = tokio::spawn(pump(
        broker_read,
        client_write,
        Parser::default(),
        counts.clone(),
        shared.labeller.clone(),
        false,
    ));
    let connection = Connection {
        client_id,
        counts,
        pumps: [up.abort_handle(), down.abort_handle()],
    };
    lock(&shared.connections).push(connection);
}

/// One packet, parsed: its type, whole length, its packet id (a publish at QoS 1 or 2, a
/// PUBACK), and for a publish its label and payload.
struct Packet {
    kind: usize,
    retained: bool,
    len: u64,
    id: Option<u16>,
    publish: Option<(String, u64)>,
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut parser: Parser,
    counts: Arc<Mutex<Counts>>,
    labeller: Labeller,
    to_broker: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Counted before it is forwarded: a publish's packet id is known before its PUBACK can
        // come back the other way.
        parser.feed(&buf[..n], &labeller, |p| lock(&counts).add(to_broker, p));
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Splits a byte stream into MQTT packets.
#[derive(Default)]
struct Parser {
    pending: Vec<u8>,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8], labeller: &Labeller, mut count: impl FnMut(Packet)) {
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        while let Some((header, total)) = packet_length(&self.pending[at..]) {
            if self.pending.len() - at < total {
                break;
            }
            let packet = &self.pending[at..at + total];
            let kind = (packet[0] >> 4) as usize;
            let body = &packet[header..];
            let u16_at = |at: usize| {
                body.get(at..at + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
            };
            let mut id = None;
            let publish = (kind == PUBLISH).then(|| {
                let qos = (packet[0] >> 1) & 3;
                let topic_len = u16_at(0).unwrap_or(0) as usize;
                let topic = body.get(2..2 + topic_len).unwrap_or_default();
                let id_len = if qos > 0 { 2 } else { 0 };
                if qos > 0 {
                    id = u16_at(2 + topic_len);
                }
                let payload = body.get(2 + topic_len + id_len..).unwrap_or_default();
                (
                    labeller(&String::from_utf8_lossy(topic), payload),
                    payload.len() as u64,
                )
            });
            if kind == PUBACK {
                id = u16_at(0);
            }
            count(Packet {
                kind,
                retained: kind == PUBLISH && packet[0] & 1 == 1,
                len: total as u64,
                id,
                publish,
            });
            at += total;
        }
        self.pending.drain(..at);
    }
}

/// The length of the fixed header and of the whole packet at the start of `bytes`, once the
/// remaining length can be read.
fn packet_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let b = *bytes.get(1 + i)?;
        remaining |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((2 + i, 2 + i + remaining));
        }
    }
    None
}

/// The client id of a CONNECT packet's variable header and payload (MQTT 3.1.1 or 3.1).
fn connect_client_id(body: &[u8]) -> Option<String> {
    let name_len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    // Protocol name, level (1), flags (1), keepalive (2).
    let at = 2 + name_len + 4;
    let id_len = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
    let id = body.get(at + 2..at + 2 + id_len)?;
    Some(String::from_utf8_lossy(id).into_owned())
}
