//! The local API's writes against the real binary, with the test client playing the cloud:
//! through the cloud while it is connected (each Status code of a refusal, failure or
//! silence), status writes and new events while it is away, and kubectl's writes.

mod common;

use common::kubectl::{kubectl, kubectl_out};
use common::{
    count_rows, fixture, http, http_with, message, served, BrokerKind, Options, TestApp, NODE,
};
use serde_json::{json, Value};

const EDGEHUB: &str = "metamanager/to/edgehub";
const EDGED: &str = "metamanager/to/edged";

/// A MetaManager whose writes wait at most 2 s for the cloud.
async fn spawn(kind: BrokerKind) -> Option<TestApp> {
    TestApp::spawn(Options::new(kind).yaml("meta:\n  remote_query_timeout: 2s\n")).await
}

/// Inserts `object` at `resource` as the cloud would, and waits for the ack.
async fn insert(app: &mut TestApp, resource: &str, object: &Value) {
    let m = message("insert", resource, object.clone());
    let reply = app.client.request("edgehub", &m).await;
    assert_eq!(reply["content"], "OK", "{reply}");
}

/// Starts a request with a body; its answer comes once the cloud has answered.
fn request(
    port: u16,
    method: &'static str,
    path: &str,
    content_type: &'static str,
    body: Value,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let path = path.to_owned();
    tokio::spawn(async move {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (code, _, text) = http_with(port, method, &path, content_type, &body).await;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (code, value)
    })
}

/// The next write the API passed on to the cloud, with `operation`.
async fn passed_to_cloud(app: &mut TestApp, operation: &str) -> Value {
    let m = app
        .client
        .wait_for(EDGEHUB, |v| {
            v["route"]["source"] == "metaserver" && v["route"]["operation"] == operation
        })
        .await;
    assert!(!m["header"]["msg_id"].as_str().unwrap().is_empty());
    m
}

/// Plays the cloud: answers `asked` with `operation` and `content`.
async fn answer(app: &TestApp, asked: &Value, operation: &str, content: Value) {
    let resource = asked["route"]["resource"].as_str().unwrap();
    let mut reply = message(operation, resource, content);
    reply["header"]["parent_msg_id"] = asked["header"]["msg_id"].clone();
    app.client.publish("edgehub", &reply).await;
}

async fn get(port: u16, path: &str) -> (u16, Value) {
    let (code, _, body) = http(port, "GET", path).await;
    (code, serde_json::from_str(&body).unwrap())
}

