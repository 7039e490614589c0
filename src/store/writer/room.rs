//! The writer's side of the store's room on disk (see [`crate::store::space`]): which changes
//! need room, the quota's check, making room when a batch did not fit, the state's begin and
//! end, and compaction: free pages given back to the filesystem and a write-ahead log kept
//! small, so that the files follow the live data down after churn.

use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{Done, Writer};
use crate::store::space::{self, Full};
use crate::store::{Change, Job, StoreError, Write};

/// Pages the log may keep on disk after a checkpoint has emptied it (SQLite truncates it to
/// this): room a delete can use when the disk is full, at most 4 MiB however large a burst made
/// the log. The periodic compaction truncates it to nothing when the store is idle.
const JOURNAL_SIZE_LIMIT: i64 = 4 * 1024 * 1024;
/// Free pages given back per compaction step: about 8 MiB, a few milliseconds of the writer.
const VACUUM_STEP_PAGES: i64 = 2048;
/// How long a compaction's checkpoint waits for readers of an older snapshot before it leaves
/// the log for the next time: never long enough to hold the writer up.
const CHECKPOINT_WAIT: Duration = Duration::from_millis(50);
/// Disk kept in reserve beside the database (`<db>-reserve`), released when the disk is full
/// so that deletes, and the checkpoints that let the log be written over, still have room; a
/// delete needs a few pages of log, and this is room for a few hundred.
pub(in crate::store) const RESERVE_BYTES: usize = 1024 * 1024;
/// How much the log may have grown since it was last looked at before the quota's check
/// looks again: a batch's worth, at most [`crate::store::writer`]'s batch of large objects.
const LOG_SLACK: u64 = 8 * 1024 * 1024;
/// How often, at most, the quota's gauge is measured while writes keep coming.
const MEASURE_EVERY: Duration = Duration::from_secs(1);
/// How often, at most, a full disk is asked again for the reserve while writes keep coming.
const RESERVE_RETRY: Duration = Duration::from_secs(1);

impl Job {
    /// Whether the job can grow the store: refused while it is full, unlike a delete.
    pub(in crate::store) fn needs_room(&self) -> bool {
        match self {
            Job::Change { change, .. } => change.needs_room(),
            Job::Replace { .. } => true,
            Job::Maintain => false,
        }
    }
}

impl Change {
    /// Stores an object, queues a message for the cloud beside no delete, or remembers a
    /// patch: what a full store refuses. A delete (with its message for the cloud), a
    /// settled outbox row or a forgotten patch makes room.
    fn needs_room(&self) -> bool {
        match &self.write {
            Some(Write::Put { .. } | Write::PutIfChanged { .. } | Write::Patch { .. }) => true,
            Some(Write::Delete { .. }) => false,
            None => self.to_cloud.is_some() || self.remember_patch.is_some(),
        }
    }
}

impl Writer {
    /// The disk refused to grow the files.
    pub(super) fn disk_full(&self) -> Full {
        Full::Disk {
            dir: self.dir.clone(),
        }
    }

    /// A failed statement's error, as [`StoreError::StorageFull`] when the disk refused it.
    pub(super) fn no_room_or(&self, e: rusqlite::Error) -> StoreError {
        if space::is_disk_full(&e) {
            StoreError::StorageFull(self.disk_full())
        } else {
            StoreError::Sqlite(e)
        }
    }

    /// Whether what the open transaction did since `pages_before` (pages in use then) took the
    /// live data past the quota: only a change that grew the pages in use counts, so that one
    /// that shrinks or keeps them (a delete, an equal update) goes through on a full store.
    ///
    /// One pragma read a batch: the pages it ends with are the next batch's start (kept in
    /// [`Writer::pages_known`] until something else changes them), and the log is looked at
    /// on disk only when the sum with its last known size comes near the quota.
    pub(super) fn past_quota(&self, pages_before: Option<u64>) -> Option<Full> {
        let before = pages_before?;
        let pages = space::pages_in_use(&self.conn).ok()?;
        self.pages_known.set(Some(pages));
        let space = &self.shared.space;
        if pages <= before || !space.over_quota(pages + self.wal_known.get() + LOG_SLACK) {
            return None;
        }
        let wal = space::wal_bytes(&self.wal);
        self.wal_known.set(wal);
        let used = pages + wal;
        space.over_quota(used).then(|| Full::Quota {
            used,
            limit: space.limit(),
        })
    }

