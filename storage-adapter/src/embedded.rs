//! The embedded backend for one sequencer shard: the segmented log (source of truth) plus the
//! message index, applied by the log's I/O thread right after each group commit's fdatasync
//! (after the commit's completions fired), checkpointed a sealed segment at a time by the
//! index's own thread, and caught up from the log on open from the first segment not
//! checkpointed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{LogError, StorageError};
use crate::format;
use crate::index::{Checkpointer, DenseIndex};
use crate::log::{
    Completion, DurableRecord, LogOptions, ReadModel, RecoveryReport, SegmentedLog, TruncateReport,
};
use crate::traits::DurableLog;
use crate::types::{Entry, Level, Lsn};

/// Options of an [`EmbeddedShard`].
#[derive(Clone, Default)]
pub struct ShardOptions {
    /// The log's options.
    pub log: LogOptions,
    /// Test hook run on the log's I/O thread before each index write (e.g. to stall it). `None`
    /// in production.
    pub apply_hook: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The index's memory budget in bytes (resident pointers, live segments' buffers, index
    /// files' heads); 0 for [`DEFAULT_INDEX_MEMORY_BYTES`].
    pub index_memory_bytes: usize,
}

/// The index budget when none is configured.
pub const DEFAULT_INDEX_MEMORY_BYTES: usize = 256 << 20;

impl fmt::Debug for ShardOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardOptions")
            .field("log", &self.log)
            .field("apply_hook", &self.apply_hook.is_some())
            .field("index_memory_bytes", &self.index_memory_bytes)
            .finish()
    }
}

/// What opening a shard found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardOpenReport {
    /// The log's recovery.
    pub log: RecoveryReport,
    /// The index had no checkpoint and was rebuilt from the whole log.
    pub index_rebuilt: bool,
    /// Index files dropped at open (damaged, past a gap, or naming segments the log no longer
    /// has); their segments were replayed.
    pub index_files_dropped: usize,
    /// Log records replayed into the index at open.
    pub replayed_records: u64,
}

/// One shard's embedded store: `dir/log/` (segments) and `dir/index/` (the index's files).
pub struct EmbeddedShard {
    log: Option<SegmentedLog>,
    index: Arc<DenseIndex>,
    checkpointer: Option<Checkpointer>,
    report: ShardOpenReport,
    dir: PathBuf,
    /// Its log and checkpointer were handed to a [`FailedShard`]: dropping it writes no
    /// checkpoint (the reopened shard owns the index's files).
    detached: bool,
}

