//! Every row of the contract's operations table, against the embedded broker and against a
//! real mosquitto process, with the real binary and a real SQLite file.

mod common;

use std::time::Duration;

use common::{
    answer_as_cloud, ask_for_a_remote_secret, cloud_answers, count_rows, fixture, forwarded_query,
    message, msg_id, retained_status, write_as_cloud, BrokerKind, Options, TestApp,
};
use serde_json::{json, Value};

const POD_KEY: &str = "default/pod/nginx-7d9c5b8f4-x2k9p";

async fn app(kind: BrokerKind) -> Option<TestApp> {
    TestApp::spawn(Options::new(kind)).await
}

fn assert_ack(reply: &Value, parent: &str, resource: &str) {
    assert_eq!(reply["header"]["parent_msg_id"], parent, "{reply}");
    assert_eq!(reply["route"]["operation"], "response", "{reply}");
    assert_eq!(reply["route"]["source"], "metamanager", "{reply}");
    assert_eq!(reply["route"]["group"], "meta", "{reply}");
    assert_eq!(reply["route"]["resource"], resource, "{reply}");
    assert_eq!(reply["content"], "OK", "{reply}");
    let id = reply["header"]["msg_id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "msg_id {id} is a UUID");
    assert!(reply["header"]["timestamp"].as_i64().unwrap() > 1_700_000_000_000);
}

/// Publishes `msg` as `from` and checks that it is forwarded to the other peer unchanged,
/// then acked to `from`.
async fn forwarded_then_acked(app: &mut TestApp, from: &str, msg: &Value) {
    let to = if from == "edgehub" {
        "edged"
    } else {
        "edgehub"
    };
    app.client.publish(from, msg).await;
    let forwarded = app
        .client
        .wait_for(&format!("metamanager/to/{to}"), is_forward_of(msg))
        .await;
    assert_eq!(&forwarded, msg, "forwarded unchanged");
    let ack = app
        .client
        .reply_to(&format!("metamanager/to/{from}"), msg_id(msg))
        .await;
    assert_ack(
        &ack,
        msg_id(msg),
        msg["route"]["resource"].as_str().unwrap(),
    );
}

fn is_forward_of(sent: &Value) -> impl Fn(&Value) -> bool + '_ {
    move |v: &Value| v["header"]["msg_id"] == sent["header"]["msg_id"]
}

/// Nothing published so far, or within a moment, is `msg` passed on (same msg_id).
async fn assert_not_passed_on(app: &mut TestApp, msg: &Value) {
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen.iter().any(|(_, v)| is_forward_of(msg)(v)),
        "{} was passed on: {seen:#?}",
        msg_id(msg)
    );
}

async fn insert_from_edgehub_stores_forwards_then_acks(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let insert = fixture("insert-pod.message.json");
    forwarded_then_acked(&mut app, "edgehub", &insert).await;

    let stored = app.client.query("edged", POD_KEY).await;
    assert_eq!(stored, json!([fixture("pod.json")]));
}

async fn reinsert_replaces_the_stored_object(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let mut pod = fixture("pod.json");
    app.client
        .publish("edgehub", &message("insert", POD_KEY, pod.clone()))
        .await;
    pod["status"]["phase"] = json!("Running");
    let mut second = message("insert", POD_KEY, pod.clone());
    // Unknown fields anywhere in the envelope are ignored.
    second["header"]["trace_id"] = json!("abc");
    second["route"]["priority"] = json!(5);
    second["extension"] = json!({"any": ["thing"]});
    app.client.request("edgehub", &second).await;
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([pod]));
}

async fn insert_from_edged_goes_to_edgehub(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    // Connected, so it goes straight out (disconnected, it waits in the outbox).
    app.set_cloud(true).await;
    let status = fixture("podstatus.json");
    let key = "default/podstatus/nginx-7d9c5b8f4-x2k9p";
    let insert = message("insert", key, status.clone());
    forwarded_then_acked(&mut app, "edged", &insert).await;
    assert_eq!(app.client.query("edged", key).await, json!([status]));
}

