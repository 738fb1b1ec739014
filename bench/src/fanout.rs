//! `starling-bench fanout`: group messages, open loop, and what their fan-out costs.
//!
//! `--groups G` groups of `--group-size N` members each, every member its own account (from
//! `--accounts`; with `--data-dir`, those missing are registered first, as `register` does) and
//! its own connection (over `--procs` processes and 127.0.0.x source addresses when the count
//! needs it). Member 0 of each group creates it (CreateGroup with the first `--members-per-request`
//! members, AddGroupMembers for the rest) and is its only sender; the other N − 1 members only
//! receive, so each message is N − 1 deliveries. With `--online M`, only the first M members of
//! each group (the sender included) connect; the others are members without a connection, and
//! each message is M − 1 deliveries. Once every connecting member is connected and every group
//! exists, the senders send `--rate` group messages per second in total (each
//! group `rate / G`, phases spread evenly), for `--duration-secs`.
//!
//! As in `messages`, every message's send time is fixed before the run (open loop) and carried
//! in its body as a `CLOCK_MONOTONIC` reading, so a receiver in another process measures
//! scheduled send → delivery, and a stall is charged to every message it delayed (coordinated
//! omission corrected as wrk2 does). Messages scheduled in the first `--warmup-secs` are not
//! recorded. Measured, for the online members: deliveries per second, send → delivery over all
//! deliveries (p50/p99), and send → delivery to the **last** member of each message (the
//! slowest of its N − 1 deliveries); the sender's send → SendAck.
//!
//! Receivers acknowledge as a client does: one cumulative DeliveryAck per conversation, held up
//! to `--ack-delay-us` (`--no-delivery-acks`: none; the server then announces no receipts). In a
//! group the server answers cursors with coalesced aggregate `GroupReceipts` to the sender, not
//! a Receipt per member to every member.
//!
//! `--peer mqtt://…` (or `mqtts://`) runs the same workload against an MQTT 3.1.1 broker after
//! Starling, in the same invocation: per group one publisher connection at QoS 1 to the topic
//! `sb-fanout/G` and N − 1 subscriber connections to it at QoS 1 (PUBACKs held like the
//! DeliveryAcks), the same rate, schedule, bodies and measurements. Every phase is bounded in
//! time; the run stops by itself.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::accounts::{self, AccountsFile};
use crate::clock::{self, Stopwatch};
use crate::net::Target;
use crate::report::{self, HistData, Machine, Summary};
use crate::workers::{Tally, WorkerArgs, Workers};

mod mqtt_peer;
mod starling;
mod worker;

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct FanoutArgs {
    /// Starling: tls://IP:PORT or plain://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    pub(crate) target: String,
    /// The like-for-like peer run after Starling's: mqtt://IP:PORT or mqtts://IP:PORT.
    #[arg(long)]
    pub(crate) peer: Option<String>,
    /// Skip the Starling run (only the --peer run).
    #[arg(long)]
    pub(crate) peer_only: bool,
    /// CA certificate for TLS (Starling's and the peer's) [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Starling's data directory (for the default CA path).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (one account per member: G × N). With
    /// --data-dir, missing accounts are registered first (the server's OTP limits must allow it).
    #[arg(long, default_value = "bench-accounts.json")]
    pub(crate) accounts: PathBuf,
    /// Members per group (the sender included).
    #[arg(long, default_value_t = 100)]
    pub(crate) group_size: u64,
    /// Members per group that connect (the sender included; 0: all of them). The others are
    /// members without a connection: a large group's cost to the server with only some of it
    /// online, as a 100,000-member group always is.
    #[arg(long, default_value_t = 0)]
    pub(crate) online: u64,
    /// Groups.
    #[arg(long, default_value_t = 1)]
    pub(crate) groups: u64,
    /// Offered load: group messages per second over all groups.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
    /// Messages scheduled in the first seconds are not recorded.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup_secs: u64,
    /// After sending, wait at most this long for the last deliveries.
    #[arg(long, default_value_t = 5)]
    pub(crate) drain_secs: u64,
    /// Connecting every member and creating every group must finish within this.
    #[arg(long, default_value_t = 120)]
    pub(crate) setup_secs: u64,
    /// Body bytes per message (at least 24: scheduled time, group, index).
    #[arg(long, default_value_t = 100)]
    pub(crate) body_bytes: usize,
    /// Members named per CreateGroup / AddGroupMembers request (the server's per-request limit).
    #[arg(long, default_value_t = 256)]
    pub(crate) members_per_request: usize,
    /// Most unacknowledged sends per sender (0: Starling's Welcome.limits.inflight_requests_max;
    /// 64 for MQTT).
    #[arg(long, default_value_t = 0)]
    pub(crate) inflight: usize,
    /// Send quantum in µs: a sender's wake-ups are rounded up to a multiple of it.
    #[arg(long, default_value_t = 100)]
    pub(crate) tick_us: u64,
    /// Hold a receiver's acknowledgement (Starling: one cumulative DeliveryAck; MQTT: its
    /// PUBACKs) up to this long, so that acknowledgements of messages close together share a
    /// write; 0: write each at once.
    #[arg(long, default_value_t = 5000)]
    pub(crate) ack_delay_us: u64,
    /// Starling: receivers send no DeliveryAck (MQTT receivers still PUBACK: QoS 1 needs it).
    #[arg(long)]
    pub(crate) no_delivery_acks: bool,
    /// The Starling server's pid, to measure its CPU.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// The peer broker's pid, to measure its CPU.
    #[arg(long)]
    pub(crate) peer_pid: Option<u32>,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    pub(crate) sources: u32,
    /// Write the full report here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Internal: which system a worker process drives.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub(crate) worker_system: Option<String>,
    #[command(flatten)]
    #[serde(skip)]
    pub(crate) w: WorkerArgs,
}

