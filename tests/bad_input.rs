//! Bad input: each kind gets an `error` to the sender's topic, the store is untouched, and the
//! next valid message is handled normally. Against both brokers.

mod common;

use std::time::Duration;

use common::{fixture, message, BrokerKind, Options, TestApp};
use serde_json::{json, Value};

/// A payload, the peer that sends it, the msg_id the error should carry, and a phrase the
/// error text must contain.
struct Case {
    what: &'static str,
    peer: &'static str,
    payload: Vec<u8>,
    parent: Option<&'static str>,
    says: &'static str,
}

fn raw(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

fn cases(limit: usize) -> Vec<Case> {
    let route = json!({"operation": "insert", "resource": "default/pod/bad"});
    vec![
        Case {
            what: "not JSON",
            peer: "edged",
            payload: b"this is not json".to_vec(),
            parent: None,
            says: "not valid JSON",
        },
        Case {
            what: "truncated JSON",
            peer: "edgehub",
            payload: br#"{"header":{"msg_id":"t1"},"route":"#.to_vec(),
            parent: None,
            says: "not valid JSON",
        },
        Case {
            what: "not an object",
            peer: "edgehub",
            payload: b"[1,2,3]".to_vec(),
            parent: None,
            says: "not a JSON object",
        },
        Case {
            what: "no msg_id",
            peer: "edgehub",
            payload: raw(json!({"header": {}, "route": route, "content": {}})),
            parent: None,
            says: "msg_id",
        },
        Case {
            what: "empty msg_id",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": ""}, "route": route, "content": {}})),
            parent: None,
            says: "msg_id",
        },
        Case {
            what: "msg_id of the wrong type",
            peer: "edged",
            payload: raw(json!({"header": {"msg_id": 42}, "route": route, "content": {}})),
            parent: None,
            says: "header.msg_id",
        },
        Case {
            what: "unknown operation",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b1"},
                "route": {"operation": "upsert", "resource": "default/pod/bad"}, "content": {}})),
            parent: Some("b1"),
            says: "unknown operation",
        },
        Case {
            what: "resource with too few segments",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b2"},
                "route": {"operation": "insert", "resource": "default"}, "content": {}})),
            parent: Some("b2"),
            says: "route.resource",
        },
        Case {
            what: "resource with an empty segment",
            peer: "edged",
            payload: raw(json!({"header": {"msg_id": "b3"},
                "route": {"operation": "insert", "resource": "default//bad"}, "content": {}})),
            parent: Some("b3"),
            says: "empty segment",
        },
        Case {
            what: "resource with a control character",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b4"},
                "route": {"operation": "insert", "resource": "default/pod/b\u{7}ad"}, "content": {}})),
            parent: Some("b4"),
            says: "control character",
        },
        Case {
            what: "timestamp of the wrong type",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b5", "timestamp": "yesterday"},
                "route": route, "content": {}})),
            parent: Some("b5"),
            says: "header.timestamp",
        },
        Case {
            what: "route of the wrong type",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b6"}, "route": "insert", "content": {}})),
            parent: Some("b6"),
            says: "route",
        },
        Case {
            what: "over the size limit",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b7"}, "route": route,
                "content": {"blob": "x".repeat(limit)}})),
            parent: Some("b7"),
            says: "limit",
        },
        Case {
            what: "insert without content",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b8"}, "route": route})),
            parent: Some("b8"),
            says: "needs content",
        },
        Case {
            what: "insert of a list resource",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b9"},
                "route": {"operation": "insert", "resource": "default/pod"}, "content": {}})),
            parent: Some("b9"),
            says: "single object",
        },
        Case {
            what: "content nested too deep",
            peer: "edged",
            payload: format!(
                r#"{{"header":{{"msg_id":"b10"}},"route":{{"operation":"insert","resource":"default/pod/bad"}},"content":{}{}}}"#,
                "[".repeat(5000),
                "]".repeat(5000)
            )
            .into_bytes(),
            parent: Some("b10"),
            says: "nested",
        },
        Case {
            what: "invalid UTF-8",
            peer: "edgehub",
            payload: b"{\"header\":{\"msg_id\":\"\xff\xfe\"},\"route\":{}}".to_vec(),
            parent: None,
            says: "not valid JSON",
        },
        Case {
            what: "a byte-order mark before the object",
            peer: "edged",
            payload: [&b"\xef\xbb\xbf"[..], &raw(json!({"header": {"msg_id": "b12"}}))].concat(),
            parent: None,
            says: "not valid JSON",
        },
        Case {
            what: "a number out of range",
            peer: "edgehub",
            payload: br#"{"header":{"msg_id":"b13","timestamp":1e400},"route":{"operation":"insert","resource":"default/pod/bad"},"content":{}}"#.to_vec(),
            parent: Some("b13"),
            says: "header: number 1e400 is out of range",
        },
        Case {
            what: "a NUL in the resource",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b14"},
                "route": {"operation": "insert", "resource": "default/pod/a\u{0}b"}, "content": {}})),
            parent: Some("b14"),
            says: "control character",
        },
        Case {
            what: "a resource key of 100 KB",
            peer: "edged",
            payload: raw(json!({"header": {"msg_id": "b15"},
                "route": {"operation": "insert", "resource": format!("default/pod/{}", "n".repeat(100_000))},
                "content": {}})),
            parent: Some("b15"),
            says: "at most",
        },
        Case {
            what: "trailing garbage after the object",
            peer: "edgehub",
            payload: [raw(json!({"header": {"msg_id": "b16"}, "route": {"operation": "query", "resource": "default/pod"}})), b"}}}".to_vec()].concat(),
            parent: Some("b16"),
            says: "not valid JSON",
        },
        Case {
            what: "two hundred thousand nested arrays in the content",
            peer: "edgehub",
            payload: format!(
                r#"{{"header":{{"msg_id":"b17"}},"route":{{"operation":"update","resource":"default/configmap/c"}},"content":{}{}}}"#,
                "[".repeat(200_000),
                "]".repeat(200_000)
            )
            .into_bytes(),
            parent: Some("b17"),
            says: "nested",
        },
        Case {
            what: "a msg_id of 100 KB",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "i".repeat(100_000)}, "route": route, "content": {}})),
            parent: None,
            says: "header.msg_id is 100000 bytes; the limit is 256 bytes",
        },
        Case {
            what: "a parent_msg_id of 257 bytes",
            peer: "edged",
            payload: raw(json!({"header": {"msg_id": "b18", "parent_msg_id": "p".repeat(257)},
                "route": {"operation": "response", "resource": "default/pod/bad"}, "content": "OK"})),
            parent: Some("b18"),
            says: "header.parent_msg_id is 257 bytes; the limit is 256 bytes",
        },
        Case {
            what: "a header 5 000 levels deep",
            peer: "edgehub",
            payload: format!(
                r#"{{"header":{{"msg_id":"b19","x":{}1{}}},"route":{{"operation":"insert","resource":"default/pod/bad"}},"content":{{}}}}"#,
                "{\"x\":".repeat(5000),
                "}".repeat(5000)
            )
            .into_bytes(),
            parent: Some("b19"),
            says: "header is nested deeper than 8 levels",
        },
        Case {
            what: "a route 9 levels deep",
            peer: "edged",
            payload: raw(json!({"header": {"msg_id": "b20"},
                "route": {"operation": "insert", "resource": "default/pod/bad",
                    "x": {"x": {"x": {"x": {"x": {"x": {"x": {"x": {"x": 1}}}}}}}}}, "content": {}})),
            parent: Some("b20"),
            says: "route is nested deeper than 8 levels",
        },
        Case {
            what: "a pod delete whose uid is a number",
            peer: "edgehub",
            payload: raw(json!({"header": {"msg_id": "b21"},
                "route": {"operation": "delete", "resource": "default/pod/bad"},
                "content": {"metadata": {"name": "bad", "uid": 123}}})),
            parent: Some("b21"),
            says: "metadata.uid must be a string",
        },
        Case {
            what: "connect from edged",
            peer: "edged",
            payload: raw(json!({"header": {"msg_id": "b11"},
                "route": {"operation": "connect", "resource": "default/node/n"},
                "content": "cloud_connected"})),
            parent: Some("b11"),
            says: "only from edgehub",
        },
    ]
}

