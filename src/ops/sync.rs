//! meta-internal-sync: run MetaSync now, then ack.

use std::sync::Arc;

use crate::message::{self, Message, Operation};
use crate::mqtt::Inbound;
use crate::node::Node;
use crate::topics::Peer;

use super::{report_store_error, send_reply, Step};

/// meta-internal-sync: run MetaSync now, then ack.
pub(super) fn sync_now(node: &Arc<Node>, sender: Peer, publish: Inbound, msg: Message) -> Step {
    let node = node.clone();
    Box::pin(async move {
        match node.metasync.run(&node).await {
            Ok(report) => {
                tracing::info!(?report, "metasync on request");
                send_reply(&node, sender, message::ack(&msg), Operation::Response).await;
            }
            Err(e) => report_store_error(&node, sender, &msg, &e).await,
        }
        node.publisher.ack(&publish);
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
