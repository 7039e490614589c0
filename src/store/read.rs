//! The store's queries that only read, for any read-only connection: the running store's readers
//! and the `get`, `list` and `export` commands ([`crate::inspect`]) use the same ones.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::BUSY_TIMEOUT;

/// Opens `path` with SQLite's read-only flag: nothing done through it can change the database,
/// its write-ahead log or its schema, and it works beside the writer (WAL).
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// The stored JSON of one object.
pub fn get(c: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// A stored object as the local API reads it: with the number of its last change, which is its
/// `resourceVersion` there (see `super::feed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub key: String,
    pub value: String,
    pub version: u64,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        key: r.get(0)?,
        value: r.get(1)?,
        version: r.get::<_, i64>(2)? as u64,
    })
}

/// One stored object with its change number.
pub fn get_row(c: &Connection, key: &str) -> rusqlite::Result<Option<Row>> {
    c.prepare_cached("SELECT key, value, change_seq FROM meta WHERE key = ?1")?
        .query_row([key], row)
        .optional()
}

/// The half-open key range of the objects of `rtype` in `namespace`: keys of the list share the
/// prefix `ns/type/`, and `0` is the byte after `/`, so the range holds exactly that prefix and
/// is served by the primary key index.
pub(super) fn list_range(namespace: &str, rtype: &str) -> [String; 2] {
    [
        format!("{namespace}/{rtype}/"),
        format!("{namespace}/{rtype}0"),
    ]
}

