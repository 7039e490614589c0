//! The disk as a governed resource (issue 27): `cargo bench --bench metamanager -- --storage`.
//!
//! Churn: pods written many times over, then all deleted, through the library's store at its
//! defaults; the database and log files against the live data at the peak, right after the
//! deletes and after compaction (the store's periodic work, asked for one step at a time until
//! the files stop shrinking), and an empty store's files as the floor.
//!
//! Conversion: an earlier version's database (made by the store, then rewritten without
//! `auto_vacuum` by plain rusqlite) opened by this one, which converts it once with `VACUUM`;
//! timed against opening the converted file again.
//!
//! Backup and check: `metamanager backup` and `metamanager check` run as processes on the same
//! databases, when this build has them ([`maintenance_commands`]), timed against a plain copy of
//! the file and SQLite's integrity check alone; and a writer's single small commits while
//! backups run, against the same writer alone.
//!
//! The store runs in-process; no broker is involved. The report is Markdown on stdout, progress
//! goes to stderr.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, percentiles, Percentiles};
use metamanager::store::settings::Synchronous;
use metamanager::store::space::wal_path;
use metamanager::store::{Committed, Outcome, Store, StoreError, StoreOptions, Write};

/// The service's period for the store's periodic work (`MAINTAIN_EVERY` in src/app/running.rs).
const APP_PERIOD: Duration = Duration::from_secs(10);
/// Writes submitted and not yet answered, at most: enough to fill every batch.
const IN_FLIGHT: usize = 8192;
/// How often the files are looked at during the churn, in writes.
const SAMPLE_EVERY: usize = 1000;
/// Compaction steps asked for at most; far more than any churn here needs.
const MAX_STEPS: usize = 100_000;
/// The pause between two of the trickling writer's commits.
const TRICKLE_GAP: Duration = Duration::from_millis(5);
/// The shortest time the trickling writer is measured for, alone and during backups.
const MIN_WINDOW: Duration = Duration::from_secs(2);

struct Sizes {
    /// Pods in the churn, and how many times each is written.
    churn_objects: usize,
    writes_each: usize,
    /// Objects in the databases converted, backed up and checked.
    databases: [usize; 2],
}

pub async fn run(dir: &Path, pod: &str, configmap: &str, quick: bool) {
    let sizes = if quick {
        Sizes {
            churn_objects: 1_000,
            writes_each: 20,
            databases: [10_000, 100_000],
        }
    } else {
        Sizes {
            churn_objects: 10_000,
            writes_each: 100,
            databases: [10_000, 1_000_000],
        }
    };
    println!("## Storage (issue 27)\n");
    println!(
        "sizes: churn of {} pods written {} times each, then deleted; databases of {} and {} configmaps for the conversion, backup and check\n",
        sizes.churn_objects, sizes.writes_each, sizes.databases[0], sizes.databases[1]
    );
    let churned = churn(dir, pod, &sizes).await;
    print_churn(&churned, pod.len());

    let commands = maintenance_commands();
    let mut databases = Vec::new();
    for objects in sizes.databases {
        databases.push(database(dir, configmap, objects, commands.as_deref().ok()).await);
    }
    print_conversion(&databases, configmap.len());
    print_maintenance(&databases, &commands);

    println!("## The per-message path\n");
    println!(
        "Not measured here: the quota's measure is one pragma read and one `stat` per batch. Compare `cargo bench --bench metamanager -- --burst` (the burst and the query round trip) before and after issue 27.\n"
    );
}

/// The database file and its write-ahead log, in bytes.
#[derive(Clone, Copy, Default)]
struct Files {
    db: u64,
    wal: u64,
}

impl Files {
    fn of(db: &Path) -> Self {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        Self {
            db: len(db),
            wal: len(&wal_path(db)),
        }
    }

    fn total(self) -> u64 {
        self.db + self.wal
    }
}

/// Removes a database and whatever the store and SQLite keep beside it.
fn remove_database(db: &Path) {
    for suffix in ["", "-wal", "-shm", "-reserve", ".lock"] {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(path));
    }
}

/// A fixture with some of its string fields left as holes, filled per object without parsing
/// it again.
struct Template {
    /// The text around the holes, one more than the holes.
    pieces: Vec<String>,
    /// Which value goes in each hole, in the order they appear.
    holes: Vec<usize>,
}

