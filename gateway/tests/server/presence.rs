//! Presence, typing and GetProfiles through the real binary (two shards): who may follow whom,
//! ONLINE / AWAY / OFFLINE with last seen across the users' home shards, `hide_last_seen` (also
//! after a restart), the per-connection subscription limit, typing to the other member's online
//! connections only (never stored), its rate limit and expiry, and public profiles.

use super::*;

const TOML: &str = "[router]\npresence_coalesce_ms = 50\ntyping_expiry_ms = 1000\n\
                    [limits]\npresence_subscriptions_max = 3\ntyping_per_s = 1\ntyping_burst = 3\n";

/// A user registered by e-mail on a connection of their own.
fn user(srv: &Server, name: &str) -> (Client, v1::SessionGranted) {
    let mut c = srv.hello("");
    let mail = format!("{name}@example.org");
    let g = register(srv, &mut c, email(&mail), &mail);
    (c, g)
}

/// Two users whose presence lives on different shards (`ids::home_shard`), each on a connection.
fn two_homes(srv: &Server) -> (Client, v1::SessionGranted, Client, v1::SessionGranted) {
    let home = |u: u64| starling_router::ids::home_shard(u, 2);
    let (a, ga) = user(srv, "ana");
    for i in 0..32 {
        let (b, gb) = user(srv, &format!("ben{i}"));
        if home(gb.user_id) != home(ga.user_id) {
            return (a, ga, b, gb);
        }
    }
    panic!("no user with another home shard");
}

fn subscribe(c: &mut Client, users: &[u64]) -> Body {
    call(
        c,
        Body::SubscribePresence(v1::SubscribePresence {
            user_ids: users.to_vec(),
        }),
    )
}

fn set_presence(c: &mut Client, away: bool, hide: bool) -> Body {
    let state = if away {
        v1::PresenceState::Away
    } else {
        v1::PresenceState::Online
    };
    call(
        c,
        Body::SetPresence(v1::SetPresence {
            state: state as i32,
            hide_last_seen: hide,
        }),
    )
}

/// The next PresenceUpdate pushed to `c` (other frames skipped).
fn next_update(c: &mut Client) -> v1::PresenceUpdate {
    match recv_until(c, |f| matches!(f.body, Some(Body::PresenceUpdate(_))))
        .0
        .body
    {
        Some(Body::PresenceUpdate(u)) => u,
        _ => unreachable!(),
    }
}

/// Updates until one with `state` (coalescing may skip states in between, never the latest).
fn update_to(c: &mut Client, state: v1::PresenceState) -> v1::PresenceUpdate {
    loop {
        let u = next_update(c);
        if u.state == state as i32 {
            return u;
        }
    }
}

fn snapshot(b: Body) -> Vec<v1::PresenceUpdate> {
    match b {
        Body::PresenceSnapshot(s) => s.users,
        other => panic!("expected PresenceSnapshot, got {other:?}"),
    }
}

fn profiles(c: &mut Client, ids: &[u64]) -> Vec<v1::Profile> {
    match call(
        c,
        Body::GetProfiles(v1::GetProfiles {
            user_ids: ids.to_vec(),
        }),
    ) {
        Body::Profiles(p) => p.profiles,
        other => panic!("expected Profiles, got {other:?}"),
    }
}

fn typing(conv: u64, on: bool) -> Body {
    let state = if on {
        v1::TypingState::Typing
    } else {
        v1::TypingState::Stopped
    };
    Body::Typing(v1::Typing {
        conversation_id: conv,
        state: state as i32,
        user_id: 0,
    })
}

/// Nothing is waiting for `c` but what answers a Ping (pushes that were due are there first).
fn nothing_pushed(c: &mut Client) -> Vec<v1::Frame> {
    let id = c.next_id;
    c.next_id += 1;
    c.send(id, Body::Ping(v1::Ping { nonce: 7 }));
    recv_until(c, |f| f.request_id == id).1
}