async fn update_forwards_only_real_changes(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let key = "default/configmap/app-config";
    let cm = fixture("configmap.json");

    // Absent: stored, forwarded, acked.
    let first = message("update", key, cm.clone());
    forwarded_then_acked(&mut app, "edgehub", &first).await;

    // Equal as JSON, keys in another order: acked, not forwarded.
    let reordered: Value = serde_json::from_str(&reorder_keys(&cm)).unwrap();
    let same = message("update", key, reordered);
    let ack = app.client.request("edgehub", &same).await;
    assert_ack(&ack, msg_id(&same), key);

    // Different: stored and forwarded.
    let mut changed_cm = cm.clone();
    changed_cm["data"]["feature-flags"] = json!("beta=true\n");
    let changed = message("update", key, changed_cm.clone());
    forwarded_then_acked(&mut app, "edgehub", &changed).await;

    assert_not_passed_on(&mut app, &same).await;
    assert_eq!(app.client.query("edged", key).await, json!([changed_cm]));
}

/// The same JSON object text with its top-level keys written in reverse order.
fn reorder_keys(v: &Value) -> String {
    let obj = v.as_object().unwrap();
    let parts: Vec<String> = obj
        .iter()
        .rev()
        .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v))
        .collect();
    format!("{{{}}}", parts.join(","))
}

async fn update_from_edged_goes_to_edgehub(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    // Connected, so it goes straight out (disconnected, it waits in the outbox).
    app.set_cloud(true).await;
    let key = "default/podstatus/nginx-7d9c5b8f4-x2k9p";
    let update = message("update", key, fixture("podstatus.json"));
    forwarded_then_acked(&mut app, "edged", &update).await;
}

async fn delete_removes_and_respects_pod_uid(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let pod = fixture("pod.json");
    let insert = message("insert", POD_KEY, pod.clone());
    app.client.request("edgehub", &insert).await;

    // A delete carrying another uid leaves the stored pod alone, but is forwarded and acked.
    let stale = message(
        "delete",
        POD_KEY,
        json!({"metadata": {"uid": "some-older-uid"}}),
    );
    forwarded_then_acked(&mut app, "edgehub", &stale).await;
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([pod]));

    // The matching uid removes it.
    let delete = message("delete", POD_KEY, pod.clone());
    forwarded_then_acked(&mut app, "edgehub", &delete).await;
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([]));

    // Deleting what is absent is not an error.
    let again = message("delete", POD_KEY, Value::Null);
    let ack = app.client.request("edgehub", &again).await;
    assert_ack(&ack, msg_id(&again), POD_KEY);
}

async fn query_lists_one_namespace_in_key_order(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let cm = |ns: &str, name: &str| {
        let mut v = fixture("configmap.json");
        v["metadata"]["name"] = json!(name);
        v["metadata"]["namespace"] = json!(ns);
        v
    };
    let objects = [
        ("default", "zeta"),
        ("default", "alpha"),
        ("other", "beta"),
        ("default-2", "gamma"),
    ];
    let mut last = String::new();
    for (ns, name) in objects {
        let m = message("insert", &format!("{ns}/configmap/{name}"), cm(ns, name));
        last = msg_id(&m).to_owned();
        app.client.publish("edgehub", &m).await;
    }
    app.client.reply_to("metamanager/to/edgehub", &last).await;
    let list = app.client.query("edged", "default/configmap").await;
    assert_eq!(list, json!([cm("default", "alpha"), cm("default", "zeta")]));
    // A query from edgehub is answered on edgehub's topic, from the store.
    let list = app.client.query("edgehub", "other/configmap").await;
    assert_eq!(list, json!([cm("other", "beta")]));
    // An absent object of a type that is not fetched remotely: an empty list.
    assert_eq!(
        app.client.query("edged", "default/pod/none").await,
        json!([])
    );
}

