//! `metamanager backup` and `metamanager check` on real databases the running service filled
//! over MQTT: a backup taken while the service keeps writing holds everything acked before it
//! began, passes `check`, and serves it when a MetaManager starts on it; `check` passes a good
//! database and names each kind of damage; a backup that cannot be written leaves nothing.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{count_rows, fixture, message, msg_id, BrokerKind, Options, Peer, TestApp};
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_metamanager");

fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs the binary, killing it and failing the test when it has not exited `within`: a backup
/// that restarts under the writer would otherwise hang the test instead of failing it.
fn cli_within(args: &[&str], within: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = Instant::now() + within;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{args:?} did not finish within {within:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A pod of about 2.5 KiB, so that a few thousand fill a few thousand database pages.
fn pod(name: &str, version: u64) -> Value {
    let mut pod = fixture("pod.json");
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["resourceVersion"] = json!(version.to_string());
    pod["metadata"]["annotations"] = json!({"padding": "x".repeat(1000)});
    pod
}

/// Sends `objects` as the cloud, `window` at a time, and waits for every `OK`.
async fn write_all(peer: &mut Peer, operation: &str, objects: &[(String, Value)], window: usize) {
    for chunk in objects.chunks(window) {
        let sent: Vec<Value> = chunk
            .iter()
            .map(|(key, object)| message(operation, key, object.clone()))
            .collect();
        for m in &sent {
            peer.publish("edgehub", m).await;
        }
        for m in &sent {
            let reply = peer.reply_to("metamanager/to/edgehub", msg_id(m)).await;
            assert_eq!(reply["content"], "OK", "{reply}");
        }
        // Forwards to edged, kept by the client otherwise: they are not looked at here.
        peer.drain(Duration::ZERO).await;
    }
}

/// The stored objects of a database file, by key.
fn stored(db: &Path) -> std::collections::HashMap<String, Value> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn.prepare("SELECT key, value FROM meta").unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(|r| {
            let (k, v) = r.unwrap();
            (k, serde_json::from_str(&v).unwrap())
        })
        .collect();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_writes_holds_every_acked_object_and_serves_it() {
    let mut app = TestApp::embedded().await;
    const N: usize = 3000;
    // The writer below changes the first ones; the rest must be in the copy as acked.
    const CHANGED: usize = 100;
    let objects: Vec<(String, Value)> = (0..N)
        .map(|i| {
            let name = format!("p{i:05}");
            (format!("default/pod/{name}"), pod(&name, i as u64 + 1))
        })
        .collect();
    write_all(&mut app.client, "insert", &objects, 200).await;

    // A second client keeps writing, updates and inserts, each acked, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut writer_peer = app.peer().await;
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<(String, Value)> = (0..10u64)
                    .map(|j| {
                        let n = round * 10 + j;
                        if n.is_multiple_of(2) {
                            let name = format!("p{:05}", n as usize % CHANGED);
                            (format!("default/pod/{name}"), pod(&name, 1_000_000 + n))
                        } else {
                            let name = format!("w{n:06}");
                            (format!("default/pod/{name}"), pod(&name, 1))
                        }
                    })
                    .collect();
                write_all(&mut writer_peer, "update", &batch, 10).await;
                acked.fetch_add(batch.len(), Ordering::Relaxed);
                round += 1;
            }
        })
    };
    while acked.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let db = app.db_path();
    let out = app.dir.path().join("backups/copy.db");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let before = acked.load(Ordering::Relaxed);
    let args: Vec<String> = [
        "backup",
        "--db",
        path(&db),
        "--pages-per-step",
        "16",
        "--pause",
        "20ms",
        path(&out),
    ]
    .map(str::to_owned)
    .to_vec();
    let backed = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_within(&args, Duration::from_secs(120))
    })
    .await
    .unwrap();
    let during = acked.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let stderr = text(&backed.stderr);
    eprintln!("{stderr}({during} writes acked while it ran)");
    assert_eq!(backed.status.code(), Some(0), "{stderr}");
    assert!(
        during > 0,
        "the service committed nothing while the backup ran"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("backup: wrote {}: ", out.display())),
        "{stderr}"
    );
    let steps: u64 = last
        .rsplit(" in ")
        .next()
        .and_then(|s| s.strip_suffix(" steps)"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no step count in {last:?}"));
    assert!(steps >= 10, "the copy took {steps} steps: {stderr}");

    // A plain single file, and nothing else beside it.
    let header = std::fs::read(&out).unwrap();
    assert_eq!(&header[18..20], [1, 1], "the copy's header says WAL");
    let beside: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, ["copy.db"]);

    // Every object acked before the backup began, as acked; those changed since, in some
    // version; the writer's inserts, as far as the snapshot reached.
    let copy = stored(&out);
    for (key, object) in &objects[CHANGED..] {
        assert_eq!(copy.get(key), Some(object), "{key}");
    }
    for (key, _) in &objects[..CHANGED] {
        assert!(copy.contains_key(key), "{key}");
    }
    let written = copy.keys().filter(|k| k.contains("/w")).count();
    assert!(written <= acked.load(Ordering::Relaxed), "{written}");

    // The copy holds to the store's invariants: one snapshot, not pages of several.
    let checked = cli(&["check", "--db", path(&out)]);
    assert_eq!(checked.status.code(), Some(0), "{checked:?}");
    assert_eq!(text(&checked.stdout), "");

    // Restored: a MetaManager started on the copy serves what it holds.
    let mut restored = TestApp::spawn_with_db(Options::new(BrokerKind::Embedded), out.clone())
        .await
        .expect("the embedded broker needs nothing installed");
    let (key, object) = &objects[N - 1];
    assert_eq!(restored.client.query("edged", key).await, json!([object]));
}

