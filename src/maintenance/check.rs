//! `metamanager check`: whether a database is whole and holds to the store's own invariants,
//! each failure named on a line of its own, so that a script or an operator can act on it.
//!
//! Everything is read in one read transaction: on a database the service is writing, the check
//! sees one committed state, so the digest is compared with the objects it was written with and
//! a write that lands meanwhile is never taken for a mismatch. The connection is read-only.
//!
//! What is checked, and why each holds (only what the writer guarantees on every path):
//! - `integrity`: SQLite's `PRAGMA integrity_check`. On a damaged file the store's invariants
//!   are not read further: what a damaged b-tree returns proves nothing.
//! - `rv`: a row's `rv` column is its object's `metadata.resourceVersion`: the writer and the
//!   backfill at start-up set both from the same value. A null `rv` is a row written by other
//!   means and not counted yet, which the next start counts; it is noted, not a problem.
//! - `digest`: each scope's row holds the count and hash of its counted rows, summed with
//!   [`digest::term`] over their stored `rv`, as the writer keeps it inside each write's
//!   transaction; a scope with counted rows has a row, and a row has counted rows.
//! - `change`: an object's `change_seq` is the number of the change that stored it, recorded in
//!   `changes` in the same transaction. `changes` keeps a suffix of the history (pruning only
//!   removes the oldest numbers, never the last), so no object or message id carries a number
//!   past the last recorded one, and an object whose number lies within the recorded history has
//!   its change there. Which key that change names is not checked: a database from before
//!   `change_seq` numbered every object with the last change at its upgrade.
//! - `outbox`: each waiting message is a message the cloud can read, by the crate's parser.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::{failure_of, Failure, Progress};
use crate::message::{DecodeError, Message, Operation};
use crate::resource::Resource;
use crate::store::digest;