impl FanoutArgs {
    /// Messages each group's sender sends.
    pub(crate) fn per_group(&self) -> u64 {
        (self.duration_secs as f64 * self.rate / self.groups.max(1) as f64).floor() as u64
    }

    /// Messages of each group scheduled in the warm-up (not recorded).
    pub(crate) fn warm_k(&self) -> u64 {
        (self.warmup_secs as f64 * self.rate / self.groups.max(1) as f64).ceil() as u64
    }

    /// Members of each group with a connection (the sender included).
    pub(crate) fn online(&self) -> u64 {
        match self.online {
            0 => self.group_size,
            n => n.min(self.group_size),
        }
    }

    /// Every connection: G × online members.
    pub(crate) fn connections(&self) -> u64 {
        self.groups * self.online()
    }

    /// Every account: G × N.
    pub(crate) fn accounts(&self) -> u64 {
        self.groups * self.group_size
    }
}

/// Counters a worker reports.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Counts {
    /// Members connected (and, MQTT, subscribed).
    pub(crate) connected: u64,
    /// Groups created with every member.
    pub(crate) groups_created: u64,
    /// Workers done connecting and creating (1 per worker).
    pub(crate) setup_done: u64,
    pub(crate) scheduled: u64,
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    /// Deliveries of bench messages to receivers (the warm-up's included).
    pub(crate) delivered: u64,
    /// Deliveries of recorded messages (after the warm-up).
    pub(crate) measured_deliveries: u64,
    pub(crate) duplicates: u64,
    /// Receipt and GroupReceipts frames received (by senders and receivers).
    pub(crate) receipts: u64,
    /// `MessagesAvailable` hints received and the Syncs sent for them.
    pub(crate) hints: u64,
    pub(crate) syncs: u64,
    /// Sends that were due while the sender's in-flight window was full.
    pub(crate) window_waits: u64,
    pub(crate) errors: u64,
    /// Member tasks finished.
    pub(crate) finished: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.connected += o.connected;
        self.groups_created += o.groups_created;
        self.setup_done += o.setup_done;
        self.scheduled += o.scheduled;
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.measured_deliveries += o.measured_deliveries;
        self.duplicates += o.duplicates;
        self.receipts += o.receipts;
        self.hints += o.hints;
        self.syncs += o.syncs;
        self.window_waits += o.window_waits;
        self.errors += o.errors;
        self.finished += o.finished;
    }
}

