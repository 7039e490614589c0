//! The HTTP endpoint against the real binary: probes, the read-only Kubernetes-style API
//! (with a raw HTTP client and with kubectl), and watches, including one that never reads.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kubectl::{kubectl_cmd, kubectl_home, kubectl_out};
use common::{fixture, http, insert, message, msg_id, served, BrokerKind, Options, TestApp, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get_json(port: u16, path: &str) -> (u16, Value) {
    let (code, head, body) = http(port, "GET", path).await;
    assert!(head.contains("content-type: application/json"), "{head}");
    (code, serde_json::from_str(&body).unwrap())
}

fn pod(ns: &str, name: &str, app_label: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": app_label}},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

/// The whole answer to `GET path` with the header lines `headers` (no trailing line end).
async fn raw_get(port: u16, path: &str, headers: String) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\n{headers}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    raw
}

/// Inserts [`pod`] at its own key.
async fn insert_pod(app: &mut TestApp, ns: &str, name: &str, app_label: &str) {
    insert(app, &format!("{ns}/pod/{name}"), pod(ns, name, app_label)).await;
}

/// Asks for the watch at `path` (path and query) on `stream`; the events follow as it runs.
async fn request_watch(stream: &mut tokio::net::TcpStream, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
}

/// [`request_watch`] on a fresh connection.
async fn watch(port: u16, path: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    request_watch(&mut stream, path).await;
    stream
}

/// The watch events in a streamed response read so far.
fn events(seen: &str) -> Vec<Value> {
    seen.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        // Chunk-size lines of the HTTP framing are not events.
        .filter(|e| e.get("type").is_some())
        .collect()
}

/// Each event's type and object name, in order.
fn types_and_names(events: &[Value]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_and_healthz_stays_up() {
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Mosquitto)).await else {
        return;
    };
    let port = app.http_port;
    assert_eq!(http(port, "GET", "/healthz").await.0, 200);
    assert_eq!(http(port, "GET", "/healthz").await.2, "ok");
    let (code, body) = get_json(port, "/readyz").await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        json!({"store": "ok", "broker": "connected", "new_connection": "ok"})
    );
    let (code, head, _) = http(port, "GET", "/metrics").await;
    assert_eq!(code, 200);
    // The OpenMetrics text format, as the server declares it (the head is in lower case).
    assert!(
        head.lines().any(
            |l| l == "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        ),
        "{head}"
    );

    app.mosquitto.as_mut().unwrap().kill();
    // The link notices at once; the fresh-connection check within its cache time (5 s).
    let body = readyz_until(port, |code, body| {
        code == 503 && body["new_connection"] != "ok"
    })
    .await;
    assert_eq!(body["store"], "ok");
    assert_eq!(body["broker"], "disconnected");
    assert!(
        body["new_connection"]
            .as_str()
            .is_some_and(|why| why.contains("refused") || why.contains("onnect")),
        "{body}"
    );
    assert_eq!(http(port, "GET", "/healthz").await.0, 200);
}

