//! `starling-bench messages`: the messaging workload, open loop.
//!
//! `--pairs` pairs of connections; both members of a pair send to the other
//! at `--rate / (2 * pairs)` messages per second each, for `--duration-secs`.
//! Every message has a **scheduled** send time fixed before the run starts
//! (`start + offset + k * interval`); all latencies are measured from that
//! time, not from when the bytes were written, so a stalled server or a
//! busy load generator shows up as latency instead of silently lowering the
//! offered load (coordinated omission, corrected as in wrk2).
//!
//! Starling (`tls://`, `plain://`): Send → SendAck (ack, once durable),
//! Send → Deliver at the peer (delivery), and Deliver → Receipt{DELIVERED}
//! back at the sender (the peer acknowledges cumulatively with one
//! DeliveryAck per read batch; `--read-cursor` also sends ReadCursor).
//!
//! MQTT (`mqtt://`, `mqtts://`): each member subscribes at QoS 1 to its own
//! topic and publishes at QoS 1 to the other's; PUBLISH → PUBACK is the ack,
//! PUBLISH → receipt of the PUBLISH at the peer is the delivery. MQTT has no
//! end-to-end receipt.
//!
//! One task per pair owns both sockets; everything due is encoded into one
//! buffer per socket and written with one syscall. Pairs sleep on the
//! worker's `timerfd`-based [`Timer`] (µs precision; tokio's timer has 1 ms
//! granularity), with wake-ups rounded up to `--tick-us`. Every message
//! carries its scheduled time, its index and its direction, so the receiver
//! checks that each message arrives exactly once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::{Buf as _, BytesMut};
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use starling_protocol::v1::{self, frame::Body};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::accounts::{Account, AccountsFile};
use crate::clock::{self, Stopwatch};
use crate::mqtt::{self, Packet};
use crate::net::{StarlingConn, Stream, Target, describe_error, source_addr, tls_for};
use crate::report::{self, HistData, Machine, Summary};
use crate::scrape::{self, ServerAck};
use crate::timeline::{Timeline, TimelineSummary};
use crate::timer::Timer;
use crate::workers::{self, Tally, WorkerArgs, Workers};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct MessagesArgs {
    /// tls://IP:PORT or plain://IP:PORT (Starling), mqtt://IP:PORT or mqtts://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    pub(crate) target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Starling's data directory (for the default CA path).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (Starling: 2 per pair).
    #[arg(long, default_value = "bench-accounts.json")]
    pub(crate) accounts: PathBuf,
    /// Pairs of connections.
    #[arg(long, default_value_t = 100)]
    pub(crate) pairs: u64,
    /// Offered load: messages per second over all pairs and both directions.
    #[arg(long, default_value_t = 10_000.0)]
    pub(crate) rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
    /// Messages scheduled in the first seconds are not recorded.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup_secs: u64,
    /// After sending, wait at most this long for acks and deliveries.
    #[arg(long, default_value_t = 5)]
    pub(crate) drain_secs: u64,
    /// Body (payload) bytes per message (at least 17: time, index, direction).
    #[arg(long, default_value_t = 100)]
    pub(crate) body_bytes: usize,
    /// Most unacknowledged sends per connection (0: Starling's
    /// Welcome.limits.inflight_requests_max; 64 for MQTT).
    #[arg(long, default_value_t = 0)]
    pub(crate) inflight: usize,
    /// Starling: also send ReadCursor with every DeliveryAck.
    #[arg(long)]
    pub(crate) read_cursor: bool,
    /// Send quantum in µs: wake-ups are rounded up to a multiple of it, so a
    /// pair wakes at most once per tick and sends all that is due in one write
    /// per connection (more batching, fewer syscalls, more send lag; latency
    /// still counts from each message's scheduled time).
    #[arg(long, default_value_t = 100)]
    pub(crate) tick_us: u64,
    /// Hold a connection's acknowledgement of what it received (Starling: one cumulative
    /// DeliveryAck; MQTT: its PUBACKs) up to this long, so that it rides in the same write as
    /// the connection's next send instead of costing a segment (and a server wake-up) of its
    /// own. The default covers the gap between one connection's sends at 100 pairs and 50k
    /// msg/s (4 ms). Receipts are late by at most this (the server makes cursors durable in
    /// batches every 20 ms anyway). 0: write every ack at once.
    #[arg(long, default_value_t = 5000)]
    pub(crate) ack_delay_us: u64,
    /// The server's pid, to measure its CPU.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Starling's metrics endpoint (HOST:PORT): its own SendAck latency histogram is read
    /// before and after the run and reported beside the load generator's numbers.
    #[arg(long)]
    pub(crate) server_metrics: Option<String>,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    pub(crate) sources: u32,
    /// Write the full report here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write where in the run the slow acknowledgements fell: a CSV with one line per 10 ms of
    /// scheduled send time (acks, acks over --slow-ack-us, the slowest, the worst send lag).
    #[arg(long)]
    pub(crate) timeline: Option<PathBuf>,
    /// An acknowledgement later than this after its scheduled send counts as slow in the
    /// timeline and its summary (default: issue 5's SendAck bound).
    #[arg(long, default_value_t = 1500)]
    pub(crate) slow_ack_us: u64,
    #[command(flatten)]
    #[serde(skip)]
    pub(crate) w: WorkerArgs,
}

/// Counters a worker reports.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Counts {
    pub(crate) connected_pairs: u64,
    pub(crate) scheduled: u64,
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) receipts: u64,
    pub(crate) errors: u64,
    pub(crate) finished_pairs: u64,
    /// Starling: `MessagesAvailable` hints received (the server stopped pushing to a connection
    /// over its outbound budget) and the Syncs sent to catch up.
    #[serde(default)]
    pub(crate) hints: u64,
    #[serde(default)]
    pub(crate) syncs: u64,
    /// Sends that were due while the connection's in-flight window was full: they waited for
    /// an acknowledgement, so their latency includes that wait (see [`Ep::window_full_at`]).
    #[serde(default)]
    pub(crate) window_waits: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.connected_pairs += o.connected_pairs;
        self.scheduled += o.scheduled;
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.receipts += o.receipts;
        self.errors += o.errors;
        self.finished_pairs += o.finished_pairs;
        self.hints += o.hints;
        self.syncs += o.syncs;
        self.window_waits += o.window_waits;
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    counts: Counts,
    ack: HistData,
    deliver: HistData,
    receipt: HistData,
    send_lag: HistData,
    #[serde(default)]
    timeline: Timeline,
    cpu_secs: f64,
    /// Seconds from the scheduled start to the last delivery.
    last_delivery_secs: f64,
    errors: Vec<String>,
}

