//! Start-up and shutdown: validate config, check the data directory (its
//! layout, that it takes a durable write) and the TLS material, bind one
//! SO_REUSEPORT listener per shard, start the shard threads and the metrics
//! thread, then wait for SIGTERM/SIGINT (drain, return `Ok`) or a storage
//! fault (drain briefly, return [`StorageFaultExit`]; see [`crate::health`]).

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::{Arc, mpsc};

use anyhow::Context as _;

use crate::accounts::Accounts;
use crate::config::Config;
use crate::health::{Health, Stop};
use crate::metrics::Metrics;
use crate::runtime::{BlockingPool, ShardRuntime};
use crate::shard::{Control, Shard, Shared};

/// Binds a listening socket with SO_REUSEPORT (so every shard can bind the
/// same address and the kernel spreads connections over them).
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux), which
    // saves a setsockopt per connection.
    s.set_tcp_nodelay(true)?;
    set_defer_accept(&s, DEFER_ACCEPT_SECS)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// How long the kernel holds a connection that has sent nothing before
/// handing it to `accept` anyway (then the handshake or Hello deadline
/// applies as usual).
pub const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// TCP_DEFER_ACCEPT: the client speaks first on both listeners (ClientHello,
/// or Hello on the plaintext one), so the kernel completes `accept` only once
/// the connection's first bytes have arrived. The shard is then woken once
/// per new connection (not once for the TCP handshake and again for the
/// ClientHello), and the connection's first read needs no readiness wait
/// (see `conn::Conn::drive`). A client that connects and stays silent is
/// kept by the kernel (no file descriptor, no task) for
/// [`DEFER_ACCEPT_SECS`], then accepted and cut by the handshake deadline.
fn set_defer_accept(s: &socket2::Socket, secs: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(std::io::Error::other)?;
    // Safety: setsockopt(2) on a socket we own, with a pointer to a live
    // c_int and its exact size; the kernel only reads `len` bytes from it.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds `n` listeners on `addr`; port 0 is resolved by the first.
fn bind_group(addr: SocketAddr, n: usize) -> anyhow::Result<(SocketAddr, Vec<TcpListener>)> {
    let first = bind_reuseport(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let actual = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bind_reuseport(actual).with_context(|| format!("cannot listen on {actual}"))?);
    }
    Ok((actual, all))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Sets whether this process's memory may be backed by transparent huge pages
/// (`Config::transparent_huge_pages`). It applies to every later page fault of the process,
/// including regions the allocator already asked huge pages for.
///
/// # Errors
/// The kernel refused (`prctl`).
pub fn set_transparent_huge_pages(allowed: bool) -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and touches no memory of ours.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_THP_DISABLE,
            libc::c_ulong::from(!allowed),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Blocks SIGINT/SIGTERM in this thread (and the threads it spawns later),
/// so they can be taken synchronously with `sigwait`.
fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // Safety: sigset_t is plain data; sigemptyset initialises it before use,
    // and pthread_sigmask only reads the set we pass.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        anyhow::ensure!(rc == 0, "pthread_sigmask failed: {rc}");
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // Safety: `set` was initialised by block_signals; `sig` is a valid out-pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc == 0 { sig } else { libc::SIGTERM }
}

