//! `starling-bench log`: durable append throughput and latency of one shard's log.
//! (Being written under issue 3.)

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct LogArgs {
    /// Number of entries to append.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
}

pub(crate) fn run(args: &LogArgs) -> anyhow::Result<()> {
    anyhow::bail!("log benchmark not built yet ({} entries requested)", args.entries)
}
