//! edged's responses and errors: stored when they carry an object, passed on to the cloud.

use std::sync::Arc;

use crate::store::Change;
use crate::topics::Peer;

use super::forward::{coalesces, forward, queue_for_cloud, PassOn};
use super::outcome::Outcome;
use super::request::{RelayRequest, WriteKind};
use super::{applied, now, Context, Later};

impl RelayRequest {
    /// Queues the object a response carries, and the message for the cloud when it must
    /// wait; the rest, once committed: pass it on to the cloud.
    pub(super) async fn start(self, ctx: &Arc<Context>) -> Later {
        let Self {
            msg,
            payload,
            write,
        } = self;
        let coalesce = coalesces(WriteKind::Put, &msg);
        let to_cloud = queue_for_cloud(&ctx.cloud.outbox, Peer::Edgehub, &msg, &payload, coalesce);
        let change = Change {
            msg_id: Some(msg.msg_id().to_owned()),
            write,
            to_cloud,
            ..Change::default()
        };
        let committed = match ctx.queue(&msg, change).await {
            Ok(committed) => committed,
            Err(outcome) => return now(outcome),
        };
        let ctx = ctx.clone();
        Box::pin(async move {
            match applied(committed).await {
                Ok(applied) => {
                    let to = PassOn::Cloud { coalesce: false };
                    if forward(&ctx, to, &msg, &payload, applied).await {
                        Outcome::Quiet
                    } else {
                        Outcome::not_queued(&msg)
                    }
                }
                Err(e) => Outcome::store_failed(&msg, &e),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::{message, pod, Harness};
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edged_s_response_with_an_object_is_stored_and_relayed_unchanged() {
        let mut h = Harness::new().await;
        h.connect_cloud().await;
        let response = message("r-1", "response", "default/pod/p", pod("p"));
        let pkid = h.handle(Peer::Edged, response.clone()).await;
        let relayed = h.published_to(Peer::Edgehub).await;
        assert_eq!(relayed.payload, response.as_bytes());
        assert_eq!(h.broker.acked().await, pkid);
        assert_eq!(h.stored("default/pod/p").await, Some(pod("p")));
    }
}
