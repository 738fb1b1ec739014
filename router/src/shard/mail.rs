//! What crosses the rings between shards ([`ShardMsg`]: one variant per step of a request's
//! path, e.g. a Sync from the ingress shard to an owner, and its part back), and the shard's
//! [`Mail`]: sending to another shard (or to itself, through a local queue, so a request takes
//! the same path whichever shard owns what it names) and the outbox of what waits for room in a
//! full ring.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use starling_protocol::v1;
use starling_storage::{ClientMsgId, DeviceId, UserId};

use crate::grid::ShardLinks;
use crate::ids::{ConnId, ConnRef, ConvId, home_shard, owner_shard};

/// A message between shards, carried by the grid's rings. Opaque to the gateway.
pub struct ShardMsg(pub(super) Inner);

impl fmt::Debug for ShardMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.0 {
            Inner::Send(_) => "Send",
            Inner::Reply { .. } => "Reply",
            Inner::Fanout(_) => "Fanout",
            Inner::Cursor(_) => "Cursor",
            Inner::Receipts(_) => "Receipts",
            Inner::SyncStart(_) => "SyncStart",
            Inner::Sync(_) => "Sync",
            Inner::SyncPart(_) => "SyncPart",
            Inner::History(_) => "History",
            Inner::Download(_) => "Download",
            Inner::ListStart(_) => "ListStart",
            Inner::List(_) => "List",
            Inner::ListPart(_) => "ListPart",
            Inner::Block(_) => "Block",
            Inner::BlockChanged { .. } => "BlockChanged",
            Inner::Group(_) => "Group",
            Inner::Presence(_) => "Presence",
            Inner::Typing(_) => "Typing",
        };
        f.debug_tuple("ShardMsg").field(&kind).finish()
    }
}

// Shards run on their own threads: what crosses a ring must be `Send`.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<ShardMsg>();
};

/// The messages; the shard that receives one hands it to the concern that owns it
/// (`RouterShard::process`).
pub(super) enum Inner {
    /// A Send, for its conversation's owner (the sequencer).
    Send(Box<SendCmd>),
    /// Frames for one of the receiving shard's connections (answers from an owner).
    Reply { to: ConnId, frames: Vec<v1::Frame> },
    /// Durable messages and receipts, for every shard's connections of the members.
    Fanout(Arc<Vec<FanoutItem>>),
    /// A DeliveryAck or ReadCursor, for the conversation's owner.
    Cursor(CursorCmd),
    /// A GetReceipts, for the conversation's owner (`group_receipts.rs`).
    Receipts(ReceiptsCmd),
    /// A Sync at its ingress shard, once the user's conversations are read (to itself).
    SyncStart(Box<Start<v1::Sync>>),
    /// A Sync's conversations that one owner holds.
    Sync(SyncCmd),
    /// An owner's part of a Sync, for the connection that asked.
    SyncPart(SyncPart),
    /// A GetHistory, for the conversation's owner.
    History(HistoryCmd),
    /// A RequestDownload, for the conversation's owner (`media.rs`).
    Download(DownloadCmd),
    /// A ListConversations at its ingress shard, once the user's conversations are read (to
    /// itself).
    ListStart(Box<Start<v1::ListConversations>>),
    /// A ListConversations' conversations that one owner holds.
    List(ListCmd),
    /// An owner's summaries, for the connection that asked.
    ListPart(ListPart),
    /// A Block/Unblock, for the requesting user's home shard (which rate-limits, orders and
    /// writes it).
    Block(BlockCmd),
    /// A Block/Unblock between the members of direct conversation `conv` was committed: the
    /// owner forgets its cached block state, then answers `Done` to the request.
    BlockChanged {
        conv: ConvId,
        origin: ConnRef,
        request_id: u64,
    },
    /// A group request, for the group's owner (`shard/groups`).
    Group(Box<super::groups::GroupCmd>),
    /// Presence: a connection's changes for its user's home, follows, and what the homes send
    /// back (`presence.rs`).
    Presence(PresenceMsg),
    /// Typing: a Typing for its conversation's owner, and the owner's push to every shard
    /// (`typing.rs`).
    Typing(TypingMsg),
}

/// A request that starts from the requesting user's conversation list, at its ingress shard.
pub(super) struct Start<R> {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) req: R,
}

