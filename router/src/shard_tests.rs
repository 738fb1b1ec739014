//! Unit tests of [`RouterShard`] over the embedded log and index and an in-memory metadata store,
//! driven as the gateway drives it: `handle_*` when something happened, `handle_tick` only once
//! [`RouterShard::poll_timeout`] is due.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::meta::{Group, Member, Role, User};
use starling_storage::{
    ConvId, DeviceId, EmbeddedShard, LogOptions, MemMeta, MetaBatch, MetadataStore as _,
    ShardOptions, TimestampMs, UserId,
};

use super::{ConnId, RouterShard, ShardConfig};
use crate::ids::GROUP_BIT;
use crate::ring::{Bell, Doorbell};

type Shard = RouterShard<EmbeddedShard, starling_storage::DenseIndex, MemMeta>;

struct NoBell;
impl Doorbell for NoBell {
    fn ring(&self) {}
}

const GROUP: u64 = GROUP_BIT | 5;

/// One shard; users 1 and 2 in group `GROUP`; user 1 on connection 1, user 2 on connection 2.
fn shard(dir: &std::path::Path, cfg: ShardConfig) -> (Shard, Arc<MemMeta>) {
    let meta = Arc::new(MemMeta::new());
    let mut b = MetaBatch::default();
    b.put(&Group {
        id: ConvId(u128::from(GROUP)),
        name: "g".into(),
        created_by: UserId(1),
        created_ms: TimestampMs(0),
        epoch: 0,
    });
    for u in [1, 2] {
        b.put(&User {
            id: UserId(u),
            phone_e164: String::new(),
            display_name: format!("user{u}"),
            password_hash: None,
            created_ms: TimestampMs(0),
        });
        b.add_member(&Member {
            group: ConvId(u128::from(GROUP)),
            user: UserId(u),
            role: Role::Member,
            joined_ms: TimestampMs(0),
        });
    }
    meta.commit(&b).unwrap();
    let opts = ShardOptions {
        log: LogOptions {
            segment_bytes: 1 << 20,
            ..LogOptions::default()
        },
        ..ShardOptions::default()
    };
    let store = EmbeddedShard::open(dir, opts).unwrap();
    let index = store.index().clone();
    let links = crate::grid(8, &[Bell::new(NoBell)]).pop().unwrap();
    let mut s = RouterShard::new(cfg, links, store, index, meta.clone());
    s.handle_conn_opened(ConnId(1), UserId(1), DeviceId(1), 0);
    s.handle_conn_opened(ConnId(2), UserId(2), DeviceId(1), 0);
    (s, meta)
}

/// Runs the shard as the gateway's driver does until `done` holds for a frame it emits (or
/// panics after a few seconds); returns every frame emitted meanwhile.
fn drive_until(
    s: &mut Shard,
    now: &mut u64,
    mut done: impl FnMut(ConnId, &v1::Frame) -> bool,
) -> Vec<(ConnId, v1::Frame)> {
    let mut out = Vec::new();
    for _ in 0..5_000 {
        s.handle_rings(*now);
        s.handle_log_progress(*now);
        if s.poll_timeout().is_some_and(|t| t <= *now) {
            s.handle_tick(*now);
        }
        let mut hit = false;
        while let Some(t) = s.poll_transmit() {
            let f = t.frame().expect("the router's frames decode");
            hit |= done(t.conn, &f);
            out.push((t.conn, f));
        }
        if hit {
            return out;
        }
        std::thread::sleep(Duration::from_millis(1));
        *now += 1;
    }
    panic!("never happened; got {out:?}");
}

fn send(s: &mut Shard, now: u64, rid: u64) {
    let f = v1::Frame {
        request_id: rid,
        body: Some(Body::Send(v1::Send {
            client_msg_id: Bytes::from(vec![rid as u8; 16]),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::ConversationId(GROUP)),
            }),
            content_type: "text/plain".into(),
            body: Bytes::from_static(b"hi"),
            ..v1::Send::default()
        })),
    };
    s.handle_frame(ConnId(1), f, now);
}

fn read_cursor(s: &mut Shard, now: u64, rid: u64, seq: u64) {
    let f = v1::Frame {
        request_id: rid,
        body: Some(Body::ReadCursor(v1::ReadCursor {
            conversation_id: GROUP,
            up_to_seq: seq,
        })),
    };
    s.handle_frame(ConnId(2), f, now);
}

