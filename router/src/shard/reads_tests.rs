//! The read gate (`reads.rs`) with reads held by the test: a cold conversation's requests wait
//! for their reads while the rest of the shard goes on, keep their order, take results that
//! complete in any order, and fail clearly when a read is dropped unrun.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::meta::{Group, Member, Role};
use starling_storage::{
    EmbeddedShard, LogOptions, MemMeta, MetaBatch, MetadataStore, ShardOptions, TimestampMs, UserId,
};

use super::ShardConfig;
use super::fixture::{
    GROUP, Shard, answers, drive_until, group_meta, send_frame, shard_over, transmitted,
};
use crate::ids::{ConnId, ConvId, GROUP_BIT};

/// Reads handed off and not yet run.
type Held = Rc<RefCell<VecDeque<Box<dyn FnOnce() + Send>>>>;

/// A second group of users 1 and 2.
const OTHER: ConvId = ConvId(GROUP_BIT | 7);

fn meta_with_other() -> Arc<MemMeta> {
    let meta = group_meta();
    let mut b = MetaBatch::default();
    b.put(&Group {
        id: OTHER.storage(),
        name: "other".into(),
        created_by: UserId(1),
        created_ms: TimestampMs(0),
        epoch: 0,
        settings: None,
    });
    for u in [1, 2] {
        b.add_member(&Member {
            group: OTHER.storage(),
            user: UserId(u),
            role: Role::Member,
            joined_ms: TimestampMs(0),
            joined_seq: None,
        });
    }
    meta.commit(&b).unwrap();
    meta
}

/// A shard over the embedded storage in `dir` and `meta`, its reads held in the returned queue
/// (`hold`) or run inline.
fn open_with(dir: &std::path::Path, meta: &Arc<MemMeta>, hold: bool) -> (Shard, Held) {
    let opts = ShardOptions {
        log: LogOptions {
            segment_bytes: 1 << 20,
            ..LogOptions::default()
        },
        ..ShardOptions::default()
    };
    let store = EmbeddedShard::open(dir, opts).unwrap();
    let index = store.index().clone();
    let mut s = shard_over(ShardConfig::default(), store, index, meta.clone());
    let held = Held::default();
    if hold {
        let q = held.clone();
        s.set_read_offload(Box::new(move |job| q.borrow_mut().push_back(job)));
    }
    (s, held)
}

fn open(dir: &std::path::Path, meta: &Arc<MemMeta>) -> (Shard, Held) {
    open_with(dir, meta, true)
}

/// Runs the held reads, newest first (as a read pool may finish them), and wakes the shard as
/// the read threads do; how many ran.
fn finish(s: &mut Shard, held: &Held, now: u64) -> usize {
    let n = run_newest_first(held);
    s.handle_log_progress(now);
    n
}

/// Runs the held reads, newest first (as a read pool may finish them); how many ran.
fn run_newest_first(held: &Held) -> usize {
    let mut n = 0;
    while let Some(job) = held.borrow_mut().pop_back() {
        job();
        n += 1;
    }
    n
}

/// A Send the device says is its first attempt (no durable dedup lookup).
fn first_send(rid: u64, to: &v1::recipient::Target, body: &[u8]) -> v1::Frame {
    let mut f = send_frame(rid, rid as u8, *to, body);
    if let Some(Body::Send(s)) = &mut f.body {
        s.first_attempt = true;
    }
    f
}

fn history(conv: ConvId, rid: u64) -> v1::Frame {
    v1::Frame {
        request_id: rid,
        body: Some(Body::GetHistory(v1::GetHistory {
            conversation_id: conv.0,
            anchor: None,
            limit: 3,
        })),
    }
}

fn seqs(b: &Body) -> Vec<u64> {
    let Body::HistoryPage(p) = b else {
        panic!("{b:?}")
    };
    p.messages.iter().map(|m| m.seq).collect()
}

