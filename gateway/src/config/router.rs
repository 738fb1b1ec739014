//! `[router]`: the messaging core's settings (`starling_router::ShardConfig`), their defaults
//! (the router's own), and the checks of their relations to each other and to `[limits]`.

use serde::Deserialize;

use super::{ConfigError, LimitsConfig};

/// The largest `router.group_members_max` accepted.
const GROUP_MEMBERS_MAX: usize = 1_000_000;

/// The messaging core, `starling_router::ShardConfig` (see `docs/design/messaging.md`): every
/// limit and size of a shard's router but the slow-consumer ones, which the protocol documents
/// with the connection limits (`limits.push_backlog_bytes_max`,
/// `limits.slow_consumer_close_ms`). [`super::Config::shard_config`] builds the router's
/// configuration from both; [`super::Config::validate`] checks each value and the relations
/// between them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Largest message body a `Send` may carry, in bytes (`BODY_TOO_LARGE` beyond; advertised
    /// in `Welcome.limits.body_bytes_max`). A Send must fit in a frame the server accepts:
    /// at most `limits.frame_bytes_max` - 1024.
    pub body_bytes_max: usize,
    /// Most messages in one batch for a shard's log (one record, one group commit); a full open
    /// batch goes to the log at once instead of at the end of the shard's turn.
    pub batch_entries_max: usize,
    /// An open batch of at least this many bytes (as the log stores its messages) goes to the
    /// log at once, like a full one. At most `open_bytes_max`.
    pub batch_bytes_max: usize,
    /// Most messages waiting in the open batch while the log pushes back; beyond it Sends are
    /// refused with `OVERLOADED`. At least `batch_entries_max`.
    pub open_entries_max: usize,
    /// Most bytes waiting in the open batch while the log pushes back; beyond it Sends are
    /// refused with `OVERLOADED`. A batch is one log record: at most 16777216 (16 MiB), and
    /// room for at least one maximal message (`body_bytes_max` + 1024).
    pub open_bytes_max: usize,
    /// Most messages per conversation one `Sync` returns (the rest is reported in
    /// `SyncDone.truncated`; advertised in `Welcome.limits.sync_messages_max`).
    pub sync_messages_max: usize,
    /// Most bytes of messages one `Sync` returns over all conversations (the rest is reported
    /// in `SyncDone.truncated`). The answer must fit the connection's outbound buffer: at most
    /// `limits.outbound_bytes_max`.
    pub sync_bytes_max: usize,
    /// Most bytes of messages in one `HistoryPage`, which is one frame (a page always holds at
    /// least one message). At most 64512, so that a page fits the frame limit of a client that
    /// negotiated none (65536).
    pub page_bytes_max: usize,
    /// Messages in a `HistoryPage` when `GetHistory.limit` is 0. At most `history_limit_max`.
    pub history_limit_default: usize,
    /// Most messages in a `HistoryPage` (a larger `GetHistory.limit` is cut to it).
    pub history_limit_max: usize,
    /// Conversations in a `ConversationList` page when `ListConversations.limit` is 0. At most
    /// `list_limit_max`.
    pub list_limit_default: usize,
    /// Most conversations in a `ConversationList` page.
    pub list_limit_max: usize,
    /// A changed delivery or read cursor is written (one durable batch for the shard) at most
    /// this long after it arrives; its receipt and its `Done` wait for the write.
    pub cursor_flush_ms: u64,
    /// ... or as soon as this many changed cursors wait.
    pub cursor_flush_max: usize,
    /// A group with more members than this is fanned out on read: instead of each message, its
    /// members' online devices get a `MessagesAvailable` and pull with Sync (at least 2).
    pub group_push_members_max: usize,
    /// ... at most once per group per this interval (1 to 10000).
    pub group_available_ms: u64,
    /// In a group, a sender gets the aggregate delivered/read counts of its recent messages
    /// (`GroupReceipts`) at most once per this interval per group (1 to 60000).
    pub group_receipts_coalesce_ms: u64,
    /// Unread counts in `ConversationList` stop at this value.
    pub unread_count_max: usize,
    /// A sender may edit a message for this long after the server accepted it (ms, at least 1).
    pub edit_window_ms: u64,
    /// A sender may delete a message for everyone for this long after the server accepted it
    /// (ms, at least 1); a group admin may at any time.
    pub delete_window_ms: u64,
    /// Most users with a reaction on one message (1 to 10000).
    pub reactions_max: usize,
    /// A conversation's state leaves memory after this long unused (it is loaded again from the
    /// index and the metadata on next use).
    pub conv_idle_evict_ms: u64,
    /// Most conversation states a shard keeps in memory (at least 100); beyond it the least
    /// recently used ones with nothing in flight are dropped before their idle time is up.
    pub conv_states_max: usize,
    /// Most users one user may block; a Block beyond it is refused with `PERMISSION_DENIED`
    /// (at most 10000: one metadata scan counts a user's blocks).
    pub blocks_max: usize,
    /// Block/Unblock requests one user may make per second, sustained; beyond it
    /// `RATE_LIMITED` with `retry_after_ms`. Counted per user over all their devices.
    pub block_requests_per_s: u32,
    /// ... and at once (a token bucket of this size).
    pub block_requests_burst: u32,
    /// Most Sends one shard holds while the direct conversation they start is being created
    /// (each with its body); beyond it `OVERLOADED` with `retry_after_ms`.
    pub parked_sends_max: usize,
    /// Most metadata writes (Block/Unblock, the creation of a direct conversation) waiting for a
    /// shard's metadata writer; beyond it such requests are refused with `OVERLOADED`.
    pub meta_jobs_max: usize,
    /// Most members of a group; a CreateGroup or AddGroupMembers that would exceed it is
    /// refused with `PERMISSION_DENIED` naming it. Between 2 and 1,000,000 (a group's members
    /// are held in memory at its owner shard, ~100 bytes each). Above
    /// `group_push_members_max`, messages fan out on read.
    pub group_members_max: usize,
    /// Most members one `GroupInfo` lists (a page: `GetGroupInfo.members_after_user_id`), and
    /// most recipients one `ReceiptDetail` page covers. A page is one frame, so at most
    /// `(limits.frame_bytes_max - 1024) / 24`.
    pub group_info_members_page: usize,
    /// Most users one group request names (CreateGroup's members, AddGroupMembers,
    /// RemoveGroupMembers); more is `INVALID_ARGUMENT`. An event naming them is one frame, so
    /// at most `(limits.frame_bytes_max - 1024) / 11`, and at most `group_members_max`.
    pub group_request_users_max: usize,
    /// Most requests waiting for one group's change in progress (a group's changes are carried
    /// out one at a time); beyond it `OVERLOADED` with `retry_after_ms`.
    pub group_changes_queued_max: usize,
    /// A connection gets at most one `PresenceUpdate` per followed user per this interval (the
    /// latest state); an update waits at most this long. Between 1 and 10000.
    pub presence_coalesce_ms: u64,
    /// A `TYPING` not repeated within this long becomes a `STOPPED` the server pushes. Between
    /// 1000 and 60000.
    pub typing_expiry_ms: u64,
}

