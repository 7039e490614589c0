//! The `metamanager` binary: parse the command line, load settings, run until signalled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use metamanager::config::Settings;
use metamanager::inspect::{InspectError, Inspector};
use metamanager::maintenance::{self, backup::BackupOptions, Failure, Progress};
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
    /// How often a progress line is written when stderr is not a terminal: by backup, check
    /// and export, and by the service while it counts an earlier version's objects into the
    /// digest at start-up (e.g. 5s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "5s", global = true,
          value_parser = humantime::parse_duration)]
    progress_every: Duration,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Commands: they open the database read-only and work while the service runs.
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Inspect(Inspect),
    /// Write a consistent copy of the database to OUT while MetaManager runs.
    ///
    /// SQLite's online backup copies one snapshot while MetaManager keeps writing. The copy is
    /// a plain single-file database, verified before it is renamed to OUT; a failed backup
    /// leaves nothing at OUT.
    #[command(after_help = BACKUP_HELP)]
    Backup {
        /// The copy: a new file (an existing one is never replaced), in a directory that exists.
        #[arg(value_name = "OUT")]
        out: PathBuf,
        /// Database pages copied per step; the copy pauses between steps, so that it never
        /// takes the disk from the service for long.
        #[arg(long, value_name = "N", default_value_t = BackupOptions::default().pages_per_step,
              value_parser = clap::value_parser!(u32).range(1..))]
        pages_per_step: u32,
        /// The pause between two steps (e.g. 20ms, 1s).
        #[arg(long, value_name = "DURATION", default_value = "20ms",
              value_parser = humantime::parse_duration)]
        pause: Duration,
    },
    /// Check the database: SQLite's integrity check, then the store's own invariants.
    ///
    /// Each problem found is one line on stdout, `CHECK SUBJECT: DETAIL`; a summary goes to
    /// stderr.
    #[command(after_help = CHECK_HELP)]
    Check,
}

/// The commands that print what is stored.
#[derive(Subcommand)]
enum Inspect {
    /// Print the stored object NAMESPACE/TYPE/NAME as JSON.
    #[command(after_help = INSPECT_HELP)]
    Get {
        #[arg(value_name = "NAMESPACE/TYPE/NAME")]
        resource: String,
    },
    /// Print every stored object of NAMESPACE/TYPE, one JSON line each ({"key","type","value"}).
    #[command(after_help = INSPECT_HELP)]
    List {
        #[arg(value_name = "NAMESPACE/TYPE")]
        resource: String,
    },
    /// Print every stored object, one JSON line each ({"key","type","value"}).
    ///
    /// Progress goes to stderr: a bar on a terminal (unless stdout is that terminal too), else
    /// a line every --progress-every; the last line says how many objects were written.
    #[command(after_help = INSPECT_HELP)]
    Export,
}

const INSPECT_HELP: &str = "\
Exit status:
  0    printed (export: also an empty store)
  1    get: the object is not stored; list: nothing is stored under NAMESPACE/TYPE
  2    bad arguments or config, or a database that is missing, cannot be opened, or is not
       MetaManager's (or is damaged: run `metamanager check`)
  4    an I/O failure reading the database or writing the output (disk full)
  141  (killed by SIGPIPE) stdout closed before everything was written (`export | head`),
       as for cat or grep; nothing is printed on stderr";

const BACKUP_HELP: &str = "\
Restore: stop MetaManager, put the copy in place of database.path, remove any -wal and -shm
file beside it, start MetaManager.

Exit status:
  0  the copy is at OUT, verified
  1  the copy failed verification (the source may be damaged: run `metamanager check`);
     nothing was written to OUT
  2  bad arguments or config, a database that cannot be opened as MetaManager's, OUT that
     already exists, or a directory for OUT that does not exist
  4  an I/O failure (writing the copy: disk full, permissions); nothing was written to OUT";

const CHECK_HELP: &str = "\
Checks, as named on the problem lines:
  integrity  SQLite's integrity check (on a damaged file the other checks are not made)
  rv         a row's rv column is its object's metadata.resourceVersion
  digest     each scope's digest row is the count and hash of its objects
  change     no object or message id is numbered past the last recorded change, and an
             object numbered within the recorded history has its change there
  outbox     each message waiting for the cloud is a message the cloud can read

Exit status:
  0  no problem found
  1  problems found, one line each on stdout (a damaged file included); also when stdout
     closes before they are all written (`check | head`)
  2  bad arguments or config, or a database that cannot be opened or is not MetaManager's
  4  an I/O failure reading the database";

/// Exit status of a command that looked for something and did not find it.
const NOT_FOUND: u8 = 1;
/// Exit status for bad arguments or configuration (clap uses it too).
const BAD_INPUT: u8 = 2;
/// Exit status when the embedded broker stopped accepting connections (see `watchdog`).
const BROKER_UNRESPONSIVE: u8 = 3;
/// Exit status of `check` when it found a problem, and of `backup` when the copy was not
/// right.
const PROBLEM_FOUND: u8 = 1;
/// Exit status of `backup` and `check` when reading or writing a file failed, and of `get`,
/// `list` and `export` when reading the database or writing the output did.
const IO_FAILED: u8 = 4;
/// Exit status of `get`, `list` and `export` when stdout closed early and SIGPIPE could not
/// end them (see [`end_on_closed_output`]): what a shell reports for SIGPIPE, 128 + 13.
const CLOSED_OUTPUT: u8 = 141;

