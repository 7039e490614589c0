//! `metamanager backup`: a consistent copy of the store, made while MetaManager runs and keeps
//! writing, with SQLite's online backup API.
//!
//! The online backup restarts from the first page whenever the source changes under it (SQLite
//! resets the source pager's cache, and with it the backup, when a new read transaction finds
//! the file changed). Against a writer that commits every few milliseconds, a backup left to
//! itself would restart forever. So the copy runs inside one read transaction, held on the
//! source connection from before the first page to after the last: in WAL mode that reader sees
//! one snapshot from start to end and never blocks the writer, whose commits go to the WAL
//! beside it. The cost is that the WAL cannot be checkpointed past that snapshot meanwhile, so
//! it grows by what is written during the copy, and is taken back by the writer's next
//! checkpoint after the copy ends; copying in steps of a bounded number of pages, with a pause
//! between them, keeps the copy from taking the disk away from the service.
//!
//! A failed backup must never leave a file at OUT that looks like a backup. The copy is made
//! in a temporary file beside OUT, made a plain single-file database (journal mode DELETE: the
//! copied header says WAL, and a WAL database is only complete with its `-wal` file), written
//! to disk, opened again and verified (SQLite's integrity check, and as many objects as the
//! snapshot held), and only then renamed to OUT.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::{failure_of, Failure, Progress};

/// Steps of the copy that find the source busy, in a row, before the backup gives up: the
/// source connection only reads, so a busy source means something is badly wrong.
const MAX_BUSY_STEPS: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Open(#[from] super::OpenError),
    #[error("cannot read database {path} ({step}): {source}")]
    Source {
        path: PathBuf,
        step: &'static str,
        source: rusqlite::Error,
    },
    #[error("{path} already exists; a backup never replaces a file")]
    OutExists { path: PathBuf },
    #[error("{path} names no file")]
    OutNotAFile { path: PathBuf },
    #[error("directory {dir} does not exist (for the backup {path})")]
    OutDirMissing { dir: PathBuf, path: PathBuf },
    #[error("cannot write the backup {path} ({step}): {source}")]
    Write {
        path: PathBuf,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("cannot write the backup {path} ({step}): {source}")]
    Copy {
        path: PathBuf,
        step: &'static str,
        source: rusqlite::Error,
    },
    #[error("the copy {path} stayed in journal mode {mode}, not a single file")]
    JournalMode { path: PathBuf, mode: String },
    #[error("the source kept its database busy for {steps} steps of the copy")]
    Busy { steps: u32 },
    #[error("the copy started over after {copied} of {pages} pages: the source changed under it, so the copy would not be one snapshot")]
    Restarted { copied: u64, pages: u64 },
    #[error("the copy {path} failed verification, so nothing was written: {reason}")]
    Verify { path: PathBuf, reason: String },
}

impl BackupError {
    /// What the failure means for the exit status.
    pub fn failure(&self) -> Failure {
        match self {
            BackupError::Open(_)
            | BackupError::OutExists { .. }
            | BackupError::OutNotAFile { .. }
            | BackupError::OutDirMissing { .. } => Failure::BadInput,
            // A source without the store's tables is not MetaManager's: a bad argument, as for
            // `get`.
            BackupError::Source { source, .. } => failure_of(source, Failure::BadInput),
            BackupError::Copy { source, .. } => failure_of(source, Failure::Io),
            BackupError::Write { .. }
            | BackupError::Busy { .. }
            | BackupError::JournalMode { .. } => Failure::Io,
            BackupError::Restarted { .. } | BackupError::Verify { .. } => Failure::Damaged,
        }
    }
}

/// How the copy shares the disk with the service.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Pages copied per step.
    pub pages_per_step: u32,
    /// The pause after each step.
    pub pause: Duration,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            // 1 MiB at SQLite's default page size: a step is a few milliseconds of disk.
            pages_per_step: 256,
            pause: Duration::from_millis(20),
        }
    }
}

/// What a backup wrote.
#[derive(Debug, Clone)]
pub struct Backed {
    /// Objects (`meta` rows) in the copy: the snapshot's.
    pub objects: u64,
    /// The copy's size.
    pub bytes: u64,
    /// Database pages copied.
    pub pages: u64,
    /// Steps the copy took.
    pub steps: u64,
    pub elapsed: Duration,
}

