//! The glue between a shard's runtime and its [`RouterShard`] (the sans-IO
//! messaging core): the eventfd doorbell shared by the ring bell and the
//! log's wake callback, the per-shard storage opened at start-up, and the
//! driver task that feeds the router its wake-ups and timers and moves its
//! output into the connections' outbound queues.

use std::cell::{Cell, RefCell};
use std::future::{Future as _, poll_fn};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use anyhow::Context as _;
use starling_router::ring::{Bell, Doorbell};
use starling_router::{ConnId as RouterConnId, RouterShard, ShardConfig, ShardLinks, ShardMsg};
use starling_storage::{
    DenseIndex, EmbeddedMeta, EmbeddedShard, FailedShard, LogOptions, LogThread, ShardOptions,
};

use crate::clock;
use crate::health::Health;
use crate::runtime::{self, Ready};
use crate::shard::{Kill, Shard};
use crate::wheel::ConnId;

/// One shard's messaging core over the embedded backend.
pub type Router = RouterShard<EmbeddedShard, DenseIndex, EmbeddedMeta>;

/// A non-blocking eventfd: written by other threads (ring producers, the
/// log's I/O thread), read by the shard's driver task.
#[derive(Debug, Clone)]
pub struct EventFd(Arc<OwnedFd>);

impl EventFd {
    /// A new eventfd (non-blocking, close-on-exec).
    pub fn new() -> std::io::Result<Self> {
        // Safety: eventfd(2) with valid flags; the returned fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Safety: `fd` is a fresh descriptor nobody else owns.
        Ok(Self(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Adds one to the counter (wakes a waiting reader).
    pub fn notify(&self) {
        let one: u64 = 1;
        // Safety: writes 8 bytes from a valid u64 to our own eventfd.
        let _ = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                std::ptr::from_ref(&one).cast::<libc::c_void>(),
                8,
            )
        };
    }

    /// Resets the counter; true if it was non-zero.
    fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // Safety: reads 8 bytes into a valid u64 from our own eventfd.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                std::ptr::from_mut(&mut v).cast::<libc::c_void>(),
                8,
            )
        };
        n == 8
    }
}

struct EventFdBell(EventFd);

impl Doorbell for EventFdBell {
    fn ring(&self) {
        self.0.notify();
    }
}

/// What one shard thread needs to build its router (all `Send`).
#[derive(Debug)]
pub struct RouterParts {
    /// The shard's storage (log + index), recovered.
    pub store: EmbeddedShard,
    /// Its row and column of the grid.
    pub links: ShardLinks<ShardMsg>,
    /// The node's metadata.
    pub meta: Arc<EmbeddedMeta>,
    /// Rung by the bell and the log.
    pub efd: EventFd,
    /// Where the shard's storage threads run (its log writer, its metadata writer); empty: not
    /// pinned, beside the shards.
    pub io_cpus: Arc<[usize]>,
    /// Where a failure of the shard's log or index is reported.
    pub health: Arc<Health>,
    /// The options the store was opened with: a failed log is reopened in place with them.
    pub store_opts: ShardOptions,
    /// How often a failed log's recovery in place is tried (`storage.recovery_retry_ms`).
    pub recovery_retry_ms: u64,
    /// The shard's retention reclaimer (shared with the retention thread): paused while a
    /// failed log is reopened, given the new index after.
    pub reclaimer: Arc<starling_storage::log::Reclaimer>,
    /// The router's configuration (`Config::shard_config`: `[router]` and the slow-consumer
    /// limits of `[limits]`).
    pub cfg: ShardConfig,
    /// Where the router's notices go (the push notifier), if it runs.
    pub notices: Option<crate::push::NoticeSender>,
}

