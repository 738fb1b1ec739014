//! The JSON objects `starling-cli --json` prints, one per line. Every object
//! has a `"type"`; ids and seqs are JSON numbers; `client_msg_id` is 32 hex
//! digits; a UTF-8 `text/*` body appears as `"text"`, any other as
//! `"body_hex"`. Tokens never appear.

use serde_json::{Value, json};

use crate::client::Event;
use crate::error::{ClientError, ServerError};
use crate::ids::ClientMsgId;
use crate::v1;

fn msg_id(bytes: &[u8]) -> Value {
    ClientMsgId::from_bytes(bytes).map_or_else(
        || Value::String(hex::encode(bytes)),
        |id| Value::String(id.to_string()),
    )
}

/// The name of a change's kind in the JSON.
fn change_kind(kind: i32) -> &'static str {
    match v1::ChangeKind::try_from(kind) {
        Ok(v1::ChangeKind::Edit) => "edit",
        Ok(v1::ChangeKind::Delete) => "delete",
        Ok(v1::ChangeKind::React) => "react",
        _ => "unknown",
    }
}

/// A conversation entry: a message, a change of an earlier message (`"type": "change"`, with
/// `kind` edit, delete or react, `target_seq`, `emoji` for a reaction, and an edit's new
/// text), a change of the disappearing-messages timer (`"type": "timer"`, `timer_secs`, 0:
/// off), or a group event (see [`group_changed`]). A message that disappears carries
/// `expires_at_ms`. A message served as it is now carries
/// `edited_ts_ms` once edited, `"deleted": true` (and no text) once deleted for everyone, and
/// `reactions` (`[{user_id, emoji}]`) when it has some.
#[must_use]
pub fn message(m: &v1::Message) -> Value {
    if let Some(change) = &m.group_changed {
        return group_changed(m.conversation_id, m.seq, m.server_ts_ms, change);
    }
    let kind = if m.change.is_some() {
        "change"
    } else if m.timer_changed.is_some() {
        "timer"
    } else {
        "message"
    };
    let mut v = json!({
        "type": kind,
        "conversation_id": m.conversation_id,
        "seq": m.seq,
        "sender_user_id": m.sender_user_id,
        "sender_device_id": m.sender_device_id,
        "client_msg_id": msg_id(&m.client_msg_id),
        "server_ts_ms": m.server_ts_ms,
        "content_type": m.content_type,
    });
    match (
        m.content_type.starts_with("text/") || m.content_type.is_empty(),
        std::str::from_utf8(&m.body),
    ) {
        (true, Ok(text)) => v["text"] = json!(text),
        _ => v["body_hex"] = json!(hex::encode(&m.body)),
    }
    if m.reply_to_seq != 0 {
        v["reply_to_seq"] = json!(m.reply_to_seq);
    }
    if let Some(media) = &m.media {
        v["media"] = media_ref(media);
    }
    if let Some(c) = &m.change {
        v["kind"] = json!(change_kind(c.kind));
        v["target_seq"] = json!(c.target_seq);
        if !c.emoji.is_empty() || c.kind == v1::ChangeKind::React as i32 {
            v["emoji"] = json!(c.emoji);
        }
    }
    if let Some(t) = &m.timer_changed {
        v["timer_secs"] = json!(t.seconds);
        if let Some(o) = v.as_object_mut() {
            o.remove("text");
        }
    }
    if m.expires_at_ms != 0 {
        v["expires_at_ms"] = json!(m.expires_at_ms);
    }
    if m.edited_ts_ms != 0 {
        v["edited_ts_ms"] = json!(m.edited_ts_ms);
    }
    if m.deleted {
        v["deleted"] = json!(true);
        if let Some(o) = v.as_object_mut() {
            o.remove("text");
            o.remove("body_hex");
        }
    }
    if !m.reactions.is_empty() {
        v["reactions"] = m
            .reactions
            .iter()
            .map(|r| json!({ "user_id": r.user_id, "emoji": r.emoji }))
            .collect();
    }
    v
}

