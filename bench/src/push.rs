//! `starling-bench push`: push notifications per second through a running server's notifier
//! to a local APNs, and how long each took from the message's SendAck to its arrival.
//!
//! `--prepare` writes the local APNs' TLS material (`DIR/tls/`, the same kind of development
//! CA and 127.0.0.1 certificate `starling serve` makes) and a provider key (`DIR/AuthKey.p8`),
//! which the server's `[push.apns]` names before it starts (`bench/scripts/push.sh`).
//!
//! The run serves that APNs (HTTP/2 over TLS, ALPN h2, hyper's server on a thread of its own),
//! registers an APNs token for each of `--recipients` accounts (which then stay offline),
//! creates `--groups` groups of `--group-size` of them (recipient `i` of group `g` is
//! `(g × size + i) mod recipients`), and sends `--rate` group messages per second, round-robin
//! over the groups, for `--secs`. Every message owes one notification to each member but the
//! sender once the server's `push.grace_ms` has passed without a DeliveryAck; the report gives
//! the notifications received per second, their latency from the SendAck, how many were
//! missing or came twice, the server's CPU and its push counters.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;
use starling_protocol::v1::{self, frame::Body};

use crate::accounts::{Account, AccountsFile};
use crate::clock::{self, Stopwatch};
use crate::net::{StarlingConn, Target, describe_error, source_addr, tls_for};
use crate::report::{self, Machine, Summary};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct PushArgs {
    /// Write the local APNs' TLS material and provider key into `--endpoint-dir` and exit.
    #[arg(long)]
    prepare: bool,
    /// Where the local APNs' material is (see `--prepare`).
    #[arg(long)]
    endpoint_dir: PathBuf,
    /// Where the local APNs listens (the server's `push.apns.endpoint`).
    #[arg(long, default_value = "127.0.0.1:7790")]
    endpoint_listen: SocketAddr,
    /// tls://IP:PORT or plain://IP:PORT of the server.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Starling's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register`: the recipients, then the sender.
    #[arg(long, default_value = "bench-accounts.json")]
    accounts: PathBuf,
    /// Offline accounts with an APNs token.
    #[arg(long, default_value_t = 1000)]
    recipients: usize,
    /// Groups the sender writes to.
    #[arg(long, default_value_t = 20)]
    groups: usize,
    /// Recipients in each group (besides the sender).
    #[arg(long, default_value_t = 1000)]
    group_size: usize,
    /// Group messages per second, round-robin over the groups.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Notifications arriving in the first seconds do not count towards the rate.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// After sending, wait at most this long for the notifications still owed.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    sources: u32,
    /// The server's pid, to measure its CPU.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's metrics endpoint (HOST:PORT), for its push counters.
    #[arg(long)]
    server_metrics: Option<String>,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Users one group request may name (the server's default `router.group_request_users_max`).
const GROUP_REQUEST_USERS: usize = 256;

/// One request the local APNs answered.
struct Arrival {
    recipient: u64,
    conv: u64,
    seq: u64,
    at: Instant,
}

#[derive(Debug, Serialize)]
struct Outcome {
    messages_acked: u64,
    notifications_owed: u64,
    notifications_received: u64,
    missing: u64,
    duplicates: u64,
    /// Notifications for entries the run did not send (the groups' member changes).
    other_notifications: u64,
    /// Received per second after the warm-up, up to the end of sending.
    notifications_per_s: f64,
    /// From the message's SendAck to the notification's arrival (includes `push.grace_ms`).
    latency_us: Summary,
    server_cpu_cores: Option<f64>,
    /// Deltas of the server's `starling_push_*` counters over the run.
    server_counters: HashMap<String, u64>,
}

pub(crate) fn run(args: &PushArgs) -> anyhow::Result<()> {
    if args.prepare {
        return prepare(&args.endpoint_dir);
    }
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(
        args.recipients > 0 && args.groups > 0 && args.secs > 0 && args.rate > 0.0,
        "--recipients, --groups, --secs and --rate must be > 0"
    );
    anyhow::ensure!(
        (1..=args.recipients).contains(&args.group_size),
        "--group-size must be between 1 and --recipients"
    );
    let accounts = AccountsFile::load(&args.accounts)?;
    accounts.need(args.recipients + 1, &args.accounts)?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let machine = Machine::now();
    let arrivals = endpoint(&args.endpoint_dir, args.endpoint_listen)?;
    let accounts = accounts.accounts[..=args.recipients].to_vec();
    let out = crate::workers::block_on(async {
        tokio::task::LocalSet::new()
            .run_until(drive(args, &target, tls, &accounts, &arrivals))
            .await
    })??;
    println!(
        "push: {:.0} notifications/s ({} received of {} owed for {} messages, {} missing, {} \
         twice)",
        out.notifications_per_s,
        out.notifications_received,
        out.notifications_owed,
        out.messages_acked,
        out.missing,
        out.duplicates
    );
    report::print_latency_table(&[("SendAck → notification", &out.latency_us)]);
    if let Some(cores) = out.server_cpu_cores {
        println!("server CPU: {cores:.2} cores");
    }
    for (k, v) in &out.server_counters {
        println!("{k}: {v}");
    }
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "push",
                "params": args,
                "machine": machine,
                "outcome": out,
            }),
        )?;
    }
    if out.notifications_received == 0 {
        bail!("no notification arrived");
    }
    Ok(())
}

