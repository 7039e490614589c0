//! The writer thread: the only code that writes to the database.
//!
//! It drains whatever is queued, up to a bound, into one `BEGIN IMMEDIATE` transaction and
//! commits once; each change runs in its own savepoint so that one failure is rolled back alone.
//! Every change also records its message id (so a redelivery is recognised) and, when the cloud
//! is away, its message for the cloud in the outbox, all in the same transaction: either the
//! change, its id and its outbox entry are on disk together, or none of them is.
//!
//! An id is recorded unsettled when the message's forward is still to come. Once the forward
//! is handed on, [`super::Store::settle`] queues a mark, and the first transaction after the
//! broker acknowledged the forward (or the close) sets the flag: the mark rides along with
//! other changes' commit and costs no fsync of its own.
//!
//! A replace of a whole scope by the cloud's set is one of the writer's steps ([`replace`]),
//! made of its single-write step.

pub(super) mod replace;
mod room;

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc;

use super::digest::{self, Deltas};
use super::space::{self, Full};
use super::{Applied, Change, ChangeKind, Job, Outcome, Shared, StoreError, StoreEvent, Write};
use crate::patch::Patched;
use crate::resource::Resource;
use replace::Replaced;

/// Most changes committed in one transaction; bounds the latency a batch adds to its first.
const MAX_BATCH: usize = 512;
/// How many message ids are remembered for recognising redeliveries.
pub const DEDUPE_WINDOW: i64 = 10_000;
/// Ids recorded between two prunings of the window.
const PRUNE_EVERY: usize = 1_000;

