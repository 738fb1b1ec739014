//! The `starling` server binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use starling_gateway::config::{Config, DriverChoice, LogFormat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status: 0 after SIGTERM/SIGINT and a drain; 1 when start-up fails
/// (a bad data dir, a refused layout, a filesystem that does not take a
/// durable write, ...); 2 for a configuration error; 74 after a storage
/// fault of the metadata store or an index while serving (a supervisor should
/// restart the server; a failed message log recovers in place instead).
#[derive(Debug, Parser)]
#[command(
    name = "starling",
    version,
    about = "Starling chat server",
    after_help = "Exit status: 0 after SIGTERM/SIGINT; 1 start-up failed; 2 configuration \
                  error; 74 a metadata or index storage fault while serving (restart the \
                  server; a failed message log recovers in place)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
}

/// Flags override `STARLING_*` environment variables, which override the
/// config file, which overrides the defaults.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "STARLING_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./starling-data].
    #[arg(long, env = "STARLING_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TLS listen address [default: 127.0.0.1:7443].
    #[arg(long, env = "STARLING_LISTEN")]
    listen: Option<SocketAddr>,
    /// Number of shards (0: the data dir's recorded count, or one per core for a new data dir)
    /// [default: 0]. An existing data dir's count cannot change.
    #[arg(long, env = "STARLING_SHARDS")]
    shards: Option<usize>,
    /// Metrics listen address, or "off" [default: 127.0.0.1:9464].
    #[arg(long, env = "STARLING_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Also listen WITHOUT TLS here (loopback benchmarks only).
    #[arg(long, env = "STARLING_DANGEROUS_PLAINTEXT_LISTEN")]
    dangerous_plaintext_listen: Option<SocketAddr>,
    /// I/O driver [default: auto].
    #[arg(long, env = "STARLING_DRIVER", value_enum)]
    driver: Option<DriverChoice>,
    /// Log format [default: human].
    #[arg(long, env = "STARLING_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

fn config(a: ServeArgs) -> anyhow::Result<Config> {
    let mut c = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = a.data_dir {
        c.data_dir = v;
    }
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if let Some(v) = a.shards {
        c.shards = v;
    }
    if let Some(v) = a.metrics_listen {
        c.metrics_listen =
            if v == "off" {
                None
            } else {
                Some(v.parse().map_err(|e| {
                    anyhow::anyhow!("invalid value for --metrics-listen `{v}`: {e}")
                })?)
            };
    }
    if let Some(v) = a.dangerous_plaintext_listen {
        c.dangerous_plaintext_listen = Some(v);
    }
    if let Some(v) = a.driver {
        c.driver = v;
    }
    if let Some(v) = a.log_format {
        c.log_format = v;
    }
    c.validate()?;
    Ok(c)
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STARLING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(args) => {
            let cfg = match config(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("starling: configuration error: {e:#}");
                    return std::process::ExitCode::from(2);
                }
            };
            init_logs(cfg.log_format);
            match starling_gateway::server::serve(cfg) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) if e.is::<starling_gateway::server::StorageFaultExit>() => {
                    eprintln!("starling: {e}");
                    std::process::ExitCode::from(starling_gateway::health::EXIT_STORAGE_FAULT)
                }
                Err(e) => {
                    eprintln!("starling: {e:#}");
                    std::process::ExitCode::from(1)
                }
            }
        }
    }
}
