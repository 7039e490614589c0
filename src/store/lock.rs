//! One MetaManager per database.
//!
//! Two processes writing one database would each believe their own `processed` window and outbox
//! count, and both would answer the same messages. SQLite's locks cannot prevent that: they
//! last one transaction, so two writers simply take turns. A second process is kept out instead
//! by an exclusive lock on a file beside the database (`<database>.lock`), held for as long as
//! the store's writer runs. The lock is the kernel's (`flock`), so it ends with the process
//! however the process ends, `kill -9` included, and a lock file left behind never blocks
//! anyone. The holder writes its pid into the file, so that the one refused can say who holds
//! it. Readers (`metamanager get`, `list`, `export`) do not take the lock: they open the database
//! read-only beside the running service.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// More than any pid's digits; a lock file that has more is not one this module wrote.
const PID_TEXT_MAX: u64 = 32;

/// Why the database could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("database {} is in use by another MetaManager{}", .database.display(), holder(*.pid))]
    InUse {
        database: PathBuf,
        /// The holder's pid, when its lock file says (it writes it just after locking).
        pid: Option<u32>,
    },
    #[error("cannot create directory for database {}: {source}", .dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock database {}: {}: {source}", .database.display(), .lock_file.display())]
    Io {
        database: PathBuf,
        lock_file: PathBuf,
        source: std::io::Error,
    },
}

fn holder(pid: Option<u32>) -> String {
    pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// The claim on one database; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    database: PathBuf,
}

impl InstanceLock {
    /// Claims `database` for this process, creating its directory and lock file as needed. Never
    /// waits: a database in use is refused at once.
    pub fn acquire(database: &Path) -> Result<Self, LockError> {
        if let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LockError::CreateDir {
                dir: dir.to_owned(),
                source,
            })?;
        }
        // The database's real name, not the one it was reached by: a symlink or another spelling
        // of the same file must find the same lock.
        let real = real_path(database);
        let lock_file = lock_file_of(&real);
        let io_error = |source| LockError::Io {
            database: database.to_owned(),
            lock_file: lock_file.clone(),
            source,
        };
        // Not truncated on open: until the lock is ours, the pid in it is the holder's.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_file)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::InUse {
                    database: database.to_owned(),
                    pid: read_pid(&mut file),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io_error(e)),
        }
        // The pid only makes the refusal more helpful; the lock is what keeps others out, so a
        // file that cannot be written (a full disk) does not stop start-up.
        if let Err(e) = write_pid(&mut file) {
            tracing::warn!(path = %lock_file.display(), error = %e, "cannot write the pid into the database lock file");
        }
        Ok(Self {
            file,
            database: database.to_owned(),
        })
    }

    /// The database this lock claims.
    pub fn database(&self) -> &Path {
        &self.database
    }
}

impl Drop for InstanceLock {
    /// Emptied before the lock goes with the file handle, so that a stale pid is not reported
    /// by a process that finds the lock taken by the next holder before it wrote its own.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// The file itself when it exists (links resolved), else its resolved directory and its name;
/// as given when neither resolves.
fn real_path(database: &Path) -> PathBuf {
    if let Ok(real) = database.canonicalize() {
        return real;
    }
    let dir = database.parent().filter(|d| !d.as_os_str().is_empty());
    match (dir.map(Path::canonicalize), database.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => database.to_owned(),
    }
}

/// `<database>.lock`, beside the database (SQLite's own files are `-wal`, `-shm`, `-journal`).
pub fn lock_file_of(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn write_pid(file: &mut File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{}", std::process::id())?;
    file.flush()
}

/// The holder's pid, or `None` while it has not written it yet (or the file is not ours).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(PID_TEXT_MAX).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_reached_by_another_name_is_the_same_database() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("alias")).unwrap();
        let _first = InstanceLock::acquire(&dir.path().join("real/m.db")).unwrap();
        for other in ["alias/m.db", "real/../real/m.db"] {
            let refused = InstanceLock::acquire(&dir.path().join(other));
            assert!(
                matches!(refused, Err(LockError::InUse { .. })),
                "{other}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_second_claim_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sub/m.db");
        let first = InstanceLock::acquire(&db).unwrap();
        assert_eq!(first.database(), db);
        assert!(dir.path().join("sub").is_dir(), "its directory is created");
        let pid = std::fs::read_to_string(lock_file_of(&db)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());

        // flock locks belong to the open file, so a second claim in this process conflicts as
        // one from another process would.
        let refused = InstanceLock::acquire(&db).unwrap_err();
        assert!(
            matches!(&refused, LockError::InUse { pid: Some(p), .. } if *p == std::process::id()),
            "{refused:?}"
        );
        assert_eq!(
            refused.to_string(),
            format!(
                "database {} is in use by another MetaManager (pid {})",
                db.display(),
                std::process::id()
            )
        );

        drop(first);
        let again = InstanceLock::acquire(&db).unwrap();
        drop(again);
    }

    #[test]
    fn a_left_over_lock_file_does_not_block_and_an_unwritten_pid_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        // What a killed holder leaves: the file with its pid, and no lock.
        std::fs::write(lock_file_of(&db), "4194304\n").unwrap();
        let lock = InstanceLock::acquire(&db).unwrap();
        let written = std::fs::read_to_string(lock_file_of(&db)).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());

        // A holder that has locked but not yet written its pid.
        std::fs::write(lock_file_of(&db), "").unwrap();
        let refused = InstanceLock::acquire(&db).unwrap_err();
        assert!(
            matches!(refused, LockError::InUse { pid: None, .. }),
            "{refused:?}"
        );
        assert_eq!(
            refused.to_string(),
            format!("database {} is in use by another MetaManager", db.display())
        );
        drop(lock);
    }
}
