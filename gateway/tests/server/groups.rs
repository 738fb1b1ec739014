//! Groups through the real binary (two shards): three users with two devices each, online and
//! offline, through every group request and its refusals; events sequenced in the
//! conversation like messages, live, by Sync and in history; who sees what after joining or
//! leaving; the conversation list; only-admins-send; the last admin; the size limits; and a
//! restart in the middle; and SIGKILL among a stream of changes, after which the group and its
//! events still agree.

use std::collections::BTreeMap;

use super::*;

const PASSWORD: &str = "correct horse battery";

/// A user registered by e-mail with a password, and a second device signed in with it.
fn two_devices(srv: &Server, who: &str) -> (v1::SessionGranted, v1::SessionGranted) {
    let mut c = srv.hello("");
    let g = register(srv, &mut c, email(who), who);
    let set = c.request(Body::SetPassword(v1::SetPassword {
        new_password: PASSWORD.into(),
    }));
    assert!(matches!(set, Body::Done(_)), "{set:?}");
    (g, second_device(srv, email(who)))
}

fn to_conv(cmid: u8, conv: u64, body: &str) -> Body {
    Body::Send(v1::Send {
        client_msg_id: vec![cmid; 16].into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::ConversationId(conv)),
        }),
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec().into(),
        ..Default::default()
    })
}

fn info(b: Body) -> v1::GroupInfo {
    match b {
        Body::GroupInfo(i) => i,
        other => panic!("expected GroupInfo, got {other:?}"),
    }
}

/// `(user, admin)` of each member.
fn roles(i: &v1::GroupInfo) -> Vec<(u64, bool)> {
    i.members
        .iter()
        .map(|m| (m.user_id, m.role == v1::GroupRole::Admin as i32))
        .collect()
}

fn sent_seq(b: Body) -> u64 {
    match b {
        Body::SendAck(a) => a.seq,
        other => panic!("expected SendAck, got {other:?}"),
    }
}

/// The next pushed message (Deliver) on `c`.
fn next_deliver(c: &mut Client) -> v1::Message {
    let (f, _) = recv_until(c, |f| {
        f.request_id == 0 && matches!(f.body, Some(Body::Deliver(_)))
    });
    match f.body {
        Some(Body::Deliver(d)) => d.message.unwrap(),
        _ => unreachable!(),
    }
}

/// The kind of group event `m` is (UNSPECIFIED for a message).
fn kind(m: &v1::Message) -> v1::GroupChangeKind {
    m.group_changed
        .as_ref()
        .map_or(v1::GroupChangeKind::Unspecified, |e| {
            v1::GroupChangeKind::try_from(e.kind).unwrap()
        })
}

/// Waits for the push of `seq` on `c`, checking it is the next one (nothing skipped).
fn expect_push(c: &mut Client, seq: u64) -> v1::Message {
    let m = next_deliver(c);
    assert_eq!(m.seq, seq, "{m:?}");
    m
}

/// Nothing is pushed to `c` before the answer to a Ping sent now.
fn nothing_more(c: &mut Client) {
    let id = c.next_id;
    c.next_id += 1;
    c.send(id, Body::Ping(v1::Ping::default()));
    let (_, before) = recv_until(c, |f| f.request_id == id);
    let delivers: Vec<&v1::Frame> = before
        .iter()
        .filter(|f| matches!(f.body, Some(Body::Deliver(_))))
        .collect();
    assert!(delivers.is_empty(), "pushed after the end: {delivers:?}");
}

