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

/// Whether entry `e` is no longer served at `now_ms`: its conversation's timer expired it, or
/// it is older than the server's retention (`retention_ms`, 0: keep forever).
pub(super) fn gone(e: &Entry, now_ms: u64, retention_ms: u64) -> bool {
    let expiry = expiry_of(e);
    (expiry != 0 && expiry <= now_ms)
        || (retention_ms != 0 && e.ts_ms.0.saturating_add(retention_ms) <= now_ms)
}

/// Until when (ms since the epoch) the log must keep entry `e` under a server retention of
/// `retention_ms` (0: forever): its expiry or the end of its retention, whichever comes first;
/// `u64::MAX` for an entry kept forever. The policy the gateway's retention sweeps give the
/// storage (`starling_storage::log::Reclaimer`); an entry is [`gone`] from then on.
pub fn keep_until(e: &Entry, retention_ms: u64) -> u64 {
    let by_timer = match expiry_of(e) {
        0 => u64::MAX,
        t => t,
    };
    let by_retention = match retention_ms {
        0 => u64::MAX,
        r => e.ts_ms.0.saturating_add(r),
    };
    by_timer.min(by_retention)
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
