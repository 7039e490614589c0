//! MetaManager run in the test's own process through `app::run_with`, on listeners the test
//! bound on port 0: the ports are known before MetaManager starts, with no race and no retry.

mod common;

use std::time::Duration;

use metamanager::app::{self, Listeners};
use metamanager::config::Settings;
use metamanager::http;

use common::{fixture, message, msg_id, Peer, NODE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_injected_listeners_and_stops_on_its_shutdown_future() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let settings = Settings::from_yaml(&format!(
        "node_id: {NODE}\ndatabase:\n  path: {}\n",
        db.display()
    ))
    .unwrap();
    let settings_again = settings.clone();
    let broker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broker_port = broker.local_addr().unwrap().port();
    let http = http::Listener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http_port = http.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app::run_with(
        settings,
        Listeners {
            http: Some(http),
            broker: Some(broker),
        },
        async move {
            let _ = stopped.await;
        },
    ));

    let mut edgehub = Peer::connect(broker_port).await;
    edgehub
        .wait_for("metamanager/status", |v| v["state"] == "online")
        .await;
    let insert = message("insert", "default/pod/in-process", fixture("pod.json"));
    let ack = edgehub.request("edgehub", &insert).await;
    assert_eq!(ack["route"]["operation"], "response", "{ack}");
    assert_eq!(ack["header"]["parent_msg_id"], msg_id(&insert));
    let (status, _, body) = common::http(http_port, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");

    // The database is claimed for as long as it runs: a second MetaManager on it, even in this
    // process, is refused at once, before it binds the addresses of its settings.
    let second = tokio::time::timeout(
        Duration::from_secs(5),
        app::run(settings_again, std::future::pending()),
    )
    .await
    .expect("refused at once");
    let refused = second.expect_err("the database is in use").to_string();
    assert_eq!(
        refused,
        format!(
            "database {} is in use by another MetaManager (pid {})",
            db.display(),
            std::process::id()
        )
    );

    stop.send(()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("stops")
        .expect("no panic");
    assert!(outcome.is_ok(), "{outcome:?}");
}
