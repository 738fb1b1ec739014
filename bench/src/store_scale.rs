//! `starling-bench store-scale`: the embedded store at scale, against the real `starling`
//! binary, which this tool starts, kills and restarts itself (only the process it spawned).
//!
//! 1. **Register** `--senders` + ⌈C / senders⌉ accounts through the OTP flow (timed).
//! 2. **Fill**: `--messages` N Sends of `--body-bytes` each into `--conversations` C direct
//!    conversations. Conversation `i` is between sender `i mod S` and recipient `i div S`:
//!    each sender account keeps one connection with the server's whole in-flight window of
//!    Sends, the recipients stay offline (no Delivers), and a recipient has S conversations,
//!    so its Sync is S conversations long. The first C messages go one to each conversation
//!    in order (each creates its direct conversation: timed apart), the rest to conversations
//!    drawn from a Zipf popularity (`--zipf-s`, rank = conversation number). The server's RSS
//!    (`VmRSS`, `VmHWM`) and the data directory's disk use are sampled every `--sample-secs`.
//! 3. **Cold and hot**: one request at a time on the idle server, each timed from its write
//!    to its answer: Sync by the recipient (its map at every conversation's latest seq, the
//!    measured one's one short: one Deliver comes back), GetHistory of the latest page, and
//!    Send. Cold: the 3 × `--ops` conversations acknowledged longest ago, a distinct third for
//!    each kind of request; hot: the `--ops` most popular, for all three.
//! 4. **Restarts**: SIGKILL, start, time to `/readyz` 200; then SIGTERM (timed), start, time to
//!    ready. After each, `--verify` conversations (the cold and hot ones measured and others
//!    drawn at random) must end at the seq last acknowledged and hold every message
//!    acknowledged.
//!
//! Every phase prints its duration; the fill stops at `--fill-secs`; the server is stopped at
//! the end (and killed if the tool fails).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use crate::accounts::{self, Account, AccountsFile};
use crate::clock::Stopwatch;
use crate::net::{StarlingConn, Stream, source_addr};
use crate::report::{self, Machine};

mod fill;
mod probe;
mod server;

