//! Delivery and read cursors, and the receipts announced from them (see
//! `docs/design/messaging.md`, "Cursors and receipts").
//!
//! A `DeliveryAck` or `ReadCursor` goes from the ingress shard to the conversation's owner, which
//! moves the cursor in the conversation's state (`convs::ConvCursors`: clamped to the durable
//! end, monotonic) and marks it dirty. Dirty cursors are written in one batch per kind, at most
//! `cursor_flush_ms` after the first change or once `cursor_flush_max` wait, as a job for the
//! metadata writer, one batch at a time; only values that were written are announced as
//! receipts, so a receipt is never taken back by a crash. A request with a `request_id` gets one
//! answer: `Done` with the batch that made it durable, or an `Error` if that batch failed (the
//! cursor stays dirty and is retried).
//!
//! Under the server's retention after delivery, a batch also records the conversations whose
//! delivery floor ([`floor_of`]: what every member received) rose, as a `ConvDelivered` step
//! written after the cursors it comes from, at most one step per conversation per
//! `Retention::delivery_step_ms` (docs/design/retention.md, "Retention after delivery").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::{
    CursorStore, DeliveryCursor, DeviceId, MessageIndex, MetadataStore, ReadCursor, Seq, UserId,
};

use starling_storage::conv_delivered::ConvDelivered;

use super::convs::{ConvCursors, ConvState};
use super::frames::{Refusal, error_frame, frame};
use super::group_receipts::Pending;
use super::mail::{CursorCmd, CursorKind, FanoutItem, Inner};
use super::shared::{MetaTag, Shared};
use crate::hash::{HashMap, HashSet};
use crate::ids::{ConnRef, ConvId};
use crate::metawriter::{Job, Outcome, Written, unexpected_outcome};

/// The owner's cursors that are not written yet, and the requests waiting for them.
#[derive(Default)]
pub(super) struct Cursors {
    dirty_delivery: HashSet<(ConvId, UserId, DeviceId)>,
    dirty_read: HashSet<(ConvId, UserId)>,
    /// When the next batch is written, if one is scheduled.
    due_ms: Option<u64>,
    /// Cursor requests to answer (`Done`, or `Error` if it fails) with the next cursor batch.
    waiters: Vec<(ConnRef, u64)>,
    /// A cursor batch is with the metadata writer (one at a time).
    in_flight: bool,
    /// Groups whose senders' aggregate receipts are to be pushed (`group_receipts.rs`).
    groups: Pending,
    /// Conversations whose delivery floor rose above its last recorded step, by when the next
    /// step may be recorded (the server's retention after delivery; [`floor_of`]).
    floors_due: BTreeSet<(u64, ConvId)>,
    floor_due_of: HashMap<ConvId, u64>,
}

