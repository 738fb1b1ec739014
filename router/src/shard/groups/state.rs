//! A group's state at its owner, as the metadata has it (members and their roles, former
//! members, settings, the change whose event may not be durable yet), and the rules of the
//! group requests over it: who may do what, what a change makes of the state, which metadata
//! records it writes, and who sees which seqs of the conversation. Pure: no I/O, no shard.
//!
//! Seqs of membership: a member's `joined_seq` is the seq of the event that added it, a former
//! member's `left_seq` the seq of the event that removed it. Between a change's commit and its
//! event's sequencing they are 0: the change is written but not yet in force in the
//! conversation (a member joining is not in yet, a member leaving is still in), so messages
//! sequenced meanwhile go to the membership before the change. Members written before events
//! existed (version-1 records) joined at seq 1.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;
use starling_protocol::v1::{self, ErrorCode};
use starling_storage::meta::{
    FormerMember, Group, GroupSettings, Member, MemberOf, PendingEvent, Role, keys,
};
use starling_storage::{MetaBatch, MetadataStore, Record, TimestampMs, UserId};

use super::super::frames::Refusal;
use crate::ids::ConvId;

/// Longest group name, in characters.
pub(crate) const NAME_CHARS_MAX: usize = 100;
/// Longest encoded avatar (`MediaRef`), in bytes.
pub(crate) const AVATAR_BYTES_MAX: usize = 4096;

/// One member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemberInfo {
    pub(crate) admin: bool,
    pub(crate) joined_ms: u64,
    /// The seq of the event that added it; 0 while that event is not sequenced.
    pub(crate) joined_seq: u64,
}

/// One former member: it may read seqs `joined_seq..=left_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Former {
    pub(crate) joined_seq: u64,
    /// The seq of the event that removed it; 0 while that event is not sequenced.
    pub(crate) left_seq: u64,
}

/// A group as its metadata records say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GroupState {
    pub(crate) name: String,
    pub(crate) created_by: UserId,
    pub(crate) created_ms: u64,
    /// The version of the last change (1 after creation).
    pub(crate) version: u64,
    pub(crate) only_admins_send: bool,
    /// Encoded `MediaRef`, empty for none.
    pub(crate) avatar: Vec<u8>,
    /// The change whose event may not be in the log yet.
    pub(crate) pending: Option<PendingEvent>,
    pub(crate) members: BTreeMap<UserId, MemberInfo>,
    pub(crate) former: BTreeMap<UserId, Former>,
    /// The group record as it is stored (what a commit expects to replace).
    pub(crate) stored: Option<Group>,
}

/// A group request, as the owner carries it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Create {
        name: String,
        members: Vec<UserId>,
        avatar: Vec<u8>,
    },
    Info(Page),
    Add(Vec<UserId>),
    Remove(Vec<UserId>),
    SetRole {
        user: UserId,
        admin: bool,
    },
    Leave,
    Update {
        name: Option<String>,
        avatar: Option<Vec<u8>>,
        only_admins_send: Option<bool>,
    },
}

/// One page of a group's members: those after `after`, at most `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Page {
    pub(crate) after: UserId,
    pub(crate) limit: usize,
}

impl Page {
    /// The first page of `limit` members.
    pub(crate) fn first(limit: usize) -> Page {
        Page {
            after: UserId(0),
            limit,
        }
    }

    /// The page a request asks for: `limit` 0, or more than `max`, is `max`.
    pub(crate) fn asked(after: u64, limit: u32, max: usize) -> Page {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Page {
            after: UserId(after),
            limit: if limit == 0 { max } else { limit.min(max) },
        }
    }
}

/// What a change makes: the state after it, whose `pending` marker holds the event.
#[derive(Debug)]
pub(crate) struct Change {
    pub(crate) next: GroupState,
}

impl Change {
    /// The change's event.
    #[cfg(test)]
    fn event(&self) -> v1::GroupChanged {
        let p = self.next.pending.as_ref().expect("a change has an event");
        v1::GroupChanged::decode(p.event.as_slice()).expect("it decodes")
    }
}

fn not_a_member() -> Refusal {
    Refusal(
        ErrorCode::NotAMember,
        "you are not a member of this group".into(),
    )
}

