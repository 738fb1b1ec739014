//! Entry points for the cargo-fuzz targets in `fuzz/` over every decoder of data at rest: log
//! records, segment headers, log recovery, metadata records and segment index files. The unit tests below run
//! them over the committed corpus (`fuzz/corpus/<target>/`) and over fresh encodings.
//!
//! A checksum stops random bytes at the first check, so where a format has one, an odd first
//! input byte makes the target seal the rest with a valid checksum (and magic) first: the
//! fuzzer then reaches the framing and field checks behind it, which is where a bug in a
//! decoder of damaged-but-checksummed data (a writer bug, a misdirected write) would hide.
//!
//! Each target asserts that its decoder never panics and that whatever it accepts is exactly
//! what the matching encoder writes (so no damaged value is silently read as another one).

use std::fmt::Debug;

use crate::format::{
    self, RECORD_HEADER_BYTES, RECORD_MAGIC, RECORD_PAYLOAD_BYTES_MAX, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
};
use crate::meta::{self, Record};

/// A log record (the unit the log appends and recovery scans).
pub fn log_record(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 && b.len() >= RECORD_HEADER_BYTES {
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        let len = (b.len() - RECORD_HEADER_BYTES).min(RECORD_PAYLOAD_BYTES_MAX);
        b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = crc32c::crc32c(&b[8..RECORD_HEADER_BYTES + len]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(view) = format::decode_record(&b) else {
        return;
    };
    let entries = view
        .entries()
        .expect("decode_record accepted a record whose entries do not decode");
    assert_eq!(entries.len(), view.count as usize);
    assert!(view.last_lsn() >= view.first_lsn);
    let mut again = Vec::new();
    format::encode_record(view.first_lsn, &entries, &mut again);
    assert_eq!(
        again,
        &b[..view.total_bytes()],
        "an accepted record re-encodes to other bytes"
    );
}

/// Input bytes consumed front to back; zeroes once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
}

/// Recovery of a damaged segment. The input writes a valid segment (header, one to six records
/// of one to three entries, a zeroed preallocated tail), then damages it (byte flips, a torn
/// end), and recovery runs on it twice. Checked, against what was damaged:
/// - nothing damaged: every record comes back;
/// - it never returns records that were not written, or out of order;
/// - it never opens having dropped a record that is intact after a damaged one (that would
///   silently lose acknowledged data): either it keeps exactly the records before the first
///   damaged one, or it refuses with `Corrupt`, and then only pointing at bytes that do decode
///   as a record;
/// - a repaired log opens the second time with the same records and nothing more to repair.
pub fn log_recovery(data: &[u8]) {
    let _ = recovery_outcome(data);
}

/// What [`log_recovery`] saw recovery do.
#[derive(Debug, PartialEq, Eq)]
enum Recovery {
    /// Opened, keeping this many records.
    Kept(usize),
    /// Refused with `Corrupt`.
    Refused,
}

fn recovery_outcome(data: &[u8]) -> Recovery {
    use crate::LogError;
    use crate::types::*;
    let mut input = Input(data);
    let mut seg = format::encode_segment_header(Lsn(1)).to_vec();
    // (start, end, first lsn, entries) of each record written.
    let mut written: Vec<(usize, usize, Lsn, Vec<Entry>)> = Vec::new();
    let mut lsn = 1u64;
    for _ in 0..1 + input.byte() % 6 {
        let entries: Vec<Entry> = (0..1 + u64::from(input.byte() % 3))
            .map(|k| {
                let body_len = usize::from(input.byte() % 80);
                let fill = input.byte();
                Entry {
                    kind: EntryKind::MESSAGE,
                    conv: ConvId(1),
                    seq: Seq(lsn + k),
                    client_msg_id: ClientMsgId([(lsn + k) as u8; 16]),
                    sender: UserId(7),
                    sender_device: DeviceId(1),
                    ts_ms: TimestampMs(1_700_000_000_000),
                    content_type: 0,
                    body: vec![fill; body_len],
                }
            })
            .collect();
        let start = seg.len();
        format::encode_record(Lsn(lsn), &entries, &mut seg);
        lsn += entries.len() as u64;
        written.push((start, seg.len(), Lsn(lsn - entries.len() as u64), entries));
    }
    let mut original = seg;
    original.resize(original.len() + 16 * usize::from(input.byte()), 0);
    let mut file = original.clone();
    for _ in 0..input.byte() % 5 {
        let at = usize::from(input.u16()) % file.len();
        file[at] ^= input.byte().max(1);
    }
    if input.byte() & 1 == 1 {
        file.truncate(usize::from(input.u16()) % (file.len() + 1));
    }
    let intact = |from: usize, to: usize| to <= file.len() && file[from..to] == original[from..to];
    let header_ok = intact(0, SEGMENT_HEADER_BYTES);
    let first_bad = written.iter().position(|r| !intact(r.0, r.1));

    let dir = scratch_dir();
    std::fs::write(dir.join(format!("{:020}.seg", 1)), &file).expect("write the segment");
    let mut got: Vec<(Lsn, Vec<Entry>, u64)> = Vec::new();
    let res = crate::log::recover_only(&dir, |v, off| {
        got.push((
            v.first_lsn,
            v.entries().expect("a kept record decodes"),
            off,
        ));
    });
    let outcome = match res {
        Ok(_) => {
            let keep = if header_ok {
                first_bad.unwrap_or(written.len())
            } else {
                0
            };
            let want: Vec<(Lsn, Vec<Entry>, u64)> = written[..keep]
                .iter()
                .map(|r| (r.2, r.3.clone(), r.0 as u64))
                .collect();
            assert!(
                got == want,
                "recovery kept {got:?}, not the records before the damage"
            );
            if let Some(d) = first_bad.or((!header_ok).then_some(0)) {
                let lost = written[d..].iter().position(|r| intact(r.0, r.1));
                assert!(
                    lost.is_none(),
                    "recovery opened without record {:?}, which is intact after damage",
                    lost.map(|i| i + d)
                );
            }
            let mut again = Vec::new();
            let rep = crate::log::recover_only(&dir, |v, off| {
                again.push((v.first_lsn, v.entries().expect("decodes"), off));
            })
            .expect("a repaired log opens");
            assert!(again == got, "a second recovery read other records");
            assert!(
                rep.truncated_at.is_none() && rep.zeroed_bytes == 0,
                "a repaired log needed repair again: {rep:?}"
            );
            Recovery::Kept(got.len())
        }
        Err(LogError::Corrupt {
            next_valid_offset, ..
        }) => {
            assert!(
                first_bad.is_some() || !header_ok,
                "refused an undamaged log"
            );
            let at = usize::try_from(next_valid_offset).expect("offset fits");
            assert!(
                file.get(at..)
                    .is_some_and(|b| format::decode_record(b).is_ok()),
                "refused, naming offset {at}, where no record decodes"
            );
            Recovery::Refused
        }
        Err(e) => panic!("recovery failed with {e}"),
    };
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// A fresh empty directory for one run (in /dev/shm when there is one).
fn scratch_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUN: AtomicU64 = AtomicU64::new(0);
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "starling-fuzz-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch dir");
    dir
}

