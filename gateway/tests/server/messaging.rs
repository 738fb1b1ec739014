//! Messaging through the real binary: end to end, two devices per user, a SIGKILL mid-stream,
//! frame limits and slow consumers.

use super::*;

/// Reads frames until one matches `pred`; returns it and what came before.
pub(super) fn recv_until(
    c: &mut Client,
    mut pred: impl FnMut(&v1::Frame) -> bool,
) -> (v1::Frame, Vec<v1::Frame>) {
    let mut before = Vec::new();
    loop {
        let f = c.recv().expect("connection closed while waiting");
        if pred(&f) {
            return (f, before);
        }
        before.push(f);
    }
}

/// Sends a request and waits for its answer (pushes in between are skipped).
pub(super) fn call(c: &mut Client, body: Body) -> Body {
    let id = c.next_id;
    c.next_id += 1;
    c.send(id, body);
    recv_until(c, |f| f.request_id == id).0.body.unwrap()
}

pub(super) fn text(cmid: u8, to: u64, body: &str) -> Body {
    Body::Send(v1::Send {
        client_msg_id: vec![cmid; 16].into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec().into(),
        ..Default::default()
    })
}

pub(super) fn receipt(f: &v1::Frame) -> Option<&v1::Receipt> {
    match &f.body {
        Some(Body::Receipt(r)) => Some(r),
        _ => None,
    }
}

