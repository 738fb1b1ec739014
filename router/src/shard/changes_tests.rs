//! Edits, deletes for everyone, reactions and replies at one shard: every rule and every
//! refusal, what history, sync and the conversation list serve afterwards, dedup of retries, and
//! a state written before a crash that lost its change entry.

use bytes::Bytes;
use starling_protocol::v1::{self, ChangeKind, ErrorCode, frame::Body};
use starling_storage::message_state::MessageState;
use starling_storage::meta::{Member, Role};
use starling_storage::{ClientMsgId, MetaBatch, MetadataStore, Seq, TimestampMs, UserId};

use super::super::ShardConfig;
use super::super::fixture::{GROUP, Shard, drive_until, read_cursor, sent, shard};
use crate::ids::ConnId;

/// A Send from `conn` into [`GROUP`] with `client_msg_id` 16 × `cmid`.
fn send_from(
    s: &mut Shard,
    now: &mut u64,
    conn: ConnId,
    rid: u64,
    cmid: u8,
    edit: impl FnOnce(&mut v1::Send),
) -> Body {
    let mut sd = v1::Send {
        client_msg_id: Bytes::from(vec![cmid; 16]),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::ConversationId(GROUP.0)),
        }),
        content_type: "text/plain".into(),
        body: Bytes::from_static(b"hi"),
        ..v1::Send::default()
    };
    edit(&mut sd);
    let f = v1::Frame {
        request_id: rid,
        body: Some(Body::Send(sd)),
    };
    s.handle_frame(conn, f, *now);
    let out = drive_until(s, now, |c, f| c == conn && f.request_id == rid);
    out.into_iter()
        .find(|(c, f)| *c == conn && f.request_id == rid)
        .and_then(|(_, f)| f.body)
        .expect("an answer")
}