pub(super) fn prepare(conn: &Connection, synchronous: &str) -> rusqlite::Result<()> {
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    room::incremental_vacuum(conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    room::bound_the_log(conn)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (
             key        TEXT PRIMARY KEY,
             type       TEXT NOT NULL,
             value      TEXT NOT NULL,
             change_seq INTEGER NOT NULL DEFAULT 0
         );
         CREATE INDEX IF NOT EXISTS meta_type ON meta(type);
         CREATE TABLE IF NOT EXISTS processed (
             seq     INTEGER PRIMARY KEY,
             msg_id  TEXT NOT NULL UNIQUE,
             settled INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE IF NOT EXISTS changes (
             seq   INTEGER PRIMARY KEY,
             kind  INTEGER NOT NULL,
             key   TEXT NOT NULL,
             rtype TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS outbox (
             seq          INTEGER PRIMARY KEY,
             resource     TEXT NOT NULL,
             coalesce_key TEXT UNIQUE,
             created_ms   INTEGER NOT NULL,
             payload      BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS forwards (
             seq   INTEGER PRIMARY KEY,
             kind  INTEGER NOT NULL,
             key   TEXT NOT NULL,
             value BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS sent_patches (
             seq    INTEGER PRIMARY KEY,
             msg_id TEXT NOT NULL UNIQUE,
             key    TEXT NOT NULL,
             rtype  TEXT NOT NULL
         );",
    )?;
    // The cluster-scoped objects' lookup by type and name (see `read::cluster_object`).
    conn.execute_batch(&format!(
        "CREATE INDEX IF NOT EXISTS meta_name ON meta({})",
        super::read::NAME_OF_KEY
    ))?;
    // Databases from before the settled flag have `processed` without it. An id from then
    // counts as unsettled: a redelivery of it is passed on again only if its change is still
    // the stored state.
    let has_settled = conn
        .prepare("SELECT 1 FROM pragma_table_info('processed') WHERE name = 'settled'")?
        .exists([])?;
    if !has_settled {
        conn.execute_batch("ALTER TABLE processed ADD COLUMN settled INTEGER NOT NULL DEFAULT 0")?;
    }
    // The number of the change a message made (see `is_current`); absent from older
    // databases, and null for a message that changed nothing.
    let has_change = conn
        .prepare("SELECT 1 FROM pragma_table_info('processed') WHERE name = 'change_seq'")?
        .exists([])?;
    if !has_change {
        conn.execute_batch("ALTER TABLE processed ADD COLUMN change_seq INTEGER")?;
    }
    // The run that recorded an id (see `start_run`); null for ids from before runs were
    // numbered, which count as an earlier run's.
    let has_run = conn
        .prepare("SELECT 1 FROM pragma_table_info('processed') WHERE name = 'run'")?
        .exists([])?;
    if !has_run {
        conn.execute_batch("ALTER TABLE processed ADD COLUMN run INTEGER")?;
    }
    super::digest::prepare(conn)
}

/// Numbers this run: one more than the last run recorded in the database. A repeat of an id
/// recorded by this run is never passed on again; one recorded by an earlier run is, by the
/// restart rule (see [`Outcome::Duplicate`]).
pub(super) fn start_run(conn: &Connection) -> rusqlite::Result<i64> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS runs (
             name  TEXT PRIMARY KEY,
             value INTEGER NOT NULL
         )",
    )?;
    conn.query_row(
        "INSERT INTO runs (name, value) VALUES ('run', 1)
         ON CONFLICT(name) DO UPDATE SET value = value + 1
         RETURNING value",
        [],
        |r| r.get(0),
    )
}

/// Adds `meta.change_seq`, the number of each object's last change (which the local API gives
/// out as its `resourceVersion`, see `super::feed`), to a database from before it (or
/// KubeEdge's), numbering every object stored `last`, the feed's position: versions only grow,
/// and a watch from it resumes. Column and numbers come in one transaction, so no object is
/// ever without a number.
pub(super) fn number_objects(conn: &Connection, last: u64) -> rusqlite::Result<()> {
    let numbered = conn
        .prepare("SELECT 1 FROM pragma_table_info('meta') WHERE name = 'change_seq'")?
        .exists([])?;
    if numbered {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE meta ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;",
    )?;
    let numbered = conn
        .execute("UPDATE meta SET change_seq = ?1", [last as i64])
        .and_then(|_| conn.execute_batch("COMMIT"));
    if numbered.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    numbered
}

pub(super) struct Writer {
    pub conn: Connection,
    pub shared: Arc<Shared>,
    pub outbox_max: usize,
    pub recorded_since_prune: usize,
    /// Rows in the outbox as seen inside the current transaction; counted here rather than
    /// with `count(*)` on every insert, which would make a long outage quadratic.
    pub outbox_rows: i64,
    pub metrics: super::StoreMetrics,
    /// The claim on the database, released by [`Writer::run`] once it has closed `conn`.
    pub lock: super::InstanceLock,
    /// The number the next change to `meta` gets: numbered and recorded in `changes` inside
    /// the transaction that makes it, so the numbers and the recent history outlive a restart
    /// at no extra fsync (see [`super::feed`]).
    pub next_change: u64,
    /// Changes recorded since `changes` was last pruned to its length.
    pub changes_since_prune: usize,
    /// This run's number ([`start_run`]), recorded with each message id.
    pub run: i64,
    /// The write-ahead log, whose size counts against the quota.
    pub wal: std::path::PathBuf,
    /// The directory the database lives in, named when the disk is full.
    pub dir: std::path::PathBuf,
    /// The disk kept in reserve for a full disk's deletes (see [`room::RESERVE_BYTES`]).
    pub reserve: std::path::PathBuf,
    /// When the reserve was last asked back from a full disk.
    pub reserve_tried: std::cell::Cell<Option<Instant>>,
    /// The pages in use as the last batch committed (see [`Writer::past_quota`]).
    pub pages_known: std::cell::Cell<Option<u64>>,
    /// The log's size when it was last looked at.
    pub wal_known: std::cell::Cell<u64>,
    /// When the quota's gauge was last measured.
    pub measured_at: std::cell::Cell<Option<Instant>>,
}

/// The number of the last recorded change, and the recorded changes the feed's history starts
/// with (at most [`super::feed::HISTORY_CHANGES`], without content), from the `changes` table; a
/// database with none starts at [`super::feed::first_number`].
pub(super) fn recorded_changes(conn: &Connection) -> rusqlite::Result<(u64, Vec<StoreEvent>)> {
    let last: Option<i64> = conn.query_row("SELECT max(seq) FROM changes", [], |r| r.get(0))?;
    let Some(last) = last.and_then(|l| u64::try_from(l).ok()) else {
        return Ok((super::feed::first_number() - 1, Vec::new()));
    };
    let mut stmt =
        conn.prepare("SELECT seq, kind, key, rtype FROM changes WHERE seq > ?1 ORDER BY seq")?;
    let from = last.saturating_sub(super::feed::HISTORY_CHANGES as u64) as i64;
    let rows = stmt.query_map([from], |r| {
        let kind = match r.get::<_, i64>(1)? {
            0 => ChangeKind::Added,
            1 => ChangeKind::Modified,
            _ => ChangeKind::Deleted,
        };
        Ok(StoreEvent {
            seq: r.get::<_, i64>(0)? as u64,
            kind,
            key: r.get(2)?,
            rtype: r.get(3)?,
            value: None,
        })
    })?;
    Ok((last, rows.collect::<rusqlite::Result<_>>()?))
}

/// What a batch did beyond its rows, made known only after the commit: the outbox counters,
/// and the changes for the change feed.
#[derive(Default)]
pub(super) struct BatchEffects {
    touched: bool,
    dropped: u64,
    pub events: Vec<StoreEvent>,
    /// The batch's changes to the digest, written once before the commit.
    pub digest: Deltas,
}

/// The counters of the writer that a rolled-back batch or change must put back, as one value
/// (see [`Writer::counters`]).
#[derive(Clone, Copy)]
struct Counters {
    outbox_rows: i64,
    recorded_since_prune: usize,
    changes_since_prune: usize,
    next_change: u64,
}

/// The settle marks and releases a batch took, put back for the next one when it rolls back.
struct Pending {
    marks: Vec<(u64, String)>,
    released: Vec<String>,
}

/// Each job of `batch` failed with `text`.
fn every_one_failed(batch: &[Job], text: String) -> Tried {
    Tried::Done(
        batch
            .iter()
            .map(|_| Err(StoreError::Commit(text.clone())))
            .collect(),
    )
}

/// Each job of `batch` refused for want of room.
fn every_one_refused(batch: &[Job], full: Full) -> Vec<Result<Done, StoreError>> {
    batch
        .iter()
        .map(|_| Err(StoreError::StorageFull(full.clone())))
        .collect()
}

/// How an attempt at a batch ended: committed (or failed) with an outcome per job, or rolled
/// back whole for want of room.
enum Tried {
    Done(Vec<Result<Done, StoreError>>),
    NoRoom(Full),
}

/// What one job did, for its submitter.
pub(super) enum Done {
    Applied(Applied),
    Replaced(Replaced),
    /// Periodic work, which no submitter waits for.
    Maintained,
}

impl Job {
    /// Tells the submitter, who may have stopped waiting. Each job's outcome comes from its
    /// own kind of apply ([`Writer::apply_job`]), so the pairs always match.
    fn answer(self, outcome: Result<Done, StoreError>) {
        let mismatch = || StoreError::Task("a job was given another kind's outcome".into());
        match self {
            Job::Change { done, .. } => {
                let _ = done.send(outcome.and_then(|d| match d {
                    Done::Applied(a) => Ok(a),
                    Done::Replaced(_) | Done::Maintained => Err(mismatch()),
                }));
            }
            Job::Replace { done, .. } => {
                let _ = done.send(outcome.and_then(|d| match d {
                    Done::Replaced(r) => Ok(r),
                    Done::Applied(_) | Done::Maintained => Err(mismatch()),
                }));
            }
            Job::Maintain => {}
        }
    }
}

impl Writer {
    pub fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // No timer anywhere: the writer sleeps only while nothing is queued, and takes what is
        // queued at the moment it wakes. A lone change is committed at once; under load the
        // queue fills while the previous commit's fsync runs, and the next batch takes it all.
        // Periodic work runs between batches, never inside one.
        let mut maintain = false;
        while let Some(first) = jobs.blocking_recv() {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Maintain => maintain = true,
                    job => batch.push(job),
                }
                if batch.len() < MAX_BATCH {
                    next = jobs.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                let outcomes = self.commit_batch(&batch);
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    job.answer(outcome);
                }
            }
            if std::mem::take(&mut maintain) {
                self.maintain();
            }
        }
        // Closing: whatever the broker acknowledged since the last commit is recorded before
        // the database closes, so a clean stop leaves nothing unsettled that was forwarded.
        let marks = self.take_settle_marks();
        let released = self.take_releases();
        if !marks.is_empty() || !released.is_empty() {
            let flushed = self
                .begin_batch(&marks, &released)
                .and_then(|()| self.conn.execute_batch("COMMIT"));
            if let Err(e) = flushed {
                let _ = self.conn.execute_batch("ROLLBACK");
                tracing::warn!(error = %e, marks = marks.len(), "could not record settled message ids at close");
            }
        }
        if let Err(e) = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
            tracing::warn!(error = %e, "final WAL checkpoint failed");
        }
        // The write connection closes (with its final checkpoint) before the claim ends: the
        // next MetaManager never writes beside it.
        let Writer { conn, lock, .. } = self;
        drop(conn);
        drop(lock);
    }

    /// Commits a batch. The common case runs every change straight into one transaction;
    /// only when one fails is the transaction rolled back and the batch run again with a
    /// savepoint per change, so that the failure is isolated without paying for savepoints
    /// every time. A batch that does not fit (past the quota, or refused by the disk) is rolled
    /// back whole and run again guarded by the limit it met: each change alone, those that need
    /// room and do not fit refused with [`StoreError::StorageFull`], the others (deletes among
    /// them) committed. Nothing is half-applied: a refused change is rolled back to its
    /// savepoint.
    fn commit_batch(&mut self, batch: &[Job]) -> Vec<Result<Done, StoreError>> {
        let guard = self.guard_while_full();
        let outcomes = match self.try_batch(batch, guard.as_ref()) {
            Tried::Done(outcomes) => outcomes,
            Tried::NoRoom(full) if guard.is_none() => {
                self.make_room(&full);
                match self.try_batch(batch, Some(&full)) {
                    Tried::Done(outcomes) => outcomes,
                    Tried::NoRoom(full) => every_one_refused(batch, full),
                }
            }
            Tried::NoRoom(full) => every_one_refused(batch, full),
        };
        self.follow_room(batch, &outcomes);
        outcomes
    }

    /// One attempt at a batch, unguarded (`guard` `None`) or guarded by the limit the first
    /// attempt met.
    fn try_batch(&mut self, batch: &[Job], guard: Option<&Full>) -> Tried {
        let started = Instant::now();
        let start = self.counters();
        let pending = Pending {
            marks: self.take_settle_marks(),
            released: self.take_releases(),
        };
        if let Err(e) = self.begin_batch(&pending.marks, &pending.released) {
            return every_one_failed(batch, e.to_string());
        }
        let pages_at_start = match self.shared.space.limit() > 0 {
            true => self.pages_at_start(),
            false => None,
        };
        let mut effect = BatchEffects::default();
        let outcomes = match guard {
            Some(full) => self.apply_isolated(batch, &mut effect, Some(full)),
            None => match self.apply_unguarded(batch, &mut effect, start, &pending) {
                Ok(outcomes) => outcomes,
                Err(tried) => return tried,
            },
        };
        if guard.is_none() {
            let no_room = outcomes.iter().find_map(|o| match o {
                Err(StoreError::StorageFull(full)) => Some(full.clone()),
                _ => None,
            });
            // The quota, for the batch as a whole; guarded, each change was measured alone.
            let no_room = no_room.or_else(|| self.past_quota(pages_at_start));
            if let Some(full) = no_room {
                self.abandon_batch(start, &pending);
                return Tried::NoRoom(full);
            }
        }
        if let Err(tried) = self.commit(batch, &mut effect, start, &pending) {
            return tried;
        }
        self.metrics.commit(started.elapsed(), batch.len());
        self.announce(batch.len(), effect);
        Tried::Done(outcomes)
    }

    /// The batch straight into the open transaction; when a change fails, the transaction is
    /// rolled back and the batch run again with a savepoint per change. A change the disk
    /// refuses ends the attempt: the batch is tried again guarded.
    fn apply_unguarded(
        &mut self,
        batch: &[Job],
        effect: &mut BatchEffects,
        start: Counters,
        pending: &Pending,
    ) -> Result<Vec<Result<Done, StoreError>>, Tried> {
        let fast: rusqlite::Result<Vec<Done>> = batch
            .iter()
            .map(|job| self.apply_job(job, effect))
            .collect();
        let e = match fast {
            Ok(applied) => return Ok(applied.into_iter().map(Ok).collect()),
            Err(e) => e,
        };
        let _ = self.conn.execute_batch("ROLLBACK");
        self.forget_pages();
        self.restore(start);
        *effect = BatchEffects::default();
        if space::is_disk_full(&e) {
            self.requeue_settle_marks(&pending.marks);
            self.requeue_releases(&pending.released);
            return Err(Tried::NoRoom(self.disk_full()));
        }
        if let Err(e) = self.begin_batch(&pending.marks, &pending.released) {
            return Err(every_one_failed(batch, e.to_string()));
        }
        Ok(self.apply_isolated(batch, effect, None))
    }

    /// The digest's one write per scope the batch changed, the pruning when due, and the
    /// commit; a failure rolls the batch back whole. Without the digest's write the batch
    /// cannot commit, or the digest would no longer match the store.
    fn commit(
        &mut self,
        batch: &[Job],
        effect: &mut BatchEffects,
        start: Counters,
        pending: &Pending,
    ) -> Result<(), Tried> {
        let failed = match effect.digest.flush(&self.conn) {
            Err(e) => Some((e, "updating the digest failed")),
            Ok(()) => {
                self.prune_when_due();
                self.conn
                    .execute_batch("COMMIT")
                    .err()
                    .map(|e| (e, "store commit failed"))
            }
        };
        let Some((e, what)) = failed else {
            return Ok(());
        };
        self.abandon_batch(start, pending);
        if space::is_disk_full(&e) {
            return Err(Tried::NoRoom(self.disk_full()));
        }
        let text = e.to_string();
        tracing::error!(error = %text, changes = batch.len(), "{what}");
        Err(every_one_failed(batch, text))
    }

    /// The counters a rollback must put back, taken before a batch or a change.
    fn counters(&self) -> Counters {
        Counters {
            outbox_rows: self.outbox_rows,
            recorded_since_prune: self.recorded_since_prune,
            changes_since_prune: self.changes_since_prune,
            next_change: self.next_change,
        }
    }

    /// Puts the counters back as [`Writer::counters`] took them, all of them.
    fn restore(&mut self, counters: Counters) {
        self.outbox_rows = counters.outbox_rows;
        self.recorded_since_prune = counters.recorded_since_prune;
        self.changes_since_prune = counters.changes_since_prune;
        self.next_change = counters.next_change;
    }

    /// Prunes the remembered message ids and the change history, each once it has grown by
    /// [`PRUNE_EVERY`], inside the batch's transaction; a failure costs only the pruning.
    fn prune_when_due(&mut self) {
        if self.recorded_since_prune >= PRUNE_EVERY {
            if let Err(e) = self.prune_processed() {
                tracing::warn!(error = %e, "pruning remembered message ids failed");
            }
            self.recorded_since_prune = 0;
        }
        if self.changes_since_prune >= PRUNE_EVERY {
            if let Err(e) = self.prune_changes() {
                tracing::warn!(error = %e, "pruning the change history failed");
            }
            self.changes_since_prune = 0;
        }
    }

    /// Makes a committed batch known: the counters, the outbox's length and its sender, and
    /// the change feed. Only after the commit, so nothing announces what is not on disk.
    fn announce(&self, changes: usize, effect: BatchEffects) {
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.shared
            .committed_changes
            .fetch_add(changes as u64, Ordering::Relaxed);
        if effect.touched {
            self.publish_outbox_len();
            if effect.dropped > 0 {
                self.shared
                    .outbox_dropped_full
                    .fetch_add(effect.dropped, Ordering::Relaxed);
                tracing::warn!(
                    dropped = effect.dropped,
                    max = self.outbox_max,
                    "outbox full: oldest messages for the cloud dropped"
                );
            }
            self.shared.outbox_changed.notify_one();
        }
        self.shared.feed.publish(effect.events);
    }

    /// Opens a batch's transaction and applies the settle marks and releases taken for it
    /// before the batch's own changes, so that a redelivery in this batch already sees the
    /// original settled when its forward was handed on before the redelivery arrived, and a
    /// message sent again after it could not be passed on is handled again. When the
    /// transaction cannot be opened, the marks and releases wait for the next one.
    fn begin_batch(&self, marks: &[(u64, String)], released: &[String]) -> rusqlite::Result<()> {
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            self.requeue_settle_marks(marks);
            self.requeue_releases(released);
            return Err(e);
        }
        self.apply_settle_marks(marks);
        self.apply_releases(released);
        Ok(())
    }

    /// Rolls back a batch that could not be committed: the writer's counters return to where
    /// the batch found them, and its marks and releases wait for the next transaction.
    fn abandon_batch(&mut self, start: Counters, pending: &Pending) {
        let _ = self.conn.execute_batch("ROLLBACK");
        self.forget_pages();
        self.restore(start);
        self.requeue_settle_marks(&pending.marks);
        self.requeue_releases(&pending.released);
    }

    /// Each change in its own savepoint: a failing one is rolled back alone. Guarded by a
    /// limit the batch met (`guard`), a change that needs room is refused without being tried
    /// when the disk is full, and rolled back when it takes the live data past the quota.
    fn apply_isolated(
        &mut self,
        batch: &[Job],
        effect: &mut BatchEffects,
        guard: Option<&Full>,
    ) -> Vec<Result<Done, StoreError>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for job in batch {
            if let Some(full @ Full::Disk { .. }) = guard {
                if job.needs_room() {
                    outcomes.push(Err(StoreError::StorageFull(full.clone())));
                    continue;
                }
            }
            let measure = matches!(guard, Some(Full::Quota { .. })) && job.needs_room();
            let pages_before = match measure {
                true => space::pages_in_use(&self.conn).ok(),
                false => None,
            };
            let before = self.counters();
            let events_before = effect.events.len();
            let digest_before = effect.digest.len();
            let applied = self
                .conn
                .execute_batch("SAVEPOINT change")
                .and_then(|()| self.apply_job(job, effect))
                .map_err(|e| self.no_room_or(e))
                .and_then(|a| match self.past_quota(pages_before) {
                    Some(full) => Err(StoreError::StorageFull(full)),
                    None => Ok(a),
                })
                .and_then(|a| {
                    self.conn
                        .execute_batch("RELEASE change")
                        .map(|()| a)
                        .map_err(|e| self.no_room_or(e))
                });
            match applied {
                Ok(a) => outcomes.push(Ok(a)),
                Err(e) => {
                    let _ = self
                        .conn
                        .execute_batch("ROLLBACK TO change; RELEASE change");
                    self.forget_pages();
                    self.restore(before);
                    effect.events.truncate(events_before);
                    effect.digest.truncate(digest_before);
                    outcomes.push(Err(e));
                }
            }
        }
        outcomes
    }

    fn apply_job(&mut self, job: &Job, effect: &mut BatchEffects) -> rusqlite::Result<Done> {
        match job {
            Job::Change { change, .. } => self.apply(change, effect).map(Done::Applied),
            Job::Replace { set, .. } => self.apply_replace(set, effect).map(Done::Replaced),
            Job::Maintain => Ok(Done::Maintained),
        }
    }

    fn apply(&mut self, change: &Change, effect: &mut BatchEffects) -> rusqlite::Result<Applied> {
        if let Some(id) = &change.msg_id {
            if let Some(duplicate) = self.duplicate(id, change)? {
                return Ok(duplicate);
            }
        }
        let conn = &self.conn;
        if let Some((first, last)) = change.forwards_done {
            conn.prepare_cached("DELETE FROM forwards WHERE seq BETWEEN ?1 AND ?2")?
                .execute([first, last])?;
        }
        if !change.outbox_done.is_empty() {
            let mut stmt = conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in &change.outbox_done {
                self.outbox_rows -= stmt.execute([seq])? as i64;
            }
            effect.touched = true;
        }
        // The number of the change this message makes, if it makes one.
        let mut made: Option<i64> = None;
        let outcome = match &change.write {
            Some(w) => {
                let watched = self.shared.feed.watched();
                let (outcome, seen) =
                    apply_write(conn, w, watched, &mut effect.digest, self.next_change)?;
                if let Some(mut event) = feed_event(w, outcome, seen) {
                    self.record_change(&mut event)?;
                    made = Some(event.seq as i64);
                    effect.events.push(event);
                }
                outcome
            }
            None => Outcome::Recorded,
        };
        // Not a database failure: the rest of the batch goes on. The message is not recorded,
        // so its redelivery is tried again rather than acked as done.
        if let Outcome::Rejected(_) = outcome {
            return Ok(Applied {
                outcome,
                queued: false,
                change: None,
            });
        }
        // Nothing goes to the cloud for a write that changed nothing, nor, when it needed
        // its object, for one that found none.
        let changed_nothing = matches!(outcome, Outcome::Unchanged | Outcome::Stale);
        let found_nothing = !outcome.keeps_riders(change.to_cloud_needs_object);
        self.note_sent_patch(change, found_nothing)?;
        let queued = match &change.to_cloud {
            Some(m) if !changed_nothing && !found_nothing => {
                self.enqueue(m, effect)?;
                true
            }
            _ => false,
        };
        let applied = Applied {
            outcome,
            queued,
            change: made.map(|m| m as u64),
        };
        if let Some(id) = &change.msg_id {
            self.record_id(id, applied.settled(), made)?;
        }
        Ok(applied)
    }

    /// What a copy of a message whose id is recorded is ([`Outcome::Duplicate`]), or `None`
    /// for a first copy.
    fn duplicate(&self, id: &str, change: &Change) -> rusqlite::Result<Option<Applied>> {
        let conn = &self.conn;
        let seen: Option<(bool, Option<i64>, Option<i64>)> = conn
            .prepare_cached("SELECT settled, change_seq, run FROM processed WHERE msg_id = ?1")?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((settled, made, run)) = seen else {
            return Ok(None);
        };
        let this_run = run == Some(self.run);
        let current = !this_run && !settled && is_current(conn, change.write.as_ref(), made)?;
        if !this_run {
            // Handled by this run from now on: a further copy is only acked.
            conn.prepare_cached("UPDATE processed SET run = ?2 WHERE msg_id = ?1")?
                .execute(params![id, self.run])?;
        }
        Ok(Some(Applied {
            outcome: Outcome::Duplicate {
                this_run,
                settled,
                current,
            },
            queued: false,
            change: None,
        }))
    }

    /// Remembers a patch sent to the cloud (unless it found no object), so that its answer is
    /// stored, keeping the last [`super::MAX_SENT_PATCHES`]; forgets one that was answered.
    fn note_sent_patch(&self, change: &Change, found_nothing: bool) -> rusqlite::Result<()> {
        if let Some(patch) = change.remember_patch.as_ref().filter(|_| !found_nothing) {
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO sent_patches (msg_id, key, rtype) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![patch.msg_id, patch.key, patch.rtype])?;
            self.conn.prepare_cached(
                "DELETE FROM sent_patches WHERE seq <= (SELECT max(seq) FROM sent_patches) - ?1",
            )?
            .execute([super::MAX_SENT_PATCHES as i64])?;
        }
        if let Some(id) = &change.forget_patch {
            self.conn
                .prepare_cached("DELETE FROM sent_patches WHERE msg_id = ?1")?
                .execute([id])?;
        }
        Ok(())
    }

    /// Records a message's id, with the change it made. Settled when nothing is left to pass
    /// on, because the change was a no-op or its message is already in the outbox, committed
    /// with it; otherwise the caller settles it once the forward is handed on.
    fn record_id(&mut self, id: &str, settled: bool, made: Option<i64>) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO processed (msg_id, settled, change_seq, run)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![id, settled, made, self.run])?;
        self.recorded_since_prune += 1;
        Ok(())
    }

    /// The marks whose forward the broker has acknowledged; the others wait.
    fn take_settle_marks(&self) -> Vec<(u64, String)> {
        let mut pending = self.shared.settle.lock().unwrap_or_else(|p| p.into_inner());
        let Some(delivery) = self.shared.delivery.get() else {
            return std::mem::take(&mut *pending);
        };
        let (ready, waiting) = std::mem::take(&mut *pending)
            .into_iter()
            .partition(|(mark, _)| delivery.reached(*mark));
        *pending = waiting;
        ready
    }

    /// Puts marks back for the next transaction, after this one failed.
    fn requeue_settle_marks(&self, marks: &[(u64, String)]) {
        if marks.is_empty() {
            return;
        }
        let mut pending = self.shared.settle.lock().unwrap_or_else(|p| p.into_inner());
        let room = super::MAX_PENDING_SETTLES.saturating_sub(pending.len());
        pending.extend(marks.iter().take(room).cloned());
    }

    /// Sets the settled flag of each id, inside the open transaction. A failure costs only the
    /// mark (the id stays unsettled, the safe direction), never the batch: a failed statement
    /// leaves the transaction open.
    fn apply_settle_marks(&self, marks: &[(u64, String)]) {
        if marks.is_empty() {
            return;
        }
        let marked = self
            .conn
            .prepare_cached("UPDATE processed SET settled = 1 WHERE msg_id = ?1")
            .and_then(|mut stmt| {
                marks
                    .iter()
                    .try_for_each(|(_, id)| stmt.execute([id]).map(drop))
            });
        if let Err(e) = marked {
            tracing::warn!(error = %e, "could not mark forwarded message ids settled");
        }
    }

    /// The ids to handle again if they come again (see [`super::Store::release`]).
    fn take_releases(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .shared
                .released
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    fn requeue_releases(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut pending = self
            .shared
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let room = super::MAX_PENDING_SETTLES.saturating_sub(pending.len());
        pending.extend(ids.iter().take(room).cloned());
    }

    /// Counts each id as an earlier run's, inside the open transaction: a copy that comes
    /// again is then passed on if its change is still the stored state. A failure leaves the
    /// id as it was, and the batch goes on.
    fn apply_releases(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let released = self
            .conn
            .prepare_cached("UPDATE processed SET run = NULL, settled = 0 WHERE msg_id = ?1")
            .and_then(|mut stmt| ids.iter().try_for_each(|id| stmt.execute([id]).map(drop)));
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release message ids that were not passed on");
        }
    }

    fn enqueue(
        &mut self,
        m: &super::CloudMessage,
        effect: &mut BatchEffects,
    ) -> rusqlite::Result<()> {
        let conn = &self.conn;
        let coalesce_key = m.coalesce.then_some(m.resource.as_str());
        if let Some(key) = coalesce_key {
            // Only the latest update of a resource is worth sending; it takes the place at
            // the end of the queue, after anything it depends on.
            self.outbox_rows -= conn
                .prepare_cached("DELETE FROM outbox WHERE coalesce_key = ?1")?
                .execute([key])? as i64;
        }
        conn.prepare_cached(
            "INSERT INTO outbox (resource, coalesce_key, created_ms, payload)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            m.resource,
            coalesce_key,
            crate::message::now_millis(),
            &m.payload[..]
        ])?;
        self.outbox_rows += 1;
        let max = i64::try_from(self.outbox_max).unwrap_or(i64::MAX);
        let excess = self.outbox_rows.saturating_sub(max);
        if excess > 0 {
            let dropped = conn
                .prepare_cached(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)",
                )?
                .execute([excess])?;
            self.outbox_rows -= dropped as i64;
            effect.dropped += dropped as u64;
        }
        effect.touched = true;
        Ok(())
    }

    /// Numbers `event` and records it in `changes`, in the current transaction.
    pub(super) fn record_change(&mut self, event: &mut StoreEvent) -> rusqlite::Result<()> {
        event.seq = self.next_change;
        let kind = match event.kind {
            ChangeKind::Added => 0,
            ChangeKind::Modified => 1,
            ChangeKind::Deleted => 2,
        };
        self.conn
            .prepare_cached("INSERT INTO changes (seq, kind, key, rtype) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![event.seq as i64, kind, event.key, event.rtype])?;
        self.next_change += 1;
        self.changes_since_prune += 1;
        Ok(())
    }

    /// Keeps the last [`super::feed::HISTORY_CHANGES`] changes in `changes`.
    fn prune_changes(&self) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM changes WHERE seq <= ?1")?
            .execute([self.next_change as i64 - 1 - super::feed::HISTORY_CHANGES as i64])?;
        Ok(())
    }

    fn prune_processed(&self) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "DELETE FROM processed WHERE seq <= (SELECT max(seq) FROM processed) - ?1",
            )?
            .execute([DEDUPE_WINDOW])?;
        Ok(())
    }

    /// Counts the outbox once, at start-up.
    pub fn count_outbox(&mut self) -> rusqlite::Result<()> {
        self.outbox_rows = self
            .conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?;
        self.publish_outbox_len();
        Ok(())
    }

    fn publish_outbox_len(&self) {
        self.shared
            .outbox_len
            .store(self.outbox_rows.max(0) as usize, Ordering::Relaxed);
    }
}

