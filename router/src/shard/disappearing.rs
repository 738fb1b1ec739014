//! Disappearing messages and the server's retention: which stored entries are gone, and the
//! conversation's disappearing-messages timer (see `docs/design/retention.md`).
//!
//! A timer change is a `Send` with `set_timer`. Like a change of a message (`changes.rs`) its
//! new setting is committed to the metadata first (a [`ConvTimer`] record), and only then is
//! its entry (envelope version 5) sequenced; the setting in force, which stamps the expiry of
//! every later message and change (envelope version 4), changes when the entry is sequenced,
//! so every message after the timer's entry carries it and none before does. A crash between
//! the two leaves a setting without its entry: a retry with the same `client_msg_id` finds the
//! setting already in force and sequences the entry without writing again.
//!
//! What is gone is decided when an entry is served ([`gone`]): an entry whose expiry passed, or
//! whose server timestamp is older than the server's retention, is skipped by history, sync,
//! the conversation list and the checks of a reply's or a change's target, whether or not its
//! bytes are still in the log.

use starling_protocol::limits::{DISAPPEARING_TIMER_SECS_MAX, DISAPPEARING_TIMER_SECS_MIN};
use starling_protocol::v1::{self, ErrorCode};
use std::sync::Arc;

use starling_storage::conv_delivered::ConvDelivered;
use starling_storage::conv_timer::ConvTimer;
use starling_storage::{CursorStore, Entry, MessageIndex, MetaBatch, MetadataStore, TimestampMs};

use super::changes::Prepared;
use super::envelope::expiry_of;
use super::frames::Refusal;
use super::mail::SendCmd;
use super::shared::{MetaTag, Shared};
use crate::metawriter::Job;

fn invalid(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorCode::InvalidArgument, msg.into())
}

/// At the ingress shard: a Send's timer change is consistent in itself and within the limits.
pub(super) fn check_request(s: &v1::Send) -> Result<(), Refusal> {
    let Some(t) = &s.set_timer else {
        return Ok(());
    };
    if s.change.is_some()
        || s.media.is_some()
        || s.reply_to_seq != 0
        || !s.body.is_empty()
        || !s.content_type.is_empty()
    {
        return Err(invalid(
            "a timer change (set_timer) carries no content_type, body, media, reply_to_seq or \
             change",
        ));
    }
    if t.seconds != 0
        && !(DISAPPEARING_TIMER_SECS_MIN..=DISAPPEARING_TIMER_SECS_MAX).contains(&t.seconds)
    {
        return Err(invalid(format!(
            "set_timer.seconds is {}: it must be 0 (off) or from {DISAPPEARING_TIMER_SECS_MIN} \
             to {DISAPPEARING_TIMER_SECS_MAX}",
            t.seconds
        )));
    }
    Ok(())
}

/// The server's retention (`storage.retention_secs`, `storage.retention_after_delivery_secs`;
/// docs/design/retention.md): how long an entry is kept after its server timestamp (0: no
/// bound), and how long after every member received it (`None`: no such bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Kept this long after its server timestamp, in ms (0: no bound).
    pub after_ts_ms: u64,
    /// Kept this long after every member received it, in ms (`None`: no bound).
    pub after_delivery_ms: Option<u64>,
}

/// Least and most time between two recorded steps of a conversation's delivery floor.
const DELIVERY_STEP_MS: (u64, u64) = (10_000, 300_000);

impl Retention {
    /// How often at most a conversation's delivery floor is recorded (`ConvDelivered`): a
    /// sixteenth of the delivery bound, from 10 s to 5 min. A message's recorded delivery time
    /// is late by at most this (so it goes at most this late), and a conversation whose
    /// members keep receiving costs one small metadata record per this interval.
    #[must_use]
    pub fn delivery_step_ms(&self) -> u64 {
        let d = self.after_delivery_ms.unwrap_or(0);
        (d / 16).clamp(DELIVERY_STEP_MS.0, DELIVERY_STEP_MS.1)
    }

    /// Until when (ms since the epoch) the log must keep entry `e`: the earliest of its
    /// disappearing-messages expiry, the end of its retention after its timestamp, and (if
    /// `delivered_at`: when every member had received it) the end of its retention after
    /// delivery; `u64::MAX` for an entry kept forever. The policy the gateway's retention
    /// sweeps give the storage (`starling_storage::log::Reclaimer`); an entry is gone
    /// (`Keep::gone`) from then on.
    #[must_use]
    pub fn keep_until(&self, e: &Entry, delivered_at: Option<u64>) -> u64 {
        let by_timer = match expiry_of(e) {
            0 => u64::MAX,
            t => t,
        };
        let by_ts = match self.after_ts_ms {
            0 => u64::MAX,
            r => e.ts_ms.0.saturating_add(r),
        };
        let by_delivery = match (self.after_delivery_ms, delivered_at) {
            (Some(d), Some(at)) => at.saturating_add(d),
            _ => u64::MAX,
        };
        by_timer.min(by_ts).min(by_delivery)
    }

