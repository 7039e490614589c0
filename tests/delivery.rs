//! Delivery guarantees, proven by breaking things for real: SIGKILL of MetaManager in the
//! middle of a stream, SIGKILL and restart of mosquitto, redeliveries, the outbox across a
//! restart, a failing database, and a stalled store under a burst.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::scenarios::{self, pod_named, processed_rows, stored_keys};
use common::{count_rows, fixture, message, msg_id, BrokerKind, Options, TestApp};
use serde_json::{json, Value};

/// How often a message with `id` went to edged among `seen`.
fn forwards_to_edged(seen: &[(String, Value)], id: &str) -> usize {
    seen.iter()
        .filter(|(t, v)| t == "metamanager/to/edged" && v["header"]["msg_id"] == id)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acked_and_nothing_accepted() {
    scenarios::sigkill_mid_stream_loses_nothing_acked_and_nothing_accepted(BrokerKind::Mosquitto)
        .await;
}

/// The broker dies without warning and comes back on the same port with no memory of the
/// session: MetaManager reconnects with backoff, resubscribes and is online again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_mosquitto_sigkill_and_restart() {
    let Some(binary) = common::mosquitto_binary() else {
        return;
    };
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Mosquitto)).await else {
        return;
    };
    let port = app.port;
    app.mosquitto.as_mut().unwrap().kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        app.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "still running"
    );
    let down_since = Instant::now();
    app.mosquitto = Some(common::Mosquitto::start_on(&binary, port).expect("mosquitto restarts"));

    let mut watcher = common::Peer::connect(port).await;
    watcher
        .wait_for("metamanager/status", |v| v["state"] == "online")
        .await;
    assert!(
        down_since.elapsed() < Duration::from_secs(10),
        "reconnected within seconds of the broker's return"
    );
    let insert = fixture("insert-pod.message.json");
    let ack = watcher.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK", "resubscribed and working");
    let log = app.log();
    let attempts = log.matches("cannot connect to MQTT broker").count();
    assert!(
        (1..=12).contains(&attempts),
        "reconnects back off instead of spinning: {attempts} attempts"
    );
}

/// The same message twice (a redelivery): applied once, forwarded once, acked both times.
async fn duplicate_delivery_is_applied_once(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let key = "default/pod/nginx-7d9c5b8f4-x2k9p";
    let insert = fixture("insert-pod.message.json");
    app.client.request("edgehub", &insert).await;
    let mut newer_pod = fixture("pod.json");
    newer_pod["status"]["phase"] = json!("Running");
    let update = message("update", key, newer_pod.clone());
    app.client.request("edgehub", &update).await;

    // The insert comes again, late: it must not roll the pod back.
    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK", "a redelivery is still acked");
    assert_eq!(app.client.query("edged", key).await, json!([newer_pod]));
    let seen = app.client.drain(Duration::from_millis(300)).await;
    let forwards = seen
        .iter()
        .filter(|(t, v)| t == "metamanager/to/edged" && v["header"]["msg_id"] == msg_id(&insert))
        .count();
    assert_eq!(forwards, 1, "forwarded at most once: {seen:#?}");

    // The window is durable: after a restart the old insert is still recognised.
    app.restart().await;
    app.client.request("edgehub", &insert).await;
    assert_eq!(app.client.query("edged", key).await, json!([newer_pod]));
}

/// A redelivery of a message that needed nothing passed on (an update that changed nothing,
/// or a change already waiting in the outbox) passes nothing on, even after a restart.
async fn redelivery_of_a_settled_message_passes_nothing_on(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let key = "default/configmap/app-config";
    let first = message("update", key, fixture("configmap.json"));
    let same = message("update", key, fixture("configmap.json"));
    let queued = message("insert", "default/pod/edge-made", pod_named("edge-made"));
    for (peer, m) in [("edgehub", &first), ("edgehub", &same), ("edged", &queued)] {
        app.client.publish(peer, m).await;
        let topic = format!("metamanager/to/{peer}");
        app.client.reply_to(&topic, msg_id(m)).await;
    }
    app.restart().await;
    for (peer, m) in [("edgehub", &same), ("edged", &queued)] {
        app.client.publish(peer, m).await;
        let topic = format!("metamanager/to/{peer}");
        let ack = app.client.reply_to(&topic, msg_id(m)).await;
        assert_eq!(ack["content"], "OK");
    }
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen
            .iter()
            .any(|(_, v)| v["header"]["msg_id"] == msg_id(&same)),
        "a no-op update is not forwarded on redelivery: {seen:#?}"
    );
    assert_eq!(
        count_rows(&app, "SELECT count(*) FROM outbox"),
        1,
        "queued once"
    );
    app.set_cloud(true).await;
    app.client
        .wait_for("metamanager/to/edgehub", |v| {
            v["header"]["msg_id"] == msg_id(&queued)
        })
        .await;
    let seen = app.client.drain(Duration::from_millis(500)).await;
    assert!(
        !seen
            .iter()
            .any(|(_, v)| v["header"]["msg_id"] == msg_id(&queued)),
        "sent to the cloud once: {seen:#?}"
    );
}