/// A change by `conn`: (kind, target, emoji, body).
fn change(
    s: &mut Shard,
    now: &mut u64,
    conn: ConnId,
    rid: u64,
    cmid: u8,
    (kind, target, emoji, body): (ChangeKind, u64, &str, &'static [u8]),
) -> Body {
    send_from(s, now, conn, rid, cmid, |sd| {
        sd.change = Some(Box::new(v1::MessageChange {
            kind: kind as i32,
            target_seq: target,
            emoji: emoji.into(),
        }));
        sd.body = Bytes::from_static(body);
        if body.is_empty() {
            sd.content_type.clear();
        }
    })
}

fn acked(b: &Body) -> (u64, bool) {
    match b {
        Body::SendAck(a) => (a.seq, a.duplicate),
        other => panic!("not a SendAck: {other:?}"),
    }
}

fn refused(b: &Body) -> (ErrorCode, String) {
    match b {
        Body::Error(e) => (
            ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            e.message.clone(),
        ),
        other => panic!("not an Error: {other:?}"),
    }
}

fn history(s: &mut Shard, now: &mut u64, conn: ConnId) -> Vec<v1::Message> {
    let f = v1::Frame {
        request_id: 60,
        body: Some(Body::GetHistory(v1::GetHistory {
            conversation_id: GROUP.0,
            ..v1::GetHistory::default()
        })),
    };
    s.handle_frame(conn, f, *now);
    let out = drive_until(s, now, |c, f| c == conn && f.request_id == 60);
    match out
        .into_iter()
        .find(|(c, f)| *c == conn && f.request_id == 60)
        .and_then(|(_, f)| f.body)
    {
        Some(Body::HistoryPage(p)) => p.messages,
        other => panic!("{other:?}"),
    }
}

fn sync(s: &mut Shard, now: &mut u64, conn: ConnId) -> Vec<v1::Message> {
    let f = v1::Frame {
        request_id: 61,
        body: Some(Body::Sync(v1::Sync {
            last_seq: [(GROUP.0, 0)].into_iter().collect(),
        })),
    };
    s.handle_frame(conn, f, *now);
    let out = drive_until(s, now, |c, f| {
        c == conn && f.request_id == 61 && matches!(f.body, Some(Body::SyncDone(_)))
    });
    out.into_iter()
        .filter(|(c, f)| *c == conn && f.request_id == 61)
        .filter_map(|(_, f)| match f.body {
            Some(Body::Deliver(d)) => d.message,
            _ => None,
        })
        .collect()
}

fn at(msgs: &[v1::Message], seq: u64) -> &v1::Message {
    msgs.iter().find(|m| m.seq == seq).expect("served")
}

fn cfg() -> ShardConfig {
    ShardConfig {
        edit_window_ms: 1_000,
        delete_window_ms: 5_000,
        reactions_max: 2,
        ..ShardConfig::default()
    }
}

#[test]
fn an_edit_is_a_new_entry_and_history_serves_the_message_as_edited() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _meta) = shard(dir.path(), cfg());
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1); // seq 1, user 1's
    let (c1, c2) = (ConnId(1), ConnId(2));
    let ack = change(
        &mut s,
        &mut now,
        c1,
        10,
        50,
        (ChangeKind::Edit, 1, "", b"hello"),
    );
    assert_eq!(acked(&ack), (2, false), "the edit is entry 2");
    // The same edit again (a retry) is the same entry.
    let again = change(
        &mut s,
        &mut now,
        c1,
        11,
        50,
        (ChangeKind::Edit, 1, "", b"hello"),
    );
    assert_eq!(acked(&again), (2, true));
    let h = history(&mut s, &mut now, c2);
    assert_eq!(h.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    let m = at(&h, 1);
    assert_eq!((&m.body[..], m.deleted), (&b"hello"[..], false));
    assert!(m.edited_ts_ms >= 1_000, "{m:?}");
    let e = at(&h, 2);
    let ch = e.change.as_ref().expect("a change entry");
    assert_eq!((ch.kind, ch.target_seq), (ChangeKind::Edit as i32, 1));
    assert_eq!(&e.body[..], b"hello");
    assert_eq!(sync(&mut s, &mut now, c2), h, "sync serves the same state");
    // Not yours: refused. The window over: refused.
    let theirs = change(
        &mut s,
        &mut now,
        c2,
        12,
        51,
        (ChangeKind::Edit, 1, "", b"x"),
    );
    assert_eq!(refused(&theirs).0, ErrorCode::PermissionDenied);
    now += 2_000;
    let late = change(
        &mut s,
        &mut now,
        c1,
        13,
        52,
        (ChangeKind::Edit, 1, "", b"x"),
    );
    let (code, msg) = refused(&late);
    assert_eq!(code, ErrorCode::FailedPrecondition);
    assert!(msg.contains("edit window"), "{msg}");
    // A change of a change, or of nothing: refused.
    let of_change = change(
        &mut s,
        &mut now,
        c1,
        14,
        53,
        (ChangeKind::React, 2, "👍", b""),
    );
    assert_eq!(refused(&of_change).0, ErrorCode::InvalidArgument);
    let missing = change(
        &mut s,
        &mut now,
        c1,
        15,
        54,
        (ChangeKind::React, 99, "👍", b""),
    );
    assert_eq!(refused(&missing).0, ErrorCode::NotFound);
}

