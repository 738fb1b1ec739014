//! The protocol document is the contract: each test pins one behaviour that
//! `protocol/README.md` and the `.proto` comments describe, through the real
//! binary.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::time::Duration;

use bytes::BytesMut;
use starling_protocol::FrameEncoder;
use starling_protocol::v1::{self, ErrorCode, frame::Body};

use super::{
    Client, Server, auth_error, call, email, err_code, metric_sum, now, recv_until, register,
    rss_kib, second_device, sized_body, sized_msg, tcp_connect, text,
};

/// Encodes frames back to back (one write carries them all).
fn frames(list: &[(u64, Body)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for (request_id, body) in list {
        FrameEncoder::new(1 << 20)
            .encode(
                &v1::Frame {
                    request_id: *request_id,
                    body: Some(body.clone()),
                },
                &mut b,
            )
            .unwrap();
    }
    b.to_vec()
}

/// Reads until every id in `ids` has its final answer (a Sync's is SyncDone); pushes and
/// Sync parts are skipped. Panics if an id is answered twice.
fn final_answers(c: &mut Client, ids: &[u64]) -> BTreeMap<u64, Body> {
    let mut got = BTreeMap::new();
    while got.len() < ids.len() {
        let f = c
            .recv()
            .expect("connection closed while waiting for answers");
        if f.request_id == 0 || matches!(f.body, Some(Body::Deliver(_) | Body::Receipt(_))) {
            continue;
        }
        assert!(ids.contains(&f.request_id), "an answer to nothing: {f:?}");
        let prev = got.insert(f.request_id, f.body.unwrap());
        assert!(prev.is_none(), "request {} answered twice", f.request_id);
    }
    got
}

fn conversation_with(c: &mut Client, peer: u64) -> Option<v1::ConversationSummary> {
    // One page is enough: these tests have a handful of conversations.
    match call(c, Body::ListConversations(v1::ListConversations::default())) {
        Body::ConversationList(l) => l.conversations.into_iter().find(|s| s.peer_user_id == peer),
        other => panic!("{other:?}"),
    }
}

/// Client ids of every message of a conversation (empty if there is none).
fn history_ids(c: &mut Client, conv: u64) -> BTreeSet<Vec<u8>> {
    super::whole_history(c, conv)
        .into_iter()
        .map(|m| m.client_msg_id.to_vec())
        .collect()
}

fn send_to(cmid: [u8; 16], to: u64, body: &str) -> Body {
    Body::Send(v1::Send {
        client_msg_id: cmid.to_vec().into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec().into(),
        ..Default::default()
    })
}

/// Issue 34 §3.1: a Hello whose token is refused is answered with Welcome (limits, features,
/// server time, Hello's request_id) without `authenticated` and with `auth_error`; the
/// connection is welcomed and unauthenticated, so Refresh (or Authenticate) works on it and
/// no second Hello is needed.
#[test]
fn a_refused_token_is_welcomed_unauthenticated_and_refreshed_in_place() {
    let srv = Server::start("auto", "[accounts]\naccess_token_ttl_ms = 1000\n");
    let mut a = srv.hello("");
    let g = register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut b = srv.hello("");
    let gb = register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
    std::thread::sleep(Duration::from_millis(2100));

    let mut c = srv.connect();
    c.send(
        77,
        Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: g.access_token.clone(),
            ..Default::default()
        }),
    );
    let f = c.recv().expect("welcome");
    assert_eq!(f.request_id, 77, "Welcome echoes Hello's request_id");
    let body = f.body.unwrap();
    assert_eq!(auth_error(&body), ErrorCode::TokenExpired);
    let Body::Welcome(w) = &body else {
        unreachable!()
    };
    assert!(w.limits.is_some() && w.server_time_ms > 0, "{w:?}");
    assert!(w.features.iter().any(|f| f == "messaging"), "{w:?}");
    // Unauthenticated: an authenticated request is refused, the connection stays.
    assert_eq!(
        err_code(&c.request(Body::GetMe(v1::GetMe {}))),
        ErrorCode::Unauthenticated
    );
    // Refresh on the same connection authenticates it.
    let Body::SessionGranted(g2) = c.request(Body::Refresh(v1::Refresh {
        refresh_token: g.refresh_token.clone(),
    })) else {
        panic!("refresh failed")
    };
    assert_eq!(g2.user_id, g.user_id);
    assert!(
        matches!(c.request(Body::GetMe(v1::GetMe {})), Body::Profile(p) if p.user_id == g.user_id)
    );
    assert!(matches!(
        call(&mut c, text(1, gb.user_id, "after refresh")),
        Body::SendAck(_)
    ));

    // A malformed token: TOKEN_INVALID; Authenticate with a good token then works.
    let mut d = srv.connect();
    let w = d.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        access_token: "not.a.token".into(),
        ..Default::default()
    }));
    assert_eq!(auth_error(&w), ErrorCode::TokenInvalid);
    assert!(matches!(
        d.request(Body::Authenticate(v1::Authenticate {
            access_token: g2.access_token.clone(),
        })),
        Body::Done(_)
    ));
    assert!(
        matches!(d.request(Body::GetMe(v1::GetMe {})), Body::Profile(p) if p.user_id == g.user_id)
    );
}

