//! `/metrics` of the running binary after real MQTT traffic: the exposition parses as
//! Prometheus text and the counters moved the way the messages say they should.

mod common;

use common::{fixture, message, BrokerKind, Options, TestApp};
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
