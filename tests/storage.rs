//! The disk as a governed resource, against the real binary and a real SQLite file: a real full
//! disk (a small tmpfs, so root: CI requires it with METAMANAGER_REQUIRE_TMPFS=1), the quota,
//! the storage-full state as every side sees it, leaving it by itself, and compaction after
//! churn.

mod common;

use std::time::{Duration, Instant};

use common::scenarios::{pod_named, stored_keys};
use common::{message, BrokerKind, Options, TestApp};
use serde_json::{json, Value};

/// How long the state may take to clear on an idle node: the writer looks for room every 10 s.
const CLEARS_WITHIN: Duration = Duration::from_secs(30);

/// Inserts pods as the cloud from `first` on until one is refused; the keys acked and the
/// refusal's text.
async fn insert_until_refused(app: &mut TestApp, first: usize) -> (Vec<String>, String) {
    let mut acked = Vec::new();
    for i in first..first + 20_000 {
        let name = format!("fill-{i:05}");
        let key = format!("default/pod/{name}");
        let reply = app
            .client
            .request("edgehub", &message("insert", &key, pod_named(&name)))
            .await;
        match reply["route"]["operation"].as_str() {
            Some("response") => acked.push(key),
            Some("error") => {
                let text = reply["content"].as_str().unwrap_or_default().to_owned();
                return (acked, text);
            }
            _ => panic!("neither ack nor error: {reply}"),
        }
    }
    panic!("nothing was refused");
}

/// An insert from the cloud is stored and acked: there is room.
async fn a_write_goes_through(app: &mut TestApp) {
    let ack = app
        .client
        .request(
            "edgehub",
            &message("insert", "default/pod/after", pod_named("after")),
        )
        .await;
    assert_eq!(ack["content"], "OK", "{ack}");
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let (code, _, body) = common::http(app.http_port, "GET", "/readyz").await;
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The value of an unlabelled metric on `/metrics`.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let (_, _, text) = common::http(app.http_port, "GET", "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not on /metrics:\n{text}"))
}

