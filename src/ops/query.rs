//! query: answer edged or edgehub from the store, after every earlier write is committed; ask
//! the cloud for what edged may fetch and the node does not hold, or holds a token of that is
//! expiring.

use crate::cloud::Cloud;
use crate::message::{self, Message};
use crate::mqtt::Inbound;
use crate::store::Store;
use crate::topics::Peer;

use super::remote_query::remote_query;
use super::rules::{self, TokenState};
use super::versions;
use super::{respond, Replies, Rules, Step};

/// query: answer from the store; fetch from the cloud what edged may not have locally.
pub(super) fn query(
    replies: &Replies,
    store: &Store,
    cloud: &Cloud,
    rules: &Rules,
    sender: Peer,
    publish: Inbound,
    msg: Message,
) -> Step {
    if let Some(asked) = versions::asked(&msg) {
        return versions::versions(
            replies,
            store,
            rules.max_payload,
            sender,
            publish,
            msg,
            asked,
        );
    }
    let (replies, store, cloud) = (replies.clone(), store.clone(), cloud.clone());
    let from_cloud = sender == Peer::Edged && rules.remote_types.contains(msg.resource.rtype());
    let refresh_before = rules.token_refresh_before;
    Box::pin(async move {
        let r = &msg.resource;
        let found = match r.name() {
            Some(_) => store.get(r.key()).await.map(|v| v.into_iter().collect()),
            None => store
                .list(r.namespace(), r.rtype())
                .await
                .map(|rows| rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>()),
        };
        match found {
            Ok(objects) if objects.is_empty() && from_cloud => {
                remote_query(&replies, &store, &cloud, msg, None).await;
            }
            Ok(objects)
                if from_cloud
                    && r.rtype() == rules::TOKEN
                    && r.name().is_some()
                    && cloud.state.connected() =>
            {
                // A token is fetched again before it expires; the stored one is served if the
                // cloud cannot answer and it is still valid.
                let stored = objects.into_iter().next().unwrap_or_default();
                let now = std::time::SystemTime::now();
                match rules::token_state(&stored, now, refresh_before) {
                    TokenState::Fresh => {
                        let content = Ok(message::raw_array([stored.as_str()]));
                        return respond(&replies, sender, &publish, &msg, content).await;
                    }
                    TokenState::RefreshDue => {
                        remote_query(&replies, &store, &cloud, msg, Some(stored)).await
                    }
                    TokenState::Expired => remote_query(&replies, &store, &cloud, msg, None).await,
                }
            }
            found => {
                let content =
                    found.map(|objects| message::raw_array(objects.iter().map(String::as_str)));
                return respond(&replies, sender, &publish, &msg, content).await;
            }
        }
        // Asked of the cloud: its answer comes from the remote query.
        replies.publisher.ack(&publish);
    })
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
