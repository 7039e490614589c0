//! The embedded broker survives its clients (contract §6): each test reproduces one way a
//! client used to break rumqttd 0.20.0 against the real binary, then checks that the broker
//! still serves a fresh client (an insert, its ack, and a query of it) and still completes a
//! probe handshake. The fixes are in vendor/rumqttd (see its PATCHES.md).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{fixture, message, msg_id, BrokerKind, Options, Peer, TestApp, NODE, WAIT};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

fn pod_named(name: &str) -> Value {
    let mut pod = fixture("pod.json");
    pod["metadata"]["name"] = json!(name);
    pod
}

async fn app() -> TestApp {
    TestApp::spawn(Options::new(BrokerKind::Embedded))
        .await
        .expect("embedded broker needs nothing installed")
}

/// A fresh client can connect, insert, get its ack and query what it inserted; a probe
/// handshake succeeds; MetaManager is still running.
async fn assert_serves(app: &mut TestApp) {
    let addr: SocketAddr = ([127, 0, 0, 1], app.port).into();
    metamanager::broker::probe(addr, Duration::from_secs(5), None)
        .await
        .expect("probe handshake");
    let mut peer = Peer::connect(app.port).await;
    let name = format!("check-{}", uuid::Uuid::new_v4().simple());
    let key = format!("default/pod/{name}");
    let insert = message("insert", &key, pod_named(&name));
    let ack = peer.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK", "{ack}");
    let stored = peer.query("edged", &key).await;
    assert_eq!(stored[0]["metadata"]["name"], name.as_str(), "{stored}");
    assert!(
        app.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "metamanager is still running"
    );
}

/// What a test client's event loop saw.
#[derive(Debug)]
enum Seen {
    ConnAck(ConnectReturnCode),
    SubAck,
    Publish(Publish),
    Error(String),
}

/// A rumqttc client whose events arrive on a channel; aborting `task` drops the connection
/// without a DISCONNECT, as a crash would.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Seen>,
    task: JoinHandle<()>,
}

impl Client {
    fn start(options: MqttOptions) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let seen = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => Seen::ConnAck(c.code),
                    Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(p),
                    Ok(_) => continue,
                    Err(ConnectionError::ConnectionRefused(code)) => Seen::ConnAck(code),
                    Err(e) => Seen::Error(e.to_string()),
                };
                let error = matches!(seen, Seen::Error(_));
                if tx.send(seen).is_err() {
                    return;
                }
                if error {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Self {
            client,
            events,
            task,
        }
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event within the wait")
            .expect("event loop running")
    }

    async fn connected(&mut self) {
        match self.next().await {
            Seen::ConnAck(ConnectReturnCode::Success) => {}
            other => panic!("expected a successful CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next().await {
                Seen::SubAck => return,
                Seen::ConnAck(ConnectReturnCode::Success) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// The next `n` publishes; panics on anything else (a disconnection included).
    async fn publishes(&mut self, n: usize) -> Vec<Publish> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.next().await {
                Seen::Publish(p) => got.push(p),
                other => panic!("expected publishes, got {other:?} after {}", got.len()),
            }
        }
        got
    }

    fn crash(self) {
        self.task.abort();
    }
}

fn options(port: u16, id: &str, clean_session: bool) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(clean_session);
    options.set_manual_acks(true);
    options
}

/// A connected client that publishes at QoS 1 (acks from the broker are handled by rumqttc).
async fn publisher(port: u16) -> Client {
    let id = format!("pub-{}", uuid::Uuid::new_v4().simple());
    let mut client = Client::start(options(port, &id, true));
    client.connected().await;
    client
}

/// A connected client with a clean session and manual acks, subscribed to `topic` at QoS 1.
async fn subscriber(port: u16, name: &str, topic: &str) -> Client {
    let id = format!("{name}-{}", uuid::Uuid::new_v4().simple());
    let mut client = Client::start(options(port, &id, true));
    client.connected().await;
    client.subscribe(topic).await;
    client
}

async fn publish(client: &Client, topic: &str, payload: String) {
    client
        .client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
}

