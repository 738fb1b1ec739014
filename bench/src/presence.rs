//! `starling-bench presence`: how long a presence change takes to reach its followers.
//!
//! `--users` connections (the followed users) and `--watchers` connections (the followers, each
//! a user of its own) are opened. Each watcher follows `--follows` users (watcher `w` follows
//! users `w × follows + j` modulo `--users`): it first sends each of them one message (a direct
//! conversation makes them visible to each other), then subscribes to them all. Then every
//! followed user goes off line (its connection is closed) and back on line (a new connection:
//! TLS, Hello with its token) in turn, one change per user per `--flip-ms`, the users' changes
//! spread evenly over that period, for `--secs` (the first `--warmup-ms` are not recorded).
//!
//! A change's time is taken by the client as it acts: just before it closes the connection, and
//! just before it sends the Hello of the new one (after the TLS handshake). Each watcher matches
//! every `PresenceUpdate` it reads with the latest change of that user to that state made
//! before the read, and records the time between them: change → update at the watcher, server
//! coalescing (`router.presence_coalesce_ms`) included. The report gives the percentiles, the
//! updates expected (recorded changes × followers of the user) and those that came.
//!
//! Accounts come from `starling-bench register` (users + watchers; the first `--users` are the
//! followed users). One thread drives every connection.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use starling_protocol::v1::{self, frame::Body};

