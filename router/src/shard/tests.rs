//! Tests of [`RouterShard`]'s surface: driven only through `handle_*` and `poll_*`, as the
//! gateway drives it.

use std::time::Duration;

use super::ShardConfig;
use super::fixture::{sent, shard};

#[test]
fn idle_conversations_are_evicted_when_ticked_only_at_poll_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig {
        conv_idle_evict_ms: 50,
        ..ShardConfig::default()
    };
    let (mut s, _meta) = shard(dir.path(), cfg);
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1);
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

#[test]
fn durable_entries_leave_notices_only_while_enabled() {
    use super::fixture::GROUP;
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _meta) = shard(dir.path(), ShardConfig::default());
    let mut now = 1_000;
    sent(&mut s, &mut now, 1..=1);
    assert_eq!(s.poll_notice(), None, "off by default");
    s.enable_notices();
    sent(&mut s, &mut now, 2..=3);
    let mut got = Vec::new();
    while let Some(n) = s.poll_notice() {
        got.push(n);
    }
    let seqs: Vec<u64> = got.iter().map(|n| n.seq).collect();
    assert_eq!(seqs, [2, 3], "one per durable entry, in seq order");
    for n in &got {
        assert_eq!(n.conversation_id, GROUP.0);
        assert_eq!(n.sender, 1);
        let mut members: Vec<u64> = n.members.iter().map(|u| u.0).collect();
        members.sort_unstable();
        assert_eq!(members, [1, 2]);
    }
}
