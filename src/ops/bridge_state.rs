//! The bridge's state topic (`cloud_link.state_topic`): the cloud's reachability as the node
//! broker's bridge to a central broker reports it, taken as edgehub's `connect` is. Nobody sent
//! it to MetaManager, so nobody gets a reply: a payload it cannot read is logged and counted,
//! and the cloud's state stays as it was.

use crate::cloud::{Cloud, Source};
use crate::metrics::ErrorReason;
use crate::mqtt::Inbound;

use super::{finish, Replies, Step};

/// The `topic` label of what arrives on the state topic in `messages_received`.
const TOPIC_LABEL: &str = "bridge";
/// How much of a payload it cannot read is logged.
const SHOWN_BYTES: usize = 64;

pub(super) fn bridge_state(replies: &Replies, cloud: &Cloud, publish: Inbound) -> Step {
    let Some(words) = cloud.state.bridge_words() else {
        // Only subscribed to with a state topic configured, which gives the words.
        return finish(replies, publish);
    };
    match words.read(&publish.payload) {
        Some(connected) => {
            let operation = if connected {
                "connected"
            } else {
                "disconnected"
            };
            replies.metrics.received(TOPIC_LABEL, operation);
            cloud.report(Source::Bridge, connected);
        }
        None => {
            replies.metrics.received(TOPIC_LABEL, "invalid");
            replies.metrics.error(ErrorReason::Invalid);
            let shown = &publish.payload[..publish.payload.len().min(SHOWN_BYTES)];
            tracing::warn!(
                topic = %publish.topic,
                payload = %String::from_utf8_lossy(shown),
                connected = %words.connected,
                disconnected = %words.disconnected,
                "bridge state not understood (cloud_link.connected_payload and disconnected_payload say what is); the cloud's state is unchanged"
            );
        }
    }
    finish(replies, publish)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::ops::testing::{message, Harness};
    use crate::topics::Peer;

    const STATE: &str = "$SYS/broker/connection/bridge-test-node/state";

    async fn bridged() -> Harness {
        Harness::with_settings(&format!("cloud_link:\n  state_topic: {STATE}\n")).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bridge_state_connects_and_disconnects_the_cloud_without_a_reply() {
        let mut h = bridged().await;
        assert!(
            !h.cloud.state.connected(),
            "disconnected until the bridge speaks"
        );
        let pkid = h.handle_raw(STATE, b"1").await;
        assert_eq!(h.broker.acked().await, pkid);
        assert!(h.cloud.state.connected());
        assert!(
            h.broker.published_now().is_empty(),
            "no reply to a bridge state"
        );
        h.handle_raw(STATE, b"0").await;
        assert!(!h.cloud.state.connected());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_payload_is_acked_and_leaves_the_state_alone() {
        let mut h = bridged().await;
        h.handle_raw(STATE, b"1").await;
        h.broker.acked().await;
        let pkid = h.handle_raw(STATE, b"online").await;
        assert_eq!(h.broker.acked().await, pkid);
        assert!(h.cloud.state.connected(), "unchanged");
        assert!(h.broker.published_now().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edgehub_disconnected_holds_the_cloud_away_while_the_bridge_is_up() {
        let mut h = bridged().await;
        h.handle_raw(STATE, b"1").await;
        let away = message(
            "c-1",
            "connect",
            "default/node/n",
            json!("cloud_disconnected"),
        );
        h.handle(Peer::Edgehub, away).await;
        assert!(!h.cloud.state.connected());
        let back = message("c-2", "connect", "default/node/n", json!("cloud_connected"));
        h.handle(Peer::Edgehub, back).await;
        assert!(h.cloud.state.connected());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_state_topic_the_topic_is_not_special() {
        let mut h = Harness::new().await;
        h.handle_raw(STATE, b"1").await;
        assert!(!h.cloud.state.connected());
    }
}
