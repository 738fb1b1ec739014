//! Runtime-agnostic completions: the I/O thread advances two watermarks (written, durable) and
//! wakes whoever waits — a `Future` polled by any executor, a blocking `wait`, or a wake callback
//! (e.g. one that writes an eventfd the shard's event loop polls).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::error::LogError;
use crate::types::{Durability, Level, Lsn};

/// A callback run by the I/O thread after every completed group commit. Keep it tiny (write an
/// eventfd, push to a queue): it runs on the I/O thread.
pub type WakeFn = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct WaitState {
    written: Lsn,
    durable: Lsn,
    failed: Option<Arc<LogError>>,
    wakers: Vec<(Lsn, Durability, Waker)>,
}

/// The watermarks one log's waiters share with its I/O thread.
pub(crate) struct Watermarks {
    state: Mutex<WaitState>,
    cond: Condvar,
    wake: Option<WakeFn>,
    pub(crate) inflight_bytes: AtomicU64,
}

impl fmt::Debug for Watermarks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("Watermarks")
            .field("written", &s.written)
            .field("durable", &s.durable)
            .field("failed", &s.failed)
            .finish_non_exhaustive()
    }
}

impl Watermarks {
    pub(crate) fn new(recovered: Lsn, wake: Option<WakeFn>) -> Watermarks {
        Watermarks {
            state: Mutex::new(WaitState {
                written: recovered,
                durable: recovered,
                ..WaitState::default()
            }),
            cond: Condvar::new(),
            wake,
            inflight_bytes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WaitState> {
        // A panic while holding this lock is a bug elsewhere; the state itself stays consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the I/O thread after a group is written (and synced when `durable`).
    pub(crate) fn advance(&self, written: Lsn, durable: Option<Lsn>) {
        let mut wake = Vec::new();
        {
            let mut s = self.lock();
            debug_assert!(written >= s.written);
            s.written = written;
            if let Some(d) = durable {
                debug_assert!(d >= s.durable && d <= written);
                s.durable = d;
            }
            let (w, d) = (s.written, s.durable);
            s.wakers.retain(|(lsn, level, waker)| {
                let done = match level {
                    Durability::Buffered => *lsn <= w,
                    Durability::SyncData => *lsn <= d,
                };
                if done {
                    wake.push(waker.clone());
                }
                !done
            });
        }
        self.cond.notify_all();
        for w in wake {
            w.wake();
        }
        if let Some(f) = &self.wake {
            f();
        }
    }

    /// Called by the I/O thread when a write or fsync fails: every waiter fails from now on.
    pub(crate) fn fail(&self, err: LogError) {
        let wakers = {
            let mut s = self.lock();
            if s.failed.is_none() {
                s.failed = Some(Arc::new(err));
            }
            std::mem::take(&mut s.wakers)
        };
        self.cond.notify_all();
        for (_, _, w) in wakers {
            w.wake();
        }
        if let Some(f) = &self.wake {
            f();
        }
    }

    pub(crate) fn failure(&self) -> Option<LogError> {
        self.lock()
            .failed
            .as_ref()
            .map(|e| LogError::Poisoned(e.clone()))
    }

    /// The highest lsn that is durable (fdatasync'ed), or the error that poisoned the log.
    pub(crate) fn durable(&self) -> Result<Lsn, LogError> {
        let s = self.lock();
        match &s.failed {
            Some(e) => Err(LogError::Poisoned(e.clone())),
            None => Ok(s.durable),
        }
    }

    /// The highest lsn made durable, whether or not the log failed since: after a failure,
    /// everything after it was never acknowledged.
    pub(crate) fn durable_mark(&self) -> Lsn {
        self.lock().durable
    }

    /// The highest lsn handed to the OS.
    pub(crate) fn written(&self) -> Lsn {
        self.lock().written
    }

    fn check(s: &WaitState, last: Lsn, level: Durability) -> Option<Result<(), LogError>> {
        let mark = match level {
            Durability::Buffered => s.written,
            Durability::SyncData => s.durable,
        };
        // Order matters: a batch that completed before the failure stays completed.
        if last <= mark {
            return Some(Ok(()));
        }
        s.failed
            .as_ref()
            .map(|e| Err(LogError::Poisoned(e.clone())))
    }
}

/// A proof that lsns `first..=last` reached durability level `L`. Only the log creates one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended<L: Level> {
    first: Lsn,
    last: Lsn,
    _level: PhantomData<L>,
}

impl<L: Level> Appended<L> {
    /// The lsn of the batch's first entry.
    pub fn first_lsn(&self) -> Lsn {
        self.first
    }

    /// The lsn of the batch's last entry.
    pub fn last_lsn(&self) -> Lsn {
        self.last
    }
}

/// The pending completion of one appended batch. Poll it as a `Future` from any executor, or
/// [`Completion::wait`] from a thread that may block, or [`Completion::try_complete`] after a wake
/// callback fired.
#[must_use = "a batch is only acknowledged once its completion resolves"]
pub struct Completion<L: Level> {
    marks: Arc<Watermarks>,
    first: Lsn,
    last: Lsn,
    _level: PhantomData<L>,
}

impl<L: Level> fmt::Debug for Completion<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("first", &self.first)
            .field("last", &self.last)
            .field("level", &L::DURABILITY)
            .finish()
    }
}

