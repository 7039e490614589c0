//! A report of the cloud connection: edgehub's `connect`, or the bridge's state topic
//! (`cloud_link.state_topic`), which reports the cloud's reachability as the node broker's
//! bridge to a central broker sees it. Neither gets a reply.

use super::outcome::Outcome;
use super::request::ConnectRequest;
use super::Context;

impl ConnectRequest {
    /// Records the report at once: nothing is stored, so nothing waits for a commit, and what
    /// acts on the cloud coming and going follows the state it sets.
    pub(super) fn apply(self, ctx: &Context) -> Outcome {
        ctx.cloud.report(self.source, self.connected);
        Outcome::Quiet
    }
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

#[cfg(test)]
mod bridge_tests {
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
