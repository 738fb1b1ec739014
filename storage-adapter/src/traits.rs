//! The seam every backend implements. The router is written against these traits; the embedded
//! backend implements them today, a PostgreSQL backend (one transaction per sequencer batch,
//! `UNIQUE(conv, client_msg_id)`) later.
//!
//! Threading contract: [`DurableLog::append`] never blocks (it queues the batch for the backend's
//! I/O thread and returns a [`Completion`]). Index, cursor and metadata calls may touch the disk
//! and take locks other threads hold: the router makes them on its read threads (reads) and its
//! metadata writer (writes, which wait for an fsync), not on a shard thread
//! (`docs/design/reads.md`). Every read reflects every write acknowledged before it was made.

use crate::error::{LogError, StorageError};
use crate::log::Completion;
use crate::types::{ClientMsgId, ConvId, DeviceId, Entry, Level, Lsn, Seq, UserId};

/// One sequencer shard's durable log.
pub trait DurableLog {
    /// Appends `entries` as one batch (lsns `next_lsn()..`). Returns at once; the completion
    /// resolves when the whole batch reached durability `L` — wholly, never partly — or fails if
    /// the log was poisoned first. After a failure nothing later is ever acknowledged.
    fn append<L: Level>(&mut self, entries: &[Entry]) -> Result<Completion<L>, LogError>;

    /// The lsn the next appended entry gets.
    fn next_lsn(&self) -> Lsn;

    /// Everything at or below this lsn is durable; `Err` once poisoned. Polling this after a wake
    /// callback is the allocation-free way to acknowledge many batches at once.
    fn durable_lsn(&self) -> Result<Lsn, LogError>;
}

/// Per-conversation reads and dedup lookups over what the log made durable. Results are in
/// ascending seq order and hold at most `limit` (capped by the backend) entries.
pub trait MessageIndex: Send + Sync {
    /// The newest `limit` entries of `conv`.
    fn latest(&self, conv: ConvId, limit: usize) -> Result<Vec<Entry>, StorageError>;
    /// The newest `limit` entries with seq < `seq`.
    fn before(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError>;
    /// The oldest `limit` entries with seq > `seq` (sync after a cursor).
    fn after(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError>;
    /// The entry at `seq`.
    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, StorageError>;
    /// The highest seq of `conv` ([`Seq::NONE`] if empty): the sequencer continues after it.
    fn last_seq(&self, conv: ConvId) -> Result<Seq, StorageError>;
    /// The seq already given to `(conv, id)`, if any: a retry returns it instead of a new seq.
    fn dedup(&self, conv: ConvId, id: ClientMsgId) -> Result<Option<Seq>, StorageError>;
    /// Entries through this log lsn are visible to the reads above.
    fn indexed_lsn(&self) -> Lsn;
}

/// A delivery cursor: device `device` of `user` has received `conv` through `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryCursor {
    /// Conversation.
    pub conv: ConvId,
    /// Receiving user.
    pub user: UserId,
    /// Receiving device.
    pub device: DeviceId,
    /// Delivered through this seq.
    pub seq: Seq,
}

/// A read cursor: `user` has read `conv` through `seq` (on any device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadCursor {
    /// Conversation.
    pub conv: ConvId,
    /// Reading user.
    pub user: UserId,
    /// Read through this seq.
    pub seq: Seq,
}

/// Cursors: monotonic (a lower value never overwrites a higher one), durable when the call
/// returns, written in batches.
pub trait CursorStore {
    /// Raises delivery cursors (one durable commit for the whole batch).
    fn advance_delivery(&self, cursors: &[DeliveryCursor]) -> Result<(), StorageError>;
    /// Raises read cursors (one durable commit for the whole batch).
    fn advance_read(&self, cursors: &[ReadCursor]) -> Result<(), StorageError>;
    /// The delivery cursor of one device ([`Seq::NONE`] if none).
    fn delivery_cursor(
        &self,
        conv: ConvId,
        user: UserId,
        device: DeviceId,
    ) -> Result<Seq, StorageError>;
    /// The read cursor of one user ([`Seq::NONE`] if none).
    fn read_cursor(&self, conv: ConvId, user: UserId) -> Result<Seq, StorageError>;
    /// Every delivery cursor of `conv` (for receipts and retention).
    fn delivery_cursors(&self, conv: ConvId) -> Result<Vec<DeliveryCursor>, StorageError>;
}
