//! `starling-bench`: Starling's load generator and storage/codec benchmarks.
//!
//! Every subcommand is bounded in count and time and stops by itself.

use clap::{Parser, Subcommand};

/// The same allocator as the `starling` server, so per-frame allocation
/// costs match what the server pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod clock;
mod codec;
mod log;

#[derive(Debug, Parser)]
#[command(name = "starling-bench", version, about = "Starling benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Frame codec throughput on one core (decode and encode).
    Codec(codec::CodecArgs),
    /// Durable-log throughput and latency for one sequencer shard.
    Log(log::LogArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Codec(args) => codec::run(&args),
        Command::Log(args) => log::run(&args),
    }
}
