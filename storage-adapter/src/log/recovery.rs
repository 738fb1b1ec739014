//! Recovery on open: scan every segment, keep the valid prefix, truncate a torn tail, refuse a
//! damaged record that has valid records after it.
//!
//! Rules (the why is in `docs/design/log.md`):
//! 1. Records must be valid (magic, bounds, CRC32C, framing) and their lsns contiguous.
//! 2. At the first invalid record, look for any valid record after it (rest of the segment and all
//!    later segments). Found: the bad record is not the tail, acknowledged data would be lost by
//!    truncating → refuse with [`LogError::Corrupt`] naming file and offset.
//! 3. Not found: the bad bytes are the torn tail of an unacknowledged write → zero them, delete
//!    later (empty) segments, fsync, and carry on from there.
//! 4. A non-last segment ends where zeroes start if the next segment begins at the next lsn.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::LogError;
use crate::format::{self, FormatError, RECORD_MAGIC, SEGMENT_HEADER_BYTES};
use crate::types::Lsn;

/// One segment file found in the log directory.
#[derive(Clone, Debug)]
pub(crate) struct SegmentFile {
    pub(crate) base: Lsn,
    pub(crate) path: PathBuf,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The last lsn in the log (`Lsn::ZERO` for an empty log).
    pub last_lsn: Lsn,
    /// Valid records found.
    pub records: u64,
    /// Segment files kept.
    pub segments: usize,
    /// Where a torn tail was cut: file and offset.
    pub truncated_at: Option<(PathBuf, u64)>,
    /// Bytes of torn tail (garbage or partial records) that were zeroed.
    pub zeroed_bytes: u64,
    /// Empty or torn segment files removed.
    pub removed_segments: usize,
    /// Sealed segments not read because the index had checkpointed them.
    pub skipped_segments: usize,
}

/// The state the writer continues from.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) report: RecoveryReport,
    /// The segment to append to, its path, base and the offset of its end; `None` = start a
    /// new segment at the first append.
    pub(crate) tail: Option<(File, PathBuf, Lsn, u64)>,
}

pub(crate) fn segment_name(base: Lsn) -> String {
    format!("{:020}.seg", base.0)
}

pub(crate) const SPARE_NAME: &str = "spare.tmp";

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |e| LogError::io(op, path, e)
}

/// Lists the segment files of `dir`, sorted by base lsn.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, LogError> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(io_err("read_dir", dir))? {
        let ent = ent.map_err(io_err("read_dir", dir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        let path = ent.path();
        let base = stem.parse::<u64>().map_err(|_| LogError::Inconsistent {
            path: path.clone(),
            reason: "segment file name is not <base lsn>.seg".into(),
        })?;
        out.push(SegmentFile {
            base: Lsn(base),
            path,
        });
    }
    out.sort_by_key(|s| s.base);
    Ok(out)
}

pub(crate) fn read_all(path: &Path) -> Result<Vec<u8>, LogError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(io_err("read", path))?;
    Ok(data)
}

