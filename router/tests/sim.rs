//! Deterministic simulation of router + sequencer + storage in one thread (DESIGN.md "Testing";
//! TigerBeetle's VOPR in spirit): simulated clock, seeded lossy network, a faulty in-memory disk
//! (writes buffered until sync, sync failures that poison the log, crashes that drop unsynced
//! data and tear the last record), a metadata store that fails every write for a while, a
//! metadata writer that runs its jobs whenever the world decides (odd seeds), and simulated
//! clients that behave like the SDK (outbox retried under the same client_msg_id until SendAck,
//! per-conversation stores ordered by seq, cumulative DeliveryAck, Sync on reconnect and on
//! MessagesAvailable) and now and then block or unblock each other.
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
// the faulty in-memory disk, log and index

/// What survives a crash: the synced bytes of one shard's log.
#[derive(Default)]
struct Disk {
    synced: Vec<u8>,
}

#[derive(Default)]
struct IndexState {
    entries: BTreeMap<(ConvId, u64), Entry>,
    dedup: HashMap<(ConvId, ClientMsgId), u64>,
    applied: Lsn,
}

#[derive(Default)]
struct SimIndex(Mutex<IndexState>);

impl SimIndex {
    fn apply(&self, records: &[Vec<u8>]) {
        let mut s = self.0.lock().unwrap();
        for r in records {
            let view = decode_record(r).expect("the sim encodes valid records");
            for e in view.entries().expect("valid entries") {
                if e.seq != Seq::NONE {
                    if !e.client_msg_id.is_none() {
                        s.dedup.insert((e.conv, e.client_msg_id), e.seq.0);
                    }
                    s.entries.insert((e.conv, e.seq.0), e);
                }
            }
            s.applied = view.last_lsn();
        }
    }
}

impl MessageIndex for SimIndex {
    fn latest(&self, conv: ConvId, limit: usize) -> Result<Vec<Entry>, StorageError> {
        self.before(conv, Seq(u64::MAX), limit)
    }
    fn before(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let s = self.0.lock().unwrap();
        let mut v: Vec<Entry> = s
            .entries
            .range((conv, 0)..(conv, seq.0))
            .rev()
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect();
        v.reverse();
        Ok(v)
    }
    fn after(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let s = self.0.lock().unwrap();
        Ok(s.entries
            .range((conv, seq.0.saturating_add(1))..=(conv, u64::MAX))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, StorageError> {
        Ok(self.0.lock().unwrap().entries.get(&(conv, seq.0)).cloned())
    }
    fn last_seq(&self, conv: ConvId) -> Result<Seq, StorageError> {
        let s = self.0.lock().unwrap();
        Ok(Seq(s
            .entries
            .range((conv, 0)..=(conv, u64::MAX))
            .next_back()
            .map_or(0, |(k, _)| k.1)))
    }
    fn dedup(&self, conv: ConvId, id: ClientMsgId) -> Result<Option<Seq>, StorageError> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .dedup
            .get(&(conv, id))
            .map(|s| Seq(*s)))
    }
    fn indexed_lsn(&self) -> Lsn {
        self.0.lock().unwrap().applied
    }
}

/// A `DurableLog` over a [`Disk`]: appends are buffered ("page cache") until `sim_sync`.
struct SimLog {
    disk: Arc<Mutex<Disk>>,
    unsynced: Vec<(Vec<u8>, Lsn)>,
    to_index: VecDeque<Vec<u8>>,
    index: Arc<SimIndex>,
    next_lsn: Lsn,
    src: CompletionSource,
}

impl DurableLog for SimLog {
    fn append<L: Level>(&mut self, entries: &[Entry]) -> Result<Completion<L>, LogError> {
        self.src.durable()?;
        if entries.is_empty() {
            return Err(LogError::InvalidBatch("empty batch"));
        }
        if self.unsynced.len() >= 64 {
            return Err(LogError::Busy {
                inflight_bytes: 0,
                limit_bytes: 0,
            });
        }
        let first = self.next_lsn;
        let last = Lsn(first.0 + entries.len() as u64 - 1);
        let mut bytes = Vec::new();
        encode_record(first, entries, &mut bytes);
        self.unsynced.push((bytes, last));
        self.next_lsn = Lsn(last.0 + 1);
        Ok(self.src.completion(first, last))
    }
    fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }
    fn durable_lsn(&self) -> Result<Lsn, LogError> {
        self.src.durable()
    }
}

impl SimLog {
    /// Recovers from `disk`: keeps every whole record, cuts a torn tail, rebuilds the index.
    fn recover(disk: Arc<Mutex<Disk>>) -> SimLog {
        let index = Arc::new(SimIndex::default());
        let mut last = Lsn::ZERO;
        {
            let mut d = disk.lock().unwrap();
            let mut pos = 0;
            let mut recs = Vec::new();
            while let Ok(view) = decode_record(&d.synced[pos..]) {
                last = view.last_lsn();
                recs.push(d.synced[pos..pos + view.total_bytes()].to_vec());
                pos += view.total_bytes();
            }
            d.synced.truncate(pos); // a torn tail is cut, never replayed
            index.apply(&recs);
        }
        SimLog {
            disk,
            unsynced: Vec::new(),
            to_index: VecDeque::new(),
            index,
            next_lsn: Lsn(last.0 + 1),
            src: CompletionSource::new(last, None),
        }
    }

    /// fdatasync: everything buffered becomes durable, or the sync fails and poisons the log
    /// (the buffered records stay in limbo: a crash may or may not persist them).
    fn sim_sync(&mut self, fail: bool) -> Vec<Entry> {
        if self.unsynced.is_empty() || self.src.durable().is_err() {
            return Vec::new();
        }
        if fail {
            self.src.fail(LogError::Io {
                op: "fdatasync",
                path: PathBuf::from("sim"),
                source: Arc::new(io::Error::other("injected fsync failure")),
            });
            return Vec::new();
        }
        let mut d = self.disk.lock().unwrap();
        let mut out = Vec::new();
        let mut last = Lsn::ZERO;
        for (bytes, l) in self.unsynced.drain(..) {
            d.synced.extend_from_slice(&bytes);
            out.extend(decode_record(&bytes).unwrap().entries().unwrap());
            self.to_index.push_back(bytes);
            last = l;
        }
        drop(d);
        self.src.advance(last, Some(last));
        out
    }

    /// The index catches up by up to `n` records (it lags the log).
    fn apply_index(&mut self, n: usize) {
        let recs: Vec<Vec<u8>> = (0..n).filter_map(|_| self.to_index.pop_front()).collect();
        self.index.apply(&recs);
    }