async fn response_from_edged_is_relayed_and_stored(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    // Connected, so it goes straight out (disconnected, it waits in the outbox).
    app.set_cloud(true).await;
    let mut pod = fixture("pod.json");
    pod["status"]["phase"] = json!("Running");
    let mut response = message("response", POD_KEY, pod.clone());
    response["header"]["parent_msg_id"] = json!("cloud-op-1");
    app.client.publish("edged", &response).await;
    let relayed = app
        .client
        .wait_for("metamanager/to/edgehub", is_forward_of(&response))
        .await;
    assert_eq!(relayed, response);
    assert_eq!(relayed["header"]["parent_msg_id"], "cloud-op-1");
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([pod]));

    // A response whose content is not an object is relayed and stores nothing.
    let ok = message("response", "default/pod/other", json!("OK"));
    app.client.publish("edged", &ok).await;
    app.client
        .wait_for("metamanager/to/edgehub", is_forward_of(&ok))
        .await;
    assert_eq!(
        app.client.query("edged", "default/pod/other").await,
        json!([])
    );
}

async fn unclaimed_cloud_response_and_error_go_to_edged(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    for op in ["response", "error"] {
        let mut m = message(op, "default/secret/db-credentials", json!("from the cloud"));
        m["header"]["parent_msg_id"] = json!("nobody-waits-for-this");
        app.client.publish("edgehub", &m).await;
        let relayed = app
            .client
            .wait_for("metamanager/to/edged", is_forward_of(&m))
            .await;
        assert_eq!(relayed, m);
    }
}

async fn connect_state_shows_in_status(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    // Starts disconnected.
    let status = app.retained_status().await;
    assert_eq!(status["state"], "online");
    assert_eq!(status["cloud"], "disconnected");
    assert_eq!(status["node_id"], common::NODE);

    app.set_cloud(true).await;
    let status = app.retained_status().await;
    assert_eq!(
        status["cloud"], "connected",
        "retained status follows the cloud"
    );
    app.set_cloud(false).await;

    // connect has no reply; a bad connect gets an error.
    let bad = message("connect", "default/node/edge-node", json!("maybe"));
    let err = app.client.request("edgehub", &bad).await;
    assert_eq!(err["route"]["operation"], "error");
    assert!(err["content"].as_str().unwrap().contains("cloud_connected"));
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen
            .iter()
            .any(|(t, v)| t.ends_with("to/edgehub") && v["route"]["operation"] == "response"),
        "connect is not acked: {seen:#?}"
    );
}

async fn remote_query_answered_by_the_cloud_is_stored(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let (key, query, asked) = ask_for_a_remote_secret(&mut app).await;
    assert_eq!(asked["route"]["resource"], key);
    assert_ne!(
        asked["header"]["msg_id"], query["header"]["msg_id"],
        "new msg_id"
    );
    let secret = fixture("secret.json");
    let reply = cloud_answers(&mut app, &asked, &query, secret.clone()).await;
    assert_eq!(reply["route"]["operation"], "response");
    assert_eq!(reply["content"], json!([secret]));

    // Now it is local: answered without asking the cloud again.
    assert_eq!(app.client.query("edged", key).await, json!([secret]));
    let seen = app.client.drain(Duration::from_millis(200)).await;
    let asks = seen
        .iter()
        .filter(|(t, v)| t.ends_with("to/edgehub") && v["route"]["operation"] == "query")
        .count();
    assert_eq!(asks, 0, "second query went to the cloud: {seen:#?}");
}

/// The cloud takes its answer, then the object changes and the cloud pushes the update, which
/// reaches the node before the answer does: the late answer leaves the newer object stored, and
/// edged is answered with it.
async fn a_late_remote_answer_leaves_an_update_stored_meanwhile(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let (key, query, asked) = ask_for_a_remote_secret(&mut app).await;
    let answered = fixture("secret.json");
    let mut updated = answered.clone();
    updated["metadata"]["resourceVersion"] = json!("480778");
    updated["data"]["password"] = json!("bmV3LXBhc3N3b3Jk");
    write_as_cloud(&mut app, "update", key, updated.clone()).await;

    let reply = cloud_answers(&mut app, &asked, &query, answered).await;
    assert_eq!(reply["route"]["operation"], "response");
    assert_eq!(
        reply["content"],
        json!([updated]),
        "edged gets the newer secret"
    );
    assert_eq!(app.client.query("edged", key).await, json!([updated]));
}

