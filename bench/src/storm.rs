//! `starling-bench storm`: a reconnect storm.
//!
//! `--clients` authenticated clients (in pairs) exchange messages open-loop
//! at `--rate`. Once every client is connected and `--before-secs` have
//! passed, all of them drop their connections at the same moment (TCP
//! reset). Each client then reconnects on its own through the SDK's
//! full-jitter [`Backoff`], sends `Hello{token}` and one
//! `Sync{conversation → last seq}`, takes the missed messages up to
//! `SyncDone` (that is "resynced"), then retries every unacknowledged send
//! under the same `client_msg_id` and carries on. Messages keep being
//! scheduled during the outage (they wait in the outbox, and their latency
//! counts from their scheduled time).
//!
//! Reported: time from the drop until the last client resynced, the
//! per-client resync times and reconnect attempts, and an exactly-once
//! check of every message: none missing, none accepted twice (a retry that
//! got a new seq would be a dedup failure); frames redelivered with the
//! same seq are counted separately (at-least-once on the wire is allowed,
//! the SDK drops them).
//!
//! `--no-sync` measures only the reconnect (TLS + Hello) for servers that
//! do not do messaging yet; it requires `--rate 0`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use starling_client::{Backoff, BackoffConfig};
use starling_protocol::v1::{self, frame::Body};
use tokio::sync::Notify;

