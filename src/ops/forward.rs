//! Passing a message on to the other side, unchanged, once its change is committed: to edged
//! directly, to the cloud through the outbox when it must wait. Shared by every operation that
//! passes on what it received (change, patch, relay, answer).

use bytes::Bytes;

use crate::cloud::outbox::{self, Outbox};
use crate::message::Message;
use crate::metrics::HeldBack;
use crate::store::{self, Applied, Outcome};
use crate::topics::Peer;

use super::request::WriteKind;
use super::{rules, Context};

/// The outbox entry for a change bound for the cloud, when it must wait for the cloud;
/// `coalesce`: it replaces an older one of the same key waiting there.
pub(super) fn queue_for_cloud(
    outbox: &Outbox,
    to: Peer,
    msg: &Message,
    payload: &Bytes,
    coalesce: bool,
) -> Option<store::CloudMessage> {
    if to != Peer::Edgehub {
        return None;
    }
    outbox.hold(|| outbox::cloud_message(msg.resource.key(), payload.clone(), coalesce))
}

/// Whether a message waiting for the cloud replaces an older one of the same key: an update
/// (the newer state is all the cloud needs) and any event (only the newest of one object
/// matters once the cloud is back).
pub(super) fn coalesces(kind: WriteKind, msg: &Message) -> bool {
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
    ctx: &Context,
    to: PassOn,
    msg: &Message,
    payload: &Bytes,
    applied: Applied,
) -> bool {
    let id = msg.msg_id();
    if let Outcome::Duplicate { this_run: true, .. } = applied.outcome {
        tracing::debug!(
            msg_id = id,
            resource = %msg.resource,
            "repeat of a message handled in this run; acked, not passed on"
        );
        ctx.replies.metrics.held_back(HeldBack::Repeat);
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
            ctx.store.settle(id, 0);
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
            ctx.replies
                .publisher
                .send(Peer::Edged, payload.clone())
                .await
        }
        PassOn::Cloud { coalesce } => {
            let m = outbox::cloud_message(msg.resource.key(), payload.clone(), coalesce);
            if let Err(e) = ctx.cloud.outbox.send_to_cloud(m).await {
                tracing::error!(msg_id = id, error = %e, "could not queue a message for the cloud");
                ctx.store.release(id);
                return false;
            }
        }
    }
    ctx.settle(id);
    true
}
