//! Opening a store: an existing file checked read-only before anything writes to it, the schema
//! brought up to date, what the writer keeps counting read back (the run, the recorded
//! changes, the outbox's length, the space in use), and the writer thread started with the
//! claim on the database. Apart from the facade because it runs once, and all of it must
//! succeed before a [`Store`] exists.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock};

use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{mpsc, Notify};

use super::{
    digest, feed, read, space, writer, Inner, InstanceLock, Shared, Space, Store, StoreError,
    StoreOptions, MAX_IDLE_READERS, QUEUE_DEPTH,
};

impl Store {
    /// Claims the database for this process ([`InstanceLock`]), then opens it as
    /// [`Store::open_locked`] does.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        Self::open_locked(InstanceLock::acquire(path)?, options)
    }

    /// Opens (or creates) the database `lock` claims and starts the writer thread, which holds
    /// the lock until it has closed the database: a store cannot exist without the claim, so
    /// no second writer can. An existing file is checked read-only first: one that is not a
    /// SQLite database, or whose tables cannot be read, stops here with an error naming it, and
    /// is never modified.
    pub fn open_locked(lock: InstanceLock, options: StoreOptions) -> Result<Self, StoreError> {
        // Owned: the lock itself moves to the writer thread.
        let database = lock.database().to_owned();
        let path = database.as_path();
        if path.exists() {
            check_existing(path)?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        writer::schema::prepare(&conn, options.synchronous.as_str()).map_err(open_err)?;
        let counted = digest::backfill(&conn).map_err(open_err)?;
        if counted > 0 {
            tracing::info!(
                objects = counted,
                "counted stored objects into the digest (once, for rows written without their resourceVersion column)"
            );
        }
        let run = writer::schema::start_run(&conn).map_err(open_err)?;
        let (last_change, recent) = writer::schema::recorded_changes(&conn).map_err(open_err)?;
        writer::schema::number_objects(&conn, last_change).map_err(open_err)?;
        let shared = Arc::new(Shared {
            space: Space::new(options.max_size),
            commits: AtomicU64::default(),
            committed_changes: AtomicU64::default(),
            outbox_len: AtomicUsize::default(),
            outbox_dropped_full: AtomicU64::default(),
            outbox_changed: Notify::default(),
            feed: feed::Feed::new(last_change, recent),
            settle: Mutex::default(),
            released: Mutex::default(),
            delivery: OnceLock::default(),
        });
        let mut writer = writer::Writer {
            conn,
            shared: shared.clone(),
            outbox_max: options.outbox_max,
            recorded_since_prune: 0,
            outbox_rows: 0,
            metrics: options.metrics.clone(),
            lock,
            next_change: last_change + 1,
            changes_since_prune: 0,
            run,
            wal: space::wal_path(path),
            dir: path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned(),
            reserve: space::reserve_path(path),
            reserve_tried: std::cell::Cell::new(None),
            pages_known: std::cell::Cell::new(None),
            wal_known: std::cell::Cell::new(0),
            measured_at: std::cell::Cell::new(None),
        };
        writer.count_outbox().map_err(open_err)?;
        writer.measure();
        if !writer.restore_reserve() {
            tracing::warn!(path = %space::reserve_path(path).display(), "no room on the disk for the reserve that keeps deletes possible when it is full");
        }
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Task(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                readers: Mutex::new(Vec::new()),
                read_slots: tokio::sync::Semaphore::new(MAX_IDLE_READERS),
                shared,
                metrics: options.metrics,
            }),
        })
    }
}

/// Reads an existing file without writing to it, so that a damaged file is reported, not
/// "repaired" by SQLite's first write.
fn check_existing(path: &Path) -> Result<(), StoreError> {
    let unusable = |reason: String| StoreError::Unusable {
        path: path.to_owned(),
        reason,
    };
    let conn = read::open(path).map_err(|e| unusable(e.to_string()))?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| unusable(e.to_string()))?;
    if tables.iter().any(|t| t == "meta") {
        // Touch both ends of the key index and the table, where damage shows first.
        for sql in [
            "SELECT key FROM meta ORDER BY key LIMIT 1",
            "SELECT key FROM meta ORDER BY key DESC LIMIT 1",
            "SELECT value FROM meta ORDER BY rowid DESC LIMIT 1",
        ] {
            conn.query_row(sql, [], |_| Ok(()))
                .optional()
                .map_err(|e| unusable(e.to_string()))?;
        }
    } else if !tables.is_empty() {
        return Err(unusable(format!(
            "it has tables ({}) but no `meta` table",
            tables.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreOptions};

    #[test]
    fn refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let garbage = vec![0x5au8; 8192];
        std::fs::write(&path, &garbage).unwrap();
        let err = match Store::open(&path, StoreOptions::default()) {
            Ok(_) => panic!("opened a file that is not a database"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("m.db"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }
}