use crate::accounts::{Account, AccountsFile};
use crate::clock::{self, Stopwatch};
use crate::messages::{PairConns, Rec, connect_pair, read_body, write_body};
use crate::net::{StarlingConn, Stream, Target, describe_error, source_addr, tls_for};
use crate::report::{self, HistData, Machine, Summary};
use crate::workers::{self, Tally, WorkerArgs, Workers};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct StormArgs {
    /// Starling server: tls://IP:PORT or plain://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The server's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (one per client).
    #[arg(long, default_value = "bench-accounts.json")]
    accounts: PathBuf,
    /// Clients (an even number: they message in pairs).
    #[arg(long, default_value_t = 1000)]
    clients: u64,
    /// Messages per second over all clients (0: none, reconnect only).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of steady traffic before the drop.
    #[arg(long, default_value_t = 3)]
    before_secs: u64,
    /// Seconds of traffic after the drop (the storm).
    #[arg(long, default_value_t = 10)]
    after_secs: u64,
    /// Then wait at most this long for the rest to arrive.
    #[arg(long, default_value_t = 20)]
    drain_secs: u64,
    /// Backoff: ceiling of the first delay, ms.
    #[arg(long, default_value_t = 250)]
    backoff_base_ms: u64,
    /// Backoff: longest delay, ms.
    #[arg(long, default_value_t = 5000)]
    backoff_cap_ms: u64,
    /// Skip Sync (servers without messaging); requires --rate 0.
    #[arg(long)]
    no_sync: bool,
    /// The server's pid, to measure its CPU.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    sources: u32,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    #[serde(skip)]
    w: WorkerArgs,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Counts {
    connected_clients: u64,
    dropped: u64,
    resynced: u64,
    scheduled: u64,
    sent: u64,
    retried: u64,
    acked: u64,
    ack_duplicates: u64,
    delivered: u64,
    redelivered_same_seq: u64,
    accepted_twice: u64,
    errors: u64,
    finished_pairs: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.connected_clients += o.connected_clients;
        self.dropped += o.dropped;
        self.resynced += o.resynced;
        self.scheduled += o.scheduled;
        self.sent += o.sent;
        self.retried += o.retried;
        self.acked += o.acked;
        self.ack_duplicates += o.ack_duplicates;
        self.delivered += o.delivered;
        self.redelivered_same_seq += o.redelivered_same_seq;
        self.accepted_twice += o.accepted_twice;
        self.errors += o.errors;
        self.finished_pairs += o.finished_pairs;
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    counts: Counts,
    resync_us: HistData,
    attempts: HistData,
    ack_us: HistData,
    deliver_us: HistData,
    cpu_secs: f64,
    errors: Vec<String>,
}

pub(crate) fn run(args: &StormArgs) -> anyhow::Result<()> {
    if args.w.worker.is_some() {
        return worker(args);
    }
    anyhow::ensure!(
        args.clients >= 2 && args.clients.is_multiple_of(2),
        "--clients must be even and >= 2"
    );
    anyhow::ensure!(
        !args.no_sync || args.rate == 0.0,
        "--no-sync needs --rate 0"
    );
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(!target.is_mqtt(), "storm talks to Starling");
    AccountsFile::load(&args.accounts)?.need(args.clients as usize, &args.accounts)?;
    let per_proc = args.clients.div_ceil(u64::from(args.w.procs.max(1)));
    anyhow::ensure!(
        per_proc <= 19_000,
        "{per_proc} connections per process: raise --procs"
    );
    let machine = Machine::now();
    let procs = args.w.procs.max(1) as usize;
    let mut ws = Workers::spawn(args.w.procs)?;
    let sw = Stopwatch::start();
    let mut tally: Tally<Counts, WorkerResult> = Tally::new(procs);
    let mut connected_at = None;
    let mut dropped_at = None;
    let mut all_resynced_secs = None;
    let cap = Duration::from_secs(args.before_secs + args.after_secs + args.drain_secs + 300);
    loop {
        if let Some(m) = ws.recv(Duration::from_millis(50))? {
            tally.apply(&m, |r| &r.counts)?;
        }
        let mut t = Counts::default();
        for p in &tally.progress {
            t.add(p);
        }
        if connected_at.is_none() && t.connected_clients == args.clients {
            connected_at = Some(sw.elapsed_secs());
        }
        if let Some(c) = connected_at
            && dropped_at.is_none()
            && sw.elapsed_secs() >= c + args.before_secs as f64
        {
            ws.signal_all();
            dropped_at = Some(sw.elapsed_secs());
        }
        if let Some(d) = dropped_at
            && all_resynced_secs.is_none()
            && t.resynced == args.clients
        {
            all_resynced_secs = Some(sw.elapsed_secs() - d);
        }
        report::progress(&format!(
            "storm: {:.1}s connected {}/{} dropped {} resynced {} sent {} acked {} delivered {} errors {}",
            sw.elapsed_secs(),
            t.connected_clients,
            args.clients,
            t.dropped,
            t.resynced,
            t.sent,
            t.acked,
            t.delivered,
            t.errors
        ));
        if tally.all_done() {
            break;
        }
        if sw.elapsed() > cap {
            ws.stop_all();
        }
    }
    report::progress_done();
    ws.wait()?;
    let results: Vec<WorkerResult> = tally.into_results();
    let (mut resync, mut attempts, mut ack, mut del) = (
        report::histogram(),
        report::histogram(),
        report::histogram(),
        report::histogram(),
    );
    let mut counts = Counts::default();
    let mut errors = Vec::new();
    for r in &results {
        r.resync_us.merge_into(&mut resync);
        r.attempts.merge_into(&mut attempts);
        r.ack_us.merge_into(&mut ack);
        r.deliver_us.merge_into(&mut del);
        counts.add(&r.counts);
        errors.extend(r.errors.iter().cloned());
    }
    let missing = counts.scheduled.saturating_sub(counts.delivered);
    let exactly_once = missing == 0 && counts.accepted_twice == 0 && counts.errors == 0;
    println!();
    println!("target             {}", args.target);
    println!(
        "storm              {} clients dropped at once; backoff base {} ms cap {} ms{}",
        args.clients,
        args.backoff_base_ms,
        args.backoff_cap_ms,
        if args.no_sync {
            " (no Sync: reconnect only)"
        } else {
            ""
        }
    );
    match all_resynced_secs {
        Some(s) => println!("all resynced after {s:.2} s"),
        None => println!("NOT all resynced: {} of {}", counts.resynced, args.clients),
    }
    println!(
        "messages           scheduled {} sent {} (retries {}) acked {} delivered {} missing {} accepted twice {} redelivered (same seq) {}",
        counts.scheduled,
        counts.sent,
        counts.retried,
        counts.acked,
        counts.delivered,
        missing,
        counts.accepted_twice,
        counts.redelivered_same_seq
    );
    println!(
        "exactly once       {}",
        if args.rate == 0.0 {
            "n/a (no messages)"
        } else if exactly_once {
            "yes"
        } else {
            "NO"
        }
    );
    let att = Summary::of(&attempts);
    println!(
        "reconnect attempts p50 {} p99 {} max {}",
        att.p50_us, att.p99_us, att.max_us
    );
    report::print_latency_table(&[
        ("drop -> resynced", &Summary::of(&resync)),
        ("send -> SendAck", &Summary::of(&ack)),
        ("send -> Deliver", &Summary::of(&del)),
    ]);
    for e in errors.iter().take(5) {
        println!("error: {e}");
    }
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "storm",
                "params": args,
                "machine": machine,
                "loadavg_1m_end": report::loadavg(),
                "all_resynced_secs": all_resynced_secs,
                "counts": counts,
                "missing": missing,
                "exactly_once": exactly_once,
                "reconnect_attempts": att,
                "resync_us": Summary::of(&resync),
                "ack_us": Summary::of(&ack),
                "deliver_us": Summary::of(&del),
                "errors": errors.iter().take(20).collect::<Vec<_>>(),
            }),
        )?;
    }
    if !args.no_sync && args.rate > 0.0 && !exactly_once {
        bail!(
            "the storm did not deliver every message exactly once{}",
            errors.first().map_or(String::new(), |e| format!(": {e}"))
        );
    }
    Ok(())
}

