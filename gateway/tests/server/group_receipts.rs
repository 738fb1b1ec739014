//! Group receipts through the real binary: in a group of 4, the members' delivery and read
//! cursors reach the sender as coalesced counts (`GroupReceipts`), never as one Receipt per
//! member to every member; `GetReceipts` names who received and read a message; a Sync
//! returns the caller's own read cursor and its messages' counts.

use std::collections::BTreeMap;

use super::*;

fn send_to(cmid: u8, conv: u64) -> Body {
    Body::Send(v1::Send {
        client_msg_id: vec![cmid; 16].into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::ConversationId(conv)),
        }),
        content_type: "text/plain".into(),
        body: b"on belay?".to_vec().into(),
        ..Default::default()
    })
}

fn counts(f: &v1::Frame) -> Option<&v1::GroupReceipts> {
    match &f.body {
        Some(Body::GroupReceipts(g)) => Some(g),
        _ => None,
    }
}

/// Receipts of other users pushed to `c` before the answer to a Ping sent now.
fn others_receipts(c: &mut Client, me: u64) -> Vec<v1::Receipt> {
    let id = c.next_id;
    c.next_id += 1;
    c.send(id, Body::Ping(v1::Ping::default()));
    let (_, before) = recv_until(c, |f| f.request_id == id);
    before
        .into_iter()
        .filter_map(|f| match f.body {
            Some(Body::Receipt(r)) if r.by_user_id != me => Some(r),
            _ => None,
        })
        .collect()
}

