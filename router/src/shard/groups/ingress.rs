//! A group request at the ingress shard: its arguments checked, then on to the group's owner
//! (for CreateGroup: the owner of a freshly drawn id).

use super::*;

/// Whether `body` is a group request.
pub(in crate::shard) fn is_request(body: &Body) -> bool {
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
pub(in crate::shard) fn request<I, M>(
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
        Body::GetGroupInfo(g) => {
            let page = Page::asked(
                g.members_after_user_id,
                g.members_limit,
                sh.cfg.group_info_members_page,
            );
            (group_id(g.conversation_id)?, Op::Info(page))
        }
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
        created: false,
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
