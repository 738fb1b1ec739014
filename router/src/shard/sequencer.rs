//! The sequencer: a conversation's messages get their seqs at its owner shard, in one open
//! batch per shard that goes to the shard's log as one record; a message's `SendAck` and its
//! fan-out wait until the batch is durable (see `docs/design/messaging.md`, "The path of one
//! message").
//!
//! It owns the shard's log, the open batch and the batches the log has in flight; a
//! conversation's counters, not-yet-durable Sends and durable tail are its part of the
//! conversation's state (`convs::ConvSeq`). Dedup answers a retry with the original seq from
//! the Sends in flight, the durable tail, or the index (skipped for a Send marked
//! `first_attempt`). When the log fails, every waiting Send hears the truth (outcome unknown,
//! or not stored) and nothing more is sequenced until the log is reopened in place
//! (`RouterShard::storage_recovered`), cut back to what it had made durable.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::format;
use starling_storage::{
    Completion, CursorStore, DurableLog, Entry, EntryKind, LogError, Lsn, MessageIndex,
    MetadataStore, Seq, SyncData, TimestampMs,
};

use super::blocks;
use super::changes;
use super::config::ShardConfig;
use super::disappearing;
use super::envelope::{
    ENVELOPE_V3, ENVELOPE_V5, encode_change, encode_envelope, encode_timer, entry_to_message,
    expiry_of, is_change, is_timer, with_expiry,
};
use super::frames::{Refusal, error_frame, frame};
use super::groups;
use super::mail::{FanoutItem, SendCmd};
use super::reader::{Got, Want, dedup_lookup};
use super::shared::Notice;
use super::shared::Shared;
use crate::ids::{ConnId, ConnRef, ConvId};
use starling_storage::UserId;

/// `STORAGE_FAILURE` for a Send whose batch the log had taken when it failed.
pub const STORAGE_OUTCOME_UNKNOWN: &str = "storage failed while this message was being made \
     durable: the outcome is unknown. Retry with the same client_msg_id and first_attempt = false \
     in a few seconds: the answer is the original SendAck (duplicate = true) if it was stored, \
     or a new SendAck if it was not";
/// `STORAGE_FAILURE` for a Send still waiting for the log when it failed.
pub const STORAGE_NOT_STORED: &str = "storage failed before this message was written: it was \
     not stored. Retry with the same client_msg_id in a few seconds";
/// `STORAGE_FAILURE` for a Send that reached a shard whose log had already failed.
pub const STORAGE_SHARD_FAILED: &str = "this conversation's log has failed and is being \
     recovered: the message was not stored. Retry with the same client_msg_id in a few seconds";

/// A Send waiting for its SendAck: until its batch is durable (a retry of a Send still in
/// flight waits for the original's batch).
struct Waiter {
    origin: ConnRef,
    request_id: u64,
    conv: ConvId,
    seq: u64,
    ts: u64,
    /// The entry's expiry (`disappearing.rs`; 0: never).
    expires: u64,
    /// The `client_msg_id` as the frame carried it.
    cmid_bytes: Bytes,
    duplicate: bool,
}

/// The batch being filled (number `no`): the entries of the Sends sequenced since the last one
/// went to the log.
struct OpenBatch {
    no: u64,
    entries: Vec<Entry>,
    /// What `entries` take in the log record (`format::entry_bytes` of each).
    bytes: usize,
    /// For each of `entries`: the message as its recipients get it (built from the Send, not
    /// decoded back from the entry's envelope; debug builds check the two agree), the
    /// connection that sent it (its SendAck goes there, its Deliver does not) and who gets it:
    /// the conversation's members when it got its seq.
    fresh: Vec<Fresh>,
    waiters: Vec<Waiter>,
    /// The group events among `entries` (conversation, seq).
    events: Vec<(ConvId, u64)>,
}

/// A sequenced entry as fan-out pushes it: the message, the connection that sent it, and the
/// members at its seq.
type Fresh = (v1::Message, ConnRef, Arc<[UserId]>);

/// The origin of an entry no connection sent (a group event): it matches no connection, so
/// every member's devices get the event.
const NO_ORIGIN: ConnRef = ConnRef {
    shard: usize::MAX,
    conn: ConnId(0),
};

/// A batch the log has; `completion` resolves once it is durable, or failed.
struct InFlight {
    no: u64,
    completion: Completion<SyncData>,
    entries: Vec<Entry>,
    fresh: Vec<Fresh>,
    waiters: Vec<Waiter>,
    events: Vec<(ConvId, u64)>,
}

