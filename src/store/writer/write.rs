//! The write primitives: one [`Write`] applied to `meta`, and the change it makes numbered and
//! recorded. Every change to `meta`, a single message's or a replace's, goes through here, so
//! that the row's `rv`, the digest and the change feed stay right on every path.

use std::borrow::Cow;

use rusqlite::{params, Connection, OptionalExtension};

use super::Writer;
use crate::patch::{Patch, Patched};
use crate::resource::Resource;
use crate::store::digest::{self, Deltas};
use crate::store::{feed, object_uid, version_is_older, ChangeKind, Outcome, StoreEvent, Write};

/// The `meta` table in the open transaction, with what every change to it keeps right: the
/// batch's changes to the digest, and `number`, the number the write's change gets (the local
/// API's version of an object it stores, see [`crate::store::feed`]).
pub(super) struct Meta<'a> {
    pub conn: &'a Connection,
    pub deltas: &'a mut Deltas,
    pub number: u64,
}

/// Applies `write` to `meta`, and tells what it saw of the key for the feed event, from the
/// reads it makes anyway: whether the key held anything (ADDED or MODIFIED, watched or not),
/// and only while somebody `watched` the values a watcher is sent (a deleted object, a patch's
/// result). Every change to `meta` goes through [`Meta::store_object`] or
/// [`Meta::remove_object`], which keep the row's `rv` and the `digest` right. An object it
/// stores is stored with the write's number, the number its feed event gets: every write that
/// stores makes exactly one event.
pub(super) fn apply_write(
    mut meta: Meta<'_>,
    write: &Write,
    watched: bool,
) -> rusqlite::Result<(Outcome, Seen)> {
    let mut seen = Seen {
        watched,
        ..Seen::default()
    };
    let outcome = match write {
        Write::Put { key, rtype, value } => meta.put(key, rtype, value, &mut seen)?,
        Write::PutIfChanged { key, rtype, value } => {
            meta.update(key, rtype, text(value)?, &mut seen)?
        }
        Write::Delete { key, uid } => meta.delete(key, uid.as_deref(), &mut seen)?,
        Write::Patch { key, rtype, patch } => meta.patch(key, rtype, patch, &mut seen)?,
    };
    Ok((outcome, seen))
}

