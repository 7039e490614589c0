//! `metamanager get`, `list` and `export` against a database the running service filled over
//! MQTT: they read while it runs, print what it stored, and never write.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

use common::{fixture, message, msg_id, BrokerKind, Options, TestApp};
use serde_json::{json, Value};

const POD_KEY: &str = "default/pod/nginx-7d9c5b8f4-x2k9p";

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Size and modification time of a file, or `None` when it does not exist.
fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// The service with the fixture pod and a configmap stored, both acknowledged.
async fn filled() -> TestApp {
    let mut app = TestApp::spawn(Options::new(BrokerKind::Embedded))
        .await
        .expect("embedded broker needs nothing installed");
    let pod = message("insert", POD_KEY, fixture("pod.json"));
    let config = message("insert", "default/configmap/app", fixture("configmap.json"));
    for m in [&pod, &config] {
        app.client.publish("edgehub", m).await;
        app.client
            .reply_to("metamanager/to/edgehub", msg_id(m))
            .await;
    }
    app
}

#[tokio::test(flavor = "multi_thread")]
async fn get_prints_the_stored_pod_while_the_service_runs() {
    let app = filled().await;
    let db = app.db_path();
    let out = cli(&["get", POD_KEY, "--db", db.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let value: Value = serde_json::from_str(stdout(&out).trim()).expect("JSON");
    assert_eq!(value, fixture("pod.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn get_reads_the_database_named_by_the_config() {
    let app = filled().await;
    let config = app.config_path();
    let out = cli(&[
        "--config",
        config.to_str().expect("utf-8 path"),
        "get",
        POD_KEY,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let value: Value = serde_json::from_str(stdout(&out).trim()).expect("JSON");
    assert_eq!(value, fixture("pod.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_export_print_json_lines() {
    let app = filled().await;
    let db = app.db_path();
    let db = db.to_str().expect("utf-8 path");

    let out = cli(&["list", "default/pod", "--db", db]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        json_lines(&out),
        vec![json!({"key": POD_KEY, "type": "pod", "value": fixture("pod.json")})]
    );

    let out = cli(&["export", "--db", db]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        json_lines(&out),
        vec![
            json!({"key": "default/configmap/app", "type": "configmap", "value": fixture("configmap.json")}),
            json!({"key": POD_KEY, "type": "pod", "value": fixture("pod.json")}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn absent_objects_exit_1_and_bad_arguments_exit_2() {
    let app = filled().await;
    let db = app.db_path();
    let db = db.to_str().expect("utf-8 path");

    let out = cli(&["get", "default/pod/absent", "--db", db]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("default/pod/absent"));

    let out = cli(&["list", "default/secret", "--db", db]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    for args in [
        vec!["get", "default/pod", "--db", db],
        vec!["list", POD_KEY, "--db", db],
        vec!["get", "no-slashes", "--db", db],
        vec!["get", POD_KEY, "--db", "/nonexistent/metamanager.db"],
        vec!["get"],
    ] {
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    assert!(!Path::new("/nonexistent/metamanager.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_commands_never_write_to_the_database() {
    let app = filled().await;
    let db = app.db_path();
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    let before = (stamp(&db), stamp(&wal));
    assert!(before.0.is_some(), "the service created the database");
    // A coarse file-system clock must still show a write made after this point.
    std::thread::sleep(std::time::Duration::from_millis(50));

    let path = db.to_str().expect("utf-8 path");
    for args in [
        vec!["get", POD_KEY, "--db", path],
        vec!["list", "default/pod", "--db", path],
        vec!["export", "--db", path],
        vec!["get", "default/pod/absent", "--db", path],
    ] {
        cli(&args);
    }
    assert_eq!((stamp(&db), stamp(&wal)), before);
}
