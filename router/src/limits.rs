//! Per-user request rate limits, sans-IO (time is an argument): a token bucket per user, kept
//! where that user's requests of a kind are serialised (for Block/Unblock, the user's home shard,
//! [`crate::ids::home_shard`]), so one user's budget is the same whichever shard their devices
//! are connected to.
//!
//! Tokens are counted in thousandths, so any whole rate per second refills exactly with
//! millisecond timestamps. A user whose bucket is full again is indistinguishable from one never
//! seen, and is forgotten: memory follows the users who made requests within the last
//! `burst / rate_per_s` seconds, which the gateway's connection limits bound.

use starling_storage::UserId;

use crate::hash::HashMap;

/// A thousandth of a token.
const MILLI: u64 = 1000;

/// Per-user (or per-`K`: the typing limit is per connection) token buckets: `burst` requests at
/// once, then `rate_per_s` per second.
#[derive(Debug)]
pub(crate) struct RateLimiter<K = UserId> {
    rate_per_s: u64,
    burst_milli: u64,
    buckets: HashMap<K, Bucket>,
    /// Prune full buckets when the map grows past this (doubles with what survives a prune), so
    /// pruning costs O(1) per request amortised and needs no timer.
    prune_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens left, in thousandths.
    milli: u64,
    /// When `milli` was last brought up to date.
    at_ms: u64,
}

/// Buckets kept before the first prune.
const PRUNE_AT_MIN: usize = 1024;

impl<K: std::hash::Hash + Eq + Copy> RateLimiter<K> {
    /// `burst` requests at once, refilled at `rate_per_s` per second (both at least 1).
    pub(crate) fn new(rate_per_s: u32, burst: u32) -> RateLimiter<K> {
        RateLimiter {
            rate_per_s: u64::from(rate_per_s.max(1)),
            burst_milli: u64::from(burst.max(1)) * MILLI,
            buckets: HashMap::default(),
            prune_at: PRUNE_AT_MIN,
        }
    }

    /// Takes one token of `user`'s at `now_ms`, or says in how many milliseconds one will be
    /// there (never 0).
    pub(crate) fn take(&mut self, user: K, now_ms: u64) -> Result<(), u64> {
        if self.buckets.len() >= self.prune_at {
            self.prune(now_ms);
        }
        let (rate, burst) = (self.rate_per_s, self.burst_milli);
        let b = self.buckets.entry(user).or_insert(Bucket {
            milli: burst,
            at_ms: now_ms,
        });
        refill(b, now_ms, rate, burst);
        if b.milli >= MILLI {
            b.milli -= MILLI;
            Ok(())
        } else {
            // Thousandths of a token come back at `rate` per millisecond.
            Err((MILLI - b.milli).div_ceil(rate).max(1))
        }
    }

    /// Forgets users whose bucket is full again at `now_ms`.
    pub(crate) fn prune(&mut self, now_ms: u64) {
        let (rate, burst) = (self.rate_per_s, self.burst_milli);
        self.buckets.retain(|_, b| {
            refill(b, now_ms, rate, burst);
            b.milli < burst
        });
        self.prune_at = (self.buckets.len() * 2).max(PRUNE_AT_MIN);
    }

    /// Users currently tracked (their bucket is not full).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

fn refill(b: &mut Bucket, now_ms: u64, rate_per_s: u64, burst_milli: u64) {
    // A clock that went backwards refills nothing (and does not move `at_ms` back).
    let elapsed = now_ms.saturating_sub(b.at_ms);
    b.milli = b
        .milli
        .saturating_add(elapsed.saturating_mul(rate_per_s))
        .min(burst_milli);
    b.at_ms = b.at_ms.max(now_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: the limiter only ever sees the times the test passes in.
    struct Clock(u64);

    impl Clock {
        fn advance(&mut self, ms: u64) -> u64 {
            self.0 += ms;
            self.0
        }
    }

    #[test]
    fn a_burst_then_the_rate_with_an_exact_retry_after() {
        let mut clock = Clock(10_000);
        let mut l = RateLimiter::new(4, 3); // a token every 250 ms
        let u = UserId(7);
        for _ in 0..3 {
            assert_eq!(l.take(u, clock.0), Ok(()));
        }
        assert_eq!(l.take(u, clock.0), Err(250));
        assert_eq!(l.take(u, clock.advance(100)), Err(150));
        assert_eq!(l.take(u, clock.advance(149)), Err(1));
        assert_eq!(l.take(u, clock.advance(1)), Ok(()));
        assert_eq!(l.take(u, clock.0), Err(250));
        // Another user has a budget of their own.
        assert_eq!(l.take(UserId(8), clock.0), Ok(()));
        // A long pause refills only up to the burst.
        clock.advance(60_000);
        for _ in 0..3 {
            assert_eq!(l.take(u, clock.0), Ok(()));
        }
        assert_eq!(l.take(u, clock.0), Err(250));
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let mut l = RateLimiter::new(1, 1);
        let u = UserId(1);
        assert_eq!(l.take(u, 5_000), Ok(()));
        assert_eq!(l.take(u, 1_000), Err(1000));
        assert_eq!(l.take(u, 5_999), Err(1));
        assert_eq!(l.take(u, 6_000), Ok(()));
    }

    #[test]
    fn full_buckets_are_forgotten_so_memory_follows_active_users() {
        let mut clock = Clock(0);
        let mut l = RateLimiter::new(10, 2);
        for u in 0..5_000 {
            assert_eq!(l.take(UserId(u), clock.0), Ok(()));
        }
        // Pruned as the map grew, but nobody refilled yet: all still tracked.
        assert_eq!(l.tracked(), 5_000);
        // 100 ms later every bucket is full again: the next prune drops them all.
        l.prune(clock.advance(100));
        assert_eq!(l.tracked(), 0);
        // And a forgotten user starts with a full burst, as a new one does.
        assert_eq!(l.take(UserId(1), clock.0), Ok(()));
        assert_eq!(l.take(UserId(1), clock.0), Ok(()));
        assert!(l.take(UserId(1), clock.0).is_err());
    }
}
