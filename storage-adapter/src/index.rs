//! The per-shard message index: for every conversation, where each seq's entry is in the log,
//! and which seqs may carry a given `client_msg_id`. It is a read model: the log stays the only
//! source of truth and also holds the entries themselves; the index is rebuilt from the log
//! whenever it is missing, damaged or behind.
//!
//! Seqs are dense per conversation, so the index needs no search structure: a conversation is a
//! vector of 20-byte pointers (segment, offset, length, CRC32C of the entry's bytes, a 32-bit tag
//! of its `client_msg_id`) indexed by `seq - first_seq`, and applying an entry is a push. Dedup
//! needs no map either: every full chunk of 4,096 pointers gets a sorted table of its tags, and a
//! lookup walks the conversation's chunks newest first (a retry is nearly always of a recent
//! send). Every candidate is confirmed by reading the entry and comparing its id, so a tag that
//! two ids share costs a read, never a wrong answer. The tags are keyed by a random per-index
//! key that never leaves the server, so a client cannot pick ids that share one. All of it lives in memory (~28 bytes per
//! indexed entry); reads `pread` the entry from its segment and check its CRC, so a wrong pointer
//! is an error, never a wrong message.
//!
//! Dedup was a hash map from a fingerprint of `(conv, client_msg_id)` to the seq. Its keys are
//! random, so every insert missed the cache and the TLB twice; a tag is written beside the
//! pointer it belongs to, sequentially (docs/design/performance-decisions.md, "Dedup by a tag
//! beside each pointer").
//!
//! Persistence is a snapshot file (`<dir>/snapshot`, CRC-checked) written at clean close: open
//! loads it and replays the log from its `applied_lsn` on. With no valid snapshot (first start,
//! crash before any clean close, damage) the whole log is replayed. This replaced a fjall LSM
//! index whose per-key skiplist inserts, flushes and compactions cost about a third of the
//! server's CPU at peak (docs/design/log.md).
//!
//! Entries are applied on the log's I/O thread right after each group commit (see
//! `embedded.rs`); readers on the shard thread take the read lock.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use crate::error::StorageError;
use crate::format::{self, RecordView};
use crate::log::{RecordPos, segment_path};
use crate::types::{ClientMsgId, ConvId, Entry, Lsn, Seq};

/// Most entries one range read returns (callers page with `before`/`after`).
pub const READ_ENTRIES_MAX: usize = 1000;

/// Segment files kept open for reads (beyond it the cache starts over).
const OPEN_SEGMENTS_MAX: usize = 64;

const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_MAGIC: &[u8; 16] = b"starling-index-4";

/// Where one entry is in the log. `len == 0` marks a hole (a seq never written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ptr {
    /// Index into [`State::segs`].
    seg: u32,
    /// Byte offset of the entry in its segment file.
    off: u32,
    /// Bytes of the encoded entry.
    len: u32,
    /// CRC32C of those bytes.
    crc: u32,
    /// The tag of the entry's `client_msg_id` ([`id_tag`]); 0 for none and for holes.
    id: u32,
}

impl Ptr {
    fn is_hole(self) -> bool {
        self.len == 0
    }
}

/// Pointers per chunk of [`Ptrs`]: 80 KiB.
const PTR_CHUNK: usize = 4096;

/// One conversation's pointers in chunks of [`PTR_CHUNK`]. Appending moves at most one chunk:
/// a single `Vec` copies the whole conversation when it doubles, which at a few hundred
/// thousand messages is milliseconds on the log's I/O thread, with the index lock held and no
/// commit completing (docs/design/performance-decisions.md, "A conversation's pointers in
/// chunks"). A conversation of at most one chunk costs no more than a `Vec`.
///
/// Every full chunk also has a tag table: `(tag << 32) | position` of each of its pointers with
/// an id, sorted, so finding a tag in it is a binary search. The last chunk, while it fills, is
/// scanned instead.
#[derive(Debug, Default, PartialEq, Eq)]
struct Ptrs {
    /// Entries `0..PTR_CHUNK` (all of them while the conversation is small).
    head: Vec<Ptr>,
    /// The following chunks; every chunk but the last is full.
    rest: Vec<Vec<Ptr>>,
    /// `tags[k]` is full chunk `k`'s tag table; one per full chunk.
    tags: Vec<Box<[u64]>>,
}

/// The sorted tag table of a full chunk.
fn tag_table(chunk: &[Ptr]) -> Box<[u64]> {
    let mut t: Vec<u64> = chunk
        .iter()
        .enumerate()
        .filter(|(_, p)| p.id != 0 && !p.is_hole())
        .map(|(j, p)| (u64::from(p.id) << 32) | j as u64)
        .collect();
    t.sort_unstable();
    t.into_boxed_slice()
}