impl<L: Level> Completion<L> {
    pub(crate) fn new(marks: Arc<Watermarks>, first: Lsn, last: Lsn) -> Completion<L> {
        Completion {
            marks,
            first,
            last,
            _level: PhantomData,
        }
    }

    /// The lsn of the batch's first entry (assigned at append, before it is durable).
    pub fn first_lsn(&self) -> Lsn {
        self.first
    }

    /// The lsn of the batch's last entry.
    pub fn last_lsn(&self) -> Lsn {
        self.last
    }

    fn done(&self) -> Appended<L> {
        Appended {
            first: self.first,
            last: self.last,
            _level: PhantomData,
        }
    }

    /// Without blocking: `None` while pending, else the outcome.
    pub fn try_complete(&self) -> Option<Result<Appended<L>, LogError>> {
        let s = self.marks.lock();
        Watermarks::check(&s, self.last, L::DURABILITY).map(|r| r.map(|()| self.done()))
    }

    /// Like [`Completion::wait`], but polls `polls` times before sleeping (see
    /// `LogOptions::idle_polls` for why: a sleeping vCPU can be slow to wake).
    pub fn wait_polling(self, polls: u32) -> Result<Appended<L>, LogError> {
        for _ in 0..polls {
            if let Some(r) = self.try_complete() {
                return r;
            }
            std::hint::spin_loop();
        }
        self.wait()
    }

    /// Blocks the calling thread until the batch completes. Not for shard threads.
    pub fn wait(self) -> Result<Appended<L>, LogError> {
        let mut s = self.marks.lock();
        loop {
            if let Some(r) = Watermarks::check(&s, self.last, L::DURABILITY) {
                return r.map(|()| self.done());
            }
            s = self
                .marks
                .cond
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl<L: Level> Future for Completion<L> {
    type Output = Result<Appended<L>, LogError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.marks.lock();
        if let Some(r) = Watermarks::check(&s, self.last, L::DURABILITY) {
            return Poll::Ready(r.map(|()| self.done()));
        }
        let last = self.last;
        if !s
            .wakers
            .iter()
            .any(|(l, _, w)| *l == last && w.will_wake(cx.waker()))
        {
            s.wakers.push((last, L::DURABILITY, cx.waker().clone()));
        }
        Poll::Pending
    }
}

/// The producer side of completions, for backends other than [`crate::SegmentedLog`] (a
/// PostgreSQL log, the router's deterministic simulator): the backend hands out completions and
/// advances the watermarks as its batches become written / durable, or fails them all.
#[derive(Debug, Clone)]
pub struct CompletionSource {
    marks: Arc<Watermarks>,
}

impl CompletionSource {
    /// A source whose lsns through `recovered` are already durable.
    pub fn new(recovered: Lsn, wake: Option<WakeFn>) -> CompletionSource {
        CompletionSource {
            marks: Arc::new(Watermarks::new(recovered, wake)),
        }
    }

    /// The completion of the batch with lsns `first..=last`.
    pub fn completion<L: Level>(&self, first: Lsn, last: Lsn) -> Completion<L> {
        Completion::new(self.marks.clone(), first, last)
    }

    /// Everything through `written` reached the OS; through `durable` (if given) is synced.
    /// Watermarks only move forward.
    pub fn advance(&self, written: Lsn, durable: Option<Lsn>) {
        self.marks.advance(written, durable);
    }

    /// Fails every pending and later completion (the backend is poisoned).
    pub fn fail(&self, err: LogError) {
        self.marks.fail(err);
    }

    /// The durable watermark, or the poisoning error.
    pub fn durable(&self) -> Result<Lsn, LogError> {
        self.marks.durable()
    }
}
