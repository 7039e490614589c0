//! What a newcomer reads in README.md holds against the real binary: the walkthrough, pasted as
//! one script, gets the replies it shows (per topic, in the order shown; on the embedded broker
//! and on mosquitto), and the metrics table of docs/operating.md names every metric `/metrics`
//! serves, with its type, and no other. A sample of topics.md's examples (connect, bad input) gets its outputs too.
//!
//! A reply is compared as shown, field by field, where the docs cut it short (`…`) too: a reader
//! copies a field's value, not just the ids. Only the values each run makes afresh are not (see
//! [`run_dependent`]).

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

/// One message as `mosquitto_sub -v` prints it, and as the docs show it: the topic, then the
/// payload, which may span lines (a pretty-printed fixture does).
#[derive(Debug)]
struct Printed<P> {
    topic: String,
    payload: P,
}

/// The messages of `mosquitto_sub -v` output, or of a doc's text blocks, in order; `read`
/// reads each payload.
fn printed<P>(output: &str, read: impl Fn(&str) -> P) -> Vec<Printed<P>> {
    let mut texts: Vec<(&str, String)> = Vec::new();
    for line in output.lines() {
        if line.starts_with("edge/") {
            let (topic, payload) = line.split_once(' ').unwrap_or((line, ""));
            texts.push((topic, payload.to_owned()));
        } else {
            let (_, payload) = texts
                .last_mut()
                .unwrap_or_else(|| panic!("a line before any message: {line:?}\n{output}"));
            payload.push('\n');
            payload.push_str(line);
        }
    }
    texts
        .into_iter()
        .map(|(topic, payload)| Printed {
            topic: topic.to_owned(),
            payload: read(&payload),
        })
        .collect()
}

/// A payload as MetaManager or a client sent it.
#[derive(Debug)]
enum Sent {
    Json(Value),
    Text(String),
}

impl Sent {
    fn read(payload: &str) -> Sent {
        serde_json::from_str(payload).map_or_else(|_| Sent::Text(payload.to_owned()), Sent::Json)
    }
}

/// A payload as a doc shows it: JSON cut short with `…`, or the text of one that is not JSON.
#[derive(Debug)]
enum Shown {
    Json(Pattern),
    Text(String),
}

impl Shown {
    /// Text that looks like JSON must read as JSON: a `…` the reader cannot place fails here
    /// rather than being compared as text, which no output would match.
    fn read(payload: &str) -> Shown {
        match Pattern::read(payload) {
            Ok(pattern) => Shown::Json(pattern),
            Err(e) if payload.contains('…') || payload.trim_start().starts_with(['{', '[']) => {
                panic!("a shown payload does not read as JSON with `…`: {e}\n{payload}")
            }
            Err(_) => Shown::Text(payload.to_owned()),
        }
    }
}

/// JSON as the docs show it. In an object or an array, `…` stands for members or elements left
/// out; where there is none, the object or array is shown whole.
#[derive(Debug)]
enum Pattern {
    Scalar(Value),
    Object {
        members: BTreeMap<String, Pattern>,
        elided: bool,
    },
    Array {
        items: Vec<Pattern>,
        elided: bool,
    },
}

impl Pattern {
    fn read(text: &str) -> Result<Pattern, String> {
        let mut reader = Reader { text, at: 0 };
        let pattern = reader.value()?;
        reader.skip_space();
        if reader.at < text.len() {
            return Err(reader.error("text after the value"));
        }
        Ok(pattern)
    }

    /// The member at `path` (dotted), where it is shown.
    fn at(&self, path: &str) -> Option<&Pattern> {
        path.split('.')
            .try_fold(self, |pattern, key| match pattern {
                Pattern::Object { members, .. } => members.get(key),
                _ => None,
            })
    }

    fn at_mut(&mut self, path: &str) -> Option<&mut Pattern> {
        path.split('.')
            .try_fold(self, |pattern, key| match pattern {
                Pattern::Object { members, .. } => members.get_mut(key),
                _ => None,
            })
    }

    fn shows(&self, path: &str, value: &str) -> bool {
        matches!(self.at(path), Some(Pattern::Scalar(Value::String(s))) if s == value)
    }

    fn kind(&self) -> &'static str {
        match self {
            Pattern::Scalar(value) => kind(value),
            Pattern::Object { .. } => "an object",
            Pattern::Array { .. } => "an array",
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a [`Pattern`]: JSON's grammar, with `…` allowed wherever a member or an element is.
struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl Reader<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        self.at = self.text.len() - self.rest().trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        let found = self.rest().starts_with(token);
        if found {
            self.at += token.len();
        }
        found
    }

    fn error(&self, what: &str) -> String {
        let near: String = self.rest().chars().take(40).collect();
        format!("{what} at byte {}, before {near:?}", self.at)
    }

