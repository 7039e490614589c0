//! `--log-format json`: every line on stderr is one JSON object with a level and a message,
//! whose fields carry plain values (`"addr":"127.0.0.1:10550"`, not Rust's debug form of an
//! `Option`); and what the log says when the broker goes away.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{mosquitto_binary, Mosquitto};
use serde_json::Value;

#[cfg(unix)]
#[test]
fn json_log_lines_carry_level_and_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let config = config_in(dir.path(), &format!("port: {port}"), "enabled: false");
    let log = dir.path().join("stderr.log");
    let child = spawn_json(&config, &log);
    wait_for(&log, "metamanager starting");
    // SIGTERM, so the shutdown lines are logged too.
    let lines = stop(child, &log);
    assert!(lines.len() >= 3, "start-up and shutdown logged: {lines:?}");
    for line in &lines {
        assert!(line["level"].is_string(), "{line}");
        assert!(line["message"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|l| l["message"] == "metamanager starting"));
    assert!(lines.iter().any(|l| l["message"] == "stopped"));
}

#[test]
fn an_unknown_log_format_is_a_bad_argument() {
    let out = Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .args(["--log-format", "xml"])
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2));
}

/// `edge.yaml` in `dir`: the `mqtt` and `http` keys given (one line each, unindented), the
/// database `m.db` beside it.
fn config_in(dir: &Path, mqtt: &str, http: &str) -> std::path::PathBuf {
    let config = dir.join("edge.yaml");
    let db = dir.join("m.db");
    let yaml = format!(
        "mqtt:\n  {}\ndatabase:\n  path: {}\nhttp:\n  {http}\n",
        mqtt.replace('\n', "\n  "),
        db.display()
    );
    std::fs::write(&config, yaml).expect("config written");
    config
}

/// MetaManager on `config`, logging JSON to `log`.
fn spawn_json(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .args(["--log-format", "json", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("the binary runs")
}

/// The log at `log` once it holds `want`; panics after 15 s.
fn wait_for(log: &Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(want) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {want:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops MetaManager with SIGTERM, and its log's lines as JSON.
fn stop(mut child: Child, log: &Path) -> Vec<Value> {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().expect("exits");
    assert!(status.success(), "{status:?}");
    std::fs::read_to_string(log)
        .expect("log read")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// No field of any line carries Rust's debug form of an `Option`: a value is written plainly,
/// an absent one left out.
fn assert_plain_fields(lines: &[Value]) {
    for line in lines {
        for (field, value) in line.as_object().expect("an object") {
            let text = value.to_string();
            assert!(
                !text.contains("Some(") && text != "\"None\"",
                "{field} carries a debug form: {line}"
            );
        }
    }
}

#[cfg(unix)]
#[test]
fn start_up_and_stop_fields_are_plain_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path(), "port: 0", "listen: 127.0.0.1:0");
    let log = dir.path().join("stderr.log");
    let child = spawn_json(&config, &log);
    wait_for(&log, "HTTP endpoint listening");
    let lines = stop(child, &log);
    assert_plain_fields(&lines);
    let line = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} in {lines:?}"))
    };
    let http = line("HTTP endpoint listening");
    let addr: std::net::SocketAddr = http["addr"].as_str().unwrap().parse().expect("an address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{http}");
    assert!(line("file descriptor limit")["open_files"].is_u64());
    assert_eq!(line("metamanager starting")["mode"], "embedded");
}

/// A broker stopped cleanly closes MetaManager's connections and refuses new ones: the log says
/// it stopped, and blames no session takeover, which it is not.
#[cfg(unix)]
#[test]
fn a_stopped_broker_is_logged_as_stopped_not_as_a_takeover() {
    let Some(binary) = mosquitto_binary() else {
        return;
    };
    let mut mosquitto = Mosquitto::start(&binary);
    let dir = tempfile::tempdir().expect("tempdir");
    let mqtt = format!("mode: external\nhost: 127.0.0.1\nport: {}", mosquitto.port);
    let config = config_in(dir.path(), &mqtt, "enabled: false");
    let log = dir.path().join("stderr.log");
    let child = spawn_json(&config, &log);
    let connected = |text: &str| text.matches("connected to MQTT broker").count() >= 2;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !connected(&std::fs::read_to_string(&log).unwrap_or_default()) {
        assert!(Instant::now() < deadline, "MetaManager did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Soon after connecting, as in the report: a close this soon once suggested a takeover.
    mosquitto.stop();
    wait_for(&log, "the MQTT broker has stopped");
    let lines = stop(child, &log);
    assert_plain_fields(&lines);
    let stopped: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("has stopped"))
        })
        .collect();
    assert!(!stopped.is_empty());
    for line in stopped {
        assert_eq!(line["level"], "WARN", "{line}");
        assert!(line["client_id"].is_string(), "{line}");
    }
    let text = lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!text.contains("takeover"), "{text}");
    assert!(!text.contains("another client connected"), "{text}");
}

/// An earlier version's database (rows without their `rv` column) is counted into the digest
/// once at start-up; with stderr not a terminal, the count's progress is logged now and then
/// (each `--progress-every`), in the log's own format.
#[cfg(unix)]
#[test]
fn the_start_up_digest_count_logs_its_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("m.db");
    let config = config_in(dir.path(), "port: 0", "enabled: false");
    // A first start makes the tables.
    let log = dir.path().join("first.log");
    let child = spawn_json(&config, &log);
    wait_for(&log, "metamanager starting");
    stop(child, &log);
    let conn = rusqlite::Connection::open(&db).expect("open");
    conn.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 19999)
         INSERT INTO meta (key, type, value)
         SELECT printf('default/configmap/old-%05d', i), 'configmap',
                '{\"metadata\":{\"resourceVersion\":\"' || i || '\"}}' FROM n;",
    )
    .expect("rows without rv");
    drop(conn);

    let log = dir.path().join("second.log");
    let child = Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .args([
            "--log-format",
            "json",
            "--progress-every",
            "1ms",
            "--config",
        ])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("the binary runs");
    wait_for(&log, "metamanager starting");
    let lines = stop(child, &log);
    let progress: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["message"].as_str())
        .filter(|m| m.starts_with("counting stored objects into the digest: "))
        .collect();
    assert!(!progress.is_empty(), "{lines:?}");
    assert!(
        progress.iter().all(|m| m.ends_with(" of 20 000 objects)")),
        "{progress:?}"
    );
    let counted = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("counted stored objects into the digest"))
        })
        .expect("the count's last line");
    assert_eq!(counted["objects"], 20_000);
}