#[test]
fn a_delete_removes_the_content_from_everything_served_and_blocks_further_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _meta) = shard(dir.path(), cfg());
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=2); // seqs 1, 2: user 1's
    let (c1, c2) = (ConnId(1), ConnId(2));
    let edit = change(
        &mut s,
        &mut now,
        c1,
        10,
        50,
        (ChangeKind::Edit, 1, "", b"secret"),
    );
    assert_eq!(acked(&edit).0, 3);
    let react = change(
        &mut s,
        &mut now,
        c2,
        11,
        51,
        (ChangeKind::React, 1, "👍", b""),
    );
    assert_eq!(acked(&react).0, 4);
    // Someone else's message, not an admin: refused.
    let theirs = change(
        &mut s,
        &mut now,
        c2,
        12,
        52,
        (ChangeKind::Delete, 1, "", b""),
    );
    assert_eq!(refused(&theirs).0, ErrorCode::PermissionDenied);
    let del = change(
        &mut s,
        &mut now,
        c1,
        13,
        53,
        (ChangeKind::Delete, 1, "", b""),
    );
    assert_eq!(acked(&del), (5, false));
    let retry = change(
        &mut s,
        &mut now,
        c1,
        14,
        53,
        (ChangeKind::Delete, 1, "", b""),
    );
    assert_eq!(acked(&retry), (5, true), "a retry is the same delete");
    for served in [history(&mut s, &mut now, c2), sync(&mut s, &mut now, c2)] {
        let m = at(&served, 1);
        assert!(
            m.deleted && m.body.is_empty() && m.content_type.is_empty(),
            "{m:?}"
        );
        assert!(m.reactions.is_empty() && m.edited_ts_ms == 0);
        // The earlier edit's new content is gone too; the other message is untouched.
        let e = at(&served, 3);
        assert!(e.body.is_empty() && e.change.is_some(), "{e:?}");
        assert_eq!(&at(&served, 2).body[..], b"hi");
        assert!(!at(&served, 2).deleted);
        let d = at(&served, 5).change.clone().unwrap();
        assert_eq!((d.kind, d.target_seq), (ChangeKind::Delete as i32, 1));
    }
    for (rid, cmid, kind, emoji, body) in [
        (15, 55, ChangeKind::Delete, "", &b""[..]),
        (16, 56, ChangeKind::Edit, "", &b"again"[..]),
        (17, 57, ChangeKind::React, "🎉", &b""[..]),
    ] {
        let body: &'static [u8] = if body.is_empty() { b"" } else { b"again" };
        let r = change(&mut s, &mut now, c1, rid, cmid, (kind, 1, emoji, body));
        let (code, msg) = refused(&r);
        assert_eq!(code, ErrorCode::FailedPrecondition, "{kind:?}");
        assert!(msg.contains("deleted for everyone"), "{msg}");
    }
    // The delete window over: the sender may no longer delete message 2.
    now += 6_000;
    let late = change(
        &mut s,
        &mut now,
        c1,
        18,
        58,
        (ChangeKind::Delete, 2, "", b""),
    );
    let (code, msg) = refused(&late);
    assert_eq!(code, ErrorCode::FailedPrecondition);
    assert!(msg.contains("delete window"), "{msg}");
}

#[test]
fn a_group_admin_may_delete_anyones_message_at_any_time() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, meta) = shard(dir.path(), cfg());
    let mut b = MetaBatch::default();
    b.put(&Member {
        group: GROUP.storage(),
        user: UserId(2),
        role: Role::Admin,
        joined_ms: TimestampMs(0),
        joined_seq: None,
    });
    meta.commit(&b).unwrap();
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1);
    now += 60_000; // long after the delete window
    let del = change(
        &mut s,
        &mut now,
        ConnId(2),
        10,
        50,
        (ChangeKind::Delete, 1, "", b""),
    );
    assert_eq!(acked(&del), (2, false));
    assert!(at(&history(&mut s, &mut now, ConnId(1)), 1).deleted);
}

