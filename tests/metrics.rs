//! `/metrics` of the running binary: on a fresh node, every series whose label values are known
//! is there at 0; after real MQTT traffic, the exposition parses as Prometheus text and the
//! counters moved the way the messages say they should. The alert rules in `conf/prometheus/`
//! pass promtool's checks and unit tests, and they and the Grafana dashboard in `conf/grafana/`
//! name only metrics a fresh node serves.

mod common;

use common::process::{skip, Requirement};
use common::{fixture, message, BrokerKind, Options, TestApp};
use metamanager::message::Operation;
use metamanager::metrics::{
    ApiVerb, ApiWriteOutcome, DropReason, ErrorReason, HeldBack, RemoteOutcome, SyncOutcome,
};
use metamanager::topics::Peer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POD_KEY: &str = "default/pod/nginx-7d9c5b8f4-x2k9p";

/// GET /metrics over a plain HTTP/1.1 connection, parsed.
async fn scrape(port: u16) -> (String, prometheus_parse::Scrape) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the HTTP listener accepts");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request sent");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("response read");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("the exposition parses as Prometheus text");
    (body.to_owned(), scrape)
}

/// The value of the first sample of `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_with_mqtt_traffic() {
    let mut app = TestApp::spawn(Options::new(BrokerKind::Embedded))
        .await
        .expect("embedded broker needs nothing installed");
    let port = app.http_port;

    let insert = message("insert", POD_KEY, fixture("pod.json"));
    app.client.request("edgehub", &insert).await;
    let query = message("query", POD_KEY, Value::Null);
    app.client.request("edged", &query).await;
    app.client.publish_raw("edged", b"not json".to_vec()).await;
    app.client
        .wait_for("metamanager/to/edged", |v| {
            v["route"]["operation"] == "error"
        })
        .await;

    let (text, scrape) = scrape(port).await;
    let received = "metamanager_messages_received_total";
    assert_eq!(
        value(
            &scrape,
            received,
            &[("topic", "edgehub"), ("operation", "insert")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &scrape,
            received,
            &[("topic", "edged"), ("operation", "query")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            received,
            &[("topic", "edged"), ("operation", "invalid")]
        ),
        Some(1.0)
    );
    let replies = "metamanager_replies_sent_total";
    assert_eq!(
        value(&scrape, replies, &[("operation", "response")]),
        Some(2.0)
    );
    assert_eq!(
        value(&scrape, replies, &[("operation", "error")]),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "metamanager_errors_total", &[("reason", "decode")]),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "metamanager_broker_connected", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "metamanager_cloud_connected", &[]),
        Some(0.0)
    );
    // The parser folds a histogram's series into one sample; its count is read from the text.
    let commits = text
        .lines()
        .find_map(|l| l.strip_prefix("metamanager_store_commit_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(commits.is_some_and(|c| c >= 1.0), "{text}");
    let size = value(&scrape, "metamanager_database_size_bytes", &[]);
    assert!(size.is_some_and(|s| s > 0.0), "{text}");
}

/// On a node that has done nothing yet, every counter whose label values are known is served at
/// 0 with its HELP and TYPE: a series that appears only at its first increase reads as no data
/// until then, and `rate` misses that increase. The values are the code's own.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_node_serves_every_known_series_at_zero() {
    let app = TestApp::spawn(Options::new(BrokerKind::Embedded))
        .await
        .expect("embedded broker needs nothing installed");
    let (text, scrape) = scrape(app.http_port).await;

    let mut series: Vec<(&str, Vec<(&str, &str)>)> = Vec::new();
    let mut by = |family, label, values: Vec<&'static str>| {
        series.extend(values.into_iter().map(|v| (family, vec![(label, v)])));
    };
    by(
        "errors",
        "reason",
        ErrorReason::ALL.iter().map(|v| v.as_str()).collect(),
    );
    by(
        "messages_held_back",
        "reason",
        HeldBack::ALL.iter().map(|v| v.as_str()).collect(),
    );
    by(
        "metasync_runs",
        "outcome",
        SyncOutcome::ALL.iter().map(|v| v.as_str()).collect(),
    );
    by(
        "remote_queries",
        "outcome",
        RemoteOutcome::ALL.iter().map(|v| v.as_str()).collect(),
    );
    by(
        "replies_sent",
        "operation",
        vec![Operation::Response.as_str(), Operation::Error.as_str()],
    );
    by(
        "outbox_dropped_messages",
        "reason",
        DropReason::ALL.iter().map(|v| v.as_str()).collect(),
    );
    let operations = Operation::ALL.iter().map(|o| o.as_str()).chain(["invalid"]);
    for peer in [Peer::Edgehub, Peer::Edged] {
        for operation in operations.clone() {
            let labels = vec![("topic", peer.as_str()), ("operation", operation)];
            series.push(("messages_received", labels));
        }
    }
    for verb in ApiVerb::ALL {
        for outcome in ApiWriteOutcome::ALL {
            let labels = vec![("verb", verb.as_str()), ("outcome", outcome.as_str())];
            series.push(("api_writes", labels));
        }
    }
    series.push(("broker_resent_publishes", Vec::new()));
    series.push(("digest_messages", Vec::new()));
    series.push(("embedded_broker_skipped_messages", Vec::new()));

    for (family, labels) in &series {
        let name = format!("metamanager_{family}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP of {name}:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} counter\n")),
            "no TYPE of {name}:\n{text}"
        );
        let sample = value(&scrape, &format!("{name}_total"), labels);
        assert_eq!(
            sample,
            Some(0.0),
            "{name}_total{labels:?} on a fresh node:\n{text}"
        );
    }
}