impl Template {
    /// `fields`: the path of each hole, as object keys.
    fn new(fixture: &str, fields: &[&[&str]]) -> Self {
        let marker = |k: usize| format!("@@hole-{k}@@");
        let mut value: Value = serde_json::from_str(fixture).expect("fixture JSON");
        for (k, path) in fields.iter().enumerate() {
            let mut at = &mut value;
            for key in *path {
                at = &mut at[*key];
            }
            *at = Value::String(marker(k));
        }
        let text = value.to_string();
        let mut found: Vec<(usize, usize)> = (0..fields.len())
            .map(|k| (text.find(&marker(k)).expect("the hole's marker"), k))
            .collect();
        found.sort_unstable();
        let (mut pieces, mut holes, mut from) = (Vec::new(), Vec::new(), 0);
        for (at, k) in found {
            pieces.push(text[from..at].to_owned());
            holes.push(k);
            from = at + marker(k).len();
        }
        pieces.push(text[from..].to_owned());
        Self { pieces, holes }
    }

    /// The fixture with `values` in its holes; they are put inside the JSON strings as they
    /// are, so they must need no escaping.
    fn fill(&self, values: &[&str]) -> String {
        let mut out =
            String::with_capacity(self.pieces.iter().map(String::len).sum::<usize>() + 64);
        for (piece, k) in self.pieces.iter().zip(&self.holes) {
            out.push_str(piece);
            out.push_str(values[*k]);
        }
        out.push_str(self.pieces.last().map_or("", String::as_str));
        out
    }
}

/// What a run of writes came to.
#[derive(Default)]
struct Tally {
    stored: usize,
    deleted: usize,
    /// Refused with `storage full`.
    full: usize,
    /// Any other outcome or error; the first error, if any.
    other: usize,
    first_error: Option<String>,
}

impl Tally {
    fn count(
        &mut self,
        answer: Result<Result<metamanager::store::Applied, StoreError>, impl std::fmt::Debug>,
    ) {
        match answer {
            Ok(Ok(applied)) => match applied.outcome {
                Outcome::Stored => self.stored += 1,
                Outcome::Deleted => self.deleted += 1,
                _ => self.other += 1,
            },
            Ok(Err(StoreError::StorageFull(_))) => self.full += 1,
            Ok(Err(e)) => {
                self.other += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                self.other += 1;
                self.first_error.get_or_insert_with(|| format!("{e:?}"));
            }
        }
    }
}

/// Submits `writes` in order, at most [`IN_FLIGHT`] unanswered, as the existing store run does
/// (submitting ahead is what lets changes share a commit), and calls `sample` every
/// [`SAMPLE_EVERY`] writes and at the end.
async fn pipeline(
    store: &Store,
    writes: impl Iterator<Item = Write>,
    mut sample: impl FnMut(),
) -> Tally {
    let mut tally = Tally::default();
    let mut pending: VecDeque<Committed> = VecDeque::with_capacity(IN_FLIGHT);
    for (k, write) in writes.enumerate() {
        if pending.len() >= IN_FLIGHT {
            if let Some(oldest) = pending.pop_front() {
                tally.count(oldest.await);
            }
        }
        pending.push_back(store.submit(write).await.expect("the store takes writes"));
        if k % SAMPLE_EVERY == 0 {
            sample();
        }
    }
    for committed in pending {
        tally.count(committed.await);
    }
    sample();
    tally
}

/// Asks for the store's periodic work and waits until the writer has done it. It runs after
/// the batch it arrived with, so the first of two empty writes after it may be answered before
/// it; the second is taken only once it is done. An absent key's delete writes nothing.
async fn maintained(store: &Store) {
    store.maintain().await.expect("maintain");
    for _ in 0..2 {
        store
            .write(Write::Delete {
                key: "bench/pod/absent".into(),
                uid: None,
            })
            .await
            .expect("an empty write");
    }
}

/// The service's maintenance, every [`APP_PERIOD`], until aborted.
fn maintain_every_period(store: &Store) -> tokio::task::JoinHandle<()> {
    let store = store.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(APP_PERIOD);
        every.tick().await;
        loop {
            every.tick().await;
            if store.maintain().await.is_err() {
                return;
            }
        }
    })
}

/// The bytes of the stored objects' values.
fn object_bytes(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open read-only");
    conn.query_row(
        "SELECT coalesce(sum(length(CAST(value AS BLOB))), 0) FROM meta",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| b as u64)
    .expect("sum of value bytes")
}

