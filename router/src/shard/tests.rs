//! Tests of [`RouterShard`]'s surface: driven only through `handle_*` and `poll_*`, as the
//! gateway drives it.

use std::time::Duration;

use starling_protocol::v1::{ErrorCode, frame::Body};

use super::fixture::{answers, drive_until, read_cursor, send, shard};
use super::{ConnId, ShardConfig};

#[test]
fn a_cursor_request_whose_write_fails_is_answered_once_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, meta) = shard(dir.path(), ShardConfig::default());
    let mut now = 1_000;
    send(&mut s, now, 1);
    drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && matches!(f.body, Some(Body::SendAck(_)))
    });
    meta.set_fail_writes(true);
    read_cursor(&mut s, now, 7, 1);
    let mut out = drive_until(&mut s, &mut now, |_, f| f.request_id == 7);
    // The write keeps failing and is retried: no second answer meanwhile.
    for _ in 0..100 {
        s.handle_log_progress(now);
        s.handle_tick(now);
        while let Some(t) = s.poll_transmit() {
            out.push((t.conn, t.frame().unwrap()));
        }
        now += 5;
    }
    let got = answers(&out, ConnId(2), 7);
    assert_eq!(got.len(), 1, "{got:?}");
    let Body::Error(e) = got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(e.code, ErrorCode::StorageFailure as i32);
    assert!(e.message.contains("not recorded"), "{}", e.message);
    // The store recovers: the retried cursor lands (the read receipt goes out); the request
    // sent again is answered Done.
    meta.set_fail_writes(false);
    read_cursor(&mut s, now, 8, 1);
    let out = drive_until(&mut s, &mut now, |_, f| f.request_id == 8);
    assert!(
        matches!(answers(&out, ConnId(2), 8)[..], [Body::Done(_)]),
        "{out:?}"
    );
    assert!(answers(&out, ConnId(2), 7).is_empty());
}

#[test]
fn idle_conversations_are_evicted_when_ticked_only_at_poll_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        conv_idle_evict_ms: 50,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    send(&mut s, now, 1);
    drive_until(&mut s, &mut now, |c, f| {
        c == ConnId(1) && matches!(f.body, Some(Body::SendAck(_)))
    });
    assert_eq!(s.loaded_conversations(), 1);
    // Nothing happens but time: the gateway ticks when poll_timeout says so.
    for _ in 0..2_000 {
        if s.loaded_conversations() == 0 {
            break;
        }
        s.handle_log_progress(now);
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_tick(now);
        }
        std::thread::sleep(Duration::from_millis(1));
        now += 1;
    }
    assert_eq!(s.loaded_conversations(), 0, "never evicted");
    assert_eq!(s.stats().convs_evicted, 1);
    // With nothing loaded, nothing is due.
    assert_eq!(s.poll_timeout(), None);
}
