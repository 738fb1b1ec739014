//! Disappearing messages through the real binary (issue 37 §4): a member sets a timer in a
//! direct conversation, the timer change is pushed as an entry, messages sent afterwards carry
//! their expiry (in the SendAck, the live Deliver and history), and once it passes neither
//! history nor Sync serves them any more. The setting survives a SIGKILL and restart. The
//! retention thread sweeps and reports on /metrics.

use super::messaging::{ana_and_ben, call, recv_until, text};
use super::*;

fn set_timer(cmid: u8, conv: u64, seconds: u64) -> Body {
    Body::Send(v1::Send {
        client_msg_id: vec![cmid; 16].into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::ConversationId(conv)),
        }),
        set_timer: Some(Box::new(v1::DisappearingTimer { seconds })),
        ..Default::default()
    })
}

fn ack(b: Body) -> v1::SendAck {
    match b {
        Body::SendAck(a) => a,
        other => panic!("not a SendAck: {other:?}"),
    }
}

fn seqs_in_history(c: &mut Client, conv: u64) -> Vec<u64> {
    match call(
        c,
        Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            ..Default::default()
        }),
    ) {
        Body::HistoryPage(p) => p.messages.iter().map(|m| m.seq).collect(),
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

fn pushed(c: &mut Client, seq: u64) -> v1::Message {
    let (f, _) = recv_until(
        c,
        |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq == seq)),
    );
    let Some(Body::Deliver(d)) = f.body else {
        unreachable!()
    };
    d.message.unwrap()
}

#[test]
fn a_timer_makes_later_messages_disappear_from_history_and_sync_and_survives_a_restart() {
    let srv = Server::start("io-uring", "[storage]\nretention_sweep_ms = 1000\n");
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let ub = gb.user_id;
    let first = ack(call(&mut a, text(1, ub, "kept")));
    let conv = first.conversation_id;
    assert_eq!(first.expires_at_ms, 0);
    // Out of bounds: refused with the bounds named.
    let e = call(&mut b, set_timer(2, conv, 3));
    assert_eq!(err_code(&e), ErrorCode::InvalidArgument);
    // Ben (any member of a 1:1) sets five seconds: entry 2, pushed to Ana.
    let t = ack(call(&mut b, set_timer(3, conv, 5)));
    assert_eq!((t.seq, t.expires_at_ms), (2, 0));
    let live = pushed(&mut a, 2);
    assert_eq!(
        live.timer_changed,
        Some(Box::new(v1::DisappearingTimer { seconds: 5 }))
    );
    // A message sent now carries its expiry: in the SendAck and in what Ben receives.
    let gone = ack(call(&mut a, text(4, ub, "soon gone")));
    assert_eq!(gone.seq, 3);
    assert_eq!(gone.expires_at_ms, gone.server_ts_ms + 5_000);
    assert_eq!(pushed(&mut b, 3).expires_at_ms, gone.expires_at_ms);
    assert_eq!(seqs_in_history(&mut b, conv), [1, 2, 3]);
    // Past it: history and Sync skip it; the timer entry and the earlier message stay.
    while unix_ms() < gone.expires_at_ms + 50 {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seqs_in_history(&mut b, conv), [1, 2]);
    let s = synced(&mut b, conv);
    assert_eq!(s.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    // The retention thread sweeps (nothing to remove: each log is one segment, in use).
    while super::connections::metric_sum(&srv, "starling_retention_sweeps_total") < 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        super::connections::metric_sum(&srv, "starling_retention_removed_segments_total"),
        0
    );
    assert_eq!(
        super::connections::metric_sum(&srv, "starling_log_oldest_segment_lsn"),
        2
    );
    // The setting is durable: after a SIGKILL the next message still disappears.
    drop((a, b));
    let srv = srv.kill9_and_restart("io-uring");
    let mut a = srv.hello(&ga.access_token);
    let next = ack(call(&mut a, text(5, ub, "also goes")));
    assert_eq!(next.seq, 4);
    assert_eq!(next.expires_at_ms, next.server_ts_ms + 5_000);
    // Off: messages stay again.
    assert_eq!(ack(call(&mut a, set_timer(6, conv, 0))).seq, 5);
    let kept = ack(call(&mut a, text(7, ub, "stays")));
    assert_eq!((kept.seq, kept.expires_at_ms), (6, 0));
}

/// `storage.retention_after_delivery_secs = 0`: a message goes once every member received it
/// (the sender's device acknowledges its own, as the SDK does), not before; what was received
/// stays gone after a SIGKILL and restart.
#[test]
fn the_retention_after_delivery_drops_what_everyone_received_and_keeps_the_rest() {
    let srv = Server::start(
        "io-uring",
        "[storage]\nretention_after_delivery_secs = 0\nretention_sweep_ms = 1000\n",
    );
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let ub = gb.user_id;
    let first = ack(call(&mut a, text(1, ub, "read and gone")));
    let conv = first.conversation_id;
    assert_eq!(pushed(&mut b, 1).seq, 1);
    let delivered = |c: &mut Client, seq: u64| {
        let done = call(
            c,
            Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: conv,
                up_to_seq: seq,
            }),
        );
        assert!(matches!(done, Body::Done(_)), "{done:?}");
    };
    // Only Ben's device has it: Ana's has not said so yet, so it stays.
    delivered(&mut b, 1);
    assert_eq!(seqs_in_history(&mut b, conv), [1]);
    delivered(&mut a, 1);
    assert!(
        seqs_in_history(&mut b, conv).is_empty(),
        "everyone received it"
    );
    assert!(synced(&mut a, conv).is_empty());
    // A message Ben has not received stays, however long.
    let second = ack(call(&mut a, text(2, ub, "not yet received")));
    assert_eq!(second.seq, 2);
    delivered(&mut a, 2);
    assert_eq!(seqs_in_history(&mut a, conv), [2]);
    drop((a, b));
    let srv = srv.kill9_and_restart("io-uring");
    let mut b = srv.hello(&gb.access_token);
    assert_eq!(
        seqs_in_history(&mut b, conv),
        [2],
        "the record of delivery is durable"
    );
    let s = synced(&mut b, conv);
    assert_eq!(s.iter().map(|m| m.seq).collect::<Vec<_>>(), [2]);
    let _ = ga;
}