/// Bug 1: a client that sends CONNECT and resets before its CONNACK leaves a will handler
/// behind whose receiver is gone; the next CONNECT with that id used to panic while holding the
/// will handlers' lock, poisoning it, and from then on every CONNECT panicked. A client id the
/// router refuses (it contains '/') left the same stale handler behind every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_then_reset_twice_with_one_client_id() {
    let mut app = app().await;
    for _ in 0..2 {
        common::connect_then_reset(app.port, "reset-twice");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..2 {
        let mut refused = Client::start(options(app.port, "not/valid", true));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !matches!(
                refused.events.try_recv(),
                Ok(Seen::ConnAck(ConnectReturnCode::Success))
            ),
            "the router refuses client ids with '/'"
        );
        refused.crash();
    }
    assert_serves(&mut app).await;
    assert!(
        !app.log().contains("panicked"),
        "no panic in the broker:\n{}",
        app.log()
    );
}

/// Bug 2: a connection that reset before its CONNACK could be written kept its slot in the
/// router for good; 1 100 of them exhausted the 1 024 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connect_then_reset_do_not_exhaust_connections() {
    let mut app = app().await;
    let port = app.port;
    tokio::task::spawn_blocking(move || {
        for i in 0..1100 {
            common::connect_then_reset(port, &format!("reset-{i}"));
        }
    })
    .await
    .unwrap();
    // The broker accepts one connection per millisecond; let it handle all of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_serves(&mut app).await;
}

/// Bug 3: a persistent-session client in a shared subscription group that leaves messages
/// unacknowledged and goes away took the router thread down ("group must exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriber_with_persistent_session_comes_and_goes() {
    let mut app = app().await;
    let topic = format!("edge/{NODE}/test/shared");
    let id = format!("shared-{}", uuid::Uuid::new_v4().simple());

    let mut subscriber = Client::start(options(app.port, &id, false));
    subscriber.connected().await;
    subscriber.subscribe(&format!("$share/g/{topic}")).await;
    let publisher = publisher(app.port).await;
    for i in 0..5 {
        publish(&publisher, &topic, format!("m{i}")).await;
    }
    // Received, never acknowledged.
    subscriber.publishes(1).await;
    subscriber.crash();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Back with the saved session, and gone again with messages in flight.
    let mut again = Client::start(options(app.port, &id, false));
    again.connected().await;
    publish(&publisher, &topic, "after".into()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    again.crash();
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_serves(&mut app).await;
}

/// Bug 5: a PUBACK for anything but the oldest message in flight disconnected the client
/// (and with a clean session, everything in flight was lost). Acks in reverse order are fine
/// now, and the client keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_out_of_order_keep_the_subscriber_connected() {
    let mut app = app().await;
    let topic = format!("edge/{NODE}/test/ooo");
    let mut subscriber = subscriber(app.port, "ooo", &topic).await;
    let publisher = publisher(app.port).await;

    for i in 0..10 {
        publish(&publisher, &topic, format!("first-{i}")).await;
    }
    let first = subscriber.publishes(10).await;
    for p in first.iter().rev() {
        subscriber.client.ack(p).await.unwrap();
    }
    // An ack for something not in flight is ignored too.
    subscriber.client.ack(&first[0]).await.unwrap();

    for i in 0..10 {
        publish(&publisher, &topic, format!("second-{i}")).await;
    }
    let second = subscriber.publishes(10).await;
    let payloads: Vec<String> = second
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        (0..10).map(|i| format!("second-{i}")).collect::<Vec<_>>()
    );
    for p in &second {
        subscriber.client.ack(p).await.unwrap();
    }
    assert_serves(&mut app).await;
}

/// Change 11: a subscriber may hold up to 1000 unacknowledged QoS 1 messages, not 100, so
/// MetaManager's own in-flight budget (1000 by default) is what bounds it, and its group
/// commits are not cut to 100 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_a_window_of_1000_unacknowledged_messages() {
    let mut app = app().await;
    let topic = format!("edge/{NODE}/test/window");
    let mut subscriber = subscriber(app.port, "window", &topic).await;
    let publisher = publisher(app.port).await;
    for i in 0..1000 {
        publish(&publisher, &topic, format!("m-{i}")).await;
    }
    // None acknowledged: with a window of 100 the 101st never comes and `next` times out.
    let held = subscriber.publishes(1000).await;
    let pkids: std::collections::HashSet<u16> = held.iter().map(|p| p.pkid).collect();
    assert_eq!(
        pkids.len(),
        1000,
        "each in-flight message has its own packet id"
    );
    for p in &held {
        subscriber.client.ack(p).await.unwrap();
    }
    assert_serves(&mut app).await;
}

