//! Edits, deletes for everyone, reactions and replies through the real binary (issue 37 §4): in
//! a direct conversation and in a group (an admin deleting another member's message), pushed
//! live as change entries, served as the current state by history, Sync and the conversation
//! list, refused with their codes, and the same after a SIGKILL and restart (the state is
//! durable; a deleted message's content is never served again).

use super::messaging::{ana_and_ben, call, recv_until, text};
use super::*;

const TOML: &str = "[router]\nedit_window_ms = 60000\n";

fn change(cmid: u8, conv: u64, kind: v1::ChangeKind, target: u64, emoji: &str, body: &str) -> Body {
    Body::Send(v1::Send {
        client_msg_id: vec![cmid; 16].into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::ConversationId(conv)),
        }),
        content_type: if body.is_empty() { "" } else { "text/plain" }.into(),
        body: body.as_bytes().to_vec().into(),
        change: Some(Box::new(v1::MessageChange {
            kind: kind as i32,
            target_seq: target,
            emoji: emoji.into(),
        })),
        ..Default::default()
    })
}

fn seq_of(b: Body) -> u64 {
    match b {
        Body::SendAck(a) => a.seq,
        other => panic!("not a SendAck: {other:?}"),
    }
}

fn code(b: Body) -> ErrorCode {
    err_code(&b)
}

fn history(c: &mut Client, conv: u64) -> Vec<v1::Message> {
    match call(
        c,
        Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            ..Default::default()
        }),
    ) {
        Body::HistoryPage(p) => p.messages,
        other => panic!("{other:?}"),
    }
}

fn synced(c: &mut Client, conv: u64) -> Vec<v1::Message> {
    let id = c.next_id;
    c.next_id += 1;
    c.send(
        id,
        Body::Sync(v1::Sync {
            last_seq: [(conv, 0)].into_iter().collect(),
        }),
    );
    let (_, before) = recv_until(c, |f| {
        f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
    });
    before
        .into_iter()
        .filter(|f| f.request_id == id)
        .filter_map(|f| match f.body {
            Some(Body::Deliver(d)) => d.message.filter(|m| m.conversation_id == conv),
            _ => None,
        })
        .collect()
}

fn at(msgs: &[v1::Message], seq: u64) -> &v1::Message {
    msgs.iter()
        .find(|m| m.seq == seq)
        .unwrap_or_else(|| panic!("seq {seq} not served: {msgs:?}"))
}

fn pushed_change(c: &mut Client, seq: u64) -> v1::Message {
    let (f, _) = recv_until(
        c,
        |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq == seq)),
    );
    let Some(Body::Deliver(d)) = f.body else {
        unreachable!()
    };
    let m = d.message.unwrap();
    assert!(m.change.is_some(), "{m:?}");
    m
}

