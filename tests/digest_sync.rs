//! The link to the cloud, against the real binary on both brokers: the digest is the hash the
//! contract defines (computed here from the objects the test sent), and MetaSync sends only
//! what changed, the full list when the cloud connects, on request and every `full_interval`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{fixture, message, msg_id, BrokerKind, Options, TestApp};
use serde_json::{json, Value};

/// The digest of `objects` (key → resourceVersion, `""` for none), computed here as topics.md
/// defines it: per scope, the count, and the sum modulo 2^64 of the first 8 bytes (big-endian)
/// of SHA-256(key + "\n" + rv), as 16 hex digits.
fn expected_digest(objects: &BTreeMap<String, String>) -> Value {
    let mut scopes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (key, rv) in objects {
        let sum = ring::digest::digest(&ring::digest::SHA256, format!("{key}\n{rv}").as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&sum.as_ref()[..8]);
        let scope = key.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
        let entry = scopes.entry(scope).or_default();
        entry.0 += 1;
        entry.1 = entry.1.wrapping_add(u64::from_be_bytes(first));
    }
    scopes
        .into_iter()
        .map(|(scope, (count, hash))| {
            (
                scope,
                json!({"count": count, "hash": format!("{hash:016x}")}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn object(name: &str, rv: Option<&str>) -> Value {
    let mut metadata = json!({"name": name});
    if let Some(rv) = rv {
        metadata["resourceVersion"] = json!(rv);
    }
    json!({"metadata": metadata, "data": {"n": name}})
}

async fn next_digest(app: &mut TestApp) -> Value {
    app.client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["operation"] == "digest"
        })
        .await
}

/// Objects sent as the cloud in several scopes, with and without resourceVersions, then
/// updated and deleted: the digest that comes when the cloud connects, and again with a
/// MetaSync run, is the one computed here from what was sent.
async fn the_digest_is_the_hash_of_the_objects_sent(kind: BrokerKind) {
    let options = Options::new(kind).yaml("meta:\n  sync:\n    podstatus:\n      interval: 1h\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |op: &str, key: &str, rv: Option<&str>| {
        sent.insert(key.to_owned(), rv.unwrap_or("").to_owned());
        let name = key.rsplit('/').next().unwrap_or_default();
        message(op, key, object(name, rv))
    };
    let mut messages = Vec::new();
    for i in 0..20 {
        messages.push(put(
            "insert",
            &format!("default/pod/p{i:02}"),
            Some(&format!("{}", 100 + i)),
        ));
    }
    for i in 0..5 {
        messages.push(put(
            "insert",
            &format!("kube-system/configmap/c{i}"),
            Some("7"),
        ));
    }
    messages.push(put("insert", "default/secret/no-version", None));
    messages.push(put("update", "default/pod/p03", Some("500")));
    messages.push(put("insert", "default/pod/p04", Some("501")));
    for m in &messages {
        let ack = app.client.request("edgehub", m).await;
        assert_eq!(ack["content"], "OK", "{ack}");
    }
    for key in ["default/pod/p05", "kube-system/configmap/c1"] {
        sent.remove(key);
        let ack = app
            .client
            .request("edgehub", &message("delete", key, Value::Null))
            .await;
        assert_eq!(ack["content"], "OK");
    }

    app.set_cloud(true).await;
    let digest = next_digest(&mut app).await;
    assert_eq!(
        digest["route"]["resource"],
        format!("{}/digest", common::NODE)
    );
    assert_eq!(digest["route"]["source"], "metamanager");
    assert_eq!(
        digest["content"]["scopes"],
        expected_digest(&sent),
        "{digest}"
    );
    assert!(digest["content"]["change"].as_u64().is_some(), "{digest}");
    assert!(
        digest["content"].get("part").is_none(),
        "one message, no parts"
    );

    // With a MetaSync run, on request: the same, and no change since.
    let change = digest["content"]["change"].clone();
    app.client
        .publish(
            "edged",
            &message("meta-internal-sync", "default/podstatus", Value::Null),
        )
        .await;
    let again = next_digest(&mut app).await;
    assert_eq!(again["content"]["scopes"], expected_digest(&sent));
    assert_eq!(again["content"]["change"], change);
}

/// Known answers computed outside the project, with Python's hashlib (as topics.md 10.1 shows
/// for the first), so that a wrong hash in `src/store/digest.rs` cannot hide behind the same
/// mistake in [`expected_digest`]: `(key, resourceVersion)` pairs stored, then each scope's
/// count and hash.
const KNOWN_OBJECTS: [(&str, Option<&str>); 6] = [
    ("default/pod/web-1", Some("7001")),
    ("default/pod/web-2", Some("7002")),
    ("default/pod/web-3", Some("7003")),
    ("kube-system/configmap/coredns", None),
    ("kube-system/configmap/kube-proxy", Some("42")),
    ("default/secret/db-password", Some("18446744073709551615")),
];

/// The digest the store must send for [`KNOWN_OBJECTS`], from
/// `sum(int.from_bytes(sha256(f"{key}\n{rv}").digest()[:8], "big")) % 2**64`.
fn known_digest() -> Value {
    json!({
        "default/pod": {"count": 3, "hash": "4b76dca84f4e34e2"},
        "kube-system/configmap": {"count": 2, "hash": "910d2a70c3ac3971"},
        "default/secret": {"count": 1, "hash": "11a1155118bbbcaf"},
    })
}

/// The store's digest equals hashes computed outside the project, an empty resourceVersion
/// and the largest 64-bit one included, before and after a delete (topics.md 10.1's example).
async fn the_digest_matches_known_answers(kind: BrokerKind) {
    let options = Options::new(kind).yaml("meta:\n  sync:\n    podstatus:\n      interval: 1h\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    for (key, rv) in KNOWN_OBJECTS {
        let name = key.rsplit('/').next().unwrap_or_default();
        let ack = app
            .client
            .request("edgehub", &message("insert", key, object(name, rv)))
            .await;
        assert_eq!(ack["content"], "OK", "{ack}");
    }
    app.set_cloud(true).await;
    let digest = next_digest(&mut app).await;
    assert_eq!(digest["content"]["scopes"], known_digest(), "{digest}");

    let ack = app
        .client
        .request(
            "edgehub",
            &message("delete", "default/pod/web-2", Value::Null),
        )
        .await;
    assert_eq!(ack["content"], "OK");
    app.client
        .publish(
            "edged",
            &message("meta-internal-sync", "default/podstatus", Value::Null),
        )
        .await;
    let after = next_digest(&mut app).await;
    let mut known = known_digest();
    known["default/pod"] = json!({"count": 2, "hash": "6c32fd732d1fe2cb"});
    assert_eq!(after["content"]["scopes"], known, "{after}");
}

/// Everything MetaManager publishes in the next `span` (a quiet moment never comes while a
/// run a second sends a digest).
async fn collect_for(app: &mut TestApp, span: Duration) -> Vec<(String, Value)> {
    let mut seen = app.client.drain(Duration::ZERO).await;
    let deadline = tokio::time::Instant::now() + span;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, app.client.next()).await {
        seen.push(m);
    }
    seen
}

/// MetaSync's updates of `ns/podstatus` among `seen`.
fn status_syncs(seen: &[(String, Value)]) -> Vec<Value> {
    seen.iter()
        .filter(|(t, v)| {
            t == "metamanager/to/edgehub"
                && v["route"]["operation"] == "update"
                && v["route"]["resource"] == "default/podstatus"
                && v["route"]["source"] == "metamanager"
        })
        .map(|(_, v)| v["content"].clone())
        .collect()
}

fn digests(seen: &[(String, Value)]) -> usize {
    seen.iter()
        .filter(|(t, v)| t == "metamanager/to/edgehub" && v["route"]["operation"] == "digest")
        .count()
}

fn status(name: &str, phase: &str) -> Value {
    let mut s = fixture("podstatus.json");
    s["Name"] = json!(name);
    s["Status"]["phase"] = json!(phase);
    s
}

/// Two pods and their statuses. Connecting sends both statuses; idle runs send only the digest;
/// edged's own update goes to the cloud once, as itself; a status the cloud changed goes out
/// alone with the next run; a status whose pod was deleted is removed, not sent.
async fn metasync_sends_only_what_changed(kind: BrokerKind) {
    let options = Options::new(kind)
        .yaml("meta:\n  sync:\n    podstatus:\n      interval: 1\n      full_interval: 1h\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    for name in ["a", "b"] {
        for m in [
            message(
                "insert",
                &format!("default/pod/{name}"),
                fixture("pod.json"),
            ),
            message(
                "insert",
                &format!("default/podstatus/{name}"),
                status(name, "Pending"),
            ),
        ] {
            app.client.request("edgehub", &m).await;
        }
    }
    app.set_cloud(true).await;
    let full = app
        .client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["resource"] == "default/podstatus"
        })
        .await;
    assert_eq!(
        full["content"],
        json!([status("a", "Pending"), status("b", "Pending")])
    );

    let idle = collect_for(&mut app, Duration::from_millis(2600)).await;
    assert_eq!(
        status_syncs(&idle),
        Vec::<Value>::new(),
        "idle runs send no status"
    );
    assert!(digests(&idle) >= 2, "a digest with every run: {idle:#?}");

    // edged's own update reaches the cloud as itself, and not again with the next runs.
    let own = message("update", "default/podstatus/a", status("a", "Running"));
    app.client.publish("edged", &own).await;
    app.client
        .wait_for("metamanager/to/edgehub", |v| {
            v["header"]["msg_id"] == msg_id(&own)
        })
        .await;
    let after_own = collect_for(&mut app, Duration::from_millis(2600)).await;
    assert_eq!(
        status_syncs(&after_own),
        Vec::<Value>::new(),
        "{after_own:#?}"
    );

    // A status changed by the cloud's side is sent with the next run, alone.
    let cloud_side = message("update", "default/podstatus/b", status("b", "Failed"));
    app.client.request("edgehub", &cloud_side).await;
    let sync = app
        .client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["resource"] == "default/podstatus" && v["route"]["source"] == "metamanager"
        })
        .await;
    assert_eq!(sync["content"], json!([status("b", "Failed")]));

    // A pod deleted: its status is removed by the next run, and nothing is sent for it.
    app.client
        .request("edgehub", &message("delete", "default/pod/b", Value::Null))
        .await;
    let after_delete = collect_for(&mut app, Duration::from_millis(2600)).await;
    assert_eq!(status_syncs(&after_delete), Vec::<Value>::new());
    assert_eq!(
        app.client.query("edged", "default/podstatus/b").await,
        json!([])
    );
    assert_eq!(
        app.client.query("edged", "default/podstatus/a").await,
        json!([status("a", "Running")])
    );
}

/// `full_interval: 0` gives the seed's MetaSync back: every run sends every status.
async fn full_interval_zero_sends_every_status_every_run(kind: BrokerKind) {
    let options = Options::new(kind)
        .yaml("meta:\n  sync:\n    podstatus:\n      interval: 1\n      full_interval: 0\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    for m in [
        message("insert", "default/pod/a", fixture("pod.json")),
        message("insert", "default/podstatus/a", status("a", "Running")),
    ] {
        app.client.request("edgehub", &m).await;
    }
    app.set_cloud(true).await;
    let seen = collect_for(&mut app, Duration::from_millis(3500)).await;
    let syncs = status_syncs(&seen);
    assert!(
        syncs.len() >= 3,
        "one full run on connect, then one a second: {syncs:?}"
    );
    assert!(syncs.iter().all(|s| *s == json!([status("a", "Running")])));
}

both_brokers!(
    the_digest_is_the_hash_of_the_objects_sent,
    the_digest_matches_known_answers,
    metasync_sends_only_what_changed,
    full_interval_zero_sends_every_status_every_run,
);
