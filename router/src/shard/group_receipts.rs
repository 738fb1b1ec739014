//! Group receipts, aggregated (see `docs/design/messaging.md`, "Cursors and receipts").
//!
//! In a group, a member's cursors are not pushed to the other members: that is one Receipt per
//! member per message for every member, quadratic in the group's size. Instead the owner keeps,
//! per group, the last [`GROUP_RECEIPTS_RECENT_MAX`] durable messages (seq and sender) with the
//! counts last pushed for each ([`RecentSent`]). A durable cursor change marks the group
//! ([`Pending`]); at most `group_receipts_coalesce_ms` later, each sender whose messages' counts
//! changed gets one `GroupReceipts`. Counts are computed from the announced (durable) cursors,
//! one pass over the members per push. `GetReceipts` answers who received and read any message,
//! tracked or not, from the same cursors.

use std::collections::{BTreeMap, VecDeque};

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::{CursorStore, MessageIndex, MetadataStore, UserId};

use super::convs::ConvState;
use super::frames::{Refusal, error_frame, frame};
use super::mail::{FanoutItem, Inner, ReceiptsCmd};
use super::shared::Shared;
use crate::hash::HashSet;
use crate::ids::{ConnRef, ConvId};

/// Messages per group whose counts are tracked and pushed (older ones: `GetReceipts`).
pub(super) const GROUP_RECEIPTS_RECENT_MAX: usize = 64;

/// One tracked message: its seq, sender, and the counts last pushed to the sender.
struct Tracked {
    seq: u64,
    sender: UserId,
    pushed: (u32, u32, u32),
}

/// A group's latest durable messages whose counts are pushed to their senders.
#[derive(Default)]
pub(super) struct RecentSent {
    items: VecDeque<Tracked>,
}

impl RecentSent {
    /// Message `seq` of `sender` became durable.
    pub(super) fn record(&mut self, seq: u64, sender: UserId) {
        debug_assert!(self.items.back().is_none_or(|t| t.seq < seq));
        if self.items.len() == GROUP_RECEIPTS_RECENT_MAX {
            self.items.pop_front();
        }
        self.items.push_back(Tracked {
            seq,
            sender,
            pushed: (0, 0, 0),
        });
    }
}

/// Groups whose durable cursors moved since their last push, and when the next push goes.
#[derive(Default)]
pub(super) struct Pending {
    convs: HashSet<ConvId>,
    due_ms: Option<u64>,
}

impl Pending {
    /// A durable cursor of group `conv` moved: its senders hear of it at the next push, at most
    /// `coalesce_ms` from now (at most one push per group per `coalesce_ms`).
    pub(super) fn mark(&mut self, conv: ConvId, now_ms: u64, coalesce_ms: u64) {
        self.convs.insert(conv);
        self.due_ms.get_or_insert(now_ms + coalesce_ms);
    }

    /// When the next push is due, if one is scheduled.
    pub(super) fn due_ms(&self) -> Option<u64> {
        self.due_ms
    }

    /// Pushes to each sender of a marked group the counts of its messages that changed.
    pub(super) fn push<I, M>(&mut self, sh: &mut Shared<I, M>) {
        self.due_ms = None;
        let mut items = Vec::new();
        for conv in std::mem::take(&mut self.convs) {
            // A state evicted meanwhile: its counts are there for Sync and GetReceipts.
            if let Some(c) = sh.convs.get_mut(conv) {
                changed(conv, c, &mut items);
            }
        }
        if !items.is_empty() {
            sh.mail.broadcast(items);
        }
    }
}

/// A recipient's visible range and announced cursors.
struct Recipient {
    user: UserId,
    from: u64,
    to: u64,
    delivered: u64,
    read: u64,
}

/// The members of `c` who may receive messages, with their durable cursors.
fn recipients(c: &ConvState) -> Vec<Recipient> {
    c.members
        .iter()
        .filter_map(|&u| {
            let (from, to) = c.visible(u).ok()?;
            let read = c.cursors.announced_read.get(&u).copied().unwrap_or(0);
            let delivered = c.cursors.announced_delivered.get(&u).copied().unwrap_or(0);
            Some(Recipient {
                user: u,
                from,
                to,
                delivered: delivered.max(read),
                read,
            })
        })
        .collect()
}