impl fmt::Debug for EmbeddedShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedShard")
            .field("dir", &self.dir)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl EmbeddedShard {
    /// Opens the shard in `dir`: recovers the log, then brings the index up to the log's end
    /// (rebuilding it when missing, damaged or ahead). Blocking; call before serving.
    pub fn open(dir: &Path, opts: ShardOptions) -> Result<EmbeddedShard, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Fs {
            op: "create_dir",
            path: dir.to_path_buf(),
            source,
        })?;
        let budget = match opts.index_memory_bytes {
            0 => DEFAULT_INDEX_MEMORY_BYTES,
            n => n,
        };
        let (index, opened) = DenseIndex::open(&dir.join("index"), &dir.join("log"), budget)?;
        let index = Arc::new(index);
        let index_rebuilt = index.rebuilt();
        let applied = opened.checkpointed_through;
        let mut replayed = 0u64;
        let mut replay_err = None;
        let start = opts.log.thread_start.clone();
        let log = SegmentedLog::open_with(
            &dir.join("log"),
            opts.log,
            applied,
            |rec, pos| {
                if replay_err.is_none() && rec.last_lsn() > applied {
                    replayed += 1;
                    if let Err(e) = index.apply(&[(*rec, pos)]) {
                        replay_err = Some(e);
                    }
                }
            },
            Some(read_model(index.clone(), opts.apply_hook.clone())),
        )?;
        if let Some(e) = replay_err {
            return Err(e);
        }
        let last = log.recovery().last_lsn;
        if index.applied_lsn() > last {
            // The checkpoint names segments the log does not have (a replaced log directory):
            // open refuses rather than serve an index of another log.
            return Err(StorageError::Decode {
                table: "index",
                reason: format!(
                    "the index is checkpointed through lsn {} but the log ends at {}",
                    index.applied_lsn().0,
                    last.0
                ),
            });
        }
        let checkpointer = Checkpointer::spawn(index.clone(), start)?;
        // Rebuilt: sealed segments there were, and none had a usable index file.
        let index_rebuilt = index_rebuilt && log.recovery().segments > 1;
        let report = ShardOpenReport {
            log: log.recovery().clone(),
            index_rebuilt,
            index_files_dropped: opened.dropped_files,
            replayed_records: replayed,
        };
        Ok(EmbeddedShard {
            log: Some(log),
            index,
            checkpointer: Some(checkpointer),
            report,
            dir: dir.to_path_buf(),
            detached: false,
        })
    }

    /// Whether the log failed: the last lsn it made durable and why it failed.
    pub fn failed_at(&self) -> Option<(Lsn, LogError)> {
        self.log.as_ref().and_then(SegmentedLog::failed_at)
    }

    /// Takes the failed log (and the index's checkpointer) out of this shard, for
    /// [`FailedShard::reopen`] on another thread. `None` if the log has not failed (or was
    /// taken already). This shard keeps its index for reads of what is durable; appends to it
    /// fail ([`LogError::Closed`]) until it is replaced by the reopened shard.
    pub fn detach_failed(&mut self) -> Option<FailedShard> {
        let (durable, error) = self.failed_at()?;
        let log = self.log.take()?;
        self.detached = true;
        Some(FailedShard {
            log: Some(log),
            checkpointer: self.checkpointer.take(),
            index: self.index.clone(),
            dir: self.dir.clone(),
            durable,
            error,
            stats: None,
        })
    }

    /// What opening found.
    pub fn open_report(&self) -> &ShardOpenReport {
        &self.report
    }

    /// The index, shareable with reader threads.
    pub fn index(&self) -> &Arc<DenseIndex> {
        &self.index
    }

    /// A reclaimer of this shard's log space (`log/retention.rs`): it makes the index forget
    /// the segments it removes, then deletes them. Run its sweeps on any thread.
    pub fn reclaimer(&self) -> crate::log::Reclaimer {
        crate::log::Reclaimer::new(&self.dir.join("log"), self.index.clone())
    }

    /// The log itself (for scans and statistics).
    pub fn log(&self) -> Result<&SegmentedLog, LogError> {
        self.log.as_ref().ok_or(LogError::Closed)
    }

    fn log_mut(&mut self) -> Result<&mut SegmentedLog, LogError> {
        self.log.as_mut().ok_or(LogError::Closed)
    }
}

impl DurableLog for EmbeddedShard {
    fn append<L: Level>(&mut self, entries: &[Entry]) -> Result<Completion<L>, LogError> {
        self.log_mut()?.append(entries)
    }

    fn next_lsn(&self) -> Lsn {
        self.log.as_ref().map_or(Lsn::ZERO, SegmentedLog::next_lsn)
    }

    fn durable_lsn(&self) -> Result<Lsn, LogError> {
        self.log()?.durable_lsn()
    }
}

impl DurableLog for SegmentedLog {
    fn append<L: Level>(&mut self, entries: &[Entry]) -> Result<Completion<L>, LogError> {
        SegmentedLog::append(self, entries)
    }

    fn next_lsn(&self) -> Lsn {
        SegmentedLog::next_lsn(self)
    }

    fn durable_lsn(&self) -> Result<Lsn, LogError> {
        SegmentedLog::durable_lsn(self)
    }
}

impl Drop for EmbeddedShard {
    fn drop(&mut self) {
        // Stop the log first: its I/O thread applies what became durable, then exits. Then the
        // index's thread.
        self.log = None;
        self.checkpointer = None;
        if !self.detached && !self.index.failed() {
            // Segments completed since the thread's last turn: checkpoint them now, so the next
            // open replays only the last segment. A failure costs that open a longer replay.
            let _ = self.index.checkpoint_complete();
        }
    }
}

