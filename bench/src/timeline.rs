//! Where in a run the slow acknowledgements fell. A p99 says how many were slow, not whether
//! they were spread over the run (a queue that is always a little long) or packed into a few
//! short episodes (a stall of the server's or the load generator's core, a long commit). This
//! keeps, per 10 ms of scheduled send time, the acknowledgements, how many of them exceeded a
//! bound, the slowest one and the load generator's own worst send lag, so that a reader can
//! line the episodes up with `perf sched`, `bench/scripts/hiccups.py` or the server's logs.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Width of one slot of the timeline.
pub(crate) const SLOT_NS: u64 = 10_000_000;

/// One slot: what was scheduled in its 10 ms.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Slot {
    pub(crate) acks: u32,
    /// Acknowledgements slower than the timeline's bound.
    pub(crate) slow: u32,
    pub(crate) ack_max_us: u32,
    /// The load generator's worst lateness (scheduled time to write) in the slot.
    pub(crate) lag_max_us: u32,
}

/// Slots from the end of the warm-up on (slot 0 starts there).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Timeline {
    pub(crate) bound_us: u64,
    /// `CLOCK_MONOTONIC` (ns) at the start of slot 0 (0: unknown), to line slots up with
    /// `perf record -k CLOCK_MONOTONIC` or other traces. Workers start within milliseconds of
    /// each other; a merge keeps the earliest.
    #[serde(default)]
    pub(crate) start_monotonic_ns: u64,
    pub(crate) slots: Vec<Slot>,
}

/// What the timeline says about the tail, in a few numbers.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub(crate) struct TimelineSummary {
    pub(crate) bound_us: u64,
    /// Slots that saw at least one acknowledgement.
    pub(crate) slots: usize,
    /// Slots with at least one acknowledgement over the bound.
    pub(crate) slow_slots: usize,
    pub(crate) slow_acks: u64,
    pub(crate) acks: u64,
    /// Share of the slow acknowledgements that fell in the worst 1% of slots (at least one):
    /// near 1 for a tail made of a few episodes, near 0.01 for a tail spread evenly.
    pub(crate) share_in_worst_1pct: f64,
    /// Start of the slot with the most slow acknowledgements, ms after the warm-up.
    pub(crate) worst_slot_ms: Option<u64>,
}

impl Timeline {
    pub(crate) fn new(bound_us: u64) -> Self {
        Self {
            bound_us,
            start_monotonic_ns: 0,
            slots: Vec::new(),
        }
    }

