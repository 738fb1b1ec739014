//! Contact discovery's budget, counted in *new numbers* looked up, not in
//! requests. Pure bookkeeping like the rest of `limits`: every decision
//! takes `now_ms`.
//!
//! Each user has a fixed window (`window_ms` from its first lookup) that
//! counts the distinct numbers (SHA-256 hashes) the user looked up in it. A
//! number already looked up in the window costs nothing again, so a client
//! that asks about the same contact twice, or uploads its address book again
//! after adding one entry, pays only for what is new. A request that would
//! take the count past the limit is refused whole (nothing is charged), with
//! the time until the window ends.
//!
//! Memory is bounded twice: at most `users_max` windows (ended ones are
//! dropped first, then the ones that end soonest), and at most `numbers_max`
//! remembered numbers over all users. When the numbers are full, the sets
//! of the windows that end soonest are forgotten but their counts kept: a
//! number of theirs then costs again (the budget never grows by it).
//!
//! A number is remembered by the first 8 bytes of its hash. The hashes come
//! from the client, so two can share those bytes only if the client sent
//! both, and it paid for the first.

use std::collections::{HashMap, HashSet};

use super::limits::Refused;

/// One user's window.
#[derive(Debug)]
struct UserWindow {
    start_ms: u64,
    /// Distinct numbers charged in this window.
    count: u32,
    /// The numbers charged, while remembered (a subset of `count`).
    numbers: HashSet<u64>,
}

impl UserWindow {
    fn end_ms(&self, window_ms: u64) -> u64 {
        self.start_ms.saturating_add(window_ms)
    }
}

/// Every user's discovery window.
#[derive(Debug)]
pub struct Lookups {
    users: HashMap<u64, UserWindow>,
    users_max: usize,
    /// Numbers remembered over all users.
    numbers: usize,
    numbers_max: usize,
}

/// The first 8 bytes of a 32-byte hash.
fn fingerprint(hash: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = hash.len().min(8);
    b[..n].copy_from_slice(&hash[..n]);
    u64::from_le_bytes(b)
}

impl Lookups {
    /// Empty; at most `users_max` windows and `numbers_max` remembered
    /// numbers.
    #[must_use]
    pub fn new(users_max: usize, numbers_max: usize) -> Self {
        Self {
            users: HashMap::new(),
            users_max: users_max.max(1),
            numbers: 0,
            numbers_max,
        }
    }

    /// Charges `user_id` for the numbers among `hashes` it has not looked
    /// up in its current window, or refuses the whole request if that would
    /// exceed `limit`. Returns how many were new.
    ///
    /// # Errors
    /// The user's budget cannot take the new numbers.
    pub fn charge<'a>(
        &mut self,
        user_id: u64,
        hashes: impl IntoIterator<Item = &'a [u8]>,
        limit: u32,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<u32, Refused> {
        if let Some(w) = self.users.get_mut(&user_id)
            && w.end_ms(window_ms) <= now_ms
        {
            self.numbers -= w.numbers.len();
            self.users.remove(&user_id);
        }
        let existing = self.users.get(&user_id);
        let mut new: HashSet<u64> = HashSet::new();
        for h in hashes {
            let f = fingerprint(h);
            if existing.is_none_or(|w| !w.numbers.contains(&f)) {
                new.insert(f);
            }
        }
        let new_count = u32::try_from(new.len()).unwrap_or(u32::MAX);
        let (count, end_ms) = existing.map_or((0, now_ms.saturating_add(window_ms)), |w| {
            (w.count, w.end_ms(window_ms))
        });
        if new_count > limit {
            return Err(Refused {
                reason: "more new numbers in one request than the hourly contact lookup budget",
                retry_after_ms: end_ms - now_ms,
            });
        }
        if count.saturating_add(new_count) > limit {
            return Err(Refused {
                reason: "too many new numbers looked up",
                retry_after_ms: end_ms - now_ms,
            });
        }
        if new.is_empty() {
            return Ok(0);
        }
        if !self.users.contains_key(&user_id) && self.users.len() >= self.users_max {
            self.drop_windows(window_ms, now_ms);
        }
        if self.numbers + new.len() > self.numbers_max {
            self.forget_numbers(new.len(), user_id, window_ms, now_ms);
        }
        let remember = self.numbers + new.len() <= self.numbers_max;
        let w = self.users.entry(user_id).or_insert(UserWindow {
            start_ms: now_ms,
            count: 0,
            numbers: HashSet::new(),
        });
        w.count += new_count;
        if remember {
            self.numbers += new.len();
            w.numbers.extend(new);
        }
        Ok(new_count)
    }

    /// Drops ended windows; if that is not enough, the sixteenth that end
    /// soonest.
    fn drop_windows(&mut self, window_ms: u64, now_ms: u64) {
        let numbers = &mut self.numbers;
        self.users.retain(|_, w| {
            let keep = w.end_ms(window_ms) > now_ms;
            if !keep {
                *numbers -= w.numbers.len();
            }
            keep
        });
        if self.users.len() >= self.users_max {
            let mut by_end: Vec<(u64, u64)> =
                self.users.iter().map(|(u, w)| (w.start_ms, *u)).collect();
            by_end.sort_unstable();
            for (_, u) in by_end.into_iter().take(self.users_max / 16 + 1) {
                if let Some(w) = self.users.remove(&u) {
                    self.numbers -= w.numbers.len();
                }
            }
        }
    }

