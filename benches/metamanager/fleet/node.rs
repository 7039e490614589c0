//! One node of the fleet, as conf/mosquitto-bridge.conf builds it: a node-local mosquitto
//! bridged to the central broker (the bridge section of the shipped file, with only the address,
//! the client ids, the account and the node's name replaced), MetaManager on that broker, and
//! edged played by the bench. edged's traffic stays on the node; only the bridged topics reach
//! the centre.
//!
//! MetaManager takes the bridge's state (`$SYS/broker/connection/bridge-{node}/state`, retained,
//! local only) as the cloud's connect and disconnect (`cloud_link.state_topic`); nothing of it
//! crosses the link.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

use crate::harness::{start_metamanager_with, Broker, Client, MetaManager, Mosquitto};
use metamanager::store::{Store, StoreOptions, Write};

/// The pods a node holds, each with its status.
pub fn pod(template: &Value, name: &str, rv: u64) -> Value {
    let mut p = template.clone();
    p["metadata"]["name"] = json!(name);
    p["metadata"]["namespace"] = json!("default");
    p["metadata"]["uid"] = json!(format!("uid-{name}"));
    p["metadata"]["resourceVersion"] = json!(rv.to_string());
    p
}

/// What a delete of pod `name` carries: enough for the uid check (topics.md 5.3).
pub fn pod_ref(name: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")}})
}

fn status(template: &Value, name: &str, phase: &str, restarts: u64) -> Value {
    let mut s = template.clone();
    s["Name"] = json!(name);
    s["UID"] = json!(format!("uid-{name}"));
    s["Status"]["phase"] = json!(phase);
    s["Status"]["containerStatuses"][0]["restartCount"] = json!(restarts);
    s
}

/// A message in the format of topics.md, section 3.
pub fn message(
    msg_id: &str,
    source: &str,
    operation: &str,
    resource: &str,
    content: Value,
) -> String {
    json!({
        "header": {"msg_id": msg_id, "timestamp": 1_795_774_500_123u64},
        "route": {"source": source, "group": "resource", "operation": operation, "resource": resource},
        "content": content,
    })
    .to_string()
}

pub struct Fixtures {
    pub pod: Value,
    pub status: Value,
}

impl Fixtures {
    pub fn load() -> Self {
        let read = |name| {
            serde_json::from_str(
                &std::fs::read_to_string(crate::fixture_path(name)).expect("fixture"),
            )
            .expect("fixture JSON")
        };
        Self {
            pod: read("pod.json"),
            status: read("podstatus.json"),
        }
    }
}

pub struct Node {
    pub id: String,
    /// The bridge's client id on the central broker.
    pub bridge_id: String,
    /// edged's connection, for what edged does of its own accord.
    edged: AsyncClient,
    edged_sent: Arc<AtomicUsize>,
    /// Acks MetaManager sent edged.
    pub edged_acked: Arc<AtomicUsize>,
    /// The node's broker.
    port: u16,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    mm: MetaManager,
    broker: Mosquitto,
    db: PathBuf,
}

impl Node {
    /// Starts node `id` holding `pods` pods and their statuses, bridged to the central broker
    /// on `central` (with `login` there, if the centre wants one); `meta` is appended to
    /// MetaManager's config.
    pub async fn start(
        id: &str,
        pods: usize,
        central: u16,
        login: Option<(String, String)>,
        dir: &Path,
        meta: &str,
        fixtures: &Fixtures,
    ) -> Node {
        let db = dir.join(format!("{id}.db"));
        let _ = std::fs::remove_file(&db);
        seed(&db, pods, fixtures).await;
        let bridge_id = format!("bridge-{id}");
        let section = bridge_section(id, &bridge_id, central, login.as_ref());
        let binary = crate::harness::process::find_mosquitto().expect("mosquitto is installed");
        let broker = Mosquitto::start_with(&binary, |port, _| {
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nset_tcp_nodelay true\n\n{section}"
            )
        });
        let port = broker.port;
        let status_topic = format!("edge/{id}/metamanager/status");
        let mut status = Client::connect(port, &format!("{id}-status"), &[&status_topic]).await;
        let settings =
            format!("cloud_link:\n  state_topic: $SYS/broker/connection/{bridge_id}/state\n{meta}");
        let (_, mm) =
            start_metamanager_with(Broker::External(port), id, &db, "NORMAL", dir, &settings);
        assert!(
            status
                .next_containing(&status_topic, "\"online\"", Duration::from_secs(60))
                .await,
            "{id}: MetaManager online"
        );
        let (edged, edged_sent, edged_acked, edged_task) =
            play_edged(port, id, fixtures.status.clone()).await;
        Node {
            id: id.to_owned(),
            bridge_id,
            edged,
            edged_sent,
            edged_acked,
            port,
            tasks: vec![edged_task],
            mm,
            broker,
            db,
        }
    }

    /// Waits until MetaManager reports the cloud `state` ("connected" or "disconnected"):
    /// the retained status first, then its changes.
    pub async fn cloud_is(&self, state: &str) {
        let topic = format!("edge/{}/metamanager/status", self.id);
        let needle = format!("\"cloud\":\"{state}\"");
        let n = self.edged_sent.fetch_add(1, Ordering::Relaxed);
        let mut status =
            Client::connect(self.port, &format!("{}-status-{n}", self.id), &[&topic]).await;
        if !status
            .next_containing(&topic, &needle, Duration::from_secs(60))
            .await
        {
            panic!(
                "{}: the cloud not {state} within 60 s; MetaManager's log:\n{}\nthe node's mosquitto:\n{}",
                self.id,
                self.mm.log(),
                self.broker.log()
            );
        }
    }

    /// edged reports a status of `name` on its own: `restarts` restarts so far.
    pub async fn edged_status_update(&self, name: &str, restarts: u64, fixtures: &Fixtures) {
        let n = self.edged_sent.fetch_add(1, Ordering::Relaxed);
        let m = message(
            &format!("edged-{}-own-{n}", self.id),
            "edged",
            "update",
            &format!("default/podstatus/{name}"),
            status(&fixtures.status, name, "Running", restarts),
        );
        self.edged
            .publish(
                format!("edge/{}/edged/to/metamanager", self.id),
                QoS::AtLeastOnce,
                false,
                m,
            )
            .await
            .expect("edged publishes");
    }

    pub fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.mm.stop(Duration::from_secs(30));
        let _ = std::fs::remove_file(&self.db);
    }
}