/// The measured outcome of one run (also what `compare.sh` collects).
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) system: &'static str,
    pub(crate) target: String,
    pub(crate) rate_offered: f64,
    pub(crate) rate_achieved: f64,
    pub(crate) counts: Counts,
    pub(crate) missing: u64,
    pub(crate) ack_us: Summary,
    pub(crate) deliver_us: Summary,
    pub(crate) receipt_us: Summary,
    pub(crate) send_lag_us: Summary,
    /// Whether the slow acknowledgements were spread over the run or packed into episodes.
    pub(crate) ack_timeline: TimelineSummary,
    pub(crate) server_cpu_cores: Option<f64>,
    /// The server's SendAck latency over the run, from its metrics (`--server-metrics`).
    pub(crate) server_ack: Option<ServerAck>,
    pub(crate) loadgen_cpu_cores: f64,
    pub(crate) loadgen_saturated: bool,
    /// At least 1% of the sends waited for the in-flight window: the latencies include waiting
    /// for acknowledgements, and the offered rate was not what the connections carried.
    pub(crate) window_bound: bool,
    pub(crate) loadavg_1m_end: f64,
    pub(crate) errors: Vec<String>,
}

pub(crate) fn run(args: &MessagesArgs) -> anyhow::Result<()> {
    if args.w.worker.is_some() {
        return worker(args);
    }
    let machine = Machine::now();
    let out = run_parent(args)?;
    print_outcome(args, &out);
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "messages",
                "params": args,
                "machine": machine,
                "outcome": out,
            }),
        )?;
    }
    if out.counts.errors > 0 && out.counts.acked == 0 {
        bail!(
            "no message was acknowledged: {}",
            out.errors.first().map_or("", String::as_str)
        );
    }
    Ok(())
}

fn print_outcome(args: &MessagesArgs, out: &Outcome) {
    let c = &out.counts;
    println!();
    println!("target            {} ({})", args.target, out.system);
    println!(
        "workload          {} pairs, {:.0} msg/s offered, {} s, {}-byte bodies, {} processes",
        args.pairs, args.rate, args.duration_secs, args.body_bytes, args.w.procs
    );
    println!(
        "messages          scheduled {} sent {} acked {} delivered {} missing {} duplicates {} receipts {} errors {}",
        c.scheduled, c.sent, c.acked, c.delivered, out.missing, c.duplicates, c.receipts, c.errors
    );
    if c.hints > 0 {
        println!(
            "slow consumer     {} MessagesAvailable hints, {} Syncs (deliveries fetched by Sync count, late)",
            c.hints, c.syncs
        );
    }
    println!("rate achieved     {:.0} msg/s delivered", out.rate_achieved);
    if let Some(s) = out.server_cpu_cores {
        println!("server CPU        {s:.2} cores");
    }
    if let Some(a) = &out.server_ack {
        println!(
            "server SendAck    {} acks; p50 {} p90 {} p99 {} p99.9 {} ms (the server's own histogram: read of the Send to its SendAck queued)",
            a.count,
            scrape::show_ms(a.p50_le_us),
            scrape::show_ms(a.p90_le_us),
            scrape::show_ms(a.p99_le_us),
            scrape::show_ms(a.p999_le_us)
        );
    }
    println!(
        "load gen CPU      {:.2} cores{}",
        out.loadgen_cpu_cores,
        if out.loadgen_saturated {
            "  [SATURATED: the load generator may be the limit]"
        } else {
            ""
        }
    );
    if c.window_waits > 0 {
        println!(
            "in-flight window  {} sends ({:.2}%) waited for an acknowledgement{}",
            c.window_waits,
            100.0 * c.window_waits as f64 / c.sent.max(1) as f64,
            if out.window_bound {
                "  [WINDOW-BOUND: the latencies include that wait; try a larger --inflight]"
            } else {
                ""
            }
        );
    }
    let ack = if out.system == "mqtt" {
        "publish -> PUBACK"
    } else {
        "send -> SendAck"
    };
    let del = if out.system == "mqtt" {
        "publish -> receive"
    } else {
        "send -> Deliver"
    };
    let mut rows = vec![(ack, &out.ack_us), (del, &out.deliver_us)];
    if out.system != "mqtt" {
        rows.push(("Deliver -> Receipt", &out.receipt_us));
    }
    rows.push(("send lag (loadgen)", &out.send_lag_us));
    report::print_latency_table(&rows);
    let t = &out.ack_timeline;
    if t.slow_acks > 0 {
        println!(
            "slow acks         {} of {} ({:.2}%) over {} µs, in {} of {} 10-ms slots; the worst 1% of slots hold {:.0}% of them (worst at {} ms after the warm-up)",
            t.slow_acks,
            t.acks,
            100.0 * t.slow_acks as f64 / t.acks.max(1) as f64,
            t.bound_us,
            t.slow_slots,
            t.slots,
            100.0 * t.share_in_worst_1pct,
            t.worst_slot_ms.unwrap_or(0)
        );
    }
    for e in out.errors.iter().take(5) {
        println!("error: {e}");
    }
}

