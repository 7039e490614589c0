//! The rules some resource types follow on top of their operation (topics.md, section 5.9),
//! named here so that each operation states which it applies:
//! - `event`: passed on, never stored (events would pile up on the node for ever); one waiting
//!   for the cloud is replaced by a newer one of the same key.
//! - `lease`: from edged while the cloud is away, refused at once. A renewal that waits in the
//!   outbox and reaches the cloud late is worse than one that fails now, when edged can act.
//! - `serviceaccounttoken`: a stored token that has expired, or soon will, is fetched again
//!   from the cloud when edged asks for it (see [`token_state`]).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::cloud::settings::MetaSettings;
use crate::cloud::CloudState;
use crate::mqtt::settings::MqttSettings;
use crate::topics::Peer;

/// What the node's settings say the operations and the API's writes follow, beside the rules
/// by type above.
#[derive(Debug, Clone)]
pub struct Rules {
    /// This node's name: the node whose status, and whose pods' status, the edge owns.
    pub node_id: String,
    /// Types asked of the cloud when edged queries one that is not stored
    /// (`meta.remote_types`).
    pub remote_types: HashSet<String>,
    /// `meta.token_refresh_before`: see [`token_state`].
    pub token_refresh_before: Duration,
    /// The largest payload MetaManager accepts (`mqtt.max_payload_bytes`).
    pub max_payload: usize,
}

impl Rules {
    /// From the sections that set them, not the whole file: `crate::config` gathers every
    /// part's settings, the HTTP endpoint's among them, and the endpoint uses the operations.
    pub fn new(node_id: &str, meta: &MetaSettings, mqtt: &MqttSettings) -> Self {
        Self {
            node_id: node_id.to_owned(),
            remote_types: meta.remote_types.iter().cloned().collect(),
            token_refresh_before: meta.token_refresh_before,
            max_payload: mqtt.max_payload_bytes,
        }
    }
}

pub(super) use crate::resource::rtype::{EVENT, LEASE, SERVICE_ACCOUNT_TOKEN as TOKEN};

/// Whether a change of type `rtype` from `sender` is a lease from edged while the cloud is
/// away, which is refused (see the module doc).
pub(super) fn lease_while_away(cloud: &CloudState, sender: Peer, rtype: &str) -> bool {
    rtype == LEASE && sender == Peer::Edged && !cloud.connected()
}

/// The `error` text for such a lease: `op` of `key`.
pub(super) fn lease_refusal(op: &str, key: &str) -> String {
    format!(
        "{op} of lease {key} refused: the cloud is not connected, and a lease renewed late is worse than one that fails now"
    )
}

/// How a stored service account token stands against the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenState {
    /// Not expiring within the refresh margin, or with no expiry it can read: served as stored.
    Fresh,
    /// Expiring within the margin: asked of the cloud again, and served as stored if the
    /// cloud cannot answer.
    RefreshDue,
    /// Past its expiry: asked of the cloud again, and an error if the cloud cannot answer.
    Expired,
}

/// Where the token stored as `json` stands at `now`, by its `status.expirationTimestamp`
/// (RFC 3339, as the TokenRequest API writes it) and `refresh_before`.
pub(super) fn token_state(json: &str, now: SystemTime, refresh_before: Duration) -> TokenState {
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(rename = "expirationTimestamp")]
        expiration: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Token {
        status: Option<Status>,
    }
    let expires = serde_json::from_str::<Token>(json)
        .ok()
        .and_then(|t| t.status?.expiration)
        .and_then(|text| humantime::parse_rfc3339_weak(&text).ok());
    match expires {
        None => TokenState::Fresh,
        Some(at) if at <= now => TokenState::Expired,
        Some(at) if at <= now + refresh_before => TokenState::RefreshDue,
        Some(_) => TokenState::Fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires: &str) -> String {
        format!(
            r#"{{"kind":"TokenRequest","status":{{"token":"t","expirationTimestamp":"{expires}"}}}}"#
        )
    }

    #[test]
    fn a_token_is_fresh_until_the_refresh_margin_then_due_then_expired() {
        let now = humantime::parse_rfc3339("2026-11-28T12:00:00Z").unwrap();
        let margin = Duration::from_secs(600);
        let state = |expires: &str| token_state(&token(expires), now, margin);
        assert_eq!(state("2026-11-28T13:00:00Z"), TokenState::Fresh);
        assert_eq!(state("2026-11-28T12:10:01Z"), TokenState::Fresh);
        assert_eq!(state("2026-11-28T12:10:00Z"), TokenState::RefreshDue);
        assert_eq!(state("2026-11-28T12:00:01Z"), TokenState::RefreshDue);
        assert_eq!(state("2026-11-28T12:00:00Z"), TokenState::Expired);
        assert_eq!(state("2026-11-28T11:00:00Z"), TokenState::Expired);
        // No expiry MetaManager can read: served as stored, as before this rule.
        assert_eq!(token_state("{}", now, margin), TokenState::Fresh);
        assert_eq!(state("tomorrow"), TokenState::Fresh);
    }
}
