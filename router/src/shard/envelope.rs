//! The message envelope: how a message's wire fields travel in a log entry's body, so that
//! content type and reply-to round-trip without a schema in storage.
//!
//! `Entry.content_type` [`ENVELOPE_V1`] marks a body of `u16 LE content-type length ‖ content
//! type ‖ u64 LE reply_to_seq ‖ client body`. It is written when a message is sequenced and read
//! back whenever history, sync or the conversation list shows a stored message; the decoder
//! never panics on stored bytes (the `message_envelope` fuzz target checks it).

use bytes::Bytes;
use starling_protocol::v1;
use starling_storage::{ClientMsgId, DeviceId, Entry, EntryKind, Seq, TimestampMs, UserId};

use crate::ids::ConvId;

/// `Entry.content_type` of entries whose body is the router's envelope, version 1:
/// `u16 LE content-type length ‖ content type ‖ u64 LE reply_to_seq ‖ client body`.
pub(super) const ENVELOPE_V1: u16 = 1;

/// The body of a message entry: `body` with its content type and reply-to seq in front. A content
/// type longer than `u16::MAX` bytes is cut (the ingress shard refuses any over 255).
pub(super) fn encode_envelope(content_type: &str, reply_to_seq: u64, body: &[u8]) -> Vec<u8> {
    let ct = content_type.as_bytes();
    let ct = &ct[..ct.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(2 + ct.len() + 8 + body.len());
    out.extend_from_slice(&(ct.len() as u16).to_le_bytes());
    out.extend_from_slice(ct);
    out.extend_from_slice(&reply_to_seq.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The wire message for a stored entry; `None` if the entry is not a message or its envelope is
/// damaged (never panics on stored bytes).
pub(super) fn entry_to_message(conv: ConvId, e: &Entry) -> Option<v1::Message> {
    if e.kind == EntryKind::SYSTEM {
        return super::groups::event::to_message(conv, e);
    }
    if e.kind != EntryKind::MESSAGE || e.content_type != ENVELOPE_V1 {
        return None;
    }
    let b = &e.body;
    let n = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let ct = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    let reply = u64::from_le_bytes(b.get(2 + n..10 + n)?.try_into().ok()?);
    let body = b.get(10 + n..)?;
    Some(v1::Message {
        conversation_id: conv.0,
        seq: e.seq.0,
        sender_user_id: e.sender.0,
        sender_device_id: e.sender_device.0,
        client_msg_id: Bytes::copy_from_slice(&e.client_msg_id.0),
        server_ts_ms: e.ts_ms.0,
        content_type: ct.to_owned(),
        body: Bytes::copy_from_slice(body),
        media: None,
        reply_to_seq: reply,
        group_changed: None,
    })
}

/// For `crate::fuzzing::message_envelope`: `body` as a stored message entry's body through the
/// envelope decoder, which must not panic; whatever it accepts re-encodes to the same bytes.
pub(crate) fn fuzz_envelope(body: &[u8]) -> bool {
    let e = message_entry(body.to_vec());
    let Some(m) = entry_to_message(ConvId(9), &e) else {
        return false;
    };
    assert_eq!(
        encode_envelope(&m.content_type, m.reply_to_seq, &m.body),
        body,
        "an accepted envelope re-encodes to other bytes"
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
    encode_envelope("text/plain", 3, b"hello")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_message_reads_back_as_it_was_sent() {
        let e = message_entry(encode_envelope("image/png", 42, b"\x00\xffbytes"));
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
        let m = entry_to_message(ConvId(9), &message_entry(encode_envelope("", 0, b""))).unwrap();
        assert!(m.content_type.is_empty() && m.body.is_empty());
    }

    #[test]
    fn other_entries_are_not_messages() {
        let mut e = message_entry(sample_envelope());
        e.content_type = ENVELOPE_V1 + 1;
        assert_eq!(entry_to_message(ConvId(9), &e), None);
        let mut e = message_entry(sample_envelope());
        e.kind = EntryKind::RECEIPT;
        assert_eq!(entry_to_message(ConvId(9), &e), None);
    }
}
