//! Groups: the seven group requests (ingress → owner → answer) and the life of a change at the
//! group's owner shard (see `protocol/README.md`, "Groups", and `docs/design/messaging.md`,
//! "Groups").
//!
//! A change is carried out in four steps, one change per group at a time (later requests wait
//! in the group's queue, in arrival order):
//!
//! 1. **commit**: the metadata writer commits the new membership and settings together with a
//!    *pending-event marker* (the event's body) in the group record, conditional on the group
//!    record being what the owner read (`state::diff`);
//! 2. **sequence**: the event goes into the conversation's log like a message, with a
//!    `client_msg_id` derived from the group's version (`event::event_id`); joins and removals
//!    take effect at its seq (messages sequenced before it go to the old membership);
//! 3. **durable**: the requester is answered, and the metadata writer writes the seqs of the
//!    joins and removals and clears the marker (`settle`);
//! 4. then the next change of the group starts.
//!
//! A crash anywhere leaves no silent disagreement between the two stores: a group loaded with
//! a marker (`GroupConv::needs_resume`) looks its event up in the index (dedup by the derived
//! id): found, the seqs are taken from it and the marker is cleared; missing, the event is
//! sequenced then (redo), so every committed change gets exactly one event.
//!
//! | file | holds |
//! |---|---|
//! | `ingress.rs` | a request at the ingress shard: arguments checked, on to the owner |
//! | this file | a request at the owner (a read answered, a change started or queued), a group's state at its owner ([`GroupConv`]) |
//! | `create.rs` | CreateGroup: drawing ids, the creation's commit |
//! | `change.rs` | a change's steps: commit, sequence, answer, settle, next; resuming a change found half done |
//! | `state.rs` | the group's state as the metadata has it, the rules of each request, visibility, the records a change writes |
//! | `event.rs` | the event as a log entry and as a wire `Message` |

use std::collections::VecDeque;

use prost::Message as _;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::meta::{User, keys};
use starling_storage::{CursorStore, DurableLog, MessageIndex, MetadataStore, UserId};

use super::convs::ConvState;
use super::frames::{Refusal, error_frame, frame, retry_frame};
use super::mail::Inner;
use super::reader::{Got, Want};
use super::sequencer::Sequencer;
use super::shared::{META_RETRY_AFTER_MS, MetaTag, Shared};
use crate::ids::{ConnRef, ConvId, GROUP_BIT, mix64};
use crate::metawriter::{Job, Outcome, Written, unexpected_outcome};

mod change;
mod create;
pub(super) mod event;
mod ingress;
mod state;

pub(super) use change::{committed, events_durable, log_reopened, resume, settled};
use change::{find_event, start};
pub(super) use create::Groups;
use create::create;
pub(super) use ingress::{is_request, request};

use state::{AVATAR_BYTES_MAX, GroupState, Op, Page, check_name, diff};

/// How many ids a CreateGroup tries before giving up (each try is a compare-and-set of an id
/// no group has; a collision of 63-bit ids is rare, several in a row a bug).
const CREATE_ATTEMPTS_MAX: u32 = 8;

/// A group request on its way to (or at) the group's owner.
pub(super) struct GroupCmd {
    origin: ConnRef,
    request_id: u64,
    user: UserId,
    conv: ConvId,
    op: Op,
    /// For CreateGroup: how many ids were tried.
    attempt: u32,
    /// For CreateGroup: its commit landed; the request comes back through the read gate to
    /// find the new group's state loaded (read off the shard thread) and be answered.
    created: bool,
}

impl GroupCmd {
    /// The group whose state the request needs at its owner (none for a creation).
    pub(super) fn state_conv(&self) -> Option<ConvId> {
        (!matches!(self.op, Op::Create { .. }) || self.created).then_some(self.conv)
    }

    /// The users the request names who must exist (a creation's members, those added); the
    /// read gate reads their records off the shard thread (`Want::UserName`).
    pub(super) fn users_to_check(&self) -> &[UserId] {
        match &self.op {
            Op::Create { .. } if self.created => &[],
            Op::Create { members, .. } => members,
            Op::Add(users) => users,
            _ => &[],
        }
    }
}

/// A change (or creation) being committed by the metadata writer: the request and the state
/// it makes.
pub(super) struct Committing {
    cmd: GroupCmd,
    next: GroupState,
}

/// Where a group's change is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No change in progress.
    Idle,
    /// Loaded with a marker: its event is to be found or sequenced (`resume`).
    Resume,
    /// The metadata writer commits the change.
    Committing,
    /// The change's event has this seq, not yet durable.
    Sequenced(u64),
    /// The event is durable; the marker is being cleared.
    Settling,
    /// A store failed under the change: nothing more changes until the restart recovers it.
    Broken,
}

/// Who waits for the change in progress, and for what answer.
struct Waiter {
    origin: ConnRef,
    request_id: u64,
    /// LeaveGroup is answered Done (the leaver may not read the group any more); the others
    /// GroupInfo.
    done: bool,
}

/// A group at its owner: its state and the change in progress (in `ConvState::group`).
pub(super) struct GroupConv {
    pub(super) st: GroupState,
    phase: Phase,
    waiter: Option<Waiter>,
    /// The writes that settle the sequenced change (seqs, marker cleared).
    settle: Option<starling_storage::MetaBatch>,
    /// Requests waiting for the change in progress, in arrival order.
    queue: VecDeque<GroupCmd>,
}

