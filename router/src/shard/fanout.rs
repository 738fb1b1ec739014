//! Fan-out: every shard pushes durable messages and receipts to its own connections of the
//! members (see `docs/design/messaging.md`, "Session directory and fan-out"). The owner sends one
//! `Arc`'d item list per log batch (or cursor batch) to every shard; each looks the members up in
//! its slice of the session directory. A `Deliver` is encoded once per shard and shared by every
//! device it goes to; a connection that is behind gets a hint instead (`outbound`).

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use starling_protocol::FrameKind;
use starling_protocol::v1::{self, frame::Body};

use super::frames::{encode_frame, encode_into, frame};
use super::mail::FanoutItem;
use super::shared::Shared;
use crate::ids::ConvId;

/// Pushes `items` to this shard's connections of their recipients.
pub(super) fn push<I, M>(sh: &mut Shared<I, M>, items: &[FanoutItem]) {
    let (here, now) = (sh.mail.shard(), sh.now_ms);
    for item in items {
        match item {
            FanoutItem::Message {
                msg,
                members,
                origin,
            } => {
                // Encoded once, for the first device that takes it; the others share it.
                let mut encoded: Option<Bytes> = None;
                for u in members.iter() {
                    // By index: pushing changes the directory, and cloning the list allocated
                    // once per member per message.
                    for i in 0.. {
                        let Some(conn) = sh.dir.user_conn(u, i) else {
                            break;
                        };
                        if origin.shard == here && origin.conn == conn {
                            continue;
                        }
                        // Encoded from the borrowed message: an owned Deliver frame would
                        // clone it.
                        let deliver = |buf: &mut BytesMut| {
                            let len = msg.encoded_len();
                            let need = starling_protocol::deliver_framed_len(len);
                            encode_into(buf, need, |b| {
                                starling_protocol::put_deliver_framed(msg, len, b)
                            })
                        };
                        let kind = FrameKind::Deliver;
                        if sh
                            .out
                            .push_shared(&mut sh.dir, conn, &mut encoded, kind, now, deliver)
                        {
                            sh.stats.pushed += 1;
                        } else if let Some(c) = sh.dir.conns.get_mut(&conn) {
                            let h = c
                                .more()
                                .hints
                                .entry(ConvId(msg.conversation_id))
                                .or_default();
                            *h = (*h).max(msg.seq);
                        }
                    }
                }
            }
            FanoutItem::Receipt { receipt, to } => {
                let mut encoded: Option<Bytes> = None;
                for u in to {
                    for i in 0.. {
                        let Some(conn) = sh.dir.user_conn(u, i) else {
                            break;
                        };
                        // A device that is behind learns receipts from its next Sync.
                        let kind = FrameKind::Receipt;
                        sh.out
                            .push_shared(&mut sh.dir, conn, &mut encoded, kind, now, |buf| {
                                encode_frame(buf, &frame(0, Body::Receipt(*receipt)))
                            });
                    }
                }
            }
            FanoutItem::Available {
                conv,
                up_to_seq,
                members,
            } => {
                let mut encoded: Option<Bytes> = None;
                let hint = v1::MessagesAvailable {
                    conversation_id: conv.0,
                    up_to_seq: *up_to_seq,
                };
                for u in &sh.dir.connected_of(members) {
                    for i in 0.. {
                        let Some(conn) = sh.dir.user_conn(u, i) else {
                            break;
                        };
                        let kind = FrameKind::MessagesAvailable;
                        if sh
                            .out
                            .push_shared(&mut sh.dir, conn, &mut encoded, kind, now, |buf| {
                                encode_frame(buf, &frame(0, Body::MessagesAvailable(hint)))
                            })
                        {
                            sh.stats.hints += 1;
                        } else if let Some(c) = sh.dir.conns.get_mut(&conn) {
                            // Behind: the hint waits with the others.
                            let h = c.more().hints.entry(*conv).or_default();
                            *h = (*h).max(*up_to_seq);
                        }
                    }
                }
            }
            FanoutItem::GroupReceipts { receipts, to } => {
                let mut encoded: Option<Bytes> = None;
                for i in 0.. {
                    let Some(conn) = sh.dir.user_conn(to, i) else {
                        break;
                    };
                    // A device that is behind learns the counts from its next Sync.
                    let kind = FrameKind::GroupReceipts;
                    sh.out
                        .push_shared(&mut sh.dir, conn, &mut encoded, kind, now, |buf| {
                            encode_frame(buf, &frame(0, Body::GroupReceipts(receipts.clone())))
                        });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use starling_protocol::v1::{self, frame::Body};
    use starling_storage::{DeviceId, UserId};

    use super::super::config::ShardConfig;
    use super::super::fixture::one_shard_links;
    use super::*;
    use crate::ids::{ConnId, ConnRef};

    /// User 1 on connections 1 and 2, user 2 on connection 3, user 3 on connection 4.
    fn shared(cfg: ShardConfig) -> Shared<(), ()> {
        let mut sh = Shared::new(cfg, one_shard_links(), Arc::new(()), Arc::new(()));
        for (conn, user, device) in [(1, 1, 1), (2, 1, 2), (3, 2, 1), (4, 3, 1)] {
            sh.dir.open(ConnId(conn), UserId(user), DeviceId(device));
        }
        sh
    }

    fn message(seq: u64, body: usize) -> FanoutItem {
        FanoutItem::Message {
            msg: v1::Message {
                conversation_id: 9,
                seq,
                sender_user_id: 1,
                body: Bytes::from(vec![0; body]),
                ..v1::Message::default()
            },
            members: vec![UserId(1), UserId(2)].into(),
            origin: ConnRef {
                shard: 0,
                conn: ConnId(1),
            },
        }
    }

    fn pushed(sh: &mut Shared<(), ()>) -> Vec<(ConnId, Body)> {
        std::iter::from_fn(|| sh.out.next_transmit())
            .map(|t| (t.conn, t.frame().unwrap().body.unwrap()))
            .collect()
    }

    #[test]
    fn a_message_reaches_every_members_devices_but_the_sending_connection() {
        let mut sh = shared(ShardConfig::default());
        push(&mut sh, &[message(1, 10)]);
        let got = pushed(&mut sh);
        let conns: Vec<ConnId> = got.iter().map(|(c, _)| *c).collect();
        // The sender's other device and the other member; not the sender's connection (it has
        // the SendAck), not a non-member.
        assert_eq!(conns, [ConnId(2), ConnId(3)]);
        assert!(got.iter().all(|(_, b)| matches!(b, Body::Deliver(_))));
        assert_eq!(sh.stats.pushed, 2);
    }

    #[test]
    fn a_receipt_reaches_its_recipients_devices() {
        let mut sh = shared(ShardConfig::default());
        let receipt = v1::Receipt {
            conversation_id: 9,
            up_to_seq: 4,
            ..v1::Receipt::default()
        };
        push(
            &mut sh,
            &[FanoutItem::Receipt {
                receipt,
                to: vec![UserId(1), UserId(3)],
            }],
        );
        let got = pushed(&mut sh);
        let conns: Vec<ConnId> = got.iter().map(|(c, _)| *c).collect();
        assert_eq!(conns, [ConnId(1), ConnId(2), ConnId(4)]);
        assert!(got.iter().all(|(_, b)| *b == Body::Receipt(receipt)));
    }

    #[test]
    fn a_connection_that_is_behind_is_left_a_hint_of_the_latest_seq() {
        let mut sh = shared(ShardConfig {
            conn_outbound_bytes_max: 1000,
            ..ShardConfig::default()
        });
        // The first message takes connection 3 over its budget; the next two are not pushed.
        push(&mut sh, &[message(1, 1500), message(2, 10), message(3, 10)]);
        let to_3 = pushed(&mut sh)
            .into_iter()
            .filter(|(c, _)| *c == ConnId(3))
            .count();
        assert_eq!(to_3, 1);
        let c = &sh.dir.conns[&ConnId(3)];
        assert!(c.behind);
        let hints = &c.more.as_ref().unwrap().hints;
        assert_eq!(hints.iter().collect::<Vec<_>>(), [(&ConvId(9), &3)]);
    }
}
