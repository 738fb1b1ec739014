//! `starling-bench block-flood`: what one client sending Block/Unblock as fast as the server
//! answers costs everyone else.
//!
//! `--pairs` pairs of connections exchange messages: in each pair one member sends to the other
//! at `--rate / --pairs` messages per second (open loop: a Send is written at its scheduled
//! time whether or not earlier ones were acknowledged, up to the server's in-flight limit), and
//! the other acknowledges delivery once per read (`DeliveryAck`, so cursor batches share the
//! server's metadata writer with the flood). Send → SendAck is timed from the write of the Send
//! to the read of its SendAck.
//!
//! The run alternates phases of `--phase-secs`: quiet, then flood, `--rounds` times. During a
//! flood phase one more connection (a third user) keeps `--window` Block/Unblock requests of a
//! fourth user unanswered at all times, alternating Block and Unblock so that every request the
//! server accepts changes something and is written, and ignoring `retry_after_ms` as an abuser
//! would. The report gives the pairs' Send → SendAck percentiles per phase kind (the first
//! `--settle-ms` of each phase are not recorded) and what the flood got: answers per second,
//! `Done` (written) and `RATE_LIMITED` per second.
//!
//! Accounts come from `starling-bench register` (2 × pairs + 2).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use starling_protocol::v1::{self, ErrorCode, frame::Body};

use crate::accounts::{Account, AccountsFile};
use crate::clock::{self, Stopwatch};
use crate::net::{StarlingConn, Target, describe_error, source_addr, tls_for};
use crate::report::{self, Machine, Summary};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct BlockFloodArgs {
    /// tls://IP:PORT or plain://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Starling's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (2 × pairs + 2 accounts).
    #[arg(long, default_value = "bench-accounts.json")]
    accounts: PathBuf,
    /// Pairs exchanging messages.
    #[arg(long, default_value_t = 20)]
    pairs: u64,
    /// Messages per second over all pairs.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 10)]
    phase_secs: u64,
    /// Quiet + flood rounds.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Sends in the first milliseconds of a phase are not recorded.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Block/Unblock requests the flooder keeps unanswered (at most the server's in-flight
    /// limit, 64 by default).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    sources: u32,
    /// The server's pid, to measure its CPU per phase kind.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What the run is doing now, shared by its tasks (one thread).
#[derive(Debug, Default)]
struct State {
    /// Flooding (else quiet).
    flood: Cell<bool>,
    /// Sends made now are recorded (not settling into a phase).
    recording: Cell<bool>,
    /// The run is over: tasks stop sending.
    stop: Cell<bool>,
    tally: RefCell<Tally>,
}

/// Counters and histograms, per phase kind.
#[derive(Debug)]
struct Tally {
    ack_quiet: Histogram<u64>,
    ack_flood: Histogram<u64>,
    sent: u64,
    acked: u64,
    errors: u64,
    flood_answers: u64,
    flood_done: u64,
    flood_limited: u64,
    flood_other: u64,
    flood_secs: f64,
    quiet_secs: f64,
    first_error: Option<String>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            ack_quiet: report::histogram(),
            ack_flood: report::histogram(),
            sent: 0,
            acked: 0,
            errors: 0,
            flood_answers: 0,
            flood_done: 0,
            flood_limited: 0,
            flood_other: 0,
            flood_secs: 0.0,
            quiet_secs: 0.0,
            first_error: None,
        }
    }
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
    ack_quiet_us: Summary,
    ack_flood_us: Summary,
    sent: u64,
    acked: u64,
    errors: u64,
    flood_answers_per_s: f64,
    flood_done_per_s: f64,
    flood_rate_limited_per_s: f64,
    flood_other: u64,
    server_cpu_cores_quiet: Option<f64>,
    server_cpu_cores_flood: Option<f64>,
    first_error: Option<String>,
}

