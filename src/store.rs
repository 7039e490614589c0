//! The SQLite store: table `meta(key, type, value)`, the same shape as KubeEdge's.
//!
//! One thread owns the write connection and does every write. It drains whatever is queued into
//! one transaction (group commit), so under load one fsync covers many messages, while a write
//! that arrives alone is committed at once. Each write runs inside its own savepoint, so one
//! that fails is rolled back alone and the rest of its batch still commits. The caller learns the
//! outcome only after the commit, which is what lets replies and acks follow the write.
//!
//! Reads use their own connections, which WAL allows beside the writer, and run on tokio's
//! blocking pool so the async runtime never waits on SQLite. A single writer also means
//! "database is locked" cannot happen between MetaManager's own connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction; bounds the latency a batch adds to its first write.
const MAX_BATCH: usize = 512;
/// Writes queued for the writer thread before submitters wait.
const QUEUE_DEPTH: usize = 4096;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 4;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create directory for database {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database commit failed: {0}")]
    Commit(String),
    #[error("the store is closed")]
    Closed,
}

/// One change to the store.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert, replacing any old value.
    Put {
        key: String,
        rtype: String,
        value: String,
    },
    /// Store only when `value` differs, compared as JSON, from what is stored.
    PutIfChanged {
        key: String,
        rtype: String,
        value: String,
    },
    /// Remove `key`; with `uid`, only when the stored object's `metadata.uid` is that uid.
    Delete { key: String, uid: Option<String> },
}

/// What a committed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    Unchanged,
    Deleted,
    /// Delete of a key that was not stored.
    Absent,
    /// Delete whose uid did not match the stored object's; nothing was removed.
    UidMismatch,
}

struct Job {
    write: Write,
    done: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
}

impl Store {
    /// Opens (or creates) the database and starts the writer thread. A file that is not a
    /// SQLite database stops here with an error naming it; it is never modified.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        prepare_writer(&conn).map_err(open_err)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(conn, rx))
            .map_err(|e| StoreError::Commit(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Queues a write and returns at once; the returned receiver resolves after the commit.
    /// Submitting in order and awaiting later is what lets writes share a commit.
    pub async fn submit(
        &self,
        write: Write,
    ) -> Result<oneshot::Receiver<Result<Outcome, StoreError>>, StoreError> {
        let sender = self
            .inner
            .jobs
            .lock()
            .map_err(|_| StoreError::Closed)?
            .clone()
            .ok_or(StoreError::Closed)?;
        let (done, outcome) = oneshot::channel();
        sender
            .send(Job { write, done })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(outcome)
    }

    /// Submits and waits for the commit.
    pub async fn write(&self, write: Write) -> Result<Outcome, StoreError> {
        self.submit(write)
            .await?
            .await
            .unwrap_or(Err(StoreError::Closed))
    }

    /// The stored JSON of one object.
    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// Every object of `rtype` in `namespace`, in key order, as `(key, json)`.
    pub async fn list(
        &self,
        namespace: &str,
        rtype: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        // Keys of the list share the prefix "ns/type/"; '0' is the byte after '/', so the
        // half-open range is exactly that prefix and is served by the primary key index.
        let low = format!("{namespace}/{rtype}/");
        let high = format!("{namespace}/{rtype}0");
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT key, value FROM meta WHERE key >= ?1 AND key < ?2 ORDER BY key",
            )?;
            let rows = stmt.query_map([low, high], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Every object of `rtype` in any namespace, in key order.
    pub async fn list_type(&self, rtype: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rtype = rtype.to_owned();
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT key, value FROM meta WHERE type = ?1 ORDER BY key")?;
            let rows = stmt.query_map([rtype], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Which of `keys` are stored.
    pub async fn existing(&self, keys: Vec<String>) -> Result<Vec<bool>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT 1 FROM meta WHERE key = ?1")?;
            keys.iter().map(|k| stmt.exists([k])).collect()
        })
        .await
    }

    /// Runs `f` on a read connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match inner.readers.lock().ok().and_then(|mut p| p.pop()) {
                Some(c) => c,
                None => open_reader(&inner.path)?,
            };
            let result = f(&conn).map_err(StoreError::from);
            if let Ok(mut pool) = inner.readers.lock() {
                if pool.len() < MAX_IDLE_READERS {
                    pool.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Commit(format!("read task failed: {e}")))?
    }

    /// Stops taking writes, lets the writer commit what is queued, and closes the database.
    pub async fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        let writer = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = writer {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        if let Ok(mut pool) = self.inner.readers.lock() {
            pool.clear();
        }
    }
}

fn prepare_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // journal_mode is the first statement that reads the file, so a file that is not a
    // database fails here, before anything is written to it.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (
             key   TEXT PRIMARY KEY,
             type  TEXT NOT NULL,
             value TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS meta_type ON meta(type);",
    )
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn run_writer(mut conn: Connection, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcomes = commit_batch(&mut conn, &batch);
        for (job, outcome) in batch.drain(..).zip(outcomes) {
            let _ = job.done.send(outcome);
        }
    }
    if let Err(e) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
        tracing::warn!(error = %e, "final WAL checkpoint failed");
    }
}

