//! The runtime seam: everything the gateway needs from its async runtime
//! (compio) goes through here, so the runtime can be swapped by rewriting
//! this one module.
//!
//! Sockets are plain non-blocking `std` sockets; the runtime only tells us
//! when they are ready ([`Ready`]). Reads then go into a per-shard scratch
//! buffer, so an idle connection holds no read buffer and no operation owns
//! a buffer across an await (no "rented" buffers to leak on cancel).

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::task::{Context, Poll};

use compio::driver::{AsyncifyPool, DriverType, ProactorBuilder};

use crate::config::DriverChoice;

/// The driver a shard actually got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring.
    IoUring,
    /// epoll (compio's polling driver).
    Epoll,
}

impl DriverKind {
    /// For logs and metrics.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::IoUring => "io-uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// A single-threaded runtime for one shard.
#[derive(Debug)]
pub struct ShardRuntime {
    inner: compio::runtime::Runtime,
    deferred: bool,
}

/// The blocking pool shared by all shards (bounded thread count).
#[derive(Debug, Clone)]
pub struct BlockingPool(AsyncifyPool);

impl BlockingPool {
    /// A pool of at most `threads` threads.
    #[must_use]
    pub fn new(threads: usize) -> Self {
        let mut b = ProactorBuilder::new();
        b.thread_pool_limit(threads);
        Self(b.create_or_get_thread_pool())
    }
}

impl ShardRuntime {
    /// Builds a runtime with the chosen driver, pinned to `cpu` if given.
    /// `Auto` falls back to epoll when io_uring is unavailable.
    ///
    /// An io_uring ring is set up with `SINGLE_ISSUER | DEFER_TASKRUN |
    /// TASKRUN_FLAG` (Linux 6.1+; without them on older kernels): its
    /// completions are processed when the shard asks for them instead of
    /// interrupting it with an IPI as each arrives. Only the shard thread
    /// that builds the runtime ever submits to it (the blocking pool wakes
    /// it through an eventfd). `TASKRUN_FLAG` is not optional: it is how the
    /// ring tells compio's non-waiting submits that deferred completions are
    /// pending; without it a Sync reply to a full socket could wait forever.
    /// Fewer interrupts save both the server's and the load generator's CPU
    /// (docs/design/performance-decisions.md, "io_uring rings").
    ///
    /// Must be called on the thread that will run it.
    pub fn build(
        choice: DriverChoice,
        cpu: Option<usize>,
        pool: &BlockingPool,
    ) -> io::Result<Self> {
        if choice != DriverChoice::Epoll
            && let Ok(rt) = Self::build_with(choice, cpu, pool, true)
            && rt.driver() == DriverKind::IoUring
        {
            return Ok(rt);
        }
        // epoll asked for, or the kernel refused the flags (compio's `Auto`
        // then fell back to epoll): io_uring without them, or epoll.
        Self::build_with(choice, cpu, pool, false)
    }

    fn build_with(
        choice: DriverChoice,
        cpu: Option<usize>,
        pool: &BlockingPool,
        deferred: bool,
    ) -> io::Result<Self> {
        let mut proactor = ProactorBuilder::new();
        proactor.reuse_thread_pool(pool.0.clone());
        if deferred {
            proactor
                .single_issuer(true)
                .defer_taskrun(true)
                .taskrun_flag(true);
        }
        match choice {
            DriverChoice::Auto => {}
            DriverChoice::IoUring => {
                proactor.driver_type(DriverType::IoUring);
            }
            DriverChoice::Epoll => {
                proactor.driver_type(DriverType::Poll);
            }
        }
        let mut builder = compio::runtime::RuntimeBuilder::new();
        builder.with_proactor(proactor);
        if let Some(cpu) = cpu {
            builder.thread_affinity(std::iter::once(cpu).collect());
        }
        let inner = builder.build()?;
        let deferred = deferred && inner.driver_type() == DriverType::IoUring;
        Ok(Self { inner, deferred })
    }

    /// Whether io_uring task work is deferred to the shard's own waits
    /// (`DEFER_TASKRUN`).
    #[must_use]
    pub fn deferred_taskrun(&self) -> bool {
        self.deferred
    }

    /// The driver in use.
    #[must_use]
    pub fn driver(&self) -> DriverKind {
        match self.inner.driver_type() {
            DriverType::IoUring => DriverKind::IoUring,
            _ => DriverKind::Epoll,
        }
    }

    /// Runs `fut` to completion on this thread.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.inner.block_on(fut)
    }
}

/// Spawns a task on the current shard; it runs detached.
pub fn spawn<F: Future<Output = ()> + 'static>(fut: F) {
    compio::runtime::spawn(fut).detach();
}

/// Runs `f` on the bounded blocking pool. `None` if the work panicked.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    compio::runtime::spawn_blocking(f).await.ok()
}

/// Sleeps on the shard's runtime.
pub async fn sleep_ms(ms: u64) {
    compio::time::sleep(crate::clock::ms(ms)).await;
}

/// Readiness notifications for a non-blocking socket.
#[derive(Debug)]
pub struct Ready<T: AsFd + 'static>(compio::runtime::fd::PollFd<T>);

impl<T: AsFd + 'static> Ready<T> {
    /// Wraps a socket that is already in non-blocking mode.
    pub fn new(socket: T) -> io::Result<Self> {
        Ok(Self(compio::runtime::fd::PollFd::new(socket)?))
    }

    /// The socket.
    #[must_use]
    pub fn get(&self) -> &T {
        &self.0
    }

    /// Polls for read (or accept) readiness.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_read_ready(cx)
    }

    /// Polls for write readiness.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_write_ready(cx)
    }
}
