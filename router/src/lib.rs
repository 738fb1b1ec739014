//! # starling-router
//!
//! **Owns:** the per-core queues between shards, the session directory
//! (user → devices → shard/connection), the sequencer tier (per-conversation
//! `seq`, `client_msg_id` dedup, batching into the shard's durable log),
//! fan-out, receipts and cursors, sync, presence and typing, groups and the
//! account logic (OTP, sessions, devices, contact discovery).
//!
//! **Is not:** I/O. It never touches a socket, a file descriptor or the wall
//! clock; the gateway feeds it decoded frames and `now`, and the storage
//! crate is reached only through its traits.
//!
//! **Must not touch:** sockets, TLS, the runtime (`compio`), frame bytes.
#![forbid(unsafe_code)]
