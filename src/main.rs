//! The `metamanager` binary: parse the command line, load settings, run until signalled.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use metamanager::config::Settings;

/// Edge metadata manager: persists the cloud's pods, configmaps and secrets in SQLite and relays
/// them between edgehub and edged over MQTT.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// YAML config file; every key is optional (see conf/edge.yaml).
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    metamanager::telemetry::init();
    let settings = match &cli.config {
        Some(path) => Settings::from_file(path),
        None => Settings::from_yaml(""),
    };
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("metamanager: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metamanager: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(metamanager::app::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