/// The resurrection case: a pod inserted and then deleted, and after a restart the insert comes
/// again with its msg_id (a broker redelivery or a cloud retry). It is acked, not passed on,
/// and the pod stays gone: edged must not start a pod the store says is deleted.
async fn redelivered_insert_does_not_resurrect_a_deleted_pod(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let key = "default/pod/nginx-7d9c5b8f4-x2k9p";
    let insert = fixture("insert-pod.message.json");
    let delete = message("delete", key, fixture("pod.json"));
    for m in [&insert, &delete] {
        app.client.publish("edgehub", m).await;
        let ack = app
            .client
            .reply_to("metamanager/to/edgehub", msg_id(m))
            .await;
        assert_eq!(ack["content"], "OK");
        app.client
            .wait_for("metamanager/to/edged", |v| {
                v["header"]["msg_id"] == msg_id(m)
            })
            .await;
    }
    app.restart().await;

    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK", "a redelivery is acked");
    assert_eq!(app.client.query("edged", key).await, json!([]));
    let seen = app.client.drain(Duration::from_millis(500)).await;
    assert_eq!(
        forwards_to_edged(&seen, msg_id(&insert)),
        0,
        "the deleted pod was sent to edged again: {seen:#?}"
    );

    // After a crash that came before the forwards were recorded as settled (what a kill -9
    // leaves), the ids count as possibly unforwarded: the insert is checked against the
    // stored state and found superseded.
    let status = app.terminate();
    assert!(status.success(), "exit status {status}");
    rusqlite::Connection::open(app.db_path())
        .unwrap()
        .execute("UPDATE processed SET settled = 0", [])
        .unwrap();
    app.start().await;
    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK");
    let seen = app.client.drain(Duration::from_millis(500)).await;
    assert_eq!(
        forwards_to_edged(&seen, msg_id(&insert)),
        0,
        "the deleted pod was sent to edged again: {seen:#?}"
    );
    assert!(app.log().contains("superseded by a later change"));
    assert!(!stored_keys(&app).contains(key));
}

/// An insert superseded by an update: its redelivery after a restart does not roll edged back.
async fn redelivered_insert_does_not_undo_a_later_update(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let key = "default/configmap/app-config";
    let x = fixture("configmap.json");
    let mut y = x.clone();
    y["data"] = json!({"mode": "updated"});
    let insert = message("insert", key, x);
    let update = message("update", key, y.clone());
    for m in [&insert, &update] {
        app.client.publish("edgehub", m).await;
        app.client
            .reply_to("metamanager/to/edgehub", msg_id(m))
            .await;
    }
    app.restart().await;

    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK");
    assert_eq!(app.client.query("edged", key).await, json!([y]));
    let seen = app.client.drain(Duration::from_millis(500)).await;
    assert_eq!(
        forwards_to_edged(&seen, msg_id(&insert)),
        0,
        "the superseded insert was passed on: {seen:#?}"
    );
}