async fn each_bad_input_gets_an_error_and_changes_nothing(kind: BrokerKind) {
    let limit = 512 * 1024;
    let mut options = Options::new(kind);
    options.max_payload_bytes = limit;
    let Some(mut app) = TestApp::spawn(options).await else {
        return;
    };

    for case in cases(limit) {
        app.client.publish_raw(case.peer, case.payload).await;
        let topic = format!("metamanager/to/{}", case.peer);
        let error = app
            .client
            .wait_for(&topic, |v| v["route"]["operation"] == "error")
            .await;
        let text = error["content"].as_str().unwrap_or_default();
        assert!(
            text.contains(case.says),
            "{}: error {text:?} should say {:?}",
            case.what,
            case.says
        );
        match case.parent {
            Some(p) => assert_eq!(error["header"]["parent_msg_id"], p, "{}", case.what),
            None => assert!(error["header"]["parent_msg_id"].is_null(), "{}", case.what),
        }
        assert_eq!(error["route"]["source"], "metamanager");
        assert_eq!(error["route"]["group"], "meta");
    }

    // Nothing reached the store, nothing was forwarded, and the process still works.
    let conn = rusqlite::Connection::open(app.db_path()).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM meta", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0, "bad input touched the store");
    let seen = app.client.drain(Duration::from_millis(200)).await;
    assert!(
        !seen
            .iter()
            .any(|(_, v)| v["route"]["source"] != "metamanager"),
        "bad input was forwarded: {seen:#?}"
    );
    assert!(app.child.as_mut().unwrap().try_wait().unwrap().is_none());

    let insert = fixture("insert-pod.message.json");
    let ack = app.client.request("edgehub", &insert).await;
    assert_eq!(ack["content"], "OK");
    let log = app.log();
    assert!(log.contains("rejected message"), "bad input is logged");
}

async fn a_burst_of_garbage_does_not_stall_valid_messages(kind: BrokerKind) {
    // A valid message right after a burst of garbage is still answered in order.
    let Some(mut app) = TestApp::spawn(Options::new(kind)).await else {
        return;
    };
    for i in 0..200 {
        app.client
            .publish_raw("edged", format!("garbage {i}").into_bytes())
            .await;
    }
    let q = message("query", "default/pod/none", Value::Null);
    let reply = app.client.request("edged", &q).await;
    assert_eq!(reply["content"], json!([]));
    let errors = app
        .client
        .drain(Duration::from_millis(100))
        .await
        .into_iter()
        .filter(|(_, v)| v["route"]["operation"] == "error")
        .count();
    assert_eq!(errors, 200, "every garbage message got its error");
}

both_brokers!(
    each_bad_input_gets_an_error_and_changes_nothing,
    a_burst_of_garbage_does_not_stall_valid_messages,
);
