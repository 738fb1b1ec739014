//! The per-shard message index: for every conversation, where each seq's entry is in the log,
//! and which seqs may carry a given `client_msg_id`. It is a read model: the log stays the only
//! source of truth and also holds the entries themselves; what the index loses it rebuilds from
//! the log.
//!
//! Two tiers (docs/design/log.md, "The index"):
//!
//! - **Resident** ([`resident`]): seqs are dense per conversation, so a resident conversation is
//!   a vector of 20-byte pointers (segment, offset, length, CRC32C of the entry's bytes, a 32-bit
//!   tag of its `client_msg_id`) indexed by `seq - first`, and applying an entry is a push. Dedup
//!   needs no map: every full chunk of 4,096 pointers gets a sorted table of its tags, and a
//!   lookup walks the conversation's chunks newest first, confirming every candidate by reading
//!   the entry and comparing its id, so a tag two ids share costs a read, never a wrong answer.
//!   The tags are keyed by a random per-index key that never leaves the server.
//! - **Checkpointed** ([`segfile`]): once a log segment is sealed and applied, a background
//!   thread ([`checkpoint`]) writes its index file — every conversation's pointers into that
//!   segment, sorted by conversation, with a bloom filter and CRC-checked blocks. Those files
//!   are the checkpoint: a start loads only their heads and replays just the segments written
//!   since the last one. Pointers into checkpointed segments may then leave memory: when the
//!   resident bytes pass the budget, a clock sweep drops them from conversations not read or
//!   written since its last pass, and a conversation that is read again is paged in from the
//!   index files, newest segment first, only as far back as the read needs ([`paging`]).
//!
//! Every entry read is `pread` from its segment and its CRC and its conversation and seq are
//! checked, so a wrong pointer is an error, never a wrong message.
//!
//! Dedup is exact within the newest [`DEDUP_WINDOW`] seqs of a conversation: a retry whose first
//! send is further back is stored as a new message (protocol/README.md, "Idempotent sends").
//!
//! Dedup was a hash map from a fingerprint of `(conv, client_msg_id)` to the seq; a tag beside
//! each pointer replaced it (docs/design/performance-decisions.md, "Dedup by a tag beside each
//! pointer"). A fjall LSM index before that cost about a third of the server's CPU at peak.
//!
//! Entries are applied on the log's I/O thread right after each group commit (see
//! `embedded.rs`); readers take the read lock and do their I/O outside it.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use crate::error::StorageError;
use crate::format::{self, RecordView};
use crate::log::{RecordPos, list_segments, segment_path};
use crate::types::{ConvId, Entry, Lsn, Seq};

mod checkpoint;

pub use checkpoint::Checkpointer;
mod paging;
mod removal;
mod resident;
mod segfile;
mod state;
#[cfg(test)]
mod tests;

use resident::Ptr;
use state::State;

/// Most entries one range read returns (callers page with `before`/`after`).
pub const READ_ENTRIES_MAX: usize = 1000;

/// Dedup of a `client_msg_id` is exact within this many newest seqs of its conversation.
pub const DEDUP_WINDOW: u64 = 65_536;

/// Segment files kept open for reads (beyond it the cache starts over).
const OPEN_SEGMENTS_MAX: usize = 64;

/// How far the index has applied the log, shared with readers that need read-your-writes.
#[derive(Debug, Default)]
struct Applied {
    lsn: Mutex<(Lsn, Option<String>)>,
    cond: Condvar,
}

/// What the index holds and has done, for metrics and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Entries indexed.
    pub entries: u64,
    /// Bytes held in memory (resident conversations, live segments' buffers, index-file heads).
    pub memory_bytes: u64,
    /// The budget for them.
    pub budget_bytes: u64,
    /// Conversations resident.
    pub resident_convs: u64,
    /// Segments checkpointed (an index file written and kept).
    pub checkpointed_segments: u64,
    /// Segments not checkpointed yet.
    pub live_segments: u64,
}

/// The message index of one shard: resident pointers within a memory budget, checkpointed
/// per-segment index files for the rest.
pub struct DenseIndex {
    dir: PathBuf,
    /// The log whose entries the pointers name.
    log_dir: PathBuf,
    files: Mutex<HashMap<Lsn, Arc<File>>>,
    state: RwLock<State>,
    applied: Applied,
    rebuilt: bool,
    budget: usize,
    /// Wakes the checkpoint thread: a segment was completed, or the index is stopping.
    work: checkpoint::Signal,
    /// Where the next sweep starts (a table of the conversation map).
    sweep_hand: AtomicUsize,
    /// Held by a checkpoint or a sweep: one at a time.
    background: Mutex<()>,
    /// Last seqs of conversations retention emptied (`removal.rs`).
    floors: Mutex<HashMap<ConvId, u64>>,
}

