//! Segment removal by retention: what a sweep removes and keeps, what the index serves after it,
//! and the same after a clean reopen and after a crash (a copy of the directory taken while the
//! shard runs, as a kill -9 leaves it).

use super::*;

const SEG: u64 = 32 * 1024;
/// Entries are kept this long after their timestamp.
const WINDOW: u64 = 1_000;

/// What was written: (conversation index, seq, ts).
type Written = Vec<(usize, u64, u64)>;

/// Conversation 1 and 2 write all along; conversation 3 only in the first quarter.
fn write(shard: &mut EmbeddedShard, from_ts: u64, n: u64, seqs: &mut [u64; 3], w: &mut Written) {
    let mut pending = Vec::new();
    for i in 0..n {
        let ts = from_ts + i;
        let c = if i < n / 4 {
            (i % 3) as usize
        } else {
            (i % 2) as usize
        };
        seqs[c] += 1;
        let mut e = entry(c as u128 + 1, seqs[c], cmid(9, ts), 200);
        e.ts_ms = TimestampMs(ts);
        w.push((c, seqs[c], ts));
        pending.push(shard.append::<SyncData>(&[e]).unwrap());
    }
    let mut last = Lsn::ZERO;
    for p in pending {
        last = p.last_lsn();
        p.wait().unwrap();
    }
    shard.index().wait_applied(last).unwrap();
}

fn keep_until(e: &Entry) -> u64 {
    e.ts_ms.0 + WINDOW
}

/// Every conversation's served seqs: contiguous, ending at its last seq, with every live entry
/// of `w` (kept until after `now`) among them.
fn check(
    shard: &EmbeddedShard,
    seqs: &[u64; 3],
    w: &Written,
    now: u64,
    what: &str,
) -> Vec<Vec<u64>> {
    let mut served = Vec::new();
    for (c, &last) in seqs.iter().enumerate() {
        let conv = ConvId(c as u128 + 1);
        assert_eq!(
            shard.index().last_seq(conv).unwrap().0,
            last,
            "{what}: conv {c}"
        );
        let mut s = Vec::new();
        let mut after = 0;
        loop {
            let page = shard.index().after(conv, Seq(after), 500).unwrap();
            let Some(l) = page.last() else { break };
            after = l.seq.0;
            s.extend(page.iter().map(|e| e.seq.0));
        }
        if let (Some(&first), Some(&end)) = (s.first(), s.last()) {
            assert_eq!(
                s,
                (first..=end).collect::<Vec<_>>(),
                "{what}: conv {c} contiguous"
            );
            assert_eq!(end, last, "{what}: conv {c} ends at its last seq");
        }
        for &(_, seq, ts) in w.iter().filter(|x| x.0 == c && x.2 + WINDOW > now) {
            assert!(
                s.binary_search(&seq).is_ok(),
                "{what}: live conv {c} seq {seq} (ts {ts}) lost"
            );
        }
        served.push(s);
    }
    served
}

