//! query: answer edged or edgehub from the store, after every earlier write is committed; ask
//! the cloud for what edged may fetch and the node does not hold, or holds a token of that is
//! expiring.

use std::sync::Arc;

use crate::message;
use crate::topics::Peer;

use super::outcome::Outcome;
use super::remote_query::remote_query;
use super::request::QueryRequest;
use super::rules::{self, TokenState};
use super::{Context, Later};

impl QueryRequest {
    /// Runs in its place in the pipeline, after every earlier write is committed, so that
    /// edged reads its own writes.
    pub(super) fn start(self, ctx: &Arc<Context>) -> Later {
        let ctx = ctx.clone();
        Box::pin(async move { self.answer(&ctx).await })
    }

    async fn answer(self, ctx: &Context) -> Outcome {
        let Self { from, msg } = self;
        let (store, rules) = (&ctx.store, &ctx.rules);
        let from_cloud = from == Peer::Edged && rules.remote_types.contains(msg.resource.rtype());
        let r = &msg.resource;
        let found = match r.name() {
            Some(_) => store.get(r.key()).await.map(|v| v.into_iter().collect()),
            None => store
                .list(r.namespace(), r.rtype())
                .await
                .map(|rows| rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>()),
        };
        match found {
            Ok(objects) if objects.is_empty() && from_cloud => remote_query(ctx, msg, None).await,
            Ok(objects)
                if from_cloud
                    && r.rtype() == rules::TOKEN
                    && r.name().is_some()
                    && ctx.cloud.state.connected() =>
            {
                let stored = objects.into_iter().next().unwrap_or_default();
                let now = std::time::SystemTime::now();
                match rules::token_state(&stored, now, rules.token_refresh_before) {
                    TokenState::Fresh => {
                        let content = Ok(message::raw_array([stored.as_str()]));
                        Outcome::answer(&msg, content)
                    }
                    TokenState::RefreshDue => remote_query(ctx, msg, Some(stored)).await,
                    TokenState::Expired => remote_query(ctx, msg, None).await,
                }
            }
            found => {
                let content =
                    found.map(|objects| message::raw_array(objects.iter().map(String::as_str)));
                Outcome::answer(&msg, content)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::ops::testing::{message, pod, Harness};
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_reads_its_own_writes_and_lists_in_key_order() {
        let mut h = Harness::new().await;
        for name in ["b", "a"] {
            let insert = message(
                &format!("i-{name}"),
                "insert",
                &format!("default/pod/{name}"),
                pod(name),
            );
            h.handle(Peer::Edgehub, insert).await;
        }
        let pkid = h
            .handle(
                Peer::Edged,
                message("q-1", "query", "default/pod", Value::Null),
            )
            .await;
        let answer = loop {
            let p = h.broker.published().await;
            if p.topic == h.to(Peer::Edged) && p.json()["header"]["parent_msg_id"] == "q-1" {
                break p.json();
            }
        };
        assert_eq!(answer["route"]["operation"], "response");
        let names: Vec<&str> = answer["content"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        let mut acked = Vec::new();
        for _ in 0..3 {
            acked.push(h.broker.acked().await);
        }
        assert_eq!(acked.last(), Some(&pkid), "acked last, in order: {acked:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_for_a_missing_local_type_is_an_empty_list() {
        let mut h = Harness::new().await;
        h.handle(
            Peer::Edged,
            message("q-1", "query", "default/pod/none", Value::Null),
        )
        .await;
        let answer = h.published_to(Peer::Edged).await.json();
        assert_eq!(answer["route"]["operation"], "response");
        assert_eq!(answer["content"], serde_json::json!([]));
    }
}
