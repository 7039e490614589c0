//! replace: the cloud's complete set of one scope, in pages; held until the last, then applied
//! in one transaction, each resulting change passed to edged in key order (topics.md,
//! "Reconciliation").

use std::time::Instant;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cloud::replaces::{Page, Replaces, Taken};
use crate::message::{self, Message, Operation};
use crate::mqtt::Inbound;
use crate::resource::Resource;
use crate::store::{Change, ChangeKind, Replaced, ReplacedChange, Store, StoreError};
use crate::topics::Peer;

use super::{refuse_message, respond, rules, store_failed, Replies, Step};

/// Types the edge owns: their state comes from edged, and the cloud has no set to replace
/// them with.
const EDGE_OWNED: [&str; 2] = [crate::resource::rtype::PODSTATUS, rules::EVENT];

/// replace: hold a page, or apply the whole set on the last one.
pub(super) async fn replace(
    replies: &Replies,
    store: &Store,
    replaces: &Replaces,
    sender: Peer,
    publish: Inbound,
    msg: Message,
) -> Step {
    if sender != Peer::Edgehub {
        let text = "replace is accepted only from edgehub".to_owned();
        return refuse_message(replies, sender, publish, &msg, text);
    }
    let r = &msg.resource;
    if r.name().is_some() {
        let text = format!(
            "replace needs a scope (namespace/type), not the single object {}",
            r.key()
        );
        return refuse_message(replies, sender, publish, &msg, text);
    }
    if EDGE_OWNED.contains(&r.rtype()) {
        let text = format!(
            "replace of {} refused: the edge owns {}, the cloud has no set to replace it with",
            r.key(),
            r.rtype()
        );
        return refuse_message(replies, sender, publish, &msg, text);
    }
    let page = match parse_page(&msg) {
        Ok(page) => page,
        Err((replace_id, text)) => {
            // A page that cannot be read ends its replace as surely as one out of sequence.
            if let Some(id) = replace_id {
                replaces.discard(&id);
            }
            return refuse_message(replies, sender, publish, &msg, text);
        }
    };
    let (namespace, rtype) = (r.namespace().to_owned(), r.rtype().to_owned());
    let taken = replaces.take(&namespace, &rtype, msg.msg_id(), page, Instant::now());
    let set = match taken {
        Ok(Taken::Held | Taken::Repeat) => return acked(replies, sender, publish, msg),
        Ok(Taken::Complete(set)) => set,
        Err(e) => return refuse_message(replies, sender, publish, &msg, e.to_string()),
    };
    let objects = set.len();
    let committed = match store.submit_replace(set).await {
        Ok(c) => c,
        Err(e) => return store_failed(replies, sender, publish, msg, e),
    };
    let replies = replies.clone();
    let store = store.clone();
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
            pass_on(&replies, &done.changes).await;
            forget_once_acknowledged(&replies, &store, done.forwards);
        }
        let counts = done.map(|done| message::raw(counts(&done)));
        respond(&replies, sender, &publish, &msg, counts).await;
    })
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
pub(super) fn resend_forwards(replies: &Replies, store: &Store) -> Step {
    let replies = replies.clone();
    let store = store.clone();
    Box::pin(async move {
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
        pass_on(&replies, &changes).await;
        forget_once_acknowledged(&replies, &store, Some(rows));
    })
}

/// The last page's answer: `{"inserted": i, "updated": u, "deleted": d, "unchanged": n}`.
fn counts(done: &Replaced) -> String {
    format!(
        r#"{{"inserted":{},"updated":{},"deleted":{},"unchanged":{}}}"#,
        done.inserted, done.updated, done.deleted, done.unchanged
    )
}

/// A page held (or sent again): acked `"OK"`.
fn acked(replies: &Replies, sender: Peer, publish: Inbound, msg: Message) -> Step {
    let replies = replies.clone();
    Box::pin(async move {
        replies
            .send(sender, message::ack(&msg), Operation::Response)
            .await;
        replies.publisher.ack(&publish);
    })
}

/// The page a replace message carries, each object checked to belong to the scope. On an
/// error, the replace_id when it could be read, and the text.
fn parse_page(msg: &Message) -> Result<Page, (Option<String>, String)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wire<'a> {
        replace_id: String,
        page: u64,
        #[serde(borrow)]
        items: Vec<&'a RawValue>,
        last: bool,
    }
    #[derive(Deserialize)]
    struct Id {
        replace_id: Option<String>,
    }
    let content = msg.content_json();
    let wire: Wire = serde_json::from_str(content).map_err(|e| {
        let id = serde_json::from_str::<Id>(content)
            .ok()
            .and_then(|i| i.replace_id);
        let text = format!(
            "replace content must be {{\"replace_id\": string, \"page\": number, \"items\": [object, …], \"last\": bool}}: {e}"
        );
        (id, text)
    })?;
    let id = wire.replace_id;
    if id.is_empty() || id.len() > message::MAX_ID_BYTES {
        let text = format!(
            "replace_id must be 1 to {} bytes, not {}",
            message::MAX_ID_BYTES,
            id.len()
        );
        return Err((None, text));
    }
    let mut items = Vec::with_capacity(wire.items.len());
    for (i, raw) in wire.items.into_iter().enumerate() {
        match object_name(raw.get(), &msg.resource) {
            Ok(name) => items.push((name, Bytes::copy_from_slice(raw.get().as_bytes()))),
            Err(why) => {
                let text = format!(
                    "replace {id}: item {i} of page {}: {why}; the replace changes nothing",
                    wire.page
                );
                return Err((Some(id), text));
            }
        }
    }
    Ok(Page {
        replace_id: id,
        page: wire.page,
        last: wire.last,
        items,
    })
}

/// `metadata.name` of one object of a replace of `scope`: a name that makes a valid key of the
/// scope, and a `metadata.namespace`, if given, of the scope's namespace.
fn object_name(json: &str, scope: &Resource) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
    }
    #[derive(Deserialize)]
    struct Object {
        metadata: Option<Meta>,
    }
    if !json.starts_with('{') {
        return Err("an object is needed".into());
    }
    let object: Object = serde_json::from_str(json).map_err(|e| format!("metadata: {e}"))?;
    let meta = object.metadata.ok_or("metadata.name is missing")?;
    let name = meta.name.ok_or("metadata.name is missing")?;
    if name.is_empty() || name.contains('/') {
        return Err(format!("metadata.name {name:?} is not a name"));
    }
    // The key must be one a single message could name.
    Resource::parse(&format!("{}/{name}", scope.key())).map_err(|e| e.to_string())?;
    let namespace = scope.namespace();
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() && ns != namespace => {
            Err(format!("{name} is of namespace {ns}, not {namespace}"))
        }
        _ => Ok(name),
    }
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
