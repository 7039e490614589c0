//! insert, update and delete: store, then pass the message on to the other side, then ack.

use crate::cloud::metasync::MetaSync;
use crate::cloud::outbox::{self, Outbox};
use crate::cloud::Cloud;
use crate::message::{self, Message, Operation};
use crate::metrics::{ErrorReason, HeldBack};
use crate::mqtt::Inbound;
use crate::resource::{metadata_uid, UidError};
use crate::store::{self, Applied, Change, Outcome, Store, StoreError, Write};
use crate::topics::Peer;

use super::{
    refuse, refuse_message, report_not_queued, report_store_error, rules, store_failed, Replies,
    Step,
};

#[derive(Clone, Copy)]
pub(super) enum WriteKind {
    Put,
    PutIfChanged,
    Delete,
}

/// The `metadata.uid` a pod delete is limited to. A uid that is there but not a string is
/// refused: taking it as "no uid" would delete whatever pod holds the name, the one thing the
/// uid is sent to prevent.
fn delete_uid(content: &str) -> Result<Option<String>, String> {
    metadata_uid(content).map_err(|e| match e {
        UidError::Metadata(e) => format!("content.metadata of a pod delete must be an object: {e}"),
        UidError::NotAString(uid) => format!("content.metadata.uid must be a string, not {uid}"),
    })
}

/// insert, update, delete: store, then forward to the other side, then ack.
pub(super) async fn change(
    replies: &Replies,
    store: &Store,
    cloud: &Cloud,
    sender: Peer,
    publish: Inbound,
    msg: Message,
    kind: WriteKind,
) -> Step {
    let op = msg.operation.as_str();
    let Some(_) = msg.resource.name() else {
        let text = format!(
            "{op} needs a single object (namespace/type/name), not the list {}",
            msg.resource
        );
        return refuse_message(replies, sender, publish, &msg, text);
    };
    let key = msg.resource.key();
    if rules::lease_while_away(&cloud.state, sender, msg.resource.rtype()) {
        replies.metrics.error(ErrorReason::LeaseWhileDisconnected);
        let text = rules::lease_refusal(op, key);
        let parent = Some(msg.msg_id().to_owned());
        return refuse(replies, sender, publish, parent, key, text);
    }
    let write = match write_of(kind, &msg) {
        Ok(write) => write,
        Err(text) => return refuse_message(replies, sender, publish, &msg, text),
    };
    // Events are passed on, never stored: they would pile up on the node for ever.
    let write = (msg.resource.rtype() != rules::EVENT).then_some(write);
    let change = Change {
        msg_id: Some(msg.msg_id().to_owned()),
        write,
        to_cloud: queue_for_cloud(&cloud.outbox, sender.other(), &msg, &publish, kind),
        ..Change::default()
    };
    let committed = match store.submit(change).await {
        Ok(c) => c,
        Err(e) => return store_failed(replies, sender, publish, msg, e),
    };
    let (replies, store, outbox) = (replies.clone(), store.clone(), cloud.outbox.clone());
    let metasync = cloud.metasync.clone();
    Box::pin(async move {
        match committed.await.unwrap_or(Err(StoreError::Closed)) {
            Ok(applied) => {
                if applied.outcome == Outcome::Stale {
                    tracing::debug!(
                        msg_id = msg.msg_id(),
                        resource = %msg.resource,
                        "update older than the stored object (resourceVersion); acked, held back"
                    );
                    replies.metrics.held_back(HeldBack::Stale);
                }
                // An update that changes nothing, or is older than what is stored, is not news
                // to the other side.
                let passed_on = matches!(applied.outcome, Outcome::Unchanged | Outcome::Stale) || {
                    let to = PassOn::to(sender.other(), coalesces(kind, &msg));
                    forward(&replies, &store, &outbox, to, &msg, &publish, applied).await
                };
                if passed_on {
                    reached_the_cloud(&metasync, sender, &msg, applied);
                    let ack = message::ack(&msg);
                    replies.send(sender, ack, Operation::Response).await;
                } else {
                    report_not_queued(&replies, sender, &msg).await;
                }
            }
            Err(e) => report_store_error(&replies, sender, &msg, &e).await,
        }
        replies.publisher.ack(&publish);
    })
}

/// The write `msg` asks for, or why it cannot be made.
fn write_of(kind: WriteKind, msg: &Message) -> Result<Write, String> {
    let key = msg.resource.key().to_owned();
    let rtype = msg.resource.rtype().to_owned();
    if let WriteKind::Delete = kind {
        let uid = match rtype.as_str() {
            crate::resource::rtype::POD => delete_uid(msg.content_json())?,
            _ => None,
        };
        return Ok(Write::Delete { uid, key });
    }
    let Some(value) = msg.content.clone() else {
        return Err(format!("{} needs content", msg.operation.as_str()));
    };
    Ok(match kind {
        WriteKind::Put => Write::Put { key, rtype, value },
        _ => Write::PutIfChanged { key, rtype, value },
    })
}

