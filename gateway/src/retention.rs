//! The retention thread: every `storage.retention_sweep_ms` it asks each shard's
//! [`Reclaimer`] to remove the log segments whose every entry is past retention
//! (`storage.retention_secs` after its timestamp, `storage.retention_after_delivery_secs` after
//! every member received it) or past its disappearing-messages expiry
//! (docs/design/retention.md). Serving already hides those entries; this gives their space back.
//!
//! When an entry was received by everyone is read from its conversation's delivery steps
//! (`ConvDelivered`, recorded by the conversation's owner), once per conversation per sweep;
//! an entry not received yet may be received by the next sweep, so a segment holding one is
//! read again then (`Reclaimer::sweep_unsettled`).
//!
//! It runs beside the shards and their log writers (a sweep touches only sealed segments and the
//! index's pointers into them) and is stopped, between sweeps, before the shards close their
//! stores (a store's close checkpoints its index, and a sweep writes the removal record).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use starling_router::Retention;
use starling_storage::conv_delivered::ConvDelivered;
use starling_storage::log::{Reclaimer, RetentionStats};
use starling_storage::{ConvId, EmbeddedMeta, Entry, MetadataStore};

/// The longest the thread sleeps before looking at its stop flag, in ms.
const STOP_POLL_MS: u64 = 100;

/// The running retention thread.
#[derive(Debug)]
pub struct RetentionTask {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the thread over `reclaimers` (one per shard): a sweep every `sweep_ms` with the
/// server's `retention` (entries with an expiry go whatever it is), reading delivery steps from
/// `meta`.
pub fn start(
    reclaimers: Vec<Arc<Reclaimer>>,
    retention: Retention,
    meta: Arc<EmbeddedMeta>,
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
                sweep(&reclaimers, retention, &*meta, &flag);
            }
        })?;
    Ok(RetentionTask {
        stop,
        thread: Some(thread),
    })
}

/// One sweep of every shard, stopping early when asked to.
fn sweep<M: MetadataStore>(
    reclaimers: &[Arc<Reclaimer>],
    retention: Retention,
    meta: &M,
    stop: &AtomicBool,
) {
    for (shard, r) in reclaimers.iter().enumerate() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let now = crate::clock::unix_ms();
        let steps = Steps::new(meta, retention);
        let keep = |e: &Entry| {
            let at = steps.delivered_at(e);
            (retention.keep_until(e, at), retention.settled(at))
        };
        match r.sweep_unsettled(now, &keep) {
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

/// The conversations' delivery steps as one sweep reads them (each at most once). A step that
/// cannot be read counts as none: the entry is kept, and the next sweep asks again.
struct Steps<'m, M> {
    meta: &'m M,
    on: bool,
    read: RefCell<HashMap<ConvId, Vec<(u64, u64)>>>,
}

impl<'m, M: MetadataStore> Steps<'m, M> {
    fn new(meta: &'m M, retention: Retention) -> Self {
        Steps {
            meta,
            on: retention.after_delivery_ms.is_some(),
            read: RefCell::new(HashMap::new()),
        }
    }

    /// When every member of its conversation had received `e`, if they have.
    fn delivered_at(&self, e: &Entry) -> Option<u64> {
        if !self.on {
            return None;
        }
        let mut read = self.read.borrow_mut();
        let steps = read.entry(e.conv).or_insert_with(|| {
            match self.meta.get::<ConvDelivered>(&ConvDelivered::key_of(e.conv)) {
                Ok(r) => r.map(|r| r.steps).unwrap_or_default(),
                Err(err) => {
                    tracing::warn!(conv = e.conv.0, error = %err, "delivery steps unreadable; kept");
                    Vec::new()
                }
            }
        });
        ConvDelivered::delivered_at(steps, e.seq.0)
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
