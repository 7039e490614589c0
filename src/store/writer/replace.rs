//! `replace`: the cloud's complete set of one scope (`ns/type`), applied in one transaction.
//!
//! The set is walked in key order beside the keys the scope holds, and every object goes through
//! the writer's own single-write step ([`super::write::apply_write`]): an object of the set is written
//! as an `update` would be (stored when absent or different, held back when the stored one has
//! a higher numeric resourceVersion, left alone when equal), a stored object the set lacks is
//! deleted. So each resulting change is numbered, recorded in `changes` and sent on the change
//! feed exactly like a single message's, in key order, and whatever the writer keeps up to date
//! per write stays right.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::write::{apply_write, feed_event, Meta};
use super::{BatchEffects, Writer};
use crate::store::{ChangeKind, Outcome, Write};

/// The cloud's complete set of one scope, keyed and ordered by storage key.
#[derive(Debug, Clone)]
pub struct ReplaceSet {
    namespace: String,
    rtype: String,
    items: BTreeMap<String, Bytes>,
    /// Keys and values held, counted as they are added.
    bytes: usize,
}

impl ReplaceSet {
    /// An empty set of the scope `namespace/rtype`: replacing with it deletes the scope.
    pub fn new(namespace: &str, rtype: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            rtype: rtype.to_owned(),
            items: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Adds the object `name` with its JSON `value`; `false` (and nothing added) when the set
    /// already holds that name.
    pub fn add(&mut self, name: &str, value: Bytes) -> bool {
        let key = format!("{}/{}/{name}", self.namespace, self.rtype);
        if self.items.contains_key(&key) {
            return false;
        }
        self.bytes += self.cost(name, &value);
        self.items.insert(key, value);
        true
    }

    /// What adding the object `name` with `value` adds to [`ReplaceSet::bytes`]: its key and
    /// value, and the map's own bookkeeping for it.
    pub fn cost(&self, name: &str, value: &[u8]) -> usize {
        const ENTRY: usize = 64;
        self.namespace.len() + self.rtype.len() + 2 + name.len() + value.len() + ENTRY
    }

    /// The bytes this set holds, by [`ReplaceSet::cost`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// `ns/type`.
    pub fn scope(&self) -> String {
        format!("{}/{}", self.namespace, self.rtype)
    }
}

/// What a replace changed, counted for its ack, and each change in key order, to be passed to
/// edged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replaced {
    pub inserted: usize,
    pub updated: usize,
    pub deleted: usize,
    /// Objects equal to the stored ones, and those held back because the stored object has a
    /// higher resourceVersion ([`Replaced::kept_newer`] of them).
    pub unchanged: usize,
    pub kept_newer: usize,
    pub changes: Vec<ReplacedChange>,
    /// The rows of `forwards` that hold [`Replaced::changes`] until the broker has acknowledged
    /// their forwards to edged (first and last); `None` when nothing changed.
    pub forwards: Option<(i64, i64)>,
}

/// A replace's forward to edged recorded in its transaction and not yet acknowledged by the
/// broker: a row of `forwards`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingForward {
    pub seq: i64,
    pub change: ReplacedChange,
}

/// What [`super::super::Store::pending_forwards`] reads.
pub(in crate::store) fn pending_forwards(
    conn: &rusqlite::Connection,
) -> rusqlite::Result<Vec<PendingForward>> {
    let mut stmt = conn.prepare("SELECT seq, kind, key, value FROM forwards ORDER BY seq")?;
    let rows = stmt.query_map([], |r| {
        let kind = match r.get::<_, i64>(1)? {
            0 => ChangeKind::Added,
            1 => ChangeKind::Modified,
            _ => ChangeKind::Deleted,
        };
        Ok(PendingForward {
            seq: r.get(0)?,
            change: ReplacedChange {
                kind,
                key: r.get(2)?,
                // Text or blob: either is the object's JSON.
                value: Bytes::copy_from_slice(r.get_ref(3)?.as_bytes()?),
            },
        })
    })?;
    rows.collect()
}

/// The number a change's kind is recorded with in `forwards`.
fn kind_number(kind: ChangeKind) -> i64 {
    match kind {
        ChangeKind::Added => 0,
        ChangeKind::Modified => 1,
        ChangeKind::Deleted => 2,
    }
}

