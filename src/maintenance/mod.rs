//! The operator's commands that look after the database file itself, `backup` and `check`:
//! both run beside the service (WAL lets a reader work while the writer commits), and both
//! read one snapshot of the store, so what they copy or verify is a state the store was in.
//!
//! What they share lives here: how they tell an operator how far they got (a long copy or
//! check on a slow edge disk must not look hung), and what a failure means for the exit status.

pub mod backup;
pub mod check;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a progress line is written when stderr is not a terminal: often enough that a log
/// shows the command is alive, rarely enough that a long run does not flood it.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// What a failure means to whoever runs the command, so that a script can tell "the database
/// is bad" from "you asked wrongly" from "the disk failed" by the exit status alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database (or the copy made of it) is not right: a problem to look into.
    Damaged,
    /// The arguments, the config, or a database that cannot be opened as MetaManager's.
    BadInput,
    /// Reading or writing a file failed (disk full, permissions, I/O error).
    Io,
}

/// The database a command reads could not be opened: both commands name it the same way, and
/// either is a wrong argument for the exit status.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("database {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot open database {path} read-only: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Opens the database at `db` read-only, as the read-only commands do (see
/// [`crate::store::read::open`]), naming a missing file as such rather than as SQLite's
/// "unable to open".
pub(crate) fn open_read_only(db: &Path) -> Result<rusqlite::Connection, OpenError> {
    if !db.is_file() {
        return Err(OpenError::Missing {
            path: db.to_owned(),
        });
    }
    crate::store::read::open(db).map_err(|source| OpenError::Open {
        path: db.to_owned(),
        source,
    })
}

/// What a rusqlite error says about the file: a damaged one is [`Failure::Damaged`], a file that
/// is no SQLite database at all a wrong argument ([`Failure::BadInput`], as for `get`), a failed
/// read or write [`Failure::Io`]; anything else (a missing table: not MetaManager's database,
/// or a refused statement) is `otherwise`.
pub(crate) fn failure_of(e: &rusqlite::Error, otherwise: Failure) -> Failure {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt) => Failure::Damaged,
        Some(ErrorCode::NotADatabase) => Failure::BadInput,
        Some(
            ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::OutOfMemory,
        ) => Failure::Io,
        _ => otherwise,
    }
}

/// Progress on stderr: a bar on a terminal, else a plain line every [`LINE_EVERY`] (a bar's
/// redraws would fill a log file or a journal with control characters). Cheap to clone, so a
/// SQLite progress handler can hold one while a long statement runs.
#[derive(Clone)]
pub struct Progress {
    /// `backup` or `check`: the start of every line.
    command: &'static str,
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Bar(indicatif::ProgressBar),
    Lines(Arc<Mutex<Lines>>),
}

struct Lines {
    last: Instant,
    started: Instant,
}

impl Progress {
    /// Draws a bar when stderr is a terminal, plain lines otherwise.
    pub fn on_stderr(command: &'static str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr(),
            );
            Self {
                command,
                mode: Mode::Bar(bar),
            }
        } else {
            Self::lines(command)
        }
    }

    /// Plain lines only, whatever stderr is.
    pub fn lines(command: &'static str) -> Self {
        let now = Instant::now();
        Self {
            command,
            mode: Mode::Lines(Arc::new(Mutex::new(Lines {
                last: now,
                started: now,
            }))),
        }
    }

    /// `done` of `total` `unit`s (pages, objects) are through.
    pub fn update(&self, done: u64, total: u64, unit: &str) {
        match &self.mode {
            Mode::Bar(bar) => {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(&format!(
                            "{}: {{bar:40}} {{percent:>3}} % {{msg}} {{elapsed}}",
                            self.command
                        ))
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                }
                // Counts as on the plain lines: grouped by spaces, not commas.
                bar.set_message(format!("({} of {} {unit})", grouped(done), grouped(total)));
                bar.set_position(done);
            }
            Mode::Lines(lines) => {
                if due(lines).is_some() {
                    let percent = (done * 100).checked_div(total).unwrap_or(100);
                    eprintln!(
                        "{}: {percent} % ({} of {} {unit})",
                        self.command,
                        grouped(done),
                        grouped(total)
                    );
                }
            }
        }
    }

    /// A step whose length is not known (SQLite's integrity check) is still running.
    pub fn busy(&self, what: &str) {
        match &self.mode {
            Mode::Bar(bar) => {
                bar.set_style(
                    indicatif::ProgressStyle::with_template(&format!(
                        "{}: {{spinner}} {what} {{elapsed}}",
                        self.command
                    ))
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                bar.tick();
            }
            Mode::Lines(lines) => {
                if let Some(elapsed) = due(lines) {
                    eprintln!("{}: {what} ({} s)", self.command, elapsed.as_secs());
                }
            }
        }
    }

    /// A line for the operator that stays on screen above the bar.
    pub fn note(&self, text: &str) {
        let line = format!("{}: {text}", self.command);
        match &self.mode {
            Mode::Bar(bar) => bar.suspend(|| eprintln!("{line}")),
            Mode::Lines(_) => eprintln!("{line}"),
        }
    }

    /// Runs `f` (a write to stdout) with the bar taken off the terminal meanwhile, so that the
    /// two do not garble each other.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.mode {
            Mode::Bar(bar) => bar.suspend(f),
            Mode::Lines(_) => f(),
        }
    }

    /// Takes the bar off the screen, so that the final line stands alone.
    pub fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}

/// The time since the start when a line is due now, and marks it written.
fn due(lines: &Mutex<Lines>) -> Option<Duration> {
    let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
    if lines.last.elapsed() < LINE_EVERY {
        return None;
    }
    lines.last = Instant::now();
    Some(lines.started.elapsed())
}

/// `31000` as `31 000`: long counts in a log are read at a glance, and a space cannot be taken
/// for a decimal mark in any locale.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// A byte count as an operator reads it: `12.3 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1 000");
        assert_eq!(grouped(12_800), "12 800");
        assert_eq!(grouped(31_000_000), "31 000 000");
    }

    #[test]
    fn sizes_are_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 20), "5.0 MiB");
    }
}
