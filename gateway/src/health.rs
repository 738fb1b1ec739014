//! Whether the process serves, and why not: what `/healthz`, `/readyz` and the health gauges on
//! `/metrics` report, and how a storage fault is handled.
//!
//! **A shard whose log failed recovers in place.** When a shard's log fails (a write or
//! `fdatasync` error, a full disk, a filesystem gone read-only), that shard's sequencer answers
//! every waiting Send truthfully (outcome unknown, or not stored) and refuses every later write
//! with `STORAGE_FAILURE`, while reads (history, sync, conversation lists) go on from its index.
//! [`Health::shard_failed`] marks it: `/readyz` answers 503 with the reason,
//! `starling_storage_failed{shard}` is 1, `/healthz` stays 200 (the process is alive and must not
//! be restarted for this). Off the shard's thread, every `storage.recovery_retry_ms`, the failed
//! log is reopened in place (`starling_storage::FailedShard::reopen`: its threads stopped, the
//! log cut back to the last lsn it had made durable, so nothing refused comes back, then opened
//! as at start); once that succeeds the shard takes the new log and index, reloads its
//! conversations' counters and serves writes again, and [`Health::shard_recovered`] clears the
//! mark. Never retry a failed `fsync` on the same file: a reopen recovers from what is on disk.
//!
//! **A fault of the metadata store or of an index ends the process.** When `meta.redb` (the
//! metadata store, accounts included) fails with an I/O error (redb then refuses every later
//! operation until reopened), or a shard's message index stops applying its log, nothing that
//! depends on that store can work again in this process; reopening the metadata store under
//! every shard and connection is not done. A supervisor (systemd `Restart=on-failure`,
//! Kubernetes) restarts the server. So at such a fault:
//!
//! 1. [`Health::fault`] marks the node unhealthy at once (`/healthz` and `/readyz` answer 503
//!    with the reason, `starling_ready` drops to 0); connections stop reading new requests;
//! 2. the main thread is told ([`Stop::Fault`]): every shard stops accepting, gives the answers
//!    already on their way [`FAULT_ANSWER_GRACE_MS`] to reach their connections, sends
//!    `Goodbye{STORAGE_FAILURE, reconnect_after_ms: FAULT_RECONNECT_AFTER_MS}` and drains;
//! 3. the process exits with status [`EXIT_STORAGE_FAULT`] and one line on stderr naming the
//!    fault.
//!
//! A fault already present at start-up fails the start (the data directory must be writable).
//!
//! Faults are reported from wherever they are met: the shards' router drivers (log and index)
//! and the metadata store's fault hook, which sees every operation of the store — the router's,
//! the accounts' ([`starling_storage::accounts`]) and the last-seen writer's alike.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, mpsc};

/// The process's exit status after a storage fault (`EX_IOERR` of BSD's `sysexits.h`).
pub const EXIT_STORAGE_FAULT: u8 = 74;

/// After a fault, how long answers already on their way (refusals of the failed shard, acks of
/// healthy ones) get to reach their connections before the `Goodbye`.
pub const FAULT_ANSWER_GRACE_MS: u64 = 250;

/// `Goodbye.reconnect_after_ms` after a storage fault: time for a supervisor to restart the
/// server and for it to recover its logs.
pub const FAULT_RECONNECT_AFTER_MS: u32 = 2_000;

/// What the main thread waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: drain and exit 0.
    Signal(i32),
    /// A storage fault: drain briefly and exit with [`EXIT_STORAGE_FAULT`].
    Fault(String),
}

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

/// The process's health, shared by every thread.
#[derive(Debug)]
pub struct Health {
    phase: AtomicU8,
    shards: usize,
    shards_up: AtomicUsize,
    /// Per shard: its log failed and is not recovered yet (or its index failed).
    storage_failed: Box<[AtomicBool]>,
    /// Per shard: why its log failed, while it is failed.
    shard_reasons: Mutex<Vec<Option<String>>>,
    /// Set with the first fault (fast check on the data path).
    faulted: AtomicBool,
    fault: OnceLock<String>,
    stop: Mutex<Option<mpsc::Sender<Stop>>>,
}

