//! kill -9 during retention deletes, with real processes: a child appends and sweeps (the index
//! forgets, then the files go, oldest first), the parent kills it — half the time just after a
//! delete began — and checks after reopening that nothing live was lost, nothing removed came
//! back, and every conversation's seqs are contiguous up to its last one.

use super::*;
use crate::crash::CRASH_CONVS;

const SEGMENT_BYTES: u64 = 32 * 1024;
/// An entry is kept this long (in the child's logical ms) after its timestamp.
const WINDOW: u64 = 1_000;
/// Each child's timestamps start at `tag * TS_STRIDE`, after every earlier child's.
const TS_STRIDE: u64 = 10_000_000;
/// The child sweeps after this many batches.
const SWEEP_EVERY: u64 = 25;

fn ts_of(tag: u64, n: u64) -> u64 {
    tag * TS_STRIDE + n
}

fn rentry(c: u128, seq: u64, tag: u64, n: u64, len: usize) -> Entry {
    let mut e = entry(c, seq, cmid(tag, n), len);
    e.ts_ms = TimestampMs(ts_of(tag, n));
    e
}

fn keep_until(e: &Entry) -> u64 {
    e.ts_ms.0 + WINDOW
}

/// The child. A no-op unless re-invoked by the test below. Prints, flushing each line:
/// `B <first_lsn> <conv>:<seq>:<n>:<len> ...` before submitting a batch, `A <first_lsn>` once
/// it is durable, `S <now>` before a sweep, `D <base> <oldest kept>` before each file delete.
#[test]
fn retention_crash_child_entry_point() {
    let Ok(dir) = std::env::var("STARLING_RETENTION_CHILD_DIR") else {
        return;
    };
    let var = |k: &str| -> u64 { std::env::var(k).unwrap().parse().unwrap() };
    let (seed, tag) = (
        var("STARLING_RETENTION_CHILD_SEED"),
        var("STARLING_RETENTION_CHILD_TAG"),
    );
    let mut rng = Rng(seed);
    let pause_us = rng.below(1_500);
    let out = Arc::new(Mutex::new(io::stdout()));
    // libtest has printed "test ... " without a newline: end that line.
    writeln!(out.lock().unwrap()).unwrap();
    let mut shard = EmbeddedShard::open(Path::new(&dir), shard_opts(SEGMENT_BYTES)).unwrap();
    let o = out.clone();
    let reclaimer = shard
        .reclaimer()
        .with_remove_hook(Arc::new(move |base: Lsn, keep: Lsn| {
            let mut w = o.lock().unwrap();
            writeln!(w, "D {} {}", base.0, keep.0).unwrap();
            w.flush().unwrap();
            drop(w);
            // Widen the window between deletes, so that kills land in it.
            std::thread::sleep(Duration::from_micros(pause_us));
        }));
    let mut next_seq: Vec<u64> = (0..CRASH_CONVS)
        .map(|c| shard.index().last_seq(ConvId(c as u128 + 1)).unwrap().0 + 1)
        .collect();
    let mut inflight = std::collections::VecDeque::new();
    let mut n = 0u64;
    for b in 0..3_000u64 {
        if b % SWEEP_EVERY == 0 {
            for c in inflight.drain(..) {
                let c: starling_storage::Completion<SyncData> = c;
                let first = c.first_lsn();
                c.wait().unwrap();
                let mut w = out.lock().unwrap();
                writeln!(w, "A {}", first.0).unwrap();
                w.flush().unwrap();
            }
            let now = ts_of(tag, n);
            {
                let mut w = out.lock().unwrap();
                writeln!(w, "S {now}").unwrap();
                w.flush().unwrap();
            }
            reclaimer.sweep(now, &keep_until).unwrap();
        }
        let k = 1 + rng.below(12);
        let first = shard.next_lsn();
        let mut batch = Vec::new();
        let mut line = format!("B {}", first.0);
        for _ in 0..k {
            let c = rng.below(CRASH_CONVS) as usize;
            let len = rng.below(300) as usize;
            batch.push(rentry(c as u128 + 1, next_seq[c], tag, n, len));
            line.push_str(&format!(" {}:{}:{}:{}", c + 1, next_seq[c], n, len));
            next_seq[c] += 1;
            n += 1;
        }
        {
            let mut w = out.lock().unwrap();
            writeln!(w, "{line}").unwrap();
            w.flush().unwrap();
        }
        inflight.push_back(shard.append::<SyncData>(&batch).unwrap());
        while inflight.len() >= 8 || inflight.front().is_some_and(|c| c.try_complete().is_some()) {
            let c = inflight.pop_front().unwrap();
            let first = c.first_lsn();
            c.wait().unwrap();
            let mut w = out.lock().unwrap();
            writeln!(w, "A {}", first.0).unwrap();
            w.flush().unwrap();
        }
    }
}

