//! # starling-client
//!
//! **Owns:** the Rust SDK: connect (TLS with a CA file or a pinned
//! fingerprint), authenticate, reconnect with jittered backoff, a persistent
//! outbox that retries under the same `client_msg_id` (only a message's very
//! first write in this process says `Send.first_attempt`), the cursor store,
//! sync and gap detection; and the `starling-cli` binary built on it.
//!
//! **Is not:** part of the server, nor the load generator's client:
//! `starling-bench` speaks the protocol through its own lean connection and
//! takes only [`Backoff`] from here (for its reconnect storms).
//!
//! **Must not touch:** server internals. It speaks only the published
//! protocol (`starling-protocol`), like any other client would.
//!
//! ## Layers
//!
//! - [`Connection`] — one TCP/TLS connection: Hello/Welcome (limits, the
//!   optional features the server offers), requests
//!   correlated by `request_id`, pushes on their own queue ([`Pushes`]),
//!   Ping heartbeats and frame limits from `Welcome.limits`;
//!   [`Transport::DangerousPlaintext`] for loopback only.
//! - [`Client`] — a session from a [`Profile`] directory: automatic
//!   Hello-with-token and, when the server refuses the token
//!   (`Welcome.auth_error`), Refresh on the same connection; reconnect with full-jitter [`Backoff`],
//!   the [`Outbox`], the [`CursorStore`], sync on reconnect, gap detection
//!   ([`Reorder`]) and an ordered, deduplicated [`Events`] stream.
//!   Groups (create, info, members, roles, leave, settings, receipt detail;
//!   aggregate receipt counts arrive as [`Event::GroupReceipts`]), presence
//!   (subscribe, set; restored on every reconnect), typing and other users'
//!   profiles are requests on [`Client`]; their pushes arrive as [`Event`]s.
//! - [`media`] — attachments over HTTPS to the server's media endpoint:
//!   [`Client::upload_file`], [`Client::send_with_media`],
//!   [`Client::download_media`] (streamed both ways, SHA-256 checked).
//! - The end-to-end key directory: [`Client::upload_keys`],
//!   [`Client::prekey_count`], [`Client::fetch_key_bundles`] (claims),
//!   [`Client::list_key_bundles`] (takes nothing), the pushes
//!   [`Event::PrekeyCount`] and [`Event::DeviceListChanged`]; [`e2e`] keeps a
//!   device's Olm account and sessions, checks fetched bundles and seals and
//!   opens end-to-end encrypted messages ([`Client::send_encrypted`],
//!   [`Client::open_message`]).
//! - Replies, edits, deletes for everyone and reactions: [`Client::reply`],
//!   [`Client::edit`], [`Client::delete_for_everyone`], [`Client::react`]
//!   (through the outbox, like messages); other devices' changes arrive as
//!   [`Event::MessageChanged`], and history serves each message as it is now.
//! - [`TypingNotifier`] — when to send typing indicators (rate-limited).
//! - [`json`] — the JSON shapes `starling-cli --json` prints.
//!
//! **Guarantee to the application:** per conversation, the entries
//! ([`Event::Message`]s, [`Event::MessageChanged`] and [`Event::GroupChanged`] events) arrive in
//! strictly increasing, contiguous seq order, each once per run (in a group:
//! contiguous from the member's join on, the seqs before it being invisible
//! to it); a
//! cursor is persisted after its messages were handed over, so after a crash
//! the messages since the last persisted cursor are delivered again
//! (at-least-once across crashes, exactly-once within a run).

mod backoff;
mod client;
mod clock;
mod connection;
pub mod e2e;
mod error;
mod ids;
pub mod json;
pub mod media;
mod reorder;
mod store;
mod tls;
mod typing;

pub use backoff::{Backoff, BackoffConfig};
pub use client::{
    Client, ClientConfig, Event, Events, HistoryAnchor, Identifier, LoginCredential, PushToken,
};
pub use connection::{ConnectOptions, Connection, Pushes, ResponseStream, Transport};
pub use error::{ClientError, ServerError};
pub use ids::ClientMsgId;
pub use reorder::{FETCH_MESSAGES_MAX, FetchRange, Released, Reorder};
pub use store::{
    CONTACTS_MAX, ContactBook, Credentials, CursorStore, Outbox, OutboxEntry, Profile, Target,
};
pub use tls::{TlsTrust, fingerprint};
pub use typing::TypingNotifier;

/// The wire types, re-exported for convenience.
pub use starling_protocol::v1;