/// A segment file's header.
pub fn segment_header(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 && b.len() >= SEGMENT_HEADER_BYTES {
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..32]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(base) = format::decode_segment_header(&b) else {
        return;
    };
    assert_eq!(
        format::encode_segment_header(base).as_slice(),
        &b[..SEGMENT_HEADER_BYTES],
        "an accepted segment header re-encodes to other bytes"
    );
}

fn meta_round_trip<R: Record + Debug + PartialEq>(b: &[u8]) {
    let Ok(rec) = meta::decode::<R>(b) else {
        return;
    };
    assert_eq!(
        meta::encode(&rec),
        b,
        "an accepted {} record re-encodes to other bytes: {rec:?}",
        R::TABLE
    );
    let _ = rec.key();
}

/// A metadata record; the first byte picks its table.
pub fn meta_record(data: &[u8]) {
    use crate::accounts::{Counter, DeviceSession, RateWindow, RefreshToken};
    use crate::meta::*;
    let Some((&table, b)) = data.split_first() else {
        return;
    };
    match table % 28 {
        0 => meta_round_trip::<User>(b),
        1 => meta_round_trip::<IdentIndex>(b),
        2 => meta_round_trip::<Device>(b),
        3 => meta_round_trip::<Session>(b),
        4 => meta_round_trip::<OtpRecord>(b),
        5 => meta_round_trip::<Group>(b),
        6 => meta_round_trip::<Member>(b),
        7 => meta_round_trip::<MemberOf>(b),
        8 => meta_round_trip::<ContactIndex>(b),
        9 => meta_round_trip::<SignedPrekey>(b),
        10 => meta_round_trip::<OneTimePrekey>(b),
        11 => meta_round_trip::<PushToken>(b),
        12 => meta_round_trip::<Block>(b),
        13 => meta_round_trip::<DirectPair>(b),
        14 => meta_round_trip::<DirectConv>(b),
        // Version 2 of groups and members, and former members.
        15 => meta_round_trip::<Group>(b),
        16 => meta_round_trip::<Member>(b),
        17 => meta_round_trip::<FormerMember>(b),
        18 => meta_round_trip::<Contact>(b),
        19 => meta_round_trip::<Presence>(b),
        // Version 2 of users, and the account records of `crate::accounts`.
        20 => meta_round_trip::<User>(b),
        21 => meta_round_trip::<RefreshToken>(b),
        22 => meta_round_trip::<DeviceSession>(b),
        23 => meta_round_trip::<RateWindow>(b),
        24 => meta_round_trip::<Counter>(b),
        // The key directory's records of `crate::keys`.
        25 => meta_round_trip::<crate::keys::DeviceIdentity>(b),
        // The push notifier's outbox and dead letters.
        26 => meta_round_trip::<crate::push::OutboxEntry>(b),
        _ => meta_round_trip::<crate::push::DeadLetter>(b),
    }
}

