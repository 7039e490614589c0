//! The writer's loop: whatever is queued, taken as one batch into one transaction (group
//! commit: one fsync for many messages, none held back for company), each job applied by its
//! own step, and the batch's effects made known only once it is on disk.
//!
//! Here too are the rollbacks, which must leave nothing of a failed batch or change behind: the
//! database returns to the transaction's start or the change's savepoint, the writer's
//! counters to the one value ([`Counters`]) taken there, and the batch's marks and releases
//! wait for the next transaction.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{BatchEffects, Done, Writer};
use crate::store::space::{self, Full};
use crate::store::{Job, StoreError};

/// Most changes committed in one transaction; bounds the latency a batch adds to its first.
const MAX_BATCH: usize = 512;
/// Ids, and changes, recorded between two prunings of their tables.
const PRUNE_EVERY: usize = 1_000;

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
        self.roll_back("ROLLBACK", start);
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

    /// Applies one job inside the open transaction, by its kind.
    pub(super) fn apply_job(
        &mut self,
        job: &Job,
        effect: &mut BatchEffects,
    ) -> rusqlite::Result<Done> {
        match job {
            Job::Change { change, .. } => self.apply(change, effect).map(Done::Applied),
            Job::Replace { set, .. } => self.apply_replace(set, effect).map(Done::Replaced),
            Job::Maintain => Ok(Done::Maintained),
        }
    }

    /// Rolls the database back by `statement` (the transaction, or a change's savepoint) and
    /// the writer's counters with it, whole, to `to`, taken there: every rollback of a batch or
    /// a change goes through here, so none puts back only some of them.
    fn roll_back(&mut self, statement: &str, to: Counters) {
        let _ = self.conn.execute_batch(statement);
        self.forget_pages();
        self.restore(to);
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
        self.roll_back("ROLLBACK", start);
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
            let (before, effects_before) = (self.counters(), effect.mark());
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
                    self.roll_back("ROLLBACK TO change; RELEASE change", before);
                    effect.rewind(effects_before);
                    outcomes.push(Err(e));
                }
            }
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use rusqlite::Connection;

    use crate::store::tests::put;
    use crate::store::{Change, ChangeKind, CloudMessage, Outcome, Store, StoreOptions, Write};

    /// A change rolled back to its savepoint leaves nothing of itself among the batch's
    /// effects: the outbox row its message pushed out is still there, and no drop is counted.
    #[tokio::test]
    async fn a_change_rolled_back_to_its_savepoint_counts_no_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let options = StoreOptions {
            outbox_max: 1,
            ..StoreOptions::default()
        };
        let store = Store::open(&path, options).unwrap();
        let change = |id: &str| Change {
            msg_id: Some(id.into()),
            to_cloud: Some(CloudMessage {
                resource: format!("ns/pod/{id}"),
                payload: Bytes::from_static(b"{}"),
                coalesce: false,
            }),
            ..Change::default()
        };
        assert!(store.write(change("first")).await.unwrap().queued);
        // Fails after its message went into the outbox, which pushed the first one out.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER reject_bad BEFORE INSERT ON processed WHEN NEW.msg_id = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'rejected by test trigger'); END;",
            )
            .unwrap();
        let err = store.write(change("bad")).await.unwrap_err().to_string();
        assert!(err.contains("rejected by test trigger"), "{err}");
        assert_eq!(store.outbox_dropped_full(), 0);
        assert_eq!(store.outbox_len(), 1);
        let kept = store.outbox_batch(10).await.unwrap();
        assert_eq!(kept.len(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn one_failed_write_does_not_sink_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
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
        assert_eq!(seed.await.unwrap().unwrap().outcome, Outcome::Stored);
        assert_eq!(before.await.unwrap().unwrap().outcome, Outcome::Stored);
        let err = bad.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("rejected by test trigger"), "{err}");
        assert_eq!(after.await.unwrap().unwrap().outcome, Outcome::Stored);
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

    /// A patch sees what was queued before it in the same transaction; one that cannot be
    /// applied fails alone, and a patch that changed the object is a MODIFIED change.
    #[tokio::test]
    async fn a_patch_builds_on_the_writes_before_it_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let mut feed = store.subscribe_changes();
        let patch = |key: &str, content: &str| Write::Patch {
            key: key.into(),
            rtype: "pod".into(),
            patch: Arc::new(
                crate::patch::Patch::parse(content.as_bytes(), "pod", 1 << 20).expect("a patch"),
            ),
        };
        // Stall the writer on its first write while the others queue up behind it.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let seed = store.submit(put("ns/pod/seed", "{}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let update = Write::PutIfChanged {
            key: "ns/pod/p".into(),
            rtype: "pod".into(),
            value: Bytes::from_static(br#"{"spec":{},"status":{"phase":"Pending"}}"#),
        };
        let queued = [
            update,
            patch("ns/pod/p", r#"{"status":{"phase":"Running"}}"#),
            patch(
                "ns/pod/p",
                r#"[{"op":"test","path":"/status/phase","value":"Pending"}]"#,
            ),
            patch("ns/pod/absent", r#"{"status":{"phase":"Running"}}"#),
            put("ns/pod/b", "{}"),
        ];
        let mut pending = Vec::new();
        for write in queued {
            pending.push(store.submit(write).await.unwrap());
        }
        other.execute_batch("COMMIT").unwrap();
        seed.await.unwrap().unwrap();
        let mut outcomes = Vec::new();
        for p in pending {
            outcomes.push(p.await.unwrap().unwrap().outcome);
        }
        let failed = crate::patch::PatchError::Operation {
            op: 0,
            failure: crate::patch::OpFailure::TestFailed,
        };
        assert_eq!(
            outcomes,
            [
                Outcome::Stored,
                Outcome::Patched { changed: true },
                Outcome::Rejected(failed),
                Outcome::Absent,
                Outcome::Stored,
            ]
        );
        assert_eq!(store.commits(), (2, 6), "the rest in one transaction");
        let running = r#"{"spec":{},"status":{"phase":"Running"}}"#;
        assert_eq!(
            store.get("ns/pod/p").await.unwrap().as_deref(),
            Some(running)
        );
        assert_eq!(store.get("ns/pod/absent").await.unwrap(), None);
        let mut seen = Vec::new();
        while let Ok(e) = feed.try_recv() {
            seen.push((e.kind, e.key.clone(), e.value.clone()));
        }
        let b = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        assert_eq!(
            seen[1..],
            [
                (
                    ChangeKind::Added,
                    "ns/pod/p".into(),
                    b(r#"{"spec":{},"status":{"phase":"Pending"}}"#)
                ),
                (ChangeKind::Modified, "ns/pod/p".into(), b(running)),
                (ChangeKind::Added, "ns/pod/b".into(), b("{}")),
            ]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_lone_write_is_committed_without_waiting_for_company() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        // Nothing else is queued or will be: if the writer held a batch open for more
        // writes, this would never resolve.
        let applied = store.write(put("ns/pod/alone", "{}")).await.unwrap();
        assert_eq!(applied.outcome, Outcome::Stored);
        assert_eq!(
            store.commits(),
            (1, 1),
            "committed on its own, in its own transaction"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn queued_writes_share_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        // Stall the writer on its first write while 100 more queue up behind it.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let first = store.submit(put("ns/pod/first", "{}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut rest = Vec::new();
        for i in 0..100 {
            rest.push(
                store
                    .submit(put(&format!("ns/pod/p{i}"), "{}"))
                    .await
                    .unwrap(),
            );
        }
        other.execute_batch("COMMIT").unwrap();
        first.await.unwrap().unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        assert_eq!(
            store.commits(),
            (2, 101),
            "one commit for the first, one for the rest"
        );
        store.close().await;
    }
}
