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