/// Runs the workers and merges their results.
pub(crate) fn run_parent(args: &MessagesArgs) -> anyhow::Result<Outcome> {
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(
        args.pairs > 0 && args.rate > 0.0,
        "--pairs and --rate must be > 0"
    );
    anyhow::ensure!(
        args.body_bytes >= BODY_HEADER,
        "--body-bytes must be at least {BODY_HEADER}"
    );
    let per_proc = 2 * args.pairs.div_ceil(u64::from(args.w.procs.max(1)));
    if per_proc > 19_000 {
        bail!("{per_proc} connections per process is over the 20,000 open-file cap: raise --procs");
    }
    if !target.is_mqtt() {
        let a = AccountsFile::load(&args.accounts)?;
        a.need(2 * args.pairs as usize, &args.accounts)?;
    }
    let procs = args.w.procs.max(1) as usize;
    let scrape_metrics = || {
        args.server_metrics.as_deref().and_then(|a| {
            scrape::fetch(a)
                .map_err(|e| eprintln!("warning: no server SendAck histogram: {e:#}"))
                .ok()
        })
    };
    let mut metrics_start = None;
    let mut metrics_end = None;
    let mut ws = Workers::spawn(args.w.procs)?;
    let sw = Stopwatch::start();
    let mut cpu_start = None;
    let mut cpu_end = None;
    let mut tally: Tally<Counts, WorkerResult> = Tally::new(procs);
    let mut last = (0.0, 0u64);
    let mut rate = 0.0;
    let cap = Duration::from_secs(args.duration_secs + args.drain_secs + 180);
    loop {
        if let Some(m) = ws.recv(Duration::from_millis(200))? {
            tally.apply(&m, |r| &r.counts)?;
        }
        let mut t = Counts::default();
        for p in &tally.progress {
            t.add(p);
        }
        if cpu_start.is_none() && t.connected_pairs == args.pairs {
            metrics_start = scrape_metrics();
            cpu_start = Some((
                args.server_pid.and_then(report::cpu_secs),
                sw.elapsed_secs(),
            ));
        }
        if cpu_end.is_none() && (t.finished_pairs == args.pairs || tally.any_done()) {
            metrics_end = scrape_metrics();
            cpu_end = Some((
                args.server_pid.and_then(report::cpu_secs),
                sw.elapsed_secs(),
            ));
        }
        let now = sw.elapsed_secs();
        if now - last.0 >= 1.0 {
            rate = (t.delivered - last.1) as f64 / (now - last.0);
            last = (now, t.delivered);
        }
        report::progress(&format!(
            "messages: {now:.0}s pairs {}/{} sent {} acked {} delivered {} ({rate:.0}/s) receipts {} errors {}",
            t.connected_pairs, args.pairs, t.sent, t.acked, t.delivered, t.receipts, t.errors
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
    let (mut ack, mut del, mut rec, mut lag) = (
        report::histogram(),
        report::histogram(),
        report::histogram(),
        report::histogram(),
    );
    let mut counts = Counts::default();
    let mut timeline = Timeline::new(args.slow_ack_us);
    let mut errors = Vec::new();
    let mut lg_cpu = 0.0;
    let mut last_delivery: f64 = 0.0;
    for r in &results {
        r.ack.merge_into(&mut ack);
        r.deliver.merge_into(&mut del);
        r.receipt.merge_into(&mut rec);
        r.send_lag.merge_into(&mut lag);
        timeline.merge(&r.timeline);
        counts.add(&r.counts);
        errors.extend(r.errors.iter().cloned());
        lg_cpu += r.cpu_secs;
        last_delivery = last_delivery.max(r.last_delivery_secs);
    }
    let (server_cpu_cores, wall) = match (cpu_start, cpu_end) {
        (Some((a, t0)), Some((b, t1))) if t1 > t0 => {
            (a.zip(b).map(|(a, b)| (b - a) / (t1 - t0)), t1 - t0)
        }
        _ => (None, sw.elapsed_secs()),
    };
    let loadgen_cpu_cores = lg_cpu / wall.max(1e-3);
    let window_bound = window_bound(&counts);
    if let Some(p) = &args.timeline {
        timeline
            .write_csv(p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(Outcome {
        system: if target.is_mqtt() { "mqtt" } else { "starling" },
        target: args.target.clone(),
        rate_offered: args.rate,
        rate_achieved: counts.delivered as f64
            / last_delivery.max(args.duration_secs as f64).max(1e-3),
        missing: counts.sent.saturating_sub(counts.delivered),
        counts,
        ack_us: Summary::of(&ack),
        deliver_us: Summary::of(&del),
        receipt_us: Summary::of(&rec),
        send_lag_us: Summary::of(&lag),
        ack_timeline: timeline.summary(),
        server_cpu_cores,
        server_ack: metrics_start
            .zip(metrics_end)
            .map(|(a, b)| scrape::delta(&a, &b)),
        loadgen_cpu_cores,
        loadgen_saturated: loadgen_cpu_cores
            > report::SATURATED_SHARE * f64::from(args.w.procs.max(1)),
        window_bound,
        loadavg_1m_end: report::loadavg(),
        errors: errors.into_iter().take(20).collect(),
    })
}

/// Whether enough sends waited for the in-flight window (1%) that the p99s include that wait.
fn window_bound(c: &Counts) -> bool {
    c.window_waits * 100 >= c.sent.max(1)
}

/// Scheduled time (ns since the worker's epoch), index, direction.
pub(crate) const BODY_HEADER: usize = 17;

pub(crate) fn write_body(buf: &mut Vec<u8>, sched_ns: u64, k: u64, dir: u8, len: usize) {
    buf.clear();
    buf.extend_from_slice(&sched_ns.to_le_bytes());
    buf.extend_from_slice(&k.to_le_bytes());
    buf.push(dir);
    buf.resize(len.max(BODY_HEADER), 0x2a);
}

pub(crate) fn read_body(b: &[u8]) -> Option<(u64, u64, u8)> {
    if b.len() < BODY_HEADER {
        return None;
    }
    let s = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let k = u64::from_le_bytes(b[8..16].try_into().ok()?);
    Some((s, k, b[16]))
}

/// Worker-wide recorders.
#[derive(Debug)]
pub(crate) struct Rec {
    pub(crate) epoch: Instant,
    pub(crate) warmup_ns: std::cell::Cell<u64>,
    pub(crate) counts: RefCell<Counts>,
    pub(crate) ack: RefCell<Histogram<u64>>,
    pub(crate) deliver: RefCell<Histogram<u64>>,
    pub(crate) receipt: RefCell<Histogram<u64>>,
    pub(crate) lag: RefCell<Histogram<u64>>,
    pub(crate) errors: RefCell<Vec<String>>,
    pub(crate) last_delivery_ns: RefCell<u64>,
    pub(crate) fatal: RefCell<Option<String>>,
    /// Per 10 ms from the warm-up's end: acknowledgements and send lag (see [`Timeline`]).
    pub(crate) timeline: RefCell<Timeline>,
}

impl Rec {
    pub(crate) fn new(epoch: Instant, warmup_ns: u64) -> Self {
        Self {
            epoch,
            warmup_ns: std::cell::Cell::new(warmup_ns),
            counts: RefCell::default(),
            ack: RefCell::new(report::histogram()),
            deliver: RefCell::new(report::histogram()),
            receipt: RefCell::new(report::histogram()),
            lag: RefCell::new(report::histogram()),
            errors: RefCell::default(),
            last_delivery_ns: RefCell::new(0),
            fatal: RefCell::default(),
            timeline: RefCell::new(Timeline::new(u64::MAX)),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub(crate) fn record(&self, h: &RefCell<Histogram<u64>>, sched_ns: u64, now_ns: u64) {
        if sched_ns >= self.warmup_ns.get() {
            h.borrow_mut()
                .saturating_record(now_ns.saturating_sub(sched_ns) / 1000);
        }
    }

    /// An acknowledgement (SendAck, PUBACK) of the send scheduled at `sched_ns`: into the ack
    /// histogram and the timeline.
    pub(crate) fn record_ack(&self, sched_ns: u64, now_ns: u64) {
        self.record_timed(&self.ack, Timeline::ack, sched_ns, now_ns);
    }

    /// A send scheduled at `sched_ns` was written at `now_ns`.
    pub(crate) fn record_lag(&self, sched_ns: u64, now_ns: u64) {
        self.record_timed(&self.lag, Timeline::lag, sched_ns, now_ns);
    }

    /// [`Rec::record`], and `mark` in the timeline (offset from the warm-up's end, µs late).
    fn record_timed(
        &self,
        h: &RefCell<Histogram<u64>>,
        mark: fn(&mut Timeline, u64, u64),
        sched_ns: u64,
        now_ns: u64,
    ) {
        self.record(h, sched_ns, now_ns);
        let warm = self.warmup_ns.get();
        if sched_ns >= warm {
            mark(
                &mut self.timeline.borrow_mut(),
                sched_ns - warm,
                now_ns.saturating_sub(sched_ns) / 1000,
            );
        }
    }

    /// `sent` sends written, `waited` of them after waiting for the in-flight window.
    fn count_sends(&self, sent: u64, waited: u64) {
        let mut c = self.counts.borrow_mut();
        c.sent += sent;
        c.window_waits += waited;
    }

    pub(crate) fn error(&self, e: &anyhow::Error) {
        self.counts.borrow_mut().errors += 1;
        let mut errs = self.errors.borrow_mut();
        if errs.len() < 10 {
            errs.push(format!("{e:#}"));
        }
    }
}

/// One direction's sender state plus what its receiver saw.
#[derive(Debug)]
pub(crate) struct Ep {
    /// Offset of the first send and the interval, in ns.
    offset_ns: u64,
    interval_ns: u64,
    /// Messages this member sends in the run.
    n: u64,
    next_k: u64,
    inflight: usize,
    /// The last time (ns) a due send found the in-flight window full. A send scheduled at or
    /// before it waited for the window.
    window_full_at: Option<u64>,
    /// Messages from the peer seen (bitmap over the peer's k).
    seen: Vec<u64>,
    delivered: u64,
    /// Starling: deliveries awaiting the peer's Receipt: (seq, ns).
    awaiting_receipt: VecDeque<(u64, u64)>,
    /// Starling: highest seq delivered here, and its conversation.
    ack_upto: Option<(u64, u64)>,
    /// Starling: highest seq seen on this connection (the Sync position).
    max_seq: u64,
    /// Starling: a Sync is outstanding.
    syncing: bool,
    /// Starling: the cumulative DeliveryAck (conversation, seq) not yet queued: it is encoded
    /// once, just before the connection's next write, however many read batches it covers.
    ack_unsent: Option<(u64, u64)>,
    /// Since when an acknowledgement (Starling's DeliveryAck, MQTT's PUBACK) waits for a write
    /// (ns), if one does.
    ack_held_since: Option<u64>,
    /// Starling: a queued frame must be written at once (Send, Sync, Pong).
    urgent: bool,
    /// MQTT: packet id → scheduled ns.
    pid_sched: Vec<u64>,
    next_pid: u16,
}

impl Ep {
    fn new(offset_ns: u64, interval_ns: u64, n: u64) -> Self {
        Self {
            offset_ns,
            interval_ns,
            n,
            next_k: 0,
            inflight: 0,
            window_full_at: None,
            seen: vec![0; n.div_ceil(64) as usize],
            delivered: 0,
            awaiting_receipt: VecDeque::new(),
            ack_upto: None,
            ack_unsent: None,
            max_seq: 0,
            syncing: false,
            ack_held_since: None,
            urgent: false,
            pid_sched: Vec::new(),
            next_pid: 0,
        }
    }

    fn sched_ns(&self, start_ns: u64, k: u64) -> u64 {
        start_ns + self.offset_ns + k * self.interval_ns
    }

    /// After the sends due at `now`: notes whether the next one is due but held back by the
    /// in-flight window, and returns how many of the `sent` just written (the first scheduled
    /// at `first_sched`) had waited for it.
    fn note_window(
        &mut self,
        start_ns: u64,
        now: u64,
        inflight_max: usize,
        first_sched: Option<u64>,
        sent: u64,
    ) -> u64 {
        // Sends are in schedule order: those scheduled at or before the last time the window
        // was seen full are the ones that waited.
        let waited = match (first_sched, self.window_full_at) {
            (Some(f), Some(full)) if f <= full && sent > 0 => {
                let last = full.min(self.sched_ns(start_ns, self.next_k - 1));
                ((last - f) / self.interval_ns.max(1) + 1).min(sent)
            }
            _ => 0,
        };
        if self.next_k < self.n
            && self.inflight >= inflight_max
            && self.sched_ns(start_ns, self.next_k) <= now
        {
            self.window_full_at = Some(now);
        }
        waited
    }

    /// Whether this connection's queued frames go out now: anything urgent, or a DeliveryAck
    /// held long enough (or the run is draining: nothing more will carry it).
    fn must_write(&self, now: u64, plan: &Plan) -> bool {
        self.urgent
            || self.next_k >= self.n
            || self
                .ack_held_since
                .is_some_and(|t| now >= t.saturating_add(plan.ack_delay_ns))
    }

    fn written(&mut self) {
        self.urgent = false;
        self.ack_held_since = None;
    }

    /// Marks message `k` from the peer; false if it was already seen.
    fn mark(&mut self, k: u64) -> bool {
        let (w, b) = ((k / 64) as usize, k % 64);
        let Some(word) = self.seen.get_mut(w) else {
            return false;
        };
        let fresh = *word & (1 << b) == 0;
        *word |= 1 << b;
        fresh
    }
}

/// Schedule parameters of one run in one worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) start_ns: u64,
    pub(crate) drain_ns: u64,
    pub(crate) interval_ns: u64,
    pub(crate) per_member: u64,
    pub(crate) body_bytes: usize,
    pub(crate) inflight: usize,
    pub(crate) read_cursor: bool,
    pub(crate) tick_ns: u64,
    pub(crate) ack_delay_ns: u64,
}

impl Plan {
    /// Rounds a wake-up time up to the next tick (and caps it at the drain deadline).
    fn quantize(&self, t: u64) -> u64 {
        let tick = self.tick_ns.max(1);
        t.div_ceil(tick).saturating_mul(tick).min(self.drain_ns)
    }

    fn eps(&self, gi: u64, pairs: u64) -> [Ep; 2] {
        // Spread the members' phases evenly over one interval.
        let slot = |m: u64| (self.interval_ns * (2 * gi + m)) / (2 * pairs).max(1);
        [
            Ep::new(slot(0), self.interval_ns, self.per_member),
            Ep::new(slot(1), self.interval_ns, self.per_member),
        ]
    }
}

fn worker(args: &MessagesArgs) -> anyhow::Result<()> {
    workers::watch_stdin();
    let target = Target::parse(&args.target)?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let accounts: Rc<Vec<Account>> = Rc::new(if target.is_mqtt() {
        Vec::new()
    } else {
        AccountsFile::load(&args.accounts)?.accounts
    });
    let (count, first) = args.w.share(args.pairs);
    let cpu0 = report::own_cpu_secs();
    let epoch = clock::now();
    let per_member_rate = args.rate / (2.0 * args.pairs as f64);
    let interval_ns = (1e9 / per_member_rate) as u64;
    let rec = Rc::new(Rec::new(epoch, 0));
    workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                // Connect every pair first.
                let conns =
                    connect_pairs(args, &target, tls.as_ref(), &accounts, count, first, &rec).await;
                // Start together a little later (workers start within ~100 ms of
                // each other; each has its own epoch).
                let start_ns = rec.now_ns() + 200_000_000;
                let plan = Plan {
                    start_ns,
                    drain_ns: start_ns + (args.duration_secs + args.drain_secs) * 1_000_000_000,
                    interval_ns,
                    per_member: (args.duration_secs as f64 * per_member_rate).floor() as u64,
                    body_bytes: args.body_bytes,
                    inflight: args.inflight,
                    read_cursor: args.read_cursor,
                    tick_ns: args.tick_us * 1000,
                    ack_delay_ns: args.ack_delay_us * 1000,
                };
                // The recorder's warm-up boundary, now that the start is known.
                rec.warmup_ns
                    .set(start_ns + args.warmup_secs * 1_000_000_000);
                let mut timeline = Timeline::new(args.slow_ack_us);
                timeline.start_monotonic_ns =
                    clock::monotonic_ns_of(rec.epoch) + rec.warmup_ns.get();
                *rec.timeline.borrow_mut() = timeline;
                // One precise timer for every pair of this worker, on the
                // same clock as `rec` (ns since `rec.epoch`).
                let timer = Timer::start(rec.epoch).context("creating the timerfd")?;
                let mut tasks = Vec::new();
                for (gi, pc) in conns {
                    let eps = plan.eps(gi, args.pairs);
                    rec.counts.borrow_mut().scheduled += 2 * plan.per_member;
                    let (rec, timer) = (rec.clone(), timer.clone());
                    tasks.push(tokio::task::spawn_local(async move {
                        let r = match pc {
                            PairConns::Starling(c, users, inflight_max) => {
                                starling_pair(c, users, inflight_max, eps, plan, &rec, &timer).await
                            }
                            PairConns::Mqtt(c, topics) => {
                                mqtt_pair(c, topics, eps, plan, &rec, &timer).await
                            }
                        };
                        if let Err(e) = r {
                            rec.error(&e);
                        }
                        rec.counts.borrow_mut().finished_pairs += 1;
                    }));
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    workers::emit("progress", &*rec.counts.borrow());
                    if tasks.iter().all(tokio::task::JoinHandle::is_finished)
                        || workers::stop_requested()
                    {
                        break;
                    }
                }
                let h = |x: &RefCell<Histogram<u64>>| HistData::of(&x.borrow());
                let last = *rec.last_delivery_ns.borrow();
                workers::emit(
                    "result",
                    &WorkerResult {
                        counts: rec.counts.borrow().clone(),
                        ack: h(&rec.ack),
                        deliver: h(&rec.deliver),
                        receipt: h(&rec.receipt),
                        send_lag: h(&rec.lag),
                        timeline: rec.timeline.borrow().clone(),
                        cpu_secs: report::own_cpu_secs() - cpu0,
                        last_delivery_secs: last.saturating_sub(start_ns) as f64 / 1e9,
                        errors: rec.errors.borrow().clone(),
                    },
                );
                Ok::<(), anyhow::Error>(())
            })
            .await
    })?
}

/// The two connections of a pair.
pub(crate) enum PairConns {
    /// Starling connections, the members' user ids, the server's in-flight limit.
    Starling([StarlingConn; 2], [u64; 2], usize),
    /// MQTT connections and the members' topics.
    Mqtt([MqttConn; 2], [String; 2]),
}

async fn connect_pairs(
    args: &MessagesArgs,
    target: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    accounts: &Rc<Vec<Account>>,
    count: u64,
    first: u64,
    rec: &Rc<Rec>,
) -> Vec<(u64, PairConns)> {
    let out = Rc::new(RefCell::new(Vec::new()));
    let next = Rc::new(RefCell::new(0u64));
    let mut lanes = Vec::new();
    for _ in 0..32 {
        let (out, next, target, tls, accounts, rec) = (
            out.clone(),
            next.clone(),
            target.clone(),
            tls.cloned(),
            accounts.clone(),
            rec.clone(),
        );
        let sources = args.sources;
        lanes.push(tokio::task::spawn_local(async move {
            loop {
                let i = {
                    let mut n = next.borrow_mut();
                    if *n >= count {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                let gi = first + i;
                match connect_pair(gi, &target, tls.as_ref(), &accounts, sources).await {
                    Ok(pc) => {
                        out.borrow_mut().push((gi, pc));
                        rec.counts.borrow_mut().connected_pairs += 1;
                    }
                    Err(e) => rec.error(&e.context(format!("connecting pair {gi}"))),
                }
            }
        }));
    }
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        workers::emit("progress", &*rec.counts.borrow());
        if lanes.iter().all(tokio::task::JoinHandle::is_finished) {
            break;
        }
    }
    std::mem::take(&mut *out.borrow_mut())
}

pub(crate) async fn connect_pair(
    gi: u64,
    target: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    accounts: &[Account],
    sources: u32,
) -> anyhow::Result<PairConns> {
    let dst = target.addr();
    let timeout = Duration::from_secs(20);
    let s0 = Stream::connect(dst, source_addr(2 * gi, sources, dst), tls, timeout).await?;
    let s1 = Stream::connect(dst, source_addr(2 * gi + 1, sources, dst), tls, timeout).await?;
    if target.is_mqtt() {
        let topics = [format!("sb/{gi}/0"), format!("sb/{gi}/1")];
        let a = MqttConn::open(s0, &format!("sb-{gi}-0"), &topics[0]).await?;
        let b = MqttConn::open(s1, &format!("sb-{gi}-1"), &topics[1]).await?;
        Ok(PairConns::Mqtt([a, b], topics))
    } else {
        let (a0, a1) = (&accounts[2 * gi as usize], &accounts[2 * gi as usize + 1]);
        let mut c0 = StarlingConn::new(s0);
        let mut c1 = StarlingConn::new(s1);
        let w = c0.hello(Some(&a0.access_token)).await?;
        c1.hello(Some(&a1.access_token)).await?;
        let inflight = w.limits.map_or(16, |l| l.inflight_requests_max as usize);
        Ok(PairConns::Starling(
            [c0, c1],
            [a0.user_id, a1.user_id],
            inflight,
        ))
    }
}

/// Sends whatever is due on member `m` (respecting the in-flight limit);
/// returns the next time something becomes due, if any.
#[allow(
    clippy::too_many_arguments,
    reason = "the hot path's state, passed apart to borrow it apart"
)]
fn due_starling(
    c: &mut StarlingConn,
    ep: &mut Ep,
    to_user: u64,
    plan: &Plan,
    inflight_max: usize,
    dir: u8,
    rec: &Rec,
    body: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let now = rec.now_ns();
    let mut sent = 0;
    let first_sched = (ep.next_k < ep.n).then(|| ep.sched_ns(plan.start_ns, ep.next_k));
    while ep.next_k < ep.n && ep.inflight < inflight_max {
        let sched = ep.sched_ns(plan.start_ns, ep.next_k);
        if sched > now {
            break;
        }
        write_body(body, sched, ep.next_k, dir, plan.body_bytes);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&sched.to_le_bytes());
        id[8..].copy_from_slice(&ep.next_k.to_le_bytes());
        let rid = c.rid();
        c.push(
            rid,
            Body::Send(v1::Send {
                client_msg_id: bytes::Bytes::copy_from_slice(&id),
                to: Some(v1::Recipient {
                    target: Some(v1::recipient::Target::UserId(to_user)),
                }),
                content_type: "application/octet-stream".to_owned(),
                body: bytes::Bytes::copy_from_slice(body),
                media: None,
                reply_to_seq: 0,
                // Sent once, never resent.
                first_attempt: true,
                change: None,
                set_timer: None,
            }),
        )?;
        rec.record_lag(sched, now);
        ep.next_k += 1;
        ep.inflight += 1;
        sent += 1;
    }
    rec.count_sends(
        sent,
        ep.note_window(plan.start_ns, now, inflight_max, first_sched, sent),
    );
    if sent > 0 {
        ep.urgent = true;
    }
    Ok(())
}