/// Every object of `rtype` in `namespace`, in key order, as `(key, json)`.
pub fn list(
    c: &Connection,
    namespace: &str,
    rtype: &str,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt =
        c.prepare_cached("SELECT key, value FROM meta WHERE key >= ?1 AND key < ?2 ORDER BY key")?;
    let rows = stmt.query_map(list_range(namespace, rtype), |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// The name segment of a stored key (`ns/type/name`), as SQL: the index `meta_name` is on this
/// expression, and a query that names the index must say it in the same words. Only `key` is
/// in it, so an update of a stored value does not touch the index.
pub(super) const NAME_OF_KEY: &str =
    "substr(key, instr(key, '/') + instr(substr(key, instr(key, '/') + 1), '/') + 1)";

/// The cluster-scoped object `name` of `rtype`, under whatever namespace segment it is stored
/// ([`crate::resource::CLUSTER_NAMESPACE`]), with its change number; the first in key order if
/// several namespaces hold one. A lookup in the index `meta_name`, whatever the store holds.
pub fn cluster_object(c: &Connection, rtype: &str, name: &str) -> rusqlite::Result<Option<Row>> {
    c.prepare_cached(&format!(
        "SELECT key, value, change_seq FROM meta INDEXED BY meta_name
         WHERE {NAME_OF_KEY} = ?2 AND type = ?1 ORDER BY key LIMIT 1"
    ))?
    .query_row([rtype, name], row)
    .optional()
}

/// Every object of `rtype` in any namespace, in key order, as `(key, json)`.
pub fn list_type(c: &Connection, rtype: &str) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = c.prepare_cached("SELECT key, value FROM meta WHERE type = ?1 ORDER BY key")?;
    let rows = stmt.query_map([rtype], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Which objects a [`page`] reads.
#[derive(Debug, Clone)]
pub enum Range {
    /// The objects of a type in one namespace.
    InNamespace { namespace: String, rtype: String },
    /// The objects of a type in every namespace.
    OfType(String),
}

/// The next objects of `range` after the key `after` (`""`: from the start), in key order, with
/// their change numbers: at most `max_rows`, and no more once `max_bytes` of JSON are read (at least
/// one row, however large). An empty page means the range holds nothing after `after`.
///
/// Reading a range a page at a time keeps a list's memory to one page, whatever the store
/// holds, and no read transaction stays open between pages.
pub fn page(
    c: &Connection,
    range: &Range,
    after: &str,
    max_rows: usize,
    max_bytes: usize,
) -> rusqlite::Result<Vec<Row>> {
    let mut stmt;
    let mut rows = match range {
        Range::InNamespace { namespace, rtype } => {
            let [start, end] = list_range(namespace, rtype);
            stmt = c.prepare_cached(
                "SELECT key, value, change_seq FROM meta WHERE key > ?1 AND key < ?2 ORDER BY key",
            )?;
            stmt.query([std::cmp::max(start.as_str(), after), end.as_str()])?
        }
        Range::OfType(rtype) => {
            stmt = c.prepare_cached(
                "SELECT key, value, change_seq FROM meta WHERE type = ?1 AND key > ?2 ORDER BY key",
            )?;
            stmt.query([rtype.as_str(), after])?
        }
    };
    let (mut page, mut bytes) = (Vec::new(), 0usize);
    while page.len() < max_rows && (page.is_empty() || bytes < max_bytes) {
        let Some(r) = rows.next()? else {
            break;
        };
        let r = row(r)?;
        bytes += r.value.len();
        page.push(r);
    }
    Ok(page)
}

/// Where a page of versions comes from: each object's `metadata.resourceVersion` as the writer
/// keeps it in the `rv` column (see [`super::digest`]), the same text the digest hashes; the
/// values are never read.
const RV: &str = "coalesce(rv, '')";

/// One page of a scope's versions: `(key, rv)` in key order, and whether more follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    pub entries: Vec<(String, String)>,
    pub more: bool,
}

/// The next `(key, rv)` of the objects of `rtype` in `namespace` after the key `after`, as many
/// as fit in `max_bytes` of JSON object members (`"key":"rv",` each, by [`json_string_len`])
/// with the last key once more as a JSON string (the token of the next page), one at least;
/// `rv` is the object's `metadata.resourceVersion`, empty when it has none. Only keys and
/// versions are read into memory, never values.
pub fn versions(
    c: &Connection,
    namespace: &str,
    rtype: &str,
    after: &str,
    max_bytes: usize,
) -> rusqlite::Result<Versions> {
    let [start, end] = list_range(namespace, rtype);
    let mut stmt = c.prepare_cached(&format!(
        "SELECT key, {RV} FROM meta WHERE key > ?1 AND key < ?2 ORDER BY key"
    ))?;
    let mut rows = stmt.query([std::cmp::max(start.as_str(), after), end.as_str()])?;
    let mut page = Versions::default();
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        let rv = match row.get_ref(1)? {
            rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            rusqlite::types::ValueRef::Integer(i) => i.to_string(),
            _ => String::new(),
        };
        let size = json_string_len(&key) + json_string_len(&rv) + 2;
        if !page.entries.is_empty() && bytes + size + json_string_len(&key) > max_bytes {
            page.more = true;
            break;
        }
        bytes += size;
        page.entries.push((key, rv));
    }
    Ok(page)
}

/// The length of `s` written as a JSON string, quotes included, as serde_json writes it.
pub fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The keys of `rtypes` changed after the change number `after` up to `through`, each once with
/// the number of its last change in that range, in key order; `None` when the recorded history
/// (the last [`super::feed::HISTORY_CHANGES`] changes) no longer reaches back to `after`. Reads only
/// the `changes` rows of the range, so it costs nothing while nothing changes.
pub fn changed_keys(
    c: &Connection,
    after: u64,
    through: u64,
    rtypes: &[&str],
) -> rusqlite::Result<Option<Vec<(String, String, u64)>>> {
    if through <= after {
        return Ok(Some(Vec::new()));
    }
    let first: Option<i64> = c
        .prepare_cached("SELECT min(seq) FROM changes WHERE seq > ?1")?
        .query_row([after as i64], |r| r.get(0))?;
    // The change right after `after` must still be recorded, or some may be missing.
    if first.is_none_or(|f| f as u64 != after + 1) {
        return Ok(None);
    }
    let mut stmt = c.prepare_cached(
        "SELECT key, rtype, max(seq) FROM changes WHERE seq > ?1 AND seq <= ?2
         GROUP BY key ORDER BY key",
    )?;
    let rows = stmt.query_map([after as i64, through as i64], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
    })?;
    let mut keys = Vec::new();
    for row in rows {
        let (key, rtype, seq): (String, String, u64) = row?;
        if rtypes.contains(&rtype.as_str()) {
            keys.push((key, rtype, seq));
        }
    }
    Ok(Some(keys))
}