fn admins_only(what: &str) -> Refusal {
    Refusal(
        ErrorCode::PermissionDenied,
        format!("only the group's admins may {what}; ask an admin"),
    )
}

fn too_big(n: usize, max: usize) -> Refusal {
    Refusal(
        ErrorCode::PermissionDenied,
        format!(
            "the group would have {n} members, more than this server allows \
             (router.group_members_max = {max})"
        ),
    )
}

/// Checks a group name: 1 to [`NAME_CHARS_MAX`] characters on one line.
pub(crate) fn check_name(name: &str) -> Result<(), Refusal> {
    let n = name.chars().count();
    if n == 0 || n > NAME_CHARS_MAX {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            format!("a group name has 1 to {NAME_CHARS_MAX} characters, this one {n}"),
        ));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
    {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "a group name is one line: no control characters or line separators".into(),
        ));
    }
    Ok(())
}

impl GroupState {
    /// The group `conv` as the metadata has it; `None` if there is no such group.
    pub(crate) fn load<M: MetadataStore>(
        meta: &M,
        conv: ConvId,
    ) -> Result<Option<GroupState>, Refusal> {
        let key = conv.storage().0.to_be_bytes();
        let Some(g) = meta
            .get::<Group>(&key)
            .map_err(|e| Refusal::storage("group", &e))?
        else {
            return Ok(None);
        };
        let members = meta
            .scan::<Member>(&key, usize::MAX)
            .map_err(|e| Refusal::storage("members", &e))?
            .into_iter()
            .map(|m| {
                let info = MemberInfo {
                    admin: m.role != Role::Member,
                    joined_ms: m.joined_ms.0,
                    joined_seq: m.joined_seq.unwrap_or(1),
                };
                (m.user, info)
            })
            .collect();
        let former = meta
            .scan::<FormerMember>(&key, usize::MAX)
            .map_err(|e| Refusal::storage("former members", &e))?
            .into_iter()
            .map(|f| {
                let info = Former {
                    joined_seq: f.joined_seq,
                    left_seq: f.left_seq,
                };
                (f.user, info)
            })
            .collect();
        let settings = g.settings.clone().unwrap_or_default();
        Ok(Some(GroupState {
            name: g.name.clone(),
            created_by: g.created_by,
            created_ms: g.created_ms.0,
            version: g.epoch,
            only_admins_send: settings.only_admins_send,
            avatar: settings.avatar,
            pending: settings.pending,
            members,
            former,
            stored: Some(g),
        }))
    }

    /// The seqs of the conversation `user` may read (inclusive), if any.
    pub(crate) fn visible(&self, user: UserId) -> Option<(u64, u64)> {
        if let Some(m) = self.members.get(&user) {
            return (m.joined_seq > 0).then_some((m.joined_seq, u64::MAX));
        }
        let f = self.former.get(&user)?;
        Some(if f.left_seq == 0 {
            (f.joined_seq, u64::MAX)
        } else {
            (f.joined_seq, f.left_seq)
        })
    }

    /// Who is in the conversation now (gets its messages, may send): members whose join is
    /// sequenced, and members whose removal is not yet.
    pub(crate) fn in_members(&self) -> Arc<[UserId]> {
        let mut v: Vec<UserId> = self
            .members
            .iter()
            .filter(|(_, m)| m.joined_seq > 0)
            .map(|(u, _)| *u)
            .chain(
                self.former
                    .iter()
                    .filter(|(_, f)| f.left_seq == 0)
                    .map(|(u, _)| *u),
            )
            .collect();
        v.sort_unstable();
        v.into()
    }

    /// Who gets the event of the pending change: everyone in the conversation before or after
    /// it (members, joining ones included, and members being removed).
    pub(crate) fn event_audience(&self) -> Arc<[UserId]> {
        let mut v: Vec<UserId> = self
            .members
            .keys()
            .copied()
            .chain(
                self.former
                    .iter()
                    .filter(|(_, f)| f.left_seq == 0)
                    .map(|(u, _)| *u),
            )
            .collect();
        v.sort_unstable();
        v.into()
    }

    /// Whether `user` may send now.
    pub(crate) fn check_send(&self, user: UserId) -> Result<(), Refusal> {
        if self.only_admins_send && !self.members.get(&user).is_some_and(|m| m.admin) {
            return Err(Refusal(
                ErrorCode::PermissionDenied,
                "only the group's admins may send in this group".into(),
            ));
        }
        Ok(())
    }

