//! `starling-bench`: Starling's load generator and storage/codec benchmarks.
//!
//! Every subcommand is bounded in count and time and stops by itself.

use clap::{Parser, Subcommand};

mod log;

#[derive(Debug, Parser)]
#[command(name = "starling-bench", version, about = "Starling benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Durable-log throughput and latency for one sequencer shard.
    Log(log::LogArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Log(args) => log::run(&args),
    }
}
