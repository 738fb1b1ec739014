//! A sealed segment's index file, `<index dir>/<base lsn>.ix`: for every conversation with
//! entries in the segment, its seq range there and the pointers of those entries, sorted by
//! conversation. Written once, after the segment was sealed and all of it applied; never
//! changed; removed with its segment. These files are the index's checkpoint: a start loads
//! their heads and does not read their segments again, and a conversation not resident is paged
//! in from them (docs/design/log.md, "The index").
//!
//! Layout (integers little-endian):
//!
//! ```text
//! head:  magic[16] | base u64 | last u64 | tag_key u64 | convs u64 | slots u64 | entries u64
//!        | bloom_words u64
//!        | fences: one u128 per directory block (its first conversation)
//!        | bloom: bloom_words × u64 (conversation ids, BLOOM_HASHES probes)
//!        | crc32c(head so far) u32 | zero padding to 8 bytes
//! dir:   blocks of DIR_BLOCK entries (the last may be short), each followed by its crc32c u32:
//!        conv u128 | first_seq u64 | count u32 | ptrs_crc u32 | ptrs_at u64
//! ptrs:  slots × (off u32 | len u32 | crc u32 | id u32); a conversation's `count` pointers start
//!        at slot `ptrs_at`; `len == 0` is a hole; `ptrs_crc` is the crc32c of their bytes
//! ```
//!
//! Opening reads and checks the head only (one read, a few hundred KiB for a 64 MiB segment); a
//! lookup reads one directory block and one run of pointers, each checked by its own CRC, so
//! damage is an error at the read that meets it, never a wrong or a missing message.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::StorageError;
use crate::types::{ConvId, Lsn};

use super::resident::{Ptr, mix64};

const MAGIC: &[u8; 16] = b"starling-segix-1";
const HEADER_BYTES: usize = 16 + 7 * 8;
/// Directory entries per block (one read and one CRC each).
pub(super) const DIR_BLOCK: usize = 64;
const DIR_ENTRY_BYTES: usize = 16 + 8 + 4 + 4 + 8;
const PTR_BYTES: usize = 16;
/// Bloom filter bits per conversation and probes: ~1% false positives.
const BLOOM_BITS_PER_CONV: usize = 10;
const BLOOM_HASHES: u64 = 7;

/// The file name of segment `base`'s index.
pub(super) fn file_name(base: Lsn) -> String {
    format!("{:020}.ix", base.0)
}

/// The base lsn a file name names, if it is an index file's.
pub(super) fn parse_name(name: &str) -> Option<Lsn> {
    let stem = name.strip_suffix(".ix")?;
    (stem.len() == 20).then(|| stem.parse().ok().map(Lsn))?
}

/// One entry of a segment, as the index applied it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SegEntry {
    pub(super) conv: ConvId,
    pub(super) seq: u64,
    /// `seg` is ignored (the file is the segment).
    pub(super) ptr: Ptr,
}

/// One conversation's run in a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Run {
    /// Seq of `ptrs[0]`.
    pub(super) first: u64,
    /// Pointers of seqs `first..`, holes for seqs not in the segment; `seg` is unset.
    pub(super) ptrs: Vec<Ptr>,
}

/// The head of an index file, held in memory while its segment is kept.
#[derive(Debug)]
pub(super) struct SegIx {
    path: PathBuf,
    file: File,
    pub(super) last: Lsn,
    pub(super) tag_key: u64,
    pub(super) convs: u64,
    /// Pointer slots (entries and holes).
    pub(super) slots: u64,
    /// Entries (slots that are not holes).
    pub(super) entries: u64,
    fences: Vec<u128>,
    bloom: Vec<u64>,
    dir_at: u64,
    ptrs_at: u64,
}

