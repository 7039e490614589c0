//! Reconnect after an outage: 10 000 pods are stored, and while the link was down the cloud
//! changed 100 of them and deleted 20. Two clouds bring the node back in line, each played by
//! [`Cloud`]: one resends everything it has (and the deletes it remembers), the other compares
//! the node's digest with its own, reads the versions of the scopes that differ, and sends only
//! the changes. The figures are the bytes that cross the link, both directions, and the time
//! from the link coming up until the node holds what the cloud holds.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::cloud::Cloud;
use crate::harness::{start_metamanager, Broker, Client};
use metamanager::store::{Store, StoreOptions, Write};

pub const PODS: usize = 10_000;
pub const CHANGED: usize = 100;
pub const DELETED: usize = 20;

/// One way of reconnecting, measured.
pub struct Run {
    pub way: &'static str,
    pub bytes_out: usize,
    pub bytes_in: usize,
    pub took: Duration,
    /// The node's digest equals the cloud's afterwards.
    pub agrees: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Resend,
    Digest,
}

/// Both ways, on the bench's mosquitto on `port`.
pub async fn run(port: u16, dir: &Path, pod: &str) -> [Run; 2] {
    let resend = once(port, dir, pod, Way::Resend).await;
    let digest = once(port, dir, pod, Way::Digest).await;
    [resend, digest]
}

fn pod_object(template: &Value, i: usize, rv: u64) -> Value {
    let mut pod = template.clone();
    pod["metadata"]["name"] = Value::String(format!("pod-{i:05}"));
    pod["metadata"]["namespace"] = Value::String("default".into());
    pod["metadata"]["uid"] = Value::String(format!("uid-{i:05}"));
    pod["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    pod
}

async fn once(port: u16, dir: &Path, pod: &str, way: Way) -> Run {
    let name = match way {
        Way::Resend => "resend",
        Way::Digest => "digest",
    };
    let node = format!("reconnect-{name}");
    let template: Value = serde_json::from_str(pod).expect("pod fixture");
    // What the node held when the link went down: written through the store, so that the
    // database is what MetaManager itself would have made of it.
    let db = dir.join(format!("{node}.db"));
    let _ = std::fs::remove_file(&db);
    {
        let store = Store::open(&db, StoreOptions::default()).expect("bench store");
        let mut pending = Vec::with_capacity(PODS);
        for i in 0..PODS {
            let write = Write::Put {
                key: format!("default/pod/pod-{i:05}"),
                rtype: "pod".into(),
                value: pod_object(&template, i, 1).to_string().into(),
            };
            pending.push(store.submit(write).await.expect("queued"));
        }
        for p in pending {
            p.await.expect("committed").expect("stored");
        }
        store.close().await;
    }
    let status = format!("edge/{node}/metamanager/status");
    let mut watcher = Client::connect(port, &format!("{node}-status"), &[status.as_str()]).await;
    let (_, mut mm) = start_metamanager(Broker::External(port), &node, &db, "FULL", dir);
    assert!(
        watcher
            .next_containing(&status, "\"online\"", Duration::from_secs(30))
            .await,
        "MetaManager came online"
    );
    let mut cloud = Cloud::connect(port, "edge", &node).await;
    // What the cloud holds after the outage.
    for i in 0..PODS {
        let key = format!("default/pod/pod-{i:05}");
        cloud.objects.insert(key, pod_object(&template, i, 1));
    }
    let mut deleted = Vec::new();
    for i in 0..CHANGED + DELETED {
        // Spread over the scope rather than bunched at one end.
        let at = i * (PODS / (CHANGED + DELETED));
        let key = format!("default/pod/pod-{at:05}");
        if i < CHANGED {
            let mut changed = pod_object(&template, at, 2);
            changed["metadata"]["labels"]["changed"] = Value::String("while-away".into());
            cloud.objects.insert(key, changed);
        } else {
            cloud.objects.remove(&key);
            deleted.push(key);
        }
    }

    cloud.reset_bytes();
    let started = Instant::now();
    cloud.link_up().await;
    match way {
        Way::Resend => cloud.resend_all(&deleted).await,
        Way::Digest => {
            let done = cloud.reconcile().await;
            assert_eq!((done.sent, done.deleted), (CHANGED, DELETED));
        }
    }
    let took = started.elapsed();
    let (bytes_out, bytes_in) = (cloud.bytes_out, cloud.bytes_in);
    let agrees = cloud.agrees().await;
    mm.terminate();
    Run {
        way: name,
        bytes_out,
        bytes_in,
        took,
        agrees,
    }
}

/// The report's section.
pub fn print(runs: &[Run; 2]) {
    println!(
        "\n## Reconnect after an outage ({PODS} pods stored; while the link was down the cloud changed {CHANGED} and deleted {DELETED})\n"
    );
    println!("| cloud | bytes to the node | bytes from the node | both | ÷ resend | until the node agrees ms | agrees |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    let resend = (runs[0].bytes_out + runs[0].bytes_in) as f64;
    for run in runs {
        let both = run.bytes_out + run.bytes_in;
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.0} | {} |",
            match run.way {
                "resend" => "resends every object (updates) and the deletes it remembers",
                _ => "digest, versions of the differing scope, single changes",
            },
            run.bytes_out,
            run.bytes_in,
            both,
            both as f64 / resend,
            run.took.as_secs_f64() * 1e3,
            if run.agrees { "yes" } else { "no" }
        );
    }
    let ratio = (runs[1].bytes_out + runs[1].bytes_in) as f64 / resend;
    println!(
        "\nbytes are MQTT topic and payload bytes, both directions, from the link coming up until the last answer; target: the digest path ≤ 5 % of the resend's bytes ({})\n",
        if ratio <= 0.05 && runs.iter().all(|r| r.agrees) {
            "met"
        } else {
            "NOT MET"
        }
    );
}
