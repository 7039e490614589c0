//! patch: applied to the stored object, then passed on to the other side unchanged, then acked.
//!
//! The patch is read here, so that content that is no patch is refused before anything is
//! queued (only its text is kept while it waits, see [`Patch`]); it is applied by the writer
//! thread, against the object as stored at that point, so
//! that it builds on every change that arrived before it. A patch that cannot be applied there
//! comes back as [`Outcome::Rejected`] and gets an `error`: nothing is stored or passed on. An
//! absent object is not an error: the patch is passed on (the other side may hold the object)
//! and acked, and nothing is stored.
//!
//! The rules by type apply to patches as to other changes: a lease patch from edged while the
//! cloud is away is refused, and an event is never stored. But no patch is ever coalesced with
//! another in the outbox, an event's included: each builds on the ones before it.

use std::sync::Arc;

use crate::cloud::waiting::{Target, WaitingPatch};
use crate::message::Message;
use crate::metrics::ErrorReason;
use crate::patch::Patch;
use crate::store::{Applied, Change, Committed, Outcome as Stored, Write};
use crate::topics::Peer;

use super::forward::{forward, queue_for_cloud, PassOn};
use super::outcome::{Outcome, Refusal};
use super::request::PatchRequest;
use super::{applied, now, rules, Context, Later};

impl PatchRequest {
    /// Queues the patch (applied by the writer thread against the object as stored then), and
    /// the message for the cloud when it must wait; the rest, once committed.
    pub(super) async fn start(self, ctx: &Arc<Context>) -> Later {
        let Self {
            from,
            msg,
            payload,
            target,
            patch,
        } = self;
        if rules::lease_while_away(&ctx.cloud.state, from, &target.rtype) {
            let text = rules::lease_refusal("patch", msg.resource.key());
            let refusal = Refusal::of(&msg, ErrorReason::LeaseWhileDisconnected, text);
            return now(Outcome::Refused(refusal));
        }
        let write = Write::Patch {
            key: target.key.clone(),
            rtype: target.rtype.clone(),
            patch: patch.clone(),
        };
        // Never coalesced in the outbox: the cloud needs every patch, in order.
        let to_cloud = queue_for_cloud(&ctx.cloud.outbox, from.other(), &msg, &payload, false);
        let change = Change {
            msg_id: Some(msg.msg_id().to_owned()),
            write: (target.rtype != rules::EVENT).then_some(write),
            to_cloud,
            ..Change::default()
        };
        // Waited for from before it can reach the cloud (through the outbox it may leave before
        // this step runs), so that the answer finds it. Not an event's: its answer would store
        // the event.
        let (change, waiting) = if from == Peer::Edged && target.rtype != rules::EVENT {
            let (change, waiting) =
                WaitingPatch::new(&ctx.cloud.patches, msg.msg_id(), target.clone(), change);
            (change, Some(waiting))
        } else {
            (change, None)
        };
        let committed = match ctx.queue(&msg, change).await {
            Ok(committed) => committed,
            Err(outcome) => return now(outcome),
        };
        let patched = Patched {
            from,
            msg,
            payload,
            patch,
            target,
            waiting,
        };
        Box::pin(patched.after_commit(ctx.clone(), committed))
    }
}

/// A patch whose write is queued, with what its end needs.
struct Patched {
    from: Peer,
    msg: Message,
    payload: bytes::Bytes,
    patch: Arc<Patch>,
    target: Target,
    waiting: Option<WaitingPatch>,
}

