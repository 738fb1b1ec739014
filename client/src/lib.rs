//! # starling-client
//!
//! **Owns:** the Rust SDK: connect (TLS with a CA file or a pinned
//! fingerprint), authenticate, reconnect with jittered backoff, a persistent
//! outbox that retries under the same `client_msg_id`, the cursor store,
//! sync and gap detection; and the `starling-cli` binary built on it.
//!
//! **Must not touch:** server internals. It speaks only the published
//! protocol (`starling-protocol`), like any other client would.