use server::{Server, ServerCmd};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct StoreScaleArgs {
    /// The `starling` server binary.
    #[arg(long, default_value = "target/release/starling")]
    starling: PathBuf,
    /// The server's config file.
    #[arg(long)]
    config: PathBuf,
    /// The server's data directory (created if missing; this tool does not delete it).
    #[arg(long)]
    data_dir: PathBuf,
    /// The server's output goes here [default: DATA_DIR/../starling.log].
    #[arg(long)]
    server_log: Option<PathBuf>,
    /// The server's TLS listener (not used by this tool, but the server needs one).
    #[arg(long, default_value = "127.0.0.1:47843")]
    tls_listen: SocketAddr,
    /// The server's plaintext listener, which this tool uses.
    #[arg(long, default_value = "127.0.0.1:47844")]
    plain_listen: SocketAddr,
    /// The server's metrics listener (`/readyz`).
    #[arg(long, default_value = "127.0.0.1:47890")]
    metrics_listen: SocketAddr,
    /// The server's shards.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Accounts file (registered into it when it holds too few).
    #[arg(long)]
    accounts: PathBuf,
    /// Messages to store.
    #[arg(long, default_value_t = 100_000_000)]
    messages: u64,
    /// Conversations they go into.
    #[arg(long, default_value_t = 1_000_000)]
    conversations: u64,
    /// Sender accounts (one connection each); each recipient has this many conversations.
    #[arg(long, default_value_t = 50)]
    senders: u64,
    /// Body bytes per message.
    #[arg(long, default_value_t = 200)]
    body_bytes: usize,
    /// Exponent of the conversations' Zipf popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Seed of the popularity draws.
    #[arg(long, default_value_t = 37)]
    seed: u64,
    /// The fill stops after this long even if not all messages were sent.
    #[arg(long, default_value_t = 6 * 3600)]
    fill_secs: u64,
    /// Requests of each kind measured on cold and on hot conversations.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Conversations checked after each restart.
    #[arg(long, default_value_t = 600)]
    verify: usize,
    /// Seconds between samples of the server's RSS and disk use.
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// Most seconds a start may take to be ready (and a clean stop to end).
    #[arg(long, default_value_t = 600)]
    ready_timeout_secs: u64,
    /// The server's `storage.index_memory_bytes` (0: not set), for the report's RSS bound.
    #[arg(long, default_value_t = 0)]
    index_memory_bytes: u64,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Which accounts a conversation is between: `convs` conversations over `senders` senders.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Layout {
    pub(super) convs: u64,
    pub(super) senders: u64,
}

impl Layout {
    pub(super) fn recipients(self) -> u64 {
        self.convs.div_ceil(self.senders)
    }

    /// The sender's index (accounts `0..senders`).
    pub(super) fn sender_of(self, conv: u32) -> usize {
        (u64::from(conv) % self.senders) as usize
    }

    /// The recipient's index (accounts `senders..`).
    pub(super) fn recipient_of(self, conv: u32) -> usize {
        (u64::from(conv) / self.senders) as usize
    }

    pub(super) fn convs_of_recipient(self, r: usize) -> impl Iterator<Item = u32> {
        let base = r as u64 * self.senders;
        (base..(base + self.senders).min(self.convs)).map(|j| j as u32)
    }
}

/// What was acknowledged in each conversation (indexed by conversation number).
#[derive(Debug)]
pub(super) struct Convs {
    pub(super) id: Vec<u64>,
    pub(super) last_seq: Vec<u64>,
    pub(super) acked: Vec<u32>,
    /// When it was last acknowledged into (a count of acknowledgements).
    pub(super) touched: Vec<u64>,
    clock: u64,
}

impl Convs {
    fn new(n: usize) -> Self {
        Self {
            id: vec![0; n],
            last_seq: vec![0; n],
            acked: vec![0; n],
            touched: vec![0; n],
            clock: 0,
        }
    }

    pub(super) fn ack(&mut self, i: u32, conv_id: u64, seq: u64) {
        let i = i as usize;
        self.clock += 1;
        self.id[i] = conv_id;
        self.last_seq[i] = self.last_seq[i].max(seq);
        self.acked[i] += 1;
        self.touched[i] = self.clock;
    }
}

/// Zipf popularity over `0..n` (rank k has weight 1 / (k+1)^s), by its cumulative table.
#[derive(Debug)]
pub(super) struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub(super) fn new(n: u64, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += (k as f64).powf(-s);
                acc
            })
            .collect();
        for v in &mut cdf {
            *v /= acc;
        }
        Self { cdf }
    }

    pub(super) fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.unit();
        self.cdf
            .partition_point(|&c| c < u)
            .min(self.cdf.len().saturating_sub(1)) as u32
    }
}

/// SplitMix64.
#[derive(Debug, Clone)]
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An authenticated plaintext connection for `acc` and the server's in-flight window.
pub(super) async fn open_conn(
    dst: SocketAddr,
    acc: &Account,
    i: u64,
) -> anyhow::Result<(StarlingConn, usize)> {
    let stream =
        Stream::connect(dst, source_addr(i, 200, dst), None, Duration::from_secs(10)).await?;
    let mut c = StarlingConn::new(stream);
    let w = c
        .hello(Some(&acc.access_token))
        .await
        .with_context(|| format!("authenticating {}", acc.email))?;
    let window = w.limits.map_or(16, |l| l.inflight_requests_max as usize);
    Ok((c, window.max(1)))
}

