//! CreateGroup: the ids a shard draws, and the creation's commit at the owner of the drawn id
//! (conditional on the id being free; `change::committed` draws again if it was not). What
//! follows the commit is a change's path (`change.rs`): the group is loaded with its marker
//! and its CREATED event sequenced.

use super::*;

/// This shard's part in allocating group ids.
#[derive(Default)]
pub(in crate::shard) struct Groups {
    /// Ids this shard has drawn (mixed with the shard and the time into each candidate).
    drawn: u64,
}

impl Groups {
    /// A candidate id for a new group: shard, counter and time mixed, the group bit set. Not
    /// unique by construction: the creation's compare-and-set rejects one already taken.
    pub(super) fn draw(&mut self, shard: usize, now_ms: u64) -> ConvId {
        self.drawn += 1;
        let x = mix64(mix64(shard as u64 ^ 0x4752_4F55_5053) ^ self.drawn.rotate_left(24) ^ now_ms);
        let id = GROUP_BIT | (x & !GROUP_BIT);
        ConvId(if id == GROUP_BIT { GROUP_BIT | 1 } else { id })
    }
}

/// At the owner of a fresh id: a CreateGroup's commit (conditional on the id being free).
pub(super) fn create<I, M>(sh: &mut Shared<I, M>, cmd: GroupCmd)
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
    if let Err(r) = check_users(sh, members) {
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
