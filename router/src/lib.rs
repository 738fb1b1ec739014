//! # starling-router
//!
//! **Owns:** the per-core queues between shards ([`ring`], [`grid`](mod@grid)), the
//! session directory (each shard's slice: its own connections, user → device
//! → connection), the sequencer tier (conversations partitioned over shards
//! by hash, a contiguous `seq` per conversation, `client_msg_id` dedup that
//! survives restarts, batching into the shard's durable log, `SendAck` only
//! once the batch is durable), fan-out, receipts and cursors, sync, history,
//! the conversation list and blocking — and later presence, typing, groups and
//! accounts.
//!
//! **Is not:** I/O. It never touches a socket, a file descriptor or the wall
//! clock; the gateway feeds it decoded frames and `now_ms`, and storage is
//! reached only through the `starling-storage` traits (`DurableLog`,
//! `MessageIndex`, `MetadataStore`, `CursorStore`), so the embedded backend and
//! the simulator's faulty in-memory disk plug in alike.
//!
//! **Must not touch:** sockets, TLS, the runtime (`compio`), frame bytes,
//! eventfds (the gateway owns the doorbells behind [`ring::Doorbell`]).
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
//! | [`RouterShard::handle_frame`] | a decoded client frame the router [`handles`](RouterShard::handles) (Send, DeliveryAck, ReadCursor, Sync, GetHistory, ListConversations, Block, Unblock) |
//! | [`RouterShard::handle_conn_flushed`] | the gateway wrote that many bytes of the connection's frames to its socket |
//! | [`RouterShard::handle_rings`] | the shard's bell/doorbell rang (other shards published) |
//! | [`RouterShard::handle_log_progress`] | the log's wake callback fired (a group commit finished or failed) |
//! | [`RouterShard::handle_tick`] | at [`RouterShard::poll_timeout`] (cursor flushes, hints, slow-consumer closes) |
//!
//! Outputs (`#[must_use] poll_*`; each first calls [`RouterShard::flush`],
//! which submits the open batch to the log and pushes queued items into the
//! rings, so a burst of inputs becomes one log batch and one ring publish):
//! [`RouterShard::poll_transmit`] (a frame for one of this shard's
//! connections, encoded once by the router as it goes on the wire, with its
//! `request_id` and kind; a `Deliver` for several devices shares one buffer;
//! the gateway checks the peer's frame limit), [`RouterShard::poll_close`] (close a
//! connection, e.g. `SLOW_CONSUMER`), [`RouterShard::poll_timeout`] (when to
//! tick). Messages to other shards go straight into the rings the shard owns;
//! [`RouterShard::is_backpressured`] says a ring is full (stop reading
//! sockets). [`RouterShard::failure`] says the log failed: restart the shard.
//!
//! ## How the gateway drives it
//!
//! One thread per shard: loop { `bell.begin_drain()`; read sockets →
//! `handle_frame`; `handle_rings`; if the log's eventfd fired →
//! `handle_log_progress`; timers → `handle_tick`; drain `poll_transmit` into
//! the sockets (report writes with `handle_conn_flushed`) and `poll_close`;
//! `bell.try_park()` then wait on sockets + doorbell eventfd + log eventfd +
//! `poll_timeout` }. Build the grid once with [`grid()`] and one [`ring::Bell`]
//! per shard whose [`ring::Doorbell`] writes that shard's eventfd; set the
//! log's `LogOptions::wake` to write the same (or another) eventfd.
//! Every metadata write (cursor batches, Block/Unblock, the first message
//! between two users creating their conversation) is a job for the shard's
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
pub mod ids;
#[cfg(not(loom))]
mod limits;
#[cfg(not(loom))]
mod metawriter;
#[cfg(not(loom))]
mod shard;

#[cfg(not(loom))]
pub use grid::{ShardLinks, grid};
#[cfg(not(loom))]
pub use metawriter::Offload;
#[cfg(not(loom))]
pub use shard::{
    CloseRequest, ConnId, ConnRef, RouterShard, ShardConfig, ShardMsg, ShardStats, Transmit,
};
