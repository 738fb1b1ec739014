//! Changes of stored messages — edits, deletes for everyone, reactions — and the check of a
//! reply's target (see `docs/design/messaging.md`, "Edits, deletes, reactions and replies").
//!
//! A change is a `Send` with `change` set. It becomes a new entry of the conversation (envelope
//! version 3) with its own seq, acknowledged, pushed and deduplicated by `client_msg_id` exactly
//! like a message; the target's entry in the log never changes. What the target looks like now
//! (deleted, its latest edit, its reactions) is a [`MessageState`] record in the metadata, which
//! history, sync and the conversation list overlay on the target when they serve it.
//!
//! At the owner a change is checked against its target (it exists and is a message the caller
//! may see; the rules of its kind) and the target's current state, then the new state is
//! committed (the metadata writer) and only then is the change sequenced. State first: a crash
//! between the two leaves a state without its change entry — the target is served as changed,
//! and a retry with the same `client_msg_id` finds its change already in the state and
//! sequences the entry without writing again — never a change entry whose effect a restart
//! would forget (a deleted body served again).

use std::sync::Arc;

use starling_protocol::v1::{self, ChangeKind, ErrorCode};
use starling_storage::message_state::{Edit, MessageState, Reaction};
use starling_storage::{
    CursorStore, DurableLog, Entry, EntryKind, MessageIndex, MetaBatch, MetadataStore, Seq,
    TimestampMs, UserId,
};

use super::envelope::{expiry_of, is_change, is_timer};
use super::frames::{Refusal, error_frame};
use super::mail::{Inner, SendCmd};
use super::sequencer::Sequencer;
use super::shared::{MetaTag, Shared};
use crate::ids::ConvId;
use crate::metawriter::{Job, Outcome, Written, unexpected_outcome};

/// The longest reaction, in bytes of UTF-8.
pub(super) const EMOJI_BYTES_MAX: usize = 64;

fn invalid(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorCode::InvalidArgument, msg.into())
}

fn precondition(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorCode::FailedPrecondition, msg.into())
}

/// At the ingress shard: a Send's change is consistent in itself (the rest needs the target,
/// at its owner).
pub(super) fn check_request(s: &v1::Send) -> Result<(), Refusal> {
    let Some(ch) = &s.change else {
        return Ok(());
    };
    let kind = ChangeKind::try_from(ch.kind).unwrap_or(ChangeKind::Unspecified);
    if kind == ChangeKind::Unspecified {
        return Err(invalid("change.kind must be EDIT, DELETE or REACT"));
    }
    if ch.target_seq == 0 {
        return Err(invalid("change.target_seq is 0"));
    }
    if s.media.is_some() {
        return Err(invalid("a change carries no media"));
    }
    if s.reply_to_seq != 0 {
        return Err(invalid("a change is not a reply: reply_to_seq must be 0"));
    }
    if kind != ChangeKind::React && !ch.emoji.is_empty() {
        return Err(invalid("change.emoji is only for a reaction"));
    }
    if kind != ChangeKind::Edit && (!s.body.is_empty() || !s.content_type.is_empty()) {
        return Err(invalid(
            "a delete or a reaction carries no content_type or body",
        ));
    }
    if ch.emoji.len() > EMOJI_BYTES_MAX {
        return Err(invalid(format!(
            "change.emoji is {} bytes, at most {EMOJI_BYTES_MAX}",
            ch.emoji.len()
        )));
    }
    Ok(())
}

/// What [`prepare`] did with a Send.
pub(super) enum Prepared {
    /// Sequence it now.
    Go(Box<SendCmd>),
    /// It waits for a metadata write (its own, or its first copy's).
    Waiting,
}

