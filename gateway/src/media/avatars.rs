//! Profile avatars in the media store: a user's avatar is an uploaded object, referenced like a
//! message's attachment (so never collected), and its `MediaRef` is kept in
//! `<data>/media/avatars/<user id>` (written atomically and durably). The account records do not
//! hold it: they are moving into the storage layer's metadata store, which can take this file's
//! content as one more column when they get there.
//!
//! Who may download an avatar: whoever may see the profile (the router's visibility rule: the
//! user themself, someone sharing a conversation with them, a contact who discovered them).
//! Every function blocks: call them on the blocking pool.

use std::io;
use std::path::PathBuf;

use prost::Message as _;
use starling_protocol::v1::{self, ErrorCode};
use starling_storage::{EmbeddedMeta, UserId};

use super::Media;
use crate::accounts::ApiError;

fn storage(what: &str, e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "media avatars: {what}");
    ApiError::new(
        ErrorCode::StorageFailure,
        "the avatar store failed; retry later",
    )
}

impl Media {
    fn avatar_path(&self, user: u64) -> PathBuf {
        self.avatars_dir.join(user.to_string())
    }

    /// The avatar of `user`, if one is set.
    ///
    /// # Errors
    /// `STORAGE_FAILURE` if it cannot be read.
    pub fn avatar(&self, user: u64) -> Result<Option<v1::MediaRef>, ApiError> {
        match std::fs::read(self.avatar_path(user)) {
            Ok(b) => v1::MediaRef::decode(&b[..])
                .map(Some)
                .map_err(|e| storage("decoding an avatar", &e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage("reading an avatar", &e)),
        }
    }

    /// Checks that `avatar` names an uploaded object and records its reference (before the
    /// profile changes).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` (a malformed MediaRef), `NOT_FOUND` (not uploaded).
    pub fn admit_avatar(&self, avatar: &v1::MediaRef) -> Result<(), ApiError> {
        if avatar.content_type.len() > starling_router::MEDIA_TEXT_BYTES_MAX
            || avatar.file_name.len() > starling_router::MEDIA_TEXT_BYTES_MAX
            || avatar.thumbnail.len() > starling_router::THUMBNAIL_BYTES_MAX
        {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "avatar: content_type and file_name at most 255 bytes, thumbnail at most 4096",
            ));
        }
        self.add_reference(&avatar.media_id)
    }

    /// Sets (`Some`) or removes (`None`) the avatar of `user`, durably.
    ///
    /// # Errors
    /// `STORAGE_FAILURE`.
    pub fn set_avatar(&self, user: u64, avatar: Option<&v1::MediaRef>) -> Result<(), ApiError> {
        let path = self.avatar_path(user);
        match avatar {
            Some(a) => crate::fsutil::write_atomic(&path, &a.encode_to_vec(), 0o600)
                .map_err(|e| storage("writing an avatar", &e)),
            None => match std::fs::remove_file(&path) {
                Ok(()) => crate::fsutil::fsync_dir(&self.avatars_dir)
                    .map_err(|e| storage("removing an avatar", &e)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(storage("removing an avatar", &e)),
            },
        }
    }

    /// `RequestDownload{media_id, user_id}`: a grant for `user`'s avatar if `caller` may see
    /// their profile and `media_id` is that avatar.
    ///
    /// # Errors
    /// `NOT_FOUND` (no visible profile has that avatar), `STORAGE_FAILURE`.
    pub fn avatar_grant(
        self: &std::sync::Arc<Self>,
        meta: &EmbeddedMeta,
        caller: u64,
        user: u64,
        media_id: &str,
        now_ms: u64,
    ) -> Result<v1::DownloadGrant, ApiError> {
        let visible = starling_router::visibility::visible(meta, UserId(caller), &[UserId(user)])
            .map_err(|e| storage("profile visibility", &e))?;
        let named = visible.first().copied().unwrap_or(false)
            && self.avatar(user)?.is_some_and(|a| a.media_id == media_id);
        if !named {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no profile you may see has the avatar {media_id}"),
            ));
        }
        Ok(starling_router::DownloadSigner::download_grant(
            &super::DownloadUrls(self.clone()),
            media_id,
            now_ms,
        ))
    }
}