/// Ana and Ben, registered by email, each on a connection of their own.
pub(super) fn ana_and_ben(
    srv: &Server,
) -> (Client, v1::SessionGranted, Client, v1::SessionGranted) {
    let mut a = srv.hello("");
    let ga = register(srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut b = srv.hello("");
    let gb = register(srv, &mut b, email("ben@example.org"), "ben@example.org");
    (a, ga, b, gb)
}

#[test]
pub(super) fn messaging_end_to_end() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "");
        let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
        let (ua, ub) = (ga.user_id, gb.user_id);

        // A → B: acked with seq 1, pushed to B.
        let ack = match call(&mut a, text(1, ub, "hello ben")) {
            Body::SendAck(a) => a,
            other => panic!("{driver}: {other:?}"),
        };
        assert_eq!((ack.seq, ack.duplicate), (1, false), "{driver}");
        let conv = ack.conversation_id;
        assert_ne!(conv, 0);
        let (d, _) = recv_until(&mut b, |f| matches!(f.body, Some(Body::Deliver(_))));
        let Some(Body::Deliver(d)) = d.body else {
            unreachable!()
        };
        let m = d.message.unwrap();
        assert_eq!((m.conversation_id, m.seq, m.sender_user_id), (conv, 1, ua));
        assert_eq!(&m.body[..], b"hello ben");

        // B acknowledges delivery, then reads: A gets DELIVERED, then READ.
        let done = call(
            &mut b,
            Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: conv,
                up_to_seq: 1,
            }),
        );
        assert!(matches!(done, Body::Done(_)), "{driver}: {done:?}");
        let (r, _) = recv_until(&mut a, |f| {
            receipt(f).is_some_and(|r| r.kind == v1::ReceiptKind::Delivered as i32)
        });
        let r = receipt(&r).unwrap();
        assert_eq!(
            (r.conversation_id, r.up_to_seq, r.by_user_id),
            (conv, 1, ub)
        );
        let done = call(
            &mut b,
            Body::ReadCursor(v1::ReadCursor {
                conversation_id: conv,
                up_to_seq: 1,
            }),
        );
        assert!(matches!(done, Body::Done(_)), "{driver}: {done:?}");
        let (r, _) = recv_until(&mut a, |f| {
            receipt(f).is_some_and(|r| r.kind == v1::ReceiptKind::Read as i32)
        });
        let r = receipt(&r).unwrap();
        assert_eq!(
            (r.conversation_id, r.up_to_seq, r.by_user_id),
            (conv, 1, ub)
        );

        // B goes offline; A sends two more and retries the first.
        drop(b);
        for (i, body) in [(2u8, "one"), (3, "two")] {
            match call(&mut a, text(i, ub, body)) {
                Body::SendAck(ack) => {
                    assert_eq!((ack.seq, ack.duplicate), (u64::from(i), false), "{driver}");
                }
                other => panic!("{driver}: {other:?}"),
            }
        }
        match call(&mut a, text(1, ub, "hello ben")) {
            Body::SendAck(ack) => {
                assert_eq!((ack.seq, ack.duplicate), (1, true), "{driver}");
            }
            other => panic!("{driver}: {other:?}"),
        }

        // B comes back and syncs from seq 1: gets 2 and 3, then SyncDone.
        let mut b = srv.hello(&gb.access_token);
        let id = b.next_id;
        b.next_id += 1;
        b.send(
            id,
            Body::Sync(v1::Sync {
                last_seq: [(conv, 1)].into_iter().collect(),
            }),
        );
        let (_, before) = recv_until(&mut b, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let synced: Vec<u64> = before
            .iter()
            .filter(|f| f.request_id == id)
            .filter_map(|f| match &f.body {
                Some(Body::Deliver(d)) => d.message.as_ref().map(|m| m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(synced, vec![2, 3], "{driver}: {before:?}");

        // History and the conversation list.
        match call(
            &mut b,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                limit: 10,
                ..Default::default()
            }),
        ) {
            Body::HistoryPage(p) => {
                let seqs: Vec<u64> = p.messages.iter().map(|m| m.seq).collect();
                assert_eq!(seqs, vec![1, 2, 3], "{driver}");
                assert!(!p.has_more);
            }
            other => panic!("{driver}: {other:?}"),
        }
        match call(
            &mut a,
            Body::ListConversations(v1::ListConversations::default()),
        ) {
            Body::ConversationList(l) => {
                assert_eq!(l.conversations.len(), 1, "{driver}: {l:?}");
                let s = &l.conversations[0];
                assert_eq!(
                    (s.conversation_id, s.peer_user_id, s.last_seq),
                    (conv, ub, 3)
                );
            }
            other => panic!("{driver}: {other:?}"),
        }
        match call(
            &mut b,
            Body::ListConversations(v1::ListConversations::default()),
        ) {
            Body::ConversationList(l) => {
                assert_eq!(l.conversations.len(), 1, "{driver}: {l:?}");
                assert_eq!(l.conversations[0].peer_user_id, ua);
            }
            other => panic!("{driver}: {other:?}"),
        }

        // The metrics saw the four SendAcks and the log's group commits.
        assert_eq!(metric_sum(&srv, "starling_send_ack_seconds_count"), 4);
        assert_eq!(
            metric_sum(&srv, "starling_messages_acked_total"),
            3,
            "{driver}"
        );
        assert_eq!(
            metric_sum(&srv, "starling_send_duplicates_total"),
            1,
            "{driver}"
        );
        assert!(
            metric_sum(&srv, "starling_delivers_pushed_total") >= 1,
            "{driver}"
        );
        assert_eq!(
            metric_sum(&srv, "starling_conversations_loaded"),
            1,
            "{driver}"
        );
        assert!(
            metric_sum(&srv, "starling_log_syncs_total") >= 3,
            "{driver}"
        );
        assert!(
            metric_sum(&srv, "starling_log_records_total") >= 3,
            "{driver}"
        );
        assert!(metric_sum(&srv, "starling_log_commit_seconds_count") >= 3);
        // Every shard's log switched to its first segment at open.
        assert!(metric_sum(&srv, "starling_log_segment_switch_seconds_count") >= 1);
        let m = srv.metrics();
        for name in [
            "starling_send_ack_seconds",
            "starling_log_commit_seconds",
            "starling_log_segment_switch_seconds",
        ] {
            let counts: Vec<i64> = m
                .lines()
                .filter(|l| l.starts_with(&format!("{name}_bucket{{shard=\"0\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect();
            assert_eq!(counts.len(), 16, "{driver}: {m}");
            assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{driver}: {m}");
            let total = m
                .lines()
                .find(|l| l.starts_with(&format!("{name}_count{{shard=\"0\"}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok());
            assert_eq!(counts.last().copied(), total, "{driver}: {m}");
            assert!(m.contains(&format!("# TYPE {name} histogram")), "{m}");
        }
    }
}

/// Pipelines the `Send`s `msg(i)` for message indexes `indexes` until the
/// connection dies or all are acknowledged; returns the acknowledgements
/// (index → seq) received. Never panics on a dead connection.
pub(super) fn send_stream(
    c: &mut Client,
    msg: &dyn Fn(u32) -> Body,
    indexes: &[u32],
    window: usize,
) -> std::collections::BTreeMap<u32, (u64, bool)> {
    use std::collections::{BTreeMap, HashMap};
    let mut acked = BTreeMap::new();
    let mut inflight: HashMap<u64, u32> = HashMap::new();
    let mut next = 0;
    loop {
        while inflight.len() < window && next < indexes.len() {
            let i = indexes[next];
            next += 1;
            let id = c.next_id;
            c.next_id += 1;
            let mut b = BytesMut::new();
            FrameEncoder::new(1 << 20)
                .encode(
                    &v1::Frame {
                        request_id: id,
                        body: Some(msg(i)),
                    },
                    &mut b,
                )
                .unwrap();
            if c.s.write_all(&b).and_then(|()| c.s.flush()).is_err() {
                return acked;
            }
            inflight.insert(id, i);
        }
        if inflight.is_empty() {
            return acked;
        }
        let Some(f) = c.recv() else { return acked };
        if let Some(i) = inflight.remove(&f.request_id) {
            match f.body {
                Some(Body::SendAck(a)) => {
                    acked.insert(i, (a.seq, a.duplicate));
                }
                other => panic!("send {i}: {other:?}"),
            }
        }
    }
}

/// Message `i` of a stream: client_msg_id and body both derived from `i`.
pub(super) fn stream_msg(i: u32, to: u64) -> Body {
    let mut cmid = [0xa5u8; 16];
    cmid[..4].copy_from_slice(&i.to_be_bytes());
    Body::Send(v1::Send {
        client_msg_id: cmid.to_vec().into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: format!("message {i}").into_bytes().into(),
        ..Default::default()
    })
}

/// Every message of a conversation, by paging GetHistory after_seq.
pub(super) fn whole_history(c: &mut Client, conv: u64) -> Vec<v1::Message> {
    let mut out: Vec<v1::Message> = Vec::new();
    loop {
        let after = out.last().map_or(0, |m| m.seq);
        match call(
            c,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                anchor: Some(v1::get_history::Anchor::AfterSeq(after)),
                limit: 200,
            }),
        ) {
            Body::HistoryPage(p) => {
                let more = p.has_more;
                if p.messages.is_empty() {
                    return out;
                }
                out.extend(p.messages);
                if !more {
                    return out;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

/// The server is killed with SIGKILL in the middle of a pipelined stream of
/// sends, three times. After each restart the client retries what was not
/// acknowledged (same client_msg_id, like the SDK's outbox). At the end:
/// every acknowledged message is stored with the seq it was acknowledged
/// with, seqs are contiguous, every message is stored exactly once, and the
/// messages acknowledged before a crash kept their send order.
#[test]
pub(super) fn sigkill_mid_stream_loses_nothing_acknowledged() {
    use std::collections::BTreeMap;
    let seed = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .map_or(7, |d| d.subsec_nanos());
    println!("kill timing seed {seed}");
    let mut srv = Server::start("auto", "");
    let (mut a, ga, b, gb) = ana_and_ben(&srv);
    drop(b);
    // More than the server can take in the longest delay below, so every
    // kill lands in the middle of the stream.
    const TOTAL: u32 = 30_000;
    let mut acked: BTreeMap<u32, (u64, bool)> = BTreeMap::new();
    let mut rng = u64::from(seed) | 1;
    for round in 0..3 {
        // Send everything not yet acknowledged, in index order; kill the
        // server after a random delay.
        let pending: Vec<u32> = (0..TOTAL).filter(|i| !acked.contains_key(i)).collect();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(20 + rng % 180);
        let pid = srv.child.0.id() as i32;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // Safety: kill(2) on our own child process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let got = send_stream(&mut a, &|i| stream_msg(i, gb.user_id), &pending, 32);
        killer.join().unwrap();
        // Acknowledgements seen before the crash kept send order.
        let mut last = 0;
        for (i, (seq, dup)) in &got {
            if !dup {
                assert!(
                    *seq > last,
                    "round {round}: message {i} got seq {seq} after {last}"
                );
                last = *seq;
            }
        }
        for (i, ack) in got {
            if let Some(prev) = acked.insert(i, ack) {
                panic!("message {i} acknowledged twice: {prev:?} then {ack:?}");
            }
        }
        println!(
            "round {round}: killed after {delay:?}; {} of {TOTAL} acknowledged so far",
            acked.len()
        );
        assert!(
            acked.len() < TOTAL as usize,
            "the kill came after the stream ended"
        );
        srv = srv.kill9_and_restart("auto");
        a = srv.hello(&ga.access_token);
    }
    // Finish the stream after the last restart: retries of messages that
    // were stored but not acknowledged come back as duplicates with their
    // original seq.
    let pending: Vec<u32> = (0..TOTAL).filter(|i| !acked.contains_key(i)).collect();
    let got = send_stream(&mut a, &|i| stream_msg(i, gb.user_id), &pending, 32);
    assert_eq!(got.len(), pending.len(), "every retry is acknowledged");
    acked.extend(got);
    let duplicates = acked.values().filter(|(_, dup)| *dup).count();
    println!("{duplicates} retries were stored before a crash and came back as duplicates");
    assert_eq!(acked.len(), TOTAL as usize);

    // The recipient reads the whole conversation.
    let mut b = srv.hello(&gb.access_token);
    let conv = match call(
        &mut b,
        Body::ListConversations(v1::ListConversations::default()),
    ) {
        Body::ConversationList(l) => {
            assert_eq!(l.conversations.len(), 1);
            l.conversations[0].conversation_id
        }
        other => panic!("{other:?}"),
    };
    let history = whole_history(&mut b, conv);
    assert_eq!(
        history.len(),
        TOTAL as usize,
        "each message stored exactly once"
    );
    for (k, m) in history.iter().enumerate() {
        assert_eq!(m.seq, k as u64 + 1, "seqs are contiguous");
        let i = u32::from_be_bytes(m.client_msg_id[..4].try_into().unwrap());
        assert_eq!(m.body, format!("message {i}").into_bytes());
        assert_eq!(
            acked[&i].0, m.seq,
            "message {i} stored at its acknowledged seq"
        );
    }
}

/// One device in the multi-device test: its token, its connection when
/// online, and the seqs it has received, in arrival order.
pub(super) struct Device {
    token: String,
    conn: Option<Client>,
    seqs: Vec<u64>,
}

impl Device {
    fn record(&mut self, m: &v1::Message) {
        if !self.seqs.contains(&m.seq) {
            self.seqs.push(m.seq);
        }
    }

    /// Connects (if offline) and syncs from its last seq, recording what
    /// the Sync returns; acknowledges delivery when `ack` is set.
    fn online(&mut self, srv: &Server, conv: u64, ack: bool) {
        if self.conn.is_none() {
            self.conn = Some(srv.hello(&self.token));
        }
        let last = self.seqs.iter().copied().max().unwrap_or(0);
        let c = self.conn.as_mut().unwrap();
        let id = c.next_id;
        c.next_id += 1;
        let mut last_seq = std::collections::BTreeMap::new();
        if conv != 0 {
            last_seq.insert(conv, last);
        }
        c.send(id, Body::Sync(v1::Sync { last_seq }));
        let (_, before) = recv_until(c, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let mut got = Vec::new();
        for f in before {
            if let Some(Body::Deliver(d)) = f.body {
                got.push(d.message.unwrap());
            }
        }
        for m in &got {
            self.record(m);
        }
        if let (true, Some(top)) = (ack, self.seqs.iter().copied().max()) {
            let c = self.conn.as_mut().unwrap();
            let done = call(
                c,
                Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id: conv,
                    up_to_seq: top,
                }),
            );
            assert!(matches!(done, Body::Done(_)), "{done:?}");
        }
    }

    /// Waits for the Deliver of `seq`.
    fn expect_deliver(&mut self, seq: u64) {
        let c = self.conn.as_mut().unwrap();
        let (f, _) = recv_until(
            c,
            |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq == seq)),
        );
        let Some(Body::Deliver(d)) = f.body else {
            unreachable!()
        };
        self.record(&d.message.unwrap());
    }
}

/// Signs in a second device of an existing user by password.
pub(super) fn second_device(srv: &Server, ident: Option<v1::Identifier>) -> v1::SessionGranted {
    let mut c = srv.hello("");
    match c.request(Body::Login(v1::Login {
        identifier: ident,
        credential: Some(v1::login::Credential::Password(
            "correct horse battery".into(),
        )),
        device: Some(v1::DeviceInfo {
            name: "second".into(),
            platform: "linux".into(),
        }),
    })) {
        Body::SessionGranted(g) => g,
        other => panic!("{other:?}"),
    }
}

/// Two users with two devices each. The sender's first device sends one
/// message in each of the eight online/offline combinations of the other
/// three devices. Online recipients get it pushed; the sender gets a
/// DELIVERED receipt as soon as one recipient device acknowledges (at once,
/// or when an offline recipient comes back and syncs); offline devices get
/// everything by Sync. At the end every device holds every message exactly
/// once, in order, and a READ receipt reaches both of the sender's devices.
#[test]
pub(super) fn two_users_two_devices_every_online_offline_combination() {
    let srv = Server::start("auto", "");
    let mut users = Vec::new();
    for who in ["ana@example.org", "ben@example.org"] {
        let mut c = srv.hello("");
        let g = register(&srv, &mut c, email(who), who);
        let set = c.request(Body::SetPassword(v1::SetPassword {
            new_password: "correct horse battery".into(),
        }));
        assert!(matches!(set, Body::Done(_)), "{set:?}");
        let g2 = second_device(&srv, email(who));
        assert_ne!(g.device_id, g2.device_id);
        users.push((g, g2));
    }
    let (ga1, ga2) = users.remove(0);
    let (gb1, gb2) = users.remove(0);
    let dev = |g: &v1::SessionGranted| Device {
        token: g.access_token.clone(),
        conn: None,
        seqs: Vec::new(),
    };
    let mut a1 = dev(&ga1);
    let (mut a2, mut b1, mut b2) = (dev(&ga2), dev(&gb1), dev(&gb2));
    a1.conn = Some(srv.hello(&a1.token));
    let mut conv = 0;
    for combo in 0u8..8 {
        let (a2_on, b1_on, b2_on) = (combo & 1 != 0, combo & 2 != 0, combo & 4 != 0);
        for (d, on) in [(&mut a2, a2_on), (&mut b1, b1_on), (&mut b2, b2_on)] {
            if on {
                d.online(&srv, conv, false);
            } else {
                d.conn = None;
            }
        }
        let c = a1.conn.as_mut().unwrap();
        let ack = match call(c, text(100 + combo, gb1.user_id, &format!("combo {combo}"))) {
            Body::SendAck(a) => a,
            other => panic!("combo {combo}: {other:?}"),
        };
        conv = ack.conversation_id;
        let seq = ack.seq;
        assert_eq!(seq, u64::from(combo) + 1, "combo {combo}");
        a1.seqs.push(seq);
        for (d, on) in [(&mut a2, a2_on), (&mut b1, b1_on), (&mut b2, b2_on)] {
            if on {
                d.expect_deliver(seq);
            }
        }
        // The first recipient device to acknowledge triggers DELIVERED; if
        // both are offline, the first one back does (after its Sync).
        let acker = if b1_on {
            &mut b1
        } else if b2_on {
            &mut b2
        } else {
            &mut b1
        };
        acker.online(&srv, conv, true);
        for (d, on) in [(&mut a1, true), (&mut a2, a2_on)] {
            if on {
                let c = d.conn.as_mut().unwrap();
                let (r, _) = recv_until(c, |f| {
                    receipt(f).is_some_and(|r| {
                        r.kind == v1::ReceiptKind::Delivered as i32 && r.up_to_seq >= seq
                    })
                });
                assert_eq!(
                    receipt(&r).unwrap().by_user_id,
                    gb1.user_id,
                    "combo {combo}"
                );
            }
        }
        if !b1_on && !b2_on {
            b1.conn = None;
        }
    }
    // Everyone comes back and syncs; B reads everything.
    for d in [&mut a2, &mut b1, &mut b2] {
        d.online(&srv, conv, false);
    }
    let want: Vec<u64> = (1..=8).collect();
    for (name, d) in [("a1", &a1), ("a2", &a2), ("b1", &b1), ("b2", &b2)] {
        assert_eq!(d.seqs, want, "{name} holds every message once, in order");
    }
    let c = b1.conn.as_mut().unwrap();
    let done = call(
        c,
        Body::ReadCursor(v1::ReadCursor {
            conversation_id: conv,
            up_to_seq: 8,
        }),
    );
    assert!(matches!(done, Body::Done(_)), "{done:?}");
    for d in [&mut a1, &mut a2] {
        let c = d.conn.as_mut().unwrap();
        let (r, _) = recv_until(c, |f| {
            receipt(f).is_some_and(|r| r.kind == v1::ReceiptKind::Read as i32 && r.up_to_seq == 8)
        });
        assert_eq!(receipt(&r).unwrap().by_user_id, gb1.user_id);
    }
}

/// The body of message `i` of stream `tag`: names both, padded to `len`.
/// A device that asked in Hello for the smallest frame limit (1 KiB) and is then sent a
/// message that does not fit: the server neither sends the frame nor drops it silently (the
/// device would miss it, or wait forever for an answer); it says Goodbye{FRAME_TOO_LARGE} and
/// closes that connection only. The message stays acknowledged and durable: a connection
/// with a larger limit gets it, and the sender's connection is untouched.
#[test]
pub(super) fn a_frame_over_the_peers_limit_closes_only_that_connection() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "");
        let (mut a, ga, b, gb) = ana_and_ben(&srv);
        drop(b);
        let mut small = srv.connect();
        let w = small.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: gb.access_token.clone(),
            frame_bytes_max: 1,
            ..Default::default()
        }));
        assert!(matches!(w, Body::Welcome(_)), "{driver}: {w:?}");

        // A small message fits: pushed as usual.
        exchange(&mut a, &mut small, gb.user_id, 7, 0);
        // A 2 KiB one does not: acknowledged to the sender all the same...
        let ack = match call(&mut a, sized_msg(7, 1, gb.user_id, 2048)) {
            Body::SendAck(ack) => ack,
            other => panic!("{driver}: {other:?}"),
        };
        assert_eq!(ack.seq, 2, "{driver}");
        // ...and the small connection is told why and closed.
        let (bye, _) = recv_until(&mut small, |f| matches!(f.body, Some(Body::Goodbye(_))));
        let Some(Body::Goodbye(bye)) = bye.body else {
            unreachable!()
        };
        assert_eq!(
            bye.code,
            ErrorCode::FrameTooLarge as i32,
            "{driver}: {bye:?}"
        );
        assert!(bye.message.contains("frame_bytes_max"), "{driver}: {bye:?}");
        small.expect_closed();

        // The sender's connection is unaffected.
        assert!(matches!(
            a.request(Body::Ping(v1::Ping { nonce: 3 })),
            Body::Pong(v1::Pong { nonce: 3 })
        ));
        // The recipient, reconnected with the default limit, has both messages.
        let mut b = srv.hello(&gb.access_token);
        let got = whole_history(&mut b, ack.conversation_id);
        let bodies: Vec<_> = got.iter().map(|m| (m.seq, m.body.to_vec())).collect();
        assert_eq!(
            bodies,
            vec![(1, sized_body(7, 0, 100)), (2, sized_body(7, 1, 2048))],
            "{driver}"
        );
        assert_eq!(got[0].sender_user_id, ga.user_id);
    }
}