/// Applies `write`, and tells what it saw of the key for the feed event, from the reads it
/// makes anyway: whether the key held anything (ADDED or MODIFIED, watched or not), and only
/// while somebody `watched` the values a watcher is sent (a deleted object, a patch's result).
/// Every change to `meta` goes through [`store_object`] or [`remove_object`], which keep the
/// row's `rv` and the `digest` right. An object it stores is stored with `number`, the number
/// its feed event gets: every write that stores makes exactly one event.
pub(super) fn apply_write(
    conn: &Connection,
    write: &Write,
    watched: bool,
    deltas: &mut Deltas,
    number: u64,
) -> rusqlite::Result<(Outcome, Seen)> {
    let mut seen = Seen {
        watched,
        ..Seen::default()
    };
    let outcome = match write {
        Write::Put { key, rtype, value } => {
            // The one write that reads no value otherwise: only the old `rv`, for the digest.
            let old = stored_rv(conn, key)?;
            seen.existed = old.is_some();
            store_object(
                conn,
                deltas,
                key,
                rtype,
                text(value)?,
                old.flatten().as_deref(),
                number,
            )?;
            Outcome::Stored
        }
        Write::PutIfChanged { key, rtype, value } => {
            let value = text(value)?;
            let stored = stored_row(conn, key)?;
            seen.existed = stored.is_some();
            let mut old_rv = None;
            if let Some((old, rv)) = &stored {
                let stored_version = match rv {
                    Some(rv) => Cow::Borrowed(rv.as_str()),
                    None => digest::resource_version(old.as_bytes()),
                };
                let incoming = digest::resource_version(value.as_bytes());
                if super::version_is_older(&incoming, &stored_version) {
                    return Ok((Outcome::Stale, seen));
                }
                if same_json(old, value) {
                    return Ok((Outcome::Unchanged, seen));
                }
                old_rv = rv.as_deref();
            }
            store_object(conn, deltas, key, rtype, value, old_rv, number)?;
            Outcome::Stored
        }
        Write::Delete { key, uid } => {
            let Some((stored, rv)) = stored_row(conn, key)? else {
                return Ok((Outcome::Absent, seen));
            };
            seen.existed = true;
            if let Some(uid) = uid {
                if super::object_uid(&stored).is_some_and(|s| &s != uid) {
                    return Ok((Outcome::UidMismatch, seen));
                }
            }
            remove_object(conn, deltas, key, rv.as_deref())?;
            seen.before = watched.then_some(stored);
            Outcome::Deleted
        }
        Write::Patch { key, rtype, patch } => {
            let Some((stored, rv)) = stored_row(conn, key)? else {
                return Ok((Outcome::Absent, seen));
            };
            seen.existed = true;
            match patch.apply(&stored) {
                Ok(Patched::Changed(value)) => {
                    store_object(conn, deltas, key, rtype, &value, rv.as_deref(), number)?;
                    seen.after = watched.then_some(value);
                    Outcome::Patched { changed: true }
                }
                Ok(Patched::Unchanged) => Outcome::Patched { changed: false },
                Err(e) => Outcome::Rejected(e),
            }
        }
    };
    Ok((outcome, seen))
}

