//! Reading the files the configuration names: the config file itself, the MQTT password, the TLS
//! certificates and keys, and the API's tokens and policy.
//!
//! Each is read with a size cap, because a path is easy to get wrong and some files never end:
//! `password_file: /dev/zero` would otherwise be read until the kernel kills the process, and
//! a FIFO is refused before it is opened, since opening it waits for a writer. A
//! file over its cap is refused with an I/O error of kind `FileTooLarge`, which the callers'
//! errors report with the key and the path. A secret (password, private key) that the file's
//! group or everyone may read is logged as a warning, naming its key: it still works, since
//! refusing it could stop a node over a permission, but the operator should know.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// A password or private key: a PEM key of 4096-bit RSA is about 3.3 KiB.
pub const SECRET_MAX_BYTES: u64 = 64 * 1024;
/// A PEM CA bundle or certificate chain: a whole system CA bundle is about 220 KiB.
pub const CERTIFICATES_MAX_BYTES: u64 = 1024 * 1024;
/// The YAML config file, or another file an operator writes (an ABAC policy): the commented
/// example of every key is about 6 KiB.
pub const CONFIG_MAX_BYTES: u64 = 1024 * 1024;

/// What a file holds, which sets its cap and whether it is a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// A password, token or private key, named by config key `key`: at most
    /// [`SECRET_MAX_BYTES`], and warned about when the file's group or others may read it.
    Secret { key: &'static str },
    /// PEM certificates, at most [`CERTIFICATES_MAX_BYTES`].
    Certificates,
    /// Text an operator writes (the config file, a policy), at most [`CONFIG_MAX_BYTES`].
    Config,
}

/// The whole file, when it holds at most what `holds` allows.
pub fn read(path: &Path, holds: Holds) -> io::Result<Vec<u8>> {
    match holds {
        Holds::Secret { key } => read_secret(key, path),
        Holds::Certificates => read_file(open(path)?, CERTIFICATES_MAX_BYTES),
        Holds::Config => read_file(open(path)?, CONFIG_MAX_BYTES),
    }
}

/// [`read`], as UTF-8 text; other bytes are an error of kind `InvalidData`.
pub fn read_text(path: &Path, holds: Holds) -> io::Result<String> {
    String::from_utf8(read(path, holds)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Opens `path` for reading, refusing a FIFO or a socket: opening a FIFO waits for a writer,
/// which would hold start-up forever.
fn open(path: &Path) -> io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let kind = std::fs::metadata(path)?.file_type();
        if kind.is_fifo() || kind.is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a FIFO or a socket, not a file",
            ));
        }
    }
    File::open(path)
}

/// A secret named by config key `key`, at most [`SECRET_MAX_BYTES`]; warns when the file's group
/// or others may read it.
fn read_secret(key: &'static str, path: &Path) -> io::Result<Vec<u8>> {
    let file = open(path)?;
    if let Some(mode) = exposed_mode(&file) {
        tracing::warn!(
            "config key `{key}`: {} can be read by its group or by everyone (mode {mode:03o}); \
             make it readable by MetaManager's user only (chmod 600)",
            path.display()
        );
    }
    read_file(file, SECRET_MAX_BYTES)
}

fn read_file(file: File, cap: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    // One byte past the cap tells a file of exactly `cap` bytes from a longer one.
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("it is larger than {cap} bytes, the most this file may hold"),
        ));
    }
    Ok(bytes)
}

/// The permission bits of a file its group or others may read; `None` when only its owner may.
#[cfg(unix)]
fn exposed_mode(file: &File) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file.metadata().ok()?.permissions().mode() & 0o777;
    readable_by_others(mode).then_some(mode)
}

#[cfg(not(unix))]
fn exposed_mode(_file: &File) -> Option<u32> {
    None
}

/// Whether permission bits let the group or others read.
fn readable_by_others(mode: u32) -> bool {
    mode & 0o044 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("password");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = read_secret("mqtt.password_file", &fifo).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(read(&fifo, Holds::Config).is_err());
    }

    #[test]
    fn a_file_up_to_the_cap_is_read_and_a_longer_one_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), [b'x'; 100]).unwrap();
        let open = || File::open(file.path()).unwrap();
        assert_eq!(read_file(open(), 100).unwrap().len(), 100);
        let e = read_file(open(), 99).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert!(e.to_string().contains("larger than 99 bytes"), "{e}");
    }

    #[test]
    fn a_file_without_end_is_refused_at_the_cap() {
        let e = read_secret("mqtt.password_file", Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
    }

    #[test]
    fn group_or_world_read_bits_count_as_exposed() {
        assert!(!readable_by_others(0o600));
        assert!(!readable_by_others(0o700));
        assert!(!readable_by_others(0o400));
        assert!(readable_by_others(0o640));
        assert!(readable_by_others(0o604));
        assert!(readable_by_others(0o644));
    }

    #[cfg(unix)]
    #[test]
    fn the_mode_of_an_exposed_secret_is_found() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        // Created readable by its owner only.
        let mut secret = tempfile::NamedTempFile::new().unwrap();
        secret.write_all(b"s3cret\n").unwrap();
        assert_eq!(exposed_mode(secret.as_file()), None);
        let group_readable = std::fs::Permissions::from_mode(0o640);
        secret.as_file().set_permissions(group_readable).unwrap();
        assert_eq!(exposed_mode(secret.as_file()), Some(0o640));
        assert_eq!(
            read_text(secret.path(), Holds::Secret { key: "k" }).unwrap(),
            "s3cret\n"
        );
    }
}