impl Ptrs {
    fn len(&self) -> usize {
        match self.rest.last() {
            None => self.head.len(),
            Some(last) => PTR_CHUNK * self.rest.len() + last.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.head.is_empty()
    }

    fn chunk(&self, k: usize) -> Option<&Vec<Ptr>> {
        if k == 0 {
            Some(&self.head)
        } else {
            self.rest.get(k - 1)
        }
    }

    fn get(&self, i: usize) -> Option<Ptr> {
        self.chunk(i / PTR_CHUNK)?.get(i % PTR_CHUNK).copied()
    }

    fn set(&mut self, i: usize, p: Ptr) {
        let (k, j) = (i / PTR_CHUNK, i % PTR_CHUNK);
        let c = if k == 0 {
            &mut self.head
        } else {
            &mut self.rest[k - 1]
        };
        c[j] = p;
        if k < self.tags.len() {
            // Rewriting a full chunk: only with a log the router did not write.
            self.tags[k] = tag_table(c);
        }
    }

    fn push(&mut self, p: Ptr) {
        let c = if self.head.len() < PTR_CHUNK {
            &mut self.head
        } else {
            match self.rest.last() {
                Some(c) if c.len() < PTR_CHUNK => {}
                _ => self.rest.push(Vec::with_capacity(PTR_CHUNK)),
            }
            let last = self.rest.len() - 1;
            &mut self.rest[last]
        };
        c.push(p);
        if c.len() == PTR_CHUNK {
            let t = tag_table(c);
            self.tags.push(t);
        }
    }

    /// Positions (within the conversation) in chunk `k` whose pointer carries `tag`, newest
    /// first.
    fn with_tag(&self, k: usize, tag: u32) -> Vec<usize> {
        let base = k * PTR_CHUNK;
        let mut out: Vec<usize> = match self.tags.get(k) {
            Some(t) => {
                let key = u64::from(tag) << 32;
                let lo = t.partition_point(|&x| x < key);
                t[lo..]
                    .iter()
                    .take_while(|&&x| x >> 32 == u64::from(tag))
                    .map(|&x| base + (x & 0xffff_ffff) as usize)
                    .collect()
            }
            None => self.chunk(k).map_or_else(Vec::new, |c| {
                c.iter()
                    .enumerate()
                    .filter(|(_, p)| p.id == tag && !p.is_hole())
                    .map(|(j, _)| base + j)
                    .collect()
            }),
        };
        out.reverse();
        out
    }

    /// The pointers in order.
    fn iter(&self) -> impl Iterator<Item = Ptr> + '_ {
        self.head.iter().chain(self.rest.iter().flatten()).copied()
    }

    /// The pointers `lo..hi` in order (`hi <= len`).
    fn range(&self, lo: usize, hi: usize) -> impl Iterator<Item = Ptr> + '_ {
        (lo..hi).filter_map(|i| self.get(i))
    }
}

/// One conversation: `ptrs[i]` is the entry with seq `first + i`.
#[derive(Debug, Default)]
struct ConvIx {
    first: u64,
    ptrs: Ptrs,
}

impl ConvIx {
    /// Seq after the last one indexed.
    fn end(&self) -> u64 {
        self.first + self.ptrs.len() as u64
    }

    fn get(&self, seq: u64) -> Option<Ptr> {
        let i = seq.checked_sub(self.first)?;
        self.ptrs.get(usize::try_from(i).ok()?)
    }

    /// Sets the pointer of `seq`, filling any gap with holes (seqs are dense in practice; a gap
    /// or an older seq only comes from a log the router did not write, so rebuilding the
    /// chunks for an older seq is rare).
    fn set(&mut self, seq: u64, p: Ptr) {
        if self.ptrs.is_empty() {
            self.first = seq;
        }
        if seq < self.first {
            let grow = (self.first - seq) as usize;
            let mut ptrs = Ptrs::default();
            for q in std::iter::repeat_n(Ptr::default(), grow).chain(self.ptrs.iter()) {
                ptrs.push(q);
            }
            self.ptrs = ptrs;
            self.first = seq;
        }
        let i = (seq - self.first) as usize;
        let len = self.ptrs.len();
        if i < len {
            self.ptrs.set(i, p);
        } else {
            for _ in len..i {
                self.ptrs.push(Ptr::default());
            }
            self.ptrs.push(p);
        }
    }
}

/// A hasher for keys that are already well mixed (fingerprints, derived conversation ids).
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.0 = mix64(self.0 ^ u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = mix64(self.0 ^ n);
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = mix64(mix64(self.0 ^ n as u64) ^ (n >> 64) as u64);
    }
}

type Mix = BuildHasherDefault<MixHasher>;

/// splitmix64's finalizer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The tag of `id` under the index's `key`: a keyed 32-bit mix, never 0 (0 marks "no id").
fn id_tag(key: u64, id: ClientMsgId) -> u32 {
    if id.is_none() {
        return 0;
    }
    let w = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let h = mix64(mix64(key ^ w(&id.0[..8])) ^ w(&id.0[8..]) ^ key.rotate_left(29));
    ((h >> 32) as u32).max(1)
}

/// A fresh, unpredictable tag key (std seeds `RandomState` from the OS's randomness).
fn random_tag_key() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x7461_6773_u64)
}

/// A hash map split into [`SPLIT_TABLES`] tables by a mix of the key, the tables given
/// unequal shares of the keys so that they grow one after another.
///
/// One table of every key rehashes all of it when it grows, on the log's I/O thread with the
/// index's write lock held, so no commit of the shard completes meanwhile: up to hundreds
/// of milliseconds once it holds millions of keys.
///
/// Split into tables of equal shares, every table reached its growth point within a fraction of
/// a percent of the others (their loads differ by ~√n), so all of them rehashed in one burst
/// (`starling-bench index-cost --what split-growth` measures it; docs/design/performance-decisions.md, "Split maps"). Table
/// `i` gets a share proportional to 2^(i / SPLIT_TABLES), so the tables' loads are spread over a
/// factor of two and their growth points over each doubling of the total: each growth moves
/// about 1/4096 of the entries, and they come one at a time.
#[derive(Debug, Clone)]
struct SplitMap<K, V>(Vec<HashMap<K, V, Mix>>);

/// How many tables a [`SplitMap`] has.
const SPLIT_TABLES: usize = 4096;

