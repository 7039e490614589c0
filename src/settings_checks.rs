//! What every part's settings share: the error that names the offending key, the checks a key
//! is held to (ranges, lengths, topic levels), the duration format, and reading a file a key
//! names. Each part's settings struct, with its defaults and its `validate`, lives in that
//! part's module; [`crate::config::Settings`] gathers them. Every part's settings use this
//! module and it uses none of them (only [`crate::bounded_read`], below everything), so that
//! `config` sits above the parts and nothing below it reaches back up.
//!
//! The upper bounds each part sets are far above any sensible setting; they exist so that a typo
//! or a hostile file cannot overflow the arithmetic done with a value or ask for unbounded
//! memory. docs/configuration.md lists them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserializer;

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

/// The shortest duration any key takes. Less is a typo (`60ms` for `60s`): a watchdog or
/// MetaSync that runs many times a second, a remote query the cloud can never answer in time,
/// an outbox that keeps nothing.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
/// The longest DNS name.
pub const MAX_HOST_BYTES: usize = 253;

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

/// Refuses `key` with `message`.
pub fn invalid(key: &'static str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key, message })
}

/// Node id and prefix each become one topic level, so they may not contain MQTT's separators
/// or wildcards (otherwise two nodes' topics could overlap), nor start with `$`, which brokers
/// keep for their own topics (`$SYS`). Spaces and control characters (NUL among them) are
/// refused too: they are legal in MQTT but never meant in a name.
pub fn topic_level(key: &'static str, value: &str, max_bytes: usize) -> Result<(), ConfigError> {
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

/// Refuses a text longer than `max` bytes; the message gives the length, not the text, which
/// may be huge or secret.
pub fn at_most_bytes(key: &'static str, value: &str, max: usize) -> Result<(), ConfigError> {
    if value.len() > max {
        return invalid(
            key,
            format!("is {} bytes long; at most {max} are allowed", value.len()),
        );
    }
    Ok(())
}

/// Refuses a number outside `min..=max`, naming the range.
pub fn within<T>(key: &'static str, value: T, min: T, max: T) -> Result<(), ConfigError>
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

/// Refuses a duration outside `min..=max`, naming the range as the config file writes it.
pub fn duration_within(
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
pub fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
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

/// Accepts bytes as an integer (`268435456`) or a size string (`"256MiB"`, `"512 KB"`, `"1G"`).
pub fn byte_size<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    struct SizeVisitor;
    impl serde::de::Visitor<'_> for SizeVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes as an integer or a size such as \"256MiB\"")
        }
        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<u64, E> {
            Ok(bytes)
        }
        fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<u64, E> {
            u64::try_from(bytes)
                .map_err(|_| E::custom(format!("{bytes} is negative; a size must not be")))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<u64, E> {
            parse_byte_size(text).map_err(E::custom)
        }
    }
    de.deserialize_any(SizeVisitor)
}

/// Parses a size: a number, then optionally a unit, binary (`KiB`, `MiB`, `GiB`, `TiB`) or
/// decimal (`KB`/`K`, `MB`/`M`, `GB`/`G`, `TB`/`T`), or `B`; case does not matter.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!("{text:?} is not a size; use bytes, or a form like \"256MiB\", \"512KB\", \"1GiB\"")
    };
    let number: f64 = number.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}
