//! The optional features a server lists in `Welcome.features`, by name, and
//! which frame kinds each covers. The registry is documented on
//! `Welcome.features` in `proto/connection.proto`; a test checks that the two
//! agree.

use crate::FrameKind;

/// Send, DeliveryAck, ReadCursor, Sync (and the Deliver, Receipt and
/// MessagesAvailable pushes).
pub const MESSAGING: &str = "messaging";
/// GetHistory.
pub const HISTORY: &str = "history";
/// ListConversations.
pub const CONVERSATION_LIST: &str = "conversation_list";
/// Block, Unblock.
pub const BLOCK: &str = "block";
/// SetPassword, Login with a password.
pub const PASSWORD_LOGIN: &str = "password_login";
/// DiscoverContacts.
pub const CONTACT_DISCOVERY: &str = "contact_discovery";
/// The group requests and GetReceipts (and group events, GroupReceipts).
pub const GROUPS: &str = "groups";
/// SubscribePresence, UnsubscribePresence, SetPresence (and PresenceUpdate).
pub const PRESENCE: &str = "presence";
/// Typing.
pub const TYPING: &str = "typing";
/// GetProfiles.
pub const PROFILES: &str = "profiles";
/// RequestUpload, RequestDownload.
pub const MEDIA: &str = "media";
/// UploadKeys, FetchKeyBundles.
pub const E2E_KEYS: &str = "e2e_keys";
/// RegisterPushToken, UnregisterPushToken.
pub const PUSH: &str = "push";

/// Every registered name, in the order the `.proto` lists them.
pub const ALL: &[&str] = &[
    MESSAGING,
    HISTORY,
    CONVERSATION_LIST,
    BLOCK,
    PASSWORD_LOGIN,
    CONTACT_DISCOVERY,
    GROUPS,
    PRESENCE,
    TYPING,
    PROFILES,
    MEDIA,
    E2E_KEYS,
    PUSH,
];

/// The feature a client frame of this kind belongs to; `None` for the frames
/// every server offers (connection, accounts, own profile and devices) and
/// for frames only the server sends. `Login` is listed under no feature: with
/// a one-time code it is always offered, with a password it needs
/// [`PASSWORD_LOGIN`].
#[must_use]
pub fn of(kind: FrameKind) -> Option<&'static str> {
    use FrameKind as K;
    Some(match kind {
        K::Send | K::DeliveryAck | K::ReadCursor | K::Sync => MESSAGING,
        K::GetHistory => HISTORY,
        K::ListConversations => CONVERSATION_LIST,
        K::Block | K::Unblock => BLOCK,
        K::SetPassword => PASSWORD_LOGIN,
        K::DiscoverContacts => CONTACT_DISCOVERY,
        K::CreateGroup
        | K::GetGroupInfo
        | K::AddGroupMembers
        | K::RemoveGroupMembers
        | K::SetGroupRole
        | K::LeaveGroup
        | K::UpdateGroup
        | K::GetReceipts => GROUPS,
        K::SubscribePresence | K::UnsubscribePresence | K::SetPresence => PRESENCE,
        K::Typing => TYPING,
        K::GetProfiles => PROFILES,
        K::RequestUpload | K::RequestDownload => MEDIA,
        K::UploadKeys | K::FetchKeyBundles => E2E_KEYS,
        K::RegisterPushToken | K::UnregisterPushToken => PUSH,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names listed on `Welcome.features` in the `.proto`, in order.
    fn proto_registry() -> Vec<String> {
        let proto = include_str!("../proto/connection.proto");
        let start = proto
            .find("The registry of names")
            .expect("the registry comment on Welcome.features");
        proto[start..]
            .lines()
            .skip(1)
            .map(str::trim_start)
            .take_while(|l| l.starts_with("//"))
            .filter_map(|l| {
                let l = l.trim_start_matches('/').trim_start();
                let rest = l.strip_prefix('"')?;
                Some(rest[..rest.find('"')?].to_owned())
            })
            .collect()
    }

    #[test]
    fn the_proto_lists_exactly_these_names() {
        assert_eq!(proto_registry(), ALL);
    }

    #[test]
    fn every_name_covers_a_request() {
        for name in ALL {
            assert!(
                FrameKind::ALL.iter().any(|&k| of(k) == Some(name)),
                "{name} covers no frame kind"
            );
        }
    }
}