use crate::accounts::{Account, AccountsFile};
use crate::clock::{self, Stopwatch};
use crate::net::{StarlingConn, Stream, Target, describe_error, source_addr, tls_for};
use crate::report::{self, Machine, Summary};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct PresenceArgs {
    /// tls://IP:PORT or plain://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Starling's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (users + watchers accounts).
    #[arg(long, default_value = "bench-accounts.json")]
    accounts: PathBuf,
    /// Followed users, each going off and on line.
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// Followers, each on a connection of its own.
    #[arg(long, default_value_t = 10_000)]
    watchers: u64,
    /// Users each watcher follows.
    #[arg(long, default_value_t = 1)]
    follows: u64,
    /// Each user changes (off line, or back on line) once per this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    flip_ms: u64,
    /// Seconds of changes.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Changes in the first milliseconds are not recorded.
    #[arg(long, default_value_t = 5000)]
    warmup_ms: u64,
    /// Connections set up at once.
    #[arg(long, default_value_t = 128)]
    setup_concurrency: usize,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    sources: u32,
    /// The server's pid, to measure its CPU while changes run.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One change of a user: when, to which state, and whether it is recorded.
#[derive(Debug, Clone, Copy)]
struct Change {
    at: Instant,
    online: bool,
    recorded: bool,
}

/// Shared by the run's tasks (one thread).
#[derive(Debug)]
struct State {
    /// Changes are recorded now.
    recording: Cell<bool>,
    /// The run is over.
    stop: Cell<bool>,
    /// Per user id, their changes (oldest first).
    changes: RefCell<HashMap<u64, Vec<Change>>>,
    tally: RefCell<Tally>,
}

#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    recorded_changes: u64,
    updates: u64,
    matched: u64,
    unmatched: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// The measured outcome.
#[derive(Debug, Serialize)]
struct Outcome {
    change_to_update_us: Summary,
    recorded_changes: u64,
    updates_expected: u64,
    updates_matched: u64,
    updates_total: u64,
    updates_unmatched: u64,
    setup_secs: f64,
    server_cpu_cores: Option<f64>,
    errors: u64,
    first_error: Option<String>,
}

pub(crate) fn run(args: &PresenceArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(!target.is_mqtt(), "presence talks to Starling");
    anyhow::ensure!(
        args.users > 0 && args.watchers > 0 && args.follows > 0 && args.follows <= args.users,
        "--users, --watchers must be > 0 and --follows between 1 and --users"
    );
    anyhow::ensure!(
        args.follows <= 1000,
        "--follows: one SubscribePresence names at most 1,000 users"
    );
    anyhow::ensure!(
        args.flip_ms >= 100 && args.secs > 0 && args.warmup_ms < args.secs * 1000,
        "--flip-ms must be at least 100, --secs > 0 and --warmup-ms shorter than the run"
    );
    let accounts = AccountsFile::load(&args.accounts)?;
    let need = (args.users + args.watchers) as usize;
    accounts.need(need, &args.accounts)?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let machine = Machine::now();
    let accounts = &accounts.accounts[..need];
    let out = crate::workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local.run_until(run_all(args, &target, tls, accounts)).await
    })??;
    print_outcome(args, &out);
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "presence",
                "params": args,
                "machine": machine,
                "outcome": out,
            }),
        )?;
    }
    if out.updates_matched == 0 {
        bail!(
            "no presence update reached a watcher: {}",
            out.first_error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

async fn connect(
    target: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    index: u64,
    sources: u32,
    acc: &Account,
) -> anyhow::Result<StarlingConn> {
    let src = source_addr(index, sources, target.addr());
    let timeout = Duration::from_secs(30);
    StarlingConn::open_authenticated(
        target.addr(),
        src,
        tls,
        timeout,
        &acc.access_token,
        &acc.email,
    )
    .await
}

async fn run_all(
    args: &PresenceArgs,
    target: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    accounts: &[Account],
) -> anyhow::Result<Outcome> {
    let st = Rc::new(State {
        recording: Cell::new(false),
        stop: Cell::new(false),
        changes: RefCell::new(HashMap::new()),
        tally: RefCell::new(Tally {
            latency: report::histogram(),
            recorded_changes: 0,
            updates: 0,
            matched: 0,
            unmatched: 0,
            errors: 0,
            first_error: None,
        }),
    });
    let (users, watchers) = accounts.split_at(args.users as usize);
    let setup = Stopwatch::start();
    report::progress("presence: connecting the followed users");
    let mut user_conns = Vec::with_capacity(users.len());
    for (i, u) in users.iter().enumerate() {
        user_conns.push(connect(target, tls.as_ref(), i as u64, args.sources, u).await?);
    }
    // The watchers: a message to each followed user, then one SubscribePresence.
    let sem = Rc::new(tokio::sync::Semaphore::new(args.setup_concurrency.max(1)));
    let mut setups = Vec::with_capacity(watchers.len());
    for (w, acc) in watchers.iter().enumerate() {
        let follows: Vec<u64> = (0..args.follows)
            .map(|j| users[((w as u64 * args.follows + j) % args.users) as usize].user_id)
            .collect();
        let (sem, target, tls, acc) = (sem.clone(), target.clone(), tls.clone(), acc.clone());
        let index = args.users + w as u64;
        let sources = args.sources;
        setups.push(tokio::task::spawn_local(async move {
            let _permit = sem.acquire().await?;
            let mut c = connect(&target, tls.as_ref(), index, sources, &acc).await?;
            for (j, &u) in follows.iter().enumerate() {
                let mut cmid = [0u8; 16];
                cmid[..8].copy_from_slice(&index.to_le_bytes());
                cmid[8..12].copy_from_slice(&(j as u32).to_le_bytes());
                cmid[12] = 0x9E;
                let send = Body::Send(v1::Send {
                    client_msg_id: Bytes::copy_from_slice(&cmid),
                    to: Some(v1::Recipient {
                        target: Some(v1::recipient::Target::UserId(u)),
                    }),
                    content_type: "text/plain".to_owned(),
                    body: Bytes::from_static(b"presence bench"),
                    first_attempt: true,
                    ..v1::Send::default()
                });
                match c.request(send).await? {
                    Body::SendAck(_) => {}
                    Body::Error(e) => bail!("a watcher's Send: {}", describe_error(&e)),
                    other => bail!("unexpected answer to Send: {}", other.kind().name()),
                }
            }
            let sub = Body::SubscribePresence(v1::SubscribePresence {
                user_ids: follows.clone(),
            });
            match c.request(sub).await? {
                Body::PresenceSnapshot(_) => {}
                Body::Error(e) => bail!("SubscribePresence: {}", describe_error(&e)),
                other => bail!(
                    "unexpected answer to SubscribePresence: {}",
                    other.kind().name()
                ),
            }
            anyhow::Ok(c)
        }));
    }
    let mut tasks = Vec::new();
    for (w, s) in setups.into_iter().enumerate() {
        if w % 1000 == 0 {
            report::progress(&format!("presence: watchers set up: {w}/{}", args.watchers));
        }
        let c = s.await.context("a watcher's setup task")??;
        tasks.push(tokio::task::spawn_local(watch(c, st.clone())));
    }
    let setup_secs = setup.elapsed_secs();
    report::progress("presence: changes running");
    let start = clock::now();
    let recording_from = start + Duration::from_millis(args.warmup_ms);
    let end = start + Duration::from_secs(args.secs);
    let flip = Duration::from_millis(args.flip_ms);
    for (i, (c, acc)) in user_conns.into_iter().zip(users).enumerate() {
        let offset = flip.mul_f64(i as f64 / args.users as f64);
        tasks.push(tokio::task::spawn_local(flip_user(
            c,
            acc.clone(),
            i as u64,
            FlipPlan {
                target: target.clone(),
                tls: tls.clone(),
                sources: args.sources,
                first: start + offset,
                every: flip,
                end,
                recording_from,
            },
            st.clone(),
        )));
    }
    let cpu0 = args.server_pid.and_then(report::cpu_secs);
    tokio::time::sleep_until(tokio::time::Instant::from_std(recording_from)).await;
    let cpu_sw = Stopwatch::start();
    st.recording.set(true);
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    st.recording.set(false);
    let cpu_secs = cpu_sw.elapsed_secs();
    let cpu = cpu0
        .zip(args.server_pid.and_then(report::cpu_secs))
        .map(|(a, b)| (b - a) / cpu_secs.max(1e-9));
    // The last updates: at most a coalescing interval and a few turns late.
    tokio::time::sleep(Duration::from_secs(2)).await;
    st.stop.set(true);
    report::progress_done();
    for t in tasks {
        t.abort();
    }
    let t = st.tally.borrow();
    let per_user = args.watchers * args.follows / args.users;
    Ok(Outcome {
        change_to_update_us: Summary::of(&t.latency),
        recorded_changes: t.recorded_changes,
        updates_expected: t.recorded_changes * per_user,
        updates_matched: t.matched,
        updates_total: t.updates,
        updates_unmatched: t.unmatched,
        setup_secs,
        server_cpu_cores: cpu,
        errors: t.errors,
        first_error: t.first_error.clone(),
    })
}

/// Reads a watcher's connection: every PresenceUpdate is matched with its change; a Ping every
/// 20 s keeps the connection alive.
async fn watch(mut c: StarlingConn, st: Rc<State>) {
    let mut ping = tokio::time::interval(Duration::from_secs(20));
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if c.push(0, Body::Ping(v1::Ping { nonce: 1 })).is_err() || c.flush().await.is_err() {
                    return;
                }
            }
            r = c.read_some() => {
                if !matches!(r, Ok(n) if n > 0) {
                    if !st.stop.get() {
                        st.tally.borrow_mut().error("the server closed a watcher's connection".into());
                    }
                    return;
                }
                let now = clock::now();
                while let Ok(Some(f)) = c.next_frame() {
                    if let Some(Body::PresenceUpdate(u)) = f.body {
                        matched(&st, &u, now);
                    }
                }
            }
        }
    }
}