/// Virtual machine instructions between two looks at the progress, during the integrity check.
const PROGRESS_OPS: i32 = 1 << 20;
/// Objects between two progress updates.
const PROGRESS_ROWS: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Open(#[from] super::OpenError),
    #[error("{path} is not a MetaManager database: it has no meta table")]
    NotMetaManager { path: PathBuf },
    #[error("cannot read database {path} ({step}): {source}")]
    Read {
        path: PathBuf,
        step: &'static str,
        source: rusqlite::Error,
    },
    #[error("cannot write the findings: {0}")]
    Output(#[source] std::io::Error),
}

impl CheckError {
    /// What the failure means for the exit status.
    pub fn failure(&self) -> Failure {
        match self {
            CheckError::Open(_) | CheckError::NotMetaManager { .. } => Failure::BadInput,
            CheckError::Read { source, .. } => failure_of(source, Failure::Io),
            CheckError::Output(_) => Failure::Io,
        }
    }

    /// Whether the reader of the findings went away (`check | head`): not a failure to report.
    pub fn is_closed_output(&self) -> bool {
        matches!(self, CheckError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// What a check read and found.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// Problems found, each written as one line.
    pub problems: u64,
    pub objects: u64,
    /// Objects with a null `rv`, not counted in the digest yet.
    pub uncounted: u64,
    pub scopes: u64,
    pub outbox: u64,
    /// Checks not made, and why (the database lacks what they read).
    pub skipped: Vec<String>,
    pub elapsed: Duration,
}

/// Checks the database at `db`, writing each problem to `out` as a line
/// `CHECK SUBJECT: DETAIL` (`integrity: DETAIL` for SQLite's findings).
pub fn check(db: &Path, out: &mut dyn Write, progress: &Progress) -> Result<Checked, CheckError> {
    let started = Instant::now();
    let mut conn = super::open_read_only(db)?;
    let mut run = Run {
        db,
        found: Found {
            out,
            progress,
            problems: 0,
        },
        checked: Checked::default(),
        progress,
    };
    // One snapshot for everything below (see the module documentation).
    conn.execute_batch("BEGIN")
        .map_err(run.read("opening a read transaction"))?;
    let schema = Schema::read(&conn).map_err(run.read("reading the schema"))?;
    if !schema.meta {
        return Err(CheckError::NotMetaManager {
            path: db.to_owned(),
        });
    }
    if run.integrity(&mut conn)? {
        match run.invariants(&conn, &schema) {
            // Damage the integrity check did not see (a page it does not reach) is still
            // damage: a finding, not a failure of the check.
            Err(CheckError::Read { step, source, .. })
                if failure_of(&source, Failure::Io) == Failure::Damaged =>
            {
                run.found
                    .report("integrity", "", &format!("{step}: {source}"))?;
                run.skip("the rest of the store's invariants (the file is damaged)");
            }
            other => other?,
        }
    } else {
        run.skip("the store's own invariants (the file is damaged)");
    }
    // The transaction only held a snapshot: nothing is lost however it ends, and on a damaged
    // file SQLite may already have ended it.
    let _ = conn.execute_batch("ROLLBACK");
    run.found.out.flush().map_err(CheckError::Output)?;
    let mut checked = run.checked;
    checked.problems = run.found.problems;
    checked.elapsed = started.elapsed();
    Ok(checked)
}

/// Which of the store's tables and columns the database has: one MetaManager has not opened
/// yet (KubeEdge's, or an older MetaManager's) lacks some, which its next start adds.
struct Schema {
    meta: bool,
    rv: bool,
    change_seq: bool,
    digest: bool,
    changes: bool,
    processed_change: bool,
    outbox: bool,
}

impl Schema {
    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let has = |t: &str| tables.iter().any(|n| n == t);
        let mut column = conn.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?;
        let mut has_column = |t: &str, c: &str| -> rusqlite::Result<bool> { column.exists([t, c]) };
        Ok(Self {
            meta: has("meta"),
            rv: has("meta") && has_column("meta", "rv")?,
            change_seq: has("meta") && has_column("meta", "change_seq")?,
            digest: has("digest"),
            changes: has("changes"),
            processed_change: has("processed") && has_column("processed", "change_seq")?,
            outbox: has("outbox"),
        })
    }
}

/// The problems found so far, written as they are found.
struct Found<'a> {
    out: &'a mut dyn Write,
    progress: &'a Progress,
    problems: u64,
}

impl Found<'_> {
    fn report(&mut self, check: &str, subject: &str, detail: &str) -> Result<(), CheckError> {
        self.problems += 1;
        // A key written by SQL may hold anything; one problem stays one line.
        let subject: String = subject.chars().flat_map(char::escape_debug).collect();
        let detail: String = detail
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let line = if subject.is_empty() {
            format!("{check}: {detail}")
        } else {
            format!("{check} {subject}: {detail}")
        };
        let out = &mut self.out;
        self.progress
            .suspend(|| writeln!(out, "{line}"))
            .map_err(CheckError::Output)
    }
}

struct Run<'a> {
    db: &'a Path,
    found: Found<'a>,
    checked: Checked,
    progress: &'a Progress,
}

/// The sums one scope's counted objects give: count and hash, as the `digest` table keeps them.
#[derive(Default)]
struct Sum {
    count: i64,
    hash: u64,
}

/// One row of `meta`, as the check reads it.
struct ObjectRow {
    key: String,
    /// For a counted row: its `rv`, and its object's `metadata.resourceVersion`.
    versions: Option<(String, String)>,
    /// Its change number, when change numbers are checked.
    number: Option<i64>,
}

impl ObjectRow {
    /// The query of every row: the `rv` and change number read as null where the database
    /// lacks them, or (`numbered` false) no history to check them against.
    fn query(schema: &Schema, numbered: bool) -> String {
        format!(
            "SELECT key, value, {}, {} FROM meta",
            if schema.rv { "rv" } else { "NULL" },
            if schema.change_seq && numbered {
                "change_seq"
            } else {
                "NULL"
            }
        )
    }

    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        let value = bytes(row.get_ref(1)?);
        let rv = optional_text(row.get_ref(2)?);
        // Only a counted row's version is compared, so only then is the value scanned.
        let actual = rv
            .as_ref()
            .map(|_| digest::resource_version(value).into_owned());
        Ok(Self {
            key: text(row.get_ref(0)?),
            versions: rv.zip(actual),
            number: row.get::<_, Option<i64>>(3).ok().flatten(),
        })
    }
}

