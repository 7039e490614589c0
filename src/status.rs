//! The node's status object, published retained on the status topic: `online` with the cloud
//! state and the store's (`ok`, or `full` while it refuses writes for want of room) while
//! MetaManager runs, `offline` on a clean exit and as the last will.

use serde::Serialize;

#[derive(Serialize)]
struct Status<'a> {
    state: &'a str,
    node_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cloud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<&'a str>,
    version: &'a str,
    timestamp: i64,
}

/// The status while running, with the cloud state and whether the store is full.
pub fn online_status(node_id: &str, cloud_connected: bool, store_full: bool) -> Vec<u8> {
    status(node_id, Some((cloud_connected, store_full)))
}

/// `running`: the cloud state and whether the store is full, while MetaManager runs.
fn status(node_id: &str, running: Option<(bool, bool)>) -> Vec<u8> {
    serde_json::to_vec(&Status {
        state: if running.is_some() {
            "online"
        } else {
            "offline"
        },
        node_id,
        cloud: running.map(|(c, _)| if c { "connected" } else { "disconnected" }),
        store: running.map(|(_, full)| if full { "full" } else { "ok" }),
        version: env!("CARGO_PKG_VERSION"),
        timestamp: crate::message::now_millis(),
    })
    .unwrap_or_default()
}

/// The status published on a clean exit and registered as the last will.
pub fn offline_status(node_id: &str) -> Vec<u8> {
    status(node_id, None)
}
