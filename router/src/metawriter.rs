//! The shard's metadata writer: every metadata write the router makes — a batch of delivery and
//! read cursors, a Block or Unblock, the creation of a direct conversation — is a [`Job`] that
//! runs off the shard thread (in the gateway, on the shard's `starling-meta` thread, through the
//! [`Offload`] given to [`crate::RouterShard::set_meta_offload`]), because each is a metadata
//! commit with an fsync. The shard submits a job with a tag saying what to do with its outcome,
//! goes on with other work, and takes the outcomes back with [`MetaWriter::poll`] when it is
//! woken, **in submission order**: a job's outcome is handed out only after every earlier one's.
//! One thread runs a shard's jobs one at a time, in that order, so writes of one shard never
//! overtake each other either.
//!
//! Without an offload (the simulation's default) a job runs inline when it is submitted and its
//! outcome waits for the next poll, so the simulation stays deterministic; the simulation also
//! drives an offload whose jobs run at times it chooses.
//!
//! Reads go through the shard's reader instead (`shard/reader.rs`): they may finish in any order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use starling_protocol::v1::ErrorCode;
use starling_storage::conv_delivered::ConvDelivered;
use starling_storage::meta::{Block, DirectConv, DirectPair, Member, Presence, Role, User, keys};
use starling_storage::{
    CursorStore, DeliveryCursor, MetaBatch, MetadataStore, ReadCursor, StorageError, TimestampMs,
    UserId,
};

use crate::hash::HashMap;
use crate::ids::{self, ConvId};
use crate::shard::frames::Refusal;

/// Runs a job on some other thread; the job wakes the shard when it is done.
pub type Offload = Box<dyn Fn(Box<dyn FnOnce() + Send>)>;

/// One metadata write.
#[derive(Debug)]
pub(crate) enum Job {
    /// Raise these cursors (one commit per kind), then record these delivery-floor steps
    /// (one commit; computed from cursors that are durable once the first commits are).
    Cursors {
        delivery: Vec<DeliveryCursor>,
        read: Vec<ReadCursor>,
        floors: Vec<ConvDelivered>,
    },
    /// `user` blocks (`block`) or unblocks `target`. Validated and counted by the writer, which
    /// is the only one that writes `user`'s blocks (they all go through `user`'s home shard).
    Block {
        user: UserId,
        target: UserId,
        block: bool,
        now_ms: u64,
    },
    /// Create (or find) the direct conversation of `low` and `high`.
    CreateDirect {
        low: UserId,
        high: UserId,
        now_ms: u64,
    },
    /// Commit a batch the shard built (a group's change, or the clearing of its marker); its
    /// compare-and-set conditions failing is an outcome, not an error.
    Commit { batch: MetaBatch },
    /// Record what outlives a user's connections of their presence (written by the user's home
    /// shard only, so in order).
    Presence(Presence),
}

/// What a job wrote.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// The cursors are durable.
    Cursors,
    /// The Block/Unblock is durable (`changed`: it was written now; else it was already in
    /// effect and nothing was written). `conv`: the pair's direct conversation, if one exists,
    /// whose owner must forget its cached block state before the request is answered.
    Block { changed: bool, conv: Option<ConvId> },
    /// The pair's direct conversation exists durably (created now or earlier).
    Direct { conv: ConvId },
    /// A `Job::Commit` batch: durable, or (`conflict`) not applied because a record was not
    /// what it expected.
    Committed { conflict: bool },
    /// The presence record is durable.
    Presence,
}

/// A job's outcome.
pub(crate) type Outcome = Result<Written, Refusal>;

/// A metadata job answered with the outcome of another kind of job: a bug.
pub(crate) fn unexpected_outcome(w: &Written) -> Refusal {
    debug_assert!(false, "unexpected metadata outcome {w:?}");
    Refusal(
        ErrorCode::Internal,
        format!("unexpected metadata outcome {w:?}"),
    )
}