/// Everything a Sync returns for `conv` after `last`, as seqs with their event kinds.
fn sync(c: &mut Client, conv: u64, last: u64) -> Vec<(u64, v1::GroupChangeKind)> {
    let id = c.next_id;
    c.next_id += 1;
    let mut last_seq = BTreeMap::new();
    if last > 0 {
        last_seq.insert(conv, last);
    }
    c.send(id, Body::Sync(v1::Sync { last_seq }));
    let (_, before) = recv_until(c, |f| {
        f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
    });
    before
        .into_iter()
        .filter(|f| f.request_id == id)
        .filter_map(|f| match f.body {
            Some(Body::Deliver(d)) => d.message,
            _ => None,
        })
        .filter(|m| m.conversation_id == conv)
        .map(|m| (m.seq, kind(&m)))
        .collect()
}

/// The seqs of a history page of `conv` and its `has_more`.
fn history(c: &mut Client, conv: u64, anchor: Option<v1::get_history::Anchor>) -> (Vec<u64>, bool) {
    match call(
        c,
        Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            anchor,
            limit: 0,
        }),
    ) {
        Body::HistoryPage(p) => (p.messages.iter().map(|m| m.seq).collect(), p.has_more),
        other => panic!("{other:?}"),
    }
}

/// `c`'s conversation-list line of `conv`.
fn summary(c: &mut Client, conv: u64) -> v1::ConversationSummary {
    match call(c, Body::ListConversations(v1::ListConversations::default())) {
        Body::ConversationList(l) => l
            .conversations
            .into_iter()
            .find(|s| s.conversation_id == conv)
            .unwrap_or_else(|| panic!("{conv} not listed")),
        other => panic!("{other:?}"),
    }
}

/// The code and message of an Error answer.
fn refused(b: Body) -> (ErrorCode, String) {
    match b {
        Body::Error(e) => (ErrorCode::try_from(e.code).unwrap(), e.message),
        other => panic!("expected Error, got {other:?}"),
    }
}

fn add(conv: u64, users: &[u64]) -> Body {
    Body::AddGroupMembers(v1::AddGroupMembers {
        conversation_id: conv,
        user_ids: users.to_vec(),
    })
}

fn remove(conv: u64, users: &[u64]) -> Body {
    Body::RemoveGroupMembers(v1::RemoveGroupMembers {
        conversation_id: conv,
        user_ids: users.to_vec(),
    })
}

fn set_role(conv: u64, user: u64, role: v1::GroupRole) -> Body {
    Body::SetGroupRole(v1::SetGroupRole {
        conversation_id: conv,
        user_id: user,
        role: role as i32,
    })
}

fn get_info(conv: u64) -> Body {
    Body::GetGroupInfo(v1::GetGroupInfo {
        conversation_id: conv,
        ..v1::GetGroupInfo::default()
    })
}

fn leave(conv: u64) -> Body {
    Body::LeaveGroup(v1::LeaveGroup {
        conversation_id: conv,
    })
}

