//! The cloud side: what MetaManager keeps and does for the cloud, which is reached only through
//! edgehub and is not always there.
//!
//! - [`state`]: whether the cloud is connected, as edgehub last said.
//! - [`outbox`]: what waits for the cloud while it is away, and its paced sending.
//! - [`metasync`]: the periodic pod-status sync to the cloud.
//! - [`remote`]: queries and API writes waiting for the cloud's answer.
//! - [`replaces`]: the pages of `replace` operations whose last page has not come.
//! - [`settings`]: `outbox` and `meta`, with their defaults and bounds.
//! - [`waiting`]: patches passed on to the cloud, waiting for its answer (in memory here, and
//!   as rows the store writes with each patch's change).
//!
//! This module depends on the store, never the other way round: the store keeps the rows and
//! their bound, and knows nothing of who reads them.

pub mod metasync;
pub mod outbox;
pub mod remote;
pub mod replaces;
pub mod settings;
pub mod state;
pub mod waiting;

pub use state::CloudState;
