//! The versions of a scope: a `query` of `ns/type` with content `{"versions": true}` (and
//! `"continue"` for the next page) is answered from the store with `key → resourceVersion`, a
//! page within `mqtt.max_payload_bytes` at a time, never with objects (topics.md,
//! "Reconciliation"). With the digest, it is how a cloud finds what differs without resending
//! anything.

use std::sync::Arc;

use crate::message::{self, Operation};

use super::outcome::Outcome;
use super::request::VersionsRequest;
use super::{Context, Later};

impl VersionsRequest {
    /// Runs in its place in the pipeline, after every earlier write is committed.
    pub(super) fn start(self, ctx: &Arc<Context>) -> Later {
        let ctx = ctx.clone();
        Box::pin(async move { self.answer(&ctx).await })
    }

    async fn answer(self, ctx: &Context) -> Outcome {
        let Self { msg, after } = self;
        // What the answer weighs without entries; the entries and the token get the rest.
        let bare = message::raw(r#"{"versions":{},"continue":null}"#.to_owned());
        let envelope = message::reply(&msg, Operation::Response, &bare).len();
        let room = ctx.rules.max_payload.saturating_sub(envelope);
        let r = &msg.resource;
        let content = ctx
            .store
            .versions(r.namespace(), r.rtype(), after, room)
            .await
            .map(|page| {
                let token = page
                    .more
                    .then(|| page.entries.last().map(|(k, _)| k.clone()));
                let entries: serde_json::Map<String, serde_json::Value> = page
                    .entries
                    .into_iter()
                    .map(|(k, rv)| (k, serde_json::Value::String(rv)))
                    .collect();
                // Written by hand to keep the contract's member order; both parts are plain
                // JSON values that cannot fail to serialise.
                message::raw(format!(
                    r#"{{"versions":{},"continue":{}}}"#,
                    serde_json::Value::Object(entries),
                    serde_json::json!(token.flatten())
                ))
            });
        Outcome::answer(&msg, content)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::ops::testing::{message, Harness};
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_versions_of_a_scope_come_in_pages_within_the_payload_limit() {
        let mut h = Harness::with_settings("mqtt:\n  max_payload_bytes: 4096\n").await;
        let n = 500;
        for i in 0..n {
            let name = format!("pod-{i:05}");
            let object =
                json!({"metadata": {"name": name, "resourceVersion": format!("{}", 100 + i)}});
            h.handle(
                Peer::Edgehub,
                message(
                    &format!("i-{i}"),
                    "insert",
                    &format!("default/pod/{name}"),
                    object,
                ),
            )
            .await;
        }
        h.broker.published_now();
        let mut token = Value::Null;
        let mut seen = serde_json::Map::new();
        let mut pages = 0;
        loop {
            let id = format!("v-{pages}");
            let content = json!({"versions": true, "continue": token});
            h.handle(Peer::Edgehub, message(&id, "query", "default/pod", content))
                .await;
            let answer = loop {
                let p = h.broker.published().await;
                if p.json()["header"]["parent_msg_id"] == id.as_str() {
                    break p;
                }
            };
            assert!(
                answer.payload.len() <= 4096,
                "{} bytes",
                answer.payload.len()
            );
            let page = answer.json()["content"].clone();
            seen.extend(page["versions"].as_object().unwrap().clone());
            pages += 1;
            token = page["continue"].clone();
            if token.is_null() {
                break;
            }
        }
        assert_eq!(seen.len(), n);
        assert_eq!(seen["default/pod/pod-00007"], "107");
        assert!(
            pages >= 4,
            "{pages} pages: about 16 KB of versions in pages of 4 KB"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_of_another_scope_is_an_error() {
        let mut h = Harness::new().await;
        let content = json!({"versions": true, "continue": "other/pod/x"});
        h.handle(
            Peer::Edgehub,
            message("v-1", "query", "default/pod", content),
        )
        .await;
        let text = h.error_to(Peer::Edgehub).await;
        assert!(text.contains("was not given out"), "{text}");
    }
}
