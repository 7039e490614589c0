//! insert, update and delete: store, then pass the message on to the other side, then ack.

use std::sync::Arc;

use crate::cloud::metasync::MetaSync;
use crate::message::Message;
use crate::metrics::{ErrorReason, HeldBack};
use crate::store::{Applied, Change, Outcome as Stored};
use crate::topics::Peer;

use super::forward::{coalesces, forward, queue_for_cloud, PassOn};
use super::outcome::{Outcome, Refusal};
use super::request::ChangeRequest;
use super::{applied, now, rules, Context, Later};

impl ChangeRequest {
    /// Queues the write, and the message for the cloud when it must wait; the rest, once
    /// committed: pass the message on, then answer `OK`.
    pub(super) async fn start(self, ctx: &Arc<Context>) -> Later {
        let Self {
            from,
            msg,
            payload,
            kind,
            write,
        } = self;
        if rules::lease_while_away(&ctx.cloud.state, from, msg.resource.rtype()) {
            let text = rules::lease_refusal(msg.operation.as_str(), msg.resource.key());
            let refusal = Refusal::of(&msg, ErrorReason::LeaseWhileDisconnected, text);
            return now(Outcome::Refused(refusal));
        }
        let coalesce = coalesces(kind, &msg);
        // Events are passed on, never stored: they would pile up on the node for ever.
        let write = (msg.resource.rtype() != rules::EVENT).then_some(write);
        let change = Change {
            msg_id: Some(msg.msg_id().to_owned()),
            write,
            to_cloud: queue_for_cloud(&ctx.cloud.outbox, from.other(), &msg, &payload, coalesce),
            ..Change::default()
        };
        let committed = match ctx.queue(&msg, change).await {
            Ok(committed) => committed,
            Err(outcome) => return now(outcome),
        };
        let ctx = ctx.clone();
        Box::pin(async move {
            let applied = match applied(committed).await {
                Ok(applied) => applied,
                Err(e) => return Outcome::store_failed(&msg, &e),
            };
            if applied.outcome == Stored::Stale {
                tracing::debug!(
                    msg_id = msg.msg_id(),
                    resource = %msg.resource,
                    "update older than the stored object (resourceVersion); acked, held back"
                );
                ctx.replies.metrics.held_back(HeldBack::Stale);
            }
            // An update that changes nothing, or is older than what is stored, is not news
            // to the other side.
            let passed_on = matches!(applied.outcome, Stored::Unchanged | Stored::Stale) || {
                let to = PassOn::to(from.other(), coalesce);
                forward(&ctx, to, &msg, &payload, applied).await
            };
            if !passed_on {
                return Outcome::not_queued(&msg);
            }
            reached_the_cloud(&ctx.cloud.metasync, from, &msg, applied);
            Outcome::ack(&msg)
        })
    }
}

