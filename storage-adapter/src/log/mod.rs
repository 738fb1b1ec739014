//! The embedded durable log: one segmented, append-only, checksummed file set per sequencer shard.
//!
//! The shard thread calls [`SegmentedLog::append`], which encodes the batch as one record, assigns
//! its lsns and hands it to the log's I/O thread over a channel — it never blocks. The I/O thread
//! group-commits: it takes everything queued (up to `group_bytes_max`), writes it with one
//! positioned write and one `fdatasync`, then advances the durable watermark that completions
//! watch. While one `fdatasync` is in flight the next group fills in the channel. A failed write or
//! `fdatasync` poisons the log: every pending and later completion fails; reopen to recover.

mod completion;
mod fault;
mod recovery;
mod retention;
mod truncate;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use completion::{Appended, Completion, CompletionSource, WakeFn};
pub use fault::{Fault, FaultHook, IoOp};
pub use recovery::RecoveryReport;
pub(crate) use recovery::list_segments;
pub use retention::{Reclaimer, RemoveHook, RetentionStats, SweepReport};
pub(crate) use truncate::probe_room;
pub use truncate::{TruncateReport, truncate_after};

use crate::error::LogError;
use crate::format::{self, RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX, SEGMENT_HEADER_BYTES};
use crate::stats::LogStats;
use crate::types::{Durability, Entry, Level, Lsn};
use completion::Watermarks;
use recovery::{SPARE_NAME, segment_name};

/// Options of a [`SegmentedLog`]. Every limit is fixed at open.
#[derive(Clone)]
pub struct LogOptions {
    /// Bytes of each segment file, preallocated (zero-filled and synced) before use.
    pub segment_bytes: u64,
    /// Most bytes one group commit writes (one write + one fdatasync).
    pub group_bytes_max: usize,
    /// Most bytes submitted but not yet completed; beyond it `append` returns
    /// [`LogError::Busy`] instead of growing memory.
    pub inflight_bytes_max: u64,
    /// Fault injection for tests (`None` in production).
    pub fault_hook: Option<Arc<dyn FaultHook>>,
    /// Called on the I/O thread after every group commit (and on failure).
    pub wake: Option<WakeFn>,
    /// Polls for the next batch this many times before the I/O thread sleeps. On virtual
    /// machines a sleeping vCPU can take milliseconds to wake; a short poll keeps a busy shard's
    /// commits at disk speed. 0 = always sleep.
    pub idle_polls: u32,
    /// A group commit starts no sooner than this after the previous one ended, so that the
    /// batches arriving meanwhile share its write and `fdatasync` (PostgreSQL's `commit_delay`,
    /// MySQL's `binlog_group_commit_sync_delay`). Every commit costs a write, an `fdatasync` and
    /// the sleeps and wake-ups around them whatever its size; at moderate load, committing as
    /// soon as anything is queued makes many tiny commits (docs/design/performance-decisions.md,
    /// "Commit interval"). A busy log, whose commits take longer than this, never waits.
    /// `Duration::ZERO`: commit as soon as anything is queued.
    pub commit_interval_min: Duration,
    /// Runs first on each thread the log starts, told which one it is: where the embedder
    /// places them (CPU, priority). This crate does not touch scheduling itself.
    pub thread_start: Option<ThreadStart>,
    /// Sealed segments whose pages the log leaves in the page cache. When one more is sealed,
    /// the oldest of them is released (`POSIX_FADV_DONTNEED`; all its pages are clean, as a
    /// sealed segment is synced) by the spare maker just before it zero-fills the next spare,
    /// so the spare is written into memory the kernel has just freed instead of pages nobody
    /// has touched yet (on a VM a first touch of a guest page can cost a host-side fault), and
    /// the log's share of the page cache stays bounded (docs/design/performance-decisions.md,
    /// "Sealed segments leave the page cache"). Reads of released segments (old history) go to
    /// the disk. `usize::MAX`: never release.
    pub cached_sealed_segments: usize,
    /// The statistics to count into; `None`: new ones. A log reopened in place continues its
    /// predecessor's (the metrics endpoint holds them).
    pub stats: Option<Arc<LogStats>>,
}

