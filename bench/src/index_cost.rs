//! `starling-bench index-cost`: what the embedded index's internals cost on this machine, in one
//! process without a server: how a split map's growth is spread over time, and what a dedup
//! lookup costs in a long conversation (docs/design/performance-decisions.md, "Split maps" and
//! "Dedup by id tags").
#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::time::Instant;

use clap::{Args, ValueEnum};
use starling_storage::index::measure;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum What {
    /// Insert N random keys into a split map, timing every 2,000.
    SplitGrowth,
    /// Apply N entries to one conversation, then look up ids never sent and recent ones.
    DedupWalk,
}

#[derive(Debug, Args)]
pub(crate) struct IndexCostArgs {
    /// Which measurement.
    #[arg(long, value_enum)]
    what: What,
    /// Keys (split-growth) or entries (dedup-walk).
    #[arg(long, default_value_t = 1_000_000)]
    n: u64,
}

pub(crate) fn run(args: &IndexCostArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let now_ns = move || u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    match args.what {
        What::SplitGrowth => {
            let r = measure::split_map_growth(args.n, &now_ns);
            println!(
                "{} inserts in {:.1} ms; {} of {} windows of {} over 1 ms ({:.1} ms in them)",
                r.inserts,
                r.total_ns as f64 / 1e6,
                r.windows_over_1ms,
                r.windows,
                measure::SPLIT_WINDOW_KEYS,
                r.over_1ms_ns as f64 / 1e6,
            );
            let slowest: Vec<String> = r
                .slowest
                .iter()
                .map(|(ns, at)| format!("{:.2} ms at {at}", *ns as f64 / 1e6))
                .collect();
            println!("slowest windows: {}", slowest.join(", "));
        }
        What::DedupWalk => {
            let r = measure::dedup_walk(args.n, &now_ns);
            println!(
                "{} entries in one conversation: {:.0} ns per applied entry; an id never sent \
                 {:.1} µs per lookup ({} false candidates in 200 lookups); a recent id {:.2} µs",
                r.entries,
                r.insert_ns,
                r.absent_ns as f64 / 1e3,
                r.false_candidates,
                r.recent_ns as f64 / 1e3,
            );
        }
    }
    Ok(())
}