#[test]
fn edits_deletes_reactions_and_replies_in_a_direct_conversation_survive_a_restart() {
    let srv = Server::start("io-uring", TOML);
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let (ua, ub) = (ga.user_id, gb.user_id);
    let Body::SendAck(first) = call(&mut a, text(1, ub, "helo")) else {
        panic!()
    };
    let conv = first.conversation_id;
    assert_eq!(seq_of(call(&mut a, text(2, ub, "a secret"))), 2);
    // Edit 1, react to 1, reply to 1, delete 2.
    let edit = change(10, conv, v1::ChangeKind::Edit, 1, "", "hello");
    assert_eq!(seq_of(call(&mut a, edit.clone())), 3);
    let pushed = pushed_change(&mut b, 3);
    assert_eq!(
        (pushed.sender_user_id, &pushed.body[..]),
        (ua, &b"hello"[..])
    );
    let react = change(11, conv, v1::ChangeKind::React, 1, "👍", "");
    assert_eq!(seq_of(call(&mut b, react)), 4);
    let reply = Body::Send(v1::Send {
        client_msg_id: vec![12; 16].into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::ConversationId(conv)),
        }),
        content_type: "text/plain".into(),
        body: b"indeed".to_vec().into(),
        reply_to_seq: 1,
        ..Default::default()
    });
    assert_eq!(seq_of(call(&mut b, reply)), 5);
    assert_eq!(
        seq_of(call(
            &mut a,
            change(13, conv, v1::ChangeKind::Delete, 2, "", "")
        )),
        6
    );
    // A retry of the edit is the same entry.
    match call(&mut a, edit) {
        Body::SendAck(ack) => assert_eq!((ack.seq, ack.duplicate), (3, true)),
        other => panic!("{other:?}"),
    }
    // Refusals.
    let cases = [
        (
            change(20, conv, v1::ChangeKind::Edit, 1, "", "mine"),
            ErrorCode::PermissionDenied,
        ),
        (
            change(21, conv, v1::ChangeKind::React, 2, "🎉", ""),
            ErrorCode::FailedPrecondition,
        ),
        (
            change(22, conv, v1::ChangeKind::React, 77, "🎉", ""),
            ErrorCode::NotFound,
        ),
        (
            change(23, conv, v1::ChangeKind::React, 4, "🎉", ""),
            ErrorCode::InvalidArgument,
        ),
        (
            change(24, conv, v1::ChangeKind::Unspecified, 1, "", ""),
            ErrorCode::InvalidArgument,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(code(call(&mut b, req)), want);
    }
    let check = |msgs: &[v1::Message], how: &str| {
        let m1 = at(msgs, 1);
        assert_eq!(&m1.body[..], b"hello", "{how}: {m1:?}");
        assert!(m1.edited_ts_ms > 0 && !m1.deleted, "{how}: {m1:?}");
        let r: Vec<(u64, &str)> = m1
            .reactions
            .iter()
            .map(|r| (r.user_id, r.emoji.as_str()))
            .collect();
        assert_eq!(r, [(ub, "👍")], "{how}");
        let m2 = at(msgs, 2);
        assert!(m2.deleted && m2.body.is_empty(), "{how}: {m2:?}");
        assert_eq!(at(msgs, 5).reply_to_seq, 1, "{how}");
        let kinds: Vec<i32> = (3..=6)
            .map(|s| at(msgs, s).change.as_ref().map_or(0, |c| c.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                v1::ChangeKind::Edit as i32,
                v1::ChangeKind::React as i32,
                0,
                v1::ChangeKind::Delete as i32
            ],
            "{how}"
        );
    };
    check(&history(&mut b, conv), "history");
    check(&synced(&mut b, conv), "sync");
    // Ben has read nothing: ana's two messages are unread (his own reply is not, and changes
    // never are).
    let Body::ConversationList(l) = call(
        &mut b,
        Body::ListConversations(v1::ListConversations::default()),
    ) else {
        panic!()
    };
    let c = &l.conversations[0];
    assert_eq!((c.last_seq, c.unread_count), (6, 2), "{c:?}");
    drop((a, b));
    // After a SIGKILL the state is still there: it was durable before the changes were acked.
    let srv = srv.kill9_and_restart("io-uring");
    let mut b = srv.hello(&gb.access_token);
    check(&history(&mut b, conv), "history after a restart");
    check(&synced(&mut b, conv), "sync after a restart");
}

#[test]
fn in_a_group_an_admin_deletes_any_message_and_members_see_it_live() {
    let srv = Server::start("epoll", TOML);
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let Body::GroupInfo(g) = call(
        &mut a,
        Body::CreateGroup(v1::CreateGroup {
            name: "g".into(),
            member_user_ids: vec![gb.user_id],
            avatar: None,
        }),
    ) else {
        panic!()
    };
    let conv = g.conversation_id;
    recv_until(&mut b, |f| matches!(f.body, Some(Body::Deliver(_)))); // the CREATED event
    let to_group = |cmid: u8, words: &str| {
        Body::Send(v1::Send {
            client_msg_id: vec![cmid; 16].into(),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::ConversationId(conv)),
            }),
            content_type: "text/plain".into(),
            body: words.as_bytes().to_vec().into(),
            ..Default::default()
        })
    };
    let bens = seq_of(call(&mut b, to_group(1, "spam")));
    // Ben is no admin: he may not delete ana's message; ana (admin) deletes his.
    let anas = seq_of(call(&mut a, to_group(2, "rules")));
    let theirs = change(3, conv, v1::ChangeKind::Delete, anas, "", "");
    assert_eq!(code(call(&mut b, theirs)), ErrorCode::PermissionDenied);
    let del = change(4, conv, v1::ChangeKind::Delete, bens, "", "");
    let seq = seq_of(call(&mut a, del));
    let m = pushed_change(&mut b, seq);
    let ch = m.change.unwrap();
    assert_eq!(
        (ch.kind, ch.target_seq),
        (v1::ChangeKind::Delete as i32, bens)
    );
    assert_eq!(m.sender_user_id, ga.user_id);
    let h = history(&mut b, conv);
    assert!(at(&h, bens).deleted && at(&h, bens).body.is_empty());
    assert_eq!(&at(&h, anas).body[..], b"rules");
}