    /// A crash: unsynced records may persist as a prefix, the next one possibly torn.
    fn crash(self, rng: &mut Rng) {
        let mut d = self.disk.lock().unwrap();
        for (bytes, _) in &self.unsynced {
            match rng.below(3) {
                0 => d.synced.extend_from_slice(bytes),
                1 => {
                    let cut = rng.below(bytes.len() as u64) as usize;
                    d.synced.extend_from_slice(&bytes[..cut]);
                    break;
                }
                _ => break,
            }
        }
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
                shard
            })
            .collect();
        Node { shards, jobs }
    }
}

// ---------------------------------------------------------------------------------------------
// the clients

#[derive(Clone)]
struct Outgoing {
    cmid: [u8; 16],
    to: v1::recipient::Target,
    body: Bytes,
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
            closes: 0,
            meta_fail_until: 0,
            events: 0,
            block_done: HashMap::new(),
            blocks_in_doubt: BTreeSet::new(),
            unblock_sent: HashMap::new(),
            req_errors: 0,
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
                content_type: "text/plain".into(),
                body: o.body.clone(),
                media: None,
                reply_to_seq: 0,
                first_attempt,
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
        let body = Bytes::from(format!("m{:?}", &cmid[..]).into_bytes());
        let o = Outgoing {
            cmid,
            to,
            body,
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
    let b = &e.body;
    let n = u16::from_le_bytes([b[0], b[1]]) as usize;
    Bytes::copy_from_slice(&b[2 + n + 8..])
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
    slow_closes: u64,
    /// Sends answered "not stored" whose absence a recovery checked.
    said_not_stored: u64,
    /// Cursor and Block requests answered with an Error (injected metadata faults, limits).
    req_errors: u64,
    /// Block/Unblock requests answered `Done`.
    blocks_done: u64,
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
        said_not_stored: w.not_stored_checked,
        req_errors: w.req_errors,
        blocks_done: w.blocks_done,
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
                total.said_not_stored += t.said_not_stored;
                total.req_errors += t.req_errors;
                total.blocks_done += t.blocks_done;
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
    );
}

// ---------------------------------------------------------------------------------------------
// scenarios: one behaviour each, through the same node (frames in → frames out)

struct Harness {
    meta: Arc<MemMeta>,
    node: Node,
    now: u64,
    /// conn → shard.
    conns: HashMap<u64, usize>,
    out: HashMap<u64, Vec<v1::Frame>>,
    next_rid: u64,
    fail_next_sync: bool,
    /// Connections whose written bytes the harness does not report (slow readers).
    stalled: BTreeSet<u64>,
}

impl Harness {
    fn new(shards: usize, users: &[u64]) -> Harness {
        Harness::with(shards, users, false, &cfg())
    }

    /// `offload`: metadata writes wait in `node.jobs` until [`Harness::run_jobs`] runs them.
    fn with(shards: usize, users: &[u64], offload: bool, cfg: &ShardConfig) -> Harness {
        let meta = Arc::new(MemMeta::new());
        let mut b = MetaBatch::default();
        for &u in users {
            b.put(&User {
                id: UserId(u),
                phone_e164: format!("+1555000{u}"),
                display_name: format!("user{u}"),
                password_hash: None,
                created_ms: TimestampMs(0),
            });
        }
        meta.commit(&b).unwrap();
        let disks: Vec<_> = (0..shards)
            .map(|_| Arc::new(Mutex::new(Disk::default())))
            .collect();
        let node = Node::start_cfg(&disks, &meta, offload, cfg);
        Harness {
            meta,
            node,
            now: 1_000,
            conns: HashMap::new(),
            out: HashMap::new(),
            next_rid: 1,
            fail_next_sync: false,
            stalled: BTreeSet::new(),
        }
    }

    fn group(&self, id: u64, members: &[u64]) -> u64 {
        let conv = GROUP_BIT | id;
        let mut b = MetaBatch::default();
        b.put(&Group {
            id: ids::ConvId(conv).storage(),
            name: format!("group{id}"),
            created_by: UserId(members[0]),
            created_ms: TimestampMs(0),
            epoch: 0,
            settings: None,
        });
        for &u in members {
            b.add_member(&Member {
                group: ids::ConvId(conv).storage(),
                user: UserId(u),
                role: Role::Member,
                joined_ms: TimestampMs(0),
                joined_seq: None,
            });
        }
        self.meta.commit(&b).unwrap();
        conv
    }

    fn open(&mut self, conn: u64, user: u64, device: u32) {
        let shard = conn as usize % self.node.shards.len();
        self.conns.insert(conn, shard);
        self.node.shards[shard].handle_conn_opened(
            ConnId(conn),
            UserId(user),
            DeviceId(device),
            self.now,
        );
    }

    fn send(&mut self, conn: u64, body: Body) -> u64 {
        let rid = self.next_rid;
        self.next_rid += 1;
        let shard = self.conns[&conn];
        self.node.shards[shard].handle_frame(
            ConnId(conn),
            v1::Frame {
                request_id: rid,
                body: Some(body),
            },
            self.now,
        );
        rid
    }

    fn msg(&mut self, conn: u64, n: u32, to: v1::recipient::Target, body: &str) -> u64 {
        let mut cmid = [0u8; 16];
        cmid[..8].copy_from_slice(&conn.to_le_bytes());
        cmid[12..].copy_from_slice(&n.to_le_bytes());
        self.send(
            conn,
            Body::Send(v1::Send {
                client_msg_id: Bytes::copy_from_slice(&cmid),
                to: Some(v1::Recipient { target: Some(to) }),
                content_type: "text/plain".into(),
                body: Bytes::copy_from_slice(body.as_bytes()),
                media: None,
                reply_to_seq: 0,
                first_attempt: false,
            }),
        )
    }

    /// Runs every shard until nothing moves (logs sync, index catches up, cursors flush).
    fn run(&mut self) {
        for _ in 0..20 {
            self.now += 5;
            for s in 0..self.node.shards.len() {
                let shard = &mut self.node.shards[s];
                shard.handle_rings(self.now);
                let _ = shard.poll_timeout();
                let fail = std::mem::take(&mut self.fail_next_sync);
                let _ = shard.log_mut().sim_sync(fail);
                shard.log_mut().apply_index(100);
                shard.handle_log_progress(self.now);
                shard.handle_tick(self.now);
                while let Some(t) = shard.poll_transmit() {
                    if !self.stalled.contains(&t.conn.0) {
                        shard.handle_conn_flushed(t.conn, t.bytes.len() as u64, self.now);
                    }
                    let f = t.frame().expect("the router's frames decode");
                    self.out.entry(t.conn.0).or_default().push(f);
                }
            }
        }
    }

    fn take(&mut self, conn: u64) -> Vec<v1::Frame> {
        self.out.remove(&conn).unwrap_or_default()
    }