/// A received message with its end-to-end encrypted body opened
/// ([`crate::e2e::olm::Opened`]): `"e2e": true` and the plaintext as `text`, or
/// `"undecryptable"` with why (the container is not repeated).
#[must_use]
pub fn opened_message(m: &v1::Message, opened: &crate::e2e::olm::Opened) -> Value {
    use crate::e2e::olm::Opened;
    let mut v = message(m);
    match opened {
        Opened::NotEncrypted => return v,
        Opened::Text(t) => v["text"] = json!(t),
        Opened::Undecryptable(why) => v["undecryptable"] = json!(why),
    }
    v["e2e"] = json!(true);
    if let Some(o) = v.as_object_mut() {
        o.remove("body_hex");
    }
    v
}

/// An attachment.
#[must_use]
pub fn media_ref(m: &v1::MediaRef) -> Value {
    json!({
        "media_id": m.media_id,
        "content_type": m.content_type,
        "size_bytes": m.size_bytes,
        "sha256": hex::encode(&m.sha256),
        "file_name": m.file_name,
    })
}

/// A send acknowledgement.
#[must_use]
pub fn send_ack(a: &v1::SendAck) -> Value {
    let mut v = json!({
        "type": "sent",
        "client_msg_id": msg_id(&a.client_msg_id),
        "conversation_id": a.conversation_id,
        "seq": a.seq,
        "server_ts_ms": a.server_ts_ms,
        "duplicate": a.duplicate,
    });
    if a.expires_at_ms != 0 {
        v["expires_at_ms"] = json!(a.expires_at_ms);
    }
    v
}

/// A group's aggregate receipts for our messages.
#[must_use]
pub fn group_receipts(g: &v1::GroupReceipts) -> Value {
    let messages: Vec<Value> = g
        .messages
        .iter()
        .map(|m| {
            json!({
                "seq": m.seq,
                "delivered": m.delivered,
                "read": m.read,
                "recipients": m.recipients,
            })
        })
        .collect();
    json!({
        "type": "group_receipts",
        "conversation_id": g.conversation_id,
        "messages": messages,
    })
}

/// Who received and read one message.
#[must_use]
pub fn receipt_detail(d: &v1::ReceiptDetail) -> Value {
    json!({
        "type": "receipt_detail",
        "conversation_id": d.conversation_id,
        "seq": d.seq,
        "sender_user_id": d.sender_user_id,
        "recipients": d.recipients,
        "delivered": d.delivered,
        "read": d.read,
        "delivered_user_ids": d.delivered_user_ids,
        "read_user_ids": d.read_user_ids,
    })
}

/// A receipt.
#[must_use]
pub fn receipt(r: &v1::Receipt) -> Value {
    let kind = match v1::ReceiptKind::try_from(r.kind) {
        Ok(v1::ReceiptKind::Delivered) => "delivered",
        Ok(v1::ReceiptKind::Read) => "read",
        _ => "unknown",
    };
    json!({
        "type": "receipt",
        "conversation_id": r.conversation_id,
        "up_to_seq": r.up_to_seq,
        "kind": kind,
        "by_user_id": r.by_user_id,
        "ts_ms": r.ts_ms,
    })
}

/// A server error (`"type": "error"`).
#[must_use]
pub fn server_error(e: &ServerError) -> Value {
    json!({
        "type": "error",
        "code": e.code_name(),
        "code_num": e.code_num,
        "message": e.message,
        "retry_after_ms": e.retry_after_ms,
    })
}

/// Any SDK error (`"type": "error"`); server errors carry their code,
/// others `"code": "CLIENT"`.
#[must_use]
pub fn error(e: &ClientError) -> Value {
    let mut v = match e.server() {
        Some(s) => server_error(s),
        None => json!({ "type": "error", "code": "CLIENT" }),
    };
    v["message"] = json!(e.to_string());
    if let ClientError::StillQueued { client_msg_id, .. } = e {
        v["queued_client_msg_id"] = json!(client_msg_id.to_string());
    }
    v
}