/// At the owner, for a Send that dedup did not answer: checks a reply's target, and for a
/// change its target and rules; a change that alters its target's state has the new state
/// committed first ([`committed`] sequences it).
pub(super) fn prepare<I, M>(sh: &mut Shared<I, M>, cmd: SendCmd) -> Result<Prepared, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    if cmd.reply_to_seq != 0 {
        target(sh, cmd.conv, cmd.user, cmd.reply_to_seq, "reply_to_seq")?;
    }
    if cmd.set_timer.is_some() {
        return super::disappearing::prepare(sh, cmd);
    }
    let Some(ch) = cmd.change.clone() else {
        return Ok(Prepared::Go(Box::new(cmd)));
    };
    if cmd.change_ready {
        return Ok(Prepared::Go(Box::new(cmd)));
    }
    // A retry of a change whose state is being written waits for it.
    if let Some(parked) = sh.conv(cmd.conv)?.seq.committing.get_mut(&cmd.cmid) {
        parked.push(cmd);
        return Ok(Prepared::Waiting);
    }
    let t = target(sh, cmd.conv, cmd.user, ch.target_seq, "change.target_seq")?;
    let mut cmd = cmd;
    cmd.target_expiry_ms = expiry_of(&t);
    let old = state(sh, cmd.conv, ch.target_seq)?
        .unwrap_or_else(|| MessageState::new(cmd.conv.storage(), Seq(ch.target_seq)));
    let admin = sh
        .conv(cmd.conv)?
        .group
        .as_ref()
        .is_some_and(|g| g.st.is_admin(cmd.user));
    let now = sh.now_ms.max(cmd.now_ms);
    let new = apply(&sh.cfg, &old, &t, &cmd, &ch, admin, now)?;
    if new == old {
        // A retry whose state was written before (then a crash or a lost answer), or a change
        // that changes nothing (removing a reaction there is none of): only the entry.
        return Ok(Prepared::Go(Box::new(cmd)));
    }
    if sh.writer.queued() >= sh.cfg.meta_jobs_max {
        return Err(Refusal(
            ErrorCode::Overloaded,
            "the server is writing too many changes; send it again".into(),
        ));
    }
    let c = sh.conv(cmd.conv)?;
    c.seq.has_states = Some(true);
    let slot = c
        .seq
        .states
        .entry(ch.target_seq)
        .or_insert_with(|| (new.clone(), 0));
    slot.0 = new.clone();
    slot.1 += 1;
    c.seq.state_epoch += 1;
    c.seq.committing.insert(cmd.cmid, Vec::new());
    let mut batch = MetaBatch::default();
    batch.put(&new);
    sh.writer.submit(
        &*sh.meta,
        Job::Commit { batch },
        MetaTag::Change(Box::new(cmd)),
    );
    Ok(Prepared::Waiting)
}

/// The metadata writer's outcome of a change's state: on success the change is sequenced (and
/// the retries that waited for it are answered from it); otherwise all of them hear the error.
pub(super) fn committed<L, I, M>(
    sh: &mut Shared<I, M>,
    seq: &mut Sequencer<L>,
    mut cmd: SendCmd,
    outcome: Outcome,
) where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let target = cmd.change.as_ref().map_or(0, |c| c.target_seq);
    let parked = match sh.conv(cmd.conv) {
        Ok(c) => {
            if cmd.set_timer.is_some() {
                c.seq.timer_writes = c.seq.timer_writes.saturating_sub(1);
            }
            if let Some(slot) = c.seq.states.get_mut(&target) {
                c.seq.state_epoch += 1;
                slot.1 -= 1;
                if slot.1 == 0 {
                    // The metadata holds the newest state again.
                    c.seq.states.remove(&target);
                }
            }
            c.seq.committing.remove(&cmd.cmid).unwrap_or_default()
        }
        Err(_) => Vec::new(),
    };
    let refusal = match outcome {
        Ok(Written::Committed { conflict: false }) => {
            cmd.change_ready = true;
            // A Block/Unblock of a direct pair committed meanwhile made its blocks unknown:
            // through the read gate, in this order, so that they are read off the thread.
            let unknown = sh
                .convs
                .get(cmd.conv)
                .is_some_and(|c| super::blocks::want(c, cmd.conv).is_some());
            let own = sh.mail.shard();
            for c in std::iter::once(cmd).chain(parked) {
                if unknown {
                    sh.send_to(own, Inner::Send(Box::new(c)));
                } else {
                    seq.on_send(sh, c);
                }
            }
            return;
        }
        Ok(w) => unexpected_outcome(&w),
        Err(r) => r,
    };
    for c in std::iter::once(cmd).chain(parked) {
        let f = error_frame(c.request_id, refusal.0, refusal.1.clone());
        sh.reply(c.origin, vec![f]);
    }
}

