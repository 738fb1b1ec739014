//! `starling-bench heartbeats`: Ping → Pong throughput. Many connections
//! each keep `--pipeline` Pings in flight (request id 0, so they do not
//! count against the in-flight request limit) and send one more Ping for
//! every Pong. The load generator never decodes a Pong: it compares each
//! frame's bytes with the one expected Pong encoding, so it stays far
//! cheaper than the server it measures.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::{Buf as _, BytesMut};
use clap::Args;
use serde::Serialize;
use starling_protocol::FrameEncoder;
use starling_protocol::v1::{self, frame::Body};

use crate::accounts::AccountsFile;
use crate::net::{StarlingConn, Stream, Target, source_addr, tls_config};
use crate::rate::{self, WorkerState};
use crate::report::{self, Machine};
use crate::workers::{self, WorkerArgs};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct HeartbeatsArgs {
    /// Starling server: plain://IP:PORT (or tls://).
    #[arg(long, default_value = "plain://127.0.0.1:7444")]
    target: String,
    /// CA certificate for TLS.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Authenticate with tokens from this accounts file (Pings are answered
    /// on any welcomed connection, so this is optional).
    #[arg(long)]
    accounts: Option<PathBuf>,
    /// Connections (over all processes).
    #[arg(long, default_value_t = 64)]
    connections: u64,
    /// Pings in flight per connection.
    #[arg(long, default_value_t = 128)]
    pipeline: usize,
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

pub(crate) fn run(args: &HeartbeatsArgs) -> anyhow::Result<()> {
    if args.w.worker.is_some() {
        return worker(args);
    }
    let machine = Machine::now();
    let out = rate::run_parent(
        "heartbeats",
        &args.w,
        Duration::from_secs(args.duration_secs),
        args.server_pid,
    )?;
    println!();
    println!("target               {}", args.target);
    println!(
        "connections          {} x {} Pings in flight, {} processes",
        args.connections, args.pipeline, args.w.procs
    );
    println!(
        "Ping -> Pong         {:.0}/s over {:.1} s",
        out.ops_per_s, out.secs
    );
    if let Some(c) = out.server_cpu_cores {
        println!(
            "server CPU           {:.2} cores -> {:.0} Pongs/s per server core",
            c,
            out.ops_per_s / c.max(1e-3)
        );
    }
    println!(
        "load generator CPU   {:.2} cores{}",
        out.loadgen_cpu_cores,
        if out.loadgen_cpu_cores > 0.9 * f64::from(args.w.procs) {
            "  [SATURATED: the load generator, not the server, may be the limit]"
        } else {
            ""
        }
    );
    println!("errors               {}", out.counts.errors);
    for e in out.errors.iter().take(5) {
        println!("error: {e}");
    }
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "heartbeats",
                "params": args,
                "machine": machine,
                "outcome": out,
                "pongs_per_server_core": out.server_cpu_cores.map(|c| out.ops_per_s / c.max(1e-3)),
            }),
        )?;
    }
    Ok(())
}

fn worker(args: &HeartbeatsArgs) -> anyhow::Result<()> {
    workers::watch_stdin();
    let target = Target::parse(&args.target)?;
    let tls = match (&target, &args.ca) {
        (Target::StarlingTls(_), Some(ca)) => Some(tls_config(ca, false)?),
        (Target::StarlingTls(_), None) => bail!("TLS needs --ca"),
        _ => None,
    };
    let tokens: Vec<String> = match &args.accounts {
        Some(p) => AccountsFile::load(p)?
            .accounts
            .into_iter()
            .map(|a| a.access_token)
            .collect(),
        None => Vec::new(),
    };
    let (count, first) = args.w.share(args.connections);
    let st = Rc::new(WorkerState::new(Duration::from_secs(args.duration_secs)));
    let cpu0 = report::own_cpu_secs();
    let ping = encoded(Body::Ping(v1::Ping { nonce: 0 }))?;
    let pong = encoded(Body::Pong(v1::Pong { nonce: 0 }))?;
    workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut tasks = Vec::new();
                for i in 0..count {
                    let gi = first + i;
                    let token = (!tokens.is_empty())
                        .then(|| tokens[(gi % tokens.len() as u64) as usize].clone());
                    let (st, tls, target, ping, pong) = (
                        st.clone(),
                        tls.clone(),
                        target.clone(),
                        ping.clone(),
                        pong.clone(),
                    );
                    let (pipeline, sources) = (args.pipeline, args.sources);
                    tasks.push(tokio::task::spawn_local(async move {
                        let r = async {
                            let src = source_addr(gi, sources, target.addr());
                            let s = Stream::connect(
                                target.addr(),
                                src,
                                tls.as_ref(),
                                Duration::from_secs(20),
                            )
                            .await?;
                            let mut c = StarlingConn::new(s);
                            c.hello(token.as_deref()).await?;
                            pump(&mut c, &st, &ping, &pong, pipeline).await
                        }
                        .await;
                        if let Err(e) = r {
                            st.error(&e);
                        }
                    }));
                }
                st.report_loop().await;
                for t in tasks {
                    let _ = t.await;
                }
            })
            .await;
    })?;
    st.finish(cpu0);
    Ok(())
}

fn encoded(body: Body) -> anyhow::Result<Vec<u8>> {
    let mut b = BytesMut::new();
    FrameEncoder::default().encode(
        &v1::Frame {
            request_id: 0,
            body: Some(body),
        },
        &mut b,
    )?;
    Ok(b.to_vec())
}

/// Keeps `pipeline` Pings in flight until the run is over.
async fn pump(
    c: &mut StarlingConn,
    st: &WorkerState,
    ping: &[u8],
    pong: &[u8],
    pipeline: usize,
) -> anyhow::Result<()> {
    let batch: Vec<u8> = ping.repeat(pipeline);
    c.push_raw(&batch);
    c.flush().await?;
    let mut in_flight = pipeline;
    while in_flight > 0 {
        if c.read_some().await.context("reading Pongs")? == 0 {
            bail!("server closed the connection");
        }
        let buf = c.raw_buf();
        let mut got = 0usize;
        while buf.len() >= pong.len() {
            if &buf[..pong.len()] != pong {
                bail!(
                    "expected a Pong, got other bytes: {:02x?}",
                    &buf[..buf.len().min(32)]
                );
            }
            buf.advance(pong.len());
            got += 1;
        }
        in_flight -= got;
        st.counts.borrow_mut().ops += got as u64;
        if !st.over() && got > 0 {
            c.push_raw(&batch[..got * ping.len()]);
            c.flush().await?;
            in_flight += got;
        }
    }
    Ok(())
}
