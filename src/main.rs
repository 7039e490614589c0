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
    let outcome = runtime.block_on(async {
        // Installed before start-up, so a SIGTERM that arrives while MetaManager is still
        // starting is held and honoured as soon as it runs, instead of killing the process.
        let shutdown = shutdown_signal();
        metamanager::app::run(settings, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Registers for SIGTERM and SIGINT now; the returned future resolves on either.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