impl Cursors {
    /// When the next batch or group receipts push is due, if one is scheduled.
    pub(super) fn due_ms(&self) -> Option<u64> {
        [self.due_ms, self.groups.due_ms(), self.floor_due_ms()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Timer: writes the batch and pushes the group receipts that are due.
    pub(super) fn tick<I, M>(&mut self, sh: &mut Shared<I, M>)
    where
        M: MetadataStore + CursorStore,
    {
        if self.due_ms.is_some_and(|d| d <= sh.now_ms)
            || self.floor_due_ms().is_some_and(|d| d <= sh.now_ms)
        {
            self.flush(sh);
        }
        if self.groups.due_ms().is_some_and(|d| d <= sh.now_ms) {
            self.groups.push(sh);
        }
    }

    /// When the first delivery-floor step waiting for its granularity may be written (not
    /// while a batch is in flight: the next one goes when it lands).
    fn floor_due_ms(&self) -> Option<u64> {
        if self.in_flight {
            return None;
        }
        self.floors_due.first().map(|f| f.0)
    }

    /// Whether a batch is with the metadata writer.
    pub(super) fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Whether enough cursors wait to be written at once (`cursor_flush_max`).
    pub(super) fn is_full(&self, max: usize) -> bool {
        self.dirty_delivery.len() + self.dirty_read.len() >= max
    }

    /// Whether none of `conv`'s cursors, nor a step of its delivery floor, waits to be written.
    pub(super) fn is_clean(&self, conv: ConvId, c: &ConvCursors) -> bool {
        !self.floor_due_of.contains_key(&conv)
            && !c
                .delivery
                .keys()
                .any(|&(u, d)| self.dirty_delivery.contains(&(conv, u, d)))
            && !c.read.keys().any(|&u| self.dirty_read.contains(&(conv, u)))
    }

    /// At the ingress shard: a DeliveryAck or ReadCursor goes to its conversation's owner.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn route<I, M>(
        sh: &mut Shared<I, M>,
        origin: ConnRef,
        rid: u64,
        kind: CursorKind,
        user: UserId,
        device: DeviceId,
        conversation_id: u64,
        seq: u64,
    ) -> Result<(), Refusal> {
        let Some(conv) = ConvId::from_wire(conversation_id) else {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                "conversation_id is 0".into(),
            ));
        };
        let reply = (rid != 0).then_some((origin, rid));
        let cmd = CursorCmd {
            reply,
            kind,
            user,
            device,
            conv,
            seq,
        };
        let owner = sh.mail.owner(conv);
        sh.send_to(owner, Inner::Cursor(cmd));
        Ok(())
    }

    /// At the owner: moves the cursor (clamped to the durable end, never back) and schedules
    /// its write; the request's answer waits for the write.
    pub(super) fn on_cmd<I, M>(&mut self, sh: &mut Shared<I, M>, cmd: CursorCmd)
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        let c = match sh.member_conv(cmd.conv, cmd.user) {
            Ok(c) => c,
            Err(Refusal(code, msg)) => {
                if let Some((origin, rid)) = cmd.reply {
                    sh.reply(origin, vec![error_frame(rid, code, msg)]);
                }
                return;
            }
        };
        let seq = cmd.seq.min(c.seq.durable_seq);
        let moved = match cmd.kind {
            CursorKind::Delivered => {
                let v = c
                    .cursors
                    .delivery
                    .entry((cmd.user, cmd.device))
                    .or_default();
                let moved = seq > *v;
                *v = (*v).max(seq);
                let d = c.cursors.delivered.entry(cmd.user).or_default();
                *d = (*d).max(seq);
                if moved {
                    self.dirty_delivery.insert((cmd.conv, cmd.user, cmd.device));
                }
                moved
            }
            CursorKind::Read => {
                let v = c.cursors.read.entry(cmd.user).or_default();
                let moved = seq > *v;
                *v = (*v).max(seq);
                if moved {
                    self.dirty_read.insert((cmd.conv, cmd.user));
                }
                moved
            }
        };
        if let Some(w) = cmd.reply {
            self.waiters.push(w);
        }
        if (moved || cmd.reply.is_some()) && self.due_ms.is_none() {
            self.due_ms = Some(sh.now_ms + sh.cfg.cursor_flush_ms);
        }
    }

    /// Writes every changed cursor in one durable batch per kind (a job for the metadata
    /// writer), then announces receipts (only durable cursors are ever announced, so a receipt is
    /// never taken back by a crash) in [`Cursors::written`]. One batch is in flight
    /// at a time.
    pub(super) fn flush<I, M: MetadataStore + CursorStore>(&mut self, sh: &mut Shared<I, M>) {
        if self.in_flight {
            // The next batch goes when this one lands (`cursors_written` reschedules).
            self.due_ms = None;
            return;
        }
        let floors = self.floors(sh);
        if self.dirty_delivery.is_empty() && self.dirty_read.is_empty() && floors.is_empty() {
            self.due_ms = None;
            self.answer_waiters(sh);
            return;
        }
        let mut dc = Vec::new();
        for (conv, user, device) in std::mem::take(&mut self.dirty_delivery) {
            if let Some(c) = sh.convs.get(conv)
                && let Some(&s) = c.cursors.delivery.get(&(user, device))
            {
                dc.push(DeliveryCursor {
                    conv: conv.storage(),
                    user,
                    device,
                    seq: Seq(s),
                });
            }
        }
        let mut rc = Vec::new();
        for (conv, user) in std::mem::take(&mut self.dirty_read) {
            if let Some(c) = sh.convs.get(conv)
                && let Some(&s) = c.cursors.read.get(&user)
            {
                rc.push(ReadCursor {
                    conv: conv.storage(),
                    user,
                    seq: Seq(s),
                });
            }
        }
        let waiters = std::mem::take(&mut self.waiters);
        self.due_ms = None;
        self.in_flight = true;
        let job = Job::Cursors {
            delivery: dc.clone(),
            read: rc.clone(),
            floors: floors.clone(),
        };
        let tag = MetaTag::Cursors {
            delivery: dc,
            read: rc,
            floors,
            waiters,
        };
        sh.writer.submit(&*sh.meta, job, tag);
    }

    /// The delivery-floor steps to write with the next batch (the server's retention after
    /// delivery; `ConvDelivered`): for each conversation whose delivery cursors are in it or
    /// whose floor waited for its granularity, a new step if its floor rose and the last step
    /// is old enough; a floor that rose too soon after its last step waits in `floors_due`.
    fn floors<I, M>(&mut self, sh: &Shared<I, M>) -> Vec<ConvDelivered> {
        let retention = sh.cfg.retention();
        let Some(after) = retention.after_delivery_ms else {
            return Vec::new();
        };
        let step = retention.delivery_step_ms();
        let now = sh.now_ms;
        let mut convs: BTreeSet<ConvId> = self.dirty_delivery.iter().map(|k| k.0).collect();
        while let Some(&(due, conv)) = self.floors_due.first()
            && due <= now
        {
            self.floors_due.pop_first();
            self.floor_due_of.remove(&conv);
            convs.insert(conv);
        }
        let mut out = Vec::new();
        for conv in convs {
            let Some(c) = sh.convs.get(conv) else {
                continue;
            };
            let floor = floor_of(c);
            let steps = &c.cursors.steps;
            if let Some(steps) = ConvDelivered::advanced(steps, floor, now, step, after) {
                if let Some(due) = self.floor_due_of.remove(&conv) {
                    self.floors_due.remove(&(due, conv));
                }
                out.push(ConvDelivered {
                    conv: conv.storage(),
                    steps,
                });
            } else if ConvDelivered::behind(steps, floor) && !self.floor_due_of.contains_key(&conv)
            {
                let due = steps
                    .last()
                    .map_or(now, |l| l.1.saturating_add(step))
                    .max(now);
                self.floors_due.insert((due, conv));
                self.floor_due_of.insert(conv, due);
            }
        }
        out
    }

    /// Steps whose write failed are tried again with the next batch.
    fn floors_failed<I, M>(&mut self, sh: &Shared<I, M>, floors: &[ConvDelivered]) {
        for f in floors {
            let conv = ConvId::from_storage(f.conv);
            if !self.floor_due_of.contains_key(&conv) {
                let due = sh.now_ms + sh.cfg.cursor_flush_ms;
                self.floors_due.insert((due, conv));
                self.floor_due_of.insert(conv, due);
            }
        }
    }

    /// The metadata writer's outcome for the batch in flight.
    pub(super) fn batch_done<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        outcome: Outcome,
        delivery: Vec<DeliveryCursor>,
        read: Vec<ReadCursor>,
        floors: Vec<ConvDelivered>,
        waiters: Vec<(ConnRef, u64)>,
    ) {
        self.in_flight = false;
        let outcome = outcome.and_then(|w| match w {
            Written::Cursors => Ok(()),
            w => Err(unexpected_outcome(&w)),
        });
        if outcome.is_ok() {
            // Durable now: what serving hides from (`Shared::keep`).
            for f in floors {
                if let Some(c) = sh.convs.get_mut(ConvId::from_storage(f.conv)) {
                    c.cursors.steps = Arc::from(f.steps);
                }
            }
        } else {
            self.floors_failed(sh, &floors);
        }
        self.written(sh, outcome, delivery, read, waiters);
        if !self.dirty_delivery.is_empty()
            || !self.dirty_read.is_empty()
            || !self.waiters.is_empty()
        {
            // Updates that arrived meanwhile: give them their own batch soon.
            let due = sh.now_ms + sh.cfg.cursor_flush_ms;
            self.due_ms = Some(self.due_ms.map_or(due, |d| d.min(due)));
        }
    }

    /// A cursor batch was written or not: announce receipts for what is now durable, or put the
    /// batch back to be retried (cursors are monotonic and idempotent). Either way every request
    /// that waited for the batch gets its one answer: `Done`, or the `Error` saying its cursor
    /// was not recorded (the client may send it again; the server also keeps retrying it).
    fn written<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        outcome: Result<(), Refusal>,
        dc: Vec<DeliveryCursor>,
        rc: Vec<ReadCursor>,
        waiters: Vec<(ConnRef, u64)>,
    ) {
        if let Err(Refusal(code, msg)) = outcome {
            for c in dc {
                self.dirty_delivery
                    .insert((ConvId::from_storage(c.conv), c.user, c.device));
            }
            for c in rc {
                self.dirty_read
                    .insert((ConvId::from_storage(c.conv), c.user));
            }
            for (origin, rid) in waiters {
                sh.reply(origin, vec![error_frame(rid, code, msg.clone())]);
            }
            self.due_ms = Some(sh.now_ms + sh.cfg.cursor_flush_ms);
            return;
        }
        sh.stats.cursor_flushes += 1;
        for (origin, rid) in waiters {
            sh.reply(origin, vec![frame(rid, Body::Done(v1::Done {}))]);
        }
        // Announce only values that were written: in-memory cursors may already be ahead.
        let mut delivered: BTreeMap<(ConvId, UserId), u64> = BTreeMap::new();
        for c in &dc {
            let d = delivered
                .entry((ConvId::from_storage(c.conv), c.user))
                .or_default();
            *d = (*d).max(c.seq.0);
        }
        let mut items = Vec::new();
        let coalesce_ms = sh.cfg.group_receipts_coalesce_ms;
        for ((conv, user), d) in delivered {
            let Some(c) = sh.convs.get_mut(conv) else {
                continue;
            };
            let prev = c.cursors.announced_delivered.entry(user).or_default();
            if d > *prev {
                *prev = d;
                if c.group.is_some() {
                    // Counted for the senders, not pushed to every member.
                    self.groups.mark(conv, sh.now_ms, coalesce_ms);
                    continue;
                }
                let to = c.members.iter().copied().filter(|u| *u != user).collect();
                items.push(FanoutItem::Receipt {
                    receipt: receipt(conv, d, v1::ReceiptKind::Delivered, user, sh.now_ms),
                    to,
                });
            }
        }
        let mut reads: Vec<(ConvId, UserId, u64)> = rc
            .iter()
            .map(|c| (ConvId::from_storage(c.conv), c.user, c.seq.0))
            .collect();
        reads.sort_unstable();
        for (conv, user, r) in reads {
            let Some(c) = sh.convs.get_mut(conv) else {
                continue;
            };
            let prev = c.cursors.announced_read.entry(user).or_default();
            if r > *prev {
                *prev = r;
                let to = if c.group.is_some() {
                    // The reader's other devices learn it; the senders get counts.
                    self.groups.mark(conv, sh.now_ms, coalesce_ms);
                    vec![user]
                } else {
                    c.members.to_vec()
                };
                items.push(FanoutItem::Receipt {
                    receipt: receipt(conv, r, v1::ReceiptKind::Read, user, sh.now_ms),
                    to,
                });
            }
        }
        sh.mail.broadcast(items);
    }

    fn answer_waiters<I, M>(&mut self, sh: &mut Shared<I, M>) {
        for (origin, rid) in std::mem::take(&mut self.waiters) {
            sh.reply(origin, vec![frame(rid, Body::Done(v1::Done {}))]);
        }
    }
}