/// The message `seq` of `conv` that `user` names as `field` (a reply's or a change's target):
/// durable, one `user` may see, and a message (not a group event or a change).
fn target<I, M>(
    sh: &mut Shared<I, M>,
    conv: ConvId,
    user: UserId,
    seq: u64,
    field: &str,
) -> Result<Arc<Entry>, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let (c, (from, to)) = sh.reader_conv(conv, user)?;
    let missing = || {
        Refusal(
            ErrorCode::NotFound,
            format!("{field} {seq}: no such message in this conversation"),
        )
    };
    if seq < from || seq > to || seq > c.seq.durable_seq {
        return Err(missing());
    }
    let keep = sh.keep(conv);
    let e = sh
        .read_after(conv, seq - 1, 1)?
        .into_iter()
        .next()
        .filter(|e| e.seq.0 == seq && !keep.gone(e))
        .ok_or_else(missing)?;
    if e.kind != EntryKind::MESSAGE {
        return Err(invalid(format!(
            "{field} {seq} is a group event, not a message"
        )));
    }
    if is_timer(&e) {
        return Err(invalid(format!(
            "{field} {seq} is a disappearing-timer change, not a message"
        )));
    }
    if is_change(&e) {
        return Err(invalid(format!(
            "{field} {seq} is an edit, delete or reaction, not a message"
        )));
    }
    Ok(e)
}

/// The current state of message `seq` of `conv`: the newest one being written, else the
/// metadata's (`None`: never changed).
pub(super) fn state<I, M>(
    sh: &mut Shared<I, M>,
    conv: ConvId,
    seq: u64,
) -> Result<Option<MessageState>, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let c = sh.conv(conv)?;
    if let Some((s, _)) = c.seq.states.get(&seq) {
        return Ok(Some(s.clone()));
    }
    if c.seq.has_states == Some(false) {
        return Ok(None);
    }
    let key = super::reader::Want::State {
        conv,
        seq,
        epoch: c.seq.state_epoch,
    };
    if let Some(super::reader::Got::State(r)) = sh.got.get(&key) {
        return r.clone();
    }
    sh.stats.inline_reads += 1;
    super::reader::message_state(&*sh.meta, conv, seq)
}

/// The seq whose state serving entry `e` reads (`present`): its own, or an edit's target's
/// (whether that was deleted); none for a group event or a change of another kind.
pub(super) fn state_seq(conv: ConvId, e: &Entry) -> Option<u64> {
    if e.kind != starling_storage::EntryKind::MESSAGE {
        return None;
    }
    if !super::envelope::is_change(e) {
        return Some(e.seq.0);
    }
    super::envelope::entry_to_message(conv, e)
        .and_then(|m| m.change)
        .filter(|ch| ch.kind == ChangeKind::Edit as i32)
        .map(|ch| ch.target_seq)
}

