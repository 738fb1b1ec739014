//! `starling-bench handshakes`: TLS 1.3 handshakes (+ login) per second.
//! Each of `--concurrency` lanes per process loops: TCP connect from the next
//! 127.0.0.x source address, TLS 1.3 handshake, `Hello{access_token}` →
//! authenticated `Welcome` ("login": the reconnect path of a signed-in
//! device), close. With `--resume` the lanes share a client session cache,
//! so a server that issues tickets is measured doing resumptions; the
//! report counts how many handshakes really were resumed.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tokio::io::AsyncWriteExt as _;

use crate::accounts::AccountsFile;
use crate::clock::Stopwatch;
use crate::net::{StarlingConn, Stream, Target, source_addr, tls_for};
use crate::rate::{self, WorkerState};
use crate::report::{self, Machine};
use crate::workers::{self, WorkerArgs};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct HandshakesArgs {
    /// Starling TLS listener: tls://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The server's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log in with tokens from this accounts file (Hello{access_token});
    /// without it, Hello is anonymous.
    #[arg(long)]
    accounts: Option<PathBuf>,
    /// Handshakes in flight per process.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Offer session resumption (shared client session cache).
    #[arg(long)]
    resume: bool,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// The server's pid, to measure its CPU.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    sources: u32,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    #[serde(skip)]
    w: WorkerArgs,
}

pub(crate) fn run(args: &HandshakesArgs) -> anyhow::Result<()> {
    if args.w.worker.is_some() {
        return worker(args);
    }
    let machine = Machine::now();
    let out = rate::run_parent(
        "handshakes",
        &args.w,
        Duration::from_secs(args.duration_secs),
        args.server_pid,
    )?;
    let what = if args.accounts.is_some() {
        "TLS 1.3 handshake + Hello{token} -> Welcome"
    } else {
        "TLS 1.3 handshake + anonymous Hello -> Welcome"
    };
    println!();
    println!("target              {}  ({what})", args.target);
    println!(
        "lanes               {} per process x {} processes, resumption {}",
        args.concurrency,
        args.w.procs,
        if args.resume { "offered" } else { "off" }
    );
    println!(
        "handshakes          {:.0}/s over {:.1} s ({} total, {} resumed = {:.0}/s)",
        out.ops_per_s, out.secs, out.counts.ops, out.counts.ops2, out.ops2_per_s
    );
    if let Some(c) = out.server_cpu_cores {
        println!(
            "server CPU          {:.2} cores -> {:.0} handshakes/s per server core",
            c,
            out.ops_per_s / c.max(1e-3)
        );
    }
    println!(
        "load generator CPU  {:.2} cores{}",
        out.loadgen_cpu_cores,
        if out.loadgen_cpu_cores > 0.9 * f64::from(args.w.procs) {
            "  [SATURATED: the load generator, not the server, may be the limit]"
        } else {
            ""
        }
    );
    println!("errors              {}", out.counts.errors);
    report::print_latency_table(&[("connect..Welcome", &out.latency_us)]);
    for e in out.errors.iter().take(5) {
        println!("error: {e}");
    }
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "handshakes",
                "what": what,
                "params": args,
                "machine": machine,
                "outcome": out,
            }),
        )?;
    }
    Ok(())
}

fn worker(args: &HandshakesArgs) -> anyhow::Result<()> {
    workers::watch_stdin();
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(
        matches!(target, Target::StarlingTls(_)),
        "handshakes needs a tls:// target"
    );
    let tls = tls_for(
        &target,
        args.ca.as_deref(),
        args.data_dir.as_deref(),
        args.resume,
    )?
    .context("handshakes needs a tls:// target")?;
    let tokens: Vec<String> = match &args.accounts {
        Some(p) => AccountsFile::load(p)?
            .accounts
            .into_iter()
            .map(|a| a.access_token)
            .collect(),
        None => Vec::new(),
    };
    let tokens = Rc::new(tokens);
    let st = Rc::new(WorkerState::new(Duration::from_secs(args.duration_secs)));
    let cpu0 = report::own_cpu_secs();
    let wi = u64::from(args.w.worker.unwrap_or(0));
    workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut lanes = Vec::new();
                for lane in 0..args.concurrency as u64 {
                    let (st, tls, target, tokens) =
                        (st.clone(), tls.clone(), target.clone(), tokens.clone());
                    let sources = args.sources;
                    lanes.push(tokio::task::spawn_local(async move {
                        let mut n = 0u64;
                        while !st.over() {
                            // Spread over source addresses: lane-major so that
                            // concurrent lanes use different addresses.
                            let idx = (wi * 1000 + lane) + n * 7;
                            n += 1;
                            let token = (!tokens.is_empty())
                                .then(|| tokens[(idx % tokens.len() as u64) as usize].as_str());
                            let t = Stopwatch::start();
                            let r = async {
                                let src = source_addr(idx, sources, target.addr());
                                let s = Stream::connect(
                                    target.addr(),
                                    src,
                                    Some(&tls),
                                    Duration::from_secs(20),
                                )
                                .await?;
                                let resumed = s.resumed();
                                let mut c = StarlingConn::new(s);
                                c.hello(token).await?;
                                let _ = c.stream.shutdown().await;
                                anyhow::Ok(resumed)
                            }
                            .await;
                            match r {
                                Ok(resumed) => {
                                    st.hist
                                        .borrow_mut()
                                        .saturating_record(t.elapsed().as_micros() as u64);
                                    let mut c = st.counts.borrow_mut();
                                    c.ops += 1;
                                    c.ops2 += u64::from(resumed);
                                }
                                Err(e) => {
                                    st.error(&e);
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }
                    }));
                }
                st.report_loop().await;
                for l in lanes {
                    let _ = l.await;
                }
            })
            .await;
    })?;
    st.finish(cpu0);
    Ok(())
}
