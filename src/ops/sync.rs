//! meta-internal-sync: run a full MetaSync now, then ack.

use crate::cloud::metasync::{MetaSync, RunKind};
use crate::message::{self, Message, Operation};
use crate::mqtt::Inbound;
use crate::topics::Peer;

use super::{report_store_error, Replies, Step};

/// meta-internal-sync: run a full MetaSync now, then ack.
pub(super) fn sync_now(
    replies: &Replies,
    metasync: &MetaSync,
    sender: Peer,
    publish: Inbound,
    msg: Message,
) -> Step {
    let (replies, metasync) = (replies.clone(), metasync.clone());
    Box::pin(async move {
        match metasync.run(RunKind::Full).await {
            Ok(report) => {
                tracing::info!(%report, "metasync on request");
                let ack = message::ack(&msg);
                replies.send(sender, ack, Operation::Response).await;
            }
            Err(e) => report_store_error(&replies, sender, &msg, &e).await,
        }
        replies.publisher.ack(&publish);
    })
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::ops::testing::{message, Harness};
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meta_internal_sync_is_answered_ok() {
        let mut h = Harness::new().await;
        let pkid = h
            .handle(
                Peer::Edged,
                message("s-1", "meta-internal-sync", "default/pod", Value::Null),
            )
            .await;
        let reply = h.published_to(Peer::Edged).await.json();
        assert_eq!(reply["header"]["parent_msg_id"], "s-1");
        assert_eq!(reply["content"], "OK");
        assert_eq!(h.broker.acked().await, pkid);
    }
}
