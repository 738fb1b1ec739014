//! Measurements of the index's internals, for `starling-bench index-cost`. Not a stable API.
//! The caller supplies the clock (`now_ns`: a monotonic reading in nanoseconds), so this crate
//! still reads none.

use super::resident::{Ptr, SplitMap, mix64};
use super::state::State;
use crate::types::{ClientMsgId, ConvId, Seq};

/// What [`split_map_growth`] saw.
#[derive(Debug, Clone)]
pub struct SplitGrowth {
    /// Keys inserted.
    pub inserts: u64,
    /// Nanoseconds for all of them.
    pub total_ns: u64,
    /// Windows of [`SPLIT_WINDOW_KEYS`] inserts.
    pub windows: usize,
    /// Windows that took more than 1 ms, and the nanoseconds spent in them.
    pub windows_over_1ms: usize,
    /// Nanoseconds spent in the windows over 1 ms.
    pub over_1ms_ns: u64,
    /// The ten slowest windows: (nanoseconds, keys inserted at its end), slowest first.
    pub slowest: Vec<(u64, u64)>,
}

/// Inserts per timed window: 10 ms of a shard at 200k msg/s.
pub const SPLIT_WINDOW_KEYS: u64 = 2000;

/// How a split map's growth is spread over time: inserts `n` random keys in windows of
/// [`SPLIT_WINDOW_KEYS`] and times each window (docs/design/performance-decisions.md,
/// "Split maps").
pub fn split_map_growth(n: u64, now_ns: &dyn Fn() -> u64) -> SplitGrowth {
    let mut m: SplitMap<u64, u64> = SplitMap::default();
    let mut windows = Vec::new();
    let mut k = 0u64;
    let start = now_ns();
    while k < n {
        let t = now_ns();
        for _ in 0..SPLIT_WINDOW_KEYS {
            k += 1;
            m.insert(mix64(k), k);
        }
        windows.push((now_ns().saturating_sub(t), k));
    }
    let total_ns = now_ns().saturating_sub(start);
    let over: Vec<u64> = windows
        .iter()
        .map(|w| w.0)
        .filter(|&ns| ns > 1_000_000)
        .collect();
    let count = windows.len();
    windows.sort_unstable_by(|a, b| b.cmp(a));
    windows.truncate(10);
    SplitGrowth {
        inserts: k,
        total_ns,
        windows: count,
        windows_over_1ms: over.len(),
        over_1ms_ns: over.iter().sum(),
        slowest: windows,
    }
}

/// What [`dedup_walk`] saw.
#[derive(Debug, Clone)]
pub struct DedupWalk {
    /// Entries in the one conversation.
    pub entries: u64,
    /// Nanoseconds per applied entry.
    pub insert_ns: f64,
    /// Nanoseconds per lookup of an id never sent (the walk over every chunk).
    pub absent_ns: u64,
    /// Candidates those lookups had to confirm (tag collisions).
    pub false_candidates: usize,
    /// Nanoseconds per lookup of a recent id.
    pub recent_ns: u64,
}

fn id(n: u64) -> ClientMsgId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..].copy_from_slice(&(!n).to_le_bytes());
    ClientMsgId(b)
}

/// What a dedup lookup costs in one conversation of `n` entries: of an id never sent (the
/// walk over every chunk) and of a recent one; and what applying the entries cost.
pub fn dedup_walk(n: u64, now_ns: &dyn Fn() -> u64) -> DedupWalk {
    let n = n.max(200);
    let mut st = State::fresh();
    let conv = ConvId(1);
    let t = now_ns();
    for seq in 1..=n {
        let p = Ptr {
            seg: 0,
            off: seq as u32,
            len: 1,
            crc: seq as u32,
            id: 0,
        };
        st.insert(conv, Seq(seq), id(mix64(seq)), p);
    }
    let insert_ns = now_ns().saturating_sub(t) as f64 / n as f64;
    let lookups = 200u64;
    let t = now_ns();
    let mut false_candidates = 0;
    for k in 0..lookups {
        false_candidates += st
            .dedup_candidates(conv, id(mix64(n + 1 + k)), 0, u64::MAX)
            .map_or(0, |(c, _)| c.len());
    }
    let absent_ns = now_ns().saturating_sub(t) / lookups;
    let t = now_ns();
    for k in 0..lookups {
        let _ = st.dedup_candidates(conv, id(mix64(n - k)), 0, u64::MAX);
    }
    let recent_ns = now_ns().saturating_sub(t) / lookups;
    DedupWalk {
        entries: n,
        insert_ns,
        absent_ns,
        false_candidates,
        recent_ns,
    }
}
