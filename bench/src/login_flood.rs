//! `starling-bench login-flood`: what a flood of password logins costs
//! everyone else.
//!
//! Two phases of `--duration-secs` each: first without a flood (baseline),
//! then with one. In both, `--pairs` pairs of signed-in connections (from
//! the accounts file) send to each other at `--msg-rate` messages per second
//! in all, and a prober opens `--hello-rate` new connections per second
//! (TCP, TLS 1.3, anonymous Hello → Welcome). During the flood phase,
//! `--flood-conns` unauthenticated connections, spread over `--sources`
//! loopback addresses, send `Login{password}` for unknown e-mail addresses
//! at `--flood-rate` logins per second in all (each connection waits for
//! the answer to one login before its next, as the server answers a
//! connection's requests in order).
//!
//! Measured per phase: Send → SendAck (from the send's scheduled time, so a
//! stalled server shows as latency rather than as less load), connect →
//! Welcome and Hello → Welcome of the probes; for the flood, how its logins
//! were answered (checked: INVALID_CREDENTIALS; refused: RATE_LIMITED by
//! reason) and how fast. The measuring and the flooding run on two threads
//! of the load generator, so a busy flood does not delay the measurements'
//! clocks. The first second of each phase is not recorded.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use starling_protocol::v1::{self, frame::Body};
use tokio::io::AsyncWriteExt as _;

use crate::accounts::AccountsFile;
use crate::clock::{self, Stopwatch};
use crate::net::{StarlingConn, Stream, Target, describe_error, source_addr, tls_for};
use crate::report::{self, Machine, Summary};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct LoginFloodArgs {
    /// Starling TLS listener: tls://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The server's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (2 per pair).
    #[arg(long, default_value = "bench-accounts.json")]
    accounts: PathBuf,
    /// Pairs of signed-in connections exchanging messages.
    #[arg(long, default_value_t = 10)]
    pairs: u64,
    /// Messages per second over all pairs and both directions.
    #[arg(long, default_value_t = 200.0)]
    msg_rate: f64,
    /// New connections (TLS + Hello) per second from the prober.
    #[arg(long, default_value_t = 5.0)]
    hello_rate: f64,
    /// Unauthenticated connections sending password logins in the flood phase.
    #[arg(long, default_value_t = 32)]
    flood_conns: u64,
    /// Password logins per second over all flooding connections.
    #[arg(long, default_value_t = 100.0)]
    flood_rate: f64,
    /// Loopback source addresses the flood comes from (127.0.0.2 ..).
    #[arg(long, default_value_t = 16)]
    sources: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// The server's pid, to measure its CPU per phase.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Not recorded at the start of a phase.
const WARMUP: Duration = Duration::from_secs(1);

/// What one phase measured.
#[derive(Debug, Default, Serialize)]
struct Phase {
    name: &'static str,
    secs: f64,
    send_ack_us: Summary,
    /// Sends answered with an Error, or never answered within the phase.
    send_errors: u64,
    connect_to_welcome_us: Summary,
    hello_to_welcome_us: Summary,
    hello_errors: u64,
    flood: Option<FloodOutcome>,
    server_cpu_cores: Option<f64>,
    loadgen_cpu_cores: f64,
    errors: Vec<String>,
}

/// How the flood's logins were answered.
#[derive(Debug, Default, Serialize)]
struct FloodOutcome {
    logins_sent: u64,
    logins_per_s: f64,
    /// Checked (one hash each) and refused as wrong.
    invalid_credentials: u64,
    /// Refused without a hash, by the limit named in the answer.
    rate_limited: BTreeMap<String, u64>,
    /// Refusals without a retry_after_ms (there should be none).
    rate_limited_without_retry: u64,
    other_answers: BTreeMap<String, u64>,
    answer_us: Summary,
    errors: Vec<String>,
}

pub(crate) fn run(args: &LoginFloodArgs) -> anyhow::Result<()> {
    let machine = Machine::now();
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(
        matches!(target, Target::StarlingTls(_)),
        "login-flood needs a tls:// target"
    );
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?
        .context("login-flood needs a tls:// target")?;
    let accounts = AccountsFile::load(&args.accounts)?;
    let need = usize::try_from(args.pairs * 2).context("--pairs")?;
    accounts.need(need, &args.accounts)?;
    anyhow::ensure!(args.pairs > 0, "--pairs must be at least 1");
    anyhow::ensure!(
        args.msg_rate > 0.0 && args.hello_rate > 0.0 && args.flood_rate > 0.0,
        "rates must be positive"
    );
    let duration = Duration::from_secs(args.duration_secs.max(2));
    let mut phases = Vec::new();
    for flood in [false, true] {
        let name = if flood { "flood" } else { "baseline" };
        let cpu0 = args.server_pid.and_then(report::cpu_secs);
        let own0 = report::own_cpu_secs();
        let sw = Stopwatch::start();
        let stop = Arc::new(AtomicBool::new(false));
        let flood_thread = flood
            .then(|| {
                let (args, tls, target, stop) =
                    (args.clone(), tls.clone(), target.clone(), stop.clone());
                std::thread::Builder::new()
                    .name("flood".into())
                    .spawn(move || run_flood(&args, &target, &tls, &stop, duration))
            })
            .transpose()?;
        let measured = crate::workers::block_on(async {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(measure(
                    args,
                    &target,
                    &tls,
                    &accounts,
                    duration,
                    (name, u16::from(flood)),
                ))
                .await
        })??;
        stop.store(true, Ordering::Relaxed);
        let mut phase = measured;
        if let Some(t) = flood_thread {
            phase.flood = Some(
                t.join()
                    .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??,
            );
        }
        let secs = sw.elapsed_secs();
        phase.secs = secs;
        phase.server_cpu_cores = match (cpu0, args.server_pid.and_then(report::cpu_secs)) {
            (Some(a), Some(b)) => Some((b - a) / secs.max(1e-3)),
            _ => None,
        };
        phase.loadgen_cpu_cores = (report::own_cpu_secs() - own0) / secs.max(1e-3);
        print_phase(&phase);
        phases.push(phase);
    }
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "login-flood",
                "params": args,
                "machine": machine,
                "loadavg_1m_end": report::loadavg(),
                "phases": phases,
            }),
        )?;
    }
    Ok(())
}

