//! replace: the cloud's complete set of one scope, in pages; held until the last, then applied
//! in one transaction, each resulting change passed to edged in key order (topics.md,
//! "Reconciliation").

use std::sync::Arc;
use std::time::Instant;

use crate::cloud::replaces::Taken;
use crate::message::{self, Operation};
use crate::store::{Change, ChangeKind, Replaced, ReplacedChange, Store, StoreError};
use crate::topics::Peer;

use super::outcome::{Outcome, Refusal};
use super::request::ReplaceRequest;
use super::{now, Context, Later, Replies, Step};

impl ReplaceRequest {
    /// Holds the page, or, on the last, queues the whole set; the rest, once committed: pass
    /// each change on to edged, then answer the counts.
    pub(super) async fn start(self, ctx: &Arc<Context>) -> Later {
        let Self { msg, page } = self;
        let r = &msg.resource;
        let replaces = &ctx.cloud.replaces;
        let taken = replaces.take(r.namespace(), r.rtype(), msg.msg_id(), page, Instant::now());
        let set = match taken {
            Ok(Taken::Held | Taken::Repeat) => return now(Outcome::ack(&msg)),
            Ok(Taken::Complete(set)) => set,
            Err(e) => return now(Outcome::Refused(Refusal::invalid(&msg, e.to_string()))),
        };
        let objects = set.len();
        let committed = match ctx.store.submit_replace(set).await {
            Ok(c) => c,
            Err(e) => return now(Outcome::store_failed(&msg, &e)),
        };
        let ctx = ctx.clone();
        Box::pin(async move {
            let done = committed.await.unwrap_or(Err(StoreError::Closed));
            if let Ok(done) = &done {
                tracing::info!(
                    scope = %msg.resource,
                    objects,
                    inserted = done.inserted,
                    updated = done.updated,
                    deleted = done.deleted,
                    unchanged = done.unchanged,
                    kept_newer = done.kept_newer,
                    "replace applied"
                );
                pass_on(&ctx.replies, &done.changes).await;
                forget_once_acknowledged(&ctx.replies, &ctx.store, done.forwards);
            }
            let counts = done.map(|done| message::raw(counts(&done)));
            Outcome::answer(&msg, counts)
        })
    }
}

/// Passes each change a replace made to edged, as an insert, update or delete of its own, in
/// key order.
async fn pass_on(replies: &Replies, changes: &[ReplacedChange]) {
    for change in changes {
        let operation = match change.kind {
            ChangeKind::Added => Operation::Insert,
            ChangeKind::Modified => Operation::Update,
            ChangeKind::Deleted => Operation::Delete,
        };
        let object = std::str::from_utf8(&change.value).unwrap_or("null");
        let content = message::raw(object.to_owned());
        let forward = message::build(None, operation, &change.key, &content);
        replies.publisher.send(Peer::Edged, forward).await;
    }
}

/// Once the broker has acknowledged a replace's forwards (the rows `rows` of `forwards`, which
/// its transaction recorded), they are not to be sent again after a restart. Waited for beside
/// the pipeline, not in it: a slow broker holds no other message up, and rows stay recorded
/// only while their forwards are unacknowledged (or until a restart sends them again).
fn forget_once_acknowledged(replies: &Replies, store: &Store, rows: Option<(i64, i64)>) {
    let Some(rows) = rows else {
        return;
    };
    // Read now, just after the forwards were handed on: reached once they are acknowledged.
    let mark = replies.publisher.delivery.mark();
    let mut confirmed = replies.publisher.delivery.confirmed();
    let store = store.clone();
    tokio::spawn(async move {
        if confirmed.wait_for(|c| *c >= mark).await.is_err() {
            return;
        }
        let change = Change {
            forwards_done: Some(rows),
            ..Change::default()
        };
        if let Err(e) = store.submit(change).await {
            tracing::debug!(error = %e, "a replace's acknowledged forwards stay recorded");
        }
    });
}

/// The step that sends edged, before anything else at start-up, the forwards of a replace
/// that the broker had not acknowledged when the last run ended (see
/// [`Store::pending_forwards`]).
pub(super) fn resend_forwards(ctx: Arc<Context>) -> Step {
    Box::pin(async move {
        let (replies, store) = (&ctx.replies, &ctx.store);
        let pending = match store.pending_forwards().await {
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, "could not read a replace's unacknowledged forwards");
                return;
            }
        };
        let (Some(first), Some(last)) = (pending.first(), pending.last()) else {
            return;
        };
        let rows = (first.seq, last.seq);
        tracing::info!(
            forwards = pending.len(),
            "sending edged a replace's forwards the broker had not acknowledged before the restart"
        );
        let changes: Vec<ReplacedChange> = pending.into_iter().map(|p| p.change).collect();
        pass_on(replies, &changes).await;
        forget_once_acknowledged(replies, store, Some(rows));
    })
}

