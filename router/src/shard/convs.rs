//! The conversations this shard owns, as far as they are in memory: each one's members, its
//! sequencing counters and durable tail ([`ConvSeq`]), its cursors ([`ConvCursors`]) and, for a
//! direct conversation, its cached blocks. A state is loaded on first use (members from the
//! metadata, the last seq from the index, cursors from the cursor store) and dropped again once
//! it has been idle for `conv_idle_evict_ms` and holds nothing the index and the metadata do
//! not, so memory follows the active conversations and a reload is exact.

use std::collections::VecDeque;
use std::collections::hash_map::Entry as Slot;
use std::sync::Arc;

use starling_protocol::v1::ErrorCode;
use starling_storage::conv_delivered::ConvDelivered;
use starling_storage::message_state::MessageState;
use starling_storage::meta::{DirectConv, MemberOf, keys};
use starling_storage::{
    ClientMsgId, CursorStore, DeviceId, Entry, Lsn, MessageIndex, MetadataStore, Seq, UserId,
};

use super::frames::Refusal;
use super::group_receipts::RecentSent;
use super::groups::GroupConv;
use super::mail::SendCmd;
use crate::hash::HashMap;
use crate::ids::ConvId;

/// Over the cap of loaded states, sweeps come at most this often (so that a shard whose every
/// state is in use does not spin).
const OVER_CAP_SWEEP_MS: u64 = 10;

/// Most conversation states one eviction sweep examines, so that a sweep never holds the shard
/// thread for long (the rest wait for the next tick).
const EVICT_SCAN_MAX: usize = 1024;

/// One conversation's state at its owner shard.
pub(super) struct ConvState {
    /// Who gets its messages, in ascending order (looked up by binary search).
    pub(super) members: Arc<[UserId]>,
    /// For a direct conversation: the two users (equal for a note to self).
    pub(super) pair: Option<(UserId, UserId)>,
    /// For a direct conversation: (first blocks second, second blocks first) of `pair`, read
    /// from metadata on first use and forgotten when a Block/Unblock of the pair is committed.
    pub(super) blocks: Option<(bool, bool)>,
    /// Moves each time `blocks` is forgotten (a Block/Unblock of the pair was committed): a
    /// block lookup off the shard thread is used only at the epoch it was planned in.
    pub(super) block_epoch: u64,
    pub(super) title: String,
    /// For a group: its members, roles, settings and change in progress (`shard/groups`).
    pub(super) group: Option<Box<GroupConv>>,
    pub(super) seq: ConvSeq,
    pub(super) cursors: ConvCursors,
    /// `now_ms` of the last use (for eviction).
    touched_ms: u64,
}

/// A conversation's sequencing state: its counters, the Sends accepted and not yet durable, and
/// its durable tail (entries durable but possibly not yet in the index).
pub(super) struct ConvSeq {
    /// The seq the next accepted message gets.
    pub(super) next_seq: u64,
    /// Highest durable seq (every seq up to it is durable).
    pub(super) durable_seq: u64,
    /// Durable entries the index may not show yet (pruned once `indexed_lsn` covers them).
    pub(super) recent: VecDeque<(Lsn, Arc<Entry>)>,
    /// client_msg_id → (seq, ts, expiry, batch number) of accepted, not yet durable messages.
    pub(super) pending: HashMap<ClientMsgId, (u64, u64, u64, u64)>,
    /// client_msg_id → (seq, ts, expiry) of durable entries in `recent`.
    pub(super) recent_ids: HashMap<ClientMsgId, (u64, u64, u64)>,
    /// Message states being written (`changes.rs`): seq → (the newest state, writes in
    /// flight). The next change of the same message starts from it, not from the metadata.
    pub(super) states: HashMap<u64, (MessageState, u32)>,
    /// client_msg_id → retries of a change whose state is being written (they are answered
    /// once it is sequenced).
    pub(super) committing: HashMap<ClientMsgId, Vec<SendCmd>>,
    /// Whether any message of the conversation has a state record (`None`: not looked up
    /// since it was loaded). Serving a conversation that never had a change costs one lookup,
    /// not one per message.
    pub(super) has_states: Option<bool>,
    /// Moves when a message state's write starts and when it ends: a state read off the
    /// shard thread is used only at the epoch it was planned in (`reads.rs`), so it never
    /// misses a change committed meanwhile.
    pub(super) state_epoch: u64,
    /// The disappearing-messages timer in force, in seconds (0: off): it stamps the expiry of
    /// every message and change sequenced now (`disappearing.rs`).
    pub(super) timer_secs: u64,
    /// Timer settings being written to the metadata.
    pub(super) timer_writes: u32,
}