/// Polls `/readyz` until `done(code, body)`, for at most [`WAIT`]; returns the body.
async fn readyz_until(port: u16, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = get_json(port, "/readyz").await;
        if done(code, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "readyz stayed {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_the_broker_takes_no_new_client_though_metamanagers_links_are_up() {
    let Some(binary) = common::mosquitto_binary() else {
        return;
    };
    let mosquitto = common::Mosquitto::start_with(&binary, |port, _| {
        format!("listener {port} 127.0.0.1\nmax_connections 6\nallow_anonymous true\npersistence false\n")
    });
    let app = TestApp::spawn_on(Options::new(BrokerKind::Mosquitto), mosquitto).await;
    readyz_until(app.http_port, |code, _| code == 200).await;

    // Other clients take every connection left; MetaManager's own two stay up.
    let mut held = Vec::new();
    while let Some(conn) = mqtt_connect(app.mosquitto.as_ref().unwrap().port, held.len()).await {
        held.push(conn);
        assert!(
            held.len() <= 6,
            "mosquitto took more than its max_connections"
        );
    }
    let body = readyz_until(app.http_port, |code, _| code == 503).await;
    assert_eq!(body["store"], "ok");
    assert_eq!(
        body["broker"], "connected",
        "MetaManager's own links stay up"
    );
    assert_ne!(body["new_connection"], "ok", "{body}");
    assert!(app
        .log()
        .contains("a new client cannot connect to the broker"));

    // Room again: ready again once the cached result is stale.
    drop(held);
    readyz_until(app.http_port, |code, _| code == 200).await;
}

/// An MQTT 3.1.1 connection as client `n`, or `None` when the broker refuses or closes it.
async fn mqtt_connect(port: u16, n: usize) -> Option<tokio::net::TcpStream> {
    let id = format!("filler-{n}");
    let mut packet = vec![0x10, (12 + id.len()) as u8, 0, 4];
    packet.extend_from_slice(b"MQTT");
    packet.extend_from_slice(&[4, 2, 0, 60, 0, id.len() as u8]);
    packet.extend_from_slice(id.as_bytes());
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream.write_all(&packet).await.ok()?;
    let mut connack = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut connack));
    match read.await {
        Ok(Ok(_)) if connack == [0x20, 2, 0, 0] => Some(stream),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_get_list_selectors_and_methods_not_allowed() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    let nginx = fixture("pod.json");
    let nginx_name = nginx["metadata"]["name"].as_str().unwrap().to_owned();
    insert(
        &mut app,
        &format!("default/pod/{nginx_name}"),
        nginx.clone(),
    )
    .await;
    insert_pod(&mut app, "default", "db-0", "db").await;
    insert_pod(&mut app, "other", "web-1", "nginx").await;
    insert(
        &mut app,
        "default/configmap/app-config",
        fixture("configmap.json"),
    )
    .await;
    let node = fixture("node.json");
    insert(&mut app, "default/node/edge-node-1", node.clone()).await;

    // Discovery.
    let (code, api) = get_json(port, "/api").await;
    assert_eq!(code, 200);
    assert_eq!(api["kind"], "APIVersions");
    assert_eq!(api["versions"], json!(["v1"]));
    assert_eq!(
        api["serverAddressByClientCIDRs"][0]["clientCIDR"],
        "0.0.0.0/0"
    );
    let (_, apis) = get_json(port, "/apis").await;
    assert_eq!(apis["kind"], "APIGroupList");
    let groups: Vec<&str> = apis["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["coordination.k8s.io", "events.k8s.io"], "{apis}");
    let (_, v1) = get_json(port, "/api/v1").await;
    assert_eq!(v1["kind"], "APIResourceList");
    assert_eq!(v1["groupVersion"], "v1");
    let resources = v1["resources"].as_array().unwrap();
    let names: Vec<&str> = resources
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .filter(|n| !n.contains('/'))
        .collect();
    assert_eq!(
        names,
        [
            "pods",
            "configmaps",
            "secrets",
            "nodes",
            "services",
            "endpoints",
            "events"
        ]
    );
    let nodes = resources.iter().find(|r| r["name"] == "nodes").unwrap();
    assert_eq!(nodes["namespaced"], false);
    assert_eq!(nodes["kind"], "Node");
    assert_eq!(
        nodes["verbs"],
        json!(["create", "delete", "get", "list", "patch", "update", "watch"])
    );
    let status = resources
        .iter()
        .find(|r| r["name"] == "pods/status")
        .unwrap();
    assert_eq!(status["verbs"], json!(["get", "patch", "update"]));

    // Aggregated discovery, as kubectl asks for it: the same kinds in one answer per root.
    let aggregated = "Host: localhost\r\nAccept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json".to_owned();
    for (path, group) in [("/api", ""), ("/apis", "coordination.k8s.io")] {
        let raw = raw_get(port, path, aggregated.clone()).await;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_lowercase().contains(
                "content-type: application/json;g=apidiscovery.k8s.io;v=v2;as=apigroupdiscoverylist"
            ),
            "{head}"
        );
        let list: Value = serde_json::from_str(&common::dechunk(body)).unwrap();
        assert_eq!(list["kind"], "APIGroupDiscoveryList");
        assert_eq!(list["apiVersion"], "apidiscovery.k8s.io/v2");
        let first = &list["items"][0];
        assert_eq!(first["metadata"]["name"], group, "{list}");
        let resource = &first["versions"][0]["resources"][0];
        assert_eq!(first["versions"][0]["version"], "v1");
        if group.is_empty() {
            assert_eq!(resource["resource"], "pods");
            assert_eq!(resource["scope"], "Namespaced");
            assert_eq!(resource["responseKind"]["kind"], "Pod");
            assert_eq!(resource["subresources"][0]["subresource"], "status");
            let core: Vec<&str> = first["versions"][0]["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["resource"].as_str().unwrap())
                .collect();
            assert_eq!(core, names, "the classic list's kinds");
        } else {
            assert_eq!(resource["resource"], "leases");
        }
    }

    // Get: as stored, with the node's version of it (the cloud's stays in the store).
    let (code, got) = get_json(
        port,
        &format!("/api/v1/namespaces/default/pods/{nginx_name}"),
    )
    .await;
    assert_eq!(code, 200);
    let nginx_key = format!("default/pod/{nginx_name}");
    assert_eq!(got, served(&app, &nginx_key, &nginx));
    assert_ne!(
        got["metadata"]["resourceVersion"],
        nginx["metadata"]["resourceVersion"]
    );
    let (code, got) = get_json(port, "/api/v1/nodes/edge-node-1").await;
    assert_eq!(code, 200);
    assert_eq!(got, served(&app, "default/node/edge-node-1", &node));

    // Missing object: a Status, as kube-apiserver answers.
    let (code, status) = get_json(port, "/api/v1/namespaces/default/pods/x").await;
    assert_eq!(code, 404);
    assert_eq!(
        status,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "pods \"x\" not found", "reason": "NotFound",
               "details": {"name": "x", "kind": "pods"}, "code": 404})
    );
    let (code, status) = get_json(port, "/api/v1/widgets").await;
    assert_eq!((code, &status["reason"]), (404, &json!("NotFound")));

    // Methods a path does not take.
    for (method, path) in [
        ("POST", "/api/v1/pods"),
        ("PUT", "/api/v1/namespaces/default/pods"),
        ("POST", "/api/v1/namespaces/default/pods/db-0"),
        ("DELETE", "/api/v1/namespaces/default/pods"),
        ("DELETE", "/api/v1/namespaces/default/pods/db-0/status"),
    ] {
        let (code, _, body) = http(port, method, path).await;
        assert_eq!(code, 405, "{method} {path}");
        let status: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["reason"], "MethodNotAllowed");
        assert_eq!(status["code"], 405);
    }
    // Writes the cloud must make, while it is away (tests/api_writes.rs has the rest).
    for path in [
        "/api/v1/namespaces/default/pods/db-0",
        "/api/v1/nodes/edge-node-1",
    ] {
        let (code, _, body) = http(port, "DELETE", path).await;
        assert_eq!(code, 503, "DELETE {path}: {body}");
        let status: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["reason"], "ServiceUnavailable");
    }

    // Lists and selectors.
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (code, all) = get_json(port, "/api/v1/pods").await;
    assert_eq!(code, 200);
    assert_eq!(all["kind"], "PodList");
    assert_eq!(all["apiVersion"], "v1");
    assert!(all["metadata"]["resourceVersion"].is_string());
    assert_eq!(names(&all), ["db-0", nginx_name.as_str(), "web-1"]);
    assert_eq!(
        all["items"][1],
        served(&app, &nginx_key, &nginx),
        "items as stored, with the node's versions"
    );
    let list_version: u64 = all["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for item in all["items"].as_array().unwrap() {
        let v: u64 = item["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(v <= list_version, "an item's version is at most the list's");
    }
    let (_, default) = get_json(port, "/api/v1/namespaces/default/pods").await;
    assert_eq!(names(&default), ["db-0", nginx_name.as_str()]);
    let (_, l) = get_json(port, "/api/v1/pods?labelSelector=app%3Dnginx").await;
    assert_eq!(names(&l), [nginx_name.as_str(), "web-1"]);
    let (_, l) = get_json(port, "/api/v1/pods?labelSelector=app%21%3Dnginx").await;
    assert_eq!(names(&l), ["db-0"]);
    let (_, l) = get_json(
        port,
        "/api/v1/pods?labelSelector=app%3D%3Dnginx,pod-template-hash%3D7d9c5b8f4",
    )
    .await;
    assert_eq!(names(&l), [nginx_name.as_str()]);
    let (_, l) = get_json(port, "/api/v1/pods?fieldSelector=metadata.name%3Ddb-0").await;
    assert_eq!(names(&l), ["db-0"]);
    let (_, l) = get_json(
        port,
        "/api/v1/pods?fieldSelector=metadata.namespace%21%3Ddefault",
    )
    .await;
    assert_eq!(names(&l), ["web-1"]);
    let (code, status) = get_json(port, "/api/v1/pods?fieldSelector=spec.schedulerName%3Dx").await;
    assert_eq!((code, &status["reason"]), (400, &json!("BadRequest")));
    let (_, cms) = get_json(port, "/api/v1/namespaces/default/configmaps").await;
    assert_eq!(cms["kind"], "ConfigMapList");
    let config = fixture("configmap.json");
    let config = served(&app, "default/configmap/app-config", &config);
    assert_eq!(cms["items"], json!([config]));
    let (_, nodes) = get_json(port, "/api/v1/nodes").await;
    let node = served(&app, "default/node/edge-node-1", &node);
    assert_eq!(nodes["items"], json!([node]));
}

