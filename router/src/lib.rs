//! # starling-router
//!
//! **Owns:** the per-core queues between shards ([`ring`], [`grid`](mod@grid)), the
//! session directory (each shard's slice: its own connections, user → device
//! → connection), the sequencer tier (conversations partitioned over shards
//! by hash, a contiguous `seq` per conversation, `client_msg_id` dedup that
//! survives restarts, batching into the shard's durable log, `SendAck` only
//! once the batch is durable), fan-out, receipts and cursors, sync, history,
//! the conversation list, blocking, groups (their requests, and their
//! changes sequenced as events of the group's conversation), presence (each
//! user's at their home shard) and typing, and the rule of whose presence and
//! profile a user may see ([`visibility`]). The account logic (in the gateway,
//! `starling-gateway`'s `accounts`) is not here.
//!
//! **Is not:** I/O. It never touches a socket, a file descriptor or the wall
//! clock; the gateway feeds it decoded frames and `now_ms`, and storage is
//! reached only through the `starling-storage` traits (`DurableLog`,
//! `MessageIndex`, `MetadataStore`, `CursorStore`), so the embedded backend and
//! the simulator's faulty in-memory disk plug in alike.
//!
//! **Must not touch:** sockets, TLS, the runtime (`compio`), eventfds (the
//! gateway owns the doorbells behind [`ring::Doorbell`]), or transport bytes:
//! it never reads a socket's bytes or decodes frames from them. It does encode
//! its own outbound frames, once each, as they go on the wire ([`Transmit`]),
//! so that one `Deliver` buffer serves every device it goes to and a
//! connection's outbound budget is charged exactly what the gateway writes.
//!
//! ## Where things live
//!
//! The shard is split by concern, as quinn-proto splits its connection: `shard.rs` is
//! [`RouterShard`]'s sans-IO surface (`handle_*`, `poll_*`, `flush`, the dispatch of the
//! messages between shards to the concern that owns them), and each concern has its own module
//! under `shard/` with its own state and unit tests. A request that crosses shards has one file
//! for its whole path (ingress shard → owner shard → gather at the ingress).
//!
//! | module | owns |
//! |---|---|
//! | [`ring`], [`grid`](mod@grid), `sync` | the SPSC rings between shards and their wake-ups; the atomics facade (std's or loom's) |
//! | [`ids`] | conversation ids ([`ids::ConvId`]), connection ids, which shard owns a conversation or a user |
//! | `hash` | the router's hash maps (foldhash) |
//! | `limits` | token buckets per user (Block/Unblock) or per connection (Typing) |
//! | [`visibility`] | whose presence and profile a user may see: self, shared conversations, contacts |
//! | `metawriter` | the shard's metadata writer: every metadata write as a job, outcomes in order |
//! | `shard/reader.rs`, `shard/reads.rs` | storage reads as jobs with completions (in any order), and the gate every message passes: handled now, or parked until its reads complete (`docs/design/reads.md`) |
//! | `shard/config.rs` | [`ShardConfig`] and its defaults |
//! | `shard/shared.rs` | what the concerns share (configuration, clock, storage, conversations, connections, mail, metadata writer, [`ShardStats`]) |
//! | `shard/mail.rs` | [`ShardMsg`]: what crosses the rings, one variant per step of a path; sending, the outbox of full rings |
//! | `shard/convs.rs` | conversation state at its owner: membership, sequencing counters and durable tail, cursors; loading, eviction, reads over index + tail |
//! | `shard/directory.rs` | the session directory slice: this shard's connections and, per user, theirs |
//! | `shard/outbound.rs` | frames out to connections and each connection's push budget (behind, hints, slow-consumer close) |
//! | `shard/frames.rs`, `shard/envelope.rs` | [`Transmit`] and frame encoding, `Error` answers; the stored message envelope (version 2 carries a message's `MediaRef`) |
//! | `shard/media.rs` | a Send's `MediaRef` checks; `RequestDownload`: a grant (signed by the gateway's [`DownloadSigner`]) only for a reader of a message that names the object |
//! | `shard/changes.rs` | edits, deletes for everyone, reactions and a reply's target: the rules, the state committed before the change is sequenced, the state overlaid on what is served |
//! | `shard/disappearing.rs` | disappearing messages and retention: the timer change (committed, then sequenced), the expiry stamped on later messages, what is gone from what is served, and [`Retention`] (with [`keep_until`]), the policy of the storage's segment removal |
//! | `shard/send.rs` | a Send at the ingress shard: checks, direct resolution, on to the owner |
//! | `shard/direct.rs` | direct conversations by user pair: the cache, parking while one is created |
//! | `shard/sequencer.rs` | the shard's log: open batch, dedup, batches in flight, durable completion, failure answers |
//! | `shard/fanout.rs` | pushing durable messages and receipts to this shard's connections of the members |
//! | `shard/cursors.rs` | delivery and read cursors: ingress → owner → batched write → receipts; the delivery floor's steps for the retention after delivery |
//! | `shard/read_fanout.rs` | fan-out on read: large groups' messages announced by coalesced `MessagesAvailable` |
//! | `shard/group_receipts.rs` | a group's receipts aggregated for its senders (coalesced), `GetReceipts` |
//! | `shard/sync.rs` | Sync: ingress → owners → gather |
//! | `shard/history.rs` | GetHistory: ingress → owner |
//! | `shard/list.rs` | ListConversations: ingress → owners → gather (`shard/gather.rs` holds the gathering state of Sync and list) |
//! | `shard/blocks.rs` | Block/Unblock: ingress → home shard (rate limit, write) → owner; the owner's check of direct Sends |
//! | `shard/groups/` | the group requests: ingress → owner (one change per group at a time: commit with a pending-event marker, event sequenced, answer once durable, marker cleared; redo or settle on load) → answer; rules and visibility (`state.rs`), the event entry (`event.rs`) |
//! | `shard/presence.rs` | presence: connections' opens, closes and SetPresence → the user's home shard (state, followers, last seen and `hide_last_seen` written by the metadata writer) → the followers' shards (coalesced, held back before messages); SubscribePresence: ingress (visibility, limit) → homes → gather |
//! | `shard/typing.rs` | Typing: ingress (rate limit per connection) → the conversation's owner (membership, expiry into STOPPED) → every shard's connections of the other members (dropped when behind) |
//!
//! ## The API: one [`RouterShard`] per shard (sans-IO)
//!
//! Built with [`RouterShard::new`] from a [`ShardConfig`], the shard's
//! [`ShardLinks`] (its row and column of the [`grid`](mod@grid)), its log (recovered),
//! its index (an `Arc`, covering the log at open) and the node's metadata +
//! cursor store. Inputs (`handle_*`, each taking `now_ms`):
//!
//! | call | when |
//! |---|---|
//! | [`RouterShard::handle_conn_opened`] / [`RouterShard::handle_conn_closed`] | a connection authenticated as (user, device) opened / closed on this shard |
//! | [`RouterShard::handle_frame`] | a decoded client frame the router [`handles`](RouterShard::handles) (Send, DeliveryAck, ReadCursor, Sync, GetHistory, ListConversations, Block, Unblock, the seven group requests, SubscribePresence, UnsubscribePresence, SetPresence, Typing) |
//! | [`RouterShard::handle_conn_flushed`] | the gateway wrote that many bytes of the connection's frames to its socket |
//! | [`RouterShard::handle_rings`] | the shard's bell/doorbell rang (other shards published) |
//! | [`RouterShard::handle_log_progress`] | the log's wake callback fired (a group commit finished or failed) |
//! | [`RouterShard::handle_tick`] | at [`RouterShard::poll_timeout`] (cursor flushes, hints, slow-consumer closes, coalesced presence updates, typing expiry) |
//!
//! Outputs (`#[must_use] poll_*`; each first calls [`RouterShard::flush`],
//! which submits the open batch to the log and pushes queued items into the
//! rings, so a burst of inputs becomes one log batch and one ring publish):
//! [`RouterShard::poll_transmit`] (a frame for one of this shard's
//! connections, encoded once by the router as it goes on the wire, with its
//! `request_id` and kind; a `Deliver` for several devices shares one buffer;
//! the gateway checks the peer's frame limit), [`RouterShard::poll_close`] (close a
//! connection, e.g. `SLOW_CONSUMER`), [`RouterShard::poll_timeout`] (when to
//! tick), [`RouterShard::poll_notice`] (once [`RouterShard::enable_notices`] was called:
//! a content-free [`Notice`] of each entry its conversations made durable, for the gateway's
//! push notifier). Messages to other shards go straight into the rings the shard owns;
//! [`RouterShard::is_backpressured`] says a ring is full (stop reading
//! sockets). [`RouterShard::failure`] says the log failed: writes are refused, reads go on,
//! and [`RouterShard::storage_recovered`] takes the log and index reopened in place.
//!
//! ## How the gateway drives it
//!
//! One driver task per shard thread: loop { `bell.begin_drain()`;
//! `handle_rings`; `handle_log_progress`; `handle_tick` once `poll_timeout`
//! is due; move `poll_transmit` into the connections' output and act on
//! `poll_close`; `bell.try_park()`, then wait for the shard's eventfd, the
//! timeout or a kick from a connection task }. The shard's connection tasks
//! call `handle_frame` for the frames the router [`handles`](RouterShard::handles)
//! and report written bytes with `handle_conn_flushed`. Build the grid once
//! with [`grid()`] and one [`ring::Bell`] per shard whose [`ring::Doorbell`]
//! writes that shard's eventfd; the log's `LogOptions::wake` notifies the
//! same bell.
//! Every metadata write (cursor batches, Block/Unblock, the first message
//! between two users creating their conversation, group changes, a user's last
//! seen time and `hide_last_seen`) is a job for the shard's
//! metadata writer (`metawriter`): give [`RouterShard::set_meta_offload`] an
//! [`Offload`] that runs the jobs in order on another thread and notifies the
//! shard's bell after each; without one they run inline (the simulation).
//! Per-user limits live in `limits` (Block/Unblock's token bucket, at the
//! user's [`ids::home_shard`]).
//!
//! Design, invariants and budget: `docs/design/messaging.md`. Unsafe code is
//! denied except in [`ring`], whose one safety argument is written at its top
//! and model-checked with loom (`RUSTFLAGS="--cfg loom" cargo test -p
//! starling-router --lib --release loom_tests`; under loom only the rings are
//! built).
#![deny(unsafe_code)]

pub mod ring;
mod sync;

/// The property the `message_envelope` fuzz target in `fuzz/` checks. Not a stable API.
#[cfg(not(loom))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(not(loom))]
pub mod grid;
#[cfg(not(loom))]
mod hash;
#[cfg(not(loom))]
pub mod ids;
#[cfg(not(loom))]
mod limits;
#[cfg(not(loom))]
mod metawriter;
#[cfg(not(loom))]
mod shard;
#[cfg(not(loom))]
pub mod visibility;

#[cfg(not(loom))]
pub use grid::{ShardLinks, grid};
#[cfg(not(loom))]
pub use ids::{ConnId, ConnRef};
#[cfg(not(loom))]
pub use metawriter::Offload;
#[cfg(not(loom))]
pub use shard::{
    CloseRequest, DownloadSigner, MEDIA_TEXT_BYTES_MAX, Notice, Retention, RouterShard,
    STORAGE_NOT_STORED, STORAGE_OUTCOME_UNKNOWN, STORAGE_SHARD_FAILED, ShardConfig, ShardMsg,
    ShardStats, THUMBNAIL_BYTES_MAX, Transmit, is_media_id, keep_until,
};
