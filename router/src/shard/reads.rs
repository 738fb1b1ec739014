//! Storage reads off the shard thread: the gate every message passes before the concern that
//! owns it sees it (`RouterShard::process`). See `docs/design/reads.md`.
//!
//! A message is *planned* first ([`plan`]): which reads its handler will make that memory
//! cannot answer (a conversation's state not loaded, a page of entries the durable tail does
//! not cover, a dedup lookup, a user's conversation list). None: it is handled at once. Some:
//! it is *parked*, the reads go to the [`Reader`] (each conversation's state is read once
//! however many messages wait for it), and when the last of them completes it is planned again
//! (a page can be planned only once the conversation's state is loaded) and handled with the
//! results at hand (`Shared::got`), so the handler's reads are answered from memory.
//!
//! **Order.** A message that writes to a conversation (a Send, a cursor, a group change, a
//! Typing, a Block's answer) *holds* it while parked: later messages for the same conversation
//! park behind it and are handled after it, in arrival order, so that a connection's Sends keep
//! their order and a state read before a write is never used after it. Reads (Sync, history,
//! the conversation list, receipts, downloads) hold nothing: they answer as of when they are
//! handled.
//!
//! **A page** is read as of when it was planned: what the durable tail held then (copied) and
//! what the index holds when the job runs (which covers everything the tail had already let
//! go), merged when the job completes. Results are exact whatever the order jobs finish in.
//!
//! **A state** read while the conversation was loaded some other way (the inline path) is
//! void, as is every result read before the log was reopened in place (`epoch`): both are read
//! again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use starling_storage::{CursorStore, Entry, MessageIndex, MetadataStore, UserId};

use super::frames::Refusal;

use super::mail::Inner;
use super::reader::{Done, Got, Reader, Want};
use super::shared::Shared;
use crate::hash::HashMap;
use crate::ids::ConvId;

/// Results a parked message was handled with, by the read its handler makes.
pub(super) type GotMap = HashMap<Want, Got>;

/// A finished lookup of a direct conversation: the pair, and what was found.
pub(super) type DirectFound = ((UserId, UserId), Result<Option<ConvId>, Refusal>);

/// A message waiting for reads.
struct Parked {
    m: Inner,
    /// The conversation it holds, if any (see the module docs).
    holds: Option<ConvId>,
    /// Reads submitted for it (a state shared with others counts once for each).
    waiting: usize,
    got: GotMap,
}

/// A read in flight and what it is for.
enum Pending {
    /// A conversation's state, for every parked message in `waiters`.
    Conv {
        conv: ConvId,
        waiters: Vec<u64>,
        /// The conversation was loaded another way meanwhile: do not install this one.
        void: bool,
    },
    /// A direct conversation's lookup, for the Sends the pair's ingress holds (`direct.rs`).
    Direct { pair: (UserId, UserId) },
    /// A read of parked message `id`, answering its handler's read `key`; for a page, what the
    /// durable tail held at planning and the durable seq then.
    Of {
        id: u64,
        key: Want,
        tail: Vec<Arc<Entry>>,
        durable: u64,
    },
}

