//! The rules of topics.md section 5.9 beyond `patch`, against both brokers with the real
//! binary: stale updates held back, events never stored, leases refused while the cloud is
//! away, service account tokens fetched again before they expire, and identical remote
//! queries sharing one query to the cloud.

mod common;

use std::time::{Duration, SystemTime};

use common::{
    answer_as_cloud, cloud_answers, forwarded_query, message, msg_id, BrokerKind, Options, TestApp,
};
use serde_json::{json, Value};

async fn app(kind: BrokerKind) -> Option<TestApp> {
    TestApp::spawn(Options::new(kind)).await
}

/// The stored object at `key` (as edgehub's query answers it, from the store only), or null.
async fn stored(app: &mut TestApp, key: &str) -> Value {
    app.client.query("edgehub", key).await[0].clone()
}

fn outbox_len(app: &TestApp) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        app.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap()
}

fn configmap(version: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "app", "namespace": "default", "resourceVersion": version},
           "data": {"k": value}})
}

async fn an_older_update_after_a_newer_one_is_acked_and_held_back(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let key = "default/configmap/app";
    let ack = app
        .client
        .request("edgehub", &message("insert", key, configmap("100", "a")))
        .await;
    assert_eq!(ack["content"], "OK");
    let newer = message("update", key, configmap("200", "b"));
    assert_eq!(app.client.request("edgehub", &newer).await["content"], "OK");

    // The late one: acked, not stored, not passed on to edged.
    let older = message("update", key, configmap("150", "late"));
    let ack = app.client.request("edgehub", &older).await;
    assert_eq!(
        ack["route"]["operation"], "response",
        "never an error: {ack}"
    );
    assert_eq!(ack["content"], "OK");
    assert_eq!(stored(&mut app, key).await, configmap("200", "b"));
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen
            .iter()
            .any(|(_, v)| v["header"]["msg_id"] == msg_id(&older)),
        "the stale update was passed on: {seen:#?}"
    );
    let (_, _, metrics) = common::http(app.http_port, "GET", "/metrics").await;
    assert!(
        metrics.contains(r#"metamanager_messages_held_back_total{reason="stale"} 1"#),
        "{metrics}"
    );

    // A version that is not a number is not compared: the update goes through.
    let opaque = message("update", key, configmap("abc", "c"));
    assert_eq!(
        app.client.request("edgehub", &opaque).await["content"],
        "OK"
    );
    assert_eq!(stored(&mut app, key).await, configmap("abc", "c"));
    // Inserts are never held back (a resync after the cloud restored a backup).
    let restore = message("insert", key, configmap("50", "restored"));
    assert_eq!(
        app.client.request("edgehub", &restore).await["content"],
        "OK"
    );
    assert_eq!(stored(&mut app, key).await, configmap("50", "restored"));
}

async fn an_event_is_passed_on_and_never_stored(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let key = "default/event/nginx.17a3b";
    let event = |reason: &str| {
        message(
            "insert",
            key,
            json!({"kind": "Event", "metadata": {"name": "nginx.17a3b", "namespace": "default"}, "reason": reason}),
        )
    };
    // While the cloud is away two events of one key wait; only the newest reaches it.
    let first = event("Pulling");
    let second = event("Pulled");
    for e in [&first, &second] {
        assert_eq!(app.client.request("edged", e).await["content"], "OK");
    }
    assert_eq!(outbox_len(&app), 1, "the newer event replaced the older");
    assert!(stored(&mut app, key).await.is_null(), "never stored");

    app.set_cloud(true).await;
    let delivered = app
        .client
        .wait_for("metamanager/to/edgehub", |v| v["route"]["resource"] == key)
        .await;
    assert_eq!(delivered["header"]["msg_id"], second["header"]["msg_id"]);
    let rest = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !rest
            .iter()
            .any(|(_, v)| v["header"]["msg_id"] == first["header"]["msg_id"]),
        "the older event was delivered too: {rest:#?}"
    );
    assert!(stored(&mut app, key).await.is_null(), "still not stored");
}

async fn a_lease_from_edged_while_the_cloud_is_away_is_refused_at_once(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let key = "kube-node-lease/lease/edge-node";
    let lease = |renew: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "edge-node", "namespace": "kube-node-lease"},
               "spec": {"holderIdentity": "edge-node", "renewTime": renew}})
    };
    app.set_cloud(true).await;
    let first = message("insert", key, lease("2026-11-28T12:00:00.000000Z"));
    assert_eq!(app.client.request("edged", &first).await["content"], "OK");
    app.client
        .wait_for("metamanager/to/edgehub", |v| v["route"]["resource"] == key)
        .await;

    app.set_cloud(false).await;
    let renewal = message("update", key, lease("2026-11-28T12:00:10.000000Z"));
    let reply = app.client.request("edged", &renewal).await;
    assert_eq!(reply["route"]["operation"], "error", "{reply}");
    assert!(
        reply["content"]
            .as_str()
            .unwrap()
            .contains("the cloud is not connected"),
        "{reply}"
    );
    assert_eq!(outbox_len(&app), 0, "nothing queued");
    assert_eq!(
        stored(&mut app, key).await,
        lease("2026-11-28T12:00:00.000000Z")
    );
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn token(value: &str, expires: SystemTime) -> Value {
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
           "metadata": {"name": "default", "namespace": "default"},
           "status": {"token": value, "expirationTimestamp": rfc3339(expires)}})
}

