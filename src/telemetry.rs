//! Logging set-up. `RUST_LOG` filters as usual; without it MetaManager logs at `info`. Either
//! way the embedded broker stays quiet unless `RUST_LOG` names `rumqttd`: it logs every client
//! connection, its router builds a span for every publish (which costs throughput even when
//! nothing is printed), and MetaManager reports the broker failures that matter itself.
//! `RUST_LOG=info,rumqttd=info` brings its log back.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,rumqttd=off,rumqttc=warn";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, for log collectors that index fields.
    Json,
}

pub fn init(format: LogFormat) {
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) => EnvFilter::new(with_broker_quiet(&directives)),
        Err(_) => EnvFilter::new(DEFAULT_FILTER),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            // Colour only on a terminal; journald and log files get plain text.
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // The message and fields at the top level, beside `level` and `timestamp`, so a
        // collector finds `message` without knowing tracing's nesting.
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `directives`, with the embedded broker's log off unless they say something of it.
fn with_broker_quiet(directives: &str) -> String {
    if directives.contains("rumqttd") {
        directives.to_owned()
    } else {
        format!("{directives},rumqttd=off")
    }
}

#[cfg(test)]
mod tests {
    use super::with_broker_quiet;

    #[test]
    fn the_embedded_broker_stays_quiet_unless_named() {
        assert_eq!(with_broker_quiet("debug"), "debug,rumqttd=off");
        assert_eq!(with_broker_quiet("warn,rumqttd=info"), "warn,rumqttd=info");
    }
}