    /// The metadata writer runs every job handed to it so far, in order.
    fn run_jobs(&mut self) -> usize {
        let jobs: Vec<_> = match &self.node.jobs {
            Some(j) => j.borrow_mut().drain(..).collect(),
            None => Vec::new(),
        };
        let n = jobs.len();
        for job in jobs {
            job();
        }
        n
    }

    /// The answer to request `rid` among `frames`.
    fn answer(frames: &[v1::Frame], rid: u64) -> Option<&Body> {
        let mut it = frames.iter().filter(|f| f.request_id == rid);
        let first = it.next()?;
        assert!(it.next().is_none(), "request {rid} answered twice");
        first.body.as_ref()
    }
}

fn error_code(f: &v1::Frame) -> Option<ErrorCode> {
    match &f.body {
        Some(Body::Error(e)) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

fn seqs(frames: &[v1::Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(Body::Deliver(v1::Deliver { message: Some(m) })) => Some(m.seq),
            _ => None,
        })
        .collect()
}

fn ack(frames: &[v1::Frame], rid: u64) -> Option<v1::SendAck> {
    frames.iter().find_map(|f| match &f.body {
        Some(Body::SendAck(a)) if f.request_id == rid => Some(a.clone()),
        _ => None,
    })
}

use v1::recipient::Target;

#[test]
fn bad_sends_get_typed_errors_and_never_an_ack() {
    let mut h = Harness::new(2, &[1, 2, 3]);
    h.open(10, 1, 1);
    let g = h.group(9, &[2, 3]);
    let short = h.send(
        10,
        Body::Send(v1::Send {
            client_msg_id: Bytes::from_static(&[1; 15]),
            to: Some(v1::Recipient {
                target: Some(Target::UserId(2)),
            }),
            ..v1::Send::default()
        }),
    );
    let big = h.send(
        10,
        Body::Send(v1::Send {
            client_msg_id: Bytes::from_static(&[1; 16]),
            to: Some(v1::Recipient {
                target: Some(Target::UserId(2)),
            }),
            body: Bytes::from(vec![0u8; cfg().body_bytes_max + 1]),
            ..v1::Send::default()
        }),
    );
    let nobody = h.msg(10, 1, Target::UserId(77), "x");
    let outsider = h.msg(10, 2, Target::ConversationId(g), "x");
    let unknown = h.msg(10, 3, Target::ConversationId(GROUP_BIT | 1234), "x");
    h.run();
    let out = h.take(10);
    let code = |rid| {
        out.iter()
            .find(|f| f.request_id == rid)
            .and_then(error_code)
    };
    assert_eq!(code(short), Some(ErrorCode::InvalidArgument));
    assert_eq!(code(big), Some(ErrorCode::BodyTooLarge));
    assert_eq!(code(nobody), Some(ErrorCode::NotFound));
    assert_eq!(code(outsider), Some(ErrorCode::NotAMember));
    assert_eq!(code(unknown), Some(ErrorCode::NotFound));
    assert!(
        out.iter()
            .all(|f| !matches!(f.body, Some(Body::SendAck(_))))
    );
}

#[test]
fn a_blocked_sender_is_refused_until_unblocked() {
    let mut h = Harness::new(2, &[1, 2]);
    h.open(10, 1, 1);
    h.open(21, 2, 1);
    let first = h.msg(10, 1, Target::UserId(2), "hi");
    h.run();
    assert!(ack(&h.take(10), first).is_some());
    let blk = h.send(21, Body::Block(v1::Block { user_id: 1 }));
    h.run();
    assert!(matches!(
        h.take(21)
            .iter()
            .find(|f| f.request_id == blk)
            .and_then(|f| f.body.as_ref()),
        Some(Body::Done(_))
    ));
    let refused = h.msg(10, 2, Target::UserId(2), "hello?");
    h.run();
    let out = h.take(10);
    let err = out.iter().find(|f| f.request_id == refused).unwrap();
    assert_eq!(error_code(err), Some(ErrorCode::Blocked));
    assert!(seqs(&h.take(21)).is_empty(), "nothing reached the blocker");
    // The blocker can still write to the blocked user.
    let back = h.msg(21, 3, Target::UserId(1), "no");
    h.run();
    assert_eq!(ack(&h.take(21), back).map(|a| a.seq), Some(2));
    h.send(21, Body::Unblock(v1::Unblock { user_id: 1 }));
    let again = h.msg(10, 2, Target::UserId(2), "hello?");
    h.run();
    assert_eq!(ack(&h.take(10), again).map(|a| a.seq), Some(3));
}

/// The message of the `STORAGE_FAILURE` answering request `rid`.
fn storage_failure(frames: &[v1::Frame], rid: u64) -> String {
    match frames
        .iter()
        .find(|f| f.request_id == rid)
        .and_then(|f| f.body.clone())
    {
        Some(Body::Error(e)) if e.code == ErrorCode::StorageFailure as i32 => e.message,
        other => panic!("request {rid}: expected STORAGE_FAILURE, got {other:?}"),
    }
}

/// Every message of `conv` as (seq, body), read by connection 11.
fn history_of(h: &mut Harness, conv: u64) -> Vec<(u64, Vec<u8>)> {
    let page = h.send(
        11,
        Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            anchor: None,
            limit: 10,
        }),
    );
    h.run();
    let out = h.take(11);
    let Some(Body::HistoryPage(p)) = out
        .iter()
        .find(|f| f.request_id == page)
        .and_then(|f| f.body.clone())
    else {
        panic!("no history page: {out:?}");
    };
    p.messages
        .iter()
        .map(|m| (m.seq, m.body.to_vec()))
        .collect()
}