fn print_phase(p: &Phase) {
    println!();
    println!("phase {} ({:.1} s)", p.name, p.secs);
    report::print_latency_table(&[
        ("Send->SendAck", &p.send_ack_us),
        ("connect->Welcome", &p.connect_to_welcome_us),
        ("Hello->Welcome", &p.hello_to_welcome_us),
    ]);
    println!(
        "send errors {}, hello errors {}",
        p.send_errors, p.hello_errors
    );
    if let Some(c) = p.server_cpu_cores {
        println!("server CPU          {c:.2} cores");
    }
    println!("load generator CPU  {:.2} cores", p.loadgen_cpu_cores);
    if let Some(f) = &p.flood {
        println!(
            "flood: {} password logins ({:.0}/s): {} checked (INVALID_CREDENTIALS), refused: {:?}, \
             other: {:?}",
            f.logins_sent, f.logins_per_s, f.invalid_credentials, f.rate_limited, f.other_answers
        );
        report::print_latency_table(&[("login answer", &f.answer_us)]);
        for e in f.errors.iter().take(5) {
            println!("flood error: {e}");
        }
    }
    for e in p.errors.iter().take(5) {
        println!("error: {e}");
    }
}

/// Records latencies after the warm-up.
#[derive(Debug)]
struct Recorder {
    start: Instant,
    send_ack: Histogram<u64>,
    connect: Histogram<u64>,
    hello: Histogram<u64>,
    send_errors: u64,
    hello_errors: u64,
    errors: Vec<String>,
}

impl Recorder {
    fn record(&self, at: Instant) -> bool {
        at.saturating_duration_since(self.start) >= WARMUP
    }

