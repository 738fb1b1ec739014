//! Groups in the deterministic simulation: users with two devices each create groups, add,
//! remove, promote and leave, and send to them, while devices connect, disconnect and sync,
//! the metadata writer runs its jobs whenever the world decides (odd seeds), conversation
//! states are evicted and reloaded, and the whole node crashes (unsynced log records dropped or
//! torn, metadata jobs not yet run lost) and restarts.
//!
//! Invariants:
//! - no device ever receives an entry sequenced outside its user's membership (the membership
//!   replayed from the group's events in the log: from a join event up to the removal event);
//! - a connection never gets a live push twice, and its live pushes of one conversation come
//!   in seq order (so its group events do);
//! - every group request gets at most one answer per connection;
//! - at the end (no more crashes, every job run, every device online and synced): each event
//!   version of a group appears exactly once in its log, in order, 1, 2, 3...; the metadata
//!   agrees with the log (no marker left, the version is the last event's, members and their
//!   join seqs, former members and their removal seqs are those the events say); and every
//!   device holds every entry of its user's latest membership of each group.
//!
//! Every third seed fans groups of more than 2 members out on read (`group_push_members_max`
//! 2): their members' devices get `MessagesAvailable` instead of pushes and sync.
//!
//! `STARLING_SIM_GROUP_SEEDS=N` runs N seeds (default 1000); `STARLING_SIM_GROUP_SEED=S`
//! replays one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message as _;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_router::{ConnId, ShardConfig};
use starling_storage::meta::{FormerMember, Group, Member, User};
use starling_storage::{
    DeviceId, EntryKind, MemMeta, MetaBatch, MetadataStore, TimestampMs, UserId,
};

use super::{Disk, Node, Rng, cfg, shard_into_log};

const USERS: u64 = 5;

/// One device of a user.
struct Dev {
    user: u64,
    device: u32,
    conn: Option<(usize, ConnId)>,
    /// conv → seqs held.
    store: BTreeMap<u64, BTreeSet<u64>>,
    /// conv → the seq before the latest event that added this user (what a Sync counts from).
    base: BTreeMap<u64, u64>,
    /// Live pushes on the current connection: (conv, seq).
    pushed: BTreeSet<(u64, u64)>,
    /// conv → last live push on the current connection.
    last_push: HashMap<u64, u64>,
    /// Request ids of the current connection waiting for their answer.
    pending: BTreeSet<u64>,
    next_rid: u64,
    sent: u64,
}

struct GWorld {
    rng: Rng,
    now: u64,
    offload: bool,
    /// Groups over 2 members are fanned out on read.
    read_fanout: bool,
    meta: Arc<MemMeta>,
    disks: Vec<Arc<Mutex<Disk>>>,
    node: Node,
    devs: Vec<Dev>,
    next_conn: u64,
    /// Groups any device has heard of.
    groups: BTreeSet<u64>,
    /// Everything any device received: (user, conv, seq).
    received: BTreeSet<(u64, u64, u64)>,
    crashes: u64,
    events_seen: u64,
    refusals: u64,
}

fn group_cfg(read_fanout: bool) -> ShardConfig {
    ShardConfig {
        group_push_members_max: if read_fanout { 2 } else { 1024 },
        group_available_ms: 15,
        group_members_max: 4,
        group_request_users_max: 3,
        group_changes_queued_max: 4,
        ..cfg()
    }
}

impl GWorld {
    fn new(seed: u64) -> GWorld {
        let mut rng = Rng(seed);
        let shards = 1 + rng.below(3) as usize;
        let offload = seed % 2 == 1;
        let meta = Arc::new(MemMeta::new());
        let mut b = MetaBatch::default();
        for u in 1..=USERS {
            b.put(&User {
                id: UserId(u),
                phone_e164: format!("+1555000{u}"),
                display_name: format!("user{u}"),
                password_hash: None,
                created_ms: TimestampMs(0),
                account: None,
            });
        }
        meta.commit(&b).unwrap();
        let disks: Vec<_> = (0..shards)
            .map(|_| Arc::new(Mutex::new(Disk::default())))
            .collect();
        let read_fanout = seed.is_multiple_of(3);
        let node = Node::start_cfg(&disks, &meta, offload, &group_cfg(read_fanout));
        let devs = (1..=USERS)
            .flat_map(|u| {
                (1..=2).map(move |device| Dev {
                    user: u,
                    device,
                    conn: None,
                    store: BTreeMap::new(),
                    base: BTreeMap::new(),
                    pushed: BTreeSet::new(),
                    last_push: HashMap::new(),
                    pending: BTreeSet::new(),
                    next_rid: 1,
                    sent: 0,
                })
            })
            .collect();
        GWorld {
            rng,
            now: 1_000,
            offload,
            read_fanout,
            meta,
            disks,
            node,
            devs,
            next_conn: 1,
            groups: BTreeSet::new(),
            received: BTreeSet::new(),
            crashes: 0,
            events_seen: 0,
            refusals: 0,
        }
    }

