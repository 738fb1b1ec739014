//! `Sync`: a device catches up on every conversation of its user, across shards
//! (ingress → owners → gather; see `docs/design/messaging.md`, "Sync, history, conversation
//! list, blocking"). Each owner streams `Deliver` frames in seq order (from the index and the
//! durable tail) and the conversation's receipts, all with the Sync's `request_id`; the ingress
//! shard ends the Sync with one `SyncDone` once every owner answered.

use std::collections::BTreeMap;

use prost::Message as _;
use starling_protocol::v1::{self, frame::Body};
use starling_storage::{CursorStore, MessageIndex, MetadataStore, UserId};

use super::cursors::receipt;
use super::envelope::entry_to_message;
use super::frames::{Refusal, frame};
use super::gather::SyncGather;
use super::group_receipts;
use super::mail::{Inner, SyncCmd, SyncPart};
use super::outbound::Outbound;
use super::reader::Want;
use super::shared::Shared;
use crate::ids::{ConnRef, ConvId};

/// At the ingress shard: lists the user's conversations (so that those missing from the
/// request's map are included), splits them by owner and starts gathering the owners' parts.
/// The device is catching up, so it is no longer behind.
pub(super) fn request<I: MessageIndex, M: MetadataStore + CursorStore>(
    sh: &mut Shared<I, M>,
    origin: ConnRef,
    rid: u64,
    user: UserId,
    s: v1::Sync,
) -> Result<(), Refusal> {
    let convs = sh.user_convs(user)?;
    let mut per_owner: BTreeMap<usize, Vec<(ConvId, u64)>> = BTreeMap::new();
    for conv in convs {
        let last = s.last_seq.get(&conv.0).copied().unwrap_or(0);
        per_owner
            .entry(sh.mail.owner(conv))
            .or_default()
            .push((conv, last));
    }
    if !sh.dir.conns.contains_key(&origin.conn) {
        return Ok(());
    }
    // The device catches up now: pushes resume, hints are void.
    Outbound::caught_up(&mut sh.dir, origin.conn);
    if per_owner.is_empty() {
        sh.emit(
            origin.conn,
            frame(rid, Body::SyncDone(v1::SyncDone::default())),
            false,
        );
        return Ok(());
    }
    if let Some(c) = sh.dir.conns.get_mut(&origin.conn) {
        c.more().syncs.insert(rid, SyncGather::new(per_owner.len()));
    }
    let bytes_max = sh.cfg.sync_bytes_max / per_owner.len().max(1);
    for (owner, convs) in per_owner {
        sh.send_to(
            owner,
            Inner::Sync(SyncCmd {
                origin,
                request_id: rid,
                user,
                convs,
                bytes_max,
            }),
        );
    }
    Ok(())
}

/// The pages an owner's part of a Sync reads (for the read gate, `reads.rs`), once the states
/// are loaded: each conversation's messages after the device's last seq.
pub(super) fn reads<I, M>(sh: &Shared<I, M>, cmd: &SyncCmd) -> Vec<Want> {
    let max = sh.cfg.sync_messages_max;
    let mut out = Vec::new();
    for &(conv, last) in &cmd.convs {
        let Some(Ok((from, to))) = sh.convs.get(conv).map(|c| c.visible(cmd.user)) else {
            continue;
        };
        let last = last.max(from.saturating_sub(1));
        if last < to {
            out.push(Want::After {
                conv,
                after: last,
                limit: max + 1,
            });
        }
    }
    out
}