/// The last page's answer: `{"inserted": i, "updated": u, "deleted": d, "unchanged": n}`.
fn counts(done: &Replaced) -> String {
    format!(
        r#"{{"inserted":{},"updated":{},"deleted":{},"unchanged":{}}}"#,
        done.inserted, done.updated, done.deleted, done.unchanged
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::ops::testing::{message, pod, Harness};
    use crate::topics::Peer;

    fn page(id: &str, n: u64, last: bool, items: Vec<Value>) -> Value {
        json!({"replace_id": id, "page": n, "items": items, "last": last})
    }

    async fn seed(h: &mut Harness, names: &[&str]) {
        for name in names {
            let insert = message(
                &format!("i-{name}"),
                "insert",
                &format!("default/pod/{name}"),
                pod(name),
            );
            h.handle(Peer::Edgehub, insert).await;
            h.published_to(Peer::Edged).await;
            h.published_to(Peer::Edgehub).await;
            h.broker.acked().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_are_acked_and_the_last_applies_the_set_and_forwards_each_change_in_key_order() {
        let mut h = Harness::new().await;
        seed(&mut h, &["a", "b", "c"]).await;
        let mut b = pod("b");
        b["spec"]["containers"][0]["image"] = json!("nginx:2");
        let first = message(
            "r-0",
            "replace",
            "default/pod",
            page("r", 0, false, vec![pod("d"), b]),
        );
        h.handle(Peer::Edgehub, first).await;
        let ack = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(ack["content"], "OK");
        assert!(
            h.stored("default/pod/d").await.is_none(),
            "nothing before the last page"
        );

        let last = message(
            "r-1",
            "replace",
            "default/pod",
            page("r", 1, true, vec![pod("c")]),
        );
        h.handle(Peer::Edgehub, last).await;
        let mut forwards = Vec::new();
        for _ in 0..3 {
            let f = h.published_to(Peer::Edged).await.json();
            forwards.push((
                f["route"]["operation"].as_str().unwrap().to_owned(),
                f["route"]["resource"].as_str().unwrap().to_owned(),
            ));
        }
        let expected = [
            ("delete", "default/pod/a"),
            ("update", "default/pod/b"),
            ("insert", "default/pod/d"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(o, r)| (o.to_string(), r.to_string()))
            .collect();
        assert_eq!(
            forwards, expected,
            "one message each, in key order; `c` unchanged"
        );
        let reply = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(reply["header"]["parent_msg_id"], "r-1");
        assert_eq!(
            reply["content"],
            json!({"inserted": 1, "updated": 1, "deleted": 1, "unchanged": 1})
        );
        assert!(h.stored("default/pod/a").await.is_none());
        assert_eq!(h.stored("default/pod/d").await, Some(pod("d")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_out_of_sequence_is_an_error_and_the_replace_changes_nothing() {
        let mut h = Harness::new().await;
        seed(&mut h, &["a"]).await;
        let first = message("r-0", "replace", "default/pod", page("r", 0, false, vec![]));
        h.handle(Peer::Edgehub, first).await;
        h.published_to(Peer::Edgehub).await;
        let skipped = message("r-2", "replace", "default/pod", page("r", 2, true, vec![]));
        h.handle(Peer::Edgehub, skipped).await;
        let text = h.error_to(Peer::Edgehub).await;
        assert!(text.contains("does not follow page 0"), "{text}");
        assert!(h.stored("default/pod/a").await.is_some(), "kept");
        assert_eq!(h.cloud.replaces.held(), (0, 0), "dropped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replace_of_what_the_edge_owns_or_from_edged_or_of_one_object_is_refused() {
        let mut h = Harness::new().await;
        for (peer, resource, says) in [
            (
                Peer::Edgehub,
                "default/podstatus",
                "the edge owns podstatus",
            ),
            (Peer::Edgehub, "default/event", "the edge owns event"),
            (Peer::Edgehub, "default/pod/p", "needs a scope"),
            (Peer::Edged, "default/pod", "only from edgehub"),
        ] {
            let m = message("r-0", "replace", resource, page("r", 0, true, vec![]));
            h.handle(peer, m).await;
            let reply = h.published_to(peer).await.json();
            assert_eq!(reply["route"]["operation"], "error", "{resource}");
            assert!(reply["content"].as_str().unwrap().contains(says), "{reply}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_item_that_is_not_of_the_scope_drops_the_replace() {
        let mut h = Harness::new().await;
        let first = message(
            "r-0",
            "replace",
            "default/pod",
            page("r", 0, false, vec![pod("a")]),
        );
        h.handle(Peer::Edgehub, first).await;
        h.published_to(Peer::Edgehub).await;
        let mut foreign = pod("b");
        foreign["metadata"]["namespace"] = json!("kube-system");
        for (n, bad, says) in [
            (1, foreign, "of namespace kube-system"),
            (1, json!({"metadata": {}}), "metadata.name is missing"),
            (1, json!([1]), "an object is needed"),
        ] {
            let m = message(
                "r-1",
                "replace",
                "default/pod",
                page("r", n, true, vec![bad]),
            );
            h.handle(Peer::Edgehub, m).await;
            let reply = h.published_to(Peer::Edgehub).await.json();
            assert!(reply["content"].as_str().unwrap().contains(says), "{reply}");
            assert_eq!(h.cloud.replaces.held(), (0, 0));
        }
        let unreadable = message(
            "r-2",
            "replace",
            "default/pod",
            json!({"replace_id": "r", "page": "one"}),
        );
        h.handle(Peer::Edgehub, unreadable).await;
        let reply = h.published_to(Peer::Edgehub).await.json();
        assert!(
            reply["content"]
                .as_str()
                .unwrap()
                .contains("replace content must be"),
            "{reply}"
        );
    }
}