/// Only the cloud completes a remote query: an answer on edged's topic that names the forwarded
/// query's id (someone on the broker playing the cloud from the node's side) is treated as
/// edged's own response, and the query waits on for edgehub's answer, which is the one the
/// asker gets.
async fn a_remote_answer_from_edged_does_not_complete_the_query(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let (key, query, asked) = ask_for_a_remote_secret(&mut app).await;
    let mut forged = message("response", key, json!({"metadata": {"name": "forged"}}));
    forged["header"]["parent_msg_id"] = asked["header"]["msg_id"].clone();
    app.client.publish("edged", &forged).await;
    let early = app.client.drain(Duration::from_millis(500)).await;
    assert!(
        !early.iter().any(|(t, v)| t == "metamanager/to/edged"
            && v["header"]["parent_msg_id"] == query["header"]["msg_id"]),
        "a forged answer on edged's topic completed the query: {early:#?}"
    );

    let secret = fixture("secret.json");
    let reply = cloud_answers(&mut app, &asked, &query, secret.clone()).await;
    assert_eq!(reply["route"]["operation"], "response");
    assert_eq!(
        reply["content"],
        json!([secret]),
        "the cloud's answer, not the forged one"
    );
}

/// edged asks for 20 configmaps the node does not hold, and the cloud answers each query as it
/// arrives, while later queries are still coming in: every answer reaches MetaManager and
/// every query gets its object.
async fn concurrent_remote_queries_all_get_their_answers(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    const N: usize = 20;
    let queries: Vec<Value> = (0..N)
        .map(|i| message("query", &format!("default/configmap/cm{i}"), Value::Null))
        .collect();
    for q in &queries {
        app.client.publish("edged", q).await;
    }
    let mut answered = 0;
    while answered < N {
        let asked = forwarded_query(&mut app).await;
        let name = asked["route"]["resource"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned();
        let object =
            json!({"metadata": {"name": name, "namespace": "default"}, "data": {"n": name}});
        answer_as_cloud(&app, &asked, "response", object).await;
        answered += 1;
    }
    for (i, q) in queries.iter().enumerate() {
        let reply = app.client.reply_to("metamanager/to/edged", msg_id(q)).await;
        assert_eq!(
            reply["route"]["operation"], "response",
            "query {i}: {reply}"
        );
        assert_eq!(
            reply["content"][0]["data"]["n"],
            format!("cm{i}"),
            "{reply}"
        );
    }
}

async fn remote_list_query_stores_each_object(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    let query = message("query", "default/configmap", Value::Null);
    app.client.publish("edged", &query).await;
    let asked = forwarded_query(&mut app).await;
    assert_eq!(asked["route"]["resource"], "default/configmap");
    let first = fixture("configmap.json");
    let mut second = first.clone();
    second["metadata"]["name"] = json!("app-config-2");
    let reply = cloud_answers(&mut app, &asked, &query, json!([first, second])).await;
    assert_eq!(reply["content"], json!([first, second]));
    assert_eq!(
        app.client
            .query("edgehub", "default/configmap/app-config-2")
            .await,
        json!([second])
    );
}

async fn remote_object_query_keeps_only_the_object_asked_for(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    let key = "default/configmap/app-config";
    let query = message("query", key, Value::Null);
    app.client.publish("edged", &query).await;
    let asked = forwarded_query(&mut app).await;
    let wanted = fixture("configmap.json");
    let mut other = wanted.clone();
    other["metadata"]["name"] = json!("someone-else");
    let reply = cloud_answers(&mut app, &asked, &query, json!([other, wanted])).await;
    assert_eq!(reply["content"], json!([wanted]));
    assert_eq!(app.client.query("edgehub", key).await, json!([wanted]));
}

async fn remote_query_error_is_relayed_and_nothing_stored(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    let key = "default/configmap/missing";
    let query = message("query", key, Value::Null);
    app.client.publish("edged", &query).await;
    let asked = forwarded_query(&mut app).await;
    answer_as_cloud(
        &app,
        &asked,
        "error",
        json!("configmap \"missing\" not found"),
    )
    .await;
    let reply = app
        .client
        .reply_to("metamanager/to/edged", msg_id(&query))
        .await;
    assert_eq!(reply["route"]["operation"], "error");
    assert_eq!(reply["content"], "configmap \"missing\" not found");
    assert_eq!(app.client.query("edgehub", key).await, json!([]));
}

async fn remote_query_times_out(kind: BrokerKind) {
    let options = Options::new(kind).yaml("meta:\n  remote_query_timeout: 1s\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    app.set_cloud(true).await;
    let query = message("query", "default/configmap/app-config", Value::Null);
    let sent = std::time::Instant::now();
    let reply = app.client.request("edged", &query).await;
    assert_eq!(reply["route"]["operation"], "error");
    assert!(
        reply["content"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{reply}"
    );
    assert!(sent.elapsed() >= Duration::from_millis(900));
}

async fn remote_query_while_disconnected_fails_fast(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let query = message("query", "default/configmap/app-config", Value::Null);
    let reply = app.client.request("edged", &query).await;
    assert_eq!(reply["route"]["operation"], "error");
    assert!(reply["content"].as_str().unwrap().contains("not connected"));
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen.iter().any(|(t, _)| t.ends_with("to/edgehub")),
        "nothing goes to edgehub: {seen:#?}"
    );
}

async fn metasync_sends_statuses_and_drops_orphans(kind: BrokerKind) {
    let options = Options::new(kind).yaml("meta:\n  sync:\n    podstatus:\n      interval: 1\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let status = fixture("podstatus.json");
    let inserts = [
        message("insert", POD_KEY, fixture("pod.json")),
        message(
            "insert",
            "default/podstatus/nginx-7d9c5b8f4-x2k9p",
            status.clone(),
        ),
        message("insert", "default/podstatus/gone", json!({"Name": "gone"})),
    ];
    for m in &inserts {
        app.client.publish("edgehub", m).await;
    }
    app.client
        .reply_to("metamanager/to/edgehub", msg_id(&inserts[2]))
        .await;
    // Disconnected: nothing is synced, however many intervals pass.
    let seen = app.client.drain(Duration::from_millis(2500)).await;
    assert!(
        !seen
            .iter()
            .any(|(_, v)| v["route"]["operation"] == "update"),
        "metasync ran while the cloud was disconnected: {seen:#?}"
    );
    app.set_cloud(true).await;
    let sync = app
        .client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["operation"] == "update"
        })
        .await;
    assert_eq!(sync["route"]["resource"], "default/podstatus");
    assert_eq!(sync["route"]["source"], "metamanager");
    assert_eq!(sync["content"], json!([status]));
    assert_eq!(
        app.client.query("edged", "default/podstatus/gone").await,
        json!([])
    );
}

async fn meta_internal_sync_runs_now(kind: BrokerKind) {
    let options = Options::new(kind).yaml("meta:\n  sync:\n    podstatus:\n      interval: 1h\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let status = fixture("podstatus.json");
    for m in [
        message("insert", POD_KEY, fixture("pod.json")),
        message(
            "insert",
            "default/podstatus/nginx-7d9c5b8f4-x2k9p",
            status.clone(),
        ),
    ] {
        app.client.request("edgehub", &m).await;
    }
    app.set_cloud(true).await;
    let sync = message("meta-internal-sync", "default/podstatus", Value::Null);
    app.client.publish("edged", &sync).await;
    let update = app
        .client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["operation"] == "update"
        })
        .await;
    assert_eq!(update["content"], json!([status]));
    let ack = app
        .client
        .reply_to("metamanager/to/edged", msg_id(&sync))
        .await;
    assert_ack(&ack, msg_id(&sync), "default/podstatus");
}