#[test]
fn a_group_of_four_sender_gets_coalesced_counts_and_detail_on_request_and_no_member_flood() {
    let srv = Server::start("auto", "[router]\ngroup_receipts_coalesce_ms = 300\n");
    let mut users = Vec::new();
    for who in ["ana", "ben", "cam", "dan"] {
        let mut c = srv.hello("");
        let e = format!("{who}@example.org");
        let g = register(&srv, &mut c, email(&e), &e);
        users.push((g.user_id, srv.hello(&g.access_token)));
    }
    let ids: Vec<u64> = users.iter().map(|(u, _)| *u).collect();
    let (ana, ben, cam, dan) = (ids[0], ids[1], ids[2], ids[3]);
    let conv = match call(
        &mut users[0].1,
        Body::CreateGroup(v1::CreateGroup {
            name: "Crag".into(),
            member_user_ids: vec![ben, cam, dan],
            avatar: None,
        }),
    ) {
        Body::GroupInfo(i) => i.conversation_id,
        other => panic!("expected GroupInfo, got {other:?}"),
    };
    let seq = match call(&mut users[0].1, send_to(1, conv)) {
        Body::SendAck(a) => a.seq,
        other => panic!("expected SendAck, got {other:?}"),
    };
    // Each other member receives it, acknowledges it durably; ben and cam also read it.
    for (i, (_, c)) in users.iter_mut().enumerate().skip(1) {
        recv_until(
            c,
            |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq == seq)),
        );
        let ack = Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conv,
            up_to_seq: seq,
        });
        assert!(matches!(call(c, ack), Body::Done(_)));
        if i <= 2 {
            let read = Body::ReadCursor(v1::ReadCursor {
                conversation_id: conv,
                up_to_seq: seq,
            });
            assert!(matches!(call(c, read), Body::Done(_)));
        }
    }
    // The sender's counts rise to 3 received, 2 read, of 3 recipients, in pushes coalesced per
    // group (5 cursor changes; each push carries what changed since the one before).
    let mut pushes = 0;
    let mut last = (0, 0, 0);
    while last != (3, 2, 3) {
        let f = users[0].1.recv().expect("connection closed while waiting");
        if let Some(g) = counts(&f) {
            pushes += 1;
            assert_eq!((f.request_id, g.conversation_id), (0, conv));
            assert_eq!(g.messages.len(), 1, "{g:?}");
            let m = &g.messages[0];
            assert_eq!(m.seq, seq);
            let now = (m.delivered, m.read, m.recipients);
            assert!(now.0 >= last.0 && now.1 >= last.1, "{last:?} then {now:?}");
            last = now;
        }
    }
    assert!(pushes <= 5, "{pushes} pushes");
    // No member receives another member's cursors as Receipt frames (only the reader's own
    // read receipt, for its other devices).
    for (u, c) in users.iter_mut() {
        let got = others_receipts(c, *u);
        assert!(got.is_empty(), "user {u} got {got:?}");
    }
    // Per-member detail on request, by any member who may see the message.
    for c in [0, 3] {
        match call(
            &mut users[c].1,
            Body::GetReceipts(v1::GetReceipts {
                conversation_id: conv,
                seq,
                ..v1::GetReceipts::default()
            }),
        ) {
            Body::ReceiptDetail(d) => {
                let mut delivered = vec![ben, cam, dan];
                delivered.sort_unstable();
                let mut read = vec![ben, cam];
                read.sort_unstable();
                assert_eq!(
                    (d.conversation_id, d.seq, d.sender_user_id, d.recipients),
                    (conv, seq, ana, 3)
                );
                assert_eq!(d.delivered_user_ids, delivered);
                assert_eq!(d.read_user_ids, read);
            }
            other => panic!("expected ReceiptDetail, got {other:?}"),
        }
    }
    // Bad requests get clear errors.
    for (s, code) in [
        (0, ErrorCode::InvalidArgument),
        (seq + 100, ErrorCode::InvalidArgument),
    ] {
        match call(
            &mut users[1].1,
            Body::GetReceipts(v1::GetReceipts {
                conversation_id: conv,
                seq: s,
                ..v1::GetReceipts::default()
            }),
        ) {
            Body::Error(e) => assert_eq!(e.code, code as i32, "{e:?}"),
            other => panic!("expected Error, got {other:?}"),
        }
    }
    let mut stranger = srv.hello("");
    let g = register(
        &srv,
        &mut stranger,
        email("eve@example.org"),
        "eve@example.org",
    );
    let mut eve = srv.hello(&g.access_token);
    match call(
        &mut eve,
        Body::GetReceipts(v1::GetReceipts {
            conversation_id: conv,
            seq,
            ..v1::GetReceipts::default()
        }),
    ) {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::NotAMember as i32, "{e:?}"),
        other => panic!("expected Error, got {other:?}"),
    }
    // A Sync: the caller's own read cursor and its messages' counts, not every member's.
    for (i, want_counts) in [(0, true), (1, false)] {
        let (me, c) = &mut users[i];
        let id = c.next_id;
        c.next_id += 1;
        c.send(
            id,
            Body::Sync(v1::Sync {
                last_seq: BTreeMap::from([(conv, seq)]),
            }),
        );
        let (done, before) = recv_until(c, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let mine: Vec<&v1::Frame> = before.iter().filter(|f| f.request_id == id).collect();
        for f in &mine {
            if let Some(Body::Receipt(r)) = &f.body {
                assert_eq!(r.by_user_id, *me, "{r:?}");
            }
        }
        let g: Vec<&v1::GroupReceipts> = mine.iter().filter_map(|f| counts(f)).collect();
        if want_counts {
            assert_eq!(g.len(), 1, "{mine:?}");
            let m = &g[0].messages[0];
            assert_eq!((m.seq, m.delivered, m.read, m.recipients), (seq, 3, 2, 3));
        } else {
            assert!(g.is_empty(), "{g:?}");
            // ben's own read cursor.
            assert!(mine.iter().any(|f| matches!(&f.body, Some(Body::Receipt(r)) if r.up_to_seq == seq && r.kind == v1::ReceiptKind::Read as i32)));
        }
        let Some(Body::SyncDone(d)) = done.body else {
            unreachable!()
        };
        assert_eq!(d.receipts as usize, mine.len() - d.messages as usize);
    }
}

