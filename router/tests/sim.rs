//! Deterministic simulation of router + sequencer + storage in one thread (DESIGN.md "Testing";
//! TigerBeetle's VOPR in spirit): simulated clock, seeded lossy network, a faulty in-memory disk
//! (writes buffered until sync, sync failures that poison the log, crashes that drop unsynced
//! data and tear the last record), a metadata store that fails every write for a while, a
//! metadata writer that runs its jobs whenever the world decides (odd seeds), and simulated
//! clients that behave like the SDK (outbox retried under the same client_msg_id until SendAck,
//! per-conversation stores ordered by seq, cumulative DeliveryAck, Sync on reconnect and on
//! MessagesAvailable), now and then react to a message they hold (a change entry, sequenced,
//! acknowledged and delivered like a message) and block or unblock each other.
//!
//! Invariants, checked after every step (and after every recovery):
//! - a SendAck or Deliver is only ever issued for a message the disk has synced;
//! - no acknowledged message is lost by a crash; recovered seqs are contiguous from 1;
//! - one seq per client_msg_id, one message per (conversation, seq), as seen by every device;
//! - durable cursors never move backwards; receipts never run ahead of durable cursors;
//! - every Send, DeliveryAck, ReadCursor, Block and Unblock gets exactly one answer per copy the
//!   network delivered (while its connection lives), and a failed write answers with an Error;
//! - once a blocker got Done for a Block, no Send the blocked user makes afterwards (until an
//!   Unblock is sent) is accepted;
//! - at the end (faults off, everyone unblocks, reconnects and syncs): every device holds every
//!   message of each of its conversations exactly once, in order, and every send was
//!   acknowledged.
//!
//! `STARLING_SIM_SEEDS=N` runs N seeds (default 2500); `STARLING_SIM_SEED=S` replays one seed.
//! A failure prints the seed that reproduces it.
#![allow(clippy::disallowed_methods)] // the seed base may come from the clock

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message as _;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_router::ids::{self, GROUP_BIT};
use starling_router::ring::{Bell, Doorbell};
use starling_router::{
    ConnId, RouterShard, STORAGE_NOT_STORED, STORAGE_OUTCOME_UNKNOWN, STORAGE_SHARD_FAILED,
    ShardConfig, grid,
};
use starling_storage::format::{decode_record, encode_record};
use starling_storage::meta::{Block, DirectConv, Group, Member, Role, User, keys};
use starling_storage::{
    ClientMsgId, Completion, CompletionSource, ConvId, CursorStore, DeviceId, DurableLog, Entry,
    Level, LogError, Lsn, MemMeta, MessageIndex, MetaBatch, MetadataStore, Seq, StorageError,
    TimestampMs, UserId,
};

// ---------------------------------------------------------------------------------------------
// seeded randomness

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

// ---------------------------------------------------------------------------------------------
// the node

struct NoBell;
impl Doorbell for NoBell {
    fn ring(&self) {}
}

type Shard = RouterShard<SimLog, SimIndex, MemMeta>;

/// Metadata writes handed off the shard thread, run whenever the world decides.
type Jobs = Rc<RefCell<VecDeque<Box<dyn FnOnce() + Send>>>>;

struct Node {
    shards: Vec<Shard>,
    /// Some: the shards write metadata through an offload (the gateway's way); a crash drops
    /// the jobs not yet run.
    jobs: Option<Jobs>,
    /// Some (with `jobs`): the shards read storage through an offload too; the world runs the
    /// reads when and in what order it likes.
    reads: Option<Jobs>,
}

impl Node {
    /// Runs one of the reads handed off so far, chosen by `pick` among them (reads complete in
    /// any order); whether there was one.
    fn run_read(&self, pick: impl FnOnce(u64) -> u64) -> bool {
        let Some(reads) = &self.reads else {
            return false;
        };
        let job = {
            let mut q = reads.borrow_mut();
            if q.is_empty() {
                return false;
            }
            let i = pick(q.len() as u64) as usize;
            q.remove(i)
        };
        if let Some(job) = job {
            job();
        }
        true
    }

    /// Runs every read handed off so far, newest first (and those they lead to).
    fn run_reads(&self) {
        while self.run_read(|n| n - 1) {}
    }
}

fn cfg() -> ShardConfig {
    ShardConfig {
        batch_entries_max: 8,
        conn_outbound_bytes_max: 1200,
        slow_consumer_close_ms: 150,
        sync_messages_max: 6,
        cursor_flush_ms: 3,
        // Evict idle conversation states almost at once, so that every scenario and seed
        // reloads them from the index and the metadata again and again.
        conv_idle_evict_ms: 5,
        // Small enough that a burst of blocks meets the limit now and then.
        block_requests_per_s: 50,
        block_requests_burst: 2,
        ..ShardConfig::default()
    }
}

impl Node {
    fn start(disks: &[Arc<Mutex<Disk>>], meta: &Arc<MemMeta>) -> Node {
        Self::start_with(disks, meta, false)
    }

    fn start_with(disks: &[Arc<Mutex<Disk>>], meta: &Arc<MemMeta>, offload: bool) -> Node {
        Self::start_cfg(disks, meta, offload, &cfg())
    }

