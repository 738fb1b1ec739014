//! # starling-gateway
//!
//! **Owns:** the `starling` server binary's I/O: one pinned single-threaded
//! runtime per core, listeners (SO_REUSEPORT), TLS termination, the
//! connection lifecycle (deadlines, heartbeats on a per-shard timer wheel,
//! idle timeouts), write coalescing and backpressure, the metrics endpoint
//! and configuration. Until the router and the storage crate's metadata
//! store exist, it also hosts the accounts front door ([`accounts`]) behind
//! a narrow store trait.
//!
//! **Is not:** chat state. Who is in which group, which `seq` a conversation
//! is at, who may read what: all of that is the router's.
//!
//! **Must not touch:** conversation state or storage directly; frames are
//! decoded by `starling-protocol` and handed to `starling-router`.
//!
//! ## Design choices
//!
//! - **Runtime seam** ([`runtime`]): compio, one single-threaded runtime per
//!   shard thread, pinned to a core. The driver is io_uring or compio's
//!   epoll ("polling") backend, chosen by `--driver` or by fallback when
//!   io_uring is unavailable. Only [`runtime`] names compio.
//! - **Readiness, then read**: sockets are non-blocking `std` sockets; the
//!   runtime reports readiness (io_uring `POLL_ADD` or epoll) and the task
//!   reads into a per-shard scratch buffer, feeds rustls, and moves the
//!   plaintext into the frame decoder, whose buffer is released again when
//!   it holds no partial frame. An idle connection owns no read buffer and
//!   no in-flight I/O buffer. Listeners set TCP_DEFER_ACCEPT (the client
//!   speaks first), so `accept` returns a connection whose ClientHello is
//!   already there and its first read skips the readiness wait.
//! - **TLS** ([`conn::Tls`]): rustls's unbuffered API
//!   (`UnbufferedServerConnection`) driven by hand, TLS 1.3 only, `ring`
//!   provider except for X25519, which aws-lc computes ([`kx`]: about half
//!   ring's cost, and it was the largest item of a full handshake). Ciphertext is read into the shard's scratch buffer (after a
//!   kept partial record, if any) and decrypted in place; records go out
//!   from a per-connection buffer that is allocated only while the socket
//!   has not taken them. An idle connection keeps rustls's keys and state
//!   machine only (~3.6 KiB measured with `starling-bench tls-memory`).
//!   Encoded frames plus unsent records are capped at `outbound_bytes_max`
//!   (over it: slow consumer, close). The server prefers
//!   TLS_AES_128_GCM_SHA256 (SHA-256 runs on SHA-NI; SHA-384 does not) and
//!   issues one stateless session ticket per connection (ring's ticketer)
//!   so reconnecting clients resume. A dev CA and server certificate are
//!   generated on first start.
//! - **Deadlines** ([`wheel`]): one hashed timer wheel per shard; each
//!   connection has one live entry and one `deadline_ms` cell. Handshake and
//!   Hello deadlines are absolute (a byte a second does not extend them);
//!   after Welcome, each whole frame moves the idle deadline. The access
//!   token that authenticated a connection puts its expiry on the same
//!   entry: at expiry the connection gets `Goodbye{TOKEN_EXPIRED}` and is
//!   closed, so the client refreshes and reconnects.
//! - **Access tokens on the shard** ([`tokencache`]): a token is looked up
//!   in the shard's cache of verified tokens (SHA-256 of the token →
//!   principal and expiry; dropped at expiry and on revocation); on a miss
//!   its Ed25519 signature is checked on the shard (ring, no pool hop) and
//!   the session (plus the user's metadata mirror) in one blocking-pool
//!   call. Revocations bump a shared epoch; a shard trusts its cache only
//!   once it has applied every revocation.
//! - **Requests are handled in order per connection**; account work (store
//!   reads and transactions, webhooks) runs on one bounded blocking pool
//!   shared by all shards, and Argon2id password hashing on a small pool of
//!   its own at a low priority (`SCHED_IDLE` by default: a waking shard
//!   preempts it at once; [`runtime::CpuPool`], behind the admission
//!   limits of [`accounts::limits`]), so shard threads never block on disk or
//!   CPU-heavy hashing, and a flood of password logins cannot take the
//!   threads that check tokens. While a connection waits for its answer it
//!   is not read (TCP pushes back). At most `inflight_requests_max` requests
//!   are accepted from one read; more get `TOO_MANY_IN_FLIGHT`.
//! - **Messaging** ([`messaging`]): each shard thread owns one
//!   `starling_router::RouterShard` over its `EmbeddedShard`
//!   (`<data>/shards/<i>/`) and the node's `EmbeddedMeta`
//!   (`<data>/meta.redb`). One eventfd per shard is rung only by the shard's
//!   bell, which the rings, the log's wake callback and the cursor writer
//!   notify (it rings only while the driver is parked); a driver task waits on it, on
//!   `poll_timeout` and on kicks from connection tasks, and moves
//!   `poll_transmit`/`poll_close` into the connections' outbound queues
//!   (router frames arrive encoded; a connection copies them into its output,
//!   checking the peer's frame limit and timing the answers to Sends).
//!   Connection tasks call `handle_frame` for the router's frames and report
//!   written bytes with `handle_conn_flushed`. Users are mirrored from the
//!   accounts store into the metadata store when they authenticate.
//! - **Cross-shard control** (session revocation, shutdown) is a low-rate
//!   `mpsc` queue per shard drained on each timer tick.
//! - **Shutdown**: SIGINT/SIGTERM are blocked in every thread and taken by
//!   `sigwait` on the main thread; shards stop accepting, send
//!   `Goodbye{SHUTTING_DOWN}`, drain for up to `shutdown_drain_ms`, and the
//!   process exits 0.
//! - **Accounts** ([`accounts`]): identifiers and account text parsed by
//!   explicit rules ([`accounts::ident`]); OTP codes stored as HMAC-SHA256
//!   with a server secret, 6 digits, TTL and attempt limits, rate-limited per
//!   identifier and per IP (durably: the windows are rows of the account
//!   store); EdDSA JWT access tokens (alg pinned, `kid`,
//!   session checked against the store on a shard's first use of the token,
//!   then cached until expiry or revocation); opaque refresh tokens stored
//!   as SHA-256 and rotated on use (reuse revokes the session and closes its
//!   connections); Argon2id passwords, admitted under per-identifier,
//!   per-IP and global limits and hashed on the hashing pool, unknown
//!   accounts costing the same one hash as known ones; contact discovery compares
//!   HMAC(pepper, SHA-256(E.164)) and never stores uploaded lists.
//!   The store is [`accounts::store::AccountStore`] with a redb
//!   implementation in `<data>/accounts.redb`.

pub mod accounts;
pub mod clock;
pub mod config;
pub mod conn;
pub mod cpus;
pub mod kx;
pub mod messaging;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod tls;
pub mod tokencache;
pub mod wheel;
