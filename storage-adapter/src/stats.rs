//! Lock-free latency histograms and the log's operating counters, for the metrics endpoint.
//!
//! Recording is a handful of relaxed atomic adds, cheap enough for a per-message path; reading
//! (a scrape) takes a snapshot that may be a few counts out of step with itself, which a
//! monitoring system tolerates. Nothing here reads a clock: callers pass durations in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in µs (the last bucket, `+Inf`, is implicit). Chosen for a
/// chat server's ack path: fsync takes 0.1–1 ms on a good disk, a target p99 is ~1.5 ms, and
/// anything over a second is an outage.
pub const BUCKET_BOUNDS_US: [u64; 15] = [
    25, 50, 100, 250, 500, 1_000, 1_500, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// A histogram of durations with fixed buckets ([`BUCKET_BOUNDS_US`]), shared between the
/// thread that records and the thread that renders.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BUCKET_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A point-in-time copy of a [`LatencyHistogram`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Cumulative counts: `cumulative[i]` observations took at most `BUCKET_BOUNDS_US[i]` µs;
    /// the last element counts every observation (`+Inf`).
    pub cumulative: Vec<u64>,
    /// Sum of all observations, µs.
    pub sum_us: u64,
    /// Observations.
    pub count: u64,
}

impl LatencyHistogram {
    /// Records one observation of `us` microseconds.
    pub fn record_us(&self, us: u64) {
        self.record_us_n(us, 1);
    }

    /// Records `n` observations of `us` microseconds each (e.g. every message of a batch that
    /// waited the same time).
    pub fn record_us_n(&self, us: u64, n: u64) {
        if n == 0 {
            return;
        }
        let i = BUCKET_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_us
            .fetch_add(us.saturating_mul(n), Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one observation.
    pub fn record(&self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// A copy for rendering.
    #[must_use]
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0u64;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// What the log's I/O thread has done, for operators: group commits, what they carried, and how
/// long each one's write and `fdatasync` took.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Group commits that ended in an `fdatasync`.
    pub syncs: AtomicU64,
    /// Records (append batches) made durable.
    pub records: AtomicU64,
    /// Record bytes written.
    pub bytes: AtomicU64,
    /// Write plus `fdatasync` of one group commit.
    pub commit: LatencyHistogram,
    /// One segment switch: waiting for the spare segment, its rename into place and the
    /// directory `fsync`. No commit of the shard completes meanwhile; a spare maker that falls
    /// behind the writer shows here. The first switch, at open, waits for the first spare to be
    /// made (tens of milliseconds), before anything is served.
    pub segment_switch: LatencyHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = LatencyHistogram::default();
        h.record_us(0);
        h.record_us(25); // on the bound: first bucket
        h.record_us(26);
        h.record_us_n(1_200, 3);
        h.record_us(5_000_000); // over every bound: +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 7);
        assert_eq!(s.sum_us, 25 + 26 + 3_600 + 5_000_000);
        assert_eq!(s.cumulative.len(), BUCKET_BOUNDS_US.len() + 1);
        assert_eq!(s.cumulative[0], 2);
        assert_eq!(s.cumulative[1], 3);
        // 1,200 µs lands in the ≤ 1,500 µs bucket.
        let i1500 = BUCKET_BOUNDS_US.iter().position(|&b| b == 1_500).unwrap();
        assert_eq!(s.cumulative[i1500 - 1], 3);
        assert_eq!(s.cumulative[i1500], 6);
        assert_eq!(s.cumulative[BUCKET_BOUNDS_US.len() - 1], 6);
        assert_eq!(*s.cumulative.last().unwrap(), 7);
        assert!(s.cumulative.windows(2).all(|w| w[0] <= w[1]));
    }
}
