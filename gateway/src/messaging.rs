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
    DenseIndex, EmbeddedMeta, EmbeddedShard, LogOptions, LogThread, ShardOptions,
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
    for ((links, efd), store) in links.into_iter().zip(efds).zip(stores) {
        parts.push(RouterParts {
            store: store?,
            links,
            meta: meta.clone(),
            efd,
            io_cpus: io_for_parts.clone(),
            health: health.clone(),
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
            if !failed && let Some(f) = rs.failure() {
                failed = true;
                r.health
                    .fault(Some(shard.index), &format!("shard {}: {f}", shard.index));
            }
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
    Ok(Box::new(move |job| {
        if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
            tracing::error!("the metadata writer thread is gone");
            // Dropped unrun, the job records a failure for its requests; wake the shard for it.
            drop(job);
            bell.notify();
        }
    }))
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
