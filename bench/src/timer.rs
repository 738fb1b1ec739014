//! A precise timer for one worker's `LocalSet`.
//!
//! tokio's timer has a 1 ms resolution, which is the same order as the
//! latencies `messages` measures. This one arms a Linux `timerfd`
//! (`CLOCK_MONOTONIC`, absolute) at the earliest pending deadline; the fd is
//! registered with tokio's reactor (`AsyncFd`), and a driver task wakes every
//! sleeper whose deadline has passed, earliest first, then re-arms. Deadlines
//! are nanoseconds since an epoch `Instant` — the same clock as
//! `messages::Rec::now_ns` — and a sleep never completes before its deadline
//! on that clock.
//!
//! Single-threaded by design (`Rc`, `RefCell`): one timer per worker runtime.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tokio::io::unix::AsyncFd;

use crate::clock;

/// Not armed (a one-shot timerfd that has fired is not armed either).
const DISARMED: u64 = u64::MAX;

/// The timer of one single-threaded runtime. Create it with [`Timer::start`]
/// inside a `LocalSet`.
#[derive(Debug)]
pub(crate) struct Timer {
    fd: AsyncFd<OwnedFd>,
    epoch: Instant,
    /// `CLOCK_MONOTONIC` at `epoch`, in ns.
    epoch_mono_ns: u64,
    /// Pending sleeps by (deadline ns since `epoch`, id).
    sleepers: RefCell<BTreeMap<(u64, u64), Waker>>,
    next_id: Cell<u64>,
    /// The deadline (ns since `epoch`) the timerfd is armed at, or [`DISARMED`].
    armed_ns: Cell<u64>,
}

impl Timer {
    /// Creates the timer and spawns its driver task on the current `LocalSet`.
    pub(crate) fn start(epoch: Instant) -> io::Result<Rc<Self>> {
        // SAFETY: timerfd_create(2) with valid flags; the fd is owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an `OwnedFd` is open for as long as it lives and always
        // returns the same descriptor, and the `AsyncFd` owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        let timer = Rc::new(Self {
            fd,
            epoch,
            epoch_mono_ns: clock::monotonic_ns_of(epoch),
            sleepers: RefCell::default(),
            next_id: Cell::new(0),
            armed_ns: Cell::new(DISARMED),
        });
        tokio::task::spawn_local(timer.clone().drive());
        Ok(timer)
    }

    /// Nanoseconds since the epoch.
    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Completes once `now_ns() >= deadline_ns`.
    pub(crate) fn sleep_until_ns(&self, deadline_ns: u64) -> Sleep<'_> {
        Sleep {
            timer: self,
            deadline_ns,
            key: None,
        }
    }

    /// Waits for the timerfd to fire, wakes what is due, re-arms.
    async fn drive(self: Rc<Self>) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return;
            };
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes into a valid u64 from our own timerfd.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    std::ptr::from_mut(&mut expirations).cast::<libc::c_void>(),
                    8,
                )
            };
            // Either consumed (not readable again until it is re-armed and
            // fires) or EAGAIN (spurious readiness): wait for the next edge.
            guard.clear_ready();
            if n == 8 {
                self.armed_ns.set(DISARMED);
            }
            self.fire();
        }
    }

    /// Wakes every sleeper that is due, earliest first, and arms the timerfd
    /// at the next deadline.
    fn fire(&self) {
        let now = self.now_ns();
        let due = {
            let mut s = self.sleepers.borrow_mut();
            let later = s.split_off(&(now.saturating_add(1), 0));
            std::mem::replace(&mut *s, later)
        };
        for w in due.into_values() {
            w.wake();
        }
        let next = self.sleepers.borrow().keys().next().map(|&(t, _)| t);
        if let Some(t) = next {
            self.arm(t);
        }
    }

    /// Arms the timerfd at `deadline_ns` (since the epoch), absolutely.
    fn arm(&self, deadline_ns: u64) {
        let abs = self.epoch_mono_ns.saturating_add(deadline_ns);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (abs / 1_000_000_000) as libc::time_t,
                tv_nsec: (abs % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: our own timerfd, a valid itimerspec, no old value wanted.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(
            rc,
            0,
            "timerfd_settime failed: {}",
            io::Error::last_os_error()
        );
        self.armed_ns.set(deadline_ns);
    }
}