/// What one worker measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    pub(crate) counts: Counts,
    pub(crate) ack: HistData,
    pub(crate) deliver: HistData,
    pub(crate) send_lag: HistData,
    /// Per recorded message (group × per-group index, warm-up included as zeros): the slowest
    /// delivery to this worker's receivers (µs), and how many of them got it.
    pub(crate) slowest_us: Vec<u32>,
    pub(crate) got: Vec<u32>,
    /// `CLOCK_MONOTONIC` ns: the earliest scheduled send among recorded deliveries, the last
    /// recorded delivery.
    pub(crate) first_sched_ns: u64,
    pub(crate) last_delivery_ns: u64,
    pub(crate) cpu_secs: f64,
    pub(crate) errors: Vec<String>,
}

/// The measured outcome of one system's run.
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) system: &'static str,
    pub(crate) target: String,
    pub(crate) group_size: u64,
    /// Members per group with a connection (the sender included).
    pub(crate) online: u64,
    pub(crate) groups: u64,
    /// Group messages per second offered, and the deliveries per second that makes.
    pub(crate) rate_offered: f64,
    pub(crate) deliveries_offered_per_s: f64,
    /// Recorded deliveries over the time from the first recorded message's scheduled send to
    /// the last recorded delivery (at least the recorded schedule's length).
    pub(crate) deliveries_per_s: f64,
    pub(crate) counts: Counts,
    /// Deliveries owed to online members (online − 1 per message sent) that never came.
    pub(crate) missing: u64,
    /// Recorded messages that did not reach every receiver (left out of `last_member_us`).
    pub(crate) incomplete_messages: u64,
    pub(crate) deliver_us: Summary,
    pub(crate) last_member_us: Summary,
    pub(crate) ack_us: Summary,
    pub(crate) send_lag_us: Summary,
    pub(crate) server_cpu_cores: Option<f64>,
    pub(crate) deliveries_per_server_core: Option<f64>,
    pub(crate) loadgen_cpu_cores: f64,
    pub(crate) loadgen_saturated: bool,
    /// At least 1% of the sends waited for the in-flight window.
    pub(crate) window_bound: bool,
    pub(crate) loadavg_1m_end: f64,
    pub(crate) errors: Vec<String>,
}

pub(crate) fn run(args: &FanoutArgs) -> anyhow::Result<()> {
    if let Some(system) = &args.worker_system {
        return worker::run(args, system);
    }
    check(args)?;
    let machine = Machine::now();
    let mut outcomes = Vec::new();
    if !args.peer_only {
        let out = run_system(args, &args.target, args.server_pid)?;
        print_outcome(args, &out);
        outcomes.push(out);
    }
    if let Some(peer) = &args.peer {
        let out = run_system(args, peer, args.peer_pid)?;
        print_outcome(args, &out);
        outcomes.push(out);
    }
    if let [s, p] = &outcomes[..] {
        print_comparison(s, p);
    }
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "fanout",
                "params": args,
                "machine": machine,
                "outcomes": outcomes,
            }),
        )?;
    }
    if let Some(o) = outcomes.iter().find(|o| o.counts.measured_deliveries == 0) {
        bail!(
            "{}: nothing was delivered: {}",
            o.system,
            o.errors.first().map_or("", String::as_str)
        );
    }
    Ok(())
}

/// Argument checks, before any process or connection.
fn check(args: &FanoutArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.group_size >= 2 && args.groups >= 1 && args.rate > 0.0,
        "--group-size must be at least 2, --groups at least 1 and --rate above 0"
    );
    anyhow::ensure!(
        args.online() >= 2,
        "--online must be 0 (all) or at least 2: the sender and a receiver"
    );
    anyhow::ensure!(
        args.body_bytes >= worker::BODY_HEADER,
        "--body-bytes must be at least {}",
        worker::BODY_HEADER
    );
    anyhow::ensure!(
        args.members_per_request >= 1,
        "--members-per-request must be at least 1"
    );
    anyhow::ensure!(
        args.per_group() > args.warm_k(),
        "nothing would be recorded: --duration-secs × --rate / --groups must exceed the warm-up's messages ({})",
        args.warm_k()
    );
    let messages = args.per_group() * args.groups;
    anyhow::ensure!(
        messages <= 4_000_000,
        "{messages} messages in one run is over the bound of 4,000,000: lower --rate or --duration-secs"
    );
    let per_proc = args.connections().div_ceil(u64::from(args.w.procs.max(1)));
    if per_proc > 19_000 {
        bail!("{per_proc} connections per process is over the 20,000 open-file cap: raise --procs");
    }
    if let Some(p) = &args.peer {
        anyhow::ensure!(
            Target::parse(p)?.is_mqtt(),
            "--peer must be mqtt:// or mqtts://"
        );
    } else {
        anyhow::ensure!(!args.peer_only, "--peer-only needs --peer");
    }
    if !args.peer_only {
        let t = Target::parse(&args.target)?;
        anyhow::ensure!(
            !t.is_mqtt(),
            "--target is Starling; an MQTT broker goes in --peer"
        );
        let need = args.accounts() as usize;
        let have = AccountsFile::load(&args.accounts).map_or(0, |a| a.accounts.len());
        if let (true, Some(data_dir)) = (have < need, &args.data_dir) {
            accounts::top_up(
                &args.target,
                args.ca.as_deref(),
                data_dir,
                need,
                &args.accounts,
            )?;
        }
        AccountsFile::load(&args.accounts)?.need(need, &args.accounts)?;
    }
    Ok(())
}