/// Offset of the first valid record at or after `from` in `data`, if any.
fn find_valid_record(data: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + RECORD_MAGIC.len() <= data.len() {
        let rest = &data[at..];
        match rest.iter().position(|&b| b == RECORD_MAGIC[0]) {
            None => return None,
            Some(p) => at += p,
        }
        if data[at..].starts_with(&RECORD_MAGIC) && format::decode_record(&data[at..]).is_ok() {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Looks for any valid record after (`seg_index`, `offset`) in this and later segments.
fn valid_record_after(
    segs: &[SegmentFile],
    seg_index: usize,
    data: &[u8],
    offset: usize,
) -> Result<Option<(PathBuf, u64)>, LogError> {
    if let Some(at) = find_valid_record(data, offset + 1) {
        return Ok(Some((segs[seg_index].path.clone(), at as u64)));
    }
    for s in &segs[seg_index + 1..] {
        let d = read_all(&s.path)?;
        if let Some(at) = find_valid_record(&d, 0) {
            return Ok(Some((s.path.clone(), at as u64)));
        }
    }
    Ok(None)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync_dir", dir))
}

/// Scans and repairs the log in `dir`; `visit` sees every valid record in lsn order.
pub(crate) fn recover(
    dir: &Path,
    trusted_through: Lsn,
    mut visit: impl FnMut(&format::RecordView<'_>, super::RecordPos),
) -> Result<Recovered, LogError> {
    let spare = dir.join(SPARE_NAME);
    if spare.exists() {
        fs::remove_file(&spare).map_err(io_err("remove", &spare))?;
    }
    let segs = list_segments(dir)?;
    let mut report = RecoveryReport::default();
    let mut expected: Option<Lsn> = None; // next lsn; None until the first segment fixes it
    // (segment index, end offset) of the last segment holding a valid header.
    let mut tail: Option<(usize, u64)> = None;
    let mut cut: Option<(usize, usize)> = None; // (segment index, offset) of a torn tail

    'segments: for (i, seg) in segs.iter().enumerate() {
        // A sealed segment the caller has checkpointed (everything in it is at or below
        // `trusted_through`, and the next segment starts right after it) is not read again:
        // its records were checked when they were written and when they were indexed.
        if let Some(next) = segs.get(i + 1)
            && next.base.0 > seg.base.0
            && next.base.0 - 1 <= trusted_through.0
            && expected.is_none_or(|e| e == seg.base)
        {
            expected = Some(next.base);
            report.last_lsn = Lsn(next.base.0 - 1);
            report.skipped_segments += 1;
            continue;
        }
        let data = read_all(&seg.path)?;
        match format::decode_segment_header(&data) {
            Ok(base) if base == seg.base => {}
            Ok(base) => {
                return Err(LogError::Inconsistent {
                    path: seg.path.clone(),
                    reason: format!(
                        "header says base lsn {} but the name says {}",
                        base.0, seg.base.0
                    ),
                });
            }
            Err(reason) => {
                // A segment whose header never became durable: fine only at the tail.
                if let Some((path, at)) = valid_record_after(&segs, i, &data, 0)? {
                    return Err(LogError::Corrupt {
                        path: seg.path.clone(),
                        offset: 0,
                        reason,
                        next_valid_path: path,
                        next_valid_offset: at,
                    });
                }
                cut = Some((i, 0));
                break 'segments;
            }
        }
        let next = *expected.get_or_insert(seg.base);
        if seg.base != next {
            return Err(LogError::Inconsistent {
                path: seg.path.clone(),
                reason: format!(
                    "segment starts at lsn {} but lsn {} was expected",
                    seg.base.0, next.0
                ),
            });
        }
        let mut pos = SEGMENT_HEADER_BYTES;
        loop {
            let want = expected.unwrap_or(seg.base);
            let res = format::decode_record(&data[pos..]);
            match res {
                Ok(view) if view.first_lsn == want => {
                    visit(
                        &view,
                        super::RecordPos {
                            segment: seg.base,
                            offset: pos as u64,
                        },
                    );
                    report.records += 1;
                    report.last_lsn = view.last_lsn();
                    expected = Some(Lsn(view.last_lsn().0 + 1));
                    pos += view.total_bytes();
                }
                Ok(_) => {
                    return Err(LogError::Corrupt {
                        path: seg.path.clone(),
                        offset: pos as u64,
                        reason: FormatError::BadLength("record lsn is not the next lsn"),
                        next_valid_path: seg.path.clone(),
                        next_valid_offset: pos as u64,
                    });
                }
                Err(reason) => {
                    tail = Some((i, pos as u64));
                    let rest_zero = data[pos..].iter().all(|&b| b == 0);
                    let next_seg_continues =
                        segs.get(i + 1).is_some_and(|s| Some(s.base) == expected);
                    if rest_zero && (next_seg_continues || i + 1 == segs.len()) {
                        continue 'segments; // a sealed segment, or the zeroed tail of the last
                    }
                    if let Some((path, at)) = valid_record_after(&segs, i, &data, pos)? {
                        return Err(LogError::Corrupt {
                            path: seg.path.clone(),
                            offset: pos as u64,
                            reason,
                            next_valid_path: path,
                            next_valid_offset: at,
                        });
                    }
                    cut = Some((i, pos));
                    break 'segments;
                }
            }
        }
    }

    // Repair a torn tail: zero the garbage of the cut segment and remove later segments.
    if let Some((i, pos)) = cut {
        let seg = &segs[i];
        report.truncated_at = Some((seg.path.clone(), pos as u64));
        if pos == 0 {
            fs::remove_file(&seg.path).map_err(io_err("remove", &seg.path))?;
            report.removed_segments += 1;
        } else {
            let data = read_all(&seg.path)?;
            let end = data
                .iter()
                .rposition(|&b| b != 0)
                .map_or(pos, |p| p + 1)
                .max(pos);
            let f = OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(io_err("open", &seg.path))?;
            f.write_all_at(&vec![0u8; end - pos], pos as u64)
                .map_err(io_err("write", &seg.path))?;
            f.sync_data().map_err(io_err("fdatasync", &seg.path))?;
            report.zeroed_bytes = (end - pos) as u64;
        }
        for s in &segs[i + 1..] {
            fs::remove_file(&s.path).map_err(io_err("remove", &s.path))?;
            report.removed_segments += 1;
        }
        sync_dir(dir)?;
    }

    // `tail` only ever names a segment with a valid header, which the cut never removes.
    let tail = match tail {
        Some((i, end)) => {
            let seg = &segs[i];
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg.path)
                .map_err(io_err("open", &seg.path))?;
            Some((f, seg.path.clone(), seg.base, end))
        }
        None => None,
    };
    // A first segment that holds no record yet (its predecessors removed by retention, say):
    // the log goes on from its base.
    if report.records == 0
        && let Some(next) = expected
    {
        report.last_lsn = Lsn(next.0.saturating_sub(1));
    }
    report.segments = segs.len() - report.removed_segments;
    Ok(Recovered { report, tail })
}
