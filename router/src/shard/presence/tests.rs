//! Presence on one shard (the home of every user): snapshots, coalesced updates, last seen,
//! `hide_last_seen`, visibility and the per-connection limit.

use starling_protocol::v1::frame::Body;
use starling_protocol::v1::{self, ErrorCode, PresenceState};
use starling_storage::meta::{Presence as PresenceRec, keys};
use starling_storage::{DeviceId, MetadataStore, UserId};

use super::super::ShardConfig;
use super::super::fixture::{Shard, answers, drive_until, shard, transmitted};
use crate::ids::ConnId;

fn request(s: &mut Shard, now: &mut u64, conn: ConnId, rid: u64, body: Body) -> Body {
    let f = v1::Frame {
        request_id: rid,
        body: Some(body),
    };
    s.handle_frame(conn, f, *now);
    let out = drive_until(s, now, |c, f| c == conn && f.request_id == rid);
    answers(&out, conn, rid)[0].clone()
}

fn subscribe(s: &mut Shard, now: &mut u64, conn: ConnId, rid: u64, users: &[u64]) -> Body {
    let b = Body::SubscribePresence(v1::SubscribePresence {
        user_ids: users.to_vec(),
    });
    request(s, now, conn, rid, b)
}

fn set(s: &mut Shard, now: &mut u64, conn: ConnId, rid: u64, away: bool, hide: bool) -> Body {
    let state = if away {
        PresenceState::Away
    } else {
        PresenceState::Online
    };
    let b = Body::SetPresence(v1::SetPresence {
        state: state as i32,
        hide_last_seen: hide,
    });
    request(s, now, conn, rid, b)
}

/// Runs the shard until connection `conn` got a PresenceUpdate; returns every update it got.
fn updates(s: &mut Shard, now: &mut u64, conn: ConnId) -> Vec<v1::PresenceUpdate> {
    let out = drive_until(s, now, |c, f| {
        c == conn && matches!(f.body, Some(Body::PresenceUpdate(_)))
    });
    out.into_iter()
        .filter(|(c, _)| *c == conn)
        .filter_map(|(_, f)| match f.body {
            Some(Body::PresenceUpdate(u)) => Some(u),
            _ => None,
        })
        .collect()
}

fn code(b: &Body) -> i32 {
    match b {
        Body::Error(e) => e.code,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_follower_gets_the_snapshot_then_one_coalesced_update_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        presence_coalesce_ms: 20,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    let Body::PresenceSnapshot(snap) = subscribe(&mut s, &mut now, ConnId(1), 1, &[2, 2]) else {
        panic!()
    };
    assert_eq!(
        snap.users,
        [v1::PresenceUpdate {
            user_id: 2,
            state: PresenceState::Online as i32,
            last_seen_ms: 0
        }]
    );
    // AWAY, ONLINE, AWAY within one interval: one update, the latest.
    for (rid, away) in [(2, true), (3, false), (4, true)] {
        assert!(matches!(
            set(&mut s, &mut now, ConnId(2), rid, away, false),
            Body::Done(_)
        ));
    }
    let got = updates(&mut s, &mut now, ConnId(1));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].state, PresenceState::Away as i32);
    // A second device online makes the user ONLINE again.
    s.handle_conn_opened(ConnId(3), UserId(2), DeviceId(2), now);
    let got = updates(&mut s, &mut now, ConnId(1));
    assert_eq!(got[0].state, PresenceState::Online as i32);
    // Both go: OFFLINE, last seen when the last went.
    s.handle_conn_closed(ConnId(3), now);
    let gone_at = now;
    s.handle_conn_closed(ConnId(2), gone_at);
    let got = updates(&mut s, &mut now, ConnId(1));
    let last = got.last().unwrap();
    assert_eq!(
        (last.state, last.last_seen_ms),
        (PresenceState::Offline as i32, gone_at)
    );
}