/// The files and the live data at one point of the churn.
struct Point {
    files: Files,
    /// `space().used()`: pages in use and the log, as the writer last measured them.
    used: u64,
    /// `None` where not read (at the peak, which is sampled while writing).
    object_bytes: Option<u64>,
}

impl Point {
    fn now(store: &Store, db: &Path) -> Self {
        Self {
            files: Files::of(db),
            used: store.space().used(),
            object_bytes: Some(object_bytes(db)),
        }
    }
}

struct Churn {
    objects: usize,
    writes_each: usize,
    quota: u64,
    peak: Point,
    after_writes: Point,
    after_deletes: Point,
    after_compaction: Point,
    empty: Files,
    written: Tally,
    write_time: Duration,
    deleted: Tally,
    delete_time: Duration,
    /// Steps that shrank the files, their time in all and the longest.
    steps: usize,
    compaction: Duration,
    longest_step: Duration,
    /// The step limit was reached before the files stopped shrinking.
    unfinished: bool,
}

async fn churn(dir: &Path, pod: &str, sizes: &Sizes) -> Churn {
    let db = dir.join("churn.db");
    remove_database(&db);
    let template = Template::new(
        pod,
        &[&["metadata", "name"], &["metadata", "resourceVersion"]],
    );
    let template = &template;
    let options = StoreOptions::default();
    let quota = options.max_size;
    let store = Store::open(&db, options).expect("store");
    let (n, rounds) = (sizes.churn_objects, sizes.writes_each);
    eprintln!("storage: churn, {} writes", n * rounds);

    let mut peak = Point {
        files: Files::default(),
        used: 0,
        object_bytes: None,
    };
    let mut sample = |store: &Store| {
        let files = Files::of(&db);
        if files.total() > peak.files.total() {
            peak.files = files;
            peak.used = store.space().used();
        }
    };
    // Every write a new version of its pod: updates that change the content.
    let writes = (0..rounds)
        .flat_map(|round| (0..n).map(move |i| (round, i)))
        .map(|(round, i)| {
            let name = format!("churn-{i:05}");
            let version = (round * n + i + 1).to_string();
            Write::Put {
                key: format!("default/pod/{name}"),
                rtype: "pod".into(),
                value: template.fill(&[&name, &version]).into(),
            }
        });
    let ticking = maintain_every_period(&store);
    let started = Instant::now();
    let written = pipeline(&store, writes, || sample(&store)).await;
    let write_time = started.elapsed();
    ticking.abort();
    let after_writes = Point::now(&store, &db);

    let deletes = (0..n).map(|i| Write::Delete {
        key: format!("default/pod/churn-{i:05}"),
        uid: None,
    });
    let started = Instant::now();
    let deleted = pipeline(&store, deletes, || sample(&store)).await;
    let delete_time = started.elapsed();
    let after_deletes = Point::now(&store, &db);

    eprintln!("storage: compaction");
    let (mut steps, mut compaction, mut longest_step) = (0, Duration::ZERO, Duration::ZERO);
    let mut last = after_deletes.files.total();
    let started = Instant::now();
    loop {
        let step = Instant::now();
        maintained(&store).await;
        let now = Files::of(&db).total();
        if now >= last || steps >= MAX_STEPS {
            break;
        }
        steps += 1;
        longest_step = longest_step.max(step.elapsed());
        compaction = started.elapsed();
        last = now;
    }
    let after_compaction = Point::now(&store, &db);
    store.close().await;
    remove_database(&db);

    // The floor: a store that never held anything, after its periodic work.
    let empty_db = dir.join("empty.db");
    remove_database(&empty_db);
    let empty_store = Store::open(&empty_db, StoreOptions::default()).expect("empty store");
    maintained(&empty_store).await;
    let empty = Files::of(&empty_db);
    empty_store.close().await;
    remove_database(&empty_db);

    Churn {
        objects: n,
        writes_each: rounds,
        quota,
        peak,
        after_writes,
        after_deletes,
        after_compaction,
        empty,
        written,
        write_time,
        deleted,
        delete_time,
        steps,
        compaction,
        longest_step,
        unfinished: steps >= MAX_STEPS,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_churn(c: &Churn, fixture_bytes: usize) {
    let writes = c.objects * c.writes_each;
    println!("## Churn: the files against the live data\n");
    println!(
        "{} pods (the pod fixture, {fixture_bytes} bytes compacted, names varied), each written {} times (a new resourceVersion each time), then all deleted, through the store at its defaults (synchronous=FULL, database.max_size {:.0} MiB), {IN_FLIGHT} writes in flight; the service's maintenance every {} s during the writes (none during the deletes). \"live data\" is `space().used()`, what the quota counts (pages in use and the log); \"object bytes\" the stored values' bytes.\n",
        c.objects,
        c.writes_each,
        mib(c.quota),
        APP_PERIOD.as_secs()
    );
    println!("| when | database MiB | log MiB | files MiB | live data MiB | object bytes MiB | files ÷ object bytes |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let row = |label: &str, p: &Point| {
        let ratio = p.object_bytes.filter(|&b| b > 0).map_or("-".into(), |b| {
            format!("{:.2}", p.files.total() as f64 / b as f64)
        });
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {ratio} |",
            mib(p.files.db),
            mib(p.files.wal),
            mib(p.files.total()),
            mib(p.used),
            p.object_bytes
                .map_or("-".into(), |b| format!("{:.2}", mib(b)))
        );
    };
    row(
        &format!("peak (the largest files, looked at every {SAMPLE_EVERY} writes)"),
        &c.peak,
    );
    row(&format!("after the {writes} writes"), &c.after_writes);
    row("right after the deletes", &c.after_deletes);
    row("after compaction", &c.after_compaction);
    let empty = Point {
        files: c.empty,
        used: 0,
        object_bytes: None,
    };
    println!(
        "| an empty store after its maintenance (the floor) | {:.2} | {:.2} | {:.2} | - | - | - |",
        mib(empty.files.db),
        mib(empty.files.wal),
        mib(empty.files.total())
    );
    let tally = |t: &Tally, done: usize| {
        let error = t
            .first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first error: {e})"));
        format!(
            "{done} applied, {} refused for space, {} other{error}",
            t.full, t.other
        )
    };
    println!(
        "\nwrites: {} in {:.1} s ({:.0}/s); deletes: {} in {:.1} s\n",
        tally(&c.written, c.written.stored),
        c.write_time.as_secs_f64(),
        writes as f64 / c.write_time.as_secs_f64(),
        tally(&c.deleted, c.deleted.deleted),
        c.delete_time.as_secs_f64()
    );
    println!(
        "compaction: {} maintenance steps until the files stopped shrinking{}, {:.0} ms in all (longest step {:.0} ms); the service, one step every {} s, takes {} s\n",
        c.steps,
        if c.unfinished { " (NOT finished: step limit reached)" } else { "" },
        c.compaction.as_secs_f64() * 1e3,
        c.longest_step.as_secs_f64() * 1e3,
        APP_PERIOD.as_secs(),
        c.steps as u64 * APP_PERIOD.as_secs()
    );
    let after = c.after_compaction.files.total() as f64;
    println!(
        "files after compaction ÷ at the peak: {:.3} (tests/storage.rs holds churn's files under a tenth of the peak: {}); ÷ the empty store's: {:.2}\n",
        after / c.peak.files.total().max(1) as f64,
        crate::verdict(after * 10.0 < c.peak.files.total() as f64),
        after / c.empty.total().max(1) as f64
    );
}

