//! kill -9 at random moments, with real processes: a child appends, the parent kills it and checks
//! that nothing acknowledged was lost.

use super::*;

// ---------------------------------------------------------------------------------------------
// kill -9 with real processes

pub(super) const CRASH_CONVS: u64 = 6;
pub(super) const CRASH_SEGMENT_BYTES: u64 = 32 * 1024;

/// The crash test's shards: small segments, so that checkpoints (an index file per sealed
/// segment) are written all the time and kills land in the middle of them; every reopen starts
/// with only the live segments resident, so the checks page everything else in from the index
/// files. (Sweeps under a small budget are `paging.rs`'s: with thousands of 32 KiB segments a
/// conversation's dedup window spans all of them, and re-paging it after every sweep would make
/// this test quadratic.)
fn crash_opts() -> ShardOptions {
    shard_opts(CRASH_SEGMENT_BYTES)
}

/// The crash child. A no-op unless re-invoked by `kill_9_at_random_moments_loses_nothing_acknowledged`.
/// Appends batches (up to 8 in flight) and reports on stdout, flushing each line:
/// `B <first_lsn> <conv>:<seq>:<cmid-n>:<body-len> ...` before submitting a batch,
/// `A <first_lsn>` once it is acknowledged (durable), `R <conv> <cmid-n> <seq>` for a retry lookup.
#[test]
pub(super) fn crash_child_entry_point() {
    let Ok(dir) = std::env::var("STARLING_CRASH_CHILD_DIR") else {
        return;
    };
    let seed: u64 = std::env::var("STARLING_CRASH_CHILD_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let tag: u64 = std::env::var("STARLING_CRASH_CHILD_TAG")
        .unwrap()
        .parse()
        .unwrap();
    let mut rng = Rng(seed);
    let mut out = io::stdout().lock();
    // libtest has printed "test crash_child_entry_point ... " without a newline: end that line.
    writeln!(out).unwrap();
    let mut shard = EmbeddedShard::open(Path::new(&dir), crash_opts()).unwrap();
    // A client retrying a send after the crash gets its original seq back.
    if let Ok(retries) = std::env::var("STARLING_CRASH_CHILD_RETRY") {
        for item in retries.split_whitespace() {
            let mut it = item.split(':');
            let (c, t, n): (u128, u64, u64) = (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
            );
            let seq = shard
                .index()
                .dedup(ConvId(c), cmid(t, n))
                .unwrap()
                .map_or(0, |s| s.0);
            writeln!(out, "R {c} {t}:{n} {seq}").unwrap();
        }
        out.flush().unwrap();
    }
    let mut next_seq: Vec<u64> = (0..CRASH_CONVS)
        .map(|c| shard.index().last_seq(ConvId(c as u128 + 1)).unwrap().0 + 1)
        .collect();
    let mut inflight = std::collections::VecDeque::new();
    let mut n = 0u64;
    for _ in 0..20_000 {
        let k = 1 + rng.below(12);
        let first = shard.next_lsn();
        let mut batch = Vec::new();
        let mut line = format!("B {}", first.0);
        for _ in 0..k {
            let c = rng.below(CRASH_CONVS) as usize;
            let len = rng.below(300) as usize;
            let e = entry(c as u128 + 1, next_seq[c], cmid(tag, n), len);
            line.push_str(&format!(" {}:{}:{}:{}", c + 1, next_seq[c], n, len));
            next_seq[c] += 1;
            n += 1;
            batch.push(e);
        }
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
        inflight.push_back(shard.append::<SyncData>(&batch).unwrap());
        while inflight.len() >= 8 || inflight.front().is_some_and(|c| c.try_complete().is_some()) {
            let c = inflight.pop_front().unwrap();
            let first = c.first_lsn();
            c.wait().unwrap();
            writeln!(out, "A {}", first.0).unwrap();
            out.flush().unwrap();
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct SubmittedBatch {
    /// (conv, seq, tag, n, body len)
    pub(super) entries: Vec<(u128, u64, u64, u64, usize)>,
    pub(super) acked: bool,
}

/// (conv, tag, n, seq) the child's dedup lookup returned.
pub(super) type RetryReport = (u128, u64, u64, u64);

pub(super) fn parse_child_output(text: &str) -> (BTreeMap<u64, SubmittedBatch>, Vec<RetryReport>) {
    let mut batches = BTreeMap::new();
    let mut retries = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("B") => {
                let Some(first) = w.next().and_then(|s| s.parse::<u64>().ok()) else {
                    continue;
                };
                let mut entries = Vec::new();
                let mut ok = true;
                for item in w {
                    let f: Vec<&str> = item.split(':').collect();
                    if f.len() != 4 {
                        ok = false;
                        break;
                    }
                    entries.push((
                        f[0].parse().unwrap(),
                        f[1].parse().unwrap(),
                        0,
                        f[2].parse().unwrap(),
                        f[3].parse().unwrap(),
                    ));
                }
                // A line cut by the kill was never followed by an append.
                if ok && line.ends_with(|c: char| c.is_ascii_digit()) && !entries.is_empty() {
                    batches.insert(
                        first,
                        SubmittedBatch {
                            entries,
                            acked: false,
                        },
                    );
                }
            }
            Some("A") => {
                let first: u64 = w.next().unwrap().parse().unwrap();
                batches
                    .get_mut(&first)
                    .expect("ack for a submitted batch")
                    .acked = true;
            }
            Some("R") => {
                let c: u128 = w.next().unwrap().parse().unwrap();
                let mut tn = w.next().unwrap().split(':');
                let t: u64 = tn.next().unwrap().parse().unwrap();
                let n: u64 = tn.next().unwrap().parse().unwrap();
                let seq: u64 = w.next().unwrap().parse().unwrap();
                retries.push((c, t, n, seq));
            }
            _ => {}
        }
    }
    (batches, retries)
}

#[test]
pub(super) fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let iterations: u64 = std::env::var("STARLING_CRASH_ITERS").map_or(200, |s| s.parse().unwrap());
    let seed = seed_from_env("STARLING_CRASH_SEED");
    eprintln!(
        "kill -9 test: seed {seed} (STARLING_CRASH_SEED={seed} to reproduce), {iterations} iterations"
    );
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // Everything that must survive: (conv, seq) -> (tag, n, body len). Filled from batches that
    // were acknowledged, or found present after a crash.
    let mut durable: HashMap<(u128, u64), (u64, u64, usize)> = HashMap::new();
    let mut max_seq: HashMap<u128, u64> = HashMap::new();
    let (mut acked_total, mut unacked_present, mut unacked_absent, mut retries_checked) =
        (0u64, 0u64, 0u64, 0u64);
    let mut skipped_total = 0u64;
    for it in 0..iterations {
        let tag = it + 1;
        // Some acknowledged sends to retry in the next child.
        let retry: Vec<String> = durable
            .iter()
            .take(3)
            .map(|((c, _), (t, n, _))| format!("{c}:{t}:{n}"))
            .collect();
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::crash_child_entry_point",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("STARLING_CRASH_CHILD_DIR", dir.path())
            .env("STARLING_CRASH_CHILD_SEED", rng.next().to_string())
            .env("STARLING_CRASH_CHILD_TAG", tag.to_string())
            .env("STARLING_CRASH_CHILD_RETRY", retry.join(" "))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_ack_tx, first_ack) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.starts_with("A ") {
                    let _ = first_ack_tx.send(());
                }
                text.push_str(&line);
                line.clear();
            }
            text
        });
        // Odd iterations kill at any moment from spawn (during recovery too); even ones once the
        // child is appending, so every iteration under a loaded machine still does work.
        if it % 2 == 0 {
            let _ = first_ack.recv_timeout(Duration::from_secs(10));
            std::thread::sleep(Duration::from_micros(rng.below(8_000)));
        } else {
            std::thread::sleep(Duration::from_micros(rng.below(60_000)));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let text = reader.join().unwrap();
        let (batches, retries) = parse_child_output(&text);
        for (c, t, n, seq) in retries {
            let want = durable
                .iter()
                .find(|(_, v)| v.0 == t && v.1 == n)
                .map(|(k, _)| k.1);
            assert_eq!(
                Some(seq),
                want,
                "seed {seed} iter {it}: retried client_msg_id {t}:{n} in conv {c}"
            );
            retries_checked += 1;
        }

        let shard = EmbeddedShard::open(dir.path(), crash_opts())
            .unwrap_or_else(|e| panic!("seed {seed} iter {it}: reopen failed: {e}"));
        skipped_total += shard.open_report().log.skipped_segments as u64;
        let ix = shard.index();
        let mut absent_seen = false;
        for (first, b) in &batches {
            let present: Vec<bool> = b
                .entries
                .iter()
                .map(
                    |&(c, s, _, n, len)| match ix.entry(ConvId(c), Seq(s)).unwrap() {
                        Some(e) => {
                            assert_eq!(
                                e,
                                entry(c, s, cmid(tag, n), len),
                                "seed {seed} iter {it}: wrong entry at {c}:{s}"
                            );
                            assert_eq!(ix.dedup(ConvId(c), cmid(tag, n)).unwrap(), Some(Seq(s)));
                            true
                        }
                        None => false,
                    },
                )
                .collect();
            let all = present.iter().all(|&p| p);
            let none = present.iter().all(|&p| !p);
            assert!(
                all || none,
                "seed {seed} iter {it}: batch at lsn {first} is partly present: {present:?}"
            );
            if b.acked {
                assert!(
                    all,
                    "seed {seed} iter {it}: acknowledged batch at lsn {first} lost"
                );
                acked_total += 1;
            } else if all {
                unacked_present += 1;
            } else {
                unacked_absent += 1;
            }
            // Batches are a prefix: once one is absent, every later one is absent.
            assert!(
                !(absent_seen && all),
                "seed {seed} iter {it}: batch {first} present after an absent one"
            );
            absent_seen |= none;
            if all {
                for &(c, s, t, n, len) in &b.entries {
                    let _ = t;
                    durable.insert((c, s), (tag, n, len));
                    let m = max_seq.entry(c).or_default();
                    *m = (*m).max(s);
                }
            }
        }
        for (&c, &m) in &max_seq {
            assert_eq!(
                ix.last_seq(ConvId(c)).unwrap(),
                Seq(m),
                "seed {seed} iter {it}: conv {c} last seq"
            );
        }
        // Every so often (and at the end) check everything: contiguous seqs, nothing lost.
        if it % 50 == 49 || it + 1 == iterations {
            for c in 1..=CRASH_CONVS as u128 {
                let all = index_dump(&shard, &[c]);
                for (i, e) in all.iter().enumerate() {
                    assert_eq!(
                        e.seq,
                        Seq(i as u64 + 1),
                        "seed {seed}: conv {c} seqs not contiguous"
                    );
                    let &(t, n, len) = durable
                        .get(&(c, e.seq.0))
                        .expect("every present entry is known");
                    assert_eq!(*e, entry(c, e.seq.0, cmid(t, n), len));
                }
                assert_eq!(all.len() as u64, max_seq.get(&c).copied().unwrap_or(0));
            }
        }
    }
    eprintln!(
        "kill -9 test: {iterations} kills, {acked_total} acknowledged batches checked, unacknowledged: \
         {unacked_present} present / {unacked_absent} absent, {retries_checked} retries, {} entries durable, \
         {skipped_total} checkpointed segments not read at reopen",
        durable.len()
    );
    assert!(
        skipped_total > iterations,
        "reopens must start from checkpoints, not from the whole log"
    );
    assert!(
        acked_total > iterations,
        "the children must get work done before being killed"
    );
}
