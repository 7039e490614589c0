//! The store's room on disk, governed like memory: a quota on what its live data uses, and the
//! storage-full state that a write refused for space puts it in.
//!
//! What counts against the quota is what the data needs, not what the files happen to hold:
//! pages in use (not the free pages a delete leaves, which the next write reuses) plus the
//! write-ahead log. So a delete makes room at once, before compaction gives anything back to
//! the filesystem. The writer measures it once per batch, inside the batch's transaction: one
//! pragma read of the header, and a `stat` of the log only near the quota; nothing per write.
//!
//! The state is one value every side reads: the writer sets it when it refuses a write for
//! space and clears it when a write that needs room commits again (or, with no writes coming,
//! when the periodic check finds room); `/readyz`, the retained status and `/metrics` show it.
//! Its log says when it begins and ends, and at most once a minute while it lasts, never once
//! per refused message: a flood on a full disk is one line, not thousands.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::watch;

/// How often, at most, the log says the store is still full.
const STILL_FULL_EVERY: Duration = Duration::from_secs(60);

/// Why the store has no room for a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Full {
    /// The write would take the live data past `database.max_size`.
    Quota { used: u64, limit: u64 },
    /// The filesystem refused to grow the files (ENOSPC, SQLite's "database or disk is full").
    Disk { dir: PathBuf },
}

impl Full {
    /// The word that names the limit, for metrics and the status object.
    pub fn limit_name(&self) -> &'static str {
        match self {
            Full::Quota { .. } => "quota",
            Full::Disk { .. } => "disk",
        }
    }
}

/// The text every refused sender reads: it begins `storage full:` (topics.md), then the limit
/// and its figures.
impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Full::Quota { used, limit } => write!(
                f,
                "storage full: quota database.max_size reached ({} of {} in use); deletes still apply",
                Bytes(*used),
                Bytes(*limit)
            ),
            Full::Disk { dir } => write!(
                f,
                "storage full: disk holding {} has no room; deletes still apply",
                dir.display()
            ),
        }
    }
}

/// A byte count as an operator reads it: `3.2 MiB`.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// The storage state shared by the writer thread and every reader of it.
pub struct Space {
    /// `database.max_size`; 0 for none (only the disk limits the store).
    limit: u64,
    /// Bytes the live data used at the last measure (pages in use and the log).
    used: AtomicU64,
    state: watch::Sender<Option<Full>>,
    log: Mutex<StateLog>,
}

/// What the log has said of the state, so that it speaks on changes and once a minute.
struct StateLog {
    since: Option<Instant>,
    last_line: Option<Instant>,
    refused_since_line: u64,
    refused_total: u64,
}

impl Space {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
            state: watch::Sender::new(None),
            log: Mutex::new(StateLog {
                since: None,
                last_line: None,
                refused_since_line: 0,
                refused_total: 0,
            }),
        }
    }

    /// The quota in bytes; 0 for none.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes the live data used at the last measure.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Why the store is full, while it is.
    pub fn full(&self) -> Option<Full> {
        self.state.borrow().clone()
    }

    /// Follows the state: a change each time it begins, changes its reason, or ends.
    pub fn watch(&self) -> watch::Receiver<Option<Full>> {
        self.state.subscribe()
    }

    /// Whether `used` bytes pass the quota.
    pub fn over_quota(&self, used: u64) -> bool {
        self.limit > 0 && used > self.limit
    }

    pub(super) fn set_used(&self, used: u64) {
        self.used.store(used, Ordering::Relaxed);
    }

    /// `refused` writes were refused for `full`: the state begins (one WARN line), or goes on
    /// (a WARN at most once a minute, with the count since the last).
    pub(super) fn refused(&self, full: Full, refused: u64) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        log.refused_since_line += refused;
        log.refused_total += refused;
        if log.since.is_none() {
            log.since = Some(now);
            log.last_line = Some(now);
            tracing::warn!(
                limit = full.limit_name(),
                "{full}: writes are refused until there is room; reads and deletes go on"
            );
            log.refused_since_line = 0;
        } else if log
            .last_line
            .is_none_or(|at| now.duration_since(at) >= STILL_FULL_EVERY)
        {
            log.last_line = Some(now);
            tracing::warn!(
                limit = full.limit_name(),
                refused = log.refused_since_line,
                "{full}: still full"
            );
            log.refused_since_line = 0;
        }
        drop(log);
        self.state.send_if_modified(|state| {
            let changed = state.as_ref() != Some(&full);
            *state = Some(full);
            changed
        });
    }

    /// There is room again: the state ends everywhere (one INFO line).
    pub(super) fn room_again(&self, how: &str) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let Some(since) = log.since.take() else {
            return;
        };
        tracing::info!(
            full_for_secs = since.elapsed().as_secs(),
            refused = log.refused_total,
            "storage has room again ({how}): writes are accepted"
        );
        log.last_line = None;
        log.refused_since_line = 0;
        log.refused_total = 0;
        drop(log);
        self.state.send_replace(None);
    }
}

/// Bytes in the pages that hold data: all pages less the free list.
pub(super) fn pages_in_use(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT (p.page_count - f.freelist_count) * s.page_size \
         FROM pragma_page_count() AS p, pragma_freelist_count() AS f, pragma_page_size() AS s",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| u64::try_from(b).unwrap_or(0))
}

/// The write-ahead log's size on disk; 0 when there is none.
pub(super) fn wal_bytes(wal: &Path) -> u64 {
    std::fs::metadata(wal).map_or(0, |m| m.len())
}

/// The write-ahead log's path beside the database at `db`.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// The disk reserve's path beside the database at `db` (see the writer's `room`).
pub fn reserve_path(db: &Path) -> PathBuf {
    let mut reserve = db.as_os_str().to_owned();
    reserve.push("-reserve");
    PathBuf::from(reserve)
}

/// Whether SQLite's error says the disk (or `max_page_count`) has no room.
pub(super) fn is_disk_full(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_text_begins_storage_full_and_gives_the_figures() {
        let quota = Full::Quota {
            used: 3 * 1024 * 1024 + 200 * 1024,
            limit: 3 * 1024 * 1024,
        };
        assert_eq!(
            quota.to_string(),
            "storage full: quota database.max_size reached (3.2 MiB of 3.0 MiB in use); deletes still apply"
        );
        let disk = Full::Disk {
            dir: PathBuf::from("/var/lib/metamanager"),
        };
        assert!(disk
            .to_string()
            .starts_with("storage full: disk holding /var/lib/metamanager has no room"));
    }

    #[test]
    fn the_state_begins_once_and_ends_once() {
        let space = Space::new(1024);
        let mut watch = space.watch();
        assert_eq!(space.full(), None);
        let full = Full::Quota {
            used: 2048,
            limit: 1024,
        };
        space.refused(full.clone(), 3);
        assert!(watch.has_changed().unwrap_or(false));
        watch.borrow_and_update();
        space.refused(full.clone(), 5);
        assert!(
            !watch.has_changed().unwrap_or(true),
            "same reason, no change"
        );
        assert_eq!(space.full(), Some(full));
        space.room_again("a write committed");
        assert_eq!(space.full(), None);
        assert!(watch.has_changed().unwrap_or(false));
    }

    #[test]
    fn sizes_read_as_an_operator_writes_them() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(256 * 1024 * 1024).to_string(), "256.0 MiB");
    }
}
