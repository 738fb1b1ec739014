//! The object store behind the media endpoint: a trait (an S3-compatible store could implement
//! it; none does yet) and the embedded backend, [`FsStore`], in `<data>/media/`:
//!
//! - `objects/<id>`: an object, named by the hex SHA-256 of its bytes (content-addressed);
//! - `tmp/<n>`: uploads in progress; an upload becomes `objects/<id>` only whole: written,
//!   fsynced, renamed, the directory fsynced. A crash or a broken upload leaves a temporary
//!   file, which is never served and is removed (at start-up, and by the collector);
//! - `refs/<id>`: an empty file whose presence durably records that a message names the
//!   object (created, and its directory fsynced, before the Send goes to the sequencer). The
//!   collector deletes objects without one once they are older than the configured age.
//!
//! Every method blocks (disk I/O, fsync): call them from the media endpoint's threads or the
//! blocking pool, never from a shard thread.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::fsutil;

/// An upload being written; dropped without [`PendingObject::commit`], it leaves nothing.
pub(crate) trait PendingObject: Send {
    /// Appends bytes.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// The writes so far may go to the disk now (a hint after a batch of writes: the final
    /// commit then has less to wait for).
    fn flush_hint(&mut self);
    /// Makes the object durable and visible under its id (replacing nothing: an object with the
    /// same id has the same bytes).
    fn commit(self: Box<Self>) -> io::Result<()>;
}

/// An object being read.
pub(crate) trait ObjectReader: Send {
    /// Reads from `offset` into `buf`; 0 at the end.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

/// What a collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Collected {
    /// Unreferenced objects deleted.
    pub(crate) objects: u64,
    /// Abandoned temporary files deleted.
    pub(crate) partial: u64,
}

/// Where media objects live.
pub(crate) trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Starts an upload of object `id`.
    fn begin(&self, id: &str) -> io::Result<Box<dyn PendingObject>>;
    /// The object and its size, if it exists.
    fn open(&self, id: &str) -> io::Result<Option<(Box<dyn ObjectReader>, u64)>>;
    /// Durably records that a message names `id`. `Ok(false)`: no such object.
    fn add_reference(&self, id: &str) -> io::Result<bool>;
    /// Deletes the objects no message names that were stored before `older_than`, and
    /// temporary files from before it.
    fn collect(&self, older_than: SystemTime) -> io::Result<Collected>;
}

/// The embedded store: files in a directory (see the module docs).
#[derive(Debug)]
pub(crate) struct FsStore {
    objects: PathBuf,
    tmp: PathBuf,
    refs: PathBuf,
    next_tmp: AtomicU64,
    /// Orders `add_reference` against `collect`: an object is never deleted between the check
    /// that it exists and its reference being recorded.
    gc: Mutex<()>,
}

