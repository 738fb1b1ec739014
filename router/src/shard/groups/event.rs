//! A group change as an entry of the group's conversation: `EntryKind::SYSTEM`, content type
//! [`GROUP_EVENT_V1`], the body the wire's `GroupChanged` (protobuf), the sender who made the
//! change, device 0, and a `client_msg_id` derived from the group's version ([`event_id`]), so
//! that the index's dedup finds a change's event after a restart. On the wire it is a
//! `Message` with `group_changed` set (`protocol/README.md`, "Groups").

use bytes::Bytes;
use prost::Message as _;
use starling_protocol::v1;
use starling_storage::{ClientMsgId, DeviceId, Entry, EntryKind, Seq, TimestampMs, UserId};

use crate::ids::ConvId;

/// `Entry.content_type` of a group event (with `EntryKind::SYSTEM`): the body is an encoded
/// `GroupChanged`.
pub(crate) const GROUP_EVENT_V1: u16 = 1;

/// The first bytes of every event's `client_msg_id`; a `Send` may not use them.
pub(crate) const EVENT_ID_PREFIX: [u8; 8] = *b"\xffSTRLGRP";

/// The `client_msg_id` of the event of the group's change to `version`.
pub(crate) fn event_id(version: u64) -> ClientMsgId {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&EVENT_ID_PREFIX);
    id[8..].copy_from_slice(&version.to_be_bytes());
    ClientMsgId(id)
}

/// Whether a client's `client_msg_id` uses the prefix reserved for events.
pub(crate) fn is_reserved(id: &[u8]) -> bool {
    id.starts_with(&EVENT_ID_PREFIX)
}

/// The log entry of the event of `conv`'s change to `version` (body: the encoded event) by
/// `by`, at `seq`.
pub(crate) fn entry(
    conv: ConvId,
    seq: u64,
    version: u64,
    by: UserId,
    now_ms: u64,
    body: Vec<u8>,
) -> Entry {
    Entry {
        kind: EntryKind::SYSTEM,
        conv: conv.storage(),
        seq: Seq(seq),
        client_msg_id: event_id(version),
        sender: by,
        sender_device: DeviceId(0),
        ts_ms: TimestampMs(now_ms),
        content_type: GROUP_EVENT_V1,
        body,
    }
}

/// The wire message of a stored group event; `None` if `e` is not one or its body is damaged
/// (never panics on stored bytes).
pub(crate) fn to_message(conv: ConvId, e: &Entry) -> Option<v1::Message> {
    if e.kind != EntryKind::SYSTEM || e.content_type != GROUP_EVENT_V1 {
        return None;
    }
    let ev = v1::GroupChanged::decode(e.body.as_slice()).ok()?;
    Some(v1::Message {
        conversation_id: conv.0,
        seq: e.seq.0,
        sender_user_id: e.sender.0,
        sender_device_id: e.sender_device.0,
        client_msg_id: Bytes::copy_from_slice(&e.client_msg_id.0),
        server_ts_ms: e.ts_ms.0,
        content_type: String::new(),
        body: Bytes::new(),
        media: None,
        reply_to_seq: 0,
        group_changed: Some(Box::new(ev)),
        ..v1::Message::default()
    })
}

/// The version a stored group event records, if `e` is one.
pub(crate) fn version_of(e: &Entry) -> Option<u64> {
    if e.kind != EntryKind::SYSTEM || e.content_type != GROUP_EVENT_V1 {
        return None;
    }
    let id = e.client_msg_id.0;
    if !is_reserved(&id) {
        return None;
    }
    let mut v = [0; 8];
    v.copy_from_slice(&id[8..]);
    Some(u64::from_be_bytes(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back_as_the_message_that_carries_it() {
        let ev = v1::GroupChanged {
            group: Some(Box::new(v1::GroupInfo {
                conversation_id: 9,
                name: "g".into(),
                version: 3,
                ..v1::GroupInfo::default()
            })),
            by_user_id: 4,
            kind: v1::GroupChangeKind::MembersAdded as i32,
            user_ids: vec![5, 6],
            role: 0,
        };
        let e = entry(ConvId(9), 12, 3, UserId(4), 77, ev.encode_to_vec());
        let m = to_message(ConvId(9), &e).unwrap();
        assert_eq!((m.seq, m.sender_user_id, m.sender_device_id), (12, 4, 0));
        assert_eq!(m.server_ts_ms, 77);
        assert_eq!(m.group_changed.as_deref(), Some(&ev));
        assert!(m.body.is_empty() && m.content_type.is_empty());
        assert!(is_reserved(&m.client_msg_id));
        assert_eq!(&m.client_msg_id[8..], &3u64.to_be_bytes());
        assert_eq!(version_of(&e), Some(3));
        assert_ne!(event_id(3), event_id(4));
    }

    #[test]
    fn other_entries_and_damaged_bodies_are_not_events() {
        let mut e = entry(ConvId(9), 1, 1, UserId(4), 1, vec![0xff, 0xff]);
        assert_eq!(to_message(ConvId(9), &e), None);
        e.body = Vec::new();
        assert!(
            to_message(ConvId(9), &e).is_some(),
            "an empty event decodes"
        );
        e.kind = EntryKind::MESSAGE;
        assert_eq!(to_message(ConvId(9), &e), None);
        assert_eq!(version_of(&e), None);
        assert!(!is_reserved(&[0xff, b'S']));
    }
}