/// The shard's log and the batches on their way into it.
pub(super) struct Sequencer<L> {
    log: L,
    open: OpenBatch,
    inflight: VecDeque<InFlight>,
    /// Why the log failed, once it did.
    failed: Option<String>,
    /// Group events made durable and not yet taken by the groups concern (conversation, seq).
    events_durable: Vec<(ConvId, u64)>,
}

impl<L> Sequencer<L> {
    pub(super) fn new(log: L) -> Self {
        Sequencer {
            log,
            open: OpenBatch {
                no: 0,
                entries: Vec::new(),
                bytes: 0,
                fresh: Vec::new(),
                waiters: Vec::new(),
                events: Vec::new(),
            },
            inflight: VecDeque::new(),
            failed: None,
            events_durable: Vec::new(),
        }
    }

    pub(super) fn log(&self) -> &L {
        &self.log
    }

    pub(super) fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }

    /// Why the log failed, if it did.
    pub(super) fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The log was reopened in place: `log` (ending at the last lsn the failed one made
    /// durable) replaces it and sequencing resumes. Returns the failed log. Nothing is in
    /// flight or open: the failure answered and dropped all of it.
    pub(super) fn replace_failed(&mut self, log: L) -> L {
        debug_assert!(self.inflight.is_empty() && self.open.entries.is_empty());
        self.failed = None;
        std::mem::replace(&mut self.log, log)
    }

    /// The group events made durable since the last call (conversation, seq), in seq order.
    pub(super) fn take_durable_events(&mut self) -> Vec<(ConvId, u64)> {
        std::mem::take(&mut self.events_durable)
    }

    /// Batches the log has and has not made durable yet.
    pub(super) fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// When the open batch wants to be submitted again (it is waiting for a log that pushed
    /// back), if it holds anything.
    pub(super) fn due_ms(&self, now_ms: u64) -> Option<u64> {
        (!self.open.entries.is_empty()).then_some(now_ms + 1)
    }

    /// Whether the open batch is full (`batch_entries_max` entries or `batch_bytes_max` bytes):
    /// it goes to the log at once instead of at the next flush.
    pub(super) fn is_full(&self, cfg: &ShardConfig) -> bool {
        self.open.entries.len() >= cfg.batch_entries_max || self.open.bytes >= cfg.batch_bytes_max
    }
}

