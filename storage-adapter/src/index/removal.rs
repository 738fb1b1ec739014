//! Retention's side of the index (`log/retention.rs` removes the files): forgetting the oldest
//! segments, and the last seqs of conversations that lose every entry with them.
//!
//! The removal record, `index/removed` (magic, the base of the first segment kept, count, sorted
//! `(conversation, last seq)`, CRC32C), is written (fsync, rename) before any file goes. Its
//! base is the decision: from then on the segments before it are gone, whatever a crash leaves
//! of their files — an open deletes what is left of them before the log recovers
//! ([`finish_removal`]), so nothing removed is ever served again. Its pairs are the **floors**: a
//! conversation whose every entry was in removed segments still continues after its last seq
//! (its next message gets the next seq, never 1 again); they are held in memory (24 bytes a
//! conversation) and served by `last_seq` when a conversation has no entry left.
//!
//! Order: (1) every complete segment is checkpointed, (2) the removal record is written, (3) the
//! index forgets the segments (in memory), (4) the caller deletes the segment files, (5) then
//! their index files ([`DenseIndex::drop_removed_files`]). A crash before (2) changes nothing;
//! after it, the next open finishes (4) and (5).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::PoisonError;

use crate::error::StorageError;
use crate::types::{ConvId, Lsn};

use super::DenseIndex;
use super::segfile;

pub(super) const REMOVED_FILE: &str = "removed";
const REMOVED_MAGIC: &[u8; 16] = b"starling-removd1";

/// What retention removed: segments before `before`, and the floors.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Removed {
    /// Every segment whose base is below it is removed.
    pub(crate) before: Lsn,
    /// Last seqs of conversations left without entries.
    pub(crate) floors: HashMap<ConvId, u64>,
}

/// Finishes a removal a crash interrupted: deletes the log segments (and index files) before the
/// removal record's base that are still there. Runs before the log recovers.
pub(crate) fn finish_removal(index_dir: &Path, log_dir: &Path) -> Result<Removed, StorageError> {
    let removed = load_removed(index_dir)?;
    if removed.before == Lsn::ZERO || !log_dir.exists() {
        return Ok(removed);
    }
    let mut any = false;
    for seg in crate::log::list_segments(log_dir)? {
        if seg.base < removed.before {
            fs::remove_file(&seg.path).map_err(|source| StorageError::Fs {
                op: "remove a removed segment",
                path: seg.path.clone(),
                source,
            })?;
            any = true;
        }
    }
    if any {
        File::open(log_dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StorageError::Fs {
                op: "sync log dir",
                path: log_dir.to_path_buf(),
                source,
            })?;
    }
    Ok(removed)
}

/// Reads `dir/removed`; empty if there is none. `Err` if it is damaged: what was removed and the
/// seqs of conversations it emptied would be unknown, so open refuses rather than guess.
pub(crate) fn load_removed(dir: &Path) -> Result<Removed, StorageError> {
    let path = dir.join(REMOVED_FILE);
    let b = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Removed::default()),
        Err(source) => {
            return Err(StorageError::Fs {
                op: "read removal record",
                path,
                source,
            });
        }
    };
    decode_removed(&b).ok_or_else(|| StorageError::Decode {
        table: "removal record",
        reason: format!(
            "{} is damaged: what retention removed and the last seqs of the conversations it \
             emptied are unknown",
            path.display()
        ),
    })
}

fn decode_removed(b: &[u8]) -> Option<Removed> {
    let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc || body.get(..16)? != REMOVED_MAGIC {
        return None;
    }
    let before = Lsn(u64::from_le_bytes(body.get(16..24)?.try_into().ok()?));
    let n = usize::try_from(u64::from_le_bytes(body.get(24..32)?.try_into().ok()?)).ok()?;
    let rest = body.get(32..)?;
    if rest.len() != n.checked_mul(24)? {
        return None;
    }
    let mut out = HashMap::with_capacity(n);
    for c in rest.chunks_exact(24) {
        let conv = ConvId(u128::from_le_bytes(c[..16].try_into().ok()?));
        let seq = u64::from_le_bytes(c[16..].try_into().ok()?);
        if out.insert(conv, seq).is_some() {
            return None;
        }
    }
    Some(Removed {
        before,
        floors: out,
    })
}

