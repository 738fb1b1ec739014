//! `GetHistory`: a page of one conversation's messages, from its owner (ingress → owner →
//! reply). The latest messages, those before a seq or those after one; `limit` defaults to
//! `history_limit_default` and is capped at `history_limit_max`, and a page is one frame, so it
//! stays under `page_bytes_max` (holding at least one message); `has_more` says whether the
//! client can page on.

use prost::Message as _;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::{CursorStore, MessageIndex, MetadataStore, UserId};

use super::envelope::entry_to_message;
use super::frames::{Refusal, error_frame, frame};
use super::mail::{HistoryCmd, Inner};
use super::reader::Want;
use super::shared::Shared;
use crate::ids::{ConnRef, ConvId};

/// At the ingress shard: the request goes to the conversation's owner.
pub(super) fn request<I, M>(
    sh: &mut Shared<I, M>,
    origin: ConnRef,
    rid: u64,
    user: UserId,
    h: v1::GetHistory,
) -> Result<(), Refusal> {
    let Some(conv) = ConvId::from_wire(h.conversation_id) else {
        return Err(Refusal(
            ErrorCode::InvalidArgument,
            "conversation_id is 0".into(),
        ));
    };
    let to = sh.mail.owner(conv);
    sh.send_to(
        to,
        Inner::History(HistoryCmd {
            origin,
            request_id: rid,
            user,
            conv,
            req: h,
        }),
    );
    Ok(())
}

/// At the owner: the page, or the refusal, goes back to the connection that asked.
pub(super) fn on_cmd<I, M>(sh: &mut Shared<I, M>, h: HistoryCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let res = page(sh, &h);
    let f = match res {
        Ok(page) => frame(h.request_id, Body::HistoryPage(page)),
        Err(Refusal(code, msg)) => error_frame(h.request_id, code, msg),
    };
    sh.reply(h.origin, vec![f]);
}

/// The page's size: the request's limit, or the default, capped.
fn limit_of<I, M>(sh: &Shared<I, M>, h: &HistoryCmd) -> usize {
    match h.req.limit as usize {
        0 => sh.cfg.history_limit_default,
        n => n.min(sh.cfg.history_limit_max),
    }
}

/// The read of `h`'s page, for the seqs the caller may read (`from..=to`): one more than the
/// limit, to tell whether there are more.
fn read_of(h: &HistoryCmd, limit: usize, (from, to): (u64, u64)) -> Want {
    let conv = h.conv;
    match h.req.anchor {
        Some(v1::get_history::Anchor::AfterSeq(a)) => Want::After {
            conv,
            after: a.max(from.saturating_sub(1)),
            limit: limit + 1,
        },
        Some(v1::get_history::Anchor::BeforeSeq(b)) => Want::Before {
            conv,
            before: b.min(to.saturating_add(1)),
            limit: limit + 1,
        },
        None => Want::Before {
            conv,
            before: to.saturating_add(1),
            limit: limit + 1,
        },
    }
}

/// The read `h`'s page needs (for the read gate, `reads.rs`), once its state is loaded.
pub(super) fn reads<I, M>(sh: &Shared<I, M>, h: &HistoryCmd) -> Vec<Want> {
    let Some(c) = sh.convs.get(h.conv) else {
        return Vec::new();
    };
    match c.visible(h.user) {
        Ok(range) => vec![read_of(h, limit_of(sh, h), range)],
        Err(_) => Vec::new(),
    }
}

fn page<I, M>(sh: &mut Shared<I, M>, h: &HistoryCmd) -> Result<v1::HistoryPage, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let conv = h.conv;
    let limit = limit_of(sh, h);
    // Only the seqs the caller may read: a group member's from its join, a former member's up
    // to its removal.
    let (_, (from, to)) = sh.reader_conv(conv, h.user)?;
    let (mut entries, has_more) = match read_of(h, limit, (from, to)) {
        Want::After {
            after, limit: n, ..
        } => {
            let mut v = sh.read_after(conv, after, n)?;
            v.retain(|e| e.seq.0 <= to);
            let more = v.len() > limit;
            v.truncate(limit);
            (v, more)
        }
        Want::Before {
            before, limit: n, ..
        } => {
            let mut v = sh.read_before(conv, before, n)?;
            v.retain(|e| e.seq.0 >= from);
            let more = v.len() > limit;
            if more {
                v.remove(0);
            }
            (v, more)
        }
        _ => unreachable!("a page reads after or before a seq"),
    };
    let keep = sh.keep(conv);
    let mut messages: Vec<v1::Message> = entries
        .drain(..)
        .filter(|e| !keep.gone(e))
        .filter_map(|e| entry_to_message(conv, &e))
        .collect();
    // As they are now: edited, deleted, reacted to.
    super::changes::present(sh, conv, &mut messages)?;
    // One frame: keep it under `page_bytes_max`, dropping from the far end of the anchor
    // (the newest for AfterSeq, the oldest otherwise); the client pages on with `has_more`.
    let after = matches!(h.req.anchor, Some(v1::get_history::Anchor::AfterSeq(_)));
    let trimmed = fit(&mut messages, after, sh.cfg.page_bytes_max);
    Ok(v1::HistoryPage {
        conversation_id: conv.0,
        messages,
        has_more: has_more || trimmed,
    })
}