/// Issue 34 §3.2: the client pings; the server answers every Ping with Pong (same nonce and
/// request id), never pings on its own, and closes a connection it has received no frame from
/// for `idle_timeout_ms` with Goodbye{HEARTBEAT_TIMEOUT}. Any frame keeps a connection open,
/// even one of a kind the server does not know.
#[test]
fn the_client_pings_and_any_frame_keeps_a_connection_open() {
    let toml = "[limits]\ntimer_tick_ms = 20\nheartbeat_ms = 300\nidle_timeout_ms = 700\n";
    let srv = Server::start("auto", toml);
    let mut silent = srv.hello("");
    let mut talker = srv.hello("");
    let w = talker.request(Body::Ping(v1::Ping { nonce: 5 }));
    assert!(matches!(w, Body::Pong(v1::Pong { nonce: 5 })), "{w:?}");
    // Ping with request id 0 (one-way) is answered with a Pong carrying 0.
    talker.send(0, Body::Ping(v1::Ping { nonce: 6 }));
    let f = talker.recv().unwrap();
    assert_eq!(f.request_id, 0);
    assert!(
        matches!(f.body, Some(Body::Pong(v1::Pong { nonce: 6 }))),
        "{f:?}"
    );

    let t0 = now();
    // For 1.5 s (twice the idle timeout) the talker sends only frames of an unknown kind.
    let unknown = [5u8, 0x08, 0x09, 0xb8, 0x3e, 0x01];
    while t0.elapsed() < Duration::from_millis(1500) {
        talker.send_raw(&unknown);
        let f = talker.recv().unwrap();
        assert_eq!(err_code(&f.body.unwrap()), ErrorCode::UnknownFrameType);
        std::thread::sleep(Duration::from_millis(200));
    }
    // The silent connection got nothing but the Goodbye: no Ping from the server.
    let f = silent.recv().expect("goodbye");
    assert!(
        matches!(f.body, Some(Body::Goodbye(ref g)) if g.code == ErrorCode::HeartbeatTimeout as i32),
        "{f:?}"
    );
    silent.expect_closed();
    // The talker is open.
    assert!(matches!(
        talker.request(Body::Ping(v1::Ping { nonce: 7 })),
        Body::Pong(v1::Pong { nonce: 7 })
    ));
}

