//! `starling-bench connections`: open and hold N authenticated connections
//! (TLS or plain) spread over `--procs` load-generator processes and
//! 127.0.0.x source addresses, with heartbeats, for a while; report the
//! connect rate, failures, the server's memory per connection (RSS growth
//! over connections, from `/proc/PID/status`) and the kernel's socket
//! memory (`/proc/net/sockstat`).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use starling_protocol::v1::{self, frame::Body};
use tokio::sync::Notify;

use crate::accounts::AccountsFile;
use crate::clock::{self, Stopwatch};
use crate::net::{StarlingConn, Stream, Target, source_addr, tls_for};
use crate::report::{self, HistData, Machine, SockStat, Summary};
use crate::workers::{self, Tally, WorkerArgs, Workers};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct ConnectionsArgs {
    /// Starling server: tls://IP:PORT or plain://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The server's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (tokens are reused
    /// round-robin: the server allows many connections per session).
    #[arg(long, default_value = "bench-accounts.json")]
    accounts: PathBuf,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 20)]
    hold_secs: u64,
    /// Ping interval per connection in ms (0: the server's Welcome.limits.heartbeat_ms).
    #[arg(long, default_value_t = 0)]
    heartbeat_ms: u64,
    /// Connection attempts in flight per process.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Give up opening after this many seconds.
    #[arg(long, default_value_t = 120)]
    open_timeout_secs: u64,
    /// The server's pid, to measure its RSS and CPU.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Source addresses to spread connections over (127.0.0.2 ..).
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
struct Progress {
    opened: u64,
    failed: u64,
    open_now: u64,
    closed_by_server: u64,
    pings: u64,
    pongs: u64,
    holding: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    progress: Progress,
    connect_us: HistData,
    errors: Vec<String>,
    cpu_secs: f64,
    open_secs: f64,
}

