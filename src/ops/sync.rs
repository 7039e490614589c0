//! meta-internal-sync: run a full MetaSync now, then ack.

use std::sync::Arc;

use crate::cloud::metasync::RunKind;

use super::outcome::Outcome;
use super::request::SyncRequest;
use super::{Context, Later};

impl SyncRequest {
    /// Runs in its place in the pipeline, so that the run sees every earlier change committed.
    pub(super) fn start(self, ctx: &Arc<Context>) -> Later {
        let metasync = ctx.cloud.metasync.clone();
        Box::pin(async move {
            match metasync.run(RunKind::Full).await {
                Ok(report) => {
                    tracing::info!(%report, "metasync on request");
                    Outcome::ack(&self.msg)
                }
                Err(e) => Outcome::store_failed(&self.msg, &e),
            }
        })
    }
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
