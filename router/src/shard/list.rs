//! `ListConversations`: a page of the user's conversations, newest last message first, across
//! shards (ingress → owners → gather). Each owner summarises the conversations it holds; the
//! ingress shard sorts them all and cuts the page (`gather::ListGather`), paged on by an opaque
//! offset cursor.

use std::collections::BTreeMap;

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::{CursorStore, MessageIndex, MetadataStore, UserId};

use super::changes;
use super::envelope::entry_to_message;
use super::frames::{Refusal, frame};
use super::gather::ListGather;
use super::mail::{Inner, ListCmd, ListPart};
use super::reader::Want;
use super::shared::Shared;
use crate::ids::{ConnRef, ConvId};

/// At the ingress shard: lists the user's conversations, splits them by owner and starts
/// gathering the owners' summaries.
pub(super) fn request<I: MessageIndex, M: MetadataStore + CursorStore>(
    sh: &mut Shared<I, M>,
    origin: ConnRef,
    rid: u64,
    user: UserId,
    l: &v1::ListConversations,
) -> Result<(), Refusal> {
    let offset = page_offset(&l.cursor)?;
    let limit = match l.limit as usize {
        0 => sh.cfg.list_limit_default,
        n => n.min(sh.cfg.list_limit_max),
    };
    let convs = sh.user_convs(user)?;
    let mut per_owner: BTreeMap<usize, Vec<ConvId>> = BTreeMap::new();
    for conv in convs {
        per_owner.entry(sh.mail.owner(conv)).or_default().push(conv);
    }
    let Some(c) = sh.dir.conns.get_mut(&origin.conn) else {
        return Ok(());
    };
    if per_owner.is_empty() {
        sh.emit(
            origin.conn,
            frame(rid, Body::ConversationList(v1::ConversationList::default())),
            false,
        );
        return Ok(());
    }
    c.more()
        .lists
        .insert(rid, ListGather::new(per_owner.len(), limit, offset));
    for (owner, convs) in per_owner {
        sh.send_to(
            owner,
            Inner::List(ListCmd {
                origin,
                request_id: rid,
                user,
                convs,
            }),
        );
    }
    Ok(())
}

/// The pages an owner's summaries read (for the read gate, `reads.rs`), once the states are
/// loaded: each conversation's last message and its messages after the user's read cursor.
pub(super) fn reads<I, M>(sh: &Shared<I, M>, l: &ListCmd) -> Vec<Want> {
    let mut out = Vec::new();
    for &conv in &l.convs {
        let Some(c) = sh.convs.get(conv) else {
            continue;
        };
        let Ok((from, to)) = c.visible(l.user) else {
            continue;
        };
        let read = c.cursors.read.get(&l.user).copied().unwrap_or(0);
        if let Some((a, b)) = c.pair {
            // A direct conversation is titled with the peer's name.
            out.push(Want::UserName(if a == l.user { b } else { a }));
        }
        out.push(Want::Before {
            conv,
            before: to.saturating_add(1),
            limit: 1,
        });
        out.push(Want::After {
            conv,
            after: read.max(from.saturating_sub(1)),
            limit: sh.cfg.unread_count_max,
        });
    }
    out
}

/// At an owner: a summary of each conversation the user is still a member of.
pub(super) fn on_cmd<I, M>(sh: &mut Shared<I, M>, l: ListCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let mut summaries = Vec::new();
    for conv in l.convs {
        if let Ok(s) = summary(sh, conv, l.user) {
            summaries.push(s);
        }
    }
    sh.send_to(
        l.origin.shard,
        Inner::ListPart(ListPart {
            to: l.origin.conn,
            request_id: l.request_id,
            summaries,
        }),
    );
}

