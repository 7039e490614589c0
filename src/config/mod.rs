//! Typed settings, read from an optional YAML file.
//!
//! Every key is optional and falls back to the built-in default, so `metamanager` with no
//! arguments runs. Unknown keys are rejected rather than ignored: a typo in a config file on a
//! remote edge node should stop start-up loudly, not silently fall back to a default.
//!
//! Each part's settings, with their defaults, bounds and `validate`, live beside the part:
//! [`crate::mqtt::settings`], [`crate::store::settings`], [`crate::http::settings`] and
//! [`crate::cloud::settings`] (`outbox`, `meta` and `cloud_link`). This module only gathers them
//! into [`Settings`] and reads the file; [`crate::settings_checks`], below every part, holds what
//! they share: the error that names the key, the range and length checks, the duration format,
//! and reading a file a key names. Adding
//! a key to a section touches its part's `settings` file (and docs/configuration.md and conf/edge.yaml),
//! nothing here; a new section adds its field to [`Settings`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bounded_read::{self, Holds};
use crate::cloud::settings::{CloudLinkSettings, MetaSettings, OutboxSettings};
use crate::http::settings::HttpSettings;
use crate::mqtt::settings::MqttSettings;
use crate::settings_checks::topic_level;
pub use crate::settings_checks::ConfigError;
use crate::store::settings::DatabaseSettings;
use crate::topics::Topics;

/// A Kubernetes node name (a DNS subdomain) can be this long, and `default/node/{node_id}` is
/// still a valid resource key (a segment holds 253 bytes, see [`crate::resource`]).
pub const MAX_NODE_ID_BYTES: usize = 253;

/// The whole file: the node's name, and each part's settings under its own key.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub node_id: String,
    pub mqtt: MqttSettings,
    pub database: DatabaseSettings,
    pub meta: MetaSettings,
    pub outbox: OutboxSettings,
    pub cloud_link: CloudLinkSettings,
    pub http: HttpSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_id: "edge-node".into(),
            mqtt: MqttSettings::default(),
            database: DatabaseSettings::default(),
            meta: MetaSettings::default(),
            outbox: OutboxSettings::default(),
            cloud_link: CloudLinkSettings::default(),
            http: HttpSettings::default(),
        }
    }
}

