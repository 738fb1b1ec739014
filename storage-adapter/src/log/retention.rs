//! Space reclamation: removes the oldest sealed segments once every entry in them is past
//! retention (docs/design/log.md, "Segment removal"; docs/design/retention.md).
//!
//! What "past retention" means is the caller's: [`Reclaimer::sweep`] takes a `keep_until` that
//! says, for one entry, until when (ms since the epoch) it must be kept (`u64::MAX`: forever).
//! The router's answer is the server's retention after the entry's timestamp, or the entry's
//! disappearing-messages expiry if that comes first, or the end of its retention after every
//! member received it. A sealed segment's newest `keep_until` is computed by reading it, and
//! cached when every answer in it was final ([`Reclaimer::sweep_unsettled`]: an entry not
//! received by everyone yet may go earlier later); the segment goes once `now` reaches it.
//!
//! Only a prefix of the log goes (recovery accepts missing *leading* segments, never a hole),
//! and never the segment being written nor one whose successor holds no applied record: the
//! first segment left always holds a durable record, so recovery finds the log's position.
//!
//! Order, for crash safety: the index checkpoints every complete segment, writes the last seqs
//! of the conversations the removal empties, and forgets the removed segments
//! ([`DenseIndex::forget_segments_before`]); then the files are deleted oldest first, the
//! directory is synced, and the removed segments' index files go
//! ([`DenseIndex::drop_removed_files`]). A crash before the first deletion leaves every file: the
//! next open serves what it served before (the router hides entries past retention anyway) and
//! the next sweep removes them again. A crash during the deletions leaves a prefix of them
//! gone: recovery reads the rest as leading segments, an index file whose segment is gone is
//! dropped at open. Nothing live is in a removed segment, so nothing live is lost; a deleted
//! file is gone, so nothing deleted comes back.
//!

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::recovery::{list_segments, read_all};
use crate::error::{LogError, StorageError};
use crate::format::{self, SEGMENT_HEADER_BYTES};
use crate::index::DenseIndex;
use crate::types::{Entry, Lsn};

/// What retention removed, for `/metrics` (one per shard).
#[derive(Debug, Default)]
pub struct RetentionStats {
    /// Segments removed since start.
    pub removed_segments: AtomicU64,
    /// Bytes of the segment files removed since start.
    pub removed_bytes: AtomicU64,
    /// Base lsn of the oldest segment kept after the last sweep (0: no sweep yet).
    pub oldest_kept_base: AtomicU64,
    /// Sweeps run.
    pub sweeps: AtomicU64,
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Base lsns of the segments removed, oldest first.
    pub removed: Vec<Lsn>,
    /// Bytes those files took.
    pub removed_bytes: u64,
    /// Base lsn of the oldest segment left.
    pub oldest_kept: Lsn,
}

/// Test hook: called before each file is deleted, with its base lsn and the base of the oldest
/// segment the sweep keeps (the index has forgotten everything before it by then).
pub type RemoveHook = Arc<dyn Fn(Lsn, Lsn) + Send + Sync>;

/// One shard's reclaimer: the log directory and the index whose pointers name it. Sweeps run on
/// whatever thread calls them (the gateway's retention thread), beside the log's writer, which
/// never touches a sealed segment again.
pub struct Reclaimer {
    log_dir: PathBuf,
    /// The index, and whether sweeps are paused (the shard's log failed and is being reopened
    /// in place: the reopened shard brings a new index). Held for a whole sweep.
    index: Mutex<(Arc<DenseIndex>, bool)>,
    /// Sealed segments' newest `keep_until`, by base lsn.
    keep_until: Mutex<BTreeMap<Lsn, u64>>,
    stats: Arc<RetentionStats>,
    before_remove: Option<RemoveHook>,
}

