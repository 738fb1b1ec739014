//! Media in messages: the checks a `Send`'s `MediaRef` passes at the ingress shard, and
//! `RequestDownload` (ingress → owner → reply): a download grant only for someone who may read a
//! message that names the object. The bytes never pass through here; the gateway's media
//! endpoint serves them, and signs the grant through [`DownloadSigner`].

use std::fmt;

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::{CursorStore, MessageIndex, MetadataStore, UserId};

use super::envelope::entry_to_message;
use super::frames::{Refusal, error_frame, frame};
use super::mail::{DownloadCmd, Inner};
use super::shared::Shared;
use crate::ids::{ConnRef, ConvId};

/// Most bytes of a `MediaRef.thumbnail`.
pub const THUMBNAIL_BYTES_MAX: usize = 4096;
/// Most bytes of a `MediaRef`'s `content_type` and of its `file_name`.
pub const MEDIA_TEXT_BYTES_MAX: usize = 255;

/// Makes download grants: the gateway's media endpoint signs its URLs (the key never leaves
/// it).
pub trait DownloadSigner: Send + Sync + fmt::Debug {
    /// A grant to GET `media_id`, made at `now_ms`.
    fn download_grant(&self, media_id: &str, now_ms: u64) -> v1::DownloadGrant;
}

/// Whether `id` is a media id: 64 lowercase hex characters (a SHA-256).
#[must_use]
pub fn is_media_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// At the ingress shard: the checks a Send's MediaRef passes (the gateway checked that the
/// object exists before it handed the Send over).
pub(super) fn check_ref(m: &v1::MediaRef) -> Result<(), Refusal> {
    let bad = |msg: &str| Err(Refusal(ErrorCode::InvalidArgument, msg.into()));
    if !is_media_id(&m.media_id) {
        return bad("media.media_id must be 64 lowercase hex characters (from UploadGrant)");
    }
    if m.content_type.len() > MEDIA_TEXT_BYTES_MAX || m.file_name.len() > MEDIA_TEXT_BYTES_MAX {
        return bad("media.content_type and media.file_name are at most 255 bytes each");
    }
    if m.thumbnail.len() > THUMBNAIL_BYTES_MAX {
        return bad("media.thumbnail is at most 4096 bytes");
    }
    Ok(())
}

/// At the ingress shard: the request goes to the conversation's owner.
pub(super) fn request<I, M>(
    sh: &mut Shared<I, M>,
    origin: ConnRef,
    rid: u64,
    user: UserId,
    req: v1::RequestDownload,
) -> Result<(), Refusal> {
    if !is_media_id(&req.media_id) {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "media_id must be 64 lowercase hex characters".into(),
        ));
    }
    let Some(conv) = ConvId::from_wire(req.conversation_id) else {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "conversation_id is 0: name the message that carries the media".into(),
        ));
    };
    if req.seq == 0 {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "seq is 0: name the message that carries the media".into(),
        ));
    }
    if sh.cfg.media.is_none() {
        return Err(Refusal(
            ErrorCode::NotSupported,
            "RequestDownload needs the \"media\" feature, which this server does not offer".into(),
        ));
    }
    let to = sh.mail.owner(conv);
    sh.send_to(
        to,
        Inner::Download(DownloadCmd {
            origin,
            request_id: rid,
            user,
            conv,
            req,
        }),
    );
    Ok(())
}

/// At the owner: the grant, or the refusal, goes back to the connection that asked.
pub(super) fn on_cmd<I, M>(sh: &mut Shared<I, M>, d: DownloadCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let f = match grant(sh, &d) {
        Ok(g) => frame(d.request_id, Body::DownloadGrant(g)),
        Err(Refusal(code, msg)) => error_frame(d.request_id, code, msg),
    };
    sh.reply(d.origin, vec![f]);
}

fn grant<I, M>(sh: &mut Shared<I, M>, d: &DownloadCmd) -> Result<v1::DownloadGrant, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let (conv, seq) = (d.conv, d.req.seq);
    // Only a message the caller may read: a group member's from its join, a former member's up
    // to its removal.
    let (_, (from, to)) = sh.reader_conv(conv, d.user)?;
    let not_found = || {
        Refusal(
            ErrorCode::NotFound,
            format!(
                "no message {seq} of conversation {} names media {}",
                conv.0, d.req.media_id
            ),
        )
    };
    if seq < from || seq > to {
        return Err(not_found());
    }
    let entries = sh.read_after(conv, seq - 1, 1)?;
    let keep = sh.keep(conv);
    let named = entries
        .first()
        .filter(|e| e.seq.0 == seq && !keep.gone(e))
        .and_then(|e| entry_to_message(conv, e))
        .and_then(|m| m.media)
        .is_some_and(|m| m.media_id == d.req.media_id);
    if !named {
        return Err(not_found());
    }
    let Some(signer) = &sh.cfg.media else {
        return Err(Refusal(ErrorCode::NotSupported, "no media endpoint".into()));
    };
    Ok(signer.download_grant(&d.req.media_id, sh.now_ms))
}
