//! Scenarios on a small harness of shards: typed errors, blocks, storage failures, history and the
//! conversation list, receipts, eviction, outbound accounting, slow consumers, the embedded backend,
//! byte budgets, cursors while the metadata store fails, and the first send of a pair.

use super::*;

// ---------------------------------------------------------------------------------------------
// scenarios: one behaviour each, through the same node (frames in → frames out)

pub(super) struct Harness {
    meta: Arc<MemMeta>,
    node: Node,
    pub(super) now: u64,
    /// conn → shard.
    conns: HashMap<u64, usize>,
    /// conn → (user, device).
    users: HashMap<u64, (u64, u32)>,
    out: HashMap<u64, Vec<v1::Frame>>,
    next_rid: u64,
    fail_next_sync: bool,
    /// Connections whose written bytes the harness does not report (slow readers).
    stalled: BTreeSet<u64>,
    /// What survives a crash, and the shards' configuration (for [`Harness::crash`]).
    disks: Vec<Arc<Mutex<Disk>>>,
    cfg: ShardConfig,
}

impl Harness {
    pub(super) fn new(shards: usize, users: &[u64]) -> Harness {
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
                account: None,
            });
        }
        meta.commit(&b).unwrap();
        let disks: Vec<_> = (0..shards)
            .map(|_| Arc::new(Mutex::new(Disk::default())))
            .collect();
        let node = Node::start_cfg(&disks, &meta, offload, cfg);
        Harness {
            disks,
            cfg: cfg.clone(),
            meta,
            node,
            now: 1_000,
            conns: HashMap::new(),
            users: HashMap::new(),
            out: HashMap::new(),
            next_rid: 1,
            fail_next_sync: false,
            stalled: BTreeSet::new(),
        }
    }

    pub(super) fn group(&self, id: u64, members: &[u64]) -> u64 {
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

    pub(super) fn open(&mut self, conn: u64, user: u64, device: u32) {
        let shard = conn as usize % self.node.shards.len();
        self.conns.insert(conn, shard);
        self.users.insert(conn, (user, device));
        self.node.shards[shard].handle_conn_opened(
            ConnId(conn),
            UserId(user),
            DeviceId(device),
            self.now,
        );
    }

    pub(super) fn send(&mut self, conn: u64, body: Body) -> u64 {
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

    pub(super) fn msg(&mut self, conn: u64, n: u32, to: v1::recipient::Target, body: &str) -> u64 {
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
                change: None,
                set_timer: None,
            }),
        )
    }

    /// Runs every shard until nothing moves (logs sync, index catches up, cursors flush).
    pub(super) fn run(&mut self) {
        for _ in 0..20 {
            self.now += 5;
            for s in 0..self.node.shards.len() {
                self.node.run_reads();
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

    /// A crash of the node (unsynced log bytes lost, the last record torn as `rng` says) and
    /// its restart on the same disks and metadata; every connection opens again.
    pub(super) fn crash(&mut self, rng: &mut Rng) {
        let old = std::mem::replace(
            &mut self.node,
            Node {
                shards: Vec::new(),
                jobs: None,
                reads: None,
            },
        );
        for shard in old.shards {
            shard_into_log(shard).crash(rng);
        }
        self.node = Node::start_cfg(&self.disks, &self.meta, false, &self.cfg);
        self.out.clear();
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for conn in conns {
            let shard = self.conns[&conn];
            let (user, device) = self.users[&conn];
            self.node.shards[shard].handle_conn_opened(
                ConnId(conn),
                UserId(user),
                DeviceId(device),
                self.now,
            );
        }
    }

    pub(super) fn take(&mut self, conn: u64) -> Vec<v1::Frame> {
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

pub(super) fn error_code(f: &v1::Frame) -> Option<ErrorCode> {
    match &f.body {
        Some(Body::Error(e)) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

pub(super) fn seqs(frames: &[v1::Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(Body::Deliver(v1::Deliver { message: Some(m) })) => Some(m.seq),
            _ => None,
        })
        .collect()
}

pub(super) fn ack(frames: &[v1::Frame], rid: u64) -> Option<v1::SendAck> {
    frames.iter().find_map(|f| match &f.body {
        Some(Body::SendAck(a)) if f.request_id == rid => Some(a.clone()),
        _ => None,
    })
}

use v1::recipient::Target;

#[test]
pub(super) fn bad_sends_get_typed_errors_and_never_an_ack() {
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
pub(super) fn a_blocked_sender_is_refused_until_unblocked() {
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
pub(super) fn storage_failure(frames: &[v1::Frame], rid: u64) -> String {
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
pub(super) fn history_of(h: &mut Harness, conv: u64) -> Vec<(u64, Vec<u8>)> {
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
pub(super) fn a_failed_fsync_tells_each_sender_the_truth_and_retries_after_restart_resolve_it() {
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
pub(super) fn history_pages_and_the_conversation_list_with_unread_counts() {
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
pub(super) fn receipts_follow_durable_cursors_and_reach_the_senders_devices() {
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
pub(super) fn an_idle_conversation_is_evicted_and_comes_back_whole() {
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
pub(super) fn outbound_accounting_balances_with_what_the_transport_writes() {
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
pub(super) fn a_slow_consumer_gets_hints_not_messages_and_never_slows_others() {
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
pub(super) fn a_drained_connection_gets_pushes_again_without_a_sync() {
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
pub(super) fn the_embedded_backend_plugs_in_and_dedup_survives_a_restart() {
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
            account: None,
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
                    change: None,
                    set_timer: None,
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
pub(super) fn sync_and_history_replies_stay_under_their_byte_budgets() {
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

pub(super) fn error_of(b: Option<&Body>) -> &v1::Error {
    match b {
        Some(Body::Error(e)) => e,
        other => panic!("expected an Error, got {other:?}"),
    }
}

pub(super) fn is_done(b: Option<&Body>) -> bool {
    matches!(b, Some(Body::Done(_)))
}

#[test]
pub(super) fn cursor_requests_get_one_answer_while_the_metadata_store_fails() {
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
pub(super) fn block_targets_are_checked_and_blocks_are_rate_limited_counted_and_idempotent() {
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
pub(super) fn the_first_send_of_a_pair_waits_for_its_conversation_and_nothing_else_does() {
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
pub(super) fn block_and_unblock_from_one_connection_take_effect_in_order() {
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
