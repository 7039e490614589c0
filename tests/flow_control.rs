//! Flow control end to end, with the real binary, real brokers and `mosquitto_pub -l` as the
//! publisher that sends as fast as it can: a burst is slowed or held, never dropped or refused,
//! and MetaManager's memory stays bounded. Also: a client that takes MetaManager's client id.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture, mosquitto_clients, BrokerKind, Options, TestApp, NODE};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
use serde_json::json;

/// Peak resident memory MetaManager may reach during a burst: a debug build, and with the
/// embedded broker the broker's own buffers live in the same process. These are guards against
/// growth with the burst's length, not figures; the release figures are measured by
/// `cargo bench`.
fn peak_rss_limit_kib(kind: BrokerKind) -> u64 {
    match kind {
        BrokerKind::Embedded => 256 * 1024,
        BrokerKind::Mosquitto => 128 * 1024,
    }
}

/// Writes `n` pod inserts, one JSON message a line, each with its own pod and msg_id.
fn burst_file(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let pod = fixture("pod.json");
    let path = dir.join("burst.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..n {
        let mut content = pod.clone();
        content["metadata"]["name"] = json!(format!("burst-{i}"));
        let msg = json!({
            "header": {"msg_id": format!("burst-{i}"), "timestamp": 1795774500123i64},
            "route": {"source": "edgecontroller", "group": "resource", "operation": "insert",
                      "resource": format!("default/pod/burst-{i}")},
            "content": content,
        });
        serde_json::to_writer(&mut out, &msg).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
    path
}

fn stored_pods(app: &TestApp) -> usize {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        app.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM meta WHERE type = 'pod'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n as usize)
    .unwrap_or(0)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `n` inserts from `mosquitto_pub -q 1 -l` as fast as it can send them: every one is stored
/// and acked to edgehub, none gets an `error`, and MetaManager's peak RSS stays bounded.
async fn burst_is_stored_and_acked(options: Options, n: usize) {
    if !mosquitto_clients() {
        return;
    }
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let file = burst_file(app.dir.path(), n);
    let acks_path = app.dir.path().join("acks.txt");
    let mut acks_sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &app.port.to_string(), "-q", "1"])
        .args(["-t", &format!("edge/{NODE}/metamanager/to/edgehub")])
        .stdout(std::fs::File::create(&acks_path).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.set_cloud(true).await;

    let started = Instant::now();
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &app.port.to_string(),
            "-q",
            "1",
            "-l",
        ])
        .args(["-t", &format!("edge/{NODE}/edgehub/to/metamanager")])
        .stdin(Stdio::from(std::fs::File::open(&file).unwrap()))
        .status()
        .unwrap();
    assert!(status.success(), "mosquitto_pub: {status}");

    let count = |what: &str| {
        std::fs::read_to_string(&acks_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let acked = count(r#""operation":"response""#);
        let stored = stored_pods(&app);
        if acked >= n && stored >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {:?}: {stored} of {n} stored, {acked} acked, {} errors",
            started.elapsed(),
            count(r#""operation":"error""#)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Acks for every message and nothing else: no error, no duplicate ack.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(r#""operation":"error""#), 0);
    assert_eq!(count(r#""operation":"response""#), n);
    assert_eq!(stored_pods(&app), n);
    let pid = app.child.as_ref().unwrap().id();
    let peak = peak_rss_kib(pid);
    let limit = peak_rss_limit_kib(app.options.kind);
    assert!(
        peak > 0 && peak < limit,
        "peak RSS {peak} KiB (limit {limit})"
    );
    let _ = acks_sub.kill();
    let _ = acks_sub.wait();
    assert!(!app.log().contains("overloaded"));
}

const BURST: usize = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_embedded() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Embedded), BURST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_mosquitto() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Mosquitto), BURST).await;
}

/// A budget of 2 messages: MetaManager stops reading after every second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_with_a_tiny_budget_embedded() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Embedded).inflight(2), 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_with_a_tiny_budget_mosquitto() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Mosquitto).inflight(2), 5_000).await;
}

/// Connects with MetaManager's own client id over and over, the way a misconfigured client
/// with a reconnect loop does, for `run`. Returns how many times the broker accepted it.
async fn impostor(port: u16, run: Duration) -> (usize, Vec<String>) {
    let mut options = MqttOptions::new(format!("metamanager-{NODE}"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    let mut accepted = 0;
    let mut errors = Vec::new();
    let until = Instant::now() + run;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => accepted += 1,
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => {
                errors.push(match e {
                    ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                    other => other.to_string(),
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (accepted, errors)
}

fn connections_of_receiver(app: &TestApp) -> usize {
    app.log()
        .lines()
        .filter(|l| l.contains("connected to MQTT broker") && l.contains("receiving"))
        .count()
}

/// Embedded broker: nobody else can use MetaManager's client id; MetaManager stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_is_refused_by_the_embedded_broker() {
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Embedded)).await else {
        return;
    };
    let (accepted, errors) = impostor(app.port, Duration::from_secs(3)).await;
    assert_eq!(accepted, 0, "the impostor got in; errors: {errors:?}");
    assert!(
        errors.iter().any(|e| e.starts_with("refused")),
        "the impostor is told it is refused: {errors:?}"
    );
    // MetaManager's own links are in-process: the impostor could not disturb them.
    let log = app.log();
    assert_eq!(
        log.matches("linked to the embedded broker in-process")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("dropped MetaManager's"), "{log}");
    // Still serving.
    let pod = fixture("pod.json");
    let insert = common::message("insert", "default/pod/after-impostor", pod);
    app.client.publish("edgehub", &insert).await;
    app.client
        .reply_to("metamanager/to/edgehub", common::msg_id(&insert))
        .await;
}

/// External broker: the takeover is logged as such and MetaManager backs off instead of
/// throwing the other client off in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_is_logged_and_backed_off_on_mosquitto() {
    let Some(app) = TestApp::spawn(Options::new(BrokerKind::Mosquitto)).await else {
        return;
    };
    let (accepted, _) = impostor(app.port, Duration::from_secs(10)).await;
    let log = app.log();
    assert!(
        log.contains(&format!(
            "another client connected with client id metamanager-{NODE}"
        )),
        "{log}"
    );
    let reconnects = connections_of_receiver(&app);
    // 100 ms doubling: about 7 attempts in 10 s, where a fight would be dozens.
    assert!(
        reconnects <= 10,
        "MetaManager reconnected {reconnects} times in 10 s (impostor accepted {accepted} times)"
    );
    assert!(accepted >= 1);
}
