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
//! | `state.rs` | the group's state as the metadata has it, the rules of each request, visibility, the records a change writes |
//! | `event.rs` | the event as a log entry and as a wire `Message` |
//! | this file | the requests' path and a change's steps |

use std::collections::VecDeque;

use prost::Message as _;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::meta::{User, keys};
use starling_storage::{CursorStore, DurableLog, MessageIndex, MetadataStore, UserId};

use super::convs::ConvState;
use super::frames::{Refusal, error_frame, frame, retry_frame};
use super::mail::Inner;
use super::sequencer::Sequencer;
use super::shared::{META_RETRY_AFTER_MS, MetaTag, Shared};
use crate::ids::{ConnRef, ConvId, GROUP_BIT, mix64};
use crate::metawriter::{Job, Outcome, Written, unexpected_outcome};

pub(super) mod event;
mod state;

use state::{AVATAR_BYTES_MAX, GroupState, Op, check_name, diff};

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
    /// The group `conv` as the metadata has it; `None` if there is none.
    pub(super) fn load<M: MetadataStore>(
        meta: &M,
        conv: ConvId,
    ) -> Result<Option<GroupConv>, Refusal> {
        Ok(GroupState::load(meta, conv)?.map(|st| GroupConv {
            phase: if st.pending.is_some() {
                Phase::Resume
            } else {
                Phase::Idle
            },
            st,
            waiter: None,
            settle: None,
            queue: VecDeque::new(),
        }))
    }

    /// Whether it was loaded with a change whose event may be missing.
    pub(super) fn needs_resume(&self) -> bool {
        self.phase == Phase::Resume
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

/// This shard's part in allocating group ids.
#[derive(Default)]
pub(super) struct Groups {
    /// Ids this shard has drawn (mixed with the shard and the time into each candidate).
    drawn: u64,
}

impl Groups {
    /// A candidate id for a new group: shard, counter and time mixed, the group bit set. Not
    /// unique by construction: the creation's compare-and-set rejects one already taken.
    fn draw(&mut self, shard: usize, now_ms: u64) -> ConvId {
        self.drawn += 1;
        let x = mix64(mix64(shard as u64 ^ 0x4752_4F55_5053) ^ self.drawn.rotate_left(24) ^ now_ms);
        let id = GROUP_BIT | (x & !GROUP_BIT);
        ConvId(if id == GROUP_BIT { GROUP_BIT | 1 } else { id })
    }
}

// ---------------------------------------------------------------------------------------------
// ingress

/// Whether `body` is a group request.
pub(super) fn is_request(body: &Body) -> bool {
    matches!(
        body,
        Body::CreateGroup(_)
            | Body::GetGroupInfo(_)
            | Body::AddGroupMembers(_)
            | Body::RemoveGroupMembers(_)
            | Body::SetGroupRole(_)
            | Body::LeaveGroup(_)
            | Body::UpdateGroup(_)
    )
}

/// At the ingress shard: checks the request's arguments and sends it to the group's owner (for
/// CreateGroup: the owner of a fresh id).
pub(super) fn request<I, M>(
    sh: &mut Shared<I, M>,
    groups: &mut Groups,
    origin: ConnRef,
    rid: u64,
    user: UserId,
    body: Body,
) -> Result<(), Refusal> {
    let max = sh.cfg.group_request_users_max;
    let (conv, op) = match body {
        Body::CreateGroup(c) => {
            check_name(&c.name)?;
            let members = users(&c.member_user_ids, max, "member_user_ids", true)?;
            let avatar = avatar(c.avatar.as_deref())?.unwrap_or_default();
            let conv = groups.draw(sh.mail.shard(), sh.now_ms);
            let op = Op::Create {
                name: c.name,
                members,
                avatar,
            };
            (conv, op)
        }
        Body::GetGroupInfo(g) => (group_id(g.conversation_id)?, Op::Info),
        Body::AddGroupMembers(a) => (
            group_id(a.conversation_id)?,
            Op::Add(users(&a.user_ids, max, "user_ids", false)?),
        ),
        Body::RemoveGroupMembers(r) => (
            group_id(r.conversation_id)?,
            Op::Remove(users(&r.user_ids, max, "user_ids", false)?),
        ),
        Body::SetGroupRole(r) => {
            let conv = group_id(r.conversation_id)?;
            if r.user_id == 0 {
                return Err(Refusal(ErrorCode::InvalidArgument, "user_id is 0".into()));
            }
            let admin = match v1::GroupRole::try_from(r.role) {
                Ok(v1::GroupRole::Admin) => true,
                Ok(v1::GroupRole::Member) => false,
                _ => {
                    return Err(Refusal(
                        ErrorCode::InvalidArgument,
                        "role must be GROUP_ROLE_MEMBER or GROUP_ROLE_ADMIN".into(),
                    ));
                }
            };
            let op = Op::SetRole {
                user: UserId(r.user_id),
                admin,
            };
            (conv, op)
        }
        Body::LeaveGroup(l) => (group_id(l.conversation_id)?, Op::Leave),
        Body::UpdateGroup(u) => {
            let conv = group_id(u.conversation_id)?;
            if let Some(n) = &u.name {
                check_name(n)?;
            }
            let avatar = avatar(u.avatar.as_deref())?;
            if u.name.is_none() && avatar.is_none() && u.only_admins_send.is_none() {
                return Err(Refusal(
                    ErrorCode::InvalidArgument,
                    "UpdateGroup changes nothing: set name, avatar or only_admins_send".into(),
                ));
            }
            let op = Op::Update {
                name: u.name,
                avatar,
                only_admins_send: u.only_admins_send,
            };
            (conv, op)
        }
        _ => {
            return Err(Refusal(
                ErrorCode::UnexpectedFrame,
                "not a group request".into(),
            ));
        }
    };
    let cmd = GroupCmd {
        origin,
        request_id: rid,
        user,
        conv,
        op,
        attempt: 0,
    };
    sh.send_to(sh.mail.owner(conv), Inner::Group(Box::new(cmd)));
    Ok(())
}

/// The group a request names.
fn group_id(id: u64) -> Result<ConvId, Refusal> {
    match ConvId::from_wire(id) {
        None => Err(Refusal(
            ErrorCode::InvalidArgument,
            "conversation_id is 0".into(),
        )),
        Some(c) if !c.is_group() => Err(Refusal(ErrorCode::NotFound, "no such group".into())),
        Some(c) => Ok(c),
    }
}

/// The users a request names: none is 0, at most `max`, at least one unless `may_be_empty`.
fn users(ids: &[u64], max: usize, field: &str, may_be_empty: bool) -> Result<Vec<UserId>, Refusal> {
    if ids.len() > max {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            format!(
                "{field} names {} users, more than one request may \
                 (router.group_request_users_max = {max}); split it",
                ids.len()
            ),
        ));
    }
    if ids.is_empty() && !may_be_empty {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            format!("{field} is empty"),
        ));
    }
    if ids.contains(&0) {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            format!("{field} holds user id 0"),
        ));
    }
    Ok(ids.iter().map(|&u| UserId(u)).collect())
}