    fn value(&mut self) -> Result<Pattern, String> {
        self.skip_space();
        if self.eat("{") {
            let mut members = BTreeMap::new();
            let mut elided = false;
            if !self.eat("}") {
                loop {
                    if self.eat("…") {
                        elided = true;
                    } else {
                        let key = self.string()?;
                        if !self.eat(":") {
                            return Err(self.error("no `:` after a key"));
                        }
                        let value = self.value()?;
                        if members.insert(key.clone(), value).is_some() {
                            return Err(self.error(&format!("{key:?} twice")));
                        }
                    }
                    if self.eat("}") {
                        break;
                    }
                    if !self.eat(",") {
                        return Err(self.error("no `,` or `}` after a member"));
                    }
                }
            }
            Ok(Pattern::Object { members, elided })
        } else if self.eat("[") {
            let mut items = Vec::new();
            let mut elided = false;
            if !self.eat("]") {
                loop {
                    if self.eat("…") {
                        elided = true;
                    } else {
                        items.push(self.value()?);
                    }
                    if self.eat("]") {
                        break;
                    }
                    if !self.eat(",") {
                        return Err(self.error("no `,` or `]` after an element"));
                    }
                }
            }
            Ok(Pattern::Array { items, elided })
        } else if self.rest().starts_with('"') {
            Ok(Pattern::Scalar(Value::String(self.string()?)))
        } else {
            let len = self
                .rest()
                .find(|c: char| c == ',' || c == '}' || c == ']' || c.is_whitespace())
                .unwrap_or(self.rest().len());
            let scalar: Value = serde_json::from_str(&self.rest()[..len])
                .map_err(|e| self.error(&format!("not a JSON value ({e})")))?;
            self.at += len;
            Ok(Pattern::Scalar(scalar))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.skip_space();
        if !self.rest().starts_with('"') {
            return Err(self.error("no string"));
        }
        let mut escaped = false;
        let end = self
            .rest()
            .char_indices()
            .skip(1)
            .find(|&(_, c)| {
                let closes = !escaped && c == '"';
                escaped = !escaped && c == '\\';
                closes
            })
            .map(|(i, _)| i + 1)
            .ok_or_else(|| self.error("a string that does not end"))?;
        let string = serde_json::from_str(&self.rest()[..end])
            .map_err(|e| self.error(&format!("not a JSON string ({e})")))?;
        self.at += end;
        Ok(string)
    }
}

/// The fields of a shown message whose values each run makes afresh; only their JSON type is
/// compared. Every other field shown is compared as shown, the ids a message answers
/// (`parent_msg_id`) and the ids of the messages a client sent among them.
fn run_dependent(topic: &str, shown: &Pattern) -> Vec<&'static str> {
    let mut paths = Vec::new();
    if topic.ends_with("/metamanager/status") {
        // When the status was published.
        paths.push("timestamp");
    }
    if shown.shows("route.source", "metamanager") {
        // A message MetaManager makes has a new UUID and the time it was made (one it forwards
        // keeps the sender's).
        paths.extend(["header.msg_id", "header.timestamp"]);
        if shown.shows("route.operation", "digest") {
            // The number of the store's last change, which a new database starts from the clock.
            paths.push("content.change");
        }
    }
    paths
}

