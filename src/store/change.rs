//! What a write is and what it did: the types a caller hands the store ([`Write`], [`Change`],
//! [`CloudMessage`]) and gets back ([`Applied`], [`Outcome`]), and the change feed's
//! [`StoreEvent`]. Apart from the [`Store`](super::Store) that takes them, because the
//! operations, the cloud side and the local API build and read these without the store's
//! machinery, and the writer's files share them.

use std::sync::Arc;

use bytes::Bytes;

/// One change to the `meta` table.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert, replacing any old value. `value` is JSON text, usually a slice of the received
    /// message: shared, not copied.
    Put {
        key: String,
        rtype: String,
        value: Bytes,
    },
    /// Store only when `value` differs, compared as JSON, from what is stored.
    PutIfChanged {
        key: String,
        rtype: String,
        value: Bytes,
    },
    /// Remove `key`; with `uid`, only when the stored object's `metadata.uid` is that uid.
    Delete { key: String, uid: Option<String> },
    /// Apply `patch` to the value stored under `key` at this point of the transaction, so that
    /// it builds on every change queued before it; store the result when it differs. Nothing
    /// when `key` is absent. Shared: a redelivery check applies it again.
    Patch {
        key: String,
        rtype: String,
        patch: Arc<crate::patch::Patch>,
    },
}

impl Write {
    /// The key the write changes.
    pub fn key(&self) -> &str {
        match self {
            Write::Put { key, .. }
            | Write::PutIfChanged { key, .. }
            | Write::Delete { key, .. }
            | Write::Patch { key, .. } => key,
        }
    }
}

/// Patches waiting for the cloud's answer, at most: past it the oldest is forgotten, in the
/// `sent_patches` table as in the cloud side's memory, which holds the same list.
pub const MAX_SENT_PATCHES: usize = 4096;

/// A patch passed on to the cloud, by its msg_id, and the object its answer is stored as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentPatch {
    pub msg_id: String,
    pub key: String,
    pub rtype: String,
}

/// A message for the cloud, kept in the outbox until the cloud is back.
#[derive(Debug, Clone)]
pub struct CloudMessage {
    pub resource: String,
    pub payload: Bytes,
    /// An update: replaces any queued update of the same resource.
    pub coalesce: bool,
}

/// Everything one inbound message changes, committed together.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// The message's id, remembered so that a redelivery is recognised and not applied twice.
    pub msg_id: Option<String>,
    pub write: Option<Write>,
    /// Queued in the outbox, in the same transaction, unless the write changed nothing.
    pub to_cloud: Option<CloudMessage>,
    /// `to_cloud` only when the write found its object: not after a patch or delete of an
    /// absent key (an edged patch is passed on then; the local API's is refused).
    pub to_cloud_needs_object: bool,
    /// Outbox entries that have been sent (or dropped), to remove.
    pub outbox_done: Vec<i64>,
    /// A patch passed on to the cloud whose answer is to be stored: kept with the change, so
    /// that an answer after a restart still finds it (not when the patch is rejected).
    pub remember_patch: Option<SentPatch>,
    /// The id of a patch whose answer came: no longer waited for.
    pub forget_patch: Option<String>,
    /// A replace's forwards to edged (rows of `forwards`, first and last), which the broker
    /// has acknowledged: no longer to send after a restart.
    pub forwards_done: Option<(i64, i64)>,
}

impl From<Write> for Change {
    fn from(write: Write) -> Self {
        Self {
            write: Some(write),
            ..Self::default()
        }
    }
}

/// What a committed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    Unchanged,
    /// An update older than the stored object, by `metadata.resourceVersion`: held back,
    /// nothing stored or passed on (see [`super::resource_version_is_older`]).
    Stale,
    Deleted,
    /// Delete or patch of a key that was not stored.
    Absent,
    /// Delete whose uid did not match the stored object's; nothing was removed.
    UidMismatch,
    /// The message id was seen before: nothing was applied again.
    ///
    /// `this_run`: the id was recorded since this MetaManager started, so the first copy is
    /// being handled or was handled, and passes on what there is to pass on: this copy is only
    /// acked, however close behind the first it came. `settled` and `current` are looked at
    /// only for an id from an earlier run (before a restart).
    ///
    /// `settled`: nothing is left to pass on for the original (a no-op, its message for the
    /// cloud is in the outbox, or its forward was acknowledged by the broker and recorded with
    /// [`super::Store::settle`]). `current`, looked at only when not settled: the original's change is
    /// still the stored state (an insert or update whose content equals the stored value as
    /// JSON, a delete whose key, or pod of that uid, is absent, or a message that changes
    /// nothing in `meta`), so passing it on again cannot undo a later change.
    Duplicate {
        this_run: bool,
        settled: bool,
        current: bool,
    },
    /// Only the message id was recorded (a change with no write).
    Recorded,
    /// A patch was applied to the stored object; `changed`: the result differed and was stored.
    Patched {
        changed: bool,
    },
    /// A patch could not be applied: nothing was stored, queued, or remembered of the message,
    /// so a redelivery is tried again.
    Rejected(crate::patch::PatchError),
}

impl Outcome {
    /// Whether what rides with the write is kept: its message for the cloud, its waiting
    /// patch's row. Not after a rejected write, nor, when the change `needs_object`
    /// ([`Change::to_cloud_needs_object`]), after one that found none.
    pub fn keeps_riders(&self, needs_object: bool) -> bool {
        match self {
            Outcome::Rejected(_) => false,
            Outcome::Absent => !needs_object,
            _ => true,
        }
    }
}

/// The result of one committed change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// Its message for the cloud went into the outbox.
    pub queued: bool,
    /// The number the change to `meta` got in the change feed, when it made one.
    pub change: Option<u64>,
}

impl Applied {
    /// Whether nothing is left to pass on for the message: it changed nothing, its message for
    /// the cloud is in the outbox, or it is a repeat of a message handled in this run or of a
    /// settled one. The writer
    /// records a new message's id with this flag; the others are settled by their caller with
    /// [`super::Store::settle`] once the broker has acknowledged their forward.
    pub fn settled(&self) -> bool {
        self.queued
            || matches!(
                self.outcome,
                Outcome::Unchanged
                    | Outcome::Stale
                    | Outcome::Duplicate { settled: true, .. }
                    | Outcome::Duplicate { this_run: true, .. }
            )
    }
}

/// A queued message for the cloud.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub seq: i64,
    pub created_ms: i64,
    pub payload: Bytes,
}

/// What a committed change did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed change to the `meta` table, as the change feed reports it.
#[derive(Debug, Clone)]
pub struct StoreEvent {
    /// Its number in the feed, increasing by one per change.
    pub seq: u64,
    pub kind: ChangeKind,
    pub key: String,
    pub rtype: String,
    /// JSON text: the new value, or for a deletion the last stored one. `None` when nobody
    /// watched at the time: the feed then keeps no payloads (a 1 MB object updated a thousand
    /// times would otherwise be held a thousand times), and a watcher that later resumes over
    /// this change reads the key's current value instead.
    pub value: Option<Bytes>,
}

impl StoreEvent {
    /// What the feed's history counts against its byte budget for this change.
    pub fn size(&self) -> usize {
        const OVERHEAD: usize = 64;
        OVERHEAD + self.key.len() + self.rtype.len() + self.value.as_ref().map_or(0, Bytes::len)
    }
}