async fn store_survives_restart(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let insert = fixture("insert-pod.message.json");
    app.client.request("edgehub", &insert).await;
    let status = app.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");

    // The database is closed and holds the pod.
    let conn = rusqlite::Connection::open(app.db_path()).unwrap();
    let stored: String = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [POD_KEY], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&stored).unwrap(),
        fixture("pod.json")
    );
    drop(conn);
    // An external broker keeps the offline status (the embedded one stopped with the process).
    if let Some(m) = &app.mosquitto {
        assert_eq!(retained_status(m.port, None).await["state"], "offline");
    }

    app.start().await;
    assert_eq!(
        app.client.query("edged", POD_KEY).await,
        json!([fixture("pod.json")])
    );
}

/// The cloud inserts the fixture pod with `status`; the pod as stored.
async fn insert_pod_with_status(app: &mut TestApp, status: Value) -> Value {
    let mut pod = fixture("pod.json");
    pod["status"] = status;
    let insert = message("insert", POD_KEY, pod.clone());
    let ack = app.client.request("edgehub", &insert).await;
    assert_ack(&ack, msg_id(&insert), POD_KEY);
    pod
}

const PODPATCH_KEY: &str = "default/podpatch/nginx-7d9c5b8f4-x2k9p";

/// edged patches a pod's status while the cloud is away: each patch is applied to the stored
/// pod and acked at once, and all of them reach the cloud when it is back, in order, none
/// coalesced with another (an update of one key would be).
async fn pod_status_patches_wait_for_the_cloud_and_go_in_order(kind: BrokerKind) {
    let options = Options::new(kind).yaml("outbox:\n  drain_rate: 50\n");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let mut pod = insert_pod_with_status(&mut app, json!({"phase": "Pending"})).await;
    let patches = [
        json!({"status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}}),
        json!({"status": {"conditions": [{"type": "Initialized", "status": "True"}]}}),
        json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
    ];
    let mut sent = Vec::new();
    for content in patches {
        let patch = message("patch", PODPATCH_KEY, content);
        let ack = app.client.request("edged", &patch).await;
        assert_ack(&ack, msg_id(&patch), PODPATCH_KEY);
        sent.push(patch);
    }
    pod["status"] = json!({"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": "True"},
    ]});
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([pod]));
    let seen = app.client.drain(Duration::from_millis(300)).await;
    assert!(
        !seen.iter().any(|(t, _)| t == "metamanager/to/edgehub"),
        "nothing goes to edgehub while the cloud is disconnected: {seen:#?}"
    );
    assert_eq!(count_rows(&app, "SELECT count(*) FROM outbox"), 3);

    app.set_cloud(true).await;
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        let m = app
            .client
            .wait_for("metamanager/to/edgehub", |v| {
                v["route"]["operation"] == "patch"
            })
            .await;
        got.push(m);
    }
    assert_eq!(got, sent, "every patch, unchanged, in order");
}

