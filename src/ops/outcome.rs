//! How a message's handling ends, and the one place that acts on it.
//!
//! An operation says what happened ([`Outcome`]); [`Context::finish`] decides what goes back
//! to the sender and then acknowledges the message to the broker. The ack comes last: a crash
//! before it has the broker deliver the message again, which the store's record of handled ids
//! makes harmless, while an ack before the reply could lose the reply for good.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::message::{self, Message, Operation};
use crate::metrics::ErrorReason;
use crate::mqtt::Inbound;
use crate::store::StoreError;
use crate::topics::Peer;

use super::Context;

/// What a step ends with.
pub(super) enum Outcome {
    /// Nothing goes back to the sender (a report, a relay, a query the cloud will answer).
    Quiet,
    /// A `response`: the `OK` of a change, or what a query asked for.
    Response(Vec<u8>),
    /// An `error` reply for input that is malformed or not allowed now.
    Refused(Refusal),
    /// An `error` reply for a failure on this side (the store's, or the outbox's), already
    /// logged where it happened; counted under `reason` when it has one.
    Failed {
        reason: Option<ErrorReason>,
        reply: Vec<u8>,
    },
    /// A cloud's answer, taken by the query or write waiting for it, which stores what it
    /// carries: acknowledged, and `msg_id` settled, once that waiter is done with it
    /// (`handled` ends). That wait runs beside the pipeline, so that no later message waits
    /// for it, and the answer is still never acknowledged before it is stored.
    Handed {
        handled: oneshot::Receiver<()>,
        msg_id: String,
    },
}

/// Why a message is refused.
pub(super) enum Refusal {
    /// An `error` reply to the sender, counted under `reason` and logged.
    Reply {
        reason: ErrorReason,
        parent: Option<String>,
        resource: String,
        text: String,
    },
    /// Nobody to answer (a topic not served, a bridge state not understood): logged where it
    /// was read, and acknowledged.
    Unanswerable,
}

impl Refusal {
    /// `msg` is refused for `reason`, in `text`, which the sender reads.
    pub(super) fn of(msg: &Message, reason: ErrorReason, text: String) -> Self {
        Refusal::Reply {
            reason,
            parent: Some(msg.msg_id().to_owned()),
            resource: msg.resource.key().to_owned(),
            text,
        }
    }

    /// `msg` is malformed or not allowed, as `text` says.
    pub(super) fn invalid(msg: &Message, text: String) -> Self {
        Self::of(msg, ErrorReason::Invalid, text)
    }
}

impl Outcome {
    /// The `OK` answer to `msg`.
    pub(super) fn ack(msg: &Message) -> Self {
        Outcome::Response(message::ack(msg))
    }

    /// The answer to `msg` read from the store: `content`, or the store's failure.
    pub(super) fn answer(msg: &Message, content: Result<Box<RawValue>, StoreError>) -> Self {
        match content {
            Ok(content) => Outcome::Response(message::reply(msg, Operation::Response, &content)),
            Err(e) => Self::store_failed(msg, &e),
        }
    }

    /// The store could not carry out what `msg` asked.
    pub(super) fn store_failed(msg: &Message, e: &StoreError) -> Self {
        let key = msg.resource.key();
        let op = msg.operation.as_str();
        let (reason, text) = match e {
            // The store logs the state, once; its text leads, as topics.md promises.
            StoreError::StorageFull(full) => (
                ErrorReason::StorageFull,
                format!("{full} ({op} of {key} refused)"),
            ),
            e => {
                tracing::error!(resource = %key, operation = op, error = %e, "store failed");
                (ErrorReason::Store, format!("{op} of {key} failed: {e}"))
            }
        };
        Outcome::Failed {
            reason: Some(reason),
            reply: message::error(Some(msg.msg_id()), key, &text),
        }
    }

    /// The message for the cloud could not be queued (the cloud went away after the change
    /// was committed, and the outbox write failed). The sender's retry, with the same msg_id,
    /// passes it on: its id stays unsettled while its change is the stored state.
    pub(super) fn not_queued(msg: &Message) -> Self {
        let key = msg.resource.key();
        let text = format!(
            "{} of {key} could not be queued for the cloud; send it again",
            msg.operation.as_str()
        );
        Outcome::Failed {
            reason: None,
            reply: message::error(Some(msg.msg_id()), key, &text),
        }
    }
}

/// Who a message came from, and the message itself, kept until its step ends; `from` is
/// `None` for what no peer sent (the bridge's state).
pub(super) struct Envelope {
    pub from: Option<Peer>,
    pub publish: Inbound,
}

impl Context {
    /// The end of every message's step: the reply `outcome` calls for, then the broker ack.
    pub(super) async fn finish(self: &Arc<Self>, envelope: Envelope, outcome: Outcome) {
        let Envelope { from, publish } = envelope;
        let replies = &self.replies;
        match outcome {
            Outcome::Handed { handled, msg_id } => {
                let ctx = Arc::clone(self);
                tokio::spawn(async move {
                    if handled.await.is_err() {
                        tracing::debug!(
                            msg_id,
                            "a cloud answer came as the wait for it ended; acked, not passed on"
                        );
                    }
                    ctx.settle(&msg_id);
                    ctx.replies.publisher.ack(&publish);
                });
                return;
            }
            Outcome::Quiet | Outcome::Refused(Refusal::Unanswerable) => {}
            Outcome::Response(reply) => {
                if let Some(to) = from {
                    replies.send(to, reply, Operation::Response).await;
                }
            }
            Outcome::Refused(Refusal::Reply {
                reason,
                parent,
                resource,
                text,
            }) => {
                replies.metrics.error(reason);
                tracing::warn!(
                    from = from.map_or("bridge", Peer::as_str),
                    msg_id = parent.as_deref().unwrap_or("-"),
                    "rejected message: {text}"
                );
                if let Some(to) = from {
                    let reply = message::error(parent.as_deref(), &resource, &text);
                    replies.send(to, reply, Operation::Error).await;
                }
            }
            Outcome::Failed { reason, reply } => {
                if let Some(reason) = reason {
                    replies.metrics.error(reason);
                }
                if let Some(to) = from {
                    replies.send(to, reply, Operation::Error).await;
                }
            }
        }
        replies.publisher.ack(&publish);
    }
}
