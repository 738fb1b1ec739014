//! Typed errors. Each says whose fault it is: the disk (I/O, full, corrupt), the caller (misuse,
//! backpressure) or an earlier failure (poisoned).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::format::FormatError;

/// Errors of the durable log.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LogError {
    /// The disk is full (ENOSPC, EDQUOT or EFBIG). Nothing in the failed batch, nor after it, was
    /// acknowledged. The log is poisoned: reopen it once space is back.
    #[error("storage full during {op} of {}: {source}; reopen the log once space is back", path.display())]
    NoSpace {
        /// The operation that failed.
        op: &'static str,
        /// The file it was on.
        path: PathBuf,
        /// The OS error.
        source: Arc<io::Error>,
    },
    /// A write, fsync, create or rename failed. The log is poisoned: every waiter fails, nothing
    /// later is acknowledged; reopening recovers from what is on disk.
    #[error("log I/O failed during {op} of {}: {source}", path.display())]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The file it was on.
        path: PathBuf,
        /// The OS error.
        source: Arc<io::Error>,
    },
    /// A record that is not the tail is damaged: valid records follow it, so truncating would drop
    /// acknowledged data. The log refuses to open; an operator must look at the file.
    #[error("corrupt log record in {} at offset {offset}: {reason} (valid records follow it at offset {next_valid_offset} of {}; refusing to open rather than drop acknowledged data)", path.display(), next_valid_path.display())]
    Corrupt {
        /// The segment file holding the bad record.
        path: PathBuf,
        /// Byte offset of the bad record in that file.
        offset: u64,
        /// What is wrong with it.
        reason: FormatError,
        /// The file holding the first valid record after it.
        next_valid_path: PathBuf,
        /// Offset of that record.
        next_valid_offset: u64,
    },
    /// The log directory holds something this version cannot read (a bad segment header or name,
    /// a gap in lsns between segments).
    #[error("log directory is inconsistent at {}: {reason}", path.display())]
    Inconsistent {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An earlier failure poisoned this log; nothing is acknowledged after it.
    #[error("log is poisoned by an earlier failure: {0}")]
    Poisoned(Arc<LogError>),
    /// Too many bytes in flight: the caller should stop reading from the sockets that feed it
    /// until completions drain (it never blocks).
    #[error("log backpressure: {inflight_bytes} bytes in flight, limit {limit_bytes}")]
    Busy {
        /// Bytes submitted but not yet completed.
        inflight_bytes: u64,
        /// The configured limit.
        limit_bytes: u64,
    },
    /// The caller passed a batch the log cannot take (empty, or an entry or record too large).
    #[error("invalid batch: {0}")]
    InvalidBatch(&'static str),
    /// The log's I/O thread is gone (the log was dropped).
    #[error("log is closed")]
    Closed,
}

impl LogError {
    /// Wraps an I/O error, classifying a full disk as [`LogError::NoSpace`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> LogError {
        let full = matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
        );
        let path = path.into();
        let source = Arc::new(source);
        if full {
            LogError::NoSpace { op, path, source }
        } else {
            LogError::Io { op, path, source }
        }
    }

    /// Whether the disk failed (a write, fsync, create or rename, a full disk, a damaged
    /// record, a vanished I/O thread), as opposed to a refusal of the caller's request
    /// ([`LogError::Busy`], [`LogError::InvalidBatch`]) that leaves the log usable.
    pub fn is_fault(&self) -> bool {
        !matches!(self, LogError::Busy { .. } | LogError::InvalidBatch(_))
    }

    /// Whether this error means the disk is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            LogError::NoSpace { .. } => true,
            LogError::Poisoned(inner) => inner.is_no_space(),
            _ => false,
        }
    }
}

/// Errors of the index, cursors and metadata stores (and of opening a whole shard store).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The metadata engine (redb) failed.
    #[error("metadata engine: {0}")]
    Metadata(#[from] redb::Error),
    /// Bytes read back from the index or metadata store do not decode: the store is damaged.
    #[error("stored record in {table} does not decode: {reason}")]
    Decode {
        /// The table or keyspace.
        table: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A conditional metadata write found a different value than expected; nothing was written.
    #[error("conflict in {table}: the record changed since it was read")]
    Conflict {
        /// The table where the condition failed.
        table: &'static str,
    },
    /// Filesystem work outside the engines (creating directories, removing a damaged index).
    #[error("{op} {}: {source}", path.display())]
    Fs {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The index thread is gone.
    #[error("index applier stopped: {0}")]
    IndexStopped(String),
    /// The store cannot be reached or refused the operation for a reason of its own (a remote
    /// backend's connection, or a fault injected into a test backend). Nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StorageError {
    /// Whether the store under this error failed (its disk: I/O, a full or read-only
    /// filesystem, damage the engine found; or a stopped index), so that it cannot be trusted
    /// again until it is reopened — rather than refusing one request for a reason of the
    /// request's own ([`StorageError::Conflict`], a record that does not decode, a value too
    /// large, a missing table).
    pub fn is_fault(&self) -> bool {
        match self {
            StorageError::Log(e) => e.is_fault(),
            StorageError::Metadata(e) => matches!(
                e,
                redb::Error::Io(_)
                    | redb::Error::PreviousIo
                    | redb::Error::Corrupted(_)
                    | redb::Error::DatabaseClosed
                    | redb::Error::TransactionPoisoned
                    | redb::Error::Backend(_)
                    | redb::Error::LockPoisoned(_)
            ),
            StorageError::Fs { .. } | StorageError::IndexStopped(_) => true,
            StorageError::Decode { .. }
            | StorageError::Conflict { .. }
            | StorageError::Unavailable(_) => false,
        }
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Metadata(e.into())
            }
        }
    )*};
}

redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