pub(super) fn sized_body(tag: u8, i: u32, len: usize) -> Vec<u8> {
    let mut b = format!("stream {tag} message {i} ").into_bytes();
    b.resize(len.max(b.len()), b'.');
    b
}

/// Message `i` of stream `tag` to user `to`: client_msg_id from (tag, i),
/// body `sized_body(tag, i, len)`.
pub(super) fn sized_msg(tag: u8, i: u32, to: u64, len: usize) -> Body {
    let mut cmid = [tag; 16];
    cmid[..4].copy_from_slice(&i.to_be_bytes());
    Body::Send(v1::Send {
        client_msg_id: cmid.to_vec().into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: sized_body(tag, i, len).into(),
        ..Default::default()
    })
}

/// One message `from` → `to` (user `to_user`): acknowledged to the sender,
/// pushed to the recipient.
pub(super) fn exchange(from: &mut Client, to: &mut Client, to_user: u64, tag: u8, i: u32) {
    match call(from, sized_msg(tag, i, to_user, 100)) {
        Body::SendAck(a) => assert!(!a.duplicate),
        other => panic!("{other:?}"),
    }
    let want = sized_body(tag, i, 100);
    recv_until(
        to,
        |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.body == want)),
    );
}

/// Issue #5: a device whose outbound budget is exhausted (it reads nothing)
/// stops getting pushes and gets a `MessagesAvailable` hint instead; it
/// catches up by Sync and loses nothing; other connections are never
/// stalled meanwhile. (If it stays over budget longer than the router's
/// slow-consumer close time, 30 s, it is closed with SLOW_CONSUMER
/// instead; then it reconnects and syncs, and still loses nothing.)
#[test]
pub(super) fn slow_consumer_gets_hints_then_syncs_without_loss() {
    // 12 MB of pushes: far over the router's per-connection budget (256
    // KiB) plus what the kernel buffers (here ~3.5 MB: the server's send
    // buffer grows up to net.ipv4.tcp_wmem's maximum, 4 MiB by default,
    // even though B's receive buffer is small). Bodies stay at 1 KiB so
    // that one Sync answer (500 messages) fits the gateway's outbound
    // buffer (limits.outbound_bytes_max, 1 MiB) even without the router's
    // sync byte budget; the test below covers large bodies.
    for driver in DRIVERS {
        slow_consumer(driver, 12_000, 1024);
    }
}