impl Settings {
    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let text = bounded_read::read_text(path, Holds::Config).map_err(read_error)?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates YAML text; an empty document means all defaults.
    ///
    /// The YAML is read into a generic tree first and the settings are taken from that tree,
    /// so that a wrong value is reported with its full key (`mqtt.port: ...`).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse {
            path: PathBuf::new(),
            message,
        };
        let tree: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_saphyr::from_str(text).map_err(|e| parse_error(e.to_string()))?
        };
        let settings: Settings = if tree.is_null() {
            Settings::default()
        } else {
            serde_path_to_error::deserialize(tree).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                parse_error(if path == "." {
                    inner
                } else {
                    format!("key `{path}`: {inner}")
                })
            })?
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde's types cannot express: the rules of each key, and an upper bound on
    /// every number and duration, so that no value can overflow the arithmetic done with it or
    /// ask for unbounded memory. Each part checks its own keys, in the order of the file's
    /// sections, so the first bad key is the one reported; docs/configuration.md lists the bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        topic_level("node_id", &self.node_id, MAX_NODE_ID_BYTES)?;
        self.mqtt.validate()?;
        self.database.validate()?;
        self.meta.validate()?;
        self.outbox.validate()?;
        let topics = Topics::new(&self.mqtt.topic_prefix, &self.node_id);
        self.cloud_link.validate(&topics.all())?;
        self.http.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mqtt::settings::BrokerMode;

    #[test]
    fn empty_file_is_all_defaults() {
        let s = Settings::from_yaml("").unwrap();
        assert_eq!(s.node_id, "edge-node");
        assert_eq!(s.mqtt.port, 1884);
        assert_eq!(s.mqtt.mode, BrokerMode::Embedded);
        assert_eq!(s.meta.sync.podstatus.interval, Duration::from_secs(60));
        assert!(s.http.enabled);
        assert_eq!(s.http.listen, "127.0.0.1:10550");
    }

    #[test]
    fn durations_take_seconds_or_strings() {
        let s = Settings::from_yaml(
            "meta:\n  sync:\n    podstatus:\n      interval: 90\n  remote_query_timeout: 1m30s\n",
        )
        .unwrap();
        assert_eq!(s.meta.sync.podstatus.interval, Duration::from_secs(90));
        assert_eq!(s.meta.remote_query_timeout, Duration::from_secs(90));
        let s = Settings::from_yaml("meta:\n  sync:\n    podstatus:\n      interval: \"2s\"\n")
            .unwrap();
        assert_eq!(s.meta.sync.podstatus.interval, Duration::from_secs(2));
    }

    fn error_of(yaml: &str) -> String {
        Settings::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_name_their_key() {
        let huge_node_id = format!("node_id: {}\n", "n".repeat(70 * 1024));
        let long_node_id = format!("node_id: {}\n", "n".repeat(MAX_NODE_ID_BYTES + 1));
        let long_prefix = format!("mqtt:\n  topic_prefix: {}\n", "e".repeat(65));
        let long_type = format!("meta:\n  remote_types: [{}]\n", "t".repeat(64));
        let long_user = format!("mqtt:\n  username: {}\n", "u".repeat(65_536));
        let long_state_topic = format!("cloud_link:\n  state_topic: {}\n", "s".repeat(1025));
        let long_payload = format!("cloud_link:\n  connected_payload: {}\n", "p".repeat(257));
        let table: &[(&str, &str)] = &[
            // Types serde checks.
            ("mqtt:\n  mode: sideways\n", "mqtt.mode"),
            ("mqtt:\n  port: 70000\n", "mqtt.port"),
            (
                "meta:\n  sync:\n    podstatus:\n      interval: -5\n",
                "meta.sync.podstatus.interval",
            ),
            (
                "meta:\n  remote_query_timeout: soon\n",
                "remote_query_timeout",
            ),
            (
                "http:\n  auth: {policy_file: /etc/policy.jsonl}\n",
                "http.auth.token_file",
            ),
            ("nodeid: x\n", "nodeid"),
            ("mqtt:\n  hots: x\n", "hots"),
            ("http:\n  listne: x\n", "listne"),
            (
                "mqtt:\n  max_payload_bytes: 18446744073709551616\n",
                "mqtt.max_payload_bytes",
            ),
            // Topic levels.
            ("node_id: a/b\n", "node_id"),
            ("node_id: \"\"\n", "node_id"),
            ("node_id: a+b\n", "node_id"),
            ("node_id: a#\n", "node_id"),
            ("node_id: \"a\\0b\"\n", "node_id"),
            ("node_id: \"$SYS\"\n", "node_id"),
            ("node_id: a b\n", "node_id"),
            (&huge_node_id, "node_id"),
            (&long_node_id, "node_id"),
            ("mqtt:\n  topic_prefix: \"\"\n", "mqtt.topic_prefix"),
            ("mqtt:\n  topic_prefix: \"$share\"\n", "mqtt.topic_prefix"),
            ("mqtt:\n  topic_prefix: e/dge\n", "mqtt.topic_prefix"),
            (&long_prefix, "mqtt.topic_prefix"),
            // Addresses and names.
            ("mqtt:\n  mode: external\n  port: 0\n", "mqtt.port"),
            ("mqtt:\n  host: \" \"\n", "mqtt.host"),
            ("http:\n  listen: localhost\n", "http.listen"),
            (
                "meta:\n  token_refresh_before: 0\n",
                "meta.token_refresh_before",
            ),
            ("database:\n  path: \"file:data/m.db\"\n", "database.path"),
            ("database:\n  path: \":memory:\"\n", "database.path"),
            ("http:\n  max_connections: 0\n", "http.max_connections"),
            (
                "http:\n  max_requests: 9223372036854775807\n",
                "http.max_requests",
            ),
            ("http:\n  max_watches: 0\n", "http.max_watches"),
            ("http:\n  header_timeout: 0\n", "http.header_timeout"),
            ("http:\n  idle_timeout: 2h\n", "http.idle_timeout"),
            (
                "http:\n  allowed_hosts: ['edge.local:10550']\n",
                "http.allowed_hosts",
            ),
            (&long_user, "mqtt.username"),
            // Numbers: a floor and a ceiling each, so that nothing can overflow.
            (
                "mqtt:\n  max_payload_bytes: 1023\n",
                "mqtt.max_payload_bytes",
            ),
            (
                "mqtt:\n  max_payload_bytes: 9223372036854775808\n",
                "mqtt.max_payload_bytes",
            ),
            (
                "mqtt:\n  max_payload_bytes: 134217729\n",
                "mqtt.max_payload_bytes",
            ),
            (
                "mqtt:\n  max_inflight_messages: 0\n",
                "mqtt.max_inflight_messages",
            ),
            (
                "mqtt:\n  max_inflight_messages: 65536\n",
                "mqtt.max_inflight_messages",
            ),
            (
                "mqtt:\n  max_inflight_bytes: 1023\n",
                "mqtt.max_inflight_bytes",
            ),
            (
                "mqtt:\n  max_inflight_bytes: 1073741825\n",
                "mqtt.max_inflight_bytes",
            ),
            ("outbox:\n  max_messages: 0\n", "outbox.max_messages"),
            ("outbox:\n  max_messages: 1000001\n", "outbox.max_messages"),
            (
                "outbox:\n  max_messages: 18446744073709551615\n",
                "outbox.max_messages",
            ),
            ("outbox:\n  drain_rate: 0\n", "outbox.drain_rate"),
            ("outbox:\n  drain_rate: 10001\n", "outbox.drain_rate"),
            ("outbox:\n  drain_rate: 4294967296\n", "outbox.drain_rate"),
            // Durations: none takes 0 or less than a second, each has a ceiling.
            ("outbox:\n  max_age: 0\n", "outbox.max_age"),
            ("outbox:\n  max_age: 500ms\n", "outbox.max_age"),
            ("outbox:\n  max_age: 366d\n", "outbox.max_age"),
            (
                "outbox:\n  max_age: 18446744073709551615\n",
                "outbox.max_age",
            ),
            (
                "meta:\n  remote_query_timeout: 0\n",
                "meta.remote_query_timeout",
            ),
            (
                "meta:\n  remote_query_timeout: 61m\n",
                "meta.remote_query_timeout",
            ),
            (
                "meta:\n  sync:\n    podstatus:\n      interval: 0\n",
                "meta.sync.podstatus.interval",
            ),
            (
                "meta:\n  sync:\n    podstatus:\n      interval: 25h\n",
                "meta.sync.podstatus.interval",
            ),
            ("mqtt:\n  watchdog_interval: 0\n", "mqtt.watchdog_interval"),
            (
                "mqtt:\n  watchdog_interval: 2h\n  watchdog_timeout: 3h\n",
                "mqtt.watchdog_interval",
            ),
            (
                "mqtt:\n  watchdog_interval: 10s\n  watchdog_timeout: 5s\n",
                "mqtt.watchdog_timeout",
            ),
            ("mqtt:\n  watchdog_timeout: 25h\n", "mqtt.watchdog_timeout"),
            // Resource types.
            ("meta:\n  remote_types: ['', 'a/b']\n", "meta.remote_types"),
            ("meta:\n  remote_types: ['a/b']\n", "meta.remote_types"),
            ("meta:\n  remote_types: [ConfigMap]\n", "meta.remote_types"),
            ("meta:\n  remote_types: [config-map]\n", "meta.remote_types"),
            (&long_type, "meta.remote_types"),
            // The bridge's state topic and payloads.
            ("cloud_link:\n  state_topic: ''\n", "cloud_link.state_topic"),
            ("cloud_link:\n  state_topic: a/+/state\n", "cloud_link.state_topic"),
            ("cloud_link:\n  state_topic: a/#\n", "cloud_link.state_topic"),
            (&long_state_topic, "cloud_link.state_topic"),
            (
                "cloud_link:\n  state_topic: edge/edge-node/edgehub/to/metamanager\n",
                "cloud_link.state_topic",
            ),
            (
                "mqtt:\n  topic_prefix: p\nnode_id: nodea\ncloud_link:\n  state_topic: p/nodea/metamanager/status\n",
                "cloud_link.state_topic",
            ),
            ("cloud_link:\n  connected_payload: ' '\n", "cloud_link.connected_payload"),
            ("cloud_link:\n  disconnected_payload: 1\n", "cloud_link.disconnected_payload"),
            (&long_payload, "cloud_link.connected_payload"),
            ("cloud_link:\n  state: x\n", "cloud_link"),
        ];
        for (yaml, key) in table {
            let e = error_of(yaml);
            assert!(
                e.contains(key),
                "{:.80}: the error should name {key}: {e:.300}",
                yaml
            );
            assert!(
                e.len() < 1000,
                "{:.80}: the error must not echo a huge value: {} bytes",
                yaml,
                e.len()
            );
        }
    }

    #[test]
    fn values_at_the_bounds_are_accepted() {
        let ok = [
            "mqtt:\n  port: 0\n",
            "mqtt:\n  max_payload_bytes: 1024\n",
            "mqtt:\n  max_payload_bytes: 134217728\n",
            "mqtt:\n  max_inflight_messages: 1\n",
            "mqtt:\n  max_inflight_messages: 65535\n",
            "mqtt:\n  max_inflight_bytes: 1073741824\n",
            "mqtt:\n  watchdog_interval: 1s\n  watchdog_timeout: 1s\n",
            "mqtt:\n  watchdog_interval: 1h\n  watchdog_timeout: 24h\n",
            "outbox:\n  max_messages: 1000000\n  max_age: 1s\n  drain_rate: 10000\n",
            "outbox:\n  max_age: 365d\n",
            "meta:\n  remote_query_timeout: 1h\n  remote_types: []\n",
            "meta:\n  sync:\n    podstatus:\n      interval: 24h\n",
            "meta:\n  remote_types: [configmap, v1beta2thing]\n",
            "node_id: \"a$b\"\n",
            "http:\n  max_connections: 1\n  max_requests: 4096\n  max_watches: 1\n",
            "http:\n  header_timeout: 1s\n  idle_timeout: 1h\n  allowed_hosts: [edge-node.local]\n",
            "cloud_link:\n  state_topic: $SYS/broker/connection/bridge-edge-node/state\n",
            "cloud_link:\n  state_topic: edge/edge-node/link\n  connected_payload: online\n  disconnected_payload: offline\n",
        ];
        for yaml in ok {
            if let Err(e) = Settings::from_yaml(yaml) {
                panic!("{yaml}: {e}");
            }
        }
        let longest = format!("node_id: {}\n", "n".repeat(MAX_NODE_ID_BYTES));
        assert!(Settings::from_yaml(&longest).is_ok());
        let longest = format!("cloud_link:\n  state_topic: {}\n", "s".repeat(1024));
        assert!(Settings::from_yaml(&longest).is_ok());
    }

    #[test]
    fn the_bridge_state_is_off_unless_a_topic_is_named() {
        let s = Settings::from_yaml("").unwrap();
        assert_eq!(s.cloud_link.bridge_words(), None);
        let s = Settings::from_yaml("cloud_link:\n  state_topic: x/state\n").unwrap();
        let words = s.cloud_link.bridge_words().unwrap();
        assert_eq!(
            (words.connected.as_str(), words.disconnected.as_str()),
            ("1", "0")
        );
    }

    #[test]
    fn the_shipped_example_is_within_every_bound() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/edge.yaml");
        if let Err(e) = Settings::from_file(&example) {
            panic!("{e}");
        }
    }

    #[test]
    fn a_password_file_is_read_with_a_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let settings = |path: &Path| MqttSettings {
            username: Some("mm".into()),
            password_file: Some(path.to_owned()),
            ..MqttSettings::default()
        };
        assert_eq!(
            settings(&path).resolved_password().unwrap().as_deref(),
            Some("s3cret")
        );
        let e = settings(Path::new("/dev/zero"))
            .resolved_password()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mqtt.password_file") && e.contains("larger than"),
            "{e}"
        );
        std::fs::write(&path, "p".repeat(65_536)).unwrap();
        let e = settings(&path).resolved_password().unwrap_err().to_string();
        assert!(
            e.contains("mqtt.password_file") && e.contains("at most 65535"),
            "{e}"
        );
    }

    #[test]
    fn an_oversized_config_file_is_refused_unread() {
        let e = Settings::from_file(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/zero") && e.contains("larger than"), "{e}");
    }
}