fn answers(out: &[(ConnId, v1::Frame)], rid: u64) -> Vec<&Body> {
    out.iter()
        .filter(|(c, f)| *c == ConnId(2) && f.request_id == rid)
        .filter_map(|(_, f)| f.body.as_ref())
        .collect()
}

#[test]
fn a_cursor_request_whose_write_fails_is_answered_once_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, meta) = shard(dir.path(), ShardConfig::default());
    let mut now = 1_000;
    send(&mut s, now, 1);
    drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && matches!(f.body, Some(Body::SendAck(_)))
    });
    meta.set_fail_writes(true);
    read_cursor(&mut s, now, 7, 1);
    let mut out = drive_until(&mut s, &mut now, |_, f| f.request_id == 7);
    // The write keeps failing and is retried: no second answer meanwhile.
    for _ in 0..100 {
        s.handle_log_progress(now);
        s.handle_tick(now);
        while let Some(t) = s.poll_transmit() {
            out.push((t.conn, t.frame().unwrap()));
        }
        now += 5;
    }
    let got = answers(&out, 7);
    assert_eq!(got.len(), 1, "{got:?}");
    let Body::Error(e) = got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(e.code, ErrorCode::StorageFailure as i32);
    assert!(e.message.contains("not recorded"), "{}", e.message);
    // The store recovers: the retried cursor lands (the read receipt goes out); the request
    // sent again is answered Done.
    meta.set_fail_writes(false);
    read_cursor(&mut s, now, 8, 1);
    let out = drive_until(&mut s, &mut now, |_, f| f.request_id == 8);
    assert!(matches!(answers(&out, 8)[..], [Body::Done(_)]), "{out:?}");
    assert!(answers(&out, 7).is_empty());
}

#[test]
fn idle_conversations_are_evicted_when_ticked_only_at_poll_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        conv_idle_evict_ms: 50,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    send(&mut s, now, 1);
    drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && matches!(f.body, Some(Body::SendAck(_)))
    });
    assert_eq!(s.loaded_conversations(), 1);
    // Nothing happens but time: the gateway ticks when poll_timeout says so.
    for _ in 0..2_000 {
        if s.loaded_conversations() == 0 {
            break;
        }
        s.handle_log_progress(now);
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_tick(now);
        }
        std::thread::sleep(Duration::from_millis(1));
        now += 1;
    }
    assert_eq!(s.loaded_conversations(), 0, "never evicted");
    assert_eq!(s.stats().convs_evicted, 1);
    // With nothing loaded, nothing is due.
    assert_eq!(s.poll_timeout(), None);
}

/// Large bodies fill a batch long before `batch_entries_max` entries do: the open batch is
/// submitted once it holds `batch_bytes_max` and never grows past `open_bytes_max` (a batch is one
/// log record, which has a size limit; a batch over it once failed the shard's log). Sends over
/// the cap are refused with OVERLOADED, and everything accepted is acknowledged.
#[test]
fn large_bodies_never_make_a_batch_larger_than_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        batch_bytes_max: 256 * 1024,
        open_bytes_max: 512 * 1024,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    // 40 sends of 60 KiB in one burst (2.4 MB: more than the test log's 1 MiB segments hold in
    // one record), before the driver runs.
    for rid in 1..=40u64 {
        let f = v1::Frame {
            request_id: rid,
            body: Some(Body::Send(v1::Send {
                client_msg_id: Bytes::from(vec![rid as u8; 16]),
                to: Some(v1::Recipient {
                    target: Some(v1::recipient::Target::ConversationId(GROUP)),
                }),
                content_type: "application/octet-stream".into(),
                body: Bytes::from(vec![rid as u8; 60 * 1024]),
                ..v1::Send::default()
            })),
        };
        s.handle_frame(ConnId(1), f, now);
    }
    let mut acked = std::collections::BTreeMap::new();
    let mut overloaded = 0;
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && f.request_id != 0 && {
            match &f.body {
                Some(Body::SendAck(a)) => {
                    acked.insert(f.request_id, a.seq);
                }
                Some(Body::Error(e)) => {
                    assert_eq!(e.code, ErrorCode::Overloaded as i32, "{e:?}");
                    overloaded += 1;
                }
                other => panic!("{other:?}"),
            }
            acked.len() + overloaded == 40
        }
    });
    assert!(s.failure().is_none(), "{:?}", s.failure());
    assert!(!out.is_empty());
    assert!(acked.len() >= 8, "{acked:?}");
    // Seqs are contiguous from 1 in the order the accepted sends arrived.
    let seqs: Vec<u64> = acked.values().copied().collect();
    assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>());
}
