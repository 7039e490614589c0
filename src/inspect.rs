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

    /// Writes every object of `namespace/type`, in key order, as JSON lines; returns how many.
    pub fn list(&self, resource: &str, out: &mut impl Write) -> Result<usize, InspectError> {
        let r = Resource::parse(resource)?;
        if r.name().is_some() {
            return Err(InspectError::NotAList(resource.to_owned()));
        }
        self.write_rows(Some((r.namespace(), r.rtype())), out)
    }

    /// Writes every stored object, in key order, as JSON lines; returns how many.
    pub fn export(&self, out: &mut impl Write) -> Result<usize, InspectError> {
        self.write_rows(None, out)
    }

    fn write_rows(
        &self,
        within: Option<(&str, &str)>,
        out: &mut impl Write,
    ) -> Result<usize, InspectError> {
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
        assert_eq!(inspector.export(&mut out).expect("export"), 5);
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