/// A receipt: `by` has received (or read) `conv` up to `up_to`.
pub(super) fn receipt(
    conv: ConvId,
    up_to: u64,
    kind: v1::ReceiptKind,
    by: UserId,
    now: u64,
) -> v1::Receipt {
    v1::Receipt {
        conversation_id: conv.0,
        up_to_seq: up_to,
        kind: kind as i32,
        by_user_id: by.0,
        ts_ms: now,
    }
}

/// The highest seq every member of `c` has received (the server's retention after delivery):
/// the lowest, over the members, of the highest delivery cursor of any of their devices, a
/// group member counting as having what came before its join. At most the durable end.
pub(super) fn floor_of(c: &ConvState) -> u64 {
    c.members
        .iter()
        .filter_map(|&u| {
            let from = c.visible(u).ok()?.0;
            let got = c.cursors.delivered.get(&u).copied().unwrap_or(0);
            Some(got.max(from.saturating_sub(1)))
        })
        .min()
        .unwrap_or(u64::MAX)
        .min(c.seq.durable_seq)
}

#[cfg(test)]
mod tests {
    use starling_protocol::v1::{self, ErrorCode, frame::Body};

    use super::super::ShardConfig;
    use super::super::fixture::{GROUP, answers, drive_until, read_cursor, sent, shard};
    use crate::ids::ConnId;

