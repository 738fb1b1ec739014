//! The on-disk format of the embedded log (version 1). Pure functions: bytes in, bytes out.
//!
//! See `docs/design/log.md` for the layout and the reasons. All integers are little-endian.
//!
//! ```text
//! segment header (32 bytes, offset 0 of every segment file)
//!   0  8  magic  b"STLGSEG1"
//!   8  4  format version (1)
//!  12  4  crc32c over bytes 0..12 and 16..32
//!  16  8  base lsn (the first lsn stored in this segment; also the file name)
//!  24  8  reserved, zero
//!
//! record (one per appended batch), starting right after the segment header
//!   0  4  magic  b"STLR"
//!   4  4  crc32c over bytes 8..24+len (header rest + payload)
//!   8  4  len: payload bytes
//!  12  4  count: entries in the payload (>= 1)
//!  16  8  first lsn (entries are first_lsn .. first_lsn + count)
//!  24  len payload: `count` entries back to back
//!
//! entry (68 bytes + body)
//!   0  1  kind            1  1  flags (reserved, zero)   2  2  content type
//!   4  4  sender device   8 16  conversation id          24 8  seq
//!  32 16  client msg id  48  8  sender user id           56 8  server timestamp (ms)
//!  64  4  body len       68  .. body
//! ```

use crate::types::{
    ClientMsgId, ConvId, DeviceId, Entry, EntryKind, Lsn, Seq, TimestampMs, UserId,
};

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"STLGSEG1";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Magic at the start of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"STLR";
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Bytes of an entry before its body.
pub const ENTRY_HEADER_BYTES: usize = 68;
/// Largest body one entry may carry (frames are at most 64 KiB; media never travels in them).
pub const ENTRY_BODY_BYTES_MAX: usize = 256 * 1024;
/// Largest payload one record may carry; bounds what recovery trusts a length field with.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 16 * 1024 * 1024;

const _: () = assert!(ENTRY_HEADER_BYTES + ENTRY_BODY_BYTES_MAX <= RECORD_PAYLOAD_BYTES_MAX);
const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX <= u32::MAX as usize);

/// Why bytes are not a valid record (or segment header, or entry).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic does not match.
    #[error("bad magic")]
    BadMagic,
    /// The checksum does not match.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A length or count is out of range.
    #[error("bad length: {0}")]
    BadLength(&'static str),
    /// An unknown format version.
    #[error("unsupported format version {0}")]
    Version(u32),
    /// A reserved field is not zero.
    #[error("reserved field is not zero")]
    Reserved,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut a = [0; 16];
    a.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(a)
}

/// Encodes a segment header for a segment whose first lsn is `base`.
pub fn encode_segment_header(base: Lsn) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base.0.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..12]), &h[16..32]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header; returns its base lsn.
pub fn decode_segment_header(b: &[u8]) -> Result<Lsn, FormatError> {
    if b.len() < SEGMENT_HEADER_BYTES {
        return Err(FormatError::Truncated {
            need: SEGMENT_HEADER_BYTES,
            have: b.len(),
        });
    }
    if b[0..8] != SEGMENT_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let stored = u32_at(b, 12);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..32]);
    if stored != computed {
        return Err(FormatError::BadChecksum { stored, computed });
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    if u64_at(b, 24) != 0 {
        return Err(FormatError::Reserved);
    }
    Ok(Lsn(u64_at(b, 16)))
}

/// Bytes `entry` takes inside a record payload.
pub fn entry_bytes(entry: &Entry) -> usize {
    ENTRY_HEADER_BYTES + entry.body.len()
}

/// Appends the encoding of `entry` to `out`.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) {
    debug_assert!(entry.body.len() <= ENTRY_BODY_BYTES_MAX);
    out.push(entry.kind.0);
    out.push(0);
    out.extend_from_slice(&entry.content_type.to_le_bytes());
    out.extend_from_slice(&entry.sender_device.0.to_le_bytes());
    out.extend_from_slice(&entry.conv.0.to_le_bytes());
    out.extend_from_slice(&entry.seq.0.to_le_bytes());
    out.extend_from_slice(&entry.client_msg_id.0);
    out.extend_from_slice(&entry.sender.0.to_le_bytes());
    out.extend_from_slice(&entry.ts_ms.0.to_le_bytes());
    // Bounded by ENTRY_BODY_BYTES_MAX, checked by the log before encoding.
    out.extend_from_slice(&(entry.body.len() as u32).to_le_bytes());
    out.extend_from_slice(&entry.body);
}

/// Decodes one entry from the front of `b`; returns it and the bytes it took.
pub fn decode_entry(b: &[u8]) -> Result<(Entry, usize), FormatError> {
    let (conv, seq, client_msg_id, total) = entry_keys(b)?;
    let entry = Entry {
        kind: EntryKind(b[0]),
        content_type: u16_at(b, 2),
        sender_device: DeviceId(u32_at(b, 4)),
        conv,
        seq,
        client_msg_id,
        sender: UserId(u64_at(b, 48)),
        ts_ms: TimestampMs(u64_at(b, 56)),
        body: b[ENTRY_HEADER_BYTES..total].to_vec(),
    };
    Ok((entry, total))
}