/// kubectl, or `None` (skip) when it is not installed and not required.
/// Waits for a line of output that contains `want`.
async fn wait_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>, want: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) if line.contains(want) => return line,
            Ok(Some(_)) => {}
            other => panic!("kubectl -w never printed {want}: {other:?}"),
        }
    }
}

/// Reads a streamed response into `seen` until it contains `want`.
async fn read_until(stream: &mut tokio::net::TcpStream, seen: &mut String, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = vec![0u8; 65536];
    while !seen.contains(want) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {want} in {seen}"))
            .unwrap();
        assert!(n > 0, "stream ended before {want}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_gets_lists_and_watches() {
    let Some(home) = kubectl_home() else {
        return;
    };
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    let nginx = fixture("pod.json");
    let name = nginx["metadata"]["name"].as_str().unwrap().to_owned();
    let insert_msg = fixture("insert-pod.message.json");
    app.client.request("edgehub", &insert_msg).await;
    insert(
        &mut app,
        "default/configmap/app-config",
        fixture("configmap.json"),
    )
    .await;

    let all = kubectl_out(port, home.path(), &["get", "pods", "-A"]);
    assert!(all.contains("NAMESPACE") && all.contains(&name), "{all}");
    // Server-side Table output: the columns a real cluster shows for pods.
    let header: Vec<&str> = all.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{all}"
    );
    let row: Vec<&str> = all.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!((row[0], row[1]), ("default", name.as_str()), "{all}");
    assert_eq!(row[2], "0/1", "READY: ready containers of all: {all}");
    assert_eq!(
        Some(row[3]),
        nginx["status"]["phase"].as_str(),
        "STATUS: {all}"
    );
    assert_eq!(row[4], "0", "RESTARTS: {all}");
    let one = kubectl_out(
        port,
        home.path(),
        &["get", "pod", &name, "-n", "default", "-o", "json"],
    );
    let key = format!("default/pod/{name}");
    assert_eq!(
        serde_json::from_str::<Value>(&one).unwrap(),
        served(&app, &key, &nginx)
    );
    let cms = kubectl_out(port, home.path(), &["get", "configmaps", "-n", "default"]);
    assert!(cms.contains("app-config"), "{cms}");
    let header: Vec<&str> = cms.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "AGE"], "other kinds: NAME and AGE: {cms}");

    // A watch prints a pod inserted over MQTT while it runs.
    let mut watcher = kubectl_cmd(port, home.path(), &["get", "pods", "-w", "-n", "default"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // The listed pod first: from then on the watch is established.
    wait_line(&mut lines, &name).await;
    insert_pod(&mut app, "default", "watched-1", "x").await;
    let line = wait_line(&mut lines, "watched-1").await;
    assert_eq!(
        line.split_whitespace().nth(2),
        Some("Unknown"),
        "a row of the table: {line}"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_streams_inserts_updates_and_deletes_in_its_scope() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    insert_pod(&mut app, "default", "before", "a").await;
    let mut stream = watch(
        port,
        "/api/v1/namespaces/default/pods?watch=true&labelSelector=app%3Da",
    )
    .await;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, r#""type":"ADDED""#).await;
    insert_pod(&mut app, "default", "after", "a").await;
    insert_pod(&mut app, "default", "other", "b").await;
    insert_pod(&mut app, "other", "elsewhere", "a").await;
    let mut changed = pod("default", "after", "a");
    changed["spec"]["nodeName"] = json!("n1");
    let m = message("update", "default/pod/after", changed);
    app.client.request("edged", &m).await;
    let m = message("delete", "default/pod/after", Value::Null);
    app.client.request("edgehub", &m).await;
    read_until(&mut stream, &mut seen, r#""type":"DELETED""#).await;
    let events = events(&seen);
    assert_eq!(
        types_and_names(&events),
        [
            ("ADDED", "before"),
            ("ADDED", "after"),
            ("MODIFIED", "after"),
            ("DELETED", "after")
        ]
    );
    assert_eq!(events[2]["object"]["spec"]["nodeName"], "n1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_does_not_slow_the_message_path() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    // A small receive buffer, so the connection is full after a few events.
    let mut stream = common::request_unread(port, "/api/v1/pods?watch=true").await;

    // Established once it has reported a first pod; from then on it is never read.
    insert_pod(&mut app, "default", "marker", "m").await;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "marker").await;

    // 3 000 pods of 8 KiB: more than the watcher's budget (16 MiB) waits for it. They come
    // from edged while the cloud is away, so only the small acks reach this test's own MQTT
    // client (the embedded broker drops what a subscriber of its own falls 3 MiB behind on).
    const N: usize = 3000;
    let padding = "x".repeat(8192);
    let started = Instant::now();
    let mut ids = std::collections::HashSet::new();
    for i in 0..N {
        let mut p = pod("default", &format!("flood-{i:04}"), "flood");
        p["metadata"]["annotations"] = json!({"padding": padding});
        let m = message("insert", &format!("default/pod/flood-{i:04}"), p);
        ids.insert(msg_id(&m).to_owned());
        app.client.publish("edged", &m).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ids.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {N} inserts not acked while a watcher stalls",
            ids.len()
        );
        let Ok(Some((topic, reply))) =
            tokio::time::timeout(Duration::from_secs(1), app.client.next()).await
        else {
            continue;
        };
        if topic == "metamanager/to/edged" && reply["content"] == "OK" {
            if let Some(parent) = reply["header"]["parent_msg_id"].as_str() {
                ids.remove(parent);
            }
        }
    }
    eprintln!(
        "{N} inserts acked in {:?} beside a stalled watcher",
        started.elapsed()
    );

    // Read now: the watcher fell behind by more than its budget, so what it had waiting was
    // let go and its stream ends with an ERROR (410).
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .expect("the stalled watch ends once read")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains(r#""type":"ERROR""#), "no ERROR event");
    // Over its budget, usually; on a loaded machine its task may instead fall behind the
    // change feed itself first. Either way it is told to list again.
    let tail = &text[text.len().saturating_sub(500)..];
    assert!(
        tail.contains("watch fell more than 16777216 bytes behind; list again")
            || tail.contains("watch fell behind; list again"),
        "{tail}"
    );
    // The flood was 25 MB; what reaches the client is only what the kernel's socket
    // buffers and hyper's had taken before the budget ran out.
    assert!(
        text.len() < 16 * 1024 * 1024,
        "what waited was dropped, not sent: {} bytes",
        text.len()
    );
    assert!(text.contains(r#""code":410"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_list_version_misses_nothing_in_between() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    insert_pod(&mut app, "default", "listed", "a").await;
    let (_, list) = get_json(port, "/api/v1/namespaces/default/pods").await;
    let version = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    // Changes after the list and before the watch.
    insert_pod(&mut app, "default", "between", "a").await;
    let m = message("delete", "default/pod/listed", Value::Null);
    app.client.request("edgehub", &m).await;

    let mut stream = watch(
        port,
        &format!("/api/v1/namespaces/default/pods?watch=1&resourceVersion={version}"),
    )
    .await;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, r#""type":"DELETED""#).await;
    insert_pod(&mut app, "default", "later", "a").await;
    read_until(&mut stream, &mut seen, "later").await;
    assert_eq!(
        types_and_names(&events(&seen)),
        [
            ("ADDED", "between"),
            ("DELETED", "listed"),
            ("ADDED", "later")
        ]
    );

    // A version the node never gave out, or no longer holds: list again.
    let (code, head, body) = http(
        port,
        "GET",
        "/api/v1/namespaces/default/pods?watch=true&resourceVersion=1",
    )
    .await;
    assert_eq!(code, 200, "{head}");
    assert!(body.contains(r#""type":"ERROR""#), "{body}");
    assert!(body.contains(r#""code":410"#), "{body}");
    let (code, _, _) = http(
        port,
        "GET",
        "/api/v1/namespaces/default/pods?watch=true&resourceVersion=abc",
    )
    .await;
    assert_eq!(code, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_objects_a_remote_query_fetched_from_the_cloud() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    app.set_cloud(true).await;
    let mut stream = watch(port, "/api/v1/secrets?watch=true").await;
    // The response head arrives once the (empty) watch is set up.
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "\r\n\r\n").await;

    let key = "default/secret/db-credentials";
    let query = message("query", key, Value::Null);
    app.client.publish("edged", &query).await;
    let asked = app
        .client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["operation"] == "query"
        })
        .await;
    let secret = fixture("secret.json");
    let mut answer = message("response", key, secret.clone());
    answer["header"]["parent_msg_id"] = asked["header"]["msg_id"].clone();
    app.client.publish("edgehub", &answer).await;
    app.client
        .reply_to("metamanager/to/edged", msg_id(&query))
        .await;

    read_until(&mut stream, &mut seen, "db-credentials").await;
    assert_eq!(
        events(&seen)[0],
        json!({"type": "ADDED", "object": served(&app, key, &secret)})
    );
}

#[test]
fn an_http_port_in_use_stops_start_up_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.yaml");
    std::fs::write(
        &config,
        format!(
            "mqtt:\n  port: {}\ndatabase:\n  path: {}\nhttp:\n  listen: {http}\n",
            common::free_port(),
            dir.path().join("m.db").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .arg("-c")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&http.to_string()), "{stderr}");
    assert!(stderr.contains("http.listen"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_honour_limit_and_continue_and_kubectl_pages_through_them() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    for i in 0..5 {
        let name = format!("p{i}");
        insert(
            &mut app,
            &format!("default/pod/{name}"),
            pod("default", &name, "a"),
        )
        .await;
    }
    insert(
        &mut app,
        "other/pod/elsewhere",
        pod("other", "elsewhere", "a"),
    )
    .await;

    let mut names = Vec::new();
    let mut path = "/api/v1/namespaces/default/pods?limit=2".to_owned();
    let mut versions = std::collections::HashSet::new();
    let mut pages = 0;
    loop {
        let (code, list) = get_json(port, &path).await;
        assert_eq!(code, 200, "{list}");
        assert_eq!(list["kind"], "PodList");
        let items = list["items"].as_array().unwrap();
        assert!(items.len() <= 2, "{list}");
        names.extend(
            items
                .iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()),
        );
        versions.insert(list["metadata"]["resourceVersion"].clone());
        pages += 1;
        match list["metadata"]["continue"].as_str() {
            Some(token) => {
                path = format!("/api/v1/namespaces/default/pods?limit=2&continue={token}")
            }
            None => break,
        }
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!(
        names,
        ["p0", "p1", "p2", "p3", "p4"],
        "every pod once, in key order"
    );
    assert_eq!(
        versions.len(),
        1,
        "every page reports the first page's version"
    );

    // Without a limit, one answer holds them all and carries no token.
    let (_, all) = get_json(port, "/api/v1/pods").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 6);
    assert!(all["metadata"].get("continue").is_none(), "{all}");

    let (code, status) = get_json(port, "/api/v1/pods?limit=2&continue=nonsense").await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    let (code, status) = get_json(port, "/api/v1/pods?limit=-1").await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));

    // kubectl asks in chunks and follows the tokens.
    let Some(home) = kubectl_home() else {
        return;
    };
    let listed = kubectl_out(
        port,
        home.path(),
        &["get", "pods", "-A", "--chunk-size=2", "-o", "name"],
    );
    assert_eq!(listed.lines().count(), 6, "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_name_is_refused_on_loopback() {
    let app = TestApp::embedded().await;
    let port = app.http_port;
    let ask = |host: &'static str| raw_get(port, "/api/v1/secrets", format!("Host: {host}"));
    // A page served from rebind.example, whose name now resolves to 127.0.0.1.
    let refused = ask("rebind.example:10550").await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains(r#""reason":"Forbidden""#), "{refused}");
    assert!(refused.contains("http.allowed_hosts"), "{refused}");
    for host in ["localhost:10550", "127.0.0.1", "[::1]:10550"] {
        let answer = ask(host).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_based_selectors_pod_field_selectors_and_version() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    for (name, label, node, phase) in [
        ("web-0", "web", "edge-node", "Running"),
        ("web-1", "web", "other-node", "Running"),
        ("db-0", "db", "edge-node", "Pending"),
        ("cache-0", "cache", "edge-node", "Failed"),
    ] {
        let mut p = pod("default", name, label);
        p["spec"]["nodeName"] = json!(node);
        p["status"] = json!({"phase": phase});
        insert(&mut app, &format!("default/pod/{name}"), p).await;
    }
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let list = |query: &'static str| async move {
        let (code, list) =
            get_json(port, &format!("/api/v1/namespaces/default/pods?{query}")).await;
        assert_eq!(code, 200, "{query}: {list}");
        list
    };
    assert_eq!(
        names(&list("labelSelector=app%20in%20(web%2Cdb)").await),
        ["db-0", "web-0", "web-1"]
    );
    assert_eq!(
        names(&list("labelSelector=app%20notin%20(web)").await),
        ["cache-0", "db-0"]
    );
    // What a node agent asks: its own pods that have not failed.
    assert_eq!(
        names(&list("fieldSelector=spec.nodeName%3Dedge-node%2Cstatus.phase!%3DFailed").await),
        ["db-0", "web-0"]
    );
    let (code, status) = get_json(port, "/api/v1/configmaps?fieldSelector=spec.nodeName%3Dx").await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));

    let (code, version) = get_json(port, "/version").await;
    assert_eq!(code, 200);
    assert_eq!(version["major"], "1");
    assert!(version["gitVersion"]
        .as_str()
        .unwrap()
        .contains("+metamanager-"));

    let Some(home) = kubectl_home() else {
        return;
    };
    let selected = kubectl_out(
        port,
        home.path(),
        &[
            "get",
            "pods",
            "-n",
            "default",
            "-l",
            "app in (db,cache)",
            "-o",
            "name",
        ],
    );
    assert_eq!(selected, "pod/cache-0\npod/db-0\n");
    let out = kubectl_cmd(
        port,
        home.path(),
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=other-node",
            "-o",
            "name",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pod/web-1\n");
    let out = kubectl_cmd(port, home.path(), &["version", "-o", "json"])
        .output()
        .unwrap();
    let versions: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(versions["serverVersion"]["major"], "1", "{versions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_with_a_timeout_ends_with_a_bookmark_to_resume_from() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    insert_pod(&mut app, "default", "first", "a").await;
    let started = Instant::now();
    let (code, _, body) = http(
        port,
        "GET",
        "/api/v1/pods?watch=true&allowWatchBookmarks=true&timeoutSeconds=1",
    )
    .await;
    assert_eq!(code, 200);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    let first = events(&body);
    assert_eq!(first[0]["type"], "ADDED");
    let last = first.last().unwrap();
    assert_eq!(last["type"], "BOOKMARK", "{body}");
    assert_eq!(last["object"]["kind"], "Pod");
    let version = last["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();

    // Resumed from the bookmark: only what came after it.
    insert_pod(&mut app, "default", "second", "a").await;
    let path = format!("/api/v1/pods?watch=true&resourceVersion={version}&timeoutSeconds=1");
    let (code, _, body) = http(port, "GET", &path).await;
    assert_eq!(code, 200);
    assert_eq!(types_and_names(&events(&body)), [("ADDED", "second")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_is_served_to_clients_that_accept_it_and_406_to_protobuf_only_ones() {
    let app = TestApp::embedded().await;
    let port = app.http_port;
    let ask = |accept: &'static str| {
        raw_get(
            port,
            "/api/v1/pods",
            format!("Host: localhost\r\nAccept: {accept}"),
        )
    };
    let refused = ask("application/vnd.kubernetes.protobuf").await;
    assert!(refused.starts_with("HTTP/1.1 406"), "{refused}");
    assert!(refused.contains(r#""reason":"NotAcceptable""#), "{refused}");
    let served = ask("application/vnd.kubernetes.protobuf, application/json").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(served.contains(r#""kind":"PodList""#), "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_kind_the_cloud_inserts_is_served_under_its_group_and_found_by_kubectl() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    let model = json!({"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
        "metadata": {"name": "thermometer", "namespace": "default"},
        "spec": {"protocol": "modbus", "properties": [{"name": "temperature", "type": "float"}]}});
    insert(&mut app, "default/devicemodel/thermometer", model.clone()).await;
    // Cluster-scoped (no namespace in the object), though stored under `default`.
    let class = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local-path"}, "provisioner": "rancher.io/local-path"});
    insert(&mut app, "default/storageclass/local-path", class.clone()).await;

    let (code, groups) = get_json(port, "/apis").await;
    assert_eq!(code, 200);
    let names: Vec<&str> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "coordination.k8s.io",
            "events.k8s.io",
            "devices.kubeedge.io",
            "storage.k8s.io"
        ],
        "{groups}"
    );
    let (code, resources) = get_json(port, "/apis/devices.kubeedge.io/v1beta1").await;
    assert_eq!(code, 200);
    assert_eq!(resources["resources"][0]["name"], "devicemodels");
    assert_eq!(resources["resources"][0]["namespaced"], true);
    let (_, list) = get_json(
        port,
        "/apis/devices.kubeedge.io/v1beta1/namespaces/default/devicemodels",
    )
    .await;
    assert_eq!(list["kind"], "DeviceModelList");
    assert_eq!(
        list["apiVersion"], "devices.kubeedge.io/v1beta1",
        "its items' group"
    );
    let model = served(&app, "default/devicemodel/thermometer", &model);
    assert_eq!(list["items"], json!([model]));
    let (_, one) = get_json(port, "/apis/storage.k8s.io/v1/storageclasses/local-path").await;
    assert_eq!(one, served(&app, "default/storageclass/local-path", &class));
    let (code, _) = get_json(
        port,
        "/apis/storage.k8s.io/v1/namespaces/default/storageclasses/local-path",
    )
    .await;
    assert_eq!(code, 404, "cluster-scoped: not under a namespace");
    let (code, _) = get_json(port, "/apis/nothing.example/v1/things").await;
    assert_eq!(code, 404);
    // A cluster-scoped kind listed under a namespace: 404, as from kube-apiserver, not every
    // object to a client whose access may be limited to that namespace.
    for path in [
        "/apis/storage.k8s.io/v1/namespaces/default/storageclasses",
        "/api/v1/namespaces/default/nodes",
    ] {
        let (code, status) = get_json(port, path).await;
        assert_eq!(code, 404, "{path}: {status}");
    }

    let Some(home) = kubectl_home() else {
        return;
    };
    let kinds = kubectl_out(
        port,
        home.path(),
        &["api-resources", "--no-headers", "-o", "name"],
    );
    for want in [
        "pods",
        "devicemodels.devices.kubeedge.io",
        "storageclasses.storage.k8s.io",
    ] {
        assert!(
            kinds.lines().any(|l| l == want),
            "api-resources lacks {want}: {kinds}"
        );
    }
    let models = kubectl_out(
        port,
        home.path(),
        &["get", "devicemodels", "-n", "default", "-o", "name"],
    );
    assert_eq!(models.trim(), "devicemodel.devices.kubeedge.io/thermometer");
    let classes = kubectl_out(port, home.path(), &["get", "storageclasses"]);
    assert!(classes.contains("local-path"), "{classes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_version_given_out_before_a_restart_resumes_after_it() {
    let mut app = TestApp::embedded().await;
    insert_pod(&mut app, "default", "before", "a").await;
    let (_, list) = get_json(app.http_port, "/api/v1/namespaces/default/pods").await;
    let version = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();

    app.restart().await;
    insert_pod(&mut app, "default", "after", "a").await;
    let (_, again) = get_json(app.http_port, "/api/v1/namespaces/default/pods").await;
    let later: u64 = again["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        later > version.parse::<u64>().unwrap(),
        "numbers go on across the restart"
    );

    let path = format!(
        "/api/v1/namespaces/default/pods?watch=true&resourceVersion={version}&timeoutSeconds=1"
    );
    let (code, _, body) = http(app.http_port, "GET", &path).await;
    assert_eq!(code, 200);
    assert!(
        !body.contains(r#""code":410"#),
        "resumed, not expired: {body}"
    );
    assert_eq!(types_and_names(&events(&body)), [("ADDED", "after")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_watch_resumed_over_an_unwatched_delete_is_told_of_it() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    insert_pod(&mut app, "default", "gone", "a").await;
    let (_, list) = get_json(
        port,
        "/api/v1/namespaces/default/pods?labelSelector=app%3Da",
    )
    .await;
    let version = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    // Deleted while nobody watches: the feed keeps the key, not the object's labels.
    let m = message("delete", "default/pod/gone", Value::Null);
    app.client.request("edgehub", &m).await;
    let path = format!(
        "/api/v1/namespaces/default/pods?watch=true&labelSelector=app%3Da&resourceVersion={version}&timeoutSeconds=1"
    );
    let (code, _, body) = http(port, "GET", &path).await;
    assert_eq!(code, 200);
    assert_eq!(types_and_names(&events(&body)), [("DELETED", "gone")]);

    // A timeout too large for the clock is no timeout, not a failed request.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /api/v1/pods?watch=true&timeoutSeconds=18446744073709551615 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = String::new();
    read_until(&mut stream, &mut head, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// A streaming list, as informers ask for one: the objects as `ADDED`, then a `BOOKMARK`
/// annotated `k8s.io/initial-events-end` at the version they are as of, then live events, each
/// carrying the node's number of its change. The parameters are checked as kube-apiserver
/// checks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_list_ends_its_initial_events_with_the_annotated_bookmark() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    insert_pod(&mut app, "default", "a", "x").await;
    insert_pod(&mut app, "default", "b", "x").await;
    let base = "/api/v1/namespaces/default/pods?watch=true&sendInitialEvents=true&allowWatchBookmarks=true";
    let mut stream = watch(port, &format!("{base}&resourceVersionMatch=NotOlderThan")).await;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "initial-events-end").await;
    insert_pod(&mut app, "default", "c", "x").await;
    read_until(&mut stream, &mut seen, r#""name":"c","namespace""#).await;
    while events(&seen).len() < 4 {
        // The rest of c's line.
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the rest of c's event")
            .unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let got = events(&seen);
    assert_eq!(types_and_names(&got[..2]), [("ADDED", "a"), ("ADDED", "b")]);
    let bookmark = &got[2];
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(bookmark["object"]["apiVersion"], "v1");
    assert_eq!(
        bookmark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let version = |e: &Value| -> u64 {
        e["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let at = version(bookmark);
    assert_eq!(version(&got[0]), at - 1, "a, then b, the last change");
    assert_eq!(version(&got[1]), at);
    assert_eq!(got[3]["type"], "ADDED");
    assert_eq!(version(&got[3]), at + 1, "c: the next change");

    // As kube-apiserver: the match is required with sendInitialEvents, and forbidden without.
    for (path, code) in [
        (base.to_owned(), 422),
        (format!("{base}&resourceVersionMatch=Exact"), 422),
        (
            "/api/v1/pods?watch=true&resourceVersionMatch=NotOlderThan".to_owned(),
            422,
        ),
        (
            format!("{base}&resourceVersionMatch=NotOlderThan&sendInitialEvents=maybe"),
            400,
        ),
    ] {
        let (got, _, body) = http(port, "GET", &path).await;
        assert_eq!(got, code, "{path}: {body}");
    }
    // Without initial events: from now on only.
    let (code, _, body) = http(
        port,
        "GET",
        "/api/v1/namespaces/default/pods?watch=true&sendInitialEvents=false&resourceVersionMatch=NotOlderThan&timeoutSeconds=1",
    )
    .await;
    assert_eq!(code, 200);
    assert!(events(&body).is_empty(), "{body}");
}

/// Every version handed out resumes a watch: an object's from a list, an event's (a `DELETED`
/// one carries its deletion's number, never the object's older one), a bookmark's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_from_an_objects_an_events_or_a_bookmarks_version() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    insert_pod(&mut app, "default", "old", "x").await;
    insert_pod(&mut app, "default", "newer", "x").await;
    let (_, list) = get_json(port, "/api/v1/namespaces/default/pods").await;
    let number = |v: &Value| -> u64 { v.as_str().unwrap().parse().unwrap() };
    let list_version = number(&list["metadata"]["resourceVersion"]);
    let old = number(&list["items"][1]["metadata"]["resourceVersion"]);
    assert_eq!(list["items"][1]["metadata"]["name"], "old");
    assert_eq!(old, list_version - 1);

    // From the older object's version: the change after it.
    let from = |v: u64| {
        format!("/api/v1/namespaces/default/pods?watch=true&resourceVersion={v}&timeoutSeconds=1&allowWatchBookmarks=true")
    };
    let (_, _, body) = http(port, "GET", &from(old)).await;
    let seen = events(&body);
    assert_eq!(types_and_names(&seen[..1]), [("ADDED", "newer")]);
    assert_eq!(
        number(&seen[0]["object"]["metadata"]["resourceVersion"]),
        list_version
    );

    // A deletion: its event carries a new number, above the object's.
    let m = message("delete", "default/pod/old", Value::Null);
    app.client.request("edgehub", &m).await;
    let (_, _, body) = http(port, "GET", &from(list_version)).await;
    let seen = events(&body);
    assert_eq!(types_and_names(&seen[..1]), [("DELETED", "old")]);
    let deleted = number(&seen[0]["object"]["metadata"]["resourceVersion"]);
    assert!(deleted > list_version, "{deleted} after {list_version}");
    // The bookmark that ends a timed-out watch names the version everything was sent up to.
    let last = seen.last().unwrap();
    assert_eq!(last["type"], "BOOKMARK", "{body}");
    let bookmark = number(&last["object"]["metadata"]["resourceVersion"]);
    assert_eq!(bookmark, deleted);

    // From the deletion's (and the bookmark's) version, across a restart: no 410, only what
    // came after.
    app.restart().await;
    insert_pod(&mut app, "default", "after", "x").await;
    let (code, _, body) = http(app.http_port, "GET", &from(bookmark)).await;
    assert_eq!(code, 200);
    assert!(!body.contains(r#""code":410"#), "resumed: {body}");
    let seen = events(&body);
    assert_eq!(types_and_names(&seen[..1]), [("ADDED", "after")]);
}

/// kubectl shows the node's versions, and a replace from a stale read is refused with 409
/// before anything goes to the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_node_versions_and_a_stale_replace_is_a_conflict() {
    let Some(home) = kubectl_home() else {
        return;
    };
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    let config = fixture("configmap.json");
    insert(&mut app, "default/configmap/app-config", config.clone()).await;
    let yaml = kubectl_out(
        port,
        home.path(),
        &[
            "get",
            "configmap",
            "app-config",
            "-n",
            "default",
            "-o",
            "yaml",
        ],
    );
    let served = served(&app, "default/configmap/app-config", &config);
    let version = served["metadata"]["resourceVersion"].as_str().unwrap();
    assert!(
        yaml.contains(&format!("resourceVersion: \"{version}\"")),
        "{yaml}"
    );
    assert!(!yaml.contains("481002"), "not the cloud's: {yaml}");

    // Changed since it was read: the version read is stale.
    let mut changed = config.clone();
    changed["data"] = json!({"mode": "new"});
    let m = message("update", "default/configmap/app-config", changed);
    app.client.request("edgehub", &m).await;
    let manifest = home.path().join("stale.yaml");
    std::fs::write(&manifest, &yaml).unwrap();
    let out = kubectl_cmd(
        port,
        home.path(),
        &["replace", "-f", manifest.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("Conflict") || said.contains("has been modified"),
        "{said}"
    );
    let drained = app
        .client
        .drain(std::time::Duration::from_millis(200))
        .await;
    let to_cloud: Vec<&Value> = drained
        .iter()
        .filter(|(topic, _)| topic.ends_with("metamanager/to/edgehub"))
        .map(|(_, m)| m)
        .collect();
    assert!(
        to_cloud.is_empty(),
        "nothing goes to the cloud: {to_cloud:?}"
    );
}

/// A watcher that stopped reading does not hold the stop up (its stream ends on it, and its
/// connection is not given the grace of a request still being answered), and the process
/// exits right after its `stopped` line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_no_watcher_and_the_exit_follows_the_stopped_line() {
    let mut app = TestApp::embedded().await;
    let port = app.http_port;
    let _reading = watch(port, "/api/v1/pods?watch=true").await;
    let mut stalled = common::request_unread(port, "/api/v1/pods?watch=true").await;
    insert_pod(&mut app, "default", "marker", "m").await;
    let mut seen = String::new();
    read_until(&mut stalled, &mut seen, "marker").await;
    // Enough to fill the stalled connection's buffers: its stream cannot be finished.
    let padding = "x".repeat(64 * 1024);
    for i in 0..40 {
        let mut p = pod("default", &format!("big-{i}"), "big");
        p["metadata"]["annotations"] = json!({"padding": padding});
        insert(&mut app, &format!("default/pod/big-{i}"), p).await;
    }

    let asked = Instant::now();
    let status = app.terminate();
    let exited = std::time::SystemTime::now();
    let took = asked.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "stopped in {took:?}");
    let log = app.log();
    let stopped = log
        .lines()
        .rfind(|l| l.contains(" metamanager::app") && l.ends_with(": stopped"))
        .unwrap_or_else(|| panic!("no stopped line in {log}"));
    let at = humantime::parse_rfc3339(stopped.split_whitespace().next().unwrap()).unwrap();
    let after = exited.duration_since(at).unwrap_or_default();
    assert!(
        after < Duration::from_millis(500),
        "exited {after:?} after its stopped line"
    );
}