/// See [`LogOptions::thread_start`].
pub type ThreadStart = Arc<dyn Fn(LogThread) + Send + Sync>;

/// The threads a [`SegmentedLog`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogThread {
    /// Writes and syncs every group commit; each shard's acknowledgements wait for it.
    Writer,
    /// Zero-fills the next segment in the background.
    Spare,
    /// Writes the message index's checkpoints and keeps it within its memory budget.
    Index,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 * 1024 * 1024,
            group_bytes_max: 4 * 1024 * 1024,
            inflight_bytes_max: 64 * 1024 * 1024,
            fault_hook: None,
            wake: None,
            idle_polls: 0,
            commit_interval_min: Duration::ZERO,
            thread_start: None,
            cached_sealed_segments: 2,
            stats: None,
        }
    }
}

impl fmt::Debug for LogOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogOptions")
            .field("segment_bytes", &self.segment_bytes)
            .field("group_bytes_max", &self.group_bytes_max)
            .field("inflight_bytes_max", &self.inflight_bytes_max)
            .field("fault_hook", &self.fault_hook)
            .field("wake", &self.wake.is_some())
            .field("idle_polls", &self.idle_polls)
            .field("commit_interval_min", &self.commit_interval_min)
            .field("thread_start", &self.thread_start.is_some())
            .field("cached_sealed_segments", &self.cached_sealed_segments)
            .field("stats", &self.stats.is_some())
            .finish()
    }
}

/// Receives each group commit's durable records on the log's I/O thread (see
/// [`SegmentedLog::open_with`]).
pub(crate) type ReadModel = Box<dyn FnMut(Vec<DurableRecord>) + Send>;

/// A record that is durable, handed to whoever maintains a read model (the index).
///
/// Its bytes stay counted in the log's in-flight bytes until the record is dropped (applied):
/// a slow read model is backpressure on `append` ([`LogError::Busy`]), never unbounded memory.
#[derive(Debug)]
pub(crate) struct DurableRecord {
    pub(crate) bytes: Vec<u8>,
    /// Where the record sits in the log (the index points there).
    pub(crate) pos: RecordPos,
    marks: Arc<Watermarks>,
}

/// Where a record starts: its segment (by base lsn) and its byte offset in that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordPos {
    pub(crate) segment: Lsn,
    pub(crate) offset: u64,
}