/// One restart.
#[derive(Debug, Clone, Serialize)]
struct Restart {
    /// SIGTERM → exit (clean stop only).
    stop_secs: Option<f64>,
    /// Spawn → `/readyz` 200.
    ready_secs: f64,
    /// The new process's RSS and peak RSS once ready.
    rss_ready_kib: Option<u64>,
    peak_rss_ready_kib: Option<u64>,
    /// The server's log lines on opening each shard's storage (time, what was replayed).
    storage_opened: Vec<String>,
    verified: probe::Verified,
}

#[derive(Debug, Serialize)]
struct Outcome {
    layout: Layout,
    accounts: u64,
    register_secs: Option<f64>,
    fill: fill::FillOutcome,
    rss_after_fill_kib: Option<u64>,
    /// The first process's peak RSS (`VmHWM`) after the fill and the probes.
    peak_rss_kib: Option<u64>,
    disk_after_fill_bytes: u64,
    cold: probe::OpStats,
    hot: probe::OpStats,
    sigkill: Restart,
    sigterm: Restart,
    /// Peak RSS ≤ `index_memory_bytes` + 512 MiB (issue 37's bound), when a budget was given.
    rss_within_budget: Option<bool>,
    peak_rss_all_kib: Option<u64>,
    /// Messages acknowledged per second between consecutive fill samples: min, median, max.
    fill_rates: Option<[f64; 3]>,
    phases: Vec<(String, f64)>,
    samples: Vec<server::Sample>,
}

/// Prints and keeps each phase's duration.
#[derive(Debug, Default)]
struct Phases(Vec<(String, f64)>);

impl Phases {
    fn done(&mut self, name: &str, sw: Stopwatch) -> f64 {
        let s = sw.elapsed_secs();
        println!("phase {name}: {s:.1} s");
        self.0.push((name.to_owned(), s));
        s
    }
}