async fn writes_go_through_the_cloud(kind: BrokerKind) {
    let Some(mut app) = spawn(kind).await else {
        return;
    };
    let port = app.http_port;
    app.set_cloud(true).await;
    let configmaps = "/api/v1/namespaces/default/configmaps";
    let path = format!("{configmaps}/app-config");
    let mut config = fixture("configmap.json");
    config["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");

    // Create: sent as an insert with the namespace filled in; the cloud's object is stored,
    // passed to edged and returned with 201.
    let pending = request(port, "POST", configmaps, "application/json", config.clone());
    let asked = passed_to_cloud(&mut app, "insert").await;
    assert_eq!(asked["route"]["resource"], "default/configmap/app-config");
    assert_eq!(asked["content"]["metadata"]["namespace"], "default");
    let mut in_cloud = asked["content"].clone();
    in_cloud["metadata"]["resourceVersion"] = json!("7");
    in_cloud["metadata"]["uid"] = json!("c0ffee");
    answer(&app, &asked, "response", in_cloud.clone()).await;
    let (code, created) = pending.await.unwrap();
    let key = "default/configmap/app-config";
    assert_eq!((code, &created), (201, &served(&app, key, &in_cloud)));
    let to_edged = app
        .client
        .wait_for(EDGED, |v| v["route"]["operation"] == "insert")
        .await;
    assert_eq!(
        to_edged["content"], in_cloud,
        "edged sees the cloud's version"
    );
    assert_eq!(get(port, &path).await, (200, served(&app, key, &in_cloud)));

    // Patch: the merge patch goes as it is; the cloud's result is stored.
    let label = json!({"metadata": {"labels": {"tier": "edge"}}});
    let pending = request(
        port,
        "PATCH",
        &path,
        "application/merge-patch+json",
        label.clone(),
    );
    let asked = passed_to_cloud(&mut app, "patch").await;
    assert_eq!(asked["content"], label);
    let mut patched = in_cloud.clone();
    patched["metadata"]["labels"] = json!({"tier": "edge"});
    patched["metadata"]["resourceVersion"] = json!("8");
    answer(&app, &asked, "response", json!([patched.clone()])).await;
    assert_eq!(pending.await.unwrap(), (200, served(&app, key, &patched)));
    assert_eq!(get(port, &path).await.1, served(&app, key, &patched));

    // Update: a bare "OK" first is the cloud's receipt; the write waits on for the object.
    // The version the client read is the node's; the cloud is sent its own.
    let mut updated = served(&app, key, &patched);
    updated["data"] = json!({"mode": "fast"});
    let pending = request(port, "PUT", &path, "application/json", updated.clone());
    let asked = passed_to_cloud(&mut app, "update").await;
    assert_eq!(asked["content"]["metadata"]["resourceVersion"], "8");
    answer(&app, &asked, "response", json!("OK")).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a receipt is not the answer");
    updated["metadata"]["resourceVersion"] = json!("9");
    answer(&app, &asked, "response", updated.clone()).await;
    assert_eq!(pending.await.unwrap(), (200, served(&app, key, &updated)));
    assert_eq!(get(port, &path).await.1, served(&app, key, &updated));
    // A stale version is refused here, before anything is sent.
    let mut stale = served(&app, key, &patched);
    stale["metadata"]["resourceVersion"] = json!("8");
    let (code, status) = request(port, "PUT", &path, "application/json", stale)
        .await
        .unwrap();
    assert_eq!(
        (code, &status["reason"]),
        (409, &json!("Conflict")),
        "{status}"
    );

    // The cloud's own update can arrive before its answer: the newer object is kept.
    let pending = request(
        port,
        "PATCH",
        &path,
        "application/merge-patch+json",
        json!({"data": {"mode": "slow"}}),
    );
    let asked = passed_to_cloud(&mut app, "patch").await;
    let mut newer = updated.clone();
    newer["data"] = json!({"mode": "slower"});
    newer["metadata"]["resourceVersion"] = json!("11");
    let reply = app
        .client
        .request(
            "edgehub",
            &message("update", "default/configmap/app-config", newer.clone()),
        )
        .await;
    assert_eq!(reply["content"], "OK");
    let mut older = updated.clone();
    older["data"] = json!({"mode": "slow"});
    older["metadata"]["resourceVersion"] = json!("10");
    answer(&app, &asked, "response", older.clone()).await;
    // Answered with the object as stored, the only one the node has a version of.
    let newer = served(&app, key, &newer);
    assert_eq!(
        pending.await.unwrap(),
        (200, newer.clone()),
        "the stored one"
    );
    assert_eq!(get(port, &path).await.1, newer, "the store keeps the newer");
    let updated = newer;

    // Refused here before anything is sent: a dry run (it would be carried out), a
    // strategic merge patch with a list the cloud would replace whole, a body that cannot
    // fit in a message.
    let (code, status) = request(
        port,
        "DELETE",
        &format!("{path}?dryRun=All"),
        "application/json",
        Value::Null,
    )
    .await
    .unwrap();
    assert_eq!(
        (code, &status["reason"]),
        (400, &json!("BadRequest")),
        "{status}"
    );
    let (code, status) = request(
        port,
        "PATCH",
        "/api/v1/namespaces/default/pods/p",
        "application/strategic-merge-patch+json",
        json!({"spec": {"containers": [{"name": "c", "image": "new"}]}}),
    )
    .await
    .unwrap();
    assert_eq!(code, 415, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("spec.containers"),
        "{status}"
    );
    let huge = json!({"metadata": {"name": "huge"}, "data": {"blob": "x".repeat(1 << 20)}});
    let (code, status) = request(port, "POST", configmaps, "application/json", huge)
        .await
        .unwrap();
    assert_eq!(
        (code, &status["reason"]),
        (413, &json!("RequestEntityTooLarge")),
        "{status}"
    );
    // kubectl puts a delete's dry run in its options.
    let (code, status) = request(
        port,
        "DELETE",
        &path,
        "application/json",
        json!({"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]}),
    )
    .await
    .unwrap();
    assert_eq!(
        (code, &status["reason"]),
        (400, &json!("BadRequest")),
        "{status}"
    );
    let (_, _, body) = http_with(
        port,
        "PATCH",
        &path,
        "application/apply-patch+yaml",
        "data: {x: \"1\"}",
    )
    .await;
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["code"], 415, "{status}");

    // The cloud's errors, by its words, and its silence.
    for (method, op, text, code, reason) in [
        (
            "POST",
            "insert",
            "configmaps \"app-config\" already exists",
            409,
            "AlreadyExists",
        ),
        (
            "PUT",
            "update",
            "Operation cannot be fulfilled on configmaps \"app-config\": the object has been modified; please apply your changes to the latest version and try again",
            409,
            "Conflict",
        ),
        (
            "PATCH",
            "patch",
            "configmaps \"app-config\" not found",
            404,
            "NotFound",
        ),
        ("DELETE", "delete", "etcdserver: request timed out", 500, "InternalError"),
    ] {
        let (target, content_type) = match method {
            "POST" => (configmaps, "application/json"),
            "PATCH" => (path.as_str(), "application/merge-patch+json"),
            _ => (path.as_str(), "application/json"),
        };
        let body = if method == "DELETE" {
            Value::Null
        } else {
            updated.clone()
        };
        let pending = request(port, method, target, content_type, body);
        let asked = passed_to_cloud(&mut app, op).await;
        answer(&app, &asked, "error", json!(text)).await;
        let (got, status) = pending.await.unwrap();
        assert_eq!(got, code, "{method}: {status}");
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["reason"], reason, "{status}");
        assert!(status["message"].as_str().unwrap().contains(text), "{status}");
        assert_eq!(get(port, &path).await.1, updated, "nothing stored");
    }
    let pending = request(port, "PUT", &path, "application/json", updated.clone());
    passed_to_cloud(&mut app, "update").await;
    let (code, status) = pending.await.unwrap();
    assert_eq!(
        (code, &status["reason"]),
        (504, &json!("Timeout")),
        "{status}"
    );

    // Delete answered with "OK": gone here too, and edged is told. The precondition's uid
    // goes with it.
    let pending = request(
        port,
        "DELETE",
        &path,
        "application/json",
        json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "c0ffee"}}),
    );
    let asked = passed_to_cloud(&mut app, "delete").await;
    assert_eq!(asked["content"], json!({"metadata": {"uid": "c0ffee"}}));
    answer(&app, &asked, "response", json!("OK")).await;
    let (code, status) = pending.await.unwrap();
    assert_eq!(
        (code, &status["status"]),
        (200, &json!("Success")),
        "{status}"
    );
    app.client
        .wait_for(EDGED, |v| {
            v["route"]["operation"] == "delete"
                && v["route"]["resource"] == "default/configmap/app-config"
        })
        .await;
    assert_eq!(get(port, &path).await.0, 404);

    // A cluster-scoped object is written under the key it is stored under.
    let mut node = fixture("node.json");
    node["metadata"]["name"] = json!("n1");
    insert(&mut app, "edge/node/n1", &node).await;
    let pending = request(
        port,
        "PATCH",
        "/api/v1/nodes/n1",
        "application/merge-patch+json",
        json!({"metadata": {"labels": {"zone": "a"}}}),
    );
    let asked = passed_to_cloud(&mut app, "patch").await;
    assert_eq!(asked["route"]["resource"], "edge/node/n1");
    node["metadata"]["labels"] = json!({"zone": "a"});
    answer(&app, &asked, "response", node.clone()).await;
    assert_eq!(pending.await.unwrap().0, 200);
    assert_eq!(
        get(port, "/api/v1/nodes/n1").await.1,
        served(&app, "edge/node/n1", &node)
    );

    // Each write is counted by how it ended.
    let (_, _, metrics) = http(port, "GET", "/metrics").await;
    for line in [
        r#"metamanager_api_writes_total{verb="create",outcome="cloud"} 1"#,
        r#"metamanager_api_writes_total{verb="patch",outcome="cloud"} 3"#,
        r#"metamanager_api_writes_total{verb="patch",outcome="not_found"} 1"#,
        r#"metamanager_api_writes_total{verb="update",outcome="timeout"} 1"#,
        r#"metamanager_api_writes_total{verb="delete",outcome="cloud_error"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}

both_brokers!(writes_go_through_the_cloud);

/// A pod of this node (`NODE`), or of another.
fn pod_on(node: &str, name: &str) -> Value {
    let mut pod = fixture("pod.json");
    pod["metadata"]["name"] = json!(name);
    pod["spec"]["nodeName"] = json!(node);
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_cloud_is_away_the_edge_writes_its_own_status_and_events() {
    let Some(mut app) = spawn(BrokerKind::Embedded).await else {
        return;
    };
    let port = app.http_port;
    insert(&mut app, "default/pod/mine", &pod_on(NODE, "mine")).await;
    insert(
        &mut app,
        "default/pod/theirs",
        &pod_on("other-node", "theirs"),
    )
    .await;
    let mut node = fixture("node.json");
    node["metadata"]["name"] = json!(NODE);
    insert(&mut app, &format!("default/node/{NODE}"), &node).await;
    let outbox = |app: &TestApp| count_rows(app, "SELECT count(*) FROM outbox");
    assert_eq!(outbox(&app), 0);
    let mine = "/api/v1/namespaces/default/pods/mine";

    // A status patch of this node's pod: merged here (conditions by type), queued for the
    // cloud, passed to edged, answered with the merged pod; a spec change in it is ignored.
    let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]},
                       "spec": {"nodeName": "elsewhere"}});
    let (code, merged) = request(
        port,
        "PATCH",
        &format!("{mine}/status"),
        "application/strategic-merge-patch+json",
        ready,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{merged}");
    assert_eq!(merged["status"]["phase"], "Pending", "kept: {merged}");
    assert_eq!(
        merged["status"]["conditions"],
        json!([{"type": "Ready", "status": "False"}])
    );
    assert_eq!(merged["spec"]["nodeName"], NODE);
    assert_eq!(get(port, mine).await.1, merged);
    assert_eq!(outbox(&app), 1);
    let to_edged = app
        .client
        .wait_for(EDGED, |v| v["route"]["operation"] == "patch")
        .await;
    assert_eq!(to_edged["route"]["source"], "metaserver");

    // The second merges into the first, by condition type, strategic directives and all.
    let scheduled = json!({"status": {
        "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "PodScheduled"}],
        "conditions": [{"type": "PodScheduled", "status": "True"}]}});
    let (code, merged) = request(
        port,
        "PATCH",
        &format!("{mine}/status"),
        "application/strategic-merge-patch+json",
        scheduled,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{merged}");
    assert_eq!(
        merged["status"]["conditions"],
        json!([{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}])
    );
    // The node's own status, replaced whole.
    let mut node_status = node.clone();
    node_status["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
    let (code, written) = request(
        port,
        "PUT",
        &format!("/api/v1/nodes/{NODE}/status"),
        "application/json",
        node_status.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        (code, &written["status"]),
        (200, &node_status["status"]),
        "{written}"
    );
    assert_eq!(outbox(&app), 3);

    // Refused: another node's pod, a write that is not of status, a JSON Patch that reaches
    // outside status or whose test fails, a status update from a stale read, anything the
    // cloud must decide.
    let node_status_path = format!("/api/v1/nodes/{NODE}/status");
    let mut stale = node_status.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    for (method, path, content_type, body, code) in [
        (
            "PUT",
            node_status_path.as_str(),
            "application/json",
            stale,
            409,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/pods/theirs/status",
            "application/merge-patch+json",
            json!({"status": {"phase": "Failed"}}),
            503,
        ),
        (
            "PATCH",
            mine,
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"a": "b"}}}),
            503,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/pods/mine/status",
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/spec/nodeName", "value": "x"}]),
            422,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/pods/mine/status",
            "application/json-patch+json",
            json!([{"op": "test", "path": "/status/phase", "value": "Running"}]),
            422,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/pods/gone/status",
            "application/merge-patch+json",
            json!({"status": {"phase": "Failed"}}),
            404,
        ),
        (
            "PATCH",
            mine,
            "application/apply-patch+yaml",
            json!({}),
            415,
        ),
        (
            "POST",
            "/api/v1/namespaces/default/configmaps",
            "application/json",
            fixture("configmap.json"),
            503,
        ),
    ] {
        let (got, status) = request(port, method, path, content_type, body)
            .await
            .unwrap();
        assert_eq!(got, code, "{method} {path}: {status}");
        assert_eq!(status["kind"], "Status", "{status}");
    }
    assert_eq!(outbox(&app), 3, "nothing refused was queued");

    // An event is queued, never stored, and answered 201.
    let event = json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": "mine.", "namespace": "default"},
        "involvedObject": {"kind": "Pod", "name": "mine", "namespace": "default"},
        "reason": "Offline", "message": "written while the cloud was away", "type": "Normal"});
    let (code, created) = request(
        port,
        "POST",
        "/api/v1/namespaces/default/events",
        "application/json",
        event,
    )
    .await
    .unwrap();
    assert_eq!(code, 201, "{created}");
    let name = created["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(
        name.starts_with("mine.") && name.len() == "mine.".len() + 5,
        "{name}"
    );
    assert_eq!(outbox(&app), 4);
    // And one from client-go's newer recorder, under events.k8s.io.
    let recorded = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "mine.recorded", "namespace": "default"},
        "regarding": {"kind": "Pod", "name": "mine", "namespace": "default"},
        "reason": "Offline", "note": "recorded while the cloud was away", "type": "Normal",
        "action": "Write", "reportingController": "test", "reportingInstance": "test-1",
        "eventTime": "2026-11-28T10:00:00.000000Z"});
    let (code, created) = request(
        port,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        "application/json",
        recorded,
    )
    .await
    .unwrap();
    assert_eq!(code, 201, "{created}");
    assert_eq!(outbox(&app), 5);

    // Back online: the cloud gets them in order, from the outbox.
    app.set_cloud(true).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let m = app
            .client
            .wait_for(EDGEHUB, |v| v["route"]["source"] == "metaserver")
            .await;
        seen.push((
            m["route"]["operation"].as_str().unwrap().to_owned(),
            m["route"]["resource"].as_str().unwrap().to_owned(),
        ));
    }
    let node_key = format!("default/node/{NODE}");
    assert_eq!(
        seen,
        [
            ("patch".to_owned(), "default/pod/mine".to_owned()),
            ("patch".to_owned(), "default/pod/mine".to_owned()),
            ("patch".to_owned(), node_key),
            ("insert".to_owned(), format!("default/event/{name}")),
            (
                "insert".to_owned(),
                "default/event/mine.recorded".to_owned()
            ),
        ]
    );
}