fn next_due(eps: &[Ep; 2], plan: &Plan, inflight_max: usize) -> Option<u64> {
    eps.iter()
        .filter(|e| e.next_k < e.n && e.inflight < inflight_max)
        .map(|e| e.sched_ns(plan.start_ns, e.next_k))
        .min()
}

/// When a pair's task must wake next: its next scheduled send or the end of an
/// acknowledgement's hold, whichever is first, on the tick grid.
fn next_wake(eps: &[Ep; 2], plan: &Plan, inflight_max: usize) -> u64 {
    let next = next_due(eps, plan, inflight_max).unwrap_or(plan.drain_ns);
    let held = eps
        .iter()
        .filter_map(|e| e.ack_held_since)
        .map(|t| t + plan.ack_delay_ns)
        .min();
    plan.quantize(held.map_or(next, |h| h.min(next)))
}

fn pair_done(eps: &[Ep; 2]) -> bool {
    eps.iter().all(|e| e.next_k == e.n && e.inflight == 0) && eps.iter().all(|e| e.delivered >= e.n)
}

/// Handles the frames received on member `m`'s connection.
fn on_starling_frames(
    c: &mut StarlingConn,
    m: usize,
    eps: &mut [Ep; 2],
    plan: &Plan,
    rec: &Rec,
) -> anyhow::Result<()> {
    let now = rec.now_ns();
    while let Some(f) = c.next_frame()? {
        match f.body {
            Some(Body::SendAck(a)) => {
                let sched = a
                    .client_msg_id
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .context("SendAck with a foreign client_msg_id")?;
                rec.record_ack(sched, now);
                eps[m].inflight = eps[m].inflight.saturating_sub(1);
                rec.counts.borrow_mut().acked += 1;
            }
            Some(Body::Deliver(d)) => {
                let msg = d.message.context("Deliver without a message")?;
                eps[m].max_seq = eps[m].max_seq.max(msg.seq);
                let (sched, k, dir) = read_body(&msg.body).context("Deliver of a foreign body")?;
                if usize::from(dir) == m {
                    // A copy of our own message (the sender's other devices get it as Deliver).
                    continue;
                }
                if eps[m].mark(k) {
                    rec.record(&rec.deliver, sched, now);
                    eps[m].delivered += 1;
                    eps[m].awaiting_receipt.push_back((msg.seq, now));
                    eps[m].ack_upto = Some((msg.conversation_id, msg.seq));
                    rec.counts.borrow_mut().delivered += 1;
                    *rec.last_delivery_ns.borrow_mut() = now;
                } else {
                    rec.counts.borrow_mut().duplicates += 1;
                }
            }
            Some(Body::Receipt(r)) if r.kind == v1::ReceiptKind::Delivered as i32 => {
                {
                    // Receipts for what the peer (the other member) received.
                    let peer = &mut eps[1 - m];
                    let mut n = 0;
                    while let Some(&(seq, t)) = peer.awaiting_receipt.front() {
                        if seq > r.up_to_seq {
                            break;
                        }
                        peer.awaiting_receipt.pop_front();
                        if now >= plan.start_ns {
                            rec.receipt
                                .borrow_mut()
                                .saturating_record(now.saturating_sub(t) / 1000);
                        }
                        n += 1;
                    }
                    rec.counts.borrow_mut().receipts += n;
                }
            }
            Some(Body::MessagesAvailable(h)) => {
                // This connection went over its outbound budget: the server pushes nothing more
                // until we catch up by Sync (as the SDK does).
                rec.counts.borrow_mut().hints += 1;
                if !eps[m].syncing {
                    request_sync(c, &mut eps[m], h.conversation_id, rec)?;
                }
            }
            Some(Body::SyncDone(done)) => {
                eps[m].syncing = false;
                if let Some(t) = done.truncated.first() {
                    request_sync(c, &mut eps[m], t.conversation_id, rec)?;
                }
            }
            Some(Body::Ping(p)) => {
                c.push(0, Body::Pong(v1::Pong { nonce: p.nonce }))?;
                eps[m].urgent = true;
            }
            Some(Body::Error(e)) => {
                if e.code == v1::ErrorCode::Unavailable as i32 {
                    *rec.fatal.borrow_mut() = Some(describe_error(&e));
                    bail!(
                        "the server answered with UNAVAILABLE ({}): messaging is not wired \
                         into this server yet, so there is nothing to measure",
                        describe_error(&e)
                    );
                }
                eps[m].inflight = eps[m].inflight.saturating_sub(1);
                bail!("server error: {}", describe_error(&e));
            }
            Some(Body::Goodbye(g)) => bail!("server said Goodbye: {}", g.message),
            _ => {}
        }
    }
    // The cumulative DeliveryAck waits for the connection's next write (a Send's, or its own
    // once held for `ack_delay_ns`); later batches only move its position.
    if let Some((conv, seq)) = eps[m].ack_upto.take() {
        if eps[m].ack_unsent.is_some_and(|(c, _)| c != conv) {
            push_held_ack(c, &mut eps[m], plan)?;
        }
        eps[m].ack_unsent = Some((conv, seq));
        eps[m].ack_held_since.get_or_insert(now);
    }
    Ok(())
}