const RULES: &str = "conf/prometheus/metamanager.rules.yml";
const RULE_TESTS: &str = "conf/prometheus/metamanager.rules.test.yml";
const DASHBOARD: &str = "conf/grafana/metamanager.json";

fn repo_file(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `metamanager_…` names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("metamanager_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Every `expr` of the alert rules, and of the dashboard's panels.
fn shipped_queries() -> Vec<(String, String)> {
    let mut queries: Vec<(String, String)> = repo_file(RULES)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| (RULES.to_owned(), e.trim().to_owned()))
        .collect();
    let dashboard: Value = serde_json::from_str(&repo_file(DASHBOARD)).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "the dashboard has panels");
    for panel in panels {
        for target in panel["targets"].as_array().expect("a panel's targets") {
            let expr = target["expr"].as_str().expect("a target's expr");
            queries.push((format!("{DASHBOARD}: {}", panel["title"]), expr.to_owned()));
        }
    }
    queries
}

/// promtool accepts the rules and its unit tests of them pass: each alert fires on the series
/// written to fire it, and not on the others.
#[test]
fn the_alert_rules_pass_promtools_checks_and_unit_tests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/prometheus");
    for args in [
        vec!["check", "rules", "metamanager.rules.yml"],
        vec!["test", "rules", "metamanager.rules.test.yml"],
    ] {
        let out = match std::process::Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                skip(
                    Requirement::Promtool,
                    &format!("promtool cannot be run ({e}; apt-get install prometheus)"),
                );
                return;
            }
        };
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        repo_file(RULE_TESTS).contains("metamanager.rules.yml"),
        "the unit tests load the rules"
    );
}