/// One change a replace made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplacedChange {
    /// `Added`: an insert; `Modified`: an update; `Deleted`: a delete.
    pub kind: ChangeKind,
    pub key: String,
    /// The object stored, or for a delete the object removed.
    pub value: Bytes,
}

/// The next key of the walk: an object of the set, or a stored key the set lacks.
enum Next<'a> {
    Put(&'a String, &'a Bytes),
    Delete(String),
}

impl Next<'_> {
    /// The write that brings the key to the set's state (an `update` of an object of the set,
    /// a delete of a key it lacks), and the object it stores.
    fn write(self, rtype: &str) -> (Write, Option<Bytes>) {
        match self {
            Next::Put(key, value) => (
                Write::PutIfChanged {
                    key: key.clone(),
                    rtype: rtype.to_owned(),
                    value: value.clone(),
                },
                Some(value.clone()),
            ),
            Next::Delete(key) => (Write::Delete { key, uid: None }, None),
        }
    }
}

/// The scope's keys in key order: each object of `set`, and each of the `stored` keys (in key
/// order) the set lacks.
fn walk(set: &ReplaceSet, stored: Vec<String>) -> impl Iterator<Item = Next<'_>> {
    let mut gone = stored
        .into_iter()
        .filter(|k| !set.items.contains_key(k))
        .peekable();
    let mut items = set.items.iter().peekable();
    std::iter::from_fn(move || {
        // Both sequences are in key order (SQLite's and Rust's string order are both
        // bytewise), and no key is in both: merging them walks the scope in key order.
        match (items.peek(), gone.peek()) {
            (Some((key, _)), Some(old)) if old < *key => gone.next().map(Next::Delete),
            (Some(_), _) => items.next().map(|(k, v)| Next::Put(k, v)),
            (None, Some(_)) => gone.next().map(Next::Delete),
            (None, None) => None,
        }
    })
}

impl Replaced {
    /// Counts what one key's write did, and keeps the change it made, if any, for edged.
    fn count(&mut self, outcome: Outcome, change: Option<ReplacedChange>) {
        match outcome {
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Stale => {
                self.unchanged += 1;
                self.kept_newer += 1;
            }
            _ => {}
        }
        let Some(change) = change else { return };
        match change.kind {
            ChangeKind::Added => self.inserted += 1,
            ChangeKind::Modified => self.updated += 1,
            ChangeKind::Deleted => self.deleted += 1,
        }
        self.changes.push(change);
    }
}