/// Records the time from `u`'s change to `now`, if the change was recorded.
fn matched(st: &State, u: &v1::PresenceUpdate, now: Instant) {
    let online = u.state != v1::PresenceState::Offline as i32;
    let changes = st.changes.borrow();
    let change = changes.get(&u.user_id).and_then(|cs| {
        cs.iter()
            .rev()
            .find(|c| c.online == online && c.at <= now)
            .copied()
    });
    let mut t = st.tally.borrow_mut();
    t.updates += 1;
    match change {
        Some(c) if c.recorded => {
            t.matched += 1;
            let us = u64::try_from(now.duration_since(c.at).as_micros()).unwrap_or(u64::MAX);
            t.latency.saturating_record(us);
        }
        Some(_) => {}
        None => t.unmatched += 1,
    }
}

/// When and how one followed user changes.
struct FlipPlan {
    target: Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    sources: u32,
    first: Instant,
    every: Duration,
    end: Instant,
    recording_from: Instant,
}

/// One followed user: off line, on line, off line, ... at `plan`'s times; while on line it reads
/// (and drops) what comes and pings.
async fn flip_user(c: StarlingConn, acc: Account, index: u64, plan: FlipPlan, st: Rc<State>) {
    let mut conn = Some(c);
    let mut next = plan.first;
    let mut ping = tokio::time::interval(Duration::from_secs(20));
    loop {
        if next >= plan.end {
            // Done changing; keep reading until aborted.
            next = plan.end + Duration::from_secs(3600);
        }
        tokio::select! {
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {
                let recorded = next >= plan.recording_from && next < plan.end;
                match conn.take() {
                    Some(c) => {
                        note(&st, acc.user_id, false, recorded);
                        c.stream.abort();
                    }
                    None => {
                        let src = source_addr(index, plan.sources, plan.target.addr());
                        let stream = match Stream::connect(plan.target.addr(), src, plan.tls.as_ref(), Duration::from_secs(30)).await {
                            Ok(s) => s,
                            Err(e) => {
                                st.tally.borrow_mut().error(format!("reconnecting: {e:#}"));
                                return;
                            }
                        };
                        let mut c = StarlingConn::new(stream);
                        note(&st, acc.user_id, true, recorded);
                        if let Err(e) = c.hello(Some(&acc.access_token)).await {
                            st.tally.borrow_mut().error(format!("Hello: {e:#}"));
                            return;
                        }
                        conn = Some(c);
                    }
                }
                next += plan.every;
            }
            _ = ping.tick(), if conn.is_some() => {
                if let Some(c) = conn.as_mut()
                    && (c.push(0, Body::Ping(v1::Ping { nonce: 2 })).is_err() || c.flush().await.is_err())
                {
                    st.tally.borrow_mut().error("a user's ping failed".into());
                    return;
                }
            }
            r = async { conn.as_mut().expect("guarded").read_some().await }, if conn.is_some() => {
                if !matches!(r, Ok(n) if n > 0) {
                    if !st.stop.get() {
                        st.tally.borrow_mut().error("the server closed a user's connection".into());
                    }
                    return;
                }
                if let Some(c) = conn.as_mut() {
                    while let Ok(Some(_)) = c.next_frame() {}
                }
            }
        }
    }
}

