//! Message decoding and validation on arbitrary bytes.
//!
//! Never panics on any input, and whatever `Message::decode` accepts satisfies the message
//! model: a non-empty msg_id, a resource key that re-parses to the same resource, content that
//! is not `null`, and replies built from it (ack, reply, error) that decode again with
//! `parent_msg_id` set to the original msg_id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use metamanager::message::{self, Message, Operation, GROUP, MAX_DEPTH, SOURCE};
use metamanager::resource::{Resource, MAX_KEY_LEN};

/// The inbound size limit the fuzzer decodes with.
const LIMIT: usize = 1 << 20;
/// Replies add a header to the content they carry, so they are decoded again with room to spare.
const REPLY_LIMIT: usize = 2 * LIMIT;

fuzz_target!(|data: &[u8]| {
    let salvaged = message::salvage_msg_id(data);
    if let Some(id) = &salvaged {
        assert!(!id.is_empty(), "salvage_msg_id returned an empty id");
    }
    let msg = match Message::decode(data, LIMIT) {
        Ok(msg) => msg,
        Err(e) => {
            // The error text is what the sender sees; building it must not panic either.
            let text = e.to_string();
            assert!(!text.is_empty());
            let out = message::error(salvaged.as_deref(), "", &text);
            let v: serde_json::Value = serde_json::from_slice(&out).expect("error reply is JSON");
            assert_eq!(v["content"].as_str(), Some(text.as_str()));
            return;
        }
    };
    check_accepted(data, &msg, salvaged.as_deref());
});

fn check_accepted(data: &[u8], msg: &Message, salvaged: Option<&str>) {
    assert!(data.len() <= LIMIT);
    assert!(!msg.msg_id().is_empty(), "accepted an empty msg_id");
    if let Some(id) = salvaged {
        assert_eq!(id, msg.msg_id(), "salvage_msg_id disagrees with decode");
    }

    // The resource key re-parses to the same resource.
    let key = msg.resource.key();
    assert!(key.len() <= MAX_KEY_LEN);
    assert_eq!(Resource::parse(key).as_ref(), Ok(&msg.resource));
    assert_eq!(msg.resource.to_string(), key);

    // Content: absent or a JSON value other than null, nested at most MAX_DEPTH deep, and
    // parseable again (update's comparison and delete's uid check parse it later).
    if msg.content.is_some() {
        let content = msg.content_json();
        assert_ne!(content, "null");
        match serde_json::from_str::<serde_json::Value>(content) {
            Ok(value) => assert!(depth(&value) <= MAX_DEPTH, "content deeper than MAX_DEPTH"),
            Err(e) => panic!("accepted content does not parse again: {e}"),
        }
    }
    assert_eq!(msg.content.is_none(), msg.content_json() == "null");

    // Ack: response, content "OK".
    let ack = decode_reply(&message::ack(msg), msg, Operation::Response);
    assert_eq!(ack.content_json(), r#""OK""#);

    // Reply carrying the original content, with the original operation.
    let content = msg.content_raw();
    let rep = decode_reply(
        &message::reply(msg, msg.operation, &content),
        msg,
        msg.operation,
    );
    assert_eq!(rep.content_json(), msg.content_json());

    // Error whose text is taken from the input (quotes, backslashes, any unicode).
    let text = String::from_utf8_lossy(&data[..data.len().min(256)]);
    let err = message::error(Some(msg.msg_id()), key, &text);
    let err = decode_reply(&err, msg, Operation::Error);
    let got: String = serde_json::from_str(err.content_json()).expect("error content is a string");
    assert_eq!(got, text);
}

/// Decodes a reply MetaManager built for `to` and checks its route and header.
fn decode_reply(bytes: &[u8], to: &Message, operation: Operation) -> Message {
    let out = match Message::decode(bytes, REPLY_LIMIT) {
        Ok(out) => out,
        Err(e) => panic!(
            "reply does not decode: {e}\n{}",
            String::from_utf8_lossy(bytes)
        ),
    };
    assert_eq!(out.header.parent_msg_id.as_deref(), Some(to.msg_id()));
    assert_ne!(out.msg_id(), to.msg_id());
    assert_eq!(out.operation, operation);
    assert_eq!(out.resource, to.resource);
    assert_eq!(out.source, SOURCE);
    assert_eq!(out.group, GROUP);
    out
}

/// Nesting depth of a JSON value: scalars 0, each array or object level one more.
fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
