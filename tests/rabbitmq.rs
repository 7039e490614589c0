//! MetaManager on RabbitMQ's MQTT plugin: one RabbitMQ node for this test binary (see
//! tests/common/rabbitmq.rs), each test in a virtual host of its own, MetaManager logged in
//! with its per-node accounts under topic permissions. Skipped without RabbitMQ unless
//! METAMANAGER_REQUIRE_RABBITMQ=1.

mod common;

use std::time::Duration;

use common::rabbitmq::{edged_account, edgehub_account, metamanager_account, Lease, TESTER};
use common::scenarios;
use common::{
    ask_for_a_remote_secret, assert_acked, cloud_answers, count_rows, fixture, forward_to_edged,
    insert, message, msg_id, BrokerKind, Options, TestApp, NODE, WAIT,
};
use rumqttc::{
    mqttbytes, AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions,
    Packet, QoS, StateError, SubscribeReasonCode,
};
use serde_json::{json, Value};

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

/// How the broker answered a client's CONNECT. Only [`Connect::Refused`] and
/// [`Connect::Closed`] are the broker's word: a broker too busy to answer and a listener that
/// never answers are silent alike, so silence ([`Connect::TimedOut`]) proves no refusal.
#[derive(Debug)]
enum Connect {
    Accepted,
    /// A CONNACK with this return code.
    Refused(ConnectReturnCode),
    /// The broker ended the connection (end of stream or reset) before any CONNACK.
    Closed,
    /// Neither a CONNACK nor the end of the connection in time.
    TimedOut,
}

/// Whether `e` is the other end closing a connection that was open: the end of the stream, or
/// a reset while reading or writing. A TCP connect that failed is not one.
fn closed_by_peer(e: &ConnectionError) -> bool {
    let io = match e {
        ConnectionError::MqttState(StateError::ConnectionAborted) => return true,
        ConnectionError::MqttState(StateError::Io(io)) => io,
        ConnectionError::MqttState(StateError::Deserialization(mqttbytes::Error::Io(io))) => io,
        _ => return false,
    };
    matches!(
        io.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

/// A client with `id` logging in as `login` (persistent session when not `clean`): how the
/// broker answered, and the client with its event loop, to go on with if it was accepted.
/// Panics when there was no broker to answer (no TCP connection) or it answered with another
/// packet.
async fn connect(
    port: u16,
    id: &str,
    login: (String, String),
    clean: bool,
) -> (Connect, AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_credentials(login.0, login.1);
    options.set_clean_session(clean);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let outcome = match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Connect::Accepted,
        Ok(Err(ConnectionError::ConnectionRefused(code))) => Connect::Refused(code),
        Ok(Err(e)) if closed_by_peer(&e) => Connect::Closed,
        // rumqttc's own limit on the wait for a CONNACK (5 s), or ours.
        Ok(Err(ConnectionError::NetworkTimeout)) | Err(_) => Connect::TimedOut,
        Ok(Err(e)) => panic!("connecting as {id}: {e:?}"),
        Ok(Ok(event)) => panic!("connecting as {id}: {event:?} before the CONNACK"),
    };
    (outcome, client, eventloop)
}

/// How the broker answered one SUBSCRIBE.
#[derive(Debug)]
enum Subscribe {
    Granted,
    /// A SUBACK with the failure code (0x80).
    Refused,
    /// The broker ended the connection instead of answering.
    Closed,
}

/// Subscribes to `topic` at QoS 1 and waits for the broker's answer; panics on silence.
async fn subscribe(client: &AsyncClient, eventloop: &mut EventLoop, topic: &str) -> Subscribe {
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let Ok(event) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            panic!("no answer to the subscription to {topic} in {WAIT:?}");
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                return match ack.return_codes.as_slice() {
                    [SubscribeReasonCode::Success(_)] => Subscribe::Granted,
                    [SubscribeReasonCode::Failure] => Subscribe::Refused,
                    codes => panic!("a SUBACK for one topic with {codes:?}"),
                }
            }
            Ok(_) => {}
            Err(e) if closed_by_peer(&e) => return Subscribe::Closed,
            Err(e) => panic!("subscribing to {topic}: {e:?}"),
        }
    }
}

/// Polls `eventloop` until the broker acknowledges the QoS 1 publish just made.
async fn published(eventloop: &mut EventLoop) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let Ok(event) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            panic!("no PUBACK in {WAIT:?}");
        };
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => return,
            Ok(_) => {}
            Err(e) => panic!("publishing: {e:?}"),
        }
    }
}

/// Polls `eventloop` until the message with msg_id `id` arrives on `topic`: the topics of the
/// messages that arrived before it.
async fn received_before(eventloop: &mut EventLoop, topic: &str, id: &str) -> Vec<String> {
    let mut before = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let Ok(event) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            panic!("{id} did not arrive on {topic} in {WAIT:?}; before it: {before:?}");
        };
        let event = event.unwrap_or_else(|e| panic!("waiting for {id} on {topic}: {e:?}"));
        if let Event::Incoming(Packet::Publish(p)) = event {
            let message: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
            if p.topic == topic && message["header"]["msg_id"] == id {
                return before;
            }
            before.push(p.topic);
        }
    }
}