/// A conversation's delivery and read cursors, and what of them was announced as receipts.
#[derive(Default)]
pub(super) struct ConvCursors {
    /// Delivery cursors (possibly not yet durable).
    pub(super) delivery: HashMap<(UserId, DeviceId), u64>,
    /// Per user: the highest delivery cursor of any of their devices.
    pub(super) delivered: HashMap<UserId, u64>,
    /// Read cursors (possibly not yet durable).
    pub(super) read: HashMap<UserId, u64>,
    /// Per user: the delivered / read seq last made durable and announced.
    pub(super) announced_delivered: HashMap<UserId, u64>,
    pub(super) announced_read: HashMap<UserId, u64>,
    /// For a group: its latest messages whose aggregate receipts go to their senders.
    pub(super) sent: RecentSent,
    /// When every member had received what, as durably recorded (`ConvDelivered` steps), for
    /// the server's retention after delivery.
    pub(super) steps: Arc<[(u64, u64)]>,
}

impl ConvState {
    /// `conv` as the stores have it: members from the metadata, the last seq from the index,
    /// cursors from the cursor store (all of them announced: they are durable).
    pub(super) fn load<I, M>(
        conv: ConvId,
        index: &I,
        meta: &M,
        now_ms: u64,
    ) -> Result<ConvState, Refusal>
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        let (members, pair, title, group) = if conv.is_group() {
            let g = GroupConv::load(meta, index, conv)?
                .ok_or_else(|| Refusal(ErrorCode::NotFound, "no such conversation".into()))?;
            (
                g.st.in_members(),
                None,
                g.st.name.clone(),
                Some(Box::new(g)),
            )
        } else {
            let (members, pair, title) = load_members(meta, conv)?;
            (members, pair, title, None)
        };
        let cid = conv.storage();
        let last = index
            .last_seq(cid)
            .map_err(|e| Refusal::storage("index", &e))?
            .0;
        let timer_secs = super::disappearing::load(meta, cid)?;
        // Whether any message has a state (a change): known with the state, so serving a page
        // never has to look it up.
        let has_states = !meta
            .scan::<MessageState>(&cid.0.to_be_bytes(), 1)
            .map_err(|e| Refusal::storage("message state", &e))?
            .is_empty();
        let mut st = ConvState {
            members,
            pair,
            blocks: None,
            block_epoch: 0,
            title,
            group,
            seq: ConvSeq {
                timer_secs,
                has_states: Some(has_states),
                ..ConvSeq::new(last)
            },
            cursors: ConvCursors::default(),
            touched_ms: now_ms,
        };
        let cursors = &mut st.cursors;
        for c in meta
            .delivery_cursors(cid)
            .map_err(|e| Refusal::storage("cursors", &e))?
        {
            cursors.delivery.insert((c.user, c.device), c.seq.0);
            let d = cursors.delivered.entry(c.user).or_default();
            *d = (*d).max(c.seq.0);
        }
        // Members, and a group's former members (their unread counts end at their removal).
        let former = st
            .group
            .as_ref()
            .map(|g| g.st.former.keys().copied().collect::<Vec<_>>());
        for u in st.members.iter().chain(former.iter().flatten()) {
            let r = meta
                .read_cursor(cid, *u)
                .map_err(|e| Refusal::storage("cursors", &e))?
                .0;
            if r > 0 {
                cursors.read.insert(*u, r);
            }
        }
        cursors.steps = meta
            .get::<ConvDelivered>(&ConvDelivered::key_of(cid))
            .map_err(|e| Refusal::storage("delivery steps", &e))?
            .map_or_else(|| Arc::from(Vec::new()), |r| Arc::from(r.steps));
        cursors.announced_delivered = cursors.delivered.clone();
        cursors.announced_read = cursors.read.clone();
        Ok(st)
    }
}