/// The service with objects in three scopes and messages waiting for the cloud in its outbox,
/// running.
async fn filled() -> TestApp {
    let mut app = TestApp::embedded().await;
    let mut objects: Vec<(String, Value)> = (0..5)
        .map(|i| {
            let name = format!("pod-{i}");
            (format!("default/pod/{name}"), pod(&name, 10 + i))
        })
        .collect();
    objects.push(("default/configmap/app".into(), fixture("configmap.json")));
    objects.push((
        "kube-system/configmap/app".into(),
        fixture("configmap.json"),
    ));
    write_all(&mut app.client, "insert", &objects, 10).await;
    // What edged reports while the cloud is away waits in the outbox.
    app.set_cloud(false).await;
    for i in 0..3 {
        let status = message(
            "update",
            &format!("default/podstatus/pod-{i}"),
            json!({"Name": format!("pod-{i}"), "Status": {"phase": "Running"}}),
        );
        let ack = app.client.request("edged", &status).await;
        assert_eq!(ack["route"]["operation"], "response", "{ack}");
    }
    assert!(count_rows(&app, "SELECT count(*) FROM outbox") > 0);
    app
}

/// A copy of the filled database, stopped cleanly first so that the file alone is complete,
/// with `damage` (SQL) applied to it.
async fn damaged(damage: &str) -> (TestApp, PathBuf) {
    let mut app = filled().await;
    assert!(app.terminate().success());
    let copy = app.dir.path().join("damaged.db");
    std::fs::copy(app.db_path(), &copy).unwrap();
    let conn = Connection::open(&copy).unwrap();
    conn.execute_batch(damage).unwrap();
    drop(conn);
    (app, copy)
}