/// Drops messages from the end far from the anchor (the newest if `after`, else the oldest)
/// until the rest take at most `bytes_max` in the page, keeping at least one. Whether any was
/// dropped.
fn fit(messages: &mut Vec<v1::Message>, after: bool, bytes_max: usize) -> bool {
    let (mut bytes, mut keep) = (0usize, 0usize);
    let sizes: Vec<usize> = if after {
        messages.iter().map(|m| m.encoded_len() + 8).collect()
    } else {
        messages.iter().rev().map(|m| m.encoded_len() + 8).collect()
    };
    for sz in sizes {
        if keep > 0 && bytes + sz > bytes_max {
            break;
        }
        bytes += sz;
        keep += 1;
    }
    let trimmed = keep < messages.len();
    if trimmed {
        if after {
            messages.truncate(keep);
        } else {
            messages.drain(..messages.len() - keep);
        }
    }
    trimmed
}

#[cfg(test)]
mod tests {
    use starling_protocol::v1::{self, ErrorCode, frame::Body};
    use starling_storage::{DeviceId, UserId};

    use super::super::ShardConfig;
    use super::super::fixture::{GROUP, Shard, drive_until, sent, shard};
    use super::fit;
    use crate::ids::ConnId;

    fn history(s: &mut Shard, now: &mut u64, conn: ConnId, req: v1::GetHistory) -> Body {
        let f = v1::Frame {
            request_id: 60,
            body: Some(Body::GetHistory(req)),
        };
        s.handle_frame(conn, f, *now);
        let out = drive_until(s, now, |c, f| c == conn && f.request_id == 60);
        out.into_iter()
            .find(|(c, f)| *c == conn && f.request_id == 60)
            .and_then(|(_, f)| f.body)
            .unwrap()
    }

    fn page(body: &Body) -> (Vec<u64>, bool) {
        let Body::HistoryPage(p) = body else {
            panic!("{body:?}")
        };
        (p.messages.iter().map(|m| m.seq).collect(), p.has_more)
    }

    #[test]
    fn pages_of_the_latest_before_and_after_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        sent(&mut s, &mut now, 1..=5);
        let req = |anchor, limit| v1::GetHistory {
            conversation_id: GROUP.0,
            anchor,
            limit,
        };
        let latest = history(&mut s, &mut now, ConnId(2), req(None, 2));
        assert_eq!(page(&latest), (vec![4, 5], true));
        let before = Some(v1::get_history::Anchor::BeforeSeq(4));
        assert_eq!(
            page(&history(&mut s, &mut now, ConnId(2), req(before, 2))),
            (vec![2, 3], true)
        );
        let after = Some(v1::get_history::Anchor::AfterSeq(3));
        assert_eq!(
            page(&history(&mut s, &mut now, ConnId(2), req(after, 5))),
            (vec![4, 5], false)
        );
        // The default limit covers all five.
        assert_eq!(
            page(&history(&mut s, &mut now, ConnId(2), req(None, 0)))
                .0
                .len(),
            5
        );
    }

    #[test]
    fn no_conversation_or_not_a_member_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        let none = v1::GetHistory::default();
        let Body::Error(e) = history(&mut s, &mut now, ConnId(1), none) else {
            panic!()
        };
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::InvalidArgument as i32, "conversation_id is 0")
        );
        s.handle_conn_opened(ConnId(3), UserId(3), DeviceId(1), now);
        let theirs = v1::GetHistory {
            conversation_id: GROUP.0,
            ..v1::GetHistory::default()
        };
        let Body::Error(e) = history(&mut s, &mut now, ConnId(3), theirs) else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::NotAMember as i32);
    }

    #[test]
    fn a_page_is_cut_at_its_byte_budget_far_from_the_anchor_but_keeps_one_message() {
        let msgs = |n: u64| -> Vec<v1::Message> {
            (1..=n)
                .map(|seq| v1::Message {
                    seq,
                    body: vec![0; 100].into(),
                    ..v1::Message::default()
                })
                .collect()
        };
        let seqs = |v: &[v1::Message]| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        // Room for about two of them.
        let mut v = msgs(4);
        assert!(fit(&mut v, true, 250));
        assert_eq!(seqs(&v), [1, 2], "after a seq: the oldest are kept");
        let mut v = msgs(4);
        assert!(fit(&mut v, false, 250));
        assert_eq!(seqs(&v), [3, 4], "otherwise: the newest are kept");
        let mut v = msgs(2);
        assert!(!fit(&mut v, false, 10_000));
        assert_eq!(v.len(), 2);
        let mut v = msgs(3);
        assert!(fit(&mut v, false, 1));
        assert_eq!(seqs(&v), [3], "one message even over the budget");
    }
}