/// Every metric the alert rules and the dashboard read is served by a node that has done
/// nothing yet: no alert or panel waits for a first event to have a series, and none names a
/// metric that does not exist. A node that is up is ready and says its outbox's bound.
#[tokio::test(flavor = "multi_thread")]
async fn every_alert_and_dashboard_query_names_a_metric_a_fresh_node_serves() {
    let app = TestApp::spawn(Options::new(BrokerKind::Embedded))
        .await
        .expect("embedded broker needs nothing installed");
    let (text, scrape) = scrape(app.http_port).await;
    // As the text names them (a histogram's `_bucket`, `_sum` and `_count`), as PromQL does.
    let served: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let queries = shipped_queries();
    let mut missing = Vec::new();
    for (source, expr) in &queries {
        let names = metric_names(expr);
        assert!(
            !names.is_empty() || expr.starts_with("up{"),
            "{source}: {expr}"
        );
        for name in names {
            if !served.contains(name.as_str()) {
                missing.push(format!("{source}: {name} in {expr}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queries name metrics a fresh node does not serve:\n{}\n\n{text}",
        missing.join("\n")
    );
    assert_eq!(
        value(&scrape, "metamanager_ready", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&scrape, "metamanager_outbox_capacity_messages", &[]),
        Some(10_000.0),
        "outbox.max_messages' default"
    );
    assert_eq!(
        value(
            &scrape,
            "metamanager_outbox_oldest_message_age_seconds",
            &[]
        ),
        Some(0.0)
    );
}

/// GET `path` (already encoded) of a local HTTP server, its body as JSON. HTTP/1.0, so that the
/// answer is not chunked.
async fn get_json(port: u16, path: &str) -> Option<Value> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8(response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// `text` as a URL query value.
fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The way an operator meets the rules and the dashboard: a real Prometheus (Debian's
/// `prometheus` package, which carries promtool too) scrapes a fresh node with the rules loaded.
/// The target is up, every rule loads healthy, and every dashboard query (its variables filled
/// in as Grafana would) evaluates without error; the `Node` variable finds the node.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_a_node_and_evaluates_the_rules_and_the_dashboard() {
    let probe = std::process::Command::new("prometheus")
        .arg("--version")
        .output();
    if probe.is_err() {
        skip(
            Requirement::Promtool,
            "prometheus is not installed (apt-get install prometheus)",
        );
        return;
    }
    let app = TestApp::spawn(Options::new(BrokerKind::Embedded))
        .await
        .expect("embedded broker needs nothing installed");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES);
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: metamanager\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            rules.display(),
            app.http_port
        ),
    )
    .expect("config written");
    let port = common::free_port();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus runs");
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        // Scraped, and the rules evaluated at least once.
        loop {
            let targets = get_json(port, "/api/v1/targets").await;
            let up = targets.as_ref().is_some_and(|t| {
                t["data"]["activeTargets"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|t| t["health"] == "up"))
            });
            let rules = get_json(port, "/api/v1/rules").await;
            let evaluated = rules.as_ref().is_some_and(|r| {
                r["data"]["groups"][0]["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
            if up && evaluated {
                break rules.unwrap_or_default();
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    let rules = match outcome {
        Ok(rules) => rules,
        Err(_) => {
            let _ = prometheus.kill();
            panic!("prometheus did not scrape the node and evaluate the rules within 60 s");
        }
    };
    let mut failures = Vec::new();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let in_file = repo_file(RULES).matches("- alert:").count();
    if loaded.len() != in_file {
        failures.push(format!("{} rules loaded of {in_file}", loaded.len()));
    }
    for rule in &loaded {
        if rule["health"] != "ok" {
            failures.push(format!("rule {}: {}", rule["name"], rule["lastError"]));
        }
    }
    for (source, expr) in shipped_queries() {
        let expr = expr
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m");
        let path = format!("/api/v1/query?query={}", url_encoded(&expr));
        let answer = get_json(port, &path).await.unwrap_or_default();
        if answer["status"] != "success" {
            failures.push(format!("{source}: {expr}: {answer}"));
        }
    }
    let instances = get_json(
        port,
        "/api/v1/label/instance/values?match[]=metamanager_ready",
    )
    .await
    .unwrap_or_default();
    let node = format!("127.0.0.1:{}", app.http_port);
    if !instances["data"]
        .as_array()
        .is_some_and(|a| a.iter().any(|i| i == node.as_str()))
    {
        failures.push(format!("the Node variable's query finds {instances}"));
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