fn check(db: &Path) -> (Option<i32>, Vec<String>, String) {
    let out = cli(&["check", "--db", path(db)]);
    let lines = text(&out.stdout).lines().map(str::to_owned).collect();
    (out.status.code(), lines, text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_database_while_the_service_writes_it() {
    let mut app = filled().await;
    let db = app.db_path();
    // Writes go on while it runs.
    let more: Vec<(String, Value)> = (0..50)
        .map(|i| {
            let name = format!("more-{i}");
            (format!("default/pod/{name}"), pod(&name, 1))
        })
        .collect();
    let checker = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || check(&db))
    };
    write_all(&mut app.client, "insert", &more, 5).await;
    let (code, lines, stderr) = checker.await.unwrap();
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    assert!(lines.is_empty(), "{lines:?}");
    let outbox = count_rows(&app, "SELECT count(*) FROM outbox");
    assert!(
        stderr.contains("check: ok: ") && stderr.contains(&format!(", {outbox} outbox messages")),
        "{stderr}"
    );
    // And again on the database as it is now, through the config.
    let config = app.config_path();
    let out = cli(&["--config", path(&config), "check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_digest_row_that_does_not_match_its_objects() {
    let (_app, db) = damaged("UPDATE digest SET hash = hash + 1 WHERE scope = 'default/pod'").await;
    let (code, lines, stderr) = check(&db);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("digest default/pod: "), "{lines:?}");
    assert!(stderr.contains("1 problem"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_rows_written_by_sql_with_a_wrong_rv_or_without_a_digest_row() {
    let (_app, db) = damaged(
        r#"INSERT INTO meta (key, type, value, rv) VALUES
             ('default/pod/by-sql', 'pod', '{"metadata":{"name":"by-sql","resourceVersion":"5"}}', '6'),
             ('other/pod/by-sql', 'pod', '{"metadata":{"name":"by-sql","resourceVersion":"5"}}', '5'),
             ('default/pod/uncounted', 'pod', '{"metadata":{"name":"uncounted"}}', NULL);"#,
    )
    .await;
    let (code, mut lines, stderr) = check(&db);
    assert_eq!(code, Some(1), "{stderr}");
    lines.sort();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("digest default/pod: "), "{lines:?}");
    assert!(
        lines[1].starts_with("digest other/pod: 1 counted objects, but no digest row"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with(r#"rv default/pod/by-sql: the row's rv is "6""#),
        "{lines:?}"
    );
    // A row without its rv is one MetaManager counts at its next start: said, not a problem.
    assert!(stderr.contains("1 objects are not counted"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_change_numbers_past_or_missing_from_the_history() {
    // pod-1's number moves past the last change; pod-3's change goes from the middle of the
    // history (not its start, which pruning moves); one message id claims a change to come.
    let (_app, db) = damaged(
        "UPDATE meta SET change_seq = (SELECT max(seq) FROM changes) + 7
          WHERE key = 'default/pod/pod-1';
         DELETE FROM changes WHERE seq = (SELECT change_seq FROM meta WHERE key = 'default/pod/pod-3');
         UPDATE processed SET change_seq = (SELECT max(seq) FROM changes) + 9
          WHERE seq = (SELECT min(seq) FROM processed);",
    )
    .await;
    let (code, mut lines, stderr) = check(&db);
    assert_eq!(code, Some(1), "{stderr}");
    lines.sort();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with("change default/pod/pod-1: numbered ")
            && lines[0].contains(", after the last recorded change "),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("change default/pod/pod-3: numbered ")
            && lines[1].contains("missing from the recorded history"),
        "{lines:?}"
    );
    assert!(lines[2].starts_with("change message "), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_outbox_payload_that_is_not_json() {
    let (_app, db) = damaged(
        "UPDATE outbox SET payload = CAST('{\"header\": ' AS BLOB)
         WHERE seq = (SELECT min(seq) FROM outbox)",
    )
    .await;
    let seq: i64 = Connection::open(&db)
        .unwrap()
        .query_row("SELECT min(seq) FROM outbox", [], |r| r.get(0))
        .unwrap();
    let (code, lines, stderr) = check(&db);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("outbox {seq}: payload is not valid JSON")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_overwritten_pages_by_the_integrity_check() {
    let (_app, db) = damaged("").await;
    let mut bytes = std::fs::read(&db).unwrap();
    let page = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
    assert!(bytes.len() >= 4 * page, "{} bytes", bytes.len());
    // Every page but the first (the schema), so the damage hits the tables' b-trees.
    for (i, b) in bytes[page..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&db, &bytes).unwrap();
    let (code, lines, stderr) = check(&db);
    assert_eq!(code, Some(1), "{lines:?} {stderr}");
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|l| l.starts_with("integrity: ")),
        "{lines:?}"
    );
    assert!(
        stderr.contains("not checked: the store's own invariants"),
        "{stderr}"
    );
}

/// A database with the store's `meta` table, made without the service.
fn small_database(dir: &Path) -> PathBuf {
    let db = dir.join("m.db");
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);
         INSERT INTO meta VALUES ('default/pod/a', 'pod', '{}');",
    )
    .unwrap();
    db
}

#[test]
fn a_backup_that_cannot_be_written_says_why_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = small_database(dir.path());
    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing();

    // A directory that does not exist: a bad argument.
    let missing = dir.path().join("no-such-dir/copy.db");
    let out = cli(&["backup", "--db", path(&db), path(&missing)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "directory {} does not exist",
            missing.parent().unwrap().display()
        )),
        "{stderr}"
    );
    assert!(!missing.parent().unwrap().exists());

    // OUT exists: never replaced.
    let existing = dir.path().join("existing.db");
    std::fs::write(&existing, "keep").unwrap();
    let out = cli(&["backup", "--db", path(&db), path(&existing)]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("already exists"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "keep");
    std::fs::remove_file(&existing).unwrap();

    // A directory where no file can be made, even by root: an I/O failure.
    let out = cli(&["backup", "--db", path(&db), "/proc/self/copy.db"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("cannot write the backup"), "{stderr}");

    // A database that is not MetaManager's, found out once the copy's file exists: a bad
    // argument, and the file goes.
    let out = cli(&[
        "backup",
        "--db",
        path(&other),
        path(&dir.path().join("copy.db")),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no such table: meta"), "{stderr}");

    // A database that is not there: a bad argument.
    let out = cli(&[
        "backup",
        "--db",
        path(&dir.path().join("none.db")),
        path(&dir.path().join("copy.db")),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    assert_eq!(listing(), before, "a failed backup left something behind");

    // And with the database named by the config, it works.
    let config = dir.path().join("edge.yaml");
    std::fs::write(&config, format!("database:\n  path: {}\n", db.display())).unwrap();
    let copy = dir.path().join("copy.db");
    let out = cli(&["backup", "--config", path(&config), path(&copy)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stored(&copy).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_check_quietly() {
    // Thousands of problems: far more than a pipe holds, so check writes after it closed.
    let (_app, db) = damaged(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 4999)
         INSERT INTO meta (key, type, value, rv)
         SELECT printf('default/pod/sql-%05d', i), 'pod', '{}', 'wrong' FROM n;",
    )
    .await;
    let mut child = Command::new(BIN)
        .args(["check", "--db", path(&db)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    let mut stdout = child.stdout.take().unwrap();
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("check failed"), "{stderr}");
}
