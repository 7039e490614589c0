//! The outbox: messages for the cloud kept while it is away, queued in the transaction of the
//! change they come from. The writer counts its rows itself, so that the bound is kept without
//! a `count(*)` per insert.

use std::sync::atomic::Ordering;

use rusqlite::params;

use super::{BatchEffects, Writer};
use crate::store::CloudMessage;

impl Writer {
    /// Queues `m` for the cloud. An update that coalesces takes the place of the queued one of
    /// its resource; past the bound the oldest rows are dropped, counted in `effect`.
    pub(super) fn enqueue(
        &mut self,
        m: &CloudMessage,
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

    /// Removes the outbox rows `seqs`, sent (or dropped) by the cloud side.
    pub(super) fn remove_sent(
        &mut self,
        seqs: &[i64],
        effect: &mut BatchEffects,
    ) -> rusqlite::Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
        for seq in seqs {
            self.outbox_rows -= stmt.execute([seq])? as i64;
        }
        effect.touched = true;
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

    pub(super) fn publish_outbox_len(&self) {
        self.shared
            .outbox_len
            .store(self.outbox_rows.max(0) as usize, Ordering::Relaxed);
    }
}
