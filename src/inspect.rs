//! Read-only access to a database for the `get`, `list` and `export` subcommands.
//!
//! The connection is opened with SQLite's read-only flag, so nothing here can change the
//! database, its write-ahead log or its schema: an operator can look at a node's store while
//! MetaManager runs (WAL lets readers work beside its writer) without disturbing it.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::maintenance::{failure_of, Failure};
use crate::progress::Progress;
use crate::resource::{Resource, ResourceError};
use crate::store::read;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot open database {path} read-only: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read the database: {0}")]
    Read(#[from] rusqlite::Error),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error("{0} names a list (namespace/type); get needs namespace/type/name")]
    NotAnObject(String),
    #[error("{0} names one object; list needs namespace/type")]
    NotAList(String),
}

impl InspectError {
    /// What the failure means for the exit status: a wrong argument (the database named among
    /// them: missing, not MetaManager's, or damaged, which `check` tells more of) or a failed
    /// read or write. The reader of the output going away is neither: see
    /// [`InspectError::is_closed_output`].
    pub fn failure(&self) -> Failure {
        let of = |e| match failure_of(e, Failure::BadInput) {
            Failure::Io => Failure::Io,
            Failure::BadInput | Failure::Damaged => Failure::BadInput,
        };
        match self {
            Self::Open { source, .. } => of(source),
            Self::Read(e) => of(e),
            Self::Output(_) => Failure::Io,
            Self::Missing { .. } | Self::Resource(_) | Self::NotAnObject(_) | Self::NotAList(_) => {
                Failure::BadInput
            }
        }
    }

    /// Whether whoever read the output stopped reading (`export | head`).
    pub fn is_closed_output(&self) -> bool {
        matches!(self, Self::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Objects written between two progress updates of `export`: a bar's redraw costs more than a
/// line of output.
const PROGRESS_EVERY: usize = 1024;

/// One stored object, as `export` and `list` print it: one JSON object a line.
#[derive(Serialize)]
struct Row<'a> {
    key: &'a str,
    #[serde(rename = "type")]
    rtype: &'a str,
    value: &'a RawValue,
}

/// A read-only view of a MetaManager database.
pub struct Inspector {
    conn: Connection,
}

impl Inspector {
    /// Opens `path` read-only; a missing file is an error, never created.
    pub fn open(path: &Path) -> Result<Self, InspectError> {
        if !path.is_file() {
            return Err(InspectError::Missing {
                path: path.to_owned(),
            });
        }
        let conn = read::open(path).map_err(|source| InspectError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { conn })
    }

    /// The stored value (JSON text) of `namespace/type/name`, if any.
    pub fn get(&self, resource: &str) -> Result<Option<String>, InspectError> {
        let r = Resource::parse(resource)?;
        if r.name().is_none() {
            return Err(InspectError::NotAnObject(resource.to_owned()));
        }
        Ok(read::get(&self.conn, r.key())?)
    }

    /// Writes the stored value of `namespace/type/name` and a line end; whether it is stored.
    pub fn print(&self, resource: &str, out: &mut impl Write) -> Result<bool, InspectError> {
        let Some(value) = self.get(resource)? else {
            return Ok(false);
        };
        writeln!(out, "{value}")?;
        out.flush()?;
        Ok(true)
    }

    /// Writes every object of `namespace/type`, in key order, as JSON lines; returns how many.
    pub fn list(&self, resource: &str, out: &mut impl Write) -> Result<usize, InspectError> {
        let r = Resource::parse(resource)?;
        if r.name().is_some() {
            return Err(InspectError::NotAList(resource.to_owned()));
        }
        self.write_rows(Some((r.namespace(), r.rtype())), out, |_| {})
    }

    /// Writes every stored object, in key order, as JSON lines, telling `progress` how far it
    /// got; returns how many. The objects are one snapshot, counted first.
    pub fn export(&self, out: &mut impl Write, progress: &Progress) -> Result<usize, InspectError> {
        let snapshot = self.conn.unchecked_transaction()?;
        let total: i64 = snapshot.query_row("SELECT count(*) FROM meta", [], |r| r.get(0))?;
        let total = total.max(0) as u64;
        let count = self.write_rows(None, out, |done| {
            if done % PROGRESS_EVERY == 0 {
                progress.update(done as u64, total, "objects");
            }
        })?;
        progress.update(count as u64, total.max(count as u64), "objects");
        Ok(count)
    }

    fn write_rows(
        &self,
        within: Option<(&str, &str)>,
        out: &mut impl Write,
        written: impl Fn(usize),
    ) -> Result<usize, InspectError> {
        let mut done = 0;
        let count = read::for_each(&self.conn, within, |key, rtype, value| {
            // Stored values are JSON; one that is not is shown as a JSON string, not dropped.
            let raw = RawValue::from_string(value.clone())
                .or_else(|_| RawValue::from_string(serde_json::Value::String(value).to_string()))
                .map_err(std::io::Error::other)?;
            let line = serde_json::to_string(&Row {
                key: &key,
                rtype: &rtype,
                value: &raw,
            })
            .map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
            done += 1;
            written(done);
            Ok::<_, InspectError>(())
        })?;
        out.flush()?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(dir: &Path) -> PathBuf {
        let path = dir.join("m.db");
        let conn = Connection::open(&path).expect("create");
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);
             INSERT INTO meta VALUES ('default/pod/a', 'pod', '{\"n\":\"a\"}');
             INSERT INTO meta VALUES ('default/pod/b', 'pod', '{\"n\":\"b\"}');
             INSERT INTO meta VALUES ('default/pod0/c', 'pod0', '{}');
             INSERT INTO meta VALUES ('default/podstatus/a', 'podstatus', '{}');
             INSERT INTO meta VALUES ('kube/pod/c', 'pod', 'not json');",
        )
        .expect("fill");
        path
    }

    #[test]
    fn list_takes_exactly_the_namespace_and_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inspector = Inspector::open(&database(dir.path())).expect("open");
        let mut out = Vec::new();
        assert_eq!(inspector.list("default/pod", &mut out).expect("list"), 2);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains(r#""key":"default/pod/a""#));
        assert!(!text.contains("pod0") && !text.contains("podstatus"));
    }

    #[test]
    fn export_shows_a_value_that_is_not_json_as_a_string() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inspector = Inspector::open(&database(dir.path())).expect("open");
        let mut out = Vec::new();
        let progress = Progress::lines("export");
        assert_eq!(inspector.export(&mut out, &progress).expect("export"), 5);
        let text = String::from_utf8(out).expect("utf-8");
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).expect("each line is JSON");
        }
        assert!(text.contains(r#""value":"not json""#));
    }

    #[test]
    fn get_refuses_a_list_and_a_missing_database_is_not_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inspector = Inspector::open(&database(dir.path())).expect("open");
        assert!(matches!(
            inspector.get("default/pod"),
            Err(InspectError::NotAnObject(_))
        ));
        assert_eq!(inspector.get("default/pod/zz").expect("get"), None);
        let missing = dir.path().join("none.db");
        assert!(matches!(
            Inspector::open(&missing),
            Err(InspectError::Missing { .. })
        ));
        assert!(!missing.exists());
    }
}
