//! One hashed timer wheel per shard for every connection deadline
//! (handshake, Hello, idle/heartbeat, access-token expiry). There is no
//! timer per connection: each connection has one live entry, and moving a
//! deadline later only writes the connection's own `deadline_ms`; when the
//! entry comes up it is re-filed at the new deadline (lazy re-scheduling).
//! Moving a deadline earlier files a second entry and records its due time
//! in the connection; the older entry is recognised as stale by its due
//! time when it comes up and dropped. Entries due in a later round of the
//! wheel are re-filed by the wheel itself.

/// A connection's identity on its shard (never reused while the shard runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// The wheel: `slots` buckets of `tick_ms` each.
#[derive(Debug)]
pub struct TimerWheel {
    tick_ms: u64,
    /// Each entry: the connection and the time it was filed for.
    slots: Vec<Vec<(ConnId, u64)>>,
    /// The next tick to process (ticks before it are done).
    next_tick: u64,
}

impl TimerWheel {
    /// A wheel with `slot_count` slots of `tick_ms`, starting at `now_ms`.
    #[must_use]
    pub fn new(tick_ms: u64, slot_count: usize, now_ms: u64) -> Self {
        assert!(tick_ms > 0 && slot_count > 0);
        Self {
            tick_ms,
            slots: vec![Vec::new(); slot_count],
            next_tick: now_ms / tick_ms,
        }
    }

    /// Files `id` to come up at (or just after) `deadline_ms`.
    pub fn schedule(&mut self, id: ConnId, deadline_ms: u64) {
        // Never into a slot already processed this round.
        let tick = (deadline_ms.div_ceil(self.tick_ms)).max(self.next_tick);
        let slot = usize::try_from(tick % self.slots.len() as u64).unwrap_or(0);
        self.slots[slot].push((id, deadline_ms));
    }

    /// Processes every tick up to `now_ms`, calling `due(id, filed_ms)` for
    /// each entry that comes up (`filed_ms <= now_ms`: the time it was filed
    /// for). `due` returns the time to re-file the entry at (the connection
    /// is open and has a later deadline), or `None` (expired and handled,
    /// stale, or gone).
    pub fn advance(&mut self, now_ms: u64, mut due: impl FnMut(ConnId, u64) -> Option<u64>) {
        let now_tick = now_ms / self.tick_ms;
        // Bounded: at most one full round per call.
        let last = now_tick.min(self.next_tick + self.slots.len() as u64 - 1);
        let mut refile = Vec::new();
        while self.next_tick <= last {
            let slot = usize::try_from(self.next_tick % self.slots.len() as u64).unwrap_or(0);
            let entries = std::mem::take(&mut self.slots[slot]);
            for (id, filed_ms) in entries {
                if filed_ms > now_ms {
                    // Filed for a later round of the wheel.
                    refile.push((id, filed_ms));
                } else if let Some(deadline) = due(id, filed_ms) {
                    refile.push((id, deadline));
                }
            }
            self.next_tick += 1;
        }
        if now_tick > last {
            self.next_tick = now_tick + 1;
        }
        for (id, deadline) in refile {
            self.schedule(id, deadline);
        }
    }

    /// Number of entries filed (for tests and metrics).
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    /// True when nothing is filed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn fires_at_deadline_and_refiles_moved_deadlines() {
        let mut w = TimerWheel::new(10, 8, 0);
        let mut deadlines: HashMap<ConnId, u64> = HashMap::new();
        deadlines.insert(ConnId(1), 25);
        deadlines.insert(ConnId(2), 500); // beyond one round (80 ms)
        for (&id, &d) in &deadlines {
            w.schedule(id, d);
        }
        let mut fired = Vec::new();
        let run = |w: &mut TimerWheel,
                   now: u64,
                   deadlines: &mut HashMap<ConnId, u64>,
                   fired: &mut Vec<(ConnId, u64)>| {
            w.advance(now, |id, _| {
                let d = *deadlines.get(&id)?;
                if d > now {
                    Some(d)
                } else {
                    deadlines.remove(&id);
                    fired.push((id, now));
                    None
                }
            });
        };
        run(&mut w, 20, &mut deadlines, &mut fired);
        assert!(fired.is_empty());
        run(&mut w, 30, &mut deadlines, &mut fired);
        assert_eq!(fired, vec![(ConnId(1), 30)]);
        // Move 2 later; it must not fire at 500.
        deadlines.insert(ConnId(2), 700);
        for now in (40..=690).step_by(10) {
            run(&mut w, now, &mut deadlines, &mut fired);
        }
        assert_eq!(fired.len(), 1);
        run(&mut w, 700, &mut deadlines, &mut fired);
        assert_eq!(fired, vec![(ConnId(1), 30), (ConnId(2), 700)]);
        assert!(w.is_empty());
    }

    #[test]
    fn long_pause_processes_everything_once() {
        let mut w = TimerWheel::new(10, 4, 0);
        for i in 0..100 {
            w.schedule(ConnId(i), i * 3);
        }
        let mut n = 0;
        w.advance(10_000, |_, _| {
            n += 1;
            None
        });
        assert_eq!(n, 100);
        assert!(w.is_empty());
    }
}