impl fmt::Debug for DenseIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenseIndex")
            .field("dir", &self.dir)
            .field("applied", &self.applied)
            .field("rebuilt", &self.rebuilt)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// What opening the index found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Everything through this lsn is checkpointed: the log need not read those segments.
    pub(crate) checkpointed_through: Lsn,
    /// Index files dropped (damaged, or naming a segment the log does not have).
    pub(crate) dropped_files: usize,
}

impl DenseIndex {
    /// Opens the index kept in `dir` for the log in `log_dir`: every sealed segment, from the
    /// first, with a valid index file is checkpointed (its head is loaded; the segment itself
    /// is not read); index files after the first gap, damaged ones and ones whose segment is
    /// gone are removed, and those segments are replayed from the log by the caller. With
    /// nothing checkpointed `rebuilt()` says so.
    pub(crate) fn open(
        dir: &Path,
        log_dir: &Path,
        budget: usize,
    ) -> Result<(DenseIndex, Opened), StorageError> {
        let fs_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| StorageError::Fs { op, path, source }
        };
        fs::create_dir_all(dir).map_err(fs_err("create index dir", dir))?;
        // A removal a crash interrupted is finished first (its segments are gone for good).
        let removed = removal::finish_removal(dir, log_dir)?;
        let segs = match list_segments(log_dir) {
            Ok(s) => s,
            Err(_) if !log_dir.exists() => Vec::new(),
            Err(e) => return Err(StorageError::Log(e)),
        };
        let mut st = State::default();
        let mut through = Lsn::ZERO;
        // Every sealed segment from the first, while its index file is valid and consistent.
        for (i, seg) in segs.iter().enumerate() {
            let Some(next) = segs.get(i + 1) else { break };
            let path = dir.join(segfile::file_name(seg.base));
            let Ok(ix) = segfile::SegIx::open(&path, seg.base) else {
                break;
            };
            if Lsn(ix.last.0 + 1) != next.base || (!st.segs.is_empty() && ix.tag_key != st.tag_key)
            {
                break;
            }
            st.tag_key = ix.tag_key;
            st.entries += ix.entries;
            st.head_bytes += ix.memory_bytes();
            through = ix.last;
            st.segs.push(seg.base);
            st.ixs.push(Some(Arc::new(ix)));
        }
        st.live_from = st.segs.len() as u32;
        let rebuilt = st.segs.is_empty();
        if rebuilt {
            st.tag_key = State::fresh().tag_key;
        }
        // Anything else in the directory is not ours to keep (an index file past the prefix,
        // a damaged one, a leftover temporary file, an older index format).
        let keep: Vec<String> = st.segs.iter().map(|&b| segfile::file_name(b)).collect();
        let mut dropped = 0;
        for ent in fs::read_dir(dir).map_err(fs_err("read index dir", dir))? {
            let ent = ent.map_err(fs_err("read index dir", dir))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) || name == removal::REMOVED_FILE {
                continue;
            }
            let path = ent.path();
            if segfile::parse_name(&name).is_some() {
                dropped += 1;
            }
            let res = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.map_err(fs_err("remove unusable index file", &path))?;
        }
        let floors = removed.floors;
        st.floor_bytes = floors.len() * 24;
        let index = DenseIndex {
            dir: dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            state: RwLock::new(st),
            applied: Applied {
                lsn: Mutex::new((through, None)),
                cond: Condvar::new(),
            },
            rebuilt,
            budget,
            work: checkpoint::Signal::default(),
            sweep_hand: AtomicUsize::new(0),
            background: Mutex::new(()),
            floors: Mutex::new(floors),
        };
        Ok((
            index,
            Opened {
                checkpointed_through: through,
                dropped_files: dropped,
            },
        ))
    }

    /// Whether this index started with nothing checkpointed (the whole log is replayed).
    pub fn rebuilt(&self) -> bool {
        self.rebuilt
    }

    /// Entries indexed.
    pub fn len(&self) -> u64 {
        self.read().entries
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the index holds.
    pub fn stats(&self) -> IndexStats {
        let st = self.read();
        IndexStats {
            entries: st.entries,
            memory_bytes: st.memory_bytes() as u64,
            budget_bytes: self.budget as u64,
            resident_convs: st.convs.len() as u64,
            checkpointed_segments: st.ixs.iter().flatten().count() as u64,
            live_segments: st.live.len() as u64,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies durable records, advancing `applied_lsn`. Records at or below `applied_lsn` are
    /// skipped, so replay is idempotent. Readers see a batch whole or not at all.
    pub(crate) fn apply(
        &self,
        records: &[(RecordView<'_>, RecordPos)],
    ) -> Result<(), StorageError> {
        let applied = self.applied_lsn();
        // Parse outside the lock.
        let mut parsed = Vec::with_capacity(records.iter().map(|(r, _)| r.count as usize).sum());
        let mut segments = Vec::new();
        let mut last = applied;
        for (r, pos) in records {
            if r.last_lsn() <= applied {
                continue;
            }
            segments.push((pos.segment, r.last_lsn()));
            let mut rest = r.payload;
            let mut offset = pos.offset + format::RECORD_HEADER_BYTES as u64;
            for _ in 0..r.count {
                let (conv, seq, id, used) =
                    format::entry_keys(rest).map_err(|e| StorageError::Decode {
                        table: "log record",
                        reason: e.to_string(),
                    })?;
                if seq != Seq::NONE {
                    let off = u32::try_from(offset).map_err(|_| StorageError::Decode {
                        table: "index",
                        reason: format!("entry offset {offset} beyond 4 GiB in its segment"),
                    })?;
                    let p = Ptr {
                        seg: 0,
                        off,
                        len: used as u32,
                        crc: crc32c::crc32c(&rest[..used]),
                        id: 0,
                    };
                    parsed.push((pos.segment, conv, seq, id, p));
                }
                rest = &rest[used..];
                offset += used as u64;
            }
            last = r.last_lsn();
        }
        if last == applied {
            return Ok(());
        }
        let mut completed = false;
        {
            let mut st = self.write();
            let mut parsed = parsed.into_iter().peekable();
            for (segment, rec_last) in segments {
                let (seg, new) = st.seg_index(segment)?;
                completed |= new && seg > 0;
                let i = (seg - st.live_from) as usize;
                st.live[i].last = rec_last;
                while let Some((_, conv, s, id, mut p)) = parsed.next_if(|(b, ..)| *b == segment) {
                    p.seg = seg;
                    st.insert(conv, s, id, p);
                }
            }
        }
        self.set_applied(last);
        if completed {
            self.work.notify();
        }
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

    /// Whether applying stopped on an error (reopening rebuilds the index).
    pub fn failed(&self) -> bool {
        self.applied
            .lsn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .is_some()
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

    /// Reads the entries the pointers name from their segments, checking each CRC and that the
    /// entry is the one of `conv` and that seq.
    fn load(&self, conv: ConvId, ptrs: &[(Lsn, Ptr, u64)]) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::with_capacity(ptrs.len());
        let mut buf = Vec::new();
        let mut file: Option<(Lsn, Arc<File>)> = None;
        for &(segment, p, seq) in ptrs {
            let f = match &file {
                Some((base, f)) if *base == segment => f.clone(),
                _ => {
                    let f = self.segment(segment)?;
                    file = Some((segment, f.clone()));
                    f
                }
            };
            buf.resize(p.len as usize, 0);
            f.read_exact_at(&mut buf, u64::from(p.off))
                .map_err(|source| StorageError::Fs {
                    op: "read entry",
                    path: segment_path(&self.log_dir, segment),
                    source,
                })?;
            let computed = crc32c::crc32c(&buf);
            if computed != p.crc {
                return Err(StorageError::Decode {
                    table: "entries",
                    reason: format!(
                        "entry at {}:{} fails its checksum (stored {:08x}, computed {computed:08x})",
                        segment_path(&self.log_dir, segment).display(),
                        p.off,
                        p.crc
                    ),
                });
            }
            let e = decode_value(&buf)?;
            if e.conv != conv || e.seq != Seq(seq) {
                return Err(StorageError::Decode {
                    table: "entries",
                    reason: format!(
                        "entry at {}:{} is {}:{}, the index said {}:{seq}",
                        segment_path(&self.log_dir, segment).display(),
                        p.off,
                        e.conv.0,
                        e.seq.0,
                        conv.0
                    ),
                });
            }
            out.push(e);
        }
        Ok(out)
    }

    fn segment(&self, base: Lsn) -> Result<Arc<File>, StorageError> {
        let mut open = self.files.lock().unwrap_or_else(PoisonError::into_inner);
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

/// For `crate::fuzzing::segment_index`: see [`segfile::fuzz`].
pub(crate) fn fuzz_segment_index(data: &[u8], dir: &Path) {
    segfile::fuzz(data, dir);
}

/// A small valid index file (two conversations, a hole, an entry without an id), for the
/// fuzz corpus.
#[cfg(test)]
pub(crate) fn sample_segment_index() -> Vec<u8> {
    use segfile::SegEntry;
    let p = |n: u32, id: u32| Ptr {
        seg: 0,
        off: n,
        len: 1,
        crc: n,
        id,
    };
    let mut entries = vec![
        SegEntry {
            conv: ConvId(7),
            seq: 1,
            ptr: p(1, 9),
        },
        SegEntry {
            conv: ConvId(7),
            seq: 3,
            ptr: p(3, 0),
        },
        SegEntry {
            conv: ConvId(u128::MAX),
            seq: 1,
            ptr: p(4, 5),
        },
    ];
    segfile::encode(Lsn(1), Lsn(3), 0x1234, &mut entries)
}

/// Measurements of the index's internals, for `starling-bench index-cost`. Not a stable API.
#[doc(hidden)]
pub mod measure;
