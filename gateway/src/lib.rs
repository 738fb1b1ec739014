//! # starling-gateway
//!
//! **Owns:** the `starling` server binary's I/O: one pinned single-threaded
//! runtime per core, listeners (SO_REUSEPORT), TLS termination, the
//! connection lifecycle (deadlines, heartbeats on a per-shard timer wheel,
//! idle timeouts), write coalescing and backpressure, the metrics endpoint
//! and configuration; the glue that opens each shard's storage at start-up
//! and drives its `starling_router::RouterShard` ([`messaging`]); and, for
//! now, the accounts front door ([`accounts`]: one-time codes, sign-in,
//! sessions and tokens, devices, contact discovery), whose records live in
//! the node's metadata store behind `starling_storage::accounts::AccountStore`
//! (`<data>/meta.redb`; a data dir with the former `accounts.redb` is
//! migrated at start, [`accounts::migrate`]). The account logic is meant to
//! move to the router.
//!
//! **Is not:** chat state. Who is in which group, which `seq` a conversation
//! is at, who may read what: all of that is the router's.
//!
//! **Must not touch:** conversation state or the messages in storage: it opens
//! the storage and hands it to the router, and its writes to the metadata
//! store are the accounts' own records (users, devices, sessions, codes,
//! rate-limit windows: [`accounts`]) and the contacts that contact discovery
//! found ([`profiles`]). Frames are decoded by
//! `starling-protocol`; the messaging ones are handed to `starling-router`,
//! whose answers arrive already encoded.
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
//!   machine only (under 4 KiB, `starling-bench tls-memory`; BENCHMARKS.md).
//!   Encoded frames plus unsent records are capped at `outbound_bytes_max`
//!   (over it: slow consumer, close), and a connection whose socket takes
//!   nothing for `slow_consumer_close_ms` while bytes wait is closed the same
//!   way (`Goodbye{SLOW_CONSUMER}`). The server prefers
//!   TLS_AES_128_GCM_SHA256 (SHA-256 runs on SHA-NI; SHA-384 does not) and
//!   issues one stateless session ticket per connection (ring's ticketer)
//!   so reconnecting clients resume. A dev CA and server certificate are
//!   generated on first start, as a set that appears whole or not at all; a
//!   start that finds a set partly written refuses, naming the file.
//! - **Small files in the data dir** ([`fsutil`]): TLS material and
//!   secrets are written with [`fsutil::write_atomic`] (temp file, fsync,
//!   rename, fsync the directory), so a crash never leaves one empty.
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
//!   the session in one blocking-pool call. Revocations bump a shared epoch; a shard trusts its cache only
//!   once it has applied every revocation.
//! - **Media** ([`media`]): an HTTPS endpoint on its own listener, threads
//!   and tokio runtime (hyper, HTTP/1.1), never on a shard. Grants are URLs
//!   signed with HMAC-SHA256; objects are content-addressed files in
//!   `<data>/media/`, visible only once whole, hashed and fsynced; a Send
//!   naming one records the reference durably first (blocking pool), and a
//!   collector deletes unreferenced uploads after a configured age.
//! - **Requests are handled in order per connection**; account work (store
//!   reads and transactions, webhooks) runs on one bounded blocking pool
//!   shared by all shards, and Argon2id password hashing on a small pool of
//!   its own at a low priority (`SCHED_IDLE` by default: a waking shard
//!   preempts it at once; [`runtime::CpuPool`], behind the admission
//!   limits of [`accounts::limits`]), so shard threads never block on disk or
//!   CPU-heavy hashing, and a flood of password logins cannot take the
//!   threads that check tokens. While a connection waits for its answer it
//!   is not read (TCP pushes back). A request counts from its read until its
//!   final answer is queued for the connection (router answers settle it as
//!   the router queues them; a Sync at its SyncDone); one that arrives while
//!   `inflight_requests_max` are held gets `TOO_MANY_IN_FLIGHT` and is not
//!   carried out. A request with request id 0 is refused, and a request of a
//!   feature the server does not offer (`Welcome.features`) gets
//!   `NOT_SUPPORTED`.
//! - **Messaging** ([`messaging`]): each shard thread owns one
//!   `starling_router::RouterShard` over its `EmbeddedShard`
//!   (`<data>/shards/<i>/`) and the node's `EmbeddedMeta`
//!   (`<data>/meta.redb`). One eventfd per shard is rung only by the shard's
//!   bell, which the rings, the log's wake callback, the metadata writer and
//!   the read threads notify (it rings only while the driver is parked); a driver task waits on it, on
//!   `poll_timeout` and on kicks from connection tasks, and moves
//!   `poll_transmit`/`poll_close` into the connections' outbound queues
//!   (router frames arrive encoded; a connection copies them into its output,
//!   checking the peer's frame limit and timing the answers to Sends).
//!   Connection tasks call `handle_frame` for the router's frames and report
//!   written bytes with `handle_conn_flushed`. The router's metadata writes
//!   (cursor batches, Block/Unblock, new direct conversations) run on one
//!   `starling-meta` thread per shard, in order; its storage reads
//!   (conversation states, pages, dedup lookups, conversation lists) on two
//!   `starling-read` threads per shard, in any order (`docs/design/reads.md`). The router titles direct
//!   conversations from the same user record the accounts write (one
//!   account store), so a name changed by `UpdateProfile` is in every title
//!   once the request is answered.
//! - **Cross-shard control** (session revocation, shutdown) is a low-rate
//!   `mpsc` queue per shard drained on each timer tick.
//! - **Shutdown**: SIGINT/SIGTERM are blocked in every thread and taken by
//!   `sigwait` on a signal thread, which tells the main thread; shards stop
//!   accepting, send `Goodbye{SHUTTING_DOWN}`, drain for up to
//!   `shutdown_drain_ms`, and the process exits 0.
//! - **Storage faults** ([`health`]): a shard whose log failed refuses
//!   writes, serves reads, is not ready (`/readyz`), and is reopened in place
//!   off its thread every `storage.recovery_retry_ms` ([`messaging`]). The
//!   first failure of a shard's index, or of `meta.redb` (accounts included),
//!   marks the process unhealthy (`/healthz`, `/readyz`), stops reading
//!   connections, and tells the main thread; shards give pending answers a
//!   short grace, send `Goodbye{STORAGE_FAILURE}`, drain, and the process
//!   exits with status 74 for a supervisor to restart it. Never
//!   retry-and-acknowledge.
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
//!   HMAC(pepper, SHA-256(E.164)) and never stores uploaded lists; the users
//!   it finds become the caller's contacts in the metadata store, and
//!   GetProfiles answers public profiles under the router's visibility rule
//!   (`starling_router::visibility`), both in [`profiles`].
//!   The store is `starling_storage::accounts::AccountStore`, implemented by
//!   the embedded metadata store on `<data>/meta.redb`: the user record the
//!   router titles conversations with is the account itself. Devices' last
//!   seen times are noted on the shards and written coalesced by a thread of
//!   their own ([`accounts::seen`]). A device's push token is checked per
//!   platform ([`accounts::push`]) and stored in the same store.
//! - **Push notifications** ([`push`]): the notifier thread, its durable outbox and its
//!   providers (Web Push, FCM, APNs, the operator webhook), fed by the routers' notices over a
//!   bounded queue.

pub mod accounts;
pub mod clock;
pub mod config;
pub mod conn;
pub mod cpus;
pub mod fsutil;
pub mod health;
pub mod keys;
pub mod kx;
pub mod layout;
pub mod media;
pub mod messaging;
pub mod metrics;
pub mod profiles;
pub mod push;
pub mod retention;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod tls;
pub mod tokencache;
pub mod wheel;