impl Run<'_> {
    fn read(&self, step: &'static str) -> impl Fn(rusqlite::Error) -> CheckError {
        let path = self.db.to_owned();
        move |source| CheckError::Read {
            path: path.clone(),
            step,
            source,
        }
    }

    fn skip(&mut self, what: &str) {
        self.checked.skipped.push(what.to_owned());
    }

    /// SQLite's integrity check; true when the file is whole.
    fn integrity(&mut self, conn: &mut Connection) -> Result<bool, CheckError> {
        let progress = self.progress.clone();
        conn.progress_handler(
            PROGRESS_OPS,
            Some(move || {
                progress.busy("integrity check running");
                false
            }),
        )
        .map_err(self.read("watching the integrity check"))?;
        let result: rusqlite::Result<Vec<String>> =
            conn.prepare("PRAGMA integrity_check").and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<_>>()
            });
        let _ = conn.progress_handler(0, None::<fn() -> bool>);
        let findings = match result {
            Ok(rows) => rows,
            // Damage bad enough that the check itself cannot run is a finding too.
            Err(e) if failure_of(&e, Failure::Io) == Failure::Damaged => {
                vec![format!("the integrity check stopped: {e}")]
            }
            Err(e) => return Err(self.read("running the integrity check")(e)),
        };
        if findings == ["ok"] {
            return Ok(true);
        }
        for finding in &findings {
            for line in finding.lines().filter(|l| !l.trim().is_empty()) {
                self.found.report("integrity", "", line)?;
            }
        }
        Ok(false)
    }

    fn invariants(&mut self, conn: &Connection, schema: &Schema) -> Result<(), CheckError> {
        let history: Option<(i64, i64)> = if schema.changes {
            conn.query_row("SELECT min(seq), max(seq) FROM changes", [], |r| {
                Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
            })
            .map_err(self.read("reading the recorded changes"))?
        } else {
            self.skip("change numbers (no changes table yet)");
            None
        };
        if !schema.change_seq && schema.changes {
            self.skip("objects' change numbers (no change_seq column yet)");
        }
        let sums = self.objects(conn, schema, history)?;
        if schema.rv && schema.digest {
            self.digest(conn, sums)?;
        } else {
            self.skip("the digest (no digest table or rv column yet)");
        }
        if let (true, Some((_, last))) = (schema.processed_change, history) {
            self.processed(conn, last)?;
        }
        if schema.outbox {
            self.outbox(conn)?;
        } else {
            self.skip("the outbox (no outbox table)");
        }
        Ok(())
    }

    /// One pass over `meta`: each row's `rv` and change number, and the digest its counted
    /// rows give, per scope.
    fn objects(
        &mut self,
        conn: &Connection,
        schema: &Schema,
        history: Option<(i64, i64)>,
    ) -> Result<HashMap<String, Sum>, CheckError> {
        let total: i64 = conn
            .query_row("SELECT count(*) FROM meta", [], |r| r.get(0))
            .map_err(self.read("counting the objects"))?;
        let total = total.max(0) as u64;
        let mut stmt = conn
            .prepare(&ObjectRow::query(schema, history.is_some()))
            .map_err(self.read("reading the objects"))?;
        let mut recorded = match schema.changes {
            true => Some(
                conn.prepare("SELECT 1 FROM changes WHERE seq = ?1")
                    .map_err(self.read("reading the recorded changes"))?,
            ),
            false => None,
        };
        let mut rows = stmt.query([]).map_err(self.read("reading the objects"))?;
        let mut sums: HashMap<String, Sum> = HashMap::new();
        let mut done = 0u64;
        self.progress.update(0, total, "objects");
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(e) => return Err(self.read("reading the objects")(e)),
            };
            let object = ObjectRow::read(row).map_err(self.read("reading the objects"))?;
            self.object_version(&object, &mut sums)?;
            if let (Some(number), Some(history)) = (object.number, history) {
                self.object_number(&object.key, number, history, recorded.as_mut())?;
            }
            done += 1;
            if done.is_multiple_of(PROGRESS_ROWS) {
                self.progress.update(done, total.max(done), "objects");
            }
        }
        self.progress.update(done, total.max(done), "objects");
        self.progress.finish();
        self.checked.objects = done;
        Ok(sums)
    }

    /// A counted row's `rv` against its object's version, and its term added to its scope's
    /// sum; a row not counted yet is only counted as such.
    fn object_version(
        &mut self,
        object: &ObjectRow,
        sums: &mut HashMap<String, Sum>,
    ) -> Result<(), CheckError> {
        let Some((rv, actual)) = &object.versions else {
            self.checked.uncounted += 1;
            return Ok(());
        };
        let key = &object.key;
        if actual != rv {
            self.found.report(
                "rv",
                key,
                &format!(
                    "the row's rv is {rv:?}, its object's metadata.resourceVersion is {actual:?}"
                ),
            )?;
        }
        let sum = sums.entry(digest::scope_of(key).to_owned()).or_default();
        sum.count += 1;
        sum.hash = sum.hash.wrapping_add(digest::term(key, rv));
        Ok(())
    }

    /// An object's change `number` against the recorded history (`first` to `last`): not past
    /// its end, and within it, recorded (looked up with `recorded`, when there is a table).
    fn object_number(
        &mut self,
        key: &str,
        number: i64,
        (first, last): (i64, i64),
        recorded: Option<&mut rusqlite::Statement<'_>>,
    ) -> Result<(), CheckError> {
        let missing = match recorded {
            Some(recorded) if (first..=last).contains(&number) => !recorded
                .exists([number])
                .map_err(self.read("reading the recorded changes"))?,
            _ => false,
        };
        if number > last {
            self.found.report(
                "change",
                key,
                &format!("numbered {number}, after the last recorded change {last}"),
            )?;
        } else if missing {
            self.found.report(
                "change",
                key,
                &format!(
                    "numbered {number}, but that change is missing from the recorded history ({first} to {last})"
                ),
            )?;
        }
        Ok(())
    }

    /// The `digest` table against the sums of the objects.
    fn digest(
        &mut self,
        conn: &Connection,
        mut sums: HashMap<String, Sum>,
    ) -> Result<(), CheckError> {
        let rows: Vec<(String, i64, i64)> = conn
            .prepare("SELECT scope, count, hash FROM digest ORDER BY scope")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((text(r.get_ref(0)?), r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(self.read("reading the digest"))?;
        for (scope, count, hash) in rows {
            let hash = hash as u64;
            match sums.remove(&scope) {
                None => self.found.report(
                    "digest",
                    &scope,
                    &format!("the row says {count} objects, but the scope holds no counted object"),
                )?,
                Some(sum) if sum.count != count || sum.hash != hash => self.found.report(
                    "digest",
                    &scope,
                    &format!(
                        "the row says {count} objects, hash {hash:016x}; the objects give {}, hash {:016x}",
                        sum.count, sum.hash
                    ),
                )?,
                Some(_) => {}
            }
            self.checked.scopes += 1;
        }
        let mut missing: Vec<(String, Sum)> = sums.into_iter().collect();
        missing.sort_by(|a, b| a.0.cmp(&b.0));
        for (scope, sum) in missing {
            self.found.report(
                "digest",
                &scope,
                &format!("{} counted objects, but no digest row", sum.count),
            )?;
        }
        Ok(())
    }

    /// Message ids whose change is numbered past the last recorded change.
    fn processed(&mut self, conn: &Connection, last: i64) -> Result<(), CheckError> {
        let ahead: Vec<(String, i64)> = conn
            .prepare("SELECT msg_id, change_seq FROM processed WHERE change_seq > ?1 ORDER BY seq")
            .and_then(|mut s| {
                s.query_map([last], |r| Ok((text(r.get_ref(0)?), r.get(1)?)))?
                    .collect()
            })
            .map_err(self.read("reading the processed message ids"))?;
        for (id, number) in ahead {
            self.found.report(
                "change",
                &format!("message {id}"),
                &format!("made change {number}, after the last recorded change {last}"),
            )?;
        }
        Ok(())
    }

    /// Each outbox row's payload, as the cloud would read it.
    fn outbox(&mut self, conn: &Connection) -> Result<(), CheckError> {
        let mut stmt = conn
            .prepare("SELECT seq, payload FROM outbox ORDER BY seq")
            .map_err(self.read("reading the outbox"))?;
        let mut rows = stmt.query([]).map_err(self.read("reading the outbox"))?;
        loop {
            let (seq, problem) = match rows.next() {
                Ok(Some(row)) => {
                    let seq: i64 = row.get(0).map_err(self.read("reading the outbox"))?;
                    let payload = row.get_ref(1).map_err(self.read("reading the outbox"))?;
                    (seq, outbox_problem(bytes(payload)))
                }
                Ok(None) => break,
                Err(e) => return Err(self.read("reading the outbox")(e)),
            };
            self.checked.outbox += 1;
            if let Some(problem) = problem {
                self.found.report("outbox", &seq.to_string(), &problem)?;
            }
        }
        Ok(())
    }
}

/// Why an outbox payload is not a message the cloud can read, if it is not.
///
/// The crate's parser is the inbound one: two of its refusals are about what edgehub may send,
/// not about what MetaManager sends, and are let through. It refuses the `digest` operation,
/// which MetaManager sends and never receives (the resource, which it checks after the
/// operation, is checked here instead); and it bounds the content's depth, which the local
/// API's writes forwarded to the cloud are not held to (everything else is checked first).
pub fn outbox_problem(payload: &[u8]) -> Option<String> {
    match Message::decode(payload, usize::MAX) {
        Ok(_) | Err(DecodeError::TooDeep) => None,
        Err(DecodeError::UnknownOperation(op)) if op == Operation::Digest.as_str() => {
            #[derive(serde::Deserialize)]
            struct Routed {
                route: Route,
            }
            #[derive(serde::Deserialize)]
            struct Route {
                resource: String,
            }
            match serde_json::from_slice::<Routed>(payload) {
                Ok(m) => Resource::parse(&m.route.resource)
                    .err()
                    .map(|e| format!("invalid route.resource: {e}")),
                Err(e) => Some(e.to_string()),
            }
        }
        Err(e) => Some(e.to_string()),
    }
}

/// A column as text, whatever SQLite stored: a row written by SQL may hold any type.
fn text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => String::new(),
    }
}