    fn request(&mut self, d: usize, body: Body) {
        let Some((shard, conn)) = self.devs[d].conn else {
            return;
        };
        let rid = self.devs[d].next_rid;
        self.devs[d].next_rid += 1;
        self.devs[d].pending.insert(rid);
        let f = v1::Frame {
            request_id: rid,
            body: Some(body),
        };
        self.node.shards[shard].handle_frame(conn, f, self.now);
    }

    fn connect(&mut self, d: usize) {
        if self.devs[d].conn.is_some() {
            return;
        }
        let shard = self.rng.below(self.node.shards.len() as u64) as usize;
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let dev = &mut self.devs[d];
        self.node.shards[shard].handle_conn_opened(
            conn,
            UserId(dev.user),
            DeviceId(dev.device),
            self.now,
        );
        dev.conn = Some((shard, conn));
        self.sync(d);
    }

    fn sync(&mut self, d: usize) {
        // The contiguous run the device holds of each conversation from its latest join, as the
        // spec says a Sync counts.
        let dev = &self.devs[d];
        let last_seq = dev
            .store
            .iter()
            .map(|(c, seqs)| {
                let mut n = dev.base.get(c).copied().unwrap_or(0);
                while seqs.contains(&(n + 1)) {
                    n += 1;
                }
                (*c, n)
            })
            .collect();
        self.request(d, Body::Sync(v1::Sync { last_seq }));
    }

    fn disconnect(&mut self, d: usize) {
        if let Some((shard, conn)) = self.devs[d].conn.take() {
            self.node.shards[shard].handle_conn_closed(conn, self.now);
        }
        let dev = &mut self.devs[d];
        dev.pending.clear();
        dev.pushed.clear();
        dev.last_push.clear();
    }

    fn random_group(&mut self) -> Option<u64> {
        let n = self.groups.len() as u64;
        if n == 0 {
            return None;
        }
        let i = self.rng.below(n) as usize;
        self.groups.iter().nth(i).copied()
    }

    fn random_users(&mut self) -> Vec<u64> {
        let n = 1 + self.rng.below(3);
        (0..n).map(|_| 1 + self.rng.below(USERS)).collect()
    }

    fn group_request(&mut self, d: usize) {
        if self.devs[d].conn.is_none() {
            return;
        }
        let Some(conv) = self.random_group().filter(|_| !self.rng.chance(80)) else {
            let members = self.random_users();
            let name = format!("g{}", self.rng.below(100));
            self.request(
                d,
                Body::CreateGroup(v1::CreateGroup {
                    name,
                    member_user_ids: members,
                    avatar: None,
                }),
            );
            return;
        };
        let body = match self.rng.below(6) {
            0 | 1 => Body::AddGroupMembers(v1::AddGroupMembers {
                conversation_id: conv,
                user_ids: self.random_users(),
            }),
            2 => Body::RemoveGroupMembers(v1::RemoveGroupMembers {
                conversation_id: conv,
                user_ids: self.random_users(),
            }),
            3 => Body::SetGroupRole(v1::SetGroupRole {
                conversation_id: conv,
                user_id: 1 + self.rng.below(USERS),
                role: if self.rng.chance(600) {
                    v1::GroupRole::Admin
                } else {
                    v1::GroupRole::Member
                } as i32,
            }),
            4 => Body::LeaveGroup(v1::LeaveGroup {
                conversation_id: conv,
            }),
            _ => Body::UpdateGroup(v1::UpdateGroup {
                conversation_id: conv,
                name: None,
                avatar: None,
                only_admins_send: Some(self.rng.chance(300)),
            }),
        };
        self.request(d, body);
    }

    fn send_message(&mut self, d: usize) {
        let Some(conv) = self.random_group() else {
            return;
        };
        let dev = &mut self.devs[d];
        dev.sent += 1;
        let mut cmid = [0u8; 16];
        cmid[..8].copy_from_slice(&(d as u64 + 1).to_le_bytes());
        cmid[8..].copy_from_slice(&dev.sent.to_le_bytes());
        self.request(
            d,
            Body::Send(v1::Send {
                client_msg_id: Bytes::copy_from_slice(&cmid),
                to: Some(v1::Recipient {
                    target: Some(v1::recipient::Target::ConversationId(conv)),
                }),
                content_type: "text/plain".into(),
                body: Bytes::from_static(b"hi"),
                ..v1::Send::default()
            }),
        );
    }