/// Tells MetaSync that edged's own status update went to the cloud (sent, or queued in the
/// outbox), so that its next run does not send that status again.
fn reached_the_cloud(metasync: &MetaSync, from: Peer, msg: &Message, applied: Applied) {
    if from != Peer::Edged || msg.resource.rtype() != crate::resource::rtype::PODSTATUS {
        return;
    }
    if let (Stored::Stored, Some(change)) = (applied.outcome, applied.change) {
        metasync.reached(msg.resource.key(), change);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::ops::testing::{message, pod, with_pod_p, Harness};
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_insert_is_stored_then_forwarded_whole_then_answered_then_acked() {
        let mut h = Harness::new().await;
        let insert = include_str!("../../tests/fixtures/insert-pod.message.json");
        let pkid = h.handle(Peer::Edgehub, insert.as_bytes().to_vec()).await;

        let key = "default/pod/nginx-7d9c5b8f4-x2k9p";
        assert!(h.stored(key).await.is_some(), "stored");
        let forward = h.published_to(Peer::Edged).await;
        assert_eq!(
            forward.payload,
            insert.as_bytes(),
            "passed on byte for byte"
        );
        let reply = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(reply["route"]["operation"], "response");
        assert_eq!(reply["content"], "OK");
        let sent: Value = serde_json::from_str(insert).unwrap();
        assert_eq!(reply["header"]["parent_msg_id"], sent["header"]["msg_id"]);
        assert_eq!(
            h.broker.acked().await,
            pkid,
            "acked after its forward and reply"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_that_changes_nothing_is_answered_but_not_passed_on() {
        let mut h = with_pod_p().await;
        let same = message("u-1", "update", "default/pod/p", pod("p"));
        let pkid = h.handle(Peer::Edgehub, same).await;
        let reply = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(reply["header"]["parent_msg_id"], "u-1");
        assert_eq!(reply["content"], "OK");
        assert_eq!(h.broker.acked().await, pkid);
        assert!(h.broker.published_now().is_empty(), "nothing for edged");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_of_a_list_is_refused_and_changes_nothing() {
        let mut h = with_pod_p().await;

        let pkid = h
            .handle(
                Peer::Edgehub,
                message("d-1", "delete", "default/pod", Value::Null),
            )
            .await;
        let reply = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(reply["route"]["operation"], "error");
        assert_eq!(reply["header"]["parent_msg_id"], "d-1");
        assert!(
            reply["content"].as_str().unwrap().contains("single object"),
            "{reply}"
        );
        assert_eq!(h.broker.acked().await, pkid);
        assert!(h.stored("default/pod/p").await.is_some(), "untouched");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_from_edged_goes_to_the_cloud_and_is_answered_to_edged() {
        let mut h = Harness::new().await;
        h.connect_cloud().await;
        let status = json!({"metadata": {"name": "p", "namespace": "default"}, "status": {"phase": "Running"}});
        let update = message("e-1", "update", "default/podstatus/p", status.clone());
        let pkid = h.handle(Peer::Edged, update.clone()).await;
        let forward = h.published_to(Peer::Edgehub).await;
        assert_eq!(forward.payload, update.as_bytes());
        let reply = h.published_to(Peer::Edged).await.json();
        assert_eq!(reply["header"]["parent_msg_id"], "e-1");
        assert_eq!(h.broker.acked().await, pkid);
        assert_eq!(h.stored("default/podstatus/p").await, Some(status));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pod_delete_whose_uid_is_not_a_string_is_refused_and_deletes_nothing() {
        let mut h = with_pod_p().await;

        for (n, uid) in [json!(123), Value::Null, json!({}), json!(["uid-p"])]
            .into_iter()
            .enumerate()
        {
            let id = format!("d-{n}");
            let content = json!({"metadata": {"name": "p", "uid": uid}});
            let pkid = h
                .handle(
                    Peer::Edgehub,
                    message(&id, "delete", "default/pod/p", content),
                )
                .await;
            let reply = h.published_to(Peer::Edgehub).await.json();
            assert_eq!(reply["route"]["operation"], "error", "uid {uid}");
            assert_eq!(reply["header"]["parent_msg_id"], id.as_str());
            assert!(
                reply["content"]
                    .as_str()
                    .unwrap()
                    .contains("metadata.uid must be a string"),
                "{reply}"
            );
            assert_eq!(h.broker.acked().await, pkid);
            assert!(h.broker.published_now().is_empty(), "nothing for edged");
            assert!(h.stored("default/pod/p").await.is_some(), "uid {uid}: kept");
        }

        // The same delete with the pod's uid as a string goes through.
        let content = json!({"metadata": {"name": "p", "uid": "uid-p"}});
        h.handle(
            Peer::Edgehub,
            message("d-ok", "delete", "default/pod/p", content),
        )
        .await;
        h.published_to(Peer::Edged).await;
        assert!(h.stored("default/pod/p").await.is_none(), "deleted");
    }
}