/// Worker-wide storm state.
#[derive(Debug)]
struct Storm {
    rec: Rec,
    counts: RefCell<Counts>,
    resync: RefCell<Histogram<u64>>,
    attempts: RefCell<Histogram<u64>>,
    drop_ns: Cell<Option<u64>>,
    drop_notify: Notify,
}

impl Storm {
    fn error(&self, e: &anyhow::Error) {
        self.counts.borrow_mut().errors += 1;
        self.rec.error(e);
    }
}

/// How a reconnect reaches a pair task.
struct Reconnect {
    target: Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: String,
    source_index: u64,
    sources: u32,
    backoff: BackoffConfig,
}

impl Reconnect {
    /// Backs off, connects and says Hello until it works (bounded).
    async fn run(self, seed: u64, st: Rc<Storm>) -> anyhow::Result<(StarlingConn, u32)> {
        let mut b = Backoff::with_seed(self.backoff, seed);
        for attempt in 1..=64u32 {
            tokio::time::sleep(b.next_delay()).await;
            let dst = self.target.addr();
            let src = source_addr(self.source_index + u64::from(attempt), self.sources, dst);
            let r = async {
                let s =
                    Stream::connect(dst, src, self.tls.as_ref(), Duration::from_secs(10)).await?;
                let mut c = StarlingConn::new(s);
                c.hello(Some(&self.token)).await?;
                anyhow::Ok(c)
            }
            .await;
            match r {
                Ok(c) => return Ok((c, attempt)),
                Err(e) if attempt == 64 => return Err(e),
                Err(e) => {
                    if st.rec.errors.borrow().len() < 3 {
                        st.rec
                            .errors
                            .borrow_mut()
                            .push(format!("reconnect attempt failed (retrying): {e:#}"));
                    }
                }
            }
        }
        bail!("gave up reconnecting")
    }
}

/// One client of a pair.
struct Member {
    conn: Option<StarlingConn>,
    reconnecting: Option<tokio::task::JoinHandle<anyhow::Result<(StarlingConn, u32)>>>,
    /// The Sync in flight (its request id) until SyncDone.
    syncing: Option<u64>,
    user: u64,
    token: String,
    /// Schedule.
    offset_ns: u64,
    interval_ns: u64,
    n: u64,
    next_k: u64,
    /// Sent, not acknowledged: k → scheduled ns.
    unacked: BTreeMap<u64, u64>,
    /// To resend after a reconnect, in order.
    retry: VecDeque<u64>,
    acked: Vec<bool>,
    /// Received from the peer: k → seq.
    seen: HashMap<u64, u64>,
    conv: Option<u64>,
    last_seq: u64,
    ack_upto: Option<u64>,
    resynced: bool,
}