    /// Device `d` takes frame `f`.
    fn take(&mut self, d: usize, f: v1::Frame) {
        let user = self.devs[d].user;
        match f.body {
            Some(Body::Deliver(dl)) => {
                let m = dl.message.expect("a Deliver carries a message");
                if let Some(ev) = &m.group_changed {
                    self.groups.insert(m.conversation_id);
                    self.events_seen += 1;
                    let joined = matches!(
                        v1::GroupChangeKind::try_from(ev.kind),
                        Ok(v1::GroupChangeKind::Created | v1::GroupChangeKind::MembersAdded)
                    ) && ev.user_ids.contains(&user);
                    let base = self.devs[d].base.entry(m.conversation_id).or_default();
                    if joined && m.seq - 1 > *base {
                        *base = m.seq - 1;
                    }
                }
                let key = (m.conversation_id, m.seq);
                let dev = &mut self.devs[d];
                if f.request_id == 0 {
                    assert!(
                        dev.pushed.insert(key),
                        "{key:?} pushed twice to one connection"
                    );
                    let last = dev.last_push.entry(m.conversation_id).or_default();
                    assert!(
                        m.seq > *last,
                        "live pushes out of order: {} after {last}",
                        m.seq
                    );
                    *last = m.seq;
                }
                dev.store
                    .entry(m.conversation_id)
                    .or_default()
                    .insert(m.seq);
                self.received.insert((user, m.conversation_id, m.seq));
            }
            Some(Body::MessagesAvailable(_)) => self.sync(d),
            Some(Body::Receipt(_) | Body::GroupReceipts(_)) => {}
            body => {
                if f.request_id == 0 {
                    return;
                }
                let dev = &mut self.devs[d];
                assert!(
                    dev.pending.remove(&f.request_id),
                    "request {} answered twice, or never asked: {body:?}",
                    f.request_id
                );
                match body {
                    Some(Body::SyncDone(done)) if !done.truncated.is_empty() => self.sync(d),
                    Some(Body::GroupInfo(g)) => {
                        self.groups.insert(g.conversation_id);
                    }
                    Some(Body::Error(e)) => {
                        self.refusals += 1;
                        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                        assert!(
                            matches!(
                                code,
                                ErrorCode::NotAMember
                                    | ErrorCode::PermissionDenied
                                    | ErrorCode::NotFound
                                    | ErrorCode::Overloaded
                            ),
                            "unexpected refusal {e:?}"
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    fn server_step(&mut self) {
        for s in 0..self.node.shards.len() {
            self.node.shards[s].handle_rings(self.now);
            if self.rng.chance(700) {
                let _ = self.node.shards[s].log_mut().sim_sync(false);
                self.node.shards[s].handle_log_progress(self.now);
            }
            if self.rng.chance(600) {
                let k = self.rng.below(4) as usize;
                self.node.shards[s].log_mut().apply_index(k);
            }
            if let Some(jobs) = &self.node.jobs
                && self.rng.chance(500)
            {
                let job = jobs.borrow_mut().pop_front();
                if let Some(job) = job {
                    job();
                }
                self.node.shards[s].handle_log_progress(self.now);
            }
            // The read threads finish some reads, in any order.
            while self.rng.chance(400) {
                let rng = &mut self.rng;
                if !self.node.run_read(|n| rng.below(n)) {
                    break;
                }
            }
            self.node.shards[s].handle_tick(self.now);
            self.deliver(s);
        }
    }

    fn deliver(&mut self, s: usize) {
        while let Some(t) = self.node.shards[s].poll_transmit() {
            let bytes = t.bytes.len() as u64;
            self.node.shards[s].handle_conn_flushed(t.conn, bytes, self.now);
            let f = t.frame().expect("the router's frames decode");
            if let Some(d) = self.devs.iter().position(|d| d.conn == Some((s, t.conn))) {
                self.take(d, f);
            }
        }
        while let Some(c) = self.node.shards[s].poll_close() {
            if let Some(d) = self.devs.iter().position(|d| d.conn == Some((s, c.conn))) {
                self.disconnect(d);
            }
        }
    }

    fn crash(&mut self) {
        self.crashes += 1;
        for d in 0..self.devs.len() {
            self.devs[d].conn = None;
            self.devs[d].pending.clear();
            self.devs[d].pushed.clear();
            self.devs[d].last_push.clear();
        }
        let old = std::mem::replace(
            &mut self.node,
            Node {
                shards: Vec::new(),
                jobs: None,
                reads: None,
            },
        );
        // Metadata jobs not yet run die with the process.
        for shard in old.shards {
            shard_into_log(shard).crash(&mut self.rng);
        }
        let cfg = group_cfg(self.read_fanout);
        self.node = Node::start_cfg(&self.disks, &self.meta, self.offload, &cfg);
    }

    fn step(&mut self, faults: bool) {
        self.now += 1 + self.rng.below(3);
        let d = self.rng.below(self.devs.len() as u64) as usize;
        match self.rng.below(100) {
            0..=24 => self.send_message(d),
            25..=44 => self.group_request(d),
            45..=52 => self.connect(d),
            53..=56 => self.disconnect(d),
            57 if faults && self.rng.chance(300) => self.crash(),
            _ => self.server_step(),
        }
    }

    /// Faults off: every job runs, every device comes online and syncs, until nothing moves.
    fn converge(&mut self) {
        for round in 0..400 {
            if let Some(jobs) = &self.node.jobs {
                let all: Vec<_> = jobs.borrow_mut().drain(..).collect();
                for job in all {
                    job();
                }
            }
            self.node.run_reads();
            for s in 0..self.node.shards.len() {
                self.node.shards[s].handle_rings(self.now);
                let _ = self.node.shards[s].log_mut().sim_sync(false);
                self.node.shards[s].log_mut().apply_index(1000);
                self.node.shards[s].handle_log_progress(self.now);
                self.node.shards[s].handle_tick(self.now);
                self.deliver(s);
            }
            self.now += 2;
            if round % 40 == 0 {
                for d in 0..self.devs.len() {
                    self.connect(d);
                    self.sync(d);
                }
            }
        }
    }

    /// The checks of the module docs, over the converged node.
    fn check(&self) {
        // The logs: every group's entries, in seq order.
        let mut convs: BTreeMap<u64, Vec<starling_storage::Entry>> = BTreeMap::new();
        for s in &self.node.shards {
            let ix = s.log().index.0.lock().unwrap();
            for ((conv, _), e) in &ix.entries {
                convs.entry(conv.0 as u64).or_default().push(e.clone());
            }
        }
        for (&conv, entries) in &convs {
            if conv & starling_router::ids::GROUP_BIT == 0 {
                continue;
            }
            // Replay membership from the events: user → [(join, removal or MAX)].
            let mut ranges: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
            let mut version = 0;
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(e.seq.0, i as u64 + 1, "{conv}: seqs not contiguous");
                if e.kind != EntryKind::SYSTEM {
                    let sender = e.sender.0;
                    assert!(
                        in_at(&ranges, sender, e.seq.0),
                        "{conv}/{}: a message from {sender}, not a member then",
                        e.seq.0
                    );
                    continue;
                }
                let ev = v1::GroupChanged::decode(e.body.as_slice()).expect("an event decodes");
                let v = ev.group.as_ref().map_or(0, |g| g.version);
                assert_eq!(
                    v,
                    version + 1,
                    "{conv}/{}: event versions not 1, 2, 3...",
                    e.seq.0
                );
                version = v;
                let kind = v1::GroupChangeKind::try_from(ev.kind).unwrap();
                for &u in &ev.user_ids {
                    let r = ranges.entry(u).or_default();
                    match kind {
                        v1::GroupChangeKind::Created | v1::GroupChangeKind::MembersAdded => {
                            r.push((e.seq.0, u64::MAX));
                        }
                        v1::GroupChangeKind::MembersRemoved | v1::GroupChangeKind::MemberLeft => {
                            let last = r.last_mut().expect("a removed member had joined");
                            assert_eq!(last.1, u64::MAX, "removed twice");
                            last.1 = e.seq.0;
                        }
                        _ => {}
                    }
                }
            }
            // The metadata agrees with the log.
            let wide = u128::from(conv).to_be_bytes();
            let g = self
                .meta
                .get::<Group>(&wide)
                .unwrap()
                .unwrap_or_else(|| panic!("{conv}: events but no group record"));
            let settings = g.settings.expect("groups the router writes are version 2");
            assert!(settings.pending.is_none(), "{conv}: a marker left");
            assert_eq!(
                g.epoch, version,
                "{conv}: metadata version vs the last event"
            );
            let members: BTreeMap<u64, u64> = self
                .meta
                .scan::<Member>(&wide, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|m| (m.user.0, m.joined_seq.unwrap()))
                .collect();
            let former: BTreeMap<u64, (u64, u64)> = self
                .meta
                .scan::<FormerMember>(&wide, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|f| (f.user.0, (f.joined_seq, f.left_seq)))
                .collect();
            // (A group forgets its earliest removed members beyond group_members_max of them.)
            let mut forgotten = BTreeSet::new();
            for (u, r) in &ranges {
                let &(join, left) = r.last().unwrap();
                if left == u64::MAX {
                    assert_eq!(members.get(u), Some(&join), "{conv}: member {u}");
                } else if let Some(f) = former.get(u) {
                    assert_eq!(*f, (join, left), "{conv}: former member {u}");
                    assert!(
                        !members.contains_key(u),
                        "{conv}: {u} both member and former"
                    );
                } else {
                    forgotten.insert(*u);
                }
            }
            assert!(
                former.len() <= group_cfg(self.read_fanout).group_members_max,
                "{conv}: formers unbounded"
            );
            assert_eq!(
                members.len() + former.len() + forgotten.len(),
                ranges.len(),
                "{conv}: who is who"
            );
            // Nobody received an entry outside its membership.
            for &(u, c, seq) in &self.received {
                if c == conv {
                    assert!(
                        in_at(&ranges, u, seq),
                        "{conv}/{seq} reached user {u} outside its membership {:?}; log {:?}",
                        ranges.get(&u),
                        entries
                            .iter()
                            .map(|e| (e.seq.0, e.kind, e.sender.0, describe(e)))
                            .collect::<Vec<_>>()
                    );
                }
            }
            // Every device holds its latest membership's entries.
            let last = entries.len() as u64;
            for dev in &self.devs {
                let Some(&(join, left)) = ranges.get(&dev.user).and_then(|r| r.last()) else {
                    continue;
                };
                if forgotten.contains(&dev.user) {
                    continue;
                }
                let held = dev.store.get(&conv).cloned().unwrap_or_default();
                for seq in join..=left.min(last) {
                    assert!(
                        held.contains(&seq),
                        "{conv}/{seq}: device {}/{} lacks it ({join}..={left})",
                        dev.user,
                        dev.device
                    );
                }
            }
        }
        // Every group the metadata has, has its events.
        for g in self.meta.scan::<Group>(&[], usize::MAX).unwrap() {
            let conv = g.id.0 as u64;
            assert!(
                convs.contains_key(&conv),
                "{conv}: a group record without events"
            );
        }
    }
}

/// A group event's kind and users, for failure messages.
fn describe(e: &starling_storage::Entry) -> String {
    match v1::GroupChanged::decode(e.body.as_slice()) {
        Ok(ev) if e.kind == EntryKind::SYSTEM => format!("{:?} {:?}", ev.kind, ev.user_ids),
        _ => String::new(),
    }
}

/// Whether user `u` was in the group at `seq` (a removal event still reaches the removed).
fn in_at(ranges: &BTreeMap<u64, Vec<(u64, u64)>>, u: u64, seq: u64) -> bool {
    ranges
        .get(&u)
        .is_some_and(|r| r.iter().any(|&(a, b)| a <= seq && seq <= b))
}

/// Counts over one seed, to show the scenarios happened.
#[derive(Debug, Default)]
struct GroupTotals {
    crashes: u64,
    events: u64,
    refusals: u64,
    groups: u64,
}

fn run_group_seed(seed: u64, steps: usize) -> GroupTotals {
    let mut w = GWorld::new(seed);
    for _ in 0..steps {
        w.step(true);
    }
    w.converge();
    w.check();
    GroupTotals {
        crashes: w.crashes,
        events: w.events_seen,
        refusals: w.refusals,
        groups: w.groups.len() as u64,
    }
}

#[test]
fn group_simulation() {
    let steps = 300;
    if let Ok(s) = std::env::var("STARLING_SIM_GROUP_SEED") {
        let seed: u64 = s.parse().expect("STARLING_SIM_GROUP_SEED is a number");
        println!("seed {seed}: {:?}", run_group_seed(seed, steps));
        return;
    }
    let seeds: u64 = std::env::var("STARLING_SIM_GROUP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut total = GroupTotals::default();
    for seed in 0..seeds {
        match std::panic::catch_unwind(|| run_group_seed(seed, steps)) {
            Ok(t) => {
                total.crashes += t.crashes;
                total.events += t.events;
                total.refusals += t.refusals;
                total.groups += t.groups;
            }
            Err(e) => {
                eprintln!("group simulation failed; replay with STARLING_SIM_GROUP_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
    println!("{seeds} group seeds: {total:?}");
    assert!(total.crashes > 0 && total.events > seeds && total.refusals > 0 && total.groups > 0);
}
