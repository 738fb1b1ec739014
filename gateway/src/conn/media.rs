//! A connection's media requests (`crate::media`): upload grants (on the shard, no I/O), Sends
//! that name media (the reference is recorded on the blocking pool first), profile avatars
//! (UpdateProfile's avatar, and `RequestDownload{user_id}` for whoever may see the profile).
//! Message media download grants are the router's (`starling_router`, `shard/media.rs`).

use starling_protocol::v1::{self, ErrorCode, frame::Body};

use super::Conn;
use crate::accounts::{Accounts, ApiError, Principal};
use crate::media::Media;
use crate::runtime;

/// Puts the user's avatar (if media is on and one is set) into `prof`.
pub(super) fn fill_avatar(media: Option<&Media>, prof: &mut v1::Profile) -> Result<(), ApiError> {
    if let Some(m) = media {
        prof.avatar = m.avatar(prof.user_id)?.map(Box::new);
    }
    Ok(())
}

impl Conn {
    /// RequestUpload → UploadGrant.
    pub(super) fn request_upload(&mut self, rid: u64, req: v1::RequestUpload) {
        let now = self.clock.unix_ms();
        match self.shard.shared.media.as_ref() {
            Some(media) => match media.upload_grant(&req, now) {
                Ok(g) => self.send(rid, Body::UploadGrant(g)),
                Err(e) => self.api_error(rid, e),
            },
            None => self.not_supported(rid, &Body::RequestUpload(req), "media"),
        }
    }

    /// A Send with media: the object must exist, and its reference is recorded durably (off
    /// the shard) before the message is sequenced, so the collector never deletes what an
    /// acknowledged message names.
    pub(super) async fn send_with_media(&mut self, rid: u64, s: v1::Send) {
        let Some(media) = self.shard.shared.media.clone() else {
            self.not_supported(rid, &Body::Send(s), "media");
            return;
        };
        let id = s
            .media
            .as_ref()
            .map(|m| m.media_id.clone())
            .unwrap_or_default();
        match runtime::blocking(move || media.add_reference(&id)).await {
            Some(Ok(())) => self.hand_to_router(rid, Body::Send(s)),
            Some(Err(e)) => self.api_error(rid, e),
            None => self.error(rid, ErrorCode::Internal, "internal error"),
        }
    }

    /// UpdateProfile: the avatar (if any) must be an uploaded object and is referenced before
    /// the profile changes; it is recorded after the account's fields were saved.
    pub(super) async fn update_profile(&mut self, rid: u64, p: Principal, req: v1::UpdateProfile) {
        let media = self.shard.shared.media.clone();
        let avatar_change = req.avatar.is_some() || req.clear_avatar;
        if avatar_change && media.is_none() {
            self.not_supported(rid, &Body::UpdateProfile(req), "media");
            return;
        }
        if req.avatar.is_some() && req.clear_avatar {
            self.error(
                rid,
                ErrorCode::InvalidArgument,
                "set avatar or clear_avatar, not both",
            );
            return;
        }
        // The account's record is the one conversation titles are read from: the new name is
        // durable there before the Profile answers.
        let update = move |acc: &Accounts, _| {
            if let (Some(m), Some(a)) = (&media, &req.avatar) {
                m.admit_avatar(a)?;
            }
            let mut prof = acc.update_profile(p, &req)?;
            if let Some(m) = &media {
                if let Some(a) = &req.avatar {
                    m.set_avatar(p.user_id, Some(a))?;
                } else if req.clear_avatar {
                    m.set_avatar(p.user_id, None)?;
                }
            }
            fill_avatar(media.as_deref(), &mut prof)?;
            Ok(prof)
        };
        match self.call(update).await {
            Ok(prof) => self.send(rid, Body::Profile(prof)),
            Err(e) => self.api_error(rid, e),
        }
    }

    /// `RequestDownload{media_id, user_id}`: an avatar, for whoever may see the profile.
    pub(super) async fn avatar_download(&mut self, rid: u64, p: Principal, r: v1::RequestDownload) {
        if r.conversation_id != 0 || r.seq != 0 {
            self.error(
                rid,
                ErrorCode::InvalidArgument,
                "name either a message (conversation_id and seq) or a user (user_id), not both",
            );
            return;
        }
        if !starling_router::is_media_id(&r.media_id) {
            self.error(
                rid,
                ErrorCode::InvalidArgument,
                "media_id must be 64 lowercase hex characters",
            );
            return;
        }
        let (Some(media), Some(meta)) = (
            self.shard.shared.media.clone(),
            self.shard.router.as_ref().map(|x| x.meta.clone()),
        ) else {
            self.not_supported(rid, &Body::RequestDownload(r), "media");
            return;
        };
        let now = self.clock.unix_ms();
        let grant = move |_: &Accounts, _| {
            media.avatar_grant(&meta, p.user_id, r.user_id, &r.media_id, now)
        };
        match self.call(grant).await {
            Ok(g) => self.send(rid, Body::DownloadGrant(g)),
            Err(e) => self.api_error(rid, e),
        }
    }
}