pub(crate) fn run(args: &ConnectionsArgs) -> anyhow::Result<()> {
    if args.w.worker.is_some() {
        return worker(args);
    }
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(
        !target.is_mqtt(),
        "connections talks to Starling (tls:// or plain://)"
    );
    let per_proc = args.count.div_ceil(u64::from(args.w.procs.max(1)));
    if per_proc > 19_000 {
        bail!(
            "{per_proc} connections per process is over the 20,000 open-file cap: use --procs {}",
            args.count.div_ceil(19_000)
        );
    }
    let accounts = AccountsFile::load(&args.accounts)?;
    accounts.need(1, &args.accounts)?;
    let machine = Machine::now();
    let sock0 = SockStat::read();
    let slab0 = report::socket_slab_bytes();
    let rss0 = args.server_pid.and_then(report::rss_kib);
    let sw = Stopwatch::start();
    let mut ws = Workers::spawn(args.w.procs)?;
    let procs = args.w.procs as usize;
    let mut tally: Tally<Progress, WorkerResult> = Tally::new(procs);
    let mut open_secs = None;
    let mut sampled: Option<(Option<u64>, SockStat, Option<f64>, Stopwatch)> = None;
    let mut slab1 = None;
    let mut after_hold = None;
    let hold = Duration::from_secs(args.hold_secs);
    loop {
        if let Some(m) = ws.recv(Duration::from_millis(200))? {
            tally.apply(&m, |r| &r.progress)?;
        }
        let t: Progress = sum(&tally.progress);
        let all_holding = tally.progress.iter().all(|p| p.holding);
        if all_holding && open_secs.is_none() {
            open_secs = Some(sw.elapsed_secs());
        }
        // Let the server settle one second after the last connect, then sample.
        if let Some(o) = open_secs
            && sampled.is_none()
            && sw.elapsed_secs() > o + 1.0
        {
            slab1 = report::socket_slab_bytes();
            sampled = Some((
                args.server_pid.and_then(report::rss_kib),
                SockStat::read(),
                args.server_pid.and_then(report::cpu_secs),
                Stopwatch::start(),
            ));
        }
        if let Some((_, _, _, held)) = &sampled
            && after_hold.is_none()
            && held.elapsed() >= hold
        {
            after_hold = Some((
                args.server_pid.and_then(report::rss_kib),
                args.server_pid.and_then(report::cpu_secs),
                held.elapsed_secs(),
            ));
            ws.stop_all();
        }
        report::progress(&format!(
            "connections: {:.0}s opened {}/{} failed {} open {} server-closed {} pings {} pongs {}{}",
            sw.elapsed_secs(),
            t.opened,
            args.count,
            t.failed,
            t.open_now,
            t.closed_by_server,
            t.pings,
            t.pongs,
            if sampled.is_some() { " [holding]" } else { "" }
        ));
        if tally.all_done() {
            break;
        }
    }
    report::progress_done();
    ws.wait()?;
    let results: Vec<WorkerResult> = tally.into_results();
    let mut connect = report::histogram();
    for r in &results {
        r.connect_us.merge_into(&mut connect);
    }
    let total = sum(&results
        .iter()
        .map(|r| r.progress.clone())
        .collect::<Vec<_>>());
    let open_secs = open_secs.unwrap_or_else(|| sw.elapsed_secs());
    let (rss1, sock1, cpu1) = sampled
        .as_ref()
        .map_or((None, SockStat::read(), None), |s| (s.0, s.1, s.2));
    let (rss2, cpu2, held_secs) = after_hold.unwrap_or((None, None, 0.0));
    let held = total.opened.saturating_sub(total.closed_by_server).max(1);
    let rss_per_conn = match (rss0, rss1) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a) * 1024) as f64 / held as f64),
        _ => None,
    };
    let sock_bytes_per_conn =
        (sock1.tcp_mem_pages as f64 - sock0.tcp_mem_pages as f64) * 4096.0 / held as f64;
    let slab_bytes_per_conn = slab0
        .zip(slab1)
        .map(|(a, b)| (b as f64 - a as f64) / held as f64);
    let server_cpu_hold = match (cpu1, cpu2) {
        (Some(a), Some(b)) if held_secs > 0.0 => Some((b - a) / held_secs),
        _ => None,
    };
    let lg_cpu: f64 = results.iter().map(|r| r.cpu_secs).sum();
    let report = serde_json::json!({
        "subcommand": "connections",
        "params": args,
        "machine": machine,
        "loadavg_1m_end": report::loadavg(),
        "opened": total.opened,
        "failed": total.failed,
        "closed_by_server": total.closed_by_server,
        "pings": total.pings,
        "pongs": total.pongs,
        "open_secs": open_secs,
        "connect_rate_per_s": total.opened as f64 / open_secs.max(1e-3),
        "connect_latency_us": Summary::of(&connect),
        "server_rss_kib": {"before": rss0, "all_open": rss1, "after_hold": rss2},
        "server_rss_bytes_per_conn": rss_per_conn,
        "sockstat": {"before": sock0, "all_open": sock1},
        "kernel_socket_buffer_bytes_per_conn_both_ends": sock_bytes_per_conn,
        "kernel_socket_slab_bytes_per_conn_both_ends": slab_bytes_per_conn,
        "server_cpu_cores_while_holding": server_cpu_hold,
        "loadgen_cpu_secs": lg_cpu,
        "errors": results.iter().flat_map(|r| r.errors.clone()).take(20).collect::<Vec<_>>(),
    });
    println!();
    println!("target              {}", args.target);
    println!(
        "connections opened  {} of {} ({} failed, {} closed by the server)",
        total.opened, args.count, total.failed, total.closed_by_server
    );
    println!(
        "connect rate        {:.0}/s over {:.1} s ({} processes)",
        total.opened as f64 / open_secs.max(1e-3),
        open_secs,
        args.w.procs
    );
    if let (Some(a), Some(b), Some(per)) = (rss0, rss1, rss_per_conn) {
        println!("server RSS          {a} KiB -> {b} KiB: {per:.0} bytes per connection");
    }
    println!(
        "kernel TCP buffers  {} -> {} pages: {sock_bytes_per_conn:.0} bytes per connection (both ends of loopback)",
        sock0.tcp_mem_pages, sock1.tcp_mem_pages
    );
    if let Some(s) = slab_bytes_per_conn {
        println!(
            "kernel socket slabs {s:.0} bytes per connection (TCP, sock_inode, filp, epoll; both ends)"
        );
    }
    if let Some(c) = server_cpu_hold {
        println!("server CPU holding  {:.1}% of a core", c * 100.0);
    }
    println!("pings / pongs       {} / {}", total.pings, total.pongs);
    report::print_latency_table(&[("connect+hello", &Summary::of(&connect))]);
    for e in results.iter().flat_map(|r| r.errors.iter()).take(5) {
        println!("error: {e}");
    }
    if let Some(p) = &args.json {
        report::write_json(p, &report)?;
    }
    Ok(())
}

fn sum(v: &[Progress]) -> Progress {
    let mut t = Progress::default();
    for p in v {
        t.opened += p.opened;
        t.failed += p.failed;
        t.open_now += p.open_now;
        t.closed_by_server += p.closed_by_server;
        t.pings += p.pings;
        t.pongs += p.pongs;
    }
    t
}

#[derive(Debug, Default)]
struct Shared {
    prog: RefCell<Progress>,
    errors: RefCell<Vec<String>>,
    stop: Cell<bool>,
    stop_notify: Notify,
}

impl Shared {
    fn error(&self, e: &anyhow::Error) {
        let mut errs = self.errors.borrow_mut();
        if errs.len() < 10 {
            errs.push(format!("{e:#}"));
        }
    }
}

fn worker(args: &ConnectionsArgs) -> anyhow::Result<()> {
    workers::watch_stdin();
    let target = Target::parse(&args.target)?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let accounts = AccountsFile::load(&args.accounts)?;
    let tokens: Rc<Vec<String>> = Rc::new(
        accounts
            .accounts
            .into_iter()
            .map(|a| a.access_token)
            .collect(),
    );
    let (count, first) = args.w.share(args.count);
    let cpu0 = report::own_cpu_secs();
    let r = workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(worker_main(args, target, tls, tokens, count, first))
            .await
    })?;
    let (progress, connect, errors, open_secs) = r?;
    workers::emit(
        "result",
        &WorkerResult {
            progress,
            connect_us: HistData::of(&connect),
            errors,
            cpu_secs: report::own_cpu_secs() - cpu0,
            open_secs,
        },
    );
    Ok(())
}