impl Meta<'_> {
    /// [`Write::Put`]: the one write that reads no value otherwise, only the old `rv`, for the
    /// digest.
    fn put(
        &mut self,
        key: &str,
        rtype: &str,
        value: &[u8],
        seen: &mut Seen,
    ) -> rusqlite::Result<Outcome> {
        let old = stored_rv(self.conn, key)?;
        seen.existed = old.is_some();
        self.store_object(key, rtype, text(value)?, old.flatten().as_deref())?;
        Ok(Outcome::Stored)
    }

    /// [`Write::PutIfChanged`]: held back when older than the stored object by
    /// `metadata.resourceVersion`, nothing when equal to it as JSON.
    fn update(
        &mut self,
        key: &str,
        rtype: &str,
        value: &str,
        seen: &mut Seen,
    ) -> rusqlite::Result<Outcome> {
        let stored = stored_row(self.conn, key)?;
        seen.existed = stored.is_some();
        let mut old_rv = None;
        if let Some((old, rv)) = &stored {
            let stored_version = match rv {
                Some(rv) => Cow::Borrowed(rv.as_str()),
                None => digest::resource_version(old.as_bytes()),
            };
            let incoming = digest::resource_version(value.as_bytes());
            if version_is_older(&incoming, &stored_version) {
                return Ok(Outcome::Stale);
            }
            if same_json(old, value) {
                return Ok(Outcome::Unchanged);
            }
            old_rv = rv.as_deref();
        }
        self.store_object(key, rtype, value, old_rv)?;
        Ok(Outcome::Stored)
    }

    /// [`Write::Delete`]: with `uid`, only of the object of that uid. The removed object is
    /// kept in `seen` while somebody watches.
    fn delete(
        &mut self,
        key: &str,
        uid: Option<&str>,
        seen: &mut Seen,
    ) -> rusqlite::Result<Outcome> {
        let Some((stored, rv)) = stored_row(self.conn, key)? else {
            return Ok(Outcome::Absent);
        };
        seen.existed = true;
        if let Some(uid) = uid {
            if object_uid(&stored).is_some_and(|s| s != uid) {
                return Ok(Outcome::UidMismatch);
            }
        }
        self.remove_object(key, rv.as_deref())?;
        seen.before = seen.watched.then_some(stored);
        Ok(Outcome::Deleted)
    }

    /// [`Write::Patch`], applied to the object as it stands at this point of the transaction.
    /// Its result is kept in `seen` while somebody watches.
    fn patch(
        &mut self,
        key: &str,
        rtype: &str,
        patch: &Patch,
        seen: &mut Seen,
    ) -> rusqlite::Result<Outcome> {
        let Some((stored, rv)) = stored_row(self.conn, key)? else {
            return Ok(Outcome::Absent);
        };
        seen.existed = true;
        Ok(match patch.apply(&stored) {
            Ok(Patched::Changed(value)) => {
                self.store_object(key, rtype, &value, rv.as_deref())?;
                seen.after = seen.watched.then_some(value);
                Outcome::Patched { changed: true }
            }
            Ok(Patched::Unchanged) => Outcome::Patched { changed: false },
            Err(e) => Outcome::Rejected(e),
        })
    }

    /// Stores `value` under `key` with its `rv` and the write's number, and moves the digest
    /// from the old object's term (`old_rv`: `None` when nothing was stored, or the row was
    /// not counted yet) to the new one.
    fn store_object(
        &mut self,
        key: &str,
        rtype: &str,
        value: &str,
        old_rv: Option<&str>,
    ) -> rusqlite::Result<()> {
        let rv = digest::resource_version(value.as_bytes());
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, type, value, rv, change_seq) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(key) DO UPDATE SET type = excluded.type, value = excluded.value,
                                                rv = excluded.rv, change_seq = excluded.change_seq",
            )?
            .execute(params![key, rtype, value, rv.as_ref(), self.number as i64])?;
        self.deltas.replace(key, old_rv, Some(&rv));
        Ok(())
    }

    /// Deletes `key`, and takes its term (`rv`, `None` when it was not counted) out of the
    /// digest.
    fn remove_object(&mut self, key: &str, rv: Option<&str>) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM meta WHERE key = ?1")?
            .execute([key])?;
        self.deltas.replace(key, rv, None);
        Ok(())
    }
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
pub(super) fn text(value: &[u8]) -> rusqlite::Result<&str> {
    std::str::from_utf8(value).map_err(rusqlite::Error::from)
}