/// One entry the parent knows of.
#[derive(Clone, Copy, Debug)]
struct Known {
    tag: u64,
    n: u64,
    len: usize,
    lsn: u64,
    /// Acknowledged, or seen present after a crash: it must be there until it may go.
    durable: bool,
    /// Seen absent after it was durable (removed): it must never come back.
    removed: bool,
}

/// A submitted batch's entries: (conv, seq, n, body len).
type BatchEntries = Vec<(u128, u64, u64, usize)>;

/// What one child printed.
#[derive(Default)]
struct ChildOutput {
    /// first lsn → (entries (conv, seq, n, len), acknowledged)
    batches: BTreeMap<u64, (BatchEntries, bool)>,
    /// The latest sweep's `now`.
    swept: u64,
    /// The highest "oldest kept" a delete announced (the index forgot everything before it).
    forgotten_below: u64,
    deletes: u64,
}

fn parse(text: &str) -> ChildOutput {
    let mut o = ChildOutput::default();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
        match w.next() {
            Some("B") => {
                let Some(first) = num(w.next()) else { continue };
                let items: Vec<&str> = w.collect();
                let entries: Option<Vec<_>> = items
                    .iter()
                    .map(|it| {
                        let f: Vec<&str> = it.split(':').collect();
                        (f.len() == 4).then(|| {
                            Some((
                                f[0].parse().ok()?,
                                f[1].parse().ok()?,
                                f[2].parse().ok()?,
                                f[3].parse().ok()?,
                            ))
                        })?
                    })
                    .collect();
                // A line cut by the kill was never followed by an append.
                if let Some(e) = entries.filter(|e| !e.is_empty())
                    && line.ends_with(|c: char| c.is_ascii_digit())
                {
                    o.batches.insert(first, (e, false));
                }
            }
            Some("A") => {
                if let Some(b) = num(w.next()).and_then(|f| o.batches.get_mut(&f)) {
                    b.1 = true;
                }
            }
            Some("S") => o.swept = o.swept.max(num(w.next()).unwrap_or(0)),
            Some("D") => {
                let (Some(_), Some(keep)) = (num(w.next()), num(w.next())) else {
                    continue;
                };
                o.forgotten_below = o.forgotten_below.max(keep);
                o.deletes += 1;
            }
            _ => {}
        }
    }
    o
}