/// Applies a batch in one transaction; each write in its own savepoint.
fn commit_batch(conn: &mut Connection, batch: &[Job]) -> Vec<Result<Outcome, StoreError>> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let text = e.to_string();
        return batch
            .iter()
            .map(|_| Err(StoreError::Commit(text.clone())))
            .collect();
    }
    let mut outcomes: Vec<Result<Outcome, StoreError>> = Vec::with_capacity(batch.len());
    for job in batch {
        let outcome = conn
            .execute_batch("SAVEPOINT w")
            .and_then(|()| apply(conn, &job.write));
        match outcome {
            Ok(o) => {
                let released = conn.execute_batch("RELEASE w");
                outcomes.push(released.map(|()| o).map_err(StoreError::from));
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK TO w; RELEASE w");
                outcomes.push(Err(StoreError::Sqlite(e)));
            }
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        let text = e.to_string();
        tracing::error!(error = %text, writes = batch.len(), "store commit failed");
        return batch
            .iter()
            .map(|_| Err(StoreError::Commit(text.clone())))
            .collect();
    }
    outcomes
}

fn apply(conn: &Connection, write: &Write) -> rusqlite::Result<Outcome> {
    match write {
        Write::Put { key, rtype, value } => {
            upsert(conn, key, rtype, value)?;
            Ok(Outcome::Stored)
        }
        Write::PutIfChanged { key, rtype, value } => {
            let stored = stored_value(conn, key)?;
            if stored.is_some_and(|old| same_json(&old, value)) {
                return Ok(Outcome::Unchanged);
            }
            upsert(conn, key, rtype, value)?;
            Ok(Outcome::Stored)
        }
        Write::Delete { key, uid } => {
            let Some(stored) = stored_value(conn, key)? else {
                return Ok(Outcome::Absent);
            };
            if let Some(uid) = uid {
                if stored_uid(&stored).is_some_and(|s| &s != uid) {
                    return Ok(Outcome::UidMismatch);
                }
            }
            conn.prepare_cached("DELETE FROM meta WHERE key = ?1")?
                .execute([key])?;
            Ok(Outcome::Deleted)
        }
    }
}

fn upsert(conn: &Connection, key: &str, rtype: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, type, value) VALUES (?1, ?2, ?3)
         ON CONFLICT(key) DO UPDATE SET type = excluded.type, value = excluded.value",
    )?
    .execute(params![key, rtype, value])?;
    Ok(())
}

fn stored_value(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// JSON equality; object key order does not matter.
fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `metadata.uid` of a stored object, if it has one.
pub fn stored_uid(json: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        uid: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Obj {
        metadata: Option<Meta>,
    }
    serde_json::from_str::<Obj>(json).ok()?.metadata?.uid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Write {
        Write::Put {
            key: key.into(),
            rtype: key.split('/').nth(1).unwrap_or_default().into(),
            value: value.into(),
        }
    }

    #[tokio::test]
    async fn one_failed_write_does_not_sink_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path).unwrap();
        // A real SQLite failure for one key only.
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER reject_bad BEFORE INSERT ON meta WHEN NEW.key = 'ns/pod/bad'
                 BEGIN SELECT RAISE(ABORT, 'rejected by test trigger'); END;",
            )
            .unwrap();
        // Hold the write lock so the writer stalls on its first batch while the next three
        // writes queue up behind it and are then committed together.
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let seed = store.submit(put("ns/pod/seed", "{}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = store.submit(put("ns/pod/a", "{}")).await.unwrap();
        let bad = store.submit(put("ns/pod/bad", "{}")).await.unwrap();
        let after = store.submit(put("ns/pod/b", "{}")).await.unwrap();
        other.execute_batch("COMMIT").unwrap();
        assert_eq!(seed.await.unwrap().unwrap(), Outcome::Stored);
        assert_eq!(before.await.unwrap().unwrap(), Outcome::Stored);
        let err = bad.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("rejected by test trigger"), "{err}");
        assert_eq!(after.await.unwrap().unwrap(), Outcome::Stored);
        let keys: Vec<String> = store
            .list("ns", "pod")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["ns/pod/a", "ns/pod/b", "ns/pod/seed"]);
        store.close().await;
    }

    #[tokio::test]
    async fn update_compares_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let w = |v: &str| Write::PutIfChanged {
            key: "ns/configmap/c".into(),
            rtype: "configmap".into(),
            value: v.into(),
        };
        assert_eq!(
            store.write(w(r#"{"a":1,"b":2}"#)).await.unwrap(),
            Outcome::Stored
        );
        assert_eq!(
            store.write(w(r#"{"b":2, "a":1}"#)).await.unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(
            store.write(w(r#"{"b":3,"a":1}"#)).await.unwrap(),
            Outcome::Stored
        );
        store.close().await;
    }

    #[tokio::test]
    async fn delete_respects_uid() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        store
            .write(put("ns/pod/p", r#"{"metadata":{"uid":"u1"}}"#))
            .await
            .unwrap();
        let del = |uid: &str| Write::Delete {
            key: "ns/pod/p".into(),
            uid: Some(uid.into()),
        };
        assert_eq!(store.write(del("u2")).await.unwrap(), Outcome::UidMismatch);
        assert!(store.get("ns/pod/p").await.unwrap().is_some());
        assert_eq!(store.write(del("u1")).await.unwrap(), Outcome::Deleted);
        assert_eq!(store.write(del("u1")).await.unwrap(), Outcome::Absent);
        store.close().await;
    }

    #[tokio::test]
    async fn lists_are_scoped_to_the_namespace_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        for key in ["a/pod/1", "a/pod/2", "a/podstatus/1", "ab/pod/3", "b/pod/4"] {
            store.write(put(key, "{}")).await.unwrap();
        }
        let keys: Vec<String> = store
            .list("a", "pod")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a/pod/1", "a/pod/2"]);
        store.close().await;
    }

    #[test]
    fn refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let garbage = vec![0x5au8; 8192];
        std::fs::write(&path, &garbage).unwrap();
        let err = match Store::open(&path) {
            Ok(_) => panic!("opened a file that is not a database"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("m.db"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }
}