/// A JSON Patch whose `test` fails: an `error` naming the operation, nothing stored or passed on.
async fn a_json_patch_whose_test_fails_changes_nothing(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    let pod = insert_pod_with_status(&mut app, json!({"phase": "Pending"})).await;
    let ops = json!([
        {"op": "test", "path": "/status/phase", "value": "Running"},
        {"op": "replace", "path": "/status/phase", "value": "Succeeded"},
    ]);
    let patch = message("patch", POD_KEY, ops);
    let reply = app.client.request("edgehub", &patch).await;
    assert_eq!(reply["route"]["operation"], "error", "{reply}");
    assert_eq!(
        reply["content"],
        format!(
            "patch of {POD_KEY} not applied: operation 0 (test at /status/phase) failed: \
             the value differs from the test's value"
        )
    );
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([pod]));
    assert_not_passed_on(&mut app, &patch).await;
}

/// A status patch of container statuses, merged by name: the container named is updated, the
/// other kept, the new one appended; the patch goes to the cloud as it came.
async fn container_statuses_are_merged_by_name(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    let mut pod = insert_pod_with_status(
        &mut app,
        json!({"phase": "Pending", "containerStatuses": [
            {"name": "nginx", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "ContainerCreating"}}},
            {"name": "sidecar", "ready": true, "restartCount": 1},
        ]}),
    )
    .await;
    let patch = message(
        "patch",
        PODPATCH_KEY,
        json!({"status": {"phase": "Running", "containerStatuses": [
            {"name": "nginx", "ready": true,
             "state": {"running": {"startedAt": "2026-11-27T10:16:00Z"}, "waiting": null}},
            {"name": "metrics", "ready": false, "restartCount": 0},
        ]}}),
    );
    forwarded_then_acked(&mut app, "edged", &patch).await;
    pod["status"] = json!({"phase": "Running", "containerStatuses": [
        {"name": "nginx", "ready": true, "restartCount": 0,
         "state": {"running": {"startedAt": "2026-11-27T10:16:00Z"}}},
        {"name": "sidecar", "ready": true, "restartCount": 1},
        {"name": "metrics", "ready": false, "restartCount": 0},
    ]});
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([pod]));
}

