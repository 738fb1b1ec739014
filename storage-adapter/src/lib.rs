//! # starling-storage
//!
//! **Owns:** the storage traits every backend implements ([`traits`]: durable
//! log, message index, cursors; [`meta`]: metadata, with [`message_state`]: the current state of
//! messages changed after they were stored (edits, deletes for everyone, reactions); [`conv_timer`]: a
//! conversation's disappearing-messages timer; [`conv_delivered`]: when its messages were received
//! by every member; [`accounts`]: users, devices, sessions,
//! one-time codes and the accounts' rate-limit windows, on the metadata store) and the one backend there
//! is, the embedded one: per sequencer shard a segmented, group-committed log
//! ([`log`], [`format`](mod@format)) with its message index ([`DenseIndex`]: resident pointers
//! within a memory budget, an index file per sealed segment as its checkpoint), together an
//! [`EmbeddedShard`] (one whose log failed is reopened in place through
//! [`FailedShard`]); per node a redb metadata and cursor store ([`EmbeddedMeta`]), with the end-to-end key directory's records and the logic of its one
//! writer ([`keys`]: exactly-once one-time prekeys, group-committed claims). Also an in-memory metadata store with the same
//! semantics for tests and the router's simulator ([`MemMeta`]), and the
//! statistics the log keeps for the metrics endpoint ([`stats`]). On-disk
//! format and recovery rules: `docs/design/log.md`.
//!
//! **Is not:** a protocol or connection layer. It stores opaque entries and
//! records; what a message or a receipt means is the router's.
//!
//! **Must not touch:** frames, sockets, connections or the runtime. It starts
//! its own threads (the log's writer and spare-segment maker, the index's checkpointer) but leaves where
//! they run to the embedder (`LogOptions::thread_start`), and reads no clock
//! but the log writer's (`io_clock`: commit pacing and segment-switch timing).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod conv_delivered;
pub mod conv_timer;
pub mod embedded;
pub mod error;
pub mod format;
/// Property checks shared by the cargo-fuzz targets in `fuzz/` and the corpus replay test.
/// Not a stable API.
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod keys;
pub mod log;
pub mod mem;
pub mod message_state;
pub mod meta;
pub mod push;
pub mod stats;
pub mod traits;
pub mod types;

pub use accounts::AccountStore;
pub use embedded::{
    DEFAULT_INDEX_MEMORY_BYTES, EmbeddedShard, FailedShard, ShardOpenReport, ShardOptions,
};
pub use error::{LogError, StorageError};
pub use index::{DenseIndex, IndexStats};
pub use log::{
    Appended, Completion, CompletionSource, LogOptions, LogThread, RecoveryReport, SegmentedLog,
    ThreadStart, TruncateReport,
};
pub use mem::MemMeta;
pub use meta::{EmbeddedMeta, MetaBatch, MetadataStore, Record};
pub use traits::{CursorStore, DeliveryCursor, DurableLog, MessageIndex, ReadCursor};
pub use types::*;
