//! A broker in memory, behind the same [`Incoming`] and [`Publisher`] as the real links: the
//! message path's unit tests drive MetaManager's operations with it, without a broker process.
//!
//! It accepts every publish at once (the [`Delivery`] record sees each acknowledged as soon as
//! it is sent), hands the test what was published in order, and reports which inbound messages
//! MetaManager acknowledged, once the publishes before each ack are confirmed, as the real links
//! do.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::unacked::{PendingAck, Unacked};
use super::{Closing, Connected, Inbound, Incoming, Link, Outlet, Publisher, Source, Tasks};
use crate::budget::{InboundBudget, Limits};
use crate::delivery::Delivery;
use crate::topics::Topics;

/// How long the test double waits for something MetaManager should do before it fails the test.
const WAIT: Duration = Duration::from_secs(5);

/// A publish MetaManager made.
#[derive(Debug, Clone)]
pub struct Published {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

impl Published {
    /// The payload as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// The sending side: records each publish and accepts it at once.
pub(crate) struct MemoryOutlet {
    published: mpsc::UnboundedSender<Published>,
    pkid: Mutex<u16>,
}

impl MemoryOutlet {
    pub(crate) fn publish(
        &self,
        delivery: &Delivery,
        topic: &str,
        retain: bool,
        payload: Bytes,
    ) -> bool {
        let pkid = {
            let mut pkid = self.pkid.lock().unwrap_or_else(|p| p.into_inner());
            *pkid = pkid.checked_add(1).unwrap_or(1);
            *pkid
        };
        delivery.sent(pkid);
        let sent = self
            .published
            .send(Published {
                topic: topic.to_owned(),
                payload,
                retain,
            })
            .is_ok();
        delivery.acknowledged(pkid);
        sent
    }
}

/// The test's end of the in-memory broker.
pub struct MemoryBroker {
    inbound: mpsc::UnboundedSender<Inbound>,
    published: mpsc::UnboundedReceiver<Published>,
    acked: mpsc::UnboundedReceiver<u16>,
    budget: Arc<InboundBudget>,
    unacked: Arc<Unacked>,
    next_pkid: u16,
}

impl MemoryBroker {
    /// Delivers a QoS 1 message to MetaManager; returns the packet id its ack will name.
    pub fn deliver(&mut self, topic: &str, payload: impl Into<Bytes>) -> u16 {
        let payload = payload.into();
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        let permit = self
            .budget
            .try_acquire(payload.len())
            .expect("the test stays within the inbound budget");
        let message = Inbound {
            topic: topic.to_owned(),
            payload,
            receipt: self.unacked.received(Some(self.next_pkid), permit),
        };
        self.inbound
            .send(message)
            .expect("MetaManager's side of the link is open");
        self.next_pkid
    }

    /// The next publish MetaManager made.
    pub async fn published(&mut self) -> Published {
        tokio::time::timeout(WAIT, self.published.recv())
            .await
            .expect("MetaManager publishes in time")
            .expect("the link is open")
    }

    /// Everything published so far, without waiting.
    pub fn published_now(&mut self) -> Vec<Published> {
        std::iter::from_fn(|| self.published.try_recv().ok()).collect()
    }

    /// The packet id of the next inbound message MetaManager acknowledged.
    pub async fn acked(&mut self) -> u16 {
        tokio::time::timeout(WAIT, self.acked.recv())
            .await
            .expect("MetaManager acknowledges in time")
            .expect("the link is open")
    }
}

/// A link to an in-memory broker, with its inbound messages and the test's end.
pub fn link(topics: Topics) -> (Link, Incoming, MemoryBroker) {
    let (state, connected) = Connected::new();
    state.set(&state.receiving, true);
    state.set(&state.sending, true);
    let delivery = Arc::new(Delivery::default());
    let unacked = Arc::new(Unacked::default());
    unacked.connected();
    let (published_tx, published_rx) = mpsc::unbounded_channel();
    let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let (acked_tx, acked_rx) = mpsc::unbounded_channel();
    let outlet = Arc::new(MemoryOutlet {
        published: published_tx,
        pkid: Mutex::new(0),
    });
    let tasks = Tasks {
        receive: None,
        send: tokio::spawn(acknowledge(
            acks_rx,
            delivery.clone(),
            unacked.clone(),
            acked_tx,
        )),
        helpers: Vec::new(),
    };
    let link = Link {
        publisher: Publisher::new(
            Outlet::Memory(outlet),
            Arc::new(topics),
            delivery,
            unacked.clone(),
            acks_tx,
        ),
        connected,
        closing: Closing::InProcess,
        unacked: unacked.clone(),
        tasks,
    };
    let broker = MemoryBroker {
        inbound: inbound_tx,
        published: published_rx,
        acked: acked_rx,
        budget: InboundBudget::new(Limits::default()),
        unacked,
        next_pkid: 0,
    };
    (link, Incoming(Source::Queued(inbound_rx)), broker)
}

/// Reports each ack once the publishes before it are confirmed, in the order asked for.
async fn acknowledge(
    mut acks: mpsc::UnboundedReceiver<PendingAck>,
    delivery: Arc<Delivery>,
    unacked: Arc<Unacked>,
    acked: mpsc::UnboundedSender<u16>,
) {
    let mut confirmed = delivery.confirmed();
    while let Some(PendingAck { pkid, after, taken }) = acks.recv().await {
        if confirmed.wait_for(|c| *c >= after).await.is_err() {
            return;
        }
        drop(taken);
        unacked.waiting.fetch_sub(1, Ordering::AcqRel);
        if acked.send(pkid).is_err() {
            return;
        }
    }
}