    fn receipts(out: &[(ConnId, v1::Frame)]) -> Vec<(ConnId, i32, u64, u64)> {
        out.iter()
            .filter_map(|(c, f)| match &f.body {
                Some(Body::Receipt(r)) => Some((*c, r.kind, r.by_user_id, r.up_to_seq)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn cursors_are_clamped_to_the_durable_end_never_move_back_and_are_announced_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        sent(&mut s, &mut now, 1..=1);
        // Read up to 5 of a conversation with one message: read up to 1.
        read_cursor(&mut s, now, 7, 5);
        let out = drive_until(&mut s, &mut now, |_, f| f.request_id == 7);
        assert!(matches!(answers(&out, ConnId(2), 7)[..], [Body::Done(_)]));
        let read = v1::ReceiptKind::Read as i32;
        // In a group only the reader's own devices hear it (its other devices sync); the
        // sender gets counts instead.
        let mut got = receipts(&out);
        got.sort_unstable();
        assert_eq!(got, [(ConnId(2), read, 2, 1)]);
        // Backwards: answered, nothing announced.
        read_cursor(&mut s, now, 8, 0);
        let out = drive_until(&mut s, &mut now, |_, f| f.request_id == 8);
        assert!(matches!(answers(&out, ConnId(2), 8)[..], [Body::Done(_)]));
        assert!(receipts(&out).is_empty());
        // A delivery ack goes to the others only.
        let ack = v1::Frame {
            request_id: 9,
            body: Some(Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: GROUP.0,
                up_to_seq: 1,
            })),
        };
        s.handle_frame(ConnId(2), ack, now);
        let mut out = drive_until(&mut s, &mut now, |_, f| f.request_id == 9);
        // No member's cursor is pushed to the others in a group.
        assert!(receipts(&out).is_empty());
        assert_eq!(s.stats().cursor_flushes, 2);
        // The sender (user 1) gets one coalesced count: 1 of 1 recipient received and read it.
        let until = now + ShardConfig::default().group_receipts_coalesce_ms + 10;
        while now < until {
            now += 5;
            s.handle_tick(now);
            while let Some(t) = s.poll_transmit() {
                out.push((t.conn, t.frame().unwrap()));
            }
        }
        let counts: Vec<_> = out
            .iter()
            .filter_map(|(c, f)| match &f.body {
                Some(Body::GroupReceipts(g)) => Some((*c, g.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(counts[0].0, ConnId(1));
        let m = &counts[0].1.messages;
        assert_eq!(
            (m[0].seq, m[0].delivered, m[0].read, m[0].recipients),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn a_cursor_request_whose_write_fails_is_answered_once_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        sent(&mut s, &mut now, 1..=1);
        meta.set_fail_writes(true);
        read_cursor(&mut s, now, 7, 1);
        let mut out = drive_until(&mut s, &mut now, |_, f| f.request_id == 7);
        // The write keeps failing and is retried: no second answer meanwhile.
        for _ in 0..100 {
            s.handle_log_progress(now);
            s.handle_tick(now);
            while let Some(t) = s.poll_transmit() {
                out.push((t.conn, t.frame().unwrap()));
            }
            now += 5;
        }
        let got = answers(&out, ConnId(2), 7);
        assert_eq!(got.len(), 1, "{got:?}");
        let Body::Error(e) = got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(e.code, ErrorCode::StorageFailure as i32);
        assert!(e.message.contains("not recorded"), "{}", e.message);
        // The store recovers: the retried cursor lands (the read receipt goes out); the request
        // sent again is answered Done.
        meta.set_fail_writes(false);
        read_cursor(&mut s, now, 8, 1);
        let out = drive_until(&mut s, &mut now, |_, f| f.request_id == 8);
        assert!(
            matches!(answers(&out, ConnId(2), 8)[..], [Body::Done(_)]),
            "{out:?}"
        );
        assert!(answers(&out, ConnId(2), 7).is_empty());
    }
}