/// Issue 34 §3.3 and §3.11 (note to self): the sending connection gets SendAck; the sender's
/// other devices get a Deliver naming the sending device, never a SendAck. Sending to one's
/// own user id makes a note-to-self conversation.
#[test]
fn the_senders_other_devices_get_deliver_and_a_note_to_self_works() {
    let srv = Server::start("auto", "[accounts]\nargon2_memory_kib = 1024\n");
    let mut a1 = srv.hello("");
    let ga1 = register(&srv, &mut a1, email("ana@example.org"), "ana@example.org");
    assert!(matches!(
        a1.request(Body::SetPassword(v1::SetPassword {
            new_password: "correct horse battery".into(),
        })),
        Body::Done(_)
    ));
    let ga2 = second_device(&srv, email("ana@example.org"));
    let mut a2 = srv.hello(&ga2.access_token);
    let mut b = srv.hello("");
    let gb = register(&srv, &mut b, email("ben@example.org"), "ben@example.org");

    let Body::SendAck(ack) = call(&mut a1, text(1, gb.user_id, "hi ben")) else {
        panic!()
    };
    for (who, c) in [("ana's other device", &mut a2), ("ben", &mut b)] {
        let (f, before) = recv_until(c, |f| matches!(f.body, Some(Body::Deliver(_))));
        assert!(
            !before
                .iter()
                .any(|f| matches!(f.body, Some(Body::SendAck(_)))),
            "{who}: {before:?}"
        );
        let Some(Body::Deliver(d)) = f.body else {
            unreachable!()
        };
        let m = d.message.unwrap();
        assert_eq!(f.request_id, 0, "{who}");
        assert_eq!(
            (m.seq, m.sender_user_id, m.sender_device_id),
            (ack.seq, ga1.user_id, ga1.device_id),
            "{who}"
        );
    }

    // Note to self: a DIRECT conversation with oneself; the other device gets it once.
    let Body::SendAck(note) = call(&mut a1, text(2, ga1.user_id, "remember the milk")) else {
        panic!()
    };
    assert_ne!(note.conversation_id, ack.conversation_id);
    let (f, _) = recv_until(&mut a2, |f| matches!(f.body, Some(Body::Deliver(_))));
    let Some(Body::Deliver(d)) = f.body else {
        unreachable!()
    };
    assert_eq!(d.message.unwrap().conversation_id, note.conversation_id);
    let s = conversation_with(&mut a1, ga1.user_id).expect("the note-to-self conversation");
    assert_eq!(
        (s.conversation_id, s.kind, s.last_seq),
        (note.conversation_id, v1::ConversationKind::Direct as i32, 1)
    );
    // Exactly once: a Ping round trip shows nothing else arrived meanwhile.
    let id = a2.next_id;
    a2.next_id += 1;
    a2.send(id, Body::Ping(v1::Ping { nonce: 1 }));
    let (_, before) = recv_until(&mut a2, |f| f.request_id == id);
    assert!(
        !before
            .iter()
            .any(|f| matches!(f.body, Some(Body::Deliver(_)))),
        "{before:?}"
    );
}

/// Issue 34 §3.5: Welcome lists the optional features this server offers; a request of a
/// feature it does not offer gets NOT_SUPPORTED (retry_after_ms 0, a message naming the
/// request and the feature), before or after authentication, and the connection stays.
#[test]
fn welcome_lists_features_and_other_requests_are_not_supported() {
    let srv = Server::start("auto", "");
    let mut c = srv.connect();
    let Body::Welcome(w) = c.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        ..Default::default()
    })) else {
        panic!()
    };
    assert_eq!(
        w.features,
        [
            "messaging",
            "history",
            "conversation_list",
            "block",
            "password_login",
            "contact_discovery",
            "groups",
            "presence",
            "typing",
            "profiles",
            "e2e_keys",
            "push"
        ]
    );
    for f in &w.features {
        assert!(
            starling_protocol::features::ALL.contains(&f.as_str()),
            "{f}"
        );
    }
    let unsupported = [(Body::RequestUpload(v1::RequestUpload::default()), "media")];
    let check = |c: &mut Client, authenticated: bool| {
        for (body, feature) in &unsupported {
            let name = body.kind().name();
            let e = c.request(body.clone());
            let Body::Error(e) = e else {
                panic!("{name}: {e:?}")
            };
            assert_eq!(e.code, ErrorCode::NotSupported as i32, "{name}: {e:?}");
            assert_eq!(e.retry_after_ms, 0, "{name}");
            assert!(
                e.message.contains(name) && e.message.contains(feature),
                "{name}: {}",
                e.message
            );
            assert!(!e.message.contains("not implemented"), "{}", e.message);
            assert!(!w.features.iter().any(|f| f == feature));
        }
        assert!(
            matches!(c.request(Body::Ping(v1::Ping { nonce: 1 })), Body::Pong(_)),
            "authenticated {authenticated}"
        );
    };
    check(&mut c, false);
    register(&srv, &mut c, email("ana@example.org"), "ana@example.org");
    check(&mut c, true);
}