/// A Send, validated at the ingress shard.
pub(super) struct SendCmd {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) device: DeviceId,
    /// The conversation (for a Send parked while its direct conversation is created: set once
    /// it exists).
    pub(super) conv: ConvId,
    pub(super) cmid: ClientMsgId,
    /// `cmid` as the frame carried it (answers and pushes share it instead of copying).
    pub(super) cmid_bytes: Bytes,
    pub(super) content_type: String,
    pub(super) body: Bytes,
    /// The attachment, checked at ingress (`media::check_ref`).
    pub(super) media: Option<Box<v1::MediaRef>>,
    pub(super) reply_to_seq: u64,
    /// An edit, delete or reaction of an earlier message instead of a new message
    /// (`changes.rs`), checked for consistency at ingress.
    pub(super) change: Option<Box<v1::MessageChange>>,
    /// A change of the conversation's disappearing-messages timer to this many seconds (0:
    /// off) instead of a message (`disappearing.rs`), checked at ingress.
    pub(super) set_timer: Option<u64>,
    /// For a change: its target's expiry (0: none), which the change entry carries too (set
    /// when the target is checked, `changes.rs`).
    pub(super) target_expiry_ms: u64,
    /// The change's new state of its target (or the timer's new setting) is durable in the
    /// metadata: sequence it.
    pub(super) change_ready: bool,
    /// The device says no earlier frame carried `cmid` (`Send.first_attempt`): skip the durable
    /// dedup lookup (in-memory copies are still checked).
    pub(super) first_attempt: bool,
    pub(super) now_ms: u64,
}

/// What fan-out pushes.
pub(super) enum FanoutItem {
    /// A durable message for every online device of `members`, except `origin` (which got the
    /// SendAck).
    Message {
        msg: v1::Message,
        members: Arc<[UserId]>,
        origin: ConnRef,
    },
    /// A receipt for every online device of `to`.
    Receipt {
        receipt: v1::Receipt,
        to: Vec<UserId>,
    },
    /// A large group has messages up to `up_to_seq`: a `MessagesAvailable` for every online
    /// device of `members` (fan-out on read).
    Available {
        conv: ConvId,
        up_to_seq: u64,
        members: Arc<[UserId]>,
    },
    /// A group's aggregate receipts for every online device of their sender `to`.
    GroupReceipts {
        receipts: v1::GroupReceipts,
        to: UserId,
    },
}

/// A GetReceipts, validated at the ingress shard.
pub(super) struct ReceiptsCmd {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) conv: ConvId,
    pub(super) seq: u64,
    /// The page: recipients after this user id ...
    pub(super) after: UserId,
    /// ... at most this many.
    pub(super) limit: usize,
}

/// Which cursor a [`CursorCmd`] moves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum CursorKind {
    /// A device's delivery cursor (`DeliveryAck`).
    Delivered,
    /// A user's read cursor (`ReadCursor`).
    Read,
}

/// A DeliveryAck or ReadCursor.
pub(super) struct CursorCmd {
    /// Where to send `Done` once durable (request_id != 0), if anywhere.
    pub(super) reply: Option<(ConnRef, u64)>,
    pub(super) kind: CursorKind,
    pub(super) user: UserId,
    pub(super) device: DeviceId,
    pub(super) conv: ConvId,
    pub(super) seq: u64,
}

/// The conversations of a Sync that one owner holds, each with the last seq the device has.
pub(super) struct SyncCmd {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) convs: Vec<(ConvId, u64)>,
    /// This owner's share of `sync_bytes_max`.
    pub(super) bytes_max: usize,
}

/// One owner's answer to a [`SyncCmd`].
pub(super) struct SyncPart {
    pub(super) to: ConnId,
    pub(super) request_id: u64,
    pub(super) frames: Vec<v1::Frame>,
    pub(super) truncated: Vec<v1::MessagesAvailable>,
    pub(super) messages: u32,
    pub(super) receipts: u32,
}

/// A GetHistory of a conversation.
pub(super) struct HistoryCmd {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) conv: ConvId,
    pub(super) req: v1::GetHistory,
}

/// A RequestDownload of the media of one message.
pub(super) struct DownloadCmd {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) conv: ConvId,
    pub(super) req: v1::RequestDownload,
}

/// The conversations of a ListConversations that one owner holds.
pub(super) struct ListCmd {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) convs: Vec<ConvId>,
}

/// One owner's answer to a [`ListCmd`].
pub(super) struct ListPart {
    pub(super) to: ConnId,
    pub(super) request_id: u64,
    pub(super) summaries: Vec<v1::ConversationSummary>,
}