/// Bug 7: MetaManager's own client id is reserved to its own (random, per start) credentials;
/// a client that tries to take it over is refused and MetaManager stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metamanager_client_id_is_reserved() {
    let mut app = app().await;
    let own_id = format!("metamanager-{NODE}");
    for credentials in [None, Some(("metamanager", "guess"))] {
        let mut options = options(app.port, &own_id, true);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let mut intruder = Client::start(options);
        match intruder.next().await {
            Seen::ConnAck(ConnectReturnCode::NotAuthorized) => {}
            other => panic!("expected CONNACK NotAuthorized, got {other:?}"),
        }
        intruder.crash();
    }
    // MetaManager was not pushed off: its will (the offline status) did not fire.
    let seen = app.client.drain(Duration::from_millis(500)).await;
    assert!(
        !seen
            .iter()
            .any(|(t, v)| t == "metamanager/status" && v["state"] == "offline"),
        "{seen:?}"
    );
    assert_serves(&mut app).await;
}

/// A client id in use by another (not reserved) client is taken over: the old connection is
/// dropped and the log names the client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_client_id_takes_over_and_is_logged() {
    let mut app = app().await;
    let id = format!("dup-{}", uuid::Uuid::new_v4().simple());
    let mut first = Client::start(options(app.port, &id, true));
    first.connected().await;
    let mut second = Client::start(options(app.port, &id, true));
    second.connected().await;
    match first.next().await {
        Seen::Error(e) => eprintln!("first connection dropped: {e}"),
        other => panic!("the first connection is dropped, got {other:?}"),
    }
    first.crash();
    let deadline = Instant::now() + WAIT;
    while !app.log().contains(&format!("Duplicate client_id {id}")) {
        assert!(Instant::now() < deadline, "log names the client id");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.crash();
    assert_serves(&mut app).await;
}