/// The gate (see the module docs).
#[derive(Default)]
pub(super) struct Reads {
    pub(super) reader: Reader,
    /// Bumped when the log is reopened in place: results read before are void.
    pub(super) epoch: u64,
    next_token: u64,
    next_id: u64,
    /// Parked messages by arrival.
    parked: BTreeMap<u64, Parked>,
    /// token → what the read is for.
    pending: HashMap<u64, Pending>,
    /// conv → token of its state's read in flight.
    loading: HashMap<ConvId, u64>,
    /// conv → the parked messages that hold it, in arrival order.
    held: HashMap<ConvId, VecDeque<u64>>,
    /// Parked messages whose reads have all completed, to plan again.
    ready: VecDeque<u64>,
    /// Finished direct lookups, for `Direct::resolved`.
    directs: Vec<DirectFound>,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reads")
            .field("reader", &self.reader)
            .field("parked", &self.parked.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Which reads of `m`'s handler memory cannot answer, added to `out`; results already in `got`
/// (and pages the durable tail covers, computed now into `got`) are not asked again.
fn plan<I, M>(sh: &Shared<I, M>, m: &Inner, got: &mut GotMap, out: &mut Vec<Want>) {
    let loaded = |conv: ConvId, got: &GotMap, out: &mut Vec<Want>| -> bool {
        if sh.convs.get(conv).is_some() {
            return true;
        }
        if !got.contains_key(&Want::Conv(conv)) {
            out.push(Want::Conv(conv));
        }
        false
    };
    match m {
        Inner::Send(cmd) => {
            if loaded(cmd.conv, got, out) {
                if let Some(w) = super::sequencer::dedup_want(sh, cmd)
                    && !got.contains_key(&w)
                {
                    out.push(w);
                }
                // A reply's or a change's target (`changes::target`).
                let targets = [
                    cmd.reply_to_seq,
                    cmd.change.as_ref().map_or(0, |c| c.target_seq),
                ];
                let keys = targets
                    .into_iter()
                    .filter(|&t| t != 0)
                    .map(|t| Want::After {
                        conv: cmd.conv,
                        after: t - 1,
                        limit: 1,
                    })
                    .collect();
                pages(sh, keys, got, out);
                // The state of a change's target, which the change starts from.
                if let Some(w) = cmd
                    .change
                    .as_ref()
                    .and_then(|ch| state(sh, cmd.conv, ch.target_seq, got))
                    && !out.contains(&w)
                {
                    out.push(w);
                }
                // A direct pair's blocks, checked before it is sequenced.
                if let Some(w) = sh
                    .convs
                    .get(cmd.conv)
                    .and_then(|c| super::blocks::want(c, cmd.conv))
                    && !got.contains_key(&w)
                    && !out.contains(&w)
                {
                    out.push(w);
                }
            }
        }
        Inner::Cursor(c) => {
            loaded(c.conv, got, out);
        }
        Inner::Receipts(r) => {
            loaded(r.conv, got, out);
        }
        Inner::Download(d) => {
            loaded(d.conv, got, out);
        }
        Inner::Typing(super::mail::TypingMsg::Cmd { conv, .. }) => {
            loaded(*conv, got, out);
        }
        Inner::Group(g) => {
            if let Some(conv) = g.state_conv() {
                loaded(conv, got, out);
            }
            // Who must exist (a user's record; its name is what the lookup reads).
            for &u in g.users_to_check() {
                let w = Want::UserName(u);
                if !got.contains_key(&w) && !out.contains(&w) {
                    out.push(w);
                }
            }
        }
        Inner::History(h) => {
            if loaded(h.conv, got, out) {
                pages(sh, super::history::reads(sh, h), got, out);
                states(sh, got, out);
            }
        }
        Inner::Sync(s) => {
            let mut all = true;
            for &(conv, _) in &s.convs {
                all &= loaded(conv, got, out);
            }
            if all {
                pages(sh, super::sync::reads(sh, s), got, out);
                states(sh, got, out);
            }
        }
        Inner::List(l) => {
            let mut all = true;
            for &conv in &l.convs {
                all &= loaded(conv, got, out);
            }
            if all {
                pages(sh, super::list::reads(sh, l), got, out);
                states(sh, got, out);
            }
        }
        Inner::SyncStart(s) => {
            let w = Want::UserConvs(s.user);
            if !got.contains_key(&w) {
                out.push(w);
            }
        }
        Inner::ListStart(l) => {
            let w = Want::UserConvs(l.user);
            if !got.contains_key(&w) {
                out.push(w);
            }
        }
        Inner::Reply { .. }
        | Inner::Fanout(_)
        | Inner::SyncPart(_)
        | Inner::ListPart(_)
        | Inner::Block(_)
        | Inner::BlockChanged { .. }
        | Inner::Presence(_)
        | Inner::Typing(_) => {}
    }
}

/// For each page a handler will read: computed now into `got` if the durable tail covers it,
/// else its index read added to `out`; other reads (a user's name) are added to `out`.
fn pages<I, M>(sh: &Shared<I, M>, keys: Vec<Want>, got: &mut GotMap, out: &mut Vec<Want>) {
    for key in keys {
        if got.contains_key(&key) || out.contains(&key) {
            continue;
        }
        if !matches!(key, Want::After { .. } | Want::Before { .. }) {
            // Not a page (a user's name): read it.
            out.push(key);
            continue;
        }
        let Some(c) = conv_of(&key).and_then(|conv| sh.convs.get(conv)) else {
            continue;
        };
        if let Some(v) = c.seq.tail_page(key) {
            got.insert(key, Got::Read(Ok(v)));
        } else {
            out.push(key);
        }
    }
}

/// The read of message `seq`'s state of `conv` (loaded), unless none is needed: the
/// conversation has no state at all, the state is being written (in memory), or it was read at
/// this epoch.
fn state<I, M>(sh: &Shared<I, M>, conv: ConvId, seq: u64, got: &GotMap) -> Option<Want> {
    let c = sh.convs.get(conv)?;
    if c.seq.has_states == Some(false) || c.seq.states.contains_key(&seq) {
        return None;
    }
    let w = Want::State {
        conv,
        seq,
        epoch: c.seq.state_epoch,
    };
    (!got.contains_key(&w)).then_some(w)
}

/// The message states serving the pages in `got` reads (`changes::present`): for each entry of
/// a conversation that has any, its own or (an edit) its target's. Planned once the pages are
/// read; a state written meanwhile moves the epoch and is read again.
fn states<I, M>(sh: &Shared<I, M>, got: &GotMap, out: &mut Vec<Want>) {
    let mut seen = crate::hash::HashSet::default();
    for (key, g) in got {
        let (Want::After { conv, .. } | Want::Before { conv, .. }, Got::Read(Ok(entries))) =
            (*key, g)
        else {
            continue;
        };
        if sh
            .convs
            .get(conv)
            .is_none_or(|c| c.seq.has_states == Some(false))
        {
            continue;
        }
        for e in entries {
            // `seen` keeps each state once (an entry and an edit of it name the same one).
            if let Some(seq) = super::changes::state_seq(conv, e)
                && seen.insert((conv, seq))
                && let Some(w) = state(sh, conv, seq, got)
            {
                out.push(w);
            }
        }
    }
}

fn conv_of(w: &Want) -> Option<ConvId> {
    match *w {
        Want::Conv(conv)
        | Want::After { conv, .. }
        | Want::Before { conv, .. }
        | Want::Dedup { conv, .. }
        | Want::State { conv, .. }
        | Want::Blocks { conv, .. } => Some(conv),
        Want::UserConvs(_) | Want::UserName(_) | Want::Direct { .. } => None,
    }
}

/// The conversation `m` holds while parked, if any (see the module docs).
fn holds(m: &Inner) -> Option<ConvId> {
    match m {
        Inner::Send(cmd) => Some(cmd.conv),
        Inner::Cursor(c) => Some(c.conv),
        Inner::Typing(super::mail::TypingMsg::Cmd { conv, .. }) => Some(*conv),
        Inner::Group(g) => g.state_conv(),
        Inner::BlockChanged { conv, .. } => Some(*conv),
        _ => None,
    }
}

impl Reads {
    /// Parked messages.
    pub(super) fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Whether `conv` is held by a parked message or has its state read (not to be evicted).
    pub(super) fn busy(&self, conv: ConvId) -> bool {
        self.held.contains_key(&conv) || self.loading.contains_key(&conv)
    }

    /// The conversation's state was loaded another way (inline): a read of it in flight is void.
    pub(super) fn loaded_inline(&mut self, conv: ConvId) {
        if let Some(t) = self.loading.remove(&conv)
            && let Some(Pending::Conv { void, .. }) = self.pending.get_mut(&t)
        {
            *void = true;
        }
    }

    /// Finished direct lookups (`Direct::resolved` takes them).
    pub(super) fn take_directs(&mut self) -> Vec<DirectFound> {
        std::mem::take(&mut self.directs)
    }

    /// The log was reopened in place: every result read before is void.
    pub(super) fn reopened(&mut self) {
        self.epoch += 1;
    }
}

impl<I, M> Shared<I, M>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    /// Drops from the durable tails what the index covers, but not past a conversation a
    /// parked message holds (see `Convs::prune_tails`).
    pub(super) fn prune_tails(&mut self) {
        let held = &self.reads.held;
        let indexed = self.index.indexed_lsn();
        if held.is_empty() {
            // Nothing parked (the hot path): no lookup per entry.
            self.convs.prune_tails(indexed, |_| false);
        } else {
            self.convs.prune_tails(indexed, |c| held.contains_key(&c));
        }
    }

    /// `m`, with the results its handler needs (an empty map if memory has them all), or
    /// `None`: it is parked until its reads complete (see the module docs).
    pub(super) fn admit(&mut self, m: Inner) -> Option<(Inner, GotMap)> {
        let holds = holds(&m);
        let behind =
            !self.reads.held.is_empty() && holds.is_some_and(|c| self.reads.held.contains_key(&c));
        let mut got = GotMap::default();
        let mut wants = Vec::new();
        // One behind others is planned now too, so that its reads run alongside theirs: what
        // they find stays true (a dedup lookup that found nothing is checked against what the
        // messages ahead sequence, which stays in memory while the conversation is held).
        plan(self, &m, &mut got, &mut wants);
        if wants.is_empty() && !behind {
            return Some((m, got));
        }
        let id = self.reads.next_id;
        self.reads.next_id += 1;
        if let Some(c) = holds {
            self.reads.held.entry(c).or_default().push_back(id);
        }
        self.reads.parked.insert(
            id,
            Parked {
                m,
                holds,
                waiting: 0,
                got,
            },
        );
        // One behind others goes once those ahead of it were handled (`next_ready`).
        self.submit(id, wants);
        None
    }

    fn submit(&mut self, id: u64, wants: Vec<Want>) {
        let now = self.now_ms;
        let epoch = self.reads.epoch;
        let mut n = 0;
        for w in wants {
            if let Want::Conv(conv) = w
                && let Some(&t) = self.reads.loading.get(&conv)
                && let Some(Pending::Conv { waiters, .. }) = self.reads.pending.get_mut(&t)
            {
                waiters.push(id);
                n += 1;
                continue;
            }
            let token = self.reads.next_token;
            self.reads.next_token += 1;
            let (job, pending) = match w {
                Want::Conv(conv) => {
                    self.reads.loading.insert(conv, token);
                    let p = Pending::Conv {
                        conv,
                        waiters: vec![id],
                        void: false,
                    };
                    (w, p)
                }
                Want::After { conv, .. } | Want::Before { conv, .. } => {
                    let c = self
                        .convs
                        .get(conv)
                        .expect("planned pages are of loaded states");
                    let (job, tail) = c.seq.page_job(w);
                    let durable = c.seq.durable_seq;
                    let p = Pending::Of {
                        id,
                        key: w,
                        tail,
                        durable,
                    };
                    (job, p)
                }
                Want::Direct { .. } => unreachable!("a lookup no message waits for"),
                Want::Dedup { .. }
                | Want::UserConvs(_)
                | Want::UserName(_)
                | Want::State { .. }
                | Want::Blocks { .. } => (
                    w,
                    Pending::Of {
                        id,
                        key: w,
                        tail: Vec::new(),
                        durable: 0,
                    },
                ),
            };
            self.reads.pending.insert(token, pending);
            self.stats.reads_submitted += 1;
            n += 1;
            self.reads
                .reader
                .submit(&*self.index, &*self.meta, token, epoch, job, now);
        }
        if let Some(p) = self.reads.parked.get_mut(&id) {
            p.waiting += n;
        }
    }

    /// Takes the finished reads: states are installed, results go to their messages (which
    /// `next_ready` then hands out) and lookups to `take_directs`.
    pub(super) fn reads_done(&mut self) {
        for d in self.reads.reader.poll() {
            self.read_done(d);
        }
    }

    /// Starts `want`, a read no parked message waits for (a direct conversation's lookup: its
    /// Sends wait in `Direct`); its result goes to [`Reads::take_directs`].
    pub(super) fn read_detached(&mut self, want: Want) {
        let Want::Direct { low, high, .. } = want else {
            debug_assert!(false, "only lookups are read detached");
            return;
        };
        let token = self.reads.next_token;
        self.reads.next_token += 1;
        self.reads
            .pending
            .insert(token, Pending::Direct { pair: (low, high) });
        self.stats.reads_submitted += 1;
        let epoch = self.reads.epoch;
        self.reads
            .reader
            .submit(&*self.index, &*self.meta, token, epoch, want, self.now_ms);
    }

    fn read_done(&mut self, (token, epoch, got): Done) {
        let Some(p) = self.reads.pending.remove(&token) else {
            return;
        };
        let stale = epoch != self.reads.epoch;
        let mut finished = Vec::new();
        match p {
            Pending::Conv {
                conv,
                waiters,
                void,
            } => {
                if self.reads.loading.get(&conv) == Some(&token) {
                    self.reads.loading.remove(&conv);
                }
                match got {
                    Got::Conv(Ok(st)) if !stale && !void && self.convs.get(conv).is_none() => {
                        self.convs.install(conv, st, self.now_ms);
                    }
                    Got::Conv(Err(r)) if !stale && !void => {
                        for id in &waiters {
                            if let Some(p) = self.reads.parked.get_mut(id) {
                                p.got.insert(Want::Conv(conv), Got::Conv(Err(r.clone())));
                            }
                        }
                    }
                    // Void or stale: planned again, the waiters find it loaded or read it anew.
                    _ => {}
                }
                finished.extend(waiters);
            }
            // Metadata: the log's epoch does not matter.
            Pending::Direct { pair } => {
                let found = match got {
                    Got::Direct(r) => r,
                    _ => Err(Refusal(
                        starling_protocol::v1::ErrorCode::Internal,
                        "a direct lookup answered with something else".into(),
                    )),
                };
                self.reads.directs.push((pair, found));
            }
            Pending::Of {
                id,
                key,
                tail,
                durable,
            } => {
                if !stale && let Some(p) = self.reads.parked.get_mut(&id) {
                    let got = match got {
                        Got::Entries(r) => Got::Read(r.map(|v| merge(key, v, tail, durable))),
                        other => other,
                    };
                    p.got.insert(key, got);
                }
                finished.push(id);
            }
        }
        for id in finished {
            if let Some(p) = self.reads.parked.get_mut(&id) {
                p.waiting -= 1;
                if p.waiting == 0 {
                    self.reads.ready.push_back(id);
                }
            }
        }
    }

    /// The next parked message that can be handled now (its reads complete and no message
    /// parked before it holding one of its conversations); one that turns out to need more
    /// reads (a page, once its state is loaded) gets them and waits again.
    pub(super) fn next_ready(&mut self) -> Option<(Inner, GotMap)> {
        while let Some(id) = self.reads.ready.pop_front() {
            let Some(p) = self.reads.parked.get(&id) else {
                continue;
            };
            if p.waiting > 0 {
                // Back in `ready` when its reads complete.
                continue;
            }
            let behind = p
                .holds
                .is_some_and(|c| self.reads.held.get(&c).and_then(|q| q.front()) != Some(&id));
            let mut p = self.reads.parked.remove(&id).expect("just seen");
            let mut wants = Vec::new();
            plan(self, &p.m, &mut p.got, &mut wants);
            if !wants.is_empty() || behind {
                // More to read, or (read alongside those ahead) its turn has not come: back in
                // `ready` when the reads complete or the message ahead of it goes.
                self.reads.parked.insert(id, p);
                self.submit(id, wants);
                continue;
            }
            if let Some(c) = p.holds
                && let Some(q) = self.reads.held.get_mut(&c)
            {
                q.pop_front();
                // The next message behind it on that conversation may go now.
                match q.front() {
                    Some(&next) => self.reads.ready.push_front(next),
                    None => {
                        self.reads.held.remove(&c);
                    }
                }
            }
            return Some((p.m, p.got));
        }
        None
    }
}

/// A page from what the index held when the job ran (`index`, the job's answer) and what the
/// durable tail held when it was planned (`tail`, then durable through `durable`): exact, since
/// the index then covered everything the tail had let go.
fn merge(key: Want, index: Vec<Entry>, tail: Vec<Arc<Entry>>, durable: u64) -> Vec<Arc<Entry>> {
    match key {
        Want::After { after, limit, .. } => {
            let mut out: Vec<Arc<Entry>> = index
                .into_iter()
                .filter(|e| e.seq.0 <= durable)
                .map(Arc::new)
                .collect();
            let mut last = out.last().map_or(after, |e| e.seq.0);
            for e in tail {
                if out.len() >= limit {
                    break;
                }
                if Some(e.seq.0) == last.checked_add(1) {
                    last = e.seq.0;
                    out.push(e);
                }
            }
            out
        }
        // `tail`: the newest entries the tail had, newest first; the job read the rest.
        Want::Before { .. } => {
            let mut newest = tail;
            for e in index.into_iter().rev() {
                newest.push(Arc::new(e));
            }
            newest.reverse();
            newest
        }
        _ => Vec::new(),
    }
}

/// What the conversation's state can say about a page without the index.
impl super::convs::ConvSeq {
    /// The page `key` if the durable tail covers it all.
    pub(super) fn tail_page(&self, key: Want) -> Option<Vec<Arc<Entry>>> {
        match key {
            Want::After { after, limit, .. } => {
                let covered = self.durable_seq <= after
                    || self
                        .recent
                        .front()
                        .is_some_and(|(_, e)| e.seq.0 <= after + 1);
                covered.then(|| self.tail_after(after, limit))
            }
            Want::Before { before, limit, .. } => {
                let (newest, next) = self.tail_before(before, limit);
                (newest.len() >= limit || next <= 1).then(|| {
                    let mut v = newest;
                    v.reverse();
                    v
                })
            }
            _ => None,
        }
    }

    /// The index read page `key` needs beyond the tail, and what the tail holds of it (for
    /// `After`: its entries after the anchor; for `Before`: its newest entries, newest first).
    pub(super) fn page_job(&self, key: Want) -> (Want, Vec<Arc<Entry>>) {
        match key {
            Want::After { after, limit, .. } => (key, self.tail_after(after, limit)),
            Want::Before {
                conv,
                before,
                limit,
            } => {
                let (newest, next) = self.tail_before(before, limit);
                let job = Want::Before {
                    conv,
                    before: next,
                    limit: limit - newest.len(),
                };
                (job, newest)
            }
            _ => (key, Vec::new()),
        }
    }
}
