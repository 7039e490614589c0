//! The decoder's limits on the envelope: whatever bytes arrive, decoding never panics, and
//! nothing it accepts has an id over 256 bytes or a header or route nested deeper than 8
//! levels; nothing it salvages for an error reply is over the id limit either.
//!
//! The input is used twice: as a payload as it is, and as the recipe for a message whose
//! header and route nest to depths the input chooses, so that the fuzzer reaches the limits
//! quickly instead of having to invent valid JSON around them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metamanager::message::{salvage_msg_id, Message, MAX_ENVELOPE_DEPTH, MAX_ID_BYTES};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    check(data);
    if let [header_depth, route_depth, id_len, rest @ ..] = data {
        let nest = |levels: u8| {
            let levels = usize::from(levels % 16);
            format!("{}1{}", r#"{"x":"#.repeat(levels), "}".repeat(levels))
        };
        let id = "i".repeat(usize::from(*id_len) * 2);
        let tail = String::from_utf8_lossy(rest);
        let payload = format!(
            r#"{{"header":{{"msg_id":"{id}","deep":{}}},"route":{{"operation":"insert","resource":"a/b/c","deep":{}}},"content":{}}}"#,
            nest(*header_depth),
            nest(*route_depth),
            serde_json::to_string(&tail).unwrap_or_default(),
        );
        let decoded = check(payload.as_bytes());
        // Exactly what is within the limits is accepted.
        let within = usize::from(header_depth % 16) < MAX_ENVELOPE_DEPTH
            && usize::from(route_depth % 16) < MAX_ENVELOPE_DEPTH
            && !id.is_empty()
            && id.len() <= MAX_ID_BYTES;
        assert_eq!(decoded, within, "{payload}");
    }
});

/// Decodes `payload` and checks the invariants; whether it was accepted.
fn check(payload: &[u8]) -> bool {
    if let Some(id) = salvage_msg_id(payload) {
        assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES);
    }
    let Ok(message) = Message::decode(payload, 1 << 20) else {
        return false;
    };
    assert!(message.msg_id().len() <= MAX_ID_BYTES);
    if let Some(parent) = &message.header.parent_msg_id {
        assert!(parent.len() <= MAX_ID_BYTES);
    }
    // Deeply nested unknown top-level fields may exceed serde_json's own recursion limit; the
    // envelope is checked where the document can be read as a tree.
    if let Ok(tree) = serde_json::from_slice::<Value>(payload) {
        assert!(depth(&tree["header"]) <= MAX_ENVELOPE_DEPTH);
        assert!(depth(&tree["route"]) <= MAX_ENVELOPE_DEPTH);
    }
    true
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
