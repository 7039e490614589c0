//! The link's settings (`mqtt`): which broker, how to reach it, the inbound budget, and the
//! embedded broker's watchdog.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::settings_checks::{
    self, at_most_bytes, duration_within, invalid, read_named, topic_level, within, ConfigError,
    MAX_HOST_BYTES, MIN_DURATION,
};

/// The first topic level is the operator's own; a short word is all it needs.
pub const MAX_TOPIC_PREFIX_BYTES: usize = 64;
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
pub const MAX_WATCHDOG_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_WATCHDOG_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Whether MetaManager starts its own broker or joins one that already runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    Embedded,
    External,
}

/// `mqtt`: the broker MetaManager links to, and the bound on what it reads from it.
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
    #[serde(deserialize_with = "settings_checks::duration")]
    pub watchdog_interval: Duration,
    /// How long the embedded broker may fail that check before MetaManager exits (status 3)
    /// so that its service manager restarts it.
    #[serde(deserialize_with = "settings_checks::duration")]
    pub watchdog_timeout: Duration,
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

impl MqttSettings {
    /// The inbound budget.
    pub fn inflight(&self) -> crate::budget::Limits {
        crate::budget::Limits {
            messages: self.max_inflight_messages,
            bytes: self.max_inflight_bytes,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        topic_level(
            "mqtt.topic_prefix",
            &self.topic_prefix,
            MAX_TOPIC_PREFIX_BYTES,
        )?;
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
        self.validate_credentials()?;
        self.validate_tls()
    }

    fn validate_credentials(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
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

    /// The account and password MetaManager presents, when `username` is set; the password
    /// is read from its file now, like every file a key names.
    pub fn credentials(&self) -> Result<Option<(String, String)>, ConfigError> {
        Ok(match (&self.username, self.resolved_password()?) {
            (Some(user), password) => Some((user.clone(), password.unwrap_or_default())),
            (None, _) => None,
        })
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

/// `mqtt.tls`: TLS to an external broker (see [`crate::tls::client_config`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate chain and key, for brokers that require client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl TlsSettings {
    /// The client certificate chain and key; `validate` has checked that both or neither are set.
    pub fn client_cert(&self) -> Option<(&Path, &Path)> {
        self.cert_file.as_deref().zip(self.key_file.as_deref())
    }
}
