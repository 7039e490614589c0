//! The SQLite store: table `meta(key, type, value)`, the same shape as KubeEdge's.
//!
//! One thread owns the write connection and does every write. It drains whatever is queued into
//! one transaction (group commit), so under load one fsync covers many messages, while a write
//! that arrives alone is committed at once. Each write runs inside its own savepoint, so one
//! that fails is rolled back alone and the rest of its batch still commits. The caller learns the
//! outcome only after the commit, which is what lets replies and acks follow the write.
//!
//! Reads use their own connections, which WAL allows beside the writer. They run in
//! `block_in_place` on the multi-threaded runtime, which hands the worker's other tasks to
//! another thread for the duration: a point read is answered without the thread hop of the
//! blocking pool (the benchmark showed that hop in the query round trip), and no task waits
//! behind SQLite. Only on a single-threaded runtime, where `block_in_place` is not allowed, do
//! they go to the blocking pool. A single writer also means "database is locked" cannot happen
//! between MetaManager's own connections.
//!
//! One writer per database also holds across processes: a store is opened only with the claim
//! of [`lock`], which its writer thread holds until it has closed the database.
//!
//! This file is the facade, [`Store`], with what its parts share: the errors, the options, the
//! writer's queue of jobs and the counters it keeps for everyone else. The parts:
//! - [`change`]: what a write is and what it did, the types callers build and read;
//! - [`open`]: opening a store, up to the writer thread's start;
//! - [`writer`]: the writer thread, the only code that writes (its jobs listed there);
//! - [`read`]: the queries that only read, shared with the commands that read a database;
//! - [`feed`]: the change feed, for watchers;
//! - [`digest`]: per scope, the count and hash of the objects, kept with every write;
//! - [`space`]: the quota and the storage-full state;
//! - [`lock`]: the claim on the database, one MetaManager per file;
//! - [`settings`]: the `database` settings;
//! - [`metrics`]: the commits' measurements.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::Connection;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};

mod change;
pub mod digest;
mod feed;
pub mod lock;
mod open;
pub mod read;
pub mod settings;
pub mod space;
mod writer;

use crate::delivery::Delivery;
/// What the writer thread measures; counted into the node's metrics, below every part.
pub use crate::metrics::StoreMetrics;

pub use change::{
    Applied, Change, ChangeKind, CloudMessage, OutboxEntry, Outcome, SentPatch, StoreEvent, Write,
    MAX_SENT_PATCHES,
};
pub use digest::{Digest, ScopeDigest};
pub use feed::{Expired, Resume};
pub use lock::{InstanceLock, LockError};
use settings::Synchronous;
pub use space::{Full, Space};
pub use writer::replace::{PendingForward, ReplaceSet, Replaced, ReplacedChange};
pub use writer::DEDUPE_WINDOW;

/// Changes queued for the writer thread before submitters wait.
const QUEUE_DEPTH: usize = 4096;
/// Settle marks kept for the next commit at most (one per handled message, so in practice
/// never more than a batch or two; the bound matters only while commits fail).
const MAX_PENDING_SETTLES: usize = writer::DEDUPE_WINDOW as usize;
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
    /// Another MetaManager has the database, or it could not be claimed.
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("database {path} is damaged or not a MetaManager database: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database commit failed: {0}")]
    Commit(String),
    /// No room for the write (see [`space`]); its text begins `storage full:`.
    #[error("{0}")]
    StorageFull(Full),
    /// A thread or task of the store could not start or ended abnormally.
    #[error("store task failed: {0}")]
    Task(String),
    #[error("the store is closed")]
    Closed,
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub synchronous: Synchronous,
    /// Most messages the outbox keeps.
    pub outbox_max: usize,
    /// Where the writer thread records each commit's latency and size.
    pub metrics: StoreMetrics,
    /// `database.max_size`: the quota on what the live data uses, in bytes; 0 for none.
    pub max_size: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            outbox_max: 10_000,
            metrics: StoreMetrics::default(),
            max_size: settings::DEFAULT_MAX_SIZE,
        }
    }
}

/// Resolves after the commit with what the change did (see [`Store::submit`]).
pub type Committed = oneshot::Receiver<Result<Applied, StoreError>>;

/// What the writer thread is given: one message's change, or a whole replace.
// The large variant is the one every message takes; boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Job {
    Change {
        change: Change,
        done: oneshot::Sender<Result<Applied, StoreError>>,
    },
    Replace {
        set: ReplaceSet,
        done: oneshot::Sender<Result<Replaced, StoreError>>,
    },
    /// Compaction, and while the store is full a look for room (see [`Store::maintain`]).
    Maintain,
}

