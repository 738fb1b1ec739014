//! Reads, and paging in what they need: a conversation not resident (or not far enough back) is
//! read from the checkpointed segments' index files, newest segment first, only as far back as
//! the read needs, and put in front of what is resident. The file reads happen outside the
//! lock; the merge checks that no sweep dropped pointers meanwhile, and starts over if one did.

use std::sync::atomic::Ordering;

use crate::error::StorageError;
use crate::traits::MessageIndex;
use crate::types::{ClientMsgId, ConvId, Entry, Lsn, Seq};

use super::resident::{ConvIx, Ptr};
use super::{DEDUP_WINDOW, DenseIndex, READ_ENTRIES_MAX};

/// Page-ins that raced a sweep start over at most this often before the read fails.
const PAGE_ATTEMPTS: usize = 16;

/// What one page-in attempt did.
#[derive(Debug, PartialEq, Eq)]
enum Paged {
    /// Merged what it read (or there was nothing older to read).
    Done,
    /// A sweep trimmed the conversation meanwhile: try again.
    Raced,
    /// The conversation has no entries anywhere.
    Absent,
}

/// "Just the newest entry": a page-in that stops at the first run it finds.
const NEWEST: u64 = u64::MAX;

impl DenseIndex {
    /// Makes every entry of `conv` with a seq at or above `down_to` resident (or, with
    /// [`NEWEST`], at least its newest entry), then runs `f` under the read lock. Fails only on
    /// a damaged index file, or when sweeps keep dropping what was paged in (a budget far too
    /// small for the reads asked of it).
    fn with_conv<R>(
        &self,
        conv: ConvId,
        down_to: u64,
        f: impl Fn(&super::State) -> R,
    ) -> Result<R, StorageError> {
        for _ in 0..PAGE_ATTEMPTS {
            {
                let st = self.read();
                if st.covers(conv, down_to) {
                    if let Some(c) = st.convs.get(&conv) {
                        c.referenced.store(true, Ordering::Relaxed);
                    }
                    return Ok(f(&st));
                }
            }
            if self.page_in(conv, down_to)? == Paged::Absent {
                // No entry of it anywhere: nothing to make resident.
                return Ok(f(&self.read()));
            }
        }
        Err(StorageError::Unavailable(format!(
            "conversation {} could not be paged in: the index memory budget ({} bytes) is too \
             small for its reads",
            conv.0, self.budget
        )))
    }

    /// One attempt at paging `conv` in down to `down_to` (see [`Self::with_conv`]).
    fn page_in(&self, conv: ConvId, down_to: u64) -> Result<Paged, StorageError> {
        let (start, from, ixs) = {
            let st = self.read();
            let Some(newest_ckpt) = st.live_from.checked_sub(1) else {
                return Ok(Paged::Done);
            };
            let (start, from) = match st.convs.get(&conv) {
                Some(c) => match c.older_in {
                    None => return Ok(Paged::Done),
                    Some(o) => (Some(c.trims), o.min(newest_ckpt)),
                },
                None => (None, newest_ckpt),
            };
            let ixs: Vec<_> = st.ixs[..=from as usize].to_vec();
            (start, from, ixs)
        };
        // Newest segment first, until a run reaches `down_to` (or, for NEWEST, any run).
        let mut runs = Vec::new();
        let mut oldest_read = None;
        for k in (0..=from as usize).rev() {
            let Some(ix) = &ixs[k] else {
                continue;
            };
            if let Some(run) = ix.lookup(conv)? {
                let reached = run.first <= down_to;
                runs.push((k as u32, run));
                if reached {
                    oldest_read = Some(k as u32);
                    break;
                }
            }
        }
        let mut st = self.write();
        let st = &mut *st;
        // Merge only if no sweep trimmed the conversation meanwhile (it would leave a gap
        // between what was read and what is resident); otherwise the caller tries again. One
        // that was not resident at the start and is now was created by an append (its entries
        // are newer than any read here) unless a sweep trimmed it since.
        match (st.convs.get(&conv), start) {
            (Some(c), Some(t)) if c.trims != t => return Ok(Paged::Raced),
            (Some(c), None) if c.trims != 0 => return Ok(Paged::Raced),
            (None, Some(_)) => return Ok(Paged::Raced),
            (None, None) if runs.is_empty() => return Ok(Paged::Absent),
            _ => {}
        }
        let created = st.convs.get(&conv).is_none();
        let c = st.convs.get_or_default(conv);
        let before = if created { 0 } else { c.cost() };
        for (k, run) in &runs {
            let ptrs: Vec<Ptr> = run.ptrs.iter().map(|&p| Ptr { seg: *k, ..p }).collect();
            c.prepend(run.first, &ptrs);
        }
        // Older entries can only be in segments before the oldest one whose run was taken; with
        // every segment down to the first read, there are none. Another page-in may have gone
        // further meanwhile: keep whichever reaches further back.
        let older_in = oldest_read.and_then(|k| k.checked_sub(1));
        c.older_in = match (c.older_in, older_in) {
            (Some(a), Some(b)) if !created => Some(a.min(b)),
            (_, b) if created => b,
            _ => None,
        };
        *c.referenced.get_mut() = true;
        let after = c.cost();
        st.resident_bytes = (st.resident_bytes + after).saturating_sub(before);
        Ok(Paged::Done)
    }
}