/// Copies the database at `db` to the new file `out`, as one snapshot of it; see the module
/// documentation for how, and why.
pub fn backup(
    db: &Path,
    out: &Path,
    options: &BackupOptions,
    progress: &Progress,
) -> Result<Backed, BackupError> {
    let started = Instant::now();
    let source = super::open_read_only(db)?;
    let partial = Partial::beside(out)?;
    let source_err = |step| {
        move |source| BackupError::Source {
            path: db.to_owned(),
            step,
            source,
        }
    };
    // The snapshot: from this statement on, until the COMMIT below, this connection reads the
    // store as it was here, whatever the writer commits meanwhile.
    source
        .execute_batch("BEGIN")
        .map_err(source_err("opening a read transaction"))?;
    let objects: i64 = source
        .query_row("SELECT count(*) FROM meta", [], |r| r.get(0))
        .map_err(source_err("counting the objects"))?;
    let copy_err = |step| {
        let path = partial.path.clone();
        move |source| BackupError::Copy {
            path: path.clone(),
            step,
            source,
        }
    };
    let mut dest = Connection::open(&partial.path).map_err(copy_err("creating the copy"))?;
    // The copy is written to disk once, at the end (`sync_all` below); a crash before then
    // leaves only the temporary file, which is never taken for a backup.
    dest.pragma_update(None, "synchronous", "OFF")
        .map_err(copy_err("setting up the copy"))?;
    let (pages, steps) = copy(&source, &mut dest, options, progress, &partial.path)?;
    // The writer may checkpoint past the snapshot again.
    source
        .execute_batch("COMMIT")
        .map_err(source_err("ending the read transaction"))?;
    drop(source);
    single_file(&dest, &partial.path)?;
    dest.close()
        .map_err(|(_, e)| copy_err("closing the copy")(e))?;
    sync(&partial.path).map_err(|source| BackupError::Write {
        path: partial.path.clone(),
        step: "writing the copy to disk",
        source,
    })?;
    verify(&partial.path, objects as u64)?;
    let bytes = partial.commit(out)?;
    Ok(Backed {
        objects: objects as u64,
        bytes,
        pages,
        steps,
        elapsed: started.elapsed(),
    })
}

/// The online backup, a step at a time; returns the pages copied and the steps taken. A copy
/// that starts over (the source changed under it) is an error, not a retry: inside the held
/// read transaction it cannot happen, and a copy that restarts may never finish.
fn copy(
    source: &Connection,
    dest: &mut Connection,
    options: &BackupOptions,
    progress: &Progress,
    partial: &Path,
) -> Result<(u64, u64), BackupError> {
    let copy_err = |source| BackupError::Copy {
        path: partial.to_owned(),
        step: "copying pages",
        source,
    };
    let backup = Backup::new(source, dest).map_err(copy_err)?;
    let per_step = i32::try_from(options.pages_per_step.max(1)).unwrap_or(i32::MAX);
    let (mut steps, mut busy) = (0u64, 0u32);
    let mut last_remaining: Option<u64> = None;
    loop {
        let result = backup.step(per_step).map_err(copy_err)?;
        steps += 1;
        let now = backup.progress();
        let total = u64::try_from(now.pagecount).unwrap_or(0);
        let remaining = u64::try_from(now.remaining).unwrap_or(0);
        match result {
            StepResult::Done => {
                progress.update(total, total, "pages");
                progress.finish();
                return Ok((total, steps));
            }
            StepResult::More => {
                busy = 0;
                if let Some(last) = last_remaining.filter(|last| remaining > *last) {
                    progress.finish();
                    return Err(BackupError::Restarted {
                        copied: total.saturating_sub(last),
                        pages: total,
                    });
                }
                last_remaining = Some(remaining);
                progress.update(total - remaining, total, "pages");
            }
            // Busy or locked: the same step is tried again after the pause.
            _ => {
                busy += 1;
                if busy >= MAX_BUSY_STEPS {
                    progress.finish();
                    return Err(BackupError::Busy { steps: busy });
                }
            }
        }
        std::thread::sleep(options.pause);
    }
}

