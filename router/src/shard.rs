//! [`RouterShard`]: one shard's messaging core, sans-IO. See the crate docs for the API and
//! `docs/design/messaging.md` for the design (message path, receipts, sync, slow consumers).

use std::fmt;
use std::sync::Arc;

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::{CursorStore, DeviceId, DurableLog, MessageIndex, MetadataStore, UserId};

use crate::grid::ShardLinks;
use crate::ids::{ConnId, ConnRef, ConvId};
use crate::metawriter::Offload;

mod blocks;
mod changes;
mod config;
mod convs;
mod cursors;
mod direct;
mod directory;
mod disappearing;
mod envelope;
mod fanout;
pub(crate) mod frames;
mod gather;
mod group_receipts;
mod groups;
mod history;
mod list;
mod mail;
mod media;
mod outbound;
mod presence;
mod read_fanout;
mod reader;
mod reads;
mod send;
mod sequencer;
mod shared;
mod sync;
mod typing;

use blocks::Blocks;
pub use config::ShardConfig;
use convs::ConvState;
use cursors::Cursors;
use direct::Direct;
pub use disappearing::{Retention, keep_until};
#[cfg(test)]
pub(crate) use envelope::sample_envelope;
pub(crate) use envelope::{
    fuzz_envelope, fuzz_envelope_v2, fuzz_envelope_v3, fuzz_envelope_v4, fuzz_envelope_v5,
};
pub use frames::{CloseRequest, Transmit};
use frames::{Refusal, error_frame};
use groups::Groups;
pub use mail::ShardMsg;
use mail::{CursorKind, Inner, Start};
pub use media::{DownloadSigner, MEDIA_TEXT_BYTES_MAX, THUMBNAIL_BYTES_MAX, is_media_id};
use presence::Presence;
use sequencer::Sequencer;
pub use sequencer::{STORAGE_NOT_STORED, STORAGE_OUTCOME_UNKNOWN, STORAGE_SHARD_FAILED};
pub use shared::Notice;
pub use shared::ShardStats;
use shared::{MetaTag, Shared};
use typing::Typing;

/// Points the reads' offload at an index (kept to point it at a reopened log's).
type PointReads<I> = Box<dyn Fn(&mut reader::Reader, Arc<I>)>;

/// One shard's messaging core: its sequencer partition, its slice of the session directory
/// (its own connections), its log and its rings. Sans-IO: see the crate docs.
pub struct RouterShard<L, I, M> {
    /// What the concerns share: configuration, clock, storage, conversations, connections,
    /// mail, metadata writer, counters.
    sh: Shared<I, M>,
    /// The log and the batches on their way into it.
    sequencer: Sequencer<L>,
    /// Cursors not yet written, and the requests waiting for them.
    cursors: Cursors,
    /// Direct conversations known here, and Sends parked while one is created.
    direct: Direct,
    /// Block/Unblock budgets of the users whose home shard this is.
    blocks: Blocks,
    /// Group ids this shard draws.
    groups: Groups,
    /// Presence of the users whose home shard this is, and this shard's connections' follows.
    presence: Presence,
    /// Typing: this shard's connections' rate limits, its conversations' typing users.
    typing: Typing,
    /// Points the reads' offload (`set_read_offload`) at an index: kept for a reopened log's.
    read_offload: Option<PointReads<I>>,
}

impl<L, I, M> fmt::Debug for RouterShard<L, I, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterShard")
            .field("shard", &self.sh.mail.shard())
            .field("convs", &self.sh.convs.len())
            .field("conns", &self.sh.dir.conns.len())
            .field("inflight", &self.sequencer.inflight())
            .field("reads", &self.sh.reads)
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

