//! Typed settings, read from an optional YAML file.
//!
//! Every key is optional and falls back to the built-in default, so `metamanager` with no
//! arguments runs. Unknown keys are rejected rather than ignored: a typo in a config file on a
//! remote edge node should stop start-up loudly, not silently fall back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::bounded_read::{self, Holds};

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

// Bounds checked at start-up ([`Settings::validate`]). The upper bounds are far above any
// sensible setting; they exist so that a typo or a hostile file cannot overflow the arithmetic
// done with a value or ask for unbounded memory.

/// A Kubernetes node name (a DNS subdomain) can be this long, and `default/node/{node_id}` is
/// still a valid resource key (a segment holds 253 bytes, see [`crate::resource`]).
pub const MAX_NODE_ID_BYTES: usize = 253;
/// The first topic level is the operator's own; a short word is all it needs.
pub const MAX_TOPIC_PREFIX_BYTES: usize = 64;
/// The longest DNS name.
pub const MAX_HOST_BYTES: usize = 253;
/// MQTT carries a username or password with a 16-bit length.
pub const MAX_MQTT_STRING_BYTES: usize = 65_535;
/// 128 MiB: the embedded broker relays twice this (so an oversized message still reaches
/// MetaManager and gets an error reply), and 256 MiB is MQTT's largest packet and the MQTT
/// client's own limit.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024 * 1024;
/// A message in flight is one not yet acknowledged to the broker, and MQTT numbers the
/// unacknowledged messages of a connection with 16-bit packet ids.
pub const MAX_INFLIGHT_MESSAGES: usize = 65_535;
/// 1 GiB of payloads in flight: beyond it the bound no longer bounds anything on an edge node.
pub const MAX_INFLIGHT_BYTES: usize = 1024 * 1024 * 1024;
/// The shortest duration any key takes. Less is a typo (`60ms` for `60s`): a watchdog or
/// MetaSync that runs many times a second, a remote query the cloud can never answer in time,
/// an outbox that keeps nothing.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
pub const MAX_WATCHDOG_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_WATCHDOG_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
pub const MAX_PODSTATUS_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// edged waits this long for an answer; an hour is already far past any caller's patience.
pub const MAX_REMOTE_QUERY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Tokens live an hour by default in Kubernetes (at least 10 minutes); a day is beyond any TTL.
pub const MAX_TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// The outbox is on disk, so this bounds disk, not memory: at 1 MiB a message, up to 1 TB.
pub const MAX_OUTBOX_MESSAGES: usize = 1_000_000;
pub const MAX_OUTBOX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Messages per second; the drain reads a tenth of it from the database at a time, so this
/// also bounds what one read holds in memory (1000 messages).
pub const MAX_DRAIN_RATE: u32 = 10_000;
/// HTTP connections: far more than a node's local clients need, and each costs a descriptor.
pub const MAX_HTTP_CONNECTIONS: usize = 65_536;
/// Requests or watches at once; each holds a page or a watch budget of memory.
pub const MAX_HTTP_REQUESTS: usize = 4096;
pub const MAX_HTTP_WATCHES: usize = 4096;
/// The longest header or idle timeout: a slow client may hold a connection at most this long.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longer than any KubeEdge type name (`serviceaccounttoken` has 19 bytes); a DNS label's limit.
pub const MAX_RESOURCE_TYPE_BYTES: usize = 63;

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
    /// Connections open at once; over it, `503`. Kept to a quarter of the open-files limit.
    pub max_connections: usize,
    /// Time for a new connection's first request head; over it, `408`.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time a keep-alive connection may stay idle between requests.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// API requests in progress at once, watches apart; over it, `429`.
    pub max_requests: usize,
    /// Watches open at once; over it, `429`.
    pub max_watches: usize,
    /// Names a loopback listener answers besides the loopback ones (DNS rebinding defence).
    pub allowed_hosts: Vec<String>,
    /// HTTPS: the API's certificate chain and key (PEM).
    pub tls: Option<HttpTlsSettings>,
    /// Authentication and authorization of the API, in kube-apiserver's file formats.
    pub auth: Option<HttpAuthSettings>,
    /// Serve anonymous requests beyond loopback (the API serves secrets).
    pub insecure_allow_anonymous: bool,
}

