//! The cloud side's settings: the outbox (`outbox`), what MetaManager does for and asks of
//! the cloud (`meta`: MetaSync, remote queries and their types, token refresh), and where it
//! learns that the cloud is reachable besides edgehub's `connect` (`cloud_link`).

use std::time::Duration;

use serde::Deserialize;

use super::state::BridgeWords;

use crate::settings_checks::{
    self, at_most_bytes, duration_within, invalid, within, ConfigError, MIN_DURATION,
};

/// The outbox is on disk, so this bounds disk, not memory: at 1 MiB a message, up to 1 TB.
pub const MAX_OUTBOX_MESSAGES: usize = 1_000_000;
pub const MAX_OUTBOX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Messages per second; the drain reads a tenth of it from the database at a time, so this
/// also bounds what one read holds in memory (1000 messages).
pub const MAX_DRAIN_RATE: u32 = 10_000;
pub const MAX_PODSTATUS_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// `meta.sync.podstatus.full_interval` by default: two full MetaSync runs a day. An idle node
/// then spends its uplink on the digest each interval and two full status lists a day, well
/// under 1 MB a day for 100 pods, while a status lost on the way (an outbox overflow) still
/// reaches the cloud within half a day without anyone asking.
pub const DEFAULT_FULL_SYNC_INTERVAL: Duration = Duration::from_secs(12 * 3600);
/// The longest `meta.sync.podstatus.full_interval`: a week.
pub const MAX_FULL_SYNC_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);
/// edged waits this long for an answer; an hour is already far past any caller's patience.
pub const MAX_REMOTE_QUERY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Tokens live an hour by default in Kubernetes (at least 10 minutes); a day is beyond any TTL.
pub const MAX_TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// Longer than any KubeEdge type name (`serviceaccounttoken` has 19 bytes); a DNS label's limit.
pub const MAX_RESOURCE_TYPE_BYTES: usize = 63;

/// Longer than any bridge state topic (mosquitto's is `$SYS/broker/connection/` and a client
/// id of at most 65 535 bytes, but client ids are short), and short enough to log.
pub const MAX_STATE_TOPIC_BYTES: usize = 1024;
/// The bridge's payloads are words such as `1`, `0`, `online`.
pub const MAX_STATE_PAYLOAD_BYTES: usize = 256;

/// `cloud_link`: a retained topic whose payload says whether the link to the cloud is up, for a
/// node whose broker bridges its topics to a central broker and has no edgehub to send
/// `connect`. The payloads' defaults are mosquitto's bridge notifications (`notifications true`
/// publishes `1` and `0`, retained, on `$SYS/broker/connection/<remote_clientid>/state`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudLinkSettings {
    /// Unset: edgehub's `connect` alone says whether the cloud is reachable.
    pub state_topic: Option<String>,
    pub connected_payload: String,
    pub disconnected_payload: String,
}

impl Default for CloudLinkSettings {
    fn default() -> Self {
        Self {
            state_topic: None,
            connected_payload: "1".into(),
            disconnected_payload: "0".into(),
        }
    }
}

impl CloudLinkSettings {
    /// `node_topics` are the node's own topics, which the state topic must not be.
    pub(crate) fn validate(&self, node_topics: &[&str]) -> Result<(), ConfigError> {
        for (key, payload) in [
            ("cloud_link.connected_payload", &self.connected_payload),
            (
                "cloud_link.disconnected_payload",
                &self.disconnected_payload,
            ),
        ] {
            if payload.trim().is_empty() {
                return invalid(key, "must not be empty or only white space".into());
            }
            at_most_bytes(key, payload, MAX_STATE_PAYLOAD_BYTES)?;
        }
        if self.connected_payload.trim() == self.disconnected_payload.trim() {
            return invalid(
                "cloud_link.disconnected_payload",
                format!(
                    "must differ from connected_payload ({:?})",
                    self.connected_payload
                ),
            );
        }
        let Some(topic) = &self.state_topic else {
            return Ok(());
        };
        let key = "cloud_link.state_topic";
        if topic.is_empty() {
            return invalid(
                key,
                "must not be empty: leave the key out to use edgehub's connect alone".into(),
            );
        }
        at_most_bytes(key, topic, MAX_STATE_TOPIC_BYTES)?;
        if topic.contains(['+', '#', '\0']) {
            return invalid(
                key,
                format!("{topic:?} is a filter: name one topic, without + or #"),
            );
        }
        if node_topics.contains(&topic.as_str()) {
            return invalid(
                key,
                format!("{topic:?} is one of the node's own topics; name the bridge's state topic"),
            );
        }
        Ok(())
    }

