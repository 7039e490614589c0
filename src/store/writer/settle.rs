//! The settled flag of message ids, changed between commits: the settle marks and releases
//! that [`crate::store::Store::settle`] and [`crate::store::Store::release`] queue from any
//! thread, taken by the writer into its next transaction, and put back when that one fails.

use super::Writer;

impl Writer {
    /// The marks whose forward the broker has acknowledged; the others wait.
    pub(super) fn take_settle_marks(&self) -> Vec<(u64, String)> {
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
    pub(super) fn requeue_settle_marks(&self, marks: &[(u64, String)]) {
        if marks.is_empty() {
            return;
        }
        let mut pending = self.shared.settle.lock().unwrap_or_else(|p| p.into_inner());
        let room = crate::store::MAX_PENDING_SETTLES.saturating_sub(pending.len());
        pending.extend(marks.iter().take(room).cloned());
    }

    /// Sets the settled flag of each id, inside the open transaction. A failure costs only the
    /// mark (the id stays unsettled, the safe direction), never the batch: a failed statement
    /// leaves the transaction open.
    pub(super) fn apply_settle_marks(&self, marks: &[(u64, String)]) {
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

    /// The ids to handle again if they come again (see [`crate::store::Store::release`]).
    pub(super) fn take_releases(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .shared
                .released
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    pub(super) fn requeue_releases(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut pending = self
            .shared
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let room = crate::store::MAX_PENDING_SETTLES.saturating_sub(pending.len());
        pending.extend(ids.iter().take(room).cloned());
    }

    /// Counts each id as an earlier run's, inside the open transaction: a copy that comes
    /// again is then passed on if its change is still the stored state. A failure leaves the
    /// id as it was, and the batch goes on.
    pub(super) fn apply_releases(&self, ids: &[String]) {
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::delivery::Delivery;
    use crate::store::tests::put;
    use crate::store::writer::tests::{again, dup, settled_flag, with_id};
    use crate::store::{Outcome, Store, StoreOptions};

    #[tokio::test]
    async fn settle_marks_ride_the_next_commit_and_are_flushed_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let first = store
            .write(with_id("a", Some(put("ns/pod/a", "{}"))))
            .await
            .unwrap();
        assert!(!first.settled(), "a forward is still to come");
        store.settle("a", 0);
        assert_eq!(store.commits(), (1, 1), "a mark costs no commit of its own");
        assert_eq!(settled_flag(&path, "a"), Some(false));

        // The next commit carries the mark, before its own changes: a redelivery in it
        // already sees the original settled.
        let repeat = store
            .write(with_id("a", Some(put("ns/pod/a", "{}"))))
            .await
            .unwrap();
        assert_eq!(repeat.outcome, again(true));
        assert!(repeat.settled());
        assert_eq!(store.commits(), (2, 2));
        assert_eq!(settled_flag(&path, "a"), Some(true));

        store
            .write(with_id("b", Some(put("ns/pod/b", "{}"))))
            .await
            .unwrap();
        store.settle("b", 0);
        store.settle("never-seen", 0);
        store.close().await;
        assert_eq!(settled_flag(&path, "b"), Some(true), "flushed on close");
        assert_eq!(settled_flag(&path, "never-seen"), None);
    }

    #[tokio::test]
    async fn a_mark_waits_for_the_broker_to_acknowledge_the_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let delivery = Arc::new(Delivery::default());
        store.track_delivery(delivery.clone());
        store
            .write(with_id("a", Some(put("ns/pod/a", "{}"))))
            .await
            .unwrap();
        delivery.queue();
        delivery.sent(1);
        store.settle("a", delivery.mark());
        // Handed on, not acknowledged: a commit leaves it unsettled.
        store
            .write(with_id("b", Some(put("ns/pod/b", "{}"))))
            .await
            .unwrap();
        assert_eq!(settled_flag(&path, "a"), Some(false));
        delivery.acknowledged(1);
        store
            .write(with_id("c", Some(put("ns/pod/c", "{}"))))
            .await
            .unwrap();
        assert_eq!(settled_flag(&path, "a"), Some(true));
        // Not acknowledged by the close: it stays unsettled.
        delivery.queue();
        delivery.sent(2);
        store.settle("b", delivery.mark());
        store.close().await;
        assert_eq!(settled_flag(&path, "b"), Some(false));
    }

    #[tokio::test]
    async fn a_released_id_is_handled_again_when_it_comes_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        let copy = || with_id("a", Some(put("ns/pod/a", r#"{"v":1}"#)));
        assert_eq!(store.write(copy()).await.unwrap().outcome, Outcome::Stored);
        store.release("a");
        assert_eq!(
            store.write(copy()).await.unwrap().outcome,
            dup(false, true),
            "not passed on the first time: the copy sent again is"
        );
        store.close().await;
    }
}
