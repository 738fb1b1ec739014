//! Identifiers and the log entry: the vocabulary shared by every backend.
//!
//! One meaning per term: `seq` numbers a conversation's entries (contiguous from 1),
//! `lsn` numbers a log's entries (contiguous from 1, one per entry, across the whole log).

use std::fmt;

/// A conversation id: opaque 16 bytes to storage (the router derives 1:1 ids from the two user
/// ids and allocates group ids). Ordered and encoded big-endian in index keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConvId(pub u128);

/// Position of an entry in its conversation. Contiguous from 1; `Seq(0)` means "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq(pub u64);

impl Seq {
    /// "No seq": an entry that is not part of a conversation's sequence (not indexed).
    pub const NONE: Seq = Seq(0);
}

/// Position of an entry in one shard's log. Contiguous from 1; `Lsn(0)` means "before the first".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The position before the first entry of every log.
    pub const ZERO: Lsn = Lsn(0);
}

/// The id a client gives a message so that retries are idempotent. All zeroes means "none"
/// (the entry takes no part in dedup).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClientMsgId(pub [u8; 16]);

impl ClientMsgId {
    /// "No client message id".
    pub const NONE: ClientMsgId = ClientMsgId([0; 16]);

    /// Whether this is [`ClientMsgId::NONE`].
    pub fn is_none(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Debug for ClientMsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientMsgId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A user account id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UserId(pub u64);

/// A device of a user (unique within the user).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DeviceId(pub u32);

/// Milliseconds since the Unix epoch, as stamped by the server (storage never reads a clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimestampMs(pub u64);

/// What an entry is. Storage treats it as an opaque byte; the router owns the meaning of the
/// values it defines beyond the ones named here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKind(pub u8);

impl EntryKind {
    /// A chat message (body = opaque, possibly end-to-end encrypted, bytes).
    pub const MESSAGE: EntryKind = EntryKind(1);
    /// A delivery/read receipt that is part of the conversation's stream.
    pub const RECEIPT: EntryKind = EntryKind(2);
    /// A cursor update carried through the log (body defined by the router).
    pub const CURSOR: EntryKind = EntryKind(3);
    /// A group/system event (member added, renamed, ...).
    pub const SYSTEM: EntryKind = EntryKind(4);
}

/// One entry of a log batch: the unit the log stores and the index serves.
///
/// Storage reads only `conv`, `seq` and `client_msg_id` (for the index and dedup); every other
/// field is carried verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// What the entry is.
    pub kind: EntryKind,
    /// The conversation it belongs to.
    pub conv: ConvId,
    /// Its seq in the conversation ([`Seq::NONE`] = not indexed).
    pub seq: Seq,
    /// The sender's idempotency key ([`ClientMsgId::NONE`] = no dedup).
    pub client_msg_id: ClientMsgId,
    /// Sending user.
    pub sender: UserId,
    /// Sending device.
    pub sender_device: DeviceId,
    /// Server timestamp.
    pub ts_ms: TimestampMs,
    /// Content type (router/client defined; opaque here).
    pub content_type: u16,
    /// Opaque body bytes.
    pub body: Vec<u8>,
}

/// A durability level as a value (for configuration and diagnostics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Written to the operating system (page cache); lost by a power failure, survives a crash
    /// of this process.
    Buffered,
    /// Written and `fdatasync`ed: survives power failure.
    SyncData,
}

/// A durability level as a type, so that an acknowledgement can demand proof of it.
pub trait Level: Send + Sync + fmt::Debug + 'static {
    /// The level as a value.
    const DURABILITY: Durability;
}

/// Type-level [`Durability::SyncData`]: completions only resolve after `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncData;

/// Type-level [`Durability::Buffered`]: completions resolve once the OS has the bytes.
/// Weaker than it looks: never acknowledge a user's message on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffered;

impl Level for SyncData {
    const DURABILITY: Durability = Durability::SyncData;
}

impl Level for Buffered {
    const DURABILITY: Durability = Durability::Buffered;
}
