//! The bridge as the cloud link: a node-local mosquitto configured by the shipped
//! conf/mosquitto-bridge.conf (and conf/mosquitto.acl), node `edge-node` rewritten to the test
//! node, bridging to a central mosquitto where a client plays the cloud. MetaManager takes the
//! bridge's retained state topic as the cloud's connect and disconnect (`cloud_link`), so no
//! edgehub runs on the node. Skipped without mosquitto unless METAMANAGER_REQUIRE_MOSQUITTO=1.

mod common;

use std::path::Path;
use std::time::Duration;

use common::lockdown::shipped_conf;
use common::{
    count_rows, message, mosquitto_binary, mosquitto_clients, msg_id, BrokerKind, Mosquitto,
    Options, TestApp, NODE, WAIT,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const MM_PASSWORD: &str = "mm-pass";
const EDGED_PASSWORD: &str = "edged-pass";
const POD_KEY: &str = "default/pod/nginx-7d9c5b8f4-x2k9p";

/// The bridge's state topic on the node's broker: mosquitto names it after the bridge's
/// `remote_clientid`, which the shipped file sets to `bridge-edge-node`.
fn state_topic() -> String {
    format!("$SYS/broker/connection/bridge-{NODE}/state")
}

fn edged() -> (String, String) {
    (format!("edged-{NODE}"), EDGED_PASSWORD.into())
}

/// The central broker: anonymous, and keeping its sessions across a restart, so the cloud's
/// session, with what reached it while the cloud client was away, outlives the broker's stop.
fn central_conf(port: u16, dir: &Path) -> String {
    format!(
        "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\n",
        dir.display()
    )
}

/// The shipped node-local broker, with the test's port, files, node id and central broker.
/// The bridge retries every second here instead of backing off from 2 s towards 30 s, so the
/// test does not wait for the back-off.
fn node_conf(port: u16, dir: &Path, central: u16) -> String {
    let accounts = [
        (format!("metamanager-{NODE}"), MM_PASSWORD.to_owned()),
        (format!("metamanager-{NODE}-out"), MM_PASSWORD.to_owned()),
        edged(),
    ];
    let replace = [
        ("address", format!("address 127.0.0.1:{central}")),
        ("restart_timeout", "restart_timeout 1".to_owned()),
    ];
    let conf = "conf/mosquitto-bridge.conf";
    shipped_conf(conf, port, dir, &accounts, MM_PASSWORD, &replace)
}

/// The cloud's client on the central broker, with a session the central broker keeps: what
/// MetaManager sends to edgehub arrives on the channel as (topic, message), in order.
async fn cloud_client(port: u16) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    let mut options = MqttOptions::new("cloud-test", "127.0.0.1", port);
    options.set_clean_session(false);
    options.set_max_packet_size(64 << 20, 64 << 20);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
    let resubscribe = client.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let topic = format!("edge/{NODE}/metamanager/to/edgehub");
                    let _ = resubscribe.try_subscribe(topic, QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((p.topic.clone(), value)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // The central broker is away while the test stops it: try again.
                Err(_) if tx.is_closed() => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed.recv())
        .await
        .expect("cloud client subscribed");
    (client, rx)
}

/// The next message to edgehub that satisfies `pred`, skipping others.
async fn cloud_receives(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((_, v))) if pred(&v) => return v,
            Ok(Some(_)) => {}
            _ => panic!("the cloud received nothing that matched within {WAIT:?}"),
        }
    }
}

/// Whether MetaManager counts the cloud as connected, by its `metamanager_cloud_connected`
/// gauge (the same state the status topic carries); `None` while /metrics does not show it.
async fn cloud_connected(app: &TestApp) -> Option<bool> {
    let (_, _, metrics) = common::http(app.http_port, "GET", "/metrics").await;
    let gauge = metrics
        .lines()
        .find_map(|line| line.strip_prefix("metamanager_cloud_connected "));
    match gauge? {
        "1" => Some(true),
        "0" => Some(false),
        other => panic!("metamanager_cloud_connected {other}"),
    }
}