impl Default for RouterConfig {
    /// The router's own defaults.
    fn default() -> Self {
        let d = starling_router::ShardConfig::default();
        Self {
            body_bytes_max: d.body_bytes_max,
            batch_entries_max: d.batch_entries_max,
            batch_bytes_max: d.batch_bytes_max,
            open_entries_max: d.open_entries_max,
            open_bytes_max: d.open_bytes_max,
            sync_messages_max: d.sync_messages_max,
            sync_bytes_max: d.sync_bytes_max,
            page_bytes_max: d.page_bytes_max,
            history_limit_default: d.history_limit_default,
            history_limit_max: d.history_limit_max,
            list_limit_default: d.list_limit_default,
            list_limit_max: d.list_limit_max,
            cursor_flush_ms: d.cursor_flush_ms,
            cursor_flush_max: d.cursor_flush_max,
            group_receipts_coalesce_ms: d.group_receipts_coalesce_ms,
            group_push_members_max: d.group_push_members_max,
            group_available_ms: d.group_available_ms,
            unread_count_max: d.unread_count_max,
            edit_window_ms: d.edit_window_ms,
            delete_window_ms: d.delete_window_ms,
            reactions_max: d.reactions_max,
            conv_idle_evict_ms: d.conv_idle_evict_ms,
            conv_states_max: d.conv_states_max,
            blocks_max: d.blocks_max,
            block_requests_per_s: d.block_requests_per_s,
            block_requests_burst: d.block_requests_burst,
            parked_sends_max: d.parked_sends_max,
            meta_jobs_max: d.meta_jobs_max,
            group_members_max: d.group_members_max,
            group_request_users_max: d.group_request_users_max,
            group_info_members_page: d.group_info_members_page,
            group_changes_queued_max: d.group_changes_queued_max,
            presence_coalesce_ms: d.presence_coalesce_ms,
            typing_expiry_ms: d.typing_expiry_ms,
        }
    }
}