/// The stored value of `key`.
pub(super) fn stored_value(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// JSON equality; object key order does not matter.
pub(super) fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

impl Writer {
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

    /// Keeps the last [`feed::HISTORY_CHANGES`] changes in `changes`.
    pub(super) fn prune_changes(&self) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM changes WHERE seq <= ?1")?
            .execute([self.next_change as i64 - 1 - feed::HISTORY_CHANGES as i64])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::store::tests::put;
    use crate::store::{read, ChangeKind, Outcome, Store, StoreOptions, Write};

    #[tokio::test]
    async fn update_compares_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        let w = |v: &str| Write::PutIfChanged {
            key: "ns/configmap/c".into(),
            rtype: "configmap".into(),
            value: Bytes::copy_from_slice(v.as_bytes()),
        };
        assert_eq!(
            store.write(w(r#"{"a":1,"b":2}"#)).await.unwrap().outcome,
            Outcome::Stored
        );
        assert_eq!(
            store.write(w(r#"{"b":2, "a":1}"#)).await.unwrap().outcome,
            Outcome::Unchanged
        );
        assert_eq!(
            store.write(w(r#"{"b":3,"a":1}"#)).await.unwrap().outcome,
            Outcome::Stored
        );
        store.close().await;
    }

    #[tokio::test]
    async fn delete_respects_uid() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        store
            .write(put("ns/pod/p", r#"{"metadata":{"uid":"u1"}}"#))
            .await
            .unwrap();
        let del = |uid: &str| Write::Delete {
            key: "ns/pod/p".into(),
            uid: Some(uid.into()),
        };
        assert_eq!(
            store.write(del("u2")).await.unwrap().outcome,
            Outcome::UidMismatch
        );
        assert!(store.get("ns/pod/p").await.unwrap().is_some());
        assert_eq!(
            store.write(del("u1")).await.unwrap().outcome,
            Outcome::Deleted
        );
        assert_eq!(
            store.write(del("u1")).await.unwrap().outcome,
            Outcome::Absent
        );
        store.close().await;
    }

    #[tokio::test]
    async fn the_change_feed_reports_committed_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        let mut feed = store.subscribe_changes();
        store.write(put("ns/pod/p", r#"{"a":1}"#)).await.unwrap();
        store.write(put("ns/pod/p", r#"{"a":2}"#)).await.unwrap();
        let same = Write::PutIfChanged {
            key: "ns/pod/p".into(),
            rtype: "pod".into(),
            value: Bytes::from_static(br#"{"a": 2}"#),
        };
        assert_eq!(store.write(same).await.unwrap().outcome, Outcome::Unchanged);
        let del = |key: &str| Write::Delete {
            key: key.into(),
            uid: None,
        };
        store.write(del("ns/pod/absent")).await.unwrap();
        store.write(del("ns/pod/p")).await.unwrap();
        let mut seen = Vec::new();
        while let Ok(e) = feed.try_recv() {
            seen.push((e.kind, e.key.clone(), e.rtype.clone(), e.value.clone()));
        }
        let b = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        assert_eq!(
            seen,
            [
                (
                    ChangeKind::Added,
                    "ns/pod/p".into(),
                    "pod".into(),
                    b(r#"{"a":1}"#)
                ),
                (
                    ChangeKind::Modified,
                    "ns/pod/p".into(),
                    "pod".into(),
                    b(r#"{"a":2}"#)
                ),
                (
                    ChangeKind::Deleted,
                    "ns/pod/p".into(),
                    "pod".into(),
                    b(r#"{"a":2}"#)
                ),
            ]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn each_object_carries_the_number_of_its_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        let version = |store: &Store, key: &'static str| {
            let store = store.clone();
            async move { store.get_row(key).await.unwrap().map(|r| r.version) }
        };
        store.write(put("ns/pod/a", r#"{"a":1}"#)).await.unwrap();
        let added = store.feed_position();
        assert_eq!(version(&store, "ns/pod/a").await, Some(added));
        store.write(put("ns/pod/b", r#"{"b":1}"#)).await.unwrap();
        assert_eq!(
            version(&store, "ns/pod/a").await,
            Some(added),
            "not moved by b"
        );
        let same = Write::PutIfChanged {
            key: "ns/pod/a".into(),
            rtype: "pod".into(),
            value: Bytes::from_static(br#"{"a": 1}"#),
        };
        assert_eq!(store.write(same).await.unwrap().outcome, Outcome::Unchanged);
        assert_eq!(
            version(&store, "ns/pod/a").await,
            Some(added),
            "nothing changed"
        );
        let patch = crate::patch::Patch::parse(br#"{"a":2}"#, "pod", 1 << 20).unwrap();
        store
            .write(Write::Patch {
                key: "ns/pod/a".into(),
                rtype: "pod".into(),
                patch: Arc::new(patch),
            })
            .await
            .unwrap();
        let patched = store.feed_position();
        assert!(patched > added);
        assert_eq!(version(&store, "ns/pod/a").await, Some(patched));
        let page = store
            .page(
                read::Range::OfType("pod".into()),
                String::new(),
                10,
                1 << 20,
            )
            .await
            .unwrap();
        let versions: Vec<u64> = page.iter().map(|r| r.version).collect();
        assert_eq!(versions, [patched, patched - 1]);
        store.close().await;
        // The numbers outlive a restart, and go on growing.
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        assert_eq!(version(&store, "ns/pod/a").await, Some(patched));
        store.write(put("ns/pod/b", r#"{"b":2}"#)).await.unwrap();
        assert_eq!(version(&store, "ns/pod/b").await, Some(patched + 1));
        store.close().await;
    }

    #[tokio::test]
    async fn changes_nobody_watches_are_numbered_but_carry_no_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        let before = store.feed_position();
        for value in [r#"{"a":1}"#, r#"{"a":2}"#] {
            store.write(put("ns/configmap/c", value)).await.unwrap();
        }
        let (_live, backlog) = store.changes_since(before).unwrap();
        assert_eq!(backlog.len(), 2);
        assert_eq!(backlog[0].key, "ns/configmap/c");
        assert_eq!(backlog[0].value, None, "no payload kept without a watcher");
        let kinds: Vec<ChangeKind> = backlog.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [ChangeKind::Added, ChangeKind::Modified],
            "a change of a stored key is MODIFIED, watched or not"
        );
        store.close().await;
    }
}