/// Counters the writer keeps for everyone else.
struct Shared {
    /// The quota, the space in use and the storage-full state.
    space: Space,
    /// Transactions committed, and changes in them: group commit's effect, observable.
    commits: AtomicU64,
    committed_changes: AtomicU64,
    outbox_len: AtomicUsize,
    outbox_dropped_full: AtomicU64,
    outbox_changed: Notify,
    /// The change feed: published to after each commit; publishing never waits.
    feed: feed::Feed,
    /// Message ids whose forward has been handed on, each with its delivery mark, waiting to
    /// be marked settled by the first commit after the broker acknowledged the forward (see
    /// [`Store::settle`]).
    settle: Mutex<Vec<(u64, String)>>,
    /// Message ids that could not be passed on, to handle again if they come again (see
    /// [`Store::release`]).
    released: Mutex<Vec<String>>,
    /// The broker's acknowledgements of MetaManager's publishes; without it (a store used
    /// without a connection) a mark is ready at once.
    delivery: OnceLock<Arc<Delivery>>,
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
    /// Reads at once through [`Store::read`], at most [`MAX_IDLE_READERS`]. Each holds a
    /// thread of its own (in `block_in_place` the runtime moves the worker's other tasks to a
    /// new thread), with its own connection and allocator arena: 50 lists at once would
    /// otherwise be 50 threads, 50 connections and 50 arenas.
    read_slots: tokio::sync::Semaphore,
    shared: Arc<Shared>,
    metrics: StoreMetrics,
}

impl Store {
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The commit measurements the writer thread records, for the node's metrics.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    /// Queues a change and returns at once; the returned receiver resolves after the commit.
    /// Submitting in order and awaiting later is what lets changes share a commit.
    pub async fn submit(&self, change: impl Into<Change>) -> Result<Committed, StoreError> {
        let change = change.into();
        let (done, outcome) = oneshot::channel();
        self.queue(Job::Change { change, done }).await?;
        Ok(outcome)
    }

    /// Hands `job` to the writer thread, waiting while its queue is full.
    async fn queue(&self, job: Job) -> Result<(), StoreError> {
        let sender = self
            .inner
            .jobs
            .lock()
            .map_err(|_| StoreError::Closed)?
            .clone()
            .ok_or(StoreError::Closed)?;
        sender.send(job).await.map_err(|_| StoreError::Closed)
    }

    /// Queues a replace of one scope by `set` and returns at once, as [`Store::submit`] does;
    /// the receiver resolves after the commit with what the replace changed. The whole set is
    /// applied in one transaction, through the same steps as single writes.
    pub async fn submit_replace(
        &self,
        set: ReplaceSet,
    ) -> Result<oneshot::Receiver<Result<Replaced, StoreError>>, StoreError> {
        let (done, outcome) = oneshot::channel();
        self.queue(Job::Replace { set, done }).await?;
        Ok(outcome)
    }

    /// Submits a replace and waits for its commit.
    pub async fn replace(&self, set: ReplaceSet) -> Result<Replaced, StoreError> {
        self.submit_replace(set)
            .await?
            .await
            .unwrap_or(Err(StoreError::Closed))
    }

    /// Submits and waits for the commit.
    pub async fn write(&self, change: impl Into<Change>) -> Result<Applied, StoreError> {
        self.submit(change)
            .await?
            .await
            .unwrap_or(Err(StoreError::Closed))
    }

    /// Where the broker's acknowledgements of the connection's publishes are counted; set
    /// once, when the node is assembled.
    pub fn track_delivery(&self, delivery: Arc<Delivery>) {
        let _ = self.inner.shared.delivery.set(delivery);
    }

    /// Records that nothing is left to pass on for the message `msg_id` once the broker has
    /// acknowledged the publishes up to `mark` ([`Delivery::mark`] read after handing its
    /// forward on; 0 when it needs no forward). Costs no commit of its own: the writer marks
    /// the id settled in the first transaction after that, or on [`Store::close`] if it is
    /// acknowledged by then. Until then, or if the process dies first, the id stays unsettled,
    /// which only means that a redelivery is passed on again if its change is still the
    /// stored state.
    pub fn settle(&self, msg_id: &str, mark: u64) {
        let mut pending = self
            .inner
            .shared
            .settle
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Full only while commits fail or the broker acknowledges nothing; a mark left out is
        // the safe direction.
        if pending.len() < MAX_PENDING_SETTLES {
            pending.push((mark, msg_id.to_owned()));
        }
    }