impl ConvState {
    /// The seqs `user` may read (inclusive): a group's rules (`shard/groups`), or everything
    /// for a member of a direct conversation. `NOT_A_MEMBER` if none.
    pub(super) fn visible(&self, user: UserId) -> Result<(u64, u64), Refusal> {
        let seen = match &self.group {
            Some(g) => g.st.visible(user),
            None => self.members.contains(&user).then_some((1, u64::MAX)),
        };
        seen.ok_or_else(|| {
            Refusal(
                ErrorCode::NotAMember,
                "not a member of this conversation".into(),
            )
        })
    }
}

impl ConvSeq {
    /// The state of a conversation whose last durable seq is `last`.
    fn new(last: u64) -> ConvSeq {
        ConvSeq {
            next_seq: last + 1,
            durable_seq: last,
            recent: VecDeque::new(),
            pending: HashMap::default(),
            recent_ids: HashMap::default(),
            states: HashMap::default(),
            committing: HashMap::default(),
            has_states: None,
            timer_secs: 0,
            timer_writes: 0,
            state_epoch: 0,
        }
    }

    /// Whether every accepted message is durable and in the index.
    pub(super) fn settled(&self) -> bool {
        self.pending.is_empty()
            && self.recent.is_empty()
            && self.next_seq == self.durable_seq + 1
            && self.states.is_empty()
            && self.committing.is_empty()
    }

