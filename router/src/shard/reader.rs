//! The shard's storage reads, as jobs with completions: a conversation's state (members, last
//! seq, timer, cursors, cached blocks), a range of a conversation's entries, a dedup lookup, a
//! user's conversations, a message's state, a direct pair's blocks. A [`Want`] names a read; [`Reader::submit`] starts it and its [`Got`]
//! comes back from [`Reader::poll`], **in any order** (reads do not depend on each other, and a
//! network database answers them out of order too). See `docs/design/reads.md`.
//!
//! In the gateway the jobs run on the node's `starling-read` threads (through the [`Offload`]
//! given to [`crate::RouterShard::set_read_offload`]), which wake the shard after each; without
//! one (unit tests, the simulation's even seeds) a job runs when it is submitted and its result
//! waits for the next poll. The simulation's odd seeds run them at times and in an order it
//! chooses.
//!
//! A job reads through an `Arc` of the index and the metadata store as they were when it was
//! submitted, tagged with the shard's storage epoch: after the log was reopened in place
//! (`RouterShard::storage_recovered`) a result from before is void and is read again.

use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use starling_storage::message_state::MessageState;
use starling_storage::meta::{User, keys};
use starling_storage::{ClientMsgId, CursorStore, Entry, MessageIndex, MetadataStore, Seq, UserId};

use super::convs::{ConvState, conversations_of};
use super::envelope::expiry_of;
use super::frames::Refusal;
use crate::ids::ConvId;
use crate::metawriter::Offload;

/// One read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Want {
    /// The owner-side state of a conversation ([`ConvState`]), as the stores have it.
    Conv(ConvId),
    /// `MessageIndex::after(conv, after, limit)`.
    After {
        conv: ConvId,
        after: u64,
        limit: usize,
    },
    /// `MessageIndex::before(conv, before, limit)`.
    Before {
        conv: ConvId,
        before: u64,
        limit: usize,
    },
    /// The seq, timestamp and expiry already given to `(conv, cmid)`, if any.
    Dedup { conv: ConvId, cmid: ClientMsgId },
    /// The conversations `user` is a member of.
    UserConvs(UserId),
    /// A user's display name (a direct conversation's title in the conversation list).
    UserName(UserId),
    /// The direct conversation of `low` and `high`, for a Send to `peer` (one of them).
    Direct {
        low: UserId,
        high: UserId,
        peer: UserId,
    },
    /// The state of message `seq` of `conv` (edited, deleted, reacted to), as of the
    /// conversation's state epoch `epoch` (`ConvSeq::state_epoch`).
    State { conv: ConvId, seq: u64, epoch: u64 },
    /// Whether `a` blocks `b` and `b` blocks `a`, for the direct conversation `conv` of the
    /// two, as of its block epoch `epoch` (`ConvState::block_epoch`).
    Blocks {
        conv: ConvId,
        a: UserId,
        b: UserId,
        epoch: u64,
    },
}

/// What a read found.
pub(super) enum Got {
    Conv(Result<Box<ConvState>, Refusal>),
    Entries(Result<Vec<Entry>, Refusal>),
    Dedup(Result<Option<(u64, u64, u64)>, Refusal>),
    UserConvs(Result<Vec<ConvId>, Refusal>),
    Direct(Result<Option<ConvId>, Refusal>),
    UserName(Result<Option<String>, Refusal>),
    State(Result<Option<MessageState>, Refusal>),
    Blocks(Result<(bool, bool), Refusal>),
    /// A page as its handler reads it: the index's part merged with the durable tail's
    /// (`reads.rs`); never a job's own result.
    Read(Result<Vec<Arc<Entry>>, Refusal>),
}

/// A finished read: its token, the storage epoch it read in, and what it found.
pub(super) type Done = (u64, u64, Got);

type Completions = Arc<Mutex<Vec<Done>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `want` against the stores (on whatever thread calls it).
pub(super) fn run<I, M>(index: &I, meta: &M, want: Want, now_ms: u64) -> Got
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let entries = |r: Result<Vec<Entry>, starling_storage::StorageError>| {
        Got::Entries(r.map_err(|e| Refusal::storage("index", &e)))
    };
    match want {
        Want::Conv(conv) => Got::Conv(ConvState::load(conv, index, meta, now_ms).map(Box::new)),
        Want::After { conv, after, limit } => {
            entries(index.after(conv.storage(), Seq(after), limit))
        }
        Want::Before {
            conv,
            before,
            limit,
        } => entries(index.before(conv.storage(), Seq(before), limit)),
        Want::Dedup { conv, cmid } => Got::Dedup(dedup_lookup(index, conv, cmid)),
        Want::UserConvs(user) => Got::UserConvs(conversations_of(meta, user)),
        Want::UserName(user) => Got::UserName(user_name(meta, user)),
        Want::Direct { low, high, peer } => {
            Got::Direct(super::direct::lookup(meta, low, high, peer))
        }
        Want::State { conv, seq, .. } => Got::State(message_state(meta, conv, seq)),
        Want::Blocks { a, b, .. } => Got::Blocks(super::blocks::lookup(meta, a, b)),
    }
}