/// An avatar as stored: `None` if not set, empty to remove it, else its encoding.
fn avatar(m: Option<&v1::MediaRef>) -> Result<Option<Vec<u8>>, Refusal> {
    let Some(m) = m else {
        return Ok(None);
    };
    if m.media_id.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let b = m.encode_to_vec();
    if b.len() > AVATAR_BYTES_MAX {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            format!(
                "the avatar takes {} bytes, at most {AVATAR_BYTES_MAX}",
                b.len()
            ),
        ));
    }
    Ok(Some(b))
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

fn info_frame(rid: u64, g: &GroupConv, conv: ConvId) -> v1::Frame {
    frame(rid, Body::GroupInfo(g.st.info(conv, true)))
}

/// The users of `list` that have no account: NOT_FOUND naming the first.
fn check_users<M: MetadataStore>(meta: &M, list: &[UserId]) -> Result<(), Refusal> {
    for &u in list {
        if meta
            .get::<User>(&keys::user(u))
            .map_err(|e| Refusal::storage("user lookup", &e))?
            .is_none()
        {
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

/// At the owner of an idle group: answers `cmd`, or starts its change (commit).
fn start<I, M>(sh: &mut Shared<I, M>, cmd: GroupCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let (conv, now) = (cmd.conv, sh.now_ms);
    let members_max = sh.cfg.group_members_max;
    if let Op::Add(users) = &cmd.op
        && let Err(r) = check_users(&*sh.meta, users)
    {
        return refuse(sh, &cmd, r);
    }
    let writer_full = sh.writer.queued() >= sh.cfg.meta_jobs_max;
    let c = match group(sh, conv) {
        Ok(c) => c,
        Err(r) => return refuse(sh, &cmd, r),
    };
    let Some(g) = c.group.as_mut() else {
        return;
    };
    debug_assert_eq!(g.phase, Phase::Idle);
    match g.st.change(conv, cmd.user, &cmd.op, members_max, now) {
        Err(r) => refuse(sh, &cmd, r),
        Ok(None) => {
            let f = info_frame(cmd.request_id, g, conv);
            answer(sh, cmd.origin, cmd.request_id, f);
        }
        Ok(Some(_)) if writer_full => {
            let f = retry_frame(
                cmd.request_id,
                ErrorCode::Overloaded,
                "the server is writing too many changes; send it again".into(),
                META_RETRY_AFTER_MS,
            );
            answer(sh, cmd.origin, cmd.request_id, f);
        }
        Ok(Some(mut ch)) => {
            let batch = diff(conv, Some(&g.st), &mut ch.next);
            g.phase = Phase::Committing;
            let tag = MetaTag::Group(Box::new(Committing { cmd, next: ch.next }));
            sh.writer.submit(&*sh.meta, Job::Commit { batch }, tag);
        }
    }
}

/// At the owner of a fresh id: a CreateGroup's commit (conditional on the id being free).
fn create<I, M>(sh: &mut Shared<I, M>, cmd: GroupCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let Op::Create {
        name,
        members,
        avatar,
    } = &cmd.op
    else {
        return;
    };
    if let Err(r) = check_users(&*sh.meta, members) {
        return refuse(sh, &cmd, r);
    }
    if sh.writer.queued() >= sh.cfg.meta_jobs_max {
        let f = retry_frame(
            cmd.request_id,
            ErrorCode::Overloaded,
            "the server is writing too many changes; send it again".into(),
            META_RETRY_AFTER_MS,
        );
        return answer(sh, cmd.origin, cmd.request_id, f);
    }
    let max = sh.cfg.group_members_max;
    let made = GroupState::create(
        cmd.conv,
        cmd.user,
        name.clone(),
        members,
        avatar.clone(),
        max,
        sh.now_ms,
    );
    let mut ch = match made {
        Ok(ch) => ch,
        Err(r) => return refuse(sh, &cmd, r),
    };
    let batch = diff(cmd.conv, None, &mut ch.next);
    let tag = MetaTag::Group(Box::new(Committing { cmd, next: ch.next }));
    sh.writer.submit(&*sh.meta, Job::Commit { batch }, tag);
}

/// The metadata writer's outcome of a change's (or creation's) commit: on success its event is
/// sequenced; a creation whose id was taken tries another.
pub(super) fn committed<L, I, M>(
    sh: &mut Shared<I, M>,
    seq: &mut Sequencer<L>,
    groups: &mut Groups,
    job: Committing,
    outcome: Outcome,
) where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let Committing { mut cmd, next } = job;
    let conv = cmd.conv;
    let creating = matches!(cmd.op, Op::Create { .. });
    match outcome {
        Ok(Written::Committed { conflict: false }) => {
            let waiter = Waiter {
                origin: cmd.origin,
                request_id: cmd.request_id,
                done: matches!(cmd.op, Op::Leave),
            };
            if creating {
                // Loaded from what was just committed: it has the marker, so the event is
                // sequenced by `resume`.
                match group(sh, conv) {
                    Ok(c) => {
                        if let Some(g) = c.group.as_mut() {
                            g.waiter = Some(waiter);
                        }
                    }
                    Err(r) => refuse(sh, &cmd, r),
                }
                resume(sh, seq);
                return;
            }
            let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
                debug_assert!(false, "a group with a change in progress was dropped");
                return;
            };
            g.st = next;
            g.waiter = Some(waiter);
            sequence_event(sh, seq, conv);
        }
        Ok(Written::Committed { conflict: true }) if creating => {
            if cmd.attempt + 1 >= CREATE_ATTEMPTS_MAX {
                let r = Refusal(
                    ErrorCode::Internal,
                    "no free group id was found; send it again".into(),
                );
                return refuse(sh, &cmd, r);
            }
            cmd.attempt += 1;
            cmd.conv = groups.draw(sh.mail.shard(), sh.now_ms);
            sh.send_to(sh.mail.owner(cmd.conv), Inner::Group(Box::new(cmd)));
        }
        other => {
            let r = match other {
                Err(r) => r,
                Ok(Written::Committed { conflict: true }) => {
                    debug_assert!(false, "the group record changed under its owner");
                    Refusal(
                        ErrorCode::Internal,
                        "the group changed meanwhile; send it again".into(),
                    )
                }
                Ok(w) => unexpected_outcome(&w),
            };
            refuse(sh, &cmd, r);
            if !creating {
                reload(sh, seq, conv);
            }
        }
    }
}

/// After a failed commit: the group as the metadata has it (the commit may have landed after
/// all), then the next waiting request.
fn reload<L, I, M>(sh: &mut Shared<I, M>, seq: &mut Sequencer<L>, conv: ConvId)
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let fresh = GroupState::load(&*sh.meta, conv);
    let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
        return;
    };
    match fresh {
        Ok(Some(st)) => {
            g.phase = if st.pending.is_some() {
                Phase::Resume
            } else {
                Phase::Idle
            };
            g.st = st;
            if g.phase == Phase::Resume {
                sh.convs.resume.push(conv);
                resume(sh, seq);
            } else {
                next_request(sh, conv);
            }
        }
        _ => broken(sh, conv),
    }
}

