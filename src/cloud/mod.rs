//! The cloud side: what MetaManager keeps and does for the cloud, which it reaches only through
//! edgehub and which is not always there.
//!
//! - [`state`]: whether the cloud is connected, as edgehub and the bridge's state topic say.
//! - [`outbox`]: what waits for the cloud while it is away, and its paced sending.
//! - [`metasync`]: the periodic pod-status sync to the cloud, sending what changed.
//! - [`digest`]: the store's digest as the `digest` message, in parts when large.
//! - [`remote`]: queries and API writes waiting for the cloud's answer.
//! - [`refusal`]: the cloud's refusal of a write, its reason read once from its words.
//! - [`replaces`]: the pages of `replace` operations whose last page has not come.
//! - [`settings`]: `outbox`, `meta` and `cloud_link`, with their defaults and bounds.
//! - [`waiting`]: patches passed on to the cloud, waiting for its answer (in memory here, and
//!   as rows the store writes with each patch's change).
//!
//! [`Cloud`] holds them together, as the operations and the API's writes use them. State the
//! cloud side comes to keep (what the cloud was last told, the versions it holds) gets a file
//! here and a field there. This module depends on the store, never the other way round: the
//! store keeps the rows and their bound, and knows nothing of who reads them.

pub mod digest;
pub mod metasync;
pub mod outbox;
pub mod refusal;
pub mod remote;
pub mod replaces;
pub mod settings;
pub mod state;
pub mod waiting;

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::mqtt::Publisher;
use crate::store::Store;

pub use state::{CloudState, Source};

/// The cloud side of one node; cheap to clone, every clone is the same cloud side.
#[derive(Clone)]
pub struct Cloud {
    pub state: CloudState,
    pub outbox: outbox::Outbox,
    pub metasync: metasync::MetaSync,
    pub remote: Arc<remote::RemoteQueries>,
    pub patches: Arc<waiting::WaitingPatches>,
    /// Pages of the cloud's replaces, held until their last page.
    pub replaces: Arc<replaces::Replaces>,
}

/// How the cloud side works, from the settings: how long remote queries wait for the cloud,
/// how MetaSync runs, and the bridge's state payloads when a bridge reports the cloud.
pub struct CloudPlan {
    pub remote_timeout: Duration,
    pub sync: metasync::SyncPlan,
    pub bridge: Option<state::BridgeWords>,
}

impl Cloud {
    /// The cloud side of the node whose store is `store`, disconnected until edgehub (or the
    /// bridge) says otherwise, working by `plan`: what goes out goes with `publisher`, and the
    /// patches the store says still wait for an answer wait on.
    pub fn new(
        store: &Store,
        publisher: &Publisher,
        metrics: Arc<Metrics>,
        plan: CloudPlan,
    ) -> Self {
        let CloudPlan {
            remote_timeout,
            sync,
            bridge,
        } = plan;
        let rows = store.sent_patches().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read which patches wait for the cloud's answer; their answers will not be stored");
            Vec::new()
        });
        let state = CloudState::new(bridge);
        let outbox = outbox::Outbox::new(store.clone(), publisher.clone(), state.clone());
        let metasync =
            metasync::MetaSync::new(store.clone(), outbox.clone(), state.clone(), metrics, sync);
        Self {
            state,
            outbox,
            metasync,
            remote: Arc::new(remote::RemoteQueries::new(remote_timeout)),
            patches: Arc::new(waiting::WaitingPatches::load(rows)),
            replaces: Arc::default(),
        }
    }

    /// Records what `source` says of the cloud. Everything that acts on the cloud coming and
    /// going (the status topic, the outbox's drain, MetaSync and the digest) follows
    /// [`CloudState::watch`]; what is dropped when it goes is dropped here.
    pub fn report(&self, source: Source, connected: bool) {
        if self.state.report(source, connected) {
            let connected = self.state.connected();
            tracing::info!(connected, by = source.as_str(), "cloud connection changed");
        }
        if !self.state.connected() {
            // The cloud starts its unfinished replaces over when it is back.
            self.replaces.discard_all();
        }
    }
}