/// kubectl's writes, with the cloud played here: it keeps the objects and answers each write
/// with the object as it then is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_creates_labels_annotates_and_deletes_through_the_cloud() {
    if kubectl().is_none() {
        return;
    }
    let Some(mut app) = spawn(BrokerKind::Embedded).await else {
        return;
    };
    let port = app.http_port;
    app.set_cloud(true).await;
    let home = tempfile::tempdir().unwrap();
    let manifest = home.path().join("configmap.json");
    std::fs::write(&manifest, fixture("configmap.json").to_string()).unwrap();

    let commands: Vec<Vec<String>> = vec![
        vec!["create".into(), "-f".into(), manifest.display().to_string()],
        vec![
            "label".into(),
            "configmap".into(),
            "app-config".into(),
            "tier=edge".into(),
        ],
        vec![
            "annotate".into(),
            "configmap".into(),
            "app-config".into(),
            "owner=ops".into(),
        ],
        vec!["delete".into(), "configmap".into(), "app-config".into()],
    ];
    let expected_ops = ["insert", "patch", "patch", "delete"];
    let mut version = 1;
    let mut object = Value::Null;
    for (args, op) in commands.into_iter().zip(expected_ops) {
        let home_path = home.path().to_owned();
        let run = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kubectl_out(port, &home_path, &args)
        });
        let asked = passed_to_cloud(&mut app, op).await;
        let reply = match op {
            "insert" => asked["content"].clone(),
            "patch" => {
                json_patch::merge(&mut object, &asked["content"]);
                object.clone()
            }
            _ => json!("OK"),
        };
        if reply.is_object() {
            object = reply;
            version += 1;
            object["metadata"]["resourceVersion"] = json!(version.to_string());
        }
        let content = if op == "delete" {
            json!("OK")
        } else {
            object.clone()
        };
        answer(&app, &asked, "response", content).await;
        let out = run.await.unwrap();
        assert!(out.contains("app-config"), "kubectl {op}: {out}");
        if op != "delete" {
            let (_, stored) = get(port, "/api/v1/namespaces/default/configmaps/app-config").await;
            let key = "default/configmap/app-config";
            assert_eq!(stored, served(&app, key, &object), "after {op}");
        }
    }
    assert_eq!(object["metadata"]["labels"]["tier"], "edge");
    assert_eq!(object["metadata"]["annotations"]["owner"], "ops");
    let (code, _) = get(port, "/api/v1/namespaces/default/configmaps/app-config").await;
    assert_eq!(code, 404);
}