/// Writes the node's pods and statuses through the store, as MetaManager would have.
async fn seed(db: &Path, pods: usize, fixtures: &Fixtures) {
    let store = Store::open(db, StoreOptions::default()).expect("bench store");
    let mut pending = Vec::new();
    for i in 0..pods {
        let name = format!("pod-{i:03}");
        let writes = [
            (
                format!("default/pod/{name}"),
                "pod",
                pod(&fixtures.pod, &name, 1),
            ),
            (
                format!("default/podstatus/{name}"),
                "podstatus",
                status(&fixtures.status, &name, "Running", 0),
            ),
        ];
        for (key, rtype, value) in writes {
            let write = Write::Put {
                key,
                rtype: rtype.into(),
                value: value.to_string().into(),
            };
            pending.push(store.submit(write).await.expect("queued"));
        }
    }
    for p in pending {
        p.await.expect("committed").expect("stored");
    }
    store.close().await;
}

/// The bridge section of conf/mosquitto-bridge.conf for node `id`: the shipped settings, with
/// the address, client ids, account and node name replaced.
fn bridge_section(
    id: &str,
    bridge_id: &str,
    central: u16,
    login: Option<&(String, String)>,
) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mosquitto-bridge.conf");
    let shipped = std::fs::read_to_string(&path).expect("conf/mosquitto-bridge.conf");
    let start = shipped
        .lines()
        .position(|l| l.starts_with("connection "))
        .expect("a bridge in conf/mosquitto-bridge.conf");
    let mut out = String::new();
    for line in shipped.lines().skip(start) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line.split_whitespace().next().unwrap_or_default();
        let replaced = match (key, login) {
            ("address", _) => format!("address 127.0.0.1:{central}"),
            ("remote_clientid", _) => format!("remote_clientid {bridge_id}"),
            ("local_clientid", _) => format!("local_clientid {bridge_id}-local"),
            ("remote_username", Some((user, _))) => format!("remote_username {user}"),
            ("remote_password", Some((_, password))) => format!("remote_password {password}"),
            ("remote_username" | "remote_password", None) => continue,
            ("topic", _) => line.replace("edge-node", id),
            _ => line.to_owned(),
        };
        out.push_str(&replaced);
        out.push('\n');
    }
    out
}

/// edged: answers each cloud operation it is forwarded, and for a pod the cloud inserted,
/// reports its status (Pending, then Running).
async fn play_edged(
    port: u16,
    id: &str,
    status_template: Value,
) -> (
    AsyncClient,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let inbox = format!("edge/{id}/metamanager/to/edged");
    let mut edged = Client::connect(port, &format!("{id}-edged"), &[&inbox]).await;
    let client = edged.client.clone();
    let sent = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let (s, a, node) = (sent.clone(), acked.clone(), id.to_owned());
    let task = tokio::spawn(async move {
        let out = format!("edge/{node}/edged/to/metamanager");
        while let Some((_, payload)) = edged.received.recv().await {
            let Ok(m) = serde_json::from_slice::<Value>(&payload) else {
                continue;
            };
            let route = &m["route"];
            if route["source"] == "metamanager" {
                a.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let resource = route["resource"].as_str().unwrap_or_default().to_owned();
            let Some(name) = resource.strip_prefix("default/pod/").map(str::to_owned) else {
                continue;
            };
            let operation = route["operation"].as_str().unwrap_or_default();
            let mut replies = Vec::new();
            if operation == "insert" {
                let key = format!("default/podstatus/{name}");
                replies.push((
                    "insert",
                    key.clone(),
                    status(&status_template, &name, "Pending", 0),
                    None,
                ));
                replies.push((
                    "update",
                    key,
                    status(&status_template, &name, "Running", 0),
                    None,
                ));
            }
            if operation == "insert" || operation == "delete" {
                let parent = m["header"]["msg_id"].as_str().map(str::to_owned);
                replies.push(("response", resource.clone(), json!("OK"), parent));
            }
            for (operation, resource, content, parent) in replies {
                let n = s.fetch_add(1, Ordering::Relaxed);
                let mut reply: Value = serde_json::from_str(&message(
                    &format!("edged-{node}-{n}"),
                    "edged",
                    operation,
                    &resource,
                    content,
                ))
                .expect("a message");
                if let Some(parent) = parent {
                    reply["header"]["parent_msg_id"] = json!(parent);
                }
                let _ = edged
                    .client
                    .publish(&out, QoS::AtLeastOnce, false, reply.to_string())
                    .await;
            }
        }
    });
    (client, sent, acked, task)
}