/// Recovery alone (no writer, no I/O thread) on the log in `dir`: for
/// `crate::fuzzing::log_recovery`. `visit` sees every record kept, with its offset.
pub(crate) fn recover_only(
    dir: &Path,
    mut visit: impl FnMut(&format::RecordView<'_>, u64),
) -> Result<RecoveryReport, LogError> {
    recovery::recover(dir, Lsn::ZERO, |v, pos| visit(v, pos.offset)).map(|r| r.report)
}

/// The file of the segment starting at `base` in the log directory `dir`.
pub(crate) fn segment_path(dir: &Path, base: Lsn) -> PathBuf {
    dir.join(segment_name(base))
}

impl Drop for DurableRecord {
    fn drop(&mut self) {
        self.marks
            .inflight_bytes
            .fetch_sub(self.bytes.len() as u64, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Request {
    bytes: Vec<u8>,
    last_lsn: Lsn,
    sync: bool,
    /// Set when the writer places it in a segment.
    pos: RecordPos,
}

/// One shard's durable log. Owned by the shard thread (appends take `&mut self`).
pub struct SegmentedLog {
    dir: PathBuf,
    next_lsn: Lsn,
    segment_bytes: u64,
    inflight_bytes_max: u64,
    tx: Option<mpsc::Sender<Request>>,
    marks: Arc<Watermarks>,
    stats: Arc<LogStats>,
    io_thread: Option<JoinHandle<()>>,
    spare_thread: Option<JoinHandle<()>>,
    report: RecoveryReport,
}

impl fmt::Debug for SegmentedLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentedLog")
            .field("dir", &self.dir)
            .field("next_lsn", &self.next_lsn)
            .field("marks", &self.marks)
            .finish_non_exhaustive()
    }
}

impl SegmentedLog {
    /// Opens (creating if needed) the log in `dir`, recovering it first (see `recovery`).
    pub fn open(dir: &Path, opts: LogOptions) -> Result<SegmentedLog, LogError> {
        Self::open_with(dir, opts, Lsn::ZERO, |_, _| {}, None)
    }

    /// Opens the log; `visit` sees every recovered record; after each group commit's fdatasync
    /// (and after the completions and the wake callback have fired) the I/O thread hands the
    /// commit's records to `read_model`, inline: a slow read model delays the next commit, which
    /// is backpressure on `append` ([`LogError::Busy`] once the in-flight bytes run out).
    ///
    /// Sealed segments that end at or below `trusted_through` (the caller's checkpoint) are not
    /// read: `visit` sees only the records after them.
    pub(crate) fn open_with(
        dir: &Path,
        opts: LogOptions,
        trusted_through: Lsn,
        visit: impl FnMut(&format::RecordView<'_>, RecordPos),
        read_model: Option<ReadModel>,
    ) -> Result<SegmentedLog, LogError> {
        if opts.segment_bytes < (SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 1024) as u64 {
            return Err(LogError::InvalidBatch("segment_bytes too small"));
        }
        fs::create_dir_all(dir).map_err(|e| LogError::io("create_dir", dir, e))?;
        let rec = recovery::recover(dir, trusted_through, visit)?;
        let next_lsn = Lsn(rec.report.last_lsn.0 + 1);
        let cur = match rec.tail {
            Some((file, path, base, pos)) => {
                let len = file
                    .metadata()
                    .map_err(|e| LogError::io("stat", &path, e))?
                    .len();
                if len < opts.segment_bytes {
                    // Preallocate the rest now, so appends never grow the file.
                    zero_fill(&file, &path, len, opts.segment_bytes, false)?;
                    file.sync_all()
                        .map_err(|e| LogError::io("fsync", &path, e))?;
                }
                Some(Cur {
                    file,
                    path,
                    base,
                    pos,
                    capacity: len.max(opts.segment_bytes),
                })
            }
            None => None,
        };
        let marks = Arc::new(Watermarks::new(rec.report.last_lsn, opts.wake.clone()));
        let stats = opts.stats.clone().unwrap_or_default();
        let (tx, rx) = mpsc::channel();
        let (spare_req, spare_res, spare_thread) = spawn_spare_maker(
            dir,
            opts.segment_bytes,
            opts.fault_hook.clone(),
            opts.thread_start.clone(),
        )?;
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            hook: opts.fault_hook.clone(),
            group_bytes_max: opts.group_bytes_max,
            segment_bytes: opts.segment_bytes,
            idle_polls: opts.idle_polls,
            commit_interval_min: opts.commit_interval_min,
            cur,
            sealed: VecDeque::new(),
            cached_sealed_segments: opts.cached_sealed_segments,
            spare_req,
            spare_res,
            marks: marks.clone(),
            stats: stats.clone(),
            read_model,
            unsynced: Vec::new(),
            buf: Vec::with_capacity(opts.group_bytes_max + RECORD_PAYLOAD_BYTES_MAX.min(1 << 20)),
        };
        if writer.cur.is_none() {
            // Install the first segment now, so the first append does not wait for it.
            writer.roll(next_lsn)?;
        }
        let start = opts.thread_start.clone();
        let io_thread = std::thread::Builder::new()
            .name("starling-log-io".into())
            .spawn(move || {
                if let Some(f) = start {
                    f(LogThread::Writer);
                }
                writer.run(&rx);
            })
            .map_err(|e| LogError::io("spawn", dir, e))?;
        Ok(SegmentedLog {
            dir: dir.to_path_buf(),
            next_lsn,
            segment_bytes: opts.segment_bytes,
            inflight_bytes_max: opts.inflight_bytes_max,
            tx: Some(tx),
            marks,
            stats,
            io_thread: Some(io_thread),
            spare_thread: Some(spare_thread),
            report: rec.report,
        })
    }

    /// Appends `entries` as one record. Never blocks: the returned completion resolves once the
    /// batch reached level `L` (for [`crate::SyncData`]: written and fdatasync'ed), or fails if the
    /// log is poisoned before that.
    pub fn append<L: Level>(&mut self, entries: &[Entry]) -> Result<Completion<L>, LogError> {
        if let Some(e) = self.marks.failure() {
            return Err(e);
        }
        if entries.is_empty() {
            return Err(LogError::InvalidBatch("empty batch"));
        }
        let mut payload = 0usize;
        for e in entries {
            if e.body.len() > format::ENTRY_BODY_BYTES_MAX {
                return Err(LogError::InvalidBatch(
                    "entry body larger than ENTRY_BODY_BYTES_MAX",
                ));
            }
            payload += format::entry_bytes(e);
        }
        let record_bytes = RECORD_HEADER_BYTES + payload;
        if payload > RECORD_PAYLOAD_BYTES_MAX
            || (record_bytes + SEGMENT_HEADER_BYTES) as u64 > self.segment_bytes
            || entries.len() > u32::MAX as usize
        {
            return Err(LogError::InvalidBatch(
                "batch larger than a record or a segment",
            ));
        }
        let inflight = self.marks.inflight_bytes.load(Ordering::Acquire);
        if inflight > 0 && inflight + record_bytes as u64 > self.inflight_bytes_max {
            return Err(LogError::Busy {
                inflight_bytes: inflight,
                limit_bytes: self.inflight_bytes_max,
            });
        }
        let first = self.next_lsn;
        let last = Lsn(first.0 + entries.len() as u64 - 1);
        let mut bytes = Vec::with_capacity(record_bytes);
        format::encode_record(first, entries, &mut bytes);
        debug_assert_eq!(bytes.len(), record_bytes);
        let sync = L::DURABILITY == Durability::SyncData;
        let tx = self.tx.as_ref().ok_or(LogError::Closed)?;
        self.marks
            .inflight_bytes
            .fetch_add(record_bytes as u64, Ordering::AcqRel);
        if tx
            .send(Request {
                bytes,
                last_lsn: last,
                sync,
                pos: RecordPos {
                    segment: Lsn::ZERO,
                    offset: 0,
                },
            })
            .is_err()
        {
            self.marks
                .inflight_bytes
                .fetch_sub(record_bytes as u64, Ordering::AcqRel);
            return Err(self.marks.failure().unwrap_or(LogError::Closed));
        }
        self.next_lsn = Lsn(last.0 + 1);
        Ok(Completion::new(self.marks.clone(), first, last))
    }

    /// The lsn the next appended entry will get.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// The highest durable lsn, or the error that poisoned the log.
    pub fn durable_lsn(&self) -> Result<Lsn, LogError> {
        self.marks.durable()
    }

    /// Whether the log failed, and if so the highest lsn it had made durable before: every
    /// record after it was never acknowledged (see [`SegmentedLog::close`]).
    pub fn failed_at(&self) -> Option<(Lsn, LogError)> {
        self.marks.failure().map(|e| (self.marks.durable_mark(), e))
    }

    /// Stops the log: its I/O thread makes what was queued durable (unless the log failed) and
    /// exits, then the spare maker finishes the spare it is making and exits. When this
    /// returns, no thread of this log touches its files any more (dropping the log does not wait
    /// for the spare maker). Blocking.
    pub fn close(mut self) {
        self.stop();
        if let Some(t) = self.spare_thread.take() {
            let _ = t.join();
        }
    }

    fn stop(&mut self) {
        self.tx = None; // the I/O thread drains what was queued, then stops
        if let Some(t) = self.io_thread.take() {
            let _ = t.join();
        }
    }

    /// The highest lsn handed to the OS (durable against a process crash, not a power failure).
    pub fn written_lsn(&self) -> Lsn {
        self.marks.written()
    }

    /// What the I/O thread has done so far (for the metrics endpoint).
    pub fn stats(&self) -> &Arc<LogStats> {
        &self.stats
    }

    /// Bytes submitted but not yet completed.
    pub fn inflight_bytes(&self) -> u64 {
        self.marks.inflight_bytes.load(Ordering::Acquire)
    }

    /// What recovery found when this log was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads durable records with lsns from `from` on, in order, calling `visit` on each until
    /// it returns `false`. Blocking (reads segment files); for replay, sync and benchmarks.
    pub fn scan(
        &self,
        from: Lsn,
        mut visit: impl FnMut(&format::RecordView<'_>) -> bool,
    ) -> Result<(), LogError> {
        self.scan_at(from, |v, _| visit(v))
    }

    /// [`SegmentedLog::scan`], also telling where each record is.
    pub(crate) fn scan_at(
        &self,
        from: Lsn,
        visit: impl FnMut(&format::RecordView<'_>, RecordPos) -> bool,
    ) -> Result<(), LogError> {
        let until = self.durable_lsn()?;
        scan_dir(&self.dir, from, until, visit)
    }
}

impl Drop for SegmentedLog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the records of the log in `dir` from lsn `from` through `until` (see [`SegmentedLog::scan`]).
pub(crate) fn scan_dir(
    dir: &Path,
    from: Lsn,
    until: Lsn,
    mut visit: impl FnMut(&format::RecordView<'_>, RecordPos) -> bool,
) -> Result<(), LogError> {
    let segs = recovery::list_segments(dir)?;
    for (i, seg) in segs.iter().enumerate() {
        if seg.base > until {
            break;
        }
        if segs.get(i + 1).is_some_and(|n| n.base <= from) {
            continue;
        }
        let data = recovery::read_all(&seg.path)?;
        let mut pos = SEGMENT_HEADER_BYTES;
        while let Ok(view) = format::decode_record(data.get(pos..).unwrap_or(&[])) {
            if view.first_lsn > until {
                return Ok(());
            }
            let at = RecordPos {
                segment: seg.base,
                offset: pos as u64,
            };
            if view.last_lsn() >= from && !visit(&view, at) {
                return Ok(());
            }
            pos += view.total_bytes();
        }
    }
    Ok(())
}

/// Bytes of zeroes made durable per step of a paced [`zero_fill`].
const ZERO_SYNC_BYTES: u64 = 1 << 20;

/// Bytes of zeroes per `pwrite`. In a kernel built without preemption (`CONFIG_PREEMPT_NONE`) a
/// thread inside a `pwrite` keeps its core until the call returns, and a 1 MiB write of zeroes
/// into the page cache held the shard's core for milliseconds. 64 KiB calls return to user
/// space, where the scheduler can switch, 16 times as often (docs/design/performance-decisions.md,
/// "The spare segment").
const ZERO_WRITE_BYTES: usize = 64 << 10;

/// Writes zeroes over `from..to`. `paced`: make each [`ZERO_SYNC_BYTES`] durable before writing
/// the next, so the disk never holds more than that much zeroes ahead of the live segment's
/// commits. The spare maker runs beside a busy log: one `fsync` of a whole 64 MiB segment of
/// zeroes queued tens of milliseconds of writes in front of every commit's fdatasync
/// (docs/design/performance-decisions.md, "The spare segment").
fn zero_fill(file: &File, path: &Path, from: u64, to: u64, paced: bool) -> Result<(), LogError> {
    let zeros = vec![0u8; ZERO_WRITE_BYTES];
    let mut at = from;
    let mut unsynced = 0u64;
    while at < to {
        let n = ZERO_WRITE_BYTES.min((to - at) as usize);
        file.write_all_at(&zeros[..n], at)
            .map_err(|e| LogError::io("preallocate", path, e))?;
        at += n as u64;
        unsynced += n as u64;
        if paced && (unsynced >= ZERO_SYNC_BYTES || at >= to) {
            file.sync_data()
                .map_err(|e| LogError::io("fsync", path, e))?;
            unsynced = 0;
        }
    }
    Ok(())
}

/// The fault a test hook injects into preallocating `path` (`segment_bytes` long), if any.
pub(crate) fn preallocate_fault(
    path: &Path,
    segment_bytes: u64,
    hook: Option<&dyn FaultHook>,
) -> Result<(), LogError> {
    if let Some(h) = hook
        && let Some(f) = h.before(&IoOp::Preallocate {
            path,
            len: segment_bytes,
        })
    {
        let (Fault::Fail(e) | Fault::TornWrite(_, e)) = f;
        return Err(LogError::io("preallocate", path, e));
    }
    Ok(())
}

fn make_spare(
    dir: &Path,
    segment_bytes: u64,
    hook: Option<&dyn FaultHook>,
) -> Result<File, LogError> {
    let path = dir.join(SPARE_NAME);
    preallocate_fault(&path, segment_bytes, hook)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| LogError::io("create", &path, e))?;
    zero_fill(&file, &path, 0, segment_bytes, true)?;
    file.sync_all()
        .map_err(|e| LogError::io("fsync", &path, e))?;
    Ok(file)
}

/// Drops the page cache of a sealed segment (see [`LogOptions::cached_sealed_segments`]). Advice
/// only: a failure (which a regular file opened by this log cannot produce, and which the fault
/// hook can inject) leaves the pages cached and costs nothing else, so it is ignored.
fn release_cache(file: &File, path: &Path, hook: Option<&dyn FaultHook>) {
    if let Some(h) = hook
        && h.before(&IoOp::ReleaseCache { path }).is_some()
    {
        return;
    }
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}

/// What the writer asks of the spare maker: release a sealed segment's pages (if any), then
/// make the next spare.
type SpareRequest = Option<(File, PathBuf)>;

type SpareChannels = (
    mpsc::Sender<SpareRequest>,
    mpsc::Receiver<Result<File, LogError>>,
    JoinHandle<()>,
);

/// A helper thread that keeps one zero-filled, synced spare segment ready, so a segment switch
/// costs a rename and a directory fsync instead of writing a whole segment of zeroes. It also
/// releases the page cache of sealed segments, first, so the spare reuses that memory.
fn spawn_spare_maker(
    dir: &Path,
    segment_bytes: u64,
    hook: Option<Arc<dyn FaultHook>>,
    start: Option<ThreadStart>,
) -> Result<SpareChannels, LogError> {
    let (req_tx, req_rx) = mpsc::channel::<SpareRequest>();
    let (res_tx, res_rx) = mpsc::channel();
    let d = dir.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("starling-log-spare".into())
        .spawn(move || {
            if let Some(f) = start {
                f(LogThread::Spare);
            }
            while let Ok(release) = req_rx.recv() {
                if let Some((file, path)) = release {
                    release_cache(&file, &path, hook.as_deref());
                }
                if res_tx
                    .send(make_spare(&d, segment_bytes, hook.as_deref()))
                    .is_err()
                {
                    return;
                }
            }
        })
        .map_err(|e| LogError::io("spawn", dir, e))?;
    req_tx.send(None).map_err(|_| LogError::Closed)?;
    Ok((req_tx, res_rx, thread))
}

#[derive(Debug)]
struct Cur {
    file: File,
    path: PathBuf,
    base: Lsn,
    pos: u64,
    capacity: u64,
}

struct Writer {
    dir: PathBuf,
    hook: Option<Arc<dyn FaultHook>>,
    group_bytes_max: usize,
    segment_bytes: u64,
    idle_polls: u32,
    commit_interval_min: Duration,
    cur: Option<Cur>,
    /// Sealed segments still in the page cache, oldest first (at most
    /// [`LogOptions::cached_sealed_segments`] after each roll).
    sealed: VecDeque<(File, PathBuf)>,
    cached_sealed_segments: usize,
    spare_req: mpsc::Sender<SpareRequest>,
    spare_res: mpsc::Receiver<Result<File, LogError>>,
    marks: Arc<Watermarks>,
    stats: Arc<LogStats>,
    read_model: Option<ReadModel>,
    unsynced: Vec<Request>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Request>) {
        let mut group = Vec::new();
        let mut last_commit_end: Option<Instant> = None;
        while let Ok(first) = self.next_request(rx) {
            // Let the batches arriving just after a commit join the next one.
            if let Some(wait) = last_commit_end.and_then(|t| {
                self.commit_interval_min
                    .checked_sub(io_clock().saturating_duration_since(t))
            }) {
                std::thread::sleep(wait);
            }
            let mut bytes = first.bytes.len();
            group.push(first);
            while bytes < self.group_bytes_max {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.bytes.len();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            let sync = group.iter().any(|r| r.sync);
            let started = io_clock();
            let committed = self.commit(&mut group, sync);
            let ended = io_clock();
            last_commit_end = (!self.commit_interval_min.is_zero()).then_some(ended);
            match committed {
                Ok(()) => {
                    if sync {
                        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                        self.stats.commit.record(ended - started);
                    }
                    self.stats
                        .records
                        .fetch_add(group.len() as u64, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    let last = group.last().map_or(Lsn::ZERO, |r| r.last_lsn);
                    // Completions and the wake callback first: acknowledgements do not wait
                    // for the read model.
                    self.marks.advance(last, sync.then_some(last));
                    if self.read_model.is_none() {
                        self.marks
                            .inflight_bytes
                            .fetch_sub(bytes as u64, Ordering::AcqRel);
                        group.clear();
                        continue;
                    }
                    // With a read model attached, a record's bytes stay in flight until the
                    // read model has dropped it (see `DurableRecord`). It sees only what is
                    // durable.
                    self.unsynced.append(&mut group);
                    if sync {
                        self.apply_durable();
                    }
                }
                Err(e) => {
                    // Poison: never retry a failed fsync (the kernel may have dropped the dirty
                    // pages and a retry would "succeed" without the data).
                    self.marks.fail(e);
                    return;
                }
            }
        }
        // Channel closed (log dropped): make the buffered tail durable on a clean shutdown, and
        // hand the read model what became durable.
        if let Some(c) = &self.cur
            && c.file.sync_data().is_ok()
        {
            self.apply_durable();
        }
    }

    /// Hands the records written so far (now durable) to the read model, if there is one.
    fn apply_durable(&mut self) {
        let Some(apply) = self.read_model.as_mut() else {
            return;
        };
        if self.unsynced.is_empty() {
            return;
        }
        let marks = &self.marks;
        let recs = self
            .unsynced
            .drain(..)
            .map(|r| DurableRecord {
                bytes: r.bytes,
                pos: r.pos,
                marks: marks.clone(),
            })
            .collect();
        apply(recs);
    }

    fn next_request(&mut self, rx: &mpsc::Receiver<Request>) -> Result<Request, mpsc::RecvError> {
        for _ in 0..self.idle_polls {
            match rx.try_recv() {
                Ok(r) => return Ok(r),
                Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
            }
        }
        rx.recv()
    }

    fn commit(&mut self, group: &mut [Request], sync: bool) -> Result<(), LogError> {
        self.buf.clear();
        for r in group {
            let len = r.bytes.len() as u64;
            let fits = self.cur.as_ref().is_some_and(|c| {
                let header = if c.pos == 0 && self.buf.is_empty() {
                    SEGMENT_HEADER_BYTES as u64
                } else {
                    0
                };
                c.pos + self.buf.len() as u64 + header + len <= c.capacity
            });
            if !fits {
                self.flush_buf()?;
                if let Some(old) = self.cur.take() {
                    self.sync(&old)?; // seal: everything in a sealed segment is durable
                    self.sealed.push_back((old.file, old.path));
                }
                let first_lsn = Lsn(r.last_lsn.0 + 1 - u64::from(record_count(&r.bytes)));
                self.roll(first_lsn)?;
            }
            if let Some(c) = &self.cur
                && c.pos == 0
                && self.buf.is_empty()
            {
                self.buf
                    .extend_from_slice(&format::encode_segment_header(c.base));
            }
            if let Some(c) = &self.cur {
                r.pos = RecordPos {
                    segment: c.base,
                    offset: c.pos + self.buf.len() as u64,
                };
            }
            self.buf.extend_from_slice(&r.bytes);
        }
        self.flush_buf()?;
        if sync && let Some(c) = &self.cur {
            self.sync(c)?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(c) = self.cur.as_mut() else {
            return Err(LogError::Inconsistent {
                path: self.dir.clone(),
                reason: "no open segment".into(),
            });
        };
        let off = c.pos;
        if let Some(h) = &self.hook
            && let Some(f) = h.before(&IoOp::Write {
                path: &c.path,
                offset: off,
                len: self.buf.len(),
            })
        {
            return Err(match f {
                Fault::Fail(e) => LogError::io("write", &c.path, e),
                Fault::TornWrite(n, e) => {
                    let n = n.min(self.buf.len());
                    let _ = c.file.write_all_at(&self.buf[..n], off);
                    LogError::io("write", &c.path, e)
                }
            });
        }
        c.file
            .write_all_at(&self.buf, off)
            .map_err(|e| LogError::io("write", &c.path, e))?;
        c.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn sync(&self, c: &Cur) -> Result<(), LogError> {
        if let Some(h) = &self.hook
            && let Some(f) = h.before(&IoOp::SyncData { path: &c.path })
        {
            let (Fault::Fail(e) | Fault::TornWrite(_, e)) = f;
            return Err(LogError::io("fdatasync", &c.path, e));
        }
        c.file
            .sync_data()
            .map_err(|e| LogError::io("fdatasync", &c.path, e))
    }

    /// Installs the spare as the segment starting at `base` and asks for the next spare.
    fn roll(&mut self, base: Lsn) -> Result<(), LogError> {
        let started = io_clock();
        let file = match self.spare_res.recv() {
            Ok(r) => r?,
            Err(_) => make_spare(&self.dir, self.segment_bytes, self.hook.as_deref())?,
        };
        let path = self.dir.join(segment_name(base));
        if let Some(h) = &self.hook
            && let Some(f) = h.before(&IoOp::Install { path: &path })
        {
            let (Fault::Fail(e) | Fault::TornWrite(_, e)) = f;
            return Err(LogError::io("install", &path, e));
        }
        fs::rename(self.dir.join(SPARE_NAME), &path)
            .map_err(|e| LogError::io("rename", &path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LogError::io("fsync_dir", &self.dir, e))?;
        let release = if self.sealed.len() > self.cached_sealed_segments {
            self.sealed.pop_front()
        } else {
            None
        };
        let _ = self.spare_req.send(release);
        self.cur = Some(Cur {
            file,
            path,
            base,
            pos: 0,
            capacity: self.segment_bytes,
        });
        self.stats.segment_switch.record(started.elapsed());
        Ok(())
    }
}

/// The log writer's monotonic clock: it paces group commits (`commit_interval_min`) and times
/// segment switches ([`LogStats::segment_switch`]; the first switch runs on the thread that
/// opens the log). Nothing else in this crate reads a clock; callers pass time in.
#[allow(clippy::disallowed_methods)]
fn io_clock() -> Instant {
    Instant::now()
}

fn record_count(bytes: &[u8]) -> u32 {
    // Written by `encode_record` in this process: the header is there.
    let mut a = [0u8; 4];
    a.copy_from_slice(&bytes[12..16]);
    u32::from_le_bytes(a)
}