impl Member {
    fn sched(&self, start_ns: u64, k: u64) -> u64 {
        start_ns + self.offset_ns + k * self.interval_ns
    }

    fn ready(&self) -> bool {
        self.conn.is_some() && self.syncing.is_none()
    }
}

async fn read_opt(c: &mut Option<StarlingConn>) -> anyhow::Result<usize> {
    match c {
        Some(c) => c.read_some().await,
        None => std::future::pending().await,
    }
}

async fn join_opt(
    j: &mut Option<tokio::task::JoinHandle<anyhow::Result<(StarlingConn, u32)>>>,
) -> anyhow::Result<(StarlingConn, u32)> {
    match j {
        Some(h) => {
            let r = h.await.context("reconnect task panicked")?;
            *j = None;
            r
        }
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    start_ns: u64,
    end_ns: u64,
    drain_ns: u64,
    body_bytes: usize,
    inflight: usize,
    no_sync: bool,
}

fn worker(args: &StormArgs) -> anyhow::Result<()> {
    workers::watch_stdin();
    let target = Target::parse(&args.target)?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let accounts: Vec<Account> = AccountsFile::load(&args.accounts)?.accounts;
    let pairs = args.clients / 2;
    let (count, first) = args.w.share(pairs);
    let cpu0 = report::own_cpu_secs();
    let st = Rc::new(Storm {
        rec: Rec::new(clock::now(), 0),
        counts: RefCell::default(),
        resync: RefCell::new(report::histogram()),
        attempts: RefCell::new(report::histogram()),
        drop_ns: Cell::new(None),
        drop_notify: Notify::new(),
    });
    let backoff = BackoffConfig {
        base: Duration::from_millis(args.backoff_base_ms),
        cap: Duration::from_millis(args.backoff_cap_ms),
    };
    workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut conns = Vec::new();
                for i in 0..count {
                    let gi = first + i;
                    match connect_pair(gi, &target, tls.as_ref(), &accounts, args.sources).await {
                        Ok(PairConns::Starling(c, users, inflight)) => {
                            conns.push((gi, c, users, inflight));
                            st.counts.borrow_mut().connected_clients += 2;
                        }
                        Ok(PairConns::Mqtt(..)) => unreachable!("storm rejects MQTT targets"),
                        Err(e) => st.error(&e.context(format!("connecting pair {gi}"))),
                    }
                    if i % 64 == 0 {
                        workers::emit("progress", &*st.counts.borrow());
                    }
                }
                let now = st.rec.now_ns();
                let per_member_rate = args.rate / args.clients as f64;
                let interval_ns = if per_member_rate > 0.0 {
                    (1e9 / per_member_rate) as u64
                } else {
                    u64::MAX / 4
                };
                // The run ends `after_secs` after the drop; until the parent
                // signals, the end is open.
                let horizon = args.before_secs + args.after_secs + 120;
                let plan = Plan {
                    start_ns: now + 200_000_000,
                    end_ns: u64::MAX,
                    drain_ns: u64::MAX,
                    body_bytes: 100,
                    inflight: 0,
                    no_sync: args.no_sync,
                };
                let n_max = if per_member_rate > 0.0 {
                    (horizon as f64 * per_member_rate) as u64
                } else {
                    0
                };
                let mut tasks = Vec::new();
                for (gi, c, users, inflight) in conns {
                    let st = st.clone();
                    let mk = |m: u64, conn: StarlingConn| Member {
                        conn: Some(conn),
                        reconnecting: None,
                        syncing: None,
                        user: users[m as usize],
                        token: accounts[(2 * gi + m) as usize].access_token.clone(),
                        offset_ns: interval_ns.saturating_mul(2 * gi + m) / (args.clients).max(1),
                        interval_ns,
                        n: n_max,
                        next_k: 0,
                        unacked: BTreeMap::new(),
                        retry: VecDeque::new(),
                        acked: vec![false; n_max as usize],
                        seen: HashMap::new(),
                        conv: None,
                        last_seq: 0,
                        ack_upto: None,
                        resynced: false,
                    };
                    let [c0, c1] = c;
                    let members = [mk(0, c0), mk(1, c1)];
                    let rc = [0u64, 1].map(|m| Reconnect {
                        target: target.clone(),
                        tls: tls.clone(),
                        token: members[m as usize].token.clone(),
                        source_index: 1_000_000 + 2 * gi + m,
                        sources: args.sources,
                        backoff,
                    });
                    let timing = (args.after_secs, args.drain_secs);
                    tasks.push(tokio::task::spawn_local(async move {
                        if let Err(e) =
                            storm_pair(members, rc, inflight, plan, timing, gi, &st).await
                        {
                            st.error(&e);
                        }
                        st.counts.borrow_mut().finished_pairs += 1;
                    }));
                }
                let mut dropped = false;
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if !dropped && workers::signals() > 0 {
                        dropped = true;
                        st.drop_ns.set(Some(st.rec.now_ns()));
                        st.drop_notify.notify_waiters();
                    }
                    workers::emit("progress", &*st.counts.borrow());
                    if tasks.iter().all(tokio::task::JoinHandle::is_finished)
                        || workers::stop_requested()
                    {
                        break;
                    }
                }
            })
            .await;
    })?;
    let h = |x: &RefCell<Histogram<u64>>| HistData::of(&x.borrow());
    workers::emit(
        "result",
        &WorkerResult {
            counts: st.counts.borrow().clone(),
            resync_us: h(&st.resync),
            attempts: h(&st.attempts),
            ack_us: h(&st.rec.ack),
            deliver_us: h(&st.rec.deliver),
            cpu_secs: report::own_cpu_secs() - cpu0,
            errors: st.rec.errors.borrow().clone(),
        },
    );
    Ok(())
}