fn bloom_probes(conv: ConvId, words: usize) -> impl Iterator<Item = (usize, u64)> {
    let h1 = mix64(conv.0 as u64 ^ mix64((conv.0 >> 64) as u64 ^ 0x0062_6c6f_6f6d));
    let h2 = mix64(h1 ^ 0x0073_6567_6978) | 1;
    let bits = (words * 64) as u64;
    (0..BLOOM_HASHES).map(move |i| {
        let b = h1.wrapping_add(i.wrapping_mul(h2)) % bits;
        ((b / 64) as usize, 1u64 << (b % 64))
    })
}

fn decode_err(path: &Path, reason: impl Into<String>) -> StorageError {
    StorageError::Decode {
        table: "segment index",
        reason: format!("{}: {}", path.display(), reason.into()),
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(b[at..at + 16].try_into().unwrap_or([0; 16]))
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Encodes the index of segment `base..=last` from its entries in log order (a later entry of
/// the same seq replaces an earlier one, as applying them did).
pub(super) fn encode(base: Lsn, last: Lsn, tag_key: u64, entries: &mut [SegEntry]) -> Vec<u8> {
    // Stable: entries of one (conv, seq) stay in log order, the last one wins.
    entries.sort_by_key(|e| (e.conv.0, e.seq));
    let mut runs: Vec<(ConvId, Run)> = Vec::new();
    for e in entries.iter() {
        match runs.last_mut() {
            Some((c, r)) if *c == e.conv => {
                let i = (e.seq - r.first) as usize;
                if i < r.ptrs.len() {
                    r.ptrs[i] = e.ptr;
                } else {
                    r.ptrs.resize(i, Ptr::default());
                    r.ptrs.push(e.ptr);
                }
            }
            _ => runs.push((
                e.conv,
                Run {
                    first: e.seq,
                    ptrs: vec![e.ptr],
                },
            )),
        }
    }
    let convs = runs.len();
    let slots: usize = runs.iter().map(|(_, r)| r.ptrs.len()).sum();
    let live: usize = runs
        .iter()
        .map(|(_, r)| r.ptrs.iter().filter(|p| !p.is_hole()).count())
        .sum();
    let blocks = convs.div_ceil(DIR_BLOCK);
    let bloom_words = (convs * BLOOM_BITS_PER_CONV).div_ceil(64).max(1);
    let mut bloom = vec![0u64; bloom_words];
    for (c, _) in &runs {
        for (w, bit) in bloom_probes(*c, bloom_words) {
            bloom[w] |= bit;
        }
    }
    let mut b = Vec::with_capacity(
        HEADER_BYTES
            + blocks * 16
            + bloom_words * 8
            + 16
            + convs * DIR_ENTRY_BYTES
            + blocks * 4
            + slots * PTR_BYTES,
    );
    b.extend_from_slice(MAGIC);
    for v in [
        base.0,
        last.0,
        tag_key,
        convs as u64,
        slots as u64,
        live as u64,
        bloom_words as u64,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for chunk in runs.chunks(DIR_BLOCK) {
        b.extend_from_slice(&chunk[0].0.0.to_le_bytes());
    }
    for w in &bloom {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.resize(pad8(b.len()), 0);
    let mut at = 0u64;
    let ptr_bytes = |ptrs: &[Ptr]| {
        let mut v = Vec::with_capacity(ptrs.len() * PTR_BYTES);
        for p in ptrs {
            for x in [p.off, p.len, p.crc, p.id] {
                v.extend_from_slice(&x.to_le_bytes());
            }
        }
        v
    };
    for chunk in runs.chunks(DIR_BLOCK) {
        let start = b.len();
        for (c, r) in chunk {
            b.extend_from_slice(&c.0.to_le_bytes());
            b.extend_from_slice(&r.first.to_le_bytes());
            b.extend_from_slice(&(r.ptrs.len() as u32).to_le_bytes());
            b.extend_from_slice(&crc32c::crc32c(&ptr_bytes(&r.ptrs)).to_le_bytes());
            b.extend_from_slice(&at.to_le_bytes());
            at += r.ptrs.len() as u64;
        }
        let crc = crc32c::crc32c(&b[start..]);
        b.extend_from_slice(&crc.to_le_bytes());
    }
    for (_, r) in &runs {
        b.extend_from_slice(&ptr_bytes(&r.ptrs));
    }
    b
}

/// Writes `bytes` as `dir/<base>.ix`: a temporary file, fsync, rename, fsync of the directory.
pub(super) fn write(dir: &Path, base: Lsn, bytes: &[u8]) -> Result<PathBuf, StorageError> {
    let path = dir.join(file_name(base));
    let tmp = dir.join(format!("{}.tmp", file_name(base)));
    let fs_err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageError::Fs { op, path, source }
    };
    let mut f = File::create(&tmp).map_err(fs_err("create segment index", &tmp))?;
    f.write_all(bytes)
        .map_err(fs_err("write segment index", &tmp))?;
    f.sync_all().map_err(fs_err("sync segment index", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(fs_err("rename segment index", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fs_err("sync index dir", dir))?;
    Ok(path)
}

/// The parsed head of an index file's bytes (`len` = the whole file's length): everything but
/// the file handle. `Err` names what is wrong.
fn decode_head(head: &[u8], len: u64) -> Result<HeadParts, String> {
    if head.len() < HEADER_BYTES {
        return Err("shorter than its header".into());
    }
    if &head[..16] != MAGIC {
        return Err("not a segment index (magic)".into());
    }
    let base = Lsn(u64_at(head, 16));
    let last = Lsn(u64_at(head, 24));
    let tag_key = u64_at(head, 32);
    let convs = u64_at(head, 40);
    let slots = u64_at(head, 48);
    let entries = u64_at(head, 56);
    let bloom_words = u64_at(head, 64);
    if last < base {
        return Err("last lsn before base lsn".into());
    }
    let blocks = convs.div_ceil(DIR_BLOCK as u64);
    // Sizes are bounded by the file's length before anything is allocated.
    let fences_bytes = blocks.checked_mul(16).ok_or("size overflow")?;
    let bloom_bytes = bloom_words.checked_mul(8).ok_or("size overflow")?;
    let head_len = (HEADER_BYTES as u64)
        .checked_add(fences_bytes)
        .and_then(|n| n.checked_add(bloom_bytes))
        .and_then(|n| n.checked_add(4))
        .ok_or("size overflow")?;
    let dir_at = head_len.div_ceil(8) * 8;
    let dir_bytes = convs
        .checked_mul(DIR_ENTRY_BYTES as u64)
        .and_then(|n| n.checked_add(blocks * 4))
        .ok_or("size overflow")?;
    let ptrs_at = dir_at.checked_add(dir_bytes).ok_or("size overflow")?;
    let total = slots
        .checked_mul(PTR_BYTES as u64)
        .and_then(|n| n.checked_add(ptrs_at))
        .ok_or("size overflow")?;
    if total != len {
        return Err(format!("is {len} bytes, its head describes {total}"));
    }
    if bloom_words == 0 || (convs == 0) != (slots == 0) || convs > slots || entries > slots {
        return Err("inconsistent counts".into());
    }
    if (head.len() as u64) < head_len {
        return Err("head truncated".into());
    }
    let head_len = head_len as usize;
    let crc_at = head_len - 4;
    if crc32c::crc32c(&head[..crc_at]) != u32_at(head, crc_at) {
        return Err("head fails its checksum".into());
    }
    let mut at = HEADER_BYTES;
    let mut fences = Vec::with_capacity(blocks as usize);
    for _ in 0..blocks {
        fences.push(u128_at(head, at));
        at += 16;
    }
    if fences.windows(2).any(|w| w[0] >= w[1]) {
        return Err("directory fences out of order".into());
    }
    let mut bloom = Vec::with_capacity(bloom_words as usize);
    for _ in 0..bloom_words {
        bloom.push(u64_at(head, at));
        at += 8;
    }
    Ok(HeadParts {
        base,
        last,
        tag_key,
        convs,
        slots,
        entries,
        fences,
        bloom,
        dir_at,
        ptrs_at,
    })
}

/// The bytes of the head the fixed header describes (`None` on overflow).
fn head_len(header: &[u8]) -> Option<u64> {
    let convs = u64_at(header, 40);
    let words = u64_at(header, 64);
    (HEADER_BYTES as u64)
        .checked_add(convs.div_ceil(DIR_BLOCK as u64).checked_mul(16)?)?
        .checked_add(words.checked_mul(8)?)?
        .checked_add(4)
}

struct HeadParts {
    base: Lsn,
    last: Lsn,
    tag_key: u64,
    convs: u64,
    slots: u64,
    entries: u64,
    fences: Vec<u128>,
    bloom: Vec<u64>,
    dir_at: u64,
    ptrs_at: u64,
}

impl SegIx {
    /// Opens and checks the head of `path`. `Err` for anything missing, damaged or not
    /// matching `base` (the caller then indexes the segment from the log again).
    pub(super) fn open(path: &Path, base: Lsn) -> Result<SegIx, StorageError> {
        let file = File::open(path).map_err(|source| StorageError::Fs {
            op: "open segment index",
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| StorageError::Fs {
                op: "stat segment index",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let read = |at: u64, n: usize| -> Result<Vec<u8>, StorageError> {
            let mut b = vec![0u8; n];
            file.read_exact_at(&mut b, at)
                .map_err(|source| StorageError::Fs {
                    op: "read segment index",
                    path: path.to_path_buf(),
                    source,
                })?;
            Ok(b)
        };
        if len < HEADER_BYTES as u64 {
            return Err(decode_err(path, "shorter than its header"));
        }
        let header = read(0, HEADER_BYTES)?;
        // The head's length, from the header, bounded by the file; decode_head checks the rest.
        let want = head_len(&header)
            .filter(|&n| n <= len)
            .ok_or_else(|| decode_err(path, "head longer than the file"))?
            as usize;
        let head = read(0, want)?;
        let p = decode_head(&head, len).map_err(|e| decode_err(path, e))?;
        if p.base != base {
            return Err(decode_err(
                path,
                format!("names segment {} in the file of {}", p.base.0, base.0),
            ));
        }
        Ok(SegIx {
            path: path.to_path_buf(),
            file,
            last: p.last,
            tag_key: p.tag_key,
            convs: p.convs,
            slots: p.slots,
            entries: p.entries,
            fences: p.fences,
            bloom: p.bloom,
            dir_at: p.dir_at,
            ptrs_at: p.ptrs_at,
        })
    }

    /// Bytes this head holds in memory.
    pub(super) fn memory_bytes(&self) -> usize {
        self.fences.len() * 16 + self.bloom.len() * 8 + 160
    }

    fn read(&self, at: u64, n: usize) -> Result<Vec<u8>, StorageError> {
        let mut b = vec![0u8; n];
        self.file
            .read_exact_at(&mut b, at)
            .map_err(|source| StorageError::Fs {
                op: "read segment index",
                path: self.path.clone(),
                source,
            })?;
        Ok(b)
    }

    /// Directory block `block`'s entries, checked against its CRC.
    fn dir_block(&self, block: usize) -> Result<Vec<u8>, StorageError> {
        let in_block = (self.convs as usize - block * DIR_BLOCK).min(DIR_BLOCK);
        let at = self.dir_at + (block * (DIR_BLOCK * DIR_ENTRY_BYTES + 4)) as u64;
        let mut b = self.read(at, in_block * DIR_ENTRY_BYTES + 4)?;
        let body = in_block * DIR_ENTRY_BYTES;
        if crc32c::crc32c(&b[..body]) != u32_at(&b, body) {
            return Err(decode_err(
                &self.path,
                format!("directory block {block} fails its checksum"),
            ));
        }
        b.truncate(body);
        Ok(b)
    }

    /// Whether the segment may hold entries of `conv` (no false negatives).
    pub(super) fn may_hold(&self, conv: ConvId) -> bool {
        bloom_probes(conv, self.bloom.len()).all(|(w, bit)| self.bloom[w] & bit != 0)
    }

    /// `conv`'s run in this segment, if it has one.
    pub(super) fn lookup(&self, conv: ConvId) -> Result<Option<Run>, StorageError> {
        if !self.may_hold(conv) {
            return Ok(None);
        }
        let block = self.fences.partition_point(|&f| f <= conv.0);
        let Some(block) = block.checked_sub(1) else {
            return Ok(None);
        };
        let b = self.dir_block(block)?;
        let in_block = b.len() / DIR_ENTRY_BYTES;
        let ent = |i: usize| &b[i * DIR_ENTRY_BYTES..(i + 1) * DIR_ENTRY_BYTES];
        let found = (0..in_block).find(|&i| u128_at(ent(i), 0) == conv.0);
        let Some(i) = found else {
            return Ok(None);
        };
        let e = ent(i);
        let first = u64_at(e, 16);
        let count = u32_at(e, 24) as u64;
        let crc = u32_at(e, 28);
        let slot = u64_at(e, 32);
        if count == 0
            || slot.checked_add(count).is_none_or(|end| end > self.slots)
            || first.checked_add(count).is_none()
        {
            return Err(decode_err(
                &self.path,
                format!("directory entry of conversation {} out of range", conv.0),
            ));
        }
        let raw = self.read(
            self.ptrs_at + slot * PTR_BYTES as u64,
            count as usize * PTR_BYTES,
        )?;
        if crc32c::crc32c(&raw) != crc {
            return Err(decode_err(
                &self.path,
                format!("pointers of conversation {} fail their checksum", conv.0),
            ));
        }
        let ptrs = raw
            .chunks_exact(PTR_BYTES)
            .map(|c| Ptr {
                seg: 0,
                off: u32_at(c, 0),
                len: u32_at(c, 4),
                crc: u32_at(c, 8),
                id: u32_at(c, 12),
            })
            .collect();
        Ok(Some(Run { first, ptrs }))
    }
}

impl SegIx {
    /// Every conversation in the segment with the seq after its last one there, in directory
    /// order (reads the whole directory, checking every block).
    pub(super) fn conversations(&self) -> Result<Vec<(ConvId, u64)>, StorageError> {
        let mut out = Vec::with_capacity(self.convs as usize);
        for block in 0..self.fences.len() {
            let b = self.dir_block(block)?;
            for e in b.chunks_exact(DIR_ENTRY_BYTES) {
                let first = u64_at(e, 16);
                let count = u64::from(u32_at(e, 24));
                let end = first
                    .checked_add(count)
                    .filter(|_| count > 0)
                    .ok_or_else(|| decode_err(&self.path, "directory entry out of range"))?;
                out.push((ConvId(u128_at(e, 0)), end));
            }
        }
        Ok(out)
    }
}

/// For `crate::fuzzing::segment_index`: whatever `bytes` hold, opening them as an index file
/// and looking conversations up returns errors, never panics; a valid file's every run reads
/// back as encoded.
pub(crate) fn fuzz(bytes: &[u8], dir: &Path) {
    let path = dir.join(file_name(Lsn(1)));
    if fs::write(&path, bytes).is_err() {
        return;
    }
    let Ok(ix) = SegIx::open(&path, Lsn(1)) else {
        return;
    };
    let probe = |c: u128| {
        let _ = ix.lookup(ConvId(c));
    };
    for f in ix.fences.clone() {
        probe(f);
        probe(f.wrapping_add(1));
    }
    for c in [0, 1, 2, u128::MAX] {
        probe(c);
    }
    let _ = ix.conversations();
}
