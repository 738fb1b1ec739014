//! The index's background work, on its own thread: write the index file of every segment that
//! is complete (sealed and applied), in order, and keep resident memory within the budget by a
//! clock sweep over the conversations.
//!
//! A checkpoint never holds the index lock while it writes: it takes the segment's buffered
//! entries, writes and syncs the file, then marks the segment checkpointed. A crash at any
//! point leaves either no file (or a temporary one, removed at open) or a complete, synced one;
//! either way the next open replays from the first segment without one.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::StorageError;
use crate::log::{LogThread, ThreadStart};

use super::DenseIndex;
use super::resident::SPLIT_TABLES;
use super::segfile::{self, SegIx};
use super::state::LIVE_ENTRY_BYTES;

/// A sweep brings memory down to this share of the budget, so that it does not run again at
/// once.
const SWEEP_TARGET_PERCENT: usize = 90;
/// How often the thread looks at memory when no segment completes.
const IDLE_WAKE: Duration = Duration::from_millis(500);
/// Pointers a conversation in use keeps through a sweep: its newest chunk's worth (sends and
/// syncs need only the newest; a retry's dedup lookup pages in the rest of the window).
const KEEP_REFERENCED: usize = super::resident::PTR_CHUNK;
/// After a failed checkpoint (disk full, I/O error), the next try waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Wakes the checkpoint thread.
#[derive(Debug, Default)]
pub(super) struct Signal {
    state: Mutex<(bool, bool)>, // (work, stop)
    cond: Condvar,
}

impl Signal {
    pub(super) fn notify(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0 = true;
        self.cond.notify_all();
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.cond.notify_all();
    }

    /// Waits up to `timeout` for work; `false` once stopping.
    fn wait(&self, timeout: Duration) -> bool {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !g.0 && !g.1 {
            g = self
                .cond
                .wait_timeout(g, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        g.0 = false;
        !g.1
    }
}

/// The running checkpoint thread of one index; stops (and is joined) when dropped.
#[derive(Debug)]
pub struct Checkpointer {
    index: Arc<DenseIndex>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread (placed by `start`, as the log's threads are).
    pub(crate) fn spawn(
        index: Arc<DenseIndex>,
        start: Option<ThreadStart>,
    ) -> Result<Checkpointer, StorageError> {
        let ix = index.clone();
        let thread = std::thread::Builder::new()
            .name("starling-index".into())
            .spawn(move || {
                if let Some(f) = start {
                    f(LogThread::Index);
                }
                let mut failing = false;
                while ix.work.wait(if failing { RETRY_AFTER } else { IDLE_WAKE }) {
                    failing = ix.checkpoint_complete().is_err();
                    ix.sweep();
                }
            })
            .map_err(|source| StorageError::Fs {
                op: "spawn index thread",
                path: index.dir.clone(),
                source,
            })?;
        Ok(Checkpointer {
            index,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.index.work.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DenseIndex {
    /// Writes the index file of every complete segment not checkpointed yet, oldest first.
    /// Returns how many were written; stops at the first failure (the segment stays live and
    /// is tried again later; nothing is lost, only memory is not freed meanwhile).
    pub fn checkpoint_complete(&self) -> Result<usize, StorageError> {
        // One checkpoint at a time (the thread's, a clean close's, a caller's).
        let _one = self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut done = 0;
        loop {
            // A segment is complete once a later one has entries applied.
            let (seg, base, last, mut entries, tag_key) = {
                let mut st = self.write();
                if st.live.len() < 2 {
                    return Ok(done);
                }
                let seg = st.live_from;
                let base = st.segs[seg as usize];
                let live = &mut st.live[0];
                let last = live.last;
                let entries = std::mem::take(&mut live.entries);
                (seg, base, last, entries, st.tag_key)
            };
            let n = entries.len();
            let bytes = segfile::encode(base, last, tag_key, &mut entries);
            let res =
                segfile::write(&self.dir, base, &bytes).and_then(|path| SegIx::open(&path, base));
            let mut st = self.write();
            match res {
                Ok(ix) => {
                    st.head_bytes += ix.memory_bytes();
                    st.ixs[seg as usize] = Some(Arc::new(ix));
                    st.live.pop_front();
                    st.live_from += 1;
                    st.live_bytes -= n * LIVE_ENTRY_BYTES;
                    done += 1;
                }
                Err(e) => {
                    // Keep the entries for the next try.
                    st.live[0].entries = entries;
                    return Err(e);
                }
            }
        }
    }

    /// When memory is over the budget: a clock sweep, a table of the conversation map at a time,
    /// drops pointers into checkpointed segments — all of them from conversations not read or
    /// written since the sweep last passed, all but the newest [`KEEP_REFERENCED`] from the
    /// others (whose bit it clears) — until memory is under [`SWEEP_TARGET_PERCENT`] of the
    /// budget. If two turns of the clock are not enough (every conversation in use), a third
    /// drops every pointer into checkpointed segments. Returns the pointers dropped.
    pub fn sweep(&self) -> usize {
        let _one = self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let target = self.budget / 100 * SWEEP_TARGET_PERCENT;
        if self.read().memory_bytes() <= self.budget {
            return 0;
        }
        let mut dropped = 0;
        let mut hand = self.sweep_hand.load(Ordering::Relaxed) % SPLIT_TABLES;
        let mut freed_this_turn = 0;
        for step in 0..3 * SPLIT_TABLES {
            if step % SPLIT_TABLES == 0 {
                // A whole turn after the first (which may only clear bits) that freed nothing:
                // what is left is not evictable (live segments, index-file heads).
                if step >= 2 * SPLIT_TABLES && freed_this_turn == 0 {
                    break;
                }
                freed_this_turn = 0;
            }
            let mut st = self.write();
            let live_from = st.live_from;
            let last_turn = step >= 2 * SPLIT_TABLES;
            let mut freed = 0;
            st.convs.table_mut(hand).retain(|_, c| {
                let referenced = c.referenced.swap(false, Ordering::Relaxed);
                let keep = if referenced && !last_turn {
                    KEEP_REFERENCED
                } else {
                    0
                };
                let before = c.cost();
                let n = c.trim(live_from, keep);
                dropped += n;
                freed += before.saturating_sub(if c.ptrs.is_empty() { 0 } else { c.cost() });
                !c.ptrs.is_empty()
            });
            st.resident_bytes = st.resident_bytes.saturating_sub(freed);
            freed_this_turn += freed;
            hand = (hand + 1) % SPLIT_TABLES;
            if st.memory_bytes() <= target {
                break;
            }
        }
        self.sweep_hand.store(hand, Ordering::Relaxed);
        dropped
    }
}