/// A Block (`block`) or Unblock of `target` by `user`.
pub(super) struct BlockCmd {
    pub(super) origin: ConnRef,
    pub(super) request_id: u64,
    pub(super) user: UserId,
    pub(super) target: UserId,
    pub(super) block: bool,
}

/// Presence between shards.
pub(super) enum PresenceMsg {
    /// A connection of `user` opened (to the user's home).
    Opened { user: UserId, conn: ConnRef },
    /// A connection of `user` closed (to the user's home).
    Closed { user: UserId, conn: ConnRef },
    /// SetPresence from connection `conn` of `user` (to the user's home), answered there.
    Set {
        user: UserId,
        conn: ConnRef,
        request_id: u64,
        away: bool,
        hide_last_seen: bool,
    },
    /// Connection `watcher` of `watcher_user` follows `users` (to their home), which answers
    /// with a [`PresenceMsg::Part`].
    Watch {
        watcher: ConnRef,
        watcher_user: UserId,
        request_id: u64,
        users: Vec<UserId>,
    },
    /// Connection `watcher` no longer follows `users` (to their home).
    Unwatch {
        watcher: ConnRef,
        users: Vec<UserId>,
    },
    /// One home's part of a snapshot (to the follower's shard).
    Part {
        to: ConnId,
        request_id: u64,
        users: Vec<v1::PresenceUpdate>,
    },
    /// Changes, for connections of the receiving shard.
    Updates(Vec<(ConnId, v1::PresenceUpdate)>),
}

/// Typing between shards.
pub(super) enum TypingMsg {
    /// A Typing from `origin` (to the conversation's owner).
    Cmd {
        origin: ConnRef,
        request_id: u64,
        user: UserId,
        conv: ConvId,
        typing: bool,
    },
    /// An indicator for every shard's connections of `members` but `user`'s.
    Push {
        conv: ConvId,
        user: UserId,
        typing: bool,
        members: Arc<[UserId]>,
    },
}

/// The shard's way to the others (and to itself).
pub(super) struct Mail {
    shard: usize,
    shards: usize,
    links: ShardLinks<ShardMsg>,
    /// Messages to this shard itself, handled before the next input.
    local: VecDeque<Inner>,
    /// Per shard: what waits for room in its ring.
    outbox: Vec<VecDeque<ShardMsg>>,
}

impl Mail {
    pub(super) fn new(links: ShardLinks<ShardMsg>) -> Mail {
        let shards = links.shards();
        Mail {
            shard: links.shard(),
            shards,
            links,
            local: VecDeque::new(),
            outbox: (0..shards).map(|_| VecDeque::new()).collect(),
        }
    }

    /// This shard's index in the grid.
    pub(super) fn shard(&self) -> usize {
        self.shard
    }

    /// How many shards there are.
    pub(super) fn shards(&self) -> usize {
        self.shards
    }

    /// The shard that owns `conv`.
    pub(super) fn owner(&self, conv: ConvId) -> usize {
        owner_shard(conv, self.shards)
    }

    /// The home shard of `user`.
    pub(super) fn home(&self, user: UserId) -> usize {
        home_shard(user.0, self.shards)
    }

    /// Sends `m` to `shard`: through its ring, or the local queue if that is this shard.
    pub(super) fn send_to(&mut self, shard: usize, m: Inner) {
        if shard == self.shard {
            self.local.push_back(m);
        } else if let Some(q) = self.outbox.get_mut(shard) {
            q.push_back(ShardMsg(m));
        }
    }

    /// Sends `frames` to connection `to`, on whatever shard it is.
    pub(super) fn reply(&mut self, to: ConnRef, frames: Vec<v1::Frame>) {
        self.send_to(
            to.shard,
            Inner::Reply {
                to: to.conn,
                frames,
            },
        );
    }

    /// Sends `items` to every shard (this one too), for their connections.
    pub(super) fn broadcast(&mut self, items: Vec<FanoutItem>) {
        if items.is_empty() {
            return;
        }
        let items = Arc::new(items);
        for s in 0..self.shards {
            self.send_to(s, Inner::Fanout(items.clone()));
        }
    }

    /// The next message this shard sent itself.
    pub(super) fn next_local(&mut self) -> Option<Inner> {
        self.local.pop_front()
    }

    /// Whether nothing this shard sent itself waits.
    pub(super) fn local_is_empty(&self) -> bool {
        self.local.is_empty()
    }

