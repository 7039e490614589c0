//! Whether the cloud is reachable, from the two sources that can say so: edgehub's `connect`,
//! and the retained state topic of a bridge (`cloud_link.state_topic`), when one is named.
//!
//! It starts disconnected: until a source says otherwise, messages for the cloud wait in the
//! outbox and remote queries fail fast instead of waiting for an answer that cannot come.
//!
//! With a state topic, the cloud counts as connected only while the bridge says its link is up
//! and edgehub, if it speaks at all, has not said the cloud is away. A bridge knows whether the
//! path to the central broker is up; a client on the other side that sends `connect` knows
//! whether anything is listening there. Either one's "away" is reason enough to hold messages
//! back, and neither's "up" can vouch for the other. Edgehub's word starts as no objection, so a
//! node with a bridge and no edgehub is connected by the bridge alone.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::shutdown::Shutdown;

/// How long a configured state topic may stay silent after start-up before MetaManager says
/// so: a bridge's retained state arrives as soon as MetaManager subscribes, so silence this long
/// means a bridge without notifications, a wrong topic, or an account that may not read it
/// (mosquitto then accepts the subscription and delivers nothing).
pub const BRIDGE_SILENCE: Duration = Duration::from_secs(30);

/// Who said the cloud is reachable or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// edgehub's `connect` operation.
    Edgehub,
    /// The bridge's state topic (`cloud_link.state_topic`).
    Bridge,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Edgehub => "edgehub",
            Source::Bridge => "bridge",
        }
    }
}

/// The bridge's state topic (`cloud_link.state_topic`) and its payloads
/// (`cloud_link.connected_payload` and `disconnected_payload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeWords {
    pub topic: String,
    pub connected: String,
    pub disconnected: String,
}

impl BridgeWords {
    /// What a payload on the state topic says: `Some(true)` for up, `Some(false)` for down,
    /// `None` for anything else. Surrounding white space is ignored, so that a state written by
    /// hand (`echo 1 | mosquitto_pub -l ...`) reads as mosquitto's own. An empty payload is a
    /// retained state being cleared: the link's state is then unknown, which is down.
    pub fn read(&self, payload: &[u8]) -> Option<bool> {
        let word = payload.trim_ascii();
        if word.is_empty() || word == self.disconnected.as_bytes() {
            Some(false)
        } else if word == self.connected.as_bytes() {
            Some(true)
        } else {
            None
        }
    }
}

/// What each source last said.
#[derive(Debug)]
struct Words {
    edgehub: bool,
    /// `None` when no state topic is configured: edgehub's word alone counts.
    bridge: Option<bool>,
    /// Whether anything readable has arrived on the state topic since start-up.
    bridge_heard: bool,
}

impl Words {
    fn connected(&self) -> bool {
        self.edgehub && self.bridge.unwrap_or(true)
    }
}

/// The cloud connection state; cheap to clone, every clone sees the same state.
#[derive(Clone)]
pub struct CloudState {
    combined: Arc<watch::Sender<bool>>,
    words: Arc<Mutex<Words>>,
    bridge: Option<Arc<BridgeWords>>,
}

impl Default for CloudState {
    fn default() -> Self {
        Self::new(None)
    }
}

impl CloudState {
    /// Disconnected; with `bridge`, the bridge's state topic is a source beside edgehub.
    pub fn new(bridge: Option<BridgeWords>) -> Self {
        let words = Words {
            edgehub: bridge.is_some(),
            bridge: bridge.as_ref().map(|_| false),
            bridge_heard: false,
        };
        Self {
            combined: Arc::new(watch::channel(false).0),
            words: Arc::new(Mutex::new(words)),
            bridge: bridge.map(Arc::new),
        }
    }

    pub fn connected(&self) -> bool {
        *self.combined.borrow()
    }

    /// The bridge's payloads, when a state topic is configured.
    pub fn bridge_words(&self) -> Option<&BridgeWords> {
        self.bridge.as_deref()
    }

    /// Records what `source` said; `true` when the cloud's state changed with it. A word from
    /// the bridge when no state topic is configured changes nothing.
    pub fn report(&self, source: Source, connected: bool) -> bool {
        // The lock only orders the words; nothing is left half-written if a holder panicked.
        let mut words = self.words.lock().unwrap_or_else(PoisonError::into_inner);
        match source {
            Source::Edgehub => words.edgehub = connected,
            Source::Bridge => match &mut words.bridge {
                Some(bridge) => {
                    *bridge = connected;
                    words.bridge_heard = true;
                }
                None => return false,
            },
        }
        let now = words.connected();
        // Sent under the lock, so two sources reporting at once publish in the order they
        // changed the words.
        self.combined.send_replace(now) != now
    }

    /// Its changes, for tasks that act on them (the outbox drain, the status topic).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.combined.subscribe()
    }

    fn bridge_heard(&self) -> bool {
        let words = self.words.lock().unwrap_or_else(PoisonError::into_inner);
        words.bridge_heard
    }

    /// With a state topic configured, logs a warning once if nothing readable has arrived on it
    /// [`BRIDGE_SILENCE`] after start-up: the cloud then stays disconnected, and without this
    /// line nothing would say why.
    pub async fn warn_if_bridge_silent(self, mut stop: Shutdown) {
        let Some(words) = self.bridge.clone() else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(BRIDGE_SILENCE) => {}
            _ = stop.wait() => return,
        }
        if !self.bridge_heard() {
            tracing::warn!(
                topic = %words.topic,
                "nothing has arrived on cloud_link.state_topic since start-up, so the cloud counts as disconnected: does the bridge publish its state there (mosquitto: notifications true), and may MetaManager's account read it?"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mosquitto_words() -> BridgeWords {
        BridgeWords {
            topic: "$SYS/broker/connection/bridge-n/state".into(),
            connected: "1".into(),
            disconnected: "0".into(),
        }
    }

    #[test]
    fn without_a_bridge_edgehub_alone_decides() {
        let state = CloudState::default();
        assert!(!state.connected());
        assert!(state.report(Source::Edgehub, true));
        assert!(state.connected());
        assert!(!state.report(Source::Bridge, false), "no bridge configured");
        assert!(state.connected());
        assert!(state.report(Source::Edgehub, false));
        assert!(!state.connected());
    }

    #[test]
    fn with_a_bridge_both_must_agree_and_edgehub_starts_without_objection() {
        let state = CloudState::new(Some(mosquitto_words()));
        assert!(!state.connected(), "the bridge has not spoken yet");
        assert!(!state.bridge_heard());
        assert!(state.report(Source::Bridge, true));
        assert!(state.bridge_heard());
        assert!(state.connected(), "no edgehub needed");
        assert!(state.report(Source::Edgehub, false));
        assert!(!state.connected(), "edgehub says the cloud is away");
        assert!(!state.report(Source::Bridge, false), "still disconnected");
        assert!(!state.report(Source::Bridge, true), "edgehub still objects");
        assert!(state.report(Source::Edgehub, true));
        assert!(state.connected());
        assert!(!state.report(Source::Edgehub, true), "no change");
    }

    #[test]
    fn bridge_payloads_are_read_exactly_apart_from_white_space() {
        let words = mosquitto_words();
        assert_eq!(words.read(b"1"), Some(true));
        assert_eq!(words.read(b"1\n"), Some(true));
        assert_eq!(words.read(b"0"), Some(false));
        assert_eq!(words.read(b""), Some(false), "a cleared retained state");
        assert_eq!(words.read(b"10"), None);
        assert_eq!(words.read(b"up"), None);
    }
}
