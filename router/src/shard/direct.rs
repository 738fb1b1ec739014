//! Direct (1:1) conversations as a Send names them, by the peer's user id: resolving the pair
//! to its conversation (cached, or read from the metadata off the shard thread while the pair's
//! Sends wait, `reads.rs`), and, for the pair's first message, parking the Sends while the
//! metadata writer creates the conversation (see
//! `docs/design/messaging.md`, "Conversation ids and ownership" and "The path of one message").
//! The shard serves everything else meanwhile; the parked Sends go on to the conversation's
//! owner in the order they came, or are answered with the creation's failure.

use starling_protocol::v1::ErrorCode;
use starling_storage::meta::{DirectPair, User, keys};
use starling_storage::{CursorStore, MessageIndex, MetadataStore, UserId};

use super::frames::{Refusal, error_frame, retry_frame};
use super::mail::{Inner, SendCmd};
use super::shared::{META_RETRY_AFTER_MS, MetaTag, Shared};
use crate::hash::HashMap;
use crate::ids::ConvId;
use crate::metawriter::{self, Job, Outcome, Written, ordered, unexpected_outcome};

/// Pairs whose conversation is remembered; the cache is cleared when full (they are read from
/// the metadata again on next use).
const DIRECT_CACHE_MAX: usize = 100_000;

/// This shard's knowledge of direct conversations, and the Sends waiting for one.
#[derive(Default)]
pub(super) struct Direct {
    /// Pair (low, high) → its conversation.
    cache: HashMap<(UserId, UserId), ConvId>,
    /// Sends waiting for their pair's direct conversation to be created, in arrival order.
    parked: HashMap<(UserId, UserId), Vec<SendCmd>>,
    /// Sends waiting for their pair to be looked up in the metadata, in arrival order.
    resolving: HashMap<(UserId, UserId), Vec<SendCmd>>,
    /// Sends in `parked` and `resolving` (bounded by `parked_sends_max`).
    parked_sends: usize,
}

/// Looks the direct conversation of `low` and `high` up, for a Send from one of them to `peer`
/// (the other): found, or `None` if it has to be created, or `NOT_FOUND` if `peer` is nobody.
/// Runs on a read thread (`reader.rs`).
pub(super) fn lookup<M: MetadataStore>(
    meta: &M,
    low: UserId,
    high: UserId,
    peer: UserId,
) -> Result<Option<ConvId>, Refusal> {
    if let Some(p) = meta
        .get::<DirectPair>(&metawriter::direct_pair_key(low, high))
        .map_err(|e| Refusal::storage("direct lookup", &e))?
    {
        return Ok(Some(ConvId::from_storage(p.conv)));
    }
    if meta
        .get::<User>(&keys::user(peer))
        .map_err(|e| Refusal::storage("user lookup", &e))?
        .is_none()
    {
        return Err(Refusal(ErrorCode::NotFound, "no such user".into()));
    }
    Ok(None)
}

