//! The N×N grid of bounded SPSC [`ring`](crate::ring)s between shards: shard `p` owns the
//! producer of ring `p → c` and shard `c` its consumer, for every `p ≠ c` (a shard talks to itself
//! without a ring). Each shard has one [`Bell`] shared by all its inbound rings, so a burst pushed
//! by one producer costs one publish and at most one doorbell ring.

use std::fmt;

use crate::ring::{Bell, Consumer, Producer, PushError, ring};
use crate::sync::Arc;

/// One shard's row (outbound producers) and column (inbound consumers) of the grid.
pub struct ShardLinks<T> {
    shard: usize,
    outbound: Vec<Option<Producer<T>>>,
    inbound: Vec<Option<Consumer<T>>>,
    bell: Arc<Bell>,
    next_inbound: usize,
}

impl<T> fmt::Debug for ShardLinks<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardLinks")
            .field("shard", &self.shard)
            .field("shards", &self.outbound.len())
            .finish_non_exhaustive()
    }
}

/// Builds the grid for `bells.len()` shards, each ring holding `ring_capacity` items (rounded up
/// to a power of two). Returns one [`ShardLinks`] per shard, in shard order.
#[must_use]
pub fn grid<T>(ring_capacity: usize, bells: &[Arc<Bell>]) -> Vec<ShardLinks<T>> {
    let n = bells.len();
    let mut outbound: Vec<Vec<Option<Producer<T>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut inbound: Vec<Vec<Option<Consumer<T>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for p in 0..n {
        for c in 0..n {
            if p != c {
                let (tx, rx) = ring(ring_capacity, bells[c].clone());
                outbound[p][c] = Some(tx);
                inbound[c][p] = Some(rx);
            }
        }
    }
    outbound
        .into_iter()
        .zip(inbound)
        .enumerate()
        .map(|(shard, (outbound, inbound))| ShardLinks {
            shard,
            outbound,
            inbound,
            bell: bells[shard].clone(),
            next_inbound: 0,
        })
        .collect()
}

impl<T> ShardLinks<T> {
    /// This shard's index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Number of shards in the grid.
    pub fn shards(&self) -> usize {
        self.outbound.len()
    }

    /// This shard's bell (the gateway parks on its doorbell after [`Bell::try_park`]).
    pub fn bell(&self) -> &Arc<Bell> {
        &self.bell
    }

    /// Pushes `item` towards shard `to` (unpublished until [`ShardLinks::publish`]). A full ring
    /// (or `to` being this shard or out of range) hands the item back.
    pub fn push(&mut self, to: usize, item: T) -> Result<(), T> {
        match self.outbound.get_mut(to).and_then(Option::as_mut) {
            Some(p) => p.push(item).map_err(|e| match e {
                PushError::Full(t) | PushError::Closed(t) => t,
            }),
            None => Err(item),
        }
    }

    /// Publishes every pushed item, one release store and at most one wake-up per ring.
    pub fn publish(&mut self) {
        for p in self.outbound.iter_mut().flatten() {
            if p.unpublished() > 0 {
                let _ = p.publish();
            }
        }
    }

    /// Takes the next published item from any inbound ring (round-robin, so one busy producer
    /// cannot starve the others).
    pub fn pop(&mut self) -> Option<T> {
        let n = self.inbound.len();
        for i in 0..n {
            let k = (self.next_inbound + i) % n;
            if let Some(c) = self.inbound[k].as_mut()
                && let Some(item) = c.pop()
            {
                self.next_inbound = (k + 1) % n;
                return Some(item);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Doorbell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(std::sync::Arc<AtomicUsize>);
    impl Doorbell for Count {
        fn ring(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn every_pair_has_one_ring_a_full_ring_hands_back_and_one_publish_wakes_once() {
        let rings = std::sync::Arc::new(AtomicUsize::new(0));
        let bells: Vec<_> = (0..3).map(|_| Bell::new(Count(rings.clone()))).collect();
        let mut links = grid::<u32>(2, &bells);
        assert_eq!(links[1].push(1, 7), Err(7), "no ring to itself");
        assert_eq!(links[1].push(9, 7), Err(7), "no such shard");
        links[0].push(2, 1).unwrap();
        links[0].push(2, 2).unwrap();
        assert_eq!(
            links[0].push(2, 3),
            Err(3),
            "full: backpressure, not growth"
        );
        links[1].push(2, 10).unwrap();
        assert_eq!(links[2].pop(), None, "unpublished items are invisible");
        assert!(links[2].bell().try_park());
        links[0].publish();
        links[1].publish();
        assert_eq!(
            rings.load(Ordering::Relaxed),
            1,
            "one wake-up for the parked consumer"
        );
        links[2].bell().begin_drain();
        let mut got = Vec::new();
        while let Some(x) = links[2].pop() {
            got.push(x);
        }
        got.sort_unstable();
        assert_eq!(got, vec![1, 2, 10]);
        assert_eq!(links[2].shard(), 2);
        assert_eq!(links[2].shards(), 3);
    }
}