/// At an owner: each conversation's messages after the device's last seq (at most
/// `sync_messages_max` each, and this owner's share of `sync_bytes_max` in all; the rest is
/// reported as truncated) and its receipts, as one part for the connection that asked.
pub(super) fn on_cmd<I, M>(sh: &mut Shared<I, M>, cmd: SyncCmd)
where
    I: MessageIndex,
    M: MetadataStore + CursorStore,
{
    let max = sh.cfg.sync_messages_max;
    let now = sh.now_ms;
    let mut part = SyncPart {
        to: cmd.origin.conn,
        request_id: cmd.request_id,
        frames: Vec::new(),
        truncated: Vec::new(),
        messages: 0,
        receipts: 0,
    };
    let mut bytes = 0usize;
    for (conv, last) in cmd.convs {
        // Only the seqs the user may read: a group member's from its join, a former member's
        // up to its removal.
        let Ok((_, (from, to))) = sh.reader_conv(conv, cmd.user) else {
            continue;
        };
        let last = last.max(from.saturating_sub(1));
        // Over the byte budget: say what is there instead of reading it.
        let entries = if bytes >= cmd.bytes_max || last >= to {
            Vec::new()
        } else {
            let Ok(mut entries) = sh.read_after(conv, last, max + 1) else {
                continue;
            };
            entries.retain(|e| e.seq.0 <= to);
            entries
        };
        let keep = sh.keep(conv);
        let Ok((c, _)) = sh.reader_conv(conv, cmd.user) else {
            continue;
        };
        let end = c.seq.durable_seq.min(to);
        let mut truncated =
            entries.len() > max || (entries.is_empty() && bytes >= cmd.bytes_max && end > last);
        for e in entries.iter().take(max) {
            if bytes >= cmd.bytes_max {
                truncated = true;
                break;
            }
            // Expired, or past the server's retention: a gap the client does not fill.
            if keep.gone(e) {
                continue;
            }
            if let Some(mut m) = entry_to_message(conv, e) {
                // As it is now (edited, deleted, reacted to); a state that cannot be read ends
                // this conversation's part here (a deleted body is never served).
                if super::changes::present(sh, conv, std::slice::from_mut(&mut m)).is_err() {
                    truncated = true;
                    break;
                }
                let f = frame(
                    cmd.request_id,
                    Body::Deliver(v1::Deliver { message: Some(m) }),
                );
                bytes += f.encoded_len();
                part.frames.push(f);
                part.messages += 1;
            }
        }
        if truncated {
            part.truncated.push(v1::MessagesAvailable {
                conversation_id: conv.0,
                up_to_seq: end,
            });
        }
        if to != u64::MAX {
            // A former member: the group's receipts are no longer its business.
            continue;
        }
        let Ok((c, _)) = sh.reader_conv(conv, cmd.user) else {
            continue;
        };
        if c.group.is_some() {
            // Linear in what the caller has: its own read cursor and its messages' counts,
            // not every member's cursors.
            let r = c
                .cursors
                .announced_read
                .get(&cmd.user)
                .copied()
                .unwrap_or(0);
            if r > 0 {
                let r = receipt(conv, r, v1::ReceiptKind::Read, cmd.user, now);
                part.frames.push(frame(cmd.request_id, Body::Receipt(r)));
                part.receipts += 1;
            }
            if let Some(g) = group_receipts::for_sync(conv, c, cmd.user) {
                part.frames
                    .push(frame(cmd.request_id, Body::GroupReceipts(g)));
                part.receipts += 1;
            }
            continue;
        }
        let mut rs = Vec::new();
        for (&u, &d) in &c.cursors.announced_delivered {
            if u != cmd.user && d > 0 {
                rs.push(receipt(conv, d, v1::ReceiptKind::Delivered, u, now));
            }
        }
        for (&u, &r) in &c.cursors.announced_read {
            if r > 0 {
                rs.push(receipt(conv, r, v1::ReceiptKind::Read, u, now));
            }
        }
        rs.sort_by_key(|r| (r.by_user_id, r.kind));
        for r in rs {
            part.frames.push(frame(cmd.request_id, Body::Receipt(r)));
            part.receipts += 1;
        }
    }
    sh.send_to(cmd.origin.shard, Inner::SyncPart(part));
}

