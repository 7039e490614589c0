//! edged's responses and errors: stored when they carry an object, passed on to the cloud.

use crate::cloud::Cloud;
use crate::message::{Message, Operation};
use crate::mqtt::Inbound;
use crate::store::{Change, Committed, Store, StoreError, Write};
use crate::topics::Peer;

use super::change::{forward, queue_for_cloud, PassOn, WriteKind};
use super::{report_not_queued, report_store_error, store_failed, Replies, Step};

/// edged's response or error: stored when it carries an object, relayed to the cloud unchanged.
pub(super) async fn relay_from_edged(
    replies: &Replies,
    store: &Store,
    cloud: &Cloud,
    publish: Inbound,
    msg: Message,
) -> Step {
    let stores = msg.operation == Operation::Response
        && msg.resource.name().is_some()
        && msg.content_json().starts_with('{');
    let write = stores.then(|| Write::Put {
        key: msg.resource.key().to_owned(),
        rtype: msg.resource.rtype().to_owned(),
        value: msg.content.clone().unwrap_or_default(),
    });
    let to_cloud = queue_for_cloud(&cloud.outbox, Peer::Edgehub, &msg, &publish, WriteKind::Put);
    let change = Change {
        msg_id: Some(msg.msg_id().to_owned()),
        write,
        to_cloud,
        ..Change::default()
    };
    let committed: Committed = match store.submit(change).await {
        Ok(c) => c,
        Err(e) => return store_failed(replies, Peer::Edged, publish, msg, e),
    };
    let (replies, store, outbox) = (replies.clone(), store.clone(), cloud.outbox.clone());
    Box::pin(async move {
        match committed.await.unwrap_or(Err(StoreError::Closed)) {
            Ok(applied) => {
                let to = PassOn::Cloud { coalesce: false };
                if !forward(&replies, &store, &outbox, to, &msg, &publish, applied).await {
                    report_not_queued(&replies, Peer::Edged, &msg).await;
                }
            }
            Err(e) => report_store_error(&replies, Peer::Edged, &msg, &e).await,
        }
        replies.publisher.ack(&publish);
    })
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::{message, pod, Harness};
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edged_s_response_with_an_object_is_stored_and_relayed_unchanged() {
        let mut h = Harness::new().await;
        h.connect_cloud().await;
        let response = message("r-1", "response", "default/pod/p", pod("p"));
        let pkid = h.handle(Peer::Edged, response.clone()).await;
        let relayed = h.published_to(Peer::Edgehub).await;
        assert_eq!(relayed.payload, response.as_bytes());
        assert_eq!(h.broker.acked().await, pkid);
        assert_eq!(h.stored("default/pod/p").await, Some(pod("p")));
    }
}