impl Writer {
    /// Applies `set` inside the open transaction (the caller's savepoint rolls back all of it
    /// on a failure).
    pub(super) fn apply_replace(
        &mut self,
        set: &ReplaceSet,
        effect: &mut BatchEffects,
    ) -> rusqlite::Result<Replaced> {
        let [start, end] = crate::store::read::list_range(&set.namespace, &set.rtype);
        let stored: Vec<String> = self
            .conn
            .prepare_cached("SELECT key FROM meta WHERE key >= ?1 AND key < ?2 ORDER BY key")?
            .query_map([start, end], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let watched = self.shared.feed.watched();
        let mut done = Replaced::default();
        for next in walk(set, stored) {
            let (write, value) = next.write(&set.rtype);
            let (outcome, change) = self.replace_key(&write, value, watched, effect)?;
            done.count(outcome, change);
        }
        done.forwards = self.record_forwards(&done.changes)?;
        Ok(done)
    }

    /// One key of the walk, through the single-write step as a single message's write goes:
    /// the change it made, if any, numbered and recorded, and returned for edged with the
    /// object stored (`value`) or removed.
    fn replace_key(
        &mut self,
        write: &Write,
        value: Option<Bytes>,
        watched: bool,
        effect: &mut BatchEffects,
    ) -> rusqlite::Result<(Outcome, Option<ReplacedChange>)> {
        // Always read the removed object (edged is sent it), but let the feed keep it only
        // while somebody watches, as for a single delete.
        let meta = Meta {
            conn: &self.conn,
            deltas: &mut effect.digest,
            number: self.next_change,
        };
        let (outcome, mut seen) = apply_write(meta, write, true)?;
        let removed = seen.before.take();
        seen.before = removed.clone().filter(|_| watched);
        seen.watched = watched;
        let Some(mut event) = feed_event(write, outcome, seen) else {
            return Ok((outcome, None));
        };
        self.record_change(&mut event)?;
        let kind = event.kind;
        effect.events.push(event);
        let value = value
            .or_else(|| removed.map(Bytes::from))
            .unwrap_or_default();
        let change = ReplacedChange {
            kind,
            key: write.key().to_owned(),
            value,
        };
        Ok((outcome, Some(change)))
    }

    /// Records a replace's forwards in its transaction, so that a crash between its commit
    /// and the broker's acknowledgement of them does not leave edged to learn them from its
    /// next list.
    fn record_forwards(&self, changes: &[ReplacedChange]) -> rusqlite::Result<Option<(i64, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT INTO forwards (kind, key, value) VALUES (?1, ?2, ?3)")?;
        let mut rows = None;
        for change in changes {
            stmt.execute(rusqlite::params![
                kind_number(change.kind),
                change.key,
                change.value.as_ref()
            ])?;
            let seq = self.conn.last_insert_rowid();
            rows = Some(rows.map_or((seq, seq), |(first, _)| (first, seq)));
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;

    use super::*;
    use crate::store::{Store, StoreOptions};

    fn put(key: &str, value: &str) -> Write {
        Write::Put {
            key: key.into(),
            rtype: key.split('/').nth(1).unwrap_or_default().into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    fn pod(name: &str, rv: &str, image: &str) -> String {
        serde_json::json!({"metadata": {"name": name, "resourceVersion": rv}, "spec": {"image": image}})
            .to_string()
    }

    fn set(items: &[(&str, String)]) -> ReplaceSet {
        let mut set = ReplaceSet::new("ns", "pod");
        for (name, value) in items {
            assert!(set.add(name, Bytes::from(value.clone())));
        }
        set
    }

    async fn keys(store: &Store) -> Vec<String> {
        store
            .list("ns", "pod")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    fn open(path: &Path) -> Store {
        Store::open(path, StoreOptions::default()).unwrap()
    }

    #[tokio::test]
    async fn a_replace_inserts_updates_and_deletes_in_key_order_and_skips_the_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("m.db"));
        for (name, image) in [("b", "old"), ("c", "same"), ("e", "gone"), ("a", "gone")] {
            let key = format!("ns/pod/{name}");
            store
                .write(put(&key, &pod(name, "5", image)))
                .await
                .unwrap();
        }
        // Another scope of the namespace and the same type elsewhere are left alone.
        store.write(put("ns/podstatus/a", "{}")).await.unwrap();
        store.write(put("other/pod/a", "{}")).await.unwrap();
        let mut feed = store.subscribe_changes();
        let before = store.feed_position();

        let done = store
            .replace(set(&[
                ("d", pod("d", "7", "new")),
                ("b", pod("b", "6", "new")),
                ("c", pod("c", "5", "same")),
            ]))
            .await
            .unwrap();

        let changes: Vec<(ChangeKind, &str)> = done
            .changes
            .iter()
            .map(|c| (c.kind, c.key.as_str()))
            .collect();
        assert_eq!(
            changes,
            [
                (ChangeKind::Deleted, "ns/pod/a"),
                (ChangeKind::Modified, "ns/pod/b"),
                (ChangeKind::Added, "ns/pod/d"),
                (ChangeKind::Deleted, "ns/pod/e"),
            ],
            "every change in key order, the unchanged `c` not among them"
        );
        assert_eq!(
            (done.inserted, done.updated, done.deleted, done.unchanged),
            (1, 1, 2, 1)
        );
        assert_eq!(
            done.changes[0].value,
            Bytes::from(pod("a", "5", "gone")),
            "a delete carries the object removed"
        );
        assert_eq!(done.changes[2].value, Bytes::from(pod("d", "7", "new")));
        assert_eq!(keys(&store).await, ["ns/pod/b", "ns/pod/c", "ns/pod/d"]);
        assert!(store.get("ns/podstatus/a").await.unwrap().is_some());
        assert!(store.get("other/pod/a").await.unwrap().is_some());

        // The feed numbers each change, in the same order, one after another.
        let mut seen = Vec::new();
        while let Ok(e) = feed.try_recv() {
            seen.push((e.seq, e.key.clone()));
        }
        let numbers: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(numbers, (before + 1..=before + 4).collect::<Vec<_>>());
        let fed: Vec<&str> = seen.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(fed, ["ns/pod/a", "ns/pod/b", "ns/pod/d", "ns/pod/e"]);
        assert_eq!(store.commits().0, 7, "the replace is one commit");
        store.close().await;
    }

    #[tokio::test]
    async fn a_replace_keeps_a_stored_object_with_a_higher_resource_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("m.db"));
        let newer = pod("p", "9", "newer");
        store.write(put("ns/pod/p", &newer)).await.unwrap();
        let done = store
            .replace(set(&[("p", pod("p", "8", "older"))]))
            .await
            .unwrap();
        assert_eq!((done.unchanged, done.kept_newer), (1, 1));
        assert!(done.changes.is_empty());
        assert_eq!(store.get("ns/pod/p").await.unwrap(), Some(newer));
        store.close().await;
    }

    #[tokio::test]
    async fn an_empty_set_deletes_the_scope_and_an_equal_set_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("m.db"));
        let p = pod("p", "1", "x");
        store.write(put("ns/pod/p", &p)).await.unwrap();
        let position = store.feed_position();
        let same = store.replace(set(&[("p", p)])).await.unwrap();
        assert_eq!(same.unchanged, 1);
        assert!(same.changes.is_empty());
        assert_eq!(store.feed_position(), position, "nothing numbered");

        let emptied = store.replace(ReplaceSet::new("ns", "pod")).await.unwrap();
        assert_eq!(emptied.deleted, 1);
        assert!(keys(&store).await.is_empty());
        store.close().await;
    }

