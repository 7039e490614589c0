//! The process's file descriptor limit, and how the listeners share it.
//!
//! Every connection costs a descriptor, and so do the database, its write-ahead log and the
//! broker links. A listener that accepts until the limit is reached leaves nothing for those,
//! and the probes, the database and MetaManager's own links fail together. So each listener's
//! connection cap is kept to a share of the limit: the embedded broker at most half, the HTTP
//! endpoint at most a quarter, the rest for everything else.

/// The soft limit on open files, where the system tells it (Linux's `/proc/self/limits`).
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files(&limits)
}

fn parse_open_files(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(usize::MAX),
        n => n.parse().ok(),
    }
}

/// `configured`, or less when `limit` leaves it less than `1/share_divisor` of the
/// descriptors; at least 1.
pub fn capped(configured: usize, limit: Option<usize>, share_divisor: usize) -> usize {
    match limit {
        Some(limit) => configured.min(limit / share_divisor).max(1),
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95431                95431                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files(unlimited), Some(usize::MAX));
        assert_eq!(parse_open_files("nothing here"), None);
        assert!(open_files_limit().is_some(), "this machine tells its limit");
    }

    #[test]
    fn caps_keep_to_their_share() {
        assert_eq!(capped(1024, Some(256), 2), 128);
        assert_eq!(capped(256, Some(65536), 4), 256);
        assert_eq!(capped(256, None, 4), 256);
        assert_eq!(capped(256, Some(2), 4), 1);
    }
}