impl Patched {
    /// Once committed: a patch that did not apply is refused; else it is passed on and
    /// answered `OK`.
    async fn after_commit(self, ctx: Arc<Context>, committed: Committed) -> Outcome {
        let result = applied(committed).await;
        if let (Some(waiting), Ok(applied)) = (self.waiting, &result) {
            waiting.committed(applied);
        }
        let msg = &self.msg;
        match result {
            Ok(Applied {
                outcome: Stored::Rejected(e),
                ..
            }) => {
                let key = &self.target.key;
                let text = format!("patch of {key} not applied: {}", self.patch.explain(e));
                Outcome::Refused(Refusal::invalid(msg, text))
            }
            Ok(applied) => {
                let to = PassOn::to(self.from.other(), false);
                if forward(&ctx, to, msg, &self.payload, applied).await {
                    Outcome::ack(msg)
                } else {
                    Outcome::not_queued(msg)
                }
            }
            Err(e) => Outcome::store_failed(msg, &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::ops::testing::{message, pod, with_pod_p, Harness};
    use crate::topics::Peer;

    fn running() -> Value {
        json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_podpatch_is_stored_on_the_pod_then_passed_on_whole_then_acked() {
        let mut h = with_pod_p().await;
        h.connect_cloud().await;
        let patch = message("pp-1", "patch", "default/podpatch/p", running());
        let pkid = h.handle(Peer::Edged, patch.clone()).await;

        let forward = h.published_to(Peer::Edgehub).await;
        assert_eq!(forward.payload, patch.as_bytes(), "passed on byte for byte");
        let ack = h.published_to(Peer::Edged).await.json();
        assert_eq!(ack["route"]["operation"], "response");
        assert_eq!(ack["header"]["parent_msg_id"], "pp-1");
        assert_eq!(ack["route"]["resource"], "default/podpatch/p");
        assert_eq!(h.broker.acked().await, pkid);
        let mut want = pod("p");
        want["status"] = running()["status"].clone();
        assert_eq!(h.stored("default/pod/p").await, Some(want));
        assert_eq!(h.stored("default/podpatch/p").await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_patch_that_changes_nothing_is_still_passed_on() {
        let mut h = with_pod_p().await;
        let same = json!({"metadata": {"name": "p"}});
        let patch = message("pp-1", "patch", "default/pod/p", same);
        h.handle(Peer::Edgehub, patch.clone()).await;
        assert_eq!(h.published_to(Peer::Edged).await.payload, patch.as_bytes());
        let ack = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(ack["content"], "OK");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_patch_that_cannot_be_applied_is_an_error_and_goes_nowhere() {
        let mut h = with_pod_p().await;
        let ops = json!([{"op": "test", "path": "/metadata/name", "value": "q"},
                         {"op": "add", "path": "/status", "value": {}}]);
        let pkid = h
            .handle(
                Peer::Edgehub,
                message("pp-1", "patch", "default/pod/p", ops),
            )
            .await;
        let reply = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(reply["route"]["operation"], "error");
        assert_eq!(reply["header"]["parent_msg_id"], "pp-1");
        assert_eq!(
            reply["content"],
            "patch of default/pod/p not applied: operation 0 (test at /metadata/name) failed: \
             the value differs from the test's value"
        );
        assert_eq!(h.broker.acked().await, pkid);
        assert!(h.broker.published_now().is_empty(), "nothing for edged");
        assert_eq!(h.stored("default/pod/p").await, Some(pod("p")));

        // Not remembered as handled: the same id, once it applies, goes through.
        let ops = json!([{"op": "test", "path": "/metadata/name", "value": "p"}]);
        h.handle(
            Peer::Edgehub,
            message("pp-1", "patch", "default/pod/p", ops),
        )
        .await;
        h.published_to(Peer::Edged).await;
        let ack = h.published_to(Peer::Edgehub).await.json();
        assert_eq!(ack["content"], "OK");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_that_is_no_patch_and_lists_are_refused_before_anything_is_queued() {
        let mut h = with_pod_p().await;
        for (resource, content, text) in [
            (
                "default/pod/p",
                json!("Running"),
                "patch content must be a JSON merge patch (an object) or a JSON Patch (an array), not a string",
            ),
            ("default/pod/p", Value::Null, "patch needs content"),
            (
                "default/pod",
                json!({}),
                "patch needs a single object (namespace/type/name), not the list default/pod",
            ),
        ] {
            let pkid = h
                .handle(Peer::Edged, message("bad", "patch", resource, content))
                .await;
            let reply = h.published_to(Peer::Edged).await.json();
            assert_eq!(reply["route"]["operation"], "error");
            assert_eq!(reply["content"], text);
            assert_eq!(h.broker.acked().await, pkid);
        }
        assert_eq!(h.store.outbox_len(), 0, "nothing queued for the cloud");
        assert_eq!(h.stored("default/pod/p").await, Some(pod("p")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_patch_from_edged_while_the_cloud_is_away_is_refused_at_once() {
        let mut h = Harness::new().await;
        let renew = json!({"spec": {"renewTime": "2026-11-28T12:00:10.000000Z"}});
        let patch = message("lp-1", "patch", "kube-node-lease/lease/n", renew);
        let pkid = h.handle(Peer::Edged, patch).await;
        let reply = h.published_to(Peer::Edged).await.json();
        assert_eq!(reply["route"]["operation"], "error");
        assert_eq!(
            reply["content"],
            "patch of lease kube-node-lease/lease/n refused: the cloud is not connected, and a \
             lease renewed late is worse than one that fails now"
        );
        assert_eq!(h.broker.acked().await, pkid);
        assert_eq!(h.store.outbox_len(), 0, "nothing queued");
    }

    /// Events are never stored and newer ones replace older ones in the outbox, but a patch is
    /// a patch: every one waits for the cloud.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_patches_are_not_stored_and_not_coalesced() {
        let mut h = Harness::new().await;
        let key = "default/event/p.17a3b";
        for (n, count) in [1, 2].into_iter().enumerate() {
            let id = format!("ep-{n}");
            let patch = message(&id, "patch", key, json!({"count": count}));
            h.handle(Peer::Edged, patch).await;
            let ack = h.published_to(Peer::Edged).await.json();
            assert_eq!(ack["content"], "OK", "{ack}");
            h.broker.acked().await;
        }
        assert_eq!(h.store.outbox_len(), 2, "both wait for the cloud");
        assert_eq!(h.stored(key).await, None);
        assert!(h.cloud.patches.is_empty(), "no answer is waited for");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cloud_s_answer_to_a_patch_is_stored_on_the_patched_key_then_relayed() {
        let mut h = with_pod_p().await;
        h.connect_cloud().await;
        h.handle(
            Peer::Edged,
            message("pp-1", "patch", "default/podpatch/p", running()),
        )
        .await;
        h.published_to(Peer::Edgehub).await;
        h.published_to(Peer::Edged).await;
        h.broker.acked().await;

        let mut cloud_pod = pod("p");
        cloud_pod["status"] = json!({"phase": "Running", "podIP": "10.1.2.3"});
        let answer = json!({
            "header": {"msg_id": "cloud-1", "parent_msg_id": "pp-1"},
            "route": {"source": "edgecontroller", "group": "resource", "operation": "response", "resource": "default/podpatch/p"},
            "content": cloud_pod,
        })
        .to_string();
        let pkid = h.handle(Peer::Edgehub, answer.clone()).await;
        let relayed = h.published_to(Peer::Edged).await;
        assert_eq!(relayed.payload, answer.as_bytes());
        assert_eq!(h.broker.acked().await, pkid);
        assert_eq!(h.stored("default/pod/p").await, Some(cloud_pod.clone()));
        assert!(h.cloud.patches.is_empty(), "claimed");

        // A second answer to the same patch is an ordinary unclaimed answer: relayed only.
        let again = json!({
            "header": {"msg_id": "cloud-2", "parent_msg_id": "pp-1"},
            "route": {"source": "edgecontroller", "group": "resource", "operation": "response", "resource": "default/podpatch/p"},
            "content": pod("p"),
        })
        .to_string();
        h.handle(Peer::Edgehub, again.clone()).await;
        assert_eq!(h.published_to(Peer::Edged).await.payload, again.as_bytes());
        assert_eq!(h.stored("default/pod/p").await, Some(cloud_pod));
    }
}