/// Makes the copy a database complete in its one file: the backup copied the source's header,
/// which says WAL, and the next connection would otherwise keep the copy's pages in a `-wal`
/// file beside it, which a copy taken elsewhere would lose.
fn single_file(dest: &Connection, path: &Path) -> Result<(), BackupError> {
    let mode: String = dest
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .map_err(|source| BackupError::Copy {
            path: path.to_owned(),
            step: "making the copy a single file",
            source,
        })?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(BackupError::JournalMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn sync(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// Opens the copy as anyone restoring it would, and checks that it is whole and holds what
/// the snapshot held.
fn verify(path: &Path, objects: u64) -> Result<(), BackupError> {
    let fail = |reason: String| BackupError::Verify {
        path: path.to_owned(),
        reason,
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| fail(format!("cannot open it: {e}")))?;
    let integrity: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(|e| fail(format!("integrity check failed to run: {e}")))?;
    if integrity != ["ok"] {
        return Err(fail(format!("integrity check: {}", integrity.join("; "))));
    }
    let copied: i64 = conn
        .query_row("SELECT count(*) FROM meta", [], |r| r.get(0))
        .map_err(|e| fail(format!("cannot count its objects: {e}")))?;
    if copied as u64 != objects {
        return Err(fail(format!(
            "it holds {copied} objects where the snapshot held {objects}"
        )));
    }
    Ok(())
}

/// The temporary file the copy is made in, beside OUT (so the final rename stays on one file
/// system and is atomic); removed, with any journal SQLite left beside it, unless it became
/// OUT.
struct Partial {
    path: PathBuf,
    dir: PathBuf,
    kept: bool,
}

impl Partial {
    /// Checks OUT and creates the temporary file; fails before anything is read when OUT
    /// cannot be written.
    fn beside(out: &Path) -> Result<Self, BackupError> {
        let name = out.file_name().ok_or_else(|| BackupError::OutNotAFile {
            path: out.to_owned(),
        })?;
        let dir = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(BackupError::OutDirMissing {
                dir,
                path: out.to_owned(),
            });
        }
        if out.symlink_metadata().is_ok() {
            return Err(BackupError::OutExists {
                path: out.to_owned(),
            });
        }
        let mut temp = std::ffi::OsString::from(".");
        temp.push(name);
        temp.push(format!(".partial-{}", std::process::id()));
        let path = dir.join(temp);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| BackupError::Write {
                path: path.clone(),
                step: "creating the temporary file",
                source,
            })?;
        Ok(Self {
            path,
            dir,
            kept: false,
        })
    }

    /// Renames the verified copy to `out` and makes the rename durable; returns its size.
    fn commit(mut self, out: &Path) -> Result<u64, BackupError> {
        let write_err = |step| {
            move |source| BackupError::Write {
                path: out.to_owned(),
                step,
                source,
            }
        };
        // Checked again: OUT may have appeared while the copy ran, and rename would replace it.
        if out.symlink_metadata().is_ok() {
            return Err(BackupError::OutExists {
                path: out.to_owned(),
            });
        }
        std::fs::rename(&self.path, out).map_err(write_err("renaming the copy into place"))?;
        self.kept = true;
        sync(&self.dir).map_err(write_err("writing the directory to disk"))?;
        let size = std::fs::metadata(out).map_err(write_err("reading its size"))?;
        Ok(size.len())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
        for suffix in ["-journal", "-wal", "-shm"] {
            let mut beside = self.path.clone().into_os_string();
            beside.push(suffix);
            let _ = std::fs::remove_file(beside);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A WAL database with `rows` rows of about 1 KiB in `meta`, as the store's tables name it.
    fn database(path: &Path, rows: usize) {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);
             BEGIN;",
        )
        .unwrap();
        let value = "v".repeat(1000);
        for i in 0..rows {
            conn.execute(
                "INSERT INTO meta VALUES (?1, 'pod', ?2)",
                (format!("ns/pod/{i:06}"), &value),
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
    }

    /// Commits a row every millisecond until stopped; returns how many it committed.
    fn writer(path: PathBuf, stop: Arc<AtomicBool>, written: Arc<AtomicU64>) {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let value = "w".repeat(1000);
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            conn.execute(
                "INSERT INTO meta VALUES (?1, 'pod', ?2)",
                (format!("ns/pod/w{i:06}"), &value),
            )
            .unwrap();
            i += 1;
            written.store(i, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn keys(path: &Path) -> Vec<String> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut stmt = conn.prepare("SELECT key FROM meta ORDER BY key").unwrap();
        let keys = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        keys
    }

    /// SQLite's own behaviour, which the design rests on: without a read transaction held
    /// across the steps, a backup of a database another connection keeps writing starts over;
    /// with one, it copies one snapshot in one pass.
    #[test]
    fn a_held_read_transaction_keeps_the_backup_on_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        database(&db, 2000);
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let w = {
            let (db, stop, written) = (db.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || writer(db, stop, written))
        };
        while written.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }

        // Without the transaction: the copy starts over as the writer commits.
        let source = crate::store::read::open(&db).unwrap();
        let mut dest = Connection::open(dir.path().join("unheld.db")).unwrap();
        let unheld = Backup::new(&source, &mut dest).unwrap();
        let (mut restarts, mut last) = (0, i32::MAX);
        for _ in 0..200 {
            if unheld.step(16).unwrap() == StepResult::Done {
                break;
            }
            let remaining = unheld.progress().remaining;
            if remaining > last {
                restarts += 1;
            }
            last = remaining;
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(unheld);
        assert!(restarts > 0, "the backup never started over");

        // With it, through `backup`: one pass, and exactly the snapshot.
        let before = written.load(Ordering::Relaxed);
        let out = dir.path().join("copy.db");
        let options = BackupOptions {
            pages_per_step: 16,
            pause: Duration::from_millis(5),
        };
        let backed = backup(&db, &out, &options, &Progress::lines("backup")).unwrap();
        let after = written.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        assert!(backed.steps > 10, "{backed:?}");
        assert!(
            after > before + 10,
            "the writer went on: {before} then {after}"
        );
        let copied = keys(&out);
        assert_eq!(copied.len() as u64, backed.objects);
        // The snapshot is a prefix of the writer's rows: everything up to one commit, nothing
        // after it, nothing torn.
        let theirs: Vec<String> = copied
            .iter()
            .filter(|k| k.contains("/w"))
            .cloned()
            .collect();
        let expected: Vec<String> = (0..theirs.len())
            .map(|i| format!("ns/pod/w{i:06}"))
            .collect();
        assert_eq!(theirs, expected);
        assert!(
            (before..=after).contains(&(theirs.len() as u64)),
            "{before} <= {} <= {after}",
            theirs.len()
        );
    }

    #[test]
    fn the_copy_is_one_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        database(&db, 300);
        let out = dir.path().join("copy.db");
        backup(
            &db,
            &out,
            &BackupOptions::default(),
            &Progress::lines("backup"),
        )
        .unwrap();
        let header = std::fs::read(&out).unwrap();
        // File format write and read versions: 1 is a rollback journal, 2 WAL.
        assert_eq!(&header[18..20], [1, 1]);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("copy") || n.contains("partial"))
            .collect();
        assert_eq!(names, ["copy.db"]);
        assert_eq!(keys(&out).len(), 300);
    }

    #[test]
    fn out_is_never_replaced_nor_left_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        database(&db, 10);
        let progress = Progress::lines("backup");
        let options = BackupOptions::default();
        let exists = dir.path().join("exists.db");
        std::fs::write(&exists, b"keep").unwrap();
        let e = backup(&db, &exists, &options, &progress).unwrap_err();
        assert!(matches!(e, BackupError::OutExists { .. }), "{e}");
        assert_eq!(std::fs::read(&exists).unwrap(), b"keep");

        let nowhere = dir.path().join("no/such/dir/copy.db");
        let e = backup(&db, &nowhere, &options, &progress).unwrap_err();
        assert!(matches!(e, BackupError::OutDirMissing { .. }), "{e}");
        assert_eq!(e.failure(), Failure::BadInput);

        // Not MetaManager's: no `meta` table. The temporary file goes too.
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let out = dir.path().join("copy.db");
        let e = backup(&other, &out, &options, &progress).unwrap_err();
        assert!(matches!(e, BackupError::Source { .. }), "{e}");
        assert_eq!(e.failure(), Failure::BadInput);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("copy"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