/// `http.tls`: HTTPS for the API (kubectl sends a token only over HTTPS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CAs whose client certificates are credentials: subject CN the user, O the groups.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// `http.auth`: see [`crate::http::auth`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthSettings {
    /// kube-apiserver's static token file: `token,user,uid,"group1,group2"` a line. Optional
    /// when client certificates are the credentials (`http.tls.client_ca_file`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// kube-apiserver's ABAC policy file, one JSON policy a line; without it every
    /// authenticated user may do everything.
    pub policy_file: Option<PathBuf>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:10550".into(),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_requests: 64,
            max_watches: 64,
            allowed_hosts: Vec::new(),
            tls: None,
            auth: None,
            insecure_allow_anonymous: false,
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
    /// A stored service account token that expires within this is fetched again from the
    /// cloud when edged asks for it (while the cloud is connected), as KubeEdge refreshes
    /// tokens before their TTL runs out.
    #[serde(deserialize_with = "duration")]
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
    /// ask for unbounded memory. The bounds are the constants above; README.md lists them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        topic_level("node_id", &self.node_id, MAX_NODE_ID_BYTES)?;
        topic_level(
            "mqtt.topic_prefix",
            &self.mqtt.topic_prefix,
            MAX_TOPIC_PREFIX_BYTES,
        )?;
        self.mqtt.validate()?;
        if self.database.path.as_os_str().is_empty() {
            return invalid("database.path", "must not be empty".into());
        }
        // SQLite reads these as a URI or an in-memory database, which the readers beside the
        // writer and the one-process lock would not see as the same file.
        let path = self.database.path.to_string_lossy();
        if path.starts_with("file:") || path == ":memory:" {
            return invalid(
                "database.path",
                format!("{path:?} is not a file path; give the database file's path"),
            );
        }
        self.meta.validate()?;
        self.outbox.validate()?;
        self.http.validate()?;
        Ok(())
    }
}

impl HttpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        within(
            "http.max_connections",
            self.max_connections,
            1,
            MAX_HTTP_CONNECTIONS,
        )?;
        within("http.max_requests", self.max_requests, 1, MAX_HTTP_REQUESTS)?;
        within("http.max_watches", self.max_watches, 1, MAX_HTTP_WATCHES)?;
        duration_within(
            "http.header_timeout",
            self.header_timeout,
            MIN_DURATION,
            MAX_HTTP_TIMEOUT,
        )?;
        duration_within(
            "http.idle_timeout",
            self.idle_timeout,
            MIN_DURATION,
            MAX_HTTP_TIMEOUT,
        )?;
        for host in &self.allowed_hosts {
            if host.is_empty() || host.contains(['/', ':', ' ']) {
                return invalid(
                    "http.allowed_hosts",
                    format!("{host:?} is not a host name; give names without port or scheme, e.g. edge-node.local"),
                );
            }
            at_most_bytes("http.allowed_hosts", host, MAX_HOST_BYTES)?;
        }
        let client_certificates = self
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        if self
            .auth
            .as_ref()
            .is_some_and(|a| a.token_file.is_none() && !client_certificates)
        {
            return invalid(
                "http.auth.token_file",
                "http.auth needs a token_file, or client certificates (http.tls.client_ca_file), to know who asks".into(),
            );
        }
        Ok(())
    }
}

impl MqttSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        // 0 lets the embedded broker take any free port (logged at start); an external broker
        // is never on port 0.
        if self.port == 0 && self.mode == BrokerMode::External {
            return invalid(
                "mqtt.port",
                "must be between 1 and 65535 for an external broker".into(),
            );
        }
        if self.host.trim().is_empty() {
            return invalid("mqtt.host", "must not be empty".into());
        }
        at_most_bytes("mqtt.host", &self.host, MAX_HOST_BYTES)?;
        within(
            "mqtt.max_payload_bytes",
            self.max_payload_bytes,
            1024,
            MAX_PAYLOAD_BYTES,
        )?;
        within(
            "mqtt.max_inflight_messages",
            self.max_inflight_messages,
            1,
            MAX_INFLIGHT_MESSAGES,
        )?;
        within(
            "mqtt.max_inflight_bytes",
            self.max_inflight_bytes,
            1024,
            MAX_INFLIGHT_BYTES,
        )?;
        duration_within(
            "mqtt.watchdog_interval",
            self.watchdog_interval,
            MIN_DURATION,
            MAX_WATCHDOG_INTERVAL,
        )?;
        if self.watchdog_timeout < self.watchdog_interval {
            return invalid(
                "mqtt.watchdog_timeout",
                "must be at least mqtt.watchdog_interval".into(),
            );
        }
        duration_within(
            "mqtt.watchdog_timeout",
            self.watchdog_timeout,
            MIN_DURATION,
            MAX_WATCHDOG_TIMEOUT,
        )?;
        for (key, value) in [
            ("mqtt.username", &self.username),
            ("mqtt.publish_username", &self.publish_username),
            ("mqtt.password", &self.password),
        ] {
            if let Some(value) = value {
                at_most_bytes(key, value, MAX_MQTT_STRING_BYTES)?;
            }
        }
        if self.password.is_some() && self.password_file.is_some() {
            return invalid(
                "mqtt.password_file",
                "set either mqtt.password or mqtt.password_file, not both".into(),
            );
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            return invalid("mqtt.username", "a password needs a username".into());
        }
        if let Some(tls) = &self.tls {
            if self.mode == BrokerMode::Embedded {
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
        Ok(())
    }

    /// The password, read from `password_file` when that is set: with a size cap, and a
    /// warning when others may read the file ([`crate::bounded_read`]).
    pub fn resolved_password(&self) -> Result<Option<String>, ConfigError> {
        let key = "mqtt.password_file";
        let Some(path) = &self.password_file else {
            return Ok(self.password.clone());
        };
        let text = read_named(key, path, true)?;
        let password = text.trim_end_matches(['\r', '\n']);
        at_most_bytes(key, password, MAX_MQTT_STRING_BYTES)?;
        Ok(Some(password.to_owned()))
    }
}