    /// Makes room for `needed` numbers (and a sixteenth of the maximum
    /// more, so that a full table is not sorted for every request): drops
    /// ended windows, then forgets the numbers (not the counts) of the
    /// windows that end soonest, never those of `keep_user`.
    fn forget_numbers(&mut self, needed: usize, keep_user: u64, window_ms: u64, now_ms: u64) {
        let numbers = &mut self.numbers;
        self.users.retain(|_, w| {
            let keep = w.end_ms(window_ms) > now_ms;
            if !keep {
                *numbers -= w.numbers.len();
            }
            keep
        });
        let target = self
            .numbers_max
            .saturating_sub(needed)
            .saturating_sub(self.numbers_max / 16);
        if self.numbers <= target {
            return;
        }
        let mut by_end: Vec<(u64, u64)> = self
            .users
            .iter()
            .filter(|(u, w)| **u != keep_user && !w.numbers.is_empty())
            .map(|(u, w)| (w.start_ms, *u))
            .collect();
        by_end.sort_unstable();
        for (_, u) in by_end {
            if self.numbers <= target {
                break;
            }
            if let Some(w) = self.users.get_mut(&u) {
                self.numbers -= w.numbers.len();
                w.numbers = HashSet::new();
            }
        }
    }

    /// Numbers remembered over all users.
    #[must_use]
    pub fn numbers(&self) -> usize {
        self.numbers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3600 * 1000;

    fn h(n: u32) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b
    }

    fn charge(l: &mut Lookups, user: u64, nums: &[u32], now_ms: u64) -> Result<u32, Refused> {
        let hashes: Vec<[u8; 32]> = nums.iter().map(|n| h(*n)).collect();
        l.charge(user, hashes.iter().map(|x| &x[..]), 5, HOUR_MS, now_ms)
    }

    #[test]
    fn only_new_numbers_cost_and_repeats_are_free() {
        let mut l = Lookups::new(100, 1000);
        assert_eq!(charge(&mut l, 1, &[1, 2, 2], 0), Ok(2));
        // The same numbers again, any number of times: free.
        for t in 1..100 {
            assert_eq!(charge(&mut l, 1, &[2, 1], t), Ok(0));
        }
        assert_eq!(charge(&mut l, 1, &[1, 3, 4], 100), Ok(2));
        // 4 of 5 spent: two new ones are refused whole, nothing charged.
        assert_eq!(
            charge(&mut l, 1, &[1, 5, 6], 200),
            Err(Refused {
                reason: "too many new numbers looked up",
                retry_after_ms: HOUR_MS - 200
            })
        );
        assert_eq!(charge(&mut l, 1, &[5], 300), Ok(1));
        assert!(charge(&mut l, 1, &[6], 300).is_err());
        // Known numbers still pass when the budget is spent.
        assert_eq!(charge(&mut l, 1, &[1, 2, 3, 4, 5], 400), Ok(0));
        // Another user has a budget of its own.
        assert_eq!(charge(&mut l, 2, &[6, 7, 8, 9, 10], 400), Ok(5));
        // At the window's end it starts afresh.
        assert_eq!(charge(&mut l, 1, &[6, 7, 8, 9, 10], HOUR_MS), Ok(5));
        assert_eq!(l.numbers(), 10);
    }

    #[test]
    fn a_request_larger_than_the_budget_says_so() {
        let mut l = Lookups::new(100, 1000);
        let e = charge(&mut l, 1, &[1, 2, 3, 4, 5, 6], 10).unwrap_err();
        assert!(
            e.reason.starts_with("more new numbers in one request"),
            "{e}"
        );
        assert_eq!(e.retry_after_ms, HOUR_MS);
        assert_eq!(l.numbers(), 0);
    }

    #[test]
    fn full_numbers_forget_sets_but_keep_counts() {
        let mut l = Lookups::new(100, 8);
        assert_eq!(charge(&mut l, 1, &[1, 2, 3, 4], 0), Ok(4));
        assert_eq!(charge(&mut l, 2, &[1, 2, 3, 4], 10), Ok(4));
        // Full: user 1's set (the soonest to end) is forgotten for user 3.
        assert_eq!(charge(&mut l, 3, &[9], 20), Ok(1));
        assert!(l.numbers() <= 8);
        // User 1's numbers cost again, and its count is still 4 of 5.
        assert_eq!(charge(&mut l, 1, &[1], 30), Ok(1));
        assert!(charge(&mut l, 1, &[2], 30).is_err());
        // User 2's are still remembered.
        assert_eq!(charge(&mut l, 2, &[1, 2, 3, 4], 40), Ok(0));
    }

    #[test]
    fn windows_are_bounded() {
        let mut l = Lookups::new(16, 1000);
        for u in 0..16 {
            charge(&mut l, u, &[1], u).unwrap();
        }
        charge(&mut l, 100, &[1], 100).unwrap();
        assert!(l.users.len() <= 16);
        assert!(l.users.contains_key(&100) && l.users.contains_key(&15));
        assert_eq!(
            l.numbers(),
            l.users.values().map(|w| w.numbers.len()).sum::<usize>()
        );
    }
}
