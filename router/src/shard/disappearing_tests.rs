use super::*;

fn send(seconds: u64) -> v1::Send {
    v1::Send {
        client_msg_id: bytes::Bytes::from_static(&[1; 16]),
        set_timer: Some(Box::new(v1::DisappearingTimer { seconds })),
        ..v1::Send::default()
    }
}

#[test]
fn a_timer_change_is_checked_at_ingress() {
    for ok in [
        0,
        DISAPPEARING_TIMER_SECS_MIN,
        3600,
        DISAPPEARING_TIMER_SECS_MAX,
    ] {
        assert!(check_request(&send(ok)).is_ok(), "{ok}");
    }
    for bad in [
        1,
        DISAPPEARING_TIMER_SECS_MIN - 1,
        DISAPPEARING_TIMER_SECS_MAX + 1,
    ] {
        let Refusal(code, msg) = check_request(&send(bad)).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidArgument);
        assert!(msg.contains("0 (off) or from 5 to 31536000"), "{msg}");
    }
    let with_body = v1::Send {
        body: bytes::Bytes::from_static(b"x"),
        ..send(60)
    };
    let Refusal(code, msg) = check_request(&with_body).unwrap_err();
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(msg.contains("carries no content_type"), "{msg}");
    let with_reply = v1::Send {
        reply_to_seq: 3,
        ..send(60)
    };
    assert!(check_request(&with_reply).is_err());
    // No timer: nothing to check here.
    assert!(check_request(&v1::Send::default()).is_ok());
}

#[test]
fn an_entry_is_gone_once_expired_or_past_retention() {
    use super::super::envelope::{ENVELOPE_V1, encode_envelope, with_expiry};
    use starling_storage::{ClientMsgId, ConvId, DeviceId, EntryKind, Seq, UserId};
    let entry = |expires: u64, ts: u64| {
        let (v, body) = with_expiry(expires, encode_envelope("text/plain", 0, None, b"hi"));
        Entry {
            kind: EntryKind::MESSAGE,
            conv: ConvId(1),
            seq: Seq(1),
            client_msg_id: ClientMsgId([1; 16]),
            sender: UserId(1),
            sender_device: DeviceId(1),
            ts_ms: TimestampMs(ts),
            content_type: v,
            body,
        }
    };
    let forever = entry(0, 1_000);
    assert_eq!(forever.content_type, ENVELOPE_V1);
    assert!(!gone(&forever, u64::MAX, 0), "no timer, no retention: kept");
    let timed = entry(61_000, 1_000);
    assert!(!gone(&timed, 60_999, 0));
    assert!(gone(&timed, 61_000, 0), "gone at its expiry");
    // Retention: gone `retention_ms` after its server timestamp, timer or not.
    assert!(!gone(&forever, 10_999, 10_000));
    assert!(gone(&forever, 11_000, 10_000));
    assert!(
        gone(&timed, 11_000, 10_000),
        "retention shorter than the timer wins"
    );
    // The storage's policy agrees: kept until the earlier of the two, forever with neither.
    assert_eq!(keep_until(&forever, 0), u64::MAX);
    assert_eq!(keep_until(&forever, 10_000), 11_000);
    assert_eq!(keep_until(&timed, 0), 61_000);
    assert_eq!(keep_until(&timed, 10_000), 11_000);
    for (e, r) in [(&forever, 10_000), (&timed, 0), (&timed, 100_000)] {
        let t = keep_until(e, r);
        assert!(!gone(e, t - 1, r) && gone(e, t, r), "{t}");
    }
    assert_eq!(expiry(5_000, 0), 0);
    assert_eq!(expiry(5_000, 7), 12_000);
    assert_eq!(expiry(u64::MAX - 1, 7), u64::MAX, "saturates, never wraps");
}

mod at_a_shard {
    use bytes::Bytes;
    use starling_protocol::v1::{self, ErrorCode, frame::Body};
    use starling_storage::conv_delivered::ConvDelivered;
    use starling_storage::conv_timer::ConvTimer;
    use starling_storage::{ClientMsgId, MetaBatch, MetadataStore, TimestampMs, UserId};

    use super::super::super::ShardConfig;
    use super::super::super::fixture::{GROUP, Shard, drive_until, shard};
    use crate::ids::ConnId;