#[test]
fn reactions_are_one_per_user_replaced_removed_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        reactions_max: 1,
        ..cfg()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1);
    let (c1, c2) = (ConnId(1), ConnId(2));
    let reactions = |h: &[v1::Message]| -> Vec<(u64, String)> {
        at(h, 1)
            .reactions
            .iter()
            .map(|r| (r.user_id, r.emoji.clone()))
            .collect()
    };
    acked(&change(
        &mut s,
        &mut now,
        c2,
        10,
        50,
        (ChangeKind::React, 1, "👍", b""),
    ));
    acked(&change(
        &mut s,
        &mut now,
        c2,
        11,
        51,
        (ChangeKind::React, 1, "🎉", b""),
    ));
    let h = history(&mut s, &mut now, c1);
    assert_eq!(reactions(&h), [(2, "🎉".to_owned())], "replaced, not added");
    // One user's reaction is the most this server allows: another user's is refused.
    let full = change(
        &mut s,
        &mut now,
        c1,
        12,
        52,
        (ChangeKind::React, 1, "❤", b""),
    );
    assert_eq!(refused(&full).0, ErrorCode::FailedPrecondition);
    // An empty emoji removes it; then the other user may react.
    acked(&change(
        &mut s,
        &mut now,
        c2,
        13,
        53,
        (ChangeKind::React, 1, "", b""),
    ));
    assert!(reactions(&history(&mut s, &mut now, c1)).is_empty());
    acked(&change(
        &mut s,
        &mut now,
        c1,
        14,
        54,
        (ChangeKind::React, 1, "❤", b""),
    ));
    assert_eq!(
        reactions(&history(&mut s, &mut now, c2)),
        [(1, "❤".to_owned())]
    );
}

#[test]
fn a_reply_names_a_message_of_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _meta) = shard(dir.path(), cfg());
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1);
    let c2 = ConnId(2);
    let ok = send_from(&mut s, &mut now, c2, 10, 50, |sd| sd.reply_to_seq = 1);
    assert_eq!(acked(&ok).0, 2);
    assert_eq!(at(&history(&mut s, &mut now, c2), 2).reply_to_seq, 1);
    let missing = send_from(&mut s, &mut now, c2, 11, 51, |sd| sd.reply_to_seq = 9);
    let (code, msg) = refused(&missing);
    assert_eq!(code, ErrorCode::NotFound);
    assert!(msg.contains("reply_to_seq 9"), "{msg}");
    // A reaction is not a message to reply to.
    acked(&change(
        &mut s,
        &mut now,
        c2,
        12,
        52,
        (ChangeKind::React, 1, "👍", b""),
    ));
    let to_change = send_from(&mut s, &mut now, c2, 13, 53, |sd| sd.reply_to_seq = 3);
    assert_eq!(refused(&to_change).0, ErrorCode::InvalidArgument);
}

#[test]
fn a_change_that_is_inconsistent_in_itself_is_refused_at_ingress() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _meta) = shard(dir.path(), cfg());
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1);
    type Spoil = fn(&mut v1::Send);
    let ch = |kind: ChangeKind, emoji: &str| v1::MessageChange {
        kind: kind as i32,
        target_seq: 1,
        emoji: emoji.into(),
    };
    let cases: [(Spoil, &str); 8] = [
        (
            |sd| sd.change.as_mut().unwrap().kind = 0,
            "change.kind must be EDIT, DELETE or REACT",
        ),
        (
            |sd| sd.change.as_mut().unwrap().target_seq = 0,
            "change.target_seq is 0",
        ),
        (
            |sd| sd.media = Some(Box::default()),
            "", // checked as media first: any refusal
        ),
        (
            |sd| sd.reply_to_seq = 1,
            "a change is not a reply: reply_to_seq must be 0",
        ),
        (
            |sd| sd.change.as_mut().unwrap().emoji = "x".into(),
            "change.emoji is only for a reaction",
        ),
        (
            |sd| {
                sd.change.as_mut().unwrap().kind = ChangeKind::Delete as i32;
            },
            "a delete or a reaction carries no content_type or body",
        ),
        (
            |sd| {
                sd.change.as_mut().unwrap().kind = ChangeKind::React as i32;
                sd.body = Bytes::new();
                sd.content_type.clear();
                sd.change.as_mut().unwrap().emoji = "x".repeat(65);
            },
            "change.emoji is 65 bytes, at most 64",
        ),
        (
            |sd| {
                sd.change.as_mut().unwrap().kind = ChangeKind::React as i32;
                sd.change.as_mut().unwrap().emoji = "👍".into();
            },
            "a delete or a reaction carries no content_type or body",
        ),
    ];
    for (i, (spoil, want)) in cases.into_iter().enumerate() {
        let r = send_from(
            &mut s,
            &mut now,
            ConnId(1),
            100 + i as u64,
            60 + i as u8,
            |sd| {
                sd.change = Some(Box::new(ch(ChangeKind::Edit, "")));
                spoil(sd);
            },
        );
        let (code, msg) = refused(&r);
        assert_eq!(code, ErrorCode::InvalidArgument, "case {i}: {msg}");
        assert!(msg.contains(want), "case {i}: {msg}");
    }
}