/// Runs one system's workers through set-up, the signal to start and the run; merges.
fn run_system(args: &FanoutArgs, target: &str, server_pid: Option<u32>) -> anyhow::Result<Outcome> {
    let procs = args.w.procs.max(1);
    let mqtt = Target::parse(target)?.is_mqtt();
    let system = if mqtt { "peer" } else { "starling" };
    let mut ws = Workers::spawn_with(procs, &["--worker-system", system])?;
    let sw = Stopwatch::start();
    let mut tally: Tally<Counts, WorkerResult> = Tally::new(procs as usize);
    let setup_cap = Duration::from_secs(args.setup_secs);
    let run_cap = Duration::from_secs(args.duration_secs + args.drain_secs + 30);
    let mut started: Option<(Option<f64>, f64)> = None;
    let mut ended: Option<(Option<f64>, f64)> = None;
    let name = if mqtt { "fanout (peer)" } else { "fanout" };
    loop {
        if let Some(m) = ws.recv(Duration::from_millis(200))? {
            tally.apply(&m, |r| &r.counts)?;
        }
        let mut t = Counts::default();
        for p in &tally.progress {
            t.add(p);
        }
        if started.is_none() {
            if t.setup_done == u64::from(procs) || tally.any_done() {
                if t.errors > 0
                    || t.connected < args.connections()
                    || t.groups_created < args.groups
                {
                    ws.stop_all();
                    let _ = collect(&mut ws, &mut tally, Duration::from_secs(10));
                    let errs: Vec<String> = tally
                        .into_results()
                        .into_iter()
                        .flat_map(|r| r.errors)
                        .take(5)
                        .collect();
                    let _ = ws.wait();
                    bail!(
                        "{system} set-up failed: {} of {} members connected, {} of {} groups created, {} errors: {}",
                        t.connected,
                        args.connections(),
                        t.groups_created,
                        args.groups,
                        t.errors,
                        errs.join("; ")
                    );
                }
                ws.signal_all();
                started = Some((server_pid.and_then(report::cpu_secs), sw.elapsed_secs()));
            } else if sw.elapsed() > setup_cap {
                ws.stop_all();
                let _ = ws.wait();
                bail!(
                    "{system} set-up took over --setup-secs {}: {} of {} members connected, {} of {} groups created",
                    args.setup_secs,
                    t.connected,
                    args.connections(),
                    t.groups_created,
                    args.groups
                );
            }
        }
        if started.is_some() && ended.is_none() && tally.any_done() {
            ended = Some((server_pid.and_then(report::cpu_secs), sw.elapsed_secs()));
        }
        report::progress(&format!(
            "{name}: {:.0}s connected {}/{} groups {}/{} sent {} acked {} delivered {} errors {}",
            sw.elapsed_secs(),
            t.connected,
            args.connections(),
            t.groups_created,
            args.groups,
            t.sent,
            t.acked,
            t.delivered,
            t.errors
        ));
        if tally.all_done() {
            break;
        }
        if let Some((_, t0)) = started
            && sw.elapsed_secs() - t0 > run_cap.as_secs_f64()
        {
            ws.stop_all();
        }
    }
    report::progress_done();
    ws.wait()?;
    let results = tally.into_results();
    Ok(merge(args, target, mqtt, &results, started, ended))
}

