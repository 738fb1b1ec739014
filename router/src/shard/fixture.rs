//! A shard for unit tests, over the embedded log and index (or a log the test holds) and an
//! in-memory metadata store, driven as the gateway drives it: `handle_*` when something
//! happened, `handle_tick` only once [`RouterShard::poll_timeout`] is due.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use starling_protocol::v1::{self, frame::Body};
use starling_storage::meta::{Group, Member, Role, User};
use starling_storage::{
    CursorStore, DenseIndex, DeviceId, DurableLog, EmbeddedShard, LogOptions, MemMeta,
    MessageIndex, MetaBatch, MetadataStore, ShardOptions, TimestampMs, UserId,
};

use super::{RouterShard, ShardConfig, ShardMsg};
use crate::grid::ShardLinks;
use crate::ids::{ConnId, ConvId, GROUP_BIT};
use crate::ring::{Bell, Doorbell};

/// A shard over the embedded storage.
pub(super) type Shard = RouterShard<EmbeddedShard, DenseIndex, MemMeta>;

struct NoBell;
impl Doorbell for NoBell {
    fn ring(&self) {}
}

/// The group of users 1 and 2.
pub(super) const GROUP: ConvId = ConvId(GROUP_BIT | 5);

/// Users 1 and 2 ("user1", "user2"), members of [`GROUP`] ("g").
pub(super) fn group_meta() -> Arc<MemMeta> {
    let meta = Arc::new(MemMeta::new());
    let mut b = MetaBatch::default();
    b.put(&Group {
        id: GROUP.storage(),
        name: "g".into(),
        created_by: UserId(1),
        created_ms: TimestampMs(0),
        epoch: 0,
        settings: None,
    });
    for u in [1, 2] {
        b.put(&User {
            id: UserId(u),
            phone_e164: String::new(),
            display_name: format!("user{u}"),
            password_hash: None,
            created_ms: TimestampMs(0),
            account: None,
        });
        b.add_member(&Member {
            group: GROUP.storage(),
            user: UserId(u),
            role: Role::Member,
            joined_ms: TimestampMs(0),
            joined_seq: None,
        });
    }
    meta.commit(&b).expect("an in-memory commit");
    meta
}

/// The links of the only shard of a one-shard grid.
pub(super) fn one_shard_links() -> ShardLinks<ShardMsg> {
    crate::grid(8, &[Bell::new(NoBell)])
        .pop()
        .expect("one shard")
}

/// One shard over `log` and `index`; user 1 on connection 1, user 2 on connection 2.
pub(super) fn shard_over<L, I, M>(
    cfg: ShardConfig,
    log: L,
    index: Arc<I>,
    meta: Arc<M>,
) -> RouterShard<L, I, M>
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let mut s = RouterShard::new(cfg, one_shard_links(), log, index, meta);
    s.handle_conn_opened(ConnId(1), UserId(1), DeviceId(1), 0);
    s.handle_conn_opened(ConnId(2), UserId(2), DeviceId(1), 0);
    s
}

/// One shard over the embedded storage in `dir`, with [`group_meta`]; user 1 on connection 1,
/// user 2 on connection 2.
pub(super) fn shard(dir: &std::path::Path, cfg: ShardConfig) -> (Shard, Arc<MemMeta>) {
    let meta = group_meta();
    let opts = ShardOptions {
        log: LogOptions {
            segment_bytes: 1 << 20,
            ..LogOptions::default()
        },
        ..ShardOptions::default()
    };
    let store = EmbeddedShard::open(dir, opts).expect("a fresh shard opens");
    let index = store.index().clone();
    (shard_over(cfg, store, index, meta.clone()), meta)
}

/// Every frame the shard has for its connections now.
pub(super) fn transmitted<L, I, M>(s: &mut RouterShard<L, I, M>) -> Vec<(ConnId, v1::Frame)>
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    std::iter::from_fn(|| s.poll_transmit())
        .map(|t| (t.conn, t.frame().expect("the router's frames decode")))
        .collect()
}

/// Runs the shard as the gateway's driver does until `done` holds for a frame it emits (or
/// panics after a few seconds); returns every frame emitted meanwhile.
pub(super) fn drive_until(
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
        let got = transmitted(s);
        let hit = got.iter().fold(false, |hit, (c, f)| done(*c, f) | hit);
        out.extend(got);
        if hit {
            return out;
        }
        std::thread::sleep(Duration::from_millis(1));
        *now += 1;
    }
    panic!("never happened; got {out:?}");
}

/// A Send of `body` to `to`, with a `client_msg_id` of 16 times `cmid`.
pub(super) fn send_frame(rid: u64, cmid: u8, to: v1::recipient::Target, body: &[u8]) -> v1::Frame {
    v1::Frame {
        request_id: rid,
        body: Some(Body::Send(v1::Send {
            client_msg_id: Bytes::from(vec![cmid; 16]),
            to: Some(v1::Recipient { target: Some(to) }),
            content_type: "text/plain".into(),
            body: Bytes::copy_from_slice(body),
            ..v1::Send::default()
        })),
    }
}

/// User 1 sends "hi" to [`GROUP`] as request `rid` (its `client_msg_id` made of `rid`).
pub(super) fn send<L, I, M>(s: &mut RouterShard<L, I, M>, now: u64, rid: u64)
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let to = v1::recipient::Target::ConversationId(GROUP.0);
    s.handle_frame(ConnId(1), send_frame(rid, rid as u8, to, b"hi"), now);
}

/// User 1 sends "hi" to [`GROUP`] as requests `rids`; returns once the last is answered (its
/// SendAck goes out once it is durable).
pub(super) fn sent(s: &mut Shard, now: &mut u64, rids: std::ops::RangeInclusive<u64>) {
    let last = *rids.end();
    for rid in rids {
        send(s, *now, rid);
    }
    drive_until(s, now, |c, f| c == ConnId(1) && f.request_id == last);
}

/// User 2 reads [`GROUP`] up to `seq`, as request `rid`.
pub(super) fn read_cursor(s: &mut Shard, now: u64, rid: u64, seq: u64) {
    let f = v1::Frame {
        request_id: rid,
        body: Some(Body::ReadCursor(v1::ReadCursor {
            conversation_id: GROUP.0,
            up_to_seq: seq,
        })),
    };
    s.handle_frame(ConnId(2), f, now);
}

/// The answers connection `conn` got to request `rid`.
pub(super) fn answers(out: &[(ConnId, v1::Frame)], conn: ConnId, rid: u64) -> Vec<&Body> {
    out.iter()
        .filter(|(c, f)| *c == conn && f.request_id == rid)
        .filter_map(|(_, f)| f.body.as_ref())
        .collect()
}
