//! The binary as an operator meets it: config errors, start-up failures, signals, and the
//! mosquitto_pub / mosquitto_sub walkthrough from the README.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::process::{in_network_of, wait_until, Launch, MetaManager};
use common::{fixture_path, BrokerKind, Options, TestApp};
use serde_json::{json, Value};

fn run_with_config(yaml: &str) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.yaml");
    std::fs::write(&config, yaml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .arg("-c")
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (output, dir)
}

#[test]
fn bad_config_stops_before_connecting_and_names_the_key() {
    let huge_node_id = format!("node_id: {}\n", "n".repeat(70 * 1024));
    let cases: &[(&str, &str)] = &[
        ("mqtt:\n  mode: sideways\n", "mode"),
        ("mqtt:\n  port: 70000\n", "port"),
        ("mqtt:\n  mode: external\n  port: 0\n", "mqtt.port"),
        (
            "meta:\n  remote_query_timeout: soonish\n",
            "remote_query_timeout",
        ),
        (
            "meta:\n  sync:\n    podstatus:\n      interval: often\n",
            "interval",
        ),
        ("mqtt:\n  hostname: x\n", "hostname"),
        ("node_id: a/b\n", "node_id"),
        // Out of range: the limits checked at start-up.
        (&huge_node_id, "node_id"),
        ("mqtt:\n  topic_prefix: \"$SYS\"\n", "mqtt.topic_prefix"),
        (
            "mqtt:\n  max_payload_bytes: 9223372036854775808\n",
            "mqtt.max_payload_bytes",
        ),
        ("outbox:\n  max_age: 0\n", "outbox.max_age"),
        ("meta:\n  remote_types: ['', 'a/b']\n", "meta.remote_types"),
    ];
    for (yaml, key) in cases {
        let (out, dir) = run_with_config(yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{yaml:.80}: {stderr}");
        assert!(
            stderr.contains(key),
            "{yaml:.80}: error should name {key}: {stderr}"
        );
        assert!(stderr.len() < 1000, "{key}: a huge value is not echoed");
        assert!(
            !dir.path().join("data").exists(),
            "{yaml:.80}: nothing may be created before the config is valid"
        );
    }
}

/// A password file that never ends is read up to its cap, not until the kernel kills the
/// process: start-up stops at once, naming the key.
#[test]
fn a_password_file_without_end_stops_start_up_at_once() {
    let started = std::time::Instant::now();
    let (out, _dir) = run_with_config(
        "mqtt:\n  port: 0\n  username: mm\n  password_file: /dev/zero\nhttp:\n  enabled: false\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "{stderr}");
    assert!(
        stderr.contains("config key `mqtt.password_file`")
            && stderr.contains("/dev/zero")
            && stderr.contains("larger than 65536 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "nothing bound: {stderr}");
}

/// A password file its group may read works, with a warning that names the key and the mode.
#[test]
fn a_password_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut mm = MetaManager::in_temp_dir(
        Some(&format!(
            "mqtt:\n  port: 0\n  username: mm\n  password_file: {}\nhttp:\n  enabled: false\n",
            password.display()
        )),
        None,
    );
    mm.wait_for_log(Duration::from_secs(15), "its start", |log| {
        log.contains("metamanager starting").then_some(())
    });
    let text = stop_cleanly(&mut mm);
    let warning = text
        .lines()
        .find(|l| l.contains("WARN") && l.contains("mqtt.password_file"))
        .unwrap_or_else(|| panic!("no warning: {text}"));
    assert!(
        warning.contains("mode 640") && !warning.contains("s3cret"),
        "{warning}"
    );
}

#[test]
fn missing_config_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .args(["--config", "/nonexistent/edge.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/edge.yaml"));
}

/// Starts MetaManager on `db` (embedded broker on any free port, no HTTP) and checks that it
/// stops at start-up with exit status 1 and names the file; returns its stderr.
fn refuses_to_start_on(db: &std::path::Path) -> String {
    let (out, _dir) = run_with_config(&format!(
        "mqtt:\n  port: 0\ndatabase:\n  path: {}\nhttp:\n  enabled: false\n",
        db.display()
    ));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("meta.db"), "{stderr}");
    stderr
}

#[test]
fn a_file_that_is_not_a_database_stops_start_up_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let garbage = b"this is not a SQLite database, and must survive as it is\n".repeat(200);
    std::fs::write(&db, &garbage).unwrap();
    refuses_to_start_on(&db);
    assert_eq!(std::fs::read(&db).unwrap(), garbage, "file modified");
}

