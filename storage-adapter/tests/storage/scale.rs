//! The store at scale, run by hand (not in CI): a child process fills N messages (200-byte
//! bodies) over C conversations with a skewed popularity (conversation `c` gets about 1/c of
//! them) and is killed with -9; the parent times the reopen (crash recovery), checks the
//! memory bound and that nothing acknowledged is missing, times cold reads, closes cleanly and
//! times the clean reopen. BENCHMARKS.md ("The embedded store at scale") has its figures.
//!
//! ```text
//! STARLING_SCALE_MESSAGES=100000000 STARLING_SCALE_CONVS=1000000 \
//!   STARLING_SCALE_BUDGET=1073741824 STARLING_SCALE_DIR=/work/scale-data \
//!   cargo test --release -p starling-storage --test storage scale -- --ignored --nocapture
//! ```

use std::time::Instant;

use super::*;
use starling_storage::MessageIndex;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |s| s.parse().expect("a number"))
}

fn scale_opts() -> ShardOptions {
    ShardOptions {
        index_memory_bytes: env_u64("STARLING_SCALE_BUDGET", 1 << 30) as usize,
        ..ShardOptions::default()
    }
}

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn rss() -> (u64, u64) {
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

fn pick(rng: &mut Rng, convs: u64) -> u64 {
    let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
    ((convs as f64).powf(u) as u64).clamp(1, convs)
}

/// The child: fills, prints `FILLED`, then `S <conv> <last seq>` for a sample of conversations
/// (every acknowledged), and waits to be killed (at most ten minutes).
#[test]
fn scale_child_entry_point() {
    let Ok(dir) = std::env::var("STARLING_SCALE_CHILD_DIR") else {
        return;
    };
    let n = env_u64("STARLING_SCALE_MESSAGES", 1_000_000);
    let convs = env_u64("STARLING_SCALE_CONVS", 10_000);
    let mut out = io::stdout().lock();
    writeln!(out).unwrap();
    let mut shard = EmbeddedShard::open(Path::new(&dir), scale_opts()).unwrap();
    let mut rng = Rng(42);
    let mut next = vec![1u64; convs as usize + 1];
    let mut pending = std::collections::VecDeque::new();
    let started = Instant::now();
    let mut i = 0u64;
    while i < n {
        let mut batch = Vec::with_capacity(256);
        for _ in 0..256.min(n - i) {
            let c = pick(&mut rng, convs);
            batch.push(entry(c as u128, next[c as usize], cmid(c, i), 200));
            next[c as usize] += 1;
            i += 1;
        }
        loop {
            match shard.append::<SyncData>(&batch) {
                Ok(c) => {
                    pending.push_back(c);
                    break;
                }
                Err(LogError::Busy { .. }) => {
                    pending.pop_front().map(|c| c.wait().unwrap());
                }
                Err(e) => panic!("append: {e}"),
            }
        }
        while pending.len() > 64 {
            pending.pop_front().unwrap().wait().unwrap();
        }
        if i % 10_000_000 < 256 {
            let (r, hwm) = rss();
            let st = shard.index().stats();
            writeln!(
                out,
                "P {i} {:.1}s rss {} MiB hwm {} MiB index {} MiB",
                started.elapsed().as_secs_f64(),
                r >> 20,
                hwm >> 20,
                st.memory_bytes >> 20
            )
            .unwrap();
            out.flush().unwrap();
        }
    }
    for c in pending {
        c.wait().unwrap();
    }
    let (r, hwm) = rss();
    writeln!(
        out,
        "FILLED {n} in {:.1}s rss {} MiB hwm {} MiB {:?}",
        started.elapsed().as_secs_f64(),
        r >> 20,
        hwm >> 20,
        shard.index().stats()
    )
    .unwrap();
    let mut sample: Vec<u64> = (1..=20.min(convs)).collect();
    let mut r2 = Rng(7);
    sample.extend((0..2000).map(|_| 1 + r2.next() % convs));
    for c in sample {
        writeln!(out, "S {c} {}", next[c as usize] - 1).unwrap();
    }
    writeln!(out, "END").unwrap();
    out.flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

#[test]
#[ignore = "long: fills STARLING_SCALE_MESSAGES messages; run by hand (see the module doc)"]
fn scale_fill_kill_reopen_within_budget() {
    let base = std::env::var("STARLING_SCALE_DIR").unwrap_or_else(|_| "/tmp".into());
    fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let budget = env_u64("STARLING_SCALE_BUDGET", 1 << 30);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "scale::scale_child_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STARLING_SCALE_CHILD_DIR", dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sample = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("P ") || line.starts_with("FILLED") {
            eprintln!("child: {line}");
        }
        if let Some(rest) = line.strip_prefix("S ") {
            let mut w = rest.split_whitespace();
            let c: u64 = w.next().unwrap().parse().unwrap();
            let s: u64 = w.next().unwrap().parse().unwrap();
            sample.push((c, s));
        }
        if line == "END" {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let disk: u64 = walk(dir.path())
        .iter()
        .map(|p| fs::metadata(p).map_or(0, |m| m.len()))
        .sum();

    let t = Instant::now();
    let shard = EmbeddedShard::open(dir.path(), scale_opts()).unwrap();
    let crash_open = t.elapsed();
    let report = shard.open_report().clone();
    let ix = shard.index();
    for &(c, s) in &sample {
        assert_eq!(ix.last_seq(ConvId(c as u128)).unwrap(), Seq(s), "conv {c}");
    }
    // Cold reads: a sync of the newest 20 and a send's lookups (last seq, dedup of a new id).
    ix.sweep();
    let (mut sync_ms, mut send_ms) = (Vec::new(), Vec::new());
    for &(c, s) in sample.iter().skip(20).filter(|(_, s)| *s > 0) {
        let conv = ConvId(c as u128);
        let t = Instant::now();
        let got = ix.after(conv, Seq(s.saturating_sub(20)), 100).unwrap();
        sync_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(got.last().map(|e| e.seq), Some(Seq(s)));
        let t = Instant::now();
        let _ = ix.last_seq(conv).unwrap();
        assert_eq!(ix.dedup(conv, cmid(u64::MAX, c)).unwrap(), None);
        send_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ix.sweep();
    let stats = ix.stats();
    let (rss_now, hwm) = rss();
    assert!(stats.memory_bytes <= budget, "{stats:?}");
    assert!(
        rss_now <= budget + (512 << 20),
        "RSS {rss_now} over the budget {budget} + 512 MiB"
    );
    let t = Instant::now();
    drop(shard);
    let close = t.elapsed();
    let t = Instant::now();
    let shard = EmbeddedShard::open(dir.path(), scale_opts()).unwrap();
    let clean_open = t.elapsed();
    let clean_report = shard.open_report().clone();
    for &(c, s) in sample.iter().take(50) {
        assert_eq!(shard.index().last_seq(ConvId(c as u128)).unwrap(), Seq(s));
    }
    eprintln!(
        "scale: {} messages, {} GiB on disk; after kill -9: open {:.2}s ({} segments skipped, {} \
         records replayed); memory {} MiB of {} MiB budget, RSS {} MiB (peak {} MiB); cold sync \
         p50 {:.3} p99 {:.3} max {:.3} ms; cold send lookups p50 {:.3} p99 {:.3} max {:.3} ms; \
         clean close {:.2}s, clean open {:.2}s ({} records replayed)",
        stats.entries,
        disk >> 30,
        crash_open.as_secs_f64(),
        report.log.skipped_segments,
        report.replayed_records,
        stats.memory_bytes >> 20,
        budget >> 20,
        rss_now >> 20,
        hwm >> 20,
        percentile(&mut sync_ms, 0.5),
        percentile(&mut sync_ms, 0.99),
        percentile(&mut sync_ms, 1.0),
        percentile(&mut send_ms, 0.5),
        percentile(&mut send_ms, 0.99),
        percentile(&mut send_ms, 1.0),
        close.as_secs_f64(),
        clean_open.as_secs_f64(),
        clean_report.replayed_records,
    );
}