/// Issue 34 §3.6: a connection whose backlog went over `push_backlog_bytes_max` gets no more
/// pushes; once its backlog is down to half of it, it gets one MessagesAvailable per
/// conversation it missed pushes of, and live pushes resume at once (no Sync needed): a
/// Deliver after a gap always follows the MessagesAvailable that names the gap, and the
/// client fills it with GetHistory after_seq.
#[test]
fn a_connection_behind_gets_messages_available_then_pushes_resume() {
    // The smallest backlog budget (one maximal frame); no close while the test stalls.
    let toml = "[limits]\npush_backlog_bytes_max = 65536\nslow_consumer_close_ms = 60000\n";
    let srv = Server::start("auto", toml);
    let mut a = srv.hello("");
    register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut reg = srv.hello("");
    let gb = register(&srv, &mut reg, email("ben@example.org"), "ben@example.org");
    drop(reg);
    // Ben's device reads nothing for a while (small receive buffer).
    let tcp = tcp_connect(srv.tls_addr, None, Some(16 * 1024)).unwrap();
    let mut b = Client::over(tcp, &srv.tls);
    assert!(matches!(
        b.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: gb.access_token.clone(),
            ..Default::default()
        })),
        Body::Welcome(w) if w.authenticated.is_some()
    ));
    // 8 MB of messages: more than the kernel buffers and the budget.
    const TOTAL: u32 = 160;
    const BODY: usize = 50 * 1024;
    let indexes: Vec<u32> = (0..TOTAL).collect();
    let acked = super::send_stream(
        &mut a,
        &|i| sized_msg(0xa0, i, gb.user_id, BODY),
        &indexes,
        8,
    );
    assert_eq!(acked.len(), TOTAL as usize);

    // Ben reads everything: Delivers in seq order, and wherever seqs were not pushed a
    // MessagesAvailable naming the latest of them, after which pushes resume (the kernel's
    // buffers take bytes for a while, so the backlog may drain and refill several times).
    let (mut pushed, mut hints) = (Vec::new(), Vec::new());
    let mut covered = 0u64;
    while covered < u64::from(TOTAL) {
        match b.recv().and_then(|f| f.body) {
            Some(Body::Deliver(d)) => {
                let m = d.message.unwrap();
                assert!(
                    m.seq > covered,
                    "pushes in order: {} after {covered}",
                    m.seq
                );
                assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, BODY));
                if m.seq > covered + 1 {
                    // A gap, announced by the hint just before it.
                    assert_eq!(
                        hints.last().map(|h: &v1::MessagesAvailable| h.up_to_seq),
                        Some(covered),
                        "a gap before {} without a MessagesAvailable",
                        m.seq
                    );
                }
                covered = m.seq;
                pushed.push(m.seq);
            }
            Some(Body::MessagesAvailable(h)) => {
                assert!(h.up_to_seq > covered, "{h:?} after {covered}");
                covered = h.up_to_seq;
                hints.push(h);
            }
            other => panic!("after {covered}: {other:?}"),
        }
    }
    assert!(!hints.is_empty(), "the budget never ran out");
    assert!(pushed.len() < TOTAL as usize);
    let conv = hints[0].conversation_id;

    // Not behind any more: the next message is pushed live, no Sync needed.
    let Body::SendAck(ack) = call(&mut a, sized_msg(0xa0, TOTAL, gb.user_id, 100)) else {
        panic!()
    };
    let f = b.recv().unwrap();
    let Some(Body::Deliver(d)) = f.body else {
        panic!("expected the live push, got {f:?}")
    };
    assert_eq!(d.message.unwrap().seq, ack.seq);
    // The client's duty: fill the gaps with GetHistory after_seq.
    let missing: Vec<u64> = (1..=u64::from(TOTAL))
        .filter(|s| !pushed.contains(s))
        .collect();
    let mut fetched = Vec::new();
    for &seq in &missing {
        if fetched.contains(&seq) {
            continue;
        }
        let Body::HistoryPage(p) = call(
            &mut b,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                anchor: Some(v1::get_history::Anchor::AfterSeq(seq - 1)),
                limit: 0,
            }),
        ) else {
            panic!()
        };
        for m in p.messages {
            if m.seq <= u64::from(TOTAL) {
                assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, BODY));
            }
            fetched.push(m.seq);
        }
    }
    assert!(missing.iter().all(|s| fetched.contains(s)));
    assert!(metric_sum(&srv, "starling_slow_consumer_hints_total") >= 1);
    assert_eq!(metric_sum(&srv, "starling_slow_consumer_closes_total"), 0);
}

