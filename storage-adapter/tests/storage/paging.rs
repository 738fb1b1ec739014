//! The index within its memory budget: checkpoints, sweeps and paging give the same reads as a
//! fully resident index; damage in an index file is an error at the read that meets it; dedup
//! holds within its window.

use super::*;
use starling_storage::index::DEDUP_WINDOW;

fn budget_opts(segment_bytes: u64, budget: usize) -> ShardOptions {
    ShardOptions {
        index_memory_bytes: budget,
        ..shard_opts(segment_bytes)
    }
}

/// Appends `n` entries over `convs` conversations with a skewed popularity (conversation `c`
/// gets about 1/c of them); returns them.
fn fill_skewed(shard: &mut EmbeddedShard, n: u64, convs: u64, body_len: usize) -> Vec<Entry> {
    let mut rng = Rng(11);
    let mut next = vec![1u64; convs as usize + 1];
    let mut all = Vec::new();
    let mut pending = Vec::new();
    let mut i = 0;
    while i < n {
        let mut batch = Vec::new();
        for _ in 0..16.min(n - i) {
            // 1/c popularity: pick c = convs^u for a uniform u.
            let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let c = ((convs as f64).powf(u) as u64).clamp(1, convs);
            batch.push(entry(c as u128, next[c as usize], cmid(c, i), body_len));
            next[c as usize] += 1;
            i += 1;
        }
        all.extend(batch.iter().cloned());
        pending.push(shard.append::<SyncData>(&batch).unwrap());
        if pending.len() >= 8 {
            for c in pending.drain(..) {
                c.wait().unwrap();
            }
        }
    }
    for c in pending {
        c.wait().unwrap();
    }
    shard.index().wait_applied(Lsn(n)).unwrap();
    all
}

fn by_conv(all: &[Entry], c: u128) -> Vec<Entry> {
    all.iter()
        .filter(|e| e.conv == ConvId(c))
        .cloned()
        .collect()
}

#[test]
fn a_small_budget_pages_conversations_in_with_the_same_reads() {
    let dir = tempfile::tempdir().unwrap();
    let convs = 300u64;
    let budget = 64 * 1024;
    let mut shard = EmbeddedShard::open(dir.path(), budget_opts(1 << 15, budget)).unwrap();
    let all = fill_skewed(&mut shard, 12_000, convs, 40);
    let ix = shard.index();
    ix.checkpoint_complete().unwrap();
    // (The index's own thread sweeps too, whenever a segment completes.)
    ix.sweep();
    let swept = ix.stats();
    assert!(swept.checkpointed_segments > 10, "{swept:?}");
    assert!(swept.memory_bytes <= budget as u64, "{swept:?}");
    assert!(swept.resident_convs < convs, "{swept:?}");
    // Every read, cold or hot, answers as the log says; sweeps between rounds drop it all again.
    for round in 0..2 {
        for c in 1..=convs as u128 {
            let want = by_conv(&all, c);
            let last = want.last().map_or(Seq::NONE, |e| e.seq);
            assert_eq!(
                ix.last_seq(ConvId(c)).unwrap(),
                last,
                "conv {c} round {round}"
            );
            assert_eq!(index_dump(&shard, &[c]), want, "conv {c} round {round}");
            let n = want.len();
            assert_eq!(
                ix.latest(ConvId(c), 5).unwrap(),
                want[n.saturating_sub(5)..]
            );
            if n > 7 {
                let mid = want[n / 2].seq;
                assert_eq!(
                    ix.before(ConvId(c), mid, 3).unwrap(),
                    want[n / 2 - 3..n / 2],
                    "conv {c}"
                );
                assert_eq!(
                    ix.entry(ConvId(c), mid).unwrap().as_ref(),
                    Some(&want[n / 2])
                );
            }
            for e in want.iter().rev().take(20) {
                assert_eq!(ix.dedup(e.conv, e.client_msg_id).unwrap(), Some(e.seq));
            }
            assert_eq!(ix.dedup(ConvId(c), cmid(999, 1)).unwrap(), None);
            // Cold reads of one conversation at a time, with sweeps between them.
            if c % 50 == 0 {
                ix.sweep();
            }
        }
        ix.sweep();
        assert!(ix.stats().memory_bytes <= budget as u64);
    }
    assert_eq!(ix.last_seq(ConvId(10_000)).unwrap(), Seq::NONE);
    // Appends after paging land behind what was paged in.
    let c1 = by_conv(&all, 1);
    let e = entry(1, c1.len() as u64 + 1, cmid(5, 5), 10);
    shard
        .append::<SyncData>(std::slice::from_ref(&e))
        .unwrap()
        .wait()
        .unwrap();
    let ix = shard.index();
    ix.wait_applied(Lsn(12_001)).unwrap();
    assert_eq!(ix.latest(ConvId(1), 1).unwrap(), vec![e]);
    // And a reopen (clean) reads the same.
    drop(shard);
    let shard = EmbeddedShard::open(dir.path(), budget_opts(1 << 15, budget)).unwrap();
    let r = shard.open_report();
    assert!(r.log.skipped_segments + 1 >= r.log.segments, "{r:?}");
    for c in [1u128, 2, 7, 150, 300] {
        let mut want = by_conv(&all, c);
        if c == 1 {
            want.push(entry(1, c1.len() as u64 + 1, cmid(5, 5), 10));
        }
        assert_eq!(index_dump(&shard, &[c]), want, "conv {c} after reopen");
    }
}