/// Opens the node's metadata and every shard's storage under `data_dir`
/// (the shards in parallel, a thread each) and builds the grid. Blocking;
/// call before serving. If `io_cpus` is not
/// empty (`crate::cpus`), each log's writer thread (and each router's metadata
/// writer) runs there and its spare-segment maker at the lowest priority
/// wherever the caller may run. A fault of the metadata store is reported to
/// `health`.
pub fn open(
    data_dir: &Path,
    shards: usize,
    storage: &crate::config::StorageConfig,
    router: &ShardConfig,
    io_cpus: &[usize],
    health: &Arc<Health>,
) -> anyhow::Result<(Arc<EmbeddedMeta>, Vec<RouterParts>)> {
    let io: Arc<[usize]> = io_cpus.into();
    let io_for_parts = io.clone();
    let thread_start: starling_storage::ThreadStart = Arc::new(move |t| {
        let placed = match t {
            // No CPU to spare: everything shares the shards' CPUs, as it always did. (At nice
            // 19 beside a saturated shard the spare maker would fall behind the writer, which
            // then waits for it at the next segment.)
            _ if io.is_empty() => Ok(()),
            LogThread::Writer => crate::cpus::pin_current_thread(&io),
            LogThread::Spare | LogThread::Index => crate::cpus::lowest_priority(),
        };
        if let Err(e) = placed {
            tracing::warn!(thread = ?t, error = %e, "cannot place a storage thread");
        }
    });
    let meta =
        Arc::new(EmbeddedMeta::open(&data_dir.join("meta.redb")).context("cannot open meta.redb")?);
    let h = health.clone();
    meta.set_fault_hook(Box::new(move |e| h.fault(None, &format!("meta.redb: {e}"))));
    let mut efds = Vec::new();
    let mut bells = Vec::new();
    for _ in 0..shards {
        let efd = EventFd::new().context("eventfd")?;
        bells.push(Bell::new(EventFdBell(efd.clone())));
        efds.push(efd);
    }
    let links = starling_router::grid::<ShardMsg>(4096, &bells);
    let index_budget = storage.index_memory_bytes / shards.max(1) as u64;
    if index_budget < crate::config::INDEX_MEMORY_PER_SHARD_MIN {
        anyhow::bail!(
            "storage.index_memory_bytes = {} is {} per shard for {shards} shards; each needs at \
             least {}",
            storage.index_memory_bytes,
            index_budget,
            crate::config::INDEX_MEMORY_PER_SHARD_MIN
        );
    }
    let opts: Vec<ShardOptions> = links
        .iter()
        .map(|l| {
            // The log wakes the driver through the shard's bell, like the rings do: its eventfd
            // is written only while the driver is parked.
            let bell = l.bell().clone();
            ShardOptions {
                log: LogOptions {
                    wake: Some(Arc::new(move || {
                        bell.notify();
                    })),
                    commit_interval_min: std::time::Duration::from_micros(u64::from(
                        storage.commit_interval_min_us,
                    )),
                    thread_start: Some(thread_start.clone()),
                    cached_sealed_segments: usize::try_from(storage.cached_sealed_segments)
                        .unwrap_or(usize::MAX),
                    ..LogOptions::default()
                },
                index_memory_bytes: usize::try_from(index_budget).unwrap_or(usize::MAX),
                ..ShardOptions::default()
            }
        })
        .collect();
    // Every shard's storage opens (recovers) at once, each on a thread of its own: a start
    // takes as long as the slowest shard, not the sum.
    let started = crate::clock::mono_ms();
    let reopen_opts = opts.clone();
    let stores: Vec<anyhow::Result<EmbeddedShard>> = std::thread::scope(|scope| {
        let opening: Vec<_> = opts
            .into_iter()
            .enumerate()
            .map(|(i, opts)| {
                let dir = data_dir.join("shards").join(i.to_string());
                std::thread::Builder::new()
                    .name(format!("starling-open-{i}"))
                    .spawn_scoped(scope, move || open_shard(i, &dir, opts))
            })
            .collect();
        opening
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("opening a shard's storage panicked"))),
                Err(e) => Err(anyhow::Error::from(e).context("cannot start a thread")),
            })
            .collect()
    });
    tracing::info!(
        shards,
        ms = crate::clock::mono_ms().saturating_sub(started),
        "every shard's storage opened"
    );
    let mut parts = Vec::new();
    for (((links, efd), store), store_opts) in
        links.into_iter().zip(efds).zip(stores).zip(reopen_opts)
    {
        let store = store?;
        let reclaimer = Arc::new(store.reclaimer());
        parts.push(RouterParts {
            store,
            reclaimer,
            links,
            meta: meta.clone(),
            efd,
            io_cpus: io_for_parts.clone(),
            health: health.clone(),
            store_opts,
            recovery_retry_ms: storage.recovery_retry_ms,
            cfg: router.clone(),
            notices: None,
        });
    }
    Ok((meta, parts))
}

/// Opens (recovers) shard `i`'s storage in `dir` and logs what it found.
fn open_shard(i: usize, dir: &Path, opts: ShardOptions) -> anyhow::Result<EmbeddedShard> {
    let opened = crate::clock::mono_ms();
    let store = EmbeddedShard::open(dir, opts)
        .with_context(|| format!("cannot open shard storage {}", dir.display()))?;
    let r = store.open_report();
    tracing::info!(
        shard = i,
        log_last_lsn = r.log.last_lsn.0,
        index_entries = store.index().len(),
        index_rebuilt = r.index_rebuilt,
        checkpointed_segments_skipped = r.log.skipped_segments,
        replayed_records = r.replayed_records,
        ms = crate::clock::mono_ms().saturating_sub(opened),
        "shard storage opened"
    );
    Ok(store)
}

