//! Fan-out on read for large groups (see `docs/design/messaging.md`, "Groups: fan-out on
//! read"). A durable message of a group with more than `group_push_members_max` members is not
//! pushed to every member's devices: the owner notes the group's latest durable seq (O(1) per
//! message) and, at most once per `group_available_ms` per group, sends every shard one
//! `MessagesAvailable` item for the group's members; their online devices pull with Sync or
//! GetHistory. A message's write cost no longer grows with the member count; a group's cost per
//! interval does, once, however many messages it carried.

use std::sync::Arc;

use starling_storage::UserId;

use super::mail::FanoutItem;
use super::shared::Shared;
use crate::hash::HashMap;
use crate::ids::ConvId;

/// Groups with messages not yet announced, each with its latest durable seq, and when the
/// next announcement goes.
#[derive(Default)]
pub(super) struct Available {
    convs: HashMap<ConvId, u64>,
    due_ms: Option<u64>,
}

impl Available {
    /// Message `seq` of large group `conv` is durable: announced at most `interval_ms` from now.
    pub(super) fn mark(&mut self, conv: ConvId, seq: u64, now_ms: u64, interval_ms: u64) {
        let s = self.convs.entry(conv).or_default();
        *s = (*s).max(seq);
        self.due_ms.get_or_insert(now_ms + interval_ms);
    }

    /// When the next announcement is due, if one is scheduled.
    pub(super) fn due_ms(&self) -> Option<u64> {
        self.due_ms
    }

    /// Takes what is to be announced now: (group, latest seq).
    fn take(&mut self) -> Vec<(ConvId, u64)> {
        self.due_ms = None;
        let mut v: Vec<(ConvId, u64)> = self.convs.drain().collect();
        v.sort_unstable();
        v
    }
}

/// Timer: announces the marked groups' latest seqs to their members' online devices.
pub(super) fn tick<I, M>(sh: &mut Shared<I, M>) {
    if sh.available.due_ms().is_none_or(|d| d > sh.now_ms) {
        return;
    }
    let mut items = Vec::new();
    for (conv, up_to_seq) in sh.available.take() {
        // Evicted meanwhile (idle for minutes): its members sync when they next look.
        if let Some(c) = sh.convs.get(conv) {
            let members: Arc<[UserId]> = c.members.clone();
            items.push(FanoutItem::Available {
                conv,
                up_to_seq,
                members,
            });
        }
    }
    if !items.is_empty() {
        sh.mail.broadcast(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_coalesce_per_group_into_the_latest_seq_scheduled_by_the_first() {
        let mut a = Available::default();
        a.mark(ConvId(9), 3, 1_000, 100);
        a.mark(ConvId(9), 5, 1_050, 100);
        a.mark(ConvId(8), 2, 1_060, 100);
        assert_eq!(a.due_ms(), Some(1_100));
        assert_eq!(a.take(), [(ConvId(8), 2), (ConvId(9), 5)]);
        assert_eq!(a.due_ms(), None);
    }
}