/// The table of a key whose mix is `h` (uniform over `u64`): the `i` with
/// `2^(i/T) - 1 <= x < 2^((i+1)/T) - 1` for `x = h / 2^64`, so table `i`'s share of the keys is
/// `2^((i+1)/T) - 2^(i/T)`, from ~ln 2 / T for the first to twice that for the last.
fn split_table(h: u64) -> usize {
    // 53 bits make an exact f64 in [0, 1).
    let x = (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    (((1.0 + x).log2() * SPLIT_TABLES as f64) as usize).min(SPLIT_TABLES - 1)
}

/// Table `i`'s share of the keys (see [`split_table`]).
fn split_share(i: usize) -> f64 {
    let t = SPLIT_TABLES as f64;
    ((i + 1) as f64 / t).exp2() - (i as f64 / t).exp2()
}

impl<K: SplitKey, V: PartialEq> PartialEq for SplitMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<K: SplitKey, V: Eq> Eq for SplitMap<K, V> {}

/// A key's mix, uniform over `u64` and independent of the hash the tables themselves use; it
/// picks the key's table ([`split_table`]).
trait SplitKey: Hash + Eq {
    fn split_hash(&self) -> u64;

    fn table(&self) -> usize {
        split_table(self.split_hash())
    }
}

/// Fingerprints are already mixed.
impl SplitKey for u64 {
    fn split_hash(&self) -> u64 {
        *self
    }
}

/// Conversation ids need not be mixed (1:1 ids are derived from the two user ids).
impl SplitKey for ConvId {
    fn split_hash(&self) -> u64 {
        mix64(mix64(self.0 as u64) ^ (self.0 >> 64) as u64 ^ 0x636f_6e76)
    }
}

impl<K, V> Default for SplitMap<K, V> {
    fn default() -> Self {
        SplitMap((0..SPLIT_TABLES).map(|_| HashMap::default()).collect())
    }
}

impl<K: SplitKey, V> SplitMap<K, V> {
    fn get(&self, k: &K) -> Option<&V> {
        self.0[k.table()].get(k)
    }

    #[cfg(test)]
    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.0[k.table()].get_mut(k)
    }

    /// Sets `k`'s value; returns the value it replaced.
    fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.0[k.table()].insert(k, v)
    }

    fn get_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        self.0[k.table()].entry(k).or_default()
    }

    fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }

    fn reserve(&mut self, n: usize) {
        for (i, t) in self.0.iter_mut().enumerate() {
            t.reserve((n as f64 * split_share(i)) as usize + 1);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().flat_map(|t| t.iter())
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }
}

impl<K: SplitKey, V> std::ops::Index<&K> for SplitMap<K, V> {
    type Output = V;
    fn index(&self, k: &K) -> &V {
        &self.0[k.table()][k]
    }
}

/// Everything the index knows, behind one lock.
#[derive(Debug, Default)]
struct State {
    /// Base lsns of the segments pointers name, ascending.
    segs: Vec<Lsn>,
    convs: SplitMap<ConvId, ConvIx>,
    /// The key of every pointer's id tag ([`id_tag`]); chosen at random when the index starts
    /// empty, kept in the snapshot.
    tag_key: u64,
    entries: u64,
}

impl State {
    /// An empty index with a fresh tag key.
    fn fresh() -> State {
        State {
            tag_key: random_tag_key(),
            ..State::default()
        }
    }

    fn seg_index(&mut self, base: Lsn) -> Result<u32, StorageError> {
        match self.segs.last() {
            Some(&last) if last == base => Ok((self.segs.len() - 1) as u32),
            Some(&last) if last > base => match self.segs.binary_search(&base) {
                Ok(i) => Ok(i as u32),
                Err(_) => Err(StorageError::Decode {
                    table: "index",
                    reason: format!("segment {} applied out of order", base.0),
                }),
            },
            _ => {
                self.segs.push(base);
                u32::try_from(self.segs.len() - 1).map_err(|_| StorageError::Decode {
                    table: "index",
                    reason: "more than 2^32 segments".into(),
                })
            }
        }
    }

    fn insert(&mut self, conv: ConvId, seq: Seq, id: ClientMsgId, mut p: Ptr) {
        p.id = id_tag(self.tag_key, id);
        let c = self.convs.get_or_default(conv);
        let fresh = c.get(seq.0).is_none_or(Ptr::is_hole);
        c.set(seq.0, p);
        if fresh {
            self.entries += 1;
        }
    }

    /// The seqs of `conv` below `below` whose pointers carry `id`'s tag, from the newest chunk
    /// that has any, newest first, and the first seq of that chunk (where to go on if none of
    /// them is `id`). `None` once no seq below `below` is left.
    fn dedup_candidates(
        &self,
        conv: ConvId,
        id: ClientMsgId,
        below: u64,
    ) -> Option<(Vec<u64>, u64)> {
        let tag = id_tag(self.tag_key, id);
        let c = self.convs.get(&conv)?;
        let hi = below.min(c.end());
        if tag == 0 || hi <= c.first {
            return None;
        }
        let mut k = ((hi - 1 - c.first) / PTR_CHUNK as u64) as usize;
        loop {
            let chunk_first = c.first + (k * PTR_CHUNK) as u64;
            let found: Vec<u64> = c
                .ptrs
                .with_tag(k, tag)
                .into_iter()
                .map(|i| c.first + i as u64)
                .filter(|&seq| seq < hi)
                .collect();
            if !found.is_empty() || k == 0 {
                return Some((found, chunk_first));
            }
            k -= 1;
        }
    }