#[allow(clippy::too_many_lines, reason = "one state machine, read top-down")]
async fn storm_pair(
    mut ms: [Member; 2],
    rc: [Reconnect; 2],
    inflight_max: usize,
    mut plan: Plan,
    (after_secs, drain_secs): (u64, u64),
    gi: u64,
    st: &Rc<Storm>,
) -> anyhow::Result<()> {
    let inflight_max = if plan.inflight == 0 {
        inflight_max
    } else {
        plan.inflight
    }
    .max(1);
    let mut rc = rc.map(Some);
    let mut body = Vec::with_capacity(plan.body_bytes);
    let mut dropped = false;
    loop {
        // The drop: every client resets its connection at once.
        if !dropped && let Some(d) = st.drop_ns.get() {
            dropped = true;
            plan.end_ns = d + after_secs * 1_000_000_000;
            plan.drain_ns = plan.end_ns + drain_secs * 1_000_000_000;
            for (m, member) in ms.iter_mut().enumerate() {
                if let Some(c) = member.conn.take() {
                    c.stream.abort();
                }
                member.syncing = None;
                member.retry = member.unacked.keys().copied().collect();
                st.counts.borrow_mut().dropped += 1;
                let r = rc[m].take().context("reconnect used twice")?;
                let st2 = st.clone();
                let seed = gi * 2 + m as u64 + 1;
                member.reconnecting = Some(tokio::task::spawn_local(r.run(seed, st2)));
            }
        }
        let now = st.rec.now_ns();
        // Send what is due (retries first), on members that are ready.
        for m in 0..2 {
            let peer_user = ms[1 - m].user;
            let member = &mut ms[m];
            if !member.ready() {
                continue;
            }
            let (offset_ns, interval_ns) = (member.offset_ns, member.interval_ns);
            let sched_of = |k: u64| plan.start_ns + offset_ns + k * interval_ns;
            let Some(c) = member.conn.as_mut() else {
                continue;
            };
            let mut sent = 0;
            let mut retried = 0;
            loop {
                if member.unacked.len() >= inflight_max {
                    break;
                }
                let (k, first_attempt) = if let Some(k) = member.retry.pop_front() {
                    if member.acked[k as usize] {
                        continue;
                    }
                    retried += 1;
                    (k, false)
                } else {
                    if member.next_k >= member.n {
                        break;
                    }
                    let s = sched_of(member.next_k);
                    if s > now || s > plan.end_ns {
                        break;
                    }
                    member.next_k += 1;
                    (member.next_k - 1, true)
                };
                let sched = sched_of(k);
                write_body(&mut body, sched, k, m as u8, plan.body_bytes);
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&sched.to_le_bytes());
                id[8..].copy_from_slice(&k.to_le_bytes());
                let rid = c.rid();
                c.push(
                    rid,
                    Body::Send(v1::Send {
                        client_msg_id: bytes::Bytes::copy_from_slice(&id),
                        to: Some(v1::Recipient {
                            target: Some(v1::recipient::Target::UserId(peer_user)),
                        }),
                        content_type: "application/octet-stream".to_owned(),
                        body: bytes::Bytes::copy_from_slice(&body),
                        media: None,
                        reply_to_seq: 0,
                        first_attempt,
                        change: None,
                        set_timer: None,
                    }),
                )?;
                member.unacked.insert(k, sched);
                sent += 1;
            }
            let mut cn = st.counts.borrow_mut();
            cn.sent += sent;
            cn.retried += retried;
        }
        for member in &mut ms {
            if let Some(c) = member.conn.as_mut()
                && c.pending_write() > 0
                && let Err(e) = c.flush().await
            {
                bail!("write failed outside the storm: {e:#}");
            }
        }
        // Done?
        let sched_done = ms
            .iter()
            .all(|m| m.next_k >= m.n || m.sched(plan.start_ns, m.next_k) > plan.end_ns);
        let all_in = dropped
            && sched_done
            && ms
                .iter()
                .all(|m| m.resynced && m.unacked.is_empty() && m.retry.is_empty())
            && (0..2).all(|m| ms[m].seen.len() as u64 == ms[1 - m].next_k);
        if all_in || (dropped && now > plan.drain_ns) || workers::stop_requested() {
            let mut cn = st.counts.borrow_mut();
            cn.scheduled += ms.iter().map(|m| m.next_k).sum::<u64>();
            return Ok(());
        }
        let next = ms
            .iter()
            .filter(|m| m.ready() && m.next_k < m.n && m.unacked.len() < inflight_max)
            .map(|m| m.sched(plan.start_ns, m.next_k))
            .min()
            .unwrap_or(u64::MAX)
            .min(plan.drain_ns)
            .min(now + 1_000_000_000);
        let deadline = tokio::time::Instant::from_std(st.rec.epoch + Duration::from_nanos(next));
        let [m0, m1] = &mut ms;
        let event = tokio::select! {
            r = read_opt(&mut m0.conn) => Ev::Read(0, r),
            r = read_opt(&mut m1.conn) => Ev::Read(1, r),
            r = join_opt(&mut m0.reconnecting) => Ev::Reconnected(0, r),
            r = join_opt(&mut m1.reconnecting) => Ev::Reconnected(1, r),
            () = tokio::time::sleep_until(deadline) => Ev::Tick,
            () = st.drop_notify.notified(), if !dropped => Ev::Tick,
        };
        match event {
            Ev::Tick => {}
            Ev::Read(m, r) => {
                match r {
                    Ok(0) | Err(_) => {
                        bail!("client {m} of pair {gi}: the server closed the connection")
                    }
                    Ok(_) => {}
                }
                on_frames(&mut ms, m, &plan, st)?;
            }
            Ev::Reconnected(m, r) => {
                let (mut c, attempts) = r?;
                st.attempts
                    .borrow_mut()
                    .saturating_record(u64::from(attempts));
                if plan.no_sync {
                    ms[m].resynced = true;
                    resynced(st);
                } else {
                    let rid = c.rid();
                    let mut last_seq = BTreeMap::new();
                    if let Some(conv) = ms[m].conv {
                        last_seq.insert(conv, ms[m].last_seq);
                    }
                    c.push(rid, Body::Sync(v1::Sync { last_seq }))?;
                    c.flush().await?;
                    ms[m].syncing = Some(rid);
                }
                ms[m].conn = Some(c);
            }
        }
    }
}

