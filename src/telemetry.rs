//! Logging set-up. `RUST_LOG` filters as usual; without it MetaManager logs at `info` and keeps
//! the embedded broker quiet: it logs every client connection, and MetaManager reports the
//! broker failures that matter itself. `RUST_LOG=info,rumqttd=info` brings its log back.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,rumqttd=off,rumqttc=warn";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal; journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