/// The recipients of message `seq` sent by `sender`: (delivered, read, recipients) counts.
fn count(rs: &[Recipient], seq: u64, sender: UserId) -> (u32, u32, u32) {
    let (mut d, mut r, mut n) = (0u32, 0u32, 0u32);
    for x in rs {
        if x.user == sender || seq < x.from || seq > x.to {
            continue;
        }
        n += 1;
        d += u32::from(x.delivered >= seq);
        r += u32::from(x.read >= seq);
    }
    (d, r, n)
}

fn count_frame(seq: u64, (delivered, read, recipients): (u32, u32, u32)) -> v1::GroupReceiptCount {
    v1::GroupReceiptCount {
        seq,
        delivered,
        read,
        recipients,
    }
}

/// Appends one `GroupReceipts` item per sender whose tracked messages' counts changed since
/// the last push.
fn changed(conv: ConvId, c: &mut ConvState, items: &mut Vec<FanoutItem>) {
    let rs = recipients(c);
    let mut by_sender: BTreeMap<UserId, Vec<v1::GroupReceiptCount>> = BTreeMap::new();
    for t in &mut c.cursors.sent.items {
        let now = count(&rs, t.seq, t.sender);
        if now != t.pushed {
            t.pushed = now;
            by_sender
                .entry(t.sender)
                .or_default()
                .push(count_frame(t.seq, now));
        }
    }
    for (sender, messages) in by_sender {
        items.push(FanoutItem::GroupReceipts {
            receipts: v1::GroupReceipts {
                conversation_id: conv.0,
                messages,
            },
            to: sender,
        });
    }
}

/// For a Sync: the counts of `user`'s tracked messages in group `c`, if it has any.
pub(super) fn for_sync(conv: ConvId, c: &ConvState, user: UserId) -> Option<v1::GroupReceipts> {
    let mine: Vec<u64> = c
        .cursors
        .sent
        .items
        .iter()
        .filter(|t| t.sender == user)
        .map(|t| t.seq)
        .collect();
    if mine.is_empty() {
        return None;
    }
    let rs = recipients(c);
    let messages = mine
        .into_iter()
        .map(|seq| count_frame(seq, count(&rs, seq, user)))
        .collect();
    Some(v1::GroupReceipts {
        conversation_id: conv.0,
        messages,
    })
}

/// At the ingress shard: a GetReceipts goes to its conversation's owner.
pub(super) fn request<I, M>(
    sh: &mut Shared<I, M>,
    origin: ConnRef,
    request_id: u64,
    user: UserId,
    req: v1::GetReceipts,
) -> Result<(), Refusal> {
    let Some(conv) = ConvId::from_wire(req.conversation_id) else {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "conversation_id is 0".into(),
        ));
    };
    if req.seq == 0 {
        return Err(Refusal(ErrorCode::InvalidArgument, "seq is 0".into()));
    }
    let max = sh.cfg.group_info_members_page;
    let limit = usize::try_from(req.limit).unwrap_or(usize::MAX);
    let cmd = ReceiptsCmd {
        origin,
        request_id,
        user,
        conv,
        seq: req.seq,
        after: UserId(req.after_user_id),
        limit: if limit == 0 { max } else { limit.min(max) },
    };
    let owner = sh.mail.owner(conv);
    sh.send_to(owner, Inner::Receipts(cmd));
    Ok(())
}

/// At the owner: who received and read the message, from the durable cursors.
pub(super) fn on_cmd<I, M>(sh: &mut Shared<I, M>, cmd: ReceiptsCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let answer = detail(sh, &cmd)
        .map(|d| frame(cmd.request_id, Body::ReceiptDetail(d)))
        .unwrap_or_else(|Refusal(code, msg)| error_frame(cmd.request_id, code, msg));
    sh.reply(cmd.origin, vec![answer]);
}

