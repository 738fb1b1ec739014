//! A group change's steps through [`RouterShard`]'s surface, and what a group loaded with a
//! pending-event marker does: its event is sequenced if the log lacks it (redo), or found and
//! settled if the log has it, so metadata and log never disagree after a crash.

use std::sync::Arc;

use starling_protocol::v1::{self, frame::Body};
use starling_storage::meta::{Group, Member, keys};
use starling_storage::{
    DenseIndex, EmbeddedShard, LogOptions, MemMeta, MessageIndex, MetaBatch, MetadataStore,
    ShardOptions, UserId,
};

use super::super::fixture::{Shard, drive_until, shard_over};
use super::super::{RouterShard, ShardConfig};
use crate::ids::{ConnId, ConvId};

fn open(dir: &std::path::Path, meta: Arc<MemMeta>) -> Shard {
    let opts = ShardOptions {
        log: LogOptions {
            segment_bytes: 1 << 20,
            ..LogOptions::default()
        },
        ..ShardOptions::default()
    };
    let store = EmbeddedShard::open(dir, opts).expect("the shard opens");
    let index: Arc<DenseIndex> = store.index().clone();
    shard_over(ShardConfig::default(), store, index, meta)
}

/// Runs `body` as request `rid` of connection `conn` and returns its answer.
fn ask(s: &mut Shard, now: &mut u64, conn: u64, rid: u64, body: Body) -> Body {
    let f = v1::Frame {
        request_id: rid,
        body: Some(body),
    };
    s.handle_frame(ConnId(conn), f, *now);
    let out = drive_until(s, now, |c, f| c == ConnId(conn) && f.request_id == rid);
    out.into_iter()
        .rev()
        .find(|(c, f)| *c == ConnId(conn) && f.request_id == rid)
        .and_then(|(_, f)| f.body)
        .expect("an answer")
}

fn group_record(meta: &MemMeta, conv: ConvId) -> Group {
    meta.get::<Group>(&conv.storage().0.to_be_bytes())
        .unwrap()
        .expect("the group exists")
}

fn joined_seq(meta: &MemMeta, conv: ConvId, user: u64) -> Option<u64> {
    meta.get::<Member>(&keys::member(conv.storage().0, UserId(user)))
        .unwrap()
        .and_then(|m| m.joined_seq)
}

/// User 1 creates a group with user 2 (users of the fixture's metadata).
fn create(s: &mut Shard, now: &mut u64) -> ConvId {
    let b = ask(
        s,
        now,
        1,
        7,
        Body::CreateGroup(v1::CreateGroup {
            name: "g2".into(),
            member_user_ids: vec![2],
            avatar: None,
        }),
    );
    let Body::GroupInfo(g) = b else {
        panic!("{b:?}")
    };
    ConvId(g.conversation_id)
}

#[test]
fn a_created_group_has_its_event_at_seq_1_and_no_marker_left() {
    let dir = tempfile::tempdir().unwrap();
    let meta = super::super::fixture::group_meta();
    let mut s = open(dir.path(), meta.clone());
    let mut now = 1_000;
    let conv = create(&mut s, &mut now);
    assert!(conv.is_group());
    // The settle commit follows the answer.
    settle(&mut s, &meta, conv, &mut now);
    let g = group_record(&meta, conv);
    assert_eq!(g.epoch, 1);
    assert_eq!(g.settings.unwrap().pending, None);
    assert_eq!(
        (joined_seq(&meta, conv, 1), joined_seq(&meta, conv, 2)),
        (Some(1), Some(1))
    );
    // A member's Send is sequenced after it.
    let b = ask(
        &mut s,
        &mut now,
        2,
        8,
        super::super::fixture::send_frame(
            8,
            3,
            v1::recipient::Target::ConversationId(conv.0),
            b"x",
        )
        .body
        .unwrap(),
    );
    assert!(matches!(&b, Body::SendAck(a) if a.seq == 2), "{b:?}");
}

/// Puts the group record of `conv` back as it was between the change's commit and its settle:
/// marker set, its members' joins unsequenced.
fn unsettle(meta: &MemMeta, conv: ConvId, marker: &Group, members: &[u64]) {
    let mut b = MetaBatch::default();
    b.put(marker);
    for &u in members {
        let mut m = meta
            .get::<Member>(&keys::member(conv.storage().0, UserId(u)))
            .unwrap()
            .unwrap();
        m.joined_seq = Some(0);
        b.put(&m);
    }
    meta.commit(&b).unwrap();
}

