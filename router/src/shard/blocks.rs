//! Block and Unblock (see `docs/design/messaging.md`, "Metadata writes"): from the ingress
//! shard to the requesting user's home shard (`ids::home_shard`), which rate-limits them (a
//! token bucket per user), orders them and has its metadata writer check and write them; if the
//! pair has a direct conversation, its owner forgets its cached blocks before the request is
//! answered, so once the blocker sees `Done` no later Send from the blocked user is accepted.
//! The owner checks every direct Send against the pair's blocks ([`check_send`]).

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::meta::Block;
use starling_storage::{CursorStore, MetadataStore, UserId};

use super::config::ShardConfig;
use super::convs::ConvState;
use super::frames::{Refusal, error_frame, frame, retry_frame};
use super::mail::{BlockCmd, Inner};
use super::reader::{Got, Want};
use super::shared::{META_RETRY_AFTER_MS, MetaTag, Shared};
use crate::ids::{ConnRef, ConvId};
use crate::limits::RateLimiter;
use crate::metawriter::{Job, Outcome, Written, block_key, unexpected_outcome};

/// The home shard's side of Block/Unblock: its users' budgets.
pub(super) struct Blocks {
    /// Block/Unblock budgets of the users whose home shard this is.
    limiter: RateLimiter,
}

impl Blocks {
    pub(super) fn new(cfg: &ShardConfig) -> Blocks {
        Blocks {
            limiter: RateLimiter::new(cfg.block_requests_per_s, cfg.block_requests_burst),
        }
    }

    /// Sends the Block/Unblock to `user`'s home shard ([`crate::ids::home_shard`]): every Block/Unblock of
    /// a user is rate-limited, counted and written there, by one metadata writer, so they take
    /// effect in the order the user sent them whichever shards their devices are on.
    pub(super) fn request<I, M>(
        sh: &mut Shared<I, M>,
        origin: ConnRef,
        rid: u64,
        user: UserId,
        other: u64,
        block: bool,
    ) -> Result<(), Refusal> {
        if other == 0 {
            return Err(Refusal(ErrorCode::InvalidArgument, "user_id is 0".into()));
        }
        if other == user.0 {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                "you cannot block or unblock yourself".into(),
            ));
        }
        let cmd = BlockCmd {
            origin,
            request_id: rid,
            user,
            target: UserId(other),
            block,
        };
        let home = sh.mail.home(user);
        sh.send_to(home, Inner::Block(cmd));
        Ok(())
    }

    /// At the user's home shard: takes a token of the user's Block/Unblock budget and hands the
    /// write to the metadata writer (which checks that the target exists, that a Block stays
    /// within `blocks_max`, and writes nothing if the request is in effect already).
    pub(super) fn on_cmd<I, M: MetadataStore + CursorStore>(
        &mut self,
        sh: &mut Shared<I, M>,
        b: BlockCmd,
    ) {
        debug_assert_eq!(sh.mail.home(b.user), sh.mail.shard());
        let refusal = if let Err(retry_ms) = self.limiter.take(b.user, sh.now_ms) {
            Some(retry_frame(
                b.request_id,
                ErrorCode::RateLimited,
                format!(
                    "too many Block/Unblock requests: at most {} per second",
                    sh.cfg.block_requests_per_s
                ),
                u32::try_from(retry_ms).unwrap_or(u32::MAX),
            ))
        } else if sh.writer.queued() >= sh.cfg.meta_jobs_max {
            Some(retry_frame(
                b.request_id,
                ErrorCode::Overloaded,
                "too many metadata writes are waiting; nothing was recorded".into(),
                META_RETRY_AFTER_MS,
            ))
        } else {
            None
        };
        if let Some(f) = refusal {
            sh.reply(b.origin, vec![f]);
            return;
        }
        let job = Job::Block {
            user: b.user,
            target: b.target,
            block: b.block,
            now_ms: sh.now_ms,
        };
        let tag = MetaTag::Block {
            origin: b.origin,
            request_id: b.request_id,
        };
        sh.writer.submit(&*sh.meta, job, tag);
    }

    /// The Block/Unblock is durable (or was in effect already), or failed. If the pair has a
    /// direct conversation, its owner drops its cached block state before `Done` goes out: once
    /// the blocker sees `Done`, no later send from the blocked user is accepted.
    pub(super) fn written<I, M>(
        sh: &mut Shared<I, M>,
        origin: ConnRef,
        request_id: u64,
        outcome: Outcome,
    ) {
        match outcome {
            Ok(Written::Block {
                conv: Some(conv), ..
            }) => {
                let owner = sh.mail.owner(conv);
                sh.send_to(
                    owner,
                    Inner::BlockChanged {
                        conv,
                        origin,
                        request_id,
                    },
                );
            }
            // No conversation yet: one created later reads the block from metadata.
            Ok(Written::Block { conv: None, .. }) => {
                sh.reply(origin, vec![frame(request_id, Body::Done(v1::Done {}))]);
            }
            other => {
                let Refusal(code, msg) = match other {
                    Err(r) => r,
                    Ok(w) => unexpected_outcome(&w),
                };
                sh.reply(origin, vec![error_frame(request_id, code, msg)]);
            }
        }
    }

    /// At the owner of the pair's direct conversation: a Block/Unblock of the pair was committed.
    /// The cached blocks are forgotten, then the request is answered.
    pub(super) fn changed<I, M>(
        sh: &mut Shared<I, M>,
        conv: ConvId,
        origin: ConnRef,
        request_id: u64,
    ) {
        if let Some(c) = sh.convs.get_mut(conv) {
            c.blocks = None;
            c.block_epoch += 1;
        }
        sh.reply(origin, vec![frame(request_id, Body::Done(v1::Done {}))]);
    }
}