/// A profile.
#[must_use]
pub fn profile(p: &v1::Profile) -> Value {
    json!({
        "type": "profile",
        "user_id": p.user_id,
        "display_name": p.display_name,
        "about": p.about,
        "phone": p.phone,
        "email": p.email,
        "created_at_ms": p.created_at_ms,
        "has_password": p.has_password,
        "avatar": p.avatar.as_deref().map(media_ref),
    })
}

/// One of the caller's devices.
#[must_use]
pub fn device(d: &v1::Device) -> Value {
    json!({
        "type": "device",
        "device_id": d.device_id,
        "name": d.name,
        "platform": d.platform,
        "created_at_ms": d.created_at_ms,
        "last_seen_ms": d.last_seen_ms,
        "current": d.current,
    })
}

/// A new session (tokens left out).
#[must_use]
pub fn session(g: &v1::SessionGranted) -> Value {
    json!({
        "type": "session",
        "user_id": g.user_id,
        "device_id": g.device_id,
        "session_id": g.session_id,
        "new_user": g.new_user,
        "access_expires_at_ms": g.access_expires_at_ms,
    })
}

/// A conversation list line.
#[must_use]
pub fn conversation(c: &v1::ConversationSummary) -> Value {
    let kind = match v1::ConversationKind::try_from(c.kind) {
        Ok(v1::ConversationKind::Direct) => "direct",
        Ok(v1::ConversationKind::Group) => "group",
        _ => "unknown",
    };
    json!({
        "type": "conversation",
        "conversation_id": c.conversation_id,
        "kind": kind,
        "peer_user_id": c.peer_user_id,
        "title": c.title,
        "last_seq": c.last_seq,
        "unread_count": c.unread_count,
        "read_up_to_seq": c.read_up_to_seq,
        "last_message": c.last_message.as_deref().map(message),
    })
}

/// A group event (`"type": "group_changed"`): `kind` is `created`,
/// `members_added`, `members_removed`, `member_left`, `role_changed` or
/// `updated`; `user_ids` the users it is about; `role` the new role (for
/// `role_changed`); `name`, `version` and `only_admins_send` the group's
/// state after it.
#[must_use]
pub fn group_changed(
    conversation_id: u64,
    seq: u64,
    server_ts_ms: u64,
    change: &v1::GroupChanged,
) -> Value {
    let kind = v1::GroupChangeKind::try_from(change.kind)
        .map_or("GROUP_CHANGE_KIND_UNSPECIFIED", |k| k.as_str_name())
        .trim_start_matches("GROUP_CHANGE_KIND_")
        .to_ascii_lowercase();
    let mut v = json!({
        "type": "group_changed",
        "conversation_id": conversation_id,
        "seq": seq,
        "server_ts_ms": server_ts_ms,
        "by_user_id": change.by_user_id,
        "kind": kind,
        "user_ids": change.user_ids,
    });
    if change.kind == v1::GroupChangeKind::RoleChanged as i32 {
        v["role"] = json!(role(change.role));
    }
    if let Some(g) = &change.group {
        v["name"] = json!(g.name);
        v["version"] = json!(g.version);
        v["only_admins_send"] = json!(g.only_admins_send);
    }
    v
}

/// A role's name: `admin`, `member` (or `unknown`).
#[must_use]
pub fn role(r: i32) -> &'static str {
    match v1::GroupRole::try_from(r) {
        Ok(v1::GroupRole::Admin) => "admin",
        Ok(v1::GroupRole::Member) => "member",
        _ => "unknown",
    }
}

/// A group's state (`"type": "group"`), members in the server's order
/// (`member_count` of them in all: the answer to a change lists the first
/// page only).
#[must_use]
pub fn group(g: &v1::GroupInfo) -> Value {
    let members: Vec<Value> = g
        .members
        .iter()
        .map(|m| {
            json!({
                "user_id": m.user_id,
                "role": role(m.role),
                "joined_at_ms": m.joined_at_ms,
            })
        })
        .collect();
    json!({
        "type": "group",
        "conversation_id": g.conversation_id,
        "name": g.name,
        "version": g.version,
        "only_admins_send": g.only_admins_send,
        "created_by_user_id": g.created_by_user_id,
        "created_at_ms": g.created_at_ms,
        "member_count": g.member_count,
        "members": members,
    })
}