impl FsStore {
    /// Opens (creating) the store in `dir`; temporary files left by a previous run are removed.
    pub(crate) fn open(dir: &Path) -> anyhow::Result<Self> {
        let s = Self {
            objects: dir.join("objects"),
            tmp: dir.join("tmp"),
            refs: dir.join("refs"),
            next_tmp: AtomicU64::new(0),
            gc: Mutex::new(()),
        };
        for d in [&s.objects, &s.tmp, &s.refs] {
            fsutil::create_dir_durable(d)?;
        }
        for e in fs::read_dir(&s.tmp)? {
            fs::remove_file(e?.path())?;
        }
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct FsPending {
    file: File,
    /// Bytes written so far (where the next write lands).
    written: u64,
    /// Bytes whose writeback was started ([`PendingObject::flush_hint`]).
    hinted: u64,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    done: bool,
}

impl PendingObject for FsPending {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn flush_hint(&mut self) {
        start_writeback(&self.file, self.hinted, self.written - self.hinted);
        self.hinted = self.written;
    }

    fn commit(mut self: Box<Self>) -> io::Result<()> {
        self.file.sync_all()?;
        if self.dest.exists() {
            // The same bytes are there already: refresh their age for the collector.
            File::options()
                .write(true)
                .open(&self.dest)?
                .set_modified(system_now())?;
        } else {
            fs::rename(&self.tmp, &self.dest)?;
        }
        fsutil::fsync_dir(&self.dir).map_err(|e| io::Error::other(e.to_string()))?;
        self.done = true;
        let _ = fs::remove_file(&self.tmp);
        Ok(())
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` back to the disk now, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the upload's final fsync finds
/// most of the file already written: the disk works while the rest of the upload arrives, and
/// the fsync of a 50 MiB object no longer costs tens of ms after its last byte. Only a hint:
/// durability still comes from `commit`'s fsync, so a failure here is ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd as _;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for the whole call (borrowed from `file`), and
    // sync_file_range reads no memory of ours: it only starts writeback of a byte range.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

impl Drop for FsPending {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

struct FsReader(File);

impl ObjectReader for FsReader {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.seek(SeekFrom::Start(offset))?;
        self.0.read(buf)
    }
}

fn older(meta: &fs::Metadata, than: SystemTime) -> bool {
    meta.modified().is_ok_and(|m| m < than)
}

impl ObjectStore for FsStore {
    fn begin(&self, id: &str) -> io::Result<Box<dyn PendingObject>> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("{n}-{id}"));
        let file = File::options().write(true).create_new(true).open(&tmp)?;
        Ok(Box::new(FsPending {
            file,
            written: 0,
            hinted: 0,
            tmp,
            dest: self.objects.join(id),
            dir: self.objects.clone(),
            done: false,
        }))
    }

    fn open(&self, id: &str) -> io::Result<Option<(Box<dyn ObjectReader>, u64)>> {
        match File::open(self.objects.join(id)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((Box::new(FsReader(f)), len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn add_reference(&self, id: &str) -> io::Result<bool> {
        let _g = self.lock();
        if !self.objects.join(id).exists() {
            return Ok(false);
        }
        let r = self.refs.join(id);
        if !r.exists() {
            File::create(&r)?.sync_all()?;
            fsutil::fsync_dir(&self.refs).map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(true)
    }

    fn collect(&self, older_than: SystemTime) -> io::Result<Collected> {
        let mut c = Collected::default();
        for e in fs::read_dir(&self.tmp)? {
            let e = e?;
            if older(&e.metadata()?, older_than) && fs::remove_file(e.path()).is_ok() {
                c.partial += 1;
            }
        }
        let _g = self.lock();
        for e in fs::read_dir(&self.objects)? {
            let e = e?;
            let name = e.file_name();
            if self.refs.join(&name).exists() || !older(&e.metadata()?, older_than) {
                continue;
            }
            fs::remove_file(e.path())?;
            c.objects += 1;
        }
        if c.objects > 0 {
            fsutil::fsync_dir(&self.objects).map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(c)
    }
}

/// The wall clock as a `SystemTime` (file times), from the gateway's clock.
pub(crate) fn system_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(crate::clock::unix_ms())
}

/// `age_ms` before now, or the epoch.
pub(crate) fn cutoff(age_ms: u64) -> SystemTime {
    system_now()
        .checked_sub(Duration::from_millis(age_ms))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn read_all(s: &FsStore, id: &str) -> Option<Vec<u8>> {
        let (mut r, len) = s.open(id).unwrap()?;
        let mut buf = vec![0; usize::try_from(len).unwrap()];
        let n = r.read_at(0, &mut buf).unwrap();
        buf.truncate(n);
        Some(buf)
    }

    #[test]
    fn an_upload_is_visible_only_once_committed_and_gc_spares_referenced_objects() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).unwrap();
        let mut p = s.begin(ID).unwrap();
        p.write(b"hello ").unwrap();
        p.write(b"world").unwrap();
        assert_eq!(read_all(&s, ID), None, "not visible before commit");
        assert!(
            !s.add_reference(ID).unwrap(),
            "no reference to a partial upload"
        );
        p.commit().unwrap();
        assert_eq!(read_all(&s, ID).unwrap(), b"hello world");
        // A dropped upload leaves nothing.
        let other = ID.replace('0', "f");
        let mut p = s.begin(&other).unwrap();
        p.write(b"part").unwrap();
        drop(p);
        assert_eq!(read_all(&s, &other), None);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // An unreferenced object goes once old enough; a referenced one stays.
        let mut p = s.begin(&other).unwrap();
        p.write(b"x").unwrap();
        p.commit().unwrap();
        assert!(s.add_reference(ID).unwrap());
        let past = cutoff(60_000);
        assert_eq!(s.collect(past).unwrap(), Collected::default());
        let future = system_now() + Duration::from_secs(60);
        assert_eq!(
            s.collect(future).unwrap(),
            Collected {
                objects: 1,
                partial: 0
            }
        );
        assert_eq!(read_all(&s, &other), None);
        assert_eq!(read_all(&s, ID).unwrap(), b"hello world");
        // Temporary files of a previous run are removed at open.
        fs::write(dir.path().join("tmp/9-x"), b"left over").unwrap();
        drop(s);
        let _s = FsStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