/// The local APNs' TLS set and provider key.
fn prepare(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    starling_gateway::tls::ensure_dev_material(dir)?;
    let key = dir.join("AuthKey.p8");
    if !key.exists() {
        use base64::Engine as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| anyhow::anyhow!("generating a P-256 key failed"))?;
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        std::fs::write(&key, pem).with_context(|| format!("writing {}", key.display()))?;
    }
    println!("{}", dir.display());
    Ok(())
}

/// Serves the local APNs on a thread of its own; what it receives comes out of the receiver.
fn endpoint(dir: &Path, listen: SocketAddr) -> anyhow::Result<Receiver<Arrival>> {
    use rustls::pki_types::pem::PemObject as _;
    let tls_dir = dir.join("tls");
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(tls_dir.join("server.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(tls_dir.join("server.key"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    listener.set_nonblocking(true)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    std::thread::Builder::new()
        .name("bench-apns".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("the local APNs cannot start: {e}");
                    return;
                }
            };
            rt.block_on(serve(listener, acceptor, tx));
        })?;
    Ok(rx)
}

async fn serve(
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: Arc<Mutex<std::sync::mpsc::Sender<Arrival>>>,
) {
    use http_body_util::BodyExt as _;
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::task::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let recipient = req.uri().path().strip_prefix("/3/device/").and_then(|t| {
                            u64::from_str_radix(&t[t.len().saturating_sub(16)..], 16).ok()
                        });
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let at = clock::now();
                        let parsed = body.ok().and_then(|b| {
                            let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
                            let conv = v["conversation_id"].as_str()?.parse().ok()?;
                            Some((conv, v["seq"].as_u64()?))
                        });
                        let status = match (recipient, parsed) {
                            (Some(recipient), Some((conv, seq))) => {
                                let a = Arrival {
                                    recipient,
                                    conv,
                                    seq,
                                    at,
                                };
                                if let Ok(tx) = tx.lock() {
                                    let _ = tx.send(a);
                                }
                                200
                            }
                            _ => 400,
                        };
                        hyper::Response::builder()
                            .status(status)
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                    }
                });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(1000)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// An APNs device token for recipient `i`: 32 bytes, hex, the index in the last 8.
fn apns_token(i: u64) -> String {
    format!("{:048x}{i:016x}", 0x5ea1_u64)
}