#[test]
fn kill_9_during_retention_deletes_loses_nothing_live_and_resurrects_nothing() {
    let iterations: u64 =
        std::env::var("STARLING_CRASH_RETENTION_ITERS").map_or(200, |s| s.parse().unwrap());
    let seed = seed_from_env("STARLING_CRASH_SEED");
    eprintln!(
        "kill -9 during retention: seed {seed} (STARLING_CRASH_SEED={seed} to reproduce), \
         {iterations} iterations"
    );
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut known: HashMap<(u128, u64), Known> = HashMap::new();
    let mut last_seq: HashMap<u128, u64> = HashMap::new();
    let (mut swept, mut forgotten_below) = (0u64, 0u64);
    let (mut killed_in_deletes, mut removed_total, mut live_checked) = (0u64, 0u64, 0u64);
    for it in 0..iterations {
        let tag = it + 1;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_retention::retention_crash_child_entry_point",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("STARLING_RETENTION_CHILD_DIR", dir.path())
            .env("STARLING_RETENTION_CHILD_SEED", rng.next().to_string())
            .env("STARLING_RETENTION_CHILD_TAG", tag.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (signal_tx, signal) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.starts_with("D ") {
                    let _ = signal_tx.send('D');
                } else if line.starts_with("A ") {
                    let _ = signal_tx.send('A');
                }
                text.push_str(&line);
                line.clear();
            }
            text
        });
        // Even iterations kill in the middle of deletes (after the first one began, within a
        // few of the child's pauses); odd ones at any moment once the child is appending.
        let want = if it % 2 == 0 { 'D' } else { 'A' };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match signal.recv_timeout(Duration::from_millis(100)) {
                Ok(c) if c == want => break,
                Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let pause = if want == 'D' {
            rng.below(3_000)
        } else {
            rng.below(20_000)
        };
        std::thread::sleep(Duration::from_micros(pause));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let out = parse(&reader.join().unwrap());
        swept = swept.max(out.swept);
        forgotten_below = forgotten_below.max(out.forgotten_below);
        if want == 'D' && out.deletes > 0 {
            killed_in_deletes += 1;
        }
        for (&first, (entries, acked)) in &out.batches {
            for (i, &(c, s, n, len)) in entries.iter().enumerate() {
                // A seq known from an earlier child is one that was never durable (a durable
                // one is never handed out again): this entry replaces it.
                known.insert(
                    (c, s),
                    Known {
                        tag,
                        n,
                        len,
                        lsn: first + i as u64,
                        durable: *acked,
                        removed: false,
                    },
                );
            }
        }

        let shard = EmbeddedShard::open(dir.path(), shard_opts(SEGMENT_BYTES))
            .unwrap_or_else(|e| panic!("seed {seed} iter {it}: reopen failed: {e}"));
        let ix = shard.index();
        // This child's batches: each whole or absent (unless removed since), and a prefix.
        let mut absent_seen = false;
        for (&first, (entries, acked)) in &out.batches {
            let present: Vec<bool> = entries
                .iter()
                .map(|&(c, s, _, _)| ix.entry(ConvId(c), Seq(s)).unwrap().is_some())
                .collect();
            let all = present.iter().all(|&p| p);
            let none = present.iter().all(|&p| !p);
            let may_be_removed = entries
                .iter()
                .all(|&(_, _, n, _)| ts_of(tag, n) + WINDOW <= swept);
            assert!(
                all || none || may_be_removed,
                "seed {seed} iter {it}: batch at lsn {first} is partly present: {present:?}"
            );
            if *acked && !may_be_removed {
                assert!(
                    all,
                    "seed {seed} iter {it}: acknowledged batch {first} lost"
                );
            }
            assert!(
                !(absent_seen && all) || may_be_removed,
                "seed {seed} iter {it}: batch {first} present after an absent one"
            );
            absent_seen |= none && !may_be_removed;
        }
        // Every entry known: the right bytes if present; present if live and durable; absent if
        // removed before, or before what a sweep's index forgot.
        for (&(c, s), k) in &mut known {
            let got = ix.entry(ConvId(c), Seq(s)).unwrap();
            let live = ts_of(k.tag, k.n) + WINDOW > swept;
            match got {
                Some(e) => {
                    assert_eq!(
                        e,
                        rentry(c, s, k.tag, k.n, k.len),
                        "seed {seed} iter {it}: wrong entry at {c}:{s}"
                    );
                    assert!(
                        !k.removed,
                        "seed {seed} iter {it}: {c}:{s} (lsn {}) came back after it was removed",
                        k.lsn
                    );
                    assert!(
                        k.lsn >= forgotten_below,
                        "seed {seed} iter {it}: {c}:{s} at lsn {} served, but the index forgot \
                         everything before lsn {forgotten_below}",
                        k.lsn
                    );
                    k.durable = true;
                    let m = last_seq.entry(c).or_default();
                    *m = (*m).max(s);
                    if live {
                        live_checked += 1;
                    }
                }
                None if k.durable => {
                    assert!(
                        !live,
                        "seed {seed} iter {it}: live entry {c}:{s} (lsn {}, ts {}) lost; swept \
                         up to {swept}",
                        k.lsn,
                        ts_of(k.tag, k.n)
                    );
                    if !k.removed {
                        removed_total += 1;
                    }
                    k.removed = true;
                }
                None => {}
            }
        }
        // Seqs: every conversation's served seqs are contiguous and end at its last seq, which
        // survives even when all its entries are gone.
        for c in 1..=CRASH_CONVS as u128 {
            let want = last_seq.get(&c).copied().unwrap_or(0);
            assert_eq!(
                ix.last_seq(ConvId(c)).unwrap(),
                Seq(want),
                "seed {seed} iter {it}: conv {c} last seq"
            );
            let seqs: Vec<u64> = index_dump(&shard, &[c]).iter().map(|e| e.seq.0).collect();
            if let (Some(&a), Some(&b)) = (seqs.first(), seqs.last()) {
                assert_eq!(
                    seqs,
                    (a..=b).collect::<Vec<_>>(),
                    "seed {seed} iter {it}: conv {c} seqs not contiguous"
                );
                assert_eq!(b, want, "seed {seed} iter {it}: conv {c} ends early");
            }
        }
        // Entries removed for good are no longer worth tracking, beyond their conversations'
        // last seqs (kept above); nor are those never made durable (their seqs are reused).
        known.retain(|_, k| k.durable && !k.removed);
    }
    eprintln!(
        "kill -9 during retention: {iterations} kills, {killed_in_deletes} in the middle of \
         deletes, {removed_total} entries removed, {live_checked} live entries checked"
    );
    assert!(
        killed_in_deletes >= iterations / 4,
        "the kills must land in deletes often enough to test them"
    );
    assert!(removed_total > 0 && live_checked > 0);
}
