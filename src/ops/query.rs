//! query: answer edged or edgehub from the store, after every earlier write is committed.

use std::sync::Arc;

use crate::message::{self, Message, Operation};
use crate::mqtt::Inbound;
use crate::node::Node;
use crate::topics::Peer;

use super::remote_query::remote_query;
use super::{report_store_error, send_reply, Step};

/// query: answer from the store; fetch from the cloud what edged may not have locally.
pub(super) fn query(node: &Arc<Node>, sender: Peer, publish: Inbound, msg: Message) -> Step {
    let node = node.clone();
    Box::pin(async move {
        let r = &msg.resource;
        let found = match r.name() {
            Some(_) => node
                .store
                .get(r.key())
                .await
                .map(|v| v.into_iter().collect()),
            None => node
                .store
                .list(r.namespace(), r.rtype())
                .await
                .map(|rows| rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>()),
        };
        match found {
            Ok(objects)
                if objects.is_empty()
                    && sender == Peer::Edged
                    && node.remote_types.contains(r.rtype()) =>
            {
                remote_query(&node, msg).await;
            }
            Ok(objects) => {
                let content = message::raw_array(objects.iter().map(String::as_str));
                let reply = message::reply(&msg, Operation::Response, &content);
                send_reply(&node, sender, reply, Operation::Response).await;
            }
            Err(e) => report_store_error(&node, sender, &msg, &e).await,
        }
        node.publisher.ack(&publish);
    })
}
