//! `--log-format json`: every line on stderr is one JSON object with a level and a message.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[cfg(unix)]
#[test]
fn json_log_lines_carry_level_and_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let config = dir.path().join("edge.yaml");
    std::fs::write(
        &config,
        format!(
            "mqtt:\n  port: {port}\ndatabase:\n  path: {}\nhttp:\n  enabled: false\n",
            dir.path().join("m.db").display()
        ),
    )
    .expect("config written");
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_metamanager"))
        .args(["--log-format", "json", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("metamanager starting")
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM, so the shutdown lines are logged too.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().expect("exits");
    assert!(status.success(), "{status:?}");

    let text = std::fs::read_to_string(&log).expect("log read");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "start-up and shutdown logged:\n{text}");
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
