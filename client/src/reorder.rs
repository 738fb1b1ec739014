//! In-order, exactly-once release of messages per conversation, with gap
//! detection. Sans-IO: it returns the messages to hand to the application
//! and the ranges to fetch; the caller does the fetching.
//!
//! Per conversation it keeps the cursor (highest contiguous seq released),
//! the messages that arrived ahead of a gap (bounded), and the highest seq
//! known to exist. A message at or below the cursor is a duplicate and is
//! dropped. When a gap is known and no fetch is in flight, it asks for
//! `GetHistory{after_seq: cursor}`; when the page arrives, the gap closes
//! and the buffered messages behind it are released in order.
//!
//! In a group, a member sees the conversation from its latest join on (the
//! `CREATED` or `MEMBERS_ADDED` event naming it): the seqs before that event
//! are not visible to it, so such an event moves the cursor up to just
//! below itself (after releasing what was held below it) instead of opening
//! a gap that no fetch could close.

use std::collections::{BTreeMap, HashMap};

use starling_protocol::v1;

/// Messages asked for by one fetch (the server caps pages; more fetches
/// follow until the gap is closed).
pub const FETCH_MESSAGES_MAX: u64 = 500;

/// Ask for the messages of `conversation_id` with `after_seq < seq <=
/// up_to_seq` (`GetHistory { after_seq, limit: up_to_seq - after_seq }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRange {
    /// The conversation.
    pub conversation_id: u64,
    /// Exclusive lower bound (the cursor).
    pub after_seq: u64,
    /// Inclusive upper bound.
    pub up_to_seq: u64,
}

impl FetchRange {
    /// The `limit` to ask for.
    #[must_use]
    pub fn limit(&self) -> u32 {
        u32::try_from((self.up_to_seq - self.after_seq).min(FETCH_MESSAGES_MAX)).unwrap_or(1)
    }
}

/// What one input produced.
#[derive(Debug, Default, PartialEq)]
pub struct Released {
    /// Messages to hand to the application, in order (per conversation,
    /// strictly increasing contiguous seqs).
    pub messages: Vec<v1::Message>,
    /// A range to fetch, if a gap was detected and none is in flight.
    pub fetch: Option<FetchRange>,
}

#[derive(Debug, Default)]
struct Conv {
    /// Highest contiguous seq released.
    cursor: u64,
    /// Highest seq known to exist.
    known_max: u64,
    /// Messages above the cursor, waiting for the gap below them.
    ahead: BTreeMap<u64, v1::Message>,
    /// A fetch is in flight.
    fetching: bool,
}

/// The reorder buffer for all conversations.
#[derive(Debug)]
pub struct Reorder {
    convs: HashMap<u64, Conv>,
    ahead_messages_max: usize,
    /// The user whose join events move the cursor (0: none).
    user_id: u64,
}

impl Reorder {
    /// Starts from the persisted cursors. At most `ahead_messages_max`
    /// messages are held per conversation; more are dropped and fetched
    /// again once the gap closes.
    pub fn new(cursors: impl IntoIterator<Item = (u64, u64)>, ahead_messages_max: usize) -> Self {
        let convs = cursors
            .into_iter()
            .map(|(c, seq)| {
                (
                    c,
                    Conv {
                        cursor: seq,
                        known_max: seq,
                        ..Conv::default()
                    },
                )
            })
            .collect();
        Self {
            convs,
            ahead_messages_max: ahead_messages_max.max(1),
            user_id: 0,
        }
    }

    /// Group events that add `user_id` (its joins) move the cursor to them:
    /// what was sequenced before a join is not visible to the member.
    #[must_use]
    pub fn for_user(mut self, user_id: u64) -> Self {
        self.user_id = user_id;
        self
    }

    /// The cursor of a conversation.
    #[must_use]
    pub fn cursor(&self, conversation_id: u64) -> u64 {
        self.convs.get(&conversation_id).map_or(0, |c| c.cursor)
    }

    /// True while any gap fetch is in flight.
    #[must_use]
    pub fn fetching(&self) -> bool {
        self.convs.values().any(|c| c.fetching)
    }

