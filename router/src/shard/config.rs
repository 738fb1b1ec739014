//! [`ShardConfig`]: the limits and sizes of one shard, fixed at start-up. The server sets every
//! field from its configuration file (`gateway/src/config.rs`: the `[router]` table, and the
//! slow-consumer limits of `[limits]`), which also checks the relations between them; the
//! defaults here are the server's defaults.

use std::sync::Arc;

use super::media::DownloadSigner;

/// Limits and sizes of one shard, fixed at start-up.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Largest message body accepted in `Send`, bytes.
    pub body_bytes_max: usize,
    /// Most entries in one log batch; a full open batch is submitted at once.
    pub batch_entries_max: usize,
    /// Most entries waiting in the open batch while the log pushes back (`Busy`); beyond it
    /// sends are refused with `OVERLOADED` (at least `batch_entries_max`).
    pub open_entries_max: usize,
    /// An open batch of at least this many bytes (as the log stores its entries) is submitted
    /// at once, like a full one (at most `open_bytes_max`).
    pub batch_bytes_max: usize,
    /// Most bytes waiting in the open batch while the log pushes back; beyond it sends are
    /// refused with `OVERLOADED`. One batch is one log record, so this is at most the record
    /// payload limit (`starling_storage::format::RECORD_PAYLOAD_BYTES_MAX`; larger values are
    /// clamped): large bodies fill a batch long before `open_entries_max` entries do.
    pub open_bytes_max: usize,
    /// A connection's backlog budget: bytes it may have queued (emitted, not yet reported
    /// written) before it is behind, i.e. pushes to it turn into `MessagesAvailable` hints,
    /// which it gets once its backlog is down to half of this (then pushes resume).
    pub conn_outbound_bytes_max: u64,
    /// A connection whose backlog stays over its budget this long (it reads too little) is
    /// closed with `SLOW_CONSUMER`; it syncs after reconnecting.
    pub slow_consumer_close_ms: u64,
    /// Most messages per conversation one `Sync` returns.
    pub sync_messages_max: usize,
    /// Most bytes of messages one `Sync` returns over all conversations (the rest is reported
    /// in `SyncDone.truncated`): a reply must fit the gateway's per-connection outbound limit.
    pub sync_bytes_max: usize,
    /// Most bytes of messages in one `HistoryPage` (it is one frame, so it must stay under the
    /// frame limit; a page always holds at least one message).
    pub page_bytes_max: usize,
    /// Messages of a `HistoryPage` whose `GetHistory.limit` is 0 (at most
    /// `history_limit_max`).
    pub history_limit_default: usize,
    /// Cap of `GetHistory.limit`.
    pub history_limit_max: usize,
    /// Conversations of a `ConversationList` page whose `ListConversations.limit` is 0 (at most
    /// `list_limit_max`).
    pub list_limit_default: usize,
    /// Cap of `ListConversations.limit`.
    pub list_limit_max: usize,
    /// Cursor updates are written (one durable batch) at most this long after they arrive.
    pub cursor_flush_ms: u64,
    /// ... or as soon as this many are waiting.
    pub cursor_flush_max: usize,
    /// A group with more members than this is fanned out on read: its members' online devices
    /// get a coalesced `MessagesAvailable` instead of each message (`read_fanout.rs`).
    pub group_push_members_max: usize,
    /// ... at most once per group per this interval.
    pub group_available_ms: u64,
    /// A group's senders get their aggregate receipts (`GroupReceipts`) at most once per this
    /// interval per group: the first durable cursor change schedules a push this long after.
    pub group_receipts_coalesce_ms: u64,
    /// Unread counts stop at this value.
    pub unread_count_max: usize,
    /// A sender may edit a message for this long after the server accepted it (`changes.rs`).
    pub edit_window_ms: u64,
    /// A sender may delete a message for everyone for this long after the server accepted it (a
    /// group admin may at any time).
    pub delete_window_ms: u64,
    /// Most users with a reaction on one message; a reaction from one more is refused with
    /// `FAILED_PRECONDITION`.
    pub reactions_max: usize,
    /// The server's retention (`storage.retention_secs`, in ms; 0: keep forever): an entry whose
    /// server timestamp is this long ago or longer is no longer served (`disappearing.rs`).
    pub retention_ms: u64,
    /// The server's retention after delivery (`storage.retention_after_delivery_secs`, in ms;
    /// `None`: none): an entry every member received this long ago or longer is no longer
    /// served. The conversation's owner records when its members received what
    /// (`ConvDelivered`, `cursors.rs`).
    pub retention_after_delivery_ms: Option<u64>,
    /// A conversation's state (members, seqs, cursors, caches) is dropped from memory once it
    /// has not been used for this long and nothing of it is in flight; it is loaded again from
    /// the index and the metadata on next use. Bounds the shard's memory by its active
    /// conversations instead of every conversation it ever served.
    pub conv_idle_evict_ms: u64,
    /// Most conversation states in memory; beyond it the least recently used ones that hold
    /// nothing in flight are dropped before their idle time is up (a long-idle one first, one
    /// used since it was queued gets a second chance). Bounds the shard's memory when more
    /// conversations are active within `conv_idle_evict_ms` than memory allows.
    pub conv_states_max: usize,
    /// Most users one user may block (at most `starling_storage::meta::SCAN_RECORDS_MAX`, so
    /// that one metadata scan counts them); a Block beyond it is refused with
    /// `PERMISSION_DENIED`.
    pub blocks_max: usize,
    /// Block/Unblock requests one user may make per second, sustained (a token bucket at the
    /// user's home shard; beyond it `RATE_LIMITED` with `retry_after_ms`).
    pub block_requests_per_s: u32,
    /// ... and at once (the bucket's size).
    pub block_requests_burst: u32,
    /// Most Sends one shard holds while the direct conversation they need is being created
    /// (each holds its body until then); beyond it `OVERLOADED` with `retry_after_ms`.
    pub parked_sends_max: usize,
    /// Most metadata writes (Block/Unblock, conversation creations) waiting for the shard's
    /// metadata writer; beyond it such requests are refused with `OVERLOADED`.
    pub meta_jobs_max: usize,
    /// Most members of a group; a CreateGroup or AddGroupMembers that would exceed it is
    /// refused with `PERMISSION_DENIED` naming it.
    pub group_members_max: usize,
    /// Most users one group request names (CreateGroup's members, AddGroupMembers,
    /// RemoveGroupMembers); more is `INVALID_ARGUMENT`.
    pub group_request_users_max: usize,
    /// Most members one `GroupInfo` lists, and most recipients one `ReceiptDetail` page
    /// covers (`GetGroupInfo.members_limit`, `GetReceipts.limit`: 0 or more means this); the
    /// gateway bounds it so that a page fits in a frame.
    pub group_info_members_page: usize,
    /// Most requests waiting for one group's change in progress (changes to a group are
    /// carried out one at a time); beyond it `OVERLOADED` with `retry_after_ms`.
    pub group_changes_queued_max: usize,
    /// Most users one connection may follow with `SubscribePresence` (`[limits]`); a request
    /// beyond it is refused with `INVALID_ARGUMENT`.
    pub presence_subscriptions_max: usize,
    /// A connection gets at most one `PresenceUpdate` per followed user per this interval (the
    /// latest state); updates wait at most this long.
    pub presence_coalesce_ms: u64,
    /// `Typing` frames one connection may send per second, sustained (`[limits]`; beyond it
    /// they are dropped, or refused with `RATE_LIMITED` when they carry a request id).
    pub typing_per_s: u32,
    /// ... and at once (the bucket's size).
    pub typing_burst: u32,
    /// A `TYPING` not repeated within this long becomes a `STOPPED` pushed by the server.
    pub typing_expiry_ms: u64,
    /// Signs download grants for `RequestDownload` (`None`: the server offers no media, and
    /// `RequestDownload` is refused with `NOT_SUPPORTED`).
    pub media: Option<Arc<dyn DownloadSigner>>,
}

