//! [`RouterShard`]: one shard's messaging core, sans-IO. See the crate docs for the API and
//! `docs/design/messaging.md` for the design (message path, receipts, sync, slow consumers).

use std::fmt;
use std::sync::Arc;

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::meta::{DirectPair, User, keys};
use starling_storage::{
    ClientMsgId, CursorStore, DeviceId, DurableLog, MessageIndex, MetadataStore, UserId,
};

use crate::grid::ShardLinks;
use crate::hash::HashMap;
use crate::ids::{ConnId, ConnRef, ConvId};
use crate::limits::RateLimiter;
use crate::metawriter::{self, Job, Offload, Outcome, Written, ordered};

mod config;
mod convs;
mod cursors;
mod directory;
mod envelope;
mod fanout;
pub(crate) mod frames;
mod gather;
mod history;
mod list;
mod mail;
mod outbound;
mod sequencer;
mod shared;
mod sync;

pub use config::ShardConfig;
use convs::ConvState;
use cursors::Cursors;
pub(crate) use envelope::fuzz_envelope;
#[cfg(test)]
pub(crate) use envelope::sample_envelope;
pub use frames::{CloseRequest, Transmit};
use frames::{Refusal, error_frame, frame, retry_frame};
pub use mail::ShardMsg;
use mail::{BlockCmd, CursorKind, Inner, SendCmd};
use sequencer::Sequencer;
pub use sequencer::{STORAGE_NOT_STORED, STORAGE_OUTCOME_UNKNOWN, STORAGE_SHARD_FAILED};
pub use shared::ShardStats;
use shared::{META_RETRY_AFTER_MS, MetaTag, Shared};

/// One shard's messaging core: its sequencer partition, its slice of the session directory
/// (its own connections), its log and its rings. Sans-IO: see the crate docs.
pub struct RouterShard<L, I, M> {
    /// What the concerns share: configuration, clock, storage, conversations, connections,
    /// mail, metadata writer, counters.
    sh: Shared<I, M>,
    sequencer: Sequencer<L>,

    cursors: Cursors,

    /// Block/Unblock budgets of the users whose home shard this is.
    block_limiter: RateLimiter,

    // direct conversations
    /// Sends waiting for their pair's direct conversation to be created, in arrival order.
    parked: HashMap<(UserId, UserId), Vec<SendCmd>>,
    /// Sends in `parked` (bounded by `parked_sends_max`).
    parked_sends: usize,
    direct_cache: HashMap<(UserId, UserId), ConvId>,
}

impl<L, I, M> fmt::Debug for RouterShard<L, I, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterShard")
            .field("shard", &self.sh.mail.shard())
            .field("convs", &self.sh.convs.len())
            .field("conns", &self.sh.dir.conns.len())
            .field("inflight", &self.sequencer.inflight())
            .field("failed", &self.sequencer.failure())
            .finish_non_exhaustive()
    }
}

impl<L, I, M> RouterShard<L, I, M>
where
    M: MetadataStore + CursorStore + Send + Sync + 'static,
{
    /// Makes every metadata write (cursor batches, Block/Unblock, the creation of a direct
    /// conversation; each a commit with an fsync) on another thread instead of this one:
    /// `offload` runs each write job, in order, and must wake the shard (as the log's wake
    /// callback does) after each, so that [`RouterShard::handle_log_progress`] or
    /// [`RouterShard::handle_tick`] picks up the outcome. Without it writes run inline (the
    /// simulation's default). See the `metawriter` module.
    pub fn set_meta_offload(&mut self, offload: Offload) {
        self.sh.writer.set_offload(self.sh.meta.clone(), offload);
    }
}

const DIRECT_CACHE_MAX: usize = 100_000;

