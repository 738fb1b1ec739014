//! # starling-storage
//!
//! **Owns:** the storage traits every backend implements (durable log,
//! message index, cursors, metadata) and their backends: the embedded default
//! (a project-owned segmented log, an index and a metadata store).
//!
//! **Is not:** a protocol or connection layer. It stores opaque entries and
//! records.
//!
//! **Must not touch:** frames, sockets, connections or the runtime.
#![forbid(unsafe_code)]