/// Stores `value` under `key` with its `rv` and `number`, the number of this change (the
/// local API's version of the object, see [`super::feed`]), and moves the digest from the old
/// object's term (`old_rv`: `None` when nothing was stored, or the row was not counted yet) to
/// the new one.
pub(super) fn store_object(
    conn: &Connection,
    deltas: &mut Deltas,
    key: &str,
    rtype: &str,
    value: &str,
    old_rv: Option<&str>,
    number: u64,
) -> rusqlite::Result<()> {
    let rv = digest::resource_version(value.as_bytes());
    conn.prepare_cached(
        "INSERT INTO meta (key, type, value, rv, change_seq) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(key) DO UPDATE SET type = excluded.type, value = excluded.value,
                                        rv = excluded.rv, change_seq = excluded.change_seq",
    )?
    .execute(params![key, rtype, value, rv.as_ref(), number as i64])?;
    deltas.replace(key, old_rv, Some(&rv));
    Ok(())
}

/// Deletes `key`, and takes its term (`rv`, `None` when it was not counted) out of the digest.
pub(super) fn remove_object(
    conn: &Connection,
    deltas: &mut Deltas,
    key: &str,
    rv: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM meta WHERE key = ?1")?
        .execute([key])?;
    deltas.replace(key, rv, None);
    Ok(())
}