/// The index keys of the entry at the front of `b` (conv, seq, client_msg_id) and the bytes it
/// takes, without copying its body: what the index needs from every entry it applies.
pub fn entry_keys(b: &[u8]) -> Result<(ConvId, Seq, ClientMsgId, usize), FormatError> {
    if b.len() < ENTRY_HEADER_BYTES {
        return Err(FormatError::Truncated {
            need: ENTRY_HEADER_BYTES,
            have: b.len(),
        });
    }
    if b[1] != 0 {
        return Err(FormatError::Reserved);
    }
    let body_len = u32_at(b, 64) as usize;
    if body_len > ENTRY_BODY_BYTES_MAX {
        return Err(FormatError::BadLength(
            "entry body longer than ENTRY_BODY_BYTES_MAX",
        ));
    }
    let total = ENTRY_HEADER_BYTES + body_len;
    if b.len() < total {
        return Err(FormatError::Truncated {
            need: total,
            have: b.len(),
        });
    }
    let mut cmid = [0u8; 16];
    cmid.copy_from_slice(&b[32..48]);
    Ok((
        ConvId(u128_at(b, 8)),
        Seq(u64_at(b, 24)),
        ClientMsgId(cmid),
        total,
    ))
}

/// Appends one record holding `entries` (lsns `first_lsn..`) to `out`.
///
/// The caller has checked the batch is non-empty and within [`RECORD_PAYLOAD_BYTES_MAX`].
pub fn encode_record(first_lsn: Lsn, entries: &[Entry], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    for e in entries {
        encode_entry(e, out);
    }
    let len = out.len() - start - RECORD_HEADER_BYTES;
    assert!(len <= RECORD_PAYLOAD_BYTES_MAX, "caller bounds the batch");
    let rec = &mut out[start..];
    rec[0..4].copy_from_slice(&RECORD_MAGIC);
    rec[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    rec[12..16].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    rec[16..24].copy_from_slice(&first_lsn.0.to_le_bytes());
    let crc = crc32c::crc32c(&rec[8..]);
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// A record whose header and checksum are valid, borrowed from the bytes it was read from.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    /// Lsn of its first entry.
    pub first_lsn: Lsn,
    /// Number of entries.
    pub count: u32,
    /// The entries, encoded.
    pub payload: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// Bytes the record takes on disk.
    pub fn total_bytes(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload.len()
    }

    /// Lsn of its last entry.
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.first_lsn.0 + u64::from(self.count) - 1)
    }

    /// Decodes every entry. Fails if the payload does not hold exactly `count` entries.
    pub fn entries(&self) -> Result<Vec<Entry>, FormatError> {
        let mut out = Vec::with_capacity(self.count as usize);
        let mut rest = self.payload;
        for _ in 0..self.count {
            let (e, used) = decode_entry(rest)?;
            out.push(e);
            rest = &rest[used..];
        }
        if !rest.is_empty() {
            return Err(FormatError::BadLength("payload longer than its entries"));
        }
        Ok(out)
    }
}

/// Decodes the record at the front of `b`: magic, bounds, checksum, then the entries' framing.
pub fn decode_record(b: &[u8]) -> Result<RecordView<'_>, FormatError> {
    if b.len() < RECORD_HEADER_BYTES {
        return Err(FormatError::Truncated {
            need: RECORD_HEADER_BYTES,
            have: b.len(),
        });
    }
    if b[0..4] != RECORD_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let len = u32_at(b, 8) as usize;
    let count = u32_at(b, 12);
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(FormatError::BadLength(
            "record longer than RECORD_PAYLOAD_BYTES_MAX",
        ));
    }
    if count == 0 || (count as usize).saturating_mul(ENTRY_HEADER_BYTES) > len {
        return Err(FormatError::BadLength(
            "entry count does not fit the record",
        ));
    }
    let total = RECORD_HEADER_BYTES + len;
    if b.len() < total {
        return Err(FormatError::Truncated {
            need: total,
            have: b.len(),
        });
    }
    let stored = u32_at(b, 4);
    let computed = crc32c::crc32c(&b[8..total]);
    if stored != computed {
        return Err(FormatError::BadChecksum { stored, computed });
    }
    let view = RecordView {
        first_lsn: Lsn(u64_at(b, 16)),
        count,
        payload: &b[RECORD_HEADER_BYTES..total],
    };
    if view.first_lsn.0 == 0 || view.first_lsn.0.checked_add(u64::from(count)).is_none() {
        return Err(FormatError::BadLength("first lsn out of range"));
    }
    // Pair the assertion with the encoder: a checksummed record must also frame correctly.
    view.entries()?;
    Ok(view)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(seq: u64, body: &[u8]) -> Entry {
        Entry {
            kind: EntryKind::MESSAGE,
            conv: ConvId(7 << 64 | 9),
            seq: Seq(seq),
            client_msg_id: ClientMsgId([seq as u8; 16]),
            sender: UserId(7),
            sender_device: DeviceId(2),
            ts_ms: TimestampMs(1_700_000_000_000),
            content_type: 3,
            body: body.to_vec(),
        }
    }

    #[test]
    fn record_round_trips() {
        let entries = vec![entry(1, b"hello"), entry(2, b""), entry(3, &[0xAB; 300])];
        let mut buf = Vec::new();
        encode_record(Lsn(42), &entries, &mut buf);
        let view = decode_record(&buf).unwrap();
        assert_eq!(view.first_lsn, Lsn(42));
        assert_eq!(view.last_lsn(), Lsn(44));
        assert_eq!(view.total_bytes(), buf.len());
        assert_eq!(view.entries().unwrap(), entries);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_record(Lsn(1), &[entry(1, b"abc")], &mut buf);
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode_record(&b).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let mut buf = Vec::new();
        encode_record(Lsn(1), &[entry(1, b"abcdef"), entry(2, b"x")], &mut buf);
        for cut in 0..buf.len() {
            assert!(decode_record(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn segment_header_round_trips() {
        let h = encode_segment_header(Lsn(1234));
        assert_eq!(decode_segment_header(&h).unwrap(), Lsn(1234));
        let mut bad = h;
        bad[20] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
        assert!(decode_segment_header(&[0u8; 32]).is_err());
    }
}