pub(crate) fn run(args: &StoreScaleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.senders > 0 && args.conversations > 0 && args.conversations <= u64::from(u32::MAX),
        "--senders must be > 0 and --conversations between 1 and 2^32 - 1"
    );
    anyhow::ensure!(args.body_bytes > 0, "--body-bytes must be > 0");
    let layout = Layout {
        convs: args.conversations,
        senders: args.senders.min(args.conversations),
    };
    let need = (layout.senders + layout.recipients()) as usize;
    let machine = Machine::now();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let log = args.server_log.clone().unwrap_or_else(|| {
        args.data_dir
            .parent()
            .map_or_else(|| PathBuf::from("starling.log"), |p| p.join("starling.log"))
    });
    let mut server = Server::new(ServerCmd {
        bin: args.starling.clone(),
        config: args.config.clone(),
        data_dir: args.data_dir.clone(),
        tls_listen: args.tls_listen,
        plain_listen: args.plain_listen,
        metrics_listen: args.metrics_listen,
        shards: args.shards,
        log,
    });
    let ready_timeout = Duration::from_secs(args.ready_timeout_secs);
    let mut phases = Phases::default();
    println!(
        "store-scale: {} messages of {} B into {} conversations ({} senders × {} recipients, \
         Zipf s = {}); {}",
        args.messages,
        args.body_bytes,
        layout.convs,
        layout.senders,
        layout.recipients(),
        args.zipf_s,
        machine_line(&machine)
    );

    let sw = Stopwatch::start();
    server.start()?;
    let first_ready = server.wait_ready(ready_timeout)?;
    phases.done("start", sw);
    println!("  ready {first_ready:.2} s after the spawn");
    let acked = Arc::new(AtomicU64::new(0));
    let sampler = server.sampler(Duration::from_secs(args.sample_secs.max(1)), acked.clone());

    // Accounts.
    sampler.phase("register");
    let sw = Stopwatch::start();
    let have = AccountsFile::load(&args.accounts).map_or(0, |a| a.accounts.len());
    let register_secs = if have < need {
        accounts::top_up(
            &format!("plain://{}", args.plain_listen),
            None,
            &args.data_dir,
            need,
            &args.accounts,
        )?;
        let s = phases.done("register", sw);
        println!(
            "  {} accounts, {:.0} accounts/s",
            need - have,
            (need - have) as f64 / s.max(1e-9)
        );
        Some(s)
    } else {
        None
    };
    let file = AccountsFile::load(&args.accounts)?;
    file.need(need, &args.accounts)?;
    let accounts = &file.accounts[..need];
    let dst = args.plain_listen;

    // Fill.
    sampler.phase("fill");
    let sw = Stopwatch::start();
    let (fill, mut convs) = fill::fill(
        dst,
        accounts,
        layout,
        &fill::FillParams {
            messages: args.messages,
            body_bytes: args.body_bytes,
            deadline: Duration::from_secs(args.fill_secs),
            zipf_s: args.zipf_s,
            seed: args.seed,
            server_pid: server.pid(),
        },
        Convs::new(layout.convs as usize),
        acked,
    )?;
    phases.done("fill", sw);
    let rss_after_fill_kib = server.rss_kib();
    let disk_after_fill_bytes = server::disk_bytes(&args.data_dir);
    println!(
        "  {} messages acknowledged, {:.0} msg/s{}; conversations created in {}; {} refused, {} sent again after OVERLOADED; \
         Send → SendAck with the window ({}) full: p50 {:.1} ms, p99 {:.1} ms; server CPU {} \
         cores, load generator {:.2}",
        fill.messages_acked,
        fill.messages_per_s,
        if fill.stopped_by_time {
            " (stopped by --fill-secs)"
        } else {
            ""
        },
        fill.create_secs.map_or_else(
            || "-".to_owned(),
            |s| format!("{s:.1} s ({:.0}/s)", layout.convs as f64 / s.max(1e-9))
        ),
        fill.errors,
        fill.retries,
        fill.window,
        fill.ack_us.p50_us as f64 / 1000.0,
        fill.ack_us.p99_us as f64 / 1000.0,
        fill.server_cpu_cores
            .map_or_else(|| "?".to_owned(), |c| format!("{c:.2}")),
        fill.loadgen_cpu_cores
    );
    println!(
        "  server RSS {} MiB (peak {} MiB), data directory {:.2} GiB",
        mib(rss_after_fill_kib),
        mib(server.peak_rss_kib()),
        disk_after_fill_bytes as f64 / f64::from(1u32 << 30)
    );

    // Cold and hot.
    sampler.phase("probe");
    let sw = Stopwatch::start();
    let mut order: Vec<u32> = (0..layout.convs as u32)
        .filter(|&i| convs.acked[i as usize] > 0)
        .collect();
    order.sort_by_key(|&i| convs.touched[i as usize]);
    let k = args.ops.min(order.len() / 3);
    let cold: Vec<u32> = order[..3 * k].to_vec();
    let hot: Vec<u32> = (0..args.ops.min(order.len()) as u32)
        .filter(|&i| convs.acked[i as usize] > 0)
        .collect();
    let (cold_stats, hot_stats) = crate::workers::block_on(async {
        let mut p = probe::Probe::open(dst, accounts, layout).await?;
        let c = p
            .measure(
                &mut convs,
                [&cold[..k], &cold[k..2 * k], &cold[2 * k..]],
                "cold",
            )
            .await?;
        let h = p.measure(&mut convs, [&hot, &hot, &hot], "hot").await?;
        anyhow::Ok((c, h))
    })??;
    phases.done("cold and hot requests", sw);
    for (name, s) in [("cold", &cold_stats), ("hot", &hot_stats)] {
        report::print_latency_table(&[
            (&format!("{name} Sync"), &s.sync_us),
            (&format!("{name} GetHistory"), &s.history_us),
            (&format!("{name} Send"), &s.send_us),
        ]);
        if s.wrong > 0 {
            println!(
                "  {name}: {} wrong answers, e.g. {:?}",
                s.wrong, s.first_wrong
            );
        }
    }
    let peak_rss_kib = server.peak_rss_kib();

    // What is checked after each restart: the measured ones and a random draw.
    let mut rng = Rng(args.seed ^ 0x5ca1e);
    let mut sample: Vec<u32> = cold
        .iter()
        .take(args.verify / 3)
        .chain(hot.iter().take(args.verify / 3))
        .copied()
        .collect();
    while sample.len() < args.verify.min(order.len()) {
        sample.push(order[(rng.next_u64() % order.len() as u64) as usize]);
    }

    // SIGKILL.
    sampler.phase("sigkill restart");
    let sw = Stopwatch::start();
    server.kill()?;
    server.start()?;
    let ready_secs = server.wait_ready(ready_timeout)?;
    let (rss_ready_kib, peak_rss_ready_kib) = (server.rss_kib(), server.peak_rss_kib());
    let verified = verify(dst, accounts, layout, &convs, &sample)?;
    phases.done("SIGKILL, restart, verify", sw);
    let sigkill = Restart {
        stop_secs: None,
        ready_secs,
        rss_ready_kib,
        peak_rss_ready_kib,
        storage_opened: server.storage_opened_lines(),
        verified,
    };
    print_restart("SIGKILL", &sigkill);

    // SIGTERM.
    sampler.phase("sigterm restart");
    let sw = Stopwatch::start();
    let stop_secs = server.terminate(ready_timeout)?;
    server.start()?;
    let ready_secs = server.wait_ready(ready_timeout)?;
    let (rss_ready_kib, peak_rss_ready_kib) = (server.rss_kib(), server.peak_rss_kib());
    let verified = verify(dst, accounts, layout, &convs, &sample)?;
    phases.done("SIGTERM, restart, verify", sw);
    let sigterm = Restart {
        stop_secs: Some(stop_secs),
        ready_secs,
        rss_ready_kib,
        peak_rss_ready_kib,
        storage_opened: server.storage_opened_lines(),
        verified,
    };
    print_restart("SIGTERM", &sigterm);

    let sw = Stopwatch::start();
    server.terminate(ready_timeout)?;
    phases.done("stop", sw);
    let samples = sampler.finish();
    let peak_all = samples
        .iter()
        .map(|s| s.hwm_kib)
        .chain(peak_rss_kib)
        .chain(sigkill.peak_rss_ready_kib)
        .chain(sigterm.peak_rss_ready_kib)
        .max();
    let rss_within_budget = (args.index_memory_bytes > 0)
        .then(|| peak_all.unwrap_or(0) * 1024 <= args.index_memory_bytes + (512 << 20));
    println!(
        "peak RSS over the run {} MiB{}",
        mib(peak_all),
        rss_within_budget.map_or_else(
            || " (no index budget given)".to_owned(),
            |ok| format!(
                ": {} the index budget {} MiB + 512 MiB",
                if ok { "within" } else { "OVER" },
                args.index_memory_bytes >> 20
            )
        )
    );
    let fill_rates = interval_rates(&samples, "fill");
    if let Some([lo, mid, hi]) = fill_rates {
        println!(
            "fill rate per {} s sample: min {lo:.0}, median {mid:.0}, max {hi:.0} msg/s",
            args.sample_secs
        );
    }
    let failed =
        cold_stats.wrong + hot_stats.wrong + sigkill.verified.wrong + sigterm.verified.wrong;
    let out = Outcome {
        layout,
        accounts: need as u64,
        register_secs,
        fill,
        rss_after_fill_kib,
        peak_rss_kib,
        disk_after_fill_bytes,
        cold: cold_stats,
        hot: hot_stats,
        sigkill,
        sigterm,
        rss_within_budget,
        peak_rss_all_kib: peak_all,
        fill_rates,
        phases: phases.0,
        samples,
    };
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "store-scale",
                "params": args,
                "machine": machine,
                "outcome": out,
            }),
        )?;
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} answers or conversations did not match what was acknowledged (see above)"
    );
    Ok(())
}

