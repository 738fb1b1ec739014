//! Typing indicators (see `protocol/README.md`, "Presence, typing and profiles"): ingress shard
//! (per-connection rate limit) → the conversation's owner (membership check, expiry) → every
//! shard, which pushes the indicator to its connections of the other members. Nothing is
//! stored or queued: a connection that is not online gets nothing, and one whose backlog is
//! above half its budget does not get it either (typing is the first thing dropped).
//!
//! The owner remembers each (conversation, user) typing until `typing_expiry_ms` after their
//! latest TYPING; if no TYPING or STOPPED came by then, it sends STOPPED itself.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use starling_protocol::FrameKind;
use starling_protocol::v1::{self, ErrorCode, TypingState, frame::Body};
use starling_storage::{CursorStore, MessageIndex, MetadataStore, UserId};

use super::frames::{Refusal, encode_frame, error_frame, frame, retry_frame};
use super::mail::{Inner, TypingMsg as Msg};
use super::shared::Shared;
use crate::hash::HashMap;
use crate::ids::{ConnId, ConnRef, ConvId};
use crate::limits::RateLimiter;

/// Typing state of one shard: its connections' rate limits, and the typing users of the
/// conversations it owns.
pub(super) struct Typing {
    limiter: RateLimiter<ConnId>,
    /// (conversation, user) → when their TYPING expires.
    active: HashMap<(ConvId, UserId), u64>,
    /// The same, in the order they expire (entries whose time `active` no longer holds are
    /// stale and skipped).
    expiry: VecDeque<(u64, ConvId, UserId)>,
}

impl Typing {
    pub(super) fn new(per_s: u32, burst: u32) -> Typing {
        Typing {
            limiter: RateLimiter::new(per_s, burst),
            active: HashMap::default(),
            expiry: VecDeque::new(),
        }
    }

    /// A Typing from this shard's connection: rate-limited here, then on to the owner.
    pub(super) fn request<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        origin: ConnRef,
        rid: u64,
        user: UserId,
        t: &v1::Typing,
    ) -> Result<(), Refusal> {
        let typing = match TypingState::try_from(t.state) {
            Ok(TypingState::Typing) => true,
            Ok(TypingState::Stopped) => false,
            _ => {
                return Err(Refusal(
                    ErrorCode::InvalidArgument,
                    "Typing.state must be TYPING or STOPPED".into(),
                ));
            }
        };
        let Some(conv) = ConvId::from_wire(t.conversation_id) else {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                "conversation_id is 0".into(),
            ));
        };
        if let Err(retry_ms) = self.limiter.take(origin.conn, sh.now_ms) {
            sh.stats.typing_dropped += 1;
            if rid != 0 {
                let f = retry_frame(
                    rid,
                    ErrorCode::RateLimited,
                    format!(
                        "too many Typing frames: at most {} per second",
                        sh.cfg.typing_per_s
                    ),
                    u32::try_from(retry_ms).unwrap_or(u32::MAX),
                );
                sh.emit(origin.conn, f, false);
            }
            return Ok(());
        }
        let owner = sh.mail.owner(conv);
        let m = Msg::Cmd {
            origin,
            request_id: rid,
            user,
            conv,
            typing,
        };
        sh.send_to(owner, Inner::Typing(m));
        Ok(())
    }

    /// A typing message from another shard (or this one).
    pub(super) fn on_msg<I, M>(&mut self, sh: &mut Shared<I, M>, m: Msg)
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        match m {
            Msg::Cmd {
                origin,
                request_id,
                user,
                conv,
                typing,
            } => {
                let members = match sh.member_conv(conv, user) {
                    Ok(c) => c.members.clone(),
                    Err(Refusal(code, msg)) => {
                        sh.reply(origin, vec![error_frame(request_id, code, msg)]);
                        return;
                    }
                };
                if typing {
                    let at = sh.now_ms + sh.cfg.typing_expiry_ms;
                    self.active.insert((conv, user), at);
                    self.expiry.push_back((at, conv, user));
                } else {
                    self.active.remove(&(conv, user));
                }
                broadcast(sh, conv, user, typing, members);
                if request_id != 0 {
                    sh.reply(origin, vec![frame(request_id, Body::Done(v1::Done {}))]);
                }
            }
            Msg::Push {
                conv,
                user,
                typing,
                members,
            } => push(sh, conv, user, typing, &members),
        }
    }

    /// When the first TYPING expires, if one is remembered.
    pub(super) fn due_ms(&self) -> Option<u64> {
        self.expiry.front().map(|e| e.0)
    }

    /// Sends STOPPED for every TYPING that expired.
    pub(super) fn tick<I, M>(&mut self, sh: &mut Shared<I, M>)
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        while let Some(&(at, conv, user)) = self.expiry.front() {
            if at > sh.now_ms {
                break;
            }
            self.expiry.pop_front();
            if self.active.get(&(conv, user)) != Some(&at) {
                continue; // refreshed or stopped since
            }
            self.active.remove(&(conv, user));
            if let Ok(c) = sh.conv(conv) {
                let members = c.members.clone();
                broadcast(sh, conv, user, false, members);
            }
        }
    }
}

fn broadcast<I, M>(
    sh: &mut Shared<I, M>,
    conv: ConvId,
    user: UserId,
    typing: bool,
    members: Arc<[UserId]>,
) {
    for s in 0..sh.mail.shards() {
        let m = Msg::Push {
            conv,
            user,
            typing,
            members: members.clone(),
        };
        sh.send_to(s, Inner::Typing(m));
    }
}

/// Pushes the indicator to this shard's connections of `members` but `user`'s, where there is
/// room for it.
fn push<I, M>(sh: &mut Shared<I, M>, conv: ConvId, user: UserId, typing: bool, members: &[UserId]) {
    let state = if typing {
        TypingState::Typing
    } else {
        TypingState::Stopped
    };
    let f = frame(
        0,
        Body::Typing(v1::Typing {
            conversation_id: conv.0,
            state: state as i32,
            user_id: user.0,
        }),
    );
    let mut encoded: Option<Bytes> = None;
    let now = sh.now_ms;
    for m in members.iter().filter(|m| **m != user) {
        for i in 0.. {
            let Some(conn) = sh.dir.user_conn(m, i) else {
                break;
            };
            if sh.out.has_headroom(&sh.dir, conn) {
                sh.out.push_shared(
                    &mut sh.dir,
                    conn,
                    &mut encoded,
                    FrameKind::Typing,
                    now,
                    |b| encode_frame(b, &f),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