pub(crate) fn run(args: &BlockFloodArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(!target.is_mqtt(), "block-flood talks to Starling");
    anyhow::ensure!(
        args.pairs > 0 && args.rate > 0.0 && args.phase_secs > 0 && args.rounds > 0,
        "--pairs, --rate, --phase-secs and --rounds must be > 0"
    );
    anyhow::ensure!(
        (1..=64).contains(&args.window),
        "--window must be between 1 and 64"
    );
    anyhow::ensure!(
        args.settle_ms < args.phase_secs * 1000,
        "--settle-ms must be shorter than a phase"
    );
    let accounts = AccountsFile::load(&args.accounts)?;
    let need = 2 * args.pairs as usize + 2;
    accounts.need(need, &args.accounts)?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let machine = Machine::now();
    let accounts = &accounts.accounts[..need];
    let out = crate::workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(run_phases(args, &target, tls, accounts))
            .await
    })??;
    print_outcome(args, &out);
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "block-flood",
                "params": args,
                "machine": machine,
                "outcome": out,
            }),
        )?;
    }
    if out.acked == 0 {
        bail!(
            "no message was acknowledged: {}",
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
    let timeout = Duration::from_secs(10);
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

async fn run_phases(
    args: &BlockFloodArgs,
    target: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    accounts: &[Account],
) -> anyhow::Result<Outcome> {
    let st = Rc::new(State::default());
    let interval = Duration::from_secs_f64(args.pairs as f64 / args.rate);
    let mut tasks = Vec::new();
    for p in 0..args.pairs {
        let (a, b) = (&accounts[2 * p as usize], &accounts[2 * p as usize + 1]);
        let sender = connect(target, tls.as_ref(), 2 * p, args.sources, a).await?;
        let receiver = connect(target, tls.as_ref(), 2 * p + 1, args.sources, b).await?;
        // The pairs' sends are spread over the interval.
        let offset = interval.mul_f64(p as f64 / args.pairs as f64);
        let to = b.user_id;
        tasks.push(tokio::task::spawn_local(send_loop(
            sender,
            to,
            p,
            interval,
            offset,
            st.clone(),
        )));
        tasks.push(tokio::task::spawn_local(receive_loop(receiver, st.clone())));
    }
    let n = 2 * args.pairs as usize;
    let flooder = connect(target, tls.as_ref(), n as u64, args.sources, &accounts[n]).await?;
    let victim = accounts[n + 1].user_id;
    tasks.push(tokio::task::spawn_local(flood_loop(
        flooder,
        victim,
        args.window,
        st.clone(),
    )));
    let settle = Duration::from_millis(args.settle_ms);
    let measured = Duration::from_secs(args.phase_secs) - settle;
    let (mut cpu_quiet, mut cpu_flood) = (0.0f64, 0.0f64);
    for round in 0..args.rounds {
        for flood in [false, true] {
            report::progress(&format!(
                "block-flood: round {}/{}, {}",
                round + 1,
                args.rounds,
                if flood { "flood" } else { "quiet" }
            ));
            // The flood runs while settling too; only the recording waits.
            st.flood.set(flood);
            st.recording.set(false);
            tokio::time::sleep(settle).await;
            let cpu0 = args.server_pid.and_then(report::cpu_secs);
            let sw = Stopwatch::start();
            st.recording.set(true);
            tokio::time::sleep(measured).await;
            st.recording.set(false);
            let secs = sw.elapsed_secs();
            let used = cpu0
                .zip(args.server_pid.and_then(report::cpu_secs))
                .map_or(0.0, |(a, b)| b - a);
            let mut t = st.tally.borrow_mut();
            if flood {
                t.flood_secs += secs;
                cpu_flood += used;
            } else {
                t.quiet_secs += secs;
                cpu_quiet += used;
            }
        }
    }
    st.flood.set(false);
    st.stop.set(true);
    report::progress_done();
    // Let the last answers arrive, then stop everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in tasks {
        t.abort();
    }
    let t = st.tally.borrow();
    let per_s = |n: u64| n as f64 / t.flood_secs.max(1e-9);
    Ok(Outcome {
        ack_quiet_us: Summary::of(&t.ack_quiet),
        ack_flood_us: Summary::of(&t.ack_flood),
        sent: t.sent,
        acked: t.acked,
        errors: t.errors,
        flood_answers_per_s: per_s(t.flood_answers),
        flood_done_per_s: per_s(t.flood_done),
        flood_rate_limited_per_s: per_s(t.flood_limited),
        flood_other: t.flood_other,
        server_cpu_cores_quiet: args.server_pid.map(|_| cpu_quiet / t.quiet_secs.max(1e-9)),
        server_cpu_cores_flood: args.server_pid.map(|_| cpu_flood / t.flood_secs.max(1e-9)),
        first_error: t.first_error.clone(),
    })
}

/// One pair's sending member: a Send every `interval` (from `offset`), each timed to its
/// SendAck; the histogram is the phase's at the time of the Send.
async fn send_loop(
    mut c: StarlingConn,
    to: u64,
    pair: u64,
    interval: Duration,
    offset: Duration,
    st: Rc<State>,
) {
    // request id → (when written, recorded in the flood histogram, or not recorded).
    let mut inflight: HashMap<u64, (Instant, Option<bool>)> = HashMap::new();
    let start = clock::now() + offset;
    let mut k: u32 = 0;
    loop {
        let due = start + interval * k;
        tokio::select! {
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(due)), if !st.stop.get() => {
                // The server answers at most 64 outstanding requests per connection.
                if inflight.len() < 64 {
                    let rid = c.rid();
                    let mut cmid = [0u8; 16];
                    cmid[..8].copy_from_slice(&pair.to_le_bytes());
                    cmid[8..12].copy_from_slice(&k.to_le_bytes());
                    cmid[12] = 0xB1;
                    let body = Body::Send(v1::Send {
                        client_msg_id: Bytes::copy_from_slice(&cmid),
                        to: Some(v1::Recipient {
                            target: Some(v1::recipient::Target::UserId(to)),
                        }),
                        content_type: "text/plain".to_owned(),
                        body: Bytes::from_static(b"block-flood bystander"),
                        first_attempt: true,
                        ..v1::Send::default()
                    });
                    if c.push(rid, body).is_err() || c.flush().await.is_err() {
                        st.tally.borrow_mut().error("a send failed to be written".into());
                        return;
                    }
                    let tag = st.recording.get().then(|| st.flood.get());
                    inflight.insert(rid, (clock::now(), tag));
                    st.tally.borrow_mut().sent += 1;
                }
                k += 1;
            }
            r = c.read_some() => {
                match r {
                    Ok(0) | Err(_) => {
                        if !st.stop.get() {
                            st.tally.borrow_mut().error("the server closed a sender's connection".into());
                        }
                        return;
                    }
                    Ok(_) => {}
                }
                let now = clock::now();
                while let Ok(Some(f)) = c.next_frame() {
                    let Some((at, tag)) = inflight.remove(&f.request_id) else {
                        continue;
                    };
                    let mut t = st.tally.borrow_mut();
                    match f.body {
                        Some(Body::SendAck(_)) => {
                            t.acked += 1;
                            let us = u64::try_from(now.duration_since(at).as_micros()).unwrap_or(u64::MAX);
                            match tag {
                                Some(true) => t.ack_flood.saturating_record(us),
                                Some(false) => t.ack_quiet.saturating_record(us),
                                None => {}
                            }
                        }
                        Some(Body::Error(e)) => t.error(describe_error(&e)),
                        _ => t.error("a Send answered with neither SendAck nor Error".into()),
                    }
                }
            }
        }
    }
}

