//! `starling-bench tls-memory`: how much memory one idle, handshaken
//! `rustls::ServerConnection` keeps — the per-connection TLS state the
//! gateway holds. Completes N TLS 1.3 handshakes in memory (no sockets)
//! with the server's own certificate and the gateway's settings (TLS 1.3,
//! ring, no tickets), keeps the server sides, and reports this process's
//! RSS growth per connection. Then it pushes one small application record
//! through each to show what the buffers hold after traffic.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

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
}

pub(crate) fn run(args: &TlsMemoryArgs) -> anyhow::Result<()> {
    let tls = args.data_dir.join("tls");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls.join("server.pem"))
        .context("server.pem")?
        .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(tls.join("server.key")).context("server.key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut scfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    scfg.send_tls13_tickets = 0;
    let scfg = Arc::new(scfg);
    let ccfg = tls_config(&tls.join("ca.pem"), false)?;
    let name = ServerName::try_from("localhost")?.to_owned();
    let pid = std::process::id();
    let rss0 = report::rss_kib(pid).unwrap_or(0);
    let mut servers = Vec::with_capacity(args.count);
    let mut buf = Vec::new();
    for _ in 0..args.count {
        let mut s = rustls::ServerConnection::new(scfg.clone())?;
        // The client half is dropped after each handshake: its memory is
        // reused by the next one, so the growth is the server halves'.
        let mut c = rustls::ClientConnection::new(ccfg.clone(), name.clone())?;
        while c.is_handshaking() || s.is_handshaking() {
            buf.clear();
            c.write_tls(&mut buf)?;
            s.read_tls(&mut buf.as_slice())?;
            s.process_new_packets()?;
            buf.clear();
            s.write_tls(&mut buf)?;
            c.read_tls(&mut buf.as_slice())?;
            c.process_new_packets()?;
        }
        servers.push(s);
    }
    let rss1 = report::rss_kib(pid).unwrap_or(0);
    // One 100-byte record out of every server connection (written and
    // drained, as the gateway does), then a read attempt.
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
        "{} idle rustls::ServerConnection (TLS 1.3, ring, no tickets; size_of {} B):",
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
    drop(servers);
    Ok(())
}
