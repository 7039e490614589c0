//! The node's status object, published retained on the status topic: `online` with the cloud
//! state while MetaManager runs, `offline` on a clean exit and as the last will.

use serde::Serialize;

#[derive(Serialize)]
struct Status<'a> {
    state: &'a str,
    node_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cloud: Option<&'a str>,
    version: &'a str,
    timestamp: i64,
}

/// The status while running, with the cloud state.
pub fn online_status(node_id: &str, cloud_connected: bool) -> Vec<u8> {
    status(node_id, true, Some(cloud_connected))
}

fn status(node_id: &str, online: bool, cloud: Option<bool>) -> Vec<u8> {
    serde_json::to_vec(&Status {
        state: if online { "online" } else { "offline" },
        node_id,
        cloud: cloud.map(|c| if c { "connected" } else { "disconnected" }),
        version: env!("CARGO_PKG_VERSION"),
        timestamp: crate::message::now_millis(),
    })
    .unwrap_or_default()
}

/// The status published on a clean exit and registered as the last will.
pub fn offline_status(node_id: &str) -> Vec<u8> {
    status(node_id, false, None)
}
