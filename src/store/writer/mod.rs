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
//! This file holds what the writer's jobs share: the [`Writer`] itself, what a batch collects
//! for after its commit, and what a job tells its submitter. Each job is a file of its own, as
//! an `impl Writer` block or free functions beside it:
//! - [`schema`]: the tables and their migrations, and what a start reads back;
//! - [`batch`]: the loop, one transaction per batch, and the rollbacks that put the writer
//!   back as the batch or change found it;
//! - [`message`]: one message's change (its id, write, message for the cloud, waiting patch);
//! - [`replace`]: a whole scope replaced by the cloud's set, made of the single-write step;
//! - [`write`]: the single-write step, through which every change to `meta` goes;
//! - [`outbox`]: the messages for the cloud, and their count;
//! - [`settle`]: the settle marks and releases queued between commits;
//! - [`room`]: the quota, a full disk, and compaction.

mod batch;
mod message;
mod outbox;
pub(super) mod replace;
mod room;
pub(super) mod schema;
mod settle;
mod write;

use std::sync::Arc;
use std::time::Instant;

use rusqlite::Connection;

use super::digest::Deltas;
use super::{Applied, Shared, StoreEvent};
use replace::Replaced;

/// How many message ids are remembered for recognising redeliveries.
pub const DEDUPE_WINDOW: i64 = 10_000;

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
    /// This run's number ([`schema::start_run`]), recorded with each message id.
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

/// What a batch did beyond its rows, made known only after the commit: the outbox counters,
/// and the changes for the change feed.
#[derive(Default)]
pub(super) struct BatchEffects {
    /// The outbox changed: its length is published and its sender woken.
    touched: bool,
    /// Messages for the cloud dropped because the outbox was full.
    dropped: u64,
    pub events: Vec<StoreEvent>,
    /// The batch's changes to the digest, written once before the commit.
    pub digest: Deltas,
}

/// How far a batch's effects had got before a change, for putting them back when the change
/// is rolled back to its savepoint (see [`BatchEffects::mark`]).
#[derive(Clone, Copy)]
struct EffectsMark {
    touched: bool,
    dropped: u64,
    events: usize,
    digest: usize,
}

impl BatchEffects {
    /// Where the effects stand, taken before a change.
    fn mark(&self) -> EffectsMark {
        EffectsMark {
            touched: self.touched,
            dropped: self.dropped,
            events: self.events.len(),
            digest: self.digest.len(),
        }
    }

    /// Forgets what was added since `mark`: a rolled-back change announces nothing, and the
    /// outbox rows it dropped were not dropped.
    fn rewind(&mut self, mark: EffectsMark) {
        self.touched = mark.touched;
        self.dropped = mark.dropped;
        self.events.truncate(mark.events);
        self.digest.truncate(mark.digest);
    }
}

/// What one job did, for its submitter.
pub(super) enum Done {
    Applied(Applied),
    Replaced(Replaced),
    /// Periodic work, which no submitter waits for.
    Maintained,
}

#[cfg(test)]
mod tests {
    //! Helpers for the tests of the writer's files.

    use std::path::Path;

    use rusqlite::{Connection, OptionalExtension};

    use crate::store::{Applied, Change, Outcome, Store, StoreOptions, Write};

    /// Writes `change` in a run of its own (the store opened for it, closed after): a repeat
    /// written so is one from before a restart.
    pub(super) async fn write_in_new_run(path: &Path, change: impl Into<Change>) -> Applied {
        let store = Store::open(path, StoreOptions::default()).unwrap();
        let applied = store.write(change).await.unwrap();
        store.close().await;
        applied
    }

    /// A change of the message `id`.
    pub(super) fn with_id(id: &str, write: Option<Write>) -> Change {
        Change {
            msg_id: Some(id.into()),
            write,
            ..Change::default()
        }
    }

    /// The settled flag recorded for the message `id`, read beside the store.
    pub(super) fn settled_flag(path: &Path, id: &str) -> Option<bool> {
        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row(
                "SELECT settled FROM processed WHERE msg_id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
    }

    /// A repeat of an id from an earlier run.
    pub(super) const fn dup(settled: bool, current: bool) -> Outcome {
        Outcome::Duplicate {
            this_run: false,
            settled,
            current,
        }
    }

    /// A repeat of an id recorded in this run.
    pub(super) const fn again(settled: bool) -> Outcome {
        Outcome::Duplicate {
            this_run: true,
            settled,
            current: false,
        }
    }
}
