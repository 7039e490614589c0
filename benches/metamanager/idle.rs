//! What an idle node sends the cloud, and what the digest costs to read.
//!
//! Idle uplink: 100 pods and their statuses are stored, the cloud is connected, nothing
//! changes. MetaSync runs every second here (the default is 60 s), and the bytes published to
//! edgehub are counted per run and scaled to a day at the default settings. Bytes are each
//! publish's topic and payload, as in the reconnect figure (MQTT framing left out).
//!
//! Digest read: the digest is kept by the writer, so reading it costs one row per scope. It is
//! read here from a store of 10 objects and one of many, both in 10 scopes (made directly with
//! SQL, then counted once by opening it), and the two medians are compared.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::cloud::Cloud;
use crate::harness::{start_metamanager_with, Broker, Client};
use metamanager::store::{Store, StoreOptions};

pub const PODS: usize = 100;
const SECONDS_A_DAY: f64 = 86_400.0;
/// The defaults the figures are scaled to.
const DEFAULT_INTERVAL_S: f64 = 60.0;
const DEFAULT_FULL_INTERVAL_S: f64 = 12.0 * 3600.0;

/// One node's idle traffic, per MetaSync run.
pub struct Idle {
    /// Bytes of the first full run (statuses only), when the cloud connected.
    pub full_run: usize,
    /// Per periodic run: status bytes and digest bytes.
    pub statuses_per_run: f64,
    pub digest_per_run: f64,
    pub runs: usize,
}

/// The idle figures: `full_interval: 0` (every run full, as the seed did) and the default.
pub async fn run(port: u16, dir: &Path, pod: &str) -> [Idle; 2] {
    let every = once(port, dir, pod, "0").await;
    let default = once(port, dir, pod, "12h").await;
    [every, default]
}

async fn once(port: u16, dir: &Path, pod: &str, full_interval: &str) -> Idle {
    let node = format!("idle-{}", full_interval.replace(' ', ""));
    let db = dir.join(format!("{node}.db"));
    let extra = format!(
        "meta:\n  sync:\n    podstatus:\n      interval: 1\n      full_interval: {full_interval}\n"
    );
    let status = format!("edge/{node}/metamanager/status");
    let mut online = Client::connect(port, &format!("{node}-status"), &[&status]).await;
    let (_, mut mm) =
        start_metamanager_with(Broker::External(port), &node, &db, "NORMAL", dir, &extra);
    assert!(
        online
            .next_containing(&status, "\"online\"", Duration::from_secs(60))
            .await,
        "online"
    );
    let uplink = format!("edge/{node}/metamanager/to/edgehub");
    let mut watcher = Client::connect(port, &format!("{node}-uplink"), &[&uplink]).await;
    let mut cloud = Cloud::connect(port, "edge", &node).await;
    let template: Value = serde_json::from_str(pod).expect("pod fixture");
    let status = serde_json::from_str::<Value>(
        &std::fs::read_to_string(crate::fixture_path("podstatus.json")).expect("podstatus"),
    )
    .expect("podstatus fixture");
    let mut writes = Vec::new();
    for i in 0..PODS {
        let name = format!("pod-{i:03}");
        let mut p = template.clone();
        p["metadata"]["name"] = json!(name);
        let mut s = status.clone();
        s["Name"] = json!(name);
        writes.push(("insert", format!("default/pod/{name}"), p));
        writes.push(("insert", format!("default/podstatus/{name}"), s));
    }
    cloud.send_all(writes).await;
    while tokio::time::timeout(Duration::from_millis(200), watcher.received.recv())
        .await
        .is_ok()
    {}

    // Connecting: one full run, then a run a second.
    cloud.link_up().await;
    let mut full_run = 0;
    loop {
        let (topic, payload) = next(&mut watcher).await;
        let m: Value = serde_json::from_slice(&payload).unwrap_or_default();
        if is_status_sync(&m) {
            full_run += topic.len() + payload.len();
        }
        if m["route"]["operation"] == "digest" {
            break;
        }
    }
    // Idle: count whole runs (each ends with its digest) for a few seconds.
    let window = Duration::from_secs(6);
    let start = Instant::now();
    let (mut statuses, mut digests, mut runs) = (0usize, 0usize, 0usize);
    let (mut pending_statuses, mut pending_digest) = (0usize, 0usize);
    while start.elapsed() < window {
        let (topic, payload) = next(&mut watcher).await;
        let m: Value = serde_json::from_slice(&payload).unwrap_or_default();
        let bytes = topic.len() + payload.len();
        if is_status_sync(&m) {
            pending_statuses += bytes;
        } else if m["route"]["operation"] == "digest" {
            pending_digest += bytes;
            runs += 1;
            statuses += std::mem::take(&mut pending_statuses);
            digests += std::mem::take(&mut pending_digest);
        }
    }
    mm.stop(Duration::from_secs(30));
    let _ = std::fs::remove_file(&db);
    let runs_f = runs.max(1) as f64;
    Idle {
        full_run,
        statuses_per_run: statuses as f64 / runs_f,
        digest_per_run: digests as f64 / runs_f,
        runs,
    }
}