/// The block lookup of `conv`'s pair a Send needs, if its blocks are not known (a loaded
/// direct conversation of two users whose blocks were not read since the last Block/Unblock).
pub(super) fn want(c: &ConvState, conv: ConvId) -> Option<Want> {
    match c.pair {
        Some((a, b)) if a != b && c.blocks.is_none() => Some(Want::Blocks {
            conv,
            a,
            b,
            epoch: c.block_epoch,
        }),
        _ => None,
    }
}

/// Before a Send is checked: the pair's blocks as read off the shard thread for it, if they
/// were (`reads.rs`), become the cached ones; otherwise [`check_send`] reads them here.
pub(super) fn take_read<I, M>(sh: &mut Shared<I, M>, conv: ConvId) -> Result<(), Refusal> {
    let Some(key) = sh.convs.get(conv).and_then(|c| want(c, conv)) else {
        return Ok(());
    };
    let found = match sh.got.get(&key) {
        Some(Got::Blocks(r)) => r.clone()?,
        _ => {
            sh.stats.inline_reads += 1;
            return Ok(());
        }
    };
    if let Some(c) = sh.convs.get_mut(conv) {
        c.blocks = Some(found);
    }
    Ok(())
}

/// `(a blocks b, b blocks a)` as the metadata has it.
pub(super) fn lookup<M: MetadataStore>(
    meta: &M,
    a: UserId,
    b: UserId,
) -> Result<(bool, bool), Refusal> {
    let has = |who: UserId, whom: UserId| -> Result<bool, Refusal> {
        Ok(meta
            .get::<Block>(&block_key(who, whom))
            .map_err(|e| Refusal::storage("block lookup", &e))?
            .is_some())
    };
    Ok((has(a, b)?, has(b, a)?))
}

