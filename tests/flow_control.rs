//! Flow control end to end, with the real binary, real brokers and `mosquitto_pub -l` as the
//! publisher that sends as fast as it can: a burst is slowed or held, never dropped or refused,
//! and MetaManager's memory stays bounded. Also: a client that takes MetaManager's client id.

mod common;

use std::time::{Duration, Instant};

use common::scenarios::burst_is_stored_and_acked;
use common::{fixture, BrokerKind, Options, TestApp, NODE};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};

const BURST: usize = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_embedded() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Embedded), BURST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_mosquitto() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Mosquitto), BURST).await;
}

/// A budget of 2 messages: MetaManager stops reading after every second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_with_a_tiny_budget_embedded() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Embedded).inflight(2), 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_with_a_tiny_budget_mosquitto() {
    burst_is_stored_and_acked(Options::new(BrokerKind::Mosquitto).inflight(2), 5_000).await;
}

/// Connects with MetaManager's own client id over and over, the way a misconfigured client
/// with a reconnect loop does, for `run`. Returns how many times the broker accepted it.
async fn impostor(port: u16, run: Duration) -> (usize, Vec<String>) {
    let mut options = MqttOptions::new(format!("metamanager-{NODE}"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    let mut accepted = 0;
    let mut errors = Vec::new();
    let until = Instant::now() + run;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => accepted += 1,
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => {
                errors.push(match e {
                    ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                    other => other.to_string(),
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (accepted, errors)
}

fn connections_of_receiver(app: &TestApp) -> usize {
    app.log()
        .lines()
        .filter(|l| l.contains("connected to MQTT broker") && l.contains("receiving"))
        .count()
}

/// Embedded broker: nobody else can use MetaManager's client id; MetaManager stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_is_refused_by_the_embedded_broker() {
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Embedded)).await else {
        return;
    };
    let (accepted, errors) = impostor(app.port, Duration::from_secs(3)).await;
    assert_eq!(accepted, 0, "the impostor got in; errors: {errors:?}");
    assert!(
        errors.iter().any(|e| e.starts_with("refused")),
        "the impostor is told it is refused: {errors:?}"
    );
    // MetaManager's own links are in-process: the impostor could not disturb them.
    let log = app.log();
    assert_eq!(
        log.matches("linked to the embedded broker in-process")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("dropped MetaManager's"), "{log}");
    // Still serving.
    let pod = fixture("pod.json");
    let insert = common::message("insert", "default/pod/after-impostor", pod);
    app.client.publish("edgehub", &insert).await;
    app.client
        .reply_to("metamanager/to/edgehub", common::msg_id(&insert))
        .await;
}

/// External broker: the takeover is logged as such and MetaManager backs off instead of
/// throwing the other client off in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_is_logged_and_backed_off_on_mosquitto() {
    let Some(app) = TestApp::spawn(Options::new(BrokerKind::Mosquitto)).await else {
        return;
    };
    let (accepted, _) = impostor(app.port, Duration::from_secs(10)).await;
    let log = app.log();
    assert!(
        log.contains(&format!(
            "another client connected with client id metamanager-{NODE}"
        )),
        "{log}"
    );
    let reconnects = connections_of_receiver(&app);
    // 100 ms doubling: about 7 attempts in 10 s, where a fight would be dozens.
    assert!(
        reconnects <= 10,
        "MetaManager reconnected {reconnects} times in 10 s (impostor accepted {accepted} times)"
    );
    assert!(accepted >= 1);
}