/// Waits until `/readyz` answers `code`.
async fn readyz_becomes(app: &TestApp, code: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (now, body) = readyz(app).await;
        if now == code {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {now}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every side sees the state: `/readyz`, the retained status, the gauge.
async fn assert_state(app: &TestApp, full: bool) {
    let (code, body) = readyz(app).await;
    let status = app.retained_status().await;
    let gauge = metric(app, "metamanager_store_full").await;
    if full {
        assert_eq!(code, 503, "{body}");
        let store = body["store"].as_str().unwrap_or_default();
        assert!(store.starts_with("storage full:"), "{body}");
        assert_eq!(status["store"], "full", "{status}");
        assert_eq!(gauge, 1.0);
    } else {
        assert_eq!(body["store"], "ok", "{body}");
        assert_eq!(status["store"], "ok", "{status}");
        assert_eq!(gauge, 0.0);
    }
}

/// A real full disk, as the issue tried it: 3.6 KB pods from the cloud into a 6 MiB tmpfs.
/// Writes that do not fit are refused with one clear reason and acked; reads and deletes go on;
/// the log has one line for the state, not one per message; every ack is honest; and once
/// space is freed on the disk, with no write coming, the state ends by itself and writes go
/// through again.
async fn a_full_disk_refuses_clearly_and_recovers_by_itself(kind: BrokerKind) {
    let Some(disk) = common::process::Tmpfs::mount("6m") else {
        return;
    };
    // What an operator frees later: another program's file on the same disk.
    let other = disk.path().join("someone-elses.log");
    std::fs::write(&other, vec![b'x'; 1024 * 1024]).unwrap();
    let options = Options::new(kind).database("max_size: 0");
    let Some(mut app) = TestApp::spawn_with_db(options, disk.path().join("meta.db")).await else {
        return;
    };
    let (acked, refusal) = insert_until_refused(&mut app, 0).await;
    assert!(
        acked.len() > 50,
        "{} stored before the disk filled",
        acked.len()
    );
    assert!(
        refusal.starts_with("storage full: disk holding "),
        "{refusal}"
    );
    // A flood on the full disk: each refused with the same reason, acked, and one log line.
    for i in 0..200 {
        let key = format!("default/pod/flood-{i}");
        let reply = app
            .client
            .request("edgehub", &message("insert", &key, pod_named("flood")))
            .await;
        assert_eq!(reply["route"]["operation"], "error", "{reply}");
        let text = reply["content"].as_str().unwrap_or_default();
        assert!(text.starts_with("storage full: disk"), "{text}");
    }
    let log = app.log();
    assert_eq!(
        log.matches("writes are refused until there is room")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("store failed"), "no line per message:\n{log}");
    assert_state(&app, true).await;

    // Reads go on, and a delete from the cloud applies.
    let first = app.client.query("edged", &acked[0]).await;
    assert_eq!(first.as_array().map(Vec::len), Some(1), "{first}");
    let deleted = acked[1].clone();
    let ack = app
        .client
        .request("edgehub", &message("delete", &deleted, Value::Null))
        .await;
    assert_eq!(ack["content"], "OK", "{ack}");

    // Room again on the disk, no write: the periodic check ends the state.
    std::fs::remove_file(&other).unwrap();
    readyz_becomes(&app, 200, CLEARS_WITHIN).await;
    assert_state(&app, false).await;
    assert!(app.log().contains("storage has room again"));
    a_write_goes_through(&mut app).await;

    app.kill9();
    let stored = stored_keys(&app);
    for key in acked.iter().filter(|k| **k != deleted) {
        assert!(stored.contains(key), "acked but not stored: {key}");
    }
    assert!(!stored.contains(&deleted));
    assert!(stored.contains("default/pod/after"));
    assert!(
        !stored.iter().any(|k| k.contains("flood")),
        "nothing refused was stored"
    );
}

/// The quota on an ordinary disk: writes past it are refused naming the quota and its
/// figures, an API write gets 507, deletes apply and make room at once, and the next write
/// goes through.
async fn the_quota_refuses_and_deletes_make_room(kind: BrokerKind) {
    let options = Options::new(kind).database("max_size: 1MiB");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    assert_eq!(
        metric(&app, "metamanager_store_quota_bytes").await,
        1_048_576.0
    );
    let (acked, refusal) = insert_until_refused(&mut app, 0).await;
    assert!(
        refusal.starts_with("storage full: quota database.max_size reached ("),
        "{refusal}"
    );
    assert!(refusal.contains("of 1.0 MiB in use"), "{refusal}");
    assert_state(&app, true).await;
    let configmap = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "new", "namespace": "default"}, "data": {"a": "b"}});
    let (code, _, body) = common::http_with(
        app.http_port,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        &configmap.to_string(),
    )
    .await;
    assert_eq!(code, 507, "{body}");
    assert!(body.contains("storage full: quota"), "{body}");

    for key in acked.iter().take(20) {
        let ack = app
            .client
            .request("edgehub", &message("delete", key, Value::Null))
            .await;
        assert_eq!(ack["content"], "OK", "{ack}");
    }
    assert_state(&app, false).await;
    a_write_goes_through(&mut app).await;
    let log = app.log();
    assert_eq!(log.matches("storage has room again").count(), 1, "{log}");
}

both_brokers!(
    a_full_disk_refuses_clearly_and_recovers_by_itself,
    the_quota_refuses_and_deletes_make_room,
);

/// Churn at the defaults: 3 000 pods written, then all deleted. Within a minute or two the
/// database files come back near what an empty store takes, as docs/guarantees.md's bound says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_churn_the_files_come_back_to_the_live_data() {
    let app = TestApp::embedded().await;
    let mut burst = Vec::new();
    for i in 0..3000 {
        let key = format!("default/pod/churn-{i:04}");
        burst.push(message("insert", &key, pod_named(&format!("churn-{i:04}"))));
    }
    for m in &burst {
        app.client.publish("edgehub", m).await;
    }
    app.client.wait_accepted(burst.len()).await;
    let count = |app: &TestApp| common::count_rows(app, "SELECT count(*) FROM meta");
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&app) < 3000 {
        assert!(Instant::now() < deadline, "stored {}", count(&app));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = files(&app);
    for i in 0..3000 {
        let key = format!("default/pod/churn-{i:04}");
        app.client
            .publish("edgehub", &message("delete", &key, Value::Null))
            .await;
    }
    app.client.wait_accepted(6000).await;
    while count(&app) > 0 {
        assert!(Instant::now() < deadline, "left {}", count(&app));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The history of changes and message ids stays bounded, and is what remains: well under
    // a tenth of the peak.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = files(&app);
        if now * 10 < peak {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "files {now} bytes, {peak} at the peak"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The database file and its write-ahead log, in bytes.
fn files(app: &TestApp) -> u64 {
    let db = app.db_path();
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    [db, wal.into()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}
