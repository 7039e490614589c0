//! The cloud's responses and errors: to the remote query or API write waiting for them, else
//! to edged. An answer to a patch edged sent is stored first. A bare "OK" to an API write is
//! its receipt: acked, and the write waits on for the object.

use std::sync::Arc;

use crate::cloud::remote::Completion;
use crate::store::Change;
use crate::topics::Peer;

use super::forward::{forward, PassOn};
use super::outcome::Outcome;
use super::request::AnswerRequest;
use super::{applied, now, Context, Later};

impl AnswerRequest {
    /// Queues what the answer stores (the object of a patch's answer) and records its id;
    /// the rest, once committed: pass it on, or hand it to the query or write waiting for it.
    pub(super) async fn start(self, ctx: &Arc<Context>) -> Later {
        let Self { msg, payload } = self;
        let change = Change {
            msg_id: Some(msg.msg_id().to_owned()),
            ..ctx.cloud.patches.answer(&msg).unwrap_or_default()
        };
        let stores = change.write.is_some();
        let committed = match ctx.queue(&msg, change).await {
            Ok(committed) => committed,
            Err(outcome) => return now(outcome),
        };
        let ctx = ctx.clone();
        Box::pin(async move {
            let applied = applied(committed).await;
            if stores {
                return match applied {
                    Ok(applied) => {
                        forward(&ctx, PassOn::Edged, &msg, &payload, applied).await;
                        Outcome::Quiet
                    }
                    Err(e) => Outcome::store_failed(&msg, &e),
                };
            }
            if matches!(&applied, Ok(applied) if applied.settled()) {
                return Outcome::Quiet;
            }
            let id = msg.msg_id().to_owned();
            match ctx.cloud.remote.complete(msg) {
                Completion::Claimed(handled) => {
                    return Outcome::Handed {
                        handled,
                        msg_id: id,
                    }
                }
                Completion::Receipt => {}
                Completion::Unclaimed => {
                    ctx.replies.publisher.send(Peer::Edged, payload).await;
                }
            }
            ctx.settle(&id);
            Outcome::Quiet
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::ops::testing::Harness;
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cloud_answer_nobody_waits_for_goes_to_edged() {
        let mut h = Harness::new().await;
        let answer = json!({
            "header": {"msg_id": "cloud-1", "parent_msg_id": "nobody"},
            "route": {"source": "cloud", "group": "meta", "operation": "response", "resource": "default/pod/p"},
            "content": "OK",
        })
        .to_string();
        let pkid = h.handle(Peer::Edgehub, answer.clone()).await;
        let passed = h.published_to(Peer::Edged).await;
        assert_eq!(passed.payload, answer.as_bytes());
        assert_eq!(h.broker.acked().await, pkid);
    }
}
