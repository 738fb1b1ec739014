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
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll, Waker};

use compio::driver::{AsyncifyPool, DriverType, ProactorBuilder};

use crate::config::{DriverChoice, ThreadPriority};

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

/// The blocking pool shared by all shards (bounded thread count): store
/// reads and transactions, webhooks. CPU-heavy work (password hashing) goes
/// to a [`CpuPool`] of its own, so that it cannot hold these threads while
/// token checks and store work wait.
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

/// A small pool of dedicated threads for CPU-heavy work (Argon2id password
/// hashing), separate from the [`BlockingPool`] and from the shards: a flood
/// of such work occupies only these threads, which run at a lower priority
/// than the shards ([`ThreadPriority`]), and waits in a bounded queue.
///
/// A job is submitted from a shard with [`CpuPool::run`] and its result
/// awaited there ([`CpuJob`]); the pool thread that finishes it wakes the
/// shard's task. A job whose [`CpuJob`] was dropped before it started (its
/// connection went away) is skipped.
#[derive(Debug, Clone)]
pub struct CpuPool {
    tx: mpsc::SyncSender<Box<dyn FnOnce() + Send>>,
}

/// The pool's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the CPU pool's queue is full")]
pub struct PoolFull;

impl CpuPool {
    /// Starts `threads` threads named `name-N` at `priority`, with room for
    /// `queue_max` jobs waiting.
    ///
    /// # Errors
    /// A thread could not be started, or its priority set.
    pub fn new(
        name: &str,
        threads: usize,
        queue_max: usize,
        priority: ThreadPriority,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(queue_max);
        let rx = Arc::new(Mutex::new(rx));
        let (started_tx, started_rx) = mpsc::channel();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let started = started_tx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    let _ = started.send(set_priority(priority));
                    drop(started);
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // every sender is gone
                        }
                    }
                })?;
        }
        drop(started_tx);
        for r in started_rx {
            r?;
        }
        Ok(Self { tx })
    }

    /// Queues `f`; its result is awaited with the returned [`CpuJob`].
    ///
    /// # Errors
    /// [`PoolFull`]: `queue_max` jobs are already waiting.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<CpuJob<T>, PoolFull> {
        let slot = Arc::new(Mutex::new(Slot::Waiting(None)));
        let job_slot = slot.clone();
        let job = Box::new(move || {
            {
                let Ok(mut s) = job_slot.lock() else { return };
                match std::mem::replace(&mut *s, Slot::Abandoned) {
                    // From here on the waiter cannot abandon it: it gets an answer.
                    Slot::Waiting(w) => *s = Slot::Running(w),
                    other => {
                        *s = other;
                        return;
                    }
                }
            }
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
            let waker = match job_slot.lock() {
                Ok(mut s) => match std::mem::replace(&mut *s, Slot::Done(out)) {
                    Slot::Running(w) | Slot::Waiting(w) => w,
                    Slot::Abandoned | Slot::Done(_) => None,
                },
                Err(_) => None,
            };
            if let Some(w) = waker {
                w.wake();
            }
        });
        self.tx.try_send(job).map_err(|_| PoolFull)?;
        Ok(CpuJob { slot })
    }
}

/// Where a job's result goes.
#[derive(Debug)]
enum Slot<T> {
    /// Queued; the waiter's waker, once it has polled.
    Waiting(Option<Waker>),
    /// A pool thread runs it.
    Running(Option<Waker>),
    /// Finished: the result, `None` if the job panicked.
    Done(Option<T>),
    /// The waiter went away before the job started: skip it.
    Abandoned,
}

/// The result of a job on a [`CpuPool`]: `None` if the job panicked.
#[derive(Debug)]
#[must_use = "a job's result is only seen by awaiting it"]
pub struct CpuJob<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

impl<T> Future for CpuJob<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let Ok(mut s) = self.slot.lock() else {
            return Poll::Ready(None);
        };
        match &mut *s {
            Slot::Waiting(w) | Slot::Running(w) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
            Slot::Done(out) => Poll::Ready(out.take()),
            Slot::Abandoned => Poll::Ready(None),
        }
    }
}