/// A client that hangs up while its write waits for the cloud: the write is finished all the
/// same, the cloud's object stored and passed to edged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_does_not_stop_its_write() {
    let Some(mut app) = spawn(BrokerKind::Embedded).await else {
        return;
    };
    let port = app.http_port;
    app.set_cloud(true).await;
    let body = fixture("configmap.json").to_string();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let asked = passed_to_cloud(&mut app, "insert").await;
    drop(stream);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut in_cloud = asked["content"].clone();
    in_cloud["metadata"]["resourceVersion"] = json!("500");
    answer(&app, &asked, "response", in_cloud.clone()).await;
    let to_edged = app
        .client
        .wait_for(EDGED, |v| v["route"]["operation"] == "insert")
        .await;
    assert_eq!(to_edged["content"], in_cloud);
    let (code, stored) = get(port, "/api/v1/namespaces/default/configmaps/app-config").await;
    let in_cloud = served(&app, "default/configmap/app-config", &in_cloud);
    assert_eq!((code, stored), (200, in_cloud));
}

/// Writes waiting for a silent cloud take at most half of the request cap: the next write is
/// told to come back later, and reads are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_waiting_for_the_cloud_leave_room_for_reads() {
    let options = Options::new(BrokerKind::Embedded)
        .yaml("meta:\n  remote_query_timeout: 3s\n")
        .http("max_requests: 2");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let port = app.http_port;
    app.set_cloud(true).await;
    let configmaps = "/api/v1/namespaces/default/configmaps";
    let waiting = request(
        port,
        "POST",
        configmaps,
        "application/json",
        fixture("configmap.json"),
    );
    passed_to_cloud(&mut app, "insert").await;
    let mut second = fixture("configmap.json");
    second["metadata"]["name"] = json!("second");
    let (code, status) = request(port, "POST", configmaps, "application/json", second)
        .await
        .unwrap();
    assert_eq!(
        (code, &status["reason"]),
        (429, &json!("TooManyRequests")),
        "{status}"
    );
    let (code, _) = get(port, configmaps).await;
    assert_eq!(code, 200, "a read is served beside the waiting write");
    assert_eq!(waiting.await.unwrap().0, 504);
}

