//! Typed settings, read from an optional YAML file.
//!
//! Every key is optional and falls back to the built-in default, so `metamanager` with no
//! arguments runs. Unknown keys are rejected rather than ignored: a typo in a config file on a
//! remote edge node should stop start-up loudly, not silently fall back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why the configuration could not be used. Each variant names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("config key `{key}`: cannot read {path}: {source}")]
    ReadFile {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether MetaManager starts its own broker or joins one that already runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    Embedded,
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub node_id: String,
    pub mqtt: MqttSettings,
    pub database: DatabaseSettings,
    pub meta: MetaSettings,
    pub outbox: OutboxSettings,
    pub http: HttpSettings,
}

/// The local HTTP endpoint: probes, metrics and the read-only Kubernetes-style API.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub enabled: bool,
    /// `host:port` to listen on. Loopback by default: the API serves secrets, unauthenticated.
    pub listen: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:10550".into(),
        }
    }
}

impl HttpSettings {
    /// The listen address; `validate` has already checked that it parses.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.listen
            .trim()
            .parse()
            .map_err(|e| ConfigError::Invalid {
                key: "http.listen",
                message: format!(
                    "{:?} is not a socket address ({e}); use host:port, e.g. 127.0.0.1:10550",
                    self.listen
                ),
            })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    pub mode: BrokerMode,
    pub host: String,
    pub port: u16,
    pub topic_prefix: String,
    /// Largest inbound payload accepted, in bytes. Bigger messages get an `error` reply.
    pub max_payload_bytes: usize,
    /// Credentials. External: sent to the broker. Embedded: the broker requires them.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this file (trailing newline ignored), so it stays out of the
    /// config file.
    pub password_file: Option<PathBuf>,
    /// TLS to an external broker.
    pub tls: Option<TlsSettings>,
    /// Account of the sending connection (`metamanager-{node_id}-out`), when the broker gives
    /// it one of its own (as with mosquitto's `use_username_as_clientid`); it uses the same
    /// password. Defaults to `username`.
    pub publish_username: Option<String>,
    /// Messages received and not yet finished, at most; beyond it MetaManager stops reading
    /// and the broker holds the rest.
    pub max_inflight_messages: usize,
    /// Payload bytes received and not yet finished, at most (same effect).
    pub max_inflight_bytes: usize,
    /// How often the embedded broker is checked with a fresh connection.
    #[serde(deserialize_with = "duration")]
    pub watchdog_interval: Duration,
    /// How long the embedded broker may fail that check before MetaManager exits (status 3)
    /// so that its service manager restarts it.
    #[serde(deserialize_with = "duration")]
    pub watchdog_timeout: Duration,
}

impl MqttSettings {
    /// The inbound budget.
    pub fn inflight(&self) -> crate::budget::Limits {
        crate::budget::Limits {
            messages: self.max_inflight_messages,
            bytes: self.max_inflight_bytes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate chain and key, for brokers that require client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Bounds and pacing of the durable outbox that holds messages for the cloud while it is
/// disconnected.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    /// Most messages kept; beyond it the oldest are dropped (and counted).
    pub max_messages: usize,
    /// Messages older than this are dropped instead of sent.
    #[serde(deserialize_with = "duration")]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    /// SQLite's durability level for each commit.
    pub synchronous: Synchronous,
}

/// How hard each commit insists on reaching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Synchronous {
    /// fsync on every commit: a committed change survives a power cut. With group commit, one
    /// fsync covers a whole batch, so the cost under load is small.
    Full,
    /// fsync only at WAL checkpoints: a committed change survives a crash of MetaManager, but
    /// the last commits before a power cut may be lost.
    Normal,
}

impl Synchronous {
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaSettings {
    pub sync: SyncSettings,
    #[serde(deserialize_with = "duration")]
    pub remote_query_timeout: Duration,
    /// Resource types that edged may fetch from the cloud when the node holds no copy.
    pub remote_types: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSettings {
    pub podstatus: PodStatusSync,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodStatusSync {
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_id: "edge-node".into(),
            mqtt: MqttSettings::default(),
            database: DatabaseSettings::default(),
            meta: MetaSettings::default(),
            outbox: OutboxSettings::default(),
            http: HttpSettings::default(),
        }
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            mode: BrokerMode::Embedded,
            host: "127.0.0.1".into(),
            port: 1884,
            topic_prefix: "edge".into(),
            max_payload_bytes: 1024 * 1024,
            username: None,
            password: None,
            password_file: None,
            tls: None,
            publish_username: None,
            max_inflight_messages: crate::budget::Limits::default().messages,
            max_inflight_bytes: crate::budget::Limits::default().bytes,
            watchdog_interval: Duration::from_secs(5),
            watchdog_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data/metamanager.db"),
            synchronous: Synchronous::Full,
        }
    }
}

impl Default for MetaSettings {
    fn default() -> Self {
        Self {
            sync: SyncSettings::default(),
            remote_query_timeout: Duration::from_secs(60),
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
        }
    }
}

impl Settings {
    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
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

