//! The official Kubernetes Python client (`pip install kubernetes`) against the real binary:
//! a list, a watch resumed from that list's version across a MetaManager restart, and a custom
//! resource through the dynamic client, which finds it by discovery; and, while the cloud is
//! away, a pod status patch (taken here) and a label patch (503). The steps are in
//! `tests/python/client.py`.

mod common;

use std::process::Command;

use common::{count_rows, message, BrokerKind, Options, TestApp, NODE};
use serde_json::{json, Value};

/// Whether python3 with the `kubernetes` package is here; with METAMANAGER_REQUIRE_PYTHON_K8S=1
/// (CI) its absence fails the test instead of skipping it.
fn python_client() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("METAMANAGER_REQUIRE_PYTHON_K8S").as_deref() == Ok("1") {
            panic!("the Python kubernetes client is not installed and METAMANAGER_REQUIRE_PYTHON_K8S=1");
        }
        eprintln!("skipped: python3 -m pip install kubernetes");
    }
    ok
}

/// Runs one step of client.py; its JSON output.
fn step(args: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "creationTimestamp": "2026-11-28T10:00:00Z"},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

async fn insert(app: &mut TestApp, key: &str, object: Value) {
    let reply = app
        .client
        .request("edgehub", &message("insert", key, object))
        .await;
    assert_eq!(reply["content"], "OK", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_lists_watches_across_a_restart_and_reads_a_custom_resource() {
    if !python_client() {
        return;
    }
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Embedded)).await else {
        return;
    };
    insert(&mut app, "default/pod/first", pod("first")).await;
    let model = json!({"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
        "metadata": {"name": "thermometer", "namespace": "default"}, "spec": {"protocol": "modbus"}});
    insert(&mut app, "default/devicemodel/thermometer", model).await;

    let host = format!("http://127.0.0.1:{}", app.http_port);
    let listed = step(&["list", &host, "default"]);
    assert_eq!(listed["names"], json!(["first"]));
    let version = listed["resourceVersion"].as_str().unwrap().to_owned();

    app.restart().await;
    insert(&mut app, "default/pod/second", pod("second")).await;
    let host = format!("http://127.0.0.1:{}", app.http_port);
    let watched = step(&["watch", &host, "default", &version]);
    assert_eq!(
        watched["events"],
        json!([["ADDED", "second"]]),
        "resumed after the restart"
    );

    let devices = step(&["devices", &host, "default"]);
    assert_eq!(devices["names"], json!(["thermometer"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_patches_a_pods_status_while_the_cloud_is_away() {
    if !python_client() {
        return;
    }
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Embedded)).await else {
        return;
    };
    let mut mine = pod("mine");
    mine["spec"]["nodeName"] = json!(NODE);
    mine["status"] = json!({"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]});
    insert(&mut app, "default/pod/mine", mine).await;
    let host = format!("http://127.0.0.1:{}", app.http_port);

    let patched = step(&["status", &host, "default", "mine"]);
    assert_eq!(
        patched["conditions"],
        json!([["PodScheduled", "True"], ["Ready", "False"]]),
        "merged by condition type"
    );
    assert_eq!(
        count_rows(&app, "SELECT count(*) FROM outbox"),
        1,
        "queued for the cloud"
    );

    let refused = step(&["label", &host, "default", "mine"]);
    assert_eq!(
        refused,
        json!({"status": 503, "reason": "ServiceUnavailable"})
    );
}