#[test]
fn a_group_of_three_users_with_two_devices_each_through_every_request() {
    let srv = Server::start(
        "auto",
        "[router]\ngroup_members_max = 3\ngroup_request_users_max = 2\n",
    );
    // The server offers groups.
    let mut probe = srv.connect();
    match probe.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        ..Default::default()
    })) {
        Body::Welcome(w) => assert!(w.features.iter().any(|f| f == "groups"), "{w:?}"),
        other => panic!("{other:?}"),
    }
    // Not authenticated: the group requests need a user.
    let (code, _) = refused(probe.request(get_info((1 << 63) | 1)));
    assert_eq!(code, ErrorCode::Unauthenticated);
    let (ga1, ga2) = two_devices(&srv, "ana@example.org");
    let (gb1, gb2) = two_devices(&srv, "ben@example.org");
    let (gc1, gc2) = two_devices(&srv, "cam@example.org");
    let (ana, ben, cam) = (ga1.user_id, gb1.user_id, gc1.user_id);
    let mut dan = srv.hello("");
    let gd = register(&srv, &mut dan, email("dan@example.org"), "dan@example.org");
    let mut a1 = srv.hello(&ga1.access_token);
    let mut a2 = srv.hello(&ga2.access_token);
    let mut b1 = srv.hello(&gb1.access_token);
    let mut c2 = srv.hello(&gc2.access_token);
    // b2 and c1 are offline.

    // CreateGroup: ana (admin) and ben; the CREATED event is seq 1, pushed to the members'
    // online devices (the creator's other device included).
    let g = info(call(
        &mut a1,
        Body::CreateGroup(v1::CreateGroup {
            name: "Climbing".into(),
            member_user_ids: vec![ben, ana],
            avatar: None,
        }),
    ));
    let conv = g.conversation_id;
    assert_eq!(roles(&g), [(ana, true), (ben, false)]);
    assert_eq!(
        (g.name.as_str(), g.version, g.created_by_user_id),
        ("Climbing", 1, ana)
    );
    for c in [&mut a2, &mut b1] {
        let m = expect_push(c, 1);
        assert_eq!(kind(&m), v1::GroupChangeKind::Created);
        let ev = m.group_changed.unwrap();
        assert_eq!(ev.user_ids, [ana, ben]);
        assert_eq!(ev.by_user_id, ana);
        assert_eq!((m.sender_user_id, m.sender_device_id), (ana, 0));
        assert!(ev.group.unwrap().members.is_empty());
    }
    assert_eq!(info(call(&mut b1, get_info(conv))).version, 1);
    // Two shards, the devices' connections spread over both: whichever owns the group, some
    // member connections are on the other one.
    let owner = starling_router::ids::owner_shard(starling_router::ids::ConvId(conv), 2);
    let per_shard = |i: usize| {
        srv.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("starling_connections{{shard=\"{i}\"}} ")))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    // The kernel spreads connections over the shards' listeners by a hash of their addresses:
    // all on one shard happens (1 in 32 here), so ben's device reconnects until both have some.
    for _ in 0..64 {
        if per_shard(0) > 0 && per_shard(1) > 0 {
            break;
        }
        drop(b1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        b1 = srv.hello(&gb1.access_token);
    }
    assert!(
        per_shard(0) > 0 && per_shard(1) > 0,
        "connections on one shard only (the group's owner is shard {owner})"
    );

    // A message (seq 2) to the members.
    assert_eq!(sent_seq(call(&mut a1, to_conv(1, conv, "hello group"))), 2);
    expect_push(&mut b1, 2);
    expect_push(&mut a2, 2);

    // Refusals: a member may not administer; a stranger is not a member; bad arguments.
    for req in [
        add(conv, &[cam]),
        remove(conv, &[ana]),
        set_role(conv, ben, v1::GroupRole::Admin),
        Body::UpdateGroup(v1::UpdateGroup {
            conversation_id: conv,
            name: Some("Mine".into()),
            ..Default::default()
        }),
    ] {
        let (code, msg) = refused(call(&mut b1, req));
        assert_eq!(code, ErrorCode::PermissionDenied);
        assert!(msg.contains("admins"), "{msg}");
    }
    assert_eq!(
        refused(call(&mut dan, get_info(conv))).0,
        ErrorCode::NotAMember
    );
    assert_eq!(
        refused(call(&mut dan, to_conv(9, conv, "let me in"))).0,
        ErrorCode::NotAMember
    );
    assert_eq!(
        refused(call(&mut dan, leave(conv))).0,
        ErrorCode::NotAMember
    );
    let none = (1u64 << 63) | 12_345;
    assert_eq!(
        refused(call(&mut a1, get_info(none))).0,
        ErrorCode::NotFound
    );
    assert_eq!(
        refused(call(&mut a1, get_info(0))).0,
        ErrorCode::InvalidArgument
    );
    let (code, msg) = refused(call(&mut a1, add(conv, &[987_654])));
    assert_eq!(
        (code, msg.as_str()),
        (ErrorCode::NotFound, "no such user: 987654")
    );
    assert_eq!(
        refused(call(&mut a1, set_role(conv, cam, v1::GroupRole::Admin))).0,
        ErrorCode::NotAMember
    );
    assert_eq!(
        refused(call(
            &mut a1,
            set_role(conv, ben, v1::GroupRole::Unspecified)
        ))
        .0,
        ErrorCode::InvalidArgument
    );
    let (code, msg) = refused(call(
        &mut a1,
        Body::CreateGroup(v1::CreateGroup {
            name: String::new(),
            ..Default::default()
        }),
    ));
    assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
    let (code, msg) = refused(call(
        &mut a1,
        Body::CreateGroup(v1::CreateGroup {
            name: "Big".into(),
            member_user_ids: vec![ben, cam, gd.user_id],
            avatar: None,
        }),
    ));
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(msg.contains("group_request_users_max = 2"), "{msg}");
    // The last admin cannot leave; nobody is promoted.
    let (code, msg) = refused(call(&mut a1, leave(conv)));
    assert_eq!(code, ErrorCode::PermissionDenied);
    assert!(msg.contains("SetGroupRole"), "{msg}");

    // AddGroupMembers: cam joins at seq 3, and sees the group from there on only.
    let g = info(call(&mut a1, add(conv, &[cam, ben])));
    assert_eq!(roles(&g), [(ana, true), (ben, false), (cam, false)]);
    let m = expect_push(&mut c2, 3);
    assert_eq!(kind(&m), v1::GroupChangeKind::MembersAdded);
    assert_eq!(m.group_changed.unwrap().user_ids, [cam]);
    expect_push(&mut b1, 3);
    expect_push(&mut a2, 3);
    assert_eq!(sent_seq(call(&mut b1, to_conv(2, conv, "welcome cam"))), 4);
    expect_push(&mut c2, 4);
    expect_push(&mut a2, 4);
    // The group is full (3): a fourth member is refused, naming the limit.
    let (code, msg) = refused(call(&mut a1, add(conv, &[gd.user_id])));
    assert_eq!(code, ErrorCode::PermissionDenied);
    assert!(msg.contains("group_members_max = 3"), "{msg}");
    // cam's offline device: Sync and history start at its join.
    let mut c1 = srv.hello(&gc1.access_token);
    use v1::GroupChangeKind as K;
    assert_eq!(
        sync(&mut c1, conv, 0),
        [(3, K::MembersAdded), (4, K::Unspecified)]
    );
    assert_eq!(history(&mut c1, conv, None), (vec![3, 4], false));
    let before_join = Some(v1::get_history::Anchor::BeforeSeq(3));
    assert_eq!(history(&mut c1, conv, before_join), (vec![], false));
    let s = summary(&mut c1, conv);
    assert_eq!(s.kind, v1::ConversationKind::Group as i32);
    assert_eq!(
        (s.title.as_str(), s.last_seq, s.unread_count),
        ("Climbing", 4, 2)
    );
    // ben's offline device gets everything, events included, by Sync.
    let mut b2 = srv.hello(&gb2.access_token);
    assert_eq!(
        sync(&mut b2, conv, 0),
        [
            (1, K::Created),
            (2, K::Unspecified),
            (3, K::MembersAdded),
            (4, K::Unspecified)
        ]
    );
    drop(b2);

    // SetGroupRole (seq 5) and UpdateGroup (seq 6): only admins send now.
    let g = info(call(&mut a1, set_role(conv, ben, v1::GroupRole::Admin)));
    assert_eq!(roles(&g), [(ana, true), (ben, true), (cam, false)]);
    let m = expect_push(&mut c2, 5);
    let ev = m.group_changed.unwrap();
    assert_eq!(
        (ev.user_ids, ev.role),
        (vec![ben], v1::GroupRole::Admin as i32)
    );
    let g = info(call(
        &mut a1,
        Body::UpdateGroup(v1::UpdateGroup {
            conversation_id: conv,
            name: Some("Crag".into()),
            avatar: None,
            only_admins_send: Some(true),
        }),
    ));
    assert!(g.only_admins_send && g.name == "Crag" && g.version == 4);
    let m = expect_push(&mut c2, 6);
    assert_eq!(kind(&m), K::Updated);
    assert_eq!(m.group_changed.unwrap().group.unwrap().name, "Crag");
    let (code, msg) = refused(call(&mut c2, to_conv(3, conv, "may I?")));
    assert_eq!(code, ErrorCode::PermissionDenied);
    assert!(msg.contains("admins"), "{msg}");
    assert_eq!(
        sent_seq(call(&mut b1, to_conv(4, conv, "admins only now"))),
        7
    );
    expect_push(&mut c2, 7);

    // RemoveGroupMembers: cam's devices get the removal (seq 8), then nothing more.
    let g = info(call(&mut a1, remove(conv, &[cam, gd.user_id])));
    assert_eq!(roles(&g), [(ana, true), (ben, true)]);
    let m = expect_push(&mut c2, 8);
    assert_eq!(kind(&m), K::MembersRemoved);
    assert_eq!(sent_seq(call(&mut b1, to_conv(5, conv, "bye cam"))), 9);
    for seq in 5..=9 {
        expect_push(&mut a2, seq);
    }
    nothing_more(&mut c2);
    assert_eq!(
        sync(&mut c1, conv, 4),
        [
            (5, K::RoleChanged),
            (6, K::Updated),
            (7, K::Unspecified),
            (8, K::MembersRemoved)
        ]
    );
    assert_eq!(
        history(&mut c1, conv, None),
        (vec![3, 4, 5, 6, 7, 8], false)
    );
    let after = Some(v1::get_history::Anchor::AfterSeq(7));
    assert_eq!(history(&mut c1, conv, after), (vec![8], false));
    let s = summary(&mut c1, conv);
    assert_eq!((s.title.as_str(), s.last_seq), ("Crag", 8));
    assert_eq!(s.last_message.unwrap().seq, 8);
    assert_eq!(
        refused(call(&mut c1, to_conv(6, conv, "still here?"))).0,
        ErrorCode::NotAMember
    );
    assert_eq!(
        refused(call(&mut c1, get_info(conv))).0,
        ErrorCode::NotAMember
    );
    nothing_more(&mut c1);

    // LeaveGroup: ana may leave now that ben is an admin too (seq 10); her devices get that
    // event and nothing after it.
    assert!(matches!(call(&mut a1, leave(conv)), Body::Done(_)));
    let m = expect_push(&mut a2, 10);
    assert_eq!(kind(&m), K::MemberLeft);
    assert_eq!(m.group_changed.unwrap().user_ids, [ana]);
    // (b1's earlier pushes were passed over while it waited for its own answers.)
    let m = recv_until(
        &mut b1,
        |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq >= 10)),
    );
    assert!(
        matches!(m.0.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq == 10))
    );
    let g = info(call(&mut b1, get_info(conv)));
    assert_eq!(roles(&g), [(ben, true)]);
    assert_eq!(sent_seq(call(&mut b1, to_conv(7, conv, "alone"))), 11);
    nothing_more(&mut a2);
    assert_eq!(sync(&mut a2, conv, 9), [(10, K::MemberLeft)]);

    // A change that changes nothing makes no event.
    let g = info(call(&mut b1, add(conv, &[ben])));
    assert_eq!(g.version, 6);
    assert_eq!(history(&mut b1, conv, None).0.last(), Some(&11));

    // After a crash and restart, the group, its events and who sees what are all there.
    drop((a1, a2, b1, c1, c2, dan, probe));
    let srv = srv.kill9_and_restart("auto");
    let mut b1 = srv.hello(&gb1.access_token);
    let g = info(call(&mut b1, get_info(conv)));
    assert_eq!(
        (roles(&g), g.version, g.name.as_str()),
        (vec![(ben, true)], 6, "Crag")
    );
    assert_eq!(history(&mut b1, conv, None).0, (1..=11).collect::<Vec<_>>());
    let mut c1 = srv.hello(&gc1.access_token);
    assert_eq!(history(&mut c1, conv, None).0, (3..=8).collect::<Vec<_>>());
    // cam comes back: a new membership from its new join event.
    let g = info(call(&mut b1, add(conv, &[cam])));
    assert_eq!(roles(&g), [(ben, true), (cam, false)]);
    let m = expect_push(&mut c1, 12);
    assert_eq!(kind(&m), K::MembersAdded);
    assert_eq!(history(&mut c1, conv, None), (vec![12], false));
}