fn write_removed(dir: &Path, removed: &Removed) -> Result<(), StorageError> {
    let mut sorted: Vec<_> = removed.floors.iter().map(|(c, s)| (c.0, *s)).collect();
    sorted.sort_unstable();
    let mut b = Vec::with_capacity(36 + sorted.len() * 24);
    b.extend_from_slice(REMOVED_MAGIC);
    b.extend_from_slice(&removed.before.0.to_le_bytes());
    b.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    for (c, s) in sorted {
        b.extend_from_slice(&c.to_le_bytes());
        b.extend_from_slice(&s.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let path = dir.join(REMOVED_FILE);
    let tmp = dir.join("removed.tmp");
    let fs_err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageError::Fs { op, path, source }
    };
    let mut f = File::create(&tmp).map_err(fs_err("create removal record", &tmp))?;
    f.write_all(&b)
        .map_err(fs_err("write removal record", &tmp))?;
    f.sync_all().map_err(fs_err("sync removal record", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(fs_err("rename removal record", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fs_err("sync index dir", dir))
}

impl DenseIndex {
    /// Retention (`log/retention.rs`): forgets every segment that starts before `base` (all
    /// sealed and applied: the caller removes only such segments), so each conversation loses
    /// a prefix of its seqs; one that loses all of them keeps its last seq as a floor. Call
    /// before deleting the segment files, and [`Self::drop_removed_files`] after.
    pub(crate) fn forget_segments_before(&self, base: Lsn) -> Result<(), StorageError> {
        // (1) Every segment to forget must have its index file (the directory of what it held).
        self.checkpoint_complete()?;
        let _one = self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (cut, doomed, kept) = {
            let st = self.read();
            let cut = st.segs.partition_point(|s| *s < base);
            if cut as u32 > st.live_from {
                return Err(StorageError::Unavailable(format!(
                    "segment {} is not checkpointed yet; retention tries again later",
                    st.segs[st.live_from as usize].0
                )));
            }
            let doomed: Vec<_> = st.ixs[..cut].iter().flatten().cloned().collect();
            let kept: Vec<_> = st.ixs[cut..].iter().flatten().cloned().collect();
            (cut as u32, doomed, kept)
        };
        if doomed.is_empty() {
            return Ok(());
        }
        // (2) The last seq of every conversation in the doomed segments that has no entry left
        // in the kept ones (resident, in a live segment, or in a kept index file).
        let mut last: HashMap<ConvId, u64> = HashMap::new();
        for ix in &doomed {
            for (conv, end) in ix.conversations()? {
                let l = last.entry(conv).or_default();
                *l = (*l).max(end - 1);
            }
        }
        let mut floors = self
            .floors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (conv, seq) in last {
            let resident_kept = self
                .read()
                .convs
                .get(&conv)
                .is_some_and(|c| c.ptrs.iter().any(|p| !p.is_hole() && p.seg >= cut));
            let mut has_kept = resident_kept;
            for ix in kept.iter().rev() {
                if has_kept {
                    break;
                }
                has_kept = ix.lookup(conv)?.is_some();
            }
            if has_kept {
                floors.remove(&conv);
            } else if floors.get(&conv).is_none_or(|&f| f < seq) {
                floors.insert(conv, seq);
            }
        }
        let removed = Removed {
            before: base,
            floors,
        };
        write_removed(&self.dir, &removed)?;
        let floors = removed.floors;
        // (3) Forget: index file heads, resident pointers into the doomed segments.
        {
            let mut st = self.write();
            let st = &mut *st;
            for k in 0..cut as usize {
                if let Some(ix) = st.ixs[k].take() {
                    st.head_bytes -= ix.memory_bytes();
                    st.entries -= ix.entries;
                }
            }
            let mut freed = 0;
            for t in 0..super::resident::SPLIT_TABLES {
                st.convs.table_mut(t).retain(|_, c| {
                    let before = c.cost();
                    c.trim(cut, 0);
                    freed += before.saturating_sub(if c.ptrs.is_empty() { 0 } else { c.cost() });
                    !c.ptrs.is_empty()
                });
            }
            st.resident_bytes = st.resident_bytes.saturating_sub(freed);
            st.floor_bytes = floors.len() * 24;
        }
        *self.floors.lock().unwrap_or_else(PoisonError::into_inner) = floors;
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|b, _| *b >= base);
        Ok(())
    }

    /// After retention deleted the segment files before `base`: their index files go too.
    pub(crate) fn drop_removed_files(&self, base: Lsn) -> Result<(), StorageError> {
        for ent in fs::read_dir(&self.dir).map_err(|source| StorageError::Fs {
            op: "read index dir",
            path: self.dir.clone(),
            source,
        })? {
            let ent = ent.map_err(|source| StorageError::Fs {
                op: "read index dir",
                path: self.dir.clone(),
                source,
            })?;
            let name = ent.file_name();
            if segfile::parse_name(&name.to_string_lossy()).is_some_and(|b| b < base) {
                fs::remove_file(ent.path()).map_err(|source| StorageError::Fs {
                    op: "remove index file",
                    path: ent.path(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// The last seq of `conv` if retention removed every entry of it.
    pub(super) fn floor(&self, conv: ConvId) -> Option<u64> {
        self.floors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&conv)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_records_round_trip_and_refuse_any_damage() {
        let dir = tempfile::tempdir().unwrap();
        let removed = Removed {
            before: Lsn(77),
            floors: [(ConvId(7), 3), (ConvId(u128::MAX), 9)].into(),
        };
        write_removed(dir.path(), &removed).unwrap();
        assert_eq!(load_removed(dir.path()).unwrap(), removed);
        let b = fs::read(dir.path().join(REMOVED_FILE)).unwrap();
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_removed(&bad).is_none(), "flipped byte {i} accepted");
        }
        assert!(decode_removed(&b[..b.len() - 1]).is_none());
        assert_eq!(
            load_removed(&dir.path().join("none")).unwrap(),
            Removed::default()
        );
    }
}
