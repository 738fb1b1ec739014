//! What every concern of a shard reaches: its configuration and clock, the node's metadata and
//! the shard's index, the conversations it owns ([`Convs`]), its connections ([`Directory`]) and
//! what goes out to them ([`Outbound`]), its mail to the other shards ([`Mail`]), its metadata
//! writer and its counters. The concerns (sequencer, cursors, sync, ...) keep their own state
//! and take this by reference, so each depends on what it shares, not on the others.

use std::sync::Arc;

use starling_protocol::v1::{self, ErrorCode};
use starling_storage::{
    CursorStore, DeliveryCursor, Entry, MessageIndex, MetadataStore, ReadCursor, UserId,
};

use super::config::ShardConfig;
use super::convs::{ConvState, Convs};
use super::directory::Directory;
use super::frames::Refusal;
use super::mail::{Inner, Mail, ShardMsg};
use super::outbound::Outbound;
use super::read_fanout::Available;
use super::reader::{Got, Want};
use crate::grid::ShardLinks;
use crate::ids::{ConnId, ConnRef, ConvId};
use crate::metawriter::MetaWriter;

/// `retry_after_ms` of the `OVERLOADED` that refuses a request the metadata writer has no room
/// for: about as long as a few metadata commits take.
pub(super) const META_RETRY_AFTER_MS: u32 = 50;

/// Counters for tests, metrics and the simulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Messages acknowledged durable.
    pub messages_acked: u64,
    /// Sends answered from dedup (retries).
    pub duplicates: u64,
    /// Deliver frames pushed (not counting Sync).
    pub pushed: u64,
    /// MessagesAvailable hints emitted.
    pub hints: u64,
    /// Cursor flushes (durable batches of cursor updates).
    pub cursor_flushes: u64,
    /// Storage reads made on the shard thread instead of through the read jobs (`reads.rs`):
    /// conversation states and pages the gate did not foresee. Zero on the paths it covers.
    pub inline_reads: u64,
    /// Storage reads handed to the read jobs.
    pub reads_submitted: u64,
    /// Idle conversation states dropped from memory (see `ShardConfig::conv_idle_evict_ms`).
    pub convs_evicted: u64,
    /// Typing frames dropped or refused over a connection's rate limit.
    pub typing_dropped: u64,
    /// Last seen times not written because the metadata writer was full (they live on in
    /// memory until a restart).
    pub presence_unwritten: u64,
}

/// What the shard does with a metadata job's outcome (see [`crate::metawriter`]).
pub(super) enum MetaTag {
    /// A cursor batch: announce receipts and answer `waiters`, or put it back.
    Cursors {
        delivery: Vec<DeliveryCursor>,
        read: Vec<ReadCursor>,
        floors: Vec<starling_storage::conv_delivered::ConvDelivered>,
        waiters: Vec<(ConnRef, u64)>,
    },
    /// A Block/Unblock: answer it (through the conversation's owner if there is one).
    Block { origin: ConnRef, request_id: u64 },
    /// A direct conversation for the parked Sends of this pair.
    Direct { pair: (UserId, UserId) },
    /// A group change (or creation) and its pending-event marker.
    Group(Box<super::groups::Committing>),
    /// A message change's new state (`changes.rs`): sequence the change.
    Change(Box<super::mail::SendCmd>),
    /// A group change's event is durable: the marker is cleared, the seqs written.
    GroupSettled { conv: ConvId },
    /// A user's presence record: answer the SetPresence in `reply`, if one waits for it.
    Presence {
        user: UserId,
        reply: Option<(ConnRef, u64)>,
    },
}

/// The state the concerns of one shard share (see the module docs).
pub(super) struct Shared<I, M> {
    pub(super) cfg: ShardConfig,
    /// The time of the input being handled.
    pub(super) now_ms: u64,
    pub(super) index: Arc<I>,
    pub(super) meta: Arc<M>,
    pub(super) convs: Convs,
    /// Reads in flight and the messages parked for them (`reads.rs`).
    pub(super) reads: super::reads::Reads,
    /// The results of the reads of the message being handled, if it was parked for them.
    pub(super) got: super::reads::GotMap,
    pub(super) dir: Directory,
    pub(super) out: Outbound,
    pub(super) mail: Mail,
    /// Every metadata write (cursor batches, Block/Unblock, direct conversations) goes through
    /// it, off this thread once `RouterShard::set_meta_offload` was called.
    pub(super) writer: MetaWriter<MetaTag>,
    /// Large groups' messages to announce instead of pushing them (`read_fanout.rs`).
    pub(super) available: Available,
    /// Durable entries for the push notifier, while enabled (`RouterShard::enable_notices`).
    pub(super) notices: Option<std::collections::VecDeque<Notice>>,
    pub(super) stats: ShardStats,
}

/// An entry that became durable at its owner, for the push notifier: the members of its
/// conversation other than the sender may have devices to wake (`RouterShard::poll_notice`).
/// It carries no content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The conversation (its wire id).
    pub conversation_id: u64,
    /// The entry's seq.
    pub seq: u64,
    /// Who sent it (the author of a group change).
    pub sender: u64,
    /// The conversation's members when it was sequenced (the sender included).
    pub members: Arc<[UserId]>,
}

impl<I, M> Shared<I, M> {
    pub(super) fn new(
        cfg: ShardConfig,
        links: ShardLinks<ShardMsg>,
        index: Arc<I>,
        meta: Arc<M>,
    ) -> Self {
        Shared {
            out: Outbound::new(cfg.conn_outbound_bytes_max, cfg.slow_consumer_close_ms),
            writer: MetaWriter::new(cfg.blocks_max),
            available: Available::default(),
            notices: None,
            cfg,
            now_ms: 0,
            index,
            meta,
            convs: Convs::default(),
            reads: super::reads::Reads::default(),
            got: super::reads::GotMap::default(),
            dir: Directory::default(),
            mail: Mail::new(links),
            stats: ShardStats::default(),
        }
    }