/// Where `c`'s newest entries end, if it has any.
fn end_of(c: Option<&ConvIx>) -> Option<u64> {
    c.filter(|c| !c.ptrs.is_empty()).map(ConvIx::end)
}

impl MessageIndex for DenseIndex {
    fn latest(&self, conv: ConvId, limit: usize) -> Result<Vec<Entry>, StorageError> {
        self.before(conv, Seq(u64::MAX), limit)
    }

    fn before(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let limit = limit.min(READ_ENTRIES_MAX);
        let Some(end) = self.with_conv(conv, NEWEST, |st| end_of(st.convs.get(&conv)))? else {
            return Ok(Vec::new());
        };
        let hi = seq.0.min(end);
        let mut down_to = hi.saturating_sub(limit as u64);
        loop {
            // Walk back from hi - 1 until `limit` entries are found; holes need more.
            let (ptrs, short) = self.with_conv(conv, down_to, |st| {
                let Some(c) = st.convs.get(&conv) else {
                    return (Vec::new(), false);
                };
                let mut lo = hi;
                let mut found = 0;
                while lo > c.first && found < limit {
                    lo -= 1;
                    if c.get(lo).is_some_and(|p| !p.is_hole()) {
                        found += 1;
                    }
                }
                let more_older = c.older_in.is_some() && lo == c.first && lo > 0;
                (st.range(conv, lo, hi), found < limit && more_older)
            })?;
            if !short || down_to == 0 {
                return self.load(conv, &ptrs);
            }
            down_to = down_to.saturating_sub(limit as u64);
        }
    }

    fn after(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let limit = limit.min(READ_ENTRIES_MAX);
        let Some(from) = seq.0.checked_add(1) else {
            return Ok(Vec::new());
        };
        let ptrs = self.with_conv(conv, from, |st| {
            let Some(c) = st.convs.get(&conv) else {
                return Vec::new();
            };
            let mut out = Vec::with_capacity(limit.min(c.ptrs.len()));
            let mut s = from.max(c.first);
            while s < c.end() && out.len() < limit {
                if let Some(p) = c.get(s).filter(|p| !p.is_hole()) {
                    out.push((st.segs[p.seg as usize], p, s));
                }
                s += 1;
            }
            out
        })?;
        self.load(conv, &ptrs)
    }

    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, StorageError> {
        let ptrs = self.with_conv(conv, seq.0, |st| {
            st.range(conv, seq.0, seq.0.saturating_add(1))
        })?;
        Ok(self.load(conv, &ptrs)?.pop())
    }

    fn last_seq(&self, conv: ConvId) -> Result<Seq, StorageError> {
        let end = self.with_conv(conv, NEWEST, |st| end_of(st.convs.get(&conv)))?;
        Ok(match end {
            Some(e) => Seq(e - 1),
            // Retention may have removed every entry: the conversation still goes on after its
            // last seq.
            None => self.floor(conv).map_or(Seq::NONE, Seq),
        })
    }

    fn dedup(&self, conv: ConvId, id: ClientMsgId) -> Result<Option<Seq>, StorageError> {
        let Some(end) = self.with_conv(conv, NEWEST, |st| end_of(st.convs.get(&conv)))? else {
            return Ok(None);
        };
        let floor = end.saturating_sub(DEDUP_WINDOW);
        let mut below = u64::MAX;
        loop {
            // Candidates one chunk at a time, newest first, each confirmed outside the lock: a
            // tag another id shares costs a read, and a retry of a recent send stops early.
            let Some((candidates, next)) = self.with_conv(conv, floor, |st| {
                st.dedup_candidates(conv, id, floor, below)
            })?
            else {
                return Ok(None);
            };
            for seq in candidates {
                if let Some(e) = self.entry(conv, Seq(seq))?
                    && e.client_msg_id == id
                {
                    return Ok(Some(e.seq));
                }
            }
            if next <= floor {
                return Ok(None);
            }
            below = next;
        }
    }

    fn indexed_lsn(&self) -> Lsn {
        self.applied_lsn()
    }
}