#[test]
fn presence_across_home_shards_with_last_seen_away_visibility_and_hide_last_seen() {
    let srv = Server::start("auto", TOML);
    let (mut a, ga, mut b, gb) = two_homes(&srv);

    // Nothing shared yet: Ben is not visible to Ana (nor is an unknown user), and the whole
    // request is refused.
    let e = subscribe(&mut a, &[gb.user_id]);
    assert_eq!(err_code(&e), ErrorCode::PermissionDenied, "{e:?}");
    let e = subscribe(&mut a, &[ga.user_id, 999_999]);
    assert_eq!(err_code(&e), ErrorCode::PermissionDenied, "{e:?}");
    assert!(profiles(&mut a, &[gb.user_id, 999_999]).is_empty());

    // A direct conversation makes them visible to each other.
    assert!(matches!(
        call(&mut a, text(1, gb.user_id, "hi")),
        Body::SendAck(_)
    ));
    let snap = snapshot(subscribe(&mut a, &[gb.user_id, ga.user_id]));
    assert_eq!(snap.len(), 2);
    for u in &snap {
        assert_eq!(
            (u.state, u.last_seen_ms),
            (v1::PresenceState::Online as i32, 0),
            "{u:?}"
        );
    }

    // AWAY and back, pushed to the follower.
    assert!(matches!(set_presence(&mut b, true, false), Body::Done(_)));
    update_to(&mut a, v1::PresenceState::Away);
    assert!(matches!(set_presence(&mut b, false, false), Body::Done(_)));
    update_to(&mut a, v1::PresenceState::Online);

    // Ben's connection goes: OFFLINE, last seen when it went.
    let before = unix_ms();
    drop(b);
    let off = update_to(&mut a, v1::PresenceState::Offline);
    assert!(
        off.last_seen_ms >= before && off.last_seen_ms <= unix_ms(),
        "{off:?}"
    );
    // A snapshot says the same.
    let snap = snapshot(subscribe(&mut a, &[gb.user_id]));
    assert_eq!(snap[0].last_seen_ms, off.last_seen_ms);

    // Back, hiding his last seen time: others see 0 once he is gone again.
    let mut b = srv.hello(&gb.access_token);
    update_to(&mut a, v1::PresenceState::Online);
    assert!(matches!(set_presence(&mut b, false, true), Body::Done(_)));
    drop(b);
    let off = update_to(&mut a, v1::PresenceState::Offline);
    assert_eq!(off.last_seen_ms, 0, "{off:?}");

    // hide_last_seen outlives the connection and a restart.
    let srv = srv.kill9_and_restart("auto");
    let mut a = srv.hello(&ga.access_token);
    let snap = snapshot(subscribe(&mut a, &[gb.user_id]));
    assert_eq!(
        (snap[0].state, snap[0].last_seen_ms),
        (v1::PresenceState::Offline as i32, 0)
    );
    // Ben on two connections: AWAY only once both are.
    let mut b = srv.hello(&gb.access_token);
    let mut b2 = srv.hello(&gb.access_token);
    update_to(&mut a, v1::PresenceState::Online);
    let own = snapshot(subscribe(&mut b2, &[gb.user_id]));
    assert_eq!(own[0].state, v1::PresenceState::Online as i32);
    assert!(matches!(set_presence(&mut b2, true, true), Body::Done(_)));
    assert!(matches!(set_presence(&mut b, true, true), Body::Done(_)));
    assert_eq!(update_to(&mut a, v1::PresenceState::Away).last_seen_ms, 0);
    drop(b);
    drop(b2);
    assert_eq!(
        update_to(&mut a, v1::PresenceState::Offline).last_seen_ms,
        0
    );
}

#[test]
fn subscriptions_are_limited_per_connection_and_contacts_are_visible() {
    let srv = Server::start("auto", TOML);
    let (mut a, ga) = user(&srv, "ana");
    // Cleo registers by phone; Ana finds her through contact discovery.
    let mut c = srv.hello("");
    let gc = register(&srv, &mut c, phone("+14155550123"), "+14155550123");
    let hash = ring::digest::digest(&ring::digest::SHA256, b"+14155550123");
    let found = call(
        &mut a,
        Body::DiscoverContacts(v1::DiscoverContacts {
            phone_sha256: vec![hash.as_ref().to_vec().into()],
        }),
    );
    let Body::ContactMatches(m) = found else {
        panic!("{found:?}")
    };
    assert_eq!(m.matches[0].user_id, gc.user_id);
    // A contact: visible to Ana (not the other way round).
    assert_eq!(snapshot(subscribe(&mut a, &[gc.user_id])).len(), 1);
    let e = subscribe(&mut c, &[ga.user_id]);
    assert_eq!(err_code(&e), ErrorCode::PermissionDenied, "{e:?}");
    let p = profiles(&mut a, &[gc.user_id, gc.user_id, ga.user_id]);
    assert_eq!(
        p.iter().map(|p| p.user_id).collect::<Vec<_>>(),
        [gc.user_id, ga.user_id]
    );
    assert_eq!(p[0].display_name, "Ana", "the name Cleo registered with");
    assert!(p[0].phone.is_empty() && p[0].email.is_empty() && !p[0].has_password);
    let too_many: Vec<u64> = (1..=257).collect();
    let e = call(
        &mut a,
        Body::GetProfiles(v1::GetProfiles { user_ids: too_many }),
    );
    assert_eq!(err_code(&e), ErrorCode::InvalidArgument, "{e:?}");

    // Three subscriptions per connection on this server: Cleo and Ana herself are two; a
    // third user is fine, a fourth is refused whole, and another connection has its own.
    let (_b, gb) = user(&srv, "ben");
    let (_d, gd) = user(&srv, "dan");
    for other in [gb.user_id, gd.user_id] {
        assert!(matches!(
            call(&mut a, text(other as u8, other, "hi")),
            Body::SendAck(_)
        ));
    }
    assert_eq!(
        snapshot(subscribe(&mut a, &[ga.user_id, gc.user_id])).len(),
        2
    );
    assert_eq!(snapshot(subscribe(&mut a, &[gb.user_id])).len(), 1);
    let e = subscribe(&mut a, &[gd.user_id]);
    assert_eq!(err_code(&e), ErrorCode::InvalidArgument, "{e:?}");
    let Body::Error(e) = e else { unreachable!() };
    assert!(e.message.contains("at most 3"), "{e:?}");
    // After unsubscribing one, there is room again.
    let done = call(
        &mut a,
        Body::UnsubscribePresence(v1::UnsubscribePresence {
            user_ids: vec![gb.user_id],
        }),
    );
    assert!(matches!(done, Body::Done(_)), "{done:?}");
    assert_eq!(snapshot(subscribe(&mut a, &[gd.user_id])).len(), 1);
    let mut a2 = srv.hello(&ga.access_token);
    assert_eq!(
        snapshot(subscribe(&mut a2, &[ga.user_id, gb.user_id, gc.user_id])).len(),
        3
    );
}