/// Reads worker lines until every result is in or `cap` has passed.
fn collect(
    ws: &mut Workers,
    tally: &mut Tally<Counts, WorkerResult>,
    cap: Duration,
) -> anyhow::Result<()> {
    let sw = Stopwatch::start();
    while !tally.all_done() && sw.elapsed() < cap {
        if let Some(m) = ws.recv(Duration::from_millis(200))? {
            tally.apply(&m, |r| &r.counts)?;
        }
    }
    Ok(())
}

fn merge(
    args: &FanoutArgs,
    target: &str,
    mqtt: bool,
    results: &[WorkerResult],
    started: Option<(Option<f64>, f64)>,
    ended: Option<(Option<f64>, f64)>,
) -> Outcome {
    let (mut ack, mut del, mut lag) = (
        report::histogram(),
        report::histogram(),
        report::histogram(),
    );
    let n = args.per_group();
    let slots = (n * args.groups) as usize;
    let mut slowest = vec![0u32; slots];
    let mut got = vec![0u32; slots];
    let mut counts = Counts::default();
    let mut errors = Vec::new();
    let mut lg_cpu = 0.0;
    let (mut first, mut last) = (u64::MAX, 0u64);
    for r in results {
        r.ack.merge_into(&mut ack);
        r.deliver.merge_into(&mut del);
        r.send_lag.merge_into(&mut lag);
        counts.add(&r.counts);
        errors.extend(r.errors.iter().cloned());
        lg_cpu += r.cpu_secs;
        if r.counts.measured_deliveries > 0 {
            first = first.min(r.first_sched_ns);
            last = last.max(r.last_delivery_ns);
        }
        for (i, (s, g)) in r.slowest_us.iter().zip(&r.got).enumerate().take(slots) {
            slowest[i] = slowest[i].max(*s);
            got[i] += g;
        }
    }
    let (last_member, incomplete) =
        last_member(&slowest, &got, n, args.warm_k(), args.online() - 1);
    let (server_cpu_cores, wall) = match (started, ended) {
        (Some((a, t0)), Some((b, t1))) if t1 > t0 => {
            (a.zip(b).map(|(a, b)| (b - a) / (t1 - t0)), t1 - t0)
        }
        _ => (None, 1.0),
    };
    // From the first recorded message's scheduled send to the last recorded delivery, but at
    // least the recorded schedule's length (n − warm_k intervals): a server that keeps up is
    // credited with the offered rate, not more.
    let schedule_s = (n - args.warm_k()) as f64 * args.groups as f64 / args.rate;
    let span_s = (last.saturating_sub(first) as f64 / 1e9).max(schedule_s);
    let deliveries_per_s = if span_s > 0.0 {
        counts.measured_deliveries as f64 / span_s
    } else {
        0.0
    };
    let loadgen_cpu_cores = lg_cpu / wall.max(1e-3);
    Outcome {
        system: if mqtt { "mqtt" } else { "starling" },
        target: target.to_owned(),
        group_size: args.group_size,
        online: args.online(),
        groups: args.groups,
        rate_offered: args.rate,
        deliveries_offered_per_s: args.rate * (args.online() - 1) as f64,
        deliveries_per_s,
        missing: (counts.sent * (args.online() - 1)).saturating_sub(counts.delivered),
        incomplete_messages: incomplete,
        deliver_us: Summary::of(&del),
        last_member_us: Summary::of(&last_member),
        ack_us: Summary::of(&ack),
        send_lag_us: Summary::of(&lag),
        server_cpu_cores,
        deliveries_per_server_core: server_cpu_cores
            .filter(|c| *c > 0.0)
            .map(|c| deliveries_per_s / c),
        loadgen_cpu_cores,
        loadgen_saturated: loadgen_cpu_cores
            > report::SATURATED_SHARE * f64::from(args.w.procs.max(1)),
        window_bound: counts.window_waits * 100 >= counts.sent.max(1),
        counts,
        loadavg_1m_end: report::loadavg(),
        errors: errors.into_iter().take(20).collect(),
    }
}

/// The last-member latencies of the recorded messages that reached all `receivers`, and how
/// many recorded messages did not. `slowest`/`got` are per (group, index), `n` per group.
fn last_member(
    slowest: &[u32],
    got: &[u32],
    n: u64,
    warm_k: u64,
    receivers: u64,
) -> (Histogram<u64>, u64) {
    let mut h = report::histogram();
    let mut incomplete = 0;
    for (i, (s, g)) in slowest.iter().zip(got).enumerate() {
        if (i as u64) % n.max(1) < warm_k {
            continue;
        }
        if u64::from(*g) >= receivers {
            h.saturating_record(u64::from(*s));
        } else {
            incomplete += 1;
        }
    }
    (h, incomplete)
}