    fn slot(&mut self, offset_ns: u64) -> &mut Slot {
        let i = usize::try_from(offset_ns / SLOT_NS).unwrap_or(usize::MAX);
        // A run is bounded in time; a bogus offset (a corrupt body) must not allocate wildly.
        let i = i.min(1 << 20);
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Slot::default());
        }
        &mut self.slots[i]
    }

    /// An acknowledgement of a send scheduled `offset_ns` after the warm-up, `latency_us` late.
    pub(crate) fn ack(&mut self, offset_ns: u64, latency_us: u64) {
        let bound = self.bound_us;
        let s = self.slot(offset_ns);
        s.acks = s.acks.saturating_add(1);
        if latency_us > bound {
            s.slow = s.slow.saturating_add(1);
        }
        s.ack_max_us = s.ack_max_us.max(clamp_u32(latency_us));
    }

    /// A send scheduled `offset_ns` after the warm-up, written `lag_us` late.
    pub(crate) fn lag(&mut self, offset_ns: u64, lag_us: u64) {
        let s = self.slot(offset_ns);
        s.lag_max_us = s.lag_max_us.max(clamp_u32(lag_us));
    }

    /// Adds another worker's timeline (same bound, slots aligned at the warm-up's end).
    pub(crate) fn merge(&mut self, o: &Timeline) {
        if o.start_monotonic_ns != 0
            && (self.start_monotonic_ns == 0 || o.start_monotonic_ns < self.start_monotonic_ns)
        {
            self.start_monotonic_ns = o.start_monotonic_ns;
        }
        if self.slots.len() < o.slots.len() {
            self.slots.resize(o.slots.len(), Slot::default());
        }
        for (a, b) in self.slots.iter_mut().zip(&o.slots) {
            a.acks = a.acks.saturating_add(b.acks);
            a.slow = a.slow.saturating_add(b.slow);
            a.ack_max_us = a.ack_max_us.max(b.ack_max_us);
            a.lag_max_us = a.lag_max_us.max(b.lag_max_us);
        }
    }

    pub(crate) fn summary(&self) -> TimelineSummary {
        let used: Vec<&Slot> = self.slots.iter().filter(|s| s.acks > 0).collect();
        let slow_acks: u64 = used.iter().map(|s| u64::from(s.slow)).sum();
        let mut slow: Vec<u32> = used.iter().map(|s| s.slow).filter(|&n| n > 0).collect();
        slow.sort_unstable_by(|a, b| b.cmp(a));
        let worst_n = used.len().div_ceil(100).max(1);
        let in_worst: u64 = slow.iter().take(worst_n).map(|&n| u64::from(n)).sum();
        let worst_slot_ms = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.slow > 0)
            .max_by_key(|(i, s)| (s.slow, std::cmp::Reverse(*i)))
            .map(|(i, _)| i as u64 * SLOT_NS / 1_000_000);
        TimelineSummary {
            bound_us: self.bound_us,
            slots: used.len(),
            slow_slots: slow.len(),
            slow_acks,
            acks: used.iter().map(|s| u64::from(s.acks)).sum(),
            share_in_worst_1pct: if slow_acks == 0 {
                0.0
            } else {
                in_worst as f64 / slow_acks as f64
            },
            worst_slot_ms,
        }
    }

    /// CSV, one line per slot: `t_ms,acks,slow_acks,ack_max_us,send_lag_max_us`.
    pub(crate) fn to_csv(&self) -> String {
        let mut out = format!(
            "# slow = acknowledged more than {} us after its scheduled send; t_ms from the end of the warm-up, which was at CLOCK_MONOTONIC {} ns\nt_ms,acks,slow_acks,ack_max_us,send_lag_max_us\n",
            self.bound_us, self.start_monotonic_ns
        );
        for (i, s) in self.slots.iter().enumerate() {
            let _ = writeln!(
                out,
                "{},{},{},{},{}",
                i as u64 * SLOT_NS / 1_000_000,
                s.acks,
                s.slow,
                s.ack_max_us,
                s.lag_max_us
            );
        }
        out
    }

    pub(crate) fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_csv())
    }
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn an_episode_holds_the_slow_acks_and_is_found() {
        let mut t = Timeline::new(1500);
        // 200 quiet slots of 10 acks at 500 µs, then one slot where 8 of 10 took 6 ms.
        for slot in 0..200 {
            for k in 0..10 {
                t.ack(slot * 10 * MS + k * MS, 500);
            }
        }
        for k in 0..10 {
            t.ack(120 * 10 * MS + k * MS, if k < 8 { 6000 } else { 500 });
        }
        t.lag(120 * 10 * MS, 4000);
        let s = t.summary();
        assert_eq!(s.slots, 200);
        assert_eq!(s.acks, 2010);
        assert_eq!(s.slow_acks, 8);
        assert_eq!(s.slow_slots, 1);
        assert_eq!(s.worst_slot_ms, Some(1200));
        assert!((s.share_in_worst_1pct - 1.0).abs() < 1e-9);
        let csv = t.to_csv();
        assert!(csv.contains("\n1200,20,8,6000,4000\n"), "{csv}");
    }

    #[test]
    fn a_spread_tail_is_told_apart_from_an_episode() {
        let mut t = Timeline::new(1000);
        for slot in 0..100 {
            t.ack(slot * 10 * MS, 2000); // one slow ack in every slot
            t.ack(slot * 10 * MS + MS, 100);
        }
        let s = t.summary();
        assert_eq!((s.slow_acks, s.slow_slots), (100, 100));
        assert!((s.share_in_worst_1pct - 0.01).abs() < 1e-9);
    }

    #[test]
    fn merging_workers_adds_counts_and_keeps_maxima() {
        let mut a = Timeline::new(1500);
        a.ack(0, 2000);
        a.start_monotonic_ns = 2_000;
        let mut b = Timeline::new(1500);
        b.start_monotonic_ns = 1_000;
        b.ack(0, 100);
        b.ack(30 * MS, 9000);
        b.lag(30 * MS, 700);
        a.merge(&b);
        assert_eq!(a.slots.len(), 4);
        assert_eq!(a.start_monotonic_ns, 1_000);
        assert_eq!(
            a.slots[0],
            Slot {
                acks: 2,
                slow: 1,
                ack_max_us: 2000,
                lag_max_us: 0
            }
        );
        assert_eq!(a.slots[3].ack_max_us, 9000);
        assert_eq!(a.slots[3].lag_max_us, 700);
    }

    #[test]
    fn a_wild_offset_does_not_allocate_wildly() {
        let mut t = Timeline::new(1500);
        t.ack(u64::MAX, 1);
        assert_eq!(t.slots.len(), (1 << 20) + 1);
    }
}
