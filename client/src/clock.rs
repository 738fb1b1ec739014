//! The one place the SDK reads the wall clock. Monotonic time comes from
//! `tokio::time::Instant`, which tests can pause.

/// Milliseconds since the Unix epoch (UTC); 0 if the clock is before 1970.
#[allow(
    clippy::disallowed_methods,
    reason = "the SDK is I/O glue, not sans-IO: token expiry needs the wall clock, read only here"
)]
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