enum Ev {
    Read(usize, anyhow::Result<usize>),
    Reconnected(usize, anyhow::Result<(StarlingConn, u32)>),
    Tick,
}

fn resynced(st: &Storm) {
    if let Some(d) = st.drop_ns.get() {
        let now = st.rec.now_ns();
        st.resync
            .borrow_mut()
            .saturating_record(now.saturating_sub(d) / 1000);
    }
    st.counts.borrow_mut().resynced += 1;
}

fn on_frames(ms: &mut [Member; 2], m: usize, plan: &Plan, st: &Storm) -> anyhow::Result<()> {
    let now = st.rec.now_ns();
    let Some(c) = ms[m].conn.as_mut() else {
        return Ok(());
    };
    let mut frames = Vec::new();
    while let Some(f) = c.next_frame()? {
        frames.push(f);
    }
    for f in frames {
        let rid = f.request_id;
        match f.body {
            Some(Body::SendAck(a)) => {
                let k = a
                    .client_msg_id
                    .get(8..16)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .context("SendAck with a foreign client_msg_id")?;
                let me = &mut ms[m];
                if let Some(sched) = me.unacked.remove(&k) {
                    st.rec.record(&st.rec.ack, sched, now);
                    if let Some(slot) = me.acked.get_mut(k as usize) {
                        *slot = true;
                    }
                    st.counts.borrow_mut().acked += 1;
                } else {
                    st.counts.borrow_mut().ack_duplicates += 1;
                }
            }
            Some(Body::Deliver(d)) => {
                let msg = d.message.context("Deliver without a message")?;
                let (sched, k, dir) = read_body(&msg.body).context("Deliver of a foreign body")?;
                let me = &mut ms[m];
                if usize::from(dir) == m {
                    // Our own message (a Sync streams the whole conversation).
                    me.last_seq = me.last_seq.max(msg.seq);
                    continue;
                }
                me.conv = Some(msg.conversation_id);
                me.last_seq = me.last_seq.max(msg.seq);
                me.ack_upto = Some(me.last_seq);
                match me.seen.insert(k, msg.seq) {
                    None => {
                        st.rec.record(&st.rec.deliver, sched, now);
                        st.counts.borrow_mut().delivered += 1;
                    }
                    Some(seq) if seq == msg.seq => st.counts.borrow_mut().redelivered_same_seq += 1,
                    Some(_) => st.counts.borrow_mut().accepted_twice += 1,
                }
            }
            Some(Body::SyncDone(_)) if ms[m].syncing == Some(rid) => {
                ms[m].syncing = None;
                ms[m].resynced = true;
                resynced(st);
            }
            Some(Body::Receipt(_)) => {}
            Some(Body::Ping(p)) => {
                if let Some(c) = ms[m].conn.as_mut() {
                    c.push(0, Body::Pong(v1::Pong { nonce: p.nonce }))?;
                }
            }
            Some(Body::Error(e)) => {
                if e.code == v1::ErrorCode::Unavailable as i32 {
                    bail!(
                        "the server answered with UNAVAILABLE ({}): messaging is not wired into \
                         this server yet; run with --rate 0 --no-sync to measure reconnects only",
                        describe_error(&e)
                    );
                }
                bail!("server error: {}", describe_error(&e));
            }
            Some(Body::Goodbye(g)) => bail!("server said Goodbye: {}", g.message),
            _ => {}
        }
    }
    let me = &mut ms[m];
    if let (Some(conv), Some(upto), Some(c)) = (me.conv, me.ack_upto.take(), me.conn.as_mut()) {
        c.push(
            0,
            Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: conv,
                up_to_seq: upto,
            }),
        )?;
    }
    let _ = plan;
    Ok(())
}
