//! Entry points for the cargo-fuzz targets in `fuzz/` over every decoder of data at rest: log
//! records, segment headers, metadata records and index snapshots. The unit tests below run
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
    use crate::meta::*;
    let Some((&table, b)) = data.split_first() else {
        return;
    };
    match table % 15 {
        0 => meta_round_trip::<User>(b),
        1 => meta_round_trip::<PhoneIndex>(b),
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
        _ => meta_round_trip::<DirectConv>(b),
    }
}

/// An index snapshot file (the first byte: odd = seal the rest with magic and checksum).
pub fn index_snapshot(data: &[u8]) {
    crate::index::fuzz_snapshot(data);
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
        for s in corpus("index_snapshot") {
            index_snapshot(&s);
        }
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
        index_snapshot(&crate::index::sample_snapshot());
    }

    /// Writes the seed files of `fuzz/corpus/` from today's encoders. Run by hand after a format
    /// change: `cargo test -p starling-storage write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/corpus; run by hand"]
    fn write_fuzz_seeds() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let put = |target: &str, name: &str, bytes: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
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
        put(
            "index_snapshot",
            "seed-two-convs",
            &crate::index::sample_snapshot(),
        );
    }
}