#[test]
fn a_failed_fsync_tells_each_sender_the_truth_and_retries_after_restart_resolve_it() {
    let mut outcomes = BTreeSet::new();
    for seed in 0..16 {
        let mut h = Harness::new(1, &[1, 2]);
        h.open(10, 1, 1);
        let ok = h.msg(10, 1, Target::UserId(2), "one");
        h.run();
        let conv = ack(&h.take(10), ok).unwrap().conversation_id;
        // "two" is handed to the log and its fdatasync fails; "three" is sequenced before the
        // router hears of it, so it is still in the open batch; "four" comes after.
        let in_flight = h.msg(10, 2, Target::UserId(2), "two");
        h.node.shards[0].flush();
        let _ = h.node.shards[0].log_mut().sim_sync(true);
        let open = h.msg(10, 3, Target::UserId(2), "three");
        h.run();
        let out = h.take(10);
        assert_eq!(storage_failure(&out, in_flight), STORAGE_OUTCOME_UNKNOWN);
        assert_eq!(storage_failure(&out, open), STORAGE_NOT_STORED);
        assert!(h.node.shards[0].failure().is_some());
        let refused = h.msg(10, 4, Target::UserId(2), "four");
        h.run();
        assert_eq!(storage_failure(&h.take(10), refused), STORAGE_SHARD_FAILED);

        // Restart: the in-flight record may or may not have reached the disk (the seed
        // decides); what was said not to be stored is not; the retries (same client_msg_ids,
        // first_attempt = false) resolve every message to exactly one seq.
        let disks: Vec<_> = h.node.shards.iter().map(|s| s.log().disk.clone()).collect();
        let mut rng = Rng(seed);
        for s in std::mem::take(&mut h.node.shards) {
            shard_into_log(s).crash(&mut rng);
        }
        h.node = Node::start(&disks, &h.meta);
        h.conns.clear();
        h.open(10, 1, 1);
        h.open(11, 1, 1);
        let before = history_of(&mut h, conv);
        assert_eq!(before[0], (1, b"one".to_vec()));
        assert!(
            before.iter().all(|(_, b)| b != b"three" && b != b"four"),
            "a message said not to be stored is: {before:?}"
        );
        outcomes.insert(before.len());
        let mut acks = Vec::new();
        for (n, body) in [(2, "two"), (3, "three"), (4, "four")] {
            let rid = h.msg(10, n, Target::UserId(2), body);
            h.run();
            acks.push(ack(&h.take(10), rid).unwrap());
        }
        assert_eq!(acks[0].seq, 2);
        assert_eq!(acks[0].duplicate, before.len() == 2, "seed {seed}");
        assert_eq!((acks[1].seq, acks[2].seq), (3, 4));
        assert!(!acks[1].duplicate && !acks[2].duplicate);
        let after: Vec<Vec<u8>> = history_of(&mut h, conv)
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        assert_eq!(after, [&b"one"[..], b"two", b"three", b"four"]);
    }
    // Both outcomes of the in-flight message happened across the crash seeds.
    assert_eq!(outcomes, BTreeSet::from([1, 2]), "{outcomes:?}");
}

#[test]
fn history_pages_and_the_conversation_list_with_unread_counts() {
    let mut h = Harness::new(3, &[1, 2, 3]);
    h.open(10, 1, 1);
    h.open(20, 2, 1);
    let g = h.group(5, &[1, 2, 3]);
    let mut conv = 0;
    for n in 1..=5 {
        let rid = h.msg(10, n, Target::UserId(2), &format!("d{n}"));
        h.run();
        conv = ack(&h.take(10), rid).unwrap().conversation_id;
    }
    h.now += 1_000;
    let rid = h.msg(10, 9, Target::ConversationId(g), "in the group");
    h.run();
    assert_eq!(ack(&h.take(10), rid).map(|a| a.seq), Some(1));
    let page = |h: &mut Harness, anchor, limit| {
        let rid = h.send(
            20,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                anchor,
                limit,
            }),
        );
        h.run();
        match h
            .take(20)
            .into_iter()
            .find(|f| f.request_id == rid)
            .and_then(|f| f.body)
        {
            Some(Body::HistoryPage(p)) => (
                p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                p.has_more,
            ),
            other => panic!("{other:?}"),
        }
    };
    use v1::get_history::Anchor;
    assert_eq!(page(&mut h, None, 2), (vec![4, 5], true));
    assert_eq!(
        page(&mut h, Some(Anchor::BeforeSeq(4)), 2),
        (vec![2, 3], true)
    );
    assert_eq!(
        page(&mut h, Some(Anchor::BeforeSeq(3)), 5),
        (vec![1, 2], false)
    );
    assert_eq!(
        page(&mut h, Some(Anchor::AfterSeq(3)), 5),
        (vec![4, 5], false)
    );
    assert_eq!(
        page(&mut h, Some(Anchor::AfterSeq(u64::MAX)), 5),
        (vec![], false)
    );
    h.send(
        20,
        Body::ReadCursor(v1::ReadCursor {
            conversation_id: conv,
            up_to_seq: 3,
        }),
    );
    h.run();
    let list = h.send(
        20,
        Body::ListConversations(v1::ListConversations {
            limit: 1,
            cursor: Bytes::new(),
        }),
    );
    h.run();
    let Some(Body::ConversationList(l)) = h
        .take(20)
        .into_iter()
        .find(|f| f.request_id == list)
        .and_then(|f| f.body)
    else {
        panic!("no list");
    };
    assert_eq!(l.conversations.len(), 1);
    let top = &l.conversations[0];
    assert_eq!(
        (top.conversation_id, top.unread_count, top.last_seq),
        (g, 1, 1),
        "newest first"
    );
    let list = h.send(
        20,
        Body::ListConversations(v1::ListConversations {
            limit: 5,
            cursor: l.next_cursor,
        }),
    );
    h.run();
    let Some(Body::ConversationList(l)) = h
        .take(20)
        .into_iter()
        .find(|f| f.request_id == list)
        .and_then(|f| f.body)
    else {
        panic!("no list");
    };
    let d = &l.conversations[0];
    assert_eq!(
        (
            d.conversation_id,
            d.peer_user_id,
            d.unread_count,
            d.read_up_to_seq,
            d.last_seq
        ),
        (conv, 1, 2, 3, 5)
    );
    assert_eq!(d.title, "user1");
    assert_eq!(
        d.last_message.as_ref().map(|m| m.body.as_ref()),
        Some(&b"d5"[..])
    );
    assert!(l.next_cursor.is_empty());
}