/// Issue 34 §3.8: a first frame other than Hello gets UNEXPECTED_FRAME and a close; a second
/// Hello and server-only frames get UNEXPECTED_FRAME and the connection stays; a request
/// that needs authentication gets UNAUTHENTICATED. The dev certificate names 127.0.0.1 too.
#[test]
fn frames_out_of_place() {
    let srv = Server::start("auto", "");
    let mut c = srv.connect();
    let e = c.request(Body::Send(v1::Send::default()));
    assert_eq!(err_code(&e), ErrorCode::UnexpectedFrame);
    c.expect_closed();

    let mut c = srv.hello("");
    let e = c.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        ..Default::default()
    }));
    assert_eq!(err_code(&e), ErrorCode::UnexpectedFrame);
    for server_only in [
        Body::Welcome(v1::Welcome::default()),
        Body::Deliver(v1::Deliver::default()),
        Body::SyncDone(v1::SyncDone::default()),
    ] {
        assert_eq!(
            err_code(&c.request(server_only)),
            ErrorCode::UnexpectedFrame
        );
    }
    assert_eq!(
        err_code(&c.request(Body::Send(v1::Send::default()))),
        ErrorCode::Unauthenticated
    );
    assert!(matches!(
        c.request(Body::Ping(v1::Ping { nonce: 4 })),
        Body::Pong(_)
    ));

    // The dev certificate's names: localhost (above) and the loopback IP addresses.
    let tcp = std::net::TcpStream::connect(srv.tls_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name =
        rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let conn = rustls::ClientConnection::new(srv.tls.clone(), name).unwrap();
    let mut ip = Client {
        s: rustls::StreamOwned::new(conn, tcp),
        dec: starling_protocol::FrameDecoder::new(1 << 20),
        next_id: 1,
    };
    assert!(matches!(
        ip.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            ..Default::default()
        })),
        Body::Welcome(_)
    ));
}

/// Issue 34 §3.9 and §3.11 (cursors): Sync's receipts carry the latest READ cursor of every
/// member, the caller's own included, and the DELIVERED cursor of the others. A read cursor
/// beyond the last seq is clamped; one below the current cursor changes nothing; both are
/// answered Done.
#[test]
fn sync_receipts_include_the_callers_read_cursor_and_cursors_clamp() {
    let srv = Server::start("auto", "");
    let (mut a, ga, mut b, gb) = super::ana_and_ben(&srv);
    let mut conv = 0;
    for i in 1..=3u8 {
        let Body::SendAck(ack) = call(&mut a, text(i, gb.user_id, "hello")) else {
            panic!()
        };
        conv = ack.conversation_id;
    }
    let cursor = |c: &mut Client, delivered: bool, up_to_seq: u64| {
        let body = if delivered {
            Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: conv,
                up_to_seq,
            })
        } else {
            Body::ReadCursor(v1::ReadCursor {
                conversation_id: conv,
                up_to_seq,
            })
        };
        let done = call(c, body);
        assert!(matches!(done, Body::Done(_)), "{done:?}");
    };
    cursor(&mut b, true, 3);
    cursor(&mut b, false, 2);
    cursor(&mut a, false, 3);

    let id = b.next_id;
    b.next_id += 1;
    b.send(id, Body::Sync(v1::Sync::default()));
    let (done, before) = recv_until(&mut b, |f| {
        f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
    });
    let receipts: BTreeSet<(u64, i32, u64)> = before
        .iter()
        .filter(|f| f.request_id == id)
        .filter_map(|f| match &f.body {
            Some(Body::Receipt(r)) => Some((r.by_user_id, r.kind, r.up_to_seq)),
            _ => None,
        })
        .collect();
    let (read, delivered) = (
        v1::ReceiptKind::Read as i32,
        v1::ReceiptKind::Delivered as i32,
    );
    assert!(receipts.contains(&(gb.user_id, read, 2)), "{receipts:?}");
    assert!(receipts.contains(&(ga.user_id, read, 3)), "{receipts:?}");
    assert!(
        !receipts.contains(&(gb.user_id, delivered, 3)),
        "the caller's own DELIVERED cursor is not a receipt: {receipts:?}"
    );
    let Some(Body::SyncDone(d)) = done.body else {
        unreachable!()
    };
    assert_eq!(d.receipts as usize, receipts.len());

    // Beyond the last seq: clamped to it. Backwards: no change.
    cursor(&mut b, false, 99);
    let s = conversation_with(&mut b, ga.user_id).unwrap();
    assert_eq!((s.last_seq, s.read_up_to_seq, s.unread_count), (3, 3, 0));
    cursor(&mut b, false, 1);
    let s = conversation_with(&mut b, ga.user_id).unwrap();
    assert_eq!(s.read_up_to_seq, 3);
}