    /// The pointers of `conv` with seqs in `from..to`, oldest first, holes skipped.
    fn range(&self, conv: ConvId, from: u64, to: u64) -> Vec<(Lsn, Ptr)> {
        let Some(c) = self.convs.get(&conv) else {
            return Vec::new();
        };
        let lo = from.max(c.first);
        let hi = to.min(c.end());
        if lo >= hi {
            return Vec::new();
        }
        let (lo, hi) = ((lo - c.first) as usize, (hi - c.first) as usize);
        c.ptrs
            .range(lo, hi)
            .filter(|p| !p.is_hole())
            .map(|p| (self.segs[p.seg as usize], p))
            .collect()
    }
}

/// How far the index has applied the log, shared with readers that need read-your-writes.
#[derive(Debug, Default)]
struct Applied {
    lsn: Mutex<(Lsn, Option<String>)>,
    cond: Condvar,
}

/// The in-memory, snapshot-persisted message index of one shard.
pub struct DenseIndex {
    dir: PathBuf,
    /// The log whose entries the pointers name.
    log_dir: PathBuf,
    files: Mutex<HashMap<Lsn, Arc<File>>>,
    state: RwLock<State>,
    applied: Applied,
    rebuilt: bool,
}

impl fmt::Debug for DenseIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenseIndex")
            .field("dir", &self.dir)
            .field("applied", &self.applied)
            .field("rebuilt", &self.rebuilt)
            .finish_non_exhaustive()
    }
}

impl DenseIndex {
    /// Opens the index kept in `dir`, loading its snapshot. With no valid snapshot it starts
    /// empty and `rebuilt()` says so: the caller replays the whole log.
    pub fn open(dir: &Path, log_dir: &Path) -> Result<DenseIndex, StorageError> {
        let fs_err = |op| {
            move |source| StorageError::Fs {
                op,
                path: dir.to_path_buf(),
                source,
            }
        };
        let loaded = load_snapshot(&dir.join(SNAPSHOT_FILE));
        if loaded.is_none() && dir.exists() {
            // Whatever is there (a damaged snapshot, an older index format) is not ours to keep.
            fs::remove_dir_all(dir).map_err(fs_err("remove unusable index"))?;
        }
        fs::create_dir_all(dir).map_err(fs_err("create index dir"))?;
        let (state, applied, rebuilt) = match loaded {
            Some((state, applied)) => (state, applied, false),
            None => (State::fresh(), Lsn::ZERO, true),
        };
        Ok(DenseIndex {
            dir: dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            state: RwLock::new(state),
            applied: Applied {
                lsn: Mutex::new((applied, None)),
                cond: Condvar::new(),
            },
            rebuilt,
        })
    }