#[test]
fn a_marker_whose_event_is_in_the_log_is_settled_without_a_second_event() {
    let dir = tempfile::tempdir().unwrap();
    let meta = super::super::fixture::group_meta();
    let mut now = 1_000;
    let (conv, marked) = {
        let mut s = open(dir.path(), meta.clone());
        let conv = create(&mut s, &mut now);
        settle(&mut s, &meta, conv, &mut now);
        // What the commit wrote (marker included), rebuilt from the settled record.
        let mut g = group_record(&meta, conv);
        let st = g.settings.as_mut().unwrap();
        assert!(st.pending.is_none());
        st.pending = Some(starling_storage::meta::PendingEvent {
            version: 1,
            event: Vec::new(),
        });
        (conv, g)
    };
    // "Crashed" before the settle: the log has the event, the metadata the marker.
    unsettle(&meta, conv, &marked, &[1, 2]);
    let mut s = open(dir.path(), meta.clone());
    let b = ask(
        &mut s,
        &mut now,
        2,
        9,
        Body::GetGroupInfo(v1::GetGroupInfo {
            conversation_id: conv.0,
            ..v1::GetGroupInfo::default()
        }),
    );
    assert!(matches!(b, Body::GroupInfo(_)), "{b:?}");
    settle(&mut s, &meta, conv, &mut now);
    assert_eq!(
        (joined_seq(&meta, conv, 1), joined_seq(&meta, conv, 2)),
        (Some(1), Some(1))
    );
    let index = s.index_last(conv);
    assert_eq!(index, 1, "no second event");
}

#[test]
fn a_marker_whose_event_is_missing_gets_it_sequenced_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let meta = super::super::fixture::group_meta();
    let mut now = 1_000;
    // A group committed with its marker, whose event never reached the log (written here
    // directly, as the commit of a change writes it).
    let conv = ConvId(crate::ids::GROUP_BIT | 0x77);
    let mut ch = super::state::GroupState::create(
        conv,
        UserId(1),
        "redo".into(),
        &[UserId(2)],
        Vec::new(),
        16,
        now,
    )
    .unwrap();
    meta.commit(&super::state::diff(conv, None, &mut ch.next))
        .unwrap();
    let mut s = open(dir.path(), meta.clone());
    // User 2's Sync loads the group: the event is sequenced (seq 1) and reaches it.
    let f = v1::Frame {
        request_id: 5,
        body: Some(Body::Sync(v1::Sync::default())),
    };
    s.handle_frame(ConnId(2), f, now);
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2)
            && matches!(&f.body, Some(Body::Deliver(d))
                if d.message.as_ref().is_some_and(|m| m.group_changed.is_some()))
    });
    assert!(!out.is_empty());
    settle(&mut s, &meta, conv, &mut now);
    assert_eq!(
        (joined_seq(&meta, conv, 1), joined_seq(&meta, conv, 2)),
        (Some(1), Some(1))
    );
    assert_eq!(s.index_last(conv), 1);
}

/// Drives `s` until the group record of `conv` has no marker.
fn settle(s: &mut Shard, meta: &MemMeta, conv: ConvId, now: &mut u64) {
    for _ in 0..2_000 {
        s.handle_rings(*now);
        s.handle_log_progress(*now);
        if s.poll_timeout().is_some_and(|t| t <= *now) {
            s.handle_tick(*now);
        }
        let _ = super::super::fixture::transmitted(s);
        if group_record(meta, conv)
            .settings
            .is_some_and(|st| st.pending.is_none())
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        *now += 1;
    }
    panic!("the marker was never cleared");
}

impl<L, I: MessageIndex, M> RouterShard<L, I, M> {
    /// The last seq the index (and the durable tail) has of `conv`.
    fn index_last(&self, conv: ConvId) -> u64 {
        let tail = self.sh.convs.get(conv).map_or(0, |c| c.seq.durable_seq);
        tail.max(self.sh.index.last_seq(conv.storage()).unwrap().0)
    }
}

#[test]
fn changes_of_one_group_are_carried_out_one_at_a_time_and_the_excess_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let meta = super::super::fixture::group_meta();
    let mut s = open(dir.path(), meta.clone());
    let mut now = 1_000;
    let conv = create(&mut s, &mut now);
    settle(&mut s, &meta, conv, &mut now);
    // From now on metadata jobs wait until the test runs them.
    type Held = Arc<std::sync::Mutex<Vec<Box<dyn FnOnce() + Send>>>>;
    let held: Held = Arc::default();
    let q = held.clone();
    s.set_meta_offload(Box::new(move |job| q.lock().unwrap().push(job)));
    let rename = |n: &str| {
        Body::UpdateGroup(v1::UpdateGroup {
            conversation_id: conv.0,
            name: Some(n.into()),
            ..v1::UpdateGroup::default()
        })
    };
    // group_changes_queued_max is 64 by default: one in progress, 64 waiting, then refused.
    for rid in 10..10 + 66 {
        let f = v1::Frame {
            request_id: rid,
            body: Some(rename(&format!("n{rid}"))),
        };
        s.handle_frame(ConnId(1), f, now);
    }
    let out = super::super::fixture::transmitted(&mut s);
    let refused: Vec<u64> = out
        .iter()
        .filter(|(_, f)| matches!(&f.body, Some(Body::Error(e)) if e.code == v1::ErrorCode::Overloaded as i32))
        .map(|(_, f)| f.request_id)
        .collect();
    assert_eq!(refused, [75]);
    assert_eq!(
        held.lock().unwrap().len(),
        1,
        "one change is committed at a time"
    );
    // Run the writer: each change is answered in order, one version after the other.
    let mut versions = Vec::new();
    for _ in 0..5_000 {
        let jobs: Vec<_> = held.lock().unwrap().drain(..).collect();
        for job in jobs {
            job();
        }
        s.handle_rings(now);
        s.handle_log_progress(now);
        for (_, f) in super::super::fixture::transmitted(&mut s) {
            if let Some(Body::GroupInfo(g)) = f.body {
                assert_eq!(g.name, format!("n{}", f.request_id));
                versions.push(g.version);
            }
        }
        if versions.len() == 65 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        now += 1;
    }
    assert_eq!(versions, (2..=66).collect::<Vec<_>>());
}