#[test]
fn a_damaged_database_stops_start_up_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);",
        )
        .unwrap();
        let pod = std::fs::read_to_string(fixture_path("pod.json")).unwrap();
        for i in 0..200 {
            conn.execute(
                "INSERT INTO meta VALUES (?1, 'pod', ?2)",
                (format!("default/pod/p{i}"), &pod),
            )
            .unwrap();
        }
    }
    // Overwrite the pages after the first with noise: a valid header, damaged tables.
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 16 * 4096);
    for (i, b) in bytes[4096..].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&db, &bytes).unwrap();

    let stderr = refuses_to_start_on(&db);
    assert!(stderr.contains("damaged"), "{stderr}");
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "file modified");
    assert!(
        !dir.path().join("meta.db-wal").exists(),
        "no journal written beside it"
    );
}

/// One process per database. A second MetaManager on a database in use stops at once, before it
/// binds anything, naming the database and the first one's pid; the first goes on working, and
/// the read-only commands work beside it. Once the first is gone, by `kill -9` or a clean stop,
/// the database is free again (the lock dies with its process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_a_database_in_use_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let mut first = TestApp::spawn_with_db(Options::new(BrokerKind::Embedded), db.clone())
        .await
        .expect("the embedded broker needs nothing installed");
    let pod = "default/pod/nginx-7d9c5b8f4-x2k9p";
    for (round, kill_9) in [(0, true), (1, false)] {
        let pid = first.child.as_ref().expect("running").id();
        let started = std::time::Instant::now();
        let stderr = refuses_to_start_on(&db);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}: {stderr}",
            started.elapsed()
        );
        let expected = format!(
            "database {} is in use by another MetaManager (pid {pid})",
            db.display()
        );
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(
            !stderr.contains("listening") && !stderr.contains("store open"),
            "nothing bound or opened before the refusal: {stderr}"
        );

        // The first still takes messages and answers its probes.
        let insert = common::message("insert", pod, common::fixture("pod.json"));
        let ack = first.client.request("edgehub", &insert).await;
        assert_eq!(ack["content"], "OK", "round {round}: {ack}");
        let (status, _, body) = common::http(first.http_port, "GET", "/healthz").await;
        assert_eq!(status, 200, "{body}");

        // The read-only commands read beside it.
        let db_arg = db.to_str().expect("utf-8 path");
        for args in [
            ["get", pod, "--db", db_arg],
            ["list", "default/pod", "--db", db_arg],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_metamanager"))
                .args(args)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("nginx-7d9c5b8f4-x2k9p"),
                "{args:?}: {out:?}"
            );
        }

        if kill_9 {
            first.kill9();
            first.start().await;
        } else {
            first.restart().await;
        }
    }
    let status = first.terminate();
    assert!(status.success(), "{status}");
}

/// Stops `mm` with SIGTERM, checks that it exits cleanly, and returns its log.
fn stop_cleanly(mm: &mut MetaManager) -> String {
    let status = mm.terminate();
    let log = mm.log();
    assert!(status.success(), "{status}; log:\n{log}");
    log
}