impl<L, I, M> RouterShard<L, I, M>
where
    L: DurableLog,
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    /// A shard over `log` (recovered), `index` (covering everything durable in `log` at open)
    /// and the node's metadata/cursor store, connected to the others by `links`.
    pub fn new(
        cfg: ShardConfig,
        links: ShardLinks<ShardMsg>,
        log: L,
        index: Arc<I>,
        meta: Arc<M>,
    ) -> Self {
        let block_limiter = RateLimiter::new(cfg.block_requests_per_s, cfg.block_requests_burst);
        RouterShard {
            sh: Shared::new(cfg, links, index, meta),
            sequencer: Sequencer::new(log),
            cursors: Cursors::default(),
            block_limiter,
            parked: HashMap::default(),
            parked_sends: 0,
            direct_cache: HashMap::default(),
        }
    }

    /// This shard's index in the grid.
    pub fn shard(&self) -> usize {
        self.sh.mail.shard()
    }

    /// Why this shard stopped sequencing (its log failed), if it did. Nothing is sequenced
    /// after it; the gateway stops the process, and its restart recovers the log.
    pub fn failure(&self) -> Option<&str> {
        self.sequencer.failure()
    }

    /// Conversations whose state is in memory (see `ShardConfig::conv_idle_evict_ms`).
    pub fn loaded_conversations(&self) -> usize {
        self.sh.convs.len()
    }

    /// Counters.
    pub fn stats(&self) -> ShardStats {
        self.sh.stats
    }

    /// The log (for the gateway's statistics, or the simulator's disk).
    pub fn log(&self) -> &L {
        self.sequencer.log()
    }

    /// The log, mutably (the simulator drives its fake disk through it).
    pub fn log_mut(&mut self) -> &mut L {
        self.sequencer.log_mut()
    }

    /// Bytes of `conn`'s frames emitted but not yet reported written (`handle_conn_flushed`).
    #[must_use]
    pub fn conn_queued_bytes(&self, conn: ConnId) -> Option<u64> {
        self.sh.dir.conns.get(&conn).map(|c| c.queued_bytes)
    }

    /// Whether any item waits for room in a full ring: the gateway should stop reading from its
    /// sockets until this clears (rings are never grown).
    pub fn is_backpressured(&self) -> bool {
        self.sh.mail.is_backpressured()
    }

    /// Forget cached membership of `conv` (call after the group API changed it).
    pub fn invalidate_members(&mut self, conv: ConvId) {
        self.sh.convs.reload_members(conv, &*self.sh.meta);
    }

    // -----------------------------------------------------------------------------------------
    // inputs

    /// An authenticated connection of `user`'s `device` opened on this shard.
    pub fn handle_conn_opened(
        &mut self,
        conn: ConnId,
        user: UserId,
        device: DeviceId,
        now_ms: u64,
    ) {
        self.sh.now_ms = now_ms;
        self.sh.dir.open(conn, user, device);
    }

    /// A connection closed (or the gateway closed it). Everything queued for it is dropped.
    pub fn handle_conn_closed(&mut self, conn: ConnId, now_ms: u64) {
        self.sh.now_ms = now_ms;
        self.sh.dir.close(conn);
    }

    /// The gateway wrote `bytes` of this connection's frames to its socket.
    pub fn handle_conn_flushed(&mut self, conn: ConnId, bytes: u64, now_ms: u64) {
        self.sh.now_ms = now_ms;
        let sh = &mut self.sh;
        sh.stats.hints += sh.out.flushed(&mut sh.dir, conn, bytes, now_ms);
    }

    /// A decoded client frame from `conn` (authenticated as the user and device it was opened
    /// with). Only the messaging frames are the router's (see [`RouterShard::handles`]); others
    /// are answered with `UNEXPECTED_FRAME`.
    pub fn handle_frame(&mut self, conn: ConnId, f: v1::Frame, now_ms: u64) {
        self.sh.now_ms = now_ms;
        let Some(c) = self.sh.dir.conns.get(&conn) else {
            return;
        };
        let (user, device) = (c.user, c.device);
        let rid = f.request_id;
        let origin = ConnRef {
            shard: self.sh.mail.shard(),
            conn,
        };
        let res = match f.body {
            Some(Body::Send(s)) => self.on_send(origin, rid, user, device, s),
            Some(Body::DeliveryAck(a)) => Cursors::route(
                &mut self.sh,
                origin,
                rid,
                CursorKind::Delivered,
                user,
                device,
                a.conversation_id,
                a.up_to_seq,
            ),
            Some(Body::ReadCursor(r)) => Cursors::route(
                &mut self.sh,
                origin,
                rid,
                CursorKind::Read,
                user,
                device,
                r.conversation_id,
                r.up_to_seq,
            ),
            Some(Body::Sync(s)) => sync::request(&mut self.sh, origin, rid, user, s),
            Some(Body::GetHistory(h)) => history::request(&mut self.sh, origin, rid, user, h),
            Some(Body::ListConversations(l)) => list::request(&mut self.sh, origin, rid, user, &l),
            Some(Body::Block(b)) => self.on_block(origin, rid, user, b.user_id, true),
            Some(Body::Unblock(b)) => self.on_block(origin, rid, user, b.user_id, false),
            _ => Err(Refusal(
                ErrorCode::UnexpectedFrame,
                "not a messaging frame".into(),
            )),
        };
        if let Err(Refusal(code, msg)) = res {
            self.sh.emit(conn, error_frame(rid, code, msg), false);
        }
        self.drive();
    }

    /// Whether `body` is a frame the router handles (the gateway routes the rest elsewhere).
    pub fn handles(body: &Body) -> bool {
        matches!(
            body,
            Body::Send(_)
                | Body::DeliveryAck(_)
                | Body::ReadCursor(_)
                | Body::Sync(_)
                | Body::GetHistory(_)
                | Body::ListConversations(_)
                | Body::Block(_)
                | Body::Unblock(_)
        )
    }

    /// Drains the inbound rings (call after this shard's bell / doorbell woke it).
    pub fn handle_rings(&mut self, now_ms: u64) {
        self.sh.now_ms = now_ms;
        while let Some(m) = self.sh.mail.receive() {
            self.process(m);
            self.drive_local();
        }
        self.drive();
    }

    /// The log reported progress (its wake callback fired): acknowledge what became durable, or
    /// fail everything pending if the log failed. Also takes the outcomes of finished metadata
    /// writes (the metadata writer wakes the shard the same way).
    pub fn handle_log_progress(&mut self, now_ms: u64) {
        self.sh.now_ms = now_ms;
        self.sequencer.poll_log(&mut self.sh);
        self.poll_meta();
        self.sh.convs.prune_tails(self.sh.index.indexed_lsn());
        self.drive();
    }

    /// Timer: submit a batch the log pushed back, write due cursor updates, prune caches. Call
    /// at [`RouterShard::poll_timeout`] (or more often).
    pub fn handle_tick(&mut self, now_ms: u64) {
        self.sh.now_ms = now_ms;
        self.poll_meta();
        if self.cursors.due_ms().is_some_and(|d| d <= now_ms) {
            self.cursors.flush(&mut self.sh);
        }
        self.sh.convs.prune_tails(self.sh.index.indexed_lsn());
        self.evict_idle();
        let sh = &mut self.sh;
        sh.stats.hints += sh.out.sweep(&mut sh.dir, now_ms);
        self.drive();
    }

    // -----------------------------------------------------------------------------------------
    // outputs

    /// Submits the open batch to the log and pushes queued items into the rings. Every `poll_*`
    /// calls it; call it (or any `poll_*`) after a burst of `handle_*` calls, so that the burst
    /// becomes one log batch and one ring publish.
    pub fn flush(&mut self) {
        self.sequencer.submit(&mut self.sh);
        self.sh.mail.flush();
    }

    /// The next frame to write to one of this shard's connections.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.flush();
        self.sh.out.next_transmit()
    }

    /// The next connection the router wants closed.
    #[must_use]
    pub fn poll_close(&mut self) -> Option<CloseRequest> {
        self.flush();
        self.sh.out.next_close()
    }

    /// When to call [`RouterShard::handle_tick`] next (absolute ms), if anything is waiting.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<u64> {
        self.flush();
        let busy = self.sequencer.due_ms(self.sh.now_ms);
        let close = self.sh.out.close_due_ms(&self.sh.dir);
        // Due (at or before `now`) until the sweep has caught up. Not while the sweep cannot
        // run (a cursor batch in the air: its outcome wakes the shard; a failed log: never),
        // so that a caller ticking only at `poll_timeout` neither spins nor waits for ever.
        let evict = if self.cursors.in_flight() || self.sequencer.failure().is_some() {
            None
        } else {
            self.sh.convs.evict_due_ms(self.sh.cfg.conv_idle_evict_ms)
        };
        [self.cursors.due_ms(), busy, close, evict]
            .into_iter()
            .flatten()
            .min()
    }

    // -----------------------------------------------------------------------------------------
    // plumbing

    fn drive(&mut self) {
        self.drive_local();
        if self.sequencer.is_full(&self.sh.cfg) {
            self.sequencer.submit(&mut self.sh);
        }
        if self.cursors.is_full(self.sh.cfg.cursor_flush_max) {
            self.cursors.flush(&mut self.sh);
        }
        self.poll_meta();
        self.drive_local();
        self.sh.mail.flush();
    }

    fn drive_local(&mut self) {
        while let Some(m) = self.sh.mail.next_local() {
            self.process(m);
        }
    }

    fn process(&mut self, m: Inner) {
        match m {
            Inner::Send(cmd) => self.sequencer.on_send(&mut self.sh, *cmd),
            Inner::Reply { to, frames } => {
                for f in frames {
                    self.sh.emit(to, f, false);
                }
            }
            Inner::Fanout(items) => fanout::push(&mut self.sh, &items),
            Inner::Cursor(c) => self.cursors.on_cmd(&mut self.sh, c),
            Inner::Sync(s) => sync::on_cmd(&mut self.sh, s),
            Inner::SyncPart(p) => sync::on_part(&mut self.sh, p),
            Inner::History(h) => history::on_cmd(&mut self.sh, h),
            Inner::List(l) => list::on_cmd(&mut self.sh, l),
            Inner::ListPart(p) => list::on_part(&mut self.sh, p),
            Inner::Block(b) => self.on_block_cmd(b),
            Inner::BlockChanged {
                conv,
                origin,
                request_id,
            } => {
                if let Some(c) = self.sh.convs.get_mut(conv) {
                    c.blocks = None;
                }
                self.sh
                    .reply(origin, vec![frame(request_id, Body::Done(v1::Done {}))]);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // conversations

    /// The direct conversation of `me` and `peer`, if it exists (cached, or found in the
    /// metadata); `None` if it has to be created first (by the metadata writer, see
    /// [`RouterShard::park`]) or is being created.
    fn resolve_direct(&mut self, me: UserId, peer: UserId) -> Result<Option<ConvId>, Refusal> {
        if peer.0 == 0 {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                "recipient user_id is 0".into(),
            ));
        }
        let pair = ordered(me, peer);
        if let Some(&c) = self.direct_cache.get(&pair) {
            return Ok(Some(c));
        }
        if self.parked.contains_key(&pair) {
            return Ok(None);
        }
        let meta = &*self.sh.meta;
        if let Some(p) = meta
            .get::<DirectPair>(&metawriter::direct_pair_key(pair.0, pair.1))
            .map_err(|e| Refusal::storage("direct lookup", &e))?
        {
            let conv = ConvId::from_storage(p.conv);
            self.cache_direct(pair, conv);
            return Ok(Some(conv));
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

    fn cache_direct(&mut self, pair: (UserId, UserId), conv: ConvId) {
        if self.direct_cache.len() >= DIRECT_CACHE_MAX {
            self.direct_cache.clear();
        }
        self.direct_cache.insert(pair, conv);
    }

    /// Holds `cmd`, a Send between the users of `pair`, until their direct conversation exists
    /// durably; the first Send of a pair starts its creation on the metadata writer. The Sends
    /// go on to the conversation's owner, in the order they came, when the writer's outcome
    /// arrives ([`RouterShard::direct_created`]); the shard serves everything else meanwhile.
    fn park(&mut self, pair: (UserId, UserId), cmd: SendCmd) {
        let creating = self.parked.contains_key(&pair);
        if self.parked_sends >= self.sh.cfg.parked_sends_max
            || (!creating && self.sh.writer.queued() >= self.sh.cfg.meta_jobs_max)
        {
            let f = retry_frame(
                cmd.request_id,
                ErrorCode::Overloaded,
                "too many new conversations are being created; the message was not accepted, \
                 send it again"
                    .into(),
                META_RETRY_AFTER_MS,
            );
            self.sh.reply(cmd.origin, vec![f]);
            return;
        }
        self.parked.entry(pair).or_default().push(cmd);
        self.parked_sends += 1;
        if !creating {
            let job = Job::CreateDirect {
                low: pair.0,
                high: pair.1,
                now_ms: self.sh.now_ms,
            };
            self.sh
                .writer
                .submit(&*self.sh.meta, job, MetaTag::Direct { pair });
        }
    }

    /// The metadata writer created (or found) the direct conversation of `pair`, or failed to:
    /// the Sends parked for it go on to its owner, or are answered with the failure.
    fn direct_created(&mut self, pair: (UserId, UserId), outcome: Outcome) {
        let sends = self.parked.remove(&pair).unwrap_or_default();
        self.parked_sends -= sends.len();
        match outcome {
            Ok(Written::Direct { conv }) => {
                self.cache_direct(pair, conv);
                let owner = self.sh.mail.owner(conv);
                for mut cmd in sends {
                    cmd.conv = conv;
                    // Held back while the conversation was created, this copy may now reach
                    // the owner after a resend of the same message from another connection was
                    // sequenced: its `first_attempt` promise no longer holds here.
                    cmd.first_attempt = false;
                    self.sh.send_to(owner, Inner::Send(Box::new(cmd)));
                }
            }
            other => {
                let Refusal(code, msg) = match other {
                    Err(r) => r,
                    Ok(w) => metawriter::unexpected_outcome(&w),
                };
                for cmd in sends {
                    let f = error_frame(cmd.request_id, code, msg.clone());
                    self.sh.reply(cmd.origin, vec![f]);
                }
            }
        }
    }

    /// Drops the states of conversations idle for `conv_idle_evict_ms` whose every message is
    /// durable and indexed and whose every cursor is durable and announced: exactly what
    /// `Convs::load` would load again.
    fn evict_idle(&mut self) {
        if self.cursors.in_flight() || self.sequencer.failure().is_some() {
            // A cursor batch in the air may be put back on failure: try again next tick.
            return;
        }
        let cursors = &self.cursors;
        let evictable = |conv: ConvId, c: &ConvState| {
            c.seq.settled() && c.cursors.announced() && cursors.is_clean(conv, &c.cursors)
        };
        let sh = &mut self.sh;
        sh.stats.convs_evicted +=
            sh.convs
                .evict_idle(sh.now_ms, sh.cfg.conv_idle_evict_ms, evictable);
    }

    // -----------------------------------------------------------------------------------------
    // sending

    fn on_send(
        &mut self,
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
        if s.body.len() > self.sh.cfg.body_bytes_max {
            return Err(Refusal(
                ErrorCode::BodyTooLarge,
                format!(
                    "body is {} bytes, limit {}",
                    s.body.len(),
                    self.sh.cfg.body_bytes_max
                ),
            ));
        }
        if s.content_type.len() > 255 {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                "content_type longer than 255 bytes".into(),
            ));
        }
        let conv = match s.to.and_then(|t| t.target) {
            Some(v1::recipient::Target::UserId(peer)) => {
                match self.resolve_direct(user, UserId(peer))? {
                    Some(conv) => Ok(conv),
                    None => Err(ordered(user, UserId(peer))),
                }
            }
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
            reply_to_seq: s.reply_to_seq,
            first_attempt: s.first_attempt,
            now_ms: self.sh.now_ms,
        };
        match conv {
            Ok(conv) => {
                cmd.conv = conv;
                self.sh
                    .send_to(self.sh.mail.owner(conv), Inner::Send(Box::new(cmd)));
            }
            // The pair's first message: its conversation is created first, off this thread.
            Err(pair) => self.park(pair, cmd),
        }
        Ok(())
    }

    /// Takes the outcomes of finished metadata writes, in the order they were submitted.
    fn poll_meta(&mut self) {
        while let Some((tag, outcome)) = self.sh.writer.poll() {
            match tag {
                MetaTag::Cursors {
                    delivery,
                    read,
                    waiters,
                } => self
                    .cursors
                    .batch_done(&mut self.sh, outcome, delivery, read, waiters),
                MetaTag::Block { origin, request_id } => {
                    self.block_written(origin, request_id, outcome);
                }
                MetaTag::Direct { pair } => self.direct_created(pair, outcome),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // sync, history, conversation list

    /// Sends the Block/Unblock to `user`'s home shard ([`crate::ids::home_shard`]): every Block/Unblock of
    /// a user is rate-limited, counted and written there, by one metadata writer, so they take
    /// effect in the order the user sent them whichever shards their devices are on.
    fn on_block(
        &mut self,
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
        self.sh.send_to(self.sh.mail.home(user), Inner::Block(cmd));
        Ok(())
    }

    /// At the user's home shard: takes a token of the user's Block/Unblock budget and hands the
    /// write to the metadata writer (which checks that the target exists, that a Block stays
    /// within `blocks_max`, and writes nothing if the request is in effect already).
    fn on_block_cmd(&mut self, b: BlockCmd) {
        debug_assert_eq!(self.sh.mail.home(b.user), self.sh.mail.shard());
        let refusal = if let Err(retry_ms) = self.block_limiter.take(b.user, self.sh.now_ms) {
            Some(retry_frame(
                b.request_id,
                ErrorCode::RateLimited,
                format!(
                    "too many Block/Unblock requests: at most {} per second",
                    self.sh.cfg.block_requests_per_s
                ),
                u32::try_from(retry_ms).unwrap_or(u32::MAX),
            ))
        } else if self.sh.writer.queued() >= self.sh.cfg.meta_jobs_max {
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
            self.sh.reply(b.origin, vec![f]);
            return;
        }
        let job = Job::Block {
            user: b.user,
            target: b.target,
            block: b.block,
            now_ms: self.sh.now_ms,
        };
        let tag = MetaTag::Block {
            origin: b.origin,
            request_id: b.request_id,
        };
        self.sh.writer.submit(&*self.sh.meta, job, tag);
    }

    /// The Block/Unblock is durable (or was in effect already), or failed. If the pair has a
    /// direct conversation, its owner drops its cached block state before `Done` goes out: once
    /// the blocker sees `Done`, no later send from the blocked user is accepted.
    fn block_written(&mut self, origin: ConnRef, request_id: u64, outcome: Outcome) {
        match outcome {
            Ok(Written::Block {
                conv: Some(conv), ..
            }) => self.sh.send_to(
                self.sh.mail.owner(conv),
                Inner::BlockChanged {
                    conv,
                    origin,
                    request_id,
                },
            ),
            // No conversation yet: one created later reads the block from metadata.
            Ok(Written::Block { conv: None, .. }) => {
                self.sh
                    .reply(origin, vec![frame(request_id, Body::Done(v1::Done {}))]);
            }
            other => {
                let Refusal(code, msg) = match other {
                    Err(r) => r,
                    Ok(w) => metawriter::unexpected_outcome(&w),
                };
                self.sh
                    .reply(origin, vec![error_frame(request_id, code, msg)]);
            }
        }
    }
}

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod tests;