/// Sequences the event of `conv`'s pending change; the joins and removals it carries take
/// effect at its seq.
fn sequence_event<L, I, M>(sh: &mut Shared<I, M>, seq: &mut Sequencer<L>, conv: ConvId)
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
        return;
    };
    let Some(p) = g.st.pending.clone() else {
        debug_assert!(false, "no pending change to sequence");
        return;
    };
    let by = v1::GroupChanged::decode(p.event.as_slice()).map_or(0, |e| e.by_user_id);
    let audience = g.st.event_audience();
    match seq.on_event(sh, conv, p.version, UserId(by), p.event, audience) {
        Ok(s) => took_effect(sh, conv, s, Phase::Sequenced(s)),
        Err(_) => broken(sh, conv),
    }
}

/// The pending change's event has seq `s`: joins and removals take effect, the writes that
/// settle it are ready, and the group goes to `phase`.
fn took_effect<I, M>(sh: &mut Shared<I, M>, conv: ConvId, s: u64, phase: Phase) {
    let Some(c) = sh.convs.get_mut(conv) else {
        return;
    };
    let Some(g) = c.group.as_mut() else {
        return;
    };
    let before = g.st.clone();
    g.st.sequenced(s);
    g.settle = Some(diff(conv, Some(&before), &mut g.st));
    g.phase = phase;
    c.members = g.st.in_members();
    c.title.clone_from(&g.st.name);
}