    /// The next message from another shard's ring.
    pub(super) fn receive(&mut self) -> Option<Inner> {
        self.links.pop().map(|ShardMsg(m)| m)
    }

    /// Whether anything waits for room in a full ring.
    pub(super) fn is_backpressured(&self) -> bool {
        self.outbox.iter().any(|q| !q.is_empty())
    }

    /// Pushes what waits in the outbox into the rings (as far as they have room) and wakes the
    /// shards that got something.
    pub(super) fn flush(&mut self) {
        let mut pushed = false;
        for (to, q) in self.outbox.iter_mut().enumerate() {
            while let Some(m) = q.pop_front() {
                match self.links.push(to, m) {
                    Ok(()) => pushed = true,
                    Err(m) => {
                        q.push_front(m);
                        // The ring is full: what waits here may reach its owner after a resend
                        // from another connection (the device gave up on this one) was
                        // sequenced and left the owner's memory. A Send in a ring is drained
                        // before that can happen; one held here cannot count on it.
                        for ShardMsg(m) in q.iter_mut() {
                            if let Inner::Send(cmd) = m {
                                cmd.first_attempt = false;
                            }
                        }
                        break;
                    }
                }
            }
        }
        if pushed {
            self.links.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Bell, Doorbell};

    struct NoBell;
    impl Doorbell for NoBell {
        fn ring(&self) {}
    }

    fn send(first_attempt: bool) -> Inner {
        Inner::Send(Box::new(SendCmd {
            origin: ConnRef {
                shard: 0,
                conn: ConnId(1),
            },
            request_id: 1,
            user: UserId(1),
            device: DeviceId(1),
            conv: ConvId(5),
            cmid: ClientMsgId([1; 16]),
            cmid_bytes: Bytes::from_static(&[1; 16]),
            content_type: String::new(),
            body: Bytes::new(),
            media: None,
            reply_to_seq: 0,
            change: None,
            set_timer: None,
            target_expiry_ms: 0,
            change_ready: false,
            first_attempt,
            now_ms: 0,
        }))
    }

    fn first_attempt(m: &Inner) -> bool {
        match m {
            Inner::Send(cmd) => cmd.first_attempt,
            _ => panic!("not a Send"),
        }
    }

    #[test]
    fn a_send_held_back_by_a_full_ring_loses_its_first_attempt_promise() {
        let bells = [Bell::new(NoBell), Bell::new(NoBell)];
        let mut links = crate::grid(2, &bells);
        let mut other = Mail::new(links.pop().unwrap());
        let mut mail = Mail::new(links.pop().unwrap());
        assert_eq!(mail.shard(), 0);
        // Three Sends for shard 1, whose ring holds two; and one for this shard.
        for _ in 0..3 {
            mail.send_to(1, send(true));
        }
        mail.send_to(0, send(true));
        assert!(mail.is_backpressured());
        mail.flush();
        assert!(mail.is_backpressured(), "one waits for room");
        // What went through the ring keeps its promise; the one held back does not.
        let got: Vec<bool> = std::iter::from_fn(|| other.receive())
            .map(|m| first_attempt(&m))
            .collect();
        assert_eq!(got, [true, true]);
        mail.flush();
        assert!(!mail.is_backpressured());
        assert!(!first_attempt(&other.receive().unwrap()));
        // The local one never waited.
        assert!(first_attempt(&mail.next_local().unwrap()));
        assert!(mail.local_is_empty());
    }

    #[test]
    fn a_broadcast_reaches_every_shard_this_one_included() {
        let bells = [Bell::new(NoBell), Bell::new(NoBell)];
        let mut links = crate::grid(8, &bells);
        let mut other = Mail::new(links.pop().unwrap());
        let mut mail = Mail::new(links.pop().unwrap());
        mail.broadcast(Vec::new());
        assert!(
            mail.local_is_empty() && !mail.is_backpressured(),
            "nothing to send"
        );
        mail.reply(
            ConnRef {
                shard: 1,
                conn: ConnId(4),
            },
            Vec::new(),
        );
        let receipt = FanoutItem::Receipt {
            receipt: v1::Receipt::default(),
            to: vec![UserId(2)],
        };
        mail.broadcast(vec![receipt]);
        mail.flush();
        assert!(matches!(mail.next_local(), Some(Inner::Fanout(_))));
        assert!(matches!(
            other.receive(),
            Some(Inner::Reply { to: ConnId(4), .. })
        ));
        assert!(matches!(other.receive(), Some(Inner::Fanout(_))));
    }
}
