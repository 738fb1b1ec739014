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