async fn drive(
    args: &PushArgs,
    target: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    accounts: &[Account],
    arrivals: &Receiver<Arrival>,
) -> anyhow::Result<Outcome> {
    let connect = |i: usize| {
        let acc = accounts[i].clone();
        let tls = tls.clone();
        let src = source_addr(i as u64, args.sources, target.addr());
        let dst = target.addr();
        async move {
            StarlingConn::open_authenticated(
                dst,
                src,
                tls.as_ref(),
                Duration::from_secs(10),
                &acc.access_token,
                &acc.email,
            )
            .await
        }
    };
    // Recipients: a token each, then offline.
    let mut done = 0;
    for chunk in (0..args.recipients).collect::<Vec<_>>().chunks(32) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let c = connect(i);
            tasks.push(tokio::task::spawn_local(async move {
                let mut c = c.await?;
                let reg = Body::RegisterPushToken(v1::RegisterPushToken {
                    platform: v1::PushPlatform::Apns as i32,
                    token: apns_token(i as u64),
                    app_id: "org.starling.bench".to_owned(),
                    sandbox: false,
                });
                match c.request(reg).await? {
                    Body::Done(_) => Ok::<_, anyhow::Error>(()),
                    Body::Error(e) => bail!("RegisterPushToken refused: {}", describe_error(&e)),
                    other => bail!("unexpected answer: {}", other.kind().name()),
                }
            }));
        }
        for t in tasks {
            t.await.context("a registration task failed")??;
        }
        done += chunk.len();
        report::progress(&format!("push: tokens {done}/{}", args.recipients));
    }
    report::progress_done();
    // The sender and its groups.
    let mut sender = connect(args.recipients).await?;
    let mut convs = Vec::with_capacity(args.groups);
    for g in 0..args.groups {
        let members: Vec<u64> = (0..args.group_size)
            .map(|i| accounts[(g * args.group_size + i) % args.recipients].user_id)
            .collect();
        // One request names at most `router.group_request_users_max` (256 by default) users.
        let mut chunks = members.chunks(GROUP_REQUEST_USERS);
        let create = Body::CreateGroup(v1::CreateGroup {
            name: format!("push bench {g}"),
            member_user_ids: chunks.next().map(<[u64]>::to_vec).unwrap_or_default(),
            avatar: None,
        });
        let conv = match sender.request(create).await? {
            Body::GroupInfo(info) => info.conversation_id,
            Body::Error(e) => bail!("CreateGroup refused: {}", describe_error(&e)),
            other => bail!("unexpected answer to CreateGroup: {}", other.kind().name()),
        };
        for chunk in chunks {
            let add = Body::AddGroupMembers(v1::AddGroupMembers {
                conversation_id: conv,
                user_ids: chunk.to_vec(),
            });
            match sender.request(add).await? {
                Body::GroupInfo(_) => {}
                Body::Error(e) => bail!("AddGroupMembers refused: {}", describe_error(&e)),
                other => bail!(
                    "unexpected answer to AddGroupMembers: {}",
                    other.kind().name()
                ),
            }
        }
        convs.push(conv);
    }
    // Counters before.
    let counters0 = args
        .server_metrics
        .as_deref()
        .map(push_counters)
        .transpose()?;
    let cpu0 = args.server_pid.and_then(report::cpu_secs);
    println!("push: sending for {} s", args.secs);
    let sw = Stopwatch::start();
    let start = clock::now();
    let end = start + Duration::from_secs(args.secs);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut acks: HashMap<(u64, u64), Instant> = HashMap::new();
    let mut next = start;
    let mut k: u64 = 0;
    // Client message ids are unique per run (a second run against the same server must not
    // be answered as retries of the first).
    let run_id = clock::unix_secs() ^ clock::monotonic_ns();
    let mut got: Vec<Arrival> = Vec::new();
    while clock::now() < end {
        while next <= clock::now() && next < end {
            let conv = convs[(k as usize) % convs.len()];
            let rid = sender.rid();
            sender.push(
                rid,
                Body::Send(v1::Send {
                    client_msg_id: (u128::from(k) | (u128::from(run_id) << 64))
                        .to_be_bytes()
                        .to_vec()
                        .into(),
                    to: Some(v1::Recipient {
                        target: Some(v1::recipient::Target::ConversationId(conv)),
                    }),
                    content_type: "text/plain".to_owned(),
                    body: bytes::Bytes::from_static(b"push bench"),
                    first_attempt: true,
                    ..Default::default()
                }),
            )?;
            k += 1;
            next += interval;
        }
        sender.flush().await?;
        let wait = next.min(end).saturating_duration_since(clock::now());
        if let Ok(r) = tokio::time::timeout(wait, sender.read_some()).await
            && r? == 0
        {
            bail!("the server closed the sender's connection");
        }
        while let Some(f) = sender.next_frame()? {
            match f.body {
                Some(Body::SendAck(a)) => {
                    acks.insert((a.conversation_id, a.seq), clock::now());
                }
                Some(Body::Error(e)) => bail!("a Send was refused: {}", describe_error(&e)),
                _ => {}
            }
        }
        got.extend(arrivals.try_iter());
    }
    let send_secs = sw.elapsed_secs();
    // Acks still owed, then the notifications still owed.
    let ack_deadline = clock::now() + Duration::from_secs(5);
    while (acks.len() as u64) < k && clock::now() < ack_deadline {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), sender.read_some()).await
            && r? == 0
        {
            bail!("the server closed the sender's connection");
        }
        while let Some(f) = sender.next_frame()? {
            if let Some(Body::SendAck(a)) = f.body {
                acks.insert((a.conversation_id, a.seq), clock::now());
            }
        }
    }
    let owed = acks.len() as u64 * args.group_size as u64;
    let drain_deadline = clock::now() + Duration::from_secs(args.drain_secs);
    let ours = |got: &[Arrival]| {
        got.iter()
            .filter(|a| acks.contains_key(&(a.conv, a.seq)))
            .count() as u64
    };
    let mut matched = ours(&got);
    while matched < owed && clock::now() < drain_deadline {
        let before = got.len();
        if let Ok(a) = arrivals.recv_timeout(Duration::from_millis(100)) {
            got.push(a);
        }
        got.extend(arrivals.try_iter());
        matched += ours(&got[before..]);
    }
    let total_secs = sw.elapsed_secs();
    let cpu = cpu0
        .zip(args.server_pid.and_then(report::cpu_secs))
        .map(|(a, b)| (b - a) / total_secs.max(1e-9));
    let mut server_counters = HashMap::new();
    if let (Some(before), Some(addr)) = (counters0, args.server_metrics.as_deref()) {
        let after = push_counters(addr)?;
        for (name, v) in after {
            server_counters.insert(
                name.clone(),
                v.saturating_sub(before.get(&name).copied().unwrap_or(0)),
            );
        }
    }
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut hist = report::histogram();
    let warm = start + Duration::from_secs(args.warmup_secs);
    let mut in_window = 0u64;
    let mut other = 0u64;
    for a in &got {
        let Some(t) = acks.get(&(a.conv, a.seq)) else {
            // For an entry the run did not send: the groups' member changes.
            other += 1;
            continue;
        };
        if !seen.insert((a.recipient, a.conv, a.seq)) {
            duplicates += 1;
            continue;
        }
        if a.at >= warm && a.at <= end {
            in_window += 1;
        }
        let us = u64::try_from(a.at.saturating_duration_since(*t).as_micros()).unwrap_or(u64::MAX);
        let _ = hist.record(us.max(1));
    }
    let window_secs = (send_secs - args.warmup_secs as f64).max(1e-9);
    Ok(Outcome {
        messages_acked: acks.len() as u64,
        notifications_owed: owed,
        notifications_received: seen.len() as u64,
        missing: owed.saturating_sub(seen.len() as u64),
        duplicates,
        other_notifications: other,
        notifications_per_s: in_window as f64 / window_secs,
        latency_us: Summary::of(&hist),
        server_cpu_cores: cpu,
        server_counters,
    })
}

/// The server's `starling_push_*` counters.
fn push_counters(addr: &str) -> anyhow::Result<HashMap<String, u64>> {
    let text = crate::scrape::get_metrics(addr)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("starling_push_"))
        .filter_map(|l| {
            let (name, v) = l.split_once(' ')?;
            Some((name.to_owned(), v.trim().parse::<f64>().ok()? as u64))
        })
        .collect())
}