#[test]
fn receipts_follow_durable_cursors_and_reach_the_senders_devices() {
    let mut h = Harness::new(2, &[1, 2]);
    h.open(10, 1, 1);
    h.open(11, 1, 2);
    h.open(21, 2, 1);
    let rid = h.msg(10, 1, Target::UserId(2), "hi");
    h.run();
    let a = ack(&h.take(10), rid).unwrap();
    assert_eq!(
        seqs(&h.take(11)),
        vec![1],
        "the sender's other device gets the message"
    );
    assert_eq!(seqs(&h.take(21)), vec![1]);
    h.send(
        21,
        Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: a.conversation_id,
            up_to_seq: 1,
        }),
    );
    let read = h.send(
        21,
        Body::ReadCursor(v1::ReadCursor {
            conversation_id: a.conversation_id,
            up_to_seq: 1,
        }),
    );
    h.run();
    let kinds = |frames: &[v1::Frame]| {
        frames
            .iter()
            .filter_map(|f| match &f.body {
                Some(Body::Receipt(r)) => Some((r.kind, r.by_user_id, r.up_to_seq)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let delivered = (v1::ReceiptKind::Delivered as i32, 2, 1);
    let read_r = (v1::ReceiptKind::Read as i32, 2, 1);
    for conn in [10, 11] {
        let k = kinds(&h.take(conn));
        assert!(
            k.contains(&delivered) && k.contains(&read_r),
            "{conn}: {k:?}"
        );
    }
    let out = h.take(21);
    assert!(
        kinds(&out).contains(&read_r),
        "the reader's own devices learn the read cursor"
    );
    assert!(
        out.iter()
            .any(|f| f.request_id == read && matches!(f.body, Some(Body::Done(_))))
    );
    // A reconnecting device gets the receipts again from Sync.
    h.open(12, 1, 3);
    let sync = h.send(12, Body::Sync(v1::Sync::default()));
    h.run();
    let out = h.take(12);
    assert_eq!(seqs(&out), vec![1]);
    let k = kinds(&out);
    assert!(k.contains(&delivered) && k.contains(&read_r), "{k:?}");
    match &out.last().unwrap().body {
        Some(Body::SyncDone(d)) => assert_eq!((d.messages, d.receipts), (1, 2)),
        other => panic!("{other:?}"),
    }
    assert!(out.iter().all(|f| f.request_id == sync));
}

#[test]
fn an_idle_conversation_is_evicted_and_comes_back_whole() {
    let mut h = Harness::new(2, &[1, 2]);
    h.open(10, 1, 1);
    h.open(21, 2, 1);
    let mut conv = 0;
    for n in 1..=3 {
        let rid = h.msg(10, n, Target::UserId(2), &format!("m{n}"));
        h.run();
        conv = ack(&h.take(10), rid).unwrap().conversation_id;
    }
    assert_eq!(seqs(&h.take(21)), vec![1, 2, 3]);
    h.send(
        21,
        Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conv,
            up_to_seq: 2,
        }),
    );
    h.send(
        21,
        Body::ReadCursor(v1::ReadCursor {
            conversation_id: conv,
            up_to_seq: 1,
        }),
    );
    h.run();
    h.take(10);
    h.take(21);
    let evicted =
        |h: &Harness| -> u64 { h.node.shards.iter().map(|s| s.stats().convs_evicted).sum() };
    // Idle for 100 ms (the test configuration evicts after 5).
    h.run();
    let before = evicted(&h);
    assert!(before >= 1, "the idle conversation was not evicted");
    // A retry of the first message is answered from the index with its first seq.
    let rid = h.msg(10, 1, Target::UserId(2), "m1");
    h.run();
    let a = ack(&h.take(10), rid).unwrap();
    assert_eq!((a.seq, a.duplicate), (1, true));
    assert!(h.take(21).is_empty(), "a retry is not delivered again");
    // Evicted again; a new message continues the sequence.
    h.run();
    assert!(evicted(&h) > before);
    let rid = h.msg(10, 4, Target::UserId(2), "m4");
    h.run();
    assert_eq!(
        ack(&h.take(10), rid).map(|a| (a.seq, a.duplicate)),
        Some((4, false))
    );
    assert_eq!(seqs(&h.take(21)), vec![4]);
    // The cursors came back too: a delivery ack at the old cursor announces nothing, the next
    // one announces exactly the new value; the list shows the read cursor.
    h.run();
    h.send(
        21,
        Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conv,
            up_to_seq: 2,
        }),
    );
    h.run();
    let receipts = |frames: Vec<v1::Frame>| -> Vec<(i32, u64)> {
        frames
            .into_iter()
            .filter_map(|f| match f.body {
                Some(Body::Receipt(r)) => Some((r.kind, r.up_to_seq)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(receipts(h.take(10)), vec![]);
    h.send(
        21,
        Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conv,
            up_to_seq: 4,
        }),
    );
    h.run();
    assert_eq!(
        receipts(h.take(10)),
        vec![(v1::ReceiptKind::Delivered as i32, 4)]
    );
    let list = h.send(
        21,
        Body::ListConversations(v1::ListConversations::default()),
    );
    h.run();
    let Some(Body::ConversationList(l)) = h
        .take(21)
        .into_iter()
        .find(|f| f.request_id == list)
        .and_then(|f| f.body)
    else {
        panic!("no list");
    };
    let c = &l.conversations[0];
    assert_eq!(
        (
            c.conversation_id,
            c.read_up_to_seq,
            c.unread_count,
            c.last_seq
        ),
        (conv, 1, 3, 4)
    );
}

#[test]
fn outbound_accounting_balances_with_what_the_transport_writes() {
    // Regression: the router once counted 5 bytes of length prefix per frame while the gateway
    // reported the real 1-2, so every busy connection drifted over its budget and stopped
    // getting pushes for good (found at ~70k frames per connection by `starling-bench messages`).
    let mut h = Harness::new(2, &[1, 2]);
    h.open(10, 1, 1);
    h.open(21, 2, 1);
    h.open(22, 2, 2);
    for n in 1..=200 {
        let rid = h.msg(10, n, Target::UserId(2), "hello");
        h.run();
        assert!(ack(&h.take(10), rid).is_some());
        // Receipts and cursors too: every kind of frame goes through the same accounting.
        let got = h.take(21);
        if let Some(conv) = got.iter().find_map(|f| match &f.body {
            Some(Body::Deliver(d)) => d.message.as_ref().map(|m| m.conversation_id),
            _ => None,
        }) {
            h.send(
                21,
                Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id: conv,
                    up_to_seq: u64::from(n),
                }),
            );
        }
        h.take(22);
    }
    h.run();
    for conn in [10, 21, 22] {
        let shard = h.conns[&conn];
        assert_eq!(
            h.node.shards[shard].conn_queued_bytes(ConnId(conn)),
            Some(0),
            "conn {conn}: everything emitted was written"
        );
    }
}