    /// Checks what serde's types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        topic_level("node_id", &self.node_id)?;
        topic_level("mqtt.topic_prefix", &self.mqtt.topic_prefix)?;
        // 0 lets the embedded broker take any free port (logged at start); an external broker
        // is never on port 0.
        if self.mqtt.port == 0 && self.mqtt.mode == BrokerMode::External {
            return invalid(
                "mqtt.port",
                "must be between 1 and 65535 for an external broker".into(),
            );
        }
        if self.mqtt.host.trim().is_empty() {
            return invalid("mqtt.host", "must not be empty".into());
        }
        if self.mqtt.max_payload_bytes < 1024 {
            return invalid("mqtt.max_payload_bytes", "must be at least 1024".into());
        }
        if self.mqtt.max_inflight_messages == 0 {
            return invalid("mqtt.max_inflight_messages", "must be at least 1".into());
        }
        if self.mqtt.max_inflight_bytes < 1024 {
            return invalid("mqtt.max_inflight_bytes", "must be at least 1024".into());
        }
        if self.mqtt.watchdog_interval.is_zero() {
            return invalid("mqtt.watchdog_interval", "must be positive".into());
        }
        if self.mqtt.watchdog_timeout < self.mqtt.watchdog_interval {
            return invalid(
                "mqtt.watchdog_timeout",
                "must be at least mqtt.watchdog_interval".into(),
            );
        }
        if self.database.path.as_os_str().is_empty() {
            return invalid("database.path", "must not be empty".into());
        }
        if self.meta.sync.podstatus.interval.is_zero() {
            return invalid("meta.sync.podstatus.interval", "must be positive".into());
        }
        if self.meta.remote_query_timeout.is_zero() {
            return invalid("meta.remote_query_timeout", "must be positive".into());
        }
        if self.mqtt.password.is_some() && self.mqtt.password_file.is_some() {
            return invalid(
                "mqtt.password_file",
                "set either mqtt.password or mqtt.password_file, not both".into(),
            );
        }
        if (self.mqtt.password.is_some() || self.mqtt.password_file.is_some())
            && self.mqtt.username.is_none()
        {
            return invalid("mqtt.username", "a password needs a username".into());
        }
        if let Some(tls) = &self.mqtt.tls {
            if self.mqtt.mode == BrokerMode::Embedded {
                return invalid(
                    "mqtt.tls",
                    "TLS is for an external broker; the embedded one listens in plain MQTT".into(),
                );
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return invalid(
                    "mqtt.tls.key_file",
                    "a client certificate needs both cert_file and key_file".into(),
                );
            }
        }
        if self.outbox.max_messages == 0 {
            return invalid("outbox.max_messages", "must be at least 1".into());
        }
        if self.outbox.drain_rate == 0 {
            return invalid("outbox.drain_rate", "must be at least 1".into());
        }
        self.http.listen_addr()?;
        Ok(())
    }
}

impl MqttSettings {
    /// The password, read from `password_file` when that is set.
    pub fn resolved_password(&self) -> Result<Option<String>, ConfigError> {
        match &self.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|p| Some(p.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|source| ConfigError::ReadFile {
                    key: "mqtt.password_file",
                    path: path.clone(),
                    source,
                }),
            None => Ok(self.password.clone()),
        }
    }
}

fn invalid(key: &'static str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key, message })
}

/// Node id and prefix each become one topic level, so they may not contain MQTT's separators
/// or wildcards; otherwise two nodes' topics could overlap.
fn topic_level(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return invalid(key, "must not be empty".into());
    }
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace())
    {
        return invalid(
            key,
            format!("{value:?} contains {c:?}; a topic level may not contain '/', '+', '#', spaces or control characters"),
        );
    }
    Ok(())
}

/// Accepts whole seconds (`60`, KubeEdge's form) or a duration string (`"90s"`, `"1m30s"`).
fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;
    impl serde::de::Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("whole seconds or a duration string such as \"90s\" or \"1m30s\"")
        }
        fn visit_u64<E: serde::de::Error>(self, secs: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(secs))
        }
        fn visit_i64<E: serde::de::Error>(self, secs: i64) -> Result<Duration, E> {
            u64::try_from(secs)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("{secs} is negative; a duration must not be")))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            parse_duration(text).map_err(E::custom)
        }
    }
    de.deserialize_any(DurationVisitor)
}

/// Parses a duration string; a bare number is taken as seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!(
            "{text:?} is not a duration ({e}); use whole seconds or a form like \"90s\", \"1m30s\""
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(error_of("mqtt:\n  mode: sideways\n").contains("mode"));
        assert!(error_of("mqtt:\n  port: 70000\n").contains("mqtt.port"));
        assert!(error_of("mqtt:\n  mode: sideways\n").contains("mqtt.mode"));
        assert!(
            error_of("meta:\n  sync:\n    podstatus:\n      interval: -5\n")
                .contains("meta.sync.podstatus.interval")
        );
        assert!(error_of("mqtt:\n  mode: external\n  port: 0\n").contains("mqtt.port"));
        assert!(
            Settings::from_yaml("mqtt:\n  port: 0\n").is_ok(),
            "embedded: any free port"
        );
        assert!(error_of("meta:\n  remote_query_timeout: soon\n").contains("remote_query_timeout"));
        assert!(error_of("nodeid: x\n").contains("nodeid"));
        assert!(error_of("mqtt:\n  hots: x\n").contains("hots"));
        assert!(error_of("node_id: a/b\n").contains("node_id"));
        assert!(error_of("http:\n  listen: localhost\n").contains("http.listen"));
        assert!(error_of("http:\n  listne: x\n").contains("listne"));
    }
}
