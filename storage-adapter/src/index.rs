//! The per-shard message index (fjall): `conv‖seq → entry` and `conv‖client_msg_id → seq`, plus
//! the log lsn it has applied. It is a read model: written without forced sync, rebuilt from the
//! log when missing, damaged or behind. The log stays the only source of truth.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};

use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use crate::error::StorageError;
use crate::format::{self, RecordView};
use crate::types::{ClientMsgId, ConvId, Entry, Lsn, Seq};

/// Most entries one range read returns (callers page with `before`/`after`).
pub const READ_ENTRIES_MAX: usize = 1000;

/// Memtable size of the entries keyspace (the dedup keyspace gets half).
const MEMTABLE_BYTES: u64 = 8 << 20;

const FORMAT_KEY: &[u8] = b"format";
const FORMAT_VALUE: &[u8] = b"starling-index-1";
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
    pub fn open(path: &Path, cache_bytes: u64) -> Result<FjallIndex, StorageError> {
        match Self::try_open(path, cache_bytes) {
            Ok(Some(ix)) => Ok(ix),
            Ok(None) | Err(_) => {
                if path.exists() {
                    fs::remove_dir_all(path).map_err(|source| StorageError::Fs {
                        op: "remove damaged index",
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
                let mut ix =
                    Self::try_open(path, cache_bytes)?.ok_or_else(|| StorageError::Decode {
                        table: "state",
                        reason: "fresh index has no format marker".into(),
                    })?;
                ix.rebuilt = true;
                Ok(ix)
            }
        }
    }

    /// `Ok(None)`: opened, but not a valid index of this format.
    fn try_open(path: &Path, cache_bytes: u64) -> Result<Option<FjallIndex>, StorageError> {
        let fresh = !path.exists();
        let db = Database::builder(path)
            .cache_size(cache_bytes)
            .worker_threads(1)
            .open()?;
        // Small memtables: every insert and point read walks the memtable's skiplist, and at
        // fjall's default 64 MiB that walk is a chain of cache misses (it was most of the
        // applier thread's time). Sealed memtables become sorted tables with bloom filters.
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
        if let Some(g) = entries.last_key_value() {
            let (_, v) = g.into_inner()?;
            decode_value(&v)?;
        }
        Ok(Some(FjallIndex {
            path: path.to_path_buf(),
            db,
            entries,
            dedup,
            state,
            applied: Applied {
                lsn: Mutex::new((applied, None)),
                cond: Condvar::new(),
            },
            rebuilt: fresh,
        }))
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
    pub(crate) fn apply(&self, records: &[RecordView<'_>]) -> Result<(), StorageError> {
        let applied = self.applied_lsn();
        let mut batch = self.db.batch();
        let mut last = applied;
        for r in records {
            if r.last_lsn() <= applied {
                continue;
            }
            let mut rest = r.payload;
            for _ in 0..r.count {
                let (e, used) = format::decode_entry(rest).map_err(|e| StorageError::Decode {
                    table: "log record",
                    reason: e.to_string(),
                })?;
                if e.seq != Seq::NONE {
                    batch.insert(&self.entries, entry_key(e.conv, e.seq), &rest[..used]);
                    if !e.client_msg_id.is_none() {
                        batch.insert(
                            &self.dedup,
                            dedup_key(e.conv, e.client_msg_id),
                            e.seq.0.to_be_bytes(),
                        );
                    }
                }
                rest = &rest[used..];
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
        iter: impl Iterator<Item = fjall::Guard>,
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        for g in iter.take(limit.min(READ_ENTRIES_MAX)) {
            let (_, v) = g.into_inner()?;
            out.push(decode_value(&v)?);
        }
        Ok(out)
    }
}

impl crate::traits::MessageIndex for FjallIndex {
    fn latest(&self, conv: ConvId, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let mut v = Self::collect(self.entries.prefix(conv.0.to_be_bytes()).rev(), limit)?;
        v.reverse();
        Ok(v)
    }

    fn before(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let range = entry_key(conv, Seq(0))..entry_key(conv, seq);
        let mut v = Self::collect(self.entries.range(range).rev(), limit)?;
        v.reverse();
        Ok(v)
    }

    fn after(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        if seq.0 == u64::MAX {
            return Ok(Vec::new());
        }
        let range = entry_key(conv, Seq(seq.0 + 1))..=entry_key(conv, Seq(u64::MAX));
        Self::collect(self.entries.range(range), limit)
    }

    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, StorageError> {
        match self.entries.get(entry_key(conv, seq))? {
            Some(v) => Ok(Some(decode_value(&v)?)),
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