/// Issue 34 §3.11: a request with request_id 0 is refused with INVALID_ARGUMENT (id 0) and
/// not carried out; a Hello with id 0 leaves the connection waiting for its Hello; one-way
/// frames with id 0 get no answer.
#[test]
fn a_request_with_request_id_zero_is_refused_and_not_carried_out() {
    let srv = Server::start("auto", "");
    let (mut a, _, mut b, gb) = super::ana_and_ben(&srv);
    drop(b);

    let mut c = srv.connect();
    c.send(
        0,
        Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: gb.access_token.clone(),
            ..Default::default()
        }),
    );
    let f = c.recv().unwrap();
    assert_eq!(f.request_id, 0);
    assert_eq!(err_code(&f.body.unwrap()), ErrorCode::InvalidArgument);
    // Still before Hello: a proper Hello is welcomed, with its id echoed.
    c.send(
        9,
        Body::Hello(v1::Hello {
            protocol_version: 1,
            ..Default::default()
        }),
    );
    let f = c.recv().unwrap();
    assert_eq!(f.request_id, 9);
    assert!(matches!(f.body, Some(Body::Welcome(_))), "{f:?}");

    // Authenticated requests with id 0: refused, not carried out.
    c.send(0, Body::GetMe(v1::GetMe {}));
    let f = c.recv().unwrap();
    assert_eq!(
        (f.request_id, err_code(&f.body.unwrap())),
        (0, ErrorCode::InvalidArgument)
    );
    b = srv.hello(&gb.access_token);
    b.send(0, send_to([0x5e; 16], 1, "never sent"));
    let f = b.recv().unwrap();
    assert_eq!(
        (f.request_id, err_code(&f.body.unwrap())),
        (0, ErrorCode::InvalidArgument)
    );
    // One-way frames with id 0: no answer (the Ping round trip comes back first).
    b.send(
        0,
        Body::ReadCursor(v1::ReadCursor {
            conversation_id: 0,
            up_to_seq: 1,
        }),
    );
    b.send(0, Body::Pong(v1::Pong { nonce: 1 }));
    b.send(33, Body::Ping(v1::Ping { nonce: 33 }));
    // The router's refusal of the ReadCursor may come before or after the Pong.
    let mut got = [b.recv().unwrap(), b.recv().unwrap()];
    got.sort_by_key(|f| f.request_id);
    let [refusal, pong] = got;
    assert_eq!(
        refusal.request_id, 0,
        "the bad ReadCursor's Error carries id 0"
    );
    assert_eq!(err_code(&refusal.body.unwrap()), ErrorCode::InvalidArgument);
    assert!(matches!(pong.body, Some(Body::Pong(_))), "{pong:?}");
    // And nothing else: the next answer is the next request's.
    assert!(matches!(
        b.request(Body::Ping(v1::Ping { nonce: 34 })),
        Body::Pong(_)
    ));
    // Nothing was sent: Ben has no conversation.
    match call(
        &mut b,
        Body::ListConversations(v1::ListConversations::default()),
    ) {
        Body::ConversationList(l) => assert!(l.conversations.is_empty(), "{l:?}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        call(&mut a, Body::GetMe(v1::GetMe {})),
        Body::Profile(_)
    ));
}

/// Issue 34 §3.11: GetHistory's default page is 50 messages, its largest 200, and a page holds
/// at most 48 KiB of messages (at least one); has_more says more exist.
#[test]
fn history_pages_have_a_default_a_maximum_and_a_byte_cap() {
    let srv = Server::start("auto", "");
    let (mut a, _, _b, gb) = super::ana_and_ben(&srv);
    let indexes: Vec<u32> = (0..230).collect();
    let acked = super::send_stream(&mut a, &|i| sized_msg(1, i, gb.user_id, 10), &indexes, 32);
    assert_eq!(acked.len(), 230);
    let conv = conversation_with(&mut a, gb.user_id)
        .unwrap()
        .conversation_id;
    let page = |c: &mut Client, limit: u32, anchor| match call(
        c,
        Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            anchor,
            limit,
        }),
    ) {
        Body::HistoryPage(p) => p,
        other => panic!("{other:?}"),
    };
    let p = page(&mut a, 0, None);
    let seqs: Vec<u64> = p.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (181..=230).collect::<Vec<_>>(),
        "the latest 50, ascending"
    );
    assert!(p.has_more);
    let p = page(&mut a, 1000, Some(v1::get_history::Anchor::AfterSeq(0)));
    assert_eq!(p.messages.len(), 200);
    assert_eq!(p.messages[0].seq, 1);
    assert!(p.has_more);
    let p = page(&mut a, 1000, Some(v1::get_history::Anchor::AfterSeq(200)));
    assert_eq!(p.messages.len(), 30);
    assert!(!p.has_more);
    // 20 KiB messages: two fit in 48 KiB.
    for i in 0..4 {
        assert!(matches!(
            call(&mut a, sized_msg(2, i, gb.user_id, 20 * 1024)),
            Body::SendAck(_)
        ));
    }
    let p = page(&mut a, 10, Some(v1::get_history::Anchor::AfterSeq(230)));
    assert_eq!(p.messages.len(), 2);
    assert!(p.has_more);
}