/// Waits until MetaManager counts the cloud as `connected`.
async fn wait_cloud(app: &TestApp, connected: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while cloud_connected(app).await != Some(connected) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not metamanager_cloud_connected {} within {WAIT:?}",
            u8::from(connected)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until MetaManager's log has a line with every one of `words`.
async fn wait_logged(app: &TestApp, words: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !app
        .log()
        .lines()
        .any(|line| words.iter().all(|w| line.contains(w)))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line with {words:?} logged within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A status change from edged, one key per pod so that none supersedes another in the outbox.
fn pod_status(i: usize) -> Value {
    message(
        "update",
        &format!("default/podstatus/pod-{i}"),
        json!({"Name": format!("pod-{i}"), "Status": {"phase": "Running"}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_state_is_the_cloud_link_and_the_outbox_waits_for_it() {
    let Some(binary) = mosquitto_binary() else {
        return;
    };
    if !mosquitto_clients() {
        return;
    }
    let mut central = Mosquitto::start_with(&binary, central_conf);
    let central_port = central.port;
    let (cloud, mut to_cloud) = cloud_client(central_port).await;
    let node = Mosquitto::start_with(&binary, |port, dir| node_conf(port, dir, central_port));
    let mut options = Options::new(BrokerKind::Mosquitto).yaml(&format!(
        "cloud_link:\n  state_topic: {}\noutbox:\n  drain_rate: 50\n",
        state_topic()
    ));
    options.username = Some(format!("metamanager-{NODE}"));
    options.publish_username = Some(format!("metamanager-{NODE}-out"));
    options.password_file = Some(node.dir().join("mm-password"));
    options.peer_login = Some(edged());
    let mut app = TestApp::spawn_on(options, node).await;

    // The bridge is up: no edgehub ever said `connect`.
    wait_cloud(&app, true).await;

    // The cloud's insert crosses the bridge to MetaManager, which forwards it to edged and
    // acks it to the cloud.
    let pod = common::fixture("pod.json");
    let insert = message("insert", POD_KEY, pod.clone());
    let to_node = format!("edge/{NODE}/edgehub/to/metamanager");
    let payload = serde_json::to_vec(&insert).unwrap();
    cloud
        .publish(&to_node, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    let forward = app
        .client
        .wait_for("metamanager/to/edged", |v| {
            v["route"]["operation"] == "insert"
        })
        .await;
    assert_eq!(forward["route"]["resource"], POD_KEY);
    let parent = msg_id(&insert).to_owned();
    let ack = cloud_receives(&mut to_cloud, |v| {
        v["header"]["parent_msg_id"] == parent.as_str()
    })
    .await;
    assert_eq!(ack["route"]["operation"], "response", "{ack}");

    // And edged's change crosses it to the cloud.
    let first = pod_status(0);
    app.client.publish("edged", &first).await;
    let id = msg_id(&first).to_owned();
    let got = cloud_receives(&mut to_cloud, |v| v["header"]["msg_id"] == id.as_str()).await;
    assert_eq!(got["route"]["resource"], "default/podstatus/pod-0");

    // The central broker stops: the bridge says so, and the cloud is away.
    central.stop();
    wait_cloud(&app, false).await;

    // What edged sends meanwhile is acked to edged and waits in MetaManager's outbox.
    let meanwhile: Vec<Value> = (1..=5).map(pod_status).collect();
    for change in &meanwhile {
        let ack = app.client.request("edged", change).await;
        assert_eq!(ack["route"]["operation"], "response", "{ack}");
    }
    assert_eq!(count_rows(&app, "SELECT count(*) FROM outbox"), 5);

    // The central broker is back: the bridge reconnects, MetaManager drains the outbox, and
    // the cloud receives every change in the order edged sent them.
    assert!(central.start_again(&binary), "{}", central.log());
    wait_cloud(&app, true).await;
    let mut received = Vec::new();
    while received.len() < meanwhile.len() {
        let change = cloud_receives(&mut to_cloud, |v| {
            v["route"]["resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("default/podstatus/pod-"))
                && v["header"]["msg_id"] != id.as_str()
        })
        .await;
        received.push(change["header"]["msg_id"].clone());
    }
    let sent: Vec<Value> = meanwhile
        .iter()
        .map(|m| m["header"]["msg_id"].clone())
        .collect();
    assert_eq!(received, sent, "every change, in order");
    // A row leaves the outbox with the first commit after the broker acknowledged its message,
    // which may come after the cloud received it.
    assert!(
        common::process::wait_until(common::WAIT, || {
            count_rows(&app, "SELECT count(*) FROM outbox") == 0
        }),
        "the outbox still holds {} rows",
        count_rows(&app, "SELECT count(*) FROM outbox")
    );

    // The state is retained: a restarted MetaManager is connected as soon as it subscribes,
    // and that connect brings its full MetaSync run and digest at once, not a period later.
    while tokio::time::timeout(Duration::from_secs(1), to_cloud.recv())
        .await
        .is_ok_and(|m| m.is_some())
    {}
    app.restart().await;
    wait_cloud(&app, true).await;
    cloud_receives(&mut to_cloud, |v| v["route"]["operation"] == "digest").await;

    // edgehub's `connect` still counts beside the bridge: the cloud's own word that it is away
    // holds messages back although the bridge is up.
    let away = message(
        "connect",
        "default/node/edge-node",
        json!("cloud_disconnected"),
    );
    let payload = serde_json::to_vec(&away).unwrap();
    cloud
        .publish(&to_node, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    wait_cloud(&app, false).await;
}

/// The embedded broker takes the setting too, for any topic: a state written by hand with a
/// retained publish connects the cloud, and one it cannot read changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_topic_on_the_embedded_broker_connects_the_cloud() {
    let topic = format!("edge/{NODE}/link/state");
    let options = Options::new(BrokerKind::Embedded).yaml(&format!(
        "cloud_link:\n  state_topic: {topic}\n  connected_payload: up\n  disconnected_payload: down\n"
    ));
    let app = TestApp::spawn(options).await.expect("embedded");
    let publisher = common::Peer::connect(app.port).await;
    publisher.publish_retained(&topic, "up").await;
    wait_cloud(&app, true).await;
    // The line is logged by the handler of the unreadable state, the one that would have
    // reported the link down: once it is there, a disconnect would show.
    publisher.publish_retained(&topic, "sideways").await;
    wait_logged(&app, &["bridge state not understood", "sideways"]).await;
    assert_eq!(
        cloud_connected(&app).await,
        Some(true),
        "the unreadable state disconnected the cloud"
    );
    publisher.publish_retained(&topic, "down").await;
    wait_cloud(&app, false).await;
}
