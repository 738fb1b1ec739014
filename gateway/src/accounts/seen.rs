//! Devices' last-seen times, coalesced: shard threads note a device when
//! it connects (authenticates) and disconnects, in memory and without I/O
//! ([`LastSeen::note`]); the `starling-seen` thread writes what was noted,
//! every `accounts.last_seen_flush_ms`, in one transaction
//! ([`AccountStore::devices_seen`]), so a device costs at most one write per
//! interval however often it reconnects, and heartbeats cost nothing.
//!
//! Bounded: at most `accounts.last_seen_pending_max` devices wait; a note
//! for one more wakes the writer early and is dropped (the next connect or
//! disconnect of that device notes it again). Last seen is soft state: a
//! crash loses at most the last interval's notes; a clean drop (the
//! process's [`super::Accounts`] going away) writes them.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use starling_storage::accounts::AccountStore;
use starling_storage::{DeviceId, TimestampMs, UserId};

#[derive(Debug, Default)]
struct Pending {
    /// (user, device) → the latest time noted.
    seen: HashMap<(u64, u32), u64>,
    /// Set when the owner goes away: write what is left and end.
    stop: bool,
    /// The map is full: write now.
    full: bool,
}

#[derive(Debug, Default)]
struct Inner {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A map of latest times: consistent after any holder's panic.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The last-seen times waiting for their write, and the thread that writes
/// them.
#[derive(Debug)]
pub struct LastSeen {
    inner: Arc<Inner>,
    pending_max: usize,
    writer: Option<JoinHandle<()>>,
}

impl LastSeen {
    /// Starts the writer thread over `store`.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(
        store: Arc<dyn AccountStore>,
        flush_ms: u64,
        pending_max: usize,
    ) -> std::io::Result<Self> {
        let inner = Arc::new(Inner::default());
        let i = inner.clone();
        let writer = std::thread::Builder::new()
            .name("starling-seen".into())
            .spawn(move || write_loop(&i, &*store, Duration::from_millis(flush_ms)))?;
        Ok(Self {
            inner,
            pending_max,
            writer: Some(writer),
        })
    }

    /// Notes that `(user, device)` was seen at `now_ms`. No I/O.
    pub fn note(&self, user: u64, device: u32, now_ms: u64) {
        let mut p = self.inner.lock();
        let len = p.seen.len();
        match p.seen.get_mut(&(user, device)) {
            Some(t) => *t = (*t).max(now_ms),
            None if len < self.pending_max => {
                p.seen.insert((user, device), now_ms);
            }
            None => {
                p.full = true;
                self.inner.wake.notify_one();
            }
        }
    }

    /// The time noted for `(user, device)` and not written yet (0: none).
    #[must_use]
    pub fn pending(&self, user: u64, device: u32) -> u64 {
        self.inner
            .lock()
            .seen
            .get(&(user, device))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for LastSeen {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.wake.notify_one();
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            tracing::error!("the last-seen writer panicked");
        }
    }
}

fn write_loop(inner: &Inner, store: &dyn AccountStore, every: Duration) {
    loop {
        let (batch, stop) = {
            let mut p = inner.lock();
            if !p.stop && !p.full {
                p = inner
                    .wake
                    .wait_timeout(p, every)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            p.full = false;
            (std::mem::take(&mut p.seen), p.stop)
        };
        if !batch.is_empty() {
            let rows: Vec<_> = batch
                .into_iter()
                .map(|((u, d), t)| (UserId(u), DeviceId(d), TimestampMs(t)))
                .collect();
            if let Err(e) = store.devices_seen(&rows) {
                // A fault of the disk stops the process through the store's hook, which said
                // so (and the process's last line must stay the reason it stops); anything
                // else loses these soft times only.
                if e.is_fault() {
                    tracing::debug!(error = %e, devices = rows.len(), "writing last-seen times");
                } else {
                    tracing::warn!(error = %e, devices = rows.len(), "writing last-seen times");
                }
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_storage::EmbeddedMeta;
    use starling_storage::accounts::SignIn;
    use starling_storage::meta::User;

    #[test]
    fn notes_are_coalesced_into_one_write_and_a_drop_writes_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(EmbeddedMeta::open(&dir.path().join("meta.redb")).unwrap());
        let (u, _) = meta
            .user_create("email:a@x.org", &User::default(), None)
            .unwrap();
        let (d, _) = meta
            .sign_in(&SignIn {
                user: u,
                device_name: "",
                platform: "",
                refresh_hash: [1; 32],
                refresh_expires: TimestampMs(10),
                now: TimestampMs(5),
            })
            .unwrap();
        // An hour between writes: only the drop writes.
        let seen = LastSeen::start(meta.clone(), 3_600_000, 1).unwrap();
        for t in [100, 300, 200] {
            seen.note(u.0, d.0, t);
        }
        assert_eq!(seen.pending(u.0, d.0), 300);
        assert_eq!(meta.devices(u).unwrap()[0].last_seen_ms, TimestampMs(5));
        // Full (one device waits): another device's note is dropped, and the writer woken.
        seen.note(u.0, d.0 + 1, 400);
        assert_eq!(seen.pending(u.0, d.0 + 1), 0);
        drop(seen);
        let devices = meta.devices(u).unwrap();
        assert_eq!(devices[0].last_seen_ms, TimestampMs(300));
    }
}
