//! Disappearing messages under the simulation: seeded runs of sends, timer changes (in a 1:1
//! conversation and a group), jumps of the clock and crashes. Checked on every step: each
//! SendAck's expiry is what the timer in force says (its entry's seq order), and a history
//! page never serves a message whose expiry has passed — nor, once one was seen expired, ever
//! again, after a crash included — while it serves every acknowledged message not yet expired.
//!
//! `STARLING_SIM_TIMER_SEEDS=N` runs N seeds (default 60); a failure names its seed.

use super::scenarios::{Harness, ack};
use super::*;

use v1::recipient::Target;

/// Timers a step picks from, in seconds (0: off).
const TIMERS: [u64; 4] = [0, 5, 7, 20];

struct Model {
    /// conv → the timer in force (seconds).
    timer: HashMap<u64, u64>,
    /// (conv, seq) → expiry of every acknowledged message (0: never).
    acked: BTreeMap<(u64, u64), u64>,
    /// Messages seen expired at a check: never served again.
    expired: BTreeSet<(u64, u64)>,
}

fn send_timer(h: &mut Harness, conn: u64, n: u32, conv: u64, seconds: u64) -> u64 {
    let mut cmid = [0u8; 16];
    cmid[..8].copy_from_slice(&conn.to_le_bytes());
    cmid[8] = 0x7e;
    cmid[12..].copy_from_slice(&n.to_le_bytes());
    h.send(
        conn,
        Body::Send(v1::Send {
            client_msg_id: Bytes::copy_from_slice(&cmid),
            to: Some(v1::Recipient {
                target: Some(Target::ConversationId(conv)),
            }),
            set_timer: Some(Box::new(v1::DisappearingTimer { seconds })),
            ..v1::Send::default()
        }),
    )
}

/// The history page of `conv` for `conn`, and the times between which the shard read it.
fn history(h: &mut Harness, conn: u64, conv: u64) -> (Vec<v1::Message>, u64, u64) {
    let t0 = h.now;
    let rid = h.send(
        conn,
        Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            anchor: None,
            limit: 200,
        }),
    );
    h.run();
    let out = h.take(conn);
    let page = out
        .into_iter()
        .find_map(|f| match f.body {
            Some(Body::HistoryPage(p)) if f.request_id == rid => Some(p.messages),
            _ => None,
        })
        .expect("a history page");
    (page, t0, h.now)
}

fn one_seed(seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut h = Harness::new(2, &[1, 2, 3]);
    let group = h.group(7, &[1, 2, 3]);
    // conn → user: 10 → 1, 20 → 2, 30 → 3 (in the group only).
    for (conn, user) in [(10, 1), (20, 2), (30, 3)] {
        h.open(conn, user, 1);
    }
    let rid = h.msg(10, 1, Target::UserId(2), "hello");
    h.run();
    let first = ack(&h.take(10), rid).expect("the first message");
    let direct = first.conversation_id;
    let mut m = Model {
        timer: HashMap::new(),
        acked: BTreeMap::new(),
        expired: BTreeSet::new(),
    };
    m.acked.insert((direct, 1), 0);
    let mut n = 1u32;
    let (mut timers_set, mut expired_checked, mut crashes) = (0, 0, 0);
    for step in 0..80 {
        n += 1;
        let conv = if rng.chance(500) { direct } else { group };
        let conn = if conv == direct {
            [10, 20][rng.below(2) as usize]
        } else {
            [10, 20, 30][rng.below(3) as usize]
        };
        match rng.below(10) {
            0..=4 => {
                let to = if conv == direct {
                    Target::UserId(if conn == 10 { 2 } else { 1 })
                } else {
                    Target::ConversationId(conv)
                };
                let rid = h.msg(conn, n, to, "words");
                h.run();
                let a = ack(&h.take(conn), rid)
                    .unwrap_or_else(|| panic!("seed {seed} step {step}: no SendAck"));
                let secs = m.timer.get(&conv).copied().unwrap_or(0);
                let want = if secs == 0 {
                    0
                } else {
                    a.server_ts_ms + secs * 1000
                };
                assert_eq!(
                    a.expires_at_ms, want,
                    "seed {seed} step {step}: expiry of {conv}/{} under a {secs} s timer",
                    a.seq
                );
                m.acked.insert((conv, a.seq), a.expires_at_ms);
            }
            5 | 6 => {
                let secs = TIMERS[rng.below(TIMERS.len() as u64) as usize];
                let rid = send_timer(&mut h, conn, n, conv, secs);
                h.run();
                let a = ack(&h.take(conn), rid)
                    .unwrap_or_else(|| panic!("seed {seed} step {step}: timer not acknowledged"));
                assert_eq!(
                    a.expires_at_ms, 0,
                    "seed {seed}: a timer entry does not expire"
                );
                m.timer.insert(conv, secs);
                m.acked.insert((conv, a.seq), 0);
                timers_set += 1;
            }
            7 => h.now += rng.below(12_000),
            8 if rng.chance(300) => {
                h.crash(&mut rng);
                h.run();
                for c in [10, 20, 30] {
                    h.take(c);
                }
                crashes += 1;
            }
            _ => {}
        }
        // Check both conversations as user 2 sees them now.
        for c in [direct, group] {
            let (page, t0, t1) = history(&mut h, 20, c);
            let served: BTreeMap<u64, u64> =
                page.iter().map(|x| (x.seq, x.expires_at_ms)).collect();
            for (seq, exp) in &served {
                assert!(
                    *exp == 0 || *exp > t0,
                    "seed {seed} step {step}: {c}/{seq} served at {t0}..{t1}, expired at {exp}"
                );
                assert!(
                    !m.expired.contains(&(c, *seq)),
                    "seed {seed} step {step}: {c}/{seq} came back after it expired"
                );
            }
            for (&(cc, seq), &exp) in m.acked.range((c, 0)..(c + 1, 0)) {
                if exp != 0 && exp <= t0 {
                    if m.expired.insert((cc, seq)) {
                        expired_checked += 1;
                    }
                } else if exp == 0 || exp > t1 {
                    assert_eq!(
                        served.get(&seq),
                        Some(&exp),
                        "seed {seed} step {step}: live {c}/{seq} not served as acknowledged"
                    );
                }
            }
        }
    }
    assert!(
        timers_set > 0 && expired_checked > 0,
        "seed {seed}: nothing to check"
    );
    crashes
}

#[test]
fn expired_messages_never_come_back_across_timer_changes_clock_jumps_and_crashes() {
    let seeds: u64 = std::env::var("STARLING_SIM_TIMER_SEEDS").map_or(60, |s| s.parse().unwrap());
    let base = std::env::var("STARLING_SIM_SEED").map_or(0, |s| s.parse().unwrap());
    let crashes: u64 = (base..base + seeds).map(one_seed).sum();
    assert!(seeds < 10 || crashes > 0, "no seed crashed");
}
