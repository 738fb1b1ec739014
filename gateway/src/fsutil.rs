//! Durable writes of small files in the data directory (TLS material,
//! secrets, development logs).
//!
//! A file written with [`write_atomic`] is, after a crash at any point,
//! either absent (or its previous content) or complete: the bytes go to a
//! temporary file in the same directory, which is fsynced, renamed over the
//! target and made durable by fsyncing the directory. A plain
//! `std::fs::write` gives no such promise: a filesystem that fails (or a
//! machine that loses power) a second later can leave the file empty.
//!
//! The helpers return [`FsError`], which names the operation and the path.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file-system operation that failed, with the path it was applied to.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}", path.display())]
pub struct FsError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl FsError {
    fn new(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// The path the failed operation was applied to.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The operating system's error.
    #[must_use]
    pub fn io(&self) -> &std::io::Error {
        &self.source
    }
}

/// Distinguishes the temporary files of concurrent writes in this process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically and durably, with permission bits
/// `mode` (e.g. `0o600` for keys; applied exactly, not masked by the umask).
///
/// Steps: create a temporary file next to `path`, write, fsync, rename it
/// over `path`, fsync the directory. On error the temporary file is removed
/// (best effort) and `path` is unchanged.
///
/// # Errors
/// Any step failed; the error names the step and the path.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| {
            FsError::new(
                "write",
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
            )
        })?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_then_rename(&tmp, path, bytes, mode);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(dir)
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| FsError::new("create", tmp, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| FsError::new("set the permissions of", tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| FsError::new("write", tmp, e))?;
    f.sync_all().map_err(|e| FsError::new("fsync", tmp, e))?;
    drop(f);
    std::fs::rename(tmp, path).map_err(|e| FsError::new("rename a temporary file to", path, e))
}

/// Makes the directory's entries (files created, renamed or removed in it)
/// durable.
///
/// # Errors
/// The directory could not be opened or fsynced.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FsError::new("fsync the directory", dir, e))
}

/// `mkdir -p` that also makes each directory it creates durable (fsyncs the
/// parent of each new component).
///
/// # Errors
/// A component could not be created, or a parent not fsynced.
pub fn create_dir_durable(dir: &Path) -> Result<(), FsError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_dir(dir);
    if parent != dir {
        create_dir_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => fsync_dir(parent),
        // Created concurrently: someone else made it (and its entry) exist.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(FsError::new("create the directory", dir, e)),
    }
}

/// Checks that `dir` takes a durable write: writes, fsyncs and removes a 4 KiB file in it. A
/// full or read-only filesystem fails here, at start-up, rather than at the first message.
///
/// # Errors
/// The probe could not be written, synced or removed.
pub fn probe_writable(dir: &Path) -> Result<(), FsError> {
    let probe = dir.join(".starling-write-probe");
    write_atomic(&probe, &[0u8; 4096], 0o600)?;
    std::fs::remove_file(&probe).map_err(|e| FsError::new("remove", &probe, e))?;
    fsync_dir(dir)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_the_bytes_with_the_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("server.key");
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        assert_eq!(mode_of(&key), 0o600);
        let pem = dir.path().join("ca.pem");
        write_atomic(&pem, b"cert", 0o644).unwrap();
        assert_eq!(mode_of(&pem), 0o644);
        assert_eq!(names(dir.path()), ["ca.pem", "server.key"]);
    }

    #[test]
    fn replaces_an_existing_file_and_sets_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("otp.log");
        std::fs::write(&p, b"a much longer old content").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(names(dir.path()), ["otp.log"]);
    }

    #[test]
    fn a_failed_write_leaves_the_target_unchanged_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, b"old").unwrap();
        // The rename cannot replace a non-empty directory: the last step fails.
        let blocker = dir.path().join("sub");
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("x"), b"").unwrap();
        let e = write_atomic(&blocker, b"new", 0o644).unwrap_err();
        assert_eq!(e.path(), blocker);
        assert!(e.to_string().contains("rename"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["ca.pem", "sub"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_temporary_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope").join("f");
        let e = write_atomic(&p, b"x", 0o600).unwrap_err();
        assert_eq!(e.io().kind(), std::io::ErrorKind::NotFound);
        assert!(e.path().starts_with(dir.path().join("nope")), "{e}");
        assert!(!p.exists());
    }

    #[test]
    fn concurrent_writes_of_one_path_each_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let bodies: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4096]).collect();
        std::thread::scope(|s| {
            for b in &bodies {
                let p = &p;
                s.spawn(move || write_atomic(p, b, 0o600).unwrap());
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert!(bodies.contains(&got));
        assert_eq!(names(dir.path()), ["f"]);
    }

    #[test]
    fn the_write_probe_leaves_nothing_behind_and_names_a_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        probe_writable(dir.path()).unwrap();
        assert!(names(dir.path()).is_empty());
        let e = probe_writable(&dir.path().join("gone")).unwrap_err();
        assert_eq!(e.io().kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn create_dir_durable_makes_every_component_and_accepts_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durable(&deep).unwrap();
        let file = dir.path().join("a/file");
        std::fs::write(&file, b"").unwrap();
        let e = create_dir_durable(&file.join("d")).unwrap_err();
        assert!(e.to_string().contains("create the directory"), "{e}");
        fsync_dir(&deep).unwrap();
        assert!(fsync_dir(&dir.path().join("missing")).is_err());
    }
}
