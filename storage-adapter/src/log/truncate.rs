//! Cutting a failed log back to what it made durable, before it is reopened in place.
//!
//! A log that failed (a write or `fdatasync` error) knows the last lsn it made durable; every
//! record after it was never acknowledged: its sender heard "outcome unknown" or "not stored".
//! Some of those bytes may have reached the disk all the same (part of a group can be written
//! before the step that failed). A restart's recovery would keep any of them that are whole,
//! which is safe after a crash (a retry with `first_attempt = false` finds them), but a log
//! reopened in place must not bring back a message the server already answered as refused
//! while it kept serving: so the bytes after the durable lsn are zeroed, and segments holding
//! nothing durable removed, before recovery runs. The rules (`docs/design/log.md`, "Recovery
//! in place"):
//!
//! 1. In the segment holding the last durable record, everything after that record is zeroed.
//! 2. A segment starting right after the last durable lsn keeps its header (so the segment
//!    before it stays sealed, as the index's checkpoint of it assumes) and is zeroed after it.
//! 3. Every later segment is removed.
//! 4. The zeroed files and the directory are synced before the log is opened.
//!
//! Before the cut, [`probe_room`] checks that the log can go on at all: it writes and syncs a
//! file the size of a segment, then removes it. Without it a reopen on a disk that is still full
//! (or read-only) could succeed, as the segment in use is preallocated, and the log would fail
//! again at its next segment: the shard would flap between failed and serving.
//!
//! Every zeroing write and sync goes through the log's fault hook, like the writer's: a fault
//! still present makes the cut fail, and the caller tries again later.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::recovery::{list_segments, read_all};
use super::{Fault, FaultHook, IoOp};
use crate::error::LogError;
use crate::format::{self, SEGMENT_HEADER_BYTES};
use crate::types::Lsn;

/// What [`truncate_after`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TruncateReport {
    /// Bytes after the last durable record that were not zero and were zeroed.
    pub zeroed_bytes: u64,
    /// Segment files removed (they held nothing durable).
    pub removed_segments: usize,
}

/// Zeroes every record after lsn `last` in the log in `dir` and removes the segments that hold
/// only such records (see the module's rules). `last` must be a record boundary (a durable
/// watermark always is). Idempotent: a second cut after a failed one finishes the work.
pub fn truncate_after(
    dir: &Path,
    last: Lsn,
    hook: Option<&dyn FaultHook>,
) -> Result<TruncateReport, LogError> {
    let mut report = TruncateReport::default();
    let segs = list_segments(dir)?;
    let boundary = last.0 + 1;
    let mut cut = false;
    for (i, seg) in segs.iter().enumerate() {
        if cut || seg.base.0 > boundary {
            fs::remove_file(&seg.path).map_err(|e| LogError::io("remove", &seg.path, e))?;
            report.removed_segments += 1;
            cut = true;
            continue;
        }
        if segs.get(i + 1).is_some_and(|n| n.base.0 <= boundary) {
            continue; // wholly at or below `last`: durable, untouched
        }
        cut = true; // every later segment goes (rule 3)
        let data = read_all(&seg.path)?;
        let keep = if seg.base.0 == boundary {
            // Rule 2: nothing durable in it; its header stays.
            SEGMENT_HEADER_BYTES.min(data.len())
        } else {
            end_of(&data, last, &seg.path)?
        };
        let nonzero_end = data
            .iter()
            .rposition(|&b| b != 0)
            .map_or(keep, |p| p + 1)
            .max(keep);
        if nonzero_end > keep {
            zero(&seg.path, keep, nonzero_end - keep, hook)?;
            report.zeroed_bytes += (nonzero_end - keep) as u64;
        }
    }
    if report.removed_segments > 0 {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LogError::io("fsync_dir", dir, e))?;
    }
    Ok(report)
}

/// The name of the file [`probe_room`] writes (removed again; a leftover one is harmless).
pub(crate) const PROBE_NAME: &str = "reopen.probe";

/// Checks that the log in `dir` can make its next segment: writes `segment_bytes` of zeroes
/// to a new file, syncs it and removes it. Asks the fault hook first (as a preallocation).
pub(crate) fn probe_room(
    dir: &Path,
    segment_bytes: u64,
    hook: Option<&dyn FaultHook>,
) -> Result<(), LogError> {
    let path = dir.join(PROBE_NAME);
    super::preallocate_fault(&path, segment_bytes, hook)?;
    let filled = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| LogError::io("create", &path, e))
        .and_then(|f| {
            super::zero_fill(&f, &path, 0, segment_bytes, true)?;
            f.sync_all().map_err(|e| LogError::io("fsync", &path, e))
        });
    let removed = fs::remove_file(&path);
    filled?;
    removed.map_err(|e| LogError::io("remove", &path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io("fsync_dir", dir, e))
}

/// The offset just after the record of `data` (a segment) that ends at lsn `last`; the header's
/// end if `last` is before the segment's first record.
fn end_of(data: &[u8], last: Lsn, path: &Path) -> Result<usize, LogError> {
    let mut pos = SEGMENT_HEADER_BYTES;
    while let Ok(view) = format::decode_record(data.get(pos..).unwrap_or(&[])) {
        if view.first_lsn > last {
            break;
        }
        if view.last_lsn() > last {
            return Err(LogError::Inconsistent {
                path: path.to_path_buf(),
                reason: format!(
                    "the durable lsn {} falls inside the record at offset {pos}",
                    last.0
                ),
            });
        }
        pos += view.total_bytes();
        if view.last_lsn() == last {
            return Ok(pos);
        }
    }
    if pos == SEGMENT_HEADER_BYTES {
        return Ok(pos);
    }
    Err(LogError::Inconsistent {
        path: path.to_path_buf(),
        reason: format!(
            "the durable lsn {} is not in the segment that should hold it",
            last.0
        ),
    })
}

fn zero(path: &Path, at: usize, len: usize, hook: Option<&dyn FaultHook>) -> Result<(), LogError> {
    if let Some(h) = hook
        && let Some(f) = h.before(&IoOp::Write {
            path,
            offset: at as u64,
            len,
        })
    {
        let (Fault::Fail(e) | Fault::TornWrite(_, e)) = f;
        return Err(LogError::io("write", path, e));
    }
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LogError::io("open", path, e))?;
    f.write_all_at(&vec![0u8; len], at as u64)
        .map_err(|e| LogError::io("write", path, e))?;
    if let Some(h) = hook
        && let Some(f) = h.before(&IoOp::SyncData { path })
    {
        let (Fault::Fail(e) | Fault::TornWrite(_, e)) = f;
        return Err(LogError::io("fdatasync", path, e));
    }
    f.sync_data()
        .map_err(|e| LogError::io("fdatasync", path, e))
}
