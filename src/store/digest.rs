//! The digest: per scope (`ns/type`), how many objects the store holds and an order-independent
//! hash of their keys and resourceVersions (topics.md, "Reconciliation").
//!
//! A scope's hash is the sum, modulo 2^64, of one term per object: the first 8 bytes, big-endian,
//! of SHA-256 over `key + "\n" + rv`. A sum can be updated by subtracting the old term and adding
//! the new one, so the writer keeps the `digest` table right inside each write's transaction and
//! reading the digest never scans the store: it costs the same for ten objects or a million.
//!
//! Each `meta` row carries its `rv` (the object's `metadata.resourceVersion`, `""` without one)
//! in a column, so that the term of the object a write replaces or deletes is known without
//! parsing its old value. `rv` is never null while MetaManager runs: a row written by other means
//! (SQL, an older MetaManager) has a null `rv`, is found through a partial index at the next
//! start, and is counted then ([`backfill`]).

use std::borrow::Cow;
use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

/// Rows given their `rv` and counted per transaction while backfilling at open, so that the
/// write-ahead log stays small on a large store.
const BACKFILL_CHUNK: usize = 5_000;

/// One scope of the digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeDigest {
    /// `ns/type`.
    pub scope: String,
    /// Objects stored in the scope (never 0: an empty scope has no entry).
    pub count: u64,
    /// The sum of the objects' terms, modulo 2^64 (see [`term`]).
    pub hash: u64,
}

/// The digest of the whole store, read in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// The number of the last change to `meta` included (the change feed's numbering).
    pub change: u64,
    /// The scopes holding at least one object, in scope order.
    pub scopes: Vec<ScopeDigest>,
}