/// Whether the change a message made is still the stored state: passing the message on again
/// then cannot undo a later change. A message without a write changes nothing in `meta`.
fn is_current(
    conn: &Connection,
    write: Option<&Write>,
    made: Option<i64>,
) -> rusqlite::Result<bool> {
    let Some(write) = write else {
        return Ok(true);
    };
    // A patch that changed its object is a delta: applying it again to tell whether it is in
    // effect says nothing (an `add` to a list changes it again, a `test` fails). It is in
    // effect while no later change of its key is recorded, known while its own change is
    // still in the recorded history.
    if let (Write::Patch { key, .. }, Some(seq)) = (write, made) {
        let own: bool = conn
            .prepare_cached("SELECT 1 FROM changes WHERE seq = ?1")?
            .exists([seq])?;
        if own {
            let later: bool = conn
                .prepare_cached("SELECT 1 FROM changes WHERE key = ?1 AND seq > ?2")?
                .exists(params![key, seq])?;
            return Ok(!later);
        }
    }
    let stored = stored_value(conn, write.key())?;
    Ok(match (write, stored) {
        (Write::Put { value, .. } | Write::PutIfChanged { value, .. }, Some(stored)) => {
            same_json(&stored, text(value)?)
        }
        (Write::Put { .. } | Write::PutIfChanged { .. }, None) => false,
        (Write::Delete { .. }, None) => true,
        // A pod delete with a uid removes only the pod of that uid: it is still in effect
        // while the stored pod is another one.
        (Write::Delete { uid: Some(uid), .. }, Some(stored)) => {
            super::object_uid(&stored).is_some_and(|s| &s != uid)
        }
        (Write::Delete { uid: None, .. }, Some(_)) => false,
        // A patch of an absent object changed nothing; one of a stored object is in effect
        // while applying it again changes nothing.
        (Write::Patch { .. }, None) => true,
        (Write::Patch { patch, .. }, Some(stored)) => {
            matches!(patch.apply(&stored), Ok(Patched::Unchanged))
        }
    })
}