/// Issue 34 §2 (in-flight limit): requests pipelined beyond `inflight_requests_max` in one
/// write are refused with TOO_MANY_IN_FLIGHT and not carried out; every request gets exactly
/// one final answer.
#[test]
fn pipelined_requests_beyond_the_limit_are_refused_and_not_carried_out() {
    let srv = Server::start("auto", "[limits]\ninflight_requests_max = 4\n");
    let (mut a, _, _b, gb) = super::ana_and_ben(&srv);
    let list: Vec<(u64, Body)> = (0..40u8)
        .map(|i| {
            let mut cmid = [0x70; 16];
            cmid[0] = i;
            (1000 + u64::from(i), send_to(cmid, gb.user_id, "pipelined"))
        })
        .collect();
    a.send_raw(&frames(&list));
    let ids: Vec<u64> = list.iter().map(|(id, _)| *id).collect();
    let got = final_answers(&mut a, &ids);
    let mut acked = BTreeSet::new();
    let mut refused = 0;
    for (id, body) in &got {
        match body {
            Body::SendAck(ack) => {
                acked.insert(ack.client_msg_id.to_vec());
            }
            Body::Error(e) if e.code == ErrorCode::TooManyInFlight as i32 => refused += 1,
            other => panic!("{id}: {other:?}"),
        }
    }
    assert!(acked.len() >= 4, "the first four are admitted: {acked:?}");
    assert!(refused >= 1, "40 requests in one write, 4 at a time");
    assert_eq!(acked.len() + refused, 40);
    let conv = conversation_with(&mut a, gb.user_id)
        .unwrap()
        .conversation_id;
    assert_eq!(
        history_ids(&mut a, conv),
        acked,
        "refused sends were not carried out"
    );
}

/// Issue 34 §2 (in-flight limit): a request counts until its final answer is queued, across
/// reads, whichever part of the server answers it: two cursor updates waiting for their
/// durable write hold both slots, so a Send and a GetMe arriving in a later write are refused
/// (and the Send is not carried out); once the Dones are out, requests are admitted again. A
/// Sync holds its slot until SyncDone.
#[test]
fn a_request_counts_until_its_final_answer_across_reads() {
    let srv = Server::start("auto", "[limits]\ninflight_requests_max = 2\n");
    let (mut a, ga, mut b, gb) = super::ana_and_ben(&srv);
    let mut conv = 0;
    for i in 1..=10 {
        let Body::SendAck(ack) = call(&mut a, text(i, gb.user_id, "hello")) else {
            panic!()
        };
        conv = ack.conversation_id;
    }
    let mut refused_cmids = Vec::new();
    let mut refused_both = false;
    for attempt in 0..8u8 {
        let base = 100 * u64::from(attempt + 1);
        // Each moves Ben's cursors: answered once a durable write has finished.
        let up_to_seq = u64::from(attempt) + 1;
        let cursors = [
            (
                base,
                Body::ReadCursor(v1::ReadCursor {
                    conversation_id: conv,
                    up_to_seq,
                }),
            ),
            (
                base + 1,
                Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id: conv,
                    up_to_seq,
                }),
            ),
        ];
        b.send_raw(&frames(&cursors));
        std::thread::sleep(Duration::from_millis(2));
        let cmid = [0x40 + attempt; 16];
        let later = [
            (base + 2, send_to(cmid, ga.user_id, "must not be sent")),
            (base + 3, Body::GetMe(v1::GetMe {})),
        ];
        b.send_raw(&frames(&later));
        let got = final_answers(&mut b, &[base, base + 1, base + 2, base + 3]);
        assert!(matches!(got[&base], Body::Done(_)), "{got:?}");
        assert!(matches!(got[&(base + 1)], Body::Done(_)), "{got:?}");
        let too_many =
            |b: &Body| matches!(b, Body::Error(e) if e.code == ErrorCode::TooManyInFlight as i32);
        if too_many(&got[&(base + 2)]) && too_many(&got[&(base + 3)]) {
            refused_both = true;
            refused_cmids.push(cmid.to_vec());
            break;
        }
        // The cursors were written before the later frames were read (a slow test host):
        // then the later frames were carried out normally. Try again.
        assert!(
            matches!(got[&(base + 3)], Body::Profile(_) | Body::Error(_)),
            "{got:?}"
        );
    }
    assert!(
        refused_both,
        "requests over the limit across reads were admitted"
    );
    // Answered: the slots are free again.
    assert!(matches!(
        call(&mut b, Body::GetMe(v1::GetMe {})),
        Body::Profile(_)
    ));
    let ids = history_ids(&mut b, conv);
    for cmid in &refused_cmids {
        assert!(!ids.contains(cmid));
    }

    // A Sync holds its slot until SyncDone: with one slot left, a request behind it waits.
    let sync_and_more = [
        (500, Body::Sync(v1::Sync::default())),
        (501, Body::Sync(v1::Sync::default())),
        (502, Body::GetMe(v1::GetMe {})),
    ];
    b.send_raw(&frames(&sync_and_more));
    let got = final_answers(&mut b, &[500, 501, 502]);
    assert!(matches!(got[&500], Body::SyncDone(_)), "{got:?}");
    assert!(matches!(got[&501], Body::SyncDone(_)), "{got:?}");
    assert!(
        matches!(&got[&502], Body::Error(e) if e.code == ErrorCode::TooManyInFlight as i32),
        "{got:?}"
    );
    assert!(matches!(
        call(&mut b, Body::GetMe(v1::GetMe {})),
        Body::Profile(_)
    ));
}

