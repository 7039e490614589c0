//! The `digest` message to edgehub: what the node holds, per scope, in a few bytes, so that the
//! cloud can tell whether it agrees with the node without either side sending an object
//! (topics.md, "Reconciliation").
//!
//! The digest itself is kept by the store ([`crate::store::digest`]); reading it costs one row
//! per scope, whatever the store holds. Here it is written as the wire form, split into parts
//! when it does not fit in one message of `mqtt.max_payload_bytes`.

use bytes::Bytes;

use super::outbox::{self, Outbox};
use crate::message::{self, Operation};
use crate::store::{Digest, Store, StoreError};

/// Publishes the digest to edgehub: one message, or its parts in order. Returns how many
/// messages went out.
pub async fn publish(
    store: &Store,
    outbox: &Outbox,
    node_id: &str,
    max_payload: usize,
) -> Result<usize, StoreError> {
    let digest = store.digest().await?;
    let parts = messages(node_id, &digest, max_payload);
    let count = parts.len();
    let resource = resource(node_id);
    for (i, payload) in parts.into_iter().enumerate() {
        // Queued only while older messages wait for the cloud (it goes after the changes it
        // covers); a newer digest then takes the place of a queued one.
        let key = if count == 1 {
            resource.clone()
        } else {
            format!("{resource}#{i}")
        };
        outbox
            .send_to_cloud(outbox::cloud_message(&key, Bytes::from(payload), true))
            .await?;
    }
    Ok(count)
}

/// `{node_id}/digest`.
pub fn resource(node_id: &str) -> String {
    format!("{node_id}/digest")
}

/// The digest as messages of at most `max_payload` bytes: one when it fits, else parts, each
/// with `"part": i` (from 0) and `"parts": n`, each carrying as many whole scopes as fit (one at
/// least).
pub fn messages(node_id: &str, digest: &Digest, max_payload: usize) -> Vec<Vec<u8>> {
    let resource = resource(node_id);
    let entries: Vec<String> = digest
        .scopes
        .iter()
        .map(|s| {
            format!(
                "{}:{{\"count\":{},\"hash\":\"{}\"}}",
                serde_json::Value::String(s.scope.clone()),
                s.count,
                s.hash_hex()
            )
        })
        .collect();
    let build = |entries: &[String], part: Option<(usize, usize)>| {
        let content = content(digest.change, entries, part);
        match serde_json::value::RawValue::from_string(content) {
            Ok(raw) => message::build(None, Operation::Digest, &resource, &raw),
            Err(_) => Vec::new(),
        }
    };
    let whole = build(&entries, None);
    if whole.len() <= max_payload || entries.len() <= 1 {
        return vec![whole];
    }
    // What a part costs besides its scopes, with the widest part numbers.
    let overhead = build(&[], Some((usize::MAX, usize::MAX))).len();
    let room = max_payload.saturating_sub(overhead);
    let mut chunks: Vec<&[String]> = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let cost = entry.len() + 1;
        if i > start && used + cost > room {
            chunks.push(&entries[start..i]);
            (start, used) = (i, 0);
        }
        used += cost;
    }
    chunks.push(&entries[start..]);
    let parts = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| build(chunk, Some((i, parts))))
        .collect()
}

fn content(change: u64, entries: &[String], part: Option<(usize, usize)>) -> String {
    let mut out = format!("{{\"change\":{change},\"scopes\":{{{}}}", entries.join(","));
    if let Some((part, parts)) = part {
        out.push_str(&format!(",\"part\":{part},\"parts\":{parts}"));
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::store::ScopeDigest;

    fn digest(scopes: usize) -> Digest {
        Digest {
            change: 42,
            scopes: (0..scopes)
                .map(|i| ScopeDigest {
                    scope: format!("ns-{i:04}/pod"),
                    count: i as u64 + 1,
                    hash: 0x0f3a_9c21_d4e5_b677,
                })
                .collect(),
        }
    }

    #[test]
    fn a_small_digest_is_one_message_in_the_wire_form() {
        let out = messages("edge-node", &digest(2), 1 << 20);
        assert_eq!(out.len(), 1);
        let msg: Value = serde_json::from_slice(&out[0]).unwrap();
        assert_eq!(msg["route"]["operation"], "digest");
        assert_eq!(msg["route"]["resource"], "edge-node/digest");
        assert_eq!(msg["route"]["source"], "metamanager");
        assert_eq!(
            msg["content"],
            serde_json::json!({"change": 42, "scopes": {
                "ns-0000/pod": {"count": 1, "hash": "0f3a9c21d4e5b677"},
                "ns-0001/pod": {"count": 2, "hash": "0f3a9c21d4e5b677"}}})
        );
    }

    #[test]
    fn a_large_digest_is_split_into_parts_that_each_fit() {
        let whole = digest(500);
        let limit = 4096;
        let out = messages("edge-node", &whole, limit);
        assert!(out.len() > 1);
        let mut scopes = Vec::new();
        for (i, part) in out.iter().enumerate() {
            assert!(part.len() <= limit, "part {i}: {} bytes", part.len());
            let msg: Value = serde_json::from_slice(part).unwrap();
            assert_eq!(msg["content"]["part"], i);
            assert_eq!(msg["content"]["parts"], out.len());
            assert_eq!(msg["content"]["change"], 42);
            scopes.extend(
                msg["content"]["scopes"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned(),
            );
        }
        let expected: Vec<String> = whole.scopes.iter().map(|s| s.scope.clone()).collect();
        assert_eq!(scopes, expected, "every scope once, in order");
    }
}