#[test]
fn embedded_broker_beyond_loopback_without_auth_warns() {
    let port = common::free_port();
    let mut mm = MetaManager::in_temp_dir(
        Some(&format!(
            "mqtt:\n  host: 0.0.0.0\n  port: {port}\nhttp:\n  enabled: false\n"
        )),
        None,
    );
    assert!(common::wait_for_port(port, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    let log = stop_cleanly(&mut mm);
    assert!(
        log.contains("WARN") && log.contains("without authentication"),
        "{log}"
    );
}

#[test]
fn embedded_broker_port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (out, _dir) = run_with_config(&format!("mqtt:\n  port: {port}\nhttp:\n  enabled: false\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

/// The defaults' ports are fixed, and another broker or MetaManager on this machine may hold
/// them: the binary runs in a network namespace of its own, where they are free, and is
/// reached there.
#[test]
fn no_arguments_runs_on_the_defaults() {
    let Some(mut mm) = MetaManager::on_private_network() else {
        return;
    };
    let listening = |port: u16| {
        in_network_of(mm.pid(), "bash")
            .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        wait_until(Duration::from_secs(10), || listening(1884)),
        "the embedded broker on 127.0.0.1:1884: {}",
        mm.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || listening(10550)),
        "the local API on 127.0.0.1:10550: {}",
        mm.log()
    );
    let db = mm.dir().join("data/metamanager.db");
    wait_until(Duration::from_secs(5), || db.exists());
    // Signalled as early as this, it must still stop cleanly.
    let log = stop_cleanly(&mut mm);
    assert!(db.exists(), "database at ./data/metamanager.db");
    assert!(log.contains("node_id=edge-node"), "{log}");
    assert!(log.contains("127.0.0.1:1884"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leaves_the_last_will_offline_status() {
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Mosquitto)).await else {
        return;
    };
    let port = app.mosquitto.as_ref().unwrap().port;
    app.kill9();
    let mut watcher = common::Peer::connect(port).await;
    let will = watcher
        .wait_for("metamanager/status", |v| v["state"] == "offline")
        .await;
    assert_eq!(will["node_id"], common::NODE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_broker_do_not_see_each_other() {
    let Some(binary) = common::mosquitto_binary() else {
        return;
    };
    if !common::mosquitto_clients() {
        return;
    }
    let broker = common::Mosquitto::start(&binary);
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for node in ["node-a", "node-b"] {
        let config = dir.path().join(format!("{node}.yaml"));
        std::fs::write(
            &config,
            format!(
                "node_id: {node}\nmqtt:\n  mode: external\n  port: {}\ndatabase:\n  path: {}\nhttp:\n  enabled: false\n",
                broker.port,
                dir.path().join(format!("{node}.db")).display()
            ),
        )
        .unwrap();
        nodes.push(MetaManager::start(Launch {
            config: Some(&config),
            ..Launch::default()
        }));
    }
    // A raw client that sees every node's traffic, from when both nodes are online.
    let seen = dir.path().join("seen.txt");
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &broker.port.to_string(), "-v", "-t", "edge/#"])
        .stdout(std::fs::File::create(&seen).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let probe = common::Peer::connect(broker.port).await;
    probe.await_subscribed("edge/probe", &seen).await;
    let read = || std::fs::read_to_string(&seen).unwrap_or_default();
    for node in ["node-a", "node-b"] {
        let online = format!(r#"edge/{node}/metamanager/status {{"state":"online""#);
        assert!(
            wait_until(common::WAIT, || read().contains(&online)),
            "{node} online: {}",
            read()
        );
    }
    let insert = common::fixture("insert-pod.message.json");
    let published = Command::new("mosquitto_pub")
        .args(["-p", &broker.port.to_string(), "-q", "1"])
        .args(["-t", "edge/node-a/edgehub/to/metamanager"])
        .args(["-m", &insert.to_string()])
        .status()
        .unwrap();
    assert!(published.success());
    // node-a acks after it forwards; node-b's answer, were it subscribed, would come as soon.
    let acked = format!(r#""parent_msg_id":"{}""#, common::msg_id(&insert));
    assert!(
        wait_until(common::WAIT, || read().contains(&acked)),
        "node-a's ack: {}",
        read()
    );
    let _ = sub.kill();
    let _ = sub.wait();
    let out = read();
    drop(nodes);
    assert!(out.contains("edge/node-a/metamanager/to/edged"), "{out}");
    assert!(out.contains("edge/node-b/metamanager/status"), "{out}");
    assert!(!out.contains("edge/node-b/metamanager/to/"), "{out}");
    // Only node-a stored the pod.
    let count = |node: &str| -> i64 {
        rusqlite::Connection::open(dir.path().join(format!("{node}.db")))
            .unwrap()
            .query_row("SELECT count(*) FROM meta", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count("node-a"), 1);
    assert_eq!(count("node-b"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_leaves_offline_status() {
    let Some(mut app) = TestApp::spawn(Options::new(BrokerKind::Mosquitto)).await else {
        return;
    };
    let status = app.terminate();
    assert!(status.success(), "{status}");
    let port = app.mosquitto.as_ref().unwrap().port;
    let mut watcher = common::Peer::connect(port).await;
    let retained = watcher.wait_for("metamanager/status", |_| true).await;
    assert_eq!(retained["state"], "offline");
    assert_eq!(retained["node_id"], common::NODE);
    assert!(app.log().contains("stopped"));
}

fn mosquitto_sub(port: u16, topic: &str, count: usize) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args(["-p", &port.to_string(), "-q", "1", "-v", "-t", topic])
        .args(["-C", &count.to_string(), "-W", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn mosquitto_pub(port: u16, topic: &str, payload: PubPayload) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-p", &port.to_string(), "-q", "1", "-t", topic]);
    match payload {
        PubPayload::File(path) => cmd.arg("-f").arg(path),
        PubPayload::Message(m) => cmd.args(["-m", m]),
    };
    let status = cmd.status().unwrap();
    assert!(status.success());
}

enum PubPayload<'a> {
    File(&'a std::path::Path),
    Message(&'a str),
}

/// `topic payload` lines from `mosquitto_sub -v`, payload parsed as JSON.
fn lines(child: std::process::Child) -> Vec<(String, Value)> {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // Payloads may span lines (the fixture is pretty-printed): split on the topic prefix.
    let mut result = Vec::new();
    for chunk in text.split(&format!("edge/{}/", common::NODE)).skip(1) {
        let (topic, payload) = chunk.split_once(' ').unwrap();
        let value: Value = serde_json::from_str(payload.trim()).unwrap();
        result.push((topic.to_owned(), value));
    }
    result
}

/// The README walkthrough, driven with the real mosquitto clients: insert a pod as the cloud,
/// see it reach edged, query it back as edged.
async fn walkthrough_with_mosquitto_clients(kind: BrokerKind) {
    if !common::mosquitto_clients() {
        return;
    }
    let Some(app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    let node = common::NODE;
    let port = app.port;

    // Forward to edged, ack to edgehub.
    let sub = mosquitto_sub(port, &format!("edge/{node}/metamanager/to/#"), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    mosquitto_pub(
        port,
        &format!("edge/{node}/edgehub/to/metamanager"),
        PubPayload::File(&fixture_path("insert-pod.message.json")),
    );
    let got = lines(sub);
    let insert = common::fixture("insert-pod.message.json");
    let forwarded = got
        .iter()
        .find(|(t, _)| t == "metamanager/to/edged")
        .expect("forwarded to edged");
    assert_eq!(forwarded.1, insert);
    let ack = got
        .iter()
        .find(|(t, _)| t == "metamanager/to/edgehub")
        .expect("acked to edgehub");
    assert_eq!(ack.1["content"], "OK");
    assert_eq!(ack.1["header"]["parent_msg_id"], insert["header"]["msg_id"]);

    // Query it back as edged.
    let sub = mosquitto_sub(port, &format!("edge/{node}/metamanager/to/edged"), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    mosquitto_pub(
        port,
        &format!("edge/{node}/edged/to/metamanager"),
        PubPayload::Message(
            r#"{"header":{"msg_id":"q-1"},"route":{"operation":"query","resource":"default/pod/nginx-7d9c5b8f4-x2k9p"}}"#,
        ),
    );
    let got = lines(sub);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["header"]["parent_msg_id"], "q-1");
    assert_eq!(got[0].1["route"]["operation"], "response");
    assert_eq!(got[0].1["content"], json!([common::fixture("pod.json")]));
}

both_brokers!(walkthrough_with_mosquitto_clients);