/// One database of configmaps: its conversion, and backup and check where available.
struct Database {
    objects: usize,
    /// The earlier version's file (no log: it was closed).
    earlier: Files,
    converted_mode: i64,
    converting_open: Duration,
    /// The largest files seen during the converting open (SQLite's temporary copy is not among
    /// them: it is an unlinked file in the temporary directory).
    during_conversion: Files,
    /// The files right after the converting open, and after its close.
    after_conversion: Files,
    after_close: Files,
    plain_open: Duration,
    maintenance: Option<Maintenance>,
}

/// A database of `objects` configmaps made by the store (no quota: the larger is past the
/// default), turned back into an earlier version's, and opened by this one.
async fn database(
    dir: &Path,
    configmap: &str,
    objects: usize,
    commands: Option<&Path>,
) -> Database {
    let db = dir.join(format!("earlier-{objects}.db"));
    remove_database(&db);
    let options = || StoreOptions {
        max_size: 0,
        ..StoreOptions::default()
    };
    eprintln!("storage: {objects} configmaps, building");
    {
        let template = Template::new(configmap, &[&["metadata", "name"]]);
        let store = Store::open(
            &db,
            StoreOptions {
                synchronous: Synchronous::Normal,
                ..options()
            },
        )
        .expect("store");
        let writes = (0..objects).map(|i| {
            let name = format!("obj-{i:07}");
            Write::Put {
                key: format!("ns-{:03}/configmap/{name}", i % 100),
                rtype: "configmap".into(),
                value: template.fill(&[&name]).into(),
            }
        });
        let tally = pipeline(&store, writes, || {}).await;
        assert_eq!(tally.stored, objects, "every configmap stored");
        store.close().await;
    }
    // What an earlier version left: the same file without auto_vacuum (journal_mode WAL, as the
    // store always set it).
    {
        let conn = rusqlite::Connection::open(&db).expect("open with rusqlite");
        conn.execute_batch(
            "PRAGMA journal_mode=DELETE; PRAGMA auto_vacuum=NONE; VACUUM; PRAGMA journal_mode=WAL;",
        )
        .expect("rewrite without auto_vacuum");
        let mode: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .expect("auto_vacuum");
        assert_eq!(mode, 0, "an earlier version's database has no auto_vacuum");
    }
    let earlier = Files::of(&db);

    eprintln!("storage: {objects} configmaps, converting");
    let ((store, converting_open), during_conversion) = largest_files_during(&db, || {
        let started = Instant::now();
        let store = Store::open(&db, options()).expect("the converting open");
        (store, started.elapsed())
    });
    let after_conversion = Files::of(&db);
    store.close().await;
    let after_close = Files::of(&db);
    let converted_mode: i64 = rusqlite::Connection::open(&db)
        .and_then(|c| c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)))
        .expect("auto_vacuum after");

    let started = Instant::now();
    let store = Store::open(&db, options()).expect("the plain open");
    let plain_open = started.elapsed();
    let maintenance = match commands {
        Some(bin) => Some(maintenance(bin, &store, &db, dir).await),
        None => None,
    };
    store.close().await;
    remove_database(&db);
    Database {
        objects,
        earlier,
        converted_mode,
        converting_open,
        during_conversion,
        after_conversion,
        after_close,
        plain_open,
        maintenance,
    }
}