/// After a clean stop, every message that was passed on is recorded as settled, whichever
/// path passed it on: forwards to edged, a direct send to the cloud, relayed responses.
async fn clean_stop_leaves_every_forwarded_message_settled(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    app.set_cloud(true).await;
    let pod = "default/pod/nginx-7d9c5b8f4-x2k9p";
    let mut running = fixture("pod.json");
    running["status"]["phase"] = json!("Running");
    let sent = [
        ("edgehub", fixture("insert-pod.message.json")),
        ("edgehub", message("update", pod, running)),
        (
            "edged",
            message("insert", "default/pod/edge-made", pod_named("edge-made")),
        ),
        (
            "edged",
            message("response", "default/configmap/c", json!({"a": 1})),
        ),
        (
            "edgehub",
            message("response", "default/configmap/c", json!("unasked")),
        ),
        ("edgehub", message("delete", pod, fixture("pod.json"))),
    ];
    for (peer, m) in &sent {
        app.client.publish(peer, m).await;
    }
    // Everything was passed on before the stop.
    for (peer, m) in &sent {
        let to = if *peer == "edgehub" {
            "edged"
        } else {
            "edgehub"
        };
        app.client
            .wait_for(&format!("metamanager/to/{to}"), |v| {
                v["header"]["msg_id"] == msg_id(m)
            })
            .await;
    }
    let status = app.terminate();
    assert!(status.success(), "exit status {status}");
    let rows = processed_rows(&app);
    let ids: HashSet<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    for (_, m) in &sent {
        assert!(ids.contains(msg_id(m)), "{} not recorded", msg_id(m));
    }
    let unsettled: Vec<_> = rows.iter().filter(|(_, s)| !s).collect();
    assert!(
        unsettled.is_empty(),
        "unsettled after a clean stop: {unsettled:?}"
    );
}

/// The crash case: a change committed whose forward was cut off (the process died between the
/// commit and the forward, so its id is recorded unsettled). Its redelivery, still the stored
/// state, is passed on, once; after that it is settled.
async fn redelivery_after_a_lost_forward_is_passed_on_while_current(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let key = "default/pod/nginx-7d9c5b8f4-x2k9p";
    let insert = fixture("insert-pod.message.json");
    app.client.request("edgehub", &insert).await;
    let status = app.terminate();
    assert!(status.success(), "exit status {status}");
    // What a crash between commit and forward leaves on disk: the id, not settled.
    rusqlite::Connection::open(app.db_path())
        .unwrap()
        .execute(
            "UPDATE processed SET settled = 0 WHERE msg_id = ?1",
            [msg_id(&insert)],
        )
        .unwrap();
    app.start().await;

    app.client.publish("edgehub", &insert).await;
    let forwarded = app
        .client
        .wait_for("metamanager/to/edged", |v| {
            v["header"]["msg_id"] == msg_id(&insert)
        })
        .await;
    assert_eq!(forwarded, insert, "passed on unchanged");
    let ack = app
        .client
        .reply_to("metamanager/to/edgehub", msg_id(&insert))
        .await;
    assert_eq!(ack["content"], "OK");
    assert_eq!(stored_keys(&app).len(), 1, "not stored twice");
    assert!(stored_keys(&app).contains(key));

    // Now it is settled: another copy after a restart is only acked.
    app.restart().await;
    app.client.request("edgehub", &insert).await;
    let seen = app.client.drain(Duration::from_millis(500)).await;
    assert_eq!(forwards_to_edged(&seen, msg_id(&insert)), 0, "{seen:#?}");
}

