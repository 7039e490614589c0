//! The store's settings (`database`): where the database file is, how hard each commit
//! insists on reaching the disk, and how much of it the store may use.

use std::path::PathBuf;

use serde::Deserialize;

use crate::settings_checks::{byte_size, invalid, ConfigError};

/// The default quota: a node's store of a few hundred pods with their configmaps and secrets
/// is a few MiB, 256 MiB holds about 50 000 objects of 4 KiB, and the rest of 8 GB of flash
/// stays with the container images and logs that share it.
pub const DEFAULT_MAX_SIZE: u64 = 256 * 1024 * 1024;
/// The smallest quota taken: below it the schema and the log between checkpoints alone would
/// fill it.
pub const MIN_MAX_SIZE: u64 = 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    /// SQLite's durability level for each commit.
    pub synchronous: Synchronous,
    /// The quota on what the store's live data uses (pages in use and the write-ahead log),
    /// in bytes; 0 for none, when only the disk limits it.
    #[serde(deserialize_with = "byte_size")]
    pub max_size: u64,
}

/// How hard each commit insists on reaching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Synchronous {
    /// fsync on every commit: a committed change survives a power cut. With group commit, one
    /// fsync covers a whole batch, so the cost under load is small.
    Full,
    /// fsync only at WAL checkpoints: a committed change survives a crash of MetaManager, but
    /// the last commits before a power cut may be lost.
    Normal,
}

impl Synchronous {
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data/metamanager.db"),
            synchronous: Synchronous::Full,
            max_size: DEFAULT_MAX_SIZE,
        }
    }
}

impl DatabaseSettings {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return invalid("database.path", "must not be empty".into());
        }
        // SQLite reads these as a URI or an in-memory database, which the readers beside the
        // writer and the one-process lock would not see as the same file.
        let path = self.path.to_string_lossy();
        if path.starts_with("file:") || path == ":memory:" {
            return invalid(
                "database.path",
                format!("{path:?} is not a file path; give the database file's path"),
            );
        }
        if self.max_size != 0 && self.max_size < MIN_MAX_SIZE {
            return invalid(
                "database.max_size",
                format!(
                    "{} bytes is too small; use at least {MIN_MAX_SIZE} (1MiB), or 0 for no quota",
                    self.max_size
                ),
            );
        }
        Ok(())
    }
}