/// The largest files seen at `db` while `f` runs, looked at every few milliseconds from
/// another thread.
fn largest_files_during<T>(db: &Path, f: impl FnOnce() -> T) -> (T, Files) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut largest = Files::default();
            loop {
                let done = stop.load(Ordering::Relaxed);
                let files = Files::of(db);
                if files.total() > largest.total() {
                    largest = files;
                }
                if done {
                    return largest;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        (out, watcher.join().expect("watcher"))
    })
}

fn print_conversion(databases: &[Database], fixture_bytes: usize) {
    println!("## The one-time conversion of an earlier version's database\n");
    println!(
        "Made by the store (the configmap fixture, {fixture_bytes} bytes compacted, names varied, over 100 namespaces), closed, then rewritten with plain rusqlite as an earlier version left it (`auto_vacuum=NONE`, `VACUUM`; `PRAGMA auto_vacuum` reads 0). `Store::open` converts it (`VACUUM` to auto_vacuum incremental), once; the yardstick is the next open of the converted file. The largest files are the database and its log as seen every 2 ms during the converting open; the `VACUUM`'s temporary copy (an unlinked file in the temporary directory) comes on top.\n"
    );
    println!("| objects | file before MiB | converting open s | open after it s (yardstick) | ÷ | MiB/s converted | largest files during it MiB (log) | files right after MiB (log) | after the close MiB | auto_vacuum after |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for d in databases {
        let convert = d.converting_open.as_secs_f64();
        let plain = d.plain_open.as_secs_f64();
        println!(
            "| {} | {:.1} | {convert:.2} | {plain:.3} | {:.0} | {:.0} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} | {} |",
            d.objects,
            mib(d.earlier.total()),
            convert / plain.max(1e-6),
            mib(d.earlier.total()) / convert.max(1e-6),
            mib(d.during_conversion.total()),
            mib(d.during_conversion.wal),
            mib(d.after_conversion.total()),
            mib(d.after_conversion.wal),
            mib(d.after_close.total()),
            d.converted_mode
        );
    }
    println!();
}

// ---- Backup and check: measured only when the binary has the subcommands. ----

