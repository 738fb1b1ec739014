//! The resident part of the index: conversations' pointer vectors, their id tags, and the split
//! map that holds them (see the module above for why each is shaped as it is).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::AtomicBool;

use crate::types::{ClientMsgId, ConvId};

/// Where one entry is in the log. `len == 0` marks a hole (a seq never written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Ptr {
    /// Index into [`State::segs`].
    pub(super) seg: u32,
    /// Byte offset of the entry in its segment file.
    pub(super) off: u32,
    /// Bytes of the encoded entry.
    pub(super) len: u32,
    /// CRC32C of those bytes.
    pub(super) crc: u32,
    /// The tag of the entry's `client_msg_id` ([`id_tag`]); 0 for none and for holes.
    pub(super) id: u32,
}

impl Ptr {
    pub(super) fn is_hole(self) -> bool {
        self.len == 0
    }
}

/// Pointers per chunk of [`Ptrs`]: 80 KiB.
pub(super) const PTR_CHUNK: usize = 4096;

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
pub(super) struct Ptrs {
    /// Entries `0..PTR_CHUNK` (all of them while the conversation is small).
    head: Vec<Ptr>,
    /// The following chunks; every chunk but the last is full.
    rest: Vec<Vec<Ptr>>,
    /// `tags[k]` is full chunk `k`'s tag table; one per full chunk.
    pub(super) tags: Vec<Box<[u64]>>,
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
    pub(super) fn len(&self) -> usize {
        match self.rest.last() {
            None => self.head.len(),
            Some(last) => PTR_CHUNK * self.rest.len() + last.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.head.is_empty()
    }

    fn chunk(&self, k: usize) -> Option<&Vec<Ptr>> {
        if k == 0 {
            Some(&self.head)
        } else {
            self.rest.get(k - 1)
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<Ptr> {
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

    pub(super) fn push(&mut self, p: Ptr) {
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
    pub(super) fn with_tag(&self, k: usize, tag: u32) -> Vec<usize> {
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
    pub(super) fn iter(&self) -> impl Iterator<Item = Ptr> + '_ {
        self.head.iter().chain(self.rest.iter().flatten()).copied()
    }

    /// The pointers `lo..hi` in order (`hi <= len`).
    pub(super) fn range(&self, lo: usize, hi: usize) -> impl Iterator<Item = Ptr> + '_ {
        (lo..hi).filter_map(|i| self.get(i))
    }
}

/// One resident conversation: `ptrs[i]` is the entry with seq `first + i`. It holds every entry
/// of the conversation with a seq at or above `first`; older ones, if any, are in checkpointed
/// segments up to `older_in` and are paged in on demand.
#[derive(Debug, Default)]
pub(super) struct ConvIx {
    pub(super) first: u64,
    pub(super) ptrs: Ptrs,
    /// The newest segment that may hold entries older than `first`; `None` once there are none
    /// (resident from the conversation's first kept entry).
    pub(super) older_in: Option<u32>,
    /// Read or written since the eviction sweep last passed (the clock bit).
    pub(super) referenced: AtomicBool,
    /// How many times a sweep trimmed it (a page-in that overlapped one starts over).
    pub(super) trims: u32,
}

impl ConvIx {
    /// Seq after the last one indexed.
    pub(super) fn end(&self) -> u64 {
        self.first + self.ptrs.len() as u64
    }

    pub(super) fn get(&self, seq: u64) -> Option<Ptr> {
        let i = seq.checked_sub(self.first)?;
        self.ptrs.get(usize::try_from(i).ok()?)
    }

    /// Sets the pointer of `seq`, filling any gap with holes (seqs are dense in practice; a gap
    /// or an older seq only comes from a log the router did not write, so rebuilding the
    /// chunks for an older seq is rare).
    pub(super) fn set(&mut self, seq: u64, p: Ptr) {
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
pub(super) struct MixHasher(u64);

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

pub(super) type Mix = BuildHasherDefault<MixHasher>;

/// splitmix64's finalizer.
pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The tag of `id` under the index's `key`: a keyed 32-bit mix, never 0 (0 marks "no id").
pub(super) fn id_tag(key: u64, id: ClientMsgId) -> u32 {
    if id.is_none() {
        return 0;
    }
    let w = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let h = mix64(mix64(key ^ w(&id.0[..8])) ^ w(&id.0[8..]) ^ key.rotate_left(29));
    ((h >> 32) as u32).max(1)
}

/// A fresh, unpredictable tag key (std seeds `RandomState` from the OS's randomness).
pub(super) fn random_tag_key() -> u64 {
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
pub(super) struct SplitMap<K, V>(Vec<HashMap<K, V, Mix>>);

/// How many tables a [`SplitMap`] has.
pub(super) const SPLIT_TABLES: usize = 4096;

/// The table of a key whose mix is `h` (uniform over `u64`): the `i` with
/// `2^(i/T) - 1 <= x < 2^((i+1)/T) - 1` for `x = h / 2^64`, so table `i`'s share of the keys is
/// `2^((i+1)/T) - 2^(i/T)`, from ~ln 2 / T for the first to twice that for the last.
fn split_table(h: u64) -> usize {
    // 53 bits make an exact f64 in [0, 1).
    let x = (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    (((1.0 + x).log2() * SPLIT_TABLES as f64) as usize).min(SPLIT_TABLES - 1)
}

/// Table `i`'s share of the keys (see [`split_table`]).
#[cfg(test)]
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
pub(super) trait SplitKey: Hash + Eq {
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
    pub(super) fn get(&self, k: &K) -> Option<&V> {
        self.0[k.table()].get(k)
    }

    /// Table `i` (for sweeps that visit the map a table at a time).
    pub(super) fn table_mut(&mut self, i: usize) -> &mut HashMap<K, V, Mix> {
        &mut self.0[i]
    }

    /// Sets `k`'s value; returns the value it replaced.
    pub(super) fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.0[k.table()].insert(k, v)
    }

    pub(super) fn get_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        self.0[k.table()].entry(k).or_default()
    }

    pub(super) fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }
}

impl<K: SplitKey, V> std::ops::Index<&K> for SplitMap<K, V> {
    type Output = V;
    fn index(&self, k: &K) -> &V {
        &self.0[k.table()][k]
    }
}

/// Bytes a resident conversation costs beyond its pointer storage: its slot in the map (key,
/// value, control byte, at the map's 7/8 load).
pub(super) const CONV_OVERHEAD_BYTES: usize = (16 + std::mem::size_of::<ConvIx>() + 1) * 8 / 7 + 1;

impl Ptrs {
    /// Heap bytes of the pointer storage, from capacities (so growth slack counts): the head
    /// vector, the full-size chunks, the tag tables. O(1).
    pub(super) fn heap_bytes(&self) -> usize {
        let ptr = std::mem::size_of::<Ptr>();
        self.head.capacity() * ptr
            + self.rest.len() * PTR_CHUNK * ptr
            + self.rest.capacity() * std::mem::size_of::<Vec<Ptr>>()
            + self.tags.len() * PTR_CHUNK * 8
            + self.tags.capacity() * std::mem::size_of::<Box<[u64]>>()
    }
}

impl ConvIx {
    /// What this conversation costs in memory.
    pub(super) fn cost(&self) -> usize {
        CONV_OVERHEAD_BYTES + self.ptrs.heap_bytes()
    }

    /// Puts `older` (pointers of seqs `from..`, ascending, `seg` set) before the resident ones:
    /// only those below `first` are taken (the rest are resident already), a gap up to `first`
    /// becomes holes. Returns how many slots were added.
    pub(super) fn prepend(&mut self, from: u64, older: &[Ptr]) -> usize {
        if self.ptrs.is_empty() {
            for (i, &p) in older.iter().enumerate() {
                self.set(from + i as u64, p);
            }
            return self.ptrs.len();
        }
        let take = (self.first.saturating_sub(from) as usize).min(older.len());
        if take == 0 {
            return 0;
        }
        let before = self.ptrs.len();
        let mut ptrs = Ptrs::default();
        for &p in &older[..take] {
            ptrs.push(p);
        }
        for _ in (from + take as u64)..self.first {
            ptrs.push(Ptr::default());
        }
        for p in self.ptrs.iter() {
            ptrs.push(p);
        }
        self.ptrs = ptrs;
        self.first = from;
        self.ptrs.len() - before
    }

    /// Drops the oldest pointers that name checkpointed segments (`seg < live_from`), keeping
    /// at least the newest `keep` slots, so that the first kept slot is an entry. Returns the
    /// slots dropped; the caller removes the conversation if none are left.
    pub(super) fn trim(&mut self, live_from: u32, keep: usize) -> usize {
        let len = self.ptrs.len();
        let mut evictable = 0;
        for p in self.ptrs.iter() {
            if !p.is_hole() && p.seg >= live_from {
                break;
            }
            evictable += 1;
        }
        let mut cut = evictable.min(len.saturating_sub(keep));
        if cut < len {
            // The new first slot must be an entry: back up over holes.
            while cut > 0 && self.ptrs.get(cut).is_some_and(Ptr::is_hole) {
                cut -= 1;
            }
        }
        if cut == 0 {
            return 0;
        }
        self.trims = self.trims.wrapping_add(1);
        if cut == len {
            self.ptrs = Ptrs::default();
            self.older_in = None;
            return len;
        }
        // The newest segment that may still hold older entries is the first kept entry's.
        self.older_in = self.ptrs.get(cut).map(|p| p.seg);
        let mut ptrs = Ptrs::default();
        for p in self.ptrs.range(cut, len) {
            ptrs.push(p);
        }
        self.ptrs = ptrs;
        self.first += cut as u64;
        cut
    }
}

#[cfg(test)]
mod tests;
