//! `starling-bench media`: upload and download of one large file over loopback TLS through the
//! server's media endpoint, and the server's memory meanwhile.
//!
//! Signs in with a `starling-cli` profile (`--profile`), writes a file of `--size-mib` MiB, and
//! for each of `--rounds` rounds (a new file each round: objects are content-addressed): asks
//! for an upload grant, times the HTTPS PUT alone (the SDK's streaming upload, the server's
//! hashing, write, fsync and rename included), sends a message naming it to `--to`, asks for a
//! download grant and times the GET alone (into a sink; the client still hashes every byte).
//! While each transfer runs, a thread samples the server's resident memory (`VmRSS` of
//! `--server-pid`) every 10 ms. See `bench/scripts/media.sh`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use starling_client::{
    Client, ClientConfig, ConnectOptions, Target, TlsTrust, Transport, media, v1, v1::frame::Body,
};

use crate::clock::Stopwatch;

#[derive(Debug, Clone, Args)]
pub(crate) struct MediaArgs {
    /// The server's frame listener, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7443")]
    server: String,
    /// The server's CA certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// A signed-in `starling-cli` profile directory.
    #[arg(long)]
    profile: PathBuf,
    /// The user id the messages go to.
    #[arg(long)]
    to: u64,
    /// File size, MiB.
    #[arg(long, default_value_t = 50)]
    size_mib: u64,
    /// Rounds (a new file each).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The server's pid, for its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Content type of the uploads (must be in the server's allow-list).
    #[arg(long, default_value = "application/octet-stream")]
    content_type: String,
}

/// Resident KiB of `pid` (`VmRSS`).
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Samples the server's RSS every 10 ms until stopped; the peak.
struct RssPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    fn start(pid: Option<u32>) -> Self {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let thread = pid.map(|pid| {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(k) = rss_kib(pid) {
                        peak.fetch_max(k, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        });
        Self { stop, peak, thread }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

pub(crate) fn run(args: &MediaArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: &MediaArgs) -> anyhow::Result<()> {
    let trust = TlsTrust::CaFile(args.ca.clone());
    let connect = ConnectOptions::new(args.server.clone(), Transport::Tls(trust.clone()));
    let mut cfg = ClientConfig::new(connect, &args.profile);
    cfg.receive_messages = false;
    let (client, _events) = Client::start(cfg).context("signing in with the profile")?;
    let file = std::env::temp_dir().join(format!("starling-bench-media-{}", std::process::id()));
    let size = args.size_mib * 1024 * 1024;
    let mut block: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mib = size as f64 / 1_048_576.0;
    let base = args.server_pid.and_then(rss_kib).unwrap_or(0);
    println!(
        "media: {mib:.0} MiB over loopback TLS, {} rounds; server RSS before: {:.1} MiB",
        args.rounds,
        base as f64 / 1024.0
    );
    for round in 0..args.rounds {
        block[..4].copy_from_slice(&round.to_le_bytes());
        {
            use std::io::Write as _;
            let mut f = std::io::BufWriter::new(std::fs::File::create(&file)?);
            for _ in 0..args.size_mib {
                f.write_all(&block)?;
            }
            f.flush()?;
        }
        let (sha, len) = media::hash_file(&file).await?;
        let grant = match client
            .request(Body::RequestUpload(v1::RequestUpload {
                content_type: args.content_type.clone(),
                size_bytes: len,
                sha256: sha.to_vec().into(),
            }))
            .await?
        {
            Body::UploadGrant(g) => g,
            other => anyhow::bail!("RequestUpload answered {other:?}"),
        };
        let rss = RssPeak::start(args.server_pid);
        let sw = Stopwatch::start();
        media::put_file(&trust, &grant, &file, Box::new(|_, _| {})).await?;
        let up_s = sw.elapsed_secs();
        let up_peak = rss.finish();
        let media_ref = v1::MediaRef {
            media_id: grant.media_id.clone(),
            content_type: args.content_type.clone(),
            size_bytes: len,
            sha256: sha.to_vec().into(),
            ..Default::default()
        };
        let ack = client
            .send_with_media(
                Target::User(args.to),
                "text/plain",
                Vec::new(),
                Some(&media_ref),
            )
            .await?;
        let dl = client
            .download_grant(&grant.media_id, ack.conversation_id, ack.seq)
            .await?;
        let rss = RssPeak::start(args.server_pid);
        let sw = Stopwatch::start();
        let n = media::get_to(&trust, &dl, &mut tokio::io::sink(), Box::new(|_, _| {})).await?;
        let down_s = sw.elapsed_secs();
        let down_peak = rss.finish();
        anyhow::ensure!(n == len, "downloaded {n} of {len} bytes");
        println!(
            "round {}: upload {:.0} MiB/s ({up_s:.3} s), download {:.0} MiB/s ({down_s:.3} s); \
             server peak RSS {:.1} MiB during upload, {:.1} MiB during download",
            round + 1,
            mib / up_s,
            mib / down_s,
            up_peak as f64 / 1024.0,
            down_peak as f64 / 1024.0
        );
    }
    client.shutdown().await;
    let _ = std::fs::remove_file(&file);
    Ok(())
}
