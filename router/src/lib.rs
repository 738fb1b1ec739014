//! # starling-router
//!
//! **Owns:** the per-core queues between shards ([`ring`]), the session
//! directory (user → devices → shard/connection), the sequencer tier
//! (per-conversation `seq`, `client_msg_id` dedup, batching into the shard's
//! durable log), fan-out, receipts and cursors, sync, presence and typing,
//! groups and the account logic.
//!
//! **Is not:** I/O. It never touches a socket, a file descriptor or the wall
//! clock; the gateway feeds it decoded frames and `now`, and the storage
//! crate is reached only through its traits.
//!
//! **Must not touch:** sockets, TLS, the runtime (`compio`), frame bytes.
//!
//! Unsafe code is denied except in [`ring`], whose one safety argument is
//! written at its top and model-checked with loom
//! (`RUSTFLAGS="--cfg loom" cargo test -p starling-router --lib --release ring`).
#![deny(unsafe_code)]

pub mod ring;
mod sync;

#[cfg(not(loom))]
pub mod grid;
#[cfg(not(loom))]
pub mod ids;
#[cfg(not(loom))]
mod shard;

#[cfg(not(loom))]
pub use grid::{ShardLinks, grid};
#[cfg(not(loom))]
pub use shard::{
    CloseRequest, ConnId, ConnRef, RouterShard, ShardConfig, ShardMsg, ShardStats, Transmit,
};