    /// Whether `user` is one of the group's admins.
    pub(crate) fn is_admin(&self, user: UserId) -> bool {
        self.members.get(&user).is_some_and(|m| m.admin)
    }

    fn admins(&self) -> usize {
        self.members.values().filter(|m| m.admin).count()
    }

    /// Members remain but no admin among them.
    fn adminless(&self) -> bool {
        !self.members.is_empty() && self.admins() == 0
    }

    /// The group's state for the wire, with one `page` of its members (none, and no count,
    /// for an event).
    pub(crate) fn info(&self, conv: ConvId, page: Option<Page>) -> v1::GroupInfo {
        let (mut members, mut next) = (Vec::new(), 0);
        if let Some(p) = page {
            let after = (
                std::ops::Bound::Excluded(p.after),
                std::ops::Bound::Unbounded,
            );
            let mut range = self.members.range(after);
            for (u, m) in range.by_ref().take(p.limit) {
                members.push(v1::GroupMember {
                    user_id: u.0,
                    role: if m.admin {
                        v1::GroupRole::Admin
                    } else {
                        v1::GroupRole::Member
                    } as i32,
                    joined_at_ms: m.joined_ms,
                });
            }
            if range.next().is_some() {
                next = members.last().map_or(p.after.0, |m| m.user_id);
            }
        }
        let member_count = if page.is_some() {
            u32::try_from(self.members.len()).unwrap_or(u32::MAX)
        } else {
            0
        };
        v1::GroupInfo {
            conversation_id: conv.0,
            name: self.name.clone(),
            avatar: v1::MediaRef::decode(self.avatar.as_slice())
                .ok()
                .filter(|_| !self.avatar.is_empty())
                .map(Box::new),
            members,
            created_by_user_id: self.created_by.0,
            created_at_ms: self.created_ms,
            version: self.version,
            only_admins_send: self.only_admins_send,
            member_count,
            members_next_after_user_id: next,
        }
    }

    /// A new group made by `by` with `others` (already checked to exist) at `now_ms`.
    pub(crate) fn create(
        conv: ConvId,
        by: UserId,
        name: String,
        others: &[UserId],
        avatar: Vec<u8>,
        members_max: usize,
        now_ms: u64,
    ) -> Result<Change, Refusal> {
        check_name(&name)?;
        let mut members = BTreeMap::new();
        let mut order = vec![by];
        members.insert(
            by,
            MemberInfo {
                admin: true,
                joined_ms: now_ms,
                joined_seq: 0,
            },
        );
        for &u in others {
            if !members.contains_key(&u) {
                order.push(u);
            }
            members.entry(u).or_insert(MemberInfo {
                admin: false,
                joined_ms: now_ms,
                joined_seq: 0,
            });
        }
        if members.len() > members_max {
            return Err(too_big(members.len(), members_max));
        }
        let next = GroupState {
            name,
            created_by: by,
            created_ms: now_ms,
            version: 0,
            only_admins_send: false,
            avatar,
            pending: None,
            members,
            former: BTreeMap::new(),
            stored: None,
        };
        let kind = v1::GroupChangeKind::Created;
        Ok(next.finish(conv, by, kind, order, None))
    }