type Slot = Arc<Mutex<Option<Outcome>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fills a job's slot: with its outcome, or — if the job is dropped without having run (the
/// writer thread is gone) — with a failure, so that no request waits for it for ever.
struct Completer(Option<Slot>);

impl Completer {
    fn complete(mut self, outcome: Outcome) {
        if let Some(slot) = self.0.take() {
            *lock(&slot) = Some(outcome);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            *lock(&slot) = Some(Err(Refusal(
                ErrorCode::StorageFailure,
                "the metadata writer stopped before this was written; nothing was recorded".into(),
            )));
        }
    }
}

/// Hands a job to the offload with what it needs to run there.
type Start = Box<dyn Fn(Job, Completer)>;

/// A shard's metadata writer (see the module docs). `T` is what the shard keeps per job to act
/// on its outcome.
pub(crate) struct MetaWriter<T> {
    start: Option<Start>,
    state: Arc<Mutex<WriterState>>,
    queue: VecDeque<(T, Slot)>,
}

impl<T> std::fmt::Debug for MetaWriter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaWriter")
            .field("offloaded", &self.start.is_some())
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl<T> MetaWriter<T> {
    /// A writer that runs jobs inline until [`MetaWriter::set_offload`]; one user may block at
    /// most `blocks_max` others (at most `starling_storage::meta::SCAN_RECORDS_MAX`, so one scan
    /// counts them).
    pub(crate) fn new(blocks_max: usize) -> Self {
        debug_assert!(blocks_max <= starling_storage::meta::SCAN_RECORDS_MAX);
        MetaWriter {
            start: None,
            state: Arc::new(Mutex::new(WriterState {
                blocks_max: blocks_max.min(starling_storage::meta::SCAN_RECORDS_MAX),
                block_counts: HashMap::default(),
            })),
            queue: VecDeque::new(),
        }
    }

    /// Runs every later job through `offload` (which must wake the shard after each job ran).
    pub(crate) fn set_offload<M>(&mut self, meta: Arc<M>, offload: Offload)
    where
        M: MetadataStore + CursorStore + Send + Sync + 'static,
    {
        let state = self.state.clone();
        self.start = Some(Box::new(move |job, done| {
            let (meta, state) = (meta.clone(), state.clone());
            offload(Box::new(move || {
                let outcome = run(&*meta, &mut lock(&state), job);
                done.complete(outcome);
            }));
        }));
    }

    /// Starts `job`; its outcome comes back from [`MetaWriter::poll`] with `tag`, after the
    /// outcomes of every job submitted before it.
    pub(crate) fn submit<M: MetadataStore + CursorStore>(&mut self, meta: &M, job: Job, tag: T) {
        let slot = Slot::default();
        let done = Completer(Some(slot.clone()));
        match &self.start {
            Some(start) => start(job, done),
            None => done.complete(run(meta, &mut lock(&self.state), job)),
        }
        self.queue.push_back((tag, slot));
    }

    /// The oldest job's tag and outcome, once it has one.
    pub(crate) fn poll(&mut self) -> Option<(T, Outcome)> {
        let outcome = lock(&self.queue.front()?.1).take()?;
        let (tag, _) = self.queue.pop_front()?;
        Some((tag, outcome))
    }

    /// Jobs submitted whose outcome was not taken yet.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// What the writer keeps between jobs (touched only by the job running, one at a time).
#[derive(Debug)]
struct WriterState {
    blocks_max: usize,
    /// user → how many users they block, as this writer last wrote or counted it. Exact, because
    /// every Block/Unblock of a user goes through the same writer; forgotten when unsure (a
    /// failed commit, a count at the cap).
    block_counts: HashMap<UserId, usize>,
}

/// Block counts kept; the map is cleared when full (they are counted again on next use).
const BLOCK_COUNTS_MAX: usize = 65_536;

impl WriterState {
    fn remember(&mut self, user: UserId, count: usize) {
        if self.block_counts.len() >= BLOCK_COUNTS_MAX {
            self.block_counts.clear();
        }
        self.block_counts.insert(user, count);
    }
}

/// Metadata key of the `DirectPair` of users `low <= high`.
pub(crate) fn direct_pair_key(low: UserId, high: UserId) -> Vec<u8> {
    let mut k = keys::user(low);
    k.extend_from_slice(&high.0.to_be_bytes());
    k
}

/// Metadata key of `user`'s `Block` of `blocked`.
pub(crate) fn block_key(user: UserId, blocked: UserId) -> Vec<u8> {
    let mut k = keys::user(user);
    k.extend_from_slice(&blocked.0.to_be_bytes());
    k
}

/// `(a, b)` in ascending order.
pub(crate) fn ordered(a: UserId, b: UserId) -> (UserId, UserId) {
    if a <= b { (a, b) } else { (b, a) }
}

/// How many candidate ids a direct conversation probes before giving up.
const DIRECT_PROBES_MAX: u32 = 8;

fn run<M: MetadataStore + CursorStore>(meta: &M, st: &mut WriterState, job: Job) -> Outcome {
    match job {
        Job::Cursors {
            delivery,
            read,
            floors,
        } => {
            let not_recorded = |e: &StorageError| {
                Refusal(
                    ErrorCode::StorageFailure,
                    format!("the cursor was not recorded ({e}); it may be sent again"),
                )
            };
            if !delivery.is_empty() {
                meta.advance_delivery(&delivery)
                    .map_err(|e| not_recorded(&e))?;
            }
            if !read.is_empty() {
                meta.advance_read(&read).map_err(|e| not_recorded(&e))?;
            }
            if !floors.is_empty() {
                let mut batch = MetaBatch::default();
                for f in &floors {
                    batch.put(f);
                }
                meta.commit(&batch).map_err(|e| not_recorded(&e))?;
            }
            Ok(Written::Cursors)
        }
        Job::Block {
            user,
            target,
            block,
            now_ms,
        } => block_job(meta, st, user, target, block, now_ms),
        Job::CreateDirect { low, high, now_ms } => create_direct(meta, low, high, now_ms),
        Job::Commit { batch } => match meta.commit(&batch) {
            Ok(()) => Ok(Written::Committed { conflict: false }),
            Err(StorageError::Conflict { .. }) => Ok(Written::Committed { conflict: true }),
            Err(e) => Err(Refusal(
                ErrorCode::StorageFailure,
                format!("the change could not be made durable ({e}); send it again"),
            )),
        },
        Job::Presence(rec) => {
            let mut b = MetaBatch::default();
            b.put(&rec);
            meta.commit(&b)
                .map_err(|e| Refusal::storage("presence (nothing recorded)", &e))?;
            Ok(Written::Presence)
        }
    }
}

fn block_job<M: MetadataStore>(
    meta: &M,
    st: &mut WriterState,
    user: UserId,
    target: UserId,
    block: bool,
    now_ms: u64,
) -> Outcome {
    let what = if block { "Block" } else { "Unblock" };
    let lookup = |e: StorageError| Refusal::storage("block lookup", &e);
    let key = block_key(user, target);
    let blocked = meta.get::<Block>(&key).map_err(lookup)?.is_some();
    // An existing block can always be undone (even one of an id that names nobody, written
    // before targets were checked); anything else needs a real target.
    let undoing = blocked && !block;
    if !undoing
        && meta
            .get::<User>(&keys::user(target))
            .map_err(lookup)?
            .is_none()
    {
        return Err(Refusal(ErrorCode::NotFound, "no such user".into()));
    }
    let changed = blocked != block;
    if changed {
        let count = match st.block_counts.get(&user) {
            Some(&n) => n,
            None => meta
                .scan::<Block>(&keys::user(user), st.blocks_max)
                .map_err(lookup)?
                .len(),
        };
        if block && count >= st.blocks_max {
            st.remember(user, count);
            return Err(Refusal(
                ErrorCode::PermissionDenied,
                format!(
                    "you block {} users, the most this server allows; unblock someone first",
                    st.blocks_max
                ),
            ));
        }
        let mut b = MetaBatch::default();
        if block {
            b.put(&Block {
                user,
                blocked: target,
                created_ms: TimestampMs(now_ms),
            });
        } else {
            b.delete::<Block>(&key);
        }
        if let Err(e) = meta.commit(&b) {
            // Whether it reached the disk is unknown: count again next time.
            st.block_counts.remove(&user);
            return Err(Refusal(
                ErrorCode::StorageFailure,
                format!("the {what} could not be made durable ({e}); send it again"),
            ));
        }
        if block {
            st.remember(user, count + 1);
        } else if count >= st.blocks_max {
            // Counted at the scan's cap: the true number may be higher still.
            st.block_counts.remove(&user);
        } else {
            st.remember(user, count.saturating_sub(1));
        }
    }
    // Looked up after the commit: a conversation created after this read reads the block from
    // the metadata when its owner first loads it.
    let (low, high) = ordered(user, target);
    let conv = meta
        .get::<DirectPair>(&direct_pair_key(low, high))
        .map_err(|e| Refusal::storage("direct lookup", &e))?
        .map(|p| ConvId::from_storage(p.conv));
    Ok(Written::Block { changed, conv })
}

/// Writes `DirectPair`, `DirectConv` and both memberships in one compare-and-set batch; a
/// conflict means another shard created the pair just now (use its id) or the candidate id
/// belongs to another pair (probe the next). See docs/design/messaging.md.
fn create_direct<M: MetadataStore>(meta: &M, low: UserId, high: UserId, now_ms: u64) -> Outcome {
    let pair_key = direct_pair_key(low, high);
    let existing = |meta: &M| -> Result<Option<ConvId>, Refusal> {
        Ok(meta
            .get::<DirectPair>(&pair_key)
            .map_err(|e| Refusal::storage("direct lookup", &e))?
            .map(|p| ConvId::from_storage(p.conv)))
    };
    if let Some(conv) = existing(meta)? {
        return Ok(Written::Direct { conv });
    }
    for attempt in 0..DIRECT_PROBES_MAX {
        let id = ids::direct_candidate(low.0, high.0, attempt);
        let mut b = MetaBatch::default();
        b.expect::<DirectPair>(&pair_key, None)
            .expect::<DirectConv>(&id.storage().0.to_be_bytes(), None)
            .put(&DirectPair {
                low,
                high,
                conv: id.storage(),
            })
            .put(&DirectConv {
                conv: id.storage(),
                low,
                high,
                created_ms: TimestampMs(now_ms),
            });
        for u in [low, high] {
            b.add_member(&Member {
                group: id.storage(),
                user: u,
                role: Role::Member,
                joined_ms: TimestampMs(now_ms),
                joined_seq: None,
            });
        }
        match meta.commit(&b) {
            Ok(()) => return Ok(Written::Direct { conv: id }),
            Err(StorageError::Conflict { .. }) => {
                if let Some(conv) = existing(meta)? {
                    return Ok(Written::Direct { conv });
                }
            }
            Err(e) => {
                return Err(Refusal(
                    ErrorCode::StorageFailure,
                    format!(
                        "the conversation could not be created ({e}); the message was not \
                         accepted, send it again"
                    ),
                ));
            }
        }
    }
    Err(Refusal(
        ErrorCode::Internal,
        "could not allocate a conversation id".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_storage::{ConvId, MemMeta, Seq};
    use std::cell::RefCell;
    use std::rc::Rc;

    fn meta_with_users(users: &[u64]) -> Arc<MemMeta> {
        let meta = Arc::new(MemMeta::new());
        let mut b = MetaBatch::default();
        for &u in users {
            b.put(&User {
                id: UserId(u),
                phone_e164: format!("+1555000{u}"),
                display_name: format!("user{u}"),
                password_hash: None,
                created_ms: TimestampMs(0),
                account: None,
            });
        }
        meta.commit(&b).unwrap();
        meta
    }

    fn block(user: u64, target: u64, block: bool) -> Job {
        Job::Block {
            user: UserId(user),
            target: UserId(target),
            block,
            now_ms: 5,
        }
    }

    /// Jobs an offload was handed, run when the test says.
    type Jobs = Rc<RefCell<Vec<Box<dyn FnOnce() + Send>>>>;

    fn offloaded(meta: &Arc<MemMeta>, blocks_max: usize) -> (MetaWriter<u32>, Jobs) {
        let jobs = Jobs::default();
        let mut w = MetaWriter::new(blocks_max);
        let j = jobs.clone();
        w.set_offload(meta.clone(), Box::new(move |job| j.borrow_mut().push(job)));
        (w, jobs)
    }

    #[test]
    fn outcomes_come_back_in_submission_order_whatever_order_jobs_finish_in() {
        let meta = meta_with_users(&[1, 2, 3]);
        let (mut w, jobs) = offloaded(&meta, 10);
        w.submit(&*meta, block(1, 2, true), 1);
        w.submit(&*meta, block(1, 3, true), 2);
        w.submit(&*meta, block(1, 9, true), 3);
        assert_eq!(w.queued(), 3);
        assert!(w.poll().is_none(), "nothing ran yet");
        // The last job finishes first: its outcome waits for the others'.
        let mut pending = std::mem::take(&mut *jobs.borrow_mut());
        (pending.pop().unwrap())();
        assert!(w.poll().is_none());
        for job in pending {
            job();
        }
        let got: Vec<(u32, Outcome)> = std::iter::from_fn(|| w.poll()).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, 1);
        assert_eq!(got[1].0, 2);
        assert_eq!(
            got[2],
            (3, Err(Refusal(ErrorCode::NotFound, "no such user".into())))
        );
        assert_eq!(w.queued(), 0);
    }

    #[test]
    fn a_job_dropped_without_running_still_gets_an_outcome() {
        let meta = meta_with_users(&[1, 2]);
        let (mut w, jobs) = offloaded(&meta, 10);
        w.submit(&*meta, block(1, 2, true), 7);
        jobs.borrow_mut().clear(); // the writer thread is gone
        let (tag, outcome) = w.poll().expect("an outcome");
        assert_eq!(tag, 7);
        let Err(Refusal(code, msg)) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(code, ErrorCode::StorageFailure);
        assert!(msg.contains("nothing was recorded"), "{msg}");
    }

    #[test]
    fn blocks_are_validated_idempotent_and_counted() {
        let meta = meta_with_users(&[1, 2, 3, 4]);
        let mut w: MetaWriter<()> = MetaWriter::new(2);
        let mut one = |job| {
            w.submit(&*meta, job, ());
            w.poll().expect("inline jobs complete at once").1
        };
        assert_eq!(
            one(block(1, 77, true)),
            Err(Refusal(ErrorCode::NotFound, "no such user".into()))
        );
        let writes = meta.writes();
        assert_eq!(
            one(block(1, 2, true)),
            Ok(Written::Block {
                changed: true,
                conv: None
            })
        );
        assert_eq!(meta.writes(), writes + 1);
        // Again: in effect already, nothing written.
        assert_eq!(
            one(block(1, 2, true)),
            Ok(Written::Block {
                changed: false,
                conv: None
            })
        );
        assert_eq!(meta.writes(), writes + 1);
        assert!(one(block(1, 3, true)).is_ok());
        let Err(Refusal(code, msg)) = one(block(1, 4, true)) else {
            panic!("a third block passed the limit of 2")
        };
        assert_eq!(code, ErrorCode::PermissionDenied);
        assert!(msg.contains("unblock someone first"), "{msg}");
        // Unblocking one makes room; unblocking someone not blocked writes nothing.
        assert!(one(block(1, 2, false)).is_ok());
        let writes = meta.writes();
        assert_eq!(
            one(block(1, 2, false)),
            Ok(Written::Block {
                changed: false,
                conv: None
            })
        );
        assert_eq!(meta.writes(), writes);
        assert!(one(block(1, 4, true)).is_ok());
        // Another user has a count of their own.
        assert!(one(block(2, 1, true)).is_ok());
    }

    #[test]
    fn a_block_of_an_id_that_names_nobody_can_still_be_undone() {
        let meta = meta_with_users(&[1]);
        // Written before targets were checked.
        let mut b = MetaBatch::default();
        b.put(&Block {
            user: UserId(1),
            blocked: UserId(404),
            created_ms: TimestampMs(1),
        });
        meta.commit(&b).unwrap();
        let mut w: MetaWriter<()> = MetaWriter::new(10);
        let mut one = |job| {
            w.submit(&*meta, job, ());
            w.poll().unwrap().1
        };
        assert_eq!(
            one(block(1, 404, true)).map_err(|r| r.0),
            Err(ErrorCode::NotFound)
        );
        assert_eq!(
            one(block(1, 404, false)),
            Ok(Written::Block {
                changed: true,
                conv: None
            })
        );
        assert_eq!(
            one(block(1, 404, false)).map_err(|r| r.0),
            Err(ErrorCode::NotFound)
        );
    }

    #[test]
    fn a_failed_write_is_reported_and_counted_again() {
        let meta = meta_with_users(&[1, 2, 3]);
        let mut w: MetaWriter<()> = MetaWriter::new(1);
        let mut one = |job| {
            w.submit(&*meta, job, ());
            w.poll().unwrap().1
        };
        meta.set_fail_writes(true);
        let Err(Refusal(code, msg)) = one(block(1, 2, true)) else {
            panic!()
        };
        assert_eq!(code, ErrorCode::StorageFailure);
        assert!(msg.contains("send it again"), "{msg}");
        let cursors = Job::Cursors {
            delivery: vec![DeliveryCursor {
                conv: ConvId(5),
                user: UserId(1),
                device: starling_storage::DeviceId(1),
                seq: Seq(3),
            }],
            read: Vec::new(),
            floors: Vec::new(),
        };
        let Err(Refusal(code, msg)) = one(cursors) else {
            panic!()
        };
        assert_eq!(code, ErrorCode::StorageFailure);
        assert!(
            msg.contains("not recorded") && msg.contains("sent again"),
            "{msg}"
        );
        meta.set_fail_writes(false);
        assert!(one(block(1, 2, true)).is_ok());
        assert_eq!(
            one(block(1, 3, true)).map_err(|r| r.0),
            Err(ErrorCode::PermissionDenied)
        );
    }

    #[test]
    fn a_direct_conversation_is_created_once_and_found_after() {
        let meta = meta_with_users(&[1, 2]);
        let mut w: MetaWriter<()> = MetaWriter::new(10);
        let mut one = |job| {
            w.submit(&*meta, job, ());
            w.poll().unwrap().1
        };
        let create = || Job::CreateDirect {
            low: UserId(1),
            high: UserId(2),
            now_ms: 9,
        };
        let Ok(Written::Direct { conv }) = one(create()) else {
            panic!()
        };
        let writes = meta.writes();
        assert_eq!(one(create()), Ok(Written::Direct { conv }));
        assert_eq!(meta.writes(), writes, "found, not written again");
        // A block between them now names the conversation, for its owner's cache.
        assert_eq!(
            one(block(2, 1, true)),
            Ok(Written::Block {
                changed: true,
                conv: Some(conv)
            })
        );
    }
}