impl ScopeDigest {
    /// The hash as written on the wire: 16 lowercase hex digits.
    pub fn hash_hex(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

/// One object's contribution to its scope's hash.
pub fn term(key: &str, rv: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(key.as_bytes());
    ctx.update(b"\n");
    ctx.update(rv.as_bytes());
    let sum = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&sum.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// The scope of a stored key: its first two segments.
pub fn scope_of(key: &str) -> &str {
    match key.match_indices('/').nth(1) {
        Some((at, _)) => &key[..at],
        None => key,
    }
}

/// Changes to the digest made by one transaction, summed per scope and written once before
/// its commit.
#[derive(Debug, Default)]
pub(super) struct Deltas {
    /// In order of arrival, so that a change rolled back alone can be taken out again.
    entries: Vec<(String, i64, u64)>,
}

impl Deltas {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn truncate(&mut self, len: usize) {
        self.entries.truncate(len);
    }

    /// An object now stored under `key` with `rv`.
    pub fn add(&mut self, key: &str, rv: &str) {
        self.entries
            .push((scope_of(key).to_owned(), 1, term(key, rv)));
    }

    /// The object stored under `key` with `rv` is gone (deleted or about to be replaced).
    pub fn remove(&mut self, key: &str, rv: &str) {
        self.entries
            .push((scope_of(key).to_owned(), -1, term(key, rv).wrapping_neg()));
    }

    /// The object under `key` went from `old` (its `rv`; `None`: not stored, or stored
    /// without an `rv` and so not counted yet) to `new` (`None`: deleted).
    pub fn replace(&mut self, key: &str, old: Option<&str>, new: Option<&str>) {
        if old == new && old.is_some() {
            return;
        }
        if let Some(old) = old {
            self.remove(key, old);
        }
        if let Some(new) = new {
            self.add(key, new);
        }
    }

    /// Adds the deltas to the `digest` table in the open transaction, and forgets them.
    pub fn flush(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let mut sums: HashMap<&str, (i64, u64)> = HashMap::new();
        for (scope, count, hash) in &self.entries {
            let sum = sums.entry(scope).or_default();
            sum.0 += count;
            sum.1 = sum.1.wrapping_add(*hash);
        }
        let mut read = conn.prepare_cached("SELECT count, hash FROM digest WHERE scope = ?1")?;
        let mut write = conn.prepare_cached(
            "INSERT INTO digest (scope, count, hash) VALUES (?1, ?2, ?3)
             ON CONFLICT(scope) DO UPDATE SET count = excluded.count, hash = excluded.hash",
        )?;
        let mut drop_scope = conn.prepare_cached("DELETE FROM digest WHERE scope = ?1")?;
        for (scope, (count, hash)) in sums {
            if count == 0 && hash == 0 {
                continue;
            }
            let (was_count, was_hash) = read
                .query_row([scope], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .optional()?
                .unwrap_or((0, 0));
            let count = was_count + count;
            let hash = (was_hash as u64).wrapping_add(hash);
            if count <= 0 {
                drop_scope.execute([scope])?;
            } else {
                write.execute(params![scope, count, hash as i64])?;
            }
        }
        self.entries.clear();
        Ok(())
    }
}

/// Creates the `digest` table and the index of rows not counted yet.
pub(super) fn prepare(conn: &Connection) -> rusqlite::Result<()> {
    let has_rv = conn
        .prepare("SELECT 1 FROM pragma_table_info('meta') WHERE name = 'rv'")?
        .exists([])?;
    if !has_rv {
        // Null for every existing row: [`backfill`] gives each its `rv` and counts it.
        conn.execute_batch("ALTER TABLE meta ADD COLUMN rv TEXT")?;
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS digest (
             scope TEXT PRIMARY KEY,
             count INTEGER NOT NULL,
             hash  INTEGER NOT NULL
         );
         CREATE INDEX IF NOT EXISTS meta_rv_unknown ON meta(key) WHERE rv IS NULL;",
    )
}

/// Gives every row with a null `rv` its `rv`, and counts it into the digest; a chunk per
/// transaction. Once, at open: after that the writer keeps both. Returns the rows counted.
/// Shows its progress: on an earlier version's large database it is minutes of start-up.
pub(super) fn backfill(conn: &Connection) -> rusqlite::Result<u64> {
    let uncounted: u64 = conn.query_row("SELECT count(*) FROM meta WHERE rv IS NULL", [], |r| {
        r.get::<_, i64>(0).map(|n| n.max(0) as u64)
    })?;
    if uncounted == 0 {
        return Ok(0);
    }
    let progress = crate::progress::Progress::in_log("counting stored objects into the digest");
    let counted = backfill_chunks(conn, |done| progress.update(done, uncounted, "objects"));
    progress.finish();
    counted
}

fn backfill_chunks(conn: &Connection, progress: impl Fn(u64)) -> rusqlite::Result<u64> {
    let mut total = 0u64;
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let counted = backfill_chunk(conn).and_then(|n| {
            conn.execute_batch("COMMIT")?;
            Ok(n)
        });
        match counted {
            Ok(0) => return Ok(total),
            Ok(n) => {
                total += n as u64;
                progress(total);
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
}

fn backfill_chunk(conn: &Connection) -> rusqlite::Result<usize> {
    let rows: Vec<(String, String)> = conn
        .prepare_cached("SELECT key, value FROM meta WHERE rv IS NULL LIMIT ?1")?
        .query_map([BACKFILL_CHUNK as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut set = conn.prepare_cached("UPDATE meta SET rv = ?2 WHERE key = ?1")?;
    let mut deltas = Deltas::default();
    for (key, value) in &rows {
        let rv = resource_version(value.as_bytes());
        set.execute(params![key, rv.as_ref()])?;
        deltas.add(key, &rv);
    }
    deltas.flush(conn)?;
    Ok(rows.len())
}

/// Reads the digest in one snapshot.
pub(super) fn read(conn: &Connection) -> rusqlite::Result<Digest> {
    let tx = conn.unchecked_transaction()?;
    let last: Option<i64> = tx.query_row("SELECT max(seq) FROM changes", [], |r| r.get(0))?;
    let scopes = tx
        .prepare_cached("SELECT scope, count, hash FROM digest WHERE count > 0 ORDER BY scope")?
        .query_map([], |r| {
            Ok(ScopeDigest {
                scope: r.get(0)?,
                count: r.get::<_, i64>(1)? as u64,
                hash: r.get::<_, i64>(2)? as u64,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    tx.finish()?;
    Ok(Digest {
        change: last.map_or(0, |l| l as u64),
        scopes,
    })
}

/// `metadata.resourceVersion` of an object's JSON when it is a string; `""` otherwise (no
/// metadata, no version, a version that is not a string, content that is not an object).
///
/// Runs on every write, so it scans the bytes instead of parsing the object: it reads the
/// top-level keys up to `metadata` and that object's keys up to `resourceVersion`, skipping
/// other values without building them (Kubernetes writes `metadata` first, so this is usually
/// a few hundred bytes). Escaped keys or an escaped version fall back to a full parse.
pub fn resource_version(json: &[u8]) -> Cow<'_, str> {
    match scan_version(json) {
        Scan::Found(raw) => match std::str::from_utf8(raw) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => Cow::Borrowed(""),
        },
        Scan::Absent => Cow::Borrowed(""),
        Scan::Unsure => parsed_version(json).map_or(Cow::Borrowed(""), Cow::Owned),
    }
}

/// What the byte scan found.
enum Scan<'a> {
    /// The version's text, between its quotes, with no escapes.
    Found(&'a [u8]),
    /// No string version.
    Absent,
    /// Escapes or malformed JSON: parse instead.
    Unsure,
}

fn scan_version(json: &[u8]) -> Scan<'_> {
    let member = |obj, name| match find_member(json, obj, name) {
        Ok(Some(at)) => Ok(Some(at)),
        Ok(None) => Err(Scan::Absent),
        Err(()) => Err(Scan::Unsure),
    };
    let run = || -> Result<Option<usize>, Scan<'_>> {
        let top = skip_ws(json, 0);
        if json.get(top) != Some(&b'{') {
            return Err(Scan::Absent);
        }
        let Some(meta) = member(top, b"metadata".as_slice())? else {
            return Err(Scan::Absent);
        };
        if json.get(meta) != Some(&b'{') {
            return Err(Scan::Absent);
        }
        member(meta, b"resourceVersion".as_slice())
    };
    let at = match run() {
        Ok(Some(at)) => at,
        Ok(None) => return Scan::Absent,
        Err(scan) => return scan,
    };
    if json.get(at) != Some(&b'"') {
        return Scan::Absent;
    }
    match string_end(json, at) {
        Some((end, false)) => Scan::Found(&json[at + 1..end - 1]),
        Some((_, true)) | None => Scan::Unsure,
    }
}

/// In the object starting at `obj` (its `{`), where the value of the first member named `name`
/// starts. `Err` when a key is escaped or the JSON is malformed.
fn find_member(json: &[u8], obj: usize, name: &[u8]) -> Result<Option<usize>, ()> {
    let mut at = skip_ws(json, obj + 1);
    if json.get(at) == Some(&b'}') {
        return Ok(None);
    }
    loop {
        if json.get(at) != Some(&b'"') {
            return Err(());
        }
        let (end, escaped) = string_end(json, at).ok_or(())?;
        if escaped {
            return Err(());
        }
        let key = &json[at + 1..end - 1];
        at = skip_ws(json, end);
        if json.get(at) != Some(&b':') {
            return Err(());
        }
        let value = skip_ws(json, at + 1);
        if key == name {
            return Ok(Some(value));
        }
        at = skip_ws(json, value_end(json, value).ok_or(())?);
        match json.get(at) {
            Some(b',') => at = skip_ws(json, at + 1),
            Some(b'}') => return Ok(None),
            _ => return Err(()),
        }
    }
}

fn skip_ws(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// The end (one past the closing quote) of the string starting at `at`, and whether it holds
/// an escape.
fn string_end(json: &[u8], at: usize) -> Option<(usize, bool)> {
    let mut i = at + 1;
    let mut escaped = false;
    while let Some(&b) = json.get(i) {
        match b {
            b'"' => return Some((i + 1, escaped)),
            b'\\' => {
                escaped = true;
                i += 2;
            }
            _ => i += 1,
        }
    }
    None
}

/// One past the end of the value starting at `at`.
fn value_end(json: &[u8], at: usize) -> Option<usize> {
    match json.get(at)? {
        b'"' => string_end(json, at).map(|(end, _)| end),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&b) = json.get(i) {
                match b {
                    b'"' => {
                        i = string_end(json, i)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut i = at;
            while json
                .get(i)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
            {
                i += 1;
            }
            (i > at).then_some(i)
        }
    }
}

/// The full parse, for what the scan is unsure of.
fn parsed_version(json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "resourceVersion")]
        resource_version: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct Obj {
        metadata: Option<serde_json::Value>,
    }
    let obj: Obj = serde_json::from_slice(json).ok()?;
    let meta: Meta = serde_json::from_value(obj.metadata?).ok()?;
    match meta.resource_version? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rv(json: &str) -> String {
        resource_version(json.as_bytes()).into_owned()
    }

    #[test]
    fn the_version_is_read_from_metadata_only() {
        assert_eq!(
            rv(r#"{"metadata":{"name":"a","resourceVersion":"42"}}"#),
            "42"
        );
        assert_eq!(
            rv(
                r#" { "kind" : "Pod", "spec": {"metadata": {"resourceVersion": "9"}, "x": [1, {"a": "}"}]},
                   "metadata" : { "labels": {"a": "b\"}"}, "resourceVersion" : "7" } }"#
            ),
            "7"
        );
        assert_eq!(rv(r#"{"metadata":{"name":"a"}}"#), "");
        assert_eq!(rv(r#"{"spec":{"resourceVersion":"1"}}"#), "");
        assert_eq!(rv(r#"{"metadata":{"resourceVersion":12}}"#), "");
        assert_eq!(rv(r#"{"metadata":null}"#), "");
        assert_eq!(rv(r#"[{"metadata":{"resourceVersion":"1"}}]"#), "");
        assert_eq!(rv(r#""text""#), "");
        assert_eq!(rv("not json"), "");
        assert_eq!(rv(r#"{"metadata":{"resourceVersion":""}}"#), "");
        assert_eq!(
            rv(r#"{"n":-1.5e3,"t":true,"metadata":{"resourceVersion":"5"}}"#),
            "5"
        );
    }

    #[test]
    fn escapes_are_read_as_json_reads_them() {
        assert_eq!(rv(r#"{"metadata":{"resourceVersion":"a\"b"}}"#), "a\"b");
        assert_eq!(rv(r#"{"meta\u0064ata":{"resourceVersion":"3"}}"#), "3");
        assert_eq!(rv(r#"{"metadata":{"resource\u0056ersion":"4"}}"#), "4");
        assert_eq!(rv(r#"{"metadata":{"resourceVersion":"\u00e9"}}"#), "é");
    }

    #[test]
    fn the_scan_agrees_with_a_parse_on_the_fixtures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read(&path).unwrap();
                let value: serde_json::Value = match serde_json::from_slice(&text) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                for object in [&value, &value["content"]] {
                    let json = serde_json::to_vec(object).unwrap();
                    let expected = object["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned();
                    assert_eq!(resource_version(&json), expected, "{}", path.display());
                }
            }
        }
    }

    #[test]
    fn the_term_is_the_first_eight_bytes_of_sha256() {
        // The hash used is SHA-256: its published test vector for "abc".
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"abc");
        assert_eq!(
            &ctx.finish().as_ref()[..8],
            [0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea]
        );
        assert_eq!(term("ab", "c"), term("ab", "c"));
        assert_ne!(term("a/b/c", "1"), term("a/b/c", "2"));
    }

    #[test]
    fn a_scope_is_the_first_two_segments() {
        assert_eq!(scope_of("default/pod/nginx"), "default/pod");
        assert_eq!(scope_of("ns/configmap/a/b"), "ns/configmap");
        assert_eq!(scope_of("ns/pod"), "ns/pod");
    }
}