/// Bug 4: without TCP_NODELAY each reply through the embedded broker waited ~40 ms (Nagle and
/// delayed ACK). A behaviour check, not a benchmark: the median query round trip is far below.
/// (The client sets TCP_NODELAY too, as MetaManager does, so only the broker could add delay.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_round_trip_is_not_delayed_by_nagle() {
    let mut app = app().await;
    let insert = fixture("insert-pod.message.json");
    app.client.request("edgehub", &insert).await;
    let key = insert["route"]["resource"].as_str().unwrap().to_owned();

    let mut options = options(
        app.port,
        &format!("rtt-{}", uuid::Uuid::new_v4().simple()),
        true,
    );
    options.set_manual_acks(false);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    eventloop.set_network_options(network);
    let (tx, mut replies) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(serde_json::from_slice::<Value>(&p.payload).unwrap());
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(Value::Null);
                }
                Ok(_) => {}
                Err(e) => panic!("round trip client: {e}"),
            }
        }
    });
    client
        .subscribe(
            format!("edge/{NODE}/metamanager/to/edged"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    assert_eq!(replies.recv().await, Some(Value::Null), "subscribed");

    let mut times = Vec::new();
    for _ in 0..20 {
        let query = message("query", &key, Value::Null);
        let start = Instant::now();
        client
            .publish(
                format!("edge/{NODE}/edged/to/metamanager"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&query).unwrap(),
            )
            .await
            .unwrap();
        loop {
            let reply = tokio::time::timeout(WAIT, replies.recv())
                .await
                .expect("reply")
                .unwrap();
            if reply["header"]["parent_msg_id"] == msg_id(&query) {
                break;
            }
        }
        times.push(start.elapsed());
    }
    task.abort();
    times.sort();
    let p50 = times[times.len() / 2];
    assert!(p50 < Duration::from_millis(20), "p50 {p50:?} of {times:?}");
}

/// Bug 6: a burst of 20 000 QoS 1 inserts from `mosquitto_pub -l`, as fast as it goes. The
/// broker's per-topic log holds far fewer; it used to drop what MetaManager had not read yet.
/// Now the publisher is slowed instead, and every insert is stored and acked without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_from_mosquitto_pub_is_stored_completely() {
    if !common::mosquitto_clients() {
        return;
    }
    const N: usize = 20_000;
    let mut app = app().await;
    // Watch MetaManager's replies to edgehub for errors.
    let mut replies = Client::start(options(
        app.port,
        &format!("replies-{}", uuid::Uuid::new_v4().simple()),
        true,
    ));
    replies.connected().await;
    replies
        .subscribe(&format!("edge/{NODE}/metamanager/to/edgehub"))
        .await;

    let lines: String = (0..N)
        .map(|i| {
            let name = format!("burst-{i:05}");
            let m = message("insert", &format!("default/pod/{name}"), pod_named(&name));
            serde_json::to_string(&m).unwrap() + "\n"
        })
        .collect();
    let input = app.dir.path().join("burst.jsonl");
    std::fs::write(&input, lines).unwrap();
    let started = Instant::now();
    let mut pub_process = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &app.port.to_string(), "-q", "1"])
        .args(["-t", &format!("edge/{NODE}/edgehub/to/metamanager"), "-l"])
        .stdin(std::fs::File::open(&input).unwrap())
        .spawn()
        .unwrap();

    let count = || -> i64 {
        rusqlite::Connection::open(app.db_path())
            .unwrap()
            .query_row(
                "SELECT count(*) FROM meta WHERE key LIKE 'default/pod/burst-%'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    let (mut acks, mut errors) = (0usize, Vec::new());
    // Until everything is acked, or nothing moves for 20 s.
    let (mut last, mut last_progress) = ((0, 0), Instant::now());
    while acks < N {
        match tokio::time::timeout(Duration::from_secs(1), replies.events.recv()).await {
            Ok(Some(Seen::Publish(p))) => {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                match v["route"]["operation"].as_str() {
                    Some("response") if v["content"] == "OK" => acks += 1,
                    Some("error") => errors.push(v),
                    _ => {}
                }
                replies.client.ack(&p).await.unwrap();
            }
            Ok(Some(other)) => panic!("reply watcher: {other:?}"),
            Ok(None) => panic!("reply watcher stopped"),
            Err(_) => {}
        }
        if last_progress.elapsed() > Duration::from_secs(1) {
            let now = (acks, count());
            if now != last {
                (last, last_progress) = (now, Instant::now());
            }
            assert!(
                last_progress.elapsed() < Duration::from_secs(20),
                "stuck at {acks} acks, {} of {N} stored after {:?}; errors: {:?}",
                now.1,
                started.elapsed(),
                &errors[..errors.len().min(3)]
            );
        }
    }
    let status = tokio::task::spawn_blocking(move || pub_process.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "mosquitto_pub: {status}");
    assert_eq!(count(), N as i64, "every insert stored");
    assert!(
        errors.is_empty(),
        "{} error replies: {:?}",
        errors.len(),
        errors[0]
    );
    eprintln!("{N} inserts stored and acked in {:?}", started.elapsed());
    assert_serves(&mut app).await;
}

/// The watchdog, with the broker made unreachable: idle clients take every connection slot, so
/// the broker accepts nobody else. `/healthz` fails, and once the check has failed for
/// `mqtt.watchdog_timeout` MetaManager exits with status 3 for its service manager to restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_fails_health_and_exits_when_the_broker_accepts_nobody() {
    use std::io::{Read, Write};
    let options =
        Options::new(BrokerKind::Embedded).mqtt("watchdog_interval: 1s\nwatchdog_timeout: 3s");
    let mut app = TestApp::spawn(options).await.expect("embedded");
    assert_eq!(common::http(app.http_port, "GET", "/healthz").await.0, 200);

    // Idle clients that completed their handshake, until the broker takes no more.
    let mut idle = Vec::new();
    let full = loop {
        assert!(
            idle.len() <= 1100,
            "the broker took more clients than its limit"
        );
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", app.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let id = format!("idle-{}", idle.len());
        let connect = metamanager::broker::connect_packet(&id, None, Duration::from_secs(600));
        stream.write_all(&connect).unwrap();
        let mut connack = [0u8; 4];
        match stream.read_exact(&mut connack) {
            Ok(()) if connack[0] == 0x20 && connack[3] == 0 => idle.push(stream),
            _ => break idle.len(),
        }
    };
    assert!(full >= 1000, "only {full} idle clients fitted");

    let deadline = Instant::now() + Duration::from_secs(10);
    while common::http(app.http_port, "GET", "/healthz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/healthz did not fail");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut child = app.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "MetaManager did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(3), "{}", app.log());
    assert!(
        app.log().contains("has not accepted a connection"),
        "{}",
        app.log()
    );
    drop(idle);
}