impl Direct {
    /// The direct conversation of `me` and `peer`, if this shard knows it; `None` if it has to
    /// be looked up or created first ([`Direct::park`]).
    pub(super) fn resolve(&mut self, me: UserId, peer: UserId) -> Result<Option<ConvId>, Refusal> {
        if peer.0 == 0 {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                "recipient user_id is 0".into(),
            ));
        }
        Ok(self.cache.get(&ordered(me, peer)).copied())
    }

    fn remember(&mut self, pair: (UserId, UserId), conv: ConvId) {
        if self.cache.len() >= DIRECT_CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(pair, conv);
    }

    /// Holds `cmd`, a Send from one user of `pair` to `peer` (the other) that this shard does
    /// not know the conversation of, until it does: the first such Send of a pair starts a
    /// lookup on the read threads ([`Direct::resolved`] takes its result); later ones wait
    /// behind it, or behind the pair's creation. The shard serves everything else meanwhile.
    pub(super) fn park<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        pair: (UserId, UserId),
        peer: UserId,
        cmd: SendCmd,
    ) where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        if let Some(q) = self.resolving.get_mut(&pair) {
            if self.parked_sends >= sh.cfg.parked_sends_max {
                return overloaded(sh, &cmd);
            }
            q.push(cmd);
            self.parked_sends += 1;
            return;
        }
        if self.parked.contains_key(&pair) {
            return self.park_for_creation(sh, pair, cmd);
        }
        if self.parked_sends >= sh.cfg.parked_sends_max {
            return overloaded(sh, &cmd);
        }
        self.resolving.insert(pair, vec![cmd]);
        self.parked_sends += 1;
        sh.read_detached(super::reader::Want::Direct {
            low: pair.0,
            high: pair.1,
            peer,
        });
    }

    /// The lookup of `pair` finished: its Sends go on to the conversation's owner, or wait for
    /// its creation, or are answered with the lookup's refusal (`NOT_FOUND` for a peer who is
    /// nobody).
    pub(super) fn resolved<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        pair: (UserId, UserId),
        found: Result<Option<ConvId>, Refusal>,
    ) where
        M: MetadataStore + CursorStore,
    {
        let sends = self.resolving.remove(&pair).unwrap_or_default();
        self.parked_sends -= sends.len();
        match found {
            Ok(Some(conv)) => {
                self.remember(pair, conv);
                forward(sh, conv, sends);
            }
            Ok(None) => {
                for cmd in sends {
                    self.park_for_creation(sh, pair, cmd);
                }
            }
            Err(Refusal(code, msg)) => {
                for cmd in sends {
                    let f = error_frame(cmd.request_id, code, msg.clone());
                    sh.reply(cmd.origin, vec![f]);
                }
            }
        }
    }

    /// Holds `cmd` until the direct conversation of `pair` exists durably; the first Send of a
    /// pair starts its creation on the metadata writer. The Sends go on to the conversation's
    /// owner, in the order they came, when the writer's outcome arrives ([`Direct::created`]).
    fn park_for_creation<I, M: MetadataStore + CursorStore>(
        &mut self,
        sh: &mut Shared<I, M>,
        pair: (UserId, UserId),
        cmd: SendCmd,
    ) {
        let creating = self.parked.contains_key(&pair);
        if self.parked_sends >= sh.cfg.parked_sends_max
            || (!creating && sh.writer.queued() >= sh.cfg.meta_jobs_max)
        {
            return overloaded(sh, &cmd);
        }
        self.parked.entry(pair).or_default().push(cmd);
        self.parked_sends += 1;
        if !creating {
            let job = Job::CreateDirect {
                low: pair.0,
                high: pair.1,
                now_ms: sh.now_ms,
            };
            sh.writer.submit(&*sh.meta, job, MetaTag::Direct { pair });
        }
    }

    /// The metadata writer created (or found) the direct conversation of `pair`, or failed to:
    /// the Sends parked for it go on to its owner, or are answered with the failure.
    pub(super) fn created<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        pair: (UserId, UserId),
        outcome: Outcome,
    ) {
        let sends = self.parked.remove(&pair).unwrap_or_default();
        self.parked_sends -= sends.len();
        match outcome {
            Ok(Written::Direct { conv }) => {
                self.remember(pair, conv);
                forward(sh, conv, sends);
            }
            other => {
                let Refusal(code, msg) = match other {
                    Err(r) => r,
                    Ok(w) => unexpected_outcome(&w),
                };
                for cmd in sends {
                    let f = error_frame(cmd.request_id, code, msg.clone());
                    sh.reply(cmd.origin, vec![f]);
                }
            }
        }
    }
}