    /// Whether [`Retention::keep_until`]'s answer for an entry can no longer come down: always,
    /// unless the policy has a bound after delivery and the entry was not received by every
    /// member yet (`delivered_at` is `None`).
    #[must_use]
    pub fn settled(&self, delivered_at: Option<u64>) -> bool {
        self.after_delivery_ms.is_none() || delivered_at.is_some()
    }
}

/// What decides, for one conversation at one moment, whether an entry is [`gone`].
pub(super) struct Keep {
    pub(super) now_ms: u64,
    pub(super) retention: Retention,
    /// The conversation's delivery-floor steps (`ConvDelivered`), if the policy uses them.
    pub(super) steps: Arc<[(u64, u64)]>,
}

impl Keep {
    /// Whether entry `e` is no longer served: expired by its conversation's timer, or past
    /// the server's retention.
    pub(super) fn gone(&self, e: &Entry) -> bool {
        let delivered_at = match self.retention.after_delivery_ms {
            Some(_) => ConvDelivered::delivered_at(&self.steps, e.seq.0),
            None => None,
        };
        let until = self.retention.keep_until(e, delivered_at);
        until != u64::MAX && until <= self.now_ms
    }
}

/// Whether entry `e` is no longer served at `now_ms` under the server's retention after its
/// timestamp alone (`retention_ms`, 0: keep forever): what the tests and the simulation's
/// model check; serving uses [`Keep::gone`], which also knows the conversation's deliveries.
#[cfg(test)]
pub(super) fn gone(e: &Entry, now_ms: u64, retention_ms: u64) -> bool {
    let until = keep_until(e, retention_ms);
    until != u64::MAX && until <= now_ms
}

/// [`Retention::keep_until`] under a retention after the timestamp alone (`retention_ms`, 0:
/// forever).
#[must_use]
pub fn keep_until(e: &Entry, retention_ms: u64) -> u64 {
    Retention {
        after_ts_ms: retention_ms,
        after_delivery_ms: None,
    }
    .keep_until(e, None)
}

/// The expiry of a message or change sequenced at `now_ms` under a timer of `secs` (0: none).
pub(super) fn expiry(now_ms: u64, secs: u64) -> u64 {
    if secs == 0 {
        0
    } else {
        now_ms.saturating_add(secs.saturating_mul(1000))
    }
}

/// At the owner, for a timer change that dedup did not answer (its sender may send in the
/// conversation: checked like any Send): the new setting is written first, then sequenced
/// ([`super::changes::committed`] brings it back with `change_ready`). When it is sequenced,
/// it becomes the setting in force.
pub(super) fn prepare<I, M>(sh: &mut Shared<I, M>, cmd: SendCmd) -> Result<Prepared, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let Some(secs) = cmd.set_timer else {
        return Ok(Prepared::Go(Box::new(cmd)));
    };
    let c = sh.conv(cmd.conv)?;
    if cmd.change_ready {
        c.seq.timer_secs = secs;
        return Ok(Prepared::Go(Box::new(cmd)));
    }
    // A retry of a timer change whose setting is being written waits for it.
    if let Some(parked) = c.seq.committing.get_mut(&cmd.cmid) {
        parked.push(cmd);
        return Ok(Prepared::Waiting);
    }
    // Nothing to write when the setting in force is this one and no other write is ahead of it
    // (a retry whose setting was written before a crash, or a setting made again): the entry
    // only. A write in flight is always followed by another, so that entries and settings stay
    // in the same order.
    if c.seq.timer_writes == 0 && c.seq.timer_secs == secs {
        return Ok(Prepared::Go(Box::new(cmd)));
    }
    if sh.writer.queued() >= sh.cfg.meta_jobs_max {
        return Err(Refusal(
            ErrorCode::Overloaded,
            "the server is writing too many changes; send it again".into(),
        ));
    }
    let now = sh.now_ms.max(cmd.now_ms);
    let rec = ConvTimer {
        conv: cmd.conv.storage(),
        secs,
        set_by: cmd.user,
        set_ts: TimestampMs(now),
        set_id: cmd.cmid,
    };
    let c = sh.conv(cmd.conv)?;
    c.seq.timer_writes += 1;
    c.seq.committing.insert(cmd.cmid, Vec::new());
    let mut batch = MetaBatch::default();
    batch.put(&rec);
    sh.writer.submit(
        &*sh.meta,
        Job::Commit { batch },
        MetaTag::Change(Box::new(cmd)),
    );
    Ok(Prepared::Waiting)
}

/// The setting in force for `conv` as the metadata has it (0: never set, or off).
pub(super) fn load<M: MetadataStore>(
    meta: &M,
    conv: starling_storage::ConvId,
) -> Result<u64, Refusal> {
    meta.get::<ConvTimer>(&ConvTimer::key_of(conv))
        .map(|r| r.map_or(0, |r| r.secs))
        .map_err(|e| Refusal::storage("disappearing timer", &e))
}

#[cfg(test)]
#[path = "disappearing_tests.rs"]
mod tests;