/// A sealed segment's index file: opening it and looking conversations up returns errors for
/// anything damaged, never panics, never reads out of bounds.
pub fn segment_index(data: &[u8]) {
    let dir = scratch_dir();
    crate::index::fuzz_segment_index(data, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::format::tests::entry;
    use crate::types::*;

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            out.push(std::fs::read(ent.unwrap().path()).unwrap());
        }
        assert!(!out.is_empty(), "no seeds in {}", dir.display());
        out
    }

    fn sealed(mode: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![mode];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn committed_corpus_replays() {
        for s in corpus("log_record") {
            log_record(&s);
        }
        for s in corpus("segment_header") {
            segment_header(&s);
        }
        for s in corpus("meta_record") {
            meta_record(&s);
        }
        for s in corpus("segment_index") {
            segment_index(&s);
        }
        for s in corpus("log_recovery") {
            log_recovery(&s);
        }
    }

    #[test]
    fn recovery_target_covers_the_cases_it_names() {
        // Three records of one 5-byte entry each (97 bytes; the first at offset 32), then the
        // zeroed tail, the flips (offset, xor) and the torn end (offset) of each case.
        let three: &[u8] = &[2, 0, 5, 0xAA, 0, 5, 0xAA, 0, 5, 0xAA];
        let case = |rest: &[u8]| recovery_outcome(&[three, rest].concat());
        let (second, last) = (32u16 + 97 + 30, 32u16 + 2 * 97 + 30);
        let [s0, s1] = second.to_le_bytes();
        let [l0, l1] = last.to_le_bytes();
        let [t0, t1] = (last - 10).to_le_bytes();
        assert_eq!(case(&[4, 0, 0]), Recovery::Kept(3), "undamaged");
        assert_eq!(
            case(&[4, 1, s0, s1, 0xFF, 0]),
            Recovery::Refused,
            "middle flip"
        );
        assert_eq!(
            case(&[4, 1, l0, l1, 0xFF, 0]),
            Recovery::Kept(2),
            "last flip"
        );
        assert_eq!(case(&[0, 0, 1, t0, t1]), Recovery::Kept(2), "torn end");
        assert_eq!(
            case(&[0, 1, 3, 0, 0x10, 0]),
            Recovery::Refused,
            "header flip"
        );
        assert_eq!(
            case(&[4, 1, 0x54, 1, 0x10, 0]),
            Recovery::Kept(3),
            "garbage in the tail"
        ); // offset 340
    }

    #[test]
    fn fresh_encodings_pass_every_target() {
        let mut rec = Vec::new();
        format::encode_record(Lsn(5), &[entry(1, b"hi"), entry(2, &[0xAB; 300])], &mut rec);
        log_record(&sealed(0, &rec));
        log_record(&sealed(1, &rec));
        let h = format::encode_segment_header(Lsn(77));
        segment_header(&sealed(0, &h));
        segment_header(&sealed(1, &h));
        for (i, b) in meta::tests_support::sample_records().iter().enumerate() {
            meta_record(&sealed(i as u8, b));
        }
        segment_index(&crate::index::sample_segment_index());
    }

    /// The committed seed files of `fuzz/corpus/` are what today's encoders write, so the fuzz
    /// targets start from valid data of the current formats. After a deliberate format change,
    /// `STARLING_BLESS=1 cargo test -p starling-storage fuzz_seeds` rewrites them.
    #[test]
    fn fuzz_seeds_match_the_encoders() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let bless = std::env::var_os("STARLING_BLESS").is_some();
        let mut stale = Vec::new();
        let mut put = |target: &str, name: &str, bytes: &[u8]| {
            let path = root.join(target).join(name);
            if bless {
                std::fs::create_dir_all(root.join(target)).unwrap();
                std::fs::write(&path, bytes).unwrap();
            } else if std::fs::read(&path).ok().as_deref() != Some(bytes) {
                stale.push(path.display().to_string());
            }
        };
        let mut rec = Vec::new();
        format::encode_record(Lsn(5), &[entry(1, b"hi"), entry(2, b"")], &mut rec);
        put("log_record", "seed-two-entries", &sealed(0, &rec));
        put("log_record", "seed-two-entries-sealed", &sealed(1, &rec));
        put(
            "segment_header",
            "seed-base-77",
            &sealed(0, &format::encode_segment_header(Lsn(77))),
        );
        for (i, b) in meta::tests_support::sample_records().iter().enumerate() {
            put(
                "meta_record",
                &format!("seed-table-{i:02}"),
                &sealed(i as u8, b),
            );
        }
        let three: &[u8] = &[2, 0, 5, 0xAA, 0, 5, 0xAA, 0, 5, 0xAA];
        put(
            "log_recovery",
            "seed-three-records",
            &[three, &[4, 0, 0]].concat(),
        );
        put(
            "log_recovery",
            "seed-flip-second",
            &[three, &[4, 1, 159, 0, 0xFF, 0]].concat(),
        );
        put(
            "segment_index",
            "seed-two-convs",
            &crate::index::sample_segment_index(),
        );
        assert!(
            stale.is_empty(),
            "fuzz seeds differ from the encoders (STARLING_BLESS=1 rewrites them): {stale:?}"
        );
    }
}