/// A delete the cloud answers "not found" removes the node's copy too; a cloud that goes away
/// while a write waits ends the wait at once; while it is away, status updates that read the
/// same version both hold (the edge owns status), and what is queued carries no version test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_not_knowing_an_object_or_going_away() {
    let Some(mut app) = spawn(BrokerKind::Embedded).await else {
        return;
    };
    let port = app.http_port;
    app.set_cloud(true).await;
    let mut ghost = fixture("configmap.json");
    ghost["metadata"]["name"] = json!("ghost");
    insert(&mut app, "default/configmap/ghost", &ghost).await;
    let ghost_path = "/api/v1/namespaces/default/configmaps/ghost";
    let pending = request(port, "DELETE", ghost_path, "application/json", Value::Null);
    let asked = passed_to_cloud(&mut app, "delete").await;
    answer(
        &app,
        &asked,
        "error",
        json!("configmaps \"ghost\" not found"),
    )
    .await;
    assert_eq!(pending.await.unwrap().0, 404);
    assert_eq!(get(port, ghost_path).await.0, 404, "gone here too");
    app.client
        .wait_for(EDGED, |v| {
            v["route"]["operation"] == "delete"
                && v["route"]["resource"] == "default/configmap/ghost"
        })
        .await;

    // The cloud goes away while a write waits: 503 now, not 504 at the timeout.
    let started = std::time::Instant::now();
    let pending = request(
        port,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        fixture("configmap.json"),
    );
    passed_to_cloud(&mut app, "insert").await;
    app.set_cloud(false).await;
    let (code, status) = pending.await.unwrap();
    assert_eq!(
        (code, &status["reason"]),
        (503, &json!("ServiceUnavailable")),
        "{status}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "before the 2 s timeout"
    );

    // Away: a status update from the current version holds, and changes the version; a
    // second one from the same read is then a conflict, as kube-apiserver's would be.
    let mut mine = fixture("pod.json");
    mine["metadata"]["name"] = json!("mine");
    mine["spec"]["nodeName"] = json!(NODE);
    mine["metadata"]["resourceVersion"] = json!("5");
    insert(&mut app, "default/pod/mine", &mine).await;
    let status_path = "/api/v1/namespaces/default/pods/mine/status";
    let read = get(port, "/api/v1/namespaces/default/pods/mine").await.1;
    let first = read["metadata"]["resourceVersion"].clone();
    let mut after_a = Value::Null;
    for (phase, from, code) in [("A", 0, 200), ("B", 0, 409), ("C", 1, 200)] {
        let mut body = mine.clone();
        body["metadata"]["resourceVersion"] = match from {
            0 => first.clone(),
            _ => after_a["metadata"]["resourceVersion"].clone(),
        };
        body["status"] = json!({"phase": phase});
        let (got, answer) = request(port, "PUT", status_path, "application/json", body)
            .await
            .unwrap();
        assert_eq!(got, code, "{phase}: {answer}");
        if phase == "A" {
            assert_ne!(answer["metadata"]["resourceVersion"], first, "{answer}");
            after_a = answer;
        }
    }
    assert_eq!(
        get(port, "/api/v1/namespaces/default/pods/mine").await.1["status"]["phase"],
        "C"
    );
    let payloads: Vec<String> = rusqlite::Connection::open(app.db_path())
        .unwrap()
        .prepare("SELECT CAST(payload AS TEXT) FROM outbox ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    for payload in &payloads {
        let m: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(
            m["content"][0]["op"], "add",
            "no version test is queued: {m}"
        );
    }
    // Every refusal has its log line, with the path, code and reason.
    let log = app.log();
    let refused = log
        .lines()
        .find(|l| l.contains("API write refused") && l.contains("code=409"))
        .unwrap_or_else(|| panic!("a log line for the 409 in:\n{log}"));
    assert!(
        refused.contains(status_path) && refused.contains("has been modified"),
        "{refused}"
    );
}