    /// Whether this index started empty at open (no snapshot, or a damaged one).
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every entry (used when the index is ahead of the log it must mirror).
    pub(crate) fn clear(&self) -> Result<(), StorageError> {
        *self.write() = State::fresh();
        let snap = self.dir.join(SNAPSHOT_FILE);
        match fs::remove_file(&snap) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StorageError::Fs {
                    op: "remove index snapshot",
                    path: snap,
                    source,
                });
            }
        }
        self.set_applied(Lsn::ZERO);
        Ok(())
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
        let mut last = applied;
        for (r, pos) in records {
            if r.last_lsn() <= applied {
                continue;
            }
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
        {
            let mut st = self.write();
            for (segment, conv, seq, id, mut p) in parsed {
                p.seg = st.seg_index(segment)?;
                st.insert(conv, seq, id, p);
            }
        }
        self.set_applied(last);
        Ok(())
    }

    /// Retention (`log/retention.rs`): drops every pointer into a segment that starts before
    /// `base` (all of them applied: the caller removes only such segments), so each
    /// conversation loses a prefix of its seqs; one whose every pointer goes keeps its last seq
    /// as a hole, so that its next entry still gets the next seq. Then writes the snapshot, so
    /// that an open after a crash starts from this state and never from pointers into files
    /// about to be deleted.
    pub(crate) fn forget_segments_before(&self, base: Lsn) -> Result<(), StorageError> {
        {
            let mut st = self.write();
            // Pointers name segments by their place in `segs`, which stays as it is (the bases of
            // removed segments included), so the pointers kept need no renumbering.
            let cut = st.segs.partition_point(|s| *s < base) as u32;
            let mut dropped = 0u64;
            for t in &mut st.convs.0 {
                for c in t.values_mut() {
                    let (n, entries) = c
                        .ptrs
                        .iter()
                        .take_while(|p| p.is_hole() || p.seg < cut)
                        .fold((0usize, 0u64), |(n, e), p| {
                            (n + 1, e + u64::from(!p.is_hole()))
                        });
                    if entries == 0 {
                        continue;
                    }
                    dropped += entries;
                    let keep = n.min(c.ptrs.len() - 1);
                    let mut ptrs = Ptrs::default();
                    for (i, p) in c.ptrs.iter().enumerate().skip(keep) {
                        ptrs.push(if i < n { Ptr::default() } else { p });
                    }
                    c.first += keep as u64;
                    c.ptrs = ptrs;
                }
            }
            st.entries -= dropped;
        }
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|b, _| *b >= base);
        self.save_snapshot()
    }

    /// Writes the snapshot (temporary file, fsync, rename, fsync of the directory). Called at
    /// clean close, when nothing applies concurrently.
    pub(crate) fn save_snapshot(&self) -> Result<(), StorageError> {
        let applied = self.applied_lsn();
        let buf = encode_snapshot(&self.read(), applied);
        let path = self.dir.join(SNAPSHOT_FILE);
        let tmp = self.dir.join("snapshot.tmp");
        let fs_err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StorageError::Fs { op, path, source }
        };
        let mut f = File::create(&tmp).map_err(fs_err("create index snapshot", &tmp))?;
        f.write_all(&buf)
            .map_err(fs_err("write index snapshot", &tmp))?;
        f.sync_all().map_err(fs_err("sync index snapshot", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(fs_err("rename index snapshot", &path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(fs_err("sync index dir", &self.dir))?;
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

    /// Reads the entries the pointers name from their segments, checking each CRC.
    fn load(&self, ptrs: &[(Lsn, Ptr)]) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::with_capacity(ptrs.len());
        let mut buf = Vec::new();
        let mut file: Option<(Lsn, Arc<File>)> = None;
        for &(segment, p) in ptrs {
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
            out.push(decode_value(&buf)?);
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

// Snapshot: magic ‖ applied_lsn ‖ tag_key ‖ segs ‖ convs ‖ crc32c(all before), all integers
// little-endian, every list prefixed by its u64 length. The tag tables are rebuilt at load.
fn encode_snapshot(st: &State, applied: Lsn) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + st.entries as usize * 20);
    b.extend_from_slice(SNAPSHOT_MAGIC);
    b.extend_from_slice(&applied.0.to_le_bytes());
    b.extend_from_slice(&st.tag_key.to_le_bytes());
    b.extend_from_slice(&(st.segs.len() as u64).to_le_bytes());
    for s in &st.segs {
        b.extend_from_slice(&s.0.to_le_bytes());
    }
    b.extend_from_slice(&(st.convs.len() as u64).to_le_bytes());
    for (conv, c) in st.convs.iter() {
        b.extend_from_slice(&conv.0.to_le_bytes());
        b.extend_from_slice(&c.first.to_le_bytes());
        b.extend_from_slice(&(c.ptrs.len() as u64).to_le_bytes());
        for p in c.ptrs.iter() {
            for v in [p.seg, p.off, p.len, p.crc, p.id] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A cursor over snapshot bytes; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (h, t) = self.0.split_at_checked(N)?;
        self.0 = t;
        h.try_into().ok()
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn u128(&mut self) -> Option<u128> {
        self.take().map(u128::from_le_bytes)
    }
    /// A list length, refused if the rest could not hold that many items of `item` bytes.
    fn len(&mut self, item: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n.checked_mul(item)? <= self.0.len()).then_some(n)
    }
}

/// The snapshot's state and applied lsn, or `None` if it is missing or not valid.
fn load_snapshot(path: &Path) -> Option<(State, Lsn)> {
    decode_snapshot(&fs::read(path).ok()?)
}

/// Decodes snapshot bytes; `None` unless every byte is accounted for and consistent.
fn decode_snapshot(bytes: &[u8]) -> Option<(State, Lsn)> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let mut r = Reader(body);
    if &r.take::<16>()? != SNAPSHOT_MAGIC {
        return None;
    }
    let applied = Lsn(r.u64()?);
    let mut st = State {
        tag_key: r.u64()?,
        ..State::default()
    };
    for _ in 0..r.len(8)? {
        st.segs.push(Lsn(r.u64()?));
    }
    let convs = r.len(32)?;
    st.convs.reserve(convs);
    for _ in 0..convs {
        let conv = ConvId(r.u128()?);
        let first = r.u64()?;
        let n = r.len(20)?;
        // Seqs first..first+n must exist (a damaged count would overflow `ConvIx::end`).
        first.checked_add(n as u64)?;
        let mut ptrs = Ptrs::default();
        for _ in 0..n {
            let p = Ptr {
                seg: r.u32()?,
                off: r.u32()?,
                len: r.u32()?,
                crc: r.u32()?,
                id: r.u32()?,
            };
            if !p.is_hole() {
                if p.seg as usize >= st.segs.len() {
                    return None;
                }
                st.entries += 1;
            }
            ptrs.push(p);
        }
        // A key written twice is damage, not data: keeping either copy would drop the other.
        if st.convs.insert(conv, ConvIx { first, ptrs }).is_some() {
            return None;
        }
    }
    r.0.is_empty().then_some((st, applied))
}

/// For `crate::fuzzing::index_snapshot`: decodes `data` (an odd first byte seals the rest with
/// the magic and a valid checksum first), then does with every loaded conversation what open
/// and the first appends do, and checks a re-encoding decodes again.
pub(crate) fn fuzz_snapshot(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 {
        b = SNAPSHOT_MAGIC.to_vec();
        b.extend_from_slice(rest);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
    }
    let Some((mut st, applied)) = decode_snapshot(&b) else {
        return;
    };
    let again = encode_snapshot(&st, applied);
    let (st2, applied2) = decode_snapshot(&again).expect("a re-encoded snapshot decodes");
    assert_eq!(applied2, applied);
    assert_eq!(st2.segs, st.segs);
    assert_eq!(st2.entries, st.entries);
    assert_eq!(st2.convs.len(), st.convs.len());
    let convs: Vec<ConvId> = st.convs.keys().copied().collect();
    for conv in convs {
        let (first, end) = {
            let c = &st.convs[&conv];
            (c.first, c.end())
        };
        let _ = st.range(conv, first, end);
        let _ = st.range(conv, 0, u64::MAX);
        if !st.segs.is_empty() && end < u64::MAX {
            let p = Ptr {
                seg: 0,
                off: 0,
                len: 1,
                crc: 0,
                id: 0,
            };
            st.insert(conv, Seq(end), ClientMsgId([1; 16]), p);
            let _ = st.dedup_candidates(conv, ClientMsgId([1; 16]), u64::MAX);
        }
    }
}

/// A small valid snapshot (two conversations, a hole, an entry without an id), sealed for
/// `crate::fuzzing::index_snapshot` with mode byte 0.
#[cfg(test)]
pub(crate) fn sample_snapshot() -> Vec<u8> {
    let mut st = State {
        segs: vec![Lsn(1), Lsn(500)],
        ..State::default()
    };
    let p = |n| Ptr {
        seg: 1,
        off: n,
        len: 1,
        crc: n,
        id: 0,
    };
    st.insert(ConvId(7), Seq(1), ClientMsgId([7; 16]), p(1));
    st.insert(ConvId(7), Seq(3), ClientMsgId([8; 16]), p(3));
    st.insert(ConvId(9), Seq(1), ClientMsgId::NONE, p(4));
    let mut out = vec![0u8];
    out.extend_from_slice(&encode_snapshot(&st, Lsn(42)));
    out
}

impl crate::traits::MessageIndex for DenseIndex {
    fn latest(&self, conv: ConvId, limit: usize) -> Result<Vec<Entry>, StorageError> {
        self.before(conv, Seq(u64::MAX), limit)
    }

    fn before(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let limit = limit.min(READ_ENTRIES_MAX);
        let ptrs = {
            let st = self.read();
            let Some(c) = st.convs.get(&conv) else {
                return Ok(Vec::new());
            };
            // Walk back from seq - 1 until `limit` non-holes are found.
            let hi = seq.0.min(c.end());
            let mut lo = hi;
            let mut found = 0;
            while lo > c.first && found < limit {
                lo -= 1;
                if c.get(lo).is_some_and(|p| !p.is_hole()) {
                    found += 1;
                }
            }
            st.range(conv, lo, hi)
        };
        self.load(&ptrs)
    }

    fn after(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let limit = limit.min(READ_ENTRIES_MAX);
        let Some(from) = seq.0.checked_add(1) else {
            return Ok(Vec::new());
        };
        let ptrs = {
            let st = self.read();
            let Some(c) = st.convs.get(&conv) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::with_capacity(limit.min(c.ptrs.len()));
            let mut s = from.max(c.first);
            while s < c.end() && out.len() < limit {
                if let Some(p) = c.get(s).filter(|p| !p.is_hole()) {
                    out.push((st.segs[p.seg as usize], p));
                }
                s += 1;
            }
            out
        };
        self.load(&ptrs)
    }

    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, StorageError> {
        let ptrs = self.read().range(conv, seq.0, seq.0.saturating_add(1));
        Ok(self.load(&ptrs)?.pop())
    }

    fn last_seq(&self, conv: ConvId) -> Result<Seq, StorageError> {
        Ok(match self.read().convs.get(&conv) {
            Some(c) if !c.ptrs.is_empty() => Seq(c.end() - 1),
            _ => Seq::NONE,
        })
    }

    fn dedup(&self, conv: ConvId, id: ClientMsgId) -> Result<Option<Seq>, StorageError> {
        let mut below = u64::MAX;
        loop {
            // Candidates one chunk at a time, newest first, each confirmed outside the lock: a
            // tag another id shares costs a read, and a retry of a recent send stops early.
            let Some((candidates, next)) = self.read().dedup_candidates(conv, id, below) else {
                return Ok(None);
            };
            for seq in candidates {
                if let Some(e) = self.entry(conv, Seq(seq))?
                    && e.client_msg_id == id
                {
                    return Ok(Some(e.seq));
                }
            }
            below = next;
        }
    }

    fn indexed_lsn(&self) -> Lsn {
        self.applied_lsn()
    }
}

/// Measurements of the index's internals, for `starling-bench index-cost`. Not a stable API.
#[doc(hidden)]
pub mod measure;

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u32) -> Ptr {
        Ptr {
            seg: 0,
            off: n,
            len: 1,
            crc: n,
            id: 0,
        }
    }

    #[test]
    fn conversation_vectors_take_any_seq_order_and_mark_gaps_as_holes() {
        let mut c = ConvIx::default();
        c.set(5, p(5));
        c.set(6, p(6));
        c.set(9, p(9));
        c.set(3, p(3));
        assert_eq!(c.first, 3);
        assert_eq!(c.end(), 10);
        assert_eq!(c.get(3), Some(p(3)));
        assert!(c.get(4).unwrap().is_hole());
        assert!(c.get(7).unwrap().is_hole());
        assert_eq!(c.get(9), Some(p(9)));
        assert_eq!(c.get(10), None);
        assert_eq!(c.get(2), None);
        c.set(6, p(60));
        assert_eq!(c.get(6), Some(p(60)));
    }

    #[test]
    fn conversation_vectors_span_chunks() {
        let n = 2 * PTR_CHUNK as u64 + 7;
        let mut c = ConvIx::default();
        for seq in 10..10 + n {
            c.set(seq, p(seq as u32));
        }
        assert_eq!(c.end(), 10 + n);
        assert_eq!(c.ptrs.len(), n as usize);
        assert_eq!(c.ptrs.rest.len(), 2);
        assert!(c.ptrs.rest.iter().all(|k| k.capacity() == PTR_CHUNK));
        for seq in [10, 10 + PTR_CHUNK as u64 - 1, 10 + PTR_CHUNK as u64, 9 + n] {
            assert_eq!(c.get(seq), Some(p(seq as u32)));
        }
        assert_eq!(c.get(10 + n), None);
        let lo = PTR_CHUNK - 2;
        let got: Vec<Ptr> = c.ptrs.range(lo, lo + 4).collect();
        let want: Vec<Ptr> = (lo..lo + 4).map(|i| p(10 + i as u32)).collect();
        assert_eq!(got, want);
        assert!(c.ptrs.iter().eq((10..10 + n).map(|s| p(s as u32))));
        // A gap across a chunk boundary fills with holes; an older seq rebuilds in order.
        c.set(10 + n + PTR_CHUNK as u64, p(1));
        assert!(c.get(10 + n).unwrap().is_hole());
        assert_eq!(c.get(10 + n + PTR_CHUNK as u64), Some(p(1)));
        c.set(3, p(3));
        assert_eq!((c.first, c.get(3), c.get(10)), (3, Some(p(3)), Some(p(10))));
        assert!(c.get(4).unwrap().is_hole());
        assert_eq!(c.end(), 11 + n + PTR_CHUNK as u64);
        assert_eq!(c.get(9 + n), Some(p((9 + n) as u32)));
        // Snapshots carry chunked conversations whole.
        let mut st = State {
            segs: vec![Lsn(1)],
            ..State::default()
        };
        st.convs.insert(ConvId(7), c);
        let got = decode_snapshot(&encode_snapshot(&st, Lsn(1))).expect("decodes");
        assert_eq!(got.0.convs[&ConvId(7)].ptrs, st.convs[&ConvId(7)].ptrs);
    }

    #[test]
    fn split_maps_spread_unmixed_conversation_ids_over_their_tables() {
        // Ids with structure only in their high or low half (derived 1:1 ids look like this).
        for ids in [
            (0..4096u128).collect::<Vec<_>>(),
            (0..4096u128).map(|i| i << 64).collect(),
            (0..4096u128).map(|i| (i << 64) | (i + 1)).collect(),
        ] {
            let mut m: SplitMap<ConvId, u64> = SplitMap::default();
            for (n, id) in ids.iter().enumerate() {
                m.insert(ConvId(*id), n as u64);
            }
            assert_eq!(m.len(), 4096);
            assert!(m.0.iter().all(|t| t.len() < 48), "one table holds too many");
            assert!(
                ids.iter()
                    .enumerate()
                    .all(|(n, id)| m[&ConvId(*id)] == n as u64)
            );
        }
    }

    /// The tables' shares of the keys are staggered: they add up to one, the last table's is
    /// twice the first's, and random keys land in the tables in those proportions (so the tables'
    /// loads, and with them their growth points, are spread over a factor of two; with equal
    /// shares every table of a large map grew within the same ~0.5% of inserts, and
    /// `measure::split_map_growth` measures what that cost).
    #[test]
    fn split_tables_get_staggered_shares() {
        let total: f64 = (0..SPLIT_TABLES).map(split_share).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        let ratio = split_share(SPLIT_TABLES - 1) / split_share(0);
        assert!((ratio - 2.0).abs() < 0.01, "{ratio}");
        assert_eq!(split_table(0), 0);
        assert_eq!(split_table(u64::MAX), SPLIT_TABLES - 1);

        let mut m: SplitMap<u64, u64> = SplitMap::default();
        let n = 400_000u64;
        for k in 0..n {
            m.insert(mix64(k), k);
        }
        assert_eq!(m.len(), n as usize);
        let eighth = SPLIT_TABLES / 8;
        let count =
            |r: std::ops::Range<usize>| -> f64 { r.map(|i| m.0[i].len()).sum::<usize>() as f64 };
        let share = |r: std::ops::Range<usize>| -> f64 { r.map(split_share).sum() };
        let (lo, hi) = (0..eighth, SPLIT_TABLES - eighth..SPLIT_TABLES);
        let want = share(hi.clone()) / share(lo.clone());
        let got = count(hi) / count(lo);
        assert!((got / want - 1.0).abs() < 0.03, "got {got}, want {want}");
        assert!(want > 1.7, "{want}");
    }

    fn id(n: u64) -> ClientMsgId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&n.to_le_bytes());
        b[8..].copy_from_slice(&(!n).to_le_bytes());
        ClientMsgId(b)
    }

    /// Every id is found in its seq's chunk, full chunks by their tag tables and the last by a
    /// scan, and `below` walks on to older chunks.
    #[test]
    fn id_tags_find_every_entry_across_chunks_newest_chunk_first() {
        let mut st = State::fresh();
        let conv = ConvId(3);
        let n = 3 * PTR_CHUNK as u64 + 10;
        for seq in 1..=n {
            st.insert(conv, Seq(seq), id(seq), p(seq as u32));
        }
        st.insert(conv, Seq(n + 1), ClientMsgId::NONE, p(0));
        let c = &st.convs[&conv];
        assert_eq!(c.ptrs.tags.len(), 3, "one tag table per full chunk");
        assert!(c.ptrs.tags.iter().all(|t| t.len() == PTR_CHUNK));
        for seq in (1..=n)
            .step_by(97)
            .chain([1, PTR_CHUNK as u64, PTR_CHUNK as u64 + 1, n])
        {
            let (found, chunk_first) = st.dedup_candidates(conv, id(seq), u64::MAX).unwrap();
            assert!(found.contains(&seq), "seq {seq}: {found:?}");
            assert_eq!(
                chunk_first,
                1 + (seq - 1) / PTR_CHUNK as u64 * PTR_CHUNK as u64
            );
        }
        // An id nobody sent: one call walks every chunk (none has the tag), then none is left.
        assert_eq!(
            st.dedup_candidates(conv, id(n + 100), u64::MAX),
            Some((Vec::new(), 1))
        );
        assert_eq!(st.dedup_candidates(conv, id(n + 100), 1), None);
        // Below a chunk's first seq, the walk starts at the chunk before it.
        let (found, first) = st
            .dedup_candidates(conv, id(5), 1 + PTR_CHUNK as u64)
            .unwrap();
        assert_eq!((found, first), (vec![5], 1));
        assert_eq!(
            st.dedup_candidates(conv, id(PTR_CHUNK as u64 + 5), 1 + PTR_CHUNK as u64),
            Some((Vec::new(), 1))
        );
        assert_eq!(st.dedup_candidates(conv, ClientMsgId::NONE, u64::MAX), None);
        assert_eq!(st.dedup_candidates(ConvId(4), id(1), u64::MAX), None);
    }

    /// Ids whose tags are equal are all candidates, newest first, in a full chunk and in the
    /// filling one; rewriting a pointer in a full chunk rebuilds that chunk's table.
    #[test]
    fn ids_that_share_a_tag_are_all_candidates_newest_first() {
        let mut c = ConvIx::default();
        let tagged = |n: u32, tag: u32| Ptr { id: tag, ..p(n) };
        for seq in 1..=PTR_CHUNK as u64 + 3 {
            let tag = if seq % 1000 == 7 {
                42
            } else {
                1000 + seq as u32
            };
            c.set(seq, tagged(seq as u32, tag));
        }
        c.set(PTR_CHUNK as u64 + 2, tagged(9, 42));
        let st = State {
            convs: {
                let mut m = SplitMap::default();
                m.insert(ConvId(1), c);
                m
            },
            ..State::default()
        };
        // Find tag 42 directly: the chunks hold seqs 1..=4096 and 4097..=4099.
        let c = &st.convs[&ConvId(1)];
        assert_eq!(c.ptrs.with_tag(1, 42), vec![PTR_CHUNK + 1]);
        assert_eq!(c.ptrs.with_tag(0, 42), vec![4006, 3006, 2006, 1006, 6]);
        assert!(c.ptrs.with_tag(0, 43).is_empty());
        let mut c = ConvIx {
            first: c.first,
            ptrs: Ptrs::default(),
        };
        for q in st.convs[&ConvId(1)].ptrs.iter() {
            c.ptrs.push(q);
        }
        c.set(2, tagged(2, 42));
        assert_eq!(c.ptrs.with_tag(0, 42), vec![4006, 3006, 2006, 1006, 6, 1]);
        c.set(7, p(7));
        assert_eq!(c.ptrs.with_tag(0, 42), vec![4006, 3006, 2006, 1006, 1]);
    }

    #[test]
    fn a_snapshot_is_refused_if_a_conversation_would_run_past_the_last_seq() {
        // A checksummed but impossible snapshot: seqs first..first+len do not fit in u64.
        let mut st = State {
            segs: vec![Lsn(1)],
            ..State::default()
        };
        st.convs.insert(
            ConvId(1),
            ConvIx {
                first: u64::MAX,
                ptrs: Ptrs {
                    head: vec![p(1)],
                    rest: Vec::new(),
                    tags: Vec::new(),
                },
            },
        );
        assert!(decode_snapshot(&encode_snapshot(&st, Lsn(1))).is_none());
        st.convs.get_mut(&ConvId(1)).unwrap().first = u64::MAX - 1;
        assert!(decode_snapshot(&encode_snapshot(&st, Lsn(1))).is_some());
    }

    #[test]
    fn a_snapshot_naming_a_conversation_twice_is_refused() {
        // Found by the index_snapshot fuzz target: the second copy replaced the first, and the
        // entry count still counted both.
        let mut st = State {
            segs: vec![Lsn(1)],
            ..State::default()
        };
        st.insert(ConvId(5), Seq(1), ClientMsgId([1; 16]), p(1));
        let one = encode_snapshot(&st, Lsn(9));
        assert!(decode_snapshot(&one).is_some());
        // Splice the conversation in twice: convs count 1 → 2, its bytes repeated.
        let body = &one[..one.len() - 4];
        let convs_at = 16 + 8 + 8 + 8 + 8; // magic, applied, tag key, segs len, one seg
        let conv_bytes = 16 + 8 + 8 + 20; // id, first, ptrs len, one ptr
        let mut two = body[..convs_at].to_vec();
        two.extend_from_slice(&2u64.to_le_bytes());
        two.extend_from_slice(&body[convs_at + 8..convs_at + 8 + conv_bytes]);
        two.extend_from_slice(&body[convs_at + 8..]);
        let crc = crc32c::crc32c(&two);
        two.extend_from_slice(&crc.to_le_bytes());
        assert!(decode_snapshot(&two).is_none());
    }

    #[test]
    fn snapshots_round_trip_and_refuse_any_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut st = State {
            segs: vec![Lsn(1), Lsn(500)],
            ..State::default()
        };
        st.insert(ConvId(7), Seq(1), ClientMsgId([7; 16]), p(1));
        st.insert(ConvId(7), Seq(3), ClientMsgId([8; 16]), p(3));
        st.insert(ConvId(u128::MAX), Seq(1), ClientMsgId::NONE, p(4));
        st.tag_key = 0x1234_5678_9abc_def0;
        let bytes = encode_snapshot(&st, Lsn(42));
        fs::write(&path, &bytes).unwrap();
        let (got, applied) = load_snapshot(&path).unwrap();
        assert_eq!(applied, Lsn(42));
        assert_eq!(got.segs, st.segs);
        assert_eq!(got.entries, 3);
        assert_eq!(got.convs[&ConvId(7)].ptrs, st.convs[&ConvId(7)].ptrs);
        assert_eq!(got.tag_key, st.tag_key);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            fs::write(&path, &bad).unwrap();
            assert!(load_snapshot(&path).is_none(), "flipped byte {i} accepted");
        }
        for n in [0, 3, 4, 20, bytes.len() - 1] {
            fs::write(&path, &bytes[..n]).unwrap();
            assert!(load_snapshot(&path).is_none(), "truncated to {n} accepted");
        }
    }
}
