//! The cloud's responses and errors: to the remote query or API write waiting for them, else
//! to edged. An answer to a patch edged sent is stored first. A bare "OK" to an API write is
//! its receipt: acked, and the write waits on for the object.

use crate::cloud::remote::{Answer, Completion};
use crate::cloud::Cloud;
use crate::message::Message;
use crate::mqtt::Inbound;
use crate::store::{Change, Store, StoreError};
use crate::topics::Peer;

use super::change::{forward, PassOn};
use super::{report_store_error, store_failed, Replies, Step};

/// The cloud's response or error: completes the remote query it answers, else goes to edged.
pub(super) async fn answer_from_cloud(
    replies: &Replies,
    store: &Store,
    cloud: &Cloud,
    publish: Inbound,
    message: Message,
) -> Step {
    // An answer to a patch waiting for it is stored first.
    let change = Change {
        msg_id: Some(message.msg_id().to_owned()),
        ..cloud.patches.answer(&message).unwrap_or_default()
    };
    let stores = change.write.is_some();
    let committed = match store.submit(change).await {
        Ok(c) => c,
        Err(e) => return store_failed(replies, Peer::Edgehub, publish, message, e),
    };
    let (replies, store, cloud) = (replies.clone(), store.clone(), cloud.clone());
    Box::pin(async move {
        if stores {
            match committed.await.unwrap_or(Err(StoreError::Closed)) {
                Ok(applied) => {
                    let (outbox, to) = (&cloud.outbox, PassOn::Edged);
                    forward(&replies, &store, outbox, to, &message, &publish, applied).await;
                }
                Err(e) => report_store_error(&replies, Peer::Edgehub, &message, &e).await,
            }
            replies.publisher.ack(&publish);
            return;
        }
        // Nothing stored, so nothing can supersede an answer: an unsettled redelivery is
        // always handled again, a settled one only acked.
        if let Ok(Ok(applied)) = committed.await {
            if applied.settled() {
                replies.publisher.ack(&publish);
                return;
            }
        }
        let id = message.msg_id().to_owned();
        // A claimed answer is settled by the query waiting for it, once it has replied.
        match cloud.remote.complete(Answer { message, publish }) {
            Completion::Claimed => {}
            Completion::Receipt(receipt) => {
                replies.settle(&store, &id);
                replies.publisher.ack(&receipt.publish);
            }
            Completion::Unclaimed(unclaimed) => {
                replies
                    .publisher
                    .send(Peer::Edged, unclaimed.publish.payload.clone())
                    .await;
                replies.settle(&store, &id);
                replies.publisher.ack(&unclaimed.publish);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::ops::testing::Harness;
    use crate::topics::Peer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cloud_answer_nobody_waits_for_goes_to_edged() {
        let mut h = Harness::new().await;
        let answer = json!({
            "header": {"msg_id": "cloud-1", "parent_msg_id": "nobody"},
            "route": {"source": "cloud", "group": "meta", "operation": "response", "resource": "default/pod/p"},
            "content": "OK",
        })
        .to_string();
        let pkid = h.handle(Peer::Edgehub, answer.clone()).await;
        let passed = h.published_to(Peer::Edged).await;
        assert_eq!(passed.payload, answer.as_bytes());
        assert_eq!(h.broker.acked().await, pkid);
    }
}