impl std::fmt::Debug for Reclaimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reclaimer")
            .field("log_dir", &self.log_dir)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Reclaimer {
    pub(crate) fn new(log_dir: &Path, index: Arc<DenseIndex>) -> Reclaimer {
        Reclaimer {
            log_dir: log_dir.to_path_buf(),
            index: Mutex::new((index, false)),
            keep_until: Mutex::new(BTreeMap::new()),
            stats: Arc::new(RetentionStats::default()),
            before_remove: None,
        }
    }

    /// Runs `hook` before each file is deleted (crash tests).
    #[must_use]
    pub fn with_remove_hook(mut self, hook: RemoveHook) -> Reclaimer {
        self.before_remove = Some(hook);
        self
    }

    /// Pauses sweeps (waiting for one in progress to end): the shard's log failed and is being
    /// reopened in place, which must not race a removal.
    pub fn pause(&self) {
        self.index.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
    }

    /// Resumes sweeps over the reopened shard's index.
    pub fn resume(&self, index: Arc<DenseIndex>) {
        *self.index.lock().unwrap_or_else(PoisonError::into_inner) = (index, false);
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<RetentionStats> {
        &self.stats
    }

    /// `keep_until` must be the same policy at every sweep of one reclaimer (a segment's answer
    /// is cached); a changed policy needs a new reclaimer.
    ///
    /// Removes the longest prefix of sealed segments whose every entry may go at `now_ms`
    /// (`keep_until(entry) <= now_ms`); see the module docs for the order and what a crash at
    /// any point leaves.
    pub fn sweep(
        &self,
        now_ms: u64,
        keep_until: &dyn Fn(&Entry) -> u64,
    ) -> Result<SweepReport, StorageError> {
        self.sweep_unsettled(now_ms, &|e| (keep_until(e), true))
    }

    /// [`Reclaimer::sweep`] with a policy whose answer for an entry may still come down
    /// (`keep_until` gives `(until, settled)`; `settled: false`, e.g. a message not yet
    /// received by every member, may have an earlier `until` at a later sweep). A segment's
    /// newest answer is cached only when every answer in it was settled; an unsettled one is
    /// read again at the next sweep that reaches it.
    pub fn sweep_unsettled(
        &self,
        now_ms: u64,
        keep_until: &dyn Fn(&Entry) -> (u64, bool),
    ) -> Result<SweepReport, StorageError> {
        let held = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        let (index, paused) = (&held.0, held.1);
        self.stats.sweeps.fetch_add(1, Ordering::Relaxed);
        // A failed index is rebuilt from the log at the next open: it must not be saved, and
        // the log must keep everything that rebuild needs until then. A paused one belongs to
        // a log being reopened.
        if paused || index.failed() {
            return Ok(SweepReport::default());
        }
        let segs = list_segments(&self.log_dir)?;
        let applied = index.applied_lsn();
        let mut cut = 0;
        for (i, seg) in segs.iter().enumerate() {
            // The segment after it must exist (this one is sealed) and hold an applied record
            // (every record of this one is in the index, and the log keeps a valid first
            // segment).
            let Some(next) = segs.get(i + 1) else { break };
            if next.base > applied {
                break;
            }
            let until = self.newest_keep_until(seg.base, &seg.path, keep_until)?;
            if until == u64::MAX || until > now_ms {
                break;
            }
            cut = i + 1;
        }
        let mut report = SweepReport {
            oldest_kept: segs.get(cut).map_or(Lsn::ZERO, |s| s.base),
            ..SweepReport::default()
        };
        if cut == 0 {
            self.stats
                .oldest_kept_base
                .store(report.oldest_kept.0, Ordering::Relaxed);
            return Ok(report);
        }
        index.forget_segments_before(report.oldest_kept)?;
        for seg in &segs[..cut] {
            if let Some(h) = &self.before_remove {
                h(seg.base, report.oldest_kept);
            }
            let bytes = fs::metadata(&seg.path).map_or(0, |m| m.len());
            fs::remove_file(&seg.path).map_err(|e| LogError::io("remove", &seg.path, e))?;
            report.removed.push(seg.base);
            report.removed_bytes += bytes;
            self.stats.removed_segments.fetch_add(1, Ordering::Relaxed);
            self.stats.removed_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        File::open(&self.log_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LogError::io("fsync_dir", &self.log_dir, e))?;
        index.drop_removed_files(report.oldest_kept)?;
        let mut cached = self
            .keep_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cached.retain(|b, _| *b >= report.oldest_kept);
        self.stats
            .oldest_kept_base
            .store(report.oldest_kept.0, Ordering::Relaxed);
        Ok(report)
    }

    /// The newest `keep_until` of the entries of the sealed segment at `base` (read once if
    /// every answer was settled).
    fn newest_keep_until(
        &self,
        base: Lsn,
        path: &Path,
        keep_until: &dyn Fn(&Entry) -> (u64, bool),
    ) -> Result<u64, StorageError> {
        if let Some(&t) = self
            .keep_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&base)
        {
            return Ok(t);
        }
        let data = read_all(path)?;
        let mut pos = SEGMENT_HEADER_BYTES;
        let mut newest = 0u64;
        let mut settled = true;
        while let Ok(view) = format::decode_record(data.get(pos..).unwrap_or(&[])) {
            let entries = view.entries().map_err(|e| StorageError::Decode {
                table: "log record",
                reason: e.to_string(),
            })?;
            for e in &entries {
                let (until, fixed) = keep_until(e);
                newest = newest.max(until);
                settled &= fixed;
            }
            pos += view.total_bytes();
        }
        if settled {
            self.keep_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(base, newest);
        }
        Ok(newest)
    }
}
