//! # starling-gateway
//!
//! **Owns:** the `starling` server binary's I/O: one pinned single-threaded
//! runtime per core, listeners (SO_REUSEPORT), TLS termination, the
//! connection lifecycle (deadlines, heartbeats on a per-shard timer wheel,
//! idle timeouts), write coalescing and backpressure, the metrics endpoint
//! and configuration.
//!
//! **Is not:** chat state. Who is in which group, which `seq` a conversation
//! is at, who may read what: all of that is the router's.
//!
//! **Must not touch:** conversation state or storage directly; frames are
//! decoded by `starling-protocol` and handed to `starling-router`.
