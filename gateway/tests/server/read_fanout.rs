//! Fan-out on read through the real binary: in a group larger than
//! `router.group_push_members_max`, a message is not pushed to the members' devices; they get
//! one coalesced `MessagesAvailable` and pull the messages with Sync.

use std::collections::BTreeMap;

use super::*;

#[test]
fn a_group_over_the_push_limit_gets_messages_available_and_pulls_with_sync() {
    let srv = Server::start(
        "auto",
        "[router]\ngroup_push_members_max = 2\ngroup_available_ms = 1000\n",
    );
    let mut users = Vec::new();
    for who in ["ana", "ben", "cam"] {
        let mut c = srv.hello("");
        let e = format!("{who}@example.org");
        let g = register(&srv, &mut c, email(&e), &e);
        users.push((g.user_id, srv.hello(&g.access_token)));
    }
    let (ben, cam) = (users[1].0, users[2].0);
    let conv = match call(
        &mut users[0].1,
        Body::CreateGroup(v1::CreateGroup {
            name: "Big".into(),
            member_user_ids: vec![ben, cam],
            avatar: None,
        }),
    ) {
        Body::GroupInfo(i) => i.conversation_id,
        other => panic!("expected GroupInfo, got {other:?}"),
    };
    // Three messages in a row: each is acknowledged; nobody gets them pushed.
    let mut last = 0;
    for i in 0..3u8 {
        let send = Body::Send(v1::Send {
            client_msg_id: vec![i + 1; 16].into(),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::ConversationId(conv)),
            }),
            content_type: "text/plain".into(),
            body: vec![b'x'; 10].into(),
            ..Default::default()
        });
        last = match call(&mut users[0].1, send) {
            Body::SendAck(a) => a.seq,
            other => panic!("expected SendAck, got {other:?}"),
        };
    }
    for (_, c) in users.iter_mut().skip(1) {
        // The first hint may name an earlier seq (the creation event); wait for the last.
        let (_, before) = recv_until(c, |f| {
            matches!(&f.body, Some(Body::MessagesAvailable(a))
                if a.conversation_id == conv && a.up_to_seq == last)
        });
        let pushed: Vec<_> = before
            .iter()
            .filter(|f| {
                matches!(&f.body, Some(Body::Deliver(d))
                    if d.message.as_ref().is_some_and(|m| m.body.as_ref() == b"xxxxxxxxxx"))
            })
            .collect();
        assert!(pushed.is_empty(), "messages pushed: {pushed:?}");
        let hints = before
            .iter()
            .filter(|f| matches!(&f.body, Some(Body::MessagesAvailable(_))))
            .count();
        // Coalesced: 4 entries (the creation event and 3 messages) in fewer announcements.
        assert!(hints <= 2, "{hints} earlier hints");
        // Pulled with Sync.
        let id = c.next_id;
        c.next_id += 1;
        c.send(
            id,
            Body::Sync(v1::Sync {
                last_seq: BTreeMap::from([(conv, 1)]),
            }),
        );
        let (_, before) = recv_until(c, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let seqs: Vec<u64> = before
            .iter()
            .filter(|f| f.request_id == id)
            .filter_map(|f| match &f.body {
                Some(Body::Deliver(d)) => d.message.as_ref().map(|m| m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, (2..=last).collect::<Vec<_>>());
    }
}