    /// What `op` by `by` makes of the group: `Ok(None)` if it changes nothing (a read, or a
    /// change already in effect), or a refusal saying why not.
    pub(crate) fn change(
        &self,
        conv: ConvId,
        by: UserId,
        op: &Op,
        members_max: usize,
        now_ms: u64,
    ) -> Result<Option<Change>, Refusal> {
        let Some(me) = self.members.get(&by) else {
            return Err(not_a_member());
        };
        let mut next = self.clone();
        next.pending = None;
        let kind = v1::GroupChangeKind::MembersAdded;
        match op {
            Op::Create { .. } => Err(Refusal(
                ErrorCode::AlreadyExists,
                "the group already exists".into(),
            )),
            Op::Info(_) => Ok(None),
            Op::Add(users) => {
                if !me.admin {
                    return Err(admins_only("add members"));
                }
                let mut added: Vec<UserId> = users
                    .iter()
                    .copied()
                    .filter(|u| !self.members.contains_key(u))
                    .collect();
                added.sort_unstable();
                added.dedup();
                if added.is_empty() {
                    return Ok(None);
                }
                let n = self.members.len() + added.len();
                if n > members_max {
                    return Err(too_big(n, members_max));
                }
                for &u in &added {
                    next.former.remove(&u);
                    next.members.insert(
                        u,
                        MemberInfo {
                            admin: false,
                            joined_ms: now_ms,
                            joined_seq: 0,
                        },
                    );
                }
                Ok(Some(next.finish(conv, by, kind, added, None)))
            }
            Op::Remove(users) => {
                if !me.admin {
                    return Err(admins_only("remove members"));
                }
                let mut removed: Vec<UserId> = users
                    .iter()
                    .copied()
                    .filter(|u| self.members.contains_key(u))
                    .collect();
                removed.sort_unstable();
                removed.dedup();
                if removed.is_empty() {
                    return Ok(None);
                }
                for &u in &removed {
                    next.remove(u);
                }
                next.forget_formers(members_max);
                if next.adminless() {
                    return Err(Refusal(
                        ErrorCode::PermissionDenied,
                        "this would leave the group without an admin: make another member \
                         admin first (SetGroupRole)"
                            .into(),
                    ));
                }
                let kind = v1::GroupChangeKind::MembersRemoved;
                Ok(Some(next.finish(conv, by, kind, removed, None)))
            }
            Op::SetRole { user, admin } => {
                if !me.admin {
                    return Err(admins_only("change roles"));
                }
                let Some(m) = next.members.get_mut(user) else {
                    return Err(Refusal(
                        ErrorCode::NotAMember,
                        format!("user {} is not a member of this group", user.0),
                    ));
                };
                if m.admin == *admin {
                    return Ok(None);
                }
                m.admin = *admin;
                if next.adminless() {
                    return Err(Refusal(
                        ErrorCode::PermissionDenied,
                        "this is the group's last admin: make another member admin first \
                         (SetGroupRole)"
                            .into(),
                    ));
                }
                let kind = v1::GroupChangeKind::RoleChanged;
                let role = if *admin {
                    v1::GroupRole::Admin
                } else {
                    v1::GroupRole::Member
                };
                Ok(Some(next.finish(conv, by, kind, vec![*user], Some(role))))
            }
            Op::Leave => {
                next.remove(by);
                next.forget_formers(members_max);
                if next.adminless() {
                    return Err(Refusal(
                        ErrorCode::PermissionDenied,
                        "you are the group's last admin: make another member admin first \
                         (SetGroupRole), then leave"
                            .into(),
                    ));
                }
                let kind = v1::GroupChangeKind::MemberLeft;
                Ok(Some(next.finish(conv, by, kind, vec![by], None)))
            }
            Op::Update {
                name,
                avatar,
                only_admins_send,
            } => {
                if !me.admin {
                    return Err(admins_only("change the group's settings"));
                }
                if let Some(n) = name {
                    check_name(n)?;
                    next.name.clone_from(n);
                }
                if let Some(a) = avatar {
                    next.avatar.clone_from(a);
                }
                if let Some(o) = only_admins_send {
                    next.only_admins_send = *o;
                }
                if (&next.name, &next.avatar, next.only_admins_send)
                    == (&self.name, &self.avatar, self.only_admins_send)
                {
                    return Ok(None);
                }
                let kind = v1::GroupChangeKind::Updated;
                Ok(Some(next.finish(conv, by, kind, Vec::new(), None)))
            }
        }
    }

    /// `user` stops being a member (its removal not yet sequenced).
    fn remove(&mut self, user: UserId) {
        if let Some(m) = self.members.remove(&user) {
            self.former.insert(
                user,
                Former {
                    joined_seq: m.joined_seq,
                    left_seq: 0,
                },
            );
        }
    }

    /// Keeps at most `max` former members: beyond, those removed longest ago lose their read
    /// access (and the group leaves their conversation list), so that a group's records stay
    /// bounded however many users pass through it.
    fn forget_formers(&mut self, max: usize) {
        while self.former.len() > max {
            let oldest = self
                .former
                .iter()
                .filter(|(_, f)| f.left_seq > 0)
                .min_by_key(|(_, f)| f.left_seq)
                .map(|(u, _)| *u);
            let Some(u) = oldest else {
                break;
            };
            self.former.remove(&u);
        }
    }