    /// A message arrived (Deliver, Sync, or our own acknowledged Send).
    pub fn handle_message(&mut self, msg: v1::Message) -> Released {
        let conversation_id = msg.conversation_id;
        let mut out = Released::default();
        let max = self.ahead_messages_max;
        let me = self.user_id;
        let conv = self.convs.entry(conversation_id).or_default();
        conv.insert(msg, max, me, &mut out.messages);
        out.fetch = conv.next_fetch(conversation_id);
        out
    }

    /// The server says the conversation has messages up to `up_to_seq`
    /// (MessagesAvailable, a truncated Sync, a SendAck from another of our
    /// devices).
    pub fn handle_available(&mut self, conversation_id: u64, up_to_seq: u64) -> Option<FetchRange> {
        let conv = self.convs.entry(conversation_id).or_default();
        conv.known_max = conv.known_max.max(up_to_seq);
        conv.next_fetch(conversation_id)
    }

    /// A fetched page arrived (ascending seqs). The fetch is no longer in
    /// flight; another is requested if the gap is still open and this page
    /// made progress.
    pub fn handle_page(&mut self, conversation_id: u64, messages: Vec<v1::Message>) -> Released {
        let mut out = Released::default();
        let max = self.ahead_messages_max;
        let me = self.user_id;
        let conv = self.convs.entry(conversation_id).or_default();
        conv.fetching = false;
        let before = conv.cursor;
        for msg in messages {
            if msg.conversation_id == conversation_id {
                conv.insert(msg, max, me, &mut out.messages);
            }
        }
        if conv.cursor > before {
            out.fetch = conv.next_fetch(conversation_id);
        }
        out
    }

    /// A fetch failed; the gap stays known and the next trigger (another
    /// message, a reconnect) asks again.
    pub fn handle_fetch_failed(&mut self, conversation_id: u64) {
        if let Some(conv) = self.convs.get_mut(&conversation_id) {
            conv.fetching = false;
        }
    }

    /// Forgets in-flight fetches (the connection they were on is gone).
    pub fn handle_disconnect(&mut self) {
        for conv in self.convs.values_mut() {
            conv.fetching = false;
        }
    }

    /// Fetches for every open gap with none in flight (after a reconnect).
    pub fn open_gaps(&mut self) -> Vec<FetchRange> {
        let mut out: Vec<FetchRange> = self
            .convs
            .iter_mut()
            .filter_map(|(id, c)| c.next_fetch(*id))
            .collect();
        out.sort_by_key(|f| f.conversation_id);
        out
    }
}

impl Conv {
    fn insert(
        &mut self,
        msg: v1::Message,
        ahead_max: usize,
        me: u64,
        released: &mut Vec<v1::Message>,
    ) {
        let seq = msg.seq;
        if seq <= self.cursor {
            return; // Duplicate: already released.
        }
        self.known_max = self.known_max.max(seq);
        if seq > self.cursor + 1 && me != 0 && is_join_of(&msg, me) {
            // Nothing between the cursor and this join is visible to us but
            // what is held already (from an earlier membership).
            let below: Vec<u64> = self.ahead.range(..seq).map(|(s, _)| *s).collect();
            for s in below {
                if let Some(m) = self.ahead.remove(&s) {
                    released.push(m);
                }
            }
            self.cursor = seq - 1;
        }
        if seq == self.cursor + 1 {
            self.cursor = seq;
            released.push(msg);
            while let Some(next) = self.ahead.remove(&(self.cursor + 1)) {
                self.cursor += 1;
                released.push(next);
            }
        } else if self.ahead.len() < ahead_max || self.ahead.contains_key(&seq) {
            self.ahead.insert(seq, msg);
        }
        // Else dropped: known_max remembers it, a fetch brings it back.
    }

    fn next_fetch(&mut self, conversation_id: u64) -> Option<FetchRange> {
        if self.fetching || self.known_max <= self.cursor {
            return None;
        }
        // Fetch up to just below the first buffered message, or to the
        // highest seq known when nothing is buffered.
        let up_to_seq = match self.ahead.keys().next() {
            Some(&first) if first == self.cursor + 1 => return None,
            Some(&first) => first - 1,
            None => self.known_max,
        };
        self.fetching = true;
        Some(FetchRange {
            conversation_id,
            after_seq: self.cursor,
            up_to_seq,
        })
    }
}

