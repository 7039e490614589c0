//! What a newcomer reads in README.md holds against the real binary: the walkthrough, pasted as
//! one script, gets the replies it shows (per topic, in the order shown; on the embedded broker
//! and on mosquitto), and the metrics table names every metric `/metrics` serves, with its type,
//! and no other.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{self, MetaManager};
use common::{
    message, mosquitto_binary, mosquitto_clients, BrokerKind, Mosquitto, Options, TestApp,
};
use serde_json::{json, Value};

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md")
}

/// The text of the section that starts with the heading line `heading`, up to the next heading
/// of its level or above (outside fenced blocks, where `#` starts a shell comment).
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no `{heading}`"))
        + 1
        + heading.len();
    let level = heading.split(' ').next().unwrap().len();
    let body = &text[start..];
    let mut offset = 0;
    let mut fenced = false;
    for line in body.split_inclusive('\n') {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.split(' ').next().unwrap_or("");
        if !fenced
            && !hashes.is_empty()
            && hashes.chars().all(|c| c == '#')
            && hashes.len() <= level
        {
            return &body[..offset];
        }
        offset += line.len();
    }
    body
}

/// The fenced blocks of `text` whose info string is `lang`, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed == format!("```{lang}") => current = Some(String::new()),
            Some(_) if trimmed == "```" => found.push(current.take().unwrap()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    found
}

/// The string value of `"name": "…"` in a JSON text that may be cut short with `…`.
fn field(text: &str, name: &str) -> Option<String> {
    let at = text.find(&format!("\"{name}\""))? + name.len() + 2;
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let value = rest.strip_prefix('"')?;
    Some(value[..value.find('"')?].to_owned())
}

/// One message as `mosquitto_sub -v` prints it: the topic and what identifies the message
/// whatever its fresh ids and timestamps (the id it answers, else its own id, else the
/// status's state), and its operation where shown.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    topic: String,
    names: String,
    operation: Option<String>,
}

/// The messages in `mosquitto_sub -v` output (a message may span lines, as a pretty-printed
/// fixture does), grouped by topic in the order they came.
fn shapes(output: &str) -> BTreeMap<String, Vec<Shape>> {
    let mut messages: Vec<String> = Vec::new();
    for line in output.lines() {
        if line.starts_with("edge/") {
            messages.push(String::new());
        }
        if let Some(message) = messages.last_mut() {
            message.push_str(line);
            message.push('\n');
        }
    }
    let mut by_topic: BTreeMap<String, Vec<Shape>> = BTreeMap::new();
    for message in messages {
        let (topic, payload) = message.split_once(' ').unwrap_or((message.trim(), ""));
        let names = field(payload, "parent_msg_id")
            .map(|p| format!("answer to {p}"))
            .or_else(|| field(payload, "msg_id"))
            .or_else(|| field(payload, "state").map(|s| format!("state {s}")))
            .unwrap_or_default();
        by_topic.entry(topic.to_owned()).or_default().push(Shape {
            topic: topic.to_owned(),
            names,
            operation: field(payload, "operation"),
        });
    }
    by_topic
}