fn verify(
    dst: SocketAddr,
    accounts: &[Account],
    layout: Layout,
    convs: &Convs,
    sample: &[u32],
) -> anyhow::Result<probe::Verified> {
    crate::workers::block_on(async {
        let mut p = probe::Probe::open(dst, accounts, layout).await?;
        p.verify(convs, sample).await
    })?
}

fn print_restart(how: &str, r: &Restart) {
    println!(
        "  {how}: {}ready {:.2} s after the spawn, RSS {} MiB (peak {} MiB); {} conversations \
         checked ({} counted in full), {} wrong{}",
        r.stop_secs
            .map_or_else(String::new, |s| format!("stopped in {s:.2} s, ")),
        r.ready_secs,
        mib(r.rss_ready_kib),
        mib(r.peak_rss_ready_kib),
        r.verified.conversations,
        r.verified.counted,
        r.verified.wrong,
        if r.verified.wrong > 0 {
            format!(", e.g. {:?}", r.verified.first_wrong)
        } else {
            String::new()
        }
    );
    for l in &r.storage_opened {
        println!("    storage opened: {l}");
    }
}

/// Acknowledgements per second between consecutive samples of `phase`: min, median, max.
fn interval_rates(samples: &[server::Sample], phase: &str) -> Option<[f64; 3]> {
    let of: Vec<&server::Sample> = samples.iter().filter(|s| s.phase == phase).collect();
    let mut rates: Vec<f64> = of
        .windows(2)
        .filter(|w| w[1].secs > w[0].secs)
        .map(|w| (w[1].messages_acked - w[0].messages_acked) as f64 / (w[1].secs - w[0].secs))
        .collect();
    rates.sort_by(f64::total_cmp);
    Some([*rates.first()?, rates[rates.len() / 2], *rates.last()?])
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".to_owned(), |k| (k / 1024).to_string())
}

