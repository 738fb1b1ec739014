//! Typing on one shard: who gets it, expiry, the rate limit, membership.

use starling_protocol::v1::frame::Body;
use starling_protocol::v1::{self, ErrorCode, TypingState};
use starling_storage::{DeviceId, UserId};

use super::super::ShardConfig;
use super::super::fixture::{GROUP, Shard, answers, drive_until, shard, transmitted};
use crate::ids::ConnId;

fn typing(s: &mut Shard, now: u64, conn: ConnId, rid: u64, conv: u64, on: bool) {
    let state = if on {
        TypingState::Typing
    } else {
        TypingState::Stopped
    };
    let f = v1::Frame {
        request_id: rid,
        body: Some(Body::Typing(v1::Typing {
            conversation_id: conv,
            state: state as i32,
            user_id: 0,
        })),
    };
    s.handle_frame(conn, f, now);
}

fn typings(out: &[(ConnId, v1::Frame)], conn: ConnId) -> Vec<v1::Typing> {
    out.iter()
        .filter(|(c, _)| *c == conn)
        .filter_map(|(_, f)| match &f.body {
            Some(Body::Typing(t)) => Some(*t),
            _ => None,
        })
        .collect()
}

#[test]
fn typing_reaches_the_other_members_and_expires_into_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        typing_expiry_ms: 30,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    // User 1's second device.
    s.handle_conn_opened(ConnId(3), UserId(1), DeviceId(2), 0);
    let mut now = 1_000;
    typing(&mut s, now, ConnId(1), 1, GROUP.0, true);
    let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(1) && f.request_id == 1);
    assert!(matches!(answers(&out, ConnId(1), 1)[..], [Body::Done(_)]));
    let t = typings(&out, ConnId(2));
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].conversation_id, t[0].state, t[0].user_id),
        (GROUP.0, TypingState::Typing as i32, 1)
    );
    assert!(typings(&out, ConnId(1)).is_empty() && typings(&out, ConnId(3)).is_empty());
    // Not repeated: the server says STOPPED after the expiry.
    let started = now;
    let out = drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(2) && matches!(f.body, Some(Body::Typing(_)))
    });
    assert_eq!(
        typings(&out, ConnId(2))[0].state,
        TypingState::Stopped as i32
    );
    assert!(now >= started + 25, "expired early: {started} → {now}");
    // A STOPPED from the client goes out at once and nothing expires later.
    typing(&mut s, now, ConnId(1), 0, GROUP.0, true);
    typing(&mut s, now, ConnId(1), 0, GROUP.0, false);
    let out = transmitted(&mut s);
    let states: Vec<i32> = typings(&out, ConnId(2)).iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [TypingState::Typing as i32, TypingState::Stopped as i32]
    );
    assert_eq!(s.poll_timeout().map(|t| t > now + 20), Some(true));
}

#[test]
fn typing_is_rate_limited_per_connection_and_needs_membership() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        typing_per_s: 1,
        typing_burst: 2,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let now = 1_000;
    for _ in 0..3 {
        typing(&mut s, now, ConnId(1), 0, GROUP.0, true);
    }
    let out = transmitted(&mut s);
    assert_eq!(typings(&out, ConnId(2)).len(), 2, "the third is dropped");
    assert!(
        out.iter().all(|(c, _)| *c == ConnId(2)),
        "silently: {out:?}"
    );
    typing(&mut s, now, ConnId(1), 7, GROUP.0, true);
    let out = transmitted(&mut s);
    let Body::Error(e) = answers(&out, ConnId(1), 7)[0] else {
        panic!("{out:?}")
    };
    assert_eq!(e.code, ErrorCode::RateLimited as i32);
    assert!(e.retry_after_ms > 0);
    // Another connection has its own budget; a conversation it is not in is refused.
    typing(&mut s, now, ConnId(2), 8, 12345, true);
    let mut now = now;
    let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(2) && f.request_id == 8);
    let Body::Error(e) = answers(&out, ConnId(2), 8)[0] else {
        panic!("{out:?}")
    };
    assert!(
        e.code == ErrorCode::NotAMember as i32 || e.code == ErrorCode::NotFound as i32,
        "{e:?}"
    );
    typing(&mut s, now, ConnId(2), 9, GROUP.0, false);
    let out = drive_until(&mut s, &mut now, |c, f| c == ConnId(2) && f.request_id == 9);
    assert!(matches!(answers(&out, ConnId(2), 9)[..], [Body::Done(_)]));
    assert_eq!(
        typings(&out, ConnId(1))[0].state,
        TypingState::Stopped as i32
    );
}