/// At the ingress shard: an owner's part goes to the connection; after the last one, `SyncDone`.
pub(super) fn on_part<I, M>(sh: &mut Shared<I, M>, p: SyncPart) {
    let Some(c) = sh.dir.conns.get_mut(&p.to) else {
        return;
    };
    let done = match c.more.as_mut().and_then(|m| m.syncs.get_mut(&p.request_id)) {
        Some(g) => g.add(p.truncated, p.messages, p.receipts),
        None => return,
    };
    for f in p.frames {
        sh.emit(p.to, f, false);
    }
    if done
        && let Some(g) = sh.dir.conns.get_mut(&p.to).and_then(|c| {
            let g = c.more.as_mut()?.syncs.remove(&p.request_id);
            c.tidy();
            g
        })
    {
        let f = frame(p.request_id, Body::SyncDone(g.done()));
        sh.emit(p.to, f, false);
    }
}

#[cfg(test)]
mod tests {
    use starling_protocol::v1::{self, frame::Body};
    use starling_storage::{DeviceId, UserId};

    use super::super::ShardConfig;
    use super::super::fixture::{GROUP, Shard, drive_until, read_cursor, sent, shard};
    use crate::ids::ConnId;

    fn sync(s: &mut Shard, now: &mut u64, conn: ConnId, last_seq: &[(u64, u64)]) -> Vec<Body> {
        let f = v1::Frame {
            request_id: 50,
            body: Some(Body::Sync(v1::Sync {
                last_seq: last_seq.iter().copied().collect(),
            })),
        };
        s.handle_frame(conn, f, *now);
        drive_until(s, now, |c, f| {
            c == conn && matches!(f.body, Some(Body::SyncDone(_)))
        })
        .into_iter()
        .filter(|(c, f)| *c == conn && f.request_id == 50)
        .filter_map(|(_, f)| f.body)
        .collect()
    }

    #[test]
    fn a_sync_returns_what_follows_the_devices_last_seq_the_receipts_then_sync_done() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        sent(&mut s, &mut now, 1..=3);
        read_cursor(&mut s, now, 7, 1);
        drive_until(&mut s, &mut now, |_, f| f.request_id == 7);
        let got = sync(&mut s, &mut now, ConnId(2), &[(GROUP.0, 1)]);
        let [
            Body::Deliver(a),
            Body::Deliver(b),
            Body::Receipt(r),
            Body::SyncDone(done),
        ] = &got[..]
        else {
            panic!("{got:?}")
        };
        let seq = |d: &v1::Deliver| d.message.as_ref().map(|m| m.seq);
        assert_eq!((seq(a), seq(b)), (Some(2), Some(3)));
        assert_eq!((r.by_user_id, r.up_to_seq), (2, 1));
        assert_eq!(r.kind, v1::ReceiptKind::Read as i32);
        assert_eq!((done.messages, done.receipts), (2, 1));
        assert!(done.truncated.is_empty());
    }

    #[test]
    fn a_conversation_over_the_per_conversation_limit_is_reported_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShardConfig {
            sync_messages_max: 2,
            ..ShardConfig::default()
        };
        let (mut s, _meta) = shard(dir.path(), cfg);
        let mut now = 1_000;
        sent(&mut s, &mut now, 1..=3);
        // A conversation missing from the map is synced from the start.
        let got = sync(&mut s, &mut now, ConnId(2), &[]);
        let delivered = got.iter().filter(|b| matches!(b, Body::Deliver(_))).count();
        assert_eq!(delivered, 2);
        let Some(Body::SyncDone(done)) = got.last() else {
            panic!("{got:?}")
        };
        assert_eq!(
            done.truncated,
            [v1::MessagesAvailable {
                conversation_id: GROUP.0,
                up_to_seq: 3,
            }]
        );
    }

    #[test]
    fn a_user_without_conversations_gets_sync_done_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000;
        s.handle_conn_opened(ConnId(3), UserId(3), DeviceId(1), now);
        let got = sync(&mut s, &mut now, ConnId(3), &[]);
        assert_eq!(got, [Body::SyncDone(v1::SyncDone::default())]);
    }
}