/// The `metamanager` binary, when it has `backup` and `check` (`metamanager backup --help`
/// succeeds); otherwise why not. Nothing else in this mode depends on the subcommands.
fn maintenance_commands() -> Result<PathBuf, String> {
    let bin = PathBuf::from(harness::process::METAMANAGER);
    match Command::new(&bin)
        .args(["backup", "--help"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(bin),
        Ok(_) => Err("`metamanager backup --help` fails".into()),
        Err(e) => Err(format!("cannot run {}: {e}", bin.display())),
    }
}

/// One run of a subcommand.
struct Ran {
    took: Duration,
    /// Its exit status and last line on stderr, when it did not succeed.
    failed: Option<String>,
}

/// Runs `metamanager --db <db> <args>`, timed, its output taken and dropped.
async fn run_command(bin: &Path, db: &Path, args: Vec<std::ffi::OsString>) -> Ran {
    let (bin, db) = (bin.to_owned(), db.to_owned());
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = Command::new(&bin)
            .arg("--db")
            .arg(&db)
            .args(&args)
            .stdin(Stdio::null())
            .output();
        let took = started.elapsed();
        let failed = match out {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )),
            Err(e) => Some(e.to_string()),
        };
        Ran { took, failed }
    })
    .await
    .expect("command task")
}

/// A writer's single small commits for a while.
struct Trickle {
    samples: Vec<Duration>,
    /// The largest log seen after a commit.
    largest_log: u64,
}