/// `user`'s summary of `conv`: last message and seq, read cursor, unread count (messages from
/// others after the read cursor, at most `unread_count_max`), and title (the group's name, or
/// the peer's display name).
fn summary<I, M>(
    sh: &mut Shared<I, M>,
    conv: ConvId,
    user: UserId,
) -> Result<v1::ConversationSummary, Refusal>
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let unread_max = sh.cfg.unread_count_max;
    // Only the seqs the user may read: a group member's from its join, a former member's up
    // to its removal.
    let (_, (from, to)) = sh.reader_conv(conv, user)?;
    let mut last = sh.read_before(conv, to.saturating_add(1), 1)?;
    last.retain(|e| e.seq.0 >= from);
    let keep = sh.keep(conv);
    let (c, _) = sh.reader_conv(conv, user)?;
    let read = c.cursors.read.get(&user).copied().unwrap_or(0);
    let (kind, peer, title) = match c.pair {
        Some((a, b)) => (
            v1::ConversationKind::Direct,
            if a == user { b.0 } else { a.0 },
            String::new(),
        ),
        None => (v1::ConversationKind::Group, 0, c.title.clone()),
    };
    // As of the page's read (a moment ago, off this thread, if it was parked for it): the
    // last message's seq (0: none then).
    let last_seq = last.first().map_or(0, |e| e.seq.0);
    let unread = sh
        .read_after(conv, read.max(from.saturating_sub(1)), unread_max)?
        .iter()
        .filter(|e| {
            e.seq.0 <= to && e.sender != user && changes::counts_as_unread(e) && !keep.gone(e)
        })
        .count();
    let title = if kind == v1::ConversationKind::Direct {
        sh.user_name(UserId(peer)).unwrap_or(title)
    } else {
        title
    };
    let mut last_message: Vec<v1::Message> = last
        .first()
        .filter(|e| !keep.gone(e))
        .and_then(|e| entry_to_message(conv, e))
        .into_iter()
        .collect();
    changes::present(sh, conv, &mut last_message)?;
    Ok(v1::ConversationSummary {
        conversation_id: conv.0,
        kind: kind as i32,
        peer_user_id: peer,
        title,
        last_message: last_message.pop().map(Box::new),
        last_seq,
        unread_count: unread as u32,
        read_up_to_seq: read,
    })
}

/// At the ingress shard: an owner's summaries; after the last owner's, the page.
pub(super) fn on_part<I, M>(sh: &mut Shared<I, M>, p: ListPart) {
    let Some(c) = sh.dir.conns.get_mut(&p.to) else {
        return;
    };
    let Some(g) = c.more.as_mut().and_then(|m| m.lists.get_mut(&p.request_id)) else {
        return;
    };
    if !g.add(p.summaries) {
        return;
    }
    let Some(g) = c.more.as_mut().and_then(|m| m.lists.remove(&p.request_id)) else {
        return;
    };
    c.tidy();
    let f = frame(p.request_id, Body::ConversationList(g.page()));
    sh.emit(p.to, f, false);
}

/// Where a page starts: the opaque `cursor` of the previous page (empty for the first).
fn page_offset(cursor: &[u8]) -> Result<usize, Refusal> {
    match *cursor {
        [] => Ok(0),
        [a, b, c, d] => Ok(u32::from_be_bytes([a, b, c, d]) as usize),
        _ => Err(Refusal(ErrorCode::InvalidArgument, "bad cursor".into())),
    }
}

#[cfg(test)]
mod tests {
    use starling_protocol::v1::{self, ErrorCode, frame::Body};

    use super::super::ShardConfig;
    use super::super::fixture::{GROUP, Shard, drive_until, read_cursor, sent, shard};
    use super::page_offset;
    use crate::ids::ConnId;

    fn list(s: &mut Shard, now: &mut u64, conn: ConnId) -> v1::ConversationList {
        let f = v1::Frame {
            request_id: 70,
            body: Some(Body::ListConversations(v1::ListConversations::default())),
        };
        s.handle_frame(conn, f, *now);
        let out = drive_until(s, now, |c, f| c == conn && f.request_id == 70);
        match out
            .into_iter()
            .find(|(c, f)| *c == conn && f.request_id == 70)
        {
            Some((
                _,
                v1::Frame {
                    body: Some(Body::ConversationList(l)),
                    ..
                },
            )) => l,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_summary_has_the_last_message_the_title_and_what_is_unread() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        sent(&mut s, &mut now, 1..=3);
        let l = list(&mut s, &mut now, ConnId(2));
        assert!(l.next_cursor.is_empty());
        let [c] = &l.conversations[..] else {
            panic!("{l:?}")
        };
        assert_eq!(c.conversation_id, GROUP.0);
        assert_eq!(c.kind, v1::ConversationKind::Group as i32);
        assert_eq!((c.title.as_str(), c.last_seq, c.unread_count), ("g", 3, 3));
        assert_eq!(c.last_message.as_ref().map(|m| m.seq), Some(3));
        // Read up to 2: one left unread; the sender has nothing unread (its own messages).
        read_cursor(&mut s, now, 7, 2);
        drive_until(&mut s, &mut now, |_, f| f.request_id == 7);
        let c = &list(&mut s, &mut now, ConnId(2)).conversations[0];
        assert_eq!((c.unread_count, c.read_up_to_seq), (1, 2));
        assert_eq!(
            list(&mut s, &mut now, ConnId(1)).conversations[0].unread_count,
            0
        );
    }

    #[test]
    fn the_page_cursor_is_an_offset_or_refused() {
        assert_eq!(page_offset(&[]), Ok(0));
        assert_eq!(page_offset(&[0, 0, 1, 2]), Ok(258));
        let bad = page_offset(&[1, 2, 3]).unwrap_err();
        assert_eq!(
            (bad.0, bad.1.as_str()),
            (ErrorCode::InvalidArgument, "bad cursor")
        );
    }
}