/// One pair's receiving member: reads everything, acknowledges delivery once per read.
async fn receive_loop(mut c: StarlingConn, st: Rc<State>) {
    let mut delivered: HashMap<u64, u64> = HashMap::new();
    loop {
        match c.read_some().await {
            Ok(0) | Err(_) => {
                if !st.stop.get() {
                    st.tally
                        .borrow_mut()
                        .error("the server closed a receiver's connection".into());
                }
                return;
            }
            Ok(_) => {}
        }
        let mut acks = Vec::new();
        while let Ok(Some(f)) = c.next_frame() {
            if let Some(Body::Deliver(v1::Deliver { message: Some(m) })) = f.body {
                let d = delivered.entry(m.conversation_id).or_default();
                if m.seq > *d {
                    *d = m.seq;
                    acks.push(m.conversation_id);
                }
            }
        }
        acks.sort_unstable();
        acks.dedup();
        for conv in acks {
            let ack = Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: conv,
                up_to_seq: delivered[&conv],
            });
            if c.push(0, ack).is_err() {
                return;
            }
        }
        if c.flush().await.is_err() {
            return;
        }
    }
}

/// The flooder: while flooding, `window` Block/Unblock requests of `victim` unanswered at all
/// times, alternating, `retry_after_ms` ignored.
async fn flood_loop(mut c: StarlingConn, victim: u64, window: usize, st: Rc<State>) {
    let mut outstanding = 0usize;
    let mut block = true;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        if st.flood.get() && !st.stop.get() {
            while outstanding < window {
                let body = if block {
                    Body::Block(v1::Block { user_id: victim })
                } else {
                    Body::Unblock(v1::Unblock { user_id: victim })
                };
                block = !block;
                let rid = c.rid();
                if c.push(rid, body).is_err() {
                    return;
                }
                outstanding += 1;
            }
            if c.flush().await.is_err() {
                st.tally
                    .borrow_mut()
                    .error("the flooder's connection failed".into());
                return;
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            r = c.read_some() => {
                if !matches!(r, Ok(n) if n > 0) {
                    if !st.stop.get() {
                        st.tally.borrow_mut().error("the server closed the flooder's connection".into());
                    }
                    return;
                }
                while let Ok(Some(f)) = c.next_frame() {
                    if f.request_id == 0 {
                        continue;
                    }
                    outstanding = outstanding.saturating_sub(1);
                    let mut t = st.tally.borrow_mut();
                    if st.recording.get() && st.flood.get() {
                        t.flood_answers += 1;
                        match f.body {
                            Some(Body::Done(_)) => t.flood_done += 1,
                            Some(Body::Error(e)) if e.code == ErrorCode::RateLimited as i32 => {
                                t.flood_limited += 1;
                            }
                            _ => t.flood_other += 1,
                        }
                    }
                }
            }
        }
    }
}