    /// The payloads, when a state topic is named.
    pub fn bridge_words(&self) -> Option<BridgeWords> {
        self.state_topic.as_ref().map(|topic| BridgeWords {
            topic: topic.clone(),
            connected: self.connected_payload.trim().to_owned(),
            disconnected: self.disconnected_payload.trim().to_owned(),
        })
    }
}

/// Bounds and pacing of the durable outbox that holds messages for the cloud while it is
/// disconnected.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    /// Most messages kept; beyond it the oldest are dropped (and counted).
    pub max_messages: usize,
    /// Messages older than this are dropped instead of sent.
    #[serde(deserialize_with = "settings_checks::duration")]
    pub max_age: Duration,
    /// Messages per second sent when the cloud comes back.
    pub drain_rate: u32,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            drain_rate: 200,
        }
    }
}

impl OutboxSettings {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        within(
            "outbox.max_messages",
            self.max_messages,
            1,
            MAX_OUTBOX_MESSAGES,
        )?;
        // 0 is refused rather than read as "off": it would drop everything queued the moment
        // the cloud came back, which is never what an outbox is for.
        duration_within("outbox.max_age", self.max_age, MIN_DURATION, MAX_OUTBOX_AGE)?;
        within("outbox.drain_rate", self.drain_rate, 1, MAX_DRAIN_RATE)?;
        Ok(())
    }
}

/// `meta`: MetaSync's period, and the queries and tokens asked of the cloud.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaSettings {
    pub sync: SyncSettings,
    #[serde(deserialize_with = "settings_checks::duration")]
    pub remote_query_timeout: Duration,
    /// Resource types that edged may fetch from the cloud when the node holds no copy.
    pub remote_types: Vec<String>,
    /// A stored service account token that expires within this is fetched again from the
    /// cloud when edged asks for it (while the cloud is connected), as KubeEdge refreshes
    /// tokens before their TTL runs out.
    #[serde(deserialize_with = "settings_checks::duration")]
    pub token_refresh_before: Duration,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSettings {
    pub podstatus: PodStatusSync,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodStatusSync {
    #[serde(deserialize_with = "settings_checks::duration")]
    pub interval: Duration,
    /// The longest time between two full MetaSync runs (every stored status); the runs between
    /// send only what changed. `0`, or anything up to `interval`, makes every run a full one,
    /// as before this key existed.
    #[serde(deserialize_with = "settings_checks::duration")]
    pub full_interval: Duration,
}

impl Default for MetaSettings {
    fn default() -> Self {
        Self {
            sync: SyncSettings::default(),
            remote_query_timeout: Duration::from_secs(60),
            token_refresh_before: Duration::from_secs(600),
            remote_types: [
                "configmap",
                "secret",
                "serviceaccounttoken",
                "persistentvolume",
                "persistentvolumeclaim",
                "volumeattachment",
                "node",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl Default for PodStatusSync {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            full_interval: DEFAULT_FULL_SYNC_INTERVAL,
        }
    }
}

impl MetaSettings {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        duration_within(
            "meta.sync.podstatus.interval",
            self.sync.podstatus.interval,
            MIN_DURATION,
            MAX_PODSTATUS_INTERVAL,
        )?;
        duration_within(
            "meta.sync.podstatus.full_interval",
            self.sync.podstatus.full_interval,
            Duration::ZERO,
            MAX_FULL_SYNC_INTERVAL,
        )?;
        duration_within(
            "meta.remote_query_timeout",
            self.remote_query_timeout,
            MIN_DURATION,
            MAX_REMOTE_QUERY_TIMEOUT,
        )?;
        duration_within(
            "meta.token_refresh_before",
            self.token_refresh_before,
            MIN_DURATION,
            MAX_TOKEN_REFRESH_BEFORE,
        )?;
        for rtype in &self.remote_types {
            resource_type("meta.remote_types", rtype)?;
        }
        Ok(())
    }
}

/// A resource type, as the second segment of `namespace/type/name` (see [`crate::resource`]):
/// KubeEdge's types are lowercase words (`configmap`, `serviceaccounttoken`).
fn resource_type(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return invalid(key, "a type must not be empty".into());
    }
    at_most_bytes(key, value, MAX_RESOURCE_TYPE_BYTES)?;
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return invalid(
            key,
            format!("{value:?} is not a resource type: use lowercase letters and digits only, e.g. configmap"),
        );
    }
    Ok(())
}
