//! The node's MQTT topics. Every topic starts with `{topic_prefix}/{node_id}`, so several nodes
//! can share one broker without seeing each other's traffic.

/// The two agents MetaManager talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The link to the cloud.
    Edgehub,
    /// The node agent that runs pods.
    Edged,
}

impl Peer {
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Edgehub => "edgehub",
            Peer::Edged => "edged",
        }
    }

    /// The side a change is forwarded to.
    pub fn other(self) -> Peer {
        match self {
            Peer::Edgehub => Peer::Edged,
            Peer::Edged => Peer::Edgehub,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Topics {
    pub from_edgehub: String,
    pub from_edged: String,
    pub to_edgehub: String,
    pub to_edged: String,
    pub status: String,
    /// The bridge's state topic (`cloud_link.state_topic`), subscribed to beside the inbound
    /// topics when named.
    pub bridge_state: Option<String>,
}

impl Topics {
    pub fn new(prefix: &str, node_id: &str) -> Self {
        let p = format!("{prefix}/{node_id}");
        Self {
            from_edgehub: format!("{p}/edgehub/to/metamanager"),
            from_edged: format!("{p}/edged/to/metamanager"),
            to_edgehub: format!("{p}/metamanager/to/edgehub"),
            to_edged: format!("{p}/metamanager/to/edged"),
            status: format!("{p}/metamanager/status"),
            bridge_state: None,
        }
    }

    /// The same topics, with the bridge's state topic to subscribe to as well.
    pub fn with_bridge_state(mut self, topic: Option<String>) -> Self {
        self.bridge_state = topic;
        self
    }

    /// Whether `topic` is the bridge's state topic.
    pub fn is_bridge_state(&self, topic: &str) -> bool {
        self.bridge_state.as_deref() == Some(topic)
    }

    /// Which peer sent a message, from the topic it arrived on.
    pub fn sender(&self, topic: &str) -> Option<Peer> {
        if topic == self.from_edgehub {
            Some(Peer::Edgehub)
        } else if topic == self.from_edged {
            Some(Peer::Edged)
        } else {
            None
        }
    }

    /// The topic that reaches `peer`.
    pub fn to(&self, peer: Peer) -> &str {
        match peer {
            Peer::Edgehub => &self.to_edgehub,
            Peer::Edged => &self.to_edged,
        }
    }

    pub fn inbound(&self) -> [&str; 2] {
        [&self.from_edgehub, &self.from_edged]
    }

    /// What MetaManager subscribes to: the inbound topics and the bridge's state topic.
    pub fn subscriptions(&self) -> Vec<&str> {
        let mut topics = self.inbound().to_vec();
        topics.extend(self.bridge_state.as_deref());
        topics
    }

    /// The node's own five topics.
    pub fn all(&self) -> [&str; 5] {
        [
            &self.from_edgehub,
            &self.from_edged,
            &self.to_edgehub,
            &self.to_edged,
            &self.status,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_do_not_overlap() {
        let a = Topics::new("edge", "node-a");
        let b = Topics::new("edge", "node-ab");
        assert_eq!(a.sender(&a.from_edged), Some(Peer::Edged));
        assert_eq!(b.sender(&a.from_edged), None);
        assert_eq!(a.to(Peer::Edgehub), "edge/node-a/metamanager/to/edgehub");
    }

    #[test]
    fn the_bridge_state_topic_is_subscribed_to_only_when_named() {
        let plain = Topics::new("edge", "n");
        assert_eq!(plain.subscriptions().len(), 2);
        let state = "$SYS/broker/connection/bridge-n/state";
        let bridged = Topics::new("edge", "n").with_bridge_state(Some(state.into()));
        assert_eq!(bridged.subscriptions().last(), Some(&state));
        assert!(bridged.is_bridge_state(state));
        assert!(!plain.is_bridge_state(state));
        assert_eq!(bridged.sender(state), None, "not a peer's topic");
    }
}
