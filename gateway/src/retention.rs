//! The retention thread: every `storage.retention_sweep_ms` it asks each shard's
//! [`Reclaimer`] to remove the log segments whose every entry is past retention
//! (`storage.retention_secs`) or past its disappearing-messages expiry
//! (docs/design/retention.md). Serving already hides those entries; this gives their space back.
//!
//! It runs beside the shards and their log writers (a sweep touches only sealed segments and the
//! index's pointers into them) and is stopped, between sweeps, before the shards close their
//! stores (a store's close checkpoints its index, and a sweep writes the removal record).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use starling_storage::log::{Reclaimer, RetentionStats};

/// The longest the thread sleeps before looking at its stop flag, in ms.
const STOP_POLL_MS: u64 = 100;

/// The running retention thread.
#[derive(Debug)]
pub struct RetentionTask {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the thread over `reclaimers` (one per shard): a sweep every `sweep_ms` with the server
/// retention `retention_ms` (0: keep forever; entries with an expiry still go).
pub fn start(
    reclaimers: Vec<Arc<Reclaimer>>,
    retention_ms: u64,
    sweep_ms: u64,
) -> std::io::Result<RetentionTask> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || {
            let mut next = crate::clock::mono_ms() + sweep_ms;
            while !flag.load(Ordering::Acquire) {
                let now = crate::clock::mono_ms();
                if now < next {
                    std::thread::sleep(crate::clock::ms((next - now).min(STOP_POLL_MS)));
                    continue;
                }
                next = now + sweep_ms;
                sweep(&reclaimers, retention_ms, &flag);
            }
        })?;
    Ok(RetentionTask {
        stop,
        thread: Some(thread),
    })
}

/// One sweep of every shard, stopping early when asked to.
fn sweep(reclaimers: &[Arc<Reclaimer>], retention_ms: u64, stop: &AtomicBool) {
    for (shard, r) in reclaimers.iter().enumerate() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let now = crate::clock::unix_ms();
        match r.sweep(now, &|e| starling_router::keep_until(e, retention_ms)) {
            Ok(rep) if !rep.removed.is_empty() => tracing::info!(
                shard,
                segments = rep.removed.len(),
                bytes = rep.removed_bytes,
                oldest_kept_lsn = rep.oldest_kept.0,
                "retention removed log segments"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(shard, error = %e, "retention sweep failed; next one retries"),
        }
    }
}

impl RetentionTask {
    /// Stops the thread after the sweep in progress (if any) and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Asks the thread to stop without waiting for it (a storage fault: a sweep may be stuck
    /// on the failed disk, and the process is about to exit).
    pub fn stop_soon(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The counters of `reclaimers`, in shard order, for `/metrics`.
#[must_use]
pub fn stats(reclaimers: &[Arc<Reclaimer>]) -> Vec<Arc<RetentionStats>> {
    reclaimers.iter().map(|r| r.stats().clone()).collect()
}
