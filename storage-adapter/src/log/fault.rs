//! The fault-injection seam: every file operation of the log asks the hook first. Production
//! uses no hook; tests make writes and fsyncs fail, tear writes, or run out of space.

use std::fmt;
use std::io;
use std::path::Path;

/// A file operation the log is about to perform.
#[derive(Clone, Copy, Debug)]
pub enum IoOp<'a> {
    /// Write `len` bytes at `offset` of `path`.
    Write {
        /// The segment file.
        path: &'a Path,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// `fdatasync` of `path`.
    SyncData {
        /// The segment file.
        path: &'a Path,
    },
    /// Create and zero-fill a spare segment of `len` bytes.
    Preallocate {
        /// The spare file.
        path: &'a Path,
        /// Bytes.
        len: u64,
    },
    /// Rename a spare into place and fsync the directory.
    Install {
        /// The new segment's path.
        path: &'a Path,
    },
    /// Drop a sealed segment's pages from the page cache (advice: a fault leaves them cached).
    ReleaseCache {
        /// The sealed segment.
        path: &'a Path,
    },
}

/// What the hook wants to happen instead of the operation.
#[derive(Debug)]
pub enum Fault {
    /// Fail the operation with this error, doing nothing.
    Fail(io::Error),
    /// (Writes only) write this many bytes of the buffer, then fail with the error: a torn write.
    TornWrite(usize, io::Error),
}

/// Decides, before each file operation, whether to inject a fault.
pub trait FaultHook: Send + Sync + fmt::Debug {
    /// `None` lets the operation run.
    fn before(&self, op: &IoOp<'_>) -> Option<Fault>;
}