impl ShardConfig {
    /// The server's retention as one policy.
    #[must_use]
    pub fn retention(&self) -> super::disappearing::Retention {
        super::disappearing::Retention {
            after_ts_ms: self.retention_ms,
            after_delivery_ms: self.retention_after_delivery_ms,
        }
    }
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            body_bytes_max: starling_protocol::limits::BODY_BYTES_MAX_DEFAULT as usize,
            batch_entries_max: 512,
            open_entries_max: 8192,
            batch_bytes_max: 1024 * 1024,
            open_bytes_max: 8 * 1024 * 1024,
            conn_outbound_bytes_max: 256 * 1024,
            slow_consumer_close_ms: 30_000,
            sync_messages_max: 500,
            sync_bytes_max: 256 * 1024,
            page_bytes_max: 48 * 1024,
            history_limit_default: 50,
            history_limit_max: 200,
            list_limit_default: 50,
            list_limit_max: 200,
            cursor_flush_ms: 20,
            cursor_flush_max: 1024,
            group_receipts_coalesce_ms: 250,
            group_push_members_max: 1024,
            group_available_ms: 100,
            unread_count_max: 999,
            edit_window_ms: 15 * 60 * 1000,
            delete_window_ms: 48 * 3600 * 1000,
            reactions_max: 256,
            retention_ms: 0,
            retention_after_delivery_ms: None,
            conv_idle_evict_ms: 10 * 60 * 1000,
            conv_states_max: 65_536,
            blocks_max: 10_000,
            block_requests_per_s: 10,
            block_requests_burst: 20,
            parked_sends_max: 1024,
            meta_jobs_max: 4096,
            group_members_max: 1024,
            group_request_users_max: 256,
            group_info_members_page: 1024,
            group_changes_queued_max: 64,
            presence_subscriptions_max: 2000,
            presence_coalesce_ms: 200,
            typing_per_s: 3,
            typing_burst: 10,
            typing_expiry_ms: 6000,
            media: None,
        }
    }
}