async fn next(watcher: &mut Client) -> (String, bytes::Bytes) {
    tokio::time::timeout(Duration::from_secs(30), watcher.received.recv())
        .await
        .expect("the node publishes in time")
        .expect("the connection is up")
}

/// MetaSync's `update` of a namespace's statuses.
fn is_status_sync(m: &Value) -> bool {
    m["route"]["operation"] == "update"
        && m["route"]["source"] == "metamanager"
        && m["route"]["resource"]
            .as_str()
            .is_some_and(|r| r.ends_with("/podstatus"))
}

/// The digest read from a store of `objects` objects: the median of 200 reads, and how long
/// the one-time counting took when the store was first opened.
pub async fn digest_read(dir: &Path, objects: usize) -> (Duration, Duration) {
    let db = dir.join(format!("digest-{objects}.db"));
    {
        let mut conn = crate::plain_db(&db, "OFF");
        let tx = conn.transaction().expect("tx");
        {
            let mut stmt = tx
                .prepare("INSERT INTO meta (key, type, value) VALUES (?1, 'configmap', ?2)")
                .expect("prepare");
            for i in 0..objects {
                // Ten scopes whatever the number of objects: a read costs one row per scope.
                let key = format!("ns-{:03}/configmap/obj-{i:07}", i % 10);
                let value = format!(r#"{{"metadata":{{"resourceVersion":"{i}"}}}}"#);
                stmt.execute((key, value)).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let opened = Instant::now();
    let store = Store::open(&db, StoreOptions::default()).expect("open the store");
    let counted = opened.elapsed();
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let digest = store.digest().await.expect("digest");
        times.push(t.elapsed());
        assert_eq!(
            digest.scopes.iter().map(|s| s.count).sum::<u64>(),
            objects as u64
        );
    }
    store.close().await;
    let _ = std::fs::remove_file(&db);
    times.sort();
    (times[times.len() / 2], counted)
}

pub fn print(idle: &[Idle; 2], small: (Duration, Duration), large: (usize, Duration, Duration)) {
    let [every, default] = idle;
    let runs_a_day = SECONDS_A_DAY / DEFAULT_INTERVAL_S;
    let fulls_a_day = SECONDS_A_DAY / DEFAULT_FULL_INTERVAL_S;
    let seed = every.statuses_per_run * runs_a_day;
    let zero = (every.statuses_per_run + every.digest_per_run) * runs_a_day;
    let new = (default.statuses_per_run + default.digest_per_run) * runs_a_day
        + default.full_run as f64 * fulls_a_day;
    println!("\n## Idle uplink, {PODS} pods with statuses, nothing changing\n");
    println!(
        "Measured with `interval: 1` ({} and {} runs), scaled to a day at the default interval of 60 s; topic + payload bytes.\n",
        every.runs, default.runs
    );
    println!("| MetaSync | bytes a run (statuses + digest) | full run | per day |");
    println!("|---|---:|---:|---:|");
    println!(
        "| seed: every status every run, no digest | {:.0} + 0 | {} | {:.0} KB |",
        every.statuses_per_run,
        every.full_run,
        seed / 1000.0
    );
    println!(
        "| `full_interval: 0` (every run full, with the digest) | {:.0} + {:.0} | {} | {:.0} KB |",
        every.statuses_per_run,
        every.digest_per_run,
        every.full_run,
        zero / 1000.0
    );
    println!(
        "| default (`full_interval: 12h`) | {:.0} + {:.0} | {} | **{:.0} KB** |",
        default.statuses_per_run,
        default.digest_per_run,
        default.full_run,
        new / 1000.0
    );
    let (objects, large_read, large_count) = large;
    println!("\n## Digest read (what publishing it costs the store)\n");
    println!("| objects stored | digest read p50 µs | one-time count at first open |");
    println!("|---:|---:|---:|");
    println!(
        "| 10 | {:.0} | {:.0} ms |",
        small.0.as_secs_f64() * 1e6,
        small.1.as_secs_f64() * 1e3
    );
    println!(
        "| {objects} | {:.0} | {:.1} s |",
        large_read.as_secs_f64() * 1e6,
        large_count.as_secs_f64()
    );
    println!(
        "\nratio {:.2} (target: the same cost)\n",
        large_read.as_secs_f64() / small.0.as_secs_f64().max(1e-9)
    );
}
