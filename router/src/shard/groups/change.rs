//! A change's steps at the group's owner: commit (the metadata writer), sequence the event,
//! answer once it is durable, settle (seqs written, marker cleared), then the next request; and
//! the resumption of a change found half done when a group is loaded.

use super::*;

/// At the owner of an idle group: answers `cmd`, or starts its change (commit).
pub(super) fn start<I, M>(sh: &mut Shared<I, M>, cmd: GroupCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let (conv, now) = (cmd.conv, sh.now_ms);
    let members_max = sh.cfg.group_members_max;
    let writer_full = sh.writer.queued() >= sh.cfg.meta_jobs_max;
    let change = match group(sh, conv) {
        Ok(c) => match c.group.as_ref() {
            Some(g) => {
                debug_assert_eq!(g.phase, Phase::Idle);
                g.st.change(conv, cmd.user, &cmd.op, members_max, now)
            }
            None => return,
        },
        Err(r) => Err(r),
    };
    let mut ch = match change {
        Err(r) => return refuse(sh, &cmd, r),
        Ok(None) => {
            let page = match cmd.op {
                Op::Info(p) => p,
                _ => Page::first(sh.cfg.group_info_members_page),
            };
            if let Some(g) = sh.convs.get(conv).and_then(|c| c.group.as_ref()) {
                let f = info_frame(cmd.request_id, g, conv, page);
                answer(sh, cmd.origin, cmd.request_id, f);
            }
            return;
        }
        Ok(Some(ch)) => ch,
    };
    // Who is added must exist (checked after the permission: a member learns nothing of
    // accounts from a request it may not make).
    if let Op::Add(users) = &cmd.op
        && let Err(r) = check_users(sh, users)
    {
        return refuse(sh, &cmd, r);
    }
    if writer_full {
        let f = retry_frame(
            cmd.request_id,
            ErrorCode::Overloaded,
            "the server is writing too many changes; send it again".into(),
            META_RETRY_AFTER_MS,
        );
        return answer(sh, cmd.origin, cmd.request_id, f);
    }
    let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
        return;
    };
    let batch = diff(conv, Some(&g.st), &mut ch.next);
    g.phase = Phase::Committing;
    let tag = MetaTag::Group(Box::new(Committing { cmd, next: ch.next }));
    sh.writer.submit(&*sh.meta, Job::Commit { batch }, tag);
}

/// A CreateGroup whose commit landed, back from the read gate with the new group's state
/// loaded as it was committed: it has the marker, so its event is sequenced by `resume`, which
/// answers the request.
pub(super) fn created<I, M>(sh: &mut Shared<I, M>, cmd: GroupCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let waiter = Waiter {
        origin: cmd.origin,
        request_id: cmd.request_id,
        done: false,
    };
    match group(sh, cmd.conv) {
        Ok(c) => {
            if let Some(g) = c.group.as_mut() {
                g.waiter = Some(waiter);
            }
        }
        Err(r) => refuse(sh, &cmd, r),
    }
}

/// The metadata writer's outcome of a change's (or creation's) commit: on success its event is
/// sequenced; a creation whose id was taken tries another.
pub(in crate::shard) fn committed<L, I, M>(
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
            if creating {
                // Back through the read gate, which loads the new group's state off the shard
                // thread ([`created`]).
                cmd.created = true;
                let own = sh.mail.shard();
                sh.send_to(own, Inner::Group(Box::new(cmd)));
                return;
            }
            let waiter = Waiter {
                origin: cmd.origin,
                request_id: cmd.request_id,
                done: matches!(cmd.op, Op::Leave),
            };
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
    let fresh = GroupConv::load(&*sh.meta, &*sh.index, conv);
    let Some(c) = sh.convs.get_mut(conv) else {
        return;
    };
    let Some(g) = c.group.as_mut() else {
        return;
    };
    match fresh {
        Ok(Some(mut f)) => {
            f.queue = std::mem::take(&mut g.queue);
            let resumes = f.needs_resume();
            c.members = f.st.in_members();
            c.title.clone_from(&f.st.name);
            **g = f;
            if resumes {
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
pub(in crate::shard) fn events_durable<I, M>(sh: &mut Shared<I, M>, events: Vec<(ConvId, u64)>)
where
    M: MetadataStore + CursorStore,
{
    let page = Page::first(sh.cfg.group_info_members_page);
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
                info_frame(w.request_id, g, conv, page)
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
pub(in crate::shard) fn settled<I, M>(sh: &mut Shared<I, M>, conv: ConvId, outcome: Outcome)
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
    let msg = "storage failed under this group's change; retry in a few seconds";
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

/// The shard's log was reopened in place (cut back to what it had made durable): whether the
/// state of group `conv` must be dropped, to be loaded again from the metadata. A change whose
/// event was sequenced but never made durable (its seq is void now) has already taken effect
/// in memory: its requester hears `STORAGE_FAILURE` and the reload finds the change's marker and
/// sequences its event again (`resume`). A broken group is reloaded the same way.
pub(in crate::shard) fn log_reopened<I, M>(sh: &mut Shared<I, M>, conv: ConvId) -> bool {
    let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
        return false;
    };
    match g.phase {
        Phase::Sequenced(_) => {
            broken(sh, conv);
            true
        }
        Phase::Broken => true,
        _ => false,
    }
}

/// The seq of the event of `conv`'s change to `version` in the log, if it is there (found by
/// its derived `client_msg_id`, confirmed by reading it).
pub(super) fn find_event<I: MessageIndex>(
    index: &I,
    conv: ConvId,
    version: u64,
) -> Result<Option<u64>, Refusal> {
    let lookup = |e: starling_storage::StorageError| Refusal::storage("group event lookup", &e);
    let Some(s) = index
        .dedup(conv.storage(), event::event_id(version))
        .map_err(lookup)?
    else {
        return Ok(None);
    };
    let e = index.entry(conv.storage(), s).map_err(lookup)?;
    Ok(e.filter(|e| event::version_of(e) == Some(version))
        .map(|_| s.0))
}

/// Groups loaded with a change to finish: an event the log had is settled (seqs written,
/// marker cleared); a missing one is sequenced now.
pub(in crate::shard) fn resume<L, I, M>(sh: &mut Shared<I, M>, seq: &mut Sequencer<L>)
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    while let Some(conv) = sh.convs.resume.pop() {
        let Some(g) = sh.convs.get_mut(conv).and_then(|c| c.group.as_mut()) else {
            continue;
        };
        match g.phase {
            Phase::Sequenced(s) => events_durable(sh, vec![(conv, s)]),
            Phase::Resume => sequence_event(sh, seq, conv),
            _ => {}
        }
    }
}