impl GroupConv {
    /// The group `conv` as the metadata has it, and its log in `index` (complete for `conv`:
    /// a state leaves memory only once everything of it is indexed); `None` if there is none.
    /// A change with a marker whose event the log has takes effect now, at the event's seq
    /// (its settling is left to [`resume`]); one whose event is missing is not in effect until
    /// [`resume`] sequences it, and nothing after it exists yet.
    pub(super) fn load<I: MessageIndex, M: MetadataStore>(
        meta: &M,
        index: &I,
        conv: ConvId,
    ) -> Result<Option<GroupConv>, Refusal> {
        let Some(st) = GroupState::load(meta, conv)? else {
            return Ok(None);
        };
        let mut g = GroupConv {
            phase: Phase::Idle,
            st,
            waiter: None,
            settle: None,
            queue: VecDeque::new(),
        };
        if let Some(version) = g.st.pending.as_ref().map(|p| p.version) {
            match find_event(index, conv, version)? {
                Some(s) => {
                    let before = g.st.clone();
                    g.st.sequenced(s);
                    g.settle = Some(diff(conv, Some(&before), &mut g.st));
                    g.phase = Phase::Sequenced(s);
                }
                None => g.phase = Phase::Resume,
            }
        }
        Ok(Some(g))
    }

    /// Whether it was loaded with a change to finish (its event to sequence, or to settle).
    pub(super) fn needs_resume(&self) -> bool {
        matches!(self.phase, Phase::Resume | Phase::Sequenced(_)) && self.waiter.is_none()
    }

    /// Whether nothing is in progress or waiting (its state may be dropped from memory).
    pub(super) fn is_idle(&self) -> bool {
        self.phase == Phase::Idle && self.queue.is_empty()
    }
}

/// Whether `user` may send in `c` now (a group's `only_admins_send`).
pub(super) fn check_send(c: &ConvState, user: UserId) -> Result<(), Refusal> {
    match &c.group {
        Some(g) => g.st.check_send(user),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// owner

fn answer<I, M>(sh: &mut Shared<I, M>, origin: ConnRef, rid: u64, f: v1::Frame) {
    debug_assert_eq!(f.request_id, rid);
    sh.reply(origin, vec![f]);
}

fn refuse<I, M>(sh: &mut Shared<I, M>, cmd: &GroupCmd, r: Refusal) {
    let f = error_frame(cmd.request_id, r.0, r.1);
    answer(sh, cmd.origin, cmd.request_id, f);
}

/// A `GroupInfo` answer with one page of members.
fn info_frame(rid: u64, g: &GroupConv, conv: ConvId, page: Page) -> v1::Frame {
    frame(rid, Body::GroupInfo(g.st.info(conv, Some(page))))
}

/// The users of `list` that have no account: NOT_FOUND naming the first.
fn check_users<I, M: MetadataStore>(sh: &mut Shared<I, M>, list: &[UserId]) -> Result<(), Refusal> {
    for &u in list {
        let exists = match sh.got.get(&Want::UserName(u)) {
            Some(Got::UserName(r)) => r.clone()?.is_some(),
            _ => {
                sh.stats.inline_reads += 1;
                sh.meta
                    .get::<User>(&keys::user(u))
                    .map_err(|e| Refusal::storage("user lookup", &e))?
                    .is_some()
            }
        };
        if !exists {
            return Err(Refusal(
                ErrorCode::NotFound,
                format!("no such user: {}", u.0),
            ));
        }
    }
    Ok(())
}

/// The group state of `conv` at its owner (loaded on first use).
fn group<I, M>(sh: &mut Shared<I, M>, conv: ConvId) -> Result<&mut ConvState, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    match sh.conv(conv) {
        Ok(c) if c.group.is_some() => Ok(c),
        Err(Refusal(ErrorCode::NotFound, _)) | Ok(_) => {
            Err(Refusal(ErrorCode::NotFound, "no such group".into()))
        }
        Err(r) => Err(r),
    }
}

/// At the owner: a group request. A read or a refusal is answered at once; a change starts
/// now, or waits for the group's change in progress.
pub(super) fn on_cmd<I, M>(sh: &mut Shared<I, M>, cmd: GroupCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    if matches!(cmd.op, Op::Create { .. }) {
        if cmd.created {
            return change::created(sh, cmd);
        }
        return create(sh, cmd);
    }
    let queued_max = sh.cfg.group_changes_queued_max;
    let c = match group(sh, cmd.conv) {
        Ok(c) => c,
        Err(r) => return refuse(sh, &cmd, r),
    };
    let Some(g) = c.group.as_mut() else {
        return;
    };
    if g.phase == Phase::Broken {
        let r = Refusal(
            ErrorCode::StorageFailure,
            "storage failed under this group's last change; retry after the server restarted"
                .into(),
        );
        return refuse(sh, &cmd, r);
    }
    if g.phase != Phase::Idle || !g.queue.is_empty() {
        if g.queue.len() >= queued_max {
            let f = retry_frame(
                cmd.request_id,
                ErrorCode::Overloaded,
                "too many changes of this group are waiting; send it again".into(),
                META_RETRY_AFTER_MS,
            );
            return answer(sh, cmd.origin, cmd.request_id, f);
        }
        g.queue.push_back(cmd);
        return;
    }
    start(sh, cmd);
}

#[cfg(test)]
mod tests;