fn ack_seq(b: &Body) -> u64 {
    let Body::SendAck(a) = b else { panic!("{b:?}") };
    a.seq
}

/// Five messages in GROUP and one in OTHER, written by a shard that then stops.
fn five_and_one(dir: &std::path::Path, meta: &Arc<MemMeta>) {
    let mut now = 1_000;
    let (mut s, _) = open_with(dir, meta, false);
    let to = v1::recipient::Target::ConversationId(GROUP.0);
    for rid in 1..=5 {
        s.handle_frame(ConnId(1), send_frame(rid, rid as u8, to, b"hi"), now);
    }
    drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 5);
    let to = v1::recipient::Target::ConversationId(OTHER.0);
    s.handle_frame(ConnId(1), send_frame(6, 6, to, b"x"), now);
    drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 6);
}

#[test]
fn a_cold_conversations_request_waits_for_its_read_while_the_shard_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let meta = meta_with_other();
    five_and_one(dir.path(), &meta);
    let (mut s, held) = open(dir.path(), &meta);
    let mut now = 2_000;
    // OTHER's state is read and in memory.
    let to_other = v1::recipient::Target::ConversationId(OTHER.0);
    s.handle_frame(ConnId(1), first_send(10, &to_other, b"y"), now);
    assert_eq!(finish(&mut s, &held, now), 1, "OTHER's state");
    drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && f.request_id == 10
    });
    // GROUP is cold: its history waits for its state, then for its page.
    s.handle_frame(ConnId(2), history(GROUP, 20), now);
    assert!(answers(&transmitted(&mut s), ConnId(2), 20).is_empty());
    assert_eq!(s.reads_waiting(), 1);
    // Meanwhile a Send into OTHER is sequenced and acknowledged without any read.
    s.handle_frame(ConnId(1), first_send(11, &to_other, b"z"), now);
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && f.request_id == 11
    });
    assert_eq!(ack_seq(answers(&out, ConnId(1), 11)[0]), 3);
    assert_eq!(s.reads_waiting(), 1, "the history still waits");
    assert_eq!(finish(&mut s, &held, now), 1, "GROUP's state");
    assert_eq!(
        finish(&mut s, &held, now),
        1,
        "GROUP's page, once its state is known"
    );
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2) && f.request_id == 20
    });
    assert_eq!(seqs(answers(&out, ConnId(2), 20)[0]), [3, 4, 5]);
    assert_eq!(s.reads_waiting(), 0);
    assert_eq!(
        s.stats().inline_reads,
        0,
        "nothing was read on the shard thread"
    );
    assert_eq!(s.stats().reads_submitted, 3);
}

#[test]
fn sends_into_a_conversation_being_read_keep_their_order_and_a_retry_is_found_by_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let meta = meta_with_other();
    five_and_one(dir.path(), &meta);
    let (mut s, held) = open(dir.path(), &meta);
    let mut now = 2_000;
    let to = v1::recipient::Target::ConversationId(GROUP.0);
    // A retry of message 2 (not a first attempt: it needs the durable dedup lookup), then two
    // new messages, all while GROUP's state is being read.
    let mut retry = send_frame(30, 2, to, b"hi");
    if let Some(Body::Send(s)) = &mut retry.body {
        s.first_attempt = false;
    }
    s.handle_frame(ConnId(1), retry, now);
    for rid in [31, 32] {
        s.handle_frame(ConnId(1), first_send(rid, &to, b"new"), now);
    }
    assert_eq!(s.reads_waiting(), 3);
    assert_eq!(
        held.borrow().len(),
        1,
        "one read of the state for all three"
    );
    finish(&mut s, &held, now);
    assert_eq!(held.borrow().len(), 1, "then the retry's dedup lookup");
    assert_eq!(s.reads_waiting(), 3, "the new ones wait behind the retry");
    finish(&mut s, &held, now);
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && f.request_id == 32
    });
    assert_eq!(
        ack_seq(answers(&out, ConnId(1), 30)[0]),
        2,
        "the retry's first seq"
    );
    let later: Vec<u64> = [31, 32]
        .iter()
        .map(|&r| ack_seq(answers(&out, ConnId(1), r)[0]))
        .collect();
    assert_eq!(later, [6, 7], "in the order they came");
    assert_eq!(s.stats().duplicates, 1);
    assert_eq!(s.stats().inline_reads, 0);
}

