//! The long scenarios more than one broker kind runs: a SIGKILL of MetaManager in the middle of
//! a stream (tests/delivery.rs, tests/rabbitmq.rs) and a burst from `mosquitto_pub -l`
//! (tests/flow_control.rs, tests/rabbitmq.rs).

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    count_rows, fixture, message, mosquitto_clients, msg_id, BrokerKind, Options, TestApp, NODE,
    WAIT,
};

pub fn pod_named(name: &str) -> Value {
    let mut pod = fixture("pod.json");
    pod["metadata"]["name"] = json!(name);
    pod
}

/// The `processed` rows as `(msg_id, settled)`, read from the file without writing to it.
pub fn processed_rows(app: &TestApp) -> Vec<(String, bool)> {
    let conn = rusqlite::Connection::open_with_flags(
        app.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn
        .prepare("SELECT msg_id, settled FROM processed ORDER BY seq")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

pub fn stored_keys(app: &TestApp) -> HashSet<String> {
    let conn = rusqlite::Connection::open(app.db_path()).unwrap();
    let mut stmt = conn.prepare("SELECT key FROM meta").unwrap();
    let keys = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    keys
}

/// SIGKILL in the middle of a stream of QoS 1 inserts: every insert MetaManager acked is
/// stored at that moment, and after a restart the broker's redelivery completes the rest.
pub async fn sigkill_mid_stream_loses_nothing_acked_and_nothing_accepted(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    const N: usize = 2000;
    let inserts: Vec<Value> = (0..N)
        .map(|i| {
            let name = format!("pod-{i:05}");
            message("insert", &format!("default/pod/{name}"), pod_named(&name))
        })
        .collect();
    // Plays edged across the kill: every insert must reach it at least once.
    let mut edged = app.peer().await;
    // Reads the acks to edgehub while the stream goes on.
    let mut acks = app.peer().await;
    // A separate publisher keeps streaming while MetaManager is killed under it.
    let publisher = std::sync::Arc::new(app.peer().await);
    let stream = {
        let publisher = publisher.clone();
        let inserts = inserts.clone();
        tokio::spawn(async move {
            for m in &inserts {
                publisher.publish("edgehub", m).await;
            }
        })
    };
    // Let part of the stream through, then pull the plug. The acks are read as they come
    // (`next`: `wait_for` searches what it set aside, and fell so far behind a quick node that
    // the whole stream was stored before the kill), so the kill lands with most of it to come.
    let mut acked = Vec::new();
    while acked.len() < N / 10 {
        let next = tokio::time::timeout(WAIT, acks.next()).await;
        let Ok(Some((topic, ack))) = next else {
            panic!("acks stopped after {}", acked.len());
        };
        if topic == "metamanager/to/edgehub" && ack["content"] == "OK" {
            acked.push(ack["header"]["parent_msg_id"].as_str().unwrap().to_owned());
        }
    }
    app.kill9();

    let by_id: std::collections::HashMap<&str, &str> = inserts
        .iter()
        .map(|m| (msg_id(m), m["route"]["resource"].as_str().unwrap()))
        .collect();
    let stored = stored_keys(&app);
    assert!(stored.len() < N, "the kill came too late to test anything");
    for id in &acked {
        assert!(
            stored.contains(by_id[id.as_str()]),
            "acked but not stored: {id}"
        );
    }

    // Every insert reached the broker, which keeps MetaManager's session: it redelivers what
    // MetaManager did not acknowledge and delivers what arrived while it was down.
    stream.await.unwrap();
    publisher.wait_accepted(N).await;
    app.start().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_rows(&app, "SELECT count(*) FROM meta") < N as i64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} stored after restart",
            count_rows(&app, "SELECT count(*) FROM meta")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored_keys(&app).len(), N);

    // Inserts committed before the kill whose forward was cut off are forwarded when the
    // broker redelivers them: nothing stored is missing at edged.
    let mut missing: HashSet<&str> = by_id.keys().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !missing.is_empty() && Instant::now() < deadline {
        if let Ok(Some((topic, m))) =
            tokio::time::timeout(Duration::from_millis(500), edged.next()).await
        {
            if topic == "metamanager/to/edged" {
                missing.remove(m["header"]["msg_id"].as_str().unwrap_or_default());
            }
        }
    }
    let settled: Vec<(String, bool)> = processed_rows(&app)
        .into_iter()
        .filter(|(id, _)| missing.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} stored inserts never reached edged; (msg_id, settled): {settled:?}",
        missing.len(),
    );
}

/// Peak resident memory MetaManager may reach during a burst: a debug build, and with the
/// embedded broker the broker's own buffers live in the same process. These are guards against
/// growth with the burst's length, not figures; the release figures are measured by
/// `cargo bench`.
pub fn peak_rss_limit_kib(kind: BrokerKind) -> u64 {
    match kind {
        BrokerKind::Embedded => 256 * 1024,
        BrokerKind::Mosquitto | BrokerKind::RabbitMq => 128 * 1024,
    }
}

/// Writes `n` pod inserts, one JSON message a line, each with its own pod and msg_id.
pub fn burst_file(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
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

pub fn stored_pods(app: &TestApp) -> usize {
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

pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `n` inserts from `mosquitto_pub -q 1 -l` as fast as it can send them: every one is stored
/// and acked to edgehub, none gets an `error`, and MetaManager's peak RSS stays bounded.
pub async fn burst_is_stored_and_acked(options: Options, n: usize) {
    if !mosquitto_clients() {
        return;
    }
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let file = burst_file(app.dir.path(), n);
    let acks_path = app.dir.path().join("acks.txt");
    // The test client's login, where the broker wants one.
    let login: Vec<String> = app
        .options
        .peer_login
        .iter()
        .flat_map(|(user, password)| ["-u".into(), user.clone(), "-P".into(), password.clone()])
        .collect();
    let mut acks_sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &app.port.to_string(), "-q", "1"])
        .args(&login)
        .args(["-t", &format!("edge/{NODE}/metamanager/to/edgehub")])
        .args(["-t", &format!("edge/{NODE}/probe/acks")])
        .stdout(std::fs::File::create(&acks_path).unwrap())
        .spawn()
        .unwrap();
    app.client
        .await_subscribed(&format!("edge/{NODE}/probe/acks"), &acks_path)
        .await;
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
        .args(&login)
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
    // Acks for every message and nothing else: no error, no duplicate ack. MetaManager answers
    // in arrival order on one connection, so once a last query's answer is in the file, any
    // late error or duplicate ack of the burst would be there too.
    let last = message("query", "default/pod/after-the-burst", Value::Null);
    app.client.publish("edgehub", &last).await;
    let answered = format!(r#""parent_msg_id":"{}""#, msg_id(&last));
    while count(&answered) == 0 {
        assert!(Instant::now() < deadline, "the last query was not answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(r#""operation":"error""#), 0);
    assert_eq!(count(r#""operation":"response""#), n + 1);
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
