//! # starling-storage
//!
//! **Owns:** the storage traits every backend implements (durable log,
//! message index, cursors, metadata) and their backends: the embedded default
//! (a project-owned segmented log, an index and a metadata store), and the
//! statistics the log keeps for the metrics endpoint (`stats`).
//!
//! **Is not:** a protocol or connection layer. It stores opaque entries and
//! records.
//!
//! **Must not touch:** frames, sockets, connections or the runtime.
#![forbid(unsafe_code)]

pub mod embedded;
pub mod error;
pub mod format;
/// Property checks shared by the cargo-fuzz targets in `fuzz/` and the corpus replay test.
/// Not a stable API.
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod log;
pub mod mem;
pub mod meta;
pub mod stats;
pub mod traits;
pub mod types;

pub use embedded::{EmbeddedShard, ShardOpenReport, ShardOptions};
pub use error::{LogError, StorageError};
pub use index::DenseIndex;
pub use log::{
    Appended, Completion, CompletionSource, LogOptions, LogThread, RecoveryReport, SegmentedLog,
    ThreadStart,
};
pub use mem::MemMeta;
pub use meta::{EmbeddedMeta, MetaBatch, MetadataStore, Record};
pub use traits::{CursorStore, DeliveryCursor, DurableLog, MessageIndex, ReadCursor};
pub use types::*;