    #[tokio::test]
    async fn a_replace_that_fails_changes_nothing_and_its_batch_still_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = open(&path);
        store
            .write(put("ns/pod/a", &pod("a", "1", "x")))
            .await
            .unwrap();
        // A real SQLite failure on one object of the set.
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER reject_bad BEFORE INSERT ON meta WHEN NEW.key = 'ns/pod/z'
                 BEGIN SELECT RAISE(ABORT, 'rejected by test trigger'); END;",
            )
            .unwrap();
        let replace = store
            .submit_replace(set(&[("b", pod("b", "1", "x")), ("z", pod("z", "1", "x"))]))
            .await
            .unwrap();
        let after = store.submit(put("ns/configmap/c", "{}")).await.unwrap();
        let err = replace.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("rejected by test trigger"), "{err}");
        after.await.unwrap().unwrap();
        assert_eq!(
            keys(&store).await,
            ["ns/pod/a"],
            "neither `a` deleted nor `b` added"
        );
        assert!(store.get("ns/configmap/c").await.unwrap().is_some());
        store.close().await;
    }

    #[test]
    fn a_set_refuses_a_name_twice_and_counts_what_it_holds() {
        let mut set = ReplaceSet::new("ns", "pod");
        assert!(set.add("a", Bytes::from_static(b"{}")));
        assert!(!set.add("a", Bytes::from_static(b"{\"x\":1}")));
        assert_eq!(set.len(), 1);
        assert_eq!(set.bytes(), set.cost("a", b"{}"));
        assert_eq!(set.bytes(), "ns/pod/a{}".len() + 64);
        assert_eq!(set.scope(), "ns/pod");
    }

    /// The replace's transaction records its forwards, which stay until the change that says
    /// the broker acknowledged them, and a replace that changes nothing records none.
    #[tokio::test]
    async fn a_replace_records_its_forwards_until_they_are_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("m.db"));
        store
            .write(put("ns/pod/a", &pod("a", "1", "x")))
            .await
            .unwrap();
        let done = store
            .replace(set(&[("b", pod("b", "1", "y"))]))
            .await
            .unwrap();
        let (first, last) = done.forwards.expect("two forwards recorded");
        assert_eq!(last - first, 1);
        let pending = store.pending_forwards().await.unwrap();
        let recorded: Vec<(ChangeKind, &str)> = pending
            .iter()
            .map(|p| (p.change.kind, p.change.key.as_str()))
            .collect();
        assert_eq!(
            recorded,
            [
                (ChangeKind::Deleted, "ns/pod/a"),
                (ChangeKind::Added, "ns/pod/b")
            ]
        );
        assert_eq!(pending[1].change.value, Bytes::from(pod("b", "1", "y")));
        let again = store
            .replace(set(&[("b", pod("b", "1", "y"))]))
            .await
            .unwrap();
        assert_eq!(again.forwards, None, "nothing changed, nothing to forward");
        let change = crate::store::Change {
            forwards_done: Some((first, last)),
            ..crate::store::Change::default()
        };
        store.write(change).await.unwrap();
        assert!(store.pending_forwards().await.unwrap().is_empty());
        store.close().await;
    }
}
