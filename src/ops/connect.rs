//! connect: edgehub reports whether the cloud is reachable. No reply.

use std::sync::Arc;

use crate::message::Message;
use crate::mqtt::Inbound;
use crate::node::Node;
use crate::topics::Peer;

use super::{finish, refuse_message, Step};

/// connect: edgehub reports whether the cloud is reachable. No reply.
pub(super) fn connect(node: &Arc<Node>, sender: Peer, publish: Inbound, msg: Message) -> Step {
    if sender != Peer::Edgehub {
        let text = "connect is accepted only from edgehub".to_owned();
        return refuse_message(node, sender, publish, &msg, text);
    }
    let connected = match serde_json::from_str::<String>(msg.content_json()).as_deref() {
        Ok("cloud_connected") => true,
        Ok("cloud_disconnected") => false,
        _ => {
            let text = format!(
                "connect content must be \"cloud_connected\" or \"cloud_disconnected\", not {}",
                msg.content_json()
            );
            return refuse_message(node, sender, publish, &msg, text);
        }
    };
    if node.set_cloud_connected(connected) {
        tracing::info!(connected, "cloud connection changed");
    }
    finish(node, publish)
}
