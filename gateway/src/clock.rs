//! The only place in the gateway that reads the clock. Everything else takes
//! `now` as an argument, so time-dependent logic stays testable.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (UTC), for timestamps on the wire and
/// expiries in the store.
#[must_use]
#[allow(
    clippy::disallowed_methods,
    reason = "the gateway's single wall-clock read; callers pass the value down"
)]
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Monotonic milliseconds since the process started, for deadlines and the
/// timer wheel (never goes backwards, unaffected by clock steps).
#[must_use]
#[allow(
    clippy::disallowed_methods,
    reason = "the gateway's single monotonic clock read; callers pass the value down"
)]
pub fn mono_ms() -> u64 {
    u64::try_from(Instant::now().duration_since(start()).as_millis()).unwrap_or(u64::MAX)
}

/// Monotonic microseconds since the process started, for latency histograms.
#[must_use]
#[allow(
    clippy::disallowed_methods,
    reason = "the gateway's single monotonic clock read; callers pass the value down"
)]
pub fn mono_us() -> u64 {
    u64::try_from(Instant::now().duration_since(start()).as_micros()).unwrap_or(u64::MAX)
}

#[allow(
    clippy::disallowed_methods,
    reason = "the origin of the gateway's monotonic clock"
)]
fn start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// `ms` as a [`Duration`].
#[must_use]
pub fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}