#[test]
fn a_slow_consumer_gets_hints_not_messages_and_never_slows_others() {
    let mut h = Harness::new(2, &[1, 2]);
    h.open(10, 1, 1);
    h.open(21, 2, 1);
    h.open(22, 2, 2);
    h.stalled.insert(21);
    let mut conv = 0;
    for n in 1..=40 {
        let rid = h.msg(
            10,
            n,
            Target::UserId(2),
            "a fairly long message body to fill the budget",
        );
        h.run();
        conv = ack(&h.take(10), rid).unwrap().conversation_id;
    }
    let fast = seqs(&h.take(22));
    assert_eq!(
        fast,
        (1..=40).collect::<Vec<_>>(),
        "the healthy device got everything"
    );
    let slow = h.take(21);
    let pushed = seqs(&slow);
    assert!(pushed.len() < 40 && !pushed.is_empty(), "{}", pushed.len());
    // It drains its socket: a hint says how far the conversation goes.
    h.stalled.clear();
    let shard = h.conns[&21];
    for f in &slow {
        h.node.shards[shard].handle_conn_flushed(ConnId(21), encoded_len(f), h.now);
    }
    h.run();
    let hints: Vec<_> = h
        .take(21)
        .into_iter()
        .filter_map(|f| match f.body {
            Some(Body::MessagesAvailable(m)) => Some((m.conversation_id, m.up_to_seq)),
            _ => None,
        })
        .collect();
    assert_eq!(hints, vec![(conv, 40)]);
    // Sync catches it up, and pushes resume.
    // Sync (repeated while SyncDone says it was truncated) catches it up; pushes resume.
    let first_missing = *pushed.last().unwrap() + 1;
    let mut have = first_missing - 1;
    let mut got = Vec::new();
    for _ in 0..20 {
        let mut map = BTreeMap::new();
        map.insert(conv, have);
        h.send(21, Body::Sync(v1::Sync { last_seq: map }));
        h.run();
        let out = h.take(21);
        got.extend(seqs(&out));
        have = got.last().copied().unwrap_or(have);
        match out.last().and_then(|f| f.body.as_ref()) {
            Some(Body::SyncDone(d)) if d.truncated.is_empty() => break,
            Some(Body::SyncDone(d)) => assert_eq!(d.truncated[0].up_to_seq, 40),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, (first_missing..=40).collect::<Vec<_>>());
    h.msg(10, 99, Target::UserId(2), "live again");
    h.run();
    assert_eq!(seqs(&h.take(21)), vec![41]);
}

/// "Behind" ends when the backlog is down to half the budget: after its MessagesAvailable the
/// connection gets live pushes again without a Sync, and nothing of it stays due in the
/// shard's timer (a drained connection that never synced used to keep the close deadline in
/// the past, so the shard ticked without pause).
#[test]
fn a_drained_connection_gets_pushes_again_without_a_sync() {
    let mut h = Harness::new(2, &[1, 2]);
    h.open(10, 1, 1);
    h.open(21, 2, 1);
    h.stalled.insert(21);
    // All at once, so that the stall is shorter than the slow-consumer close time (150 ms).
    let rids: Vec<u64> = (1..=40)
        .map(|n| {
            h.msg(
                10,
                n,
                Target::UserId(2),
                "a fairly long message body to fill the budget",
            )
        })
        .collect();
    h.run();
    let acks = h.take(10);
    let conv = ack(&acks, rids[0]).unwrap().conversation_id;
    assert!(rids.iter().all(|&rid| ack(&acks, rid).is_some()));
    let slow = h.take(21);
    let pushed = seqs(&slow);
    assert!(pushed.len() < 40, "the budget ran out");
    h.stalled.clear();
    let shard = h.conns[&21];
    for f in &slow {
        h.node.shards[shard].handle_conn_flushed(ConnId(21), encoded_len(f), h.now);
    }
    h.run();
    let hints: Vec<_> = h
        .take(21)
        .into_iter()
        .filter_map(|f| match f.body {
            Some(Body::MessagesAvailable(m)) => Some((m.conversation_id, m.up_to_seq)),
            _ => None,
        })
        .collect();
    assert_eq!(hints, vec![(conv, 40)]);
    // No Sync: the next message is pushed live.
    h.msg(10, 41, Target::UserId(2), "live again");
    h.run();
    assert_eq!(seqs(&h.take(21)), vec![41]);
    // Long past the slow-consumer close time, nothing about the connection is due.
    h.now += 10_000;
    let now = h.now;
    for s in &mut h.node.shards {
        s.handle_tick(now);
        assert!(s.poll_close().is_none());
        let next = s.poll_timeout();
        assert!(next.is_none_or(|t| t > now), "due at {next:?}, now {now}");
    }
}

#[test]
fn the_embedded_backend_plugs_in_and_dedup_survives_a_restart() {
    use starling_storage::{DenseIndex, EmbeddedMeta, EmbeddedShard, ShardOptions};
    type Real = RouterShard<EmbeddedShard, DenseIndex, EmbeddedMeta>;
    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(EmbeddedMeta::open(&dir.path().join("meta.redb")).unwrap());
    let mut b = MetaBatch::default();
    for u in [1, 2] {
        b.put(&User {
            id: UserId(u),
            phone_e164: format!("+1555000{u}"),
            display_name: format!("user{u}"),
            password_hash: None,
            created_ms: TimestampMs(0),
        });
    }
    meta.commit(&b).unwrap();
    let open = |meta: &Arc<EmbeddedMeta>| -> Real {
        let store =
            EmbeddedShard::open(&dir.path().join("shard0"), ShardOptions::default()).unwrap();
        let index = store.index().clone();
        let links = grid(8, &[Bell::new(NoBell)]).pop().unwrap();
        RouterShard::new(ShardConfig::default(), links, store, index, meta.clone())
    };
    let send = |shard: &mut Real, conn: u64| -> v1::SendAck {
        shard.handle_frame(
            ConnId(conn),
            v1::Frame {
                request_id: 5,
                body: Some(Body::Send(v1::Send {
                    client_msg_id: Bytes::from_static(&[9; 16]),
                    to: Some(v1::Recipient {
                        target: Some(Target::UserId(2)),
                    }),
                    content_type: "text/plain".into(),
                    body: Bytes::from_static(b"durable"),
                    media: None,
                    reply_to_seq: 0,
                    first_attempt: false,
                })),
            },
            1,
        );
        for _ in 0..10_000 {
            if let Some(t) = shard.poll_transmit() {
                match t.frame().expect("the router's frames decode").body {
                    Some(Body::SendAck(a)) => return a,
                    other => panic!("{other:?}"),
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            shard.handle_log_progress(2);
        }
        panic!("no SendAck");
    };
    let mut shard = open(&meta);
    shard.handle_conn_opened(ConnId(1), UserId(1), DeviceId(1), 0);
    let first = send(&mut shard, 1);
    assert_eq!((first.seq, first.duplicate), (1, false));
    drop(shard); // a restart: the log and index reopen from disk
    let mut shard = open(&meta);
    shard.handle_conn_opened(ConnId(2), UserId(1), DeviceId(1), 0);
    let again = send(&mut shard, 2);
    assert_eq!(
        (
            again.conversation_id,
            again.seq,
            again.duplicate,
            again.server_ts_ms
        ),
        (first.conversation_id, 1, true, first.server_ts_ms)
    );
}

#[test]
fn sync_and_history_replies_stay_under_their_byte_budgets() {
    let mut h = Harness::new(2, &[1, 2]);
    h.open(10, 1, 1);
    let big = "x".repeat(20 * 1024);
    let mut conv = 0;
    for n in 1..=30 {
        let rid = h.msg(10, n, Target::UserId(2), &big);
        h.run();
        conv = ack(&h.take(10), rid).unwrap().conversation_id;
    }
    // History: one frame, so at most `page_bytes_max` (48 KiB) of messages, and has_more.
    h.open(20, 2, 1);
    h.take(20);
    use v1::get_history::Anchor;
    for (anchor, want) in [
        (None, vec![29, 30]),
        (Some(Anchor::AfterSeq(0)), vec![1, 2]),
        (Some(Anchor::BeforeSeq(10)), vec![8, 9]),
    ] {
        let rid = h.send(
            20,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                anchor,
                limit: 50,
            }),
        );
        h.run();
        let page = h
            .take(20)
            .into_iter()
            .find(|f| f.request_id == rid)
            .and_then(|f| f.body);
        let Some(Body::HistoryPage(p)) = page else {
            panic!("{page:?}")
        };
        assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), want);
        assert!(p.has_more);
    }
    // Sync: at most `sync_bytes_max` (256 KiB) of messages, the rest named in `truncated`;
    // syncing again from where it stopped gets the rest, each message once.
    let mut got = Vec::new();
    for _ in 0..10 {
        let last = got.last().copied().unwrap_or(0);
        let rid = h.send(
            20,
            Body::Sync(v1::Sync {
                last_seq: [(conv, last)].into_iter().collect(),
            }),
        );
        h.run();
        let frames = h.take(20);
        let mut bytes = 0;
        for f in frames.iter().filter(|f| f.request_id == rid) {
            if let Some(Body::Deliver(d)) = &f.body {
                bytes += f.encoded_len();
                got.push(d.message.as_ref().unwrap().seq);
            }
        }
        assert!(
            bytes <= 256 * 1024 + 21 * 1024,
            "sync reply of {bytes} bytes"
        );
        let done = frames
            .iter()
            .find_map(|f| match &f.body {
                Some(Body::SyncDone(d)) if f.request_id == rid => Some(d.clone()),
                _ => None,
            })
            .unwrap();
        if done.truncated.is_empty() {
            break;
        }
        assert_eq!(done.truncated[0].up_to_seq, 30);
    }
    assert_eq!(got, (1..=30).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// scenarios: metadata writes off the shard thread, Block limits, cursor answers

fn error_of(b: Option<&Body>) -> &v1::Error {
    match b {
        Some(Body::Error(e)) => e,
        other => panic!("expected an Error, got {other:?}"),
    }
}

fn is_done(b: Option<&Body>) -> bool {
    matches!(b, Some(Body::Done(_)))
}

#[test]
fn cursor_requests_get_one_answer_while_the_metadata_store_fails() {
    let mut h = Harness::new(1, &[1, 2]);
    h.open(10, 1, 1);
    h.open(21, 2, 1);
    let rid = h.msg(10, 1, Target::UserId(2), "hi");
    h.run();
    let conv = ack(&h.take(10), rid).unwrap().conversation_id;
    h.take(21);
    let delivery_ack = |seq| {
        Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conv,
            up_to_seq: seq,
        })
    };
    let read_cursor = |seq| {
        Body::ReadCursor(v1::ReadCursor {
            conversation_id: conv,
            up_to_seq: seq,
        })
    };
    // The metadata store fails every write, and keeps failing through many flush attempts.
    h.meta.set_fail_writes(true);
    let delivered = h.send(21, delivery_ack(1));
    let read = h.send(21, read_cursor(1));
    h.run();
    h.run();
    let out = h.take(21);
    for rid in [delivered, read] {
        let e = error_of(Harness::answer(&out, rid));
        assert_eq!(e.code, ErrorCode::StorageFailure as i32);
        assert!(
            e.message.contains("not recorded") && e.message.contains("sent again"),
            "{}",
            e.message
        );
    }
    assert!(
        h.take(10)
            .iter()
            .all(|f| !matches!(f.body, Some(Body::Receipt(_)))),
        "no receipt for a cursor that is not durable"
    );
    // The shard's log fails too: cursor requests are still answered, once.
    h.fail_next_sync = true;
    let lost = h.msg(10, 2, Target::UserId(2), "two");
    h.run();
    assert!(h.node.shards[0].failure().is_some());
    assert_eq!(
        error_of(Harness::answer(&h.take(10), lost)).code,
        ErrorCode::StorageFailure as i32
    );
    let again = h.send(21, read_cursor(1));
    h.run();
    assert_eq!(
        error_of(Harness::answer(&h.take(21), again)).code,
        ErrorCode::StorageFailure as i32
    );
    // The store recovers: the cursors the shard kept retrying become durable, the receipts go
    // out, and a request sent again is answered Done.
    h.meta.set_fail_writes(false);
    let retry = h.send(21, read_cursor(1));
    h.run();
    assert!(is_done(Harness::answer(&h.take(21), retry)));
    let receipts: Vec<(i32, u64)> = h
        .take(10)
        .into_iter()
        .filter_map(|f| match f.body {
            Some(Body::Receipt(r)) => Some((r.kind, r.up_to_seq)),
            _ => None,
        })
        .collect();
    assert!(
        receipts.contains(&(v1::ReceiptKind::Read as i32, 1)),
        "{receipts:?}"
    );
    assert!(
        receipts.contains(&(v1::ReceiptKind::Delivered as i32, 1)),
        "{receipts:?}"
    );
    assert_eq!(
        h.meta
            .read_cursor(ids::ConvId(conv).storage(), UserId(2))
            .unwrap(),
        Seq(1)
    );
}