    /// The change to this state (already applied): the next version, its event, and the event
    /// as the pending marker.
    fn finish(
        mut self,
        conv: ConvId,
        by: UserId,
        kind: v1::GroupChangeKind,
        user_ids: Vec<UserId>,
        role: Option<v1::GroupRole>,
    ) -> Change {
        self.version += 1;
        let event = v1::GroupChanged {
            group: Some(Box::new(self.info(conv, None))),
            by_user_id: by.0,
            kind: kind as i32,
            user_ids: user_ids.iter().map(|u| u.0).collect(),
            role: role.map_or(0, |r| r as i32),
        };
        self.pending = Some(PendingEvent {
            version: self.version,
            event: event.encode_to_vec(),
        });
        Change { next: self }
    }

    /// The pending change's event got `seq`: joins and removals waiting for it take effect, and
    /// the marker goes (once the caller has written that).
    pub(crate) fn sequenced(&mut self, seq: u64) {
        for m in self.members.values_mut() {
            if m.joined_seq == 0 {
                m.joined_seq = seq;
            }
        }
        for f in self.former.values_mut() {
            if f.left_seq == 0 {
                f.left_seq = seq;
            }
        }
        self.pending = None;
    }

    /// The group record for this state.
    fn record(&self, conv: ConvId) -> Group {
        Group {
            id: conv.storage(),
            name: self.name.clone(),
            created_by: self.created_by,
            created_ms: TimestampMs(self.created_ms),
            epoch: self.version,
            settings: Some(GroupSettings {
                only_admins_send: self.only_admins_send,
                avatar: self.avatar.clone(),
                pending: self.pending.clone(),
            }),
        }
    }
}