/// Group events made durable: their requests are answered and their markers cleared.
pub(super) fn events_durable<I, M>(sh: &mut Shared<I, M>, events: Vec<(ConvId, u64)>)
where
    M: MetadataStore + CursorStore,
{
    for (conv, s) in events {
        let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
            continue;
        };
        if g.phase != Phase::Sequenced(s) {
            continue;
        }
        if let Some(w) = g.waiter.take() {
            let f = if w.done {
                frame(w.request_id, Body::Done(v1::Done {}))
            } else {
                info_frame(w.request_id, g, conv)
            };
            sh.reply(w.origin, vec![f]);
        }
        settle(sh, conv);
    }
}

/// Writes the seqs of the change's joins and removals and clears its marker.
fn settle<I, M>(sh: &mut Shared<I, M>, conv: ConvId)
where
    M: MetadataStore + CursorStore,
{
    let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
        return;
    };
    let Some(batch) = g.settle.take() else {
        return;
    };
    g.phase = Phase::Settling;
    let tag = MetaTag::GroupSettled { conv };
    sh.writer.submit(&*sh.meta, Job::Commit { batch }, tag);
}

/// The outcome of clearing a change's marker: the group takes its next request.
pub(super) fn settled<I, M>(sh: &mut Shared<I, M>, conv: ConvId, outcome: Outcome)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    match outcome {
        Ok(Written::Committed { conflict: false }) => {
            if let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) {
                g.phase = Phase::Idle;
            }
            next_request(sh, conv);
        }
        _ => broken(sh, conv),
    }
}