/// What the change feed reports for a write that changed `meta`; `None` when it did not.
/// `before` is the value the key held, and `after` the value a patch stored, both read only
/// while somebody watches; without a watcher the event carries no value (see
/// [`StoreEvent::value`]).
pub(super) fn feed_event(write: &Write, outcome: Outcome, seen: Seen) -> Option<StoreEvent> {
    let Seen {
        before,
        existed,
        after,
        watched,
    } = seen;
    match (write, outcome) {
        (
            Write::Put { key, rtype, value } | Write::PutIfChanged { key, rtype, value },
            Outcome::Stored,
        ) => Some(StoreEvent {
            seq: 0,
            kind: if existed {
                ChangeKind::Modified
            } else {
                ChangeKind::Added
            },
            key: key.clone(),
            rtype: rtype.clone(),
            value: watched.then(|| value.clone()),
        }),
        (Write::Delete { key, .. }, Outcome::Deleted) => Some(StoreEvent {
            seq: 0,
            kind: ChangeKind::Deleted,
            key: key.clone(),
            rtype: Resource::parse(key)
                .map(|r| r.rtype().to_owned())
                .unwrap_or_default(),
            value: before.map(bytes::Bytes::from),
        }),
        (Write::Patch { key, rtype, .. }, Outcome::Patched { changed: true }) => Some(StoreEvent {
            seq: 0,
            kind: ChangeKind::Modified,
            key: key.clone(),
            rtype: rtype.clone(),
            value: after.map(bytes::Bytes::from),
        }),
        _ => None,
    }
}

/// What the writer saw of a key around one write, for its feed event.
#[derive(Default)]
pub(super) struct Seen {
    /// A deleted object, kept only while somebody watches.
    pub before: Option<String>,
    /// Whether the key held anything before the write, always known.
    pub existed: bool,
    /// A patch's result, kept only while somebody watches.
    pub after: Option<String>,
    pub watched: bool,
}

/// The `rv` of the object stored under `key`: `None` when nothing is stored, `Some(None)` for a
/// row not counted yet. Reads the row, not its value.
fn stored_rv(conn: &Connection, key: &str) -> rusqlite::Result<Option<Option<String>>> {
    conn.prepare_cached("SELECT rv FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// The stored value of `key` and its `rv`.
fn stored_row(conn: &Connection, key: &str) -> rusqlite::Result<Option<(String, Option<String>)>> {
    conn.prepare_cached("SELECT value, rv FROM meta WHERE key = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// Values are stored as TEXT, as in KubeEdge's table.
fn text(value: &[u8]) -> rusqlite::Result<&str> {
    std::str::from_utf8(value).map_err(rusqlite::Error::from)
}

pub(super) fn stored_value(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
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