/// Tells MetaSync that edged's own status update went to the cloud (sent, or queued in the
/// outbox), so that its next run does not send that status again.
fn reached_the_cloud(metasync: &MetaSync, sender: Peer, msg: &Message, applied: Applied) {
    if sender != Peer::Edged || msg.resource.rtype() != crate::cloud::metasync::PODSTATUS {
        return;
    }
    if let (Outcome::Stored, Some(change)) = (applied.outcome, applied.change) {
        metasync.reached(msg.resource.key(), change);
    }
}

/// The outbox entry for a change bound for the cloud, when it must wait for the cloud.
pub(super) fn queue_for_cloud(
    outbox: &Outbox,
    to: Peer,
    msg: &Message,
    publish: &Inbound,
    kind: WriteKind,
) -> Option<store::CloudMessage> {
    if to != Peer::Edgehub {
        return None;
    }
    outbox.hold(|| {
        let coalesce = coalesces(kind, msg);
        outbox::cloud_message(msg.resource.key(), publish.payload.clone(), coalesce)
    })
}

/// Whether a message waiting for the cloud replaces an older one of the same key: an update
/// (the newer state is all the cloud needs) and any event (only the newest of one object
/// matters once the cloud is back).
fn coalesces(kind: WriteKind, msg: &Message) -> bool {
    matches!(kind, WriteKind::PutIfChanged) || msg.resource.rtype() == rules::EVENT
}

/// Where [`forward`] passes a message on to.
#[derive(Clone, Copy)]
pub(super) enum PassOn {
    Edged,
    /// The cloud; `coalesce`: it replaces an older message of the same key still waiting for
    /// the cloud in the outbox.
    Cloud {
        coalesce: bool,
    },
}

impl PassOn {
    /// To `peer`, coalesced as `coalesce` says if that is the cloud.
    pub(super) fn to(peer: Peer, coalesce: bool) -> Self {
        match peer {
            Peer::Edged => PassOn::Edged,
            Peer::Edgehub => PassOn::Cloud { coalesce },
        }
    }
}

/// Passes an inbound message on, unchanged, once its change is committed, and settles its id.
///
/// A repeat (same msg_id) of a message handled in this run, or of a settled one, passes
/// nothing on: the first copy does that. An unsettled one from before a restart was cut off
/// between its commit and its forward, or its forward was not acknowledged by the broker
/// before the restart: it is passed on again only while its change is still the stored state,
/// so a late copy of an insert never brings back what a later delete removed.
/// `false` when a message for the cloud could not be queued; its id is then released, so that
/// the copy its sender is asked to send again is handled.
pub(super) async fn forward(
    replies: &Replies,
    store: &Store,
    outbox: &Outbox,
    to: PassOn,
    msg: &Message,
    publish: &Inbound,
    applied: Applied,
) -> bool {
    let id = msg.msg_id();
    if let Outcome::Duplicate { this_run: true, .. } = applied.outcome {
        tracing::debug!(
            msg_id = id,
            resource = %msg.resource,
            "repeat of a message handled in this run; acked, not passed on"
        );
        replies.metrics.held_back(HeldBack::Repeat);
        return true;
    }
    if applied.settled() {
        return true;
    }
    match applied.outcome {
        Outcome::Duplicate { current: false, .. } => {
            tracing::info!(
                msg_id = id,
                resource = %msg.resource,
                "redelivered message superseded by a later change; acked, not passed on"
            );
            // Nothing to deliver: settled with the next commit.
            store.settle(id, 0);
            return true;
        }
        Outcome::Duplicate { .. } => tracing::info!(
            msg_id = id,
            "message repeated after a restart may not have been passed on and is still current; passing it on"
        ),
        _ => {}
    }
    match to {
        PassOn::Edged => {
            replies
                .publisher
                .send(Peer::Edged, publish.payload.clone())
                .await
        }
        PassOn::Cloud { coalesce } => {
            let m = outbox::cloud_message(msg.resource.key(), publish.payload.clone(), coalesce);
            if let Err(e) = outbox.send_to_cloud(m).await {
                tracing::error!(msg_id = id, error = %e, "could not queue a message for the cloud");
                store.release(id);
                return false;
            }
        }
    }
    replies.settle(store, id);
    true
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

    #[test]
    fn delete_uid_reads_a_string_and_refuses_other_types() {
        use super::delete_uid;
        assert_eq!(delete_uid("null"), Ok(None));
        assert_eq!(delete_uid(r#"{"metadata":{"name":"p"}}"#), Ok(None));
        assert_eq!(delete_uid(r#"{"spec":{}}"#), Ok(None));
        assert_eq!(
            delete_uid(r#"{"metadata":{"uid":"u1"}}"#),
            Ok(Some("u1".into()))
        );
        for bad in [
            r#"{"metadata":{"uid":123}}"#,
            r#"{"metadata":{"uid":null}}"#,
            r#"{"metadata":{"uid":{}}}"#,
            r#"{"metadata":{"uid":["u1"]}}"#,
            r#"{"metadata":5}"#,
        ] {
            assert!(delete_uid(bad).is_err(), "{bad}");
        }
    }
}
