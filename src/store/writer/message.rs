//! One message's change, applied in the batch's transaction: the redelivery check on its id,
//! its write, its message for the cloud, its waiting patch, and its id recorded, so that all of
//! them are on disk together or none is.

use rusqlite::{params, Connection, OptionalExtension};

use super::write::{apply_write, feed_event, same_json, stored_value, text, Meta};
use super::{BatchEffects, Done, Writer, DEDUPE_WINDOW};
use crate::patch::Patched;
use crate::store::{object_uid, Applied, Change, Job, Outcome, Write};

impl Writer {
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

    /// Applies one message's change; a repeat of a recorded id is reported, not applied again.
    fn apply(&mut self, change: &Change, effect: &mut BatchEffects) -> rusqlite::Result<Applied> {
        if let Some(id) = &change.msg_id {
            if let Some(duplicate) = self.duplicate(id, change)? {
                return Ok(duplicate);
            }
        }
        if let Some((first, last)) = change.forwards_done {
            self.conn
                .prepare_cached("DELETE FROM forwards WHERE seq BETWEEN ?1 AND ?2")?
                .execute([first, last])?;
        }
        self.remove_sent(&change.outbox_done, effect)?;
        // The number of the change this message makes, if it makes one.
        let mut made: Option<i64> = None;
        let outcome = match &change.write {
            Some(w) => {
                let watched = self.shared.feed.watched();
                let meta = Meta {
                    conn: &self.conn,
                    deltas: &mut effect.digest,
                    number: self.next_change,
                };
                let (outcome, seen) = apply_write(meta, w, watched)?;
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
    /// stored, keeping the last [`crate::store::MAX_SENT_PATCHES`]; forgets one that was answered.
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
            .execute([crate::store::MAX_SENT_PATCHES as i64])?;
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

    pub(super) fn prune_processed(&self) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "DELETE FROM processed WHERE seq <= (SELECT max(seq) FROM processed) - ?1",
            )?
            .execute([DEDUPE_WINDOW])?;
        Ok(())
    }
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
            object_uid(&stored).is_some_and(|s| &s != uid)
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