/// True for a group event that makes `user_id` a member (CREATED or
/// MEMBERS_ADDED naming it).
fn is_join_of(msg: &v1::Message, user_id: u64) -> bool {
    msg.group_changed.as_ref().is_some_and(|g| {
        (g.kind == v1::GroupChangeKind::Created as i32
            || g.kind == v1::GroupChangeKind::MembersAdded as i32)
            && g.user_ids.contains(&user_id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(conv: u64, seq: u64, users: &[u64]) -> v1::Message {
        v1::Message {
            conversation_id: conv,
            seq,
            group_changed: Some(Box::new(v1::GroupChanged {
                kind: v1::GroupChangeKind::MembersAdded.into(),
                user_ids: users.to_vec(),
                ..v1::GroupChanged::default()
            })),
            ..v1::Message::default()
        }
    }

    #[test]
    fn a_join_of_ours_starts_the_conversation_there() {
        let mut r = Reorder::new([(7, 3)], 100).for_user(42);
        // Held from an earlier membership, then our removal left a gap.
        assert_eq!(seqs(&r.handle_message(msg(7, 5))), Vec::<u64>::new());
        // Someone else's join does not move the cursor.
        let out = r.handle_message(join(7, 8, &[9]));
        assert!(out.messages.is_empty());
        // Ours: what was held below it is released, then the join itself
        // and what follows; no fetch for the invisible seqs.
        let out = r.handle_message(join(7, 10, &[42]));
        assert_eq!(seqs(&out), [5, 8, 10]);
        assert_eq!(r.cursor(7), 10);
        let out = r.handle_message(msg(7, 11));
        assert_eq!((seqs(&out), out.fetch), (vec![11], None));
        // Without a user, a join is just a message.
        let mut r = Reorder::new([], 100);
        assert!(r.handle_message(join(1, 4, &[42])).messages.is_empty());
    }

    fn msg(conv: u64, seq: u64) -> v1::Message {
        v1::Message {
            conversation_id: conv,
            seq,
            body: format!("m{seq}").into_bytes().into(),
            ..v1::Message::default()
        }
    }

    fn seqs(r: &Released) -> Vec<u64> {
        r.messages.iter().map(|m| m.seq).collect()
    }

    fn range(conv: u64, after: u64, up_to: u64) -> Option<FetchRange> {
        Some(FetchRange {
            conversation_id: conv,
            after_seq: after,
            up_to_seq: up_to,
        })
    }

    /// Feeds `(seq)` arrivals and checks (released seqs, fetch) after each.
    fn check(r: &mut Reorder, conv: u64, steps: &[(u64, &[u64], Option<FetchRange>)]) {
        for (seq, want_released, want_fetch) in steps {
            let out = r.handle_message(msg(conv, *seq));
            assert_eq!(seqs(&out), *want_released, "after seq {seq}");
            assert_eq!(out.fetch, *want_fetch, "fetch after seq {seq}");
        }
    }

    #[test]
    fn in_order_messages_pass_straight_through_and_duplicates_are_dropped() {
        let mut r = Reorder::new([(1, 3)], 100);
        check(
            &mut r,
            1,
            &[
                (4, &[4], None),
                (5, &[5], None),
                (5, &[], None),
                (2, &[], None),
                (6, &[6], None),
            ],
        );
        assert_eq!(r.cursor(1), 6);
    }

    #[test]
    fn a_gap_asks_for_the_missing_range_once_and_holds_later_messages() {
        let mut r = Reorder::new([(1, 3)], 100);
        check(
            &mut r,
            1,
            &[
                (6, &[], range(1, 3, 5)),
                (8, &[], None), // fetch already in flight
                (6, &[], None), // duplicate of a held message
            ],
        );
        assert!(r.fetching());
        // The page covers 4..=5 (and 6 again); 6 is released once, 7 is
        // still missing below 8: the next fetch asks for it.
        let out = r.handle_page(1, vec![msg(1, 4), msg(1, 5), msg(1, 6)]);
        assert_eq!(seqs(&out), vec![4, 5, 6]);
        assert_eq!(out.fetch, range(1, 6, 7));
        // 7 arrives live before the page: released with 8 behind it.
        let out = r.handle_message(msg(1, 7));
        assert_eq!(seqs(&out), vec![7, 8]);
        // The late page brings only duplicates.
        let out = r.handle_page(1, vec![msg(1, 7)]);
        assert!(out.messages.is_empty());
        assert_eq!(out.fetch, None);
        assert!(!r.fetching());
        assert_eq!(r.cursor(1), 8);
    }

    #[test]
    fn conversations_are_independent() {
        let mut r = Reorder::new([], 100);
        assert_eq!(r.handle_message(msg(1, 2)).fetch, range(1, 0, 1));
        let out = r.handle_message(msg(2, 1));
        assert_eq!(seqs(&out), vec![1]);
        assert_eq!(out.fetch, None);
        assert_eq!(seqs(&r.handle_page(1, vec![msg(1, 1)])), vec![1, 2]);
    }

    #[test]
    fn available_and_truncation_trigger_fetches_in_pages() {
        let mut r = Reorder::new([(9, 10)], 100);
        assert_eq!(r.handle_available(9, 10), None);
        assert_eq!(r.handle_available(9, 2000), range(9, 10, 2000));
        assert_eq!(range(9, 10, 2000).unwrap().limit(), 500);
        assert_eq!(r.handle_available(9, 3000), None);
        let page: Vec<_> = (11..=510).map(|s| msg(9, s)).collect();
        let out = r.handle_page(9, page);
        assert_eq!(out.messages.len(), 500);
        assert_eq!(out.fetch, range(9, 510, 3000));
    }

    #[test]
    fn a_failed_or_fruitless_fetch_is_retried_on_the_next_trigger() {
        let mut r = Reorder::new([], 100);
        assert_eq!(r.handle_message(msg(1, 3)).fetch, range(1, 0, 2));
        r.handle_fetch_failed(1);
        assert_eq!(r.handle_message(msg(1, 4)).fetch, range(1, 0, 2));
        // A page without progress does not loop.
        assert_eq!(r.handle_page(1, vec![]).fetch, None);
        r.handle_disconnect();
        assert_eq!(r.open_gaps(), vec![range(1, 0, 2).unwrap()]);
        assert_eq!(
            seqs(&r.handle_page(1, vec![msg(1, 2), msg(1, 1)])),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn the_hold_buffer_is_bounded_and_dropped_messages_are_refetched() {
        let mut r = Reorder::new([], 2);
        assert_eq!(r.handle_message(msg(1, 5)).fetch, range(1, 0, 4));
        r.handle_message(msg(1, 6));
        r.handle_message(msg(1, 7)); // dropped: buffer full
        let out = r.handle_page(1, (1..=4).map(|s| msg(1, s)).collect());
        assert_eq!(seqs(&out), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(out.fetch, range(1, 6, 7));
    }

    #[test]
    fn shuffled_duplicated_input_releases_each_seq_once_in_order() {
        // Deterministic shuffle; a fetch answers exactly its range.
        let mut order: Vec<u64> = (1..=200).chain(1..=200).collect();
        let mut rng = crate::ids::SplitMix64::new(5);
        for i in (1..order.len()).rev() {
            let j = usize::try_from(rng.up_to(i as u64)).unwrap();
            order.swap(i, j);
        }
        let mut r = Reorder::new([], 16);
        let mut released = Vec::new();
        let mut fetches = Vec::new();
        for seq in order.into_iter().take(300) {
            let out = r.handle_message(msg(1, seq));
            released.extend(seqs(&out));
            fetches.extend(out.fetch);
            while let Some(f) = fetches.pop() {
                let page = ((f.after_seq + 1)..=f.up_to_seq)
                    .take(usize::try_from(f.limit()).unwrap())
                    .map(|s| msg(1, s))
                    .collect();
                let out = r.handle_page(1, page);
                released.extend(seqs(&out));
                fetches.extend(out.fetch);
            }
        }
        let max = *released.last().unwrap();
        assert_eq!(released, (1..=max).collect::<Vec<_>>());
        assert!(max >= 190, "{max}");
    }
}