#[test]
fn block_targets_are_checked_and_blocks_are_rate_limited_counted_and_idempotent() {
    let cfg = ShardConfig {
        blocks_max: 2,
        block_requests_per_s: 1,
        block_requests_burst: 8,
        ..cfg()
    };
    let mut h = Harness::with(2, &[1, 2, 3, 4], false, &cfg);
    h.open(10, 1, 1);
    h.open(11, 1, 2); // the same user's other device, on the other shard
    let block = |user_id| Body::Block(v1::Block { user_id });
    let unblock = |user_id| Body::Unblock(v1::Unblock { user_id });
    let ask = |h: &mut Harness, conn: u64, body: Body| -> Body {
        let rid = h.send(conn, body);
        h.run();
        let out = h.take(conn);
        Harness::answer(&out, rid).cloned().expect("an answer")
    };
    let code = |b: &Body| ErrorCode::try_from(error_of(Some(b)).code).unwrap();
    assert_eq!(code(&ask(&mut h, 10, block(77))), ErrorCode::NotFound);
    assert_eq!(code(&ask(&mut h, 10, block(1))), ErrorCode::InvalidArgument);
    assert_eq!(
        code(&ask(&mut h, 10, unblock(1))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(&ask(&mut h, 10, block(0))), ErrorCode::InvalidArgument);
    let writes = h.meta.writes();
    assert!(matches!(ask(&mut h, 10, block(2)), Body::Done(_)));
    assert_eq!(h.meta.writes(), writes + 1);
    // Again, from the other device: in effect already, answered Done, nothing written.
    assert!(matches!(ask(&mut h, 11, block(2)), Body::Done(_)));
    assert_eq!(h.meta.writes(), writes + 1);
    assert!(matches!(ask(&mut h, 10, block(3)), Body::Done(_)));
    // A third block is over `blocks_max` (2).
    let over = ask(&mut h, 10, block(4));
    assert_eq!(code(&over), ErrorCode::PermissionDenied);
    assert!(
        error_of(Some(&over))
            .message
            .contains("unblock someone first")
    );
    // Unblocking makes room; unblocking someone not blocked writes nothing.
    assert!(matches!(ask(&mut h, 10, unblock(3)), Body::Done(_)));
    let writes = h.meta.writes();
    assert!(matches!(ask(&mut h, 11, unblock(3)), Body::Done(_)));
    assert_eq!(h.meta.writes(), writes);
    // 8 at once, then 1 a second: 7 spent, some refilled meanwhile. A burst of ten: what is
    // left of the budget passes, the rest are told when to come back.
    let rids: Vec<u64> = (0..10).map(|_| h.send(10, block(4))).collect();
    h.run();
    let out = h.take(10);
    let passed = rids
        .iter()
        .take_while(|&&rid| is_done(Harness::answer(&out, rid)))
        .count();
    assert!((1..10).contains(&passed), "{passed}");
    for &rid in &rids[passed..] {
        let e = error_of(Harness::answer(&out, rid));
        assert_eq!(e.code, ErrorCode::RateLimited as i32);
        assert!(
            (1..=1000).contains(&e.retry_after_ms),
            "{}",
            e.retry_after_ms
        );
    }
    h.now += 2_000;
    assert_eq!(
        code(&ask(&mut h, 11, block(3))),
        ErrorCode::PermissionDenied
    );
    let mut blocked: Vec<u64> = h
        .meta
        .scan::<starling_storage::meta::Block>(&keys::user(UserId(1)), 10)
        .unwrap()
        .iter()
        .map(|b| b.blocked.0)
        .collect();
    blocked.sort_unstable();
    assert_eq!(blocked, vec![2, 4]);
}

#[test]
fn the_first_send_of_a_pair_waits_for_its_conversation_and_nothing_else_does() {
    let cfg = ShardConfig {
        parked_sends_max: 3,
        ..cfg()
    };
    let mut h = Harness::with(2, &[1, 2, 3, 4, 5], true, &cfg);
    h.open(10, 1, 1);
    h.open(30, 3, 1);
    let first = h.msg(10, 1, Target::UserId(2), "hi");
    h.run();
    assert!(
        Harness::answer(&h.take(10), first).is_none(),
        "waits for the conversation"
    );
    assert_eq!(h.run_jobs(), 1);
    h.run();
    assert_eq!(ack(&h.take(10), first).map(|a| a.seq), Some(1));
    // Two first messages to user 3 wait for their new conversation; a message in the existing
    // conversation goes through meanwhile.
    let a = h.msg(10, 2, Target::UserId(3), "a");
    let b = h.msg(10, 3, Target::UserId(3), "b");
    let other = h.msg(10, 4, Target::UserId(2), "meanwhile");
    let c = h.msg(10, 5, Target::UserId(4), "c");
    // A fourth parked Send is over `parked_sends_max` (3): refused at once, with a retry time.
    let d = h.msg(10, 6, Target::UserId(5), "d");
    h.run();
    let out = h.take(10);
    assert_eq!(ack(&out, other).map(|a| a.seq), Some(2));
    for rid in [a, b, c] {
        assert!(Harness::answer(&out, rid).is_none());
    }
    let e = error_of(Harness::answer(&out, d));
    assert_eq!(e.code, ErrorCode::Overloaded as i32);
    assert!(e.retry_after_ms > 0);
    assert_eq!(h.run_jobs(), 2, "one creation per pair, not per Send");
    h.run();
    let out = h.take(10);
    let (ack_a, ack_b) = (ack(&out, a).unwrap(), ack(&out, b).unwrap());
    assert_eq!(
        (ack_a.seq, ack_b.seq),
        (1, 2),
        "in the order they were sent"
    );
    assert_eq!(ack_a.conversation_id, ack_b.conversation_id);
    assert_eq!(ack(&out, c).map(|a| a.seq), Some(1));
    assert_eq!(seqs(&h.take(30)), vec![1, 2]);
    // A creation that fails answers every Send that waited for it.
    h.meta.set_fail_writes(true);
    let e1 = h.msg(10, 7, Target::UserId(5), "e");
    let e2 = h.msg(10, 8, Target::UserId(5), "f");
    h.run();
    h.run_jobs();
    h.run();
    let out = h.take(10);
    for rid in [e1, e2] {
        let e = error_of(Harness::answer(&out, rid));
        assert_eq!(e.code, ErrorCode::StorageFailure as i32);
        assert!(e.message.contains("not accepted"), "{}", e.message);
    }
    h.meta.set_fail_writes(false);
    let retry = h.msg(10, 7, Target::UserId(5), "e");
    h.run();
    h.run_jobs();
    h.run();
    assert_eq!(ack(&h.take(10), retry).map(|a| a.seq), Some(1));
}

#[test]
fn block_and_unblock_from_one_connection_take_effect_in_order() {
    let cfg = ShardConfig {
        block_requests_burst: 20,
        ..cfg()
    };
    let mut h = Harness::with(3, &[1, 2], true, &cfg);
    h.open(10, 1, 1);
    h.open(21, 2, 1);
    let hi = h.msg(10, 1, Target::UserId(2), "hi");
    h.run();
    h.run_jobs();
    h.run();
    assert!(ack(&h.take(10), hi).is_some());
    // Five requests in a row; none is durable yet.
    let rids: Vec<u64> = [true, false, true, false, true]
        .into_iter()
        .map(|block| {
            let user_id = 1;
            h.send(
                21,
                if block {
                    Body::Block(v1::Block { user_id })
                } else {
                    Body::Unblock(v1::Unblock { user_id })
                },
            )
        })
        .collect();
    h.run();
    let early = h.take(21);
    assert!(
        rids.iter().all(|&r| Harness::answer(&early, r).is_none()),
        "{early:?}"
    );
    // Meanwhile a Send may race the Blocks: none of them is acknowledged yet.
    let racing = h.msg(10, 2, Target::UserId(2), "racing");
    h.run();
    assert_eq!(ack(&h.take(10), racing).map(|a| a.seq), Some(2));
    h.run_jobs();
    h.run();
    let out = h.take(21);
    assert!(rids.iter().all(|&r| is_done(Harness::answer(&out, r))));
    // The last one, a Block, is what holds.
    let refused = h.msg(10, 3, Target::UserId(2), "after");
    h.run();
    assert_eq!(
        error_code(h.take(10).iter().find(|f| f.request_id == refused).unwrap()),
        Some(ErrorCode::Blocked)
    );
}

#[path = "sim/groups.rs"]
mod groups;