    /// The pages in use as a batch starts: the last batch's end, unless something changed them
    /// since (a rollback, compaction), when they are read again.
    pub(super) fn pages_at_start(&self) -> Option<u64> {
        self.pages_known
            .get()
            .or_else(|| space::pages_in_use(&self.conn).ok())
    }

    /// Forgets the pages in use: what was measured was rolled back, or compaction changed it.
    pub(super) fn forget_pages(&self) {
        self.pages_known.set(None);
    }

    /// What can be given back before a batch that did not fit is tried again, guarded. Past
    /// the quota, the log, which counts, is emptied. On a full disk, the reserve is released
    /// (the room the guarded batch's deletes are written in), a checkpoint lets the next
    /// transaction write the log from its start, and free pages go back to the filesystem.
    pub(super) fn make_room(&self, full: &Full) {
        self.forget_pages();
        let tried = match full {
            Full::Quota { .. } => self.checkpoint("TRUNCATE"),
            Full::Disk { .. } => {
                self.release_reserve();
                self.checkpoint("PASSIVE")
                    .and_then(|()| self.give_back_free_pages().map(drop))
            }
        };
        if let Err(e) = tried {
            tracing::debug!(error = %e, "making room in the store did not succeed");
        }
    }

    /// Follows a committed batch: the state begins with a refused write, and ends when a
    /// write that needed room committed, or, past the quota, when deletes brought the live
    /// data back under it. Also keeps the measure `/metrics` shows.
    pub(super) fn follow_room(&self, batch: &[Job], outcomes: &[Result<Done, StoreError>]) {
        let space = &self.shared.space;
        if space.full().is_some() || self.measure_due() {
            self.measure();
        }
        let mut refused = 0;
        let mut refusal = None;
        let mut grew = false;
        for (job, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Err(StoreError::StorageFull(full)) => {
                    refused += 1;
                    refusal.get_or_insert_with(|| full.clone());
                }
                Ok(_) if job.needs_room() => grew = true,
                _ => {}
            }
        }
        if let Some(full) = refusal {
            space.refused(full, refused);
            return;
        }
        match space.full() {
            Some(_) if grew => space.room_again("a write that needed room committed"),
            // The log counts, and the deletes just added to it: emptied first, it shows the
            // room they made.
            Some(full @ Full::Quota { .. }) if outcomes.iter().any(Result::is_ok) => {
                self.make_room(&full);
                if self.measure().is_some_and(|u| !space.over_quota(u)) {
                    space.room_again("deletes brought the store under its quota");
                }
            }
            _ => {}
        }
    }

    /// The limit a batch is guarded by before it is tried. Past the quota, each change is
    /// measured alone from the start, rather than the whole batch tried, rolled back and tried
    /// again on every batch of a flood. While the disk is full, growth is refused without being
    /// tried (it would take the released reserve that deletes need), unless the disk gives the
    /// reserve back, which is asked at most once a second; then the state ends and the batch
    /// is tried as usual.
    pub(super) fn guard_while_full(&self) -> Option<Full> {
        let full = self.shared.space.full()?;
        if let Full::Quota { .. } = full {
            return Some(full);
        }
        let due = self
            .reserve_tried
            .get()
            .is_none_or(|at| at.elapsed() >= RESERVE_RETRY);
        if due && self.restore_reserve() {
            self.shared.space.room_again("the disk has room again");
            return None;
        }
        Some(full)
    }

    /// The periodic work between batches: while full, make room and look for it (so that an
    /// idle node whose disk was cleaned leaves the state); then compaction.
    pub(super) fn maintain(&self) {
        let space = &self.shared.space;
        if let Some(full) = space.full() {
            self.make_room(&full);
            let room = match full {
                Full::Quota { .. } => self.measure().is_some_and(|u| !space.over_quota(u)),
                Full::Disk { .. } => self.restore_reserve(),
            };
            if room {
                space.room_again("the periodic check found room");
            }
        } else if !self.reserve.exists() {
            self.restore_reserve();
        }
        if space.full().is_none() {
            self.compact();
        }
        self.measure();
    }

    /// Free pages back to the filesystem, a step at a time, and the log truncated when no
    /// reader holds an older snapshot: at rest the files are the live data.
    fn compact(&self) {
        self.forget_pages();
        let started = Instant::now();
        let freed = self.give_back_free_pages();
        let checkpoint = self.checkpoint("TRUNCATE");
        match (freed, checkpoint) {
            (Ok(pages), Ok(())) => {
                if pages > 0 {
                    tracing::debug!(
                        pages,
                        took_ms = started.elapsed().as_millis() as u64,
                        "gave free pages back to the filesystem"
                    );
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "compaction left for the next time");
            }
        }
    }

    /// `PRAGMA incremental_vacuum` for at most [`VACUUM_STEP_PAGES`]; the pages it freed.
    fn give_back_free_pages(&self) -> rusqlite::Result<i64> {
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        if free == 0 {
            return Ok(0);
        }
        // It frees a page each step of the statement, so it is stepped to its end.
        let mut vacuum = self
            .conn
            .prepare(&format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})"))?;
        let mut steps = vacuum.query([])?;
        while steps.next()?.is_some() {}
        Ok(free.min(VACUUM_STEP_PAGES))
    }

    /// A checkpoint of the given mode that waits at most [`CHECKPOINT_WAIT`] for readers.
    fn checkpoint(&self, mode: &str) -> rusqlite::Result<()> {
        self.conn.busy_timeout(CHECKPOINT_WAIT)?;
        let done = self
            .conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                r.get::<_, i64>(0)
            });
        self.conn.busy_timeout(crate::store::BUSY_TIMEOUT)?;
        match done? {
            0 => Ok(()),
            _ => Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some("a reader held the log".into()),
            )),
        }
    }

    /// Takes the reserve back from the disk: whether the disk had room for it. The file is
    /// written whole, so a filesystem that cannot hold it says so now, not later.
    pub(in crate::store) fn restore_reserve(&self) -> bool {
        self.reserve_tried.set(Some(Instant::now()));
        let written = std::fs::write(&self.reserve, vec![0u8; RESERVE_BYTES]);
        if written.is_err() {
            let _ = std::fs::remove_file(&self.reserve);
        }
        written.is_ok()
    }

    /// Gives the reserve to the disk, for the deletes and checkpoints of a full store.
    fn release_reserve(&self) {
        match std::fs::remove_file(&self.reserve) {
            Ok(()) => tracing::debug!("released the disk reserve for deletes"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, path = %self.reserve.display(), "could not release the disk reserve")
            }
        }
    }

    /// Measures what the live data uses, for the quota's gauge; `None` if it cannot be read.
    pub(in crate::store) fn measure(&self) -> Option<u64> {
        let pages = space::pages_in_use(&self.conn).ok()?;
        let wal = space::wal_bytes(&self.wal);
        self.wal_known.set(wal);
        self.measured_at.set(Some(Instant::now()));
        self.shared.space.set_used(pages + wal);
        Some(pages + wal)
    }

    /// Whether the gauge's measure is older than [`MEASURE_EVERY`]: under a burst, batches
    /// come thousands a second, and the gauge needs none of them.
    fn measure_due(&self) -> bool {
        self.measured_at
            .get()
            .is_none_or(|at| at.elapsed() >= MEASURE_EVERY)
    }
}

