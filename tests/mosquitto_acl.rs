//! The shipped lock-down for an external mosquitto (conf/mosquitto-secure.conf and
//! conf/mosquitto.acl, node `edge-node` rewritten to the test node): MetaManager works with
//! its two accounts, no other account can read what edgehub sends it or take its session, and
//! anonymous clients and wrong passwords are refused, and the monitor account reads everything
//! and publishes nothing. Skipped without mosquitto unless
//! METAMANAGER_REQUIRE_MOSQUITTO=1.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::lockdown::shipped_conf;
use common::{
    assert_acked, fixture, forward_to_edged, message, mosquitto_binary, mosquitto_clients,
    BrokerKind, Mosquitto, Options, Peer, TestApp, NODE, WAIT,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::mpsc;

const MM_PASSWORD: &str = "mm-pass";
const EDGEHUB_PASSWORD: &str = "edgehub-pass";
const EDGED_PASSWORD: &str = "edged-pass";
const MONITOR_PASSWORD: &str = "monitor-pass";
const POD_KEY: &str = "default/pod/nginx-7d9c5b8f4-x2k9p";

fn mm_user() -> String {
    format!("metamanager-{NODE}")
}
fn mm_out_user() -> String {
    format!("metamanager-{NODE}-out")
}
fn edgehub() -> (String, String) {
    (format!("edgehub-{NODE}"), EDGEHUB_PASSWORD.into())
}
fn edged() -> (String, String) {
    (format!("edged-{NODE}"), EDGED_PASSWORD.into())
}
fn monitor() -> (String, String) {
    (format!("monitor-{NODE}"), MONITOR_PASSWORD.into())
}

/// The shipped configuration, with the port, the file locations and the node id of the test.
fn secure_conf(port: u16, dir: &Path) -> String {
    let accounts = [
        (mm_user(), MM_PASSWORD.to_string()),
        (mm_out_user(), MM_PASSWORD.to_string()),
        edgehub(),
        edged(),
        monitor(),
    ];
    shipped_conf(
        "conf/mosquitto-secure.conf",
        port,
        dir,
        &accounts,
        MM_PASSWORD,
        &[],
    )
}

/// MetaManager with its two accounts on the secured broker, its test client logged in as
/// edgehub. `None` (skip) without mosquitto.
async fn secured_app() -> Option<TestApp> {
    let binary = mosquitto_binary()?;
    if !mosquitto_clients() {
        return None;
    }
    let broker = Mosquitto::start_with(&binary, secure_conf);
    let password_file = broker.dir().join("mm-password");
    let mut options = Options::new(BrokerKind::Mosquitto);
    options.username = Some(mm_user());
    options.publish_username = Some(mm_out_user());
    options.password_file = Some(password_file);
    options.peer_login = Some(edgehub());
    Some(TestApp::spawn_on(options, broker).await)
}

/// A raw client with `id` logged in as `login`, subscribed to `topic`; what it receives
/// arrives on the channel as (full topic, payload).
async fn raw_client(
    port: u16,
    id: &str,
    login: (String, String),
    clean_session: bool,
    topic: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_credentials(login.0, login.1);
    options.set_clean_session(clean_session);
    options.set_max_packet_size(64 << 20, 64 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(_) => {}
                // Gone (disconnected or dropped by the test): no reconnecting, which would
                // fight other clients of the same account over its client id.
                Err(_) => return,
            }
        }
    });
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, subscribed.recv())
        .await
        .expect("raw client subscribed");
    (client, rx)
}

async fn drain(
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    quiet: Duration,
) -> Vec<String> {
    let mut topics = Vec::new();
    while let Ok(Some((t, _))) = tokio::time::timeout(quiet, rx.recv()).await {
        topics.push(t);
    }
    topics
}

