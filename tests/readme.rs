//! What a newcomer reads in README.md holds against the real binary: the walkthrough, pasted as
//! one script, gets the replies it shows (per topic, in the order shown; on the embedded broker
//! and on mosquitto), and the metrics table names every metric `/metrics` serves, with its type,
//! and no other. A sample of topics.md's examples (connect, bad input) gets its outputs too.

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
    doc("README.md")
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name))
        .unwrap_or_else(|e| panic!("read {name}: {e}"))
}

/// The text of the section that starts with the heading line `heading`, up to the next heading
/// of its level or above (outside fenced blocks, where `#` starts a shell comment).
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no `{heading}`"))
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
/// whatever its fresh ids and timestamps (the id it answers, else its operation when
/// MetaManager made it, else its own id, else the status's state), and its operation where
/// shown.
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
        // A message MetaManager makes has a fresh id: its operation names it.
        let made_here = field(payload, "source").as_deref() == Some("metamanager");
        let names = field(payload, "parent_msg_id")
            .map(|p| format!("answer to {p}"))
            .or_else(|| {
                made_here
                    .then(|| format!("new {}", field(payload, "operation").unwrap_or_default()))
            })
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

/// Runs `script` with bash from the repository root, aimed at `port` instead of the default
/// 1884; its standard output.
fn run_script(script: &str, port: u16) -> String {
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
        panic!("the script did not end within 30 s:\n{script}");
    }
    let out = child.wait_with_output().expect("the script's output");
    assert!(
        out.status.success(),
        "the script failed ({}): {}\n{script}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs the README walkthrough's commands as one script; what its subscriber printed.
fn run_walkthrough(port: u16) -> String {
    let text = readme();
    let walkthrough = section(&text, "## Walkthrough");
    let script = blocks(walkthrough, "sh")
        .into_iter()
        .next()
        .expect("the walkthrough has a sh block");
    run_script(&script, port)
}

/// What the walkthrough says comes back: the `text` blocks after its script.
fn walkthrough_promise() -> BTreeMap<String, Vec<Shape>> {
    let text = readme();
    let shown = blocks(section(&text, "## Walkthrough"), "text").concat();
    shapes(&shown)
}

fn assert_walkthrough(output: &str) {
    assert_shapes(output, &walkthrough_promise());
}

/// `output` has the messages `promised` shows: the same topics, on each the same messages in
/// the same order (the one order guaranteed), with the operation where one is shown.
fn assert_shapes(output: &str, promised: &BTreeMap<String, Vec<Shape>>) {
    let got = shapes(output);
    assert!(!promised.is_empty(), "no output shown");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        promised.keys().collect::<Vec<_>>(),
        "topics differ; the script printed:\n{output}"
    );
    for (topic, shown) in promised {
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

/// The examples of topics.md's `heading` section whose output follows them (a `sh` block and
/// the `text` block right after it), in order.
fn topics_examples(heading: &str) -> Vec<(String, String)> {
    let text = doc("topics.md");
    let body = section(&text, heading);
    let mut pairs = Vec::new();
    let mut pending: Option<String> = None;
    let mut rest = body;
    while let Some(at) = rest.find("```") {
        let after = &rest[at + 3..];
        let lang = after.lines().next().unwrap_or("").trim().to_owned();
        let start = after.find('\n').map_or(after.len(), |n| n + 1);
        let end = after[start..]
            .find("\n```")
            .map_or(after.len(), |n| start + n + 1);
        let block = after[start..end].to_owned();
        match lang.as_str() {
            "sh" => pending = Some(block),
            "text" => {
                if let Some(script) = pending.take() {
                    pairs.push((script, block));
                }
            }
            _ => pending = None,
        }
        rest = &after[(end + 3).min(after.len())..];
    }
    pairs
}

#[test]
fn a_sample_of_topics_examples_answers_as_shown() {
    if !mosquitto_clients() {
        return;
    }
    let mut examples = topics_examples("### 5.7 connect");
    examples.extend(topics_examples("## 8. Bad input and error texts"));
    assert!(examples.len() >= 4, "{examples:?}");
    let (mut mm, port, _) = start("  port: 0\n");
    let mut script = String::from("mosquitto_sub -p 1884 -v -t 'edge/edge-node/#' &\nsleep 0.5\n");
    let mut shown = String::new();
    for (commands, output) in &examples {
        script += commands;
        shown += output;
    }
    script += "sleep 1; kill %1\n";
    let output = run_script(&script, port);
    assert!(mm.terminate().success(), "log:\n{}", mm.log());
    // The subscriber gets the retained status first, which the examples do not show.
    let mut promised = shapes(&shown);
    promised
        .entry("edge/edge-node/metamanager/status".into())
        .or_default()
        .insert(
            0,
            Shape {
                topic: "edge/edge-node/metamanager/status".into(),
                names: "state online".into(),
                operation: None,
            },
        );
    assert_shapes(&output, &promised);
}