/// `old` with `cmd`'s change `ch` of message `t` by `cmd.user` at `now`, or why not. A retry of
/// the change that made `old` returns `old` unchanged.
fn apply(
    cfg: &super::ShardConfig,
    old: &MessageState,
    t: &Entry,
    cmd: &SendCmd,
    ch: &v1::MessageChange,
    admin: bool,
    now: u64,
) -> Result<MessageState, Refusal> {
    let mut s = old.clone();
    let (user, id, seq) = (cmd.user, cmd.cmid, ch.target_seq);
    let own = t.sender == user;
    let age = now.saturating_sub(t.ts_ms.0);
    let deleted = || precondition(format!("message {seq} was deleted for everyone"));
    match ChangeKind::try_from(ch.kind).unwrap_or(ChangeKind::Unspecified) {
        ChangeKind::Unspecified => {
            return Err(invalid("change.kind must be EDIT, DELETE or REACT"));
        }
        ChangeKind::Edit => {
            if old.edit.as_ref().is_some_and(|e| e.id == id) {
                return Ok(s);
            }
            if !own {
                return Err(Refusal(
                    ErrorCode::PermissionDenied,
                    format!("message {seq} is not yours: only its sender may edit it"),
                ));
            }
            if old.is_deleted() {
                return Err(deleted());
            }
            if age > cfg.edit_window_ms {
                return Err(precondition(format!(
                    "message {seq} can no longer be edited: the edit window is {} ms",
                    cfg.edit_window_ms
                )));
            }
            s.edit = Some(Edit {
                content_type: cmd.content_type.clone(),
                body: cmd.body.to_vec(),
                ts: TimestampMs(now),
                id,
            });
        }
        ChangeKind::Delete => {
            if old.is_deleted() {
                if old.deleted_id == id && old.deleted_by == user {
                    return Ok(s);
                }
                return Err(precondition(format!(
                    "message {seq} was already deleted for everyone"
                )));
            }
            if !own && !admin {
                return Err(Refusal(
                    ErrorCode::PermissionDenied,
                    format!(
                        "message {seq} is not yours: only its sender, or in a group an admin, \
                         may delete it for everyone"
                    ),
                ));
            }
            if !admin && age > cfg.delete_window_ms {
                return Err(precondition(format!(
                    "message {seq} can no longer be deleted for everyone: the delete window is \
                     {} ms",
                    cfg.delete_window_ms
                )));
            }
            s.deleted_by = user;
            s.deleted_ts = TimestampMs(now);
            s.deleted_id = id;
            s.edit = None;
            s.reactions.clear();
        }
        ChangeKind::React => {
            if old.is_deleted() {
                return Err(deleted());
            }
            match s.reactions.binary_search_by_key(&user, |r| r.user) {
                Ok(i) if ch.emoji.is_empty() => {
                    s.reactions.remove(i);
                }
                Ok(i) => {
                    if s.reactions[i].emoji != ch.emoji {
                        s.reactions[i] = Reaction {
                            user,
                            emoji: ch.emoji.clone(),
                            id,
                        };
                    }
                }
                Err(_) if ch.emoji.is_empty() => {}
                Err(i) => {
                    if s.reactions.len() >= cfg.reactions_max {
                        return Err(precondition(format!(
                            "message {seq} already has reactions from {} users, the most \
                             this server allows",
                            cfg.reactions_max
                        )));
                    }
                    s.reactions.insert(
                        i,
                        Reaction {
                            user,
                            emoji: ch.emoji.clone(),
                            id,
                        },
                    );
                }
            }
        }
    }
    Ok(s)
}

/// Serves `msgs` (entries of `conv` read back from storage) as they are now: a message that
/// was changed gets its state (deleted: no content; else its latest edit and its reactions),
/// and an edit whose target was deleted loses its content too.
pub(super) fn present<I, M>(
    sh: &mut Shared<I, M>,
    conv: ConvId,
    msgs: &mut [v1::Message],
) -> Result<(), Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    if msgs.iter().all(|m| m.group_changed.is_some()) || !has_states(sh, conv)? {
        return Ok(());
    }
    for m in msgs {
        if m.group_changed.is_some() {
            continue;
        }
        if let Some(ch) = &m.change {
            if ch.kind == ChangeKind::Edit as i32
                && state(sh, conv, ch.target_seq)?.is_some_and(|s| s.is_deleted())
            {
                m.content_type.clear();
                m.body = Default::default();
            }
            continue;
        }
        if let Some(s) = state(sh, conv, m.seq)? {
            overlay(m, &s);
        }
    }
    Ok(())
}

/// Whether any message of `conv` has a state (looked up once per load of the conversation).
fn has_states<I, M>(sh: &mut Shared<I, M>, conv: ConvId) -> Result<bool, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    if let Some(known) = sh.conv(conv)?.seq.has_states {
        return Ok(known);
    }
    let any = !sh
        .meta
        .scan::<MessageState>(&conv.storage().0.to_be_bytes(), 1)
        .map_err(|e| Refusal::storage("message state", &e))?
        .is_empty();
    sh.conv(conv)?.seq.has_states = Some(any);
    Ok(any)
}

/// `m` as state `s` says it is now.
fn overlay(m: &mut v1::Message, s: &MessageState) {
    if s.is_deleted() {
        m.deleted = true;
        m.content_type.clear();
        m.body = Default::default();
        m.media = None;
        m.edited_ts_ms = 0;
        m.reactions.clear();
        return;
    }
    if let Some(e) = &s.edit {
        m.content_type = e.content_type.clone();
        m.body = e.body.clone().into();
        m.edited_ts_ms = e.ts.0;
    }
    m.reactions = s
        .reactions
        .iter()
        .map(|r| v1::Reaction {
            user_id: r.user.0,
            emoji: r.emoji.clone(),
        })
        .collect();
}

/// Whether `e` counts as unread for a user other than its sender: a message, not a change or
/// a timer change.
pub(super) fn counts_as_unread(e: &Entry) -> bool {
    !is_change(e) && !is_timer(e)
}

#[cfg(test)]
#[path = "changes_tests.rs"]
mod tests;