/// edged's account asks for MetaManager's client id, while MetaManager runs and while it is
/// stopped with an insert waiting in its session. RabbitMQ refuses it: the account may not use
/// the session queues of that client id, and RabbitMQ 3.10 says so with CONNACK 3 (server
/// unavailable), with a clean session or not. Refused, it reads nothing; nothing is lost, and
/// MetaManager goes on serving. (RabbitMQ 3.10 registers the client id before it checks the
/// queues, so MetaManager's connection is dropped once and it reconnects: see docs/rabbitmq.md.)
/// With its own id, edged still reads only its own topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_refused_with_per_node_accounts() {
    let Some(mut app) = app().await else {
        return;
    };
    let edged = lease(&app).login(&edged_account());
    let mm_id = metamanager_account();

    for clean in [true, false] {
        let (tried, ..) = connect(app.port, &mm_id, edged.clone(), clean).await;
        assert!(
            matches!(
                tried,
                Connect::Refused(ConnectReturnCode::ServiceUnavailable)
            ),
            "the impostor (clean session {clean}) was not refused: {tried:?}"
        );
    }
    let secret = fixture("secret.json");
    insert(&mut app, "default/secret/db-credentials", secret).await;

    // Stopped: an insert waits in MetaManager's session queue; the impostor cannot take it.
    let status = app.terminate();
    assert!(status.success(), "exit status {status}");
    let pod = fixture("insert-pod.message.json");
    app.client.publish("edgehub", &pod).await;
    app.client.wait_accepted(2).await;
    let (tried, ..) = connect(app.port, &mm_id, edged.clone(), false).await;
    assert!(
        matches!(
            tried,
            Connect::Refused(ConnectReturnCode::ServiceUnavailable)
        ),
        "the impostor was not refused while MetaManager was stopped: {tried:?}"
    );
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

    edged_may_not_read_what_the_cloud_sends(&app).await;
}

/// edged, with its own id and a session kept across connections, subscribes to its own topic
/// and then to the one the cloud sends MetaManager on. The broker either refuses the second in
/// its SUBACK or, as RabbitMQ 3.10 does, closes the connection; then edged comes back to the
/// same session, so that a binding the broker made before it closed would still deliver.
///
/// The cloud then sends MetaManager an insert. A control subscriber (the test's account, which
/// may read everything) receives it: it was published and routed. MetaManager receives it too
/// and forwards it to edged, which is what edged waits for: a copy routed to edged's session
/// queue would have been queued when the insert was routed, before MetaManager could have
/// received it, so before the forward, and one queue delivers in order. Nothing of the
/// cloud's arriving before the forward means nothing of it was routed to edged.
async fn edged_may_not_read_what_the_cloud_sends(app: &TestApp) {
    let from_cloud = format!("edge/{NODE}/edgehub/to/metamanager");
    let to_edged = format!("edge/{NODE}/metamanager/to/edged");
    let edged = lease(app).login(&edged_account());
    let (connected, mut edged_client, mut edged_events) =
        connect(app.port, &edged_account(), edged.clone(), false).await;
    assert!(
        matches!(connected, Connect::Accepted),
        "edged: {connected:?}"
    );
    let own = subscribe(&edged_client, &mut edged_events, &to_edged).await;
    assert!(
        matches!(own, Subscribe::Granted),
        "edged's own topic: {own:?}"
    );
    match subscribe(&edged_client, &mut edged_events, &from_cloud).await {
        Subscribe::Refused => {}
        Subscribe::Closed => {
            let back = connect(app.port, &edged_account(), edged, false).await;
            assert!(
                matches!(back.0, Connect::Accepted),
                "edged again: {:?}",
                back.0
            );
            (edged_client, edged_events) = (back.1, back.2);
        }
        Subscribe::Granted => panic!("edged may subscribe to {from_cloud}"),
    }

    let control_id = format!("control-{}", uuid::Uuid::new_v4());
    let tester = lease(app).login(TESTER);
    let (connected, control, mut control_events) =
        connect(app.port, &control_id, tester, true).await;
    assert!(
        matches!(connected, Connect::Accepted),
        "control: {connected:?}"
    );
    let granted = subscribe(&control, &mut control_events, &from_cloud).await;
    assert!(
        matches!(granted, Subscribe::Granted),
        "control: {granted:?}"
    );

    let cloud_login = lease(app).login(&edgehub_account());
    let (connected, cloud, mut cloud_events) =
        connect(app.port, &edgehub_account(), cloud_login, true).await;
    assert!(
        matches!(connected, Connect::Accepted),
        "cloud: {connected:?}"
    );
    let change = message(
        "insert",
        "default/configmap/app-config",
        fixture("configmap.json"),
    );
    let payload = serde_json::to_vec(&change).unwrap();
    cloud
        .publish(&from_cloud, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    published(&mut cloud_events).await;

    let id = msg_id(&change);
    received_before(&mut control_events, &from_cloud, id).await;
    let before = received_before(&mut edged_events, &to_edged, id).await;
    assert!(
        before.is_empty(),
        "edged got before the forward: {before:?}"
    );
    // Held to here: a client dropped ends its event loop.
    drop((edged_client, control, cloud));
}