fn print_outcome(args: &BlockFloodArgs, out: &Outcome) {
    println!();
    println!("target            {}", args.target);
    println!(
        "workload          {} pairs, {:.0} msg/s, {} rounds of {} s quiet + {} s flood (first {} ms of each not recorded), flood window {}",
        args.pairs,
        args.rate,
        args.rounds,
        args.phase_secs,
        args.phase_secs,
        args.settle_ms,
        args.window
    );
    println!(
        "messages          sent {} acked {} errors {}",
        out.sent, out.acked, out.errors
    );
    println!(
        "flood             {:.0} answers/s: {:.0} Done/s (written), {:.0} RATE_LIMITED/s, {} other",
        out.flood_answers_per_s,
        out.flood_done_per_s,
        out.flood_rate_limited_per_s,
        out.flood_other
    );
    if let (Some(q), Some(f)) = (out.server_cpu_cores_quiet, out.server_cpu_cores_flood) {
        println!("server CPU        {q:.2} cores quiet, {f:.2} cores flooded");
    }
    report::print_latency_table(&[
        ("Send→SendAck quiet", &out.ack_quiet_us),
        ("Send→SendAck flood", &out.ack_flood_us),
    ]);
    if let Some(e) = &out.first_error {
        println!("first error       {e}");
    }
}