/// Sends that waited for their direct conversation `conv`, on to its owner in the order they
/// came.
fn forward<I, M>(sh: &mut Shared<I, M>, conv: ConvId, sends: Vec<SendCmd>) {
    let owner = sh.mail.owner(conv);
    for mut cmd in sends {
        cmd.conv = conv;
        // Held back while the conversation was looked up or created, this copy may now reach
        // the owner after a resend of the same message from another connection was sequenced:
        // its `first_attempt` promise no longer holds here.
        cmd.first_attempt = false;
        sh.send_to(owner, Inner::Send(Box::new(cmd)));
    }
}

/// Refuses `cmd`: too many Sends wait for their direct conversations.
fn overloaded<I, M>(sh: &mut Shared<I, M>, cmd: &SendCmd) {
    let f = retry_frame(
        cmd.request_id,
        ErrorCode::Overloaded,
        "too many new conversations are being created; the message was not accepted, send it \
         again"
            .into(),
        META_RETRY_AFTER_MS,
    );
    sh.reply(cmd.origin, vec![f]);
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use starling_protocol::v1::frame::Body;
    use starling_protocol::v1::recipient::Target;
    use starling_protocol::v1::{self, ErrorCode};

    use super::super::ShardConfig;
    use super::super::fixture::{answers, drive_until, send_frame, shard, transmitted};
    use crate::ids::{ConnId, ConvId};

    /// Metadata jobs an offload was handed, run when the test says.
    type Jobs = Rc<RefCell<Vec<Box<dyn FnOnce() + Send>>>>;

    fn acked_conv(out: &[(ConnId, v1::Frame)], rid: u64) -> Option<u64> {
        match answers(out, ConnId(1), rid)[..] {
            [Body::SendAck(a)] => Some(a.conversation_id),
            _ => None,
        }
    }

    #[test]
    fn the_first_send_of_a_pair_creates_its_conversation_and_later_ones_find_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        s.handle_frame(ConnId(1), send_frame(1, 1, Target::UserId(2), b"hi"), now);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 1);
        let conv = acked_conv(&out, 1).expect("acknowledged");
        assert!(!ConvId(conv).is_group());
        // The peer got it, in the new conversation.
        assert!(out.iter().any(|(c, f)| *c == ConnId(2)
            && matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.conversation_id == conv))));
        // Either side names the same conversation; nothing more is written for it.
        let writes = meta.writes();
        s.handle_frame(ConnId(2), send_frame(2, 2, Target::UserId(1), b"yo"), now);
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(2) && f.request_id == 2);
        assert!(
            matches!(answers(&out, ConnId(2), 2)[..], [Body::SendAck(a)] if a.conversation_id == conv)
        );
        assert_eq!(meta.writes(), writes);
    }

    #[test]
    fn sends_parked_beyond_the_limit_are_refused_and_the_rest_go_on_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShardConfig {
            parked_sends_max: 2,
            ..ShardConfig::default()
        };
        let (mut s, _meta) = shard(dir.path(), cfg);
        // The metadata writer's jobs run when the test says.
        let jobs: Jobs = Rc::default();
        let held = jobs.clone();
        s.set_meta_offload(Box::new(move |job| held.borrow_mut().push(job)));
        let mut now = 1_000;
        for rid in 1..=3 {
            s.handle_frame(
                ConnId(1),
                send_frame(rid, rid as u8, Target::UserId(2), b"hi"),
                now,
            );
        }
        let out = transmitted(&mut s);
        let [Body::Error(e)] = &answers(&out, ConnId(1), 3)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (e.code, e.retry_after_ms),
            (ErrorCode::Overloaded as i32, 50)
        );
        assert_eq!(jobs.borrow().len(), 1, "one creation for the pair");
        for job in jobs.borrow_mut().drain(..) {
            job();
        }
        let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 2);
        let seqs: Vec<u64> = [1, 2]
            .iter()
            .map(|&rid| match answers(&out, ConnId(1), rid)[..] {
                [Body::SendAck(a)] => a.seq,
                ref other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, [1, 2], "in the order they came");
    }
}