impl MetaSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        duration_within(
            "meta.sync.podstatus.interval",
            self.sync.podstatus.interval,
            MIN_DURATION,
            MAX_PODSTATUS_INTERVAL,
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

impl OutboxSettings {
    fn validate(&self) -> Result<(), ConfigError> {
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

/// The text of the file config key `key` names, read with its cap; a `secret` one (a password,
/// tokens) is warned about when others may read it ([`crate::bounded_read`]).
pub fn read_named(key: &'static str, path: &Path, secret: bool) -> Result<String, ConfigError> {
    let holds = if secret {
        Holds::Secret { key }
    } else {
        Holds::Config
    };
    bounded_read::read_text(path, holds).map_err(|source| ConfigError::ReadFile {
        key,
        path: path.to_owned(),
        source,
    })
}

fn invalid(key: &'static str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key, message })
}

/// Node id and prefix each become one topic level, so they may not contain MQTT's separators
/// or wildcards (otherwise two nodes' topics could overlap), nor start with `$`, which brokers
/// keep for their own topics (`$SYS`). Spaces and control characters (NUL among them) are
/// refused too: they are legal in MQTT but never meant in a name.
fn topic_level(key: &'static str, value: &str, max_bytes: usize) -> Result<(), ConfigError> {
    if value.is_empty() {
        return invalid(key, "must not be empty".into());
    }
    at_most_bytes(key, value, max_bytes)?;
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace())
    {
        return invalid(
            key,
            format!("{value:?} contains {c:?}; a topic level may not contain '/', '+', '#', spaces or control characters"),
        );
    }
    if value.starts_with('$') {
        return invalid(
            key,
            format!("{value:?} starts with '$', which brokers keep for their own topics"),
        );
    }
    Ok(())
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

/// Refuses a text longer than `max` bytes; the message gives the length, not the text, which
/// may be huge or secret.
fn at_most_bytes(key: &'static str, value: &str, max: usize) -> Result<(), ConfigError> {
    if value.len() > max {
        return invalid(
            key,
            format!("is {} bytes long; at most {max} are allowed", value.len()),
        );
    }
    Ok(())
}

fn within<T>(key: &'static str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    if value < min || value > max {
        return invalid(key, format!("{value} is out of range; use {min} to {max}"));
    }
    Ok(())
}

/// A duration as the config file would write it: in its largest whole unit (`365d`, not
/// humantime's `11months 30days 3h 50m 24s`).
fn show(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    for (unit, name) in [(86_400, "d"), (3600, "h"), (60, "m")] {
        if secs.is_multiple_of(unit) {
            return format!("{}{name}", secs / unit);
        }
    }
    format!("{secs}s")
}

fn duration_within(
    key: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return invalid(
            key,
            format!(
                "{} is out of range; use {} to {}",
                show(value),
                show(min),
                show(max)
            ),
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
        let huge_node_id = format!("node_id: {}\n", "n".repeat(70 * 1024));
        let long_node_id = format!("node_id: {}\n", "n".repeat(MAX_NODE_ID_BYTES + 1));
        let long_prefix = format!("mqtt:\n  topic_prefix: {}\n", "e".repeat(65));
        let long_type = format!("meta:\n  remote_types: [{}]\n", "t".repeat(64));
        let long_user = format!("mqtt:\n  username: {}\n", "u".repeat(65_536));
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
        ];
        for yaml in ok {
            if let Err(e) = Settings::from_yaml(yaml) {
                panic!("{yaml}: {e}");
            }
        }
        let longest = format!("node_id: {}\n", "n".repeat(MAX_NODE_ID_BYTES));
        assert!(Settings::from_yaml(&longest).is_ok());
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