const TOKEN_KEY: &str = "default/serviceaccounttoken/default";

/// Stores `token` as the cloud would, and connects the cloud.
async fn with_stored_token(app: &mut TestApp, token: Value) {
    let ack = app
        .client
        .request("edgehub", &message("insert", TOKEN_KEY, token))
        .await;
    assert_eq!(ack["content"], "OK");
    app.set_cloud(true).await;
}

async fn an_expired_token_is_fetched_again_from_the_cloud(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let now = SystemTime::now();
    with_stored_token(&mut app, token("old", now - Duration::from_secs(60))).await;
    let query = message("query", TOKEN_KEY, Value::Null);
    app.client.publish("edged", &query).await;
    let asked = forwarded_query(&mut app).await;
    assert_eq!(asked["route"]["resource"], TOKEN_KEY);
    let fresh = token("new", now + Duration::from_secs(3600));
    let reply = cloud_answers(&mut app, &asked, &query, fresh.clone()).await;
    assert_eq!(reply["content"], json!([fresh]));
    assert_eq!(
        stored(&mut app, TOKEN_KEY).await,
        fresh,
        "the fresh token is stored"
    );

    // Fresh now: served from the store, the cloud not asked.
    assert_eq!(app.client.query("edged", TOKEN_KEY).await, json!([fresh]));
}

async fn a_token_the_cloud_cannot_refresh_is_served_until_it_expires(kind: BrokerKind) {
    let options = Options::new(kind).yaml("meta:\n  remote_query_timeout: 1s\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    // Expiring in 5 minutes: due for a refresh (10 minutes before), not expired.
    let soon = token("soon", SystemTime::now() + Duration::from_secs(300));
    with_stored_token(&mut app, soon.clone()).await;
    let query = message("query", TOKEN_KEY, Value::Null);
    let sent = std::time::Instant::now();
    app.client.publish("edged", &query).await;
    // The cloud is asked for a fresh one, and does not answer.
    let asked = forwarded_query(&mut app).await;
    assert_eq!(asked["route"]["resource"], TOKEN_KEY);
    let reply = app
        .client
        .reply_to("metamanager/to/edged", msg_id(&query))
        .await;
    assert_eq!(reply["route"]["operation"], "response", "{reply}");
    assert_eq!(
        reply["content"],
        json!([soon]),
        "the stored token, the cloud silent"
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "after the timeout"
    );
}

async fn an_expired_token_with_the_cloud_silent_is_an_error(kind: BrokerKind) {
    let options = Options::new(kind).yaml("meta:\n  remote_query_timeout: 1s\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    with_stored_token(
        &mut app,
        token("old", SystemTime::now() - Duration::from_secs(1)),
    )
    .await;
    let reply = app
        .client
        .request("edged", &message("query", TOKEN_KEY, Value::Null))
        .await;
    assert_eq!(reply["route"]["operation"], "error", "{reply}");
    assert!(
        reply["content"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{reply}"
    );
}

async fn identical_remote_queries_share_one_query_to_the_cloud(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    let key = "default/configmap/shared";
    let queries: Vec<Value> = (0..50)
        .map(|_| message("query", key, Value::Null))
        .collect();
    for q in &queries {
        app.client.publish("edged", q).await;
    }
    let asked = forwarded_query(&mut app).await;
    // Let every query arrive before the cloud answers.
    let early = app.client.drain(Duration::from_millis(500)).await;
    let more_asks = early
        .iter()
        .filter(|(t, v)| t == "metamanager/to/edgehub" && v["route"]["operation"] == "query")
        .count();
    assert_eq!(more_asks, 0, "one query to the cloud, not 50");

    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared", "namespace": "default"}, "data": {"k": "v"}});
    answer_as_cloud(&app, &asked, "response", cm.clone()).await;
    for q in &queries {
        let reply = app.client.reply_to("metamanager/to/edged", msg_id(q)).await;
        assert_eq!(reply["route"]["operation"], "response");
        assert_eq!(
            reply["content"],
            json!([cm]),
            "each asker gets its own reply"
        );
    }
}

both_brokers!(
    an_older_update_after_a_newer_one_is_acked_and_held_back,
    an_event_is_passed_on_and_never_stored,
    a_lease_from_edged_while_the_cloud_is_away_is_refused_at_once,
    an_expired_token_is_fetched_again_from_the_cloud,
    a_token_the_cloud_cannot_refresh_is_served_until_it_expires,
    an_expired_token_with_the_cloud_silent_is_an_error,
    identical_remote_queries_share_one_query_to_the_cloud,
);