/// A status patch queued while the cloud is away and answered after a restart: the answer is
/// still stored, because which patches wait for an answer is kept in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_a_restart_to_a_queued_status_patch_is_stored() {
    let Some(mut app) = spawn(BrokerKind::Embedded).await else {
        return;
    };
    let mut node = fixture("node.json");
    node["metadata"]["name"] = json!(NODE);
    let key = format!("default/node/{NODE}");
    insert(&mut app, &key, &node).await;
    let patch = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    let (code, _) = request(
        app.http_port,
        "PATCH",
        &format!("/api/v1/nodes/{NODE}/status"),
        "application/merge-patch+json",
        patch,
    )
    .await
    .unwrap();
    assert_eq!(code, 200);

    app.restart().await;
    app.set_cloud(true).await;
    let asked = passed_to_cloud(&mut app, "patch").await;
    let mut in_cloud = node.clone();
    in_cloud["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    in_cloud["metadata"]["resourceVersion"] = json!("900");
    answer(&app, &asked, "response", in_cloud.clone()).await;
    let path = format!("/api/v1/nodes/{NODE}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, stored) = get(app.http_port, &path).await;
        if stored == served(&app, &format!("default/node/{NODE}"), &in_cloud) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cloud's answer is stored: {stored}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        count_rows(&app, "SELECT count(*) FROM sent_patches"),
        0,
        "answered, so no longer waited for"
    );
}

