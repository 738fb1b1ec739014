//! Requests that several owner shards answer, gathered at the connection that asked: a `Sync`
//! (each owner streams its conversations' frames, then the connection gets one `SyncDone`) and
//! a `ListConversations` (each owner sends its summaries, then the connection gets one page).
//! The state lives with the connection (`directory::ConnMore`), so it goes when the connection
//! does.

use bytes::Bytes;
use starling_protocol::v1;

/// A `Sync` waiting for the parts of its owner shards.
#[derive(Default)]
pub(super) struct SyncGather {
    remaining: usize,
    truncated: Vec<v1::MessagesAvailable>,
    messages: u32,
    receipts: u32,
}

impl SyncGather {
    /// A Sync answered by `parts` owner shards.
    pub(super) fn new(parts: usize) -> Self {
        SyncGather {
            remaining: parts,
            ..SyncGather::default()
        }
    }

    /// One owner's part arrived (its frames went to the connection already): whether it was the
    /// last.
    pub(super) fn add(
        &mut self,
        truncated: Vec<v1::MessagesAvailable>,
        messages: u32,
        receipts: u32,
    ) -> bool {
        self.remaining = self.remaining.saturating_sub(1);
        self.truncated.extend(truncated);
        self.messages += messages;
        self.receipts += receipts;
        self.remaining == 0
    }

    /// The `SyncDone` that ends the Sync.
    pub(super) fn done(self) -> v1::SyncDone {
        v1::SyncDone {
            truncated: self.truncated,
            messages: self.messages,
            receipts: self.receipts,
        }
    }
}

/// A `ListConversations` waiting for the summaries of its owner shards.
pub(super) struct ListGather {
    remaining: usize,
    limit: usize,
    offset: usize,
    summaries: Vec<v1::ConversationSummary>,
}

impl ListGather {
    /// A list answered by `parts` owner shards, whose page starts at `offset` (in the order of
    /// [`ListGather::page`]) and holds at most `limit` summaries.
    pub(super) fn new(parts: usize, limit: usize, offset: usize) -> Self {
        ListGather {
            remaining: parts,
            limit,
            offset,
            summaries: Vec::new(),
        }
    }

    /// One owner's summaries arrived: whether they were the last.
    pub(super) fn add(&mut self, summaries: Vec<v1::ConversationSummary>) -> bool {
        self.summaries.extend(summaries);
        self.remaining = self.remaining.saturating_sub(1);
        self.remaining == 0
    }

    /// The page: every summary, newest last message first (ties: higher conversation id
    /// first), from `offset`, at most `limit`, with the cursor of the next page if there is one.
    pub(super) fn page(mut self) -> v1::ConversationList {
        let ts =
            |s: &v1::ConversationSummary| s.last_message.as_ref().map_or(0, |m| m.server_ts_ms);
        self.summaries.sort_by(|a, b| {
            ts(b)
                .cmp(&ts(a))
                .then(b.conversation_id.cmp(&a.conversation_id))
        });
        let end = (self.offset + self.limit).min(self.summaries.len());
        let next_cursor = if end < self.summaries.len() {
            Bytes::copy_from_slice(&(end as u32).to_be_bytes())
        } else {
            Bytes::new()
        };
        let page: Vec<_> = self.summaries.drain(self.offset.min(end)..end).collect();
        v1::ConversationList {
            conversations: page,
            next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(conv: u64, ts: Option<u64>) -> v1::ConversationSummary {
        v1::ConversationSummary {
            conversation_id: conv,
            last_message: ts.map(|t| {
                Box::new(v1::Message {
                    server_ts_ms: t,
                    ..v1::Message::default()
                })
            }),
            ..v1::ConversationSummary::default()
        }
    }

    fn ids(l: &v1::ConversationList) -> Vec<u64> {
        l.conversations.iter().map(|s| s.conversation_id).collect()
    }

    #[test]
    fn a_sync_is_done_when_every_owner_answered() {
        let mut g = SyncGather::new(2);
        let hint = v1::MessagesAvailable {
            conversation_id: 4,
            up_to_seq: 9,
        };
        assert!(!g.add(vec![hint], 3, 1));
        assert!(g.add(Vec::new(), 2, 2));
        let done = g.done();
        assert_eq!((done.messages, done.receipts), (5, 3));
        assert_eq!(done.truncated, vec![hint]);
    }

    #[test]
    fn a_list_is_sorted_newest_first_and_paged_by_offset() {
        let mut g = ListGather::new(2, 2, 0);
        assert!(!g.add(vec![summary(1, Some(10)), summary(2, None)]));
        assert!(g.add(vec![summary(3, Some(30)), summary(4, Some(10))]));
        let first = g.page();
        assert_eq!(ids(&first), [3, 4]);
        assert_eq!(&first.next_cursor[..], &2u32.to_be_bytes());
        // The next page, from the cursor's offset: the rest, and no cursor after it.
        let mut g = ListGather::new(1, 2, 2);
        assert!(g.add(vec![
            summary(1, Some(10)),
            summary(2, None),
            summary(3, Some(30)),
            summary(4, Some(10)),
        ]));
        let second = g.page();
        assert_eq!(ids(&second), [1, 2]);
        assert!(second.next_cursor.is_empty());
        // An offset past the end is an empty last page.
        let mut g = ListGather::new(1, 5, 9);
        assert!(g.add(vec![summary(1, Some(1))]));
        let past = g.page();
        assert!(past.conversations.is_empty() && past.next_cursor.is_empty());
    }
}