/// Queues the held cumulative DeliveryAck (and ReadCursor, with `--read-cursor`), if any.
fn push_held_ack(c: &mut StarlingConn, ep: &mut Ep, plan: &Plan) -> anyhow::Result<()> {
    let Some((conv, seq)) = ep.ack_unsent.take() else {
        return Ok(());
    };
    c.push(
        0,
        Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conv,
            up_to_seq: seq,
        }),
    )?;
    if plan.read_cursor {
        c.push(
            0,
            Body::ReadCursor(v1::ReadCursor {
                conversation_id: conv,
                up_to_seq: seq,
            }),
        )?;
    }
    Ok(())
}

/// Asks for everything in `conv` after the highest seq this connection has seen.
fn request_sync(c: &mut StarlingConn, ep: &mut Ep, conv: u64, rec: &Rec) -> anyhow::Result<()> {
    let rid = c.rid();
    c.push(
        rid,
        Body::Sync(v1::Sync {
            last_seq: std::iter::once((conv, ep.max_seq)).collect(),
        }),
    )?;
    ep.syncing = true;
    ep.urgent = true;
    rec.counts.borrow_mut().syncs += 1;
    Ok(())
}

async fn starling_pair(
    mut c: [StarlingConn; 2],
    users: [u64; 2],
    server_inflight: usize,
    mut eps: [Ep; 2],
    plan: Plan,
    rec: &Rec,
    timer: &Timer,
) -> anyhow::Result<()> {
    let inflight_max = if plan.inflight == 0 {
        server_inflight
    } else {
        plan.inflight.min(server_inflight)
    }
    .max(1);
    let mut body = Vec::with_capacity(plan.body_bytes);
    let [c0, c1] = &mut c;
    loop {
        if rec.fatal.borrow().is_some() {
            bail!("stopping: another pair saw the server refuse messaging");
        }
        due_starling(
            c0,
            &mut eps[0],
            users[1],
            &plan,
            inflight_max,
            0,
            rec,
            &mut body,
        )?;
        due_starling(
            c1,
            &mut eps[1],
            users[0],
            &plan,
            inflight_max,
            1,
            rec,
            &mut body,
        )?;
        let now = rec.now_ns();
        let [e0, e1] = &mut eps;
        for (c, e) in [(&mut *c0, e0), (&mut *c1, e1)] {
            if (c.pending_write() > 0 || e.ack_unsent.is_some()) && e.must_write(now, &plan) {
                push_held_ack(c, e, &plan)?;
                c.flush().await?;
                e.written();
            }
        }
        if pair_done(&eps) {
            // Wait briefly for the last receipts.
            if eps.iter().all(|e| e.awaiting_receipt.is_empty()) || rec.now_ns() > plan.drain_ns {
                return Ok(());
            }
        }
        if rec.now_ns() > plan.drain_ns || workers::stop_requested() {
            return Ok(());
        }
        let wake = next_wake(&eps, &plan, inflight_max);
        tokio::select! {
            n = c0.read_some() => {
                if n? == 0 { bail!("server closed the connection"); }
                on_starling_frames(c0, 0, &mut eps, &plan, rec)?;
            }
            n = c1.read_some() => {
                if n? == 0 { bail!("server closed the connection"); }
                on_starling_frames(c1, 1, &mut eps, &plan, rec)?;
            }
            () = timer.sleep_until_ns(wake) => {}
        }
    }
}

