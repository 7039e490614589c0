//! One message's change, applied in the batch's transaction: the redelivery check on its id
//! (with [`is_current`] for a repeat from an earlier run), its write, its message for the cloud,
//! its waiting patch, and its id recorded, so that all of them are on disk together or none is.
//! The remembered ids are pruned here too, to the last [`DEDUPE_WINDOW`].

use rusqlite::{params, Connection, OptionalExtension};

use super::write::{apply_write, feed_event, same_json, stored_value, text, Meta};
use super::{BatchEffects, Writer, DEDUPE_WINDOW};
use crate::patch::Patched;
use crate::store::{object_uid, Applied, Change, Outcome, Write};

impl Writer {
    /// Applies one message's change; a repeat of a recorded id is reported, not applied again.
    pub(super) fn apply(
        &mut self,
        change: &Change,
        effect: &mut BatchEffects,
    ) -> rusqlite::Result<Applied> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::store::tests::put;
    use crate::store::writer::tests::{again, dup, with_id, write_in_new_run};
    use crate::store::{Change, CloudMessage, Outcome, Store, StoreOptions, Write};

    #[tokio::test]
    async fn a_message_for_the_cloud_that_needs_its_object_is_not_queued_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        let change = |needs_object: bool| Change {
            write: Some(Write::Patch {
                key: "ns/pod/absent".into(),
                rtype: "pod".into(),
                patch: Arc::new(
                    crate::patch::Patch::parse(br#"{"status":{}}"#, "pod", 1 << 20).unwrap(),
                ),
            }),
            to_cloud: Some(CloudMessage {
                resource: "ns/pod/absent".into(),
                payload: bytes::Bytes::from_static(b"{}"),
                coalesce: false,
            }),
            to_cloud_needs_object: needs_object,
            ..Change::default()
        };
        let applied = store.write(change(true)).await.unwrap();
        assert_eq!(applied.outcome, Outcome::Absent);
        assert!(!applied.queued);
        assert_eq!(store.outbox_len(), 0);
        // An edged patch of an absent object is passed on all the same.
        let applied = store.write(change(false)).await.unwrap();
        assert!(applied.queued);
        assert_eq!(store.outbox_len(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn a_redelivered_patch_is_current_while_applying_it_again_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let patch = |key: &str| {
            let content = br#"{"status":{"phase":"Running"}}"#;
            Some(Write::Patch {
                key: key.into(),
                rtype: "pod".into(),
                patch: Arc::new(crate::patch::Patch::parse(content, "pod", 1 << 20).unwrap()),
            })
        };
        let outcome = |c: Change| {
            let path = path.clone();
            async move { write_in_new_run(&path, c).await.outcome }
        };
        write_in_new_run(&path, put("ns/pod/p", "{}")).await;
        let first = write_in_new_run(&path, with_id("x", patch("ns/pod/p"))).await;
        assert_eq!(first.outcome, Outcome::Patched { changed: true });
        assert!(!first.settled(), "a patch is passed on");
        assert_eq!(
            outcome(with_id("x", patch("ns/pod/p"))).await,
            dup(false, true)
        );
        write_in_new_run(&path, put("ns/pod/p", r#"{"status":{"phase":"Failed"}}"#)).await;
        assert_eq!(
            outcome(with_id("x", patch("ns/pod/p"))).await,
            dup(false, false),
            "superseded"
        );
        // Of an absent object, nothing was changed: always current.
        assert_eq!(
            outcome(with_id("y", patch("ns/pod/q"))).await,
            Outcome::Absent
        );
        assert_eq!(
            outcome(with_id("y", patch("ns/pod/q"))).await,
            dup(false, true)
        );
    }

    #[tokio::test]
    async fn a_redelivered_json_patch_that_changed_its_object_is_current_until_a_later_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        // Not idempotent: applied again, it would add a second condition.
        let add = || {
            let content =
                br#"[{"op":"add","path":"/status/conditions/-","value":{"type":"Ready"}}]"#;
            Some(Write::Patch {
                key: "ns/pod/p".into(),
                rtype: "pod".into(),
                patch: Arc::new(crate::patch::Patch::parse(content, "pod", 1 << 20).unwrap()),
            })
        };
        write_in_new_run(&path, put("ns/pod/p", r#"{"status":{"conditions":[]}}"#)).await;
        let first = write_in_new_run(&path, with_id("x", add())).await;
        assert_eq!(first.outcome, Outcome::Patched { changed: true });
        // Its forward was never handed on (a crash): the redelivery is still in effect.
        let again = write_in_new_run(&path, with_id("x", add())).await;
        assert_eq!(again.outcome, dup(false, true), "passed on again, not lost");
        write_in_new_run(&path, put("ns/pod/p", "{}")).await;
        let later = write_in_new_run(&path, with_id("x", add())).await;
        assert_eq!(
            later.outcome,
            dup(false, false),
            "superseded by a later change"
        );
    }

    #[tokio::test]
    async fn a_duplicate_reports_whether_its_change_is_still_the_stored_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        // Each write in a run of its own: every repeat below is one from before a restart.
        let outcome = |c: Change| {
            let path = path.clone();
            async move { write_in_new_run(&path, c).await.outcome }
        };
        let pod = "ns/pod/p";
        let update = |v: &str| Write::PutIfChanged {
            key: pod.into(),
            rtype: "pod".into(),
            value: Bytes::copy_from_slice(v.as_bytes()),
        };
        let delete = |uid: Option<&str>| Write::Delete {
            key: pod.into(),
            uid: uid.map(Into::into),
        };
        let x = r#"{"metadata":{"uid":"u1"},"spec":{"v":1}}"#;
        let y = r#"{"metadata":{"uid":"u1"},"spec":{"v":2}}"#;

        // Insert X: a redelivery is current while X is stored, whatever its key order.
        assert_eq!(
            outcome(with_id("a", Some(put(pod, x)))).await,
            Outcome::Stored
        );
        assert_eq!(
            outcome(with_id("a", Some(put(pod, x)))).await,
            dup(false, true)
        );
        // Update to Y supersedes it; the update itself is current.
        assert_eq!(
            outcome(with_id("b", Some(update(y)))).await,
            Outcome::Stored
        );
        assert_eq!(
            outcome(with_id("a", Some(put(pod, x)))).await,
            dup(false, false)
        );
        let y_reordered = r#"{"spec":{"v":2},"metadata":{"uid":"u1"}}"#;
        assert_eq!(
            outcome(with_id("b", Some(update(y_reordered)))).await,
            dup(false, true)
        );
        // A delete with the pod's uid removes it and supersedes both.
        assert_eq!(
            outcome(with_id("c", Some(delete(Some("u1"))))).await,
            Outcome::Deleted
        );
        assert_eq!(
            outcome(with_id("a", Some(put(pod, x)))).await,
            dup(false, false)
        );
        assert_eq!(
            outcome(with_id("b", Some(update(y)))).await,
            dup(false, false)
        );
        assert_eq!(
            outcome(with_id("c", Some(delete(Some("u1"))))).await,
            dup(false, true)
        );
        // Another pod of the same name: the delete of u1 is still in effect, a delete
        // without uid is not.
        let other = r#"{"metadata":{"uid":"u2"}}"#;
        assert_eq!(
            outcome(with_id("d", Some(put(pod, other)))).await,
            Outcome::Stored
        );
        assert_eq!(
            outcome(with_id("c", Some(delete(Some("u1"))))).await,
            dup(false, true)
        );
        assert_eq!(
            outcome(with_id("e", Some(delete(None)))).await,
            Outcome::Deleted
        );
        assert_eq!(
            outcome(with_id("d", Some(put(pod, other)))).await,
            dup(false, false)
        );
        assert_eq!(
            outcome(with_id("e", Some(delete(None)))).await,
            dup(false, true)
        );
        // A message that writes nothing cannot be superseded.
        assert_eq!(outcome(with_id("f", None)).await, Outcome::Recorded);
        assert_eq!(outcome(with_id("f", None)).await, dup(false, true));
        // An update that changed nothing is settled at once.
        assert_eq!(
            outcome(with_id("g", Some(put(pod, x)))).await,
            Outcome::Stored
        );
        assert_eq!(
            outcome(with_id("h", Some(update(x)))).await,
            Outcome::Unchanged
        );
        assert_eq!(
            outcome(with_id("h", Some(update(x)))).await,
            dup(true, false)
        );
    }

    #[tokio::test]
    async fn copies_in_one_run_are_acked_only_however_close_and_after_a_restart_by_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        // Three copies queued back to back: the first forward is not even handed on yet.
        let copy = || with_id("a", Some(put("ns/pod/a", r#"{"v":1}"#)));
        let pending = [
            store.submit(copy()).await.unwrap(),
            store.submit(copy()).await.unwrap(),
            store.submit(copy()).await.unwrap(),
        ];
        let mut outcomes = Vec::new();
        for p in pending {
            outcomes.push(p.await.unwrap().unwrap());
        }
        assert_eq!(outcomes[0].outcome, Outcome::Stored);
        assert!(
            !outcomes[0].settled(),
            "the first copy's forward is to come"
        );
        for later in &outcomes[1..] {
            assert_eq!(later.outcome, again(false));
            assert!(later.settled(), "nothing for a later copy to pass on");
        }
        // Its forward never acknowledged before the restart: a repeat then is passed on,
        // while its change is still the stored state.
        store.close().await;
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let after = store.write(copy()).await.unwrap();
        assert_eq!(after.outcome, dup(false, true));
        assert!(!after.settled());
        // And once more in this run: acked only.
        assert_eq!(store.write(copy()).await.unwrap().outcome, again(false));
        store.close().await;
    }
}