/// Runs the server until SIGTERM/SIGINT, then drains and returns; or until a storage fault,
/// then drains briefly and returns [`StorageFaultExit`].
///
/// # Errors
/// Start-up failed, or a storage fault stopped the server.
pub fn serve(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    set_transparent_huge_pages(cfg.transparent_huge_pages)
        .context("cannot set the transparent huge page mode (prctl)")?;
    let sigset = block_signals()?;
    crate::fsutil::create_dir_durable(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    say(&format!("starling {} starting", env!("CARGO_PKG_VERSION")));
    say(&format!("data dir: {}", cfg.data_dir.display()));
    // Before anything in the data dir is opened: a start with another shard count than the
    // data's is refused here, with the data untouched.
    let layout = crate::layout::resolve(&cfg.data_dir, cfg.shards, cfg.shard_count())?;
    let n = layout.shards;
    say(&format!(
        "layout: {n} shards ({})",
        match layout.origin {
            crate::layout::Origin::Recorded => "recorded in the data dir",
            crate::layout::Origin::Inferred => "inferred from shards/ and recorded",
            crate::layout::Origin::New => "new data dir, recorded",
        }
    ));

    // A full or read-only filesystem fails the start here, with its reason.
    let mut probed = vec![cfg.data_dir.clone()];
    probed.extend(
        (0..n)
            .map(|i| cfg.data_dir.join("shards").join(i.to_string()))
            .filter(|d| d.is_dir()),
    );
    for dir in &probed {
        crate::fsutil::probe_writable(dir).with_context(|| {
            format!(
                "storage fault at start-up: {} does not take a durable write",
                dir.display()
            )
        })?;
    }
    let health = Arc::new(Health::new(n));
    // The main thread waits for a signal (taken by a thread of its own) or a fault.
    let (stop_tx, stop_rx) = mpsc::channel();
    health.set_stop(stop_tx.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                if stop_tx.send(Stop::Signal(wait_signal(&sigset))).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the signal thread")?;

    let material = crate::tls::ensure_dev_material(&cfg.data_dir)?;
    if material.generated {
        say(&format!(
            "generated a development CA and server certificate in {}",
            cfg.data_dir.join("tls").display()
        ));
    }
    say(&format!(
        "  CA certificate:     {}",
        material.ca_pem.display()
    ));
    say(&format!(
        "  server certificate: {}",
        material.server_pem.display()
    ));
    say(&format!(
        "  server key:         {}",
        material.server_key.display()
    ));
    say(&format!("  CA SHA-256 fingerprint: {}", material.ca_sha256));
    let tls = crate::tls::server_config(&material)?;

    let allowed = crate::cpus::allowed().context("cannot read the process's CPU affinity")?;
    let placement = crate::cpus::place(&allowed, n, cfg.storage.io_cpus.as_deref());
    if !placement.io.is_empty() {
        // Refuse to start rather than warn from each log's thread later.
        let io = placement.io.clone();
        std::thread::spawn(move || crate::cpus::pin_current_thread(&io))
            .join()
            .map_err(|_| anyhow::anyhow!("CPU placement check panicked"))?
            .with_context(|| format!("cannot run the log writers on CPUs {:?}", placement.io))?;
        say(&format!("log writers on CPUs {:?}", placement.io));
    }
    // The media endpoint runs on threads of its own; the router signs download grants with it.
    let media_stats = Arc::new(crate::media::MediaStats::default());
    let media = crate::media::Media::start(&cfg.media, &cfg.data_dir, &tls, media_stats.clone())?;
    let mut shard_config = cfg.shard_config();
    if let Some((m, _)) = &media {
        shard_config.media = Some(Arc::new(crate::media::DownloadUrls(m.clone())));
    }
    let (meta, router_parts) = crate::messaging::open(
        &cfg.data_dir,
        n,
        &cfg.storage,
        &shard_config,
        &placement.io,
        &health,
    )?;
    // One per shard, in shard order (the metrics label them by position).
    let log_stats = router_parts
        .iter()
        .map(|p| p.store.log().map(|l| l.stats().clone()))
        .collect::<Result<Vec<_>, _>>()
        .context("a shard's log closed while opening")?;
    let indexes = router_parts
        .iter()
        .map(|p| p.store.index().clone())
        .collect();
    let reclaimers: Vec<_> = router_parts.iter().map(|p| p.reclaimer.clone()).collect();
    let metrics = Arc::new(
        Metrics::new(n, log_stats)
            .with_indexes(indexes)
            .with_media(media_stats)
            .with_retention(crate::retention::stats(&reclaimers)),
    );
    let retention = crate::retention::start(
        reclaimers,
        cfg.shard_config().retention(),
        meta.clone(),
        cfg.storage.retention_sweep_ms,
    )
    .context("cannot start the retention thread")?;
    if let Some(line) = crate::accounts::migrate::run(&cfg.data_dir, &meta)? {
        say(&line);
    }
    let notices = crate::push::start(&cfg.push, meta.clone(), metrics.push.clone())?;
    if notices.is_some() {
        let mut names = Vec::new();
        if cfg.push.web_push.is_some() {
            names.push("web push".to_owned());
        }
        if cfg.push.fcm.is_some() {
            names.push("fcm".to_owned());
        }
        if cfg.push.apns.is_some() {
            names.push("apns".to_owned());
        }
        if let Some(w) = &cfg.push.webhook {
            names.push(format!("webhook ({})", w.platforms.join(", ")));
        }
        say(&format!("push notifier: {}", names.join(", ")));
    }
    let mut router_parts = router_parts;
    for p in &mut router_parts {
        p.notices.clone_from(&notices);
    }
    let accounts = Arc::new(Accounts::open(
        &cfg.data_dir,
        meta.clone(),
        cfg.accounts.clone(),
        metrics.clone(),
    )?);
    say(&format!("access token key id: {}", accounts.token_kid()));

    let mut router_parts: Vec<Option<_>> = router_parts.into_iter().map(Some).collect();

    let (tls_addr, mut tls_listeners) = bind_group(cfg.listen, n)?;
    let mut plain = match cfg.dangerous_plaintext_listen {
        Some(a) => Some(bind_group(a, n)?),
        None => None,
    };
    let metrics_addr = match cfg.metrics_listen {
        Some(a) => {
            let l = TcpListener::bind(a)
                .with_context(|| format!("cannot listen for metrics on {a}"))?;
            let addr = l.local_addr()?;
            let m = metrics.clone();
            let h = health.clone();
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || crate::metrics::serve(l, &m, &h))?;
            Some(addr)
        }
        None => None,
    };

    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..n {
        let (tx, rx) = mpsc::channel();
        senders.push(tx);
        receivers.push(rx);
    }
    let keys =
        crate::keys::KeyService::start(meta, &cfg.keys, senders.clone(), placement.io.clone())
            .context("cannot start the key directory's writer")?;
    let shared = Arc::new(Shared {
        keys: Some(keys),
        cfg: cfg.clone(),
        accounts,
        metrics,
        tls,
        controls: senders.clone(),
        revocation_epoch: std::sync::atomic::AtomicU64::new(0),
        health: health.clone(),
        media: media.as_ref().map(|(m, _)| m.clone()),
    });
    let pool = BlockingPool::new(cfg.accounts.blocking_threads);
    let (ready_tx, ready_rx) = mpsc::channel();
    // Each shard thread holds a sender until it ends: the receiver sees them all gone.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut threads = Vec::new();
    for (i, rx) in receivers.into_iter().enumerate().rev() {
        let mut listeners = vec![(tls_listeners.pop().context("listener count")?, true)];
        if let Some((_, ls)) = plain.as_mut() {
            listeners.push((ls.pop().context("listener count")?, false));
        }
        let shared = shared.clone();
        let pool = pool.clone();
        let ready = ready_tx.clone();
        let driver = cfg.driver;
        let cpu = placement.shards.get(i).copied();
        let parts = router_parts[i].take().context("router parts")?;
        let done = done_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("shard-{i}"))
            .spawn(move || {
                let rt = match ShardRuntime::build(driver, cpu, &pool) {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(format!("shard {i}: cannot start runtime: {e}")));
                        return;
                    }
                };
                let kind = rt.driver();
                tracing::info!(
                    shard = i,
                    driver = kind.name(),
                    defer_taskrun = rt.deferred_taskrun(),
                    "shard runtime"
                );
                rt.block_on(async move {
                    // Built inside the runtime: its eventfd registers with this driver.
                    let router = match crate::messaging::ShardRouter::new(parts) {
                        Ok(r) => Rc::new(r),
                        Err(e) => {
                            let _ = ready.send(Err(format!("shard {i}: cannot start router: {e}")));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(kind));
                    let shard = Rc::new(Shard::new(i, shared, Some(router)));
                    shard.run(listeners, rx).await;
                });
                drop(done);
            })?;
        threads.push(t);
    }
    drop(ready_tx);
    drop(done_tx);
    let mut driver = None;
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(d)) => {
                driver = Some(d);
                health.shard_up();
            }
            Ok(Err(e)) => anyhow::bail!(e),
            Err(_) => anyhow::bail!("a shard thread died during start-up"),
        }
    }
    let driver = driver.map_or("?", crate::runtime::DriverKind::name);
    say(&format!("shards: {n} (driver: {driver})"));
    say(&format!("listening (TLS 1.3): {tls_addr}"));
    if let Some((a, _)) = &plain {
        say(&format!(
            "listening (PLAINTEXT, dangerous, benchmarks only): {a}"
        ));
    }
    if let Some(a) = metrics_addr {
        say(&format!("metrics: http://{a}/metrics"));
    }
    if let Some((m, a)) = &media {
        say(&format!("media (HTTPS): {a} at {}", m.base_url()));
    }
    health.serving();
    say("ready");
    tracing::info!(%tls_addr, shards = n, driver, "starling ready");

    match stop_rx.recv() {
        Ok(Stop::Signal(sig)) => {
            tracing::info!(signal = sig, "shutting down: draining connections");
            health.draining();
            // No sweep while the stores close (each checkpoints its index).
            retention.stop();
            for s in &senders {
                let _ = s.send(Control::Shutdown);
            }
            for t in threads {
                let _ = t.join();
            }
            say("stopped");
            Ok(())
        }
        Ok(Stop::Fault(reason)) => {
            retention.stop_soon();
            for s in &senders {
                let _ = s.send(Control::Fault);
            }
            // The shards drain for at most the grace and `shutdown_drain_ms`; a thread that
            // is stuck on the failed disk (a log writer in fsync) does not hold the exit.
            let wait = crate::clock::ms(
                crate::health::FAULT_ANSWER_GRACE_MS
                    + cfg.limits.shutdown_drain_ms
                    + 2 * cfg.limits.timer_tick_ms
                    + 1_000,
            );
            let _ = done_rx.recv_timeout(wait);
            Err(StorageFaultExit(reason).into())
        }
        Err(_) => anyhow::bail!("the signal thread is gone"),
    }
}

/// `serve` stopped because of a storage fault (see [`crate::health`]): the binary exits with
/// [`crate::health::EXIT_STORAGE_FAULT`].
#[derive(Debug, thiserror::Error)]
#[error("storage fault: {0}; exiting so that a supervisor restarts the server")]
pub struct StorageFaultExit(pub String);

#[cfg(test)]
mod tests {
    use super::set_transparent_huge_pages;

    fn thp_disabled() -> bool {
        // SAFETY: PR_GET_THP_DISABLE reads a flag of this process.
        let r = unsafe {
            libc::prctl(
                libc::PR_GET_THP_DISABLE,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        assert!(
            r >= 0,
            "PR_GET_THP_DISABLE: {}",
            std::io::Error::last_os_error()
        );
        r == 1
    }

    #[test]
    fn the_transparent_huge_page_mode_reaches_the_kernel() {
        set_transparent_huge_pages(false).unwrap();
        assert!(thp_disabled());
        set_transparent_huge_pages(true).unwrap();
        assert!(!thp_disabled());
        // What `serve` sets by default.
        set_transparent_huge_pages(crate::config::Config::default().transparent_huge_pages)
            .unwrap();
        assert!(thp_disabled());
    }
}