#[test]
fn damage_in_an_index_file_is_an_error_at_the_read_never_a_wrong_answer() {
    let dir = tempfile::tempdir().unwrap();
    let all = {
        let mut shard = EmbeddedShard::open(dir.path(), budget_opts(1 << 14, 16 * 1024)).unwrap();
        fill_skewed(&mut shard, 3_000, 20, 30)
    };
    // Flip a byte in the middle of every index file (past the head: the directory or the
    // pointers), then read every conversation cold.
    let index_dir = dir.path().join("index");
    let mut files: Vec<_> = fs::read_dir(&index_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() > 5);
    for f in &files {
        let mut b = fs::read(f).unwrap();
        let at = b.len() * 3 / 4;
        b[at] ^= 0x40;
        fs::write(f, &b).unwrap();
    }
    let shard = EmbeddedShard::open(dir.path(), budget_opts(1 << 14, 16 * 1024)).unwrap();
    let mut errors = 0;
    for c in 1..=20u128 {
        let want = by_conv(&all, c);
        let mut after = Seq(0);
        loop {
            match shard.index().after(ConvId(c), after, 50) {
                Ok(page) => {
                    let Some(last) = page.last() else { break };
                    for e in &page {
                        assert_eq!(Some(e), want.get(e.seq.0 as usize - 1), "conv {c}");
                    }
                    after = last.seq;
                }
                Err(e) => {
                    assert!(e.to_string().contains("segment index"), "{e}");
                    errors += 1;
                    break;
                }
            }
        }
        shard.index().sweep();
    }
    assert!(errors > 0, "the damage was never met");
}

#[test]
fn dedup_holds_within_its_window_and_a_retry_beyond_it_is_a_new_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), budget_opts(1 << 20, 1 << 20)).unwrap();
    let n = DEDUP_WINDOW + 100;
    let mut pending = Vec::new();
    for chunk in (1..=n).collect::<Vec<_>>().chunks(512) {
        let batch: Vec<Entry> = chunk.iter().map(|&s| entry(1, s, cmid(1, s), 0)).collect();
        pending.push(shard.append::<SyncData>(&batch).unwrap());
        if pending.len() >= 8 {
            for c in pending.drain(..) {
                c.wait().unwrap();
            }
        }
    }
    for c in pending {
        c.wait().unwrap();
    }
    let ix = shard.index();
    ix.wait_applied(Lsn(n)).unwrap();
    ix.checkpoint_complete().unwrap();
    ix.sweep();
    // The newest DEDUP_WINDOW seqs are within the window, the oldest 100 are not.
    assert_eq!(ix.dedup(ConvId(1), cmid(1, n)).unwrap(), Some(Seq(n)));
    assert_eq!(ix.dedup(ConvId(1), cmid(1, 101)).unwrap(), Some(Seq(101)));
    assert_eq!(ix.dedup(ConvId(1), cmid(1, 100)).unwrap(), None);
    assert_eq!(ix.dedup(ConvId(1), cmid(1, 1)).unwrap(), None);
    // The entries themselves are all still there.
    assert_eq!(ix.entry(ConvId(1), Seq(1)).unwrap().unwrap().seq, Seq(1));
}