#[test]
fn a_group_id_already_taken_is_drawn_again() {
    let dir = tempfile::tempdir().unwrap();
    let meta = super::super::fixture::group_meta();
    let mut s = open(dir.path(), meta.clone());
    let mut now = 1_000;
    // The id this shard draws first at `now` belongs to a group already.
    let taken = super::Groups::default().draw(0, now);
    let mut other = super::state::GroupState::create(
        taken,
        UserId(2),
        "first".into(),
        &[],
        Vec::new(),
        16,
        now,
    )
    .unwrap();
    meta.commit(&super::state::diff(taken, None, &mut other.next))
        .unwrap();
    let conv = create(&mut s, &mut now);
    assert_ne!(conv, taken);
    assert!(conv.is_group());
    assert_eq!(
        group_record(&meta, taken).name,
        "first",
        "the taken group is untouched"
    );
    assert_eq!(group_record(&meta, conv).name, "g2");
}

/// Fails every `fdatasync` while set.
#[derive(Debug, Default)]
struct SyncFails(std::sync::atomic::AtomicBool);

impl starling_storage::log::FaultHook for SyncFails {
    fn before(&self, op: &starling_storage::log::IoOp<'_>) -> Option<starling_storage::log::Fault> {
        let on = self.0.load(std::sync::atomic::Ordering::SeqCst);
        matches!(op, starling_storage::log::IoOp::SyncData { .. } if on)
            .then(|| starling_storage::log::Fault::Fail(std::io::Error::from_raw_os_error(5)))
    }
}

/// The log fails while a group change's event is on its way to it: after the log is reopened
/// in place the requester hears STORAGE_FAILURE, and the change (committed to the metadata,
/// with its marker) gets its event sequenced again, right after the last durable seq; the
/// marker is cleared.
#[test]
fn a_group_change_whose_event_the_failed_log_lost_is_sequenced_again_after_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let meta = super::super::fixture::group_meta();
    let fails = Arc::new(SyncFails::default());
    let opts = ShardOptions {
        log: LogOptions {
            segment_bytes: 1 << 20,
            fault_hook: Some(fails.clone()),
            ..LogOptions::default()
        },
        ..ShardOptions::default()
    };
    let store = EmbeddedShard::open(dir.path(), opts.clone()).unwrap();
    let index: Arc<DenseIndex> = store.index().clone();
    let mut s = shard_over(ShardConfig::default(), store, index, meta.clone());
    let mut now = 1_000;
    let conv = create(&mut s, &mut now);
    settle(&mut s, &meta, conv, &mut now);
    assert_eq!(s.index_last(conv), 1);

    fails.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let f = v1::Frame {
        request_id: 40,
        body: Some(Body::UpdateGroup(v1::UpdateGroup {
            conversation_id: conv.0,
            name: Some("renamed".into()),
            ..v1::UpdateGroup::default()
        })),
    };
    s.handle_frame(ConnId(1), f, now);
    for _ in 0..2_000 {
        s.handle_rings(now);
        s.handle_log_progress(now);
        let _ = super::super::fixture::transmitted(&mut s);
        if s.failure().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        now += 1;
    }
    assert!(s.failure().is_some(), "the log failed");
    let mut failed = s.log_mut().detach_failed().unwrap();
    fails.0.store(false, std::sync::atomic::Ordering::SeqCst);
    let (store, _) = failed.reopen(opts).unwrap();
    let index = store.index().clone();
    drop(s.storage_recovered(store, index));
    let out = super::super::fixture::transmitted(&mut s);
    let answer: Vec<_> = out
        .iter()
        .filter(|(c, f)| *c == ConnId(1) && f.request_id == 40)
        .filter_map(|(_, f)| f.body.as_ref())
        .collect();
    assert!(
        matches!(answer[..], [Body::Error(e)] if e.code == v1::ErrorCode::StorageFailure as i32),
        "{answer:?}"
    );
    settle(&mut s, &meta, conv, &mut now);
    assert_eq!(s.index_last(conv), 2, "the change's event, once");
    assert_eq!(group_record(&meta, conv).name, "renamed");
}
