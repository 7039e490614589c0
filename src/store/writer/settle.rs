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