#[test]
fn a_sync_over_many_cold_conversations_takes_reads_finishing_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let meta = meta_with_other();
    five_and_one(dir.path(), &meta);
    let (mut s, held) = open(dir.path(), &meta);
    let mut now = 2_000;
    let f = v1::Frame {
        request_id: 40,
        body: Some(Body::Sync(v1::Sync::default())),
    };
    s.handle_frame(ConnId(2), f, now);
    // The user's conversations, then both states (finishing newest first), then both pages.
    assert_eq!(finish(&mut s, &held, now), 1);
    assert_eq!(finish(&mut s, &held, now), 2);
    assert_eq!(finish(&mut s, &held, now), 2);
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2) && matches!(f.body, Some(Body::SyncDone(_)))
    });
    let mut delivered: Vec<(u64, u64)> = answers(&out, ConnId(2), 40)
        .into_iter()
        .filter_map(|b| match b {
            Body::Deliver(d) => d.message.as_ref().map(|m| (m.conversation_id, m.seq)),
            _ => None,
        })
        .collect();
    delivered.sort_unstable();
    let mut want: Vec<(u64, u64)> = (1..=5).map(|q| (GROUP.0, q)).collect();
    want.push((OTHER.0, 1));
    want.sort_unstable();
    assert_eq!(delivered, want);
    assert_eq!(s.stats().inline_reads, 0);
}

#[test]
fn a_read_dropped_unrun_fails_its_request_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let meta = meta_with_other();
    five_and_one(dir.path(), &meta);
    let (mut s, held) = open(dir.path(), &meta);
    let mut now = 2_000;
    s.handle_frame(ConnId(2), history(GROUP, 50), now);
    // The read threads are gone: the job is dropped without running.
    held.borrow_mut().clear();
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2) && f.request_id == 50
    });
    let Body::Error(e) = answers(&out, ConnId(2), 50)[0] else {
        panic!("{out:?}")
    };
    assert_eq!(e.code, ErrorCode::StorageFailure as i32);
    assert!(e.message.contains("read threads stopped"), "{}", e.message);
    assert_eq!(s.reads_waiting(), 0);
    // A read that does run serves the next request.
    s.handle_frame(ConnId(2), history(GROUP, 51), now);
    finish(&mut s, &held, now);
    finish(&mut s, &held, now);
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2) && f.request_id == 51
    });
    assert_eq!(seqs(answers(&out, ConnId(2), 51)[0]), [3, 4, 5]);
}

