//! The per-shard message index (fjall): `conv‖seq → where the entry is in the log` and
//! `conv‖client_msg_id → seq`, plus the log lsn it has applied. It is a read model: written
//! without forced sync, rebuilt from the log when missing, damaged or behind. The log stays the
//! only source of truth, and also holds the entries themselves: the index keeps a 24-byte
//! pointer (segment, offset, length, CRC32C of the entry's bytes) instead of a copy, so fjall's
//! journal, flushes and compactions move keys and pointers, not message bodies (they were half
//! the server's CPU at peak). A read `pread`s the entry from its segment and checks its CRC.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use crate::error::StorageError;
use crate::format::{self, RecordView};
use crate::log::{RecordPos, segment_path};
use crate::types::{ClientMsgId, ConvId, Entry, Lsn, Seq};

/// Most entries one range read returns (callers page with `before`/`after`).
pub const READ_ENTRIES_MAX: usize = 1000;

/// Memtable size of the entries keyspace (the dedup keyspace gets half).
const MEMTABLE_BYTES: u64 = 64 << 20;

const FORMAT_KEY: &[u8] = b"format";
const FORMAT_VALUE: &[u8] = b"starling-index-2";

/// Bytes of an entry pointer: segment base lsn, file offset (u64 each), length, CRC32C (u32).
const POINTER_BYTES: usize = 24;

/// Segment files kept open for reads (beyond it the cache starts over).
const OPEN_SEGMENTS_MAX: usize = 64;
const APPLIED_KEY: &[u8] = b"applied_lsn";

fn entry_key(conv: ConvId, seq: Seq) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&conv.0.to_be_bytes());
    k[16..].copy_from_slice(&seq.0.to_be_bytes());
    k
}

fn dedup_key(conv: ConvId, id: ClientMsgId) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&conv.0.to_be_bytes());
    k[16..].copy_from_slice(&id.0);
    k
}

fn u64_be(b: &[u8], table: &'static str) -> Result<u64, StorageError> {
    let a: [u8; 8] = b.try_into().map_err(|_| StorageError::Decode {
        table,
        reason: "not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(a))
}

fn encode_pointer(segment: Lsn, offset: u64, entry: &[u8]) -> [u8; POINTER_BYTES] {
    let mut p = [0u8; POINTER_BYTES];
    p[..8].copy_from_slice(&segment.0.to_be_bytes());
    p[8..16].copy_from_slice(&offset.to_be_bytes());
    p[16..20].copy_from_slice(&(entry.len() as u32).to_be_bytes());
    p[20..].copy_from_slice(&crc32c::crc32c(entry).to_be_bytes());
    p
}

/// (segment, offset, len, crc) of a stored pointer.
fn decode_pointer(v: &[u8]) -> Result<(Lsn, u64, usize, u32), StorageError> {
    let bad = || StorageError::Decode {
        table: "entries",
        reason: format!("pointer of {} bytes", v.len()),
    };
    if v.len() != POINTER_BYTES {
        return Err(bad());
    }
    let u32_at = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    Ok((
        Lsn(u64_be(&v[..8], "entries")?),
        u64_be(&v[8..16], "entries")?,
        u32_at(16) as usize,
        u32_at(20),
    ))
}

fn decode_value(v: &[u8]) -> Result<Entry, StorageError> {
    match format::decode_entry(v) {
        Ok((e, used)) if used == v.len() => Ok(e),
        Ok(_) => Err(StorageError::Decode {
            table: "entries",
            reason: "trailing bytes".into(),
        }),
        Err(e) => Err(StorageError::Decode {
            table: "entries",
            reason: e.to_string(),
        }),
    }
}

/// How far the index has applied the log, shared with readers that need read-your-writes.
#[derive(Debug, Default)]
struct Applied {
    lsn: Mutex<(Lsn, Option<String>)>,
    cond: Condvar,
}

/// The fjall-backed message index of one shard.
pub struct FjallIndex {
    path: PathBuf,
    /// The log whose entries the pointers name.
    log_dir: PathBuf,
    segments: Mutex<HashMap<Lsn, Arc<File>>>,
    db: Database,
    entries: Keyspace,
    dedup: Keyspace,
    state: Keyspace,
    applied: Applied,
    rebuilt: bool,
}

impl fmt::Debug for FjallIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallIndex")
            .field("path", &self.path)
            .field("applied", &self.applied)
            .field("rebuilt", &self.rebuilt)
            .finish_non_exhaustive()
    }
}