/// Like the test above with 8 KiB bodies: 500 of them (4 MB) would not fit
/// one Sync answer into the gateway's per-connection outbound buffer, so the
/// router caps a Sync answer at `sync_bytes_max` and names the rest in
/// `SyncDone.truncated`; the device syncs again until it has everything.
#[test]
pub(super) fn slow_consumer_with_large_bodies_catches_up_by_sync() {
    slow_consumer("auto", 1500, 8192);
}

#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
pub(super) fn slow_consumer(driver: &str, total: u32, body: usize) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
    const CLOSE_MS: u128 = 30_000; // ShardConfig::slow_consumer_close_ms
    let srv = Server::start(driver, "");
    let user = |who: &str| {
        let mut c = srv.hello("");
        let g = register(&srv, &mut c, email(who), who);
        (c, g)
    };
    let (mut a, _) = user("ana@example.org");
    let (_, gb) = user("ben@example.org");
    let (mut c, gc) = user("cleo@example.org");
    let (mut d, gd) = user("dan@example.org");

    // B's device connects with a small receive buffer, then reads nothing.
    let tcp = tcp_connect(srv.tls_addr, None, Some(16 * 1024)).unwrap();
    let mut b = Client::over(tcp, &srv.tls);
    let w = b.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        access_token: gb.access_token.clone(),
        ..Default::default()
    }));
    assert!(
        matches!(&w, Body::Welcome(w) if w.authenticated.is_some()),
        "{driver}: {w:?}"
    );

    // C and D talk on the same server the whole time.
    let rounds = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cd = {
        let (rounds, stop) = (rounds.clone(), stop.clone());
        let (uc, ud) = (gc.user_id, gd.user_id);
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Relaxed) && i < 100_000 {
                exchange(&mut c, &mut d, ud, 0xc0, i);
                exchange(&mut d, &mut c, uc, 0xd0, i);
                i += 1;
                rounds.store(i, Relaxed);
            }
            i
        })
    };

    // A sends everything to B; every message is acknowledged, in order.
    let t0 = now();
    let indexes: Vec<u32> = (0..total).collect();
    let acked = send_stream(
        &mut a,
        &|i| sized_msg(0xa0, i, gb.user_id, body),
        &indexes,
        32,
    );
    assert_eq!(acked.len(), total as usize, "{driver}");
    for (i, (seq, dup)) in &acked {
        assert_eq!((*seq, *dup), (u64::from(*i) + 1, false), "{driver}");
    }
    // B is far behind now; C and D still get acknowledgements and pushes.
    let r0 = rounds.load(Relaxed);
    let deadline = now() + Duration::from_secs(120);
    while rounds.load(Relaxed) < r0 + 10 {
        assert!(!cd.is_finished(), "{driver}: the C/D thread failed");
        assert!(now() < deadline, "{driver}: C and D are stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Relaxed);
    let cd_rounds = cd.join().expect("C/D exchange failed (see its panic)");
    let stalled = t0.elapsed();

    // B reads: the messages pushed before it went over budget, in order,
    // then a hint instead of the rest.
    let conv = match call(
        &mut a,
        Body::ListConversations(v1::ListConversations::default()),
    ) {
        Body::ConversationList(l) => l.conversations[0].conversation_id,
        other => panic!("{driver}: {other:?}"),
    };
    let mut have = 0u64;
    let mut hint = None;
    for _ in 0..=total {
        match b.recv().and_then(|f| f.body) {
            Some(Body::Deliver(dv)) => {
                let m = dv.message.unwrap();
                assert_eq!(m.seq, have + 1, "{driver}: pushes arrive in order");
                assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, body));
                have = m.seq;
            }
            Some(Body::MessagesAvailable(h)) => {
                hint = Some(h);
                break;
            }
            Some(Body::Goodbye(g)) => {
                assert_eq!(g.code, ErrorCode::SlowConsumer as i32, "{driver}: {g:?}");
                break;
            }
            None => break,
            Some(other) => panic!("{driver}: {other:?}"),
        }
    }
    let pushed = have;
    if let Some(h) = &hint {
        assert_eq!(h.conversation_id, conv, "{driver}");
        assert!(
            h.up_to_seq > pushed && h.up_to_seq <= u64::from(total),
            "{driver}: hint {h:?} after {pushed} pushes"
        );
    } else {
        // Closed: only acceptable as the slow-consumer close, after its time.
        assert!(
            stalled.as_millis() >= CLOSE_MS,
            "{driver}: B was closed after {stalled:?}, before the slow-consumer close time, having {pushed} pushes"
        );
        b = srv.hello(&gb.access_token);
    }
    assert!(
        pushed < u64::from(total),
        "{driver}: every message was pushed; the budget never ran out"
    );

    // B catches up by Sync from what it has: every message exactly once,
    // in order (per Sync at most 500 messages or 256 KiB of them).
    let per_sync = (256 * 1024 / (body as u32 + 64)).clamp(1, 500);
    let mut syncs = 0;
    while have < u64::from(total) {
        syncs += 1;
        assert!(
            syncs <= total / per_sync + 3,
            "{driver}: Sync makes no progress at {have}"
        );
        let id = b.next_id;
        b.next_id += 1;
        b.send(
            id,
            Body::Sync(v1::Sync {
                last_seq: [(conv, have)].into_iter().collect(),
            }),
        );
        let (_, before) = recv_until(&mut b, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let from = have;
        for f in before {
            match f.body {
                Some(Body::Deliver(dv)) if f.request_id == id => {
                    let m = dv.message.unwrap();
                    assert_eq!(m.seq, have + 1, "{driver}: synced in order, once");
                    assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, body));
                    have = m.seq;
                }
                // A hint emitted before this Sync reached the router.
                Some(Body::MessagesAvailable(_)) if f.request_id == 0 => {}
                // Once the backlog drained, the hint was sent and live pushes resumed: messages
                // A sent after it arrive as pushes too (the protocol allows them between a
                // Sync's frames); the Sync covers them again, as the client dedups by seq.
                Some(Body::Deliver(dv)) if f.request_id == 0 => {
                    let m = dv.message.unwrap();
                    assert!(
                        hint.as_ref().is_some_and(|h| m.seq > h.up_to_seq),
                        "{driver}: a live push of {} during a Sync, hint {hint:?}",
                        m.seq
                    );
                    assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, body));
                }
                other => panic!("{driver}: during Sync {id}: {other:?}"),
            }
        }
        assert!(have > from, "{driver}: Sync from {from} returned nothing");
    }
    assert_eq!(have, u64::from(total), "{driver}");

    // Caught up: pushes resume.
    match call(&mut a, sized_msg(0xa0, total, gb.user_id, body)) {
        Body::SendAck(ack) => assert_eq!(ack.seq, u64::from(total) + 1, "{driver}"),
        other => panic!("{driver}: {other:?}"),
    }
    // (After live pushes that resumed during the Syncs, if any.)
    let (_, before) = recv_until(&mut b, |f| {
        matches!(&f.body, Some(Body::Deliver(dv))
            if dv.message.as_ref().is_some_and(|m| m.seq == u64::from(total) + 1))
    });
    for f in before {
        match f.body {
            Some(Body::Deliver(dv)) if f.request_id == 0 => {
                assert!(dv.message.unwrap().seq <= u64::from(total), "{driver}");
            }
            other => panic!("{driver}: before the new push: {other:?}"),
        }
    }
    println!(
        "{driver}: {pushed} of {total} pushed before the budget ran out, hint {:?}, the rest by {syncs} Syncs; C/D exchanged {cd_rounds} rounds meanwhile; B unread for {stalled:?}",
        hint.map(|h| h.up_to_seq)
    );
}
