//! The official Kubernetes Python client (`pip install kubernetes`) against the real binary:
//! a list, a watch resumed from that list's version across a MetaManager restart, and a custom
//! resource through the dynamic client, which finds it by discovery; and, while the cloud is
//! away, a pod status patch (taken here) and a label patch (503). The steps are in
//! `tests/python/client.py`.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{count_rows, insert, write_as_cloud, TestApp, NODE};
use serde_json::{json, Value};

/// Whether python3 with the `kubernetes` package is here; with METAMANAGER_REQUIRE_PYTHON_K8S=1
/// (CI) its absence fails the test instead of skipping it.
fn python_client() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::process::skip(
            common::process::Requirement::PythonK8s,
            "the Python kubernetes client is not installed (bash .ci/install-test-tools, then . .venv/bin/activate)",
        );
    }
    ok
}

/// MetaManager on its embedded broker, or `None` (skip) without the Python client.
async fn app() -> Option<TestApp> {
    if !python_client() {
        return None;
    }
    Some(TestApp::embedded().await)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_lists_watches_across_a_restart_and_reads_a_custom_resource() {
    let Some(mut app) = app().await else {
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
    // A typed client decodes the list by its kind and version: those of its items.
    assert_eq!(devices["kind"], "DeviceModelList");
    assert_eq!(devices["apiVersion"], "devices.kubeedge.io/v1beta1");
    assert_eq!(
        devices["items"],
        json!([["DeviceModel", "devices.kubeedge.io/v1beta1"]])
    );
}

/// client.py's informer loop, running: its lines as they come.
struct Informer {
    child: std::process::Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Informer {
    fn start(app: &TestApp, timeout_seconds: u32) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client.py");
        let host = format!("http://127.0.0.1:{}", app.http_port);
        let mut child = Command::new("python3")
            .arg(script)
            .args(["informer", &host, "default", &timeout_seconds.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Lines up to and including the first that `wanted` accepts.
    async fn until(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no {what} from the informer; it said {:#?}",
                        self.seen
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    panic!("the informer ended before {what}: {:#?}", self.seen)
                }
            }
        }
    }

    /// Waits until a watch request is answered, which is when MetaManager is watching for it.
    async fn watching(&mut self) {
        self.until("a watch", |l| l.get("watching").is_some()).await;
    }

    /// Waits until its latest watch request was answered and nothing has ended it since for
    /// a while: after a restart, a request the old process answered while it stopped is
    /// followed at once by the stream's end or break.
    async fn live(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let state = |l: &Value| {
            ["watching", "broken", "ended"]
                .iter()
                .any(|k| l.get(k).is_some())
        };
        loop {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut changed = false;
            while let Ok(line) = self.lines.try_recv() {
                changed |= state(&line);
                self.seen.push(line);
            }
            let last = self.seen.iter().rev().find(|l| state(l));
            if !changed && last.is_some_and(|l| l.get("watching").is_some()) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no live watch: {:#?}",
                self.seen
            );
        }
    }

    /// The events it printed, as `[type, name, phase]`, checking that their versions only
    /// grow.
    fn events(&self) -> Vec<Value> {
        let events: Vec<&Value> = self
            .seen
            .iter()
            .filter(|l| l.get("event").is_some())
            .collect();
        let versions: Vec<u64> = events
            .iter()
            .map(|e| e["version"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "versions grow: {versions:?}"
        );
        events
            .iter()
            .map(|e| json!([e["event"], e["name"], e["phase"]]))
            .collect()
    }

    /// Ends the run: `stop` is inserted, and once the informer has printed it, it must have
    /// listed once, never been refused, and printed exactly `events`.
    async fn ends_with(&mut self, app: &mut TestApp, events: &[Value]) {
        send(app, "insert", "stop", phased("stop", "Pending")).await;
        self.until("the last event", |l| l["name"] == "stop").await;
        self.listed_once_never_refused();
        assert_eq!(self.events(), events);
    }

    /// Asserts it listed once and was never refused (a `410` would have needed a relist).
    fn listed_once_never_refused(&self) {
        let lists = self
            .seen
            .iter()
            .filter(|l| l.get("listed").is_some())
            .count();
        assert_eq!(lists, 1, "{:#?}", self.seen);
        assert!(
            !self.seen.iter().any(|l| l.get("refused").is_some()),
            "{:#?}",
            self.seen
        );
    }
}

impl Drop for Informer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn phased(name: &str, phase: &str) -> Value {
    let mut p = pod(name);
    p["status"] = json!({"phase": phase});
    p
}

/// Sends `operation` of the pod `name` as the cloud would, and waits for its `OK`.
async fn send(app: &mut TestApp, operation: &str, name: &str, object: Value) {
    write_as_cloud(app, operation, &format!("default/pod/{name}"), object).await;
}

/// An informer's loop with the official client, as client-go's reflector runs it: one list,
/// then watches from the last event's (or bookmark's) version, across a MetaManager restart.
/// It sees every change once, in order, and never has to list again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_informer_lists_once_and_sees_every_change_once_across_a_restart() {
    let Some(mut app) = app().await else {
        return;
    };
    send(&mut app, "insert", "a", phased("a", "Pending")).await;
    send(&mut app, "insert", "b", phased("b", "Pending")).await;
    let mut informer = Informer::start(&app, 0);
    let listed = informer
        .until("its list", |l| l.get("listed").is_some())
        .await;
    assert_eq!(listed["listed"], json!(["a", "b"]));
    informer.watching().await;

    send(&mut app, "insert", "c", phased("c", "Pending")).await;
    send(&mut app, "update", "a", phased("a", "Running")).await;
    send(&mut app, "delete", "b", json!(null)).await;
    informer.until("b's deletion", |l| l["name"] == "b").await;

    app.restart().await;
    informer.live().await;
    send(&mut app, "insert", "d", phased("d", "Pending")).await;
    send(&mut app, "update", "c", phased("c", "Running")).await;
    send(&mut app, "delete", "a", json!(null)).await;
    informer
        .ends_with(
            &mut app,
            &[
                json!(["ADDED", "c", "Pending"]),
                json!(["MODIFIED", "a", "Running"]),
                json!(["DELETED", "b", "Pending"]),
                json!(["ADDED", "d", "Pending"]),
                json!(["MODIFIED", "c", "Running"]),
                json!(["DELETED", "a", "Running"]),
                json!(["ADDED", "stop", "Pending"]),
            ],
        )
        .await;
}

/// The same loop with `timeoutSeconds`: each watch ends after a second, and the next resumes
/// from the last version seen (a bookmark's when nothing of its own changed), while changes
/// of other kinds go on: no relist, no change lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_informer_whose_watches_time_out_resumes_each_without_a_relist() {
    let Some(mut app) = app().await else {
        return;
    };
    send(&mut app, "insert", "a", phased("a", "Pending")).await;
    let mut informer = Informer::start(&app, 1);
    informer
        .until("its list", |l| l.get("listed").is_some())
        .await;
    informer.watching().await;
    send(&mut app, "update", "a", phased("a", "Running")).await;
    for round in 0..3 {
        // Quiet for the pods; the node changes other things meanwhile.
        for i in 0..5 {
            let config = json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("c{round}-{i}"), "namespace": "default"}});
            let key = format!("default/configmap/c{round}-{i}");
            insert(&mut app, &key, config).await;
        }
        informer
            .until("a watch that timed out", |l| l.get("ended").is_some())
            .await;
        informer.watching().await;
        let name = format!("p{round}");
        send(&mut app, "insert", &name, phased(&name, "Pending")).await;
    }
    informer
        .ends_with(
            &mut app,
            &[
                json!(["MODIFIED", "a", "Running"]),
                json!(["ADDED", "p0", "Pending"]),
                json!(["ADDED", "p1", "Pending"]),
                json!(["ADDED", "p2", "Pending"]),
                json!(["ADDED", "stop", "Pending"]),
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_patches_a_pods_status_while_the_cloud_is_away() {
    let Some(mut app) = app().await else {
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