    fn start_cfg(
        disks: &[Arc<Mutex<Disk>>],
        meta: &Arc<MemMeta>,
        offload: bool,
        cfg: &ShardConfig,
    ) -> Node {
        let jobs: Option<Jobs> = offload.then(Jobs::default);
        let reads: Option<Jobs> = offload.then(Jobs::default);
        let bells: Vec<_> = disks.iter().map(|_| Bell::new(NoBell)).collect();
        let links = grid(64, &bells);
        let shards = links
            .into_iter()
            .zip(disks)
            .map(|(l, d)| {
                let log = SimLog::recover(d.clone());
                let index = log.index.clone();
                let mut shard = RouterShard::new(cfg.clone(), l, log, index, meta.clone());
                if let Some(jobs) = &jobs {
                    let jobs = jobs.clone();
                    shard.set_meta_offload(Box::new(move |job| jobs.borrow_mut().push_back(job)));
                }
                if let Some(reads) = &reads {
                    let reads = reads.clone();
                    shard.set_read_offload(Box::new(move |job| reads.borrow_mut().push_back(job)));
                }
                shard
            })
            .collect();
        Node {
            shards,
            jobs,
            reads,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the clients

#[derive(Clone)]
struct Outgoing {
    cmid: [u8; 16],
    to: v1::recipient::Target,
    body: Bytes,
    /// A reaction to an earlier message instead of a message (`Send.change`).
    change: Option<Box<v1::MessageChange>>,
    /// A Send carrying it was handed to a connection (later ones are not first attempts).
    written: bool,
}

struct Device {
    user: u64,
    device: u32,
    slow: bool,
    conn: Option<(usize, ConnId)>,
    downlink: VecDeque<v1::Frame>,
    outbox: Vec<Outgoing>,
    /// conv → seq → (cmid, body).
    store: BTreeMap<u64, BTreeMap<u64, ([u8; 16], Bytes)>>,
    acked_delivery: BTreeMap<u64, u64>,
    next_rid: u64,
    /// request id → client_msg_id of the Sends written on the current connection.
    sends: HashMap<u64, [u8; 16]>,
    sent: u64,
    syncing: bool,
    /// Requests that must get exactly one answer each (per copy the network delivered), by
    /// request id; forgotten when the connection breaks (its answers are lost with it).
    pending: HashMap<u64, Pending>,
}

/// A request waiting for its answer.
struct Pending {
    req: Req,
    /// The world's event count when it was sent.
    sent_at: u64,
    /// Answers still due (2 if the network duplicated the frame).
    answers: u32,
}

#[derive(Clone, Copy, Debug)]
enum Req {
    Send,
    Cursor,
    Block { peer: u64, block: bool },
}

impl Device {
    fn contiguous(&self, conv: u64) -> u64 {
        let mut n = 0;
        if let Some(m) = self.store.get(&conv) {
            for s in m.keys() {
                if *s == n + 1 {
                    n += 1;
                } else {
                    break;
                }
            }
        }
        n
    }
}

/// What a transport writes for `f` (the gateway reports these bytes with `handle_conn_flushed`).
fn encoded_len(f: &v1::Frame) -> u64 {
    let mut buf = bytes::BytesMut::new();
    starling_protocol::FrameEncoder::default()
        .encode(f, &mut buf)
        .expect("frames the router emits encode") as u64
}

// ---------------------------------------------------------------------------------------------
// the world

struct World {
    rng: Rng,
    now: u64,
    /// Metadata writes go through an offload (see `Node::start_with`).
    offload: bool,
    meta: Arc<MemMeta>,
    disks: Vec<Arc<Mutex<Disk>>>,
    node: Node,
    devices: Vec<Device>,
    users: Vec<u64>,
    group: u64,
    next_conn: u64,
    faults: bool,
    /// (conv, seq) → (cmid, body): everything the disks have synced.
    durable: BTreeMap<(u64, u64), ([u8; 16], Bytes)>,
    /// Acknowledged (conv, seq) → cmid.
    acked: BTreeMap<(u64, u64), [u8; 16]>,
    /// cmid → (conv, seq), as observed by any device.
    seq_of: HashMap<[u8; 16], (u64, u64)>,
    /// Sends answered "not stored" since the last restart (and not durable before): the next
    /// recovery must not find them.
    said_not_stored: Vec<[u8; 16]>,
    not_stored_checked: u64,
    cursors_seen: BTreeMap<(u64, u64, u32), u64>,
    convs: BTreeSet<u64>,
    restarts: u64,
    hints: u64,
    duplicates: u64,
    evicted: u64,
    reads_off_thread: u64,
    inline_reads: u64,
    closes: u64,
    /// Metadata writes fail until this (simulated) time.
    meta_fail_until: u64,
    /// Orders the client-side events the block invariant compares.
    events: u64,
    /// (blocker, blocked) → the event at which the blocker got `Done` for a Block that no
    /// Unblock sent since undoes: from then on no new Send of the blocked user to the blocker
    /// may be accepted.
    block_done: HashMap<(u64, u64), u64>,
    /// Users one of whose Block/Unblock requests was lost with its connection: it may still
    /// take effect at any time, so the block invariant is not checked for them any more.
    /// (Each user blocks and unblocks from its first device, one request at a time, so that
    /// their order of effect is the order they were sent in; requests from several devices or
    /// connections of one user are not ordered with each other.)
    blocks_in_doubt: BTreeSet<u64>,
    /// (blocker, blocked) → the event of the latest Unblock sent.
    unblock_sent: HashMap<(u64, u64), u64>,
    /// Cursor and Block requests answered with an Error (storage faults, limits).
    req_errors: u64,
    blocks_done: u64,
    /// Reactions queued (changes of earlier messages, sequenced like messages).
    reactions: u64,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let shards = 1 + rng.below(3) as usize;
        let meta = Arc::new(MemMeta::new());
        let users: Vec<u64> = (1..=2 + rng.below(3)).collect();
        let group = GROUP_BIT | 7;
        let mut b = MetaBatch::default();
        for &u in &users {
            b.put(&User {
                id: UserId(u),
                phone_e164: format!("+1555000{u}"),
                display_name: format!("user{u}"),
                password_hash: None,
                created_ms: TimestampMs(0),
                account: None,
            });
            if u == 1 || rng.chance(700) {
                b.add_member(&Member {
                    group: ids::ConvId(group).storage(),
                    user: UserId(u),
                    role: Role::Member,
                    joined_ms: TimestampMs(0),
                    joined_seq: None,
                });
            }
        }
        b.put(&Group {
            id: ids::ConvId(group).storage(),
            name: "sim".into(),
            created_by: UserId(1),
            created_ms: TimestampMs(0),
            epoch: 0,
            settings: None,
        });
        meta.commit(&b).unwrap();
        let disks: Vec<_> = (0..shards)
            .map(|_| Arc::new(Mutex::new(Disk::default())))
            .collect();
        // Odd seeds write metadata through an offload, even seeds synchronously.
        let offload = seed % 2 == 1;
        let node = Node::start_with(&disks, &meta, offload);
        let mut devices = Vec::new();
        for &u in &users {
            for d in 1..=1 + rng.below(2) as u32 {
                devices.push(Device {
                    user: u,
                    device: d,
                    slow: rng.chance(250),
                    conn: None,
                    downlink: VecDeque::new(),
                    outbox: Vec::new(),
                    store: BTreeMap::new(),
                    acked_delivery: BTreeMap::new(),
                    next_rid: 1,
                    sends: HashMap::new(),
                    sent: 0,
                    syncing: false,
                    pending: HashMap::new(),
                });
            }
        }
        let mut convs = BTreeSet::new();
        convs.insert(group);
        World {
            rng,
            now: 1_000,
            offload,
            meta,
            disks,
            node,
            devices,
            users,
            group,
            next_conn: 1,
            faults: true,
            durable: BTreeMap::new(),
            acked: BTreeMap::new(),
            seq_of: HashMap::new(),
            said_not_stored: Vec::new(),
            not_stored_checked: 0,
            cursors_seen: BTreeMap::new(),
            convs,
            restarts: 0,
            hints: 0,
            duplicates: 0,
            evicted: 0,
            reads_off_thread: 0,
            inline_reads: 0,
            closes: 0,
            meta_fail_until: 0,
            events: 0,
            block_done: HashMap::new(),
            blocks_in_doubt: BTreeSet::new(),
            unblock_sent: HashMap::new(),
            req_errors: 0,
            reactions: 0,
            blocks_done: 0,
        }
    }

    fn event(&mut self) -> u64 {
        self.events += 1;
        self.events
    }

    fn send_frame(&mut self, d: usize, body: Body) {
        let Some((shard, conn)) = self.devices[d].conn else {
            return;
        };
        let rid = self.devices[d].next_rid;
        self.devices[d].next_rid += 1;
        let f = v1::Frame {
            request_id: rid,
            body: Some(body),
        };
        if self.faults && self.rng.chance(5) {
            // Lost on the way: the connection breaks.
            self.disconnect(d);
            return;
        }
        let dup = self.faults && self.rng.chance(20);
        let req = match &f.body {
            Some(Body::Send(_)) => Some(Req::Send),
            Some(Body::DeliveryAck(_) | Body::ReadCursor(_)) => Some(Req::Cursor),
            Some(Body::Block(b)) => Some(Req::Block {
                peer: b.user_id,
                block: true,
            }),
            Some(Body::Unblock(b)) => Some(Req::Block {
                peer: b.user_id,
                block: false,
            }),
            _ => None,
        };
        if let Some(req) = req {
            let sent_at = self.event();
            let pending = Pending {
                req,
                sent_at,
                answers: 1 + u32::from(dup),
            };
            self.devices[d].pending.insert(rid, pending);
            if let Req::Block { peer, block: false } = req {
                // From now on the blocked user's sends may pass again.
                let pair = (self.devices[d].user, peer);
                self.block_done.remove(&pair);
                self.unblock_sent.insert(pair, sent_at);
            }
        }
        self.node.shards[shard].handle_frame(conn, f.clone(), self.now);
        if dup {
            self.node.shards[shard].handle_frame(conn, f, self.now);
        }
    }

    /// A frame the server wrote to device `d`, before the network reorders or duplicates it:
    /// every tracked request gets exactly one answer per copy sent, and the answers keep the
    /// block invariant.
    fn answered(&mut self, d: usize, f: &v1::Frame) {
        let rid = f.request_id;
        let answer = matches!(
            f.body,
            Some(Body::Done(_) | Body::SendAck(_) | Body::Error(_))
        );
        if rid == 0 || !answer {
            return;
        }
        let user = self.devices[d].user;
        let Some(p) = self.devices[d].pending.get_mut(&rid) else {
            assert!(
                !matches!(f.body, Some(Body::Done(_) | Body::SendAck(_))),
                "device {user}: request {rid} answered twice (or never asked): {f:?}"
            );
            return; // an Error answering a Sync, history or list request
        };
        p.answers -= 1;
        let (req, sent_at) = (p.req, p.sent_at);
        if p.answers == 0 {
            self.devices[d].pending.remove(&rid);
        }
        match (req, &f.body) {
            (Req::Send, Some(Body::SendAck(a))) => {
                if a.duplicate || ids::ConvId(a.conversation_id).is_group() {
                    return;
                }
                let dc = self
                    .meta
                    .get::<DirectConv>(&ids::ConvId(a.conversation_id).storage().0.to_be_bytes())
                    .unwrap()
                    .expect("an acknowledged direct conversation exists");
                let peer = if dc.low.0 == user {
                    dc.high.0
                } else {
                    dc.low.0
                };
                if let Some(&done) = self.block_done.get(&(peer, user))
                    && !self.blocks_in_doubt.contains(&peer)
                {
                    assert!(
                        sent_at < done,
                        "user {user}'s Send (event {sent_at}) was accepted after {peer} saw Done \
                         for blocking them (event {done})"
                    );
                }
            }
            (Req::Send, _) => {}
            (Req::Cursor, Some(Body::Done(_))) => {}
            (Req::Block { peer, block }, Some(Body::Done(_))) => {
                self.blocks_done += 1;
                let pair = (user, peer);
                let undone = self.unblock_sent.get(&pair).is_some_and(|&u| u > sent_at);
                if block && !undone {
                    let now = self.event();
                    self.block_done.entry(pair).or_insert(now);
                }
            }
            (Req::Cursor | Req::Block { .. }, Some(Body::Error(e))) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
                assert!(
                    matches!(
                        code,
                        ErrorCode::StorageFailure | ErrorCode::RateLimited | ErrorCode::Overloaded
                    ),
                    "unexpected error {code:?} for {req:?}: {}",
                    e.message
                );
                if code == ErrorCode::StorageFailure {
                    assert!(
                        e.message.contains("not recorded")
                            || e.message.contains("could not be made durable"),
                        "{}",
                        e.message
                    );
                }
                if code == ErrorCode::RateLimited {
                    assert!(e.retry_after_ms > 0);
                }
                self.req_errors += 1;
            }
            (req, body) => panic!("{req:?} answered with {body:?}"),
        }
    }

    fn connect(&mut self, d: usize) {
        if self.devices[d].conn.is_some() {
            return;
        }
        let shard = self.rng.below(self.node.shards.len() as u64) as usize;
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let (u, dev) = (self.devices[d].user, self.devices[d].device);
        self.node.shards[shard].handle_conn_opened(conn, UserId(u), DeviceId(dev), self.now);
        self.devices[d].conn = Some((shard, conn));
        self.sync(d);
        for o in self.devices[d].outbox.clone() {
            self.send_out(d, &o);
        }
    }

    fn sync(&mut self, d: usize) {
        let last_seq = self.devices[d]
            .store
            .keys()
            .map(|c| (*c, self.devices[d].contiguous(*c)))
            .collect();
        self.devices[d].syncing = true;
        self.send_frame(d, Body::Sync(v1::Sync { last_seq }));
    }

    fn disconnect(&mut self, d: usize) {
        if let Some((shard, conn)) = self.devices[d].conn.take() {
            self.node.shards[shard].handle_conn_closed(conn, self.now);
        }
        self.lose_pending(d);
        self.devices[d].downlink.clear();
        self.devices[d].sends.clear();
        self.devices[d].syncing = false;
    }

    /// The connection of device `d` is gone, and the answers to its requests with it.
    fn lose_pending(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        if dev
            .pending
            .values()
            .any(|p| matches!(p.req, Req::Block { .. }))
        {
            self.blocks_in_doubt.insert(dev.user);
        }
        dev.pending.clear();
    }

    fn send_out(&mut self, d: usize, o: &Outgoing) {
        // Like the SDK: only the very first write of a message says `first_attempt`; a frame
        // the network duplicates is still caught by the sequencer's in-memory dedup.
        let mut first_attempt = false;
        if self.devices[d].conn.is_some()
            && let Some(out) = self.devices[d].outbox.iter_mut().find(|x| x.cmid == o.cmid)
        {
            first_attempt = !out.written;
            out.written = true;
        }
        let rid = self.devices[d].next_rid;
        self.devices[d].sends.insert(rid, o.cmid);
        self.send_frame(
            d,
            Body::Send(v1::Send {
                client_msg_id: Bytes::copy_from_slice(&o.cmid),
                to: Some(v1::Recipient { target: Some(o.to) }),
                content_type: if o.change.is_some() {
                    String::new()
                } else {
                    "text/plain".into()
                },
                body: o.body.clone(),
                media: None,
                reply_to_seq: 0,
                first_attempt,
                change: o.change.clone(),
                set_timer: None,
            }),
        );
    }

    fn new_message(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        dev.sent += 1;
        let mut cmid = [0u8; 16];
        cmid[..8].copy_from_slice(&dev.user.to_le_bytes());
        cmid[8..12].copy_from_slice(&dev.device.to_le_bytes());
        cmid[12..].copy_from_slice(&(dev.sent as u32).to_le_bytes());
        let user = self.devices[d].user;
        let known: Vec<u64> = self.devices[d].store.keys().copied().collect();
        let to = if self.rng.chance(400) && self.is_member(self.group, user) {
            v1::recipient::Target::ConversationId(self.group)
        } else if !known.is_empty() && self.rng.chance(300) {
            // A conversation the device already knows, by id (direct or group).
            v1::recipient::Target::ConversationId(
                known[self.rng.below(known.len() as u64) as usize],
            )
        } else {
            let peer = self.users[self.rng.below(self.users.len() as u64) as usize];
            v1::recipient::Target::UserId(peer)
        };
        let mut body = Bytes::from(format!("m{:?}", &cmid[..]).into_bytes());
        let mut change = None;
        // Now and then a reaction to a message of a conversation the device knows (an entry
        // with a body: not a change), sequenced and delivered like a message.
        if let v1::recipient::Target::ConversationId(conv) = to
            && self.rng.chance(100)
        {
            let targets: Vec<u64> = self.devices[d]
                .store
                .get(&conv)
                .map(|m| {
                    m.iter()
                        .filter(|(_, (_, b))| !b.is_empty())
                        .map(|(&seq, _)| seq)
                        .collect()
                })
                .unwrap_or_default();
            if !targets.is_empty() {
                let target = targets[self.rng.below(targets.len() as u64) as usize];
                let emoji = ["👍", "🎉", ""][self.rng.below(3) as usize];
                body = Bytes::new();
                self.reactions += 1;
                change = Some(Box::new(v1::MessageChange {
                    kind: v1::ChangeKind::React as i32,
                    target_seq: target,
                    emoji: emoji.into(),
                }));
            }
        }
        let o = Outgoing {
            cmid,
            to,
            body,
            change,
            written: false,
        };
        self.devices[d].outbox.push(o.clone());
        self.send_out(d, &o);
    }

    // --- server side

    fn server_step(&mut self) {
        let n = self.node.shards.len();
        for s in 0..n {
            self.node.shards[s].handle_rings(self.now);
            let _ = self.node.shards[s].poll_timeout();
            if self.rng.chance(600) {
                let fail = self.faults && self.rng.chance(15);
                let synced = self.node.shards[s].log_mut().sim_sync(fail);
                for e in synced {
                    let conv = e.conv.0 as u64;
                    let m = starling_like_body(&e);
                    self.durable.insert((conv, e.seq.0), (e.client_msg_id.0, m));
                }
                // Half the time the router hears of a failure later (the log's wake-up is
                // asynchronous), and traffic goes on meanwhile: Sends sequenced then wait in
                // the open batch, which was never handed to the log.
                if fail && self.rng.chance(500) {
                    for d in 0..self.devices.len() {
                        if self.rng.chance(500) {
                            self.connect(d);
                            self.new_message(d);
                        }
                    }
                } else {
                    self.node.shards[s].handle_log_progress(self.now);
                }
            }
            if self.rng.chance(500) {
                let k = self.rng.below(4) as usize;
                self.node.shards[s].log_mut().apply_index(k);
            }
            if let Some(jobs) = &self.node.jobs
                && self.rng.chance(400)
            {
                // The metadata writer thread finishes a job.
                let job = jobs.borrow_mut().pop_front();
                if let Some(job) = job {
                    job();
                }
            }
            // The read threads finish some reads, in any order.
            while self.rng.chance(500) {
                let rng = &mut self.rng;
                if !self.node.run_read(|n| rng.below(n)) {
                    break;
                }
            }
            self.node.shards[s].handle_tick(self.now);
            while let Some(t) = self.node.shards[s].poll_transmit() {
                if let Some(d) = self
                    .devices
                    .iter()
                    .position(|d| d.conn == Some((s, t.conn)))
                {
                    self.devices[d]
                        .downlink
                        .push_back(t.frame().expect("the router's frames decode"));
                }
            }
            while let Some(c) = self.node.shards[s].poll_close() {
                assert_eq!(c.code, ErrorCode::SlowConsumer);
                self.closes += 1;
                if let Some(d) = self
                    .devices
                    .iter()
                    .position(|d| d.conn == Some((s, c.conn)))
                {
                    self.disconnect(d);
                }
            }
        }
    }

    fn crash(&mut self) {
        self.restarts += 1;
        self.add_stats();
        for d in 0..self.devices.len() {
            self.lose_pending(d);
            self.devices[d].conn = None;
            self.devices[d].downlink.clear();
            self.devices[d].sends.clear();
            self.devices[d].syncing = false;
        }
        let old = std::mem::replace(
            &mut self.node,
            Node {
                shards: Vec::new(),
                jobs: None,
                reads: None,
            },
        );
        for shard in old.shards {
            let log = shard_into_log(shard);
            log.crash(&mut self.rng);
        }
        self.node = Node::start_with(&self.disks, &self.meta, self.offload);
        // Recovery check: nothing acknowledged is lost; seqs are contiguous; limbo records that
        // did survive are now durable.
        let mut recovered = BTreeMap::new();
        for s in &self.node.shards {
            let ix = s.log().index.0.lock().unwrap();
            for ((conv, seq), e) in &ix.entries {
                recovered.insert(
                    (conv.0 as u64, *seq),
                    (e.client_msg_id.0, starling_like_body(e)),
                );
            }
        }
        for cmid in std::mem::take(&mut self.said_not_stored) {
            self.not_stored_checked += 1;
            assert!(
                recovered.values().all(|(c, _)| *c != cmid),
                "a Send answered \"not stored\" was stored"
            );
        }
        for ((conv, seq), cmid) in &self.acked {
            let got = recovered.get(&(*conv, *seq)).map(|x| x.0);
            assert_eq!(
                got,
                Some(*cmid),
                "acknowledged message {conv}/{seq} lost by a crash"
            );
        }
        for (k, v) in &self.durable {
            assert_eq!(
                recovered.get(k),
                Some(v),
                "synced entry {k:?} changed by a crash"
            );
        }
        let mut last: HashMap<u64, u64> = HashMap::new();
        for (conv, seq) in recovered.keys() {
            let l = last.entry(*conv).or_default();
            assert_eq!(
                *seq,
                *l + 1,
                "seqs of conversation {conv} not contiguous after recovery"
            );
            *l = *seq;
        }
        self.durable = recovered;
    }

    // --- client side

    fn client_read(&mut self, d: usize, max: usize) {
        let mut bytes = 0;
        let mut frames = Vec::new();
        for _ in 0..max {
            match self.devices[d].downlink.pop_front() {
                Some(f) => {
                    bytes += encoded_len(&f);
                    self.answered(d, &f);
                    frames.push(f);
                }
                None => break,
            }
        }
        if frames.is_empty() {
            return;
        }
        if self.faults && frames.len() > 1 && self.rng.chance(100) {
            let i = self.rng.below(frames.len() as u64 - 1) as usize;
            frames.swap(i, i + 1); // reordered (the SDK orders by seq anyway)
        }
        if self.faults && self.rng.chance(50) {
            let i = self.rng.below(frames.len() as u64) as usize;
            let f = frames[i].clone();
            frames.insert(i, f); // duplicated
        }
        if let Some((shard, conn)) = self.devices[d].conn {
            self.node.shards[shard].handle_conn_flushed(conn, bytes, self.now);
        }
        for f in frames {
            self.client_frame(d, f);
            if self.devices[d].conn.is_none() {
                return;
            }
        }
        // Cumulative acknowledgements for whatever became contiguous.
        let convs: Vec<u64> = self.devices[d].store.keys().copied().collect();
        for conv in convs {
            let c = self.devices[d].contiguous(conv);
            if c > self.devices[d]
                .acked_delivery
                .get(&conv)
                .copied()
                .unwrap_or(0)
            {
                self.devices[d].acked_delivery.insert(conv, c);
                self.send_frame(
                    d,
                    Body::DeliveryAck(v1::DeliveryAck {
                        conversation_id: conv,
                        up_to_seq: c,
                    }),
                );
                if self.rng.chance(300) {
                    self.send_frame(
                        d,
                        Body::ReadCursor(v1::ReadCursor {
                            conversation_id: conv,
                            up_to_seq: c,
                        }),
                    );
                }
            }
        }
    }

    fn store(&mut self, d: usize, conv: u64, seq: u64, cmid: [u8; 16], body: Bytes) {
        let who = (self.devices[d].user, self.devices[d].device);
        let Some(model) = self.durable.get(&(conv, seq)) else {
            panic!("device {who:?} got {conv}/{seq} which is not durable");
        };
        assert_eq!(
            model,
            &(cmid, body.clone()),
            "device {who:?}: {conv}/{seq} differs from the disk"
        );
        match self.seq_of.get(&cmid) {
            Some(&x) => assert_eq!(x, (conv, seq), "client_msg_id got two seqs"),
            None => {
                self.seq_of.insert(cmid, (conv, seq));
            }
        }
        self.convs.insert(conv);
        let m = self.devices[d].store.entry(conv).or_default();
        if let Some(old) = m.get(&seq) {
            assert_eq!(old, &(cmid, body.clone()), "two messages at {conv}/{seq}");
        }
        m.insert(seq, (cmid, body));
    }

    fn client_frame(&mut self, d: usize, f: v1::Frame) {
        let cmid_of_request = self.devices[d].sends.remove(&f.request_id);
        match f.body {
            Some(Body::Deliver(v1::Deliver { message: Some(m) })) => {
                let cmid: [u8; 16] = m.client_msg_id.as_ref().try_into().unwrap();
                self.store(d, m.conversation_id, m.seq, cmid, m.body);
            }
            Some(Body::SendAck(a)) => {
                let cmid: [u8; 16] = a.client_msg_id.as_ref().try_into().unwrap();
                let Some(pos) = self.devices[d].outbox.iter().position(|o| o.cmid == cmid) else {
                    // A duplicate ack for something already acknowledged.
                    assert_eq!(self.seq_of.get(&cmid), Some(&(a.conversation_id, a.seq)));
                    return;
                };
                let o = self.devices[d].outbox.remove(pos);
                assert!(
                    self.durable.contains_key(&(a.conversation_id, a.seq)),
                    "SendAck before the message was durable"
                );
                self.acked.insert((a.conversation_id, a.seq), cmid);
                self.store(d, a.conversation_id, a.seq, cmid, o.body);
            }
            Some(Body::Error(e)) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
                assert!(
                    matches!(
                        code,
                        ErrorCode::StorageFailure
                            | ErrorCode::Overloaded
                            | ErrorCode::Unavailable
                            | ErrorCode::Blocked
                            | ErrorCode::RateLimited
                    ),
                    "unexpected error {code:?}: {}",
                    e.message
                );
                if e.message == STORAGE_NOT_STORED
                    && let Some(cmid) = cmid_of_request
                    && !self.durable.values().any(|(c, _)| *c == cmid)
                {
                    self.said_not_stored.push(cmid);
                }
                // The outbox keeps the message; it is retried under the same client_msg_id (a
                // blocked one too: settle unblocks everyone). Cursor and Block answers were
                // checked in `answered`.
            }
            Some(Body::MessagesAvailable(m)) => {
                if m.up_to_seq > self.devices[d].contiguous(m.conversation_id)
                    && !self.devices[d].syncing
                {
                    self.sync(d);
                }
            }
            Some(Body::SyncDone(s)) => {
                self.devices[d].syncing = false;
                if !s.truncated.is_empty() {
                    self.sync(d);
                }
            }
            Some(Body::Receipt(r)) => {
                let conv = ConvId(u128::from(r.conversation_id));
                let durable = if r.kind == v1::ReceiptKind::Read as i32 {
                    self.meta.read_cursor(conv, UserId(r.by_user_id)).unwrap().0
                } else {
                    self.meta
                        .delivery_cursors(conv)
                        .unwrap()
                        .iter()
                        .filter(|c| c.user.0 == r.by_user_id)
                        .map(|c| c.seq.0)
                        .max()
                        .unwrap_or(0)
                };
                assert!(
                    r.up_to_seq <= durable,
                    "receipt ahead of the durable cursor"
                );
            }
            Some(Body::GroupReceipts(g)) => {
                // Counts only of durable cursors, never more than the recipients.
                let conv = ConvId(u128::from(g.conversation_id));
                let me = self.devices[d].user;
                let reads: Vec<u64> = self
                    .users
                    .iter()
                    .filter(|&&u| u != me)
                    .map(|&u| self.meta.read_cursor(conv, UserId(u)).unwrap().0)
                    .collect();
                let cursors = self.meta.delivery_cursors(conv).unwrap();
                let delivered: Vec<u64> = self
                    .users
                    .iter()
                    .filter(|&&u| u != me)
                    .zip(&reads)
                    .map(|(&u, &r)| {
                        cursors
                            .iter()
                            .filter(|c| c.user.0 == u)
                            .map(|c| c.seq.0)
                            .fold(r, u64::max)
                    })
                    .collect();
                for m in g.messages {
                    let at = |v: &[u64]| v.iter().filter(|&&s| s >= m.seq).count() as u32;
                    assert!(
                        m.read <= m.delivered && m.delivered <= m.recipients,
                        "{m:?}"
                    );
                    assert!(
                        m.delivered <= at(&delivered),
                        "counts ahead of durable cursors"
                    );
                    assert!(m.read <= at(&reads), "counts ahead of durable read cursors");
                }
            }
            Some(Body::Done(_)) => {}
            Some(Body::HistoryPage(p)) => {
                // A page is a contiguous, ascending run of durable messages.
                for w in p.messages.windows(2) {
                    assert_eq!(w[1].seq, w[0].seq + 1, "history page not contiguous");
                }
                for m in p.messages {
                    let cmid: [u8; 16] = m.client_msg_id.as_ref().try_into().unwrap();
                    let model = self.durable.get(&(p.conversation_id, m.seq));
                    assert_eq!(
                        model,
                        Some(&(cmid, m.body)),
                        "history differs from the disk"
                    );
                }
            }
            Some(Body::ConversationList(l)) => {
                for c in l.conversations {
                    let last = self
                        .durable
                        .range((c.conversation_id, 0)..=(c.conversation_id, u64::MAX))
                        .next_back()
                        .map_or(0, |(k, _)| k.1);
                    assert!(c.last_seq <= last, "list shows a seq that is not durable");
                    assert_eq!(c.last_message.map_or(0, |m| m.seq), c.last_seq);
                    assert!(self.is_member(c.conversation_id, self.devices[d].user));
                }
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }

    fn check_cursors(&mut self) {
        for &conv in &self.convs {
            for &u in &self.users {
                let r = self
                    .meta
                    .read_cursor(ids::ConvId(conv).storage(), UserId(u))
                    .unwrap()
                    .0;
                let prev = self
                    .cursors_seen
                    .insert((conv, u, u32::MAX), r)
                    .unwrap_or(0);
                assert!(r >= prev, "read cursor moved backwards");
            }
            for c in self
                .meta
                .delivery_cursors(ConvId(u128::from(conv)))
                .unwrap()
            {
                let k = (conv, c.user.0, c.device.0);
                let prev = self.cursors_seen.insert(k, c.seq.0).unwrap_or(0);
                assert!(c.seq.0 >= prev, "delivery cursor moved backwards");
                let last = self.durable.range((conv, 0)..=(conv, u64::MAX)).next_back();
                assert!(
                    c.seq.0 <= last.map_or(0, |(k, _)| k.1),
                    "cursor past the durable end"
                );
            }
        }
    }

    fn step(&mut self) {
        self.now += 1;
        if self.faults && self.rng.chance(8) {
            // The metadata store fails every write for a while (a full or failing disk).
            self.meta_fail_until = self.now + 1 + self.rng.below(25);
        }
        self.meta
            .set_fail_writes(self.faults && self.now < self.meta_fail_until);
        let d = self.rng.below(self.devices.len() as u64) as usize;
        match self.rng.below(100) {
            0..=9 => self.connect(d),
            10..=11 if self.faults => self.disconnect(d),
            12..=29 => {
                if self.devices[d].sent < 12 {
                    self.new_message(d);
                }
            }
            30..=32 => {
                if let Some(o) = self.devices[d].outbox.first().cloned() {
                    self.send_out(d, &o);
                }
            }
            66..=67 => {
                let known: Vec<u64> = self.devices[d].store.keys().copied().collect();
                if !known.is_empty() {
                    let conv = known[self.rng.below(known.len() as u64) as usize];
                    let anchor = match self.rng.below(3) {
                        0 => None,
                        1 => Some(v1::get_history::Anchor::BeforeSeq(1 + self.rng.below(20))),
                        _ => Some(v1::get_history::Anchor::AfterSeq(self.rng.below(20))),
                    };
                    let limit = self.rng.below(6) as u32;
                    self.send_frame(
                        d,
                        Body::GetHistory(v1::GetHistory {
                            conversation_id: conv,
                            anchor,
                            limit,
                        }),
                    );
                }
            }
            68 => self.send_frame(d, Body::ListConversations(v1::ListConversations::default())),
            69..=70 if self.faults => self.random_block(d),
            33..=64 => {
                if !self.devices[d].slow || self.rng.chance(100) {
                    let k = 1 + self.rng.below(6) as usize;
                    self.client_read(d, k);
                }
            }
            65 if self.faults && self.rng.chance(150) => self.crash(),
            _ => self.server_step(),
        }
        if self.node.shards.iter().any(|s| s.failure().is_some()) && self.rng.chance(300) {
            self.crash(); // the gateway restarts a shard whose log failed
        }
        self.check_cursors();
    }

    fn converged(&self) -> bool {
        self.blocks().is_empty()
            && self.devices.iter().all(|d| {
                d.outbox.is_empty()
                    && d.downlink.is_empty()
                    && d.conn.is_some()
                    && d.pending.is_empty()
            })
            && self.node.shards.iter().all(|s| s.log().unsynced.is_empty())
            && self.devices.iter().all(|d| {
                self.durable.keys().all(|(conv, seq)| {
                    !self.is_member(*conv, d.user)
                        || d.store.get(conv).is_some_and(|m| m.contains_key(seq))
                })
            })
    }

    /// Device `d`'s user blocks or unblocks another user, from their first device, once their
    /// last such request was answered.
    fn random_block(&mut self, d: usize) {
        let user = self.devices[d].user;
        let Some(d) = self.devices.iter().position(|x| x.user == user) else {
            return;
        };
        if self.devices[d]
            .pending
            .values()
            .any(|p| matches!(p.req, Req::Block { .. }))
        {
            return;
        }
        let others: Vec<u64> = self.users.iter().copied().filter(|u| *u != user).collect();
        let peer = others[self.rng.below(others.len() as u64) as usize];
        let body = if self.rng.chance(500) {
            Body::Block(v1::Block { user_id: peer })
        } else {
            Body::Unblock(v1::Unblock { user_id: peer })
        };
        self.send_frame(d, body);
    }

    /// (blocker, blocked) of every block in the metadata.
    fn blocks(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &u in &self.users {
            for b in self
                .meta
                .scan::<Block>(&keys::user(UserId(u)), 100)
                .unwrap()
            {
                out.push((b.user.0, b.blocked.0));
            }
        }
        out
    }

    /// Every blocker unblocks whom they block (once per pair until answered).
    fn unblock_all(&mut self) {
        for (blocker, peer) in self.blocks() {
            // One request of a user at a time, as in `random_block`.
            let asked = self.devices.iter().any(|dev| {
                dev.user == blocker
                    && dev
                        .pending
                        .values()
                        .any(|p| matches!(p.req, Req::Block { .. }))
            });
            if asked {
                continue;
            }
            if let Some(d) = self
                .devices
                .iter()
                .position(|dev| dev.user == blocker && dev.conn.is_some())
            {
                self.send_frame(d, Body::Unblock(v1::Unblock { user_id: peer }));
            }
        }
    }

    fn is_member(&self, conv: u64, user: u64) -> bool {
        self.meta
            .get::<Member>(&keys::member(ids::ConvId(conv).storage().0, UserId(user)))
            .unwrap()
            .is_some()
    }

    fn add_stats(&mut self) {
        for s in &self.node.shards {
            let st = s.stats();
            self.hints += st.hints;
            self.duplicates += st.duplicates;
            self.evicted += st.convs_evicted;
            if self.offload {
                self.reads_off_thread += st.reads_submitted;
                self.inline_reads += st.inline_reads;
            }
        }
    }

    /// Faults off; everyone reconnects, retries and syncs until nothing moves.
    fn settle(&mut self) {
        self.faults = false;
        self.meta.set_fail_writes(false);
        for s in &mut self.node.shards {
            s.handle_log_progress(self.now);
        }
        if self.node.shards.iter().any(|s| s.failure().is_some()) {
            self.crash();
        }
        for round in 0..40 {
            self.unblock_all();
            for d in 0..self.devices.len() {
                if self.devices[d].conn.is_none() {
                    self.connect(d);
                } else if round % 4 == 3 {
                    self.sync(d);
                    for o in self.devices[d].outbox.clone() {
                        self.send_out(d, &o);
                    }
                }
            }
            if round > 0 && self.converged() {
                break;
            }
            for _ in 0..12 {
                self.now += 1;
                for s in 0..self.node.shards.len() {
                    let synced = self.node.shards[s].log_mut().sim_sync(false);
                    for e in synced {
                        self.durable.insert(
                            (e.conv.0 as u64, e.seq.0),
                            (e.client_msg_id.0, starling_like_body(&e)),
                        );
                    }
                    self.node.shards[s].log_mut().apply_index(2);
                }
                if let Some(jobs) = &self.node.jobs {
                    let pending: Vec<_> = jobs.borrow_mut().drain(..).collect();
                    for job in pending {
                        job();
                    }
                }
                self.node.run_reads();
                self.server_step();
                for d in 0..self.devices.len() {
                    self.client_read(d, 64);
                }
                self.check_cursors();
            }
        }
        // Final: every send acknowledged; every device has every message of its conversations,
        // exactly once and in order.
        for dev in &self.devices {
            assert!(
                dev.outbox.is_empty(),
                "device {}/{} has unacknowledged sends",
                dev.user,
                dev.device
            );
        }
        let mut by_conv: BTreeMap<u64, Vec<(u64, [u8; 16])>> = BTreeMap::new();
        for ((conv, seq), (cmid, _)) in &self.durable {
            by_conv.entry(*conv).or_default().push((*seq, *cmid));
        }
        for (conv, entries) in &by_conv {
            for (i, (seq, _)) in entries.iter().enumerate() {
                assert_eq!(*seq, i as u64 + 1, "conversation {conv} has a gap");
            }
            let members: Vec<u64> = self
                .meta
                .scan::<Member>(&ids::ConvId(*conv).storage().0.to_be_bytes(), 100)
                .unwrap()
                .iter()
                .map(|m| m.user.0)
                .collect();
            for dev in self.devices.iter().filter(|d| members.contains(&d.user)) {
                let got: Vec<(u64, [u8; 16])> = dev
                    .store
                    .get(conv)
                    .map(|m| m.iter().map(|(s, (c, _))| (*s, *c)).collect())
                    .unwrap_or_default();
                assert_eq!(
                    &got, entries,
                    "device {}/{} misses messages of {conv}",
                    dev.user, dev.device
                );
            }
        }
        self.add_stats();
    }
}

fn starling_like_body(e: &Entry) -> Bytes {
    // The router stores an envelope (content type, reply_to, body); the client body is its tail.
    // A change (envelope version 3) has its kind, target and emoji before the body.
    let b = &e.body;
    let n = u16::from_le_bytes([b[0], b[1]]) as usize;
    let mut at = 2 + n + 8;
    if e.content_type == 3 {
        at += 1 + 8;
        at += 1 + b[at] as usize;
    }
    Bytes::copy_from_slice(&b[at..])
}

fn shard_into_log(mut shard: Shard) -> SimLog {
    // RouterShard owns its log; the sim takes it back to crash it.
    let empty = SimLog::recover(Arc::new(Mutex::new(Disk::default())));
    std::mem::replace(shard.log_mut(), empty)
}

#[derive(Default, Debug)]
struct Totals {
    acked: u64,
    restarts: u64,
    hints: u64,
    duplicates: u64,
    evicted: u64,
    /// Odd seeds (reads through an offload): reads run off the shard threads, and reads a
    /// shard thread made itself (none: the gate foresees every read these paths make).
    reads_off_thread: u64,
    inline_reads: u64,
    slow_closes: u64,
    /// Sends answered "not stored" whose absence a recovery checked.
    said_not_stored: u64,
    /// Cursor and Block requests answered with an Error (injected metadata faults, limits).
    req_errors: u64,
    /// Block/Unblock requests answered `Done`.
    blocks_done: u64,
    /// Reactions queued.
    reactions: u64,
}

fn run_seed(seed: u64, steps: usize) -> Totals {
    let mut w = World::new(seed);
    for _ in 0..steps {
        w.step();
    }
    w.settle();
    Totals {
        acked: w.acked.len() as u64,
        restarts: w.restarts,
        hints: w.hints,
        duplicates: w.duplicates,
        slow_closes: w.closes,
        evicted: w.evicted,
        reads_off_thread: w.reads_off_thread,
        inline_reads: w.inline_reads,
        said_not_stored: w.not_stored_checked,
        req_errors: w.req_errors,
        blocks_done: w.blocks_done,
        reactions: w.reactions,
    }
}

#[test]
fn simulation() {
    let steps = 400;
    if let Ok(s) = std::env::var("STARLING_SIM_SEED") {
        let seed: u64 = s.parse().expect("STARLING_SIM_SEED is a number");
        let t = run_seed(seed, steps);
        println!("seed {seed}: {t:?}");
        return;
    }
    let seeds: u64 = std::env::var("STARLING_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2500);
    let base = match std::env::var("STARLING_SIM_BASE") {
        Ok(s) => s.parse().expect("STARLING_SIM_BASE is a number"),
        Err(_) => 0,
    };
    let start = std::time::Instant::now();
    let mut total = Totals::default();
    for seed in base..base + seeds {
        let r = std::panic::catch_unwind(|| run_seed(seed, steps));
        match r {
            Ok(t) => {
                total.acked += t.acked;
                total.restarts += t.restarts;
                total.hints += t.hints;
                total.duplicates += t.duplicates;
                total.slow_closes += t.slow_closes;
                total.evicted += t.evicted;
                total.reads_off_thread += t.reads_off_thread;
                total.inline_reads += t.inline_reads;
                total.said_not_stored += t.said_not_stored;
                total.req_errors += t.req_errors;
                total.blocks_done += t.blocks_done;
                total.reactions += t.reactions;
            }
            Err(e) => {
                eprintln!("simulation failed; replay with STARLING_SIM_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds in {secs:.1}s ({:.0} seeds/s): {total:?}",
        seeds as f64 / secs
    );
    assert!(
        total.acked > seeds * 5
            && total.restarts > 0
            && total.hints > 0
            && total.duplicates > 0
            && total.evicted > 0
            && total.said_not_stored > 0
            && total.req_errors > 0
            && total.blocks_done > 0
            && total.reactions > 0
            && total.reads_off_thread > 0
    );
    assert_eq!(total.inline_reads, 0, "reads the gate did not foresee");
}

#[path = "sim/disappearing.rs"]
mod disappearing;
#[path = "sim/groups.rs"]
mod groups;
#[path = "sim/scenarios.rs"]
mod scenarios;
#[path = "sim/storage.rs"]
mod storage;

#[allow(unused_imports)]
use scenarios::*;
use storage::*;