impl<L, I, M> RouterShard<L, I, M>
where
    I: MessageIndex + Send + Sync + 'static,
    M: MetadataStore + CursorStore + Send + Sync + 'static,
{
    /// Makes every storage read the shard's messages need (conversation states, pages of
    /// entries, dedup lookups, users' conversation lists) a job run by `offload` on another
    /// thread, which must wake the shard after each (as the log's wake callback does), so that
    /// [`RouterShard::handle_log_progress`] or [`RouterShard::handle_tick`] takes the result
    /// and handles the messages that waited for it. Jobs may finish in any order. Without it
    /// reads run inline (the simulation's default). See `docs/design/reads.md`.
    pub fn set_read_offload(&mut self, offload: Offload) {
        let offload = std::rc::Rc::new(offload);
        let meta = self.sh.meta.clone();
        let point: PointReads<I> = Box::new(move |r, index| {
            r.set_offload(index, meta.clone(), offload.clone());
        });
        point(&mut self.sh.reads.reader, self.sh.index.clone());
        self.read_offload = Some(point);
    }
}

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
        RouterShard {
            blocks: Blocks::new(&cfg),
            presence: Presence::default(),
            typing: Typing::new(cfg.typing_per_s, cfg.typing_burst),
            sh: Shared::new(cfg, links, index, meta),
            sequencer: Sequencer::new(log),
            cursors: Cursors::default(),
            direct: Direct::default(),
            groups: Groups::default(),
            read_offload: None,
        }
    }

    /// This shard's index in the grid.
    pub fn shard(&self) -> usize {
        self.sh.mail.shard()
    }

    /// Why this shard stopped sequencing (its log failed), if it did. Nothing is sequenced
    /// after it (every Send and group change is refused with `STORAGE_FAILURE`; reads go on
    /// from the index) until [`RouterShard::storage_recovered`].
    pub fn failure(&self) -> Option<&str> {
        self.sequencer.failure()
    }

    /// The failed log was reopened in place (off this thread): `log` ends at the last lsn the
    /// failed one had made durable (nothing after it: see `starling_storage::FailedShard`) and
    /// `index` covers all of it. Both replace the old ones; every conversation state that could
    /// disagree with the log (next seqs, durable tails, pending Sends, a group change whose
    /// event was lost) is read again from the stores; sequencing resumes right after the last
    /// durable seq of each conversation. Returns the failed log (drop it off the hot path if
    /// dropping is slow). Without a failure, nothing changes and `log` is handed back.
    pub fn storage_recovered(&mut self, log: L, index: Arc<I>) -> L {
        if self.sequencer.failure().is_none() {
            return log;
        }
        let old = self.sequencer.replace_failed(log);
        self.sh.index = index;
        // Reads in flight read the old log's index: their results are void.
        self.sh.reads.reopened();
        if let Some(point) = &self.read_offload {
            point(&mut self.sh.reads.reader, self.sh.index.clone());
        }
        let mut dropped = Vec::new();
        for conv in self.sh.convs.ids() {
            if groups::log_reopened(&mut self.sh, conv) {
                dropped.push(conv);
            }
        }
        let sh = &mut self.sh;
        sh.convs.log_reopened(&*sh.index, &dropped);
        // The dropped groups load again now: one whose change lost its event finds the change's
        // marker and sequences the event again (at the next `drive`), instead of waiting for
        // its next use.
        for conv in dropped {
            let _ = self.sh.conv(conv);
        }
        self.drive();
        old
    }

    /// Conversations whose state is in memory (see `ShardConfig::conv_idle_evict_ms`).
    pub fn loaded_conversations(&self) -> usize {
        self.sh.convs.len()
    }

    /// Messages parked for storage reads in flight (see [`RouterShard::set_read_offload`]).
    pub fn reads_waiting(&self) -> usize {
        self.sh.reads.parked()
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

    /// Reads the members of direct conversation `conv` again, if its state is in memory (a
    /// group's membership changes only through the group requests, which keep it in step).
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
        Presence::conn_opened(&mut self.sh, conn, user);
        self.drive();
    }

    /// A connection closed (or the gateway closed it). Everything queued for it is dropped.
    pub fn handle_conn_closed(&mut self, conn: ConnId, now_ms: u64) {
        self.sh.now_ms = now_ms;
        if let Some(user) = self.sh.dir.conns.get(&conn).map(|c| c.user) {
            self.presence.conn_closed(&mut self.sh, conn, user);
        }
        self.sh.dir.close(conn);
        self.drive();
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
            Some(Body::Send(s)) => {
                send::request(&mut self.sh, &mut self.direct, origin, rid, user, device, s)
            }
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
            // Both start from the user's conversation list, read off this thread.
            Some(Body::Sync(s)) => {
                let start = Start {
                    origin,
                    request_id: rid,
                    user,
                    req: s,
                };
                self.sh
                    .send_to(origin.shard, Inner::SyncStart(Box::new(start)));
                Ok(())
            }
            Some(Body::GetReceipts(r)) => {
                group_receipts::request(&mut self.sh, origin, rid, user, r)
            }
            Some(Body::GetHistory(h)) => history::request(&mut self.sh, origin, rid, user, h),
            Some(Body::RequestDownload(d)) => media::request(&mut self.sh, origin, rid, user, d),
            Some(Body::ListConversations(l)) => {
                let start = Start {
                    origin,
                    request_id: rid,
                    user,
                    req: l,
                };
                self.sh
                    .send_to(origin.shard, Inner::ListStart(Box::new(start)));
                Ok(())
            }
            Some(Body::Block(b)) => {
                Blocks::request(&mut self.sh, origin, rid, user, b.user_id, true)
            }
            Some(Body::Unblock(b)) => {
                Blocks::request(&mut self.sh, origin, rid, user, b.user_id, false)
            }
            Some(b) if groups::is_request(&b) => {
                groups::request(&mut self.sh, &mut self.groups, origin, rid, user, b)
            }
            Some(Body::SubscribePresence(s)) => {
                self.presence.subscribe(&mut self.sh, origin, rid, user, &s)
            }
            Some(Body::UnsubscribePresence(u)) => {
                self.presence.unsubscribe(&mut self.sh, origin, rid, &u)
            }
            Some(Body::SetPresence(p)) => Presence::set(&mut self.sh, origin, rid, user, &p),
            Some(Body::Typing(t)) => self.typing.request(&mut self.sh, origin, rid, user, &t),
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
                | Body::GetReceipts(_)
                | Body::GetHistory(_)
                | Body::RequestDownload(_)
                | Body::ListConversations(_)
                | Body::Block(_)
                | Body::Unblock(_)
                | Body::SubscribePresence(_)
                | Body::UnsubscribePresence(_)
                | Body::SetPresence(_)
                | Body::Typing(_)
        ) || groups::is_request(body)
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
        self.poll_events();
        self.poll_meta();
        self.sh.prune_tails();
        self.drive();
    }

    /// Timer: submit a batch the log pushed back, write due cursor updates, prune caches. Call
    /// at [`RouterShard::poll_timeout`] (or more often).
    pub fn handle_tick(&mut self, now_ms: u64) {
        self.sh.now_ms = now_ms;
        self.poll_meta();
        self.cursors.tick(&mut self.sh);
        read_fanout::tick(&mut self.sh);
        self.sh.prune_tails();
        self.evict_idle();
        self.presence.tick(&mut self.sh);
        self.typing.tick(&mut self.sh);
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

    /// Makes this shard keep a [`Notice`] of every entry its conversations make durable, for
    /// [`RouterShard::poll_notice`] (the push notifier's feed). Off by default: without it no
    /// notice is kept.
    pub fn enable_notices(&mut self) {
        self.sh.notices.get_or_insert_with(Default::default);
    }

    /// The next entry made durable since the last call (while notices are enabled). Take them
    /// all after each turn: they are held until taken.
    #[must_use]
    pub fn poll_notice(&mut self) -> Option<Notice> {
        self.sh.notices.as_mut()?.pop_front()
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
            self.sh
                .convs
                .evict_due_ms(self.sh.cfg.conv_idle_evict_ms, self.sh.cfg.conv_states_max)
        };
        [
            self.cursors.due_ms(),
            busy,
            close,
            evict,
            self.presence.due_ms(),
            self.typing.due_ms(),
            self.sh.available.due_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // -----------------------------------------------------------------------------------------
    // plumbing

    fn drive(&mut self) {
        self.drive_local();
        self.drive_reads();
        if self.sequencer.is_full(&self.sh.cfg) {
            self.sequencer.submit(&mut self.sh);
        }
        if self.cursors.is_full(self.sh.cfg.cursor_flush_max) {
            self.cursors.flush(&mut self.sh);
        }
        self.poll_meta();
        self.drive_local();
        self.drive_reads();
        self.sh.mail.flush();
    }

    /// Takes finished reads and handles the messages that waited for them (and what they send
    /// this shard), until none is left ready (inline reads complete at once).
    fn drive_reads(&mut self) {
        loop {
            self.sh.reads_done();
            let mut any = false;
            for (pair, found) in self.sh.reads.take_directs() {
                self.direct.resolved(&mut self.sh, pair, found);
                any = true;
            }
            while let Some((m, got)) = self.sh.next_ready() {
                self.dispatch(m, got);
                any = true;
            }
            if !any {
                break;
            }
            self.drive_local();
        }
    }

    fn drive_local(&mut self) {
        while let Some(m) = self.sh.mail.next_local() {
            self.process(m);
        }
        groups::resume(&mut self.sh, &mut self.sequencer);
    }

    /// Hands the group events the log made durable to the groups concern.
    fn poll_events(&mut self) {
        let events = self.sequencer.take_durable_events();
        if !events.is_empty() {
            groups::events_durable(&mut self.sh, events);
        }
    }

    /// `m` through the read gate (`reads.rs`): handled now, or parked until its reads are done.
    fn process(&mut self, m: Inner) {
        if let Some((m, got)) = self.sh.admit(m) {
            self.dispatch(m, got);
        }
    }

    /// `m` to the concern that owns it, with the results of the reads it was parked for.
    fn dispatch(&mut self, m: Inner, got: reads::GotMap) {
        self.sh.got = got;
        self.handle(m);
        self.sh.got.clear();
    }

    fn handle(&mut self, m: Inner) {
        match m {
            Inner::Send(cmd) => self.sequencer.on_send(&mut self.sh, *cmd),
            Inner::Reply { to, frames } => {
                for f in frames {
                    self.sh.emit(to, f, false);
                }
            }
            Inner::Fanout(items) => fanout::push(&mut self.sh, &items),
            Inner::Cursor(c) => self.cursors.on_cmd(&mut self.sh, c),
            Inner::Receipts(r) => group_receipts::on_cmd(&mut self.sh, r),
            Inner::SyncStart(s) => {
                let Start {
                    origin,
                    request_id,
                    user,
                    req,
                } = *s;
                if let Err(Refusal(code, msg)) =
                    sync::request(&mut self.sh, origin, request_id, user, req)
                {
                    self.sh
                        .emit(origin.conn, error_frame(request_id, code, msg), false);
                }
            }
            Inner::ListStart(l) => {
                let Start {
                    origin,
                    request_id,
                    user,
                    req,
                } = *l;
                if let Err(Refusal(code, msg)) =
                    list::request(&mut self.sh, origin, request_id, user, &req)
                {
                    self.sh
                        .emit(origin.conn, error_frame(request_id, code, msg), false);
                }
            }
            Inner::Sync(s) => sync::on_cmd(&mut self.sh, s),
            Inner::SyncPart(p) => sync::on_part(&mut self.sh, p),
            Inner::History(h) => history::on_cmd(&mut self.sh, h),
            Inner::Download(d) => media::on_cmd(&mut self.sh, d),
            Inner::List(l) => list::on_cmd(&mut self.sh, l),
            Inner::ListPart(p) => list::on_part(&mut self.sh, p),
            Inner::Block(b) => self.blocks.on_cmd(&mut self.sh, b),
            Inner::BlockChanged {
                conv,
                origin,
                request_id,
            } => Blocks::changed(&mut self.sh, conv, origin, request_id),
            Inner::Group(cmd) => groups::on_cmd(&mut self.sh, *cmd),
            Inner::Presence(m) => self.presence.on_msg(&mut self.sh, m),
            Inner::Typing(m) => self.typing.on_msg(&mut self.sh, m),
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
        let sh = &mut self.sh;
        let reads = &sh.reads;
        // A state a parked message holds or waits for stays.
        let evictable = |conv: ConvId, c: &ConvState| {
            !reads.busy(conv)
                && c.seq.settled()
                && c.cursors.announced()
                && cursors.is_clean(conv, &c.cursors)
                && c.group.as_ref().is_none_or(|g| g.is_idle())
        };
        sh.stats.convs_evicted += sh.convs.evict_idle(
            sh.now_ms,
            sh.cfg.conv_idle_evict_ms,
            sh.cfg.conv_states_max,
            evictable,
        );
    }

    /// Takes the outcomes of finished metadata writes, in the order they were submitted.
    fn poll_meta(&mut self) {
        while let Some((tag, outcome)) = self.sh.writer.poll() {
            match tag {
                MetaTag::Cursors {
                    delivery,
                    read,
                    floors,
                    waiters,
                } => {
                    self.cursors
                        .batch_done(&mut self.sh, outcome, delivery, read, floors, waiters);
                }
                MetaTag::Block { origin, request_id } => {
                    Blocks::written(&mut self.sh, origin, request_id, outcome);
                }
                MetaTag::Direct { pair } => self.direct.created(&mut self.sh, pair, outcome),
                MetaTag::Group(job) => groups::committed(
                    &mut self.sh,
                    &mut self.sequencer,
                    &mut self.groups,
                    *job,
                    outcome,
                ),
                MetaTag::Change(cmd) => {
                    changes::committed(&mut self.sh, &mut self.sequencer, *cmd, outcome);
                }
                MetaTag::GroupSettled { conv } => groups::settled(&mut self.sh, conv, outcome),
                MetaTag::Presence { user, reply } => {
                    self.presence.written(&mut self.sh, user, reply, outcome);
                }
            }
        }
    }
}

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod reads_tests;
#[cfg(test)]
mod tests;