/// One stored object of each type, as `(type, json)`, in type order: what the local API reads
/// to learn the kind, group and version of types it does not know.
pub fn type_samples(c: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = c.prepare_cached(
        "SELECT type, value FROM meta WHERE key IN (SELECT MIN(key) FROM meta GROUP BY type) ORDER BY type",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Which of `keys` are stored.
pub fn existing(c: &Connection, keys: &[String]) -> rusqlite::Result<Vec<bool>> {
    let mut stmt = c.prepare_cached("SELECT 1 FROM meta WHERE key = ?1")?;
    keys.iter().map(|k| stmt.exists([k])).collect()
}

/// Calls `each` with `(key, type, json)` of every object of `rtype` in `namespace` (`Some`), or
/// of every object (`None`), in key order, one row at a time; returns how many.
pub fn for_each<E: From<rusqlite::Error>>(
    c: &Connection,
    within: Option<(&str, &str)>,
    mut each: impl FnMut(String, String, String) -> Result<(), E>,
) -> Result<usize, E> {
    let mut stmt = c.prepare(match within {
        Some(_) => "SELECT key, type, value FROM meta WHERE key >= ?1 AND key < ?2 ORDER BY key",
        None => "SELECT key, type, value FROM meta ORDER BY key",
    })?;
    let mut rows = match within {
        Some((namespace, rtype)) => stmt.query(list_range(namespace, rtype))?,
        None => stmt.query([])?,
    };
    let mut count = 0;
    while let Some(row) = rows.next()? {
        each(row.get(0)?, row.get(1)?, row.get(2)?)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreOptions, Write};

    #[test]
    fn a_json_string_is_measured_as_serde_json_writes_it() {
        for s in [
            "",
            "plain",
            "quote\"back\\slash",
            "nl\ntab\t\u{1}\u{7f}",
            "ünï",
        ] {
            let written = serde_json::to_string(s).unwrap();
            assert_eq!(json_string_len(s), written.len(), "{written}");
        }
    }

    #[tokio::test]
    async fn versions_page_through_a_scope_within_a_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        let objects = [
            ("a/pod/1", r#"{"metadata":{"resourceVersion":"11"}}"#),
            ("a/pod/2", r#"{"metadata":{}}"#),
            ("a/pod/3", r#"{"metadata":{"resourceVersion":"13"}}"#),
            ("a/podstatus/1", r#"{"metadata":{"resourceVersion":"99"}}"#),
            ("b/pod/1", r#"{"metadata":{"resourceVersion":"99"}}"#),
        ];
        for (key, value) in objects {
            let write = Write::Put {
                key: key.into(),
                rtype: key.split('/').nth(1).unwrap().into(),
                value: bytes::Bytes::from_static(value.as_bytes()),
            };
            store.write(write).await.unwrap();
        }
        let all = store.versions("a", "pod", String::new(), 1 << 20).await;
        let entry = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            all.unwrap(),
            Versions {
                entries: vec![
                    entry("a/pod/1", "11"),
                    entry("a/pod/2", ""),
                    entry("a/pod/3", "13")
                ],
                more: false
            }
        );
        // `"a/pod/1":"11",` is 15 bytes, and the token `"a/pod/2"` 9: two fit in 39.
        let first = store.versions("a", "pod", String::new(), 39).await.unwrap();
        assert_eq!(first.entries.len(), 2);
        assert!(first.more);
        let rest = store
            .versions("a", "pod", first.entries[1].0.clone(), 39)
            .await
            .unwrap();
        assert_eq!(rest.entries, [entry("a/pod/3", "13")]);
        assert!(!rest.more);
        let one = store.versions("a", "pod", String::new(), 1).await.unwrap();
        assert_eq!(one.entries.len(), 1, "one entry at least");
        store.close().await;
    }
}
