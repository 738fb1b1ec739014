//! The message envelope: how a message's wire fields travel in a log entry's body, so that
//! content type, reply-to and media round-trip without a schema in storage.
//!
//! `Entry.content_type` is the envelope's version. [`ENVELOPE_V1`] marks a body of `u16 LE
//! content-type length ‖ content type ‖ u64 LE reply_to_seq ‖ client body`; [`ENVELOPE_V2`]
//! (a message with media) inserts `u32 LE length ‖ MediaRef (protobuf)` before the client
//! body. A message without media is still written as version 1, so logs written before media
//! existed read back unchanged and the common entry stays as small as it was. [`ENVELOPE_V3`]
//! is a change of an earlier message (an edit, a delete for everyone, a reaction). It is written
//! when a message is sequenced and read back whenever history, sync or the conversation list
//! shows a stored message; the decoder never panics on stored bytes (the `message_envelope`
//! fuzz target checks every version).

use bytes::Bytes;
use prost::Message as _;
use starling_protocol::v1;
use starling_storage::{ClientMsgId, DeviceId, Entry, EntryKind, Seq, TimestampMs, UserId};

use crate::ids::ConvId;

/// `Entry.content_type` of entries whose body is the router's envelope, version 1:
/// `u16 LE content-type length ‖ content type ‖ u64 LE reply_to_seq ‖ client body`.
pub(super) const ENVELOPE_V1: u16 = 1;
/// ... version 2, a message with media: `u16 LE content-type length ‖ content type ‖ u64 LE
/// reply_to_seq ‖ u32 LE media length ‖ MediaRef (protobuf) ‖ client body`.
pub(super) const ENVELOPE_V2: u16 = 2;

/// ... version 3, a change of an earlier message (`changes.rs`): `u16 LE content-type length ‖
/// content type ‖ u64 LE reply_to_seq (0) ‖ u8 kind ‖ u64 LE target seq ‖ u8 emoji length ‖
/// emoji ‖ client body` (the body of an edit; empty otherwise).
pub(super) const ENVELOPE_V3: u16 = 3;

/// ... version 4, an entry that disappears (`disappearing.rs`): `u64 LE expires_at_ms ‖ u16 LE
/// inner version (1, 2 or 3) ‖ the inner version's body`. A message or a change sequenced while
/// its conversation has a timer; every other entry is written as before.
pub(super) const ENVELOPE_V4: u16 = 4;

/// ... version 5, a change of the conversation's disappearing-messages timer: `u64 LE seconds`
/// (0: off).
pub(super) const ENVELOPE_V5: u16 = 5;