/// Starts the requests waiting for `conv`, until one starts a change.
fn next_request<I, M>(sh: &mut Shared<I, M>, conv: ConvId)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    loop {
        let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
            return;
        };
        if g.phase != Phase::Idle {
            return;
        }
        let Some(cmd) = g.queue.pop_front() else {
            return;
        };
        start(sh, cmd);
    }
}

/// A store failed under `conv`'s change: its requester and every waiting request hear it, and
/// the group changes no more until the restart (whose load resumes the change).
fn broken<I, M>(sh: &mut Shared<I, M>, conv: ConvId) {
    let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
        return;
    };
    g.phase = Phase::Broken;
    let msg = "storage failed under this group's change; retry after the server restarted";
    let mut out: Vec<(ConnRef, v1::Frame)> = Vec::new();
    if let Some(w) = g.waiter.take() {
        out.push((
            w.origin,
            error_frame(w.request_id, ErrorCode::StorageFailure, msg),
        ));
    }
    for cmd in g.queue.drain(..) {
        out.push((
            cmd.origin,
            error_frame(cmd.request_id, ErrorCode::StorageFailure, msg),
        ));
    }
    for (to, f) in out {
        sh.reply(to, vec![f]);
    }
}

/// Groups loaded with a marker: each one's event is looked up in the index (by its derived
/// `client_msg_id`); found, it is settled with that seq; missing, it is sequenced now.
pub(super) fn resume<L, I, M>(sh: &mut Shared<I, M>, seq: &mut Sequencer<L>)
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    while let Some(conv) = sh.convs.resume.pop() {
        let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
            continue;
        };
        let Some(version) = g.st.pending.as_ref().map(|p| p.version) else {
            continue;
        };
        if g.phase != Phase::Resume {
            continue;
        }
        let id = event::event_id(version);
        let found = match sh.index.dedup(conv.storage(), id) {
            Ok(Some(s)) => match sh.index.entry(conv.storage(), s) {
                Ok(Some(e)) if event::version_of(&e) == Some(version) => Ok(Some(s.0)),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            },
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match found {
            Ok(Some(s)) => {
                took_effect(sh, conv, s, Phase::Sequenced(s));
                events_durable(sh, vec![(conv, s)]);
            }
            Ok(None) => sequence_event(sh, seq, conv),
            Err(_) => broken(sh, conv),
        }
    }
}

#[cfg(test)]
mod tests;