/// A user's presence (`"type": "presence"`): `state` is `online`, `away`
/// or `offline`; `last_seen_ms` 0 when online, hidden or never.
#[must_use]
pub fn presence(p: &v1::PresenceUpdate) -> Value {
    json!({
        "type": "presence",
        "user_id": p.user_id,
        "state": v1::PresenceState::try_from(p.state)
            .map_or("PRESENCE_STATE_UNSPECIFIED", |s| s.as_str_name())
            .trim_start_matches("PRESENCE_STATE_")
            .to_ascii_lowercase(),
        "last_seen_ms": p.last_seen_ms,
    })
}

/// Another user's public profile (`"type": "profile"`, private fields left
/// out).
#[must_use]
pub fn public_profile(p: &v1::Profile) -> Value {
    json!({
        "type": "profile",
        "user_id": p.user_id,
        "display_name": p.display_name,
        "about": p.about,
        "created_at_ms": p.created_at_ms,
    })
}

/// An event of [`crate::Events`].
#[must_use]
pub fn event(e: &Event) -> Value {
    match e {
        Event::Connected {
            user_id,
            device_id,
            server_version,
            features,
        } => json!({
            "type": "connected",
            "user_id": user_id,
            "device_id": device_id,
            "server_version": server_version,
            "features": features,
        }),
        Event::Disconnected { reason, retry_in } => json!({
            "type": "disconnected",
            "reason": reason,
            "retry_in_ms": u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
        }),
        Event::Synced { messages, receipts } => json!({
            "type": "synced",
            "messages": messages,
            "receipts": receipts,
        }),
        Event::SyncFailed(err) => {
            let mut v = server_error(err);
            v["context"] = json!("sync");
            v
        }
        Event::Message(m) | Event::MessageChanged(m) => message(m),
        Event::Receipt(r) => receipt(r),
        Event::GroupReceipts(g) => group_receipts(g),
        Event::Sent(a) => send_ack(a),
        Event::SendFailed {
            client_msg_id,
            error,
        } => {
            let mut v = server_error(error);
            v["type"] = json!("send_failed");
            v["client_msg_id"] = json!(client_msg_id.to_string());
            v
        }
        Event::Typing(t) => json!({
            "type": "typing",
            "conversation_id": t.conversation_id,
            "user_id": t.user_id,
            "typing": t.state == v1::TypingState::Typing as i32,
        }),
        Event::Presence(p) => presence(p),
        Event::PrekeyCount(n) => json!({
            "type": "prekey_count",
            "one_time_prekeys": n,
        }),
        Event::DeviceListChanged(d) => json!({
            "type": "device_list_changed",
            "user_id": d.user_id,
            "added_device_ids": d.added_device_ids,
            "removed_device_ids": d.removed_device_ids,
        }),
        Event::GroupChanged {
            conversation_id,
            seq,
            server_ts_ms,
            change,
        } => group_changed(*conversation_id, *seq, *server_ts_ms, change),
        Event::ServerError(err) => server_error(err),
        Event::LocalError(message) => json!({
            "type": "error",
            "code": "CLIENT",
            "message": message,
        }),
        Event::LoggedOut { reason } => json!({
            "type": "logged_out",
            "reason": reason,
        }),
    }
}