/// Makes the database give free pages back on request (`auto_vacuum = INCREMENTAL`): set
/// before the first table of a new database; an earlier version's database is converted once
/// with a `VACUUM`, which rewrites it (timed in BENCHMARKS.md). It needs free disk of about
/// twice the database while it runs (SQLite's temporary copy, and the log, which grows to the
/// database's size until the next checkpoint). A conversion that fails (a full disk) is logged
/// and tried again at the next start; the store works without it, only without giving space
/// back.
pub(super) fn incremental_vacuum(conn: &Connection) -> rusqlite::Result<()> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if tables == 0 {
        return Ok(());
    }
    let started = Instant::now();
    tracing::info!(
        "converting the database to give free space back (once, for databases of earlier versions)"
    );
    match conn.execute_batch("VACUUM") {
        Ok(()) => tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "database converted: free pages now go back to the filesystem"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "could not convert the database to give free space back; tried again at the next start"
        ),
    }
    Ok(())
}

/// Bounds the write-ahead log ([`JOURNAL_SIZE_LIMIT`]) and keeps temporary tables off the
/// disk.
pub(super) fn bound_the_log(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    conn.pragma_update(None, "temp_store", "MEMORY")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use crate::store::space::Full;
    use crate::store::{Outcome, Store, StoreError, StoreOptions, Write};

    /// A quota a few dozen of [`object`]s fill, past what the schema takes.
    const QUOTA: u64 = 400 * 1024;

    fn object(n: usize) -> Write {
        Write::Put {
            key: format!("ns/pod/p{n:04}"),
            rtype: "pod".into(),
            value: Bytes::from(format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(8 * 1024))),
        }
    }

    fn delete(n: usize) -> Write {
        Write::Delete {
            key: format!("ns/pod/p{n:04}"),
            uid: None,
        }
    }

    fn open(dir: &tempfile::TempDir, max_size: u64) -> Store {
        let options = StoreOptions {
            max_size,
            ..StoreOptions::default()
        };
        Store::open(&dir.path().join("m.db"), options).expect("store opens")
    }

    /// Writes objects until the quota refuses one; how many were stored.
    async fn fill(store: &Store) -> usize {
        for n in 0..1000 {
            match store.write(object(n)).await {
                Ok(_) => {}
                Err(StoreError::StorageFull(Full::Quota { used, limit })) => {
                    assert_eq!(limit, QUOTA);
                    assert!(used > limit, "{used} > {limit}");
                    return n;
                }
                Err(e) => panic!("write {n}: {e}"),
            }
        }
        panic!("the quota never refused a write");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_quota_refuses_what_grows_and_takes_deletes_which_clear_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, QUOTA);
        let stored = fill(&store).await;
        assert!(stored > 5, "{stored}");
        assert!(matches!(store.space().full(), Some(Full::Quota { .. })));
        // Refused, and not half-applied.
        let refused = store.write(object(stored)).await;
        assert!(
            matches!(refused, Err(StoreError::StorageFull(_))),
            "{refused:?}"
        );
        assert_eq!(
            store.get(&format!("ns/pod/p{stored:04}")).await.unwrap(),
            None
        );
        // Reads go on; a delete applies and makes room at once.
        assert!(store.get("ns/pod/p0000").await.unwrap().is_some());
        for n in 0..4 {
            let done = store.write(delete(n)).await.expect("a delete applies");
            assert_eq!(done.outcome, Outcome::Deleted);
        }
        assert_eq!(store.space().full(), None, "deletes brought it under");
        store.write(object(stored)).await.expect("room again");
        store.close().await;
    }

    /// A batch whose writes do not all fit: its delete commits, what fits is kept, and what
    /// does not is refused alone, never half-applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_that_does_not_fit_keeps_its_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, QUOTA);
        let stored = fill(&store).await;
        // Hold the write lock: the writer stalls on a first write while the next three queue
        // up behind it, and then takes them as one batch.
        let other = rusqlite::Connection::open(dir.path().join("m.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let first = store.submit(delete(9999)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Larger than the whole quota: it never fits, however the log stands.
        let big = Write::Put {
            key: "ns/pod/big".into(),
            rtype: "pod".into(),
            value: Bytes::from(format!(r#"{{"pad":"{}"}}"#, "x".repeat(2 * QUOTA as usize))),
        };
        let grow = store.submit(big).await.unwrap();
        let shrink = store.submit(delete(0)).await.unwrap();
        let grow_more = store.submit(object(stored + 2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        other.execute_batch("COMMIT").unwrap();
        assert_eq!(first.await.unwrap().unwrap().outcome, Outcome::Absent);
        let grow = grow.await.unwrap();
        let shrink = shrink.await.unwrap();
        let grow_more = grow_more.await.unwrap();
        assert!(matches!(grow, Err(StoreError::StorageFull(_))), "{grow:?}");
        assert_eq!(
            store.get("ns/pod/big").await.unwrap(),
            None,
            "not half-applied"
        );
        assert_eq!(
            shrink.expect("the delete commits").outcome,
            Outcome::Deleted
        );
        assert_eq!(store.get(&format!("ns/pod/p{:04}", 0)).await.unwrap(), None);
        // The write after the delete is measured alone: in the delete's room it fits, unless
        // the log the batch wrote tips it over; either way it is all or nothing.
        let after = store
            .get(&format!("ns/pod/p{:04}", stored + 2))
            .await
            .unwrap();
        match grow_more {
            Ok(done) => {
                assert_eq!(done.outcome, Outcome::Stored);
                assert!(after.is_some());
            }
            Err(StoreError::StorageFull(_)) => assert_eq!(after, None),
            Err(e) => panic!("{e}"),
        }
        store.close().await;
    }

    /// Without a quota nothing is refused, and the periodic work gives the pages of deleted
    /// objects back to the filesystem and empties the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_gives_space_back_after_churn() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 0);
        for n in 0..300 {
            store.write(object(n)).await.unwrap();
        }
        let db = dir.path().join("m.db");
        for n in 0..300 {
            store.write(delete(n)).await.unwrap();
        }
        let files = |db: &std::path::Path| {
            std::fs::metadata(db).map_or(0, |m| m.len())
                + std::fs::metadata(crate::store::space::wal_path(db)).map_or(0, |m| m.len())
        };
        let before = files(&db);
        assert!(before > 2 * 1024 * 1024, "{before}");
        store.maintain().await.unwrap();
        // The writer runs it between batches, as soon as it is idle.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while files(&db) >= 256 * 1024 {
            assert!(
                std::time::Instant::now() < deadline,
                "{before} -> {}",
                files(&db)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.close().await;
    }

    /// A database of an earlier version, made without incremental auto-vacuum, is converted
    /// at its first open, keeps every object, and gives space back from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_earlier_database_is_converted_once_and_keeps_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        let store = open(&dir, 0);
        for n in 0..50 {
            store.write(object(n)).await.unwrap();
        }
        store.close().await;
        let earlier = rusqlite::Connection::open(&db).unwrap();
        earlier
            .execute_batch("PRAGMA auto_vacuum = NONE; VACUUM;")
            .unwrap();
        let mode = |c: &rusqlite::Connection| -> i64 {
            c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap()
        };
        assert_eq!(mode(&earlier), 0, "made as an earlier version would");
        drop(earlier);
        let store = open(&dir, 0);
        assert_eq!(store.list("ns", "pod").await.unwrap().len(), 50);
        store.close().await;
        let after = rusqlite::Connection::open(&db).unwrap();
        assert_eq!(mode(&after), 2, "incremental");
    }
}