impl RouterConfig {
    /// The router's configuration: these settings, with the slow-consumer limits of `limits`
    /// (see [`Config::shard_config`](super::Config::shard_config)).
    #[must_use]
    pub fn shard_config(&self, limits: &LimitsConfig) -> starling_router::ShardConfig {
        let (r, l) = (self, limits);
        starling_router::ShardConfig {
            body_bytes_max: r.body_bytes_max,
            batch_entries_max: r.batch_entries_max,
            open_entries_max: r.open_entries_max,
            batch_bytes_max: r.batch_bytes_max,
            open_bytes_max: r.open_bytes_max,
            conn_outbound_bytes_max: l.push_backlog_bytes_max,
            slow_consumer_close_ms: l.slow_consumer_close_ms,
            sync_messages_max: r.sync_messages_max,
            sync_bytes_max: r.sync_bytes_max,
            page_bytes_max: r.page_bytes_max,
            history_limit_default: r.history_limit_default,
            history_limit_max: r.history_limit_max,
            list_limit_default: r.list_limit_default,
            list_limit_max: r.list_limit_max,
            cursor_flush_ms: r.cursor_flush_ms,
            cursor_flush_max: r.cursor_flush_max,
            group_receipts_coalesce_ms: r.group_receipts_coalesce_ms,
            group_push_members_max: r.group_push_members_max,
            group_available_ms: r.group_available_ms,
            unread_count_max: r.unread_count_max,
            edit_window_ms: r.edit_window_ms,
            delete_window_ms: r.delete_window_ms,
            reactions_max: r.reactions_max,
            // `storage.retention_secs` and `retention_after_delivery_secs`: set by
            // `Config::shard_config`.
            retention_ms: 0,
            retention_after_delivery_ms: None,
            conv_idle_evict_ms: r.conv_idle_evict_ms,
            conv_states_max: r.conv_states_max,
            blocks_max: r.blocks_max,
            block_requests_per_s: r.block_requests_per_s,
            block_requests_burst: r.block_requests_burst,
            parked_sends_max: r.parked_sends_max,
            meta_jobs_max: r.meta_jobs_max,
            group_members_max: r.group_members_max,
            group_request_users_max: r.group_request_users_max,
            group_info_members_page: r.group_info_members_page,
            group_changes_queued_max: r.group_changes_queued_max,
            presence_subscriptions_max: l.presence_subscriptions_max,
            presence_coalesce_ms: r.presence_coalesce_ms,
            typing_per_s: l.typing_per_s,
            typing_burst: l.typing_burst,
            typing_expiry_ms: r.typing_expiry_ms,
            // The media endpoint's signer, set by the server once the endpoint runs.
            media: None,
        }
    }