/// A fetched key bundle (`keys fetch`), with whether its signed prekey's signature verifies.
#[must_use]
pub fn key_bundle(b: &v1::KeyBundle) -> Value {
    json!({
        "type": "key_bundle",
        "user_id": b.user_id,
        "device_id": b.device_id,
        "registration_id": b.registration_id,
        "identity_key_hex": hex::encode(&b.identity_key),
        "signed_prekey": b.signed_prekey.as_ref().map(|s| json!({
            "key_id": s.key_id,
            "public_key_hex": hex::encode(&s.public_key),
            "signature_hex": hex::encode(&s.signature),
        })),
        "signature_valid": crate::e2e::verify_bundle(b),
        "one_time_prekey": b.one_time_prekey.as_ref().map(|k| json!({
            "key_id": k.key_id,
            "public_key_hex": hex::encode(&k.public_key),
        })),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn messages_show_text_or_hex() {
        let id = ClientMsgId([0xab; 16]);
        let m = v1::Message {
            conversation_id: 5,
            seq: 9,
            sender_user_id: 1,
            sender_device_id: 2,
            client_msg_id: id.0.to_vec().into(),
            server_ts_ms: 1_700_000_000_000,
            content_type: "text/plain".into(),
            body: b"hi \xF0\x9F\x90\xA6".to_vec().into(),
            ..v1::Message::default()
        };
        assert_eq!(
            message(&m),
            json!({
                "type": "message",
                "conversation_id": 5,
                "seq": 9,
                "sender_user_id": 1,
                "sender_device_id": 2,
                "client_msg_id": "ab".repeat(16),
                "server_ts_ms": 1_700_000_000_000u64,
                "content_type": "text/plain",
                "text": "hi 🐦",
            })
        );
        let bin = v1::Message {
            content_type: "application/x-starling-e2e".into(),
            body: vec![0, 1].into(),
            ..m.clone()
        };
        let v = message(&bin);
        assert_eq!(v["body_hex"], "0001");
        assert!(v.get("text").is_none());
        // A message as it is now: edited with reactions; deleted (no content); a change entry.
        let edited = v1::Message {
            edited_ts_ms: 7,
            reactions: vec![v1::Reaction {
                user_id: 3,
                emoji: "👍".into(),
            }],
            ..m.clone()
        };
        let v = message(&edited);
        assert_eq!(
            (v["edited_ts_ms"].clone(), v["text"].clone()),
            (json!(7), json!("hi 🐦"))
        );
        assert_eq!(v["reactions"], json!([{ "user_id": 3, "emoji": "👍" }]));
        let deleted = v1::Message {
            deleted: true,
            body: Default::default(),
            content_type: String::new(),
            ..m.clone()
        };
        let v = message(&deleted);
        assert_eq!(v["deleted"], json!(true));
        assert!(v.get("text").is_none() && v.get("body_hex").is_none());
        let edit = v1::Message {
            change: Some(Box::new(v1::MessageChange {
                kind: v1::ChangeKind::Edit as i32,
                target_seq: 4,
                emoji: String::new(),
            })),
            ..m
        };
        let v = message(&edit);
        assert_eq!(
            (
                v["type"].clone(),
                v["kind"].clone(),
                v["target_seq"].clone()
            ),
            (json!("change"), json!("edit"), json!(4))
        );
        assert_eq!(v["text"], "hi 🐦");
        assert!(v.get("emoji").is_none());
    }

    #[test]
    fn a_timer_change_and_an_expiring_message_say_so() {
        let timer = v1::Message {
            conversation_id: 9,
            seq: 5,
            timer_changed: Some(Box::new(v1::DisappearingTimer { seconds: 3600 })),
            ..v1::Message::default()
        };
        let v = message(&timer);
        assert_eq!(
            (v["type"].clone(), v["timer_secs"].clone()),
            (json!("timer"), json!(3600))
        );
        assert!(v.get("text").is_none() && v.get("expires_at_ms").is_none());
        let m = v1::Message {
            seq: 6,
            content_type: "text/plain".into(),
            body: "soon gone".as_bytes().to_vec().into(),
            expires_at_ms: 1_790_000_003_600,
            ..v1::Message::default()
        };
        let v = message(&m);
        assert_eq!(v["type"], json!("message"));
        assert_eq!(v["expires_at_ms"], json!(1_790_000_003_600u64));
        let ack = send_ack(&v1::SendAck {
            expires_at_ms: 7,
            ..v1::SendAck::default()
        });
        assert_eq!(ack["expires_at_ms"], json!(7));
        assert!(
            send_ack(&v1::SendAck::default())
                .get("expires_at_ms")
                .is_none()
        );
    }

    #[test]
    fn every_event_is_one_line_with_a_type() {
        let events = [
            Event::Connected {
                user_id: 1,
                device_id: 1,
                server_version: "starling 0.1.0".into(),
                features: vec!["messaging".into()],
            },
            Event::Disconnected {
                reason: "x".into(),
                retry_in: Duration::from_millis(1500),
            },
            Event::Synced {
                messages: 3,
                receipts: 1,
            },
            Event::Message(v1::Message::default()),
            Event::MessageChanged(v1::Message {
                change: Some(Box::new(v1::MessageChange {
                    kind: v1::ChangeKind::React as i32,
                    target_seq: 1,
                    emoji: "👍".into(),
                })),
                ..v1::Message::default()
            }),
            Event::Receipt(v1::Receipt {
                kind: v1::ReceiptKind::Read as i32,
                ..v1::Receipt::default()
            }),
            Event::Sent(v1::SendAck::default()),
            Event::SendFailed {
                client_msg_id: ClientMsgId([1; 16]),
                error: ServerError {
                    code_num: 400,
                    message: "blocked".into(),
                    retry_after_ms: 0,
                },
            },
            Event::Typing(v1::Typing::default()),
            Event::Presence(v1::PresenceUpdate {
                state: v1::PresenceState::Online as i32,
                ..v1::PresenceUpdate::default()
            }),
            Event::GroupChanged {
                conversation_id: 7,
                seq: 3,
                server_ts_ms: 1,
                change: v1::GroupChanged {
                    kind: v1::GroupChangeKind::RoleChanged.into(),
                    user_ids: vec![2],
                    role: v1::GroupRole::Admin.into(),
                    ..v1::GroupChanged::default()
                },
            },
            Event::ServerError(ServerError {
                code_num: 9999,
                message: String::new(),
                retry_after_ms: 0,
            }),
            Event::LocalError("disk full".into()),
            Event::LoggedOut {
                reason: "revoked".into(),
            },
            Event::PrekeyCount(19),
            Event::DeviceListChanged(v1::DeviceListChanged {
                user_id: 4,
                added_device_ids: vec![2],
                removed_device_ids: vec![],
            }),
        ];
        let types: Vec<String> = events
            .iter()
            .map(|e| {
                let line = event(e).to_string();
                assert!(!line.contains('\n'));
                let v: Value = serde_json::from_str(&line).unwrap();
                v["type"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            types,
            [
                "connected",
                "disconnected",
                "synced",
                "message",
                "change",
                "receipt",
                "sent",
                "send_failed",
                "typing",
                "presence",
                "group_changed",
                "error",
                "error",
                "logged_out",
                "prekey_count",
                "device_list_changed"
            ]
        );
        assert_eq!(event(&events[1])["retry_in_ms"], 1500);
        assert_eq!(event(&events[4])["kind"], "react");
        assert_eq!(event(&events[5])["kind"], "read");
        assert_eq!(event(&events[7])["code"], "BLOCKED");
        assert_eq!(event(&events[9])["state"], "online");
        // Unknown codes read as INTERNAL but keep their number.
        assert_eq!(event(&events[11])["code"], "INTERNAL");
        assert_eq!(event(&events[11])["code_num"], 9999);
    }

    #[test]
    fn errors_carry_code_and_queued_id() {
        let server = ServerError {
            code_num: 501,
            message: "the account store is unavailable".into(),
            retry_after_ms: 0,
        };
        let e = ClientError::StillQueued {
            client_msg_id: ClientMsgId([2; 16]),
            cause: Box::new(ClientError::Server(server)),
        };
        let v = error(&e);
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "UNAVAILABLE");
        assert_eq!(v["code_num"], 501);
        assert_eq!(v["queued_client_msg_id"], "02".repeat(16));
        assert!(v["message"].as_str().unwrap().contains("unavailable"));
        let v = error(&ClientError::NotLoggedIn("/p".into()));
        assert_eq!(v["code"], "CLIENT");
    }
}