/// Runs the README walkthrough's commands as one bash script from the repository root, aimed
/// at `port` instead of the default 1884; what its subscriber printed.
fn run_walkthrough(port: u16) -> String {
    let text = readme();
    let walkthrough = section(&text, "## Walkthrough");
    let script = blocks(walkthrough, "sh")
        .into_iter()
        .next()
        .expect("the walkthrough has a sh block");
    assert!(script.contains("-p 1884"), "{script}");
    let script = script.replace("-p 1884", &format!("-p {port}"));
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bash");
    if process::exit_within(&mut child, Duration::from_secs(30)).is_none() {
        let _ = child.kill();
        panic!("the walkthrough script did not end within 30 s");
    }
    let out = child.wait_with_output().expect("the script's output");
    assert!(
        out.status.success(),
        "the walkthrough script failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// What the walkthrough says comes back: the `text` blocks after its script.
fn walkthrough_promise() -> BTreeMap<String, Vec<Shape>> {
    let text = readme();
    let shown = blocks(section(&text, "## Walkthrough"), "text").concat();
    shapes(&shown)
}

fn assert_walkthrough(output: &str) {
    let got = shapes(output);
    let promised = walkthrough_promise();
    assert!(!promised.is_empty(), "the walkthrough shows no output");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        promised.keys().collect::<Vec<_>>(),
        "topics differ; the script printed:\n{output}"
    );
    for (topic, shown) in &promised {
        let seen = &got[topic];
        assert_eq!(
            seen.iter().map(|s| &s.names).collect::<Vec<_>>(),
            shown.iter().map(|s| &s.names).collect::<Vec<_>>(),
            "messages on {topic} differ; the script printed:\n{output}"
        );
        for (seen, shown) in seen.iter().zip(shown) {
            if shown.operation.is_some() {
                assert_eq!(
                    seen.operation, shown.operation,
                    "{seen:?}; the script printed:\n{output}"
                );
            }
        }
    }
}

/// MetaManager on its defaults (node `edge-node`, prefix `edge`) but for its `mqtt:` keys
/// (`mqtt_yaml`, indented) and its HTTP port, taken free; its broker and HTTP ports once up.
fn start(mqtt_yaml: &str) -> (MetaManager, u16, u16) {
    let yaml = format!("mqtt:\n{mqtt_yaml}http:\n  listen: 127.0.0.1:0\n");
    let mut mm = MetaManager::in_temp_dir(Some(&yaml), Some("info"));
    let (broker, http) = mm.wait_for_log(Duration::from_secs(15), "its ports", |log| {
        Some((process::broker_port(log)?, process::http_port(log)?))
    });
    (mm, broker, http)
}

#[test]
fn the_walkthrough_answers_as_shown_on_the_embedded_broker() {
    if !mosquitto_clients() {
        return;
    }
    let (mut mm, port, _) = start("  port: 0\n");
    let output = run_walkthrough(port);
    assert!(mm.terminate().success(), "log:\n{}", mm.log());
    assert_walkthrough(&output);
}

#[test]
fn the_walkthrough_answers_as_shown_on_mosquitto() {
    let Some(binary) = mosquitto_binary() else {
        return;
    };
    if !mosquitto_clients() {
        return;
    }
    let broker = Mosquitto::start(&binary);
    let (mut mm, port, _) = start(&format!("  mode: external\n  port: {}\n", broker.port));
    assert_eq!(port, broker.port);
    let output = run_walkthrough(port);
    assert!(mm.terminate().success(), "log:\n{}", mm.log());
    assert_walkthrough(&output);
}

/// Name and type of every metric in the README's table.
fn metrics_table() -> BTreeMap<String, String> {
    let text = readme();
    let metrics = section(&text, "### Metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("| `metamanager_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect()
}

/// Name and type of every metric `/metrics` serves, named as the README names them (a
/// counter with its `_total`).
async fn served_metrics(http_port: u16) -> BTreeMap<String, String> {
    let (status, _, body) = common::http(http_port, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE NAME KIND");
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            (name, kind.to_owned())
        })
        .collect()
}

/// Traffic that makes MetaManager serve every metric family: a family with labels is served
/// from its first sample on, so each is given one. A labelled metric added without a step here
/// is not served, and then its row in the table fails the test as one `/metrics` lacks.
async fn touch_every_metric(app: &mut TestApp) {
    let insert = |key: &str, version: &str, mode: &str| {
        message(
            "insert",
            key,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "rules", "namespace": "default", "resourceVersion": version},
                   "data": {"mode": mode}}),
        )
    };
    let key = "default/configmap/rules";
    let ack = app
        .client
        .request("edgehub", &insert(key, "200", "new"))
        .await;
    assert_eq!(ack["content"], "OK", "{ack}");
    // An older update is held back.
    let mut stale = insert(key, "150", "old");
    stale["route"]["operation"] = json!("update");
    let ack = app.client.request("edgehub", &stale).await;
    assert_eq!(ack["content"], "OK", "{ack}");
    // An error.
    app.client.publish_raw("edged", b"not json".to_vec()).await;
    // A remote query, refused while the cloud is away.
    let query = message("query", "default/secret/absent", Value::Null);
    let answer = app.client.request("edged", &query).await;
    assert_eq!(answer["route"]["operation"], "error", "{answer}");
    // MetaSync, skipped while the cloud is away.
    let sync = message("meta-internal-sync", "default/podstatus", Value::Null);
    let ack = app.client.request("edged", &sync).await;
    assert_eq!(ack["content"], "OK", "{ack}");
    // An API write, refused while the cloud is away.
    let (status, _, body) = common::http_with(
        app.http_port,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/rules",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"a":"b"}}}"#,
    )
    .await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_table_lists_every_served_metric_and_no_other() {
    let mut app = TestApp::spawn(Options::new(BrokerKind::Embedded))
        .await
        .expect("the embedded broker needs nothing installed");
    touch_every_metric(&mut app).await;
    let served = served_metrics(app.http_port).await;
    assert!(!served.is_empty(), "/metrics serves no metric");
    let table = metrics_table();
    let missing: Vec<_> = served.keys().filter(|n| !table.contains_key(*n)).collect();
    let extra: Vec<_> = table.keys().filter(|n| !served.contains_key(*n)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "README.md's metrics table lacks {missing:?} and names {extra:?}, which /metrics does not serve"
    );
    for (name, kind) in &served {
        assert_eq!(&table[name], kind, "type of {name} in README.md's table");
    }
}