    /// A Send from `conn` into [`GROUP`] (`client_msg_id` 16 × `cmid`), edited by `edit`; its
    /// answer and every frame emitted meanwhile.
    fn send(
        s: &mut Shard,
        now: &mut u64,
        conn: ConnId,
        (rid, cmid): (u64, u8),
        edit: impl FnOnce(&mut v1::Send),
    ) -> (Body, Vec<(ConnId, v1::Frame)>) {
        let mut sd = v1::Send {
            client_msg_id: Bytes::from(vec![cmid; 16]),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::ConversationId(GROUP.0)),
            }),
            content_type: "text/plain".into(),
            body: Bytes::from_static(b"hi"),
            ..v1::Send::default()
        };
        edit(&mut sd);
        let f = v1::Frame {
            request_id: rid,
            body: Some(Body::Send(sd)),
        };
        s.handle_frame(conn, f, *now);
        let out = drive_until(s, now, |c, f| c == conn && f.request_id == rid);
        let answer = out
            .iter()
            .find(|(c, f)| *c == conn && f.request_id == rid)
            .and_then(|(_, f)| f.body.clone())
            .expect("an answer");
        (answer, out)
    }

    fn timer(s: &mut Shard, now: &mut u64, conn: ConnId, id: (u64, u8), secs: u64) -> Body {
        send(s, now, conn, id, |sd| {
            sd.content_type.clear();
            sd.body = Bytes::new();
            sd.set_timer = Some(Box::new(v1::DisappearingTimer { seconds: secs }));
        })
        .0
    }

    fn acked(b: &Body) -> (u64, bool) {
        match b {
            Body::SendAck(a) => (a.seq, a.duplicate),
            other => panic!("not a SendAck: {other:?}"),
        }
    }

    fn request(s: &mut Shard, now: &mut u64, rid: u64, body: Body) -> Vec<v1::Frame> {
        let f = v1::Frame {
            request_id: rid,
            body: Some(body),
        };
        s.handle_frame(ConnId(2), f, *now);
        let out = drive_until(s, now, |c, f| {
            c == ConnId(2) && f.request_id == rid && !matches!(f.body, Some(Body::Deliver(_)))
        });
        out.into_iter()
            .filter(|(c, f)| *c == ConnId(2) && f.request_id == rid)
            .map(|(_, f)| f)
            .collect()
    }

    fn history(s: &mut Shard, now: &mut u64) -> Vec<v1::Message> {
        let get = Body::GetHistory(v1::GetHistory {
            conversation_id: GROUP.0,
            ..v1::GetHistory::default()
        });
        match request(s, now, 60, get).pop().and_then(|f| f.body) {
            Some(Body::HistoryPage(p)) => p.messages,
            other => panic!("{other:?}"),
        }
    }

    fn sync(s: &mut Shard, now: &mut u64) -> Vec<v1::Message> {
        let sync = Body::Sync(v1::Sync {
            last_seq: [(GROUP.0, 0)].into_iter().collect(),
        });
        request(s, now, 61, sync)
            .into_iter()
            .filter_map(|f| match f.body {
                Some(Body::Deliver(d)) => d.message,
                _ => None,
            })
            .collect()
    }

    fn preview(s: &mut Shard, now: &mut u64) -> v1::ConversationSummary {
        let list = Body::ListConversations(v1::ListConversations::default());
        match request(s, now, 62, list).pop().and_then(|f| f.body) {
            Some(Body::ConversationList(l)) => l
                .conversations
                .into_iter()
                .find(|c| c.conversation_id == GROUP.0)
                .expect("the group is listed"),
            other => panic!("{other:?}"),
        }
    }

    fn seqs(m: &[v1::Message]) -> Vec<u64> {
        m.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn a_timer_is_an_entry_and_the_messages_after_it_disappear_when_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000_000;
        let (c1, c2) = (ConnId(1), ConnId(2));
        let (before, _) = send(&mut s, &mut now, c1, (1, 1), |_| {});
        assert_eq!(acked(&before), (1, false));
        // Any member of the group sets it; it is entry 2, pushed to the others.
        let (set, out) = send(&mut s, &mut now, c2, (2, 2), |sd| {
            sd.content_type.clear();
            sd.body = Bytes::new();
            sd.set_timer = Some(Box::new(v1::DisappearingTimer { seconds: 60 }));
        });
        assert_eq!(acked(&set), (2, false));
        let mut pushed = out;
        if !pushed.iter().any(|(c, _)| *c == c1) {
            pushed = drive_until(&mut s, &mut now, |c, _| c == c1);
        }
        let live = pushed
            .iter()
            .find_map(|(c, f)| match &f.body {
                Some(Body::Deliver(d)) if *c == c1 => d.message.clone(),
                _ => None,
            })
            .expect("the timer change is pushed to user 1");
        assert_eq!(
            (live.seq, live.timer_changed),
            (2, Some(Box::new(v1::DisappearingTimer { seconds: 60 })))
        );
        // A retry is the same entry.
        assert_eq!(acked(&timer(&mut s, &mut now, c2, (3, 2), 60)), (2, true));
        let sent_at = now;
        let (after, _) = send(&mut s, &mut now, c1, (4, 4), |_| {});
        assert_eq!(acked(&after).0, 3);
        let h = history(&mut s, &mut now);
        assert_eq!(seqs(&h), [1, 2, 3]);
        assert_eq!(
            h[0].expires_at_ms, 0,
            "sent before the timer: never expires"
        );
        assert_eq!(
            h[1].timer_changed,
            Some(Box::new(v1::DisappearingTimer { seconds: 60 }))
        );
        assert_eq!(
            h[1].expires_at_ms, 0,
            "a timer change does not itself expire"
        );
        let exp = h[2].expires_at_ms;
        assert!(
            exp >= sent_at + 60_000 && exp == h[2].server_ts_ms + 60_000,
            "{:?}",
            h[2]
        );
        assert_eq!(sync(&mut s, &mut now), h);
        // A reaction to the expiring message expires with it.
        let (react, _) = send(&mut s, &mut now, c2, (5, 5), |sd| {
            sd.content_type.clear();
            sd.body = Bytes::new();
            sd.change = Some(Box::new(v1::MessageChange {
                kind: v1::ChangeKind::React as i32,
                target_seq: 3,
                emoji: "👍".into(),
            }));
        });
        assert_eq!(acked(&react).0, 4);
        assert_eq!(history(&mut s, &mut now)[3].expires_at_ms, exp);
        // A timer change is not a message: no reply to it, no change of it.
        let (reply, _) = send(&mut s, &mut now, c1, (6, 6), |sd| sd.reply_to_seq = 2);
        assert!(matches!(&reply, Body::Error(e) if e.code == ErrorCode::InvalidArgument as i32));
        // Expired: gone from history, sync and the list's preview; replies to it are NOT_FOUND.
        now = exp;
        assert_eq!(seqs(&history(&mut s, &mut now)), [1, 2]);
        assert_eq!(seqs(&sync(&mut s, &mut now)), [1, 2]);
        let p = preview(&mut s, &mut now);
        assert_eq!(
            (p.last_seq, p.last_message),
            (4, None),
            "the last entry expired"
        );
        let (reply, _) = send(&mut s, &mut now, c1, (7, 7), |sd| sd.reply_to_seq = 3);
        assert!(matches!(&reply, Body::Error(e) if e.code == ErrorCode::NotFound as i32));
        // Off again: the next message never expires. The setting is in the metadata.
        assert_eq!(acked(&timer(&mut s, &mut now, c1, (8, 8), 0)).0, 5);
        let (last, _) = send(&mut s, &mut now, c1, (9, 9), |_| {});
        assert_eq!(acked(&last).0, 6);
        let h = history(&mut s, &mut now);
        assert_eq!(seqs(&h), [1, 2, 5, 6]);
        assert_eq!(h[3].expires_at_ms, 0);
        let rec: ConvTimer = meta
            .get(&ConvTimer::key_of(GROUP.storage()))
            .unwrap()
            .expect("the setting is stored");
        assert_eq!(
            (rec.secs, rec.set_by, rec.set_id),
            (0, UserId(1), ClientMsgId([8; 16]))
        );
        // Out of bounds: refused, nothing stored.
        let Body::Error(e) = timer(&mut s, &mut now, c1, (10, 10), 2) else {
            panic!("a 2 s timer is refused");
        };
        assert_eq!(e.code, ErrorCode::InvalidArgument as i32);
        assert_eq!(seqs(&history(&mut s, &mut now)), [1, 2, 5, 6]);
    }

    #[test]
    fn a_setting_written_before_a_crash_is_in_force_and_its_retry_sequences_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, meta) = shard(dir.path(), ShardConfig::default());
        let mut now = 1_000_000;
        let mut b = MetaBatch::default();
        b.put(&ConvTimer {
            conv: GROUP.storage(),
            secs: 30,
            set_by: UserId(1),
            set_ts: TimestampMs(now),
            set_id: ClientMsgId([50; 16]),
        });
        meta.commit(&b).unwrap();
        // The setting is loaded with the conversation: a message expires by it.
        let (m, _) = send(&mut s, &mut now, ConnId(2), (1, 1), |_| {});
        assert_eq!(acked(&m).0, 1);
        let h = history(&mut s, &mut now);
        assert_eq!(h[0].expires_at_ms, h[0].server_ts_ms + 30_000);
        // The retry of the lost change gets its entry.
        assert_eq!(
            acked(&timer(&mut s, &mut now, ConnId(1), (2, 50), 30)),
            (2, false)
        );
        let h = history(&mut s, &mut now);
        assert_eq!(
            h[1].timer_changed,
            Some(Box::new(v1::DisappearingTimer { seconds: 30 }))
        );
    }

    #[test]
    fn in_a_group_where_only_admins_send_only_an_admin_sets_the_timer() {
        use starling_storage::meta::{Group, GroupSettings, Member, Role};
        let dir = tempfile::tempdir().unwrap();
        let (mut s, meta) = shard(dir.path(), ShardConfig::default());
        // User 1 becomes the group's admin and only admins may send.
        let mut b = MetaBatch::default();
        b.put(&Group {
            id: GROUP.storage(),
            name: "g".into(),
            created_by: UserId(1),
            created_ms: TimestampMs(0),
            epoch: 0,
            settings: Some(GroupSettings {
                only_admins_send: true,
                ..GroupSettings::default()
            }),
        });
        b.add_member(&Member {
            group: GROUP.storage(),
            user: UserId(1),
            role: Role::Admin,
            joined_ms: TimestampMs(0),
            joined_seq: None,
        });
        meta.commit(&b).unwrap();
        let mut now = 1_000_000;
        let Body::Error(e) = timer(&mut s, &mut now, ConnId(2), (1, 1), 60) else {
            panic!("a member who may not send may not set the timer");
        };
        assert_eq!(e.code, ErrorCode::PermissionDenied as i32);
        assert_eq!(acked(&timer(&mut s, &mut now, ConnId(1), (2, 2), 60)).0, 1);
    }

    #[test]
    fn the_servers_retention_hides_every_entry_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShardConfig {
            retention_ms: 10_000,
            ..ShardConfig::default()
        };
        let (mut s, _meta) = shard(dir.path(), cfg);
        let mut now = 1_000_000;
        let (a, _) = send(&mut s, &mut now, ConnId(1), (1, 1), |_| {});
        assert_eq!(acked(&a).0, 1);
        let first_ts = history(&mut s, &mut now)[0].server_ts_ms;
        now += 5_000;
        let (b, _) = send(&mut s, &mut now, ConnId(1), (2, 2), |_| {});
        assert_eq!(acked(&b).0, 2);
        assert_eq!(seqs(&history(&mut s, &mut now)), [1, 2]);
        assert_eq!(preview(&mut s, &mut now).unread_count, 2);
        now = first_ts + 10_000;
        assert_eq!(seqs(&history(&mut s, &mut now)), [2]);
        assert_eq!(seqs(&sync(&mut s, &mut now)), [2]);
        let p = preview(&mut s, &mut now);
        assert_eq!(p.unread_count, 1, "an expired message is not unread");
        now += 10_000;
        assert!(history(&mut s, &mut now).is_empty());
        let p = preview(&mut s, &mut now);
        assert_eq!((p.last_seq, p.last_message, p.unread_count), (2, None, 0));
    }

    /// `conn`'s device acknowledges delivery of [`GROUP`] up to `seq`; returns once the cursor
    /// batch that carries it (and any delivery step due) is durable.
    fn delivered(s: &mut Shard, now: &mut u64, conn: ConnId, rid: u64, seq: u64) {
        let f = v1::Frame {
            request_id: rid,
            body: Some(Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: GROUP.0,
                up_to_seq: seq,
            })),
        };
        s.handle_frame(conn, f, *now);
        let out = drive_until(s, now, |c, f| c == conn && f.request_id == rid);
        assert!(
            out.iter().any(|(c, f)| *c == conn
                && f.request_id == rid
                && matches!(f.body, Some(Body::Done(_)))),
            "{out:?}"
        );
    }

    fn steps(meta: &starling_storage::MemMeta) -> Vec<(u64, u64)> {
        meta.get::<ConvDelivered>(&ConvDelivered::key_of(GROUP.storage()))
            .unwrap()
            .map(|r| r.steps)
            .unwrap_or_default()
    }

    #[test]
    fn the_retention_after_delivery_hides_what_every_member_received_that_long_ago() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShardConfig {
            retention_after_delivery_ms: Some(60_000),
            ..ShardConfig::default()
        };
        let step = cfg.retention().delivery_step_ms();
        assert_eq!(
            step, 10_000,
            "a sixteenth of a minute is under the least step"
        );
        let (mut s, meta) = shard(dir.path(), cfg.clone());
        let mut now = 1_000_000;
        for i in 1..=3u8 {
            let (a, _) = send(&mut s, &mut now, ConnId(1), (u64::from(i), i), |_| {});
            assert_eq!(acked(&a).0, u64::from(i));
        }
        // Nobody received anything yet: nothing recorded, everything served however late.
        assert!(steps(&meta).is_empty());
        // The sender's device has its own messages (the SDK acknowledges them too); the other
        // member received the first only.
        delivered(&mut s, &mut now, ConnId(1), 10, 3);
        assert!(steps(&meta).is_empty(), "user 2 received nothing yet");
        delivered(&mut s, &mut now, ConnId(2), 11, 1);
        let first = steps(&meta);
        assert_eq!(first.len(), 1);
        let (floor, t1) = first[0];
        assert_eq!(floor, 1);
        assert!(t1 <= now);
        // User 2 receives the rest soon after: the step waits for the granularity.
        now += 1_000;
        delivered(&mut s, &mut now, ConnId(2), 12, 3);
        assert_eq!(steps(&meta), first, "too soon after the last step");
        // Far later than the message was received, but before its recorded step:
        now = t1 + 60_000 - 1;
        assert_eq!(seqs(&history(&mut s, &mut now)), [1, 2, 3]);
        now = t1 + 60_000;
        assert_eq!(seqs(&history(&mut s, &mut now)), [2, 3]);
        assert_eq!(seqs(&sync(&mut s, &mut now)), [2, 3]);
        // The pending step was written when its granularity allowed (with the cursor batch
        // of the ticks meanwhile); a barrier: a cursor request is answered with the next batch.
        delivered(&mut s, &mut now, ConnId(2), 13, 3);
        let both = steps(&meta);
        assert_eq!(both.len(), 2, "{both:?}");
        let (floor2, t2) = both[1];
        assert_eq!(floor2, 3);
        assert!((t1 + step..=t1 + 60_000).contains(&t2), "{both:?}");
        now = t2 + 60_000 - 1;
        assert_eq!(seqs(&history(&mut s, &mut now)), [2, 3]);
        now = t2 + 60_000;
        assert!(history(&mut s, &mut now).is_empty());
        let p = preview(&mut s, &mut now);
        assert_eq!((p.last_seq, p.last_message, p.unread_count), (3, None, 0));
        // A restart reads the steps back: still gone.
        drop(s);
        let store = starling_storage::EmbeddedShard::open(
            dir.path(),
            starling_storage::ShardOptions::default(),
        )
        .unwrap();
        let index = store.index().clone();
        let mut s = super::super::super::fixture::shard_over(cfg, store, index, meta.clone());
        assert!(history(&mut s, &mut now).is_empty());
        // A message sent now is served: nobody but its sender received it.
        let (a, _) = send(&mut s, &mut now, ConnId(1), (20, 20), |_| {});
        assert_eq!(acked(&a).0, 4);
        now += 3_600_000;
        assert_eq!(seqs(&history(&mut s, &mut now)), [4]);
    }
}
