//! `starling-bench`: Starling's load generator and storage/codec benchmarks.
//!
//! Every subcommand is bounded in count and time and stops by itself.

use clap::{Parser, Subcommand};

/// The same allocator as the `starling` server, so per-frame allocation
/// costs match what the server pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod accounts;
mod block_flood;
mod clock;
mod codec;
mod compare;
mod connections;
mod fanout;
mod handshakes;
mod heartbeats;
mod index_cost;
mod keys;
mod log;
mod login_flood;
mod media;
mod messages;
mod mqtt;
mod net;
mod presence;
mod push;
mod rate;
mod report;
mod scrape;
mod store_scale;
mod storm;
mod timeline;
mod timer;
mod tls_memory;
mod workers;

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
    /// Register benchmark accounts through the OTP flow and save their tokens.
    Register(accounts::RegisterArgs),
    /// Open and hold N authenticated connections; memory per connection.
    Connections(connections::ConnectionsArgs),
    /// Ping -> Pong throughput over many pipelining connections.
    Heartbeats(heartbeats::HeartbeatsArgs),
    /// TLS 1.3 handshakes (+ login) per second, full or resumed.
    Handshakes(handshakes::HandshakesArgs),
    /// Open-loop messaging workload (Starling or MQTT), latency corrected
    /// for coordinated omission.
    Messages(messages::MessagesArgs),
    /// Group messages to G groups of N online members (and an MQTT peer run): deliveries per
    /// second, send→delivery to every member and to the last one, open loop.
    Fanout(fanout::FanoutArgs),
    /// Reconnect storm: K clients drop at once, reconnect with backoff, resync.
    Storm(storm::StormArgs),
    /// Send→SendAck of message pairs with and without one client flooding Block/Unblock.
    BlockFlood(block_flood::BlockFloodArgs),
    /// Summarise bench/compare.sh runs: compare.json, a table and SVG plots.
    CompareReport(compare::CompareArgs),
    /// Memory one idle, handshaken gateway TLS connection keeps (`conn::Tls`; in memory, no sockets).
    TlsMemory(tls_memory::TlsMemoryArgs),
    /// What the embedded index's internals cost (split-map growth, dedup lookups); no server.
    IndexCost(index_cost::IndexCostArgs),
    /// What a flood of password logins costs signed-in users' Sends and new connections' Hellos.
    LoginFlood(login_flood::LoginFloodArgs),
    /// Presence: watchers following users who go off and on line; change → update latency.
    Presence(presence::PresenceArgs),
    /// Media: upload and download of one large file over loopback TLS; the server's RSS.
    Media(media::MediaArgs),
    /// FetchKeyBundles per second (one-time prekeys taken, none twice).
    Keys(keys::KeysArgs),
    /// Push notifications per second through the server's notifier to a local APNs, and their
    /// latency from the SendAck.
    Push(push::PushArgs),
    /// The embedded store at scale: fills a server it starts with N messages in C conversations
    /// (Zipf popularity), its RSS and disk; cold and hot Sync/history/Send latency; time to
    /// ready after SIGKILL and after a clean stop, with what was acknowledged checked.
    StoreScale(store_scale::StoreScaleArgs),
}

fn main() -> anyhow::Result<()> {
    // As the server does by default: a first touch of a transparent huge page zeroes 2 MiB inside
    // one page fault (1–5 ms here), which would show up as the load generator's own latency.
    if let Err(e) = starling_gateway::server::set_transparent_huge_pages(false) {
        eprintln!("warning: transparent huge pages stay on: {e}");
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Codec(args) => codec::run(&args),
        Command::Log(args) => log::run(&args),
        Command::Register(args) => accounts::run(&args),
        Command::Connections(args) => connections::run(&args),
        Command::Heartbeats(args) => heartbeats::run(&args),
        Command::Handshakes(args) => handshakes::run(&args),
        Command::Messages(args) => messages::run(&args),
        Command::Fanout(args) => fanout::run(&args),
        Command::Storm(args) => storm::run(&args),
        Command::BlockFlood(args) => block_flood::run(&args),
        Command::CompareReport(args) => compare::run(&args),
        Command::TlsMemory(args) => tls_memory::run(&args),
        Command::IndexCost(args) => index_cost::run(&args),
        Command::LoginFlood(args) => login_flood::run(&args),
        Command::Presence(args) => presence::run(&args),
        Command::Media(args) => media::run(&args),
        Command::Keys(args) => keys::run(&args),
        Command::Push(args) => push::run(&args),
        Command::StoreScale(args) => store_scale::run(&args),
    }
}