/// A shard whose log failed, taken out of its [`EmbeddedShard`] to be reopened in place (see
/// `docs/design/log.md`, "Recovery in place"): [`FailedShard::reopen`] stops the old log's
/// threads, cuts the log back to the last lsn it made durable (nothing the server answered as
/// refused or unknown can come back; see [`crate::log::truncate_after`]) and opens the shard
/// again as [`EmbeddedShard::open`] does. Until it succeeds the old index keeps serving reads of
/// what was durable. Retry it until the condition that failed the log (a full disk, a read-only
/// filesystem) has cleared.
pub struct FailedShard {
    log: Option<SegmentedLog>,
    checkpointer: Option<Checkpointer>,
    index: Arc<DenseIndex>,
    dir: PathBuf,
    durable: Lsn,
    error: LogError,
    /// The old log's statistics, continued by the reopened one.
    stats: Option<Arc<crate::stats::LogStats>>,
}

impl fmt::Debug for FailedShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailedShard")
            .field("dir", &self.dir)
            .field("durable", &self.durable)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl FailedShard {
    /// The last lsn the log made durable before it failed.
    pub fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    /// Why the log failed.
    pub fn error(&self) -> &LogError {
        &self.error
    }

    /// The shard's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One attempt to reopen the shard in place. The first call stops the old log (its I/O
    /// thread and spare maker) and the index's checkpointer, and checkpoints the segments the
    /// index has complete (best effort: on a full disk that fails and the reopen replays them).
    /// Then: check that the log has room for its next segment (a file that size is written,
    /// synced and removed: a disk still full or read-only fails here), cut the log back to
    /// [`FailedShard::durable_lsn`], open the shard with `opts`.
    /// Blocking (it reads the log's tail and may rebuild part of the index); run it off the
    /// shard's thread.
    ///
    /// # Errors
    /// The cut or the open failed (the fault is still there, typically): nothing was served
    /// from the new shard; call again later.
    pub fn reopen(
        &mut self,
        mut opts: ShardOptions,
    ) -> Result<(EmbeddedShard, TruncateReport), StorageError> {
        if let Some(log) = self.log.take() {
            self.stats = Some(log.stats().clone());
            log.close();
        }
        if opts.log.stats.is_none() {
            opts.log.stats.clone_from(&self.stats);
        }
        if self.checkpointer.take().is_some() && !self.index.failed() {
            let _ = self.index.checkpoint_complete();
        }
        crate::log::probe_room(
            &self.dir.join("log"),
            opts.log.segment_bytes,
            opts.log.fault_hook.as_deref(),
        )?;
        let cut = crate::log::truncate_after(
            &self.dir.join("log"),
            self.durable,
            opts.log.fault_hook.as_deref(),
        )?;
        let shard = EmbeddedShard::open(&self.dir, opts)?;
        let last = shard.open_report().log.last_lsn;
        if last != self.durable {
            return Err(StorageError::Decode {
                table: "log",
                reason: format!(
                    "reopened at lsn {} but the log had made lsn {} durable",
                    last.0, self.durable.0
                ),
            });
        }
        Ok((shard, cut))
    }
}

/// The index's side of the log: applies each group commit's durable records on the log's I/O
/// thread. After a failure it only drops records (releasing their in-flight bytes): the log goes
/// on, readers see the failure through `wait_applied`, and reopening rebuilds the index from the
/// log.
fn read_model(index: Arc<DenseIndex>, hook: Option<Arc<dyn Fn() + Send + Sync>>) -> ReadModel {
    Box::new(move |recs: Vec<DurableRecord>| {
        if index.failed() {
            return;
        }
        if let Some(h) = &hook {
            h();
        }
        let views: Result<Vec<_>, _> = recs
            .iter()
            .map(|r| format::decode_record(&r.bytes).map(|v| (v, r.pos)))
            .collect();
        let res = match views {
            Ok(v) => index.apply(&v),
            Err(e) => Err(StorageError::Decode {
                table: "log record",
                reason: e.to_string(),
            }),
        };
        if let Err(e) = res {
            index.set_failed(e.to_string());
        }
        // Dropping `recs` releases their bytes from the log's in-flight count.
    })
}