fn print_outcome(args: &FanoutArgs, out: &Outcome) {
    let c = &out.counts;
    println!();
    println!("target            {} ({})", out.target, out.system);
    println!(
        "workload          {} groups of {} members ({} online), {:.1} group msg/s offered ({:.0} deliveries/s), {} s, {}-byte bodies, {} processes",
        args.groups,
        args.group_size,
        out.online,
        args.rate,
        out.deliveries_offered_per_s,
        args.duration_secs,
        args.body_bytes,
        args.w.procs
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
    if out.incomplete_messages > 0 {
        println!(
            "incomplete        {} recorded messages did not reach every member (not in the last-member row)",
            out.incomplete_messages
        );
    }
    println!(
        "deliveries        {:.0}/s{}",
        out.deliveries_per_s,
        out.deliveries_per_server_core
            .map_or_else(String::new, |d| format!(" ({d:.0} per server core)"))
    );
    if let Some(s) = out.server_cpu_cores {
        println!("server CPU        {s:.2} cores");
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
    if out.window_bound {
        println!(
            "in-flight window  [WINDOW-BOUND: ≥ 1% of the sends waited for an acknowledgement]"
        );
    }
    let (ack, del) = if out.system == "mqtt" {
        ("publish -> PUBACK", "publish -> receive")
    } else {
        ("send -> SendAck", "send -> Deliver")
    };
    report::print_latency_table(&[
        (ack, &out.ack_us),
        (del, &out.deliver_us),
        ("... to the last member", &out.last_member_us),
        ("send lag (loadgen)", &out.send_lag_us),
    ]);
    for e in out.errors.iter().take(5) {
        println!("error: {e}");
    }
}

fn print_comparison(s: &Outcome, p: &Outcome) {
    println!();
    println!(
        "starling / mqtt   deliveries/s {:.0} / {:.0} = {:.2}x; delivery p99 {} / {} µs; last-member p99 {} / {} µs",
        s.deliveries_per_s,
        p.deliveries_per_s,
        s.deliveries_per_s / p.deliveries_per_s.max(1e-9),
        s.deliver_us.p99_us,
        p.deliver_us.p99_us,
        s.last_member_us.p99_us,
        p.last_member_us.p99_us
    );
}

/// Worker-wide recorders, on one clock: ns since `epoch`, and `CLOCK_MONOTONIC` through
/// `epoch_mono_ns` for what crosses processes (the scheduled send time in a body).
#[derive(Debug)]
pub(crate) struct Rec {
    pub(crate) epoch: Instant,
    pub(crate) epoch_mono_ns: u64,
    pub(crate) counts: RefCell<Counts>,
    pub(crate) ack: RefCell<Histogram<u64>>,
    pub(crate) deliver: RefCell<Histogram<u64>>,
    pub(crate) lag: RefCell<Histogram<u64>>,
    pub(crate) slowest_us: RefCell<Vec<u32>>,
    pub(crate) got: RefCell<Vec<u32>>,
    pub(crate) first_sched_ns: Cell<u64>,
    pub(crate) last_delivery_ns: Cell<u64>,
    /// When the senders start (ns since `epoch`), once the parent said go.
    pub(crate) start_ns: Cell<Option<u64>>,
    pub(crate) errors: RefCell<Vec<String>>,
}

impl Rec {
    pub(crate) fn new(slots: usize) -> Self {
        let epoch = clock::now();
        Self {
            epoch,
            epoch_mono_ns: clock::monotonic_ns_of(epoch),
            counts: RefCell::default(),
            ack: RefCell::new(report::histogram()),
            deliver: RefCell::new(report::histogram()),
            lag: RefCell::new(report::histogram()),
            slowest_us: RefCell::new(vec![0; slots]),
            got: RefCell::new(vec![0; slots]),
            first_sched_ns: Cell::new(u64::MAX),
            last_delivery_ns: Cell::new(0),
            start_ns: Cell::new(None),
            errors: RefCell::default(),
        }
    }

    /// Ns since the epoch.
    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// `CLOCK_MONOTONIC` of `t` (ns since the epoch).
    pub(crate) fn mono(&self, t: u64) -> u64 {
        self.epoch_mono_ns + t
    }

    /// A delivery at `now` (ns since the epoch) of message `k` of group `g` scheduled at
    /// `sched_mono` (`CLOCK_MONOTONIC`), `recorded` unless in the warm-up.
    pub(crate) fn delivered(&self, slot: usize, sched_mono: u64, now: u64, recorded: bool) {
        let mut c = self.counts.borrow_mut();
        c.delivered += 1;
        if !recorded {
            return;
        }
        c.measured_deliveries += 1;
        let now_mono = self.mono(now);
        let us = now_mono.saturating_sub(sched_mono) / 1000;
        self.deliver.borrow_mut().saturating_record(us);
        if let Some(s) = self.slowest_us.borrow_mut().get_mut(slot) {
            *s = (*s).max(u32::try_from(us).unwrap_or(u32::MAX));
        }
        if let Some(g) = self.got.borrow_mut().get_mut(slot) {
            *g += 1;
        }
        self.first_sched_ns
            .set(self.first_sched_ns.get().min(sched_mono));
        self.last_delivery_ns
            .set(self.last_delivery_ns.get().max(now_mono));
    }

    pub(crate) fn error(&self, e: &anyhow::Error) {
        self.counts.borrow_mut().errors += 1;
        let mut errs = self.errors.borrow_mut();
        if errs.len() < 10 {
            errs.push(format!("{e:#}"));
        }
    }

    pub(crate) fn result(&self, cpu_secs: f64) -> WorkerResult {
        let h = |x: &RefCell<Histogram<u64>>| HistData::of(&x.borrow());
        WorkerResult {
            counts: self.counts.borrow().clone(),
            ack: h(&self.ack),
            deliver: h(&self.deliver),
            send_lag: h(&self.lag),
            slowest_us: self.slowest_us.borrow().clone(),
            got: self.got.borrow().clone(),
            first_sched_ns: self.first_sched_ns.get(),
            last_delivery_ns: self.last_delivery_ns.get(),
            cpu_secs,
            errors: self.errors.borrow().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_member_row_skips_the_warm_up_and_counts_incomplete_messages() {
        // Two groups of 3 messages each, the first of each in the warm-up, 2 receivers.
        let slowest = [900, 10, 20, 900, 30, 40];
        let got = [2, 2, 1, 2, 2, 2];
        let (h, incomplete) = last_member(&slowest, &got, 3, 1, 2);
        assert_eq!(incomplete, 1, "group 0's message 2 reached one of two");
        assert_eq!(h.len(), 3);
        assert_eq!(h.max(), 40);
        assert_eq!(h.min(), 10);
    }

    #[test]
    fn the_schedule_follows_the_arguments() {
        let mut a = FanoutArgs {
            target: "tls://127.0.0.1:7443".into(),
            peer: None,
            peer_only: false,
            ca: None,
            data_dir: None,
            accounts: "a.json".into(),
            group_size: 1000,
            online: 0,
            groups: 4,
            rate: 20.0,
            duration_secs: 10,
            warmup_secs: 1,
            drain_secs: 5,
            setup_secs: 120,
            body_bytes: 100,
            members_per_request: 100,
            inflight: 0,
            tick_us: 100,
            ack_delay_us: 5000,
            no_delivery_acks: false,
            server_pid: None,
            peer_pid: None,
            sources: 200,
            json: None,
            worker_system: None,
            w: WorkerArgs {
                procs: 1,
                worker: None,
            },
        };
        assert_eq!(a.per_group(), 50);
        assert_eq!(a.warm_k(), 5);
        assert_eq!(a.connections(), 4000);
        a.online = 10;
        assert_eq!((a.online(), a.connections(), a.accounts()), (10, 40, 4000));
        a.online = 1;
        assert!(check(&a).is_err_and(|e| format!("{e:#}").contains("--online")));
        a.online = 0;
        assert!(check(&a).is_err_and(|e| format!("{e:#}").contains("a.json")));
        a.rate = 0.1;
        assert!(check(&a).is_err_and(|e| format!("{e:#}").contains("nothing would be recorded")));
    }
}