/// Waits until the local API serves `path` (the object is stored).
async fn wait_stored(app: &TestApp, path: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if common::http(app.http_port, "GET", path).await.0 == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} not stored; log:\n{}",
            app.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn broker_log(app: &TestApp) -> String {
    app.mosquitto.as_ref().unwrap().log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_from_edgehub_is_stored_forwarded_and_acked() {
    let Some(mut app) = secured_app().await else {
        return;
    };
    let mut edged_peer = Peer::connect_as(app.port, Some(edged())).await;
    let insert = fixture("insert-pod.message.json");
    app.client.publish("edgehub", &insert).await;

    let forwarded = forward_to_edged(&mut edged_peer, &insert).await;
    assert_eq!(forwarded["content"], insert["content"]);
    assert_acked(&mut app.client, &insert).await;
    wait_stored(
        &app,
        "/api/v1/namespaces/default/pods/nginx-7d9c5b8f4-x2k9p",
    )
    .await;
    // And edged's own queries are answered on its topic.
    assert_eq!(
        edged_peer.query("edged", POD_KEY).await,
        json!([fixture("pod.json")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostor_with_metamanagers_client_id_reads_nothing_and_takes_nothing() {
    let Some(mut app) = secured_app().await else {
        return;
    };
    let everything = format!("edge/{NODE}/#");
    let inbound = [
        format!("edge/{NODE}/edgehub/to/metamanager"),
        format!("edge/{NODE}/edged/to/metamanager"),
    ];

    // While MetaManager runs: edged's account asks for MetaManager's client id.
    let (impostor, mut seen) = raw_client(app.port, &mm_user(), edged(), true, &everything).await;
    let secret = fixture("secret.json");
    let insert = message("insert", "default/secret/db-credentials", secret.clone());
    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK", "MetaManager was thrown off: {ack}");
    wait_stored(&app, "/api/v1/namespaces/default/secrets/db-credentials").await;
    let topics = drain(&mut seen, Duration::from_millis(500)).await;
    for t in &inbound {
        assert!(!topics.contains(t), "impostor read {t}: {topics:?}");
    }
    // What it did get is what edged may read: the forward, on metamanager/to/edged.
    assert!(
        topics.contains(&format!("edge/{NODE}/metamanager/to/edged")),
        "{topics:?}"
    );
    let _ = impostor.disconnect().await;
    drop(seen);

    // While MetaManager is stopped: an insert waits in its session; the impostor, persistent
    // and with MetaManager's client id, must not get it.
    let status = app.terminate();
    assert!(status.success(), "exit status {status}");
    let pod = fixture("insert-pod.message.json");
    app.client.publish("edgehub", &pod).await;
    app.client.wait_accepted(2).await;
    let (impostor, mut seen) = raw_client(app.port, &mm_user(), edged(), false, &everything).await;
    let topics = drain(&mut seen, Duration::from_millis(500)).await;
    for t in &inbound {
        assert!(!topics.contains(t), "impostor read {t}: {topics:?}");
    }
    let _ = impostor.disconnect().await;
    drop(seen);

    app.start().await;
    wait_stored(
        &app,
        "/api/v1/namespaces/default/pods/nginx-7d9c5b8f4-x2k9p",
    )
    .await;

    // MetaManager's id was never taken over by anyone.
    let log = broker_log(&app);
    assert!(
        !log.contains(&format!("Client {} already connected", mm_user())),
        "{log}"
    );
}

/// mosquitto_pub with `args`; whether the broker accepted it.
fn pub_ok(port: u16, args: &[&str]) -> bool {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(args)
        .args([
            "-t",
            &format!("edge/{NODE}/edgehub/to/metamanager"),
            "-m",
            "{}",
        ])
        .output()
        .unwrap();
    out.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_and_wrong_passwords_are_refused() {
    let Some(app) = secured_app().await else {
        return;
    };
    let (user, password) = edgehub();
    assert!(pub_ok(app.port, &["-u", &user, "-P", &password]));
    assert!(!pub_ok(app.port, &[]), "anonymous accepted");
    assert!(
        !pub_ok(app.port, &["-u", &user, "-P", "wrong"]),
        "wrong password accepted"
    );
    assert!(
        !pub_ok(app.port, &["-u", &mm_user(), "-P", EDGEHUB_PASSWORD]),
        "MetaManager's account with another password accepted"
    );
    assert!(
        !pub_ok(app.port, &["-u", "nobody", "-P", "x"]),
        "unknown user accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_account_reads_every_topic_and_publishes_nothing() {
    let Some(mut app) = secured_app().await else {
        return;
    };
    let (watcher, mut seen) = raw_client(
        app.port,
        "watcher",
        monitor(),
        true,
        &format!("edge/{NODE}/#"),
    )
    .await;
    let insert = fixture("insert-pod.message.json");
    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK", "{ack}");
    let mut topics = Vec::new();
    while let Ok(Some((topic, _))) =
        tokio::time::timeout(Duration::from_millis(500), seen.recv()).await
    {
        topics.push(topic);
    }
    for topic in [
        "edgehub/to/metamanager",
        "metamanager/to/edged",
        "metamanager/to/edgehub",
    ] {
        assert!(
            topics.contains(&format!("edge/{NODE}/{topic}")),
            "the monitor did not see {topic}: {topics:?}"
        );
    }

    // Posing as the cloud: refused by the ACL, so MetaManager never gets it.
    let planted = message(
        "insert",
        "default/secret/planted",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "planted", "namespace": "default"}}),
    );
    watcher
        .publish(
            format!("edge/{NODE}/edgehub/to/metamanager"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&planted).unwrap(),
        )
        .await
        .unwrap();
    let denied = format!("Denied PUBLISH from monitor-{NODE}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !broker_log(&app).contains(&denied) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not deny the monitor's publish; its log:\n{}",
            broker_log(&app)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything that got through would be handled by now, after a query's round trip.
    app.client.query("edgehub", "default/secret/planted").await;
    let (status, _, _) = common::http(
        app.http_port,
        "GET",
        "/api/v1/namespaces/default/secrets/planted",
    )
    .await;
    assert_eq!(status, 404, "the monitor's insert was stored");
}
