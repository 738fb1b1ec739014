//! Everything the index knows, behind one lock: the segments it has seen (checkpointed ones
//! with their index file's head, live ones with the entries applied from them so far), and the
//! resident conversations.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::error::StorageError;
use crate::types::{ClientMsgId, ConvId, Lsn, Seq};

use super::resident::{ConvIx, PTR_CHUNK, Ptr, SplitMap, id_tag, random_tag_key};
use super::segfile::{SegEntry, SegIx};

/// Bytes a live segment's buffered entry costs.
pub(super) const LIVE_ENTRY_BYTES: usize = std::mem::size_of::<SegEntry>();

/// A segment not checkpointed yet: the entries applied from it, for its index file.
#[derive(Debug, Default)]
pub(super) struct LiveSeg {
    pub(super) entries: Vec<SegEntry>,
    /// The last lsn applied from it.
    pub(super) last: Lsn,
}

#[derive(Debug, Default)]
pub(super) struct State {
    /// Base lsns of every segment the index has seen, ascending; a pointer's `seg` is a position
    /// here. Never shrinks (8 bytes per segment ever written), so positions stay valid.
    pub(super) segs: Vec<Lsn>,
    /// Per position in `segs`: the index file's head of a checkpointed segment still kept;
    /// `None` for live segments and removed ones.
    pub(super) ixs: Vec<Option<Arc<SegIx>>>,
    /// Segments at positions `live_from..` are live: every entry of theirs is resident.
    pub(super) live_from: u32,
    /// `live[i]` is segment `live_from + i`'s.
    pub(super) live: VecDeque<LiveSeg>,
    pub(super) convs: SplitMap<ConvId, ConvIx>,
    /// The key of every pointer's id tag ([`id_tag`]); chosen at random when the index starts
    /// empty, kept in every index file.
    pub(super) tag_key: u64,
    /// Entries indexed (resident or not).
    pub(super) entries: u64,
    /// Bytes of resident conversations (pointers and per-conversation overhead, kept up to date incrementally).
    pub(super) resident_bytes: usize,
    /// Bytes of live segments' buffered entries.
    pub(super) live_bytes: usize,
    /// Bytes of the index files' heads held in memory.
    pub(super) head_bytes: usize,
    /// Bytes of the floors (last seqs of conversations retention emptied).
    pub(super) floor_bytes: usize,
}

impl State {
    /// An empty index with a fresh tag key.
    pub(super) fn fresh() -> State {
        State {
            tag_key: random_tag_key(),
            ..State::default()
        }
    }

    /// The position of segment `base`, registering it (as live) if it is new. `Ok(true)` in the
    /// second field when it was new (every segment before it is then complete).
    pub(super) fn seg_index(&mut self, base: Lsn) -> Result<(u32, bool), StorageError> {
        match self.segs.last() {
            Some(&last) if last == base => Ok(((self.segs.len() - 1) as u32, false)),
            Some(&last) if last > base => match self.segs.binary_search(&base) {
                Ok(i) if i as u32 >= self.live_from => Ok((i as u32, false)),
                _ => Err(StorageError::Decode {
                    table: "index",
                    reason: format!("segment {} applied out of order", base.0),
                }),
            },
            _ => {
                let i = u32::try_from(self.segs.len()).map_err(|_| StorageError::Decode {
                    table: "index",
                    reason: "more than 2^32 segments".into(),
                })?;
                self.segs.push(base);
                self.ixs.push(None);
                self.live.push_back(LiveSeg::default());
                Ok((i, true))
            }
        }
    }

    /// Applies one entry of live segment `p.seg` (whose last applied lsn becomes `lsn`).
    pub(super) fn insert(&mut self, conv: ConvId, seq: Seq, id: ClientMsgId, mut p: Ptr) {
        p.id = id_tag(self.tag_key, id);
        let older_in = self.live_from.checked_sub(1);
        let c = self.convs.get_or_default(conv);
        let before = if c.ptrs.is_empty() {
            // New to memory: older entries, if any, are in checkpointed segments.
            c.older_in = older_in;
            0
        } else {
            c.cost()
        };
        c.set(seq.0, p);
        *c.referenced.get_mut() = true;
        let after = c.cost();
        self.resident_bytes = (self.resident_bytes + after).saturating_sub(before);
        self.entries += 1;
        if let Some(live) = self.live.get_mut((p.seg - self.live_from) as usize) {
            live.entries.push(SegEntry {
                conv,
                seq: seq.0,
                ptr: p,
            });
            self.live_bytes += LIVE_ENTRY_BYTES;
        }
    }

    /// The seqs of `conv` in `floor..below` whose pointers carry `id`'s tag, from the newest
    /// chunk that has any, newest first, and the first seq of that chunk (where to go on if none
    /// of them is `id`). `None` once no seq in `floor..below` is left.
    pub(super) fn dedup_candidates(
        &self,
        conv: ConvId,
        id: ClientMsgId,
        floor: u64,
        below: u64,
    ) -> Option<(Vec<u64>, u64)> {
        let tag = id_tag(self.tag_key, id);
        let c = self.convs.get(&conv)?;
        let hi = below.min(c.end());
        let lo = floor.max(c.first);
        if tag == 0 || hi <= lo {
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
                .filter(|&seq| seq < hi && seq >= lo)
                .collect();
            if !found.is_empty() || chunk_first <= lo {
                return Some((found, chunk_first));
            }
            k -= 1;
        }
    }

    /// The pointers of `conv` with seqs in `from..to`, oldest first, holes skipped, each with
    /// its segment's base and its seq.
    pub(super) fn range(&self, conv: ConvId, from: u64, to: u64) -> Vec<(Lsn, Ptr, u64)> {
        let Some(c) = self.convs.get(&conv) else {
            return Vec::new();
        };
        let lo = from.max(c.first);
        let hi = to.min(c.end());
        if lo >= hi {
            return Vec::new();
        }
        let (lo_i, hi_i) = ((lo - c.first) as usize, (hi - c.first) as usize);
        c.ptrs
            .range(lo_i, hi_i)
            .zip(lo..)
            .filter(|(p, _)| !p.is_hole())
            .map(|(p, seq)| (self.segs[p.seg as usize], p, seq))
            .collect()
    }

    /// Whether every entry of `conv` with a seq at or above `down_to` is resident (or the
    /// conversation has none at all that are not).
    pub(super) fn covers(&self, conv: ConvId, down_to: u64) -> bool {
        match self.convs.get(&conv) {
            Some(c) => c.older_in.is_none() || c.first <= down_to || self.live_from == 0,
            None => self.live_from == 0,
        }
    }

    /// Bytes the index holds in memory: resident conversations, live buffers, and the heads of
    /// the index files (bloom filters and directory fences).
    pub(super) fn memory_bytes(&self) -> usize {
        self.resident_bytes
            + self.live_bytes
            + self.head_bytes
            + self.floor_bytes
            + self.segs.len() * 16
    }
}
