//! The operator's commands that look after the database file itself, `backup` and `check`:
//! both run beside the service (WAL lets a reader work while the writer commits), and both
//! read one snapshot of the store, so what they copy or verify is a state the store was in.
//!
//! What they share lives here: what a failure means for the exit status. How they tell an
//! operator how far they got is [`crate::progress`], which `export` shares with them.

pub mod backup;
pub mod check;

use std::path::{Path, PathBuf};

pub use crate::progress::{bytes, grouped, Progress};

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
