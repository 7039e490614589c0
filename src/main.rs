//! The `metamanager` binary: parse the command line, load settings, run until signalled.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use metamanager::config::Settings;
use metamanager::inspect::Inspector;
use metamanager::telemetry::LogFormat;

/// Edge metadata manager: persists the cloud's pods, configmaps and secrets in SQLite and relays
/// them between edgehub and edged over MQTT. Without a command, runs the service.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// YAML config file; every key is optional (see conf/edge.yaml).
    #[arg(short, long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Database to inspect (overrides database.path from --config); commands only.
    #[arg(long, value_name = "PATH", global = true)]
    db: Option<PathBuf>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Read-only commands: they open the database read-only and work while the service runs.
#[derive(Subcommand)]
enum Command {
    /// Print the stored object NAMESPACE/TYPE/NAME as JSON.
    Get {
        #[arg(value_name = "NAMESPACE/TYPE/NAME")]
        resource: String,
    },
    /// Print every stored object of NAMESPACE/TYPE, one JSON line each ({"key","type","value"}).
    List {
        #[arg(value_name = "NAMESPACE/TYPE")]
        resource: String,
    },
    /// Print every stored object, one JSON line each ({"key","type","value"}).
    Export,
}

/// Exit status of a command that looked for something and did not find it.
const NOT_FOUND: u8 = 1;
/// Exit status for bad arguments or configuration (clap uses it too).
const BAD_INPUT: u8 = 2;
/// Exit status when the embedded broker stopped accepting connections (see `watchdog`).
const BROKER_UNRESPONSIVE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    metamanager::telemetry::init(cli.log_format);
    let settings = match &cli.config {
        Some(path) => Settings::from_file(path),
        None => Settings::from_yaml(""),
    };
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("metamanager: {e}");
            return ExitCode::from(BAD_INPUT);
        }
    };
    if let Some(command) = cli.command {
        let db = cli.db.unwrap_or_else(|| settings.database.path.clone());
        return inspect(&db, command);
    }
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
        Err(metamanager::app::AppError::BrokerUnresponsive(e)) => {
            tracing::error!("stopped: {e}");
            ExitCode::from(BROKER_UNRESPONSIVE)
        }
        // A file a config key names (password, TLS) that cannot be used is a bad configuration
        // too: restarting would only fail again.
        Err(e @ (metamanager::app::AppError::Config(_) | metamanager::app::AppError::Tls(_))) => {
            tracing::error!("cannot start: {e}");
            ExitCode::from(BAD_INPUT)
        }
        Err(e) => {
            tracing::error!("cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a read-only command against the database at `db`.
fn inspect(db: &Path, command: Command) -> ExitCode {
    let result = Inspector::open(db).and_then(|inspector| {
        let mut out = std::io::stdout().lock();
        match &command {
            Command::Get { resource } => inspector.get(resource).map(|value| {
                value.map(|v| {
                    println!("{v}");
                    1
                })
            }),
            Command::List { resource } => inspector.list(resource, &mut out).map(Some),
            Command::Export => inspector.export(&mut out).map(Some),
        }
    });
    // A database that cannot be opened or read (missing, not MetaManager's) is a bad argument.
    match (result, &command) {
        (Ok(Some(0)), Command::List { resource }) => {
            eprintln!("metamanager: no objects stored under {resource}");
            ExitCode::from(NOT_FOUND)
        }
        (Ok(None), Command::Get { resource }) => {
            eprintln!("metamanager: {resource} is not stored");
            ExitCode::from(NOT_FOUND)
        }
        (Ok(_), _) => ExitCode::SUCCESS,
        (Err(e), _) => {
            eprintln!("metamanager: {e}");
            ExitCode::from(BAD_INPUT)
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