impl<T> Drop for CpuJob<T> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slot.lock()
            && matches!(*s, Slot::Waiting(_))
        {
            *s = Slot::Abandoned;
        }
    }
}

/// Sets the calling thread's priority (Linux: both calls act on the calling
/// thread only).
///
/// # Errors
/// The kernel refused it.
pub(crate) fn set_priority(priority: ThreadPriority) -> io::Result<()> {
    let r = match priority {
        ThreadPriority::Normal => return Ok(()),
        // SAFETY: PRIO_PROCESS with who = 0 sets the calling thread's nice value; no memory
        // is passed.
        ThreadPriority::Low => unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) },
        ThreadPriority::Idle => {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread; `param` is a live sched_param the kernel
            // only reads.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) }
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// A waker that counts its wake-ups (the pool wakes from its own thread).
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls `job` until it is ready (the test's single "shard").
    fn wait<T>(mut job: CpuJob<T>) -> (Option<T>, usize) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..10_000 {
            if let Poll::Ready(v) = Pin::new(&mut job).poll(&mut cx) {
                return (v, count.0.load(Ordering::SeqCst));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("job did not finish");
    }

    /// The calling thread's (nice value, scheduling policy).
    fn thread_priority() -> (i32, i32) {
        // SAFETY: both read the calling thread's own scheduling settings.
        unsafe {
            (
                libc::getpriority(libc::PRIO_PROCESS, 0),
                libc::sched_getscheduler(0),
            )
        }
    }

    #[test]
    fn jobs_run_on_low_priority_threads_and_wake_their_waiter() {
        let on_pool = |priority| {
            let pool = CpuPool::new("test-cpu", 1, 4, priority).unwrap();
            let job = pool
                .run(|| {
                    (
                        std::thread::current().name().map(str::to_owned),
                        thread_priority(),
                    )
                })
                .unwrap();
            let (Some(seen), _) = wait(job) else {
                panic!("job failed")
            };
            seen
        };
        let (name, (_, policy)) = on_pool(ThreadPriority::Idle);
        assert_eq!(name.as_deref(), Some("test-cpu-0"));
        assert_eq!(policy, libc::SCHED_IDLE);
        assert_eq!(on_pool(ThreadPriority::Low).1, (19, libc::SCHED_OTHER));
        assert_eq!(on_pool(ThreadPriority::Normal).1, thread_priority());
        let pool = CpuPool::new("test-cpu", 1, 4, ThreadPriority::Idle).unwrap();
        // A panicking job answers None and the thread lives on.
        assert_eq!(wait(pool.run(|| -> u8 { panic!("boom") }).unwrap()).0, None);
        assert_eq!(wait(pool.run(|| 5).unwrap()).0, Some(5));
    }

    #[test]
    fn the_queue_is_bounded_and_abandoned_jobs_are_skipped() {
        let pool = CpuPool::new("test-cpu", 1, 2, ThreadPriority::Normal).unwrap();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let ran = Arc::new(AtomicUsize::new(0));
        // One job holds the only thread until told to go on.
        let blocker = pool
            .run(move || {
                let _ = go_rx.recv();
            })
            .unwrap();
        // Wait until the thread took it, so the queue is empty.
        let deadline = 10_000;
        let mut n = 0;
        while matches!(*blocker.slot.lock().unwrap(), Slot::Waiting(_)) {
            n += 1;
            assert!(n < deadline, "the pool never started the job");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let counted = |ran: &Arc<AtomicUsize>| {
            let ran = ran.clone();
            move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }
        };
        let a = pool.run(counted(&ran)).unwrap();
        let b = pool.run(counted(&ran)).unwrap();
        assert_eq!(pool.run(counted(&ran)).unwrap_err(), PoolFull);
        // `a`'s waiter goes away: it is skipped; `b` runs.
        drop(a);
        go_tx.send(()).unwrap();
        assert_eq!(wait(blocker).0, Some(()));
        assert_eq!(wait(b).0, Some(()));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