/// The stored state of message `seq` of `conv`, if it has one.
pub(super) fn message_state<M: MetadataStore>(
    meta: &M,
    conv: ConvId,
    seq: u64,
) -> Result<Option<MessageState>, Refusal> {
    meta.get::<MessageState>(&MessageState::key_of(conv.storage(), Seq(seq)))
        .map_err(|e| Refusal::storage("message state", &e))
}

/// `user`'s display name (`None`: no such user).
pub(super) fn user_name<M: MetadataStore>(
    meta: &M,
    user: UserId,
) -> Result<Option<String>, Refusal> {
    meta.get::<User>(&keys::user(user))
        .map(|u| u.map(|u| u.display_name))
        .map_err(|e| Refusal::storage("user lookup", &e))
}

/// The seq, timestamp and expiry the index has for `(conv, cmid)`, if any.
pub(super) fn dedup_lookup<I: MessageIndex>(
    index: &I,
    conv: ConvId,
    cmid: ClientMsgId,
) -> Result<Option<(u64, u64, u64)>, Refusal> {
    let Some(seq) = index
        .dedup(conv.storage(), cmid)
        .map_err(|e| Refusal::storage("dedup", &e))?
    else {
        return Ok(None);
    };
    let (ts, expires) = index
        .entry(conv.storage(), seq)
        .map_err(|e| Refusal::storage("index", &e))?
        .map_or((0, 0), |e| (e.ts_ms.0, expiry_of(&e)));
    Ok(Some((seq.0, ts, expires)))
}

/// Hands a read to the offload: the job, the stores it reads and where its result goes.
type Start = Box<dyn Fn(u64, u64, Want, u64)>;

/// Fills the completion list when the job ran, or — if it was dropped without running (the
/// read threads are gone) — with a storage failure, so that nothing waits for it for ever.
struct Completer {
    done: Option<(Completions, u64, u64, Want)>,
}

impl Completer {
    fn complete(mut self, got: Got) {
        if let Some((c, token, epoch, _)) = self.done.take() {
            lock(&c).push((token, epoch, got));
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some((c, token, epoch, want)) = self.done.take() {
            let r = Refusal::storage_stopped();
            let got = match want {
                Want::Conv(_) => Got::Conv(Err(r)),
                Want::After { .. } | Want::Before { .. } => Got::Entries(Err(r)),
                Want::Dedup { .. } => Got::Dedup(Err(r)),
                Want::UserConvs(_) => Got::UserConvs(Err(r)),
                Want::Direct { .. } => Got::Direct(Err(r)),
                Want::UserName(_) => Got::UserName(Err(r)),
                Want::State { .. } => Got::State(Err(r)),
                Want::Blocks { .. } => Got::Blocks(Err(r)),
            };
            lock(&c).push((token, epoch, got));
        }
    }
}

/// A shard's reads in flight (see the module docs).
#[derive(Default)]
pub(super) struct Reader {
    start: Option<Start>,
    done: Completions,
    /// Reads submitted whose result was not taken yet.
    outstanding: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("offloaded", &self.start.is_some())
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl Reader {
    /// Runs every later read through `offload` (which must wake the shard after each), against
    /// `index` and `meta`. Called again after the log was reopened, with the new index.
    pub(super) fn set_offload<I, M>(&mut self, index: Arc<I>, meta: Arc<M>, offload: Rc<Offload>)
    where
        I: MessageIndex + Send + Sync + 'static,
        M: MetadataStore + CursorStore + Send + Sync + 'static,
    {
        let done = self.done.clone();
        self.start = Some(Box::new(move |token, epoch, want, now_ms| {
            let (index, meta) = (index.clone(), meta.clone());
            let c = Completer {
                done: Some((done.clone(), token, epoch, want)),
            };
            offload(Box::new(move || {
                let got = run(&*index, &*meta, want, now_ms);
                c.complete(got);
            }));
        }));
    }

    /// Starts `want` (inline against `index` and `meta` when there is no offload); its result
    /// comes back from [`Reader::poll`] with `token` and `epoch`.
    pub(super) fn submit<I, M>(
        &mut self,
        index: &I,
        meta: &M,
        token: u64,
        epoch: u64,
        want: Want,
        now_ms: u64,
    ) where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        self.outstanding += 1;
        match &self.start {
            Some(start) => start(token, epoch, want, now_ms),
            None => {
                let got = run(index, meta, want, now_ms);
                lock(&self.done).push((token, epoch, got));
            }
        }
    }

    /// Every finished read, in the order they finished.
    pub(super) fn poll(&mut self) -> Vec<Done> {
        if self.outstanding == 0 {
            // Nothing in flight (the hot path): no lock to take.
            return Vec::new();
        }
        let v = std::mem::take(&mut *lock(&self.done));
        self.outstanding -= v.len();
        v
    }
}
