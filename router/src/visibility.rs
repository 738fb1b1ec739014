//! Whose presence and profile a user may see (`protocol/README.md`, "Presence, typing and
//! profiles"): their own; that of every user they share a conversation with (a direct
//! conversation of the pair, or a group both are members of); and that of their contacts (the
//! users contact discovery found for them, recorded as `meta::Contact`). Everyone else — unknown
//! users too — is not visible, so the answer never tells who has an account.
//!
//! Point reads of the metadata only: per target, the pair's contact record and direct
//! conversation, then one membership read per group of the caller for the targets still not
//! visible. The router checks `SubscribePresence` with it at the ingress shard; the gateway
//! checks `GetProfiles` with it on its blocking pool.

use starling_storage::meta::{Contact, DirectPair, Member, MemberOf, keys};
use starling_storage::{MetadataStore, StorageError, UserId};

use crate::ids::ConvId;

/// For each of `targets`, whether `user` may see their presence and profile.
pub fn visible<M: MetadataStore>(
    meta: &M,
    user: UserId,
    targets: &[UserId],
) -> Result<Vec<bool>, StorageError> {
    let mut seen = Vec::with_capacity(targets.len());
    for &t in targets {
        seen.push(t == user || is_contact(meta, user, t)? || has_direct(meta, user, t)?);
    }
    if seen.iter().all(|&v| v) {
        return Ok(seen);
    }
    // The groups the caller is a member of: is any target a member too?
    for m in meta.scan::<MemberOf>(&keys::user(user), usize::MAX)? {
        if !ConvId::from_storage(m.group).is_group() {
            continue;
        }
        for (i, &t) in targets.iter().enumerate() {
            if !seen[i] && meta.get::<Member>(&keys::member(m.group.0, t))?.is_some() {
                seen[i] = true;
            }
        }
        if seen.iter().all(|&v| v) {
            break;
        }
    }
    Ok(seen)
}

/// The key of `user`'s contact record of `contact`.
pub fn contact_key(user: UserId, contact: UserId) -> Vec<u8> {
    let mut k = keys::user(user);
    k.extend_from_slice(&contact.0.to_be_bytes());
    k
}

fn is_contact<M: MetadataStore>(meta: &M, user: UserId, t: UserId) -> Result<bool, StorageError> {
    Ok(meta.get::<Contact>(&contact_key(user, t))?.is_some())
}

fn has_direct<M: MetadataStore>(meta: &M, user: UserId, t: UserId) -> Result<bool, StorageError> {
    let (low, high) = if user <= t { (user, t) } else { (t, user) };
    let mut k = keys::user(low);
    k.extend_from_slice(&high.0.to_be_bytes());
    Ok(meta.get::<DirectPair>(&k)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_storage::meta::Role;
    use starling_storage::{MemMeta, MetaBatch, TimestampMs};

    const GROUP: u64 = crate::ids::GROUP_BIT | 7;

    fn store() -> MemMeta {
        let meta = MemMeta::default();
        let mut b = MetaBatch::default();
        // 1 and 2 share a direct conversation; 1 and 3 a group; 4 is 1's contact; 5 knows
        // nobody, but has 1 as a contact (which does not make 5 visible to 1).
        b.put(&DirectPair {
            low: UserId(1),
            high: UserId(2),
            conv: ConvId(10).storage(),
        });
        for u in [1, 3] {
            b.add_member(&Member {
                group: ConvId(GROUP).storage(),
                user: UserId(u),
                role: Role::Member,
                joined_ms: TimestampMs(0),
                joined_seq: Some(1),
            });
        }
        b.put(&Contact {
            user: UserId(1),
            contact: UserId(4),
            created_ms: TimestampMs(0),
        });
        b.put(&Contact {
            user: UserId(5),
            contact: UserId(1),
            created_ms: TimestampMs(0),
        });
        meta.commit(&b).unwrap();
        meta
    }

    #[test]
    fn self_shared_conversations_and_contacts_are_visible_nobody_else() {
        let meta = store();
        let ids = |v: &[u64]| v.iter().map(|&u| UserId(u)).collect::<Vec<_>>();
        assert_eq!(
            visible(&meta, UserId(1), &ids(&[1, 2, 3, 4, 5, 99])).unwrap(),
            [true, true, true, true, false, false]
        );
        // Shared conversations work both ways; contacts only for who discovered them.
        assert_eq!(
            visible(&meta, UserId(2), &ids(&[1, 3])).unwrap(),
            [true, false]
        );
        assert_eq!(visible(&meta, UserId(3), &ids(&[1])).unwrap(), [true]);
        assert_eq!(visible(&meta, UserId(4), &ids(&[1])).unwrap(), [false]);
        assert_eq!(visible(&meta, UserId(5), &ids(&[1])).unwrap(), [true]);
    }
}