fn note(st: &State, user: u64, online: bool, recorded: bool) {
    st.changes
        .borrow_mut()
        .entry(user)
        .or_default()
        .push(Change {
            at: clock::now(),
            online,
            recorded,
        });
    if recorded {
        st.tally.borrow_mut().recorded_changes += 1;
    }
}

fn print_outcome(args: &PresenceArgs, out: &Outcome) {
    println!();
    println!("target            {}", args.target);
    println!(
        "workload          {} users, {} watchers following {} each; a change per user every {} ms for {} s (first {} ms not recorded)",
        args.users, args.watchers, args.follows, args.flip_ms, args.secs, args.warmup_ms
    );
    println!("setup             {:.1} s", out.setup_secs);
    println!(
        "updates           {} recorded changes, {} updates expected, {} matched ({:.2}%), {} in all, {} unmatched",
        out.recorded_changes,
        out.updates_expected,
        out.updates_matched,
        100.0 * out.updates_matched as f64 / out.updates_expected.max(1) as f64,
        out.updates_total,
        out.updates_unmatched
    );
    if let Some(c) = out.server_cpu_cores {
        println!("server CPU        {c:.2} cores");
    }
    report::print_latency_table(&[("change → update", &out.change_to_update_us)]);
    if let Some(e) = &out.first_error {
        println!("first error       {e}");
    }
}