fn main() -> ExitCode {
    let cli = Cli::parse();
    metamanager::telemetry::init(cli.log_format);
    metamanager::progress::set_line_every(cli.progress_every);
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
        return match command {
            Command::Inspect(command) => inspect(&db, command),
            Command::Backup {
                out,
                pages_per_step,
                pause,
            } => backup(
                &db,
                &out,
                BackupOptions {
                    pages_per_step,
                    pause,
                },
            ),
            Command::Check => check(&db),
        };
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

/// Runs a read-only command against the database at `db`, printing to stdout.
fn inspect(db: &Path, command: Inspect) -> ExitCode {
    end_on_closed_output();
    // Buffered: an export of a large store is then a write per 64 KiB, not one per line.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let result = Inspector::open(db).and_then(|inspector| match &command {
        Inspect::Get { resource } => inspector.print(resource, &mut out).map(usize::from),
        Inspect::List { resource } => inspector.list(resource, &mut out),
        Inspect::Export => export(&inspector, &mut out),
    });
    match (result, &command) {
        (Ok(0), Inspect::Get { resource }) => {
            eprintln!("metamanager: {resource} is not stored");
            ExitCode::from(NOT_FOUND)
        }
        (Ok(0), Inspect::List { resource }) => {
            eprintln!("metamanager: no objects stored under {resource}");
            ExitCode::from(NOT_FOUND)
        }
        (Ok(_), _) => ExitCode::SUCCESS,
        // Only when SIGPIPE is blocked: as quiet as the signal would have been.
        (Err(e), _) if e.is_closed_output() => ExitCode::from(CLOSED_OUTPUT),
        (Err(e), _) => {
            eprintln!("metamanager: {e}");
            exit_status(e.failure())
        }
    }
}

/// `export` with its progress on stderr, and a last line that says what it wrote.
fn export(inspector: &Inspector, out: &mut impl Write) -> Result<usize, InspectError> {
    let progress = Progress::beside_stdout("export");
    let started = Instant::now();
    let exported = inspector.export(out, &progress);
    progress.finish();
    if let Ok(n) = &exported {
        progress.note(&format!(
            "wrote {} objects in {:.1} s",
            maintenance::grouped(*n as u64),
            started.elapsed().as_secs_f64()
        ));
    }
    exported
}

/// Makes a write to a closed stdout end the command as it ends cat or grep: killed by SIGPIPE,
/// which a shell reports as status 141 and prints nothing for, and `set -o pipefail` counts as
/// a failure (the output was cut short, so success would be untrue; the reader chose to stop,
/// so an error message would be noise). Rust's runtime ignores SIGPIPE so that a write returns
/// an error instead; the printing commands restore its default action before they write. The
/// service never does: a client that goes away must not end it.
#[cfg(unix)]
fn end_on_closed_output() {
    // SAFETY: `signal` with `SIG_DFL` only sets the disposition of SIGPIPE; no handler runs
    // code of ours, and no other thread has been started to race with it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn end_on_closed_output() {}

fn exit_status(failure: Failure) -> ExitCode {
    ExitCode::from(match failure {
        Failure::Damaged => PROBLEM_FOUND,
        Failure::BadInput => BAD_INPUT,
        Failure::Io => IO_FAILED,
    })
}

/// Copies the database at `db` to `out`, and says what it wrote.
fn backup(db: &Path, out: &Path, options: BackupOptions) -> ExitCode {
    let progress = Progress::on_stderr("backup");
    match maintenance::backup::backup(db, out, &options, &progress) {
        Ok(b) => {
            eprintln!(
                "backup: wrote {}: {} objects, {}, in {:.1} s ({} pages in {} steps)",
                out.display(),
                maintenance::grouped(b.objects),
                maintenance::bytes(b.bytes),
                b.elapsed.as_secs_f64(),
                maintenance::grouped(b.pages),
                b.steps
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            progress.finish();
            eprintln!("metamanager: backup failed: {e}");
            exit_status(e.failure())
        }
    }
}

/// Checks the database at `db`: problems on stdout, a summary on stderr.
fn check(db: &Path) -> ExitCode {
    let progress = Progress::on_stderr("check");
    let mut out = std::io::stdout().lock();
    match maintenance::check::check(db, &mut out, &progress) {
        Ok(c) => {
            for what in &c.skipped {
                progress.note(&format!("not checked: {what}"));
            }
            if c.uncounted > 0 {
                progress.note(&format!(
                    "{} objects are not counted in the digest yet (written without MetaManager); its next start counts them",
                    maintenance::grouped(c.uncounted)
                ));
            }
            let verdict = match c.problems {
                0 => "ok".to_owned(),
                1 => "1 problem".to_owned(),
                n => format!("{} problems", maintenance::grouped(n)),
            };
            progress.note(&format!(
                "{verdict}: {} objects in {} scopes, {} outbox messages, in {:.1} s",
                maintenance::grouped(c.objects),
                maintenance::grouped(c.scopes),
                maintenance::grouped(c.outbox),
                c.elapsed.as_secs_f64()
            ));
            if c.problems > 0 {
                ExitCode::from(PROBLEM_FOUND)
            } else {
                ExitCode::SUCCESS
            }
        }
        // Whoever read the findings has what they wanted (`check | head`); they were problems.
        Err(e) if e.is_closed_output() => ExitCode::from(PROBLEM_FOUND),
        Err(e) => {
            progress.finish();
            eprintln!("metamanager: check failed: {e}");
            exit_status(e.failure())
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