/// The metadata writes that turn `old` (`None`: no group yet) into `next`, conditional on the
/// group record being what `old` read (absent for a new group), so that a write over a group
/// someone else changed, or over an id already taken, fails instead. Sets `next.stored`.
pub(crate) fn diff(conv: ConvId, old: Option<&GroupState>, next: &mut GroupState) -> MetaBatch {
    let g = conv.storage();
    let key = g.0.to_be_bytes();
    let mut b = MetaBatch::default();
    b.expect::<Group>(&key, old.and_then(|o| o.stored.as_ref()));
    let record = next.record(conv);
    b.put(&record);
    let (no_members, no_former) = (BTreeMap::new(), BTreeMap::new());
    let (old_members, old_former) =
        old.map_or((&no_members, &no_former), |o| (&o.members, &o.former));
    for (u, m) in &next.members {
        if old_members.get(u) == Some(m) {
            continue;
        }
        let rec = Member {
            group: g,
            user: *u,
            role: if m.admin { Role::Admin } else { Role::Member },
            joined_ms: TimestampMs(m.joined_ms),
            joined_seq: Some(m.joined_seq),
        };
        if old_members.contains_key(u) {
            b.put(&rec);
        } else {
            b.add_member(&rec);
        }
    }
    for u in old_members.keys() {
        if !next.members.contains_key(u) {
            b.delete::<Member>(&keys::member(g.0, *u));
        }
    }
    for (u, f) in &next.former {
        if old_former.get(u) != Some(f) {
            b.put(&FormerMember {
                group: g,
                user: *u,
                joined_seq: f.joined_seq,
                left_seq: f.left_seq,
            });
            // Its reverse index stays (the group stays in its conversations); written again in
            // case it never had one.
            b.put(&MemberOf { user: *u, group: g });
        }
    }
    for u in old_former.keys() {
        if !next.former.contains_key(u) {
            b.delete::<FormerMember>(&keys::member(g.0, *u));
            if !next.members.contains_key(u) {
                // Forgotten (`forget_formers`): the group leaves its conversations.
                b.delete::<MemberOf>(&MemberOf { user: *u, group: g }.key());
            }
        }
    }
    next.stored = Some(record);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_storage::MemMeta;

    const G: ConvId = ConvId(crate::ids::GROUP_BIT | 9);
    const MAX: usize = 4;

    fn u(n: u64) -> UserId {
        UserId(n)
    }

    /// Group of admin 1 with members 2 and 3, created and settled at seq 1.
    fn group() -> GroupState {
        let mut c =
            GroupState::create(G, u(1), "g".into(), &[u(2), u(3)], Vec::new(), MAX, 10).unwrap();
        c.next.sequenced(1);
        c.next
    }

    fn code(r: Result<Option<Change>, Refusal>) -> ErrorCode {
        match r {
            Err(Refusal(c, _)) => c,
            Ok(_) => ErrorCode::Unspecified,
        }
    }

    #[test]
    fn info_lists_members_in_pages_with_the_total() {
        let g = group();
        let ids = |i: &v1::GroupInfo| i.members.iter().map(|m| m.user_id).collect::<Vec<_>>();
        let whole = g.info(G, Some(Page::first(3)));
        assert_eq!((ids(&whole), whole.member_count), (vec![1, 2, 3], 3));
        assert_eq!(
            whole.members_next_after_user_id, 0,
            "the last member is in it"
        );
        let first = g.info(G, Some(Page::first(2)));
        assert_eq!(ids(&first), [1, 2]);
        assert_eq!(first.members_next_after_user_id, 2);
        let next = g.info(G, Some(Page::asked(2, 2, 1024)));
        assert_eq!((ids(&next), next.members_next_after_user_id), (vec![3], 0));
        // After an id that is not a member: from the next one up.
        let gap = g.info(G, Some(Page::asked(1, 0, 1)));
        assert_eq!((ids(&gap), gap.members_next_after_user_id), (vec![2], 2));
        let past = g.info(G, Some(Page::asked(3, 0, 1024)));
        assert!(past.members.is_empty() && past.members_next_after_user_id == 0);
        // An event carries neither members nor count.
        let ev = g.info(G, None);
        assert!(ev.members.is_empty() && ev.member_count == 0);
        // A limit of 0 or over the server's page is the server's page.
        assert_eq!(Page::asked(0, 0, 7).limit, 7);
        assert_eq!(Page::asked(0, 9, 7).limit, 7);
        assert_eq!(Page::asked(0, 5, 7).limit, 5);
    }

    #[test]
    fn who_may_do_what() {
        let g = group();
        let ops = [
            Op::Add(vec![u(4)]),
            Op::Remove(vec![u(3)]),
            Op::SetRole {
                user: u(3),
                admin: true,
            },
            Op::Update {
                name: Some("h".into()),
                avatar: None,
                only_admins_send: None,
            },
        ];
        for op in &ops {
            // An admin may; a member may not; a stranger is not a member.
            assert!(
                matches!(g.change(G, u(1), op, MAX, 20), Ok(Some(_))),
                "{op:?}"
            );
            assert_eq!(
                code(g.change(G, u(2), op, MAX, 20)),
                ErrorCode::PermissionDenied
            );
            assert_eq!(code(g.change(G, u(9), op, MAX, 20)), ErrorCode::NotAMember);
        }
        // Anyone may read and leave (but the last admin, see below).
        assert!(matches!(
            g.change(G, u(2), &Op::Info(Page::first(10)), MAX, 20),
            Ok(None)
        ));
        assert!(matches!(
            g.change(G, u(2), &Op::Leave, MAX, 20),
            Ok(Some(_))
        ));
        assert_eq!(
            code(g.change(G, u(9), &Op::Info(Page::first(10)), MAX, 20)),
            ErrorCode::NotAMember
        );
    }

    #[test]
    fn the_last_admin_cannot_leave_remove_or_demote_itself_but_the_last_member_may_leave() {
        let g = group();
        assert_eq!(
            code(g.change(G, u(1), &Op::Leave, MAX, 20)),
            ErrorCode::PermissionDenied
        );
        let demote = Op::SetRole {
            user: u(1),
            admin: false,
        };
        assert_eq!(
            code(g.change(G, u(1), &demote, MAX, 20)),
            ErrorCode::PermissionDenied
        );
        let remove_self = Op::Remove(vec![u(1)]);
        assert_eq!(
            code(g.change(G, u(1), &remove_self, MAX, 20)),
            ErrorCode::PermissionDenied
        );
        // With a second admin, it may.
        let promote = Op::SetRole {
            user: u(2),
            admin: true,
        };
        let mut two = g.change(G, u(1), &promote, MAX, 20).unwrap().unwrap().next;
        two.sequenced(2);
        assert!(matches!(
            two.change(G, u(1), &Op::Leave, MAX, 30),
            Ok(Some(_))
        ));
        // Alone, the admin may leave: the group is empty.
        let mut alone = GroupState::create(G, u(1), "g".into(), &[], Vec::new(), MAX, 10)
            .unwrap()
            .next;
        alone.sequenced(1);
        let left = alone.change(G, u(1), &Op::Leave, MAX, 20).unwrap().unwrap();
        assert!(left.next.members.is_empty());
    }

    #[test]
    fn changes_that_change_nothing_make_no_event_and_sizes_are_limited() {
        let g = group();
        assert!(matches!(
            g.change(G, u(1), &Op::Add(vec![u(2), u(3)]), MAX, 20),
            Ok(None)
        ));
        assert!(matches!(
            g.change(G, u(1), &Op::Remove(vec![u(8)]), MAX, 20),
            Ok(None)
        ));
        let same = Op::SetRole {
            user: u(2),
            admin: false,
        };
        assert!(matches!(g.change(G, u(1), &same, MAX, 20), Ok(None)));
        let same = Op::Update {
            name: Some("g".into()),
            avatar: None,
            only_admins_send: Some(false),
        };
        assert!(matches!(g.change(G, u(1), &same, MAX, 20), Ok(None)));
        let not_member = Op::SetRole {
            user: u(8),
            admin: true,
        };
        assert_eq!(
            code(g.change(G, u(1), &not_member, MAX, 20)),
            ErrorCode::NotAMember
        );
        // 3 members + 2 > 4.
        let Err(Refusal(c, msg)) = g.change(G, u(1), &Op::Add(vec![u(4), u(5)]), MAX, 20) else {
            panic!("not refused")
        };
        assert_eq!(c, ErrorCode::PermissionDenied);
        assert!(msg.contains("group_members_max = 4"), "{msg}");
        assert!(
            GroupState::create(
                G,
                u(1),
                "g".into(),
                &[u(2), u(3), u(4), u(5)],
                Vec::new(),
                MAX,
                1
            )
            .is_err()
        );
        assert_eq!(
            code(Err(check_name("").unwrap_err())),
            ErrorCode::InvalidArgument
        );
        assert!(check_name("a\nb").is_err() && check_name(&"x".repeat(101)).is_err());
        assert!(check_name(&"é".repeat(100)).is_ok());
    }

    #[test]
    fn membership_seqs_take_effect_when_the_event_is_sequenced() {
        let g = group();
        assert_eq!(g.visible(u(2)), Some((1, u64::MAX)));
        let c = g
            .change(G, u(1), &Op::Add(vec![u(4)]), MAX, 20)
            .unwrap()
            .unwrap();
        assert_eq!(c.event().user_ids, [4]);
        assert_eq!(c.event().group.as_ref().unwrap().version, 2);
        assert_eq!(c.event().kind, v1::GroupChangeKind::MembersAdded as i32);
        let mut next = c.next;
        assert!(next.pending.is_some());
        // Committed, not yet sequenced: 4 is not in, but hears its own addition.
        assert_eq!(next.visible(u(4)), None);
        assert_eq!(&next.in_members()[..], [u(1), u(2), u(3)]);
        assert_eq!(&next.event_audience()[..], [u(1), u(2), u(3), u(4)]);
        next.sequenced(7);
        assert_eq!(next.visible(u(4)), Some((7, u64::MAX)));
        assert!(next.pending.is_none());
        // Removal: 2 is still in until its event, then sees up to it.
        let mut r = next
            .change(G, u(1), &Op::Remove(vec![u(2)]), MAX, 30)
            .unwrap()
            .unwrap()
            .next;
        assert_eq!(r.visible(u(2)), Some((1, u64::MAX)));
        assert!(r.in_members().contains(&u(2)) && r.event_audience().contains(&u(2)));
        r.sequenced(9);
        assert_eq!(r.visible(u(2)), Some((1, 9)));
        assert!(!r.in_members().contains(&u(2)));
        assert!(!r.event_audience().contains(&u(2)));
        // Added again: a new membership from the new join.
        let mut back = r
            .change(G, u(1), &Op::Add(vec![u(2)]), MAX, 40)
            .unwrap()
            .unwrap()
            .next;
        back.sequenced(12);
        assert_eq!(back.visible(u(2)), Some((12, u64::MAX)));
        assert!(back.former.is_empty());
    }

    #[test]
    fn a_group_keeps_a_bounded_number_of_former_members_forgetting_the_earliest_removed() {
        let meta = MemMeta::new();
        let mut g = GroupState::create(G, u(1), "g".into(), &[], Vec::new(), MAX, 10)
            .unwrap()
            .next;
        meta.commit(&diff(G, None, &mut g)).unwrap();
        let mut seq = 1;
        let settle = |g: &mut GroupState, seq: &mut u64| {
            let before = g.clone();
            g.sequenced(*seq);
            meta.commit(&diff(G, Some(&before), g)).unwrap();
            *seq += 1;
        };
        settle(&mut g, &mut seq);
        // Users 2..=7 pass through one after the other.
        for user in 2..=7 {
            for op in [Op::Add(vec![u(user)]), Op::Remove(vec![u(user)])] {
                let mut next = g.change(G, u(1), &op, MAX, 20).unwrap().unwrap().next;
                meta.commit(&diff(G, Some(&g), &mut next)).unwrap();
                g = next;
                settle(&mut g, &mut seq);
            }
        }
        assert_eq!(
            g.former.keys().copied().collect::<Vec<_>>(),
            [u(4), u(5), u(6), u(7)]
        );
        assert_eq!(g.visible(u(2)), None);
        assert_eq!(GroupState::load(&meta, G).unwrap().unwrap(), g);
        // The forgotten ones no longer have the group among their conversations.
        let of = |user| {
            meta.scan::<MemberOf>(&keys::user(u(user)), 10)
                .unwrap()
                .len()
        };
        assert_eq!((of(2), of(3), of(4), of(7)), (0, 0, 1, 1));
    }

    #[test]
    fn only_admins_send_refuses_members() {
        let g = group();
        let c = g
            .change(
                G,
                u(1),
                &Op::Update {
                    name: None,
                    avatar: None,
                    only_admins_send: Some(true),
                },
                MAX,
                20,
            )
            .unwrap()
            .unwrap();
        assert!(c.next.check_send(u(1)).is_ok());
        assert_eq!(
            c.next.check_send(u(2)).unwrap_err().0,
            ErrorCode::PermissionDenied
        );
        assert!(g.check_send(u(2)).is_ok());
    }

    #[test]
    fn what_a_change_writes_loads_back_as_the_same_state() {
        let meta = MemMeta::new();
        let mut c =
            GroupState::create(G, u(1), "g".into(), &[u(2)], b"av".to_vec(), MAX, 10).unwrap();
        let b = diff(G, None, &mut c.next);
        meta.commit(&b).unwrap();
        let loaded = GroupState::load(&meta, G).unwrap().unwrap();
        assert_eq!(loaded, c.next);
        // The same create again conflicts (the id is taken).
        let mut again = c.next.clone();
        assert!(meta.commit(&diff(G, None, &mut again)).is_err());
        // Settle, then remove 2: the loaded state follows.
        let before = loaded.clone();
        let mut settled = loaded;
        settled.sequenced(1);
        meta.commit(&diff(G, Some(&before), &mut settled)).unwrap();
        assert_eq!(GroupState::load(&meta, G).unwrap().unwrap(), settled);
        let mut r = settled
            .change(G, u(1), &Op::Remove(vec![u(2)]), MAX, 20)
            .unwrap()
            .unwrap()
            .next;
        meta.commit(&diff(G, Some(&settled), &mut r)).unwrap();
        let loaded = GroupState::load(&meta, G).unwrap().unwrap();
        assert_eq!(loaded, r);
        assert_eq!(
            loaded.former[&u(2)],
            Former {
                joined_seq: 1,
                left_seq: 0
            }
        );
        // A stale base conflicts.
        let mut stale = r.clone();
        assert!(meta.commit(&diff(G, Some(&settled), &mut stale)).is_err());
        assert!(
            GroupState::load(&meta, ConvId(crate::ids::GROUP_BIT | 1))
                .unwrap()
                .is_none()
        );
    }
}
