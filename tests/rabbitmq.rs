//! MetaManager on RabbitMQ's MQTT plugin: one RabbitMQ node for this test binary (see
//! tests/common/rabbitmq.rs), each test in a virtual host of its own, MetaManager logged in
//! with its per-node accounts under topic permissions. Skipped without RabbitMQ unless
//! METAMANAGER_REQUIRE_RABBITMQ=1.

mod common;

use std::time::Duration;

use common::rabbitmq::{edged_account, metamanager_account, Lease};
use common::scenarios;
use common::{
    ask_for_a_remote_secret, assert_acked, cloud_answers, count_rows, fixture, forward_to_edged,
    insert, BrokerKind, Options, TestApp, NODE, WAIT,
};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use serde_json::json;

const POD_KEY: &str = "default/pod/nginx-7d9c5b8f4-x2k9p";

async fn app() -> Option<TestApp> {
    TestApp::spawn(Options::new(BrokerKind::RabbitMq)).await
}

fn lease(app: &TestApp) -> &Lease {
    app.rabbitmq.as_ref().expect("a RabbitMQ app")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_forward_ack_query_and_remote_query() {
    let Some(mut app) = app().await else {
        return;
    };
    let insert = fixture("insert-pod.message.json");
    app.client.publish("edgehub", &insert).await;
    let forwarded = forward_to_edged(&mut app.client, &insert).await;
    assert_eq!(forwarded["content"], insert["content"]);
    assert_acked(&mut app.client, &insert).await;
    assert_eq!(
        app.client.query("edged", POD_KEY).await,
        json!([fixture("pod.json")])
    );

    // A query for what the node does not hold goes to the cloud, and its answer comes back.
    let (key, query, asked) = ask_for_a_remote_secret(&mut app).await;
    assert_eq!(asked["route"]["resource"], key);
    let secret = fixture("secret.json");
    let reply = cloud_answers(&mut app, &asked, &query, secret.clone()).await;
    assert_eq!(reply["content"], json!([secret]));
    assert_eq!(app.client.query("edged", key).await, json!([secret]));
}

/// The status is retained: a client that subscribes later sees it. The last will, published
/// by RabbitMQ when MetaManager's connection dies, replaces it with `offline`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_status_and_last_will() {
    let Some(mut app) = app().await else {
        return;
    };
    let status = app.retained_status().await;
    assert_eq!(status["state"], "online", "{status}");
    app.set_cloud(true).await;
    assert_eq!(app.retained_status().await["cloud"], "connected");

    app.kill9();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = app.retained_status().await;
        if status["state"] == "offline" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status} after the kill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A clean stop says offline too, and a start online again.
    app.start().await;
    assert_eq!(app.retained_status().await["state"], "online");
    let status = app.terminate();
    assert!(status.success(), "exit status {status}");
    assert_eq!(app.retained_status().await["state"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    scenarios::sigkill_mid_stream_loses_nothing_acked_and_nothing_accepted(BrokerKind::RabbitMq)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_20000_is_stored_and_acked() {
    scenarios::burst_is_stored_and_acked(Options::new(BrokerKind::RabbitMq), 20_000).await;
}

/// How the broker answers a client with `id` logging in as `login` (persistent session when
/// not `clean`), and what it received within `listen` on `topic` if it was accepted.
async fn try_connect(
    port: u16,
    id: &str,
    login: (String, String),
    clean: bool,
    topic: &str,
    listen: Duration,
) -> Result<Vec<String>, String> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_credentials(login.0, login.1);
    options.set_clean_session(clean);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {}
        Ok(Err(ConnectionError::ConnectionRefused(code))) => return Err(format!("{code:?}")),
        other => return Err(format!("{other:?}")),
    }
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + listen;
    while let Ok(Ok(event)) = tokio::time::timeout_at(until, eventloop.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = event {
            got.push(p.topic);
        }
    }
    let _ = client.try_disconnect();
    Ok(got)
}

/// edged's account asks for MetaManager's client id, while MetaManager runs and while it is
/// stopped with an insert waiting in its session. RabbitMQ refuses it: the account may not use
/// the session queues of that client id. It reads nothing, nothing is lost, MetaManager goes on
/// serving. (RabbitMQ 3.10 registers the client id before it checks the queues, so MetaManager's
/// connection is dropped once and it reconnects: see the README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_refused_with_per_node_accounts() {
    let Some(mut app) = app().await else {
        return;
    };
    let edged = lease(&app).login(&edged_account());
    let mm_id = metamanager_account();
    let everything = format!("edge/{NODE}/edgehub/to/metamanager");

    for clean in [true, false] {
        let tried = try_connect(app.port, &mm_id, edged.clone(), clean, &everything, WAIT).await;
        assert!(tried.is_err(), "the impostor got in: {tried:?}");
    }
    let secret = fixture("secret.json");
    insert(&mut app, "default/secret/db-credentials", secret).await;

    // Stopped: an insert waits in MetaManager's session queue; the impostor cannot take it.
    let status = app.terminate();
    assert!(status.success(), "exit status {status}");
    let pod = fixture("insert-pod.message.json");
    app.client.publish("edgehub", &pod).await;
    app.client.wait_accepted(2).await;
    let tried = try_connect(app.port, &mm_id, edged.clone(), false, &everything, WAIT).await;
    assert!(tried.is_err(), "the impostor got in: {tried:?}");
    app.start().await;
    // Taken from the queue at once, maybe before the test client subscribed to the ack: the
    // store says it arrived.
    let deadline = tokio::time::Instant::now() + WAIT;
    let stored = format!("SELECT count(*) FROM meta WHERE key = '{POD_KEY}'");
    while count_rows(&app, &stored) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiting insert was lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Its own id, its own topics only: edged may not read what edgehub sends MetaManager.
    let tried = try_connect(
        app.port,
        &edged_account(),
        edged,
        true,
        &everything,
        Duration::from_millis(500),
    )
    .await;
    assert!(
        !matches!(&tried, Ok(got) if !got.is_empty()),
        "edged read edgehub's topic: {tried:?}"
    );
}