/// The future of [`Timer::sleep_until_ns`]. Dropping it cancels the sleep.
#[derive(Debug)]
pub(crate) struct Sleep<'a> {
    timer: &'a Timer,
    deadline_ns: u64,
    /// Its entry in `sleepers`, once registered.
    key: Option<(u64, u64)>,
}

impl Future for Sleep<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let t = self.timer;
        if t.now_ns() >= self.deadline_ns {
            if let Some(k) = self.key.take() {
                t.sleepers.borrow_mut().remove(&k);
            }
            return Poll::Ready(());
        }
        let mut s = t.sleepers.borrow_mut();
        if let Some(k) = self.key
            && let Some(w) = s.get_mut(&k)
        {
            w.clone_from(cx.waker());
            return Poll::Pending;
        }
        // Not registered yet (or already woken by the driver, too early on
        // this clock by a few ns): register again.
        let id = t.next_id.get();
        t.next_id.set(id + 1);
        let k = (self.deadline_ns, id);
        s.insert(k, cx.waker().clone());
        drop(s);
        self.key = Some(k);
        if self.deadline_ns < t.armed_ns.get() {
            t.arm(self.deadline_ns);
        }
        Poll::Pending
    }
}

impl Drop for Sleep<'_> {
    fn drop(&mut self) {
        // The timerfd stays armed; if this was the earliest sleeper the driver
        // wakes nobody and re-arms for the next.
        if let Some(k) = self.key.take() {
            self.timer.sleepers.borrow_mut().remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_local<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, f)
    }

    #[test]
    fn a_200_us_sleep_wakes_after_200_us_and_well_before_tokios_1_ms() {
        on_local(async {
            let timer = Timer::start(clock::now()).unwrap();
            let mut late_us = Vec::new();
            for _ in 0..50 {
                let t0 = timer.now_ns();
                let deadline = t0 + 200_000;
                timer.sleep_until_ns(deadline).await;
                let now = timer.now_ns();
                assert!(now >= deadline, "woke {} ns early", deadline - now);
                late_us.push((now - deadline) / 1000);
            }
            late_us.sort_unstable();
            // The median well under tokio's 1 ms granularity. The worst wake
            // is the machine's (a descheduled test thread on a loaded host was
            // seen 40 ms late), so it is only bounded as a liveness check: every
            // sleeper is woken by the timer itself, not by some later event.
            let (median, max) = (late_us[late_us.len() / 2], late_us[late_us.len() - 1]);
            assert!(median < 500, "median lateness {median} µs: {late_us:?}");
            assert!(max < 1_000_000, "max lateness {max} µs: {late_us:?}");
        });
    }

    #[test]
    fn concurrent_sleepers_wake_in_deadline_order() {
        on_local(async {
            let timer = Timer::start(clock::now()).unwrap();
            let base = timer.now_ns() + 50_000_000;
            let woke = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            // 300 sleepers registered out of order, two at each of 150
            // deadlines 10 µs apart; and 100 more that are cancelled.
            for i in 0..300u64 {
                let deadline = base + (i * 7919 % 150) * 10_000;
                let (timer, woke) = (timer.clone(), woke.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    timer.sleep_until_ns(deadline).await;
                    let now = timer.now_ns();
                    woke.borrow_mut().push((deadline, now));
                }));
            }
            let mut cancelled = Vec::new();
            for i in 0..100u64 {
                let timer = timer.clone();
                cancelled.push(tokio::task::spawn_local(async move {
                    timer.sleep_until_ns(base + i * 10_000).await;
                    panic!("a cancelled sleep woke");
                }));
            }
            // Let every task register its sleep (the LocalSet polls a
            // bounded number per turn), then cancel 100 of them.
            for _ in 0..100 {
                if timer.sleepers.borrow().len() == 400 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(timer.sleepers.borrow().len(), 400);
            for t in &cancelled {
                t.abort();
            }
            for t in cancelled {
                assert!(t.await.unwrap_err().is_cancelled());
            }
            assert_eq!(timer.sleepers.borrow().len(), 300);
            for t in tasks {
                t.await.unwrap();
            }
            let woke = woke.borrow();
            assert_eq!(woke.len(), 300);
            for w in woke.windows(2) {
                assert!(w[0].0 <= w[1].0, "woke out of order: {w:?}");
            }
            for &(deadline, now) in woke.iter() {
                assert!(now >= deadline);
            }
            assert!(timer.sleepers.borrow().is_empty());
        });
    }
}
