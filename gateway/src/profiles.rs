//! GetProfiles, and the contacts that DiscoverContacts records (see `protocol/README.md`,
//! "Presence, typing and profiles"). A contact is a pair (user, matched user) in the node's
//! metadata (`meta::Contact`), written before the matches are answered; the router's visibility
//! rule (`starling_router::visibility`) reads it, for presence and for profiles alike. Both run
//! on the blocking pool: they read and write stores.

use starling_protocol::v1::{self, ErrorCode};
use starling_storage::meta::Contact;
use starling_storage::{EmbeddedMeta, MetaBatch, MetadataStore as _, TimestampMs, UserId};

use crate::accounts::{Accounts, ApiError, Principal};
use crate::clock;

/// Most ids in one GetProfiles (the `.proto`'s limit).
pub const PROFILE_IDS_MAX: usize = 256;

/// DiscoverContacts: the matches, each recorded as one of the caller's contacts (durably, in
/// one commit) before they are answered.
///
/// # Errors
/// The accounts' refusals (rate limit, bad hashes); `STORAGE_FAILURE` if the contacts could not
/// be recorded (nothing was answered; the request may be sent again).
pub fn discover(
    meta: Option<&EmbeddedMeta>,
    accounts: &Accounts,
    p: Principal,
    req: &v1::DiscoverContacts,
    now_ms: u64,
) -> Result<v1::ContactMatches, ApiError> {
    let matches = accounts.discover(p, req, now_ms)?;
    if let Some(meta) = meta
        && !matches.matches.is_empty()
    {
        let mut b = MetaBatch::default();
        for m in &matches.matches {
            b.put(&Contact {
                user: UserId(p.user_id),
                contact: UserId(m.user_id),
                created_ms: TimestampMs(clock::unix_ms()),
            });
        }
        if let Err(e) = meta.commit(&b) {
            tracing::warn!(user = p.user_id, error = %e, "recording discovered contacts");
            return Err(ApiError::new(
                ErrorCode::StorageFailure,
                "the contacts found could not be recorded; send DiscoverContacts again",
            ));
        }
    }
    Ok(matches)
}

/// GetProfiles: the public profiles of the users the caller may see, in the order of the
/// request (duplicates once); unknown and not visible users are omitted alike.
///
/// # Errors
/// `INVALID_ARGUMENT` (more than [`PROFILE_IDS_MAX`] ids, or an id 0); `STORAGE_FAILURE`.
pub fn get_profiles(
    meta: &EmbeddedMeta,
    accounts: &Accounts,
    p: Principal,
    req: &v1::GetProfiles,
) -> Result<v1::Profiles, ApiError> {
    if req.user_ids.len() > PROFILE_IDS_MAX {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("at most {PROFILE_IDS_MAX} user ids per GetProfiles"),
        ));
    }
    if req.user_ids.contains(&0) {
        return Err(ApiError::new(ErrorCode::InvalidArgument, "user id 0"));
    }
    let mut ids: Vec<UserId> = Vec::with_capacity(req.user_ids.len());
    for &u in &req.user_ids {
        if !ids.contains(&UserId(u)) {
            ids.push(UserId(u));
        }
    }
    let seen =
        starling_router::visibility::visible(meta, UserId(p.user_id), &ids).map_err(|e| {
            tracing::warn!(user = p.user_id, error = %e, "profile visibility");
            ApiError::new(ErrorCode::StorageFailure, "profiles unavailable; retry")
        })?;
    let mut profiles = Vec::new();
    for (u, visible) in ids.into_iter().zip(seen) {
        if visible && let Some(prof) = accounts.public_profile(u.0)? {
            profiles.push(prof);
        }
    }
    Ok(v1::Profiles { profiles })
}