    /// Checks each value, and its relations to the others and to `limits`.
    pub(super) fn validate(&self, limits: &LimitsConfig) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        let (r, l) = (self, limits);
        for (key, v) in [
            ("router.body_bytes_max", r.body_bytes_max),
            ("router.batch_entries_max", r.batch_entries_max),
            ("router.batch_bytes_max", r.batch_bytes_max),
            ("router.sync_messages_max", r.sync_messages_max),
            ("router.sync_bytes_max", r.sync_bytes_max),
            ("router.page_bytes_max", r.page_bytes_max),
            ("router.history_limit_default", r.history_limit_default),
            ("router.list_limit_default", r.list_limit_default),
            ("router.cursor_flush_max", r.cursor_flush_max),
            ("router.unread_count_max", r.unread_count_max),
            ("router.edit_window_ms", r.edit_window_ms as usize),
            ("router.delete_window_ms", r.delete_window_ms as usize),
            ("router.meta_jobs_max", r.meta_jobs_max),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if r.body_bytes_max + 1024 > l.frame_bytes_max as usize {
            return bad(
                "router.body_bytes_max",
                "a Send carrying it must fit in a frame: at most limits.frame_bytes_max - 1024",
            );
        }
        if r.open_entries_max < r.batch_entries_max {
            return bad(
                "router.open_entries_max",
                "must be at least router.batch_entries_max",
            );
        }
        if r.batch_bytes_max > r.open_bytes_max {
            return bad(
                "router.batch_bytes_max",
                "must be at most router.open_bytes_max",
            );
        }
        if r.open_bytes_max > starling_storage::format::RECORD_PAYLOAD_BYTES_MAX {
            return bad(
                "router.open_bytes_max",
                "at most 16777216 (a batch is one log record)",
            );
        }
        if r.open_bytes_max < r.body_bytes_max + 1024 {
            return bad(
                "router.open_bytes_max",
                "must hold one maximal message: at least router.body_bytes_max + 1024",
            );
        }
        if r.sync_bytes_max > l.outbound_bytes_max {
            return bad(
                "router.sync_bytes_max",
                "must be at most limits.outbound_bytes_max (a Sync's answer must fit the \
                 connection's outbound buffer)",
            );
        }
        if r.page_bytes_max > starling_protocol::limits::FRAME_BYTES_MAX_DEFAULT as usize - 1024 {
            return bad(
                "router.page_bytes_max",
                "at most 64512 (a page is one frame; a client that negotiates no frame limit \
                 takes 65536 bytes)",
            );
        }
        if r.history_limit_default > r.history_limit_max {
            return bad(
                "router.history_limit_default",
                "must be at most router.history_limit_max",
            );
        }
        if r.list_limit_default > r.list_limit_max {
            return bad(
                "router.list_limit_default",
                "must be at most router.list_limit_max",
            );
        }
        if r.reactions_max == 0 || r.reactions_max > 10_000 {
            return bad("router.reactions_max", "must be between 1 and 10000");
        }
        if r.group_push_members_max < 2 {
            return bad("router.group_push_members_max", "must be at least 2");
        }
        if r.group_available_ms == 0 || r.group_available_ms > 10_000 {
            return bad("router.group_available_ms", "must be between 1 and 10000");
        }
        if r.group_receipts_coalesce_ms == 0 || r.group_receipts_coalesce_ms > 60_000 {
            return bad(
                "router.group_receipts_coalesce_ms",
                "must be between 1 and 60000",
            );
        }
        if r.cursor_flush_ms == 0 || r.cursor_flush_ms > 10_000 {
            return bad(
                "router.cursor_flush_ms",
                "must be between 1 and 10000 (a cursor's Done waits this long)",
            );
        }
        if r.blocks_max == 0 || r.blocks_max > starling_storage::meta::SCAN_RECORDS_MAX {
            return bad(
                "router.blocks_max",
                "must be between 1 and 10000 (one metadata scan counts a user's blocks)",
            );
        }
        if r.block_requests_per_s == 0 || r.block_requests_burst == 0 {
            return bad(
                "router.block_requests_per_s",
                "block_requests_per_s and block_requests_burst must be at least 1",
            );
        }
        if r.parked_sends_max == 0 || r.parked_sends_max > 1 << 20 {
            return bad("router.parked_sends_max", "must be between 1 and 1048576");
        }
        if r.meta_jobs_max > 1 << 20 {
            return bad("router.meta_jobs_max", "must be between 1 and 1048576");
        }
        if r.presence_coalesce_ms == 0 || r.presence_coalesce_ms > 10_000 {
            return bad("router.presence_coalesce_ms", "must be between 1 and 10000");
        }
        if !(1000..=60_000).contains(&r.typing_expiry_ms) {
            return bad("router.typing_expiry_ms", "must be between 1000 and 60000");
        }
        if r.conv_states_max < 100 {
            return bad("router.conv_states_max", "must be at least 100");
        }
        if r.conv_idle_evict_ms < 10 {
            return bad("router.conv_idle_evict_ms", "must be at least 10");
        }
        let frame = (l.frame_bytes_max as usize).saturating_sub(1024);
        if !(2..=GROUP_MEMBERS_MAX).contains(&r.group_members_max) {
            return bad(
                "router.group_members_max",
                "must be between 2 and 1000000 (a group's members are held in memory)",
            );
        }
        if r.group_info_members_page == 0 || r.group_info_members_page > frame / 24 {
            return bad(
                "router.group_info_members_page",
                "must be at least 1 and at most (limits.frame_bytes_max - 1024) / 24: a page \
                 of GroupInfo members is one frame",
            );
        }
        if r.group_request_users_max == 0
            || r.group_request_users_max > r.group_members_max
            || r.group_request_users_max > frame / 11
        {
            return bad(
                "router.group_request_users_max",
                "must be at least 1, at most group_members_max and at most \
                 (limits.frame_bytes_max - 1024) / 11: an event naming them is one frame",
            );
        }
        if r.group_changes_queued_max == 0 || r.group_changes_queued_max > 1 << 16 {
            return bad(
                "router.group_changes_queued_max",
                "must be between 1 and 65536",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn router_defaults_are_the_routers_own() {
        // Every field, the slow-consumer limits of `[limits]` included.
        assert_eq!(
            format!("{:?}", Config::default().shard_config()),
            format!("{:?}", starling_router::ShardConfig::default())
        );
    }

    #[test]
    fn every_router_setting_reaches_the_router() {
        let c = Config::from_toml(
            "[limits]\npush_backlog_bytes_max = 131072\nslow_consumer_close_ms = 9000\n\
             [router]\nbody_bytes_max = 1000\nbatch_entries_max = 64\nbatch_bytes_max = 65536\n\
             open_entries_max = 128\nopen_bytes_max = 131072\nsync_messages_max = 7\n\
             sync_bytes_max = 4096\npage_bytes_max = 2048\nhistory_limit_default = 5\n\
             history_limit_max = 6\nlist_limit_default = 8\nlist_limit_max = 9\n\
             cursor_flush_ms = 11\ncursor_flush_max = 12\nunread_count_max = 13\n\
             conv_idle_evict_ms = 500\nblocks_max = 3\nblock_requests_per_s = 2\n\
             block_requests_burst = 4\nparked_sends_max = 16\nmeta_jobs_max = 17\n\
             group_members_max = 19\ngroup_request_users_max = 18\n\
             group_changes_queued_max = 20\ngroup_info_members_page = 21\n\
             edit_window_ms = 22\ndelete_window_ms = 23\nreactions_max = 24\n",
        )
        .unwrap();
        c.validate().unwrap();
        let s = c.shard_config();
        assert_eq!(
            (s.conn_outbound_bytes_max, s.slow_consumer_close_ms),
            (131_072, 9000)
        );
        assert_eq!(
            (
                s.body_bytes_max,
                s.batch_entries_max,
                s.batch_bytes_max,
                s.open_entries_max,
                s.open_bytes_max
            ),
            (1000, 64, 65_536, 128, 131_072)
        );
        assert_eq!(
            (s.sync_messages_max, s.sync_bytes_max, s.page_bytes_max),
            (7, 4096, 2048)
        );
        assert_eq!(
            (
                s.history_limit_default,
                s.history_limit_max,
                s.list_limit_default,
                s.list_limit_max
            ),
            (5, 6, 8, 9)
        );
        assert_eq!(
            (
                s.cursor_flush_ms,
                s.cursor_flush_max,
                s.unread_count_max,
                s.conv_idle_evict_ms
            ),
            (11, 12, 13, 500)
        );
        assert_eq!(
            (
                s.blocks_max,
                s.block_requests_per_s,
                s.block_requests_burst,
                s.parked_sends_max,
                s.meta_jobs_max
            ),
            (3, 2, 4, 16, 17)
        );
        assert_eq!(
            (
                s.group_members_max,
                s.group_request_users_max,
                s.group_changes_queued_max,
                s.group_info_members_page
            ),
            (19, 18, 20, 21)
        );
        assert_eq!(
            (s.edit_window_ms, s.delete_window_ms, s.reactions_max),
            (22, 23, 24)
        );
        for bad in [
            "group_members_max = 1",
            "group_members_max = 1000001",
            "group_info_members_page = 0",
            "group_info_members_page = 2689",
            "group_request_users_max = 0",
            "group_members_max = 10\ngroup_request_users_max = 11",
            "group_changes_queued_max = 0",
        ] {
            let c = Config::from_toml(&format!("[router]\n{bad}\n")).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(Config::from_toml("[router]\nblock_max = 3\n").is_err());
    }

    #[test]
    fn router_settings_and_their_relations_are_checked() {
        for (toml, key) in [
            ("[router]\nblocks_max = 0\n", "router.blocks_max"),
            ("[router]\nblocks_max = 10001\n", "router.blocks_max"),
            (
                "[router]\nblock_requests_per_s = 0\n",
                "router.block_requests_per_s",
            ),
            (
                "[router]\nblock_requests_burst = 0\n",
                "router.block_requests_per_s",
            ),
            (
                "[router]\nparked_sends_max = 0\n",
                "router.parked_sends_max",
            ),
            ("[router]\nmeta_jobs_max = 0\n", "router.meta_jobs_max"),
            (
                "[router]\nconv_idle_evict_ms = 1\n",
                "router.conv_idle_evict_ms",
            ),
            ("[router]\ncursor_flush_ms = 0\n", "router.cursor_flush_ms"),
            (
                "[router]\ngroup_push_members_max = 1\n",
                "router.group_push_members_max",
            ),
            (
                "[router]\ngroup_available_ms = 0\n",
                "router.group_available_ms",
            ),
            (
                "[router]\ngroup_receipts_coalesce_ms = 0\n",
                "router.group_receipts_coalesce_ms",
            ),
            (
                "[router]\nunread_count_max = 0\n",
                "router.unread_count_max",
            ),
            ("[router]\nedit_window_ms = 0\n", "router.edit_window_ms"),
            (
                "[router]\ndelete_window_ms = 0\n",
                "router.delete_window_ms",
            ),
            ("[router]\nreactions_max = 0\n", "router.reactions_max"),
            ("[router]\nreactions_max = 10001\n", "router.reactions_max"),
            (
                "[router]\nbody_bytes_max = 65000\n",
                "router.body_bytes_max",
            ),
            (
                "[limits]\nframe_bytes_max = 4096\n[router]\nbody_bytes_max = 3584\n",
                "router.body_bytes_max",
            ),
            (
                "[router]\nbatch_bytes_max = 2097152\nopen_bytes_max = 1048576\n",
                "router.batch_bytes_max",
            ),
            (
                "[router]\nopen_bytes_max = 16777217\n",
                "router.open_bytes_max",
            ),
            (
                "[router]\nbatch_bytes_max = 4096\nopen_bytes_max = 8192\n",
                "router.open_bytes_max",
            ),
            (
                "[router]\nopen_entries_max = 100\n",
                "router.open_entries_max",
            ),
            (
                "[router]\nsync_bytes_max = 2000000\n",
                "router.sync_bytes_max",
            ),
            (
                "[router]\npage_bytes_max = 65000\n",
                "router.page_bytes_max",
            ),
            (
                "[router]\nhistory_limit_default = 201\n",
                "router.history_limit_default",
            ),
            (
                "[router]\nlist_limit_max = 10\n",
                "router.list_limit_default",
            ),
            (
                "[router]\nsync_messages_max = 0\n",
                "router.sync_messages_max",
            ),
        ] {
            let e = Config::from_toml(toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        // The bounds themselves are fine.
        Config::from_toml(
            "[limits]\nframe_bytes_max = 4096\n[router]\nbody_bytes_max = 3072\n\
             batch_bytes_max = 1048576\nopen_bytes_max = 1048576\nopen_entries_max = 512\n\
             sync_bytes_max = 1048576\npage_bytes_max = 64512\nhistory_limit_default = 200\n\
             group_info_members_page = 128\ngroup_request_users_max = 128\n",
        )
        .unwrap()
        .validate()
        .unwrap();
    }
}
