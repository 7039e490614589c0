//! The store's settings (`database`): where the database file is and how hard each commit
//! insists on reaching the disk.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::bounds::{invalid, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    /// SQLite's durability level for each commit.
    pub synchronous: Synchronous,
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
        Ok(())
    }
}
