//! connect: edgehub reports whether the cloud is reachable. No reply.

use crate::cloud::{Cloud, Source};
use crate::message::Message;
use crate::mqtt::Inbound;
use crate::topics::Peer;

use super::{finish, refuse_message, Replies, Step};

/// connect: edgehub reports whether the cloud is reachable. No reply.
pub(super) fn connect(
    replies: &Replies,
    cloud: &Cloud,
    sender: Peer,
    publish: Inbound,
    msg: Message,
) -> Step {
    if sender != Peer::Edgehub {
        let text = "connect is accepted only from edgehub".to_owned();
        return refuse_message(replies, sender, publish, &msg, text);
    }
    let connected = match serde_json::from_str::<String>(msg.content_json()).as_deref() {
        Ok("cloud_connected") => true,
        Ok("cloud_disconnected") => false,
        _ => {
            let text = format!(
                "connect content must be \"cloud_connected\" or \"cloud_disconnected\", not {}",
                msg.content_json()
            );
            return refuse_message(replies, sender, publish, &msg, text);
        }
    };
    cloud.report(Source::Edgehub, connected);
    finish(replies, publish)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::ops::testing::{message, Harness};
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_sets_the_cloud_state_and_answers_nothing() {
        let mut h = Harness::new().await;
        assert!(!h.cloud.state.connected(), "starts disconnected");
        let pkid = h
            .handle(
                Peer::Edgehub,
                message("c-1", "connect", "default/node/n", json!("cloud_connected")),
            )
            .await;
        assert_eq!(h.broker.acked().await, pkid);
        assert!(h.cloud.state.connected());
        assert!(h.broker.published_now().is_empty(), "no reply to connect");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_from_edged_is_refused() {
        let mut h = Harness::new().await;
        h.handle(
            Peer::Edged,
            message("c-1", "connect", "default/node/n", json!("cloud_connected")),
        )
        .await;
        let reply = h.published_to(Peer::Edged).await.json();
        assert_eq!(reply["route"]["operation"], "error");
        assert!(!h.cloud.state.connected());
    }
}