/// A podpatch of a pod the node does not hold: passed on and acked, nothing stored.
async fn a_podpatch_of_an_absent_pod_is_passed_on_and_stores_nothing(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    let patch = message(
        "patch",
        "default/podpatch/elsewhere",
        json!({"status": {"phase": "Running"}}),
    );
    forwarded_then_acked(&mut app, "edged", &patch).await;
    for key in ["default/pod/elsewhere", "default/podpatch/elsewhere"] {
        assert_eq!(app.client.query("edged", key).await, json!([]), "{key}");
    }
}

/// The cloud answers a patch edged sent with the pod as the cloud has it: stored on the pod,
/// then relayed to edged.
async fn the_cloud_s_response_to_a_patch_is_stored_then_relayed(kind: BrokerKind) {
    let Some(mut app) = app(kind).await else {
        return;
    };
    app.set_cloud(true).await;
    insert_pod_with_status(&mut app, json!({"phase": "Pending"})).await;
    let patch = message(
        "patch",
        PODPATCH_KEY,
        json!({"status": {"phase": "Running"}}),
    );
    forwarded_then_acked(&mut app, "edged", &patch).await;

    let mut cloud_pod = fixture("pod.json");
    cloud_pod["metadata"]["resourceVersion"] = json!("482950");
    cloud_pod["status"] = json!({"phase": "Running", "podIP": "10.244.1.7"});
    let mut response = message("response", PODPATCH_KEY, cloud_pod.clone());
    response["header"]["parent_msg_id"] = json!(msg_id(&patch));
    app.client.publish("edgehub", &response).await;
    let relayed = app
        .client
        .wait_for("metamanager/to/edged", is_forward_of(&response))
        .await;
    assert_eq!(relayed, response, "relayed unchanged");
    assert_eq!(app.client.query("edged", POD_KEY).await, json!([cloud_pod]));
}

both_brokers!(
    insert_from_edgehub_stores_forwards_then_acks,
    reinsert_replaces_the_stored_object,
    insert_from_edged_goes_to_edgehub,
    update_forwards_only_real_changes,
    update_from_edged_goes_to_edgehub,
    delete_removes_and_respects_pod_uid,
    query_lists_one_namespace_in_key_order,
    response_from_edged_is_relayed_and_stored,
    unclaimed_cloud_response_and_error_go_to_edged,
    connect_state_shows_in_status,
    remote_query_answered_by_the_cloud_is_stored,
    a_late_remote_answer_leaves_an_update_stored_meanwhile,
    a_remote_answer_from_edged_does_not_complete_the_query,
    concurrent_remote_queries_all_get_their_answers,
    remote_query_error_is_relayed_and_nothing_stored,
    remote_list_query_stores_each_object,
    remote_object_query_keeps_only_the_object_asked_for,
    remote_query_times_out,
    remote_query_while_disconnected_fails_fast,
    metasync_sends_statuses_and_drops_orphans,
    meta_internal_sync_runs_now,
    store_survives_restart,
    pod_status_patches_wait_for_the_cloud_and_go_in_order,
    a_json_patch_whose_test_fails_changes_nothing,
    container_statuses_are_merged_by_name,
    a_podpatch_of_an_absent_pod_is_passed_on_and_stores_nothing,
    the_cloud_s_response_to_a_patch_is_stored_then_relayed,
);