/// A shard's router and the wake-up state of its driver task.
pub struct ShardRouter {
    router: RefCell<Router>,
    efd: Ready<OwnedFd>,
    efd_handle: EventFd,
    bell: Arc<Bell>,
    kicked: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    /// Connection tasks that stopped reading while a ring was full.
    paused: RefCell<Vec<Waker>>,
    /// The node's metadata.
    pub meta: Arc<EmbeddedMeta>,
    health: Arc<Health>,
    notices: Option<crate::push::NoticeSender>,
    store_opts: ShardOptions,
    recovery_retry_ms: u64,
    reclaimer: Arc<starling_storage::log::Reclaimer>,
    /// While the shard's log is failed: its recovery in place, running on another thread.
    recovering: RefCell<Option<Recovery>>,
}

/// A failed log's recovery in place, seen from the shard: where the reopened store arrives,
/// and the flag that stops the attempts when the shard goes away.
struct Recovery {
    rx: std::sync::mpsc::Receiver<EmbeddedShard>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ShardRouter {
    fn drop(&mut self) {
        if let Some(r) = self.recovering.get_mut() {
            r.stop.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

impl std::fmt::Debug for ShardRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRouter").finish_non_exhaustive()
    }
}

impl ShardRouter {
    /// Builds the router on the shard thread.
    pub fn new(parts: RouterParts) -> std::io::Result<Self> {
        let index = parts.store.index().clone();
        let bell = parts.links.bell().clone();
        let mut router = RouterShard::new(
            parts.cfg,
            parts.links,
            parts.store,
            index,
            parts.meta.clone(),
        );
        router.set_meta_offload(meta_writer(bell.clone(), parts.io_cpus.clone())?);
        router.set_read_offload(readers(bell.clone(), parts.io_cpus.clone())?);
        if parts.notices.is_some() {
            router.enable_notices();
        }
        let dup = parts.efd.0.try_clone()?;
        Ok(Self {
            router: RefCell::new(router),
            efd: Ready::new(dup)?,
            efd_handle: parts.efd,
            bell,
            kicked: Cell::new(false),
            waker: RefCell::new(None),
            paused: RefCell::new(Vec::new()),
            meta: parts.meta,
            health: parts.health,
            notices: parts.notices,
            store_opts: parts.store_opts,
            recovery_retry_ms: parts.recovery_retry_ms,
            reclaimer: parts.reclaimer,
            recovering: RefCell::new(None),
        })
    }

    /// Runs `f` on the router (never across an await), then wakes the
    /// driver so that the router's output is delivered.
    pub fn with<T>(&self, f: impl FnOnce(&mut Router, u64) -> T) -> T {
        self.with_at(clock::unix_ms(), f)
    }

    /// [`ShardRouter::with`] at a time the caller has read (once for many frames).
    pub fn with_at<T>(&self, now_ms: u64, f: impl FnOnce(&mut Router, u64) -> T) -> T {
        let out = f(&mut self.router.borrow_mut(), now_ms);
        self.kick();
        out
    }

    /// Wakes the driver task.
    pub fn kick(&self) {
        self.kicked.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Whether the sockets are to be left unread: a ring to another shard is
    /// full (then `waker` is woken once it clears), or a storage fault stops
    /// the server (then the connection waits for its `Goodbye`; see
    /// [`crate::health`]).
    pub fn pause_reading(&self, waker: &Waker) -> bool {
        if self.health.faulted() {
            return true;
        }
        if !self.router.borrow().is_backpressured() {
            return false;
        }
        let mut paused = self.paused.borrow_mut();
        if !paused.iter().any(|w| w.will_wake(waker)) {
            paused.push(waker.clone());
        }
        true
    }
}

/// The shard's router driver: rings, log progress, timers, output.
pub async fn drive(shard: Rc<Shard>, r: Rc<ShardRouter>) {
    let mut failed = false;
    loop {
        r.bell.begin_drain();
        let now = clock::unix_ms();
        let timeout = {
            let mut rs = r.router.borrow_mut();
            rs.handle_rings(now);
            rs.handle_log_progress(now);
            if rs.poll_timeout().is_some_and(|t| t <= now) {
                rs.handle_tick(now);
            }
            let now_us = clock::mono_us();
            while let Some(t) = rs.poll_transmit() {
                shard.push_outbound(ConnId(t.conn.0), t, now_us);
            }
            if let Some(tx) = &r.notices {
                while let Some(n) = rs.poll_notice() {
                    tx.send(n);
                }
            }
            while let Some(c) = rs.poll_close() {
                tracing::info!(conn = c.conn.0, code = ?c.code, message = %c.message, "router closes connection");
                shard.kill_conn(ConnId(c.conn.0), Kill::Router(c.code));
            }
            recover_log(&shard, &r, &mut rs);
            // The index is applied on the log's thread; an uncontended lock per turn.
            if !failed && rs.log().index().failed() {
                failed = true;
                r.health.fault(
                    Some(shard.index),
                    &format!(
                        "shard {}: its message index stopped applying the log (a restart \
                         rebuilds it)",
                        shard.index
                    ),
                );
            }
            shard
                .metrics()
                .router
                .mirror(&rs.stats(), rs.loaded_conversations());
            let timeout = rs.poll_timeout();
            if rs.is_backpressured() {
                // Ring space frees without a wake-up here: look again soon.
                Some(timeout.map_or(now + 1, |t| t.min(now + 1)))
            } else {
                for w in r.paused.borrow_mut().drain(..) {
                    w.wake();
                }
                timeout
            }
        };
        let sleep_ms = timeout.map(|t| t.saturating_sub(clock::unix_ms()));
        if !r.bell.try_park() || sleep_ms == Some(0) {
            // More to do at once: let this shard's connection tasks run first.
            yield_now().await;
            continue;
        }
        let sleep = async {
            match sleep_ms {
                Some(ms) => runtime::sleep_ms(ms).await,
                None => std::future::pending::<()>().await,
            }
        };
        let mut sleep = pin!(sleep);
        poll_fn(|cx| {
            if r.kicked.replace(false) {
                return Poll::Ready(());
            }
            *r.waker.borrow_mut() = Some(cx.waker().clone());
            // No eventfd read before waiting: every producer (rings, log, metadata writer) goes
            // through the bell, which rang it only if it saw this park. A count left from a ring
            // that raced a kick makes the poll below ready at once.
            match r.efd.poll_readable(cx) {
                Poll::Ready(_) => {
                    r.efd_handle.drain();
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
    }
}

/// A failed log's recovery in place (see [`crate::health`]), one step per driver turn: at the
/// failure, the shard is marked failed and its log handed to a recovery thread; once that
/// thread has reopened it, the shard takes the new log and index and is marked recovered.
fn recover_log(shard: &Shard, r: &ShardRouter, rs: &mut Router) {
    let i = shard.index;
    let mut recovering = r.recovering.borrow_mut();
    if let Some(rec) = recovering.as_ref() {
        let Ok(store) = rec.rx.try_recv() else {
            return;
        };
        let index = store.index().clone();
        let old = rs.storage_recovered(store, index.clone());
        // The old log was detached: dropping it stops nothing and writes nothing.
        drop(old);
        shard.shared.metrics.set_index(i, index.clone());
        r.reclaimer.resume(index);
        *recovering = None;
        r.health.shard_recovered(i);
        return;
    }
    let Some(f) = rs.failure().map(str::to_owned) else {
        return;
    };
    r.health.shard_failed(i, &format!("shard {i}: {f}"));
    // No segment removal while the log is reopened (the reopened shard brings its own index).
    r.reclaimer.pause();
    let Some(failed) = rs.log_mut().detach_failed() else {
        // The sequencer failed on an error the log itself does not hold (it refused a batch
        // as closed): nothing to reopen in place.
        r.health.fault(
            Some(i),
            &format!("shard {i}: {f} (the log cannot be reopened in place)"),
        );
        return;
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    match spawn_recovery(
        i,
        failed,
        r.store_opts.clone(),
        r.recovery_retry_ms,
        r.bell.clone(),
        stop.clone(),
        tx,
    ) {
        Ok(()) => *recovering = Some(Recovery { rx, stop }),
        Err(e) => r.health.fault(
            Some(i),
            &format!("shard {i}: {f}; cannot start its recovery: {e}"),
        ),
    }
}

/// Tries to reopen `failed` every `retry_ms` (first after one period) until it succeeds, then
/// sends the new store and rings the shard's bell. Stops early once `stop` is set. A reopen
/// that fails (the disk is still full, the filesystem still read-only) is logged at the first
/// attempt and then once a minute.
fn spawn_recovery(
    i: usize,
    mut failed: FailedShard,
    opts: ShardOptions,
    retry_ms: u64,
    bell: Arc<Bell>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tx: std::sync::mpsc::Sender<EmbeddedShard>,
) -> std::io::Result<()> {
    let every = clock::ms(retry_ms);
    let quiet = (60_000 / retry_ms.max(1)).max(1);
    std::thread::Builder::new()
        .name(format!("starling-recover-{i}"))
        .spawn(move || {
            tracing::warn!(
                shard = i,
                durable_lsn = failed.durable_lsn().0,
                error = %failed.error(),
                "the shard's log failed: reopening it in place once the fault clears"
            );
            let mut attempts = 0u64;
            loop {
                std::thread::sleep(every);
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                attempts += 1;
                let started = clock::mono_ms();
                match failed.reopen(opts.clone()) {
                    Ok((store, cut)) => {
                        tracing::warn!(
                            shard = i,
                            attempts,
                            durable_lsn = failed.durable_lsn().0,
                            zeroed_bytes = cut.zeroed_bytes,
                            removed_segments = cut.removed_segments,
                            replayed_records = store.open_report().replayed_records,
                            ms = clock::mono_ms().saturating_sub(started),
                            "the shard's log was reopened in place"
                        );
                        if tx.send(store).is_ok() {
                            bell.notify();
                        }
                        return;
                    }
                    Err(e) => {
                        if attempts == 1 || attempts.is_multiple_of(quiet) {
                            tracing::warn!(shard = i, attempts, error = %e, "the shard's log cannot be reopened yet");
                        }
                    }
                }
            }
        })?;
    Ok(())
}

/// The thread that runs the router's metadata writes (cursor batches, Block/Unblock, new
/// direct conversations: each a redb commit with fsync), one at a time in the order the router
/// handed them over, so the shard thread never waits on the disk for them; each finished job
/// notifies the shard's bell. It runs on `io_cpus` (the log writers' CPUs) if there are any:
/// started from the shard thread, it would otherwise inherit the shard's CPU. It exits when the
/// router (the only sender) is dropped. The queue needs no bound of its own: the router bounds
/// the jobs it hands over (`ShardConfig::meta_jobs_max`, one cursor batch at a time).
fn meta_writer(
    bell: Arc<Bell>,
    io_cpus: Arc<[usize]>,
) -> std::io::Result<starling_router::Offload> {
    let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let writer_bell = bell.clone();
    std::thread::Builder::new()
        .name("starling-meta".into())
        .spawn(move || {
            if !io_cpus.is_empty()
                && let Err(e) = crate::cpus::pin_current_thread(&io_cpus)
            {
                tracing::warn!(error = %e, "cannot place the metadata writer thread");
            }
            for job in rx {
                job();
                writer_bell.notify();
            }
        })?;
    Ok(hand_over(tx, bell, "the metadata writer thread is gone"))
}

/// The offload that hands a job to `tx`'s threads; if they are gone, the job is dropped unrun
/// (which records a failure for its requests) and the shard woken for it.
fn hand_over(
    tx: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
    bell: Arc<Bell>,
    gone: &'static str,
) -> starling_router::Offload {
    Box::new(move |job| {
        if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
            tracing::error!("{gone}");
            drop(job);
            bell.notify();
        }
    })
}

/// Threads reading storage for one shard ([`readers`]): a read that misses the page cache
/// waits on the disk on one of them while the other goes on with the next.
const READ_THREADS_PER_SHARD: usize = 2;

/// The threads that run the router's storage reads (conversation states, pages of entries,
/// dedup lookups, users' conversation lists: `docs/design/reads.md`), so the shard thread never
/// waits on the disk or on a lock the log or index threads hold; each finished read notifies
/// the shard's bell. Reads finish in any order. Like the metadata writer they run on `io_cpus`
/// if there are any, and exit when the router (the only sender) is dropped. The router bounds
/// what it hands over by what its parked messages wait for.
fn readers(bell: Arc<Bell>, io_cpus: Arc<[usize]>) -> std::io::Result<starling_router::Offload> {
    let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for _ in 0..READ_THREADS_PER_SHARD {
        let (rx, bell, io_cpus) = (rx.clone(), bell.clone(), io_cpus.clone());
        std::thread::Builder::new()
            .name("starling-read".into())
            .spawn(move || {
                if !io_cpus.is_empty()
                    && let Err(e) = crate::cpus::pin_current_thread(&io_cpus)
                {
                    tracing::warn!(error = %e, "cannot place a storage read thread");
                }
                loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else {
                        return;
                    };
                    job();
                    bell.notify();
                }
            })?;
    }
    Ok(hand_over(tx, bell, "the storage read threads are gone"))
}

/// The router's id for a gateway connection.
#[must_use]
pub fn router_conn(id: ConnId) -> RouterConnId {
    RouterConnId(id.0)
}

/// Lets the runtime's other ready tasks run once.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}
