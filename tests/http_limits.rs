//! The HTTP endpoint's bounds against the real binary, each set small in the config so that it
//! is reached: a client that sends half a request gets `408`, an idle keep-alive connection is
//! closed, connections over the cap get `503`, and requests and watches over their caps get
//! `429` with `Retry-After`, as kube-apiserver answers. Each time the endpoint still serves the
//! next client.

mod common;

use std::time::{Duration, Instant};

use common::{http, BrokerKind, Options, TestApp};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn spawn(http_keys: &str) -> TestApp {
    TestApp::spawn(Options::new(BrokerKind::Embedded).http(http_keys))
        .await
        .expect("embedded broker needs nothing installed")
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// Everything the server sends until it closes the connection, within `within`.
async fn read_all(stream: &mut TcpStream, within: Duration) -> String {
    let mut raw = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut raw))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

/// The Status object in an answer's body.
fn status_of(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_request_gets_408_and_an_idle_connection_is_closed() {
    let app = spawn("header_timeout: 1s\nidle_timeout: 2s").await;
    let port = app.http_port;

    // Half a request head, then nothing.
    let mut slow = connect(port).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_all(&mut slow, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(status_of(&answer)["reason"], "Timeout");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A connection that sends nothing at all is closed the same way.
    let mut silent = connect(port).await;
    let answer = read_all(&mut silent, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A keep-alive connection is answered, then closed once idle for the idle timeout.
    let mut keep = connect(port).await;
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answered = Instant::now();
    let answer = read_all(&mut keep, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(1800),
        "closed after {idle:?}, before the idle timeout"
    );

    assert_eq!(http(port, "GET", "/healthz").await.0, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_and_the_endpoint_serves_again_after() {
    let app = spawn("max_connections: 4\nheader_timeout: 30s").await;
    let port = app.http_port;

    // Four connections that say nothing hold every place.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(port).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = connect(port).await;
    let answer = read_all(&mut over, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1"), "{answer}");
    assert_eq!(status_of(&answer)["reason"], "ServiceUnavailable");

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(port, "GET", "/healthz").await.0 != 200 {
        assert!(Instant::now() < deadline, "places were not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_watches_over_their_caps_get_429_with_retry_after() {
    let app = spawn("max_requests: 2\nmax_watches: 2").await;
    let port = app.http_port;

    // Two watches take both watch places; a third is refused, and watches do not count as
    // requests, so lists still work.
    let mut watches = Vec::new();
    for _ in 0..2 {
        let mut w = connect(port).await;
        w.write_all(b"GET /api/v1/pods?watch=true HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        w.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        watches.push(w);
    }
    let (code, head, body) = http(port, "GET", "/api/v1/pods?watch=true").await;
    assert_eq!(code, 429, "{head}{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "TooManyRequests");
    assert!(status["message"]
        .as_str()
        .unwrap()
        .contains("too many watches open (at most 2)"));
    assert_eq!(http(port, "GET", "/api/v1/pods").await.0, 200);

    // Two requests whose answers are not read hold both request places: a list of 9 MB, more
    // than the kernel's socket buffers take, does not finish while its client does not read.
    let mut app = app;
    let padding = "x".repeat(150_000);
    for i in 0..60 {
        let mut cm = common::fixture("configmap.json");
        cm["metadata"]["name"] = serde_json::json!(format!("cm-{i}"));
        cm["data"] = serde_json::json!({"padding": padding});
        let m = common::message("insert", &format!("default/configmap/cm-{i}"), cm);
        app.client.request("edgehub", &m).await;
    }
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(common::request_unread(port, "/api/v1/configmaps").await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, head, body) = http(port, "GET", "/api/v1/configmaps").await;
    assert_eq!(code, 429, "{head}{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert!(status["message"]
        .as_str()
        .unwrap()
        .contains("too many requests in progress (at most 2)"));
    // A list that names `watch` twice is read as the handler reads it (the last one), so it
    // counts as a request too.
    let (code, _, _) = http(port, "GET", "/api/v1/configmaps?watch=true&watch=false").await;
    assert_eq!(code, 429);
    // Probes are never capped.
    assert_eq!(http(port, "GET", "/healthz").await.0, 200);

    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(port, "GET", "/api/v1/configmaps").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "request places were not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(watches);
}