    /// Durable entries of `conv` with seq > `after`, oldest first, at most `limit`: from the
    /// index, then from the tail it may not cover yet (the index is not read if the tail covers
    /// it all).
    pub(super) fn read_after<I: MessageIndex>(
        &self,
        index: &I,
        conv: ConvId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, Refusal> {
        let key = super::reader::Want::After { conv, after, limit };
        if let Some(v) = self.tail_page(key) {
            return Ok(v);
        }
        let mut out: Vec<Arc<Entry>> = index
            .after(conv.storage(), Seq(after), limit)
            .map_err(|e| Refusal::storage("index", &e))?
            .into_iter()
            .filter(|e| e.seq.0 <= self.durable_seq)
            .map(Arc::new)
            .collect();
        let mut last = out.last().map_or(after, |e| e.seq.0);
        for (_, e) in &self.recent {
            if out.len() >= limit {
                break;
            }
            if Some(e.seq.0) == last.checked_add(1) {
                out.push(e.clone());
                last = e.seq.0;
            }
        }
        Ok(out)
    }

    /// Durable entries of `conv` with seq < `before`, newest `limit` of them, oldest first: from
    /// the tail, then from the index.
    pub(super) fn read_before<I: MessageIndex>(
        &self,
        index: &I,
        conv: ConvId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, Refusal> {
        let (mut newest, next) = self.tail_before(before, limit);
        if newest.len() < limit && next > 1 {
            let older = index
                .before(conv.storage(), Seq(next), limit - newest.len())
                .map_err(|e| Refusal::storage("index", &e))?;
            for e in older.into_iter().rev() {
                newest.push(Arc::new(e));
            }
        }
        newest.reverse();
        Ok(newest)
    }

    /// The tail's entries with seq > `after`, at most `limit`, oldest first.
    pub(super) fn tail_after(&self, after: u64, limit: usize) -> Vec<Arc<Entry>> {
        self.recent
            .iter()
            .filter(|(_, e)| e.seq.0 > after)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The tail's newest entries below `before` (capped at the durable end), contiguous, at
    /// most `limit`, newest first; and the seq below which the index must go on.
    pub(super) fn tail_before(&self, before: u64, limit: usize) -> (Vec<Arc<Entry>>, u64) {
        let before = before.min(self.durable_seq + 1);
        let mut newest: Vec<Arc<Entry>> = Vec::new();
        let mut next = before; // collecting seqs below this, descending
        for (_, e) in self.recent.iter().rev() {
            if newest.len() >= limit {
                break;
            }
            if e.seq.0 + 1 == next {
                newest.push(e.clone());
                next -= 1;
            }
        }
        (newest, next)
    }
}

impl ConvCursors {
    /// Whether every cursor's value was announced (and so is durable).
    pub(super) fn announced(&self) -> bool {
        self.announced_delivered == self.delivered && self.announced_read == self.read
    }
}

/// The conversation states in memory.
#[derive(Default)]
pub(super) struct Convs {
    /// Boxed: growing the map rehashes 16-byte entries, not whole conversation states (~0.4 KB
    /// each), which at a million conversations would stall the shard for most of a second.
    map: HashMap<ConvId, Box<ConvState>>,
    /// Every loaded conversation once, oldest check first: (conv, `touched_ms` when queued).
    idle_queue: VecDeque<(ConvId, u64)>,
    /// (lsn, conv) of entries in some `ConvSeq::recent`, in lsn order.
    recent_order: VecDeque<(Lsn, ConvId)>,
    /// Groups loaded with a change whose event may be missing: the groups concern takes them
    /// (`groups::resume`) before the shard's next input.
    pub(super) resume: Vec<ConvId>,
}

impl Convs {
    /// How many states are in memory.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The state of `conv`, if it is in memory.
    pub(super) fn get(&self, conv: ConvId) -> Option<&ConvState> {
        self.map.get(&conv).map(|c| &**c)
    }

    /// The state of `conv`, if it is in memory.
    pub(super) fn get_mut(&mut self, conv: ConvId) -> Option<&mut ConvState> {
        self.map.get_mut(&conv).map(|c| &mut **c)
    }

    /// Every state in memory.
    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut ConvState> {
        self.map.values_mut().map(|c| &mut **c)
    }

    /// The state of `conv`, loaded on first use; either way marked used at `now_ms`.
    pub(super) fn load<I, M>(
        &mut self,
        conv: ConvId,
        index: &I,
        meta: &M,
        now_ms: u64,
    ) -> Result<&mut ConvState, Refusal>
    where
        I: MessageIndex,
        M: MetadataStore + CursorStore,
    {
        let c = match self.map.entry(conv) {
            Slot::Occupied(o) => o.into_mut(),
            Slot::Vacant(v) => {
                let st = ConvState::load(conv, index, meta, now_ms)?;
                if st.group.as_ref().is_some_and(|g| g.needs_resume()) {
                    self.resume.push(conv);
                }
                self.idle_queue.push_back((conv, now_ms));
                v.insert(Box::new(st))
            }
        };
        c.touched_ms = now_ms;
        Ok(&mut **c)
    }

    /// Puts in `st`, read off the shard thread (`reads.rs`), as the state of `conv`, which is
    /// not loaded; marked used at `now_ms`.
    pub(super) fn install(&mut self, conv: ConvId, st: Box<ConvState>, now_ms: u64) {
        if st.group.as_ref().is_some_and(|g| g.needs_resume()) {
            self.resume.push(conv);
        }
        self.idle_queue.push_back((conv, now_ms));
        let c = self.map.entry(conv).or_insert(st);
        c.touched_ms = now_ms;
    }

    /// Reads the members and title of direct conversation `conv` again, if its state is in
    /// memory (a group's state changes only through the groups concern, `shard/groups`).
    pub(super) fn reload_members<M: MetadataStore>(&mut self, conv: ConvId, meta: &M) {
        if let Some(c) = self.map.get_mut(&conv)
            && c.group.is_none()
            && let Ok((members, _, title)) = load_members(meta, conv)
        {
            c.members = members;
            c.title = title;
        }
    }

    /// Drops the states of conversations idle for `idle_ms` that are `evictable` (hold nothing
    /// the index and the metadata do not: exactly what [`Convs::load`] would load again), and
    /// while more than `max` are loaded, the least recently queued evictable ones that were not
    /// used since they were queued. At most [`EVICT_SCAN_MAX`] are examined per call. Returns
    /// how many were dropped.
    pub(super) fn evict_idle(
        &mut self,
        now_ms: u64,
        idle_ms: u64,
        max: usize,
        evictable: impl Fn(ConvId, &ConvState) -> bool,
    ) -> u64 {
        let mut evicted = 0;
        for _ in 0..EVICT_SCAN_MAX {
            let Some(&(conv, queued)) = self.idle_queue.front() else {
                break;
            };
            // Not idle long enough, and either under the cap or queued in this very call (the
            // queue has come round).
            if queued.saturating_add(idle_ms) > now_ms
                && (self.map.len() <= max || queued >= now_ms)
            {
                break;
            }
            self.idle_queue.pop_front();
            let Some(c) = self.map.get(&conv) else {
                continue;
            };
            if c.touched_ms <= queued && evictable(conv, c) {
                self.map.remove(&conv);
                evicted += 1;
            } else {
                // Used since, or something still in flight: look again one idle period from
                // now (keeps the queue in order).
                self.idle_queue.push_back((conv, now_ms));
            }
        }
        evicted
    }

    /// When the next eviction sweep has something to look at (at or before now until it has
    /// caught up; while more than `max` states are loaded, every [`OVER_CAP_SWEEP_MS`]).
    pub(super) fn evict_due_ms(&self, idle_ms: u64, max: usize) -> Option<u64> {
        self.idle_queue.front().map(|&(_, t)| {
            if self.map.len() > max {
                t.saturating_add(idle_ms.min(OVER_CAP_SWEEP_MS))
            } else {
                t.saturating_add(idle_ms)
            }
        })
    }

    /// Every conversation whose state is in memory.
    pub(super) fn ids(&self) -> Vec<ConvId> {
        self.map.keys().copied().collect()
    }

    /// The shard's log was reopened in place, cut back to what it had made durable, with
    /// `index` covering all of it: the states of `dropped` go (they load again on next use);
    /// every other state's counters are read again from the index (a seq handed out after the
    /// last durable one is void) and its durable tail forgotten (the index has it all). Sends
    /// pending at the failure were answered then. A state whose counter cannot be read is
    /// dropped too.
    pub(super) fn log_reopened<I: MessageIndex>(&mut self, index: &I, dropped: &[ConvId]) {
        for conv in dropped {
            self.map.remove(conv);
        }
        self.recent_order.clear();
        self.map.retain(|conv, c| {
            let Ok(last) = index.last_seq(conv.storage()) else {
                return false;
            };
            c.seq.next_seq = last.0 + 1;
            c.seq.durable_seq = last.0;
            c.seq.pending.clear();
            c.seq.recent.clear();
            c.seq.recent_ids.clear();
            true
        });
    }

    /// The entry at `lsn` joined the durable tail of `conv` (`ConvSeq::recent`).
    pub(super) fn tail_added(&mut self, lsn: Lsn, conv: ConvId) {
        self.recent_order.push_back((lsn, conv));
    }

    /// Drops from the durable tails what the index covers (everything up to `indexed`), in lsn
    /// order, stopping at the first entry of a conversation `held` says a parked message holds:
    /// its tail (and so its in-memory dedup) stays until the message is handled, so that parking
    /// never shortens what memory catches (`reads.rs`).
    pub(super) fn prune_tails(&mut self, indexed: Lsn, held: impl Fn(ConvId) -> bool) {
        while let Some(&(lsn, conv)) = self.recent_order.front() {
            if lsn > indexed || held(conv) {
                break;
            }
            self.recent_order.pop_front();
            if let Some(c) = self.map.get_mut(&conv)
                && let Some((l, e)) = c.seq.recent.front()
                && *l <= lsn
            {
                c.seq.recent_ids.remove(&e.client_msg_id);
                c.seq.recent.pop_front();
            }
        }
    }
}

/// Members, the user pair and the title of a direct conversation.
type Members = (Arc<[UserId]>, Option<(UserId, UserId)>, String);

fn load_members<M: MetadataStore>(meta: &M, conv: ConvId) -> Result<Members, Refusal> {
    let key = conv.storage().0.to_be_bytes();
    let d = meta
        .get::<DirectConv>(&key)
        .map_err(|e| Refusal::storage("conversation", &e))?;
    let Some(d) = d else {
        return Err(Refusal(ErrorCode::NotFound, "no such conversation".into()));
    };
    let mut members = vec![d.low, d.high];
    members.dedup();
    Ok((members.into(), Some((d.low, d.high)), String::new()))
}

/// The conversations `user` is or was a member of (`MemberOf`), direct and group alike (a
/// former member of a group keeps it: it reads up to its removal).
pub(super) fn conversations_of<M: MetadataStore>(
    meta: &M,
    user: UserId,
) -> Result<Vec<ConvId>, Refusal> {
    Ok(meta
        .scan::<MemberOf>(&keys::user(user), usize::MAX)
        .map_err(|e| Refusal::storage("membership", &e))?
        .into_iter()
        .map(|m| ConvId::from_storage(m.group))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_storage::meta::{Member, Role, User};
    use starling_storage::{
        DeliveryCursor, EntryKind, MemMeta, MetaBatch, ReadCursor, StorageError, TimestampMs,
    };

    const CONV: ConvId = ConvId(3);

    fn entry(seq: u64) -> Entry {
        Entry {
            kind: EntryKind::MESSAGE,
            conv: CONV.storage(),
            seq: Seq(seq),
            client_msg_id: ClientMsgId([seq as u8; 16]),
            sender: UserId(1),
            sender_device: DeviceId(1),
            ts_ms: TimestampMs(seq),
            content_type: 1,
            body: Vec::new(),
        }
    }

    /// An index of conversation [`CONV`] holding seqs `1..=last`.
    struct Index {
        last: u64,
    }

    impl MessageIndex for Index {
        fn latest(
            &self,
            conv: starling_storage::ConvId,
            limit: usize,
        ) -> Result<Vec<Entry>, StorageError> {
            self.before(conv, Seq(u64::MAX), limit)
        }
        fn before(
            &self,
            _: starling_storage::ConvId,
            seq: Seq,
            limit: usize,
        ) -> Result<Vec<Entry>, StorageError> {
            let hi = seq.0.min(self.last + 1);
            Ok((hi.saturating_sub(limit as u64).max(1)..hi)
                .map(entry)
                .collect())
        }
        fn after(
            &self,
            _: starling_storage::ConvId,
            seq: Seq,
            limit: usize,
        ) -> Result<Vec<Entry>, StorageError> {
            Ok((seq.0 + 1..=self.last).take(limit).map(entry).collect())
        }
        fn entry(
            &self,
            _: starling_storage::ConvId,
            seq: Seq,
        ) -> Result<Option<Entry>, StorageError> {
            Ok((1..=self.last).contains(&seq.0).then(|| entry(seq.0)))
        }
        fn last_seq(&self, _: starling_storage::ConvId) -> Result<Seq, StorageError> {
            Ok(Seq(self.last))
        }
        fn dedup(
            &self,
            _: starling_storage::ConvId,
            _: ClientMsgId,
        ) -> Result<Option<Seq>, StorageError> {
            Ok(None)
        }
        fn indexed_lsn(&self) -> Lsn {
            Lsn(self.last)
        }
    }

    fn seqs(v: &[Arc<Entry>]) -> Vec<u64> {
        v.iter().map(|e| e.seq.0).collect()
    }

    /// Seqs 1..=5 indexed, 6..=8 durable in the tail only.
    fn with_tail() -> (ConvSeq, Index) {
        let mut s = ConvSeq::new(8);
        for seq in 6..=8 {
            s.recent.push_back((Lsn(seq), Arc::new(entry(seq))));
        }
        (s, Index { last: 5 })
    }

    #[test]
    fn reads_join_the_index_and_the_durable_tail_without_gaps_or_repeats() {
        let (s, ix) = with_tail();
        assert_eq!(
            seqs(&s.read_after(&ix, CONV, 0, 100).unwrap()),
            (1..=8).collect::<Vec<_>>()
        );
        assert_eq!(seqs(&s.read_after(&ix, CONV, 4, 3).unwrap()), [5, 6, 7]);
        assert_eq!(seqs(&s.read_after(&ix, CONV, 7, 10).unwrap()), [8]);
        assert!(s.read_after(&ix, CONV, 8, 10).unwrap().is_empty());
        assert_eq!(
            seqs(&s.read_before(&ix, CONV, u64::MAX, 4).unwrap()),
            [5, 6, 7, 8]
        );
        assert_eq!(seqs(&s.read_before(&ix, CONV, 7, 2).unwrap()), [5, 6]);
        assert_eq!(seqs(&s.read_before(&ix, CONV, 4, 10).unwrap()), [1, 2, 3]);
        // The index caught up with part of the tail: nothing is read twice.
        let ix = Index { last: 7 };
        assert_eq!(seqs(&s.read_after(&ix, CONV, 5, 10).unwrap()), [6, 7, 8]);
        // Nothing past the durable end, even if the index had it.
        let mut s = ConvSeq::new(4);
        s.next_seq = 6;
        assert_eq!(
            seqs(&s.read_after(&Index { last: 5 }, CONV, 0, 10).unwrap()),
            [1, 2, 3, 4]
        );
        assert_eq!(
            seqs(&s.read_before(&Index { last: 5 }, CONV, 9, 2).unwrap()),
            [3, 4]
        );
    }

    fn meta() -> MemMeta {
        let meta = MemMeta::new();
        let mut b = MetaBatch::default();
        b.put(&DirectConv {
            conv: CONV.storage(),
            low: UserId(1),
            high: UserId(2),
            created_ms: TimestampMs(0),
        });
        for u in [1, 2] {
            b.put(&User {
                id: UserId(u),
                phone_e164: String::new(),
                display_name: String::new(),
                password_hash: None,
                created_ms: TimestampMs(0),
                account: None,
            });
            b.add_member(&Member {
                group: CONV.storage(),
                user: UserId(u),
                role: Role::Member,
                joined_ms: TimestampMs(0),
                joined_seq: None,
            });
        }
        meta.commit(&b).unwrap();
        meta
    }

    #[test]
    fn a_state_loads_members_seqs_and_cursors_and_is_evicted_only_when_idle_and_settled() {
        let meta = meta();
        meta.advance_delivery(&[DeliveryCursor {
            conv: CONV.storage(),
            user: UserId(2),
            device: DeviceId(4),
            seq: Seq(3),
        }])
        .unwrap();
        meta.advance_read(&[ReadCursor {
            conv: CONV.storage(),
            user: UserId(2),
            seq: Seq(2),
        }])
        .unwrap();
        let ix = Index { last: 5 };
        let mut convs = Convs::default();
        let c = convs.load(CONV, &ix, &meta, 100).unwrap();
        assert_eq!(&c.members[..], [UserId(1), UserId(2)]);
        assert_eq!(c.pair, Some((UserId(1), UserId(2))));
        assert_eq!((c.seq.next_seq, c.seq.durable_seq), (6, 5));
        assert_eq!(c.cursors.delivered[&UserId(2)], 3);
        assert_eq!(c.cursors.read[&UserId(2)], 2);
        assert!(c.seq.settled() && c.cursors.announced());
        assert_eq!(conversations_of(&meta, UserId(2)).unwrap(), [CONV]);
        assert!(matches!(
            convs.load(ConvId(99), &ix, &meta, 100).map(|_| ()),
            Err(Refusal(ErrorCode::NotFound, _))
        ));
        // Not idle long enough yet; then used again meanwhile: looked at again later.
        assert_eq!(convs.evict_due_ms(50, usize::MAX), Some(150));
        assert_eq!(convs.evict_idle(149, 50, usize::MAX, |_, _| true), 0);
        convs.load(CONV, &ix, &meta, 120).unwrap();
        assert_eq!(convs.evict_idle(150, 50, usize::MAX, |_, _| true), 0);
        assert_eq!(convs.evict_due_ms(50, usize::MAX), Some(200));
        // Idle, but holding something the stores do not: kept.
        assert_eq!(convs.evict_idle(200, 50, usize::MAX, |_, _| false), 0);
        assert_eq!(convs.len(), 1);
        assert_eq!(
            convs.evict_idle(250, 50, usize::MAX, |conv, c| conv == CONV
                && c.seq.settled()),
            1
        );
        assert_eq!(convs.len(), 0);
        assert_eq!(convs.evict_due_ms(50, usize::MAX), None);
    }

    #[test]
    fn over_the_cap_states_go_before_their_idle_time_used_ones_after_a_second_chance() {
        let meta = meta();
        let ix = Index { last: 5 };
        let mut convs = Convs::default();
        convs.load(CONV, &ix, &meta, 100).unwrap();
        // Under the cap: only once idle.
        assert_eq!(convs.evict_due_ms(50, 1), Some(150));
        assert_eq!(convs.evict_idle(101, 50, 1, |_, _| true), 0);
        // Over it (a cap of 0): due now; used since it was queued, it gets a second chance.
        assert_eq!(convs.evict_due_ms(50, 0), Some(110));
        convs.load(CONV, &ix, &meta, 110).unwrap();
        assert_eq!(convs.evict_idle(111, 50, 0, |_, _| true), 0);
        assert_eq!(convs.len(), 1);
        // Holding something in flight: kept even over the cap.
        assert_eq!(convs.evict_idle(112, 50, 0, |_, _| false), 0);
        assert_eq!(convs.evict_idle(113, 50, 0, |_, _| true), 1);
        assert_eq!(convs.len(), 0);
    }

    #[test]
    fn the_tail_is_pruned_as_the_index_covers_it() {
        let meta = meta();
        let mut convs = Convs::default();
        let c = convs.load(CONV, &Index { last: 0 }, &meta, 0).unwrap();
        for seq in 1..=3 {
            let e = entry(seq);
            c.seq.recent_ids.insert(e.client_msg_id, (seq, seq, 0));
            c.seq.recent.push_back((Lsn(10 + seq), Arc::new(e)));
        }
        for seq in 1..=3 {
            convs.tail_added(Lsn(10 + seq), CONV);
        }
        convs.prune_tails(Lsn(12), |_| false);
        let c = convs.get(CONV).unwrap();
        assert_eq!(c.seq.recent.len(), 1);
        assert_eq!(c.seq.recent_ids.len(), 1);
        convs.prune_tails(Lsn(13), |_| false);
        assert!(convs.get(CONV).unwrap().seq.recent.is_empty());
    }
}