#[test]
fn typing_reaches_the_other_members_online_connections_only_and_expires() {
    let srv = Server::start("auto", TOML);
    let (mut a, ga, mut b, gb) = two_homes(&srv);
    let (mut c, _gc) = user(&srv, "cleo");
    let Body::SendAck(ack) = call(&mut a, text(1, gb.user_id, "hi")) else {
        panic!()
    };
    let conv = ack.conversation_id;
    // Ana's second connection (same session) and Ben's second one.
    let mut a2 = srv.hello(&ga.access_token);
    let mut b2 = srv.hello(&gb.access_token);
    recv_until(&mut b, |f| matches!(f.body, Some(Body::Deliver(_))));

    // One-way TYPING: both of Ben's connections get it, Ana's other connection does not.
    a.send(0, typing(conv, true));
    for conn in [&mut b, &mut b2] {
        let (f, _) = recv_until(conn, |f| matches!(f.body, Some(Body::Typing(_))));
        let Some(Body::Typing(t)) = f.body else {
            unreachable!()
        };
        assert_eq!(f.request_id, 0);
        assert_eq!(
            (t.conversation_id, t.state, t.user_id),
            (conv, v1::TypingState::Typing as i32, ga.user_id)
        );
    }
    // Not repeated: the server says STOPPED after typing_expiry_ms (1 s here).
    let sent = now();
    let (f, _) = recv_until(&mut b, |f| matches!(f.body, Some(Body::Typing(_))));
    let Some(Body::Typing(t)) = f.body else {
        unreachable!()
    };
    assert_eq!(t.state, v1::TypingState::Stopped as i32);
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "expired early"
    );
    let pushed = nothing_pushed(&mut a2);
    assert!(
        !pushed
            .iter()
            .any(|f| matches!(f.body, Some(Body::Typing(_)))),
        "{pushed:?}"
    );

    // With a request id it is answered; over the rate limit (a burst of 3, then 1 a second)
    // that answer is RATE_LIMITED.
    let mut limited = None;
    for _ in 0..6 {
        match call(&mut a2, typing(conv, true)) {
            Body::Done(_) => {}
            Body::Error(e) => {
                limited = Some(e);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let e = limited.expect("never rate-limited");
    assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
    assert!(e.retry_after_ms > 0);
    // Counted (the counters are mirrored after the shard's turn).
    let deadline = now() + Duration::from_secs(10);
    while metric_sum(&srv, "starling_typing_dropped_total") < 1 {
        assert!(now() < deadline, "the refused Typing was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Cleo is not a member; a bad state is refused.
    let e = call(&mut c, typing(conv, true));
    assert_eq!(err_code(&e), ErrorCode::NotAMember, "{e:?}");
    let e = call(
        &mut b,
        Body::Typing(v1::Typing {
            conversation_id: conv,
            ..Default::default()
        }),
    );
    assert_eq!(err_code(&e), ErrorCode::InvalidArgument, "{e:?}");

    // Never stored: Sync and history hold the one message only.
    let mut b3 = srv.hello(&gb.access_token);
    let (done, frames) = {
        let id = b3.next_id;
        b3.next_id += 1;
        b3.send(id, Body::Sync(v1::Sync::default()));
        recv_until(&mut b3, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        })
    };
    assert!(matches!(done.body, Some(Body::SyncDone(_))));
    let delivered: Vec<_> = frames
        .iter()
        .filter(|f| matches!(f.body, Some(Body::Deliver(_))))
        .collect();
    assert_eq!(delivered.len(), 1, "{frames:?}");
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f.body, Some(Body::Typing(_))))
    );
    assert_eq!(whole_history(&mut b3, conv).len(), 1);
}
