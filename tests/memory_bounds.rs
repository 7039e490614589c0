//! Memory stays bounded under the loads that once grew it without limit (issue 10), measured as
//! the real binary's resident set (`VmRSS`, and its peak `VmHWM`) from `/proc`:
//! - 300 updates of 1 MB configmaps with nobody watching: the change feed keeps no payloads;
//! - the same with 10 watchers that never read: each has a byte budget, and they share what
//!   they hold;
//! - 50 lists at once of a 10 MB store: a list holds one page, not the store.
//!
//! The edgehub side here subscribes to its own topic only: the forwards to edged (300 MB) have
//! no subscriber, so the embedded broker drops them instead of buffering them for this test.

mod common;

use std::time::{Duration, Instant};

use common::{fixture, BrokerKind, Options, TestApp, NODE};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;

/// `(VmRSS, VmHWM)` of `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let m = common::process::memory_kib(pid);
    assert!(m.rss_kib > 0, "MetaManager is running");
    (m.rss_kib * 1024, m.peak_kib * 1024)
}

/// A configmap of about 1 MB in 10 keys.
fn big_configmap(name: &str, version: usize) -> Value {
    let mut cm = fixture("configmap.json");
    let data: serde_json::Map<String, Value> = (0..10)
        .map(|k| {
            (
                format!("key{k}"),
                json!(format!("{version}:{}", "v".repeat(100_000))),
            )
        })
        .collect();
    cm["metadata"]["name"] = json!(name);
    cm["data"] = Value::Object(data);
    cm
}

/// Plays edgehub: publishes, and counts the acks on its own topic only.
struct Edgehub {
    client: AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Edgehub {
    async fn connect(port: u16) -> Self {
        let mut options = MqttOptions::new(
            format!("memory-{}", uuid::Uuid::new_v4()),
            "127.0.0.1",
            port,
        );
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let (tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, mut ready) = tokio::sync::mpsc::unbounded_channel();
        let subscriber = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = subscriber.try_subscribe(
                            format!("edge/{NODE}/metamanager/to/edgehub"),
                            QoS::AtLeastOnce,
                        );
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.payload.windows(4).any(|w| w == b"\"OK\"") && tx.send(()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) if tx.is_closed() => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(common::WAIT, ready.recv())
            .await
            .expect("subscribed");
        Self { client, acks }
    }

    /// Sends `n` updates of 1 MB configmaps over 10 keys, at most `window` unacknowledged, and
    /// waits for every ack.
    async fn update_configmaps(&mut self, n: usize, window: usize) {
        let mut acked = 0;
        let deadline = Instant::now() + Duration::from_secs(300);
        for i in 0..n {
            while i - acked >= window {
                self.next_ack(deadline).await;
                acked += 1;
            }
            let name = format!("big-{}", i % 10);
            let key = format!("default/configmap/{name}");
            self.send(&format!("u-{i}"), "update", &key, big_configmap(&name, i))
                .await;
        }
        while acked < n {
            self.next_ack(deadline).await;
            acked += 1;
        }
    }

    /// Publishes `operation` of `content` at `key` as edgehub, as message `id`.
    async fn send(&self, id: &str, operation: &str, key: &str, content: Value) {
        let message = json!({
            "header": {"msg_id": id},
            "route": {"source": "edgecontroller", "group": "resource", "operation": operation,
                      "resource": key},
            "content": content,
        });
        self.client
            .publish(
                format!("edge/{NODE}/edgehub/to/metamanager"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&message).unwrap(),
            )
            .await
            .unwrap();
    }

    async fn next_ack(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, self.acks.recv())
            .await
            .expect("acks keep coming")
            .expect("client running");
    }
}

fn pid(app: &TestApp) -> u32 {
    app.child.as_ref().unwrap().id()
}

/// Sends 300 updates of 1 MB configmaps as edgehub and returns `(RSS, peak)` once all are
/// acked; `what` names the case in the printed figures.
async fn after_300_updates(app: &TestApp, what: &str) -> (u64, u64) {
    let mut edgehub = Edgehub::connect(app.port).await;
    edgehub.update_configmaps(300, 8).await;
    let (rss, peak) = memory(pid(app));
    eprintln!(
        "{what}, 300 updates of 1 MB: RSS {} MiB, peak {} MiB",
        rss / MIB,
        peak / MIB
    );
    (rss, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_of_large_objects_with_nobody_watching_leave_memory_small() {
    let Some(app) = TestApp::spawn(Options::new(BrokerKind::Embedded)).await else {
        return;
    };
    let (rss, _) = after_300_updates(&app, "nobody watching").await;
    assert!(
        rss < 96 * MIB,
        "RSS {} MiB after 300 updates of 1 MB",
        rss / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_watchers_that_never_read_hold_a_bounded_amount() {
    let Some(app) = TestApp::spawn(Options::new(BrokerKind::Embedded)).await else {
        return;
    };
    let mut watchers = Vec::new();
    for _ in 0..10 {
        watchers.push(common::request_unread(app.http_port, "/api/v1/configmaps?watch=true").await);
    }
    let (_, peak) = after_300_updates(&app, "10 stuck watchers").await;
    assert!(
        peak < 128 * MIB,
        "peak RSS {} MiB with 10 stuck watchers",
        peak / MIB
    );
    drop(watchers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_lists_at_once_of_a_10_mb_store_hold_a_bounded_amount() {
    let Some(app) = TestApp::spawn(Options::new(BrokerKind::Embedded)).await else {
        return;
    };
    // 100 configmaps of 100 KB: a 10 MB store.
    let mut edgehub = Edgehub::connect(app.port).await;
    for i in 0..100 {
        let mut cm = fixture("configmap.json");
        let name = format!("cm-{i:03}");
        cm["metadata"]["name"] = json!(name);
        cm["data"] = json!({"blob": "d".repeat(100_000)});
        let key = format!("default/configmap/{name}");
        edgehub.send(&format!("i-{i}"), "insert", &key, cm).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..100 {
        edgehub.next_ack(deadline).await;
    }
    let (before, _) = memory(pid(&app));

    let port = app.http_port;
    let lists: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                stream
                    .write_all(b"GET /api/v1/configmaps HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut raw = Vec::new();
                stream.read_to_end(&mut raw).await.unwrap();
                raw
            })
        })
        .collect();
    let mut peak_seen = 0;
    let mut answers = Vec::new();
    for list in lists {
        while !list.is_finished() {
            peak_seen = peak_seen.max(memory(pid(&app)).0);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        answers.push(list.await.unwrap());
    }
    let (_, peak) = memory(pid(&app));
    eprintln!(
        "50 lists of a 10 MB store: RSS before {} MiB, highest seen {} MiB, peak {} MiB",
        before / MIB,
        peak_seen / MIB,
        peak / MIB
    );
    for raw in &answers {
        let text = String::from_utf8_lossy(raw);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{}",
            &text[..text.len().min(300)]
        );
        let body = common::dechunk(text.split_once("\r\n\r\n").unwrap().1);
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            list["items"].as_array().unwrap().len(),
            100,
            "every list is whole"
        );
    }
    assert!(
        peak < 128 * MIB,
        "peak RSS {} MiB during 50 lists",
        peak / MIB
    );
}