/// Where `sent` differs from what `shown` shows of it, a line each, `path` naming the place.
fn differences(
    shown: &Pattern,
    sent: &Value,
    path: &str,
    run_dependent: &[&str],
    found: &mut Vec<String>,
) {
    let place = if path.is_empty() { "the payload" } else { path };
    if run_dependent.contains(&path) {
        if shown.kind() != kind(sent) {
            found.push(format!(
                "{place}: shown {}, sent {sent} ({})",
                shown.kind(),
                kind(sent)
            ));
        }
        return;
    }
    let member = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (shown, sent) {
        (Pattern::Scalar(value), sent) => {
            if value != sent {
                found.push(format!("{place}: shown {value}, sent {sent}"));
            }
        }
        (Pattern::Object { members, elided }, Value::Object(sent_members)) => {
            for (key, pattern) in members {
                match sent_members.get(key) {
                    Some(value) => differences(pattern, value, &member(key), run_dependent, found),
                    None => found.push(format!("{}: shown, not sent", member(key))),
                }
            }
            if !elided {
                for (key, value) in sent_members {
                    if !members.contains_key(key) {
                        found.push(format!("{}: sent ({value}), not shown", member(key)));
                    }
                }
            }
        }
        (Pattern::Array { items, elided }, Value::Array(sent_items)) => {
            if *elided {
                // The elements shown, in order, among those sent.
                let mut next = 0;
                for (i, pattern) in items.iter().enumerate() {
                    let matching = (next..sent_items.len()).find(|&j| {
                        let mut none = Vec::new();
                        differences(pattern, &sent_items[j], "", run_dependent, &mut none);
                        none.is_empty()
                    });
                    match matching {
                        Some(j) => next = j + 1,
                        None => found.push(format!(
                            "{path}[{i}]: shown, and none of the elements sent after [{next}] is it"
                        )),
                    }
                }
            } else if items.len() != sent_items.len() {
                found.push(format!(
                    "{place}: {} elements shown, {} sent",
                    items.len(),
                    sent_items.len()
                ));
            } else {
                for (i, (pattern, value)) in items.iter().zip(sent_items).enumerate() {
                    differences(
                        pattern,
                        value,
                        &format!("{path}[{i}]"),
                        run_dependent,
                        found,
                    );
                }
            }
        }
        (shown, sent) => found.push(format!(
            "{place}: shown {}, sent {sent} ({})",
            shown.kind(),
            kind(sent)
        )),
    }
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
fn walkthrough_promise() -> Vec<Printed<Shown>> {
    let text = readme();
    let shown = blocks(section(&text, "## Walkthrough"), "text").concat();
    printed(&shown, Shown::read)
}

fn assert_walkthrough(output: &str) {
    assert_shown(output, &walkthrough_promise());
}

/// How many messages came on each topic.
fn per_topic<P>(messages: &[Printed<P>]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for message in messages {
        *counts.entry(message.topic.as_str()).or_default() += 1;
    }
    counts
}

/// `output` has the messages `promised` shows: the same topics, on each the same number of
/// messages, and each in the order shown (the one order guaranteed) as shown, field by field,
/// but for the [`run_dependent`] values.
fn assert_shown(output: &str, promised: &[Printed<Shown>]) {
    assert!(!promised.is_empty(), "no output shown");
    let got = printed(output, Sent::read);
    assert_eq!(
        per_topic(&got),
        per_topic(promised),
        "the messages per topic differ from those shown; the script printed:\n{output}"
    );
    let mut found = Vec::new();
    for &topic in per_topic(promised).keys() {
        let sent = got.iter().filter(|m| m.topic == topic);
        let shown = promised.iter().filter(|m| m.topic == topic);
        for (n, (sent, shown)) in sent.zip(shown).enumerate() {
            let mut here = Vec::new();
            match (&shown.payload, &sent.payload) {
                (Shown::Json(pattern), Sent::Json(value)) => differences(
                    pattern,
                    value,
                    "",
                    &run_dependent(topic, pattern),
                    &mut here,
                ),
                (Shown::Text(text), Sent::Text(sent)) if text.trim_end() == sent.trim_end() => {}
                (shown, sent) => here.push(format!("shown {shown:?}, sent {sent:?}")),
            }
            found.extend(
                here.into_iter()
                    .map(|d| format!("{topic}, message {}: {d}", n + 1)),
            );
        }
    }
    assert!(
        found.is_empty(),
        "the messages differ from those shown:\n{}\nthe script printed:\n{output}",
        found.join("\n")
    );
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

/// Where the metrics table is.
const METRICS_DOC: &str = "docs/operating.md";

/// Name and type of every metric in the metrics table.
fn metrics_table() -> BTreeMap<String, String> {
    let text = doc(METRICS_DOC);
    let metrics = section(&text, "## Metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("| `metamanager_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect()
}

/// Name and type of every metric `/metrics` serves, named as the table names them (a
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
        "{METRICS_DOC}'s metrics table lacks {missing:?} and names {extra:?}, which /metrics does not serve"
    );
    for (name, kind) in &served {
        assert_eq!(
            &table[name], kind,
            "type of {name} in {METRICS_DOC}'s table"
        );
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
    let retained = format!(
        "edge/edge-node/metamanager/status {{\"state\":\"online\",\"node_id\":\"edge-node\",\
         \"cloud\":\"disconnected\",\"store\":\"ok\",\"version\":\"{}\",\"timestamp\":0}}\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut promised = printed(&(retained + &shown), Shown::read);
    // topics.md's digest is of the store its earlier sections filled (a pod and its status);
    // the sample's store is empty, so its digest has no scope.
    let digests: Vec<&mut Pattern> = promised
        .iter_mut()
        .filter_map(|m| match &mut m.payload {
            Shown::Json(pattern) if pattern.shows("route.operation", "digest") => {
                pattern.at_mut("content.scopes")
            }
            _ => None,
        })
        .collect();
    assert_eq!(digests.len(), 1, "one digest with its scopes shown");
    for scopes in digests {
        *scopes = Pattern::Object {
            members: BTreeMap::new(),
            elided: false,
        };
    }
    assert_shown(&output, &promised);
}