impl<L: DurableLog> Sequencer<L> {
    /// At the owner: sequences `cmd` into the open batch (its SendAck waits for the batch to be
    /// durable), answers a retry from dedup, or refuses it.
    pub(super) fn on_send<I, M>(&mut self, sh: &mut Shared<I, M>, cmd: SendCmd)
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        let (origin, request_id) = (cmd.origin, cmd.request_id);
        if let Err(Refusal(code, msg)) = self.sequence(sh, cmd) {
            sh.reply(origin, vec![error_frame(request_id, code, msg)]);
        }
    }

    fn sequence<I, M>(&mut self, sh: &mut Shared<I, M>, cmd: SendCmd) -> Result<(), Refusal>
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        if self.failed.is_some() {
            return Err(Refusal(
                ErrorCode::StorageFailure,
                STORAGE_SHARD_FAILED.into(),
            ));
        }
        let index = sh.index.clone();
        let meta = sh.meta.clone();
        let open_no = self.open.no;
        let open_len = self.open.entries.len();
        let open_max = sh.cfg.open_entries_max;
        let open_bytes = self.open.bytes;
        let open_bytes_max = sh.cfg.open_bytes_max.min(format::RECORD_PAYLOAD_BYTES_MAX);
        let now = sh.now_ms.max(cmd.now_ms);
        blocks::take_read(sh, cmd.conv)?;
        let c = sh.member_conv(cmd.conv, cmd.user)?;
        blocks::check_send(&*meta, c, cmd.user)?;
        groups::check_send(c, cmd.user)?;
        let mut waiter = Waiter {
            origin: cmd.origin,
            request_id: cmd.request_id,
            conv: cmd.conv,
            seq: 0,
            ts: 0,
            expires: 0,
            cmid_bytes: cmd.cmid_bytes.clone(),
            duplicate: true,
        };
        // Dedup: pending (not yet durable) → answer when durable; recent or indexed → answer now.
        if let Some(&(seq, ts, expires, no)) = c.seq.pending.get(&cmd.cmid) {
            waiter.seq = seq;
            waiter.ts = ts;
            waiter.expires = expires;
            sh.stats.duplicates += 1;
            if no == open_no {
                self.open.waiters.push(waiter);
            } else if let Some(b) = self.inflight.iter_mut().find(|b| b.no == no) {
                b.waiters.push(waiter);
            }
            return Ok(());
        }
        let known = match c.seq.recent_ids.get(&cmd.cmid) {
            Some(&(seq, ts, expires)) => Some((seq, ts, expires)),
            // The device promises no earlier copy exists beyond the in-memory ones above: a
            // first attempt costs no index read (the index is the slow, cache-missing part).
            None if cmd.first_attempt => None,
            // A change whose state was written: its dedup lookup found no copy before the write,
            // and every copy since waited for it (`changes.rs`, `committing`).
            None if cmd.change_ready => None,
            // Read off the shard thread for this Send (`reads.rs`), or here if unforeseen.
            None => {
                let key = Want::Dedup {
                    conv: cmd.conv,
                    cmid: cmd.cmid,
                };
                match sh.got.remove(&key) {
                    Some(Got::Dedup(r)) => r?,
                    _ => {
                        sh.stats.inline_reads += 1;
                        dedup_lookup(&*index, cmd.conv, cmd.cmid)?
                    }
                }
            }
        };
        if let Some((seq, ts, expires)) = known {
            waiter.seq = seq;
            waiter.ts = ts;
            waiter.expires = expires;
            sh.stats.duplicates += 1;
            let f = ack_frame(waiter);
            sh.reply(cmd.origin, vec![f]);
            return Ok(());
        }
        // A reply's target, and a change's target and rules (a change's new state is written
        // before the change is sequenced: it comes back through here once it is).
        let cmd = if cmd.reply_to_seq != 0 || cmd.change.is_some() || cmd.set_timer.is_some() {
            match changes::prepare(sh, cmd)? {
                changes::Prepared::Go(cmd) => *cmd,
                changes::Prepared::Waiting => return Ok(()),
            }
        } else {
            cmd
        };
        let c = sh.conv(cmd.conv)?;
        // A message sequenced under a timer disappears (`disappearing.rs`); a change goes with
        // its target; a timer change never does.
        let expires_at_ms = match (&cmd.change, cmd.set_timer) {
            (_, Some(_)) => 0,
            (Some(_), None) => cmd.target_expiry_ms,
            (None, None) => disappearing::expiry(now, c.seq.timer_secs),
        };
        let (envelope, body) = match (&cmd.change, cmd.set_timer) {
            (_, Some(secs)) => (ENVELOPE_V5, encode_timer(secs)),
            (Some(ch), None) => with_expiry(
                expires_at_ms,
                (ENVELOPE_V3, encode_change(&cmd.content_type, ch, &cmd.body)),
            ),
            (None, None) => with_expiry(
                expires_at_ms,
                encode_envelope(
                    &cmd.content_type,
                    cmd.reply_to_seq,
                    cmd.media.as_deref(),
                    &cmd.body,
                ),
            ),
        };
        let entry_bytes = format::ENTRY_HEADER_BYTES + body.len();
        if open_len >= open_max || open_bytes + entry_bytes > open_bytes_max {
            return Err(Refusal(
                ErrorCode::Overloaded,
                "the sequencer is behind its log; retry shortly".into(),
            ));
        }
        let seq = c.seq.next_seq;
        c.seq.next_seq += 1;
        c.seq
            .pending
            .insert(cmd.cmid, (seq, now, expires_at_ms, open_no));
        waiter.seq = seq;
        waiter.ts = now;
        waiter.expires = expires_at_ms;
        waiter.duplicate = false;
        self.open.entries.push(Entry {
            kind: EntryKind::MESSAGE,
            conv: cmd.conv.storage(),
            seq: Seq(seq),
            client_msg_id: cmd.cmid,
            sender: cmd.user,
            sender_device: cmd.device,
            ts_ms: TimestampMs(now),
            content_type: envelope,
            body,
        });
        self.open.bytes += entry_bytes;
        self.open.fresh.push((
            v1::Message {
                conversation_id: cmd.conv.0,
                seq,
                sender_user_id: cmd.user.0,
                sender_device_id: cmd.device.0,
                client_msg_id: cmd.cmid_bytes,
                server_ts_ms: now,
                content_type: cmd.content_type,
                body: cmd.body,
                media: cmd.media,
                reply_to_seq: cmd.reply_to_seq,
                group_changed: None,
                change: cmd.change,
                timer_changed: cmd
                    .set_timer
                    .map(|seconds| Box::new(v1::DisappearingTimer { seconds })),
                expires_at_ms,
                ..v1::Message::default()
            },
            cmd.origin,
            c.members.clone(),
        ));
        self.open.waiters.push(waiter);
        Ok(())
    }

    /// At the owner: sequences the event of `conv`'s change to `version` by `by` (`body`: the
    /// encoded event) into the open batch, for `audience`; its durability is reported by
    /// [`Sequencer::take_durable_events`]. Returns its seq. Refused only when the log has
    /// failed (an event is never refused for a full batch: one change per group is in flight).
    pub(super) fn on_event<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        conv: ConvId,
        version: u64,
        by: UserId,
        body: Vec<u8>,
        audience: Arc<[UserId]>,
    ) -> Result<u64, Refusal>
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        if self.failed.is_some() {
            return Err(Refusal(
                ErrorCode::StorageFailure,
                STORAGE_SHARD_FAILED.into(),
            ));
        }
        let now = sh.now_ms;
        let open_no = self.open.no;
        let c = sh.conv(conv)?;
        let seq = c.seq.next_seq;
        let e = groups::event::entry(conv, seq, version, by, now, body);
        let Some(msg) = groups::event::to_message(conv, &e) else {
            return Err(Refusal(
                ErrorCode::Internal,
                "a group event that does not decode".into(),
            ));
        };
        c.seq.next_seq += 1;
        c.seq
            .pending
            .insert(e.client_msg_id, (seq, now, 0, open_no));
        self.open.bytes += format::ENTRY_HEADER_BYTES + e.body.len();
        self.open.entries.push(e);
        self.open.fresh.push((msg, NO_ORIGIN, audience));
        self.open.events.push((conv, seq));
        Ok(seq)
    }

    /// Hands the open batch to the log (unless it is empty or the log failed); a log that pushes
    /// back (`Busy`) gets it again at the next flush or tick.
    pub(super) fn submit<I, M>(&mut self, sh: &mut Shared<I, M>) {
        if self.open.entries.is_empty() || self.failed.is_some() {
            return;
        }
        match self.log.append::<SyncData>(&self.open.entries) {
            Ok(completion) => {
                let no = self.open.no;
                // The next batch starts with this one's capacity: grown from empty, each batch
                // reallocated (and copied) its vectors ~log2(n) times.
                let entries = take_sized(&mut self.open.entries);
                let fresh = take_sized(&mut self.open.fresh);
                let waiters = take_sized(&mut self.open.waiters);
                let events = std::mem::take(&mut self.open.events);
                self.open.bytes = 0;
                self.inflight.push_back(InFlight {
                    no,
                    completion,
                    entries,
                    fresh,
                    waiters,
                    events,
                });
                self.open.no += 1;
            }
            Err(LogError::Busy { .. }) => {} // retried at the next flush / tick
            Err(e) => self.fail(sh, &e),
        }
    }

    /// Takes what the log made durable (or its failure), batch by batch in order.
    pub(super) fn poll_log<I, M>(&mut self, sh: &mut Shared<I, M>) {
        while let Some(front) = self.inflight.front() {
            match front.completion.try_complete() {
                None => break,
                Some(Ok(appended)) => {
                    let Some(mut b) = self.inflight.pop_front() else {
                        break;
                    };
                    self.events_durable.append(&mut b.events);
                    debug_assert_eq!(
                        appended.last_lsn().0 + 1 - appended.first_lsn().0,
                        b.entries.len() as u64
                    );
                    Self::durable(sh, appended.first_lsn(), b);
                }
                Some(Err(e)) => {
                    self.fail(sh, &e);
                    break;
                }
            }
        }
    }

    /// Batch `b` is durable from `first` on: its messages join their conversations' durable
    /// tails and go to fan-out, its waiters get their SendAcks.
    fn durable<I, M>(sh: &mut Shared<I, M>, first: Lsn, b: InFlight) {
        debug_assert_eq!(b.entries.len(), b.fresh.len());
        let mut items = Vec::with_capacity(b.entries.len());
        for (i, (e, (msg, origin, members))) in b.entries.into_iter().zip(b.fresh).enumerate() {
            let lsn = Lsn(first.0 + i as u64);
            let conv = ConvId::from_storage(e.conv);
            let Some(c) = sh.convs.get_mut(conv) else {
                continue;
            };
            debug_assert_eq!(
                e.seq.0,
                c.seq.durable_seq + 1,
                "seqs become durable in order"
            );
            // What a Sync or a history page will read back from the log is what is pushed now.
            debug_assert_eq!(entry_to_message(conv, &e).as_ref(), Some(&msg));
            c.seq.durable_seq = e.seq.0;
            // A change, or a timer change: not a new message.
            let change = is_change(&e) || is_timer(&e);
            if c.group.is_some() && e.kind == EntryKind::MESSAGE && !change {
                c.cursors.sent.record(e.seq.0, e.sender);
            }
            c.seq.pending.remove(&e.client_msg_id);
            c.seq
                .recent_ids
                .insert(e.client_msg_id, (e.seq.0, e.ts_ms.0, expiry_of(&e)));
            c.seq.recent.push_back((lsn, Arc::new(e)));
            let on_read = c.group.is_some() && members.len() > sh.cfg.group_push_members_max;
            let seq = c.seq.durable_seq;
            // A change is not a new message: no push notification for it.
            if let Some(n) = sh.notices.as_mut().filter(|_| !change) {
                n.push_back(Notice {
                    conversation_id: conv.0,
                    seq,
                    sender: msg.sender_user_id,
                    members: members.clone(),
                });
            }
            sh.convs.tail_added(lsn, conv);
            if on_read {
                // Fan-out on read: announced, coalesced, to the members (`read_fanout.rs`).
                let (now, every) = (sh.now_ms, sh.cfg.group_available_ms);
                sh.available.mark(conv, seq, now, every);
                continue;
            }
            items.push(FanoutItem::Message {
                msg,
                members,
                origin,
            });
        }
        for w in b.waiters {
            if !w.duplicate {
                sh.stats.messages_acked += 1;
            }
            let origin = w.origin;
            let f = ack_frame(w);
            if origin.shard == sh.mail.shard() && sh.mail.local_is_empty() {
                // Nothing queued ahead of it here: no need for a trip through the local queue
                // (and its one-frame Vec per acknowledgement).
                sh.emit(origin.conn, f, false);
            } else {
                sh.reply(origin, vec![f]);
            }
        }
        sh.mail.broadcast(items);
    }

    /// The log failed: answer every waiting Send with the truth, then sequence nothing more.
    ///
    /// A batch handed to the log (in flight) may be on disk after a restart even though its
    /// write or fsync failed (part of a group can be written and synced before the step that
    /// failed, and a failed fsync says nothing about what reached the disk), so its senders
    /// hear that the outcome is unknown; a retry with the same `client_msg_id` and
    /// `first_attempt = false` resolves it. The open batch was never handed to the log: its
    /// messages are certainly not stored.
    fn fail<I, M>(&mut self, sh: &mut Shared<I, M>, e: &LogError) {
        let why = format!("log failed: {e}");
        let mut unknown = Vec::new();
        for b in self.inflight.drain(..) {
            unknown.extend(b.waiters);
        }
        let absent = std::mem::take(&mut self.open.waiters);
        self.open.entries.clear();
        self.open.fresh.clear();
        self.open.events.clear();
        self.open.bytes = 0;
        for (waiters, message) in [
            (unknown, STORAGE_OUTCOME_UNKNOWN),
            (absent, STORAGE_NOT_STORED),
        ] {
            for w in waiters {
                let f = error_frame(w.request_id, ErrorCode::StorageFailure, message);
                sh.reply(w.origin, vec![f]);
            }
        }
        // Seqs handed out to failed entries are void; nothing is sequenced until the log is
        // reopened (`RouterShard::storage_recovered` then reloads every counter).
        for c in sh.convs.values_mut() {
            c.seq.pending.clear();
        }
        self.failed = Some(why);
    }
}

