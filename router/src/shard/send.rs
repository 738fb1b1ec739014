//! `Send` at the ingress shard: the first leg of a message's path (see
//! `docs/design/messaging.md`, "The path of one message"). The owner's side is the sequencer.

use starling_protocol::v1::{self, ErrorCode};
use starling_storage::{ClientMsgId, CursorStore, DeviceId, MessageIndex, MetadataStore, UserId};

use super::direct::Direct;
use super::frames::Refusal;
use super::mail::{Inner, SendCmd};
use super::shared::Shared;
use crate::ids::{ConnRef, ConvId};
use crate::metawriter::ordered;

/// At the ingress shard: checks the Send (`client_msg_id` exactly 16 bytes and not all zero,
/// body within `body_bytes_max`, content type within 255 bytes, a recipient), resolves a user
/// recipient to their direct conversation, and sends it on to the conversation's owner; the
/// first Send of a pair is parked while its conversation is created.
pub(super) fn request<I: MessageIndex, M: MetadataStore + CursorStore>(
    sh: &mut Shared<I, M>,
    direct: &mut Direct,
    origin: ConnRef,
    rid: u64,
    user: UserId,
    device: DeviceId,
    s: v1::Send,
) -> Result<(), Refusal> {
    let cmid: [u8; 16] = s.client_msg_id.as_ref().try_into().map_err(|_| {
        Refusal(
            ErrorCode::InvalidArgument,
            format!(
                "client_msg_id must be 16 bytes, got {}",
                s.client_msg_id.len()
            ),
        )
    })?;
    if cmid == [0; 16] {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "client_msg_id must not be all zeroes".into(),
        ));
    }
    if super::groups::event::is_reserved(&cmid) {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "client_msg_id must not start with ff 53 54 52 4c 47 52 50 (reserved for group \
             events)"
                .into(),
        ));
    }
    if s.body.len() > sh.cfg.body_bytes_max {
        return Err(Refusal(
            ErrorCode::BodyTooLarge,
            format!(
                "body is {} bytes, limit {}",
                s.body.len(),
                sh.cfg.body_bytes_max
            ),
        ));
    }
    if s.content_type.len() > 255 {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "content_type longer than 255 bytes".into(),
        ));
    }
    if let Some(m) = &s.media {
        super::media::check_ref(m)?;
    }
    super::changes::check_request(&s)?;
    super::disappearing::check_request(&s)?;
    let conv = match s.to.and_then(|t| t.target) {
        Some(v1::recipient::Target::UserId(peer)) => match direct.resolve(user, UserId(peer))? {
            Some(conv) => Ok(conv),
            None => Err((ordered(user, UserId(peer)), UserId(peer))),
        },
        Some(v1::recipient::Target::ConversationId(c)) if c != 0 => Ok(ConvId(c)),
        _ => {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                "Send.to must name a user or a conversation".into(),
            ));
        }
    };
    let mut cmd = SendCmd {
        origin,
        request_id: rid,
        user,
        device,
        conv: ConvId(0), // set below, or once a parked Send's conversation exists
        cmid: ClientMsgId(cmid),
        cmid_bytes: s.client_msg_id,
        content_type: s.content_type,
        body: s.body,
        media: s.media,
        reply_to_seq: s.reply_to_seq,
        change: s.change,
        set_timer: s.set_timer.map(|t| t.seconds),
        target_expiry_ms: 0,
        change_ready: false,
        first_attempt: s.first_attempt,
        now_ms: sh.now_ms,
    };
    match conv {
        Ok(conv) => {
            cmd.conv = conv;
            let owner = sh.mail.owner(conv);
            sh.send_to(owner, Inner::Send(Box::new(cmd)));
        }
        // A pair this shard does not know yet: its conversation is looked up (and, for its
        // first message, created) off this thread.
        Err((pair, peer)) => direct.park(sh, pair, peer, cmd),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use starling_protocol::v1::recipient::Target;
    use starling_protocol::v1::{self, ErrorCode, frame::Body};

    use super::super::ShardConfig;
    use super::super::fixture::{GROUP, answers, send_frame, shard, transmitted};
    use crate::ids::ConnId;

    /// What makes a good Send bad.
    type Spoil = fn(&mut v1::Send);

    #[test]
    fn a_bad_send_is_refused_at_the_ingress_shard_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShardConfig {
            body_bytes_max: 4,
            ..ShardConfig::default()
        };
        let (mut s, _meta) = shard(dir.path(), cfg);
        let invalid = ErrorCode::InvalidArgument;
        let cases: [(Spoil, ErrorCode, &str); 13] = [
            (
                |s| s.client_msg_id = Bytes::from(vec![7; 15]),
                invalid,
                "client_msg_id must be 16 bytes, got 15",
            ),
            (
                |s| s.client_msg_id = Bytes::from(vec![0; 16]),
                invalid,
                "client_msg_id must not be all zeroes",
            ),
            (
                |s| s.client_msg_id = Bytes::from_static(b"\xffSTRLGRP\0\0\0\0\0\0\0\x01"),
                invalid,
                "client_msg_id must not start with ff 53 54 52 4c 47 52 50 (reserved for group \
                 events)",
            ),
            (
                |s| s.body = Bytes::from_static(b"hello"),
                ErrorCode::BodyTooLarge,
                "body is 5 bytes, limit 4",
            ),
            (
                |s| s.content_type = "t".repeat(256),
                invalid,
                "content_type longer than 255 bytes",
            ),
            (
                |s| s.to = None,
                invalid,
                "Send.to must name a user or a conversation",
            ),
            (
                |s| {
                    s.to = Some(v1::Recipient {
                        target: Some(Target::ConversationId(0)),
                    });
                },
                invalid,
                "Send.to must name a user or a conversation",
            ),
            (
                |s| {
                    s.to = Some(v1::Recipient {
                        target: Some(Target::UserId(0)),
                    });
                },
                invalid,
                "recipient user_id is 0",
            ),
            (
                |s| {
                    s.to = Some(v1::Recipient {
                        target: Some(Target::UserId(99)),
                    });
                },
                ErrorCode::NotFound,
                "no such user",
            ),
            (
                |s| s.media = Some(Box::new(v1::MediaRef::default())),
                invalid,
                "media.media_id must be 64 lowercase hex characters (from UploadGrant)",
            ),
            (
                |s| {
                    let mut m = crate::shard::envelope::sample_media();
                    m.thumbnail = Bytes::from(vec![0; 4097]);
                    s.media = Some(Box::new(m));
                },
                invalid,
                "media.thumbnail is at most 4096 bytes",
            ),
            (
                |s| {
                    let mut m = crate::shard::envelope::sample_media();
                    m.file_name = "f".repeat(256);
                    s.media = Some(Box::new(m));
                },
                invalid,
                "media.content_type and media.file_name are at most 255 bytes each",
            ),
            (
                |s| {
                    let mut m = crate::shard::envelope::sample_media();
                    m.media_id = m.media_id.to_uppercase();
                    s.media = Some(Box::new(m));
                },
                invalid,
                "media.media_id must be 64 lowercase hex characters (from UploadGrant)",
            ),
        ];
        for (rid, (spoil, code, message)) in (1..).zip(cases) {
            let mut f = send_frame(rid, 7, Target::ConversationId(GROUP.0), b"hi");
            if let Some(Body::Send(sd)) = &mut f.body {
                spoil(sd);
            }
            s.handle_frame(ConnId(1), f, 1);
            let out = transmitted(&mut s);
            let got = answers(&out, ConnId(1), rid);
            let [Body::Error(e)] = &got[..] else {
                panic!("case {rid}: {got:?}")
            };
            assert_eq!(
                (e.code, e.message.as_str()),
                (code as i32, message),
                "case {rid}"
            );
        }
        // A good one passes (it is answered once durable).
        let ok = send_frame(99, 9, Target::ConversationId(GROUP.0), b"ok");
        s.handle_frame(ConnId(1), ok, 1);
        assert!(answers(&transmitted(&mut s), ConnId(1), 99).is_empty());
        assert_eq!(s.stats().messages_acked, 0);
    }
}
