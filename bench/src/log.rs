//! `starling-bench log`: durable append throughput and latency of one shard's log, then range
//! reads of what it wrote.
//!
//! Every batch is appended with `SyncData` durability: a batch counts only once the group commit
//! that carries it has returned from `fdatasync`. Latency is submit → completion observed.
#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use starling_storage::{
    ClientMsgId, Completion, ConvId, DeviceId, DurableLog, EmbeddedShard, Entry, EntryKind,
    LogOptions, Lsn, MessageIndex, SegmentedLog, Seq, ShardOptions, SyncData, TimestampMs, UserId,
};

#[derive(Debug, Args)]
pub(crate) struct LogArgs {
    /// Number of entries to append.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Body bytes of each entry (each entry also carries a 68-byte header on disk).
    #[arg(long, default_value_t = 200)]
    entry_bytes: usize,
    /// Entries per appended batch (one log record).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Most batches in flight (submitted, not yet durable) — the shard's pipelining depth.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Directory for the log (must be on the disk being measured; it is wiped first).
    #[arg(long)]
    dir: PathBuf,
    /// Segment size in MiB (preallocated).
    #[arg(long, default_value_t = 64)]
    segment_mib: u64,
    /// Also maintain the index and measure per-conversation range reads through it.
    #[arg(long)]
    index: bool,
    /// Poll a completion this many times before sleeping on it (0 = sleep at once). A shard
    /// under load is busy anyway; on a VM a sleeping waiter takes milliseconds to wake.
    #[arg(long, default_value_t = 200_000)]
    wait_polls: u32,
    /// Conversations the entries are spread over.
    #[arg(long, default_value_t = 1000)]
    convs: u64,
}

pub(crate) fn run(args: &LogArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.entries > 0 && args.inflight > 0,
        "batch, entries and inflight must be > 0"
    );
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("wiping {}", args.dir.display()))?;
    }
    let log_opts = LogOptions {
        segment_bytes: args.segment_mib << 20,
        ..LogOptions::default()
    };
    let conv_count = args.convs.max(1);
    if args.index {
        let mut shard = EmbeddedShard::open(
            &args.dir,
            ShardOptions {
                log: log_opts,
                ..ShardOptions::default()
            },
        )?;
        let last = append_phase(&mut shard, args, conv_count)?;
        let t = Instant::now();
        shard.index().wait_applied(last)?;
        println!(
            "index caught up {:.1} ms after the last append completed",
            t.elapsed().as_secs_f64() * 1e3
        );
        log_scan(shard.log()?, args)?;
        index_reads(shard.index().as_ref(), conv_count)?;
    } else {
        let mut log = SegmentedLog::open(&args.dir.join("log"), log_opts)?;
        append_phase(&mut log, args, conv_count)?;
        log_scan(&log, args)?;
    }
    Ok(())
}

fn append_phase(log: &mut impl DurableLog, args: &LogArgs, convs: u64) -> anyhow::Result<Lsn> {
    let body = vec![0x5Au8; args.entry_bytes];
    let mut seqs = vec![0u64; convs as usize];
    let mut batch: Vec<Entry> = Vec::with_capacity(args.batch);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut pending: VecDeque<(Instant, Completion<SyncData>)> =
        VecDeque::with_capacity(args.inflight);
    let mut n = 0u64;
    let mut last = Lsn::ZERO;
    let start = Instant::now();
    let observe = |hist: &mut Histogram<u64>, t0: Instant| -> anyhow::Result<()> {
        hist.record((t0.elapsed().as_micros() as u64).max(1))?;
        Ok(())
    };
    while n < args.entries {
        batch.clear();
        for _ in 0..args.batch.min((args.entries - n) as usize) {
            let c = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % convs;
            seqs[c as usize] += 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            id[8] = 1;
            batch.push(Entry {
                kind: EntryKind::MESSAGE,
                conv: ConvId(u128::from(c) + 1),
                seq: Seq(seqs[c as usize]),
                client_msg_id: ClientMsgId(id),
                sender: UserId(c),
                sender_device: DeviceId(1),
                ts_ms: TimestampMs(1_700_000_000_000 + n),
                content_type: 1,
                body: body.clone(),
            });
            n += 1;
        }
        // Never block in append: if the log pushes back, wait for the oldest completion.
        while pending.len() >= args.inflight {
            let (t0, c) = pending.pop_front().context("pending")?;
            c.wait_polling(args.wait_polls)?;
            observe(&mut hist, t0)?;
        }
        let t0 = Instant::now();
        let c = loop {
            match log.append::<SyncData>(&batch) {
                Ok(c) => break c,
                Err(starling_storage::LogError::Busy { .. }) => {
                    let (t0, c) = pending.pop_front().context("busy with nothing in flight")?;
                    c.wait_polling(args.wait_polls)?;
                    observe(&mut hist, t0)?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        last = c.last_lsn();
        pending.push_back((t0, c));
        while pending
            .front()
            .is_some_and(|(_, c)| c.try_complete().is_some())
        {
            let (t0, c) = pending.pop_front().context("pending")?;
            c.wait_polling(args.wait_polls)?;
            observe(&mut hist, t0)?;
        }
    }
    while let Some((t0, c)) = pending.pop_front() {
        c.wait_polling(args.wait_polls)?;
        observe(&mut hist, t0)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let disk_bytes = args.entries as f64
        * (args.entry_bytes + starling_storage::format::ENTRY_HEADER_BYTES) as f64;
    println!(
        "log append: {} entries x {} B body, batch {}, inflight {}: {:.2} s",
        args.entries, args.entry_bytes, args.batch, args.inflight, secs
    );
    println!(
        "  durable entries/s: {:.0}   body MB/s: {:.1}   log MB/s (with headers): {:.1}",
        args.entries as f64 / secs,
        args.entries as f64 * args.entry_bytes as f64 / secs / 1e6,
        disk_bytes / secs / 1e6
    );
    println!(
        "  durable-append latency (us): p50 {}  p99 {}  p999 {}  max {}  ({} batches)",
        hist.value_at_quantile(0.50),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        hist.len()
    );
    Ok(last)
}

fn log_scan(log: &SegmentedLog, args: &LogArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let (mut entries, mut bytes) = (0u64, 0u64);
    let mut err = None;
    log.scan(Lsn(1), |r| match r.entries() {
        Ok(es) => {
            entries += es.len() as u64;
            bytes += r.total_bytes() as u64;
            true
        }
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    anyhow::ensure!(
        entries == args.entries,
        "scan found {entries} entries, expected {}",
        args.entries
    );
    println!(
        "log range read (sequential scan + decode, page cache): {entries} entries in {:.2} s = {:.0} entries/s, {:.1} MB/s",
        secs,
        entries as f64 / secs,
        bytes as f64 / secs / 1e6
    );
    Ok(())
}

fn index_reads(ix: &impl MessageIndex, convs: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let (mut reads, mut entries) = (0u64, 0u64);
    let deadline = Duration::from_secs(5);
    'outer: for round in 0..10u64 {
        for c in 0..convs {
            let conv = ConvId(u128::from(c) + 1);
            let got = if round % 2 == 0 {
                ix.latest(conv, 50)?
            } else {
                ix.after(conv, Seq(0), 50)?
            };
            reads += 1;
            entries += got.len() as u64;
            if start.elapsed() > deadline {
                break 'outer;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    println!(
        "index range reads (latest/after, 50 per read): {reads} reads, {entries} entries in {:.2} s = {:.0} reads/s, {:.0} entries/s",
        secs,
        reads as f64 / secs,
        entries as f64 / secs
    );
    Ok(())
}
