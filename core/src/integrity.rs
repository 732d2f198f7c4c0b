//! What a restore may trust: SHA-256 digests of the files a run writes, checked before any
//! byte is used, and the storage errors that a retry cannot fix.
//!
//! - [`FileDigest`]: a file's length and SHA-256, as `checkpoint.json` records them and as
//!   the `<file>.sha256` beside each exported model holds them (`sha256sum` format, so
//!   `sha256sum -c model.safetensors.sha256` checks it too).
//! - [`set_aside`]: a file that failed its check is renamed, never deleted.
//! - [`sync_dir`]: after a rename, the directory entry itself is made durable.
//! - [`is_storage_error`]: a full disk, a quota, a read-only filesystem or an I/O error.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A file's length and SHA-256 (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// Why a file does not match the digest recorded for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("missing")]
    Missing,
    #[error("cannot read: {0}")]
    Unreadable(String),
    #[error("{actual} bytes, {expected} recorded (truncated or overwritten)")]
    Length { expected: u64, actual: u64 },
    #[error("sha256 {actual}, {expected} recorded (its contents changed)")]
    Sha256 { expected: String, actual: String },
}

impl FileDigest {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self { bytes: bytes.len() as u64, sha256: hex::encode(Sha256::digest(bytes)) }
    }

    /// The digest of the file at `path`, read as a stream.
    pub fn of_file(path: &Path) -> std::io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = HashingWriter::default();
        std::io::copy(&mut file, &mut hasher)?;
        Ok(hasher.finish())
    }

    /// Whether `bytes` are the ones recorded.
    pub fn check_bytes(&self, bytes: &[u8]) -> Result<(), Mismatch> {
        if bytes.len() as u64 != self.bytes {
            return Err(Mismatch::Length { expected: self.bytes, actual: bytes.len() as u64 });
        }
        let actual = hex::encode(Sha256::digest(bytes));
        if actual != self.sha256 {
            return Err(Mismatch::Sha256 { expected: self.sha256.clone(), actual });
        }
        Ok(())
    }

    /// Reads the file at `path` and checks it: its bytes when they match, else why not.
    pub fn read_checked(&self, path: &Path) -> Result<Vec<u8>, Mismatch> {
        let mut bytes = Vec::new();
        match std::fs::File::open(path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(|e| Mismatch::Unreadable(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Mismatch::Missing),
            Err(e) => return Err(Mismatch::Unreadable(e.to_string())),
        };
        self.check_bytes(&bytes)?;
        Ok(bytes)
    }

    /// The `sha256sum` line for the file named `name`.
    pub fn sha256sum_line(&self, name: &str) -> String {
        format!("{}  {name}\n", self.sha256)
    }
}

/// A writer that hashes and counts what goes through it (an upload written to disk, a
/// file read as a stream).
#[derive(Default)]
pub struct HashingWriter {
    hasher: Sha256,
    bytes: u64,
}

impl HashingWriter {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }

    pub fn finish(self) -> FileDigest {
        FileDigest { bytes: self.bytes, sha256: hex::encode(self.hasher.finalize()) }
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `<file>.sha256`, the digest file beside `file`.
pub fn sidecar_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    file.with_file_name(name)
}

/// Writes `<file>.sha256` (atomically) for `file`, whose digest is `digest`.
pub fn write_sidecar(file: &Path, digest: &FileDigest) -> Result<(), crate::DataError> {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    crate::write_atomically(&sidecar_path(file), digest.sha256sum_line(&name).as_bytes())
}

/// The digest that `<file>.sha256` records, if there is such a file; an unreadable or
/// malformed one is an error naming it.
pub fn read_sidecar(file: &Path) -> Result<Option<String>, String> {
    let path = sidecar_path(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    let hash = text.split_whitespace().next().unwrap_or_default();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{}: not a sha256sum line", path.display()));
    }
    Ok(Some(hash.to_ascii_lowercase()))
}