#[test]
fn a_sweep_removes_only_expired_leading_segments_and_reopen_serves_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), shard_opts(SEG)).unwrap();
    let (mut seqs, mut w) = ([0u64; 3], Written::new());
    write(&mut shard, 0, 2_000, &mut seqs, &mut w);
    // Keep forever: nothing goes (a reclaimer of its own: each caches what its policy says).
    let none = shard
        .reclaimer()
        .sweep(u64::MAX, &|_: &Entry| u64::MAX)
        .unwrap();
    assert!(none.removed.is_empty());
    assert_eq!(none.oldest_kept, Lsn(1));
    let r = shard.reclaimer();
    // Nothing has expired yet at 500 (the oldest entry is kept until 1,000).
    assert!(r.sweep(500, &keep_until).unwrap().removed.is_empty());
    // At 2,000: entries with ts < 1,000 may go; the segments holding only those do.
    let now = 2_000;
    let rep = r.sweep(now, &keep_until).unwrap();
    assert!(!rep.removed.is_empty(), "{rep:?}");
    assert_eq!(rep.removed[0], Lsn(1));
    assert!(rep.oldest_kept > Lsn(1));
    assert_eq!(
        r.stats().removed_segments.load(Ordering::Relaxed),
        rep.removed.len() as u64
    );
    assert!(r.stats().removed_bytes.load(Ordering::Relaxed) >= SEG);
    let files = segments(&dir.path().join("log"));
    assert!(!files.iter().any(|p| p.ends_with(format!("{:020}.seg", 1))));
    let served = check(&shard, &seqs, &w, now, "after the sweep");
    // Every entry with ts >= 1,000 (lsn > 1,000) is live and served: the removed segments
    // ended before lsn 1,000. Conversation 3 wrote only in the first 500: all of it went, yet
    // its last seq is kept, and its next entry gets the next one.
    assert!(rep.oldest_kept.0 <= 1_001, "{rep:?}");
    assert!(
        served[2].is_empty(),
        "conversation 3's entries all expired: {served:?}"
    );
    assert!(
        served[0].len() < seqs[0] as usize,
        "conversation 1 lost a prefix"
    );
    // A crash now: a copy of the directory as it is on disk.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let (mut s3, mut w3) = (seqs, w.clone());
    write(&mut shard, 2_000, 10, &mut s3, &mut w3);
    drop(shard);
    let shard = EmbeddedShard::open(dir.path(), shard_opts(SEG)).unwrap();
    assert_eq!(
        check(&shard, &s3, &w3, now, "after a clean reopen")[2].len(),
        0
    );
    drop(shard);
    let crashed = EmbeddedShard::open(copy.path(), shard_opts(SEG)).unwrap();
    assert!(crashed.open_report().log.last_lsn.0 >= 2_000);
    assert_eq!(check(&crashed, &seqs, &w, now, "after a crash"), served);
    // Sweeping everything but the segment in use: the log still opens, from a later lsn.
    let rep = crashed
        .reclaimer()
        .sweep(u64::MAX - 1, &keep_until)
        .unwrap();
    assert!(!rep.removed.is_empty());
    drop(crashed);
    let again = EmbeddedShard::open(copy.path(), shard_opts(SEG)).unwrap();
    assert_eq!(again.next_lsn().0, 2_001);
    assert_eq!(again.index().last_seq(ConvId(3)).unwrap().0, seqs[2]);
}

#[test]
fn a_crash_between_forgetting_and_deleting_leaves_files_the_next_sweep_removes() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), shard_opts(SEG)).unwrap();
    let (mut seqs, mut w) = ([0u64; 3], Written::new());
    write(&mut shard, 0, 2_000, &mut seqs, &mut w);
    // Stop after the index forgot and one file went: copy the directory there.
    let copy = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().to_path_buf(), copy.path().to_path_buf());
    let copied = Arc::new(AtomicU64::new(0));
    let seen = copied.clone();
    let r = shard
        .reclaimer()
        .with_remove_hook(Arc::new(move |base: Lsn, keep: Lsn| {
            assert!(base < keep);
            if seen.fetch_add(1, Ordering::SeqCst) == 1 {
                copy_dir(&src, &dst);
            }
        }));
    let rep = r.sweep(2_000, &keep_until).unwrap();
    assert!(rep.removed.len() >= 2, "{rep:?}");
    let served = check(&shard, &seqs, &w, 2_000, "after the sweep");
    drop(shard);
    let crashed = EmbeddedShard::open(copy.path(), shard_opts(SEG)).unwrap();
    // The first file is gone, later doomed ones are still there: the log opens from them, the
    // index does not serve them.
    assert_eq!(check(&crashed, &seqs, &w, 2_000, "after the crash"), served);
    let rep2 = crashed.reclaimer().sweep(2_000, &keep_until).unwrap();
    assert_eq!(
        rep2.oldest_kept, rep.oldest_kept,
        "the next sweep finishes the job"
    );
    assert_eq!(
        check(&crashed, &seqs, &w, 2_000, "after the next sweep"),
        served
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else if p.file_name().is_some_and(|n| n != "spare.tmp") {
            fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn under_a_constant_load_disk_use_reaches_a_steady_state() {
    // 40 rounds of 500 entries (ts + 1 each), a sweep after each: with entries kept for 1,000
    // ts, the log holds at most the last 1,000 entries plus what shares their oldest segment and
    // the segment in use, whatever has been written in total.
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), shard_opts(SEG)).unwrap();
    let r = shard.reclaimer();
    let (mut seqs, mut w) = ([0u64; 3], Written::new());
    let log_bytes = |dir: &Path| -> u64 {
        segments(&dir.join("log"))
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    };
    let mut sizes = Vec::new();
    for round in 0..40u64 {
        write(&mut shard, round * 500, 500, &mut seqs, &mut w);
        r.sweep((round + 1) * 500, &keep_until).unwrap();
        sizes.push(log_bytes(dir.path()));
    }
    // ~250 bytes an entry, 1,000 live entries: ~8 segments of 32 KiB, plus the two partly live.
    let bound = 12 * SEG;
    assert!(
        sizes[4..].iter().all(|&s| s <= bound),
        "the log keeps growing: {sizes:?}"
    );
    let written: u64 = w.len() as u64 * 250;
    assert!(written > 4 * bound, "the load wrote {written} bytes");
    assert!(r.stats().removed_segments.load(Ordering::Relaxed) > 100);
    check(&shard, &seqs, &w, 40 * 500, "at the end");
}