impl Health {
    /// A process with `shards` shards, starting.
    #[must_use]
    pub fn new(shards: usize) -> Self {
        Self {
            phase: AtomicU8::new(STARTING),
            shards,
            shards_up: AtomicUsize::new(0),
            storage_failed: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            shard_reasons: Mutex::new(vec![None; shards]),
            faulted: AtomicBool::new(false),
            fault: OnceLock::new(),
            stop: Mutex::new(None),
        }
    }

    /// Where [`Stop::Fault`] goes (the main thread's channel).
    pub fn set_stop(&self, tx: mpsc::Sender<Stop>) {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }

    /// One more shard runs.
    pub fn shard_up(&self) {
        self.shards_up.fetch_add(1, Ordering::AcqRel);
    }

    /// Start-up is over: every shard runs and listens.
    pub fn serving(&self) {
        let _ = self
            .phase
            .compare_exchange(STARTING, SERVING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Shutdown began (connections drain).
    pub fn draining(&self) {
        self.phase.store(DRAINING, Ordering::Release);
    }

    /// Shard `i`'s log failed (`reason` names the shard and the error): it refuses writes and
    /// recovers in place. The process stays live; it is not ready until the shard recovered.
    pub fn shard_failed(&self, i: usize, reason: &str) {
        if let Some(flag) = self.storage_failed.get(i) {
            flag.store(true, Ordering::Release);
        }
        if let Some(r) = self
            .shard_reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(i)
        {
            *r = Some(reason.to_owned());
        }
        tracing::error!(
            shard = i,
            reason,
            "storage fault: the shard refuses writes and serves reads until its log is \
             recovered in place"
        );
    }

    /// Shard `i`'s log was reopened in place: it serves writes again.
    pub fn shard_recovered(&self, i: usize) {
        if let Some(r) = self
            .shard_reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(i)
        {
            *r = None;
        }
        if let Some(flag) = self.storage_failed.get(i) {
            flag.store(false, Ordering::Release);
        }
        tracing::warn!(
            shard = i,
            "storage recovered in place: the shard serves writes again"
        );
    }

    /// A storage fault that stops the process (the metadata store's, or `shard`'s index). The
    /// first one is kept as the reason, marks the process unhealthy and tells the main thread;
    /// later ones only mark their shard.
    pub fn fault(&self, shard: Option<usize>, reason: &str) {
        if let Some(flag) = shard.and_then(|i| self.storage_failed.get(i)) {
            flag.store(true, Ordering::Release);
        }
        if self.fault.set(reason.to_owned()).is_err() {
            tracing::warn!(shard, reason, "another storage fault");
            return;
        }
        self.faulted.store(true, Ordering::Release);
        tracing::error!(
            shard,
            reason,
            "storage fault: stopping so that the server restarts"
        );
        let stop = self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = stop.as_ref() {
            let _ = tx.send(Stop::Fault(reason.to_owned()));
        }
    }

    /// Whether a fault was detected (cheap: one atomic load).
    #[must_use]
    pub fn faulted(&self) -> bool {
        self.faulted.load(Ordering::Acquire)
    }

    /// The first fault's reason.
    #[must_use]
    pub fn fault_reason(&self) -> Option<&str> {
        self.fault.get().map(String::as_str)
    }

    /// Whether shard `i`'s storage failed.
    #[must_use]
    pub fn storage_failed(&self, i: usize) -> bool {
        self.storage_failed
            .get(i)
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// `/healthz`: `Ok` while the process serves (or starts, or drains), the fault otherwise.
    ///
    /// # Errors
    /// A storage fault was detected: the reason.
    pub fn liveness(&self) -> Result<(), String> {
        match self.fault_reason() {
            Some(f) => Err(format!("storage fault: {f}")),
            None => Ok(()),
        }
    }

    /// `/readyz`: `Ok` only when every shard runs and accepts, no fault is pending and no
    /// shard's log is failed.
    ///
    /// # Errors
    /// Why the process does not take traffic now.
    pub fn readiness(&self) -> Result<(), String> {
        self.liveness()?;
        if let Some(r) = self
            .shard_reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .next()
        {
            return Err(format!(
                "storage fault: {r}; writes are refused until it recovers in place"
            ));
        }
        match self.phase.load(Ordering::Acquire) {
            STARTING => Err(format!(
                "starting: {} of {} shards up",
                self.shards_up.load(Ordering::Acquire).min(self.shards),
                self.shards
            )),
            DRAINING => Err("shutting down: draining connections".to_owned()),
            _ => Ok(()),
        }
    }

    /// The health gauges in Prometheus text.
    #[must_use]
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let name = "starling_ready";
        let _ = writeln!(
            s,
            "# HELP {name} 1 when the server takes traffic (what /readyz says), else 0.\n\
             # TYPE {name} gauge\n{name} {}",
            u8::from(self.readiness().is_ok())
        );
        let name = "starling_storage_failed";
        let _ = writeln!(
            s,
            "# HELP {name} 1 while the shard's log is failed (it refuses writes and recovers in \
             place), or once its index failed (the process then exits).\n\
             # TYPE {name} gauge"
        );
        for i in 0..self.shards {
            let _ = writeln!(
                s,
                "{name}{{shard=\"{i}\"}} {}",
                u8::from(self.storage_failed(i))
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_serving_with_every_shard_up_and_no_fault() {
        let h = Health::new(2);
        assert_eq!(
            h.readiness().unwrap_err(),
            "starting: 0 of 2 shards up".to_owned()
        );
        assert!(h.liveness().is_ok());
        h.shard_up();
        h.shard_up();
        h.serving();
        assert!(h.readiness().is_ok());
        assert!(h.render().contains("starling_ready 1\n"));
        h.draining();
        assert_eq!(
            h.readiness().unwrap_err(),
            "shutting down: draining connections"
        );
        assert!(h.liveness().is_ok());
        assert!(h.render().contains("starling_ready 0\n"));
    }

    #[test]
    fn a_failed_shard_log_is_not_ready_but_live_until_it_recovers() {
        let h = Health::new(2);
        let (tx, rx) = mpsc::channel();
        h.set_stop(tx);
        h.shard_up();
        h.shard_up();
        h.serving();
        h.shard_failed(1, "shard 1: log failed: disk full");
        assert!(!h.faulted());
        assert!(h.liveness().is_ok());
        assert_eq!(
            h.readiness().unwrap_err(),
            "storage fault: shard 1: log failed: disk full; writes are refused until it \
             recovers in place"
        );
        assert!(h.storage_failed(1) && !h.storage_failed(0));
        let m = h.render();
        assert!(
            m.contains("starling_storage_failed{shard=\"1\"} 1\n"),
            "{m}"
        );
        assert!(m.contains("starling_ready 0\n"), "{m}");
        assert!(rx.try_recv().is_err(), "the process does not stop");
        h.shard_recovered(1);
        assert!(h.readiness().is_ok());
        assert!(!h.storage_failed(1));
        let m = h.render();
        assert!(
            m.contains("starling_storage_failed{shard=\"1\"} 0\n"),
            "{m}"
        );
        assert!(m.contains("starling_ready 1\n"), "{m}");
    }

    #[test]
    fn the_first_fault_is_the_reason_and_stops_the_process_once() {
        let h = Health::new(2);
        let (tx, rx) = mpsc::channel();
        h.set_stop(tx);
        h.shard_up();
        h.shard_up();
        h.serving();
        assert!(!h.faulted());
        h.fault(Some(1), "shard 1: its message index stopped");
        h.fault(None, "meta.redb: previous I/O error");
        assert!(h.faulted());
        assert_eq!(
            h.liveness().unwrap_err(),
            "storage fault: shard 1: its message index stopped"
        );
        assert_eq!(h.readiness(), h.liveness());
        assert_eq!(
            rx.try_recv(),
            Ok(Stop::Fault("shard 1: its message index stopped".to_owned()))
        );
        assert!(rx.try_recv().is_err());
        let m = h.render();
        assert!(
            m.contains("starling_storage_failed{shard=\"0\"} 0\n"),
            "{m}"
        );
        assert!(
            m.contains("starling_storage_failed{shard=\"1\"} 1\n"),
            "{m}"
        );
        assert!(m.contains("starling_ready 0\n"), "{m}");
    }
}