/// Checks `bytes` (read from `file`) against `<file>.sha256` when there is one.
pub fn check_against_sidecar(file: &Path, bytes: &[u8]) -> Result<(), String> {
    match read_sidecar(file)? {
        None => Ok(()),
        Some(expected) => {
            let actual = hex::encode(Sha256::digest(bytes));
            if actual == expected {
                Ok(())
            } else {
                Err(format!(
                    "{}: sha256 {actual}, but {} records {expected}: the file is damaged",
                    file.display(),
                    sidecar_path(file).display()
                ))
            }
        }
    }
}

/// Renames a file that failed its check to `<name>.corrupt` (`.corrupt.1`, ... when that
/// exists), so that nothing reads it again and nobody loses it; the new path.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut target = path.with_file_name(format!("{name}.corrupt"));
    let mut n = 1;
    while target.exists() {
        target = path.with_file_name(format!("{name}.corrupt.{n}"));
        n += 1;
    }
    std::fs::rename(path, &target)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(target)
}

/// Makes the entries of `dir` durable (after a rename into it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    std::fs::File::open(dir)?.sync_all()
}

/// A full disk, an exhausted quota, a read-only filesystem or an I/O error: a retry of the
/// same work on the same storage will fail again.
pub fn is_storage_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    const EIO: i32 = 5;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::ReadOnlyFilesystem)
        || e.raw_os_error() == Some(EIO)
}

/// Bytes free for an unprivileged writer on the filesystem of `path` (None when unknown).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// `1.5 MB`-style sizes for messages.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_bit_and_a_truncation_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let digest = FileDigest::of_file(&path).unwrap();
        assert_eq!(digest, FileDigest::of_bytes(&data));
        assert_eq!(digest.read_checked(&path).unwrap(), data);
        let mut flipped = data.clone();
        flipped[4321] ^= 0x10;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(digest.read_checked(&path), Err(Mismatch::Sha256 { .. })));
        std::fs::write(&path, &data[..5000]).unwrap();
        let e = digest.read_checked(&path).unwrap_err();
        assert_eq!(e, Mismatch::Length { expected: 10_000, actual: 5000 });
        assert!(e.to_string().contains("truncated"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(digest.read_checked(&path).unwrap_err(), Mismatch::Missing);
    }

    #[test]
    fn sidecars_are_sha256sum_lines_and_catch_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, b"weights").unwrap();
        assert_eq!(read_sidecar(&path), Ok(None));
        check_against_sidecar(&path, b"anything").unwrap();
        write_sidecar(&path, &FileDigest::of_bytes(b"weights")).unwrap();
        let line = std::fs::read_to_string(sidecar_path(&path)).unwrap();
        assert!(line.ends_with("  model.safetensors\n") && line.len() == 64 + 2 + 17 + 1, "{line:?}");
        check_against_sidecar(&path, b"weights").unwrap();
        let e = check_against_sidecar(&path, b"weightz").unwrap_err();
        assert!(e.contains("damaged") && e.contains("model.safetensors.sha256"), "{e}");
        std::fs::write(sidecar_path(&path), "not a hash\n").unwrap();
        assert!(read_sidecar(&path).unwrap_err().contains("not a sha256sum line"));
    }

    #[test]
    fn set_aside_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        for round in 0..3 {
            std::fs::write(&path, format!("v{round}")).unwrap();
            set_aside(&path).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["c.corrupt", "c.corrupt.1", "c.corrupt.2"]);
        assert_eq!(std::fs::read_to_string(dir.path().join("c.corrupt.2")).unwrap(), "v2");
    }

    #[test]
    fn storage_errors_are_told_apart() {
        assert!(is_storage_error(&std::io::Error::from_raw_os_error(28))); // ENOSPC
        assert!(is_storage_error(&std::io::Error::from_raw_os_error(5))); // EIO
        assert!(is_storage_error(&std::io::Error::from_raw_os_error(30))); // EROFS
        assert!(!is_storage_error(&std::io::Error::from_raw_os_error(2))); // ENOENT
        assert!(!is_storage_error(&std::io::Error::other("x")));
        assert!(free_bytes(Path::new("/")).is_some());
        assert_eq!(human_bytes(999), "999 bytes");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
    }
}