/// With `router.group_info_members_page = 2`, a group of 5 lists its members, and a message's
/// receipts, in pages: the counts cover everyone, the lists one page each, and walking
/// `members_next_after_user_id` / `next_after_user_id` reads each member exactly once.
#[test]
fn a_group_larger_than_a_page_is_read_in_pages() {
    let srv = Server::start(
        "auto",
        "[router]\ngroup_info_members_page = 2\ngroup_receipts_coalesce_ms = 50\n",
    );
    let mut users = Vec::new();
    for who in ["fay", "gus", "hal", "ida", "jo"] {
        let mut c = srv.hello("");
        let e = format!("{who}@example.org");
        let g = register(&srv, &mut c, email(&e), &e);
        users.push((g.user_id, srv.hello(&g.access_token)));
    }
    let mut ids: Vec<u64> = users.iter().map(|(u, _)| *u).collect();
    let first = match call(
        &mut users[0].1,
        Body::CreateGroup(v1::CreateGroup {
            name: "Big wall".into(),
            member_user_ids: ids[1..].to_vec(),
            avatar: None,
        }),
    ) {
        Body::GroupInfo(i) => i,
        other => panic!("expected GroupInfo, got {other:?}"),
    };
    let conv = first.conversation_id;
    ids.sort_unstable();
    // The answer to the change is the first page; the others follow by GetGroupInfo.
    assert_eq!((first.members.len(), first.member_count), (2, 5));
    let mut seen: Vec<u64> = first.members.iter().map(|m| m.user_id).collect();
    let mut next = first.members_next_after_user_id;
    assert_eq!(next, seen[1]);
    while next != 0 {
        let page = match call(
            &mut users[3].1,
            Body::GetGroupInfo(v1::GetGroupInfo {
                conversation_id: conv,
                members_after_user_id: next,
                members_limit: 0,
            }),
        ) {
            Body::GroupInfo(i) => i,
            other => panic!("expected GroupInfo, got {other:?}"),
        };
        assert!(
            page.members.len() <= 2 && page.member_count == 5,
            "{page:?}"
        );
        assert_eq!(page.version, first.version);
        seen.extend(page.members.iter().map(|m| m.user_id));
        next = page.members_next_after_user_id;
    }
    assert_eq!(seen, ids, "every member once, ascending");
    // A smaller limit than the page is honoured.
    match call(
        &mut users[3].1,
        Body::GetGroupInfo(v1::GetGroupInfo {
            conversation_id: conv,
            members_after_user_id: 0,
            members_limit: 1,
        }),
    ) {
        Body::GroupInfo(i) => {
            assert_eq!(i.members.len(), 1);
            assert_eq!(i.members_next_after_user_id, ids[0]);
        }
        other => panic!("expected GroupInfo, got {other:?}"),
    }

    // A message: two members acknowledge it, one of them reads it.
    let sender = users[0].0;
    let seq = match call(&mut users[0].1, send_to(9, conv)) {
        Body::SendAck(a) => a.seq,
        other => panic!("expected SendAck, got {other:?}"),
    };
    for (i, (_, c)) in users.iter_mut().enumerate().skip(1).take(2) {
        recv_until(
            c,
            |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq == seq)),
        );
        let ack = Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conv,
            up_to_seq: seq,
        });
        assert!(matches!(call(c, ack), Body::Done(_)));
        if i == 1 {
            let read = Body::ReadCursor(v1::ReadCursor {
                conversation_id: conv,
                up_to_seq: seq,
            });
            assert!(matches!(call(c, read), Body::Done(_)));
        }
    }
    let (gus, hal) = (users[1].0, users[2].0);
    // The counts are durable once the sender has heard them.
    loop {
        let f = users[0].1.recv().expect("connection closed while waiting");
        if let Some(g) = counts(&f)
            && g.messages.iter().any(|m| (m.delivered, m.read) == (2, 1))
        {
            break;
        }
    }
    let (mut delivered, mut read, mut after, mut pages) = (Vec::new(), Vec::new(), 0, 0);
    loop {
        let d = match call(
            &mut users[4].1,
            Body::GetReceipts(v1::GetReceipts {
                conversation_id: conv,
                seq,
                after_user_id: after,
                limit: 0,
            }),
        ) {
            Body::ReceiptDetail(d) => d,
            other => panic!("expected ReceiptDetail, got {other:?}"),
        };
        pages += 1;
        assert_eq!(
            (d.sender_user_id, d.recipients, d.delivered, d.read),
            (sender, 4, 2, 1)
        );
        delivered.extend(d.delivered_user_ids);
        read.extend(d.read_user_ids);
        if d.next_after_user_id == 0 {
            break;
        }
        assert!(d.next_after_user_id > after);
        after = d.next_after_user_id;
    }
    assert_eq!(pages, 2, "4 recipients in pages of 2");
    let mut want = vec![gus, hal];
    want.sort_unstable();
    assert_eq!((delivered, read), (want, vec![gus]));
}