/// At the owner of a direct conversation: refuses `sender`'s Send if the peer blocks them (the
/// pair's blocks are read on first use, off the shard thread when the read gate foresaw it
/// ([`take_read`]), and kept until a Block/Unblock of the pair is committed). Groups are not
/// affected by blocks.
pub(super) fn check_send<M: MetadataStore>(
    meta: &M,
    c: &mut ConvState,
    sender: UserId,
) -> Result<(), Refusal> {
    if let Some((a, b)) = c.pair
        && a != b
    {
        let (a_blocks_b, b_blocks_a) = match c.blocks {
            Some(bl) => bl,
            None => {
                let bl = lookup(meta, a, b)?;
                c.blocks = Some(bl);
                bl
            }
        };
        if (sender == a && b_blocks_a) || (sender == b && a_blocks_b) {
            return Err(Refusal(
                ErrorCode::Blocked,
                "the recipient has blocked you".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use starling_protocol::v1::frame::Body;
    use starling_protocol::v1::recipient::Target;
    use starling_protocol::v1::{self, ErrorCode};

    use super::super::ShardConfig;
    use super::super::fixture::{Shard, answers, drive_until, send_frame, shard};
    use crate::ids::ConnId;

    fn block(s: &mut Shard, now: &mut u64, conn: ConnId, rid: u64, user: u64, on: bool) -> Body {
        let body = if on {
            Body::Block(v1::Block { user_id: user })
        } else {
            Body::Unblock(v1::Unblock { user_id: user })
        };
        let f = v1::Frame {
            request_id: rid,
            body: Some(body),
        };
        s.handle_frame(conn, f, *now);
        let out = drive_until(s, now, |c, f| c == conn && f.request_id == rid);
        answers(&out, conn, rid)[0].clone()
    }

    fn send(s: &mut Shard, now: &mut u64, rid: u64) -> Body {
        s.handle_frame(
            ConnId(1),
            send_frame(rid, rid as u8, Target::UserId(2), b"hi"),
            *now,
        );
        let out = drive_until(s, now, |c, f| c == ConnId(1) && f.request_id == rid);
        answers(&out, ConnId(1), rid)[0].clone()
    }

    fn code(b: &Body) -> i32 {
        match b {
            Body::Error(e) => e.code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_blocked_user_cannot_send_to_the_blocker_until_unblocked() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        assert!(matches!(send(&mut s, &mut now, 1), Body::SendAck(_)));
        assert!(matches!(
            block(&mut s, &mut now, ConnId(2), 2, 1, true),
            Body::Done(_)
        ));
        let refused = send(&mut s, &mut now, 3);
        let Body::Error(e) = &refused else {
            panic!("{refused:?}")
        };
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::Blocked as i32, "the recipient has blocked you")
        );
        // The blocker can still write to the blocked user.
        s.handle_frame(ConnId(2), send_frame(4, 4, Target::UserId(1), b"hi"), now);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(2) && f.request_id == 4);
        assert!(matches!(
            answers(&out, ConnId(2), 4)[..],
            [Body::SendAck(_)]
        ));
        assert!(matches!(
            block(&mut s, &mut now, ConnId(2), 5, 1, false),
            Body::Done(_)
        ));
        assert!(matches!(send(&mut s, &mut now, 6), Body::SendAck(_)));
    }

    #[test]
    fn blocks_are_checked_at_the_ingress_and_rate_limited_at_home() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShardConfig {
            block_requests_per_s: 1,
            block_requests_burst: 2,
            ..ShardConfig::default()
        };
        let (mut s, _meta) = shard(dir.path(), cfg);
        let mut now = 1_000;
        let invalid = ErrorCode::InvalidArgument as i32;
        assert_eq!(
            code(&block(&mut s, &mut now, ConnId(1), 1, 1, true)),
            invalid
        );
        assert_eq!(
            code(&block(&mut s, &mut now, ConnId(1), 2, 0, false)),
            invalid
        );
        assert!(matches!(
            block(&mut s, &mut now, ConnId(1), 3, 2, true),
            Body::Done(_)
        ));
        assert!(matches!(
            block(&mut s, &mut now, ConnId(1), 4, 2, false),
            Body::Done(_)
        ));
        let limited = block(&mut s, &mut now, ConnId(1), 5, 2, true);
        let Body::Error(e) = &limited else {
            panic!("{limited:?}")
        };
        assert_eq!(e.code, ErrorCode::RateLimited as i32);
        assert!(e.retry_after_ms > 0 && e.retry_after_ms <= 1000, "{e:?}");
        // Another user has a budget of their own; a target that does not exist is NOT_FOUND.
        let missing = block(&mut s, &mut now, ConnId(2), 6, 77, true);
        assert_eq!(code(&missing), ErrorCode::NotFound as i32);
    }
}