impl FjallIndex {
    /// Opens the index in `path`. If it cannot be opened or is not ours, it is deleted and
    /// recreated empty (`rebuilt()` then says so, and the caller replays the whole log).
    pub fn open(path: &Path, log_dir: &Path, cache_bytes: u64) -> Result<FjallIndex, StorageError> {
        match Self::try_open(path, log_dir, cache_bytes) {
            Ok(Some(ix)) => Ok(ix),
            Ok(None) | Err(_) => {
                if path.exists() {
                    fs::remove_dir_all(path).map_err(|source| StorageError::Fs {
                        op: "remove damaged index",
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
                let mut ix = Self::try_open(path, log_dir, cache_bytes)?.ok_or_else(|| {
                    StorageError::Decode {
                        table: "state",
                        reason: "fresh index has no format marker".into(),
                    }
                })?;
                ix.rebuilt = true;
                Ok(ix)
            }
        }
    }

    /// `Ok(None)`: opened, but not a valid index of this format.
    fn try_open(
        path: &Path,
        log_dir: &Path,
        cache_bytes: u64,
    ) -> Result<Option<FjallIndex>, StorageError> {
        let fresh = !path.exists();
        let db = Database::builder(path)
            .cache_size(cache_bytes)
            .worker_threads(1)
            .open()?;
        // Memtable size, measured (starling-bench messages at 110–120k msg/s offered, one
        // shard): 2 MiB → 98k delivered (flush/compaction 34% of the server), 8 MiB → 98k,
        // 32 MiB → 106k, 64 MiB → 108k. Small memtables make each skiplist insert cheaper but
        // the flushes and compactions of many small tables cost more than they save.
        let entries = db.keyspace("entries", || {
            KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
        })?;
        let dedup = db.keyspace("dedup", || {
            KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES / 2)
        })?;
        let state = db.keyspace("state", KeyspaceCreateOptions::default)?;
        if fresh {
            state.insert(FORMAT_KEY, FORMAT_VALUE)?;
        }
        if state.get(FORMAT_KEY)?.as_deref() != Some(FORMAT_VALUE) {
            return Ok(None);
        }
        let applied = match state.get(APPLIED_KEY)? {
            Some(v) => Lsn(u64_be(&v, "state")?),
            None => Lsn::ZERO,
        };
        // Read the newest entry back: a damaged table usually shows here, at open, not later.
        let newest = match entries.last_key_value() {
            Some(g) => Some(g.into_inner()?.1),
            None => None,
        };
        let ix = FjallIndex {
            path: path.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            segments: Mutex::new(HashMap::new()),
            db,
            entries,
            dedup,
            state,
            applied: Applied {
                lsn: Mutex::new((applied, None)),
                cond: Condvar::new(),
            },
            rebuilt: fresh,
        };
        if let Some(v) = newest {
            ix.load(&v)?;
        }
        Ok(Some(ix))
    }

    /// Reads the entry a stored pointer names from its log segment, checking its CRC.
    fn load(&self, v: &[u8]) -> Result<Entry, StorageError> {
        let (segment, offset, len, crc) = decode_pointer(v)?;
        let file = self.segment(segment)?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|source| StorageError::Fs {
                op: "read entry",
                path: segment_path(&self.log_dir, segment),
                source,
            })?;
        let computed = crc32c::crc32c(&buf);
        if computed != crc {
            return Err(StorageError::Decode {
                table: "entries",
                reason: format!(
                    "entry at {}:{offset} fails its checksum (stored {crc:08x}, computed {computed:08x})",
                    segment_path(&self.log_dir, segment).display()
                ),
            });
        }
        decode_value(&buf)
    }

    fn segment(&self, base: Lsn) -> Result<Arc<File>, StorageError> {
        let mut open = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = open.get(&base) {
            return Ok(f.clone());
        }
        let path = segment_path(&self.log_dir, base);
        let f = Arc::new(File::open(&path).map_err(|source| StorageError::Fs {
            op: "open segment",
            path,
            source,
        })?);
        if open.len() >= OPEN_SEGMENTS_MAX {
            open.clear();
        }
        open.insert(base, f.clone());
        Ok(f)
    }

    /// Whether this index was created empty at open (fresh or replaced after damage).
    pub fn rebuilt(&self) -> bool {
        self.rebuilt
    }

    /// Deletes every entry (used when the index is ahead of the log it must mirror).
    pub(crate) fn clear(&self) -> Result<(), StorageError> {
        self.entries.clear()?;
        self.dedup.clear()?;
        self.state.remove(APPLIED_KEY)?;
        self.set_applied(Lsn::ZERO);
        Ok(())
    }

    /// Applies durable records in one atomic index write, advancing `applied_lsn`. Records at or
    /// below `applied_lsn` are skipped, so replay is idempotent.
    pub(crate) fn apply(
        &self,
        records: &[(RecordView<'_>, RecordPos)],
    ) -> Result<(), StorageError> {
        let applied = self.applied_lsn();
        let mut batch = self.db.batch();
        let mut last = applied;
        for (r, pos) in records {
            if r.last_lsn() <= applied {
                continue;
            }
            let mut rest = r.payload;
            let mut offset = pos.offset + format::RECORD_HEADER_BYTES as u64;
            for _ in 0..r.count {
                let (e, used) = format::decode_entry(rest).map_err(|e| StorageError::Decode {
                    table: "log record",
                    reason: e.to_string(),
                })?;
                if e.seq != Seq::NONE {
                    batch.insert(
                        &self.entries,
                        entry_key(e.conv, e.seq),
                        encode_pointer(pos.segment, offset, &rest[..used]),
                    );
                    if !e.client_msg_id.is_none() {
                        batch.insert(
                            &self.dedup,
                            dedup_key(e.conv, e.client_msg_id),
                            e.seq.0.to_be_bytes(),
                        );
                    }
                }
                rest = &rest[used..];
                offset += used as u64;
            }
            last = r.last_lsn();
        }
        if last == applied {
            return Ok(());
        }
        batch.insert(&self.state, APPLIED_KEY, last.0.to_be_bytes());
        batch.commit()?;
        self.set_applied(last);
        Ok(())
    }

    fn set_applied(&self, lsn: Lsn) {
        let mut g = self
            .applied
            .lsn
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.0 = lsn;
        drop(g);
        self.applied.cond.notify_all();
    }

    pub(crate) fn set_failed(&self, why: String) {
        let mut g = self
            .applied
            .lsn
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.1 = Some(why);
        drop(g);
        self.applied.cond.notify_all();
    }

    /// The highest log lsn whose entries are visible to reads.
    pub fn applied_lsn(&self) -> Lsn {
        self.applied
            .lsn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Blocks until entries through `lsn` are visible (read-your-writes for tests and tools).
    pub fn wait_applied(&self, lsn: Lsn) -> Result<(), StorageError> {
        let mut g = self
            .applied
            .lsn
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if g.0 >= lsn {
                return Ok(());
            }
            if let Some(why) = &g.1 {
                return Err(StorageError::IndexStopped(why.clone()));
            }
            g = self
                .applied
                .cond
                .wait(g)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn collect(
        &self,
        iter: impl Iterator<Item = fjall::Guard>,
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        for g in iter.take(limit.min(READ_ENTRIES_MAX)) {
            let (_, v) = g.into_inner()?;
            out.push(self.load(&v)?);
        }
        Ok(out)
    }
}

impl crate::traits::MessageIndex for FjallIndex {
    fn latest(&self, conv: ConvId, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let mut v = self.collect(self.entries.prefix(conv.0.to_be_bytes()).rev(), limit)?;
        v.reverse();
        Ok(v)
    }

    fn before(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let range = entry_key(conv, Seq(0))..entry_key(conv, seq);
        let mut v = self.collect(self.entries.range(range).rev(), limit)?;
        v.reverse();
        Ok(v)
    }

    fn after(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        if seq.0 == u64::MAX {
            return Ok(Vec::new());
        }
        let range = entry_key(conv, Seq(seq.0 + 1))..=entry_key(conv, Seq(u64::MAX));
        self.collect(self.entries.range(range), limit)
    }

    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, StorageError> {
        match self.entries.get(entry_key(conv, seq))? {
            Some(v) => Ok(Some(self.load(&v)?)),
            None => Ok(None),
        }
    }

    fn last_seq(&self, conv: ConvId) -> Result<Seq, StorageError> {
        match self.entries.prefix(conv.0.to_be_bytes()).next_back() {
            Some(g) => {
                let k = g.key()?;
                Ok(Seq(u64_be(k.get(16..).unwrap_or(&[]), "entries")?))
            }
            None => Ok(Seq::NONE),
        }
    }

    fn dedup(&self, conv: ConvId, id: ClientMsgId) -> Result<Option<Seq>, StorageError> {
        match self.dedup.get(dedup_key(conv, id))? {
            Some(v) => Ok(Some(Seq(u64_be(&v, "dedup")?))),
            None => Ok(None),
        }
    }

    fn indexed_lsn(&self) -> Lsn {
        self.applied_lsn()
    }
}