#[test]
fn a_change_is_not_unread_and_is_pushed_to_the_members() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _meta) = shard(dir.path(), cfg());
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=2);
    read_cursor(&mut s, now, 7, 2);
    drive_until(&mut s, &mut now, |_, f| f.request_id == 7);
    let f = v1::Frame {
        request_id: 20,
        body: Some(Body::Send(v1::Send {
            client_msg_id: Bytes::from(vec![50; 16]),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::ConversationId(GROUP.0)),
            }),
            change: Some(Box::new(v1::MessageChange {
                kind: ChangeKind::React as i32,
                target_seq: 1,
                emoji: "👍".into(),
            })),
            ..v1::Send::default()
        })),
    };
    s.handle_frame(ConnId(1), f, now);
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && f.request_id == 20
    });
    let pushed: Vec<&v1::Message> = out
        .iter()
        .filter(|(c, _)| *c == ConnId(2))
        .filter_map(|(_, f)| match &f.body {
            Some(Body::Deliver(d)) => d.message.as_ref(),
            _ => None,
        })
        .collect();
    let [m] = &pushed[..] else { panic!("{out:?}") };
    assert_eq!(
        (m.seq, m.change.as_ref().map(|c| c.target_seq)),
        (3, Some(1))
    );
    let l = v1::Frame {
        request_id: 21,
        body: Some(Body::ListConversations(v1::ListConversations::default())),
    };
    s.handle_frame(ConnId(2), l, now);
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2) && f.request_id == 21
    });
    let Some(Body::ConversationList(l)) = out
        .into_iter()
        .find(|(c, f)| *c == ConnId(2) && f.request_id == 21)
        .and_then(|(_, f)| f.body)
    else {
        panic!()
    };
    let c = &l.conversations[0];
    assert_eq!(
        (c.last_seq, c.unread_count),
        (3, 0),
        "a reaction is not unread"
    );
}

#[test]
fn a_state_written_before_a_crash_is_completed_by_the_retry_not_refused() {
    // The state is committed before the change is sequenced; a crash in between leaves the
    // state alone. The device's retry (same client_msg_id) finds its change in the state and
    // gets the entry sequenced, not "already deleted".
    let dir = tempfile::tempdir().unwrap();
    let (mut s, meta) = shard(dir.path(), cfg());
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1);
    let mut st = MessageState::new(GROUP.storage(), Seq(1));
    st.deleted_by = UserId(1);
    st.deleted_ts = TimestampMs(now);
    st.deleted_id = ClientMsgId([50; 16]);
    let mut b = MetaBatch::default();
    b.put(&st);
    meta.commit(&b).unwrap();
    let retry = change(
        &mut s,
        &mut now,
        ConnId(1),
        10,
        50,
        (ChangeKind::Delete, 1, "", b""),
    );
    assert_eq!(acked(&retry), (2, false));
    let other = change(
        &mut s,
        &mut now,
        ConnId(1),
        11,
        51,
        (ChangeKind::Delete, 1, "", b""),
    );
    assert_eq!(refused(&other).0, ErrorCode::FailedPrecondition);
    let stored: MessageState = meta
        .get(&MessageState::key_of(GROUP.storage(), Seq(1)))
        .unwrap()
        .unwrap();
    assert_eq!(stored, st, "nothing written again");
}