mod mqtt_peer;
use mqtt_peer::{MqttConn, mqtt_pair};

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends every due message the window allows, as `due_*` do, and returns (sent, waited).
    fn send_due(ep: &mut Ep, now: u64, window: usize) -> (u64, u64) {
        let first = (ep.next_k < ep.n).then(|| ep.sched_ns(0, ep.next_k));
        let mut sent = 0;
        while ep.next_k < ep.n && ep.inflight < window && ep.sched_ns(0, ep.next_k) <= now {
            ep.next_k += 1;
            ep.inflight += 1;
            sent += 1;
        }
        (sent, ep.note_window(0, now, window, first, sent))
    }

    #[test]
    fn only_sends_that_were_due_while_the_window_was_full_count_as_waiting() {
        // One message every 100 ns, a window of 2.
        let mut ep = Ep::new(0, 100, 10);
        assert_eq!(send_due(&mut ep, 0, 2), (1, 0));
        assert_eq!(send_due(&mut ep, 100, 2), (1, 0));
        // Messages 2 and 3 are due at 350 but the window is full.
        assert_eq!(send_due(&mut ep, 350, 2), (0, 0));
        assert_eq!(ep.window_full_at, Some(350));
        // Both acknowledgements arrive at 380: 2 and 3 go out, both had waited.
        ep.inflight = 0;
        assert_eq!(send_due(&mut ep, 380, 2), (2, 2));
        // At 420 the window is full again but message 4 (due at 400) was not due when it
        // filled up at 350: it waited too, as seen at 420; message 5 (due 500) was not due.
        assert_eq!(send_due(&mut ep, 420, 2), (0, 0));
        ep.inflight = 0;
        assert_eq!(send_due(&mut ep, 600, 2), (2, 1));
        // Message 6 was due at 600, when the window was full again: it waited; 7 and 8,
        // due with room in a larger window, did not.
        ep.inflight = 0;
        assert_eq!(send_due(&mut ep, 800, 8), (3, 1));
        assert_eq!(send_due(&mut ep, 900, 8), (1, 0));
    }

    #[test]
    fn a_held_ack_waits_for_the_next_send_or_its_delay_whichever_is_first() {
        let plan = Plan {
            start_ns: 0,
            drain_ns: 1_000_000_000,
            interval_ns: 4_000_000,
            per_member: 100,
            body_bytes: 100,
            inflight: 64,
            read_cursor: false,
            tick_ns: 100_000,
            ack_delay_ns: 5_000_000,
        };
        // Member 0 sends every 4 ms from 0, member 1 from 2 ms; both have sent their first.
        let mut eps = [
            Ep::new(0, 4_000_000, 100),
            Ep::new(2_000_000, 4_000_000, 100),
        ];
        for e in &mut eps {
            e.next_k = 1;
        }
        // Member 0 received a Deliver at 0.5 ms and another at 1.5 ms: one held position.
        eps[0].ack_unsent = Some((7, 1));
        eps[0].ack_held_since = Some(500_000);
        eps[0].ack_unsent = Some((7, 2));
        assert!(
            !eps[0].must_write(1_500_000, &plan),
            "held: no send due, delay not over"
        );
        // The pair's task wakes next for member 0's send at 4 ms: before the hold ends at
        // 5.5 ms and before member 1's send at 6 ms.
        assert_eq!(next_wake(&eps, &plan, 64), 4_000_000);
        // Member 0's next send (due at 4 ms) makes the write urgent: the ack rides with it.
        eps[0].urgent = true;
        assert!(eps[0].must_write(4_000_000, &plan));
        eps[0].written();
        assert_eq!(eps[0].ack_held_since, None);
        // With no send due for long, the hold ends by itself at 0.5 + 5 ms.
        eps[0].ack_unsent = Some((7, 3));
        eps[0].ack_held_since = Some(500_000);
        eps[0].next_k = 100;
        eps[0].n = 200;
        eps[1].next_k = 100;
        eps[1].n = 200;
        eps[0].interval_ns = 100_000_000;
        eps[1].interval_ns = 100_000_000;
        assert!(!eps[0].must_write(5_400_000, &plan));
        assert!(eps[0].must_write(5_500_000, &plan));
        assert_eq!(next_wake(&eps, &plan, 64), 5_500_000);
    }
}
