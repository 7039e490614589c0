//! The database's tables, brought up to date at every open, and what a start reads back from
//! them: the run's number and the recorded changes the feed's history starts with. Kept apart
//! from the writer's loop because it runs once, before the writer thread exists, and every
//! migration of an older database (KubeEdge's, or an earlier MetaManager's) lives in one place.

use rusqlite::Connection;

use super::room;
use crate::store::{feed, ChangeKind, StoreEvent};

/// Sets the connection up for the writer and brings the tables up to date: creates what is
/// missing and adds the columns an older database lacks, so that every later statement can
/// count on the current schema.
pub(in crate::store) fn prepare(conn: &Connection, synchronous: &str) -> rusqlite::Result<()> {
    conn.busy_timeout(crate::store::BUSY_TIMEOUT)?;
    room::incremental_vacuum(conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    room::bound_the_log(conn)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (
             key        TEXT PRIMARY KEY,
             type       TEXT NOT NULL,
             value      TEXT NOT NULL,
             change_seq INTEGER NOT NULL DEFAULT 0
         );
         CREATE INDEX IF NOT EXISTS meta_type ON meta(type);
         CREATE TABLE IF NOT EXISTS processed (
             seq     INTEGER PRIMARY KEY,
             msg_id  TEXT NOT NULL UNIQUE,
             settled INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE IF NOT EXISTS changes (
             seq   INTEGER PRIMARY KEY,
             kind  INTEGER NOT NULL,
             key   TEXT NOT NULL,
             rtype TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS outbox (
             seq          INTEGER PRIMARY KEY,
             resource     TEXT NOT NULL,
             coalesce_key TEXT UNIQUE,
             created_ms   INTEGER NOT NULL,
             payload      BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS forwards (
             seq   INTEGER PRIMARY KEY,
             kind  INTEGER NOT NULL,
             key   TEXT NOT NULL,
             value BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS sent_patches (
             seq    INTEGER PRIMARY KEY,
             msg_id TEXT NOT NULL UNIQUE,
             key    TEXT NOT NULL,
             rtype  TEXT NOT NULL
         );",
    )?;
    // The cluster-scoped objects' lookup by type and name (see `read::cluster_object`).
    conn.execute_batch(&format!(
        "CREATE INDEX IF NOT EXISTS meta_name ON meta({})",
        crate::store::read::NAME_OF_KEY
    ))?;
    // Databases from before the settled flag have `processed` without it. An id from then
    // counts as unsettled: a redelivery of it is passed on again only if its change is still
    // the stored state.
    let has_settled = conn
        .prepare("SELECT 1 FROM pragma_table_info('processed') WHERE name = 'settled'")?
        .exists([])?;
    if !has_settled {
        conn.execute_batch("ALTER TABLE processed ADD COLUMN settled INTEGER NOT NULL DEFAULT 0")?;
    }
    // The number of the change a message made (see `is_current`); absent from older
    // databases, and null for a message that changed nothing.
    let has_change = conn
        .prepare("SELECT 1 FROM pragma_table_info('processed') WHERE name = 'change_seq'")?
        .exists([])?;
    if !has_change {
        conn.execute_batch("ALTER TABLE processed ADD COLUMN change_seq INTEGER")?;
    }
    // The run that recorded an id (see `start_run`); null for ids from before runs were
    // numbered, which count as an earlier run's.
    let has_run = conn
        .prepare("SELECT 1 FROM pragma_table_info('processed') WHERE name = 'run'")?
        .exists([])?;
    if !has_run {
        conn.execute_batch("ALTER TABLE processed ADD COLUMN run INTEGER")?;
    }
    crate::store::digest::prepare(conn)
}

/// Numbers this run: one more than the last run recorded in the database. A repeat of an id
/// recorded by this run is never passed on again; one recorded by an earlier run is, by the
/// restart rule (see [`crate::store::Outcome::Duplicate`]).
pub(in crate::store) fn start_run(conn: &Connection) -> rusqlite::Result<i64> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS runs (
             name  TEXT PRIMARY KEY,
             value INTEGER NOT NULL
         )",
    )?;
    conn.query_row(
        "INSERT INTO runs (name, value) VALUES ('run', 1)
         ON CONFLICT(name) DO UPDATE SET value = value + 1
         RETURNING value",
        [],
        |r| r.get(0),
    )
}

/// Adds `meta.change_seq`, the number of each object's last change (which the local API gives
/// out as its `resourceVersion`, see `crate::store::feed`), to a database from before it (or
/// KubeEdge's), numbering every object stored `last`, the feed's position: versions only grow,
/// and a watch from it resumes. Column and numbers come in one transaction, so no object is
/// ever without a number.
pub(in crate::store) fn number_objects(conn: &Connection, last: u64) -> rusqlite::Result<()> {
    let numbered = conn
        .prepare("SELECT 1 FROM pragma_table_info('meta') WHERE name = 'change_seq'")?
        .exists([])?;
    if numbered {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE meta ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;",
    )?;
    let numbered = conn
        .execute("UPDATE meta SET change_seq = ?1", [last as i64])
        .and_then(|_| conn.execute_batch("COMMIT"));
    if numbered.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    numbered
}

/// The number of the last recorded change, and the recorded changes the feed's history starts
/// with (at most [`feed::HISTORY_CHANGES`], without content), from the `changes` table; a
/// database with none starts at [`feed::first_number`].
pub(in crate::store) fn recorded_changes(
    conn: &Connection,
) -> rusqlite::Result<(u64, Vec<StoreEvent>)> {
    let last: Option<i64> = conn.query_row("SELECT max(seq) FROM changes", [], |r| r.get(0))?;
    let Some(last) = last.and_then(|l| u64::try_from(l).ok()) else {
        return Ok((feed::first_number() - 1, Vec::new()));
    };
    let mut stmt =
        conn.prepare("SELECT seq, kind, key, rtype FROM changes WHERE seq > ?1 ORDER BY seq")?;
    let from = last.saturating_sub(feed::HISTORY_CHANGES as u64) as i64;
    let rows = stmt.query_map([from], |r| {
        let kind = match r.get::<_, i64>(1)? {
            0 => ChangeKind::Added,
            1 => ChangeKind::Modified,
            _ => ChangeKind::Deleted,
        };
        Ok(StoreEvent {
            seq: r.get::<_, i64>(0)? as u64,
            kind,
            key: r.get(2)?,
            rtype: r.get(3)?,
            value: None,
        })
    })?;
    Ok((last, rows.collect::<rusqlite::Result<_>>()?))
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::store::tests::put;
    use crate::store::writer::tests::{dup, settled_flag, with_id};
    use crate::store::{Store, StoreOptions};

    #[tokio::test]
    async fn objects_of_a_database_from_before_change_numbers_are_numbered_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            // KubeEdge's table, and MetaManager's before objects carried change numbers.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('ns/pod/p', 'pod', '{\"v\":1}');",
            )
            .unwrap();
        }
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let position = store.feed_position();
        let row = store.get_row("ns/pod/p").await.unwrap().unwrap();
        assert_eq!(row.version, position, "numbered the feed's position");
        assert_eq!(row.value, r#"{"v":1}"#, "the stored value untouched");
        let (_live, backlog) = store.changes_since(row.version).unwrap();
        assert!(backlog.is_empty(), "a watch from it resumes");
        store.close().await;
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(
            store.get_row("ns/pod/p").await.unwrap().unwrap().version,
            position,
            "numbered once"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_database_without_the_settled_flag_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            // The schema of the first version that remembered message ids.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);
                 CREATE TABLE processed (seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL UNIQUE);
                 INSERT INTO meta VALUES ('ns/pod/p', 'pod', '{\"v\":2}');
                 INSERT INTO processed (msg_id) VALUES ('old-insert');",
            )
            .unwrap();
        }
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let redelivered = with_id("old-insert", Some(put("ns/pod/p", r#"{"v":1}"#)));
        assert_eq!(
            store.write(redelivered).await.unwrap().outcome,
            dup(false, false),
            "an id from before the flag is unsettled, and checked against the stored state"
        );
        store.write(with_id("new", None)).await.unwrap();
        store.settle("new", 0);
        store.close().await;
        assert_eq!(settled_flag(&path, "new"), Some(true));
        // Opening again finds the column and leaves it alone.
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        store.close().await;
    }
}