/// The server is killed with SIGKILL while a stream of membership changes (and messages) is
/// in flight, three times. After each restart the group's state and its events agree: the
/// version is the last event's, the events' versions run 1, 2, 3... without a gap or a
/// repeat, and the members are those the events say. Changes answered before a crash are in.
#[test]
fn sigkill_among_group_changes_leaves_membership_and_events_agreeing() {
    let mut srv = Server::start("auto", "");
    let (mut a, ga, _b, gb) = ana_and_ben(&srv);
    let mut c = srv.hello("");
    let gc = register(&srv, &mut c, email("cam@example.org"), "cam@example.org");
    drop(c);
    let (ana, ben, cam) = (ga.user_id, gb.user_id, gc.user_id);
    let conv = info(call(
        &mut a,
        Body::CreateGroup(v1::CreateGroup {
            name: "Crash".into(),
            member_user_ids: vec![ben],
            avatar: None,
        }),
    ))
    .conversation_id;
    let mut answered_version = 1;
    for round in 0..3u8 {
        // 30 requests in one write: cam in, cam out, ..., and a message now and then.
        let mut ids = Vec::new();
        for i in 0..30u8 {
            let body = match i % 3 {
                0 => add(conv, &[cam]),
                1 => remove(conv, &[cam]),
                _ => to_conv(round * 40 + i + 1, conv, "between changes"),
            };
            let id = a.next_id;
            a.next_id += 1;
            a.send(id, body);
            ids.push(id);
        }
        // Some answers arrive; then the server dies.
        for _ in 0..3 {
            if let Some(f) = a.recv()
                && let Some(Body::GroupInfo(g)) = f.body
            {
                answered_version = answered_version.max(g.version);
            }
        }
        drop(a);
        srv = srv.kill9_and_restart("auto");
        a = srv.hello(&ga.access_token);
        let g = info(call(&mut a, get_info(conv)));
        assert!(g.version >= answered_version, "an answered change was lost");
        let history = whole_history(&mut a, conv);
        let mut version = 0;
        let mut members = std::collections::BTreeSet::new();
        for (i, m) in history.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "seqs are contiguous");
            let Some(ev) = &m.group_changed else {
                continue;
            };
            let v = ev.group.as_ref().unwrap().version;
            assert_eq!(v, version + 1, "event versions run 1, 2, 3...");
            version = v;
            match v1::GroupChangeKind::try_from(ev.kind).unwrap() {
                v1::GroupChangeKind::Created | v1::GroupChangeKind::MembersAdded => {
                    members.extend(ev.user_ids.iter().copied());
                }
                v1::GroupChangeKind::MembersRemoved | v1::GroupChangeKind::MemberLeft => {
                    for u in &ev.user_ids {
                        members.remove(u);
                    }
                }
                _ => {}
            }
        }
        assert_eq!(
            g.version, version,
            "the group's version is its last event's"
        );
        let now: Vec<u64> = g.members.iter().map(|m| m.user_id).collect();
        assert_eq!(
            now,
            members.into_iter().collect::<Vec<_>>(),
            "members per the events"
        );
        assert!(now.contains(&ana) && now.contains(&ben));
        answered_version = g.version;
    }
}
