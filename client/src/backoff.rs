//! Reconnect delays: "full jitter" exponential backoff. Attempt `n` waits a
//! uniformly random time in `0 ..= min(cap, base * 2^n)`, which spreads a
//! reconnect storm of many clients evenly instead of in synchronized waves.

use std::time::Duration;

use crate::ids::{SplitMix64, random_seed};

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Upper bound of the first delay.
    pub base: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
        }
    }
}

/// The state of one backoff sequence (one reconnect loop).
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    attempt: u32,
    rng: SplitMix64,
}

/// Doubling stops here: 2^32 times any base above a nanosecond exceeds any
/// sensible cap.
const ATTEMPT_EXPONENT_MAX: u32 = 32;

impl Backoff {
    /// A sequence seeded from the operating system.
    #[must_use]
    pub fn new(cfg: BackoffConfig) -> Self {
        Self::with_seed(cfg, random_seed())
    }

    /// A reproducible sequence (tests, simulations).
    #[must_use]
    pub fn with_seed(cfg: BackoffConfig, seed: u64) -> Self {
        Self {
            cfg,
            attempt: 0,
            rng: SplitMix64::new(seed),
        }
    }

    /// The ceiling of the next delay: `min(cap, base * 2^attempt)`.
    #[must_use]
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(ATTEMPT_EXPONENT_MAX - 1);
        self.cfg
            .base
            .checked_mul(factor)
            .map_or(self.cfg.cap, |d| d.min(self.cfg.cap))
    }

    /// The next delay, and one more attempt counted.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = u64::try_from(self.ceiling().as_nanos()).unwrap_or(u64::MAX);
        self.attempt = (self.attempt + 1).min(ATTEMPT_EXPONENT_MAX);
        Duration::from_nanos(self.rng.up_to(ceiling))
    }

    /// Attempts since the last [`reset`](Self::reset).
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        }
    }

    #[test]
    fn delays_stay_under_the_doubling_ceiling_and_the_cap() {
        let mut b = Backoff::with_seed(cfg(), 7);
        let expected_ceilings_ms = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for ceiling_ms in expected_ceilings_ms {
            assert_eq!(b.ceiling(), Duration::from_millis(ceiling_ms));
            let d = b.next_delay();
            assert!(
                d <= Duration::from_millis(ceiling_ms),
                "{d:?} > {ceiling_ms} ms"
            );
        }
        // Far past the exponent limit the cap still holds and nothing overflows.
        for _ in 0..100 {
            assert!(b.next_delay() <= cfg().cap);
        }
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), cfg().base);
    }

    #[test]
    fn delays_are_jittered_over_the_whole_range() {
        // Full jitter: many samples at the cap spread over [0, cap].
        let mut b = Backoff::with_seed(cfg(), 42);
        for _ in 0..10 {
            let _ = b.next_delay();
        }
        let samples: Vec<Duration> = (0..1000).map(|_| b.next_delay()).collect();
        let cap = cfg().cap;
        assert!(samples.iter().all(|d| *d <= cap));
        let low = samples.iter().filter(|d| **d < cap / 4).count();
        let high = samples.iter().filter(|d| **d > cap * 3 / 4).count();
        assert!(low > 150 && high > 150, "low {low}, high {high}");
        // Two clients with different seeds do not wait in lockstep.
        let mut a = Backoff::with_seed(cfg(), 1);
        let mut c = Backoff::with_seed(cfg(), 2);
        let same = (0..20).filter(|_| a.next_delay() == c.next_delay()).count();
        assert!(same < 3);
        // The same seed reproduces the same sequence.
        let mut x = Backoff::with_seed(cfg(), 9);
        let mut y = Backoff::with_seed(cfg(), 9);
        assert!((0..20).all(|_| x.next_delay() == y.next_delay()));
    }

    #[test]
    fn huge_base_saturates_at_cap() {
        let mut b = Backoff::with_seed(
            BackoffConfig {
                base: Duration::from_secs(u64::MAX / 2),
                cap: Duration::from_secs(60),
            },
            3,
        );
        for _ in 0..5 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