fn machine_line(m: &Machine) -> String {
    format!(
        "{} CPUs, load average {:.2}, kernel {}",
        m.cores, m.loadavg_1m_start, m.kernel
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_conversation_has_one_sender_and_one_recipient_who_lists_it() {
        let l = Layout {
            convs: 1003,
            senders: 10,
        };
        assert_eq!(l.recipients(), 101);
        let mut seen = vec![0u32; l.convs as usize];
        for r in 0..l.recipients() as usize {
            for i in l.convs_of_recipient(r) {
                assert_eq!(l.recipient_of(i), r);
                seen[i as usize] += 1;
            }
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "each conversation listed once"
        );
        // Different conversations of one recipient have different senders: one pair each.
        let senders: std::collections::HashSet<usize> =
            l.convs_of_recipient(7).map(|i| l.sender_of(i)).collect();
        assert_eq!(senders.len(), 10);
        assert_eq!(l.convs_of_recipient(100).count(), 3);
    }

    #[test]
    fn zipf_draws_follow_the_popularity() {
        let n = 1000u64;
        let z = Zipf::new(n, 1.0);
        let mut rng = Rng(1);
        let draws = 200_000;
        let mut counts = vec![0u32; n as usize];
        for _ in 0..draws {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
        // Rank 1 and rank 10 within 5% of their expected shares; the tail is drawn too.
        for k in [0usize, 9] {
            let want = draws as f64 / ((k + 1) as f64 * h);
            let got = f64::from(counts[k]);
            assert!(
                (got - want).abs() < 0.05 * want,
                "rank {k}: {got} vs {want}"
            );
        }
        assert!(counts[500..].iter().any(|&c| c > 0));
    }

    #[test]
    fn acknowledgements_keep_the_latest_seq_and_when() {
        let mut c = Convs::new(3);
        c.ack(1, 77, 5);
        c.ack(2, 78, 1);
        c.ack(1, 77, 4);
        assert_eq!((c.id[1], c.last_seq[1], c.acked[1]), (77, 5, 2));
        assert!(c.touched[1] > c.touched[2]);
        assert_eq!(c.acked[0], 0);
    }
}