    /// Records that the message `msg_id`, handled in this run, could not be passed on (its
    /// message for the cloud could not be queued, and its sender was told to send it again):
    /// a copy that comes again is handled as a repeat from before a restart, passed on while
    /// its change is still the stored state, instead of only acked. Rides the next commit, as
    /// [`Store::settle`] does, which comes before any copy the sender sends after being told.
    pub fn release(&self, msg_id: &str) {
        let mut pending = self
            .inner
            .shared
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pending.len() < MAX_PENDING_SETTLES {
            pending.push(msg_id.to_owned());
        }
    }

    /// A replace's forwards to edged that the broker had not acknowledged when the last run
    /// ended, in the order they were made: sent again before anything else at start-up, as a
    /// message's forward is when the broker delivers the message again.
    pub async fn pending_forwards(&self) -> Result<Vec<PendingForward>, StoreError> {
        self.read(writer::replace::pending_forwards).await
    }

    /// The digest of the store (see [`digest`]): per scope, the count and hash of its
    /// objects, and the number of the last change included. Reads one row per scope, never
    /// the objects.
    pub async fn digest(&self) -> Result<Digest, StoreError> {
        self.read(digest::read).await
    }

    /// The keys of `rtypes` changed after change number `after` up to `through`: see
    /// [`read::changed_keys`].
    pub async fn changed_keys(
        &self,
        after: u64,
        through: u64,
        rtypes: &'static [&'static str],
    ) -> Result<Option<Vec<(String, String, u64)>>, StoreError> {
        self.read(move |c| read::changed_keys(c, after, through, rtypes))
            .await
    }

    /// Whether the store still takes writes (false once [`Store::close`] has begun).
    pub fn is_open(&self) -> bool {
        self.inner.jobs.lock().is_ok_and(|j| j.is_some())
    }

    /// The quota, the space the live data uses and the storage-full state.
    pub fn space(&self) -> &Space {
        &self.inner.shared.space
    }

    /// Asks the writer for its periodic work between batches: give free pages back to the
    /// filesystem and truncate the write-ahead log, and, while the store is full, look for
    /// room, so that the state ends on an idle node whose disk was cleaned. Returns at once.
    pub async fn maintain(&self) -> Result<(), StoreError> {
        self.queue(Job::Maintain).await
    }

    /// The change feed: every change to `meta` from any source, after its commit, in commit
    /// order. A receiver that falls more than a buffer behind gets `Lagged`.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Arc<StoreEvent>> {
        self.inner.shared.feed.subscribe()
    }

    /// The number of the last change in the feed. A read started after this call includes
    /// that change, so it is the `resourceVersion` of a list read next.
    pub fn feed_position(&self) -> u64 {
        self.inner.shared.feed.position()
    }

    /// Subscribes to the feed and returns the recorded changes numbered after `version`, for a
    /// watch that starts where a list left off. The live receiver may repeat some of them.
    pub fn changes_since(&self, version: u64) -> Result<Resume, Expired> {
        self.inner.shared.feed.since(version)
    }

    /// Transactions committed so far, and the changes they held.
    pub fn commits(&self) -> (u64, u64) {
        (
            self.inner.shared.commits.load(Ordering::Relaxed),
            self.inner.shared.committed_changes.load(Ordering::Relaxed),
        )
    }

    /// Messages waiting in the outbox for the cloud.
    pub fn outbox_len(&self) -> usize {
        self.inner.shared.outbox_len.load(Ordering::Relaxed)
    }

    /// Messages dropped because the outbox was full, since start.
    pub fn outbox_dropped_full(&self) -> u64 {
        self.inner
            .shared
            .outbox_dropped_full
            .load(Ordering::Relaxed)
    }

    /// Resolves after the next commit that changed the outbox.
    pub async fn outbox_changed(&self) {
        self.inner.shared.outbox_changed.notified().await
    }

    /// The oldest `limit` outbox entries, oldest first.
    pub async fn outbox_batch(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, created_ms, payload FROM outbox ORDER BY seq LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(OutboxEntry {
                    seq: r.get(0)?,
                    created_ms: r.get(1)?,
                    payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The patches passed on to the cloud whose answers have not come, oldest first.
    pub fn sent_patches(&self) -> Result<Vec<SentPatch>, StoreError> {
        self.read_now(|c| {
            c.prepare("SELECT msg_id, key, rtype FROM sent_patches ORDER BY seq")?
                .query_map([], |r| {
                    Ok(SentPatch {
                        msg_id: r.get(0)?,
                        key: r.get(1)?,
                        rtype: r.get(2)?,
                    })
                })?
                .collect()
        })
    }

    /// The stored JSON of one object.
    ///
    /// A lookup by primary key takes microseconds, less than handing the worker thread over
    /// (`read`), so it runs on the calling task.
    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read_now(|c| read::get(c, key))
    }

    /// The cluster-scoped object `name` of `rtype`, under whatever namespace segment it is
    /// stored, with its change number: see [`read::cluster_object`]. An index lookup, so it
    /// runs on the calling task like [`Store::get`].
    pub async fn cluster_object(
        &self,
        rtype: &str,
        name: &str,
    ) -> Result<Option<read::Row>, StoreError> {
        self.read_now(|c| read::cluster_object(c, rtype, name))
    }

    /// The stored JSON of one object and the number of its last change, for the local API.
    pub async fn get_row(&self, key: &str) -> Result<Option<read::Row>, StoreError> {
        self.read_now(|c| read::get_row(c, key))
    }

    /// One stored object of each type: see [`read::type_samples`].
    pub async fn type_samples(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(read::type_samples).await
    }

    /// One page of `range` after the key `after`: see [`read::page`].
    pub async fn page(
        &self,
        range: read::Range,
        after: String,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Vec<read::Row>, StoreError> {
        self.read(move |c| read::page(c, &range, &after, max_rows, max_bytes))
            .await
    }

    /// One page of the versions of the scope `namespace/rtype` after the key `after`: see
    /// [`read::versions`].
    pub async fn versions(
        &self,
        namespace: &str,
        rtype: &str,
        after: String,
        max_bytes: usize,
    ) -> Result<read::Versions, StoreError> {
        let (namespace, rtype) = (namespace.to_owned(), rtype.to_owned());
        self.read(move |c| read::versions(c, &namespace, &rtype, &after, max_bytes))
            .await
    }

    /// Every object of `rtype` in `namespace`, in key order, as `(key, json)`.
    pub async fn list(
        &self,
        namespace: &str,
        rtype: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let (namespace, rtype) = (namespace.to_owned(), rtype.to_owned());
        self.read(move |c| read::list(c, &namespace, &rtype)).await
    }

    /// Every object of `rtype` in any namespace, in key order.
    pub async fn list_type(&self, rtype: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rtype = rtype.to_owned();
        self.read(move |c| read::list_type(c, &rtype)).await
    }

    /// Which of `keys` are stored.
    pub async fn existing(&self, keys: Vec<String>) -> Result<Vec<bool>, StoreError> {
        self.read(move |c| read::existing(c, &keys)).await
    }

    /// Runs a short `f` on a read connection right here, on the calling thread.
    fn read_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        with_reader(&self.inner, f)
    }

    /// Runs `f` on a read connection, holding a read slot: in `block_in_place` on the
    /// multi-threaded runtime, on the blocking pool on a single-threaded one (see the module's
    /// comment).
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let _slot = self
            .inner
            .read_slots
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let inner = self.inner.clone();
        let run = move || with_reader(&inner, f);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(run)
        } else {
            tokio::task::spawn_blocking(run)
                .await
                .map_err(|e| StoreError::Task(format!("read task: {e}")))?
        }
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

/// Runs `f` on an idle read connection (or a new one), and keeps the connection for later.
fn with_reader<T>(
    inner: &Inner,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
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
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    read::open(path).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Whether `incoming` is older than `stored` by `metadata.resourceVersion`: both versions are
/// decimal integers and the incoming one is lower. Kubernetes calls the version opaque, but
/// every kube-apiserver backed by etcd gives out increasing integers; anything else (absent,
/// not a number) is not compared, and the update goes through as before. A late, older update
/// would otherwise overwrite a newer object and leave the node silently behind the cloud.
pub fn resource_version_is_older(incoming: &str, stored: &str) -> bool {
    version_is_older(
        &digest::resource_version(incoming.as_bytes()),
        &digest::resource_version(stored.as_bytes()),
    )
}

/// [`resource_version_is_older`] on the two versions themselves.
pub fn version_is_older(incoming: &str, stored: &str) -> bool {
    let number = |text: &str| -> Option<u64> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    };
    matches!((number(incoming), number(stored)), (Some(new), Some(old)) if new < old)
}

/// `metadata.uid` of an object's JSON, stored or arriving, if it has one (a uid that is no
/// string counts as none).
pub fn object_uid(json: &str) -> Option<String> {
    crate::resource::metadata_uid(json).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Resource;

    /// A put of `value` under `key`, of the type the key names.
    pub(super) fn put(key: &str, value: &str) -> Write {
        Write::Put {
            key: key.into(),
            rtype: crate::resource::Resource::parse(key)
                .expect("a resource key")
                .rtype()
                .into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    /// Found by type and name through the index `meta_name`, whatever the namespace segment;
    /// `INDEXED BY` makes the query fail rather than scan, so an answer is the lookup's.
    #[tokio::test]
    async fn a_cluster_scoped_object_is_found_by_type_and_name_under_any_segment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        for key in [
            "edge/node/n1",
            "default/node/n10",
            "default/node/n",
            "default/pod/n2",
            "b/node/n3",
            "a/node/n3",
        ] {
            store
                .write(put(key, &format!(r#"{{"k":"{key}"}}"#)))
                .await
                .unwrap();
        }
        let found = |rtype: &'static str, name: &'static str| {
            let store = store.clone();
            async move { store.cluster_object(rtype, name).await.unwrap() }
        };
        let edge = found("node", "n1").await.expect("n1 is stored");
        assert_eq!(
            (edge.key.as_str(), edge.value.as_str()),
            ("edge/node/n1", r#"{"k":"edge/node/n1"}"#)
        );
        assert_eq!(found("node", "n2").await, None, "n2 is a pod");
        assert_eq!(found("pod", "n2").await.unwrap().key, "default/pod/n2");
        assert_eq!(
            found("node", "n3").await.unwrap().key,
            "a/node/n3",
            "first by key"
        );
        assert_eq!(found("node", "n").await.unwrap().key, "default/node/n");
        store
            .write(Write::Delete {
                key: "edge/node/n1".into(),
                uid: None,
            })
            .await
            .unwrap();
        assert_eq!(found("node", "n1").await, None);
        store.close().await;
    }

    #[tokio::test]
    async fn lists_are_scoped_to_the_namespace_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
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

    #[tokio::test]
    async fn pages_read_a_range_in_key_order_bounded_in_rows_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        for key in ["a/pod/1", "a/pod/2", "a/pod/3", "a/podstatus/1", "b/pod/4"] {
            store
                .write(put(key, r#"{"x":"0123456789"}"#))
                .await
                .unwrap();
        }
        let keys =
            |rows: Vec<read::Row>| -> Vec<String> { rows.into_iter().map(|r| r.key).collect() };
        let in_a = read::Range::InNamespace {
            namespace: "a".into(),
            rtype: "pod".into(),
        };
        let page = |range: &read::Range, after: &str, rows, bytes| {
            store.page(range.clone(), after.into(), rows, bytes)
        };
        assert_eq!(
            keys(page(&in_a, "", 2, 1 << 20).await.unwrap()),
            ["a/pod/1", "a/pod/2"]
        );
        assert_eq!(
            keys(page(&in_a, "a/pod/2", 2, 1 << 20).await.unwrap()),
            ["a/pod/3"]
        );
        assert!(page(&in_a, "a/pod/3", 2, 1 << 20).await.unwrap().is_empty());
        // One row at least, however small the byte bound.
        assert_eq!(keys(page(&in_a, "", 10, 1).await.unwrap()), ["a/pod/1"]);
        let pods = read::Range::OfType("pod".into());
        assert_eq!(
            keys(page(&pods, "a/pod/2", 10, 1 << 20).await.unwrap()),
            ["a/pod/3", "b/pod/4"]
        );
        store.close().await;
    }

    /// The digest as the contract defines it, computed here from the rows themselves.
    fn digest_of(rows: &[(String, String)]) -> Vec<(String, u64, String)> {
        let mut scopes: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for (key, value) in rows {
            let json: serde_json::Value = serde_json::from_str(value).unwrap_or_default();
            let rv = json["metadata"]["resourceVersion"].as_str().unwrap_or("");
            let sum =
                ring::digest::digest(&ring::digest::SHA256, format!("{key}\n{rv}").as_bytes());
            let term = u64::from_be_bytes(sum.as_ref()[..8].try_into().unwrap());
            let scope: Vec<&str> = key.splitn(3, '/').take(2).collect();
            let entry = scopes.entry(scope.join("/")).or_default();
            entry.0 += 1;
            entry.1 = entry.1.wrapping_add(term);
        }
        scopes
            .into_iter()
            .map(|(scope, (count, hash))| (scope, count, format!("{hash:016x}")))
            .collect()
    }

    fn all_rows(path: &Path) -> Vec<(String, String)> {
        let conn = read::open(path).unwrap();
        let mut stmt = conn.prepare("SELECT key, value FROM meta").unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    async fn digest_entries(store: &Store) -> Vec<(String, u64, String)> {
        store
            .digest()
            .await
            .unwrap()
            .scopes
            .iter()
            .map(|s| (s.scope.clone(), s.count, s.hash_hex()))
            .collect()
    }

    #[tokio::test]
    async fn the_digest_follows_every_kind_of_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        assert!(store.digest().await.unwrap().scopes.is_empty());
        let obj = |rv: &str| format!(r#"{{"metadata":{{"resourceVersion":"{rv}"}},"s":1}}"#);
        let update = |key: &str, value: String| Write::PutIfChanged {
            key: key.into(),
            rtype: Resource::parse(key).unwrap().rtype().into(),
            value: Bytes::from(value),
        };
        let delete = |key: &str| Write::Delete {
            key: key.into(),
            uid: None,
        };
        store.write(put("a/pod/1", &obj("1"))).await.unwrap();
        store.write(put("a/pod/2", &obj("2"))).await.unwrap();
        store
            .write(put("a/pod/3", r#"{"no":"version"}"#))
            .await
            .unwrap();
        store.write(put("b/configmap/x", &obj("9"))).await.unwrap();
        store.write(put("a/pod/1", &obj("5"))).await.unwrap();
        store.write(update("a/pod/2", obj("6"))).await.unwrap();
        store.write(update("a/pod/2", obj("3"))).await.unwrap(); // stale: kept
        store.write(put("b/configmap/y", "[1,2]")).await.unwrap();
        let patch = Write::Patch {
            key: "a/pod/3".into(),
            rtype: "pod".into(),
            patch: Arc::new(
                crate::patch::Patch::parse(
                    br#"{"metadata":{"resourceVersion":"77"}}"#,
                    "pod",
                    1 << 20,
                )
                .unwrap(),
            ),
        };
        store.write(patch).await.unwrap();
        store.write(delete("b/configmap/x")).await.unwrap();
        store.write(delete("c/pod/absent")).await.unwrap();
        let before = store.feed_position();
        assert_eq!(digest_entries(&store).await, digest_of(&all_rows(&path)));
        assert_eq!(store.digest().await.unwrap().change, before);
        store.write(delete("b/configmap/y")).await.unwrap();
        let scopes = digest_entries(&store).await;
        assert_eq!(scopes, digest_of(&all_rows(&path)));
        assert_eq!(scopes.len(), 1, "an emptied scope has no entry: {scopes:?}");
        // A replace: one object updated, one kept, one deleted, one inserted.
        let mut set = ReplaceSet::new("a", "pod");
        set.add("1", Bytes::from(obj("10")));
        set.add("2", Bytes::from(obj("6")));
        set.add("4", Bytes::from(obj("1")));
        let done = store.replace(set).await.unwrap();
        assert_eq!((done.inserted, done.updated, done.deleted), (1, 1, 1));
        assert_eq!(digest_entries(&store).await, digest_of(&all_rows(&path)));
        store.close().await;
    }

    #[tokio::test]
    async fn rows_written_by_other_means_are_counted_into_the_digest_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            // A database from before the digest.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('ns/pod/p', 'pod', '{\"metadata\":{\"resourceVersion\":\"4\"}}');
                 INSERT INTO meta VALUES ('ns/pod/q', 'pod', 'not json');",
            )
            .unwrap();
        }
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(digest_entries(&store).await, digest_of(&all_rows(&path)));
        store
            .write(put("ns/pod/p", r#"{"metadata":{"resourceVersion":"8"}}"#))
            .await
            .unwrap();
        store.close().await;
        {
            // A row written with SQL, without its rv.
            let other = Connection::open(&path).unwrap();
            other
                .execute(
                    "INSERT INTO meta (key, type, value) VALUES ('ns/configmap/c', 'configmap', '{}')",
                    [],
                )
                .unwrap();
        }
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let scopes = digest_entries(&store).await;
        assert_eq!(scopes, digest_of(&all_rows(&path)));
        assert_eq!(scopes.len(), 2);
        store.close().await;
    }
}