fn ack_frame(w: Waiter) -> v1::Frame {
    frame(
        w.request_id,
        Body::SendAck(v1::SendAck {
            client_msg_id: w.cmid_bytes,
            conversation_id: w.conv.0,
            seq: w.seq,
            server_ts_ms: w.ts,
            duplicate: w.duplicate,
            expires_at_ms: w.expires,
        }),
    )
}

/// `v`'s items, leaving it empty with room for as many.
fn take_sized<T>(v: &mut Vec<T>) -> Vec<T> {
    let n = v.len();
    std::mem::replace(v, Vec::with_capacity(n))
}

/// The durable dedup lookup `cmd` needs at its owner, if its state is loaded and nothing in
/// memory answers it: a retry (not a first attempt) whose id is neither pending nor in the
/// durable tail (`reads.rs` reads it off the shard thread).
pub(super) fn dedup_want<I, M>(sh: &Shared<I, M>, cmd: &SendCmd) -> Option<Want> {
    let c = sh.convs.get(cmd.conv)?;
    (!cmd.first_attempt
        && !cmd.change_ready
        && !c.seq.pending.contains_key(&cmd.cmid)
        && !c.seq.recent_ids.contains_key(&cmd.cmid))
    .then_some(Want::Dedup {
        conv: cmd.conv,
        cmid: cmd.cmid,
    })
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;

    use bytes::Bytes;
    use starling_protocol::v1::{self, ErrorCode, frame::Body};
    use starling_storage::{
        ClientMsgId, CompletionSource, ConvId as StoredConvId, DurableLog, Level, LogError, Lsn,
        MessageIndex, StorageError,
    };

    use super::super::fixture::{
        GROUP, answers, drive_until, group_meta, send, send_frame, shard, shard_over, transmitted,
    };
    use super::super::{RouterShard, ShardConfig};
    use super::*;
    use crate::ids::ConnId;

    /// A log whose batches become durable, or fail, when the test says.
    struct HeldLog {
        src: CompletionSource,
        next: Lsn,
    }

    impl DurableLog for HeldLog {
        fn append<V: Level>(&mut self, entries: &[Entry]) -> Result<Completion<V>, LogError> {
            self.src.durable()?;
            let first = self.next;
            let last = Lsn(first.0 + entries.len() as u64 - 1);
            self.next = Lsn(last.0 + 1);
            Ok(self.src.completion(first, last))
        }
        fn next_lsn(&self) -> Lsn {
            self.next
        }
        fn durable_lsn(&self) -> Result<Lsn, LogError> {
            self.src.durable()
        }
    }

    /// An index that never catches up (everything stays in the durable tail).
    struct NoIndex;

    impl MessageIndex for NoIndex {
        fn latest(&self, _: StoredConvId, _: usize) -> Result<Vec<Entry>, StorageError> {
            Ok(Vec::new())
        }
        fn before(&self, _: StoredConvId, _: Seq, _: usize) -> Result<Vec<Entry>, StorageError> {
            Ok(Vec::new())
        }
        fn after(&self, _: StoredConvId, _: Seq, _: usize) -> Result<Vec<Entry>, StorageError> {
            Ok(Vec::new())
        }
        fn entry(&self, _: StoredConvId, _: Seq) -> Result<Option<Entry>, StorageError> {
            Ok(None)
        }
        fn last_seq(&self, _: StoredConvId) -> Result<Seq, StorageError> {
            Ok(Seq(0))
        }
        fn dedup(&self, _: StoredConvId, _: ClientMsgId) -> Result<Option<Seq>, StorageError> {
            Ok(None)
        }
        fn indexed_lsn(&self) -> Lsn {
            Lsn(0)
        }
    }

    type Held = RouterShard<HeldLog, NoIndex, starling_storage::MemMeta>;

    fn held() -> (Held, CompletionSource) {
        let src = CompletionSource::new(Lsn(0), None);
        let log = HeldLog {
            src: src.clone(),
            next: Lsn(1),
        };
        let s = shard_over(ShardConfig::default(), log, Arc::new(NoIndex), group_meta());
        (s, src)
    }

    fn ack(out: &[(ConnId, v1::Frame)], rid: u64) -> Option<(u64, bool)> {
        match answers(out, ConnId(1), rid)[..] {
            [Body::SendAck(a)] => Some((a.seq, a.duplicate)),
            _ => None,
        }
    }

    fn error(out: &[(ConnId, v1::Frame)], rid: u64) -> (i32, String) {
        match answers(out, ConnId(1), rid)[..] {
            [Body::Error(e)] => (e.code, e.message.clone()),
            ref other => panic!("request {rid}: {other:?}"),
        }
    }

    #[test]
    fn nothing_is_acknowledged_or_pushed_before_its_batch_is_durable() {
        let (mut s, src) = held();
        send(&mut s, 1, 1);
        send(&mut s, 1, 2);
        s.handle_log_progress(2);
        assert!(
            transmitted(&mut s).is_empty(),
            "handed to the log, not durable"
        );
        assert!(
            s.poll_timeout() > Some(3),
            "nothing waits in the open batch to be retried"
        );
        src.advance(Lsn(2), Some(Lsn(2)));
        s.handle_log_progress(3);
        let out = transmitted(&mut s);
        assert_eq!(
            (ack(&out, 1), ack(&out, 2)),
            (Some((1, false)), Some((2, false)))
        );
        let pushed: Vec<u64> = out
            .iter()
            .filter(|(c, _)| *c == ConnId(2))
            .filter_map(|(_, f)| match &f.body {
                Some(Body::Deliver(d)) => d.message.as_ref().map(|m| m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(pushed, [1, 2], "the other member gets both, in order");
        assert_eq!(s.stats().messages_acked, 2);
    }

    #[test]
    fn a_retry_gets_the_original_seq_whether_its_first_copy_is_durable_yet_or_not() {
        let (mut s, src) = held();
        let to = || v1::recipient::Target::ConversationId(GROUP.0);
        s.handle_frame(ConnId(1), send_frame(1, 7, to(), b"a"), 1);
        // The same message again before the first is durable: it waits for the same batch.
        s.handle_frame(ConnId(1), send_frame(2, 7, to(), b"a"), 1);
        s.flush();
        s.handle_frame(ConnId(1), send_frame(3, 7, to(), b"a"), 1);
        src.advance(Lsn(1), Some(Lsn(1)));
        s.handle_log_progress(2);
        let out = transmitted(&mut s);
        assert_eq!(ack(&out, 1), Some((1, false)));
        assert_eq!(ack(&out, 2), Some((1, true)));
        assert_eq!(ack(&out, 3), Some((1, true)));
        // Durable and not yet indexed: answered at once from the tail, even for a device that
        // (wrongly) says it is a first attempt.
        let mut again = send_frame(4, 7, to(), b"a");
        if let Some(Body::Send(sd)) = &mut again.body {
            sd.first_attempt = true;
        }
        s.handle_frame(ConnId(1), again, 3);
        let out = transmitted(&mut s);
        assert_eq!(ack(&out, 4), Some((1, true)));
        assert_eq!(s.stats().duplicates, 3);
        assert_eq!(s.stats().messages_acked, 1);
    }

    #[test]
    fn a_failed_log_tells_each_waiting_sender_the_truth_and_sequences_nothing_more() {
        let (mut s, src) = held();
        send(&mut s, 1, 1);
        s.flush(); // in flight: the log has it
        send(&mut s, 1, 2); // in the open batch: the log never had it
        src.fail(LogError::Io {
            op: "fsync",
            path: "segment".into(),
            source: Arc::new(io::Error::other("disk gone")),
        });
        s.handle_log_progress(2);
        send(&mut s, 3, 3);
        let out = transmitted(&mut s);
        let failed = ErrorCode::StorageFailure as i32;
        assert_eq!(error(&out, 1), (failed, STORAGE_OUTCOME_UNKNOWN.to_owned()));
        assert_eq!(error(&out, 2), (failed, STORAGE_NOT_STORED.to_owned()));
        assert_eq!(error(&out, 3), (failed, STORAGE_SHARD_FAILED.to_owned()));
        assert!(s.failure().is_some_and(|f| f.contains("disk gone")));
        assert!(
            out.iter().all(|(c, _)| *c == ConnId(1)),
            "nothing was pushed"
        );
        assert_eq!(s.stats().messages_acked, 0);
    }

    /// Large bodies fill a batch long before `batch_entries_max` entries do: the open batch is
    /// submitted once it holds `batch_bytes_max` and never grows past `open_bytes_max` (a batch is one
    /// log record, which has a size limit; a batch over it once failed the shard's log). Sends over
    /// the cap are refused with OVERLOADED, and everything accepted is acknowledged.
    #[test]
    fn large_bodies_never_make_a_batch_larger_than_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShardConfig {
            batch_bytes_max: 256 * 1024,
            open_bytes_max: 512 * 1024,
            ..ShardConfig::default()
        };
        let (mut s, _meta) = shard(dir.path(), cfg);
        let mut now = 1_000;
        // 40 sends of 60 KiB in one burst (2.4 MB: more than the test log's 1 MiB segments hold in
        // one record), before the driver runs.
        for rid in 1..=40u64 {
            let f = v1::Frame {
                request_id: rid,
                body: Some(Body::Send(v1::Send {
                    client_msg_id: Bytes::from(vec![rid as u8; 16]),
                    to: Some(v1::Recipient {
                        target: Some(v1::recipient::Target::ConversationId(GROUP.0)),
                    }),
                    content_type: "application/octet-stream".into(),
                    body: Bytes::from(vec![rid as u8; 60 * 1024]),
                    ..v1::Send::default()
                })),
            };
            s.handle_frame(ConnId(1), f, now);
        }
        let mut acked = std::collections::BTreeMap::new();
        let mut overloaded = 0;
        let out = drive_until(&mut s, &mut now, |c, f| {
            c == ConnId(1) && f.request_id != 0 && {
                match &f.body {
                    Some(Body::SendAck(a)) => {
                        acked.insert(f.request_id, a.seq);
                    }
                    Some(Body::Error(e)) => {
                        assert_eq!(e.code, ErrorCode::Overloaded as i32, "{e:?}");
                        overloaded += 1;
                    }
                    other => panic!("{other:?}"),
                }
                acked.len() + overloaded == 40
            }
        });
        assert!(s.failure().is_none(), "{:?}", s.failure());
        assert!(!out.is_empty());
        assert!(acked.len() >= 8, "{acked:?}");
        // Seqs are contiguous from 1 in the order the accepted sends arrived.
        let seqs: Vec<u64> = acked.values().copied().collect();
        assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>());
    }

    /// Fails every `fdatasync` while set.
    #[derive(Debug, Default)]
    struct SyncFails(std::sync::atomic::AtomicBool);

    impl starling_storage::log::FaultHook for SyncFails {
        fn before(
            &self,
            op: &starling_storage::log::IoOp<'_>,
        ) -> Option<starling_storage::log::Fault> {
            let on = self.0.load(std::sync::atomic::Ordering::SeqCst);
            matches!(op, starling_storage::log::IoOp::SyncData { .. } if on)
                .then(|| starling_storage::log::Fault::Fail(io::Error::from_raw_os_error(5)))
        }
    }

    fn history(s: &mut super::super::fixture::Shard, now: &mut u64, rid: u64) -> Vec<(u64, u8)> {
        let f = v1::Frame {
            request_id: rid,
            body: Some(Body::GetHistory(v1::GetHistory {
                conversation_id: GROUP.0,
                anchor: Some(v1::get_history::Anchor::AfterSeq(0)),
                limit: 100,
            })),
        };
        s.handle_frame(ConnId(1), f, *now);
        let out = drive_until(s, now, |c, f| c == ConnId(1) && f.request_id == rid);
        match answers(&out, ConnId(1), rid)[..] {
            [Body::HistoryPage(p)] => p
                .messages
                .iter()
                .map(|m| (m.seq, m.client_msg_id[0]))
                .collect(),
            ref other => panic!("history: {other:?}"),
        }
    }

    /// The shard's log fails (its fdatasync: the batch reached the disk, unacknowledged): Sends
    /// are refused while reads go on; the log is reopened in place off the shard's thread and
    /// handed over; seqs continue right after the last durable one, and the refused message
    /// does not come back (its retry is a new message).
    #[test]
    fn a_log_reopened_in_place_serves_again_from_the_last_durable_seq() {
        use starling_storage::{EmbeddedShard, LogOptions, ShardOptions};
        let dir = tempfile::tempdir().unwrap();
        let fails = Arc::new(SyncFails::default());
        let opts = ShardOptions {
            log: LogOptions {
                segment_bytes: 1 << 16,
                fault_hook: Some(fails.clone()),
                ..LogOptions::default()
            },
            ..ShardOptions::default()
        };
        let store = EmbeddedShard::open(dir.path(), opts.clone()).unwrap();
        let index = store.index().clone();
        let mut s = shard_over(ShardConfig::default(), store, index, group_meta());
        let mut now = 10;
        for rid in 1..=2 {
            send(&mut s, now, rid);
            let out = drive_until(&mut s, &mut now, |c, f| {
                c == ConnId(1) && f.request_id == rid
            });
            assert_eq!(ack(&out, rid), Some((rid, false)));
        }

        fails.0.store(true, std::sync::atomic::Ordering::SeqCst);
        send(&mut s, now, 3);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 3);
        let failed = ErrorCode::StorageFailure as i32;
        assert_eq!(error(&out, 3), (failed, STORAGE_OUTCOME_UNKNOWN.to_owned()));
        assert!(s.failure().is_some());
        send(&mut s, now, 4);
        let out = transmitted(&mut s);
        assert_eq!(error(&out, 4), (failed, STORAGE_SHARD_FAILED.to_owned()));
        // Reads keep working from the index while the log is failed.
        assert_eq!(history(&mut s, &mut now, 50), [(1, 1), (2, 2)]);

        // Recovery, as the gateway runs it on another thread: the fault is gone.
        let mut detached = s.log_mut().detach_failed().expect("the log failed");
        assert_eq!(detached.durable_lsn(), Lsn(2));
        assert!(
            detached.reopen(opts.clone()).is_err(),
            "the fault is still there"
        );
        fails.0.store(false, std::sync::atomic::Ordering::SeqCst);
        let (store, _) = std::thread::scope(|t| {
            t.spawn(|| detached.reopen(opts.clone()).unwrap())
                .join()
                .unwrap()
        });
        let index = store.index().clone();
        let old = s.storage_recovered(store, index);
        drop(old);
        assert!(s.failure().is_none());

        // Sequencing resumes at seq 3; the retry of message 3 (not a first attempt) is new.
        send(&mut s, now, 5);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 5);
        assert_eq!(ack(&out, 5), Some((3, false)));
        let to = v1::recipient::Target::ConversationId(GROUP.0);
        let mut retry = send_frame(6, 3, to, b"hi");
        if let Some(Body::Send(sd)) = &mut retry.body {
            sd.first_attempt = false;
        }
        s.handle_frame(ConnId(1), retry, now);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 6);
        assert_eq!(ack(&out, 6), Some((4, false)), "message 3 was never stored");
        assert_eq!(
            history(&mut s, &mut now, 51),
            [(1, 1), (2, 2), (3, 5), (4, 3)]
        );
    }
}