fn detail<I, M>(sh: &mut Shared<I, M>, cmd: &ReceiptsCmd) -> Result<v1::ReceiptDetail, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let (c, (from, to)) = sh.reader_conv(cmd.conv, cmd.user)?;
    if cmd.seq > c.seq.durable_seq {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "seq is beyond the conversation's last message".into(),
        ));
    }
    if cmd.seq < from || cmd.seq > to {
        return Err(Refusal(
            ErrorCode::NotAMember,
            "the message is outside what the caller may see".into(),
        ));
    }
    let tracked = c
        .cursors
        .sent
        .items
        .iter()
        .find(|t| t.seq == cmd.seq)
        .map(|t| t.sender);
    let sender = match tracked {
        Some(s) => s,
        None => {
            let e = sh.read_after(cmd.conv, cmd.seq - 1, 1)?;
            match e.first() {
                Some(e) if e.seq.0 == cmd.seq => e.sender,
                _ => {
                    return Err(Refusal(ErrorCode::NotFound, "no such message".into()));
                }
            }
        }
    };
    let (c, _) = sh.reader_conv(cmd.conv, cmd.user)?;
    let rs = recipients(c);
    let mut d = v1::ReceiptDetail {
        conversation_id: cmd.conv.0,
        seq: cmd.seq,
        sender_user_id: sender.0,
        ..v1::ReceiptDetail::default()
    };
    // `rs` is in ascending user order (the members list is sorted).
    let (mut in_page, mut last) = (0usize, None);
    for x in &rs {
        if x.user == sender || cmd.seq < x.from || cmd.seq > x.to {
            continue;
        }
        d.recipients += 1;
        let (delivered, read) = (x.delivered >= cmd.seq, x.read >= cmd.seq);
        d.delivered += u32::from(delivered);
        d.read += u32::from(read);
        if x.user <= cmd.after {
            continue;
        }
        if in_page == cmd.limit {
            // More follow the page: it ends at its last recipient.
            d.next_after_user_id = last.unwrap_or(cmd.after).0;
            continue;
        }
        in_page += 1;
        last = Some(x.user);
        if delivered {
            d.delivered_user_ids.push(x.user.0);
        }
        if read {
            d.read_user_ids.push(x.user.0);
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(user: u64, from: u64, delivered: u64, read: u64) -> Recipient {
        Recipient {
            user: UserId(user),
            from,
            to: u64::MAX,
            delivered: delivered.max(read),
            read,
        }
    }

    #[test]
    fn counts_take_only_recipients_who_may_see_the_message_the_sender_excepted() {
        // User 1 sent; 2 has received 5, 3 has read 7 (so received), 4 joined at 6.
        let rs = [r(1, 1, 9, 9), r(2, 1, 5, 0), r(3, 1, 0, 7), r(4, 6, 9, 9)];
        assert_eq!(count(&rs, 5, UserId(1)), (2, 1, 2));
        assert_eq!(count(&rs, 6, UserId(1)), (2, 2, 3));
        assert_eq!(count(&rs, 8, UserId(1)), (1, 1, 3));
        // Sent by 2: 1 and 3 and (from 6) 4 are its recipients.
        assert_eq!(count(&rs, 7, UserId(2)), (3, 3, 3));
    }

    #[test]
    fn at_most_the_latest_messages_are_tracked() {
        let mut s = RecentSent::default();
        for seq in 1..=(GROUP_RECEIPTS_RECENT_MAX as u64 + 10) {
            s.record(seq, UserId(seq % 3));
        }
        assert_eq!(s.items.len(), GROUP_RECEIPTS_RECENT_MAX);
        assert_eq!(s.items.front().map(|t| t.seq), Some(11));
    }

    #[test]
    fn marks_coalesce_into_one_push_scheduled_by_the_first() {
        let mut p = Pending::default();
        p.mark(ConvId(9), 1_000, 250);
        p.mark(ConvId(9), 1_100, 250);
        p.mark(ConvId(8), 1_200, 250);
        assert_eq!(p.due_ms(), Some(1_250));
        assert_eq!(p.convs.len(), 2);
    }
}