/// Issue 34 §2 (in-flight limit): answers waiting to be read do not count, so a client that
/// pipelines Sends and never reads its answers is not refused; it is bounded instead: the
/// server stops reading from it when its socket is full, and closes it as a slow consumer
/// once its socket has taken nothing for `slow_consumer_close_ms`. Server memory stays
/// bounded and other connections are unaffected.
#[test]
fn a_client_that_never_reads_is_closed_as_a_slow_consumer() {
    let srv = Server::start(
        "auto",
        "[limits]\nslow_consumer_close_ms = 1000\ntimer_tick_ms = 20\n",
    );
    // The writer is Ben's only device (his own other devices would get the Sends pushed).
    let (mut a, _, b, gb) = super::ana_and_ben(&srv);
    drop(b);
    // The Sends go to Cleo, who is offline (no pushes anywhere).
    let mut c = srv.hello("");
    let uc = register(&srv, &mut c, email("cleo@example.org"), "cleo@example.org").user_id;
    drop(c);
    let pid = srv.child.0.id();
    let rss_before = rss_kib(pid);
    let tcp = tcp_connect(srv.tls_addr, None, Some(16 * 1024)).unwrap();
    let mut w = Client::over(tcp, &srv.tls);
    assert!(matches!(
        w.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: gb.access_token.clone(),
            ..Default::default()
        })),
        Body::Welcome(_)
    ));
    // The writer pipelines Sends (64 per write) and never reads, until the server hangs up.
    let t0 = now();
    let writer = std::thread::spawn(move || {
        let mut next = 1u64;
        let body = "x".repeat(200);
        while next < 2_000_000 && t0.elapsed() < Duration::from_secs(60) {
            let batch: Vec<(u64, Body)> = (next..next + 64)
                .map(|id| {
                    let mut cmid = [0x33; 16];
                    cmid[..8].copy_from_slice(&id.to_be_bytes());
                    (id, send_to(cmid, uc, &body))
                })
                .collect();
            next += 64;
            if w.s
                .write_all(&frames(&batch))
                .and_then(|()| w.s.flush())
                .is_err()
            {
                return (next, t0.elapsed(), true);
            }
        }
        (next, t0.elapsed(), false)
    });
    let deadline = now() + Duration::from_secs(90);
    while !writer.is_finished() {
        assert!(now() < deadline, "the writer is still writing");
        // Others are served meanwhile.
        assert!(matches!(
            a.request(Body::Ping(v1::Ping { nonce: 1 })),
            Body::Pong(_)
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (written, took, cut) = writer.join().unwrap();
    assert!(
        cut,
        "the server never closed the connection ({written} requests written)"
    );
    let rss_after = rss_kib(pid);
    println!(
        "never-reading client: {written} requests written, cut after {took:?}; server RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "server memory grew by {} KiB",
        rss_after - rss_before
    );
    assert!(metric_sum(&srv, "starling_slow_consumer_closes_total") >= 1);
    assert!(matches!(
        call(&mut a, text(5, gb.user_id, "still fine")),
        Body::SendAck(_)
    ));
}