fn optional_text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Null => None,
        v => Some(text(v)),
    }
}

fn bytes(v: ValueRef<'_>) -> &[u8] {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => t,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_payloads_are_read_as_the_cloud_reads_them() {
        let good = crate::message::build(
            None,
            Operation::Update,
            "default/podstatus",
            &crate::message::raw_array(["{}"]),
        );
        assert_eq!(outbox_problem(&good), None);
        let digest = crate::message::build(
            None,
            Operation::Digest,
            "node/digest",
            &crate::message::raw("{}".into()),
        );
        assert_eq!(outbox_problem(&digest), None);
        let bad_digest = crate::message::build(
            None,
            Operation::Digest,
            "a/b/c/d",
            &crate::message::raw("{}".into()),
        );
        assert!(outbox_problem(&bad_digest).is_some());
        let deep = format!(
            r#"{{"header":{{"msg_id":"x"}},"route":{{"operation":"insert","resource":"a/pod/b"}},"content":{}1{}}}"#,
            "[".repeat(120),
            "]".repeat(120)
        );
        assert_eq!(outbox_problem(deep.as_bytes()), None);
        assert!(outbox_problem(b"not json").is_some_and(|p| p.contains("not valid JSON")));
        assert!(outbox_problem(b"[1]").is_some());
        assert!(outbox_problem(br#"{"header":{"msg_id":""},"route":{}}"#).is_some());
    }
}