/// One small write every [`TRICKLE_GAP`], each awaited, until `stop`.
fn trickle(store: &Store, db: &Path, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Trickle> {
    let (store, wal) = (store.clone(), wal_path(db));
    tokio::spawn(async move {
        let (mut samples, mut largest_log) = (Vec::new(), 0);
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("tick-{:03}", i % 100);
            let write = Write::Put {
                key: format!("bench/configmap/{name}"),
                rtype: "configmap".into(),
                value: format!(r#"{{"metadata":{{"name":"{name}"}},"data":{{"n":"{i}"}}}}"#).into(),
            };
            let started = Instant::now();
            store.write(write).await.expect("a small write commits");
            samples.push(started.elapsed());
            largest_log = largest_log.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            i += 1;
            tokio::time::sleep(TRICKLE_GAP).await;
        }
        Trickle {
            samples,
            largest_log,
        }
    })
}

struct Maintenance {
    file: u64,
    backup: Ran,
    /// The backup in one step, without pauses.
    unpaced: Ran,
    copy: Duration,
    check: Ran,
    integrity: Duration,
    alone: Trickle,
    during: Trickle,
    /// The backups run while the writer trickled.
    backups_during: Vec<Ran>,
}

/// Backup and check of the open store's database, against a plain copy of the file and the
/// integrity check alone; then the trickling writer alone and during backups, each for as long
/// as a backup took (at least [`MIN_WINDOW`]).
async fn maintenance(bin: &Path, store: &Store, db: &Path, dir: &Path) -> Maintenance {
    let out = dir.join("backup-copy.db");
    let label = db.display();
    eprintln!("storage: {label}: backup and check");
    let file = Files::of(db).total();
    remove_database(&out);
    let started = Instant::now();
    std::fs::copy(db, &out).expect("plain copy");
    let copy = started.elapsed();
    remove_database(&out);
    let integrity = {
        let conn = rusqlite::Connection::open_with_flags(
            db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .expect("open read-only");
        let started = Instant::now();
        let _: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        started.elapsed()
    };
    let backup = run_command(bin, db, vec!["backup".into(), out.clone().into()]).await;
    remove_database(&out);
    // The same copy without the pauses that keep it from taking the disk from the service.
    let unpaced = run_command(
        bin,
        db,
        vec![
            "backup".into(),
            "--pages-per-step".into(),
            "1000000000".into(),
            "--pause".into(),
            "0s".into(),
            out.clone().into(),
        ],
    )
    .await;
    remove_database(&out);
    let check = run_command(bin, db, vec!["check".into()]).await;

    let window = backup.took.max(MIN_WINDOW);
    eprintln!("storage: {label}: the writer alone, then during backups");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = trickle(store, db, stop.clone());
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let alone = writer.await.expect("writer");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = trickle(store, db, stop.clone());
    let started = Instant::now();
    let mut backups_during = Vec::new();
    while backups_during.is_empty() || started.elapsed() < window {
        backups_during.push(run_command(bin, db, vec!["backup".into(), out.clone().into()]).await);
        remove_database(&out);
    }
    stop.store(true, Ordering::Relaxed);
    let during = writer.await.expect("writer");
    Maintenance {
        file,
        backup,
        unpaced,
        copy,
        check,
        integrity,
        alone,
        during,
        backups_during,
    }
}

fn print_maintenance(databases: &[Database], commands: &Result<PathBuf, String>) {
    println!("## Backup and check\n");
    if let Err(why) = commands {
        println!(
            "backup time, check time and the writer during a backup: not available in this build ({why}); measured here once the binary has `metamanager backup` and `metamanager check`.\n"
        );
        return;
    }
    println!(
        "`metamanager --db DB backup OUT` (its default steps and pauses) and `metamanager --db DB check`, as processes, on each converted database while its store is open and idle; against a plain copy of the database file and `PRAGMA integrity_check` alone. The backup is also run in one step without pauses (`--pages-per-step 1000000000 --pause 0s`): the difference is its pacing.\n"
    );
    println!("| objects | database MiB | backup s | backup without pauses s | plain copy s (yardstick) | backup ÷ copy | without pauses ÷ copy | check s | integrity_check s (yardstick) | ÷ |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let failure = |r: &Ran| {
        r.failed
            .as_ref()
            .map_or(String::new(), |f| format!(" (FAILED: {f})"))
    };
    for d in databases {
        let Some(m) = &d.maintenance else { continue };
        let (backup, copy) = (m.backup.took.as_secs_f64(), m.copy.as_secs_f64());
        let unpaced = m.unpaced.took.as_secs_f64();
        let (check, integrity) = (m.check.took.as_secs_f64(), m.integrity.as_secs_f64());
        println!(
            "| {} | {:.1} | {backup:.2}{} | {unpaced:.2}{} | {copy:.3} | {:.1} | {:.1} | {check:.2}{} | {integrity:.2} | {:.2} |",
            d.objects,
            mib(m.file),
            failure(&m.backup),
            failure(&m.unpaced),
            backup / copy.max(1e-6),
            unpaced / copy.max(1e-6),
            failure(&m.check),
            check / integrity.max(1e-6)
        );
    }
    println!(
        "\n### A writer's commits during a backup\n\nOne small write (a configmap of about 60 bytes, synchronous=FULL) every {} ms, each awaited: its latency from submit to commit. Alone, for as long as the backup above took (at least {} s); then as long again with backups run back to back.\n",
        TRICKLE_GAP.as_millis(),
        MIN_WINDOW.as_secs()
    );
    println!("| objects | writer | commits | p50 µs | p99 µs | max µs | largest log MiB |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for d in databases {
        let Some(m) = &d.maintenance else { continue };
        let failed = m
            .backups_during
            .iter()
            .filter(|r| r.failed.is_some())
            .count();
        let during = format!(
            "during {} backups{}",
            m.backups_during.len(),
            if failed > 0 {
                format!(" ({failed} FAILED)")
            } else {
                String::new()
            }
        );
        let alone = latency(&m.alone);
        let with = latency(&m.during);
        for (label, t, l) in [
            ("alone", &m.alone, &alone),
            (during.as_str(), &m.during, &with),
        ] {
            println!(
                "| {} | {label} | {} | {:.0} | {:.0} | {:.0} | {:.2} |",
                d.objects,
                t.samples.len(),
                l.0.p50,
                l.0.p99,
                l.1,
                mib(t.largest_log)
            );
        }
        println!(
            "\nat {}: during ÷ alone: p50 {:.2}, p99 {:.2}, max {:.2}\n",
            d.objects,
            with.0.p50 / alone.0.p50.max(1e-6),
            with.0.p99 / alone.0.p99.max(1e-6),
            with.1 / alone.1.max(1e-6)
        );
    }
}

/// The percentiles of a writer's commits and the longest, in µs.
fn latency(t: &Trickle) -> (Percentiles, f64) {
    let max = t.samples.iter().max().copied().unwrap_or_default();
    let p = if t.samples.is_empty() {
        Percentiles {
            p50: 0.0,
            p99: 0.0,
            p999: 0.0,
        }
    } else {
        percentiles(t.samples.clone())
    };
    (p, max.as_secs_f64() * 1e6)
}