/// A write whose client hung up keeps its place under the write cap until the cloud answers
/// or the wait ends: clients that send and hang up cannot pile up writes waiting in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_client_hung_up_keeps_its_place_until_it_ends() {
    let options = Options::new(BrokerKind::Embedded)
        .yaml("meta:\n  remote_query_timeout: 2s\n")
        .http("max_requests: 2");
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };
    let port = app.http_port;
    app.set_cloud(true).await;
    let body = fixture("configmap.json").to_string();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request_text = format!(
        "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request_text.as_bytes())
        .await
        .unwrap();
    passed_to_cloud(&mut app, "insert").await;
    drop(stream);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let configmaps = "/api/v1/namespaces/default/configmaps";
    let mut second = fixture("configmap.json");
    second["metadata"]["name"] = json!("second");
    let (code, status) = request(port, "POST", configmaps, "application/json", second.clone())
        .await
        .unwrap();
    assert_eq!(
        code, 429,
        "the hung-up write still holds its place: {status}"
    );
    // Its wait ends at the timeout; then the place is free again.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let pending = request(port, "POST", configmaps, "application/json", second);
    let asked = passed_to_cloud(&mut app, "insert").await;
    answer(&app, &asked, "response", asked["content"].clone()).await;
    assert_eq!(pending.await.unwrap().0, 201);
}