    /// Queues `f` for this shard's connection `conn` (see [`Outbound::emit`]).
    pub(super) fn emit(&mut self, conn: ConnId, f: v1::Frame, push: bool) -> bool {
        self.out.emit(&mut self.dir, conn, f, push, self.now_ms)
    }

    /// Sends `frames` to connection `to`, on whatever shard it is.
    pub(super) fn reply(&mut self, to: ConnRef, frames: Vec<v1::Frame>) {
        self.mail.reply(to, frames);
    }

    /// Sends `m` to `shard` (this one included).
    pub(super) fn send_to(&mut self, shard: usize, m: Inner) {
        self.mail.send_to(shard, m);
    }
}

impl<I, M> Shared<I, M>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    /// The owner-side state of `conv`: in memory, or read for the message being handled
    /// (`reads.rs`), or — a path the gate did not foresee — loaded here, on the shard thread.
    pub(super) fn conv(&mut self, conv: ConvId) -> Result<&mut ConvState, Refusal> {
        debug_assert_eq!(self.mail.owner(conv), self.mail.shard());
        if self.convs.get(conv).is_none() {
            if let Some(Got::Conv(Err(r))) = self.got.get(&Want::Conv(conv)) {
                return Err(r.clone());
            }
            self.stats.inline_reads += 1;
            self.reads.loaded_inline(conv);
        }
        self.convs
            .load(conv, &*self.index, &*self.meta, self.now_ms)
    }

    /// The state of `conv` if `user` is one of its members.
    pub(super) fn member_conv(
        &mut self,
        conv: ConvId,
        user: UserId,
    ) -> Result<&mut ConvState, Refusal> {
        let c = self.conv(conv)?;
        if !c.members.contains(&user) {
            return Err(Refusal(
                ErrorCode::NotAMember,
                "not a member of this conversation".into(),
            ));
        }
        Ok(c)
    }

    /// The state of `conv` and the seqs of it `user` may read (inclusive; a former member of a
    /// group reads up to its removal), or `NOT_A_MEMBER`.
    /// What decides, now, which entries of `conv` are gone (its delivery steps if its state is
    /// in memory; a conversation not in memory has none, so nothing of it is gone by delivery:
    /// later, never earlier).
    pub(super) fn keep(&self, conv: ConvId) -> super::disappearing::Keep {
        let retention = self.cfg.retention();
        let steps = match (retention.after_delivery_ms, self.convs.get(conv)) {
            (Some(_), Some(c)) => c.cursors.steps.clone(),
            _ => Arc::from(Vec::new()),
        };
        super::disappearing::Keep {
            now_ms: self.now_ms,
            retention,
            steps,
        }
    }

    pub(super) fn reader_conv(
        &mut self,
        conv: ConvId,
        user: UserId,
    ) -> Result<(&mut ConvState, (u64, u64)), Refusal> {
        let c = self.conv(conv)?;
        let range = c.visible(user)?;
        Ok((c, range))
    }

    /// Durable entries of `conv` with seq > `after`, oldest first, at most `limit` (see
    /// [`Shared::read_page`]).
    pub(super) fn read_after(
        &mut self,
        conv: ConvId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, Refusal> {
        self.read_page(Want::After { conv, after, limit })
    }

    /// Durable entries of `conv` with seq < `before`, newest `limit` of them, oldest first (see
    /// [`Shared::read_page`]).
    pub(super) fn read_before(
        &mut self,
        conv: ConvId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, Refusal> {
        self.read_page(Want::Before {
            conv,
            before,
            limit,
        })
    }

    /// The page `key` (`After` or `Before`): as read for the message being handled, or from
    /// the durable tail, or — a read the gate did not foresee — from the index here.
    fn read_page(&mut self, key: Want) -> Result<Vec<Arc<Entry>>, Refusal> {
        if let Some(Got::Read(r)) = self.got.remove(&key) {
            return r;
        }
        let (Want::After { conv, .. } | Want::Before { conv, .. }) = key else {
            return Err(Refusal(ErrorCode::Internal, "not a page".into()));
        };
        self.conv(conv)?;
        let c = self.convs.get(conv).expect("just loaded");
        if let Some(v) = c.seq.tail_page(key) {
            return Ok(v);
        }
        self.stats.inline_reads += 1;
        match key {
            Want::After { after, limit, .. } => c.seq.read_after(&*self.index, conv, after, limit),
            Want::Before { before, limit, .. } => {
                c.seq.read_before(&*self.index, conv, before, limit)
            }
            _ => Err(Refusal(ErrorCode::Internal, "not a page".into())),
        }
    }

    /// `user`'s display name (`None`: no such user, or it could not be read): as read for the
    /// message being handled, or (unforeseen) from the metadata here.
    pub(super) fn user_name(&mut self, user: UserId) -> Option<String> {
        match self.got.remove(&Want::UserName(user)) {
            Some(Got::UserName(r)) => r.ok().flatten(),
            _ => {
                self.stats.inline_reads += 1;
                super::reader::user_name(&*self.meta, user).ok().flatten()
            }
        }
    }

    /// The conversations `user` is a member of: as read for the message being handled, or
    /// (unforeseen) from the metadata here.
    pub(super) fn user_convs(&mut self, user: UserId) -> Result<Vec<ConvId>, Refusal> {
        match self.got.remove(&Want::UserConvs(user)) {
            Some(Got::UserConvs(r)) => r,
            _ => {
                self.stats.inline_reads += 1;
                super::convs::conversations_of(&*self.meta, user)
            }
        }
    }
}