/// Half-open connections: hundreds of TCP connections that never send CONNECT (a client that
/// died mid-handshake, a port scanner) do not keep the broker from serving others, and are
/// closed after the CONNECT timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_do_not_stop_the_broker() {
    use std::io::Read;
    let mut app = app().await;
    let silent: Vec<std::net::TcpStream> = (0..500)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", app.port)).unwrap())
        .collect();
    assert_serves(&mut app).await;
    // The broker gives up on them: each is closed within the 10 s CONNECT timeout.
    let mut first = silent.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 1];
    let closed = match first.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(
        closed,
        "a connection that never sent CONNECT is closed by the broker"
    );
    assert_serves(&mut app).await;
}

/// A watcher that stops reading: the embedded broker holds at most a log's length for it, and
/// when it reads again the messages it missed are counted and logged, not silently lost.
/// MetaManager itself is never held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_is_counted_and_logged() {
    use std::io::{Read, Write};
    let options = Options::new(BrokerKind::Embedded).mqtt("watchdog_interval: 1s");
    let mut app = TestApp::spawn(options).await.expect("embedded");

    // A QoS 0 subscriber to the forwards, which then stops reading its socket. A small receive
    // buffer, so that the kernel does not absorb what the broker holds back.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], app.port).into();
    socket.connect(&addr.into()).unwrap();
    let mut watcher: std::net::TcpStream = socket.into();
    watcher
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let connect =
        metamanager::broker::connect_packet("slow-watcher", None, Duration::from_secs(600));
    watcher.write_all(&connect).unwrap();
    let mut connack = [0u8; 4];
    watcher.read_exact(&mut connack).unwrap();
    let topic = format!("edge/{NODE}/metamanager/to/edged");
    let mut subscribe = vec![0x82, (2 + 2 + topic.len() + 1) as u8, 0, 1];
    subscribe.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(topic.as_bytes());
    subscribe.push(0);
    watcher.write_all(&subscribe).unwrap();
    let mut suback = [0u8; 5];
    watcher.read_exact(&mut suback).unwrap();
    assert_eq!(suback[0], 0x90, "SUBACK");

    // Far more than the broker's log holds for one topic (about 3 MiB) and the sockets between.
    const N: usize = 5000;
    let peer = Peer::connect(app.port).await;
    for i in 0..N {
        let name = format!("fill-{i}");
        let insert = message("insert", &format!("default/pod/{name}"), pod_named(&name));
        peer.publish("edgehub", &insert).await;
    }
    // MetaManager handles every one, whatever the watcher does.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, metrics) = common::http(app.http_port, "GET", "/metrics").await;
        let handled = metrics
            .lines()
            .filter(|l| l.starts_with("metamanager_replies_sent_total") && l.contains("response"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        if handled >= N as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "{handled} of {N} handled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The watcher reads again; the broker resumes it past what it no longer has.
    watcher
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut sink = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(30);
    let skipped = loop {
        while matches!(watcher.read(&mut sink), Ok(n) if n > 0) {}
        let (_, _, metrics) = common::http(app.http_port, "GET", "/metrics").await;
        let skipped = metrics
            .lines()
            .find(|l| l.starts_with("metamanager_embedded_broker_skipped_messages_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if skipped > 0.0 {
            break skipped;
        }
        assert!(Instant::now() < deadline, "nothing counted as skipped");
    };
    assert!(skipped < N as f64, "{skipped}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.log().contains("skipped messages") {
        assert!(Instant::now() < deadline, "no warning logged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_serves(&mut app).await;
}