/// While a shard's log is reopened in place its reclaimer is paused (no removal may race the
/// reopen); resumed with the reopened shard's index it removes what has expired, and the index
/// files of the removed segments go with them.
#[test]
fn a_paused_reclaimer_removes_nothing_until_resumed_with_the_new_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), shard_opts(SEG)).unwrap();
    let (mut seqs, mut w) = ([0u64; 3], Written::new());
    write(&mut shard, 0, 2_000, &mut seqs, &mut w);
    let r = shard.reclaimer();
    r.pause();
    let paused = r.sweep(2_000, &keep_until).unwrap();
    assert!(paused.removed.is_empty(), "{paused:?}");
    assert!(
        segments(&dir.path().join("log"))
            .iter()
            .any(|p| p.ends_with(format!("{:020}.seg", 1)))
    );
    r.resume(shard.index().clone());
    let rep = r.sweep(2_000, &keep_until).unwrap();
    assert!(!rep.removed.is_empty(), "{rep:?}");
    let ix_files: Vec<_> = fs::read_dir(dir.path().join("index"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ix"))
        .collect();
    assert!(!ix_files.contains(&format!("{:020}.ix", 1)), "{ix_files:?}");
    check(&shard, &seqs, &w, 2_000, "after the resumed sweep");
}

#[test]
fn an_unsettled_answer_is_asked_again_and_a_settled_one_is_not() {
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), shard_opts(SEG)).unwrap();
    let (mut seqs, mut w) = ([0u64; 3], Written::new());
    write(&mut shard, 0, 2_000, &mut seqs, &mut w);
    let r = shard.reclaimer();
    // Conversation 3 (index 2) was not received by everyone yet: its entries are kept for
    // good as far as this sweep knows, but may come down.
    let received = AtomicBool::new(false);
    let asked = AtomicU64::new(0);
    let policy = |e: &Entry| {
        asked.fetch_add(1, Ordering::Relaxed);
        if e.conv == ConvId(3) && !received.load(Ordering::Relaxed) {
            (u64::MAX, false)
        } else {
            (keep_until(e), true)
        }
    };
    let before = r.sweep_unsettled(10_000, &policy).unwrap();
    assert!(
        before.removed.is_empty(),
        "the first segment holds conversation 3: {before:?}"
    );
    let first = asked.load(Ordering::Relaxed);
    assert!(first > 0);
    // Asked again: the first segment's answer was not cached.
    assert!(
        r.sweep_unsettled(10_000, &policy)
            .unwrap()
            .removed
            .is_empty()
    );
    assert!(asked.load(Ordering::Relaxed) >= 2 * first);
    // Everyone received it: the same segments go now, as with a settled policy.
    received.store(true, Ordering::Relaxed);
    let rep = r.sweep_unsettled(10_000, &policy).unwrap();
    assert!(!rep.removed.is_empty(), "{rep:?}");
    assert_eq!(rep.removed[0], Lsn(1));
    check(&shard, &seqs, &w, 10_000, "after the unsettled sweep");
    // Settled answers are cached: a sweep that removes nothing more reads no segment again
    // but the one it stops at (each sweep reads at most what it has not cached).
    let n = asked.load(Ordering::Relaxed);
    r.sweep_unsettled(10_000, &policy).unwrap();
    let again = asked.load(Ordering::Relaxed) - n;
    assert!(
        again < first,
        "cached segments are not read again ({again} ≥ {first})"
    );
}