/// The inner version of a version-4 entry (`None` for any other, or a damaged one).
fn inner_version(e: &Entry) -> Option<u16> {
    (e.content_type == ENVELOPE_V4)
        .then(|| e.body.get(8..10))
        .flatten()
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// Whether `e` is a change entry (an edit, delete or reaction) rather than a message.
pub(super) fn is_change(e: &Entry) -> bool {
    e.kind == EntryKind::MESSAGE
        && (e.content_type == ENVELOPE_V3 || inner_version(e) == Some(ENVELOPE_V3))
}

/// Whether `e` is a change of its conversation's disappearing-messages timer.
pub(super) fn is_timer(e: &Entry) -> bool {
    e.kind == EntryKind::MESSAGE && e.content_type == ENVELOPE_V5
}

/// When `e` disappears by its conversation's timer, in ms since the epoch (0: never).
pub(super) fn expiry_of(e: &Entry) -> u64 {
    if e.kind != EntryKind::MESSAGE || e.content_type != ENVELOPE_V4 {
        return 0;
    }
    e.body
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// `(version, body)` (version 1, 2 or 3) as it is written for an entry expiring at
/// `expires_at_ms` (0: never; then unchanged).
pub(super) fn with_expiry(expires_at_ms: u64, (version, body): (u16, Vec<u8>)) -> (u16, Vec<u8>) {
    if expires_at_ms == 0 {
        return (version, body);
    }
    let mut out = Vec::with_capacity(10 + body.len());
    out.extend_from_slice(&expires_at_ms.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&body);
    (ENVELOPE_V4, out)
}

/// The body of a timer change entry (version 5).
pub(super) fn encode_timer(seconds: u64) -> Vec<u8> {
    seconds.to_le_bytes().to_vec()
}

/// The body of a change entry (version 3). The emoji is checked at ingress (at most 64 bytes);
/// one longer than `u8::MAX` bytes would be cut.
pub(super) fn encode_change(content_type: &str, ch: &v1::MessageChange, body: &[u8]) -> Vec<u8> {
    let ct = content_type.as_bytes();
    let ct = &ct[..ct.len().min(u16::MAX as usize)];
    let emoji = ch.emoji.as_bytes();
    let emoji = &emoji[..emoji.len().min(u8::MAX as usize)];
    let mut out = Vec::with_capacity(2 + ct.len() + 8 + 1 + 8 + 1 + emoji.len() + body.len());
    out.extend_from_slice(&(ct.len() as u16).to_le_bytes());
    out.extend_from_slice(ct);
    out.extend_from_slice(&0u64.to_le_bytes());
    out.push(u8::try_from(ch.kind).unwrap_or(0));
    out.extend_from_slice(&ch.target_seq.to_le_bytes());
    out.push(emoji.len() as u8);
    out.extend_from_slice(emoji);
    out.extend_from_slice(body);
    out
}

/// The body of a message entry and its envelope version: `body` with its content type, reply-to
/// seq and media (if any) in front. A content type longer than `u16::MAX` bytes is cut (the
/// ingress shard refuses any over 255).
pub(super) fn encode_envelope(
    content_type: &str,
    reply_to_seq: u64,
    media: Option<&v1::MediaRef>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let ct = content_type.as_bytes();
    let ct = &ct[..ct.len().min(u16::MAX as usize)];
    let media_len = media.map_or(0, |m| 4 + m.encoded_len());
    let mut out = Vec::with_capacity(2 + ct.len() + 8 + media_len + body.len());
    out.extend_from_slice(&(ct.len() as u16).to_le_bytes());
    out.extend_from_slice(ct);
    out.extend_from_slice(&reply_to_seq.to_le_bytes());
    let version = match media {
        None => ENVELOPE_V1,
        Some(m) => {
            // A MediaRef is checked at ingress (`media::check_ref`): a few KiB at most.
            let n = u32::try_from(m.encoded_len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&n.to_le_bytes());
            m.encode(&mut out).unwrap_or_default();
            ENVELOPE_V2
        }
    };
    out.extend_from_slice(body);
    (version, out)
}

/// The wire message for a stored entry; `None` if the entry is not a message or its envelope is
/// damaged (never panics on stored bytes).
pub(super) fn entry_to_message(conv: ConvId, e: &Entry) -> Option<v1::Message> {
    if e.kind == EntryKind::SYSTEM {
        return super::groups::event::to_message(conv, e);
    }
    if e.kind != EntryKind::MESSAGE {
        return None;
    }
    match e.content_type {
        ENVELOPE_V4 => {
            let expires = u64::from_le_bytes(e.body.get(..8)?.try_into().ok()?);
            let inner = inner_version(e)?;
            // 0 would read as "never": a damaged entry.
            if expires == 0 || !matches!(inner, ENVELOPE_V1 | ENVELOPE_V2 | ENVELOPE_V3) {
                return None;
            }
            let mut m = decode(conv, e, inner, e.body.get(10..)?)?;
            m.expires_at_ms = expires;
            Some(m)
        }
        ENVELOPE_V5 => {
            let seconds = u64::from_le_bytes(e.body.as_slice().try_into().ok()?);
            Some(v1::Message {
                conversation_id: conv.0,
                seq: e.seq.0,
                sender_user_id: e.sender.0,
                sender_device_id: e.sender_device.0,
                client_msg_id: Bytes::copy_from_slice(&e.client_msg_id.0),
                server_ts_ms: e.ts_ms.0,
                timer_changed: Some(Box::new(v1::DisappearingTimer { seconds })),
                ..v1::Message::default()
            })
        }
        v => decode(conv, e, v, &e.body),
    }
}

/// The message of entry `e` whose envelope `version` (1, 2 or 3) is `b`.
fn decode(conv: ConvId, e: &Entry, version: u16, b: &[u8]) -> Option<v1::Message> {
    let n = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let ct = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    let reply = u64::from_le_bytes(b.get(2 + n..10 + n)?.try_into().ok()?);
    let mut change = None;
    let (media, body) = match version {
        ENVELOPE_V1 => (None, b.get(10 + n..)?),
        ENVELOPE_V3 => {
            // A change never replies: its reply-to field is written as 0.
            if reply != 0 {
                return None;
            }
            let at = 10 + n;
            let kind = *b.get(at)?;
            v1::ChangeKind::try_from(i32::from(kind))
                .ok()
                .filter(|k| *k != v1::ChangeKind::Unspecified)?;
            let target = u64::from_le_bytes(b.get(at + 1..at + 9)?.try_into().ok()?);
            let m = *b.get(at + 9)? as usize;
            let emoji = std::str::from_utf8(b.get(at + 10..at + 10 + m)?).ok()?;
            change = Some(Box::new(v1::MessageChange {
                kind: i32::from(kind),
                target_seq: target,
                emoji: emoji.to_owned(),
            }));
            (None, b.get(at + 10 + m..)?)
        }
        ENVELOPE_V2 => {
            let at = 10 + n;
            let m = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
            let end = (at + 4).checked_add(m)?;
            let media = v1::MediaRef::decode(b.get(at + 4..end)?).ok()?;
            (Some(Box::new(media)), b.get(end..)?)
        }
        _ => return None,
    };
    Some(v1::Message {
        conversation_id: conv.0,
        seq: e.seq.0,
        sender_user_id: e.sender.0,
        sender_device_id: e.sender_device.0,
        client_msg_id: Bytes::copy_from_slice(&e.client_msg_id.0),
        server_ts_ms: e.ts_ms.0,
        content_type: ct.to_owned(),
        body: Bytes::copy_from_slice(body),
        media,
        reply_to_seq: reply,
        group_changed: None,
        change,
        ..v1::Message::default()
    })
}

/// For `crate::fuzzing::message_envelope`: `body` as a stored message entry's body through the
/// version-1 envelope decoder, which must not panic; whatever it accepts re-encodes to the same
/// bytes.
pub(crate) fn fuzz_envelope(body: &[u8]) -> bool {
    let e = message_entry(body.to_vec());
    let Some(m) = entry_to_message(ConvId(9), &e) else {
        return false;
    };
    assert_eq!(
        encode_envelope(&m.content_type, m.reply_to_seq, None, &m.body),
        (ENVELOPE_V1, body.to_vec()),
        "an accepted envelope re-encodes to other bytes"
    );
    true
}

/// For `crate::fuzzing::message_envelope`: `body` through the version-2 (media) decoder, which
/// must not panic; whatever it accepts re-encodes to an envelope that reads back the same
/// message (protobuf has more than one encoding of a MediaRef, so not always the same bytes).
pub(crate) fn fuzz_envelope_v2(body: &[u8]) -> bool {
    let mut e = message_entry(body.to_vec());
    e.content_type = ENVELOPE_V2;
    let Some(m) = entry_to_message(ConvId(9), &e) else {
        return false;
    };
    let (v, again) = encode_envelope(&m.content_type, m.reply_to_seq, m.media.as_deref(), &m.body);
    e.content_type = v;
    e.body = again;
    assert_eq!(
        entry_to_message(ConvId(9), &e).as_ref(),
        Some(&m),
        "a re-encoded media envelope reads back another message"
    );
    true
}

/// For `crate::fuzzing::message_envelope`: `body` through the version-3 (change) decoder, which
/// must not panic; whatever it accepts re-encodes to exactly those bytes.
pub(crate) fn fuzz_envelope_v3(body: &[u8]) -> bool {
    let mut e = message_entry(body.to_vec());
    e.content_type = ENVELOPE_V3;
    let Some(m) = entry_to_message(ConvId(9), &e) else {
        return false;
    };
    let ch = m
        .change
        .as_deref()
        .expect("a version-3 entry reads back as a change");
    assert_eq!(
        encode_change(&m.content_type, ch, &m.body),
        body,
        "an accepted change re-encodes to other bytes"
    );
    true
}

/// For `crate::fuzzing::message_envelope`: `body` through the version-4 (expiring) decoder,
/// which must not panic; whatever it accepts re-encodes (around its inner version) to an
/// envelope that reads back the same message.
pub(crate) fn fuzz_envelope_v4(body: &[u8]) -> bool {
    let mut e = message_entry(body.to_vec());
    e.content_type = ENVELOPE_V4;
    let Some(m) = entry_to_message(ConvId(9), &e) else {
        return false;
    };
    assert_ne!(
        m.expires_at_ms, 0,
        "an accepted expiring entry has an expiry"
    );
    let inner = match m.change.as_deref() {
        Some(ch) => (ENVELOPE_V3, encode_change(&m.content_type, ch, &m.body)),
        None => encode_envelope(&m.content_type, m.reply_to_seq, m.media.as_deref(), &m.body),
    };
    let (v, again) = with_expiry(m.expires_at_ms, inner);
    e.content_type = v;
    e.body = again;
    assert_eq!(
        entry_to_message(ConvId(9), &e).as_ref(),
        Some(&m),
        "a re-encoded expiring envelope reads back another message"
    );
    true
}

/// For `crate::fuzzing::message_envelope`: `body` through the version-5 (timer change)
/// decoder, which must not panic; whatever it accepts re-encodes to exactly those bytes.
pub(crate) fn fuzz_envelope_v5(body: &[u8]) -> bool {
    let mut e = message_entry(body.to_vec());
    e.content_type = ENVELOPE_V5;
    let Some(m) = entry_to_message(ConvId(9), &e) else {
        return false;
    };
    let t = m
        .timer_changed
        .as_deref()
        .expect("a version-5 entry reads back as a timer change");
    assert_eq!(
        encode_timer(t.seconds),
        body,
        "a timer re-encodes to other bytes"
    );
    true
}

/// A message entry of conversation 9 with `body`.
fn message_entry(body: Vec<u8>) -> Entry {
    Entry {
        kind: EntryKind::MESSAGE,
        conv: ConvId(9).storage(),
        seq: Seq(1),
        client_msg_id: ClientMsgId([1; 16]),
        sender: UserId(7),
        sender_device: DeviceId(1),
        ts_ms: TimestampMs(1),
        content_type: ENVELOPE_V1,
        body,
    }
}

/// A stored message body as the router writes it.
#[cfg(test)]
pub(crate) fn sample_envelope() -> Vec<u8> {
    encode_envelope("text/plain", 3, None, b"hello").1
}

/// A MediaRef as a Send carries it.
#[cfg(test)]
pub(crate) fn sample_media() -> v1::MediaRef {
    v1::MediaRef {
        media_id: "ab".repeat(32),
        content_type: "image/png".into(),
        size_bytes: 1234,
        sha256: Bytes::from_static(&[0xab; 32]),
        width: 4,
        height: 3,
        duration_ms: 0,
        thumbnail: Bytes::from_static(b"thumb"),
        file_name: "a.png".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_message_reads_back_as_it_was_sent() {
        let e = message_entry(encode_envelope("image/png", 42, None, b"\x00\xffbytes").1);
        let m = entry_to_message(ConvId(9), &e).expect("a valid envelope");
        assert_eq!(
            (
                m.conversation_id,
                m.seq,
                m.sender_user_id,
                m.sender_device_id
            ),
            (9, 1, 7, 1)
        );
        assert_eq!((m.content_type.as_str(), m.reply_to_seq), ("image/png", 42));
        assert_eq!(&m.body[..], b"\x00\xffbytes");
        assert_eq!(&m.client_msg_id[..], &[1; 16]);
        // An empty content type and body are a valid envelope too.
        let m = entry_to_message(
            ConvId(9),
            &message_entry(encode_envelope("", 0, None, b"").1),
        )
        .unwrap();
        assert!(m.content_type.is_empty() && m.body.is_empty());
    }

    #[test]
    fn a_message_with_media_reads_back_with_it_and_old_entries_still_read() {
        let media = sample_media();
        let (v, body) = encode_envelope("text/plain", 7, Some(&media), b"caption");
        assert_eq!(v, ENVELOPE_V2);
        let mut e = message_entry(body);
        e.content_type = v;
        let m = entry_to_message(ConvId(9), &e).expect("a valid media envelope");
        assert_eq!(m.media.as_deref(), Some(&media));
        assert_eq!((m.content_type.as_str(), m.reply_to_seq), ("text/plain", 7));
        assert_eq!(&m.body[..], b"caption");
        // A message without media is written as version 1, byte for byte what logs written
        // before media existed hold: `u16 5 ‖ "a/b-c" ‖ u64 9 ‖ body`.
        let old: &[u8] = b"\x05\x00a/b-c\x09\x00\x00\x00\x00\x00\x00\x00old body";
        assert_eq!(
            encode_envelope("a/b-c", 9, None, b"old body"),
            (ENVELOPE_V1, old.to_vec())
        );
        let m = entry_to_message(ConvId(9), &message_entry(old.to_vec())).expect("old entry");
        assert_eq!(
            (m.content_type.as_str(), m.reply_to_seq, m.media),
            ("a/b-c", 9, None)
        );
        assert_eq!(&m.body[..], b"old body");
        // A media length past the end, or media that is not a MediaRef, is refused.
        let mut cut = e.clone();
        cut.body.truncate(2 + 10 + 8 + 4 + 3);
        assert_eq!(entry_to_message(ConvId(9), &cut), None);
        let junk: &[u8] = b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\xffbody";
        assert!(!fuzz_envelope_v2(junk));
        assert!(fuzz_envelope_v2(&e.body));
    }

    #[test]
    fn a_change_reads_back_as_it_was_made_and_damaged_ones_are_refused() {
        let ch = v1::MessageChange {
            kind: v1::ChangeKind::React as i32,
            target_seq: 41,
            emoji: "👍".into(),
        };
        let mut e = message_entry(encode_change("", &ch, b""));
        e.content_type = ENVELOPE_V3;
        assert!(is_change(&e));
        let m = entry_to_message(ConvId(9), &e).expect("a valid change");
        assert_eq!(m.change.as_deref(), Some(&ch));
        assert!(m.body.is_empty() && m.media.is_none() && m.reply_to_seq == 0);
        let edit = v1::MessageChange {
            kind: v1::ChangeKind::Edit as i32,
            target_seq: 3,
            emoji: String::new(),
        };
        e.body = encode_change("text/plain", &edit, b"new words");
        let m = entry_to_message(ConvId(9), &e).unwrap();
        assert_eq!(
            (m.change.as_deref(), &m.body[..]),
            (Some(&edit), &b"new words"[..])
        );
        assert_eq!(m.content_type, "text/plain");
        // An unknown kind, an emoji past the end, or one that is not UTF-8: not a change.
        let mut bad = e.clone();
        bad.body = encode_change(
            "",
            &v1::MessageChange {
                kind: 9,
                ..ch.clone()
            },
            b"",
        );
        assert_eq!(entry_to_message(ConvId(9), &bad), None);
        bad.body = encode_change("", &ch, b"");
        bad.body.truncate(bad.body.len() - 1);
        assert_eq!(entry_to_message(ConvId(9), &bad), None);
        let n = bad.body.len();
        bad.body = encode_change("", &ch, b"");
        bad.body[n - 3] = 0xff;
        assert_eq!(entry_to_message(ConvId(9), &bad), None);
        assert!(!is_change(&message_entry(sample_envelope())));
    }

    #[test]
    fn an_expiring_entry_and_a_timer_change_read_back_and_damaged_ones_are_refused() {
        let media = sample_media();
        for (v, body) in [
            encode_envelope("text/plain", 4, None, b"soon gone"),
            encode_envelope("text/plain", 0, Some(&media), b"caption"),
        ] {
            let mut plain = message_entry(body.clone());
            plain.content_type = v;
            let want = entry_to_message(ConvId(9), &plain).unwrap();
            let (v4, b4) = with_expiry(1_790_000_060_000, (v, body.clone()));
            assert_eq!(v4, ENVELOPE_V4);
            let mut e = message_entry(b4);
            e.content_type = v4;
            let m = entry_to_message(ConvId(9), &e).expect("a valid expiring envelope");
            assert_eq!(m.expires_at_ms, 1_790_000_060_000);
            assert_eq!(
                v1::Message {
                    expires_at_ms: 0,
                    ..m
                },
                want
            );
            assert_eq!(expiry_of(&e), 1_790_000_060_000);
            assert!(!is_change(&e) && !is_timer(&e));
            // No expiry: written as before.
            assert_eq!(with_expiry(0, (v, body.clone())), (v, body));
            // An inner version that is not 1, 2 or 3, or an expiry of 0: damaged.
            let mut bad = e.clone();
            bad.body[8] = 4;
            assert_eq!(entry_to_message(ConvId(9), &bad), None);
            let mut bad = e.clone();
            bad.body[..8].copy_from_slice(&[0; 8]);
            assert_eq!(entry_to_message(ConvId(9), &bad), None);
            bad.body.truncate(9);
            assert_eq!(entry_to_message(ConvId(9), &bad), None);
        }
        let ch = v1::MessageChange {
            kind: v1::ChangeKind::Delete as i32,
            target_seq: 2,
            emoji: String::new(),
        };
        let (v, b) = with_expiry(77, (ENVELOPE_V3, encode_change("", &ch, b"")));
        let mut e = message_entry(b);
        e.content_type = v;
        assert!(is_change(&e), "an expiring change is a change");
        let m = entry_to_message(ConvId(9), &e).unwrap();
        assert_eq!((m.change.as_deref(), m.expires_at_ms), (Some(&ch), 77));

        let mut t = message_entry(encode_timer(3600));
        t.content_type = ENVELOPE_V5;
        assert!(is_timer(&t) && !is_change(&t) && expiry_of(&t) == 0);
        let m = entry_to_message(ConvId(9), &t).unwrap();
        assert_eq!(
            m.timer_changed,
            Some(Box::new(v1::DisappearingTimer { seconds: 3600 }))
        );
        assert!(m.body.is_empty() && m.content_type.is_empty() && m.expires_at_ms == 0);
        t.body.push(0);
        assert_eq!(entry_to_message(ConvId(9), &t), None, "a timer is 8 bytes");
    }

    #[test]
    fn other_entries_are_not_messages() {
        let mut e = message_entry(sample_envelope());
        e.content_type = ENVELOPE_V5 + 1;
        assert_eq!(entry_to_message(ConvId(9), &e), None);
        let mut e = message_entry(sample_envelope());
        e.kind = EntryKind::RECEIPT;
        assert_eq!(entry_to_message(ConvId(9), &e), None);
    }
}
