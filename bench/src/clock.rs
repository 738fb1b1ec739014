//! The one place the benchmark reads the wall clock.

use std::time::{Duration, Instant};

/// Measures elapsed wall-clock time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts measuring now.
    #[allow(
        clippy::disallowed_methods,
        reason = "benchmarks measure wall-clock time by design"
    )]
    pub(crate) fn start() -> Self {
        Self(Instant::now())
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