    fn error(&mut self, e: &anyhow::Error) {
        if self.errors.len() < 10 {
            self.errors.push(format!("{e:#}"));
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn measure(
    args: &LoginFloodArgs,
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    accounts: &AccountsFile,
    duration: Duration,
    (name, phase_no): (&'static str, u16),
) -> anyhow::Result<Phase> {
    let rec = Rc::new(RefCell::new(Recorder {
        start: clock::now(),
        send_ack: report::histogram(),
        connect: report::histogram(),
        hello: report::histogram(),
        send_errors: 0,
        hello_errors: 0,
        errors: Vec::new(),
    }));
    let end = clock::now() + duration;
    // Each connection sends at msg_rate / (2 * pairs).
    let interval = Duration::from_secs_f64(2.0 * args.pairs as f64 / args.msg_rate);
    let mut tasks = Vec::new();
    for p in 0..args.pairs {
        let (a, b) = (
            &accounts.accounts[(2 * p) as usize],
            &accounts.accounts[(2 * p + 1) as usize],
        );
        for (k, (me, peer, offset)) in [(a, b, 0.0), (b, a, 0.5)].into_iter().enumerate() {
            let (rec, tls, addr) = (rec.clone(), tls.clone(), target.addr());
            // client_msg_id = pid ‖ phase ‖ connection ‖ n: unique in the run.
            let mut id_prefix = [0u8; 8];
            id_prefix[..4].copy_from_slice(&std::process::id().to_be_bytes());
            id_prefix[4..6].copy_from_slice(&phase_no.to_be_bytes());
            id_prefix[6..].copy_from_slice(
                &u16::try_from(2 * p + k as u64)
                    .unwrap_or(u16::MAX)
                    .to_be_bytes(),
            );
            let token = me.access_token.clone();
            let to = peer.user_id;
            // Spread the pairs' sends over the interval.
            let phase_shift = interval.mul_f64((p as f64 + offset) / args.pairs as f64 % 1.0);
            tasks.push(tokio::task::spawn_local(async move {
                let r = sender(
                    &rec,
                    addr,
                    &tls,
                    &token,
                    (to, id_prefix),
                    interval,
                    phase_shift,
                    end,
                )
                .await;
                if let Err(e) = r {
                    rec.borrow_mut().error(&e);
                }
            }));
        }
    }
    let prober = {
        let (rec, tls, addr) = (rec.clone(), tls.clone(), target.addr());
        let interval = Duration::from_secs_f64(1.0 / args.hello_rate);
        tokio::task::spawn_local(async move { probe_hellos(&rec, addr, &tls, interval, end).await })
    };
    for t in tasks {
        t.await.context("a sending task panicked")?;
    }
    prober.await.context("the prober panicked")?;
    let r = rec.borrow();
    Ok(Phase {
        name,
        send_ack_us: Summary::of(&r.send_ack),
        send_errors: r.send_errors,
        connect_to_welcome_us: Summary::of(&r.connect),
        hello_to_welcome_us: Summary::of(&r.hello),
        hello_errors: r.hello_errors,
        errors: r.errors.clone(),
        ..Phase::default()
    })
}

/// One signed-in connection: sends to `to` every `interval` (open loop:
/// latency from each send's scheduled time) and reads what comes.
#[allow(clippy::too_many_arguments)]
async fn sender(
    rec: &Rc<RefCell<Recorder>>,
    addr: std::net::SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    token: &str,
    (to, id_prefix): (u64, [u8; 8]),
    interval: Duration,
    phase_shift: Duration,
    end: Instant,
) -> anyhow::Result<()> {
    let s = Stream::connect(addr, None, Some(tls), Duration::from_secs(10)).await?;
    let mut c = StarlingConn::new(s);
    c.hello(Some(token)).await?;
    let mut next = clock::now() + phase_shift;
    let mut scheduled: HashMap<u64, Instant> = HashMap::new();
    let mut n = 0u64;
    loop {
        let now = clock::now();
        while next <= now && next < end {
            n += 1;
            let rid = c.rid();
            let mut cmid = [0u8; 16];
            cmid[..8].copy_from_slice(&id_prefix);
            cmid[8..].copy_from_slice(&n.to_be_bytes());
            c.push(
                rid,
                Body::Send(v1::Send {
                    client_msg_id: cmid.to_vec().into(),
                    to: Some(v1::Recipient {
                        target: Some(v1::recipient::Target::UserId(to)),
                    }),
                    content_type: "text/plain".into(),
                    body: b"login-flood bench message".to_vec().into(),
                    ..Default::default()
                }),
            )?;
            scheduled.insert(rid, next);
            next += interval;
        }
        if c.pending_write() > 0 {
            c.flush().await?;
        }
        if next >= end && scheduled.is_empty() {
            return Ok(());
        }
        // Answers still missing a second after the end count as errors.
        let deadline = if next >= end {
            end + Duration::from_secs(1)
        } else {
            next
        };
        if clock::now() >= end + Duration::from_secs(1) {
            rec.borrow_mut().send_errors += scheduled.len() as u64;
            return Ok(());
        }
        tokio::select! {
            n = c.read_some() => {
                if n? == 0 {
                    bail!("server closed the connection");
                }
                while let Some(f) = c.next_frame()? {
                    let Some(at) = scheduled.remove(&f.request_id) else { continue };
                    let mut r = rec.borrow_mut();
                    match f.body {
                        Some(Body::SendAck(_)) => {
                            if r.record(at) {
                                r.send_ack.saturating_record(micros(clock::now() - at));
                            }
                        }
                        Some(Body::Error(e)) => {
                            r.send_errors += 1;
                            r.error(&anyhow::anyhow!("Send: {}", describe_error(&e)));
                        }
                        _ => r.send_errors += 1,
                    }
                }
                c.release_buffer();
            }
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// Opens a new connection every `interval`: connect → TLS → Hello → Welcome.
async fn probe_hellos(
    rec: &Rc<RefCell<Recorder>>,
    addr: std::net::SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    interval: Duration,
    end: Instant,
) {
    let mut next = clock::now();
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let at = next;
        next += interval;
        let r = async {
            let started = clock::now();
            let s = Stream::connect(addr, None, Some(tls), Duration::from_secs(20)).await?;
            let mut c = StarlingConn::new(s);
            let hello_at = clock::now();
            c.hello(None).await?;
            let done = clock::now();
            let _ = c.stream.shutdown().await;
            anyhow::Ok((done - started, done - hello_at))
        }
        .await;
        let mut r2 = rec.borrow_mut();
        match r {
            Ok((connect, hello)) => {
                if r2.record(at) {
                    r2.connect.saturating_record(micros(connect));
                    r2.hello.saturating_record(micros(hello));
                }
            }
            Err(e) => {
                r2.hello_errors += 1;
                r2.error(&e);
            }
        }
    }
}

/// The flood, on its own thread and runtime.
fn run_flood(
    args: &LoginFloodArgs,
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    stop: &Arc<AtomicBool>,
    duration: Duration,
) -> anyhow::Result<FloodOutcome> {
    let out = Rc::new(RefCell::new(FloodOutcome::default()));
    let hist = Rc::new(RefCell::new(report::histogram()));
    let started = clock::now();
    let end = started + duration;
    let interval = Duration::from_secs_f64(args.flood_conns.max(1) as f64 / args.flood_rate);
    crate::workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut tasks = Vec::new();
                for i in 0..args.flood_conns.max(1) {
                    let (out, hist, tls, stop) =
                        (out.clone(), hist.clone(), tls.clone(), stop.clone());
                    let addr = target.addr();
                    let src = source_addr(i, args.sources, addr);
                    let shift = interval.mul_f64(i as f64 / args.flood_conns.max(1) as f64);
                    tasks.push(tokio::task::spawn_local(async move {
                        let r = flood_conn(
                            &out, &hist, addr, src, &tls, i, interval, shift, end, &stop,
                        )
                        .await;
                        if let Err(e) = r {
                            let mut o = out.borrow_mut();
                            if o.errors.len() < 10 {
                                o.errors.push(format!("{e:#}"));
                            }
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
            .await;
    })?;
    let mut o = out.take();
    o.answer_us = Summary::of(&hist.borrow());
    o.logins_per_s = o.logins_sent as f64 / (clock::now() - started).as_secs_f64().max(1e-3);
    Ok(o)
}

#[allow(clippy::too_many_arguments)]
async fn flood_conn(
    out: &Rc<RefCell<FloodOutcome>>,
    hist: &Rc<RefCell<Histogram<u64>>>,
    addr: std::net::SocketAddr,
    src: Option<std::net::SocketAddr>,
    tls: &Arc<rustls::ClientConfig>,
    conn: u64,
    interval: Duration,
    shift: Duration,
    end: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let s = Stream::connect(addr, src, Some(tls), Duration::from_secs(10)).await?;
    let mut c = StarlingConn::new(s);
    c.hello(None).await?;
    let started = clock::now();
    let mut next = started + shift;
    let mut n = 0u64;
    while next < end && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        n += 1;
        let sent = clock::now();
        out.borrow_mut().logins_sent += 1;
        let answer = c
            .request(Body::Login(v1::Login {
                identifier: Some(v1::Identifier {
                    kind: Some(v1::identifier::Kind::Email(format!(
                        "flood-{}-{conn}-{n}@bench.example",
                        std::process::id()
                    ))),
                }),
                credential: Some(v1::login::Credential::Password("not the password".into())),
                device: None,
            }))
            .await?;
        let took = clock::now() - sent;
        if sent - started >= WARMUP {
            hist.borrow_mut().saturating_record(micros(took));
        }
        let mut o = out.borrow_mut();
        match answer {
            Body::Error(e) if e.code == v1::ErrorCode::InvalidCredentials as i32 => {
                o.invalid_credentials += 1;
            }
            Body::Error(e) if e.code == v1::ErrorCode::RateLimited as i32 => {
                if e.retry_after_ms == 0 {
                    o.rate_limited_without_retry += 1;
                }
                *o.rate_limited.entry(e.message).or_default() += 1;
            }
            Body::Error(e) => {
                *o.other_answers.entry(describe_error(&e)).or_default() += 1;
            }
            other => {
                *o.other_answers
                    .entry(other.kind().name().to_owned())
                    .or_default() += 1;
            }
        }
        // Falling behind: skip what is overdue rather than bursting.
        let now = clock::now();
        if next < now {
            next = now;
        }
    }
    let _ = c.stream.shutdown().await;
    Ok(())
}
