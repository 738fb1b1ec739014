//! `starling-bench tls-memory`: how much memory one idle, handshaken TLS
//! connection keeps in the gateway — its [`starling_gateway::conn::Tls`]
//! (rustls's `UnbufferedServerConnection`, boxed, plus its partial-record
//! buffer, empty when idle). Completes N TLS 1.3 handshakes in memory (no
//! sockets) with the server's own certificate and configuration
//! ([`starling_gateway::tls::server_config`]: TLS 1.3, ring, one session
//! ticket), driving the server side exactly as the gateway does (ciphertext
//! fed from a reused buffer, outgoing records into a buffer freed after each
//! flight), keeps the server sides, and reports this process's RSS growth
//! per connection. Before keeping a connection it pushes one small
//! application record each way through it (unless `--handshake-only`) so that the state is measured as
//! it is after traffic. With
//! `--buffered` it measures a boxed `rustls::ServerConnection` instead (the
//! gateway's representation before issue 4).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use rustls::pki_types::ServerName;
use starling_gateway::conn::Tls;

use crate::net::tls_config;
use crate::report;

#[derive(Debug, Args)]
pub(crate) struct TlsMemoryArgs {
    /// A Starling data directory (uses tls/server.pem, tls/server.key, tls/ca.pem).
    #[arg(long)]
    data_dir: PathBuf,
    /// Server connections to keep.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Measure a boxed buffered `rustls::ServerConnection` instead.
    #[arg(long)]
    buffered: bool,
    /// Only the handshake (by default one 100-byte record also goes each way).
    #[arg(long)]
    handshake_only: bool,
}

/// Moves everything `c` wants to send into a fresh buffer.
fn client_out(c: &mut rustls::ClientConnection) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut buf)?;
    }
    Ok(buf)
}

/// Gives `bytes` to the client and processes them.
fn client_in(c: &mut rustls::ClientConnection, mut bytes: &[u8]) -> anyhow::Result<()> {
    while !bytes.is_empty() {
        c.read_tls(&mut bytes)?;
        c.process_new_packets()?;
    }
    Ok(())
}

/// Feeds `bytes` to the server side as the gateway does (after any kept
/// partial record); returns what it wants sent.
fn server_in(s: &mut Tls, bytes: &[u8], scratch: &mut Vec<u8>) -> anyhow::Result<Vec<u8>> {
    scratch.clear();
    scratch.extend_from_slice(s.partial_in());
    scratch.extend_from_slice(bytes);
    let mut wire = Vec::new();
    s.feed(scratch, &mut wire, |_| {})
        .map_err(|e| anyhow::anyhow!("server: {e}"))?;
    Ok(wire)
}

pub(crate) fn run(args: &TlsMemoryArgs) -> anyhow::Result<()> {
    let material = starling_gateway::tls::ensure_dev_material(&args.data_dir)
        .context("reading the server's TLS material")?;
    let scfg = starling_gateway::tls::server_config(&material)?;
    let ccfg = tls_config(&material.ca_pem, false)?;
    if args.buffered {
        return run_buffered(args, scfg, ccfg);
    }
    let name = ServerName::try_from("localhost")?.to_owned();
    let pid = std::process::id();
    let mut scratch = Vec::with_capacity(64 * 1024);
    let rss0 = report::rss_kib(pid).unwrap_or(0);
    let mut servers = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let mut s = Box::new(Tls::new(scfg.clone())?);
        // The client half is dropped after each handshake: its memory is
        // reused by the next one, so the growth is the server halves'.
        let mut c = rustls::ClientConnection::new(ccfg.clone(), name.clone())?;
        for _ in 0..16 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let to_server = client_out(&mut c)?;
            let to_client = server_in(&mut s, &to_server, &mut scratch)?;
            client_in(&mut c, &to_client)?;
        }
        anyhow::ensure!(!s.is_handshaking(), "handshake did not finish");
        if !args.handshake_only {
            // One 100-byte record each way, through the same paths as the
            // gateway's (the outgoing buffer is dropped once "written").
            c.writer().write_all(&[9u8; 100])?;
            let to_server = client_out(&mut c)?;
            let mut got = 0;
            scratch.clear();
            scratch.extend_from_slice(s.partial_in());
            scratch.extend_from_slice(&to_server);
            let mut wire = Vec::new();
            s.feed(&mut scratch, &mut wire, |p| got += p.len())
                .map_err(|e| anyhow::anyhow!("server: {e}"))?;
            anyhow::ensure!(got == 100, "server read {got} bytes");
            anyhow::ensure!(s.encrypt(&[7u8; 100], &mut wire), "encrypt failed");
            client_in(&mut c, &wire)?;
            let mut back = [0u8; 128];
            anyhow::ensure!(c.reader().read(&mut back)? == 100, "client read");
        }
        servers.push(s);
    }
    let rss1 = report::rss_kib(pid).unwrap_or(0);
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 * 1024.0 / args.count as f64;
    println!(
        "{} idle gateway TLS connections (starling_gateway::conn::Tls: rustls UnbufferedServerConnection, \
         TLS 1.3, ring, 1 ticket; size_of {} B, boxed):",
        args.count,
        std::mem::size_of::<Tls>()
    );
    println!(
        "  after the handshake{}: RSS {rss0} -> {rss1} KiB = {:.0} B per connection",
        if args.handshake_only {
            ""
        } else {
            " and one 100-byte record each way"
        },
        per(rss0, rss1)
    );
    drop(servers);
    Ok(())
}

/// The pre-issue-4 representation: a boxed buffered `ServerConnection`.
fn run_buffered(
    args: &TlsMemoryArgs,
    scfg: Arc<rustls::ServerConfig>,
    ccfg: Arc<rustls::ClientConfig>,
) -> anyhow::Result<()> {
    let name = ServerName::try_from("localhost")?.to_owned();
    let pid = std::process::id();
    let rss0 = report::rss_kib(pid).unwrap_or(0);
    let mut servers = Vec::with_capacity(args.count);
    let mut buf = Vec::new();
    for _ in 0..args.count {
        let mut s = Box::new(rustls::ServerConnection::new(scfg.clone())?);
        let mut c = rustls::ClientConnection::new(ccfg.clone(), name.clone())?;
        while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
            buf.clear();
            c.write_tls(&mut buf)?;
            s.read_tls(&mut buf.as_slice())?;
            s.process_new_packets()?;
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf)?;
            }
            client_in(&mut c, &buf)?;
        }
        servers.push(s);
    }
    let rss1 = report::rss_kib(pid).unwrap_or(0);
    let mut plain = [0u8; 256];
    for s in &mut servers {
        s.writer().write_all(&[7u8; 100])?;
        buf.clear();
        s.write_tls(&mut buf)?;
        let _ = s.reader().read(&mut plain);
    }
    let rss2 = report::rss_kib(pid).unwrap_or(0);
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 * 1024.0 / args.count as f64;
    println!(
        "{} idle boxed rustls::ServerConnection (buffered API, the server's config; size_of {} B):",
        args.count,
        std::mem::size_of::<rustls::ServerConnection>()
    );
    println!(
        "  after the handshake:        RSS {rss0} -> {rss1} KiB = {:.0} B per connection",
        per(rss0, rss1)
    );
    println!(
        "  after one record out each:  RSS -> {rss2} KiB = {:.0} B per connection",
        per(rss0, rss2)
    );
    Ok(())
}