#[test]
fn a_pair_is_looked_up_off_the_shard_thread_with_its_sends_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let meta = meta_with_other();
    let mut now = 1_000;
    let to_peer = v1::recipient::Target::UserId(2);
    let conv = {
        let (mut s, held) = open(dir.path(), &meta);
        // The pair's first two Sends wait for one lookup, then for the conversation's creation.
        s.handle_frame(ConnId(1), first_send(1, &to_peer, b"a"), now);
        s.handle_frame(ConnId(1), first_send(2, &to_peer, b"b"), now);
        assert_eq!(held.borrow().len(), 1, "one lookup for the pair");
        assert!(transmitted(&mut s).is_empty());
        finish(&mut s, &held, now);
        // The new conversation's state is read like any other, then the Sends' dedup lookups
        // (held back, they are no longer first attempts) and the pair's blocks (each Send
        // plans its own: the second is read alongside the first, before the first caches it).
        assert_eq!(finish(&mut s, &held, now), 1);
        assert_eq!(finish(&mut s, &held, now), 4);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 2);
        let acks: Vec<(u64, u64)> = [1, 2]
            .iter()
            .map(|&r| match answers(&out, ConnId(1), r)[..] {
                [Body::SendAck(a)] => (a.conversation_id, a.seq),
                ref other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(acks[0].1, 1);
        assert_eq!(acks[1], (acks[0].0, 2), "in the order they came");
        // Nobody at all: the lookup says so.
        s.handle_frame(
            ConnId(1),
            first_send(3, &v1::recipient::Target::UserId(99), b"?"),
            now,
        );
        finish(&mut s, &held, now);
        let out = transmitted(&mut s);
        let [Body::Error(e)] = answers(&out, ConnId(1), 3)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(e.code, ErrorCode::NotFound as i32);
        assert_eq!(s.stats().inline_reads, 0);
        acks[0].0
    };
    // After a restart the pair is not cached: it is found by a lookup, not created again.
    let (mut s, held) = open(dir.path(), &meta);
    let writes = meta.writes();
    s.handle_frame(
        ConnId(2),
        first_send(4, &v1::recipient::Target::UserId(1), b"c"),
        now,
    );
    assert_eq!(finish(&mut s, &held, now), 1, "the lookup");
    assert_eq!(finish(&mut s, &held, now), 1, "the state");
    assert_eq!(
        finish(&mut s, &held, now),
        2,
        "the dedup lookup and the pair's blocks"
    );
    let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(2) && f.request_id == 4);
    let [Body::SendAck(a)] = answers(&out, ConnId(2), 4)[..] else {
        panic!("{out:?}")
    };
    assert_eq!((a.conversation_id, a.seq), (conv, 3));
    assert_eq!(meta.writes(), writes, "nothing created");
    assert_eq!(s.stats().inline_reads, 0);
}

#[test]
fn a_pages_message_states_are_read_off_the_thread_after_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let meta = meta_with_other();
    five_and_one(dir.path(), &meta);
    // User 1 deletes message 5 for everyone (its state is written), then the shard stops.
    {
        let mut now = 1_500;
        let (mut s, _) = open_with(dir.path(), &meta, false);
        let to = v1::recipient::Target::ConversationId(GROUP.0);
        let mut f = send_frame(7, 7, to, b"");
        if let Some(Body::Send(sd)) = &mut f.body {
            sd.content_type.clear();
            sd.change = Some(Box::new(v1::MessageChange {
                kind: v1::ChangeKind::Delete as i32,
                target_seq: 5,
                emoji: String::new(),
            }));
        }
        s.handle_frame(ConnId(1), f, now);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 7);
        assert_eq!(ack_seq(answers(&out, ConnId(1), 7)[0]), 6);
    }
    let (mut s, held) = open(dir.path(), &meta);
    let mut now = 2_000;
    s.handle_frame(ConnId(2), history(GROUP, 20), now);
    assert_eq!(finish(&mut s, &held, now), 1, "GROUP's state");
    assert_eq!(
        finish(&mut s, &held, now),
        1,
        "the page: 3 (to know there is more), 4, 5 and the delete"
    );
    assert!(answers(&transmitted(&mut s), ConnId(2), 20).is_empty());
    assert_eq!(
        finish(&mut s, &held, now),
        3,
        "the states of 3, 4 and 5 (a delete's own entry has none)"
    );
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2) && f.request_id == 20
    });
    let Body::HistoryPage(p) = answers(&out, ConnId(2), 20)[0] else {
        panic!("{out:?}")
    };
    let five = p.messages.iter().find(|m| m.seq == 5).expect("5 is served");
    assert!(five.deleted && five.body.is_empty(), "{five:?}");
    let four = p.messages.iter().find(|m| m.seq == 4).expect("4 is served");
    assert!(!four.deleted && &four.body[..] == b"hi");
    assert_eq!(
        s.stats().inline_reads,
        0,
        "no state was read on the shard thread"
    );
}