type WorkerOut = (Progress, Histogram<u64>, Vec<String>, f64);

async fn worker_main(
    args: &ConnectionsArgs,
    target: Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    tokens: Rc<Vec<String>>,
    count: u64,
    first: u64,
) -> anyhow::Result<WorkerOut> {
    let shared = Rc::new(Shared::default());
    let hist = Rc::new(RefCell::new(report::histogram()));
    let next = Rc::new(Cell::new(0u64));
    let sw = Stopwatch::start();
    let open_deadline = Duration::from_secs(args.open_timeout_secs);
    let mut lanes = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (shared, hist, next, tls, tokens, target) = (
            shared.clone(),
            hist.clone(),
            next.clone(),
            tls.clone(),
            tokens.clone(),
            target.clone(),
        );
        let hb = args.heartbeat_ms;
        let sources = args.sources;
        lanes.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= count || shared.stop.get() || sw.elapsed() > open_deadline {
                    break;
                }
                next.set(i + 1);
                let gi = first + i;
                let token = &tokens[(gi % tokens.len() as u64) as usize];
                let t = Stopwatch::start();
                let r = async {
                    let src = source_addr(gi, sources, target.addr());
                    let s =
                        Stream::connect(target.addr(), src, tls.as_ref(), Duration::from_secs(20))
                            .await?;
                    let mut c = StarlingConn::new(s);
                    let w = c.hello(Some(token)).await?;
                    anyhow::Ok((c, w))
                }
                .await;
                match r {
                    Ok((c, w)) => {
                        hist.borrow_mut()
                            .saturating_record(t.elapsed().as_micros() as u64);
                        {
                            let mut p = shared.prog.borrow_mut();
                            p.opened += 1;
                            p.open_now += 1;
                        }
                        let server_hb = w.limits.map_or(30_000, |l| u64::from(l.heartbeat_ms));
                        let every = Duration::from_millis(if hb == 0 { server_hb } else { hb });
                        tokio::task::spawn_local(hold(c, every, gi, shared.clone()));
                    }
                    Err(e) => {
                        shared.prog.borrow_mut().failed += 1;
                        shared.error(&e);
                    }
                }
            }
        }));
    }
    let mut opened_at = None;
    // Safety cap: a worker never runs longer than this.
    let cap = open_deadline + Duration::from_secs(args.hold_secs + 120);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if opened_at.is_none() && lanes.iter().all(tokio::task::JoinHandle::is_finished) {
            opened_at = Some(sw.elapsed_secs());
            shared.prog.borrow_mut().holding = true;
        }
        workers::emit("progress", &*shared.prog.borrow());
        if workers::stop_requested() || sw.elapsed() > cap {
            break;
        }
    }
    shared.stop.set(true);
    shared.stop_notify.notify_waiters();
    // Let the holders close.
    for _ in 0..50 {
        if shared.prog.borrow().open_now == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = shared.prog.borrow().clone();
    let h = hist.borrow().clone();
    let errs = shared.errors.borrow().clone();
    Ok((p, h, errs, opened_at.unwrap_or_else(|| sw.elapsed_secs())))
}

/// Holds one connection: answers server Pings, sends a Ping every `every`
/// (first one at a per-connection offset so they do not all fire at once).
async fn hold(mut c: StarlingConn, every: Duration, index: u64, shared: Rc<Shared>) {
    let offset = Duration::from_millis((index * 7919) % every.as_millis().max(1) as u64);
    let mut next_ping = clock::now() + offset;
    let mut nonce = 0u64;
    let why: anyhow::Result<()> = async {
        loop {
            if shared.stop.get() {
                return Ok(());
            }
            let deadline = tokio::time::Instant::from_std(next_ping);
            tokio::select! {
                n = c.read_some() => {
                    if n? == 0 {
                        bail!("server closed the connection");
                    }
                    while let Some(f) = c.next_frame()? {
                        match f.body {
                            Some(Body::Pong(_)) => shared.prog.borrow_mut().pongs += 1,
                            Some(Body::Ping(p)) => {
                                c.push(0, Body::Pong(v1::Pong { nonce: p.nonce }))?;
                            }
                            Some(Body::Goodbye(g)) => bail!("Goodbye: {}", g.message),
                            _ => {}
                        }
                    }
                    c.release_buffer();
                    if c.pending_write() > 0 {
                        c.flush().await?;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    nonce += 1;
                    c.push(0, Body::Ping(v1::Ping { nonce }))?;
                    c.flush().await?;
                    shared.prog.borrow_mut().pings += 1;
                    next_ping += every;
                }
                () = shared.stop_notify.notified() => return Ok(()),
            }
        }
    }
    .await;
    {
        let mut p = shared.prog.borrow_mut();
        p.open_now -= 1;
        if why.is_err() && !shared.stop.get() {
            p.closed_by_server += 1;
        }
    }
    if let Err(e) = why
        && !shared.stop.get()
    {
        shared.error(&e);
    }
}