/// Edge changes made while the cloud is away wait in the outbox, survive a restart, and go
/// out in order when the cloud is back, with repeated updates of one resource coalesced.
async fn outbox_survives_restart_and_drains_in_order(kind: BrokerKind) {
    let options = Options::new(kind).yaml("outbox:\n  drain_rate: 50\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let status_key = "default/podstatus/nginx-7d9c5b8f4-x2k9p";
    let mut sent = Vec::new();
    let first = message("insert", "default/pod/edge-made", pod_named("edge-made"));
    sent.push(first.clone());
    let mut last_status = Value::Null;
    for phase in ["Pending", "ContainerCreating", "Running"] {
        let mut status = fixture("podstatus.json");
        status["Status"]["phase"] = json!(phase);
        let update = message("update", status_key, status);
        last_status = update.clone();
        sent.push(update);
    }
    let delete = message("delete", "default/pod/edge-made", Value::Null);
    sent.push(delete.clone());
    for m in &sent {
        app.client.publish("edged", m).await;
        let ack = app.client.reply_to("metamanager/to/edged", msg_id(m)).await;
        assert_eq!(
            ack["content"], "OK",
            "acked to edged while the cloud is away"
        );
    }
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen.iter().any(|(t, _)| t == "metamanager/to/edgehub"),
        "nothing goes to edgehub while the cloud is disconnected: {seen:#?}"
    );
    assert_eq!(count_rows(&app, "SELECT count(*) FROM outbox"), 3);

    app.restart().await;
    app.set_cloud(true).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = app
            .client
            .wait_for("metamanager/to/edgehub", |v| {
                v["route"]["source"] != "metamanager"
            })
            .await;
        got.push(m);
    }
    assert_eq!(
        got,
        vec![first, last_status, delete],
        "in order, updates coalesced"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_rows(&app, "SELECT count(*) FROM outbox") > 0 {
        assert!(Instant::now() < deadline, "outbox emptied after sending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The outbox is bounded by count and age; what it drops is logged.
async fn outbox_bounds_drop_oldest_and_expired(kind: BrokerKind) {
    let options = Options::new(kind).yaml("outbox:\n  max_messages: 3\n  max_age: 1s\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let mut inserts = Vec::new();
    for i in 0..5 {
        let name = format!("edge-{i}");
        let m = message("insert", &format!("default/pod/{name}"), pod_named(&name));
        app.client.request("edged", &m).await;
        inserts.push(m);
    }
    assert_eq!(
        count_rows(&app, "SELECT count(*) FROM outbox"),
        3,
        "bounded by count"
    );
    assert!(app.log().contains("outbox full"), "drops are logged");

    // Older than max_age by the time the cloud is back: dropped, not sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = message("insert", "default/pod/fresh", pod_named("fresh"));
    app.client.request("edged", &fresh).await;
    app.set_cloud(true).await;
    let sent = app
        .client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["source"] != "metamanager"
        })
        .await;
    assert_eq!(sent, fresh, "only the fresh message is sent");
    let seen = app.client.drain(Duration::from_millis(500)).await;
    assert!(
        !seen
            .iter()
            .any(|(t, v)| t == "metamanager/to/edgehub" && v["route"]["source"] == "test"),
        "expired messages are not sent: {seen:#?}"
    );
    assert!(app.log().contains("older than outbox.max_age dropped"));
}

/// Paced: a backlog goes out at the configured rate, not all at once.
async fn outbox_drain_is_paced(kind: BrokerKind) {
    let options = Options::new(kind).yaml("outbox:\n  drain_rate: 20\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let mut last = String::new();
    for i in 0..30 {
        let name = format!("paced-{i}");
        let m = message("insert", &format!("default/pod/{name}"), pod_named(&name));
        last = msg_id(&m).to_owned();
        app.client.publish("edged", &m).await;
    }
    app.client.reply_to("metamanager/to/edged", &last).await;
    let start = Instant::now();
    app.set_cloud(true).await;
    app.client
        .wait_for("metamanager/to/edgehub", |v| {
            v["header"]["msg_id"] == last.as_str()
        })
        .await;
    // 30 messages at 20 per second cannot all be out in under a second.
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// A write that fails in SQLite gets an error reply, no ack, and the process goes on.
async fn database_failure_gets_an_error_not_an_ack(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let conn = rusqlite::Connection::open(app.db_path()).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER disk_full BEFORE INSERT ON meta
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
    )
    .unwrap();
    let insert = fixture("insert-pod.message.json");
    let reply = app.client.request("edgehub", &insert).await;
    assert_eq!(reply["route"]["operation"], "error", "{reply}");
    assert!(reply["content"].as_str().unwrap().contains("disk is full"));
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen.iter().any(|(t, _)| t == "metamanager/to/edged"),
        "nothing forwarded that was not stored: {seen:#?}"
    );

    // The disk is freed: the cloud sends again (same msg_id) and it is stored, once.
    conn.execute_batch("DROP TRIGGER disk_full").unwrap();
    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK");
    app.client
        .wait_for("metamanager/to/edged", |v| {
            v["header"]["msg_id"] == msg_id(&insert)
        })
        .await;
}

/// More messages than the inbound budget holds, while the store is stalled: MetaManager stops
/// reading, the broker holds the rest, and once the store moves again every message is handled
/// and acked. None is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_slows_the_sender_and_refuses_nothing() {
    let options = Options::new(BrokerKind::Mosquitto).inflight(8);
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    // Stall the writer: another connection holds the write lock for a while.
    let conn = rusqlite::Connection::open(app.db_path()).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    const N: usize = 500;
    for i in 0..N {
        let m = message(
            "update",
            &format!("default/configmap/c{i}"),
            json!({"i": i}),
        );
        app.client.publish("edged", &m).await;
    }
    // The broker took all of them while MetaManager was stalled.
    app.client.wait_accepted(N).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let early = app
        .client
        .drain(Duration::from_millis(100))
        .await
        .into_iter()
        .filter(|(t, _)| t == "metamanager/to/edged")
        .count();
    assert!(
        early < N,
        "the store was stalled; {early} replies came anyway"
    );
    conn.execute_batch("COMMIT").unwrap();
    drop(conn);

    // The replies that came during the stall count too.
    let mut acked = early;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < N {
        assert!(Instant::now() < deadline, "{acked} of {N} acked");
        let Ok(Some((topic, reply))) =
            tokio::time::timeout(Duration::from_secs(1), app.client.next()).await
        else {
            continue;
        };
        if topic != "metamanager/to/edged" {
            continue;
        }
        assert_eq!(reply["route"]["operation"], "response", "{reply}");
        acked += 1;
    }
    assert!(!app.log().contains("overloaded"));
    let q = message("query", "default/configmap/c499", Value::Null);
    let reply = app.client.request("edged", &q).await;
    assert_eq!(reply["content"][0]["i"], 499);
}

/// Publishes `lines` (one JSON message a line) as edgehub with `mosquitto_pub -l`, as fast as
/// it reads them, QoS 1; `false` when the mosquitto clients are missing.
fn publish_lines_as_edgehub(port: u16, lines: &[Value]) -> bool {
    use std::io::Write;
    if !common::mosquitto_clients() {
        return false;
    }
    let mut publisher = std::process::Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-q", "1", "-l"])
        .args([
            "-t",
            &format!("edge/{}/edgehub/to/metamanager", common::NODE),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    for line in lines {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    assert!(publisher.wait().unwrap().success());
    true
}

/// Everything MetaManager publishes until `done` holds for what was collected (or the wait
/// runs out), then whatever else comes within a quiet moment.
async fn collect_until(
    app: &mut TestApp,
    done: impl Fn(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !done(&seen) && Instant::now() < deadline {
        seen.extend(app.client.drain(Duration::from_millis(200)).await);
    }
    seen.extend(app.client.drain(Duration::from_millis(500)).await);
    seen
}

/// How many acks (`response` "OK") edgehub got for `id`.
fn acks_to_edgehub(seen: &[(String, Value)], id: &str) -> usize {
    seen.iter()
        .filter(|(t, v)| {
            t == "metamanager/to/edgehub"
                && v["header"]["parent_msg_id"] == id
                && v["content"] == "OK"
        })
        .count()
}

/// Three copies of one insert published back to back (`mosquitto_pub -l`): the later copies
/// arrive before the first one's forward is acknowledged by the broker. Stored once, forwarded
/// to edged once, every copy acked.
async fn three_copies_back_to_back_are_forwarded_once_and_acked_thrice(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let insert = fixture("insert-pod.message.json");
    let id = msg_id(&insert).to_owned();
    if !publish_lines_as_edgehub(app.port, &[insert.clone(), insert.clone(), insert.clone()]) {
        return;
    }
    let seen = collect_until(&mut app, |seen| acks_to_edgehub(seen, &id) >= 3).await;
    assert_eq!(
        acks_to_edgehub(&seen, &id),
        3,
        "every copy acked: {seen:#?}"
    );
    assert_eq!(forwards_to_edged(&seen, &id), 1, "{seen:#?}");
    assert_eq!(count_rows(&app, "SELECT count(*) FROM meta"), 1);
}

/// 100 copies of one insert among 100 other inserts, alternating, in one stream: the copy is
/// forwarded once, every other insert once, and every message is acked.
async fn a_hundred_copies_among_other_traffic_are_forwarded_once(kind: BrokerKind) {
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let repeated = fixture("insert-pod.message.json");
    let id = msg_id(&repeated).to_owned();
    let others: Vec<Value> = (0..100)
        .map(|i| {
            let name = format!("other-{i:03}");
            message("insert", &format!("default/pod/{name}"), pod_named(&name))
        })
        .collect();
    let lines: Vec<Value> = others
        .iter()
        .flat_map(|other| [repeated.clone(), other.clone()])
        .collect();
    if !publish_lines_as_edgehub(app.port, &lines) {
        return;
    }
    let other_ids: Vec<String> = others.iter().map(|m| msg_id(m).to_owned()).collect();
    let seen = collect_until(&mut app, |seen| {
        acks_to_edgehub(seen, &id) >= 100 && other_ids.iter().all(|o| acks_to_edgehub(seen, o) == 1)
    })
    .await;
    assert_eq!(acks_to_edgehub(&seen, &id), 100, "every copy acked");
    assert_eq!(forwards_to_edged(&seen, &id), 1, "the copy forwarded once");
    for other in &other_ids {
        assert_eq!(acks_to_edgehub(&seen, other), 1, "{other} acked");
        assert_eq!(forwards_to_edged(&seen, other), 1, "{other} forwarded once");
    }
    assert_eq!(count_rows(&app, "SELECT count(*) FROM meta"), 101);
}

both_brokers!(
    three_copies_back_to_back_are_forwarded_once_and_acked_thrice,
    a_hundred_copies_among_other_traffic_are_forwarded_once,
    duplicate_delivery_is_applied_once,
    redelivery_of_a_settled_message_passes_nothing_on,
    redelivered_insert_does_not_resurrect_a_deleted_pod,
    redelivered_insert_does_not_undo_a_later_update,
    clean_stop_leaves_every_forwarded_message_settled,
    redelivery_after_a_lost_forward_is_passed_on_while_current,
    outbox_survives_restart_and_drains_in_order,
    outbox_bounds_drop_oldest_and_expired,
    outbox_drain_is_paced,
    database_failure_gets_an_error_not_an_ack,
);

/// A message over the size limit is answered and dropped: it never drops the connection and
/// comes back again and again (a disconnect-redeliver loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_without_a_reconnect_loop() {
    let mut options = Options::new(BrokerKind::Mosquitto);
    options.max_payload_bytes = 64 * 1024;
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let huge = message(
        "insert",
        "default/configmap/huge",
        json!({"data": {"blob": "x".repeat(512 * 1024)}}),
    );
    let error = app.client.request("edgehub", &huge).await;
    assert_eq!(error["route"]["operation"], "error");
    assert!(error["content"].as_str().unwrap().contains("limit"));

    let insert = fixture("insert-pod.message.json");
    app.client.request("edgehub", &insert).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = app.log();
    assert!(!log.contains("lost MQTT broker connection"), "{log}");
    // Once each: the receiving and the sending connection.
    assert_eq!(log.matches("connected to MQTT broker").count(), 2, "{log}");
    assert_eq!(
        count_rows(
            &app,
            "SELECT count(*) FROM meta WHERE key = 'default/configmap/huge'"
        ),
        0
    );
}

/// A real full disk: the database lives on a small tmpfs. Writes that do not fit get an error
/// reply, what was acked is stored, and the process keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gets_errors_and_keeps_every_ack_honest() {
    let Some(disk) = common::process::Tmpfs::mount("1m") else {
        return;
    };
    let db = disk.path().join("meta.db");
    let options = Options::new(BrokerKind::Embedded);
    let Some(mut app) = TestApp::spawn_with_db(options, db.clone()).await else {
        return;
    };

    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..2000 {
        let name = format!("fill-{i:04}");
        let key = format!("default/pod/{name}");
        let m = message("insert", &key, pod_named(&name));
        let reply = app.client.request("edgehub", &m).await;
        if reply["route"]["operation"] == "error" {
            failure = Some(reply["content"].as_str().unwrap().to_owned());
            break;
        }
        acked.push(key);
    }
    let failure = failure.expect("a 1 MiB disk filled up");
    assert!(failure.starts_with("storage full: disk"), "{failure}");
    assert!(!acked.is_empty());
    // Still answering, from what is stored, and every acked insert is there.
    let first = app.client.query("edged", &acked[0]).await;
    assert_eq!(first.as_array().map(Vec::len), Some(1));
    app.kill9();
    let stored = stored_keys(&app);
    for key in &acked {
        assert!(stored.contains(key), "acked but not stored: {key}");
    }
}