#[test]
fn last_seen_and_hide_last_seen_are_written_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, meta) = shard(dir.path(), ShardConfig::default());
    let mut now = 1_000;
    assert!(matches!(
        set(&mut s, &mut now, ConnId(2), 1, false, true),
        Body::Done(_)
    ));
    let rec =
        |meta: &starling_storage::MemMeta| meta.get::<PresenceRec>(&keys::user(UserId(2))).unwrap();
    assert!(rec(&meta).unwrap().hide_last_seen);
    s.handle_conn_closed(ConnId(2), 1_500);
    for _ in 0..100 {
        s.handle_log_progress(now);
        if rec(&meta).is_some_and(|r| r.last_seen_ms.0 == 1_500) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(rec(&meta).unwrap().last_seen_ms.0, 1_500);
    // Others see no last seen time; the user itself does.
    let Body::PresenceSnapshot(snap) = subscribe(&mut s, &mut now, ConnId(1), 2, &[2]) else {
        panic!()
    };
    assert_eq!(
        (snap.users[0].state, snap.users[0].last_seen_ms),
        (PresenceState::Offline as i32, 0)
    );
    s.handle_conn_opened(ConnId(9), UserId(2), DeviceId(1), now);
    let Body::PresenceSnapshot(snap) = subscribe(&mut s, &mut now, ConnId(9), 3, &[2]) else {
        panic!()
    };
    assert_eq!(snap.users[0].state, PresenceState::Online as i32);
}

#[test]
fn only_visible_users_and_at_most_the_limit_can_be_followed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        presence_subscriptions_max: 2,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    // User 3 shares nothing with user 1; unknown or not, the answer is the same.
    let refused = subscribe(&mut s, &mut now, ConnId(1), 1, &[2, 3]);
    let Body::Error(e) = &refused else {
        panic!("{refused:?}")
    };
    assert_eq!(e.code, ErrorCode::PermissionDenied as i32);
    assert!(
        e.message.contains('3') && !e.message.contains(" 2"),
        "{e:?}"
    );
    assert_eq!(
        code(&subscribe(&mut s, &mut now, ConnId(1), 2, &[0])),
        ErrorCode::InvalidArgument as i32
    );
    let many: Vec<u64> = (1..=1001).collect();
    assert_eq!(
        code(&subscribe(&mut s, &mut now, ConnId(1), 3, &many)),
        ErrorCode::InvalidArgument as i32
    );
    // Oneself and a group member: two, the limit.
    assert!(matches!(
        subscribe(&mut s, &mut now, ConnId(1), 4, &[1, 2]),
        Body::PresenceSnapshot(_)
    ));
    // Following again changes nothing; one more is over the limit.
    assert!(matches!(
        subscribe(&mut s, &mut now, ConnId(1), 5, &[2]),
        Body::PresenceSnapshot(_)
    ));
    s.handle_conn_opened(ConnId(4), UserId(1), DeviceId(2), now);
    let over = subscribe(&mut s, &mut now, ConnId(4), 6, &[1, 2, 1]);
    assert!(matches!(over, Body::PresenceSnapshot(_)), "per connection");
    let b = Body::UnsubscribePresence(v1::UnsubscribePresence { user_ids: vec![2] });
    assert!(matches!(
        request(&mut s, &mut now, ConnId(1), 7, b),
        Body::Done(_)
    ));
    // Unfollowed: user 2's changes no longer reach connection 1 (connection 4 still follows).
    assert!(matches!(
        set(&mut s, &mut now, ConnId(2), 8, true, false),
        Body::Done(_)
    ));
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(4) && matches!(f.body, Some(Body::PresenceUpdate(_)))
    });
    assert!(
        !out.iter()
            .any(|(c, f)| *c == ConnId(1) && matches!(f.body, Some(Body::PresenceUpdate(_))))
    );
}

#[test]
fn updates_wait_while_the_connection_is_behind_and_the_latest_comes_after() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        presence_coalesce_ms: 5,
        conn_outbound_bytes_max: 16,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    assert!(matches!(
        subscribe(&mut s, &mut now, ConnId(1), 1, &[2]),
        Body::PresenceSnapshot(_)
    ));
    // Connection 1's socket takes nothing: its backlog (the snapshot) is above half the budget.
    let queued = s.conn_queued_bytes(ConnId(1)).unwrap();
    assert!(queued > 8, "{queued}");
    for (rid, away) in [(2, true), (3, false), (4, true)] {
        set(&mut s, &mut now, ConnId(2), rid, away, false);
    }
    for _ in 0..50 {
        now += 5;
        s.handle_tick(now);
    }
    assert!(
        !transmitted(&mut s).iter().any(|(c, _)| *c == ConnId(1)),
        "held back"
    );
    s.handle_conn_flushed(ConnId(1), queued, now);
    let got = updates(&mut s, &mut now, ConnId(1));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].state, PresenceState::Away as i32);
}
