//! The one place the benchmark reads the wall clock.

use std::time::{Duration, Instant};

/// Measures elapsed wall-clock time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts measuring now.
    pub(crate) fn start() -> Self {
        Self(now())
    }

    /// Time since `start`.
    pub(crate) fn elapsed(self) -> Duration {
        self.0.elapsed()
    }

    /// Time since `start`, in seconds.
    pub(crate) fn elapsed_secs(self) -> f64 {
        self.elapsed().as_secs_f64()
    }
}

/// The monotonic clock, now.
#[allow(
    clippy::disallowed_methods,
    reason = "benchmarks measure wall-clock time by design"
)]
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// `CLOCK_MONOTONIC`, now, in ns (what a `timerfd` is armed against).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) with a valid clock id and out-pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `CLOCK_MONOTONIC` reading, in ns, at instant `t`. (On Linux `Instant`
/// is `CLOCK_MONOTONIC`; this maps through the elapsed time, so it needs only
/// that both clocks run at the same rate.) `Instant` is read first and the
/// raw clock second, so the result is late by the few tens of ns between the
/// two reads, never early: a timer armed from it never fires before `t`.
/// The smallest of a few tries, in case a read was preempted.
pub(crate) fn monotonic_ns_of(t: Instant) -> u64 {
    (0..5)
        .map(|_| {
            let i = now();
            let m = monotonic_ns();
            m.saturating_sub(i.saturating_duration_since(t).as_nanos() as u64)
        })
        .min()
        .unwrap_or_else(monotonic_ns)
}

/// Seconds since the Unix epoch (for report timestamps).
#[allow(
    clippy::disallowed_methods,
    reason = "reports carry the date they were taken"
)]
pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
