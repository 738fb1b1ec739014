//! Integration tests of the embedded store: crash (real processes, kill -9), corruption, fault
//! injection, index rebuild and the committed on-disk fixtures.
//!
//! The crash child is this same test binary re-invoked with `STARLING_CRASH_CHILD_DIR` set (see
//! `crash_child_entry_point`), which saves building a separate binary.
#![allow(clippy::disallowed_methods)] // tests may read the clock for seeds

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use starling_storage::log::{Fault, FaultHook, IoOp};
use starling_storage::{
    ClientMsgId, ConvId, DeviceId, DurableLog, EmbeddedShard, Entry, EntryKind, LogError,
    LogOptions, Lsn, MessageIndex, SegmentedLog, Seq, ShardOptions, SyncData, TimestampMs, UserId,
};

/// The server's allocator (the store-at-scale test measures memory as the server has it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// ---------------------------------------------------------------------------------------------
// helpers

/// splitmix64: a tiny seeded generator, so any failure reproduces from its printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s.parse().expect("seed is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn cmid(tag: u64, n: u64) -> ClientMsgId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..].copy_from_slice(&n.to_le_bytes());
    ClientMsgId(b)
}

fn body_for(id: ClientMsgId, len: usize) -> Vec<u8> {
    (0..len).map(|i| id.0[i % 16] ^ (i as u8)).collect()
}

fn entry(conv: u128, seq: u64, id: ClientMsgId, body_len: usize) -> Entry {
    Entry {
        kind: EntryKind::MESSAGE,
        conv: ConvId(conv),
        seq: Seq(seq),
        client_msg_id: id,
        sender: UserId(conv as u64 + 1000),
        sender_device: DeviceId(1),
        ts_ms: TimestampMs(1_700_000_000_000 + seq),
        content_type: 1,
        body: body_for(id, body_len),
    }
}

fn small_opts(segment_bytes: u64) -> LogOptions {
    LogOptions {
        segment_bytes,
        ..LogOptions::default()
    }
}

fn shard_opts(segment_bytes: u64) -> ShardOptions {
    ShardOptions {
        log: small_opts(segment_bytes),
        ..ShardOptions::default()
    }
}

/// Appends `batches` batches of `per` entries over 3 conversations; returns what was written.
fn fill(log: &mut impl DurableLog, batches: u64, per: u64, body_len: usize) -> Vec<Entry> {
    let mut seqs = [0u64; 3];
    let mut all = Vec::new();
    let mut pending = Vec::new();
    let mut n = 0;
    for _ in 0..batches {
        let mut batch = Vec::new();
        for _ in 0..per {
            let c = (n % 3) as usize;
            seqs[c] += 1;
            batch.push(entry(
                c as u128 + 1,
                seqs[c],
                cmid(7, n),
                body_len + (n as usize % 5),
            ));
            n += 1;
        }
        pending.push(log.append::<SyncData>(&batch).unwrap());
        all.extend(batch);
    }
    for p in pending {
        p.wait().unwrap();
    }
    all
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

/// Reads every entry of the log in `dir` (opening it, which recovers it).
fn read_log(dir: &Path, segment_bytes: u64) -> Result<Vec<Entry>, LogError> {
    let log = SegmentedLog::open(dir, small_opts(segment_bytes))?;
    let mut out = Vec::new();
    log.scan(Lsn(1), |r| {
        out.extend(r.entries().unwrap());
        true
    })?;
    Ok(out)
}

/// Offsets of the records in one segment file (walking the valid chain).
fn record_offsets(seg: &Path) -> Vec<(usize, usize)> {
    let data = fs::read(seg).unwrap();
    let mut pos = starling_storage::format::SEGMENT_HEADER_BYTES;
    let mut out = Vec::new();
    while let Ok(v) = starling_storage::format::decode_record(&data[pos..]) {
        out.push((pos, v.total_bytes()));
        pos += v.total_bytes();
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// basic behaviour

#[test]
fn append_reopen_read_round_trip_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let mut log = SegmentedLog::open(dir.path(), small_opts(8192)).unwrap();
        let w = fill(&mut log, 60, 4, 100);
        assert_eq!(log.durable_lsn().unwrap(), Lsn(240));
        w
    };
    assert!(
        segments(dir.path()).len() > 3,
        "the test must cross segments"
    );
    assert_eq!(read_log(dir.path(), 8192).unwrap(), written);
    // Appending after reopen continues the lsns.
    let mut log = SegmentedLog::open(dir.path(), small_opts(8192)).unwrap();
    assert_eq!(log.next_lsn(), Lsn(241));
    let c = log
        .append::<SyncData>(&[entry(9, 1, cmid(1, 1), 10)])
        .unwrap();
    let done = c.wait().unwrap();
    assert_eq!((done.first_lsn(), done.last_lsn()), (Lsn(241), Lsn(241)));
}

#[test]
fn each_log_thread_runs_the_start_hook_first_and_says_which_it_is() {
    let dir = tempfile::tempdir().unwrap();
    type Seen = Vec<(starling_storage::LogThread, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s2 = seen.clone();
    let opts = LogOptions {
        thread_start: Some(Arc::new(move |t| {
            let name = std::thread::current().name().map(str::to_owned);
            s2.lock().unwrap().push((t, name));
        })),
        ..small_opts(1 << 20)
    };
    let mut log = SegmentedLog::open(dir.path(), opts).unwrap();
    // A durable append means the writer thread has started (and run its hook first).
    log.append::<SyncData>(&[entry(9, 1, cmid(1, 1), 10)])
        .unwrap()
        .wait()
        .unwrap();
    drop(log);
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|(t, _)| format!("{t:?}"));
    assert_eq!(
        seen,
        vec![
            (
                starling_storage::LogThread::Spare,
                Some("starling-log-spare".to_owned())
            ),
            (
                starling_storage::LogThread::Writer,
                Some("starling-log-io".to_owned())
            ),
        ]
    );
}

#[test]
fn completion_is_a_future_any_executor_can_poll() {
    use std::future::Future;
    use std::task::{Context, Poll, Wake, Waker};
    struct Flag(AtomicU64);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let wakes = Arc::new(AtomicU64::new(0));
    let w2 = wakes.clone();
    let opts = LogOptions {
        wake: Some(Arc::new(move || _ = w2.fetch_add(1, Ordering::SeqCst))),
        ..small_opts(1 << 20)
    };
    let mut log = SegmentedLog::open(dir.path(), opts).unwrap();
    let flag = Arc::new(Flag(AtomicU64::new(0)));
    let waker = Waker::from(flag.clone());
    let mut c = Box::pin(
        log.append::<SyncData>(&[entry(1, 1, cmid(1, 1), 10)])
            .unwrap(),
    );
    let mut cx = Context::from_waker(&waker);
    loop {
        match c.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                assert_eq!(r.unwrap().last_lsn(), Lsn(1));
                break;
            }
            Poll::Pending => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    // The log thread publishes the watermark before it runs the callback, so
    // a poller can see Ready first; the callback follows within moments.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while wakes.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(wakes.load(Ordering::SeqCst) >= 1, "the wake callback ran");
}

#[test]
fn invalid_batches_are_refused_and_backpressure_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        inflight_bytes_max: 1,
        ..small_opts(1 << 20)
    };
    let mut log = SegmentedLog::open(dir.path(), opts).unwrap();
    assert!(matches!(
        log.append::<SyncData>(&[]),
        Err(LogError::InvalidBatch(_))
    ));
    let huge = entry(1, 1, cmid(1, 1), 2 << 20);
    assert!(matches!(
        log.append::<SyncData>(&[huge]),
        Err(LogError::InvalidBatch(_))
    ));
    // With a 1-byte budget, a second batch while the first is in flight is refused, not queued.
    let mut busy = 0;
    let mut pending = Vec::new();
    for i in 0..50 {
        match log.append::<SyncData>(&[entry(1, i + 1, cmid(1, i), 10)]) {
            Ok(c) => pending.push(c),
            Err(LogError::Busy { .. }) => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    for c in pending {
        c.wait().unwrap();
    }
    assert!(busy > 0, "some appends must have met backpressure");
}

// ---------------------------------------------------------------------------------------------
// torn tails and corruption

#[test]
fn last_record_truncated_at_every_byte_offset_recovers_the_prefix() {
    let src = tempfile::tempdir().unwrap();
    let written = {
        let mut log = SegmentedLog::open(src.path(), small_opts(1 << 16)).unwrap();
        fill(&mut log, 5, 3, 40)
    };
    let seg = segments(src.path()).pop().unwrap();
    let recs = record_offsets(&seg);
    let (last_at, last_len) = *recs.last().unwrap();
    let keep = written.len() - 3;
    for cut in 0..last_len {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let seg_copy = dir.path().join(seg.file_name().unwrap());
        let mut data = fs::read(&seg_copy).unwrap();
        // A torn write: the record's bytes from `cut` on never reached the disk (zeroes remain).
        data[last_at + cut..].fill(0);
        fs::write(&seg_copy, &data).unwrap();
        let got = read_log(dir.path(), 1 << 16).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(got, written[..keep], "cut at byte {cut}");
        // And the file itself was shortened: a fresh file length cut (no zero fill) also works.
        let dir2 = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir2.path());
        let seg2 = dir2.path().join(seg.file_name().unwrap());
        let f = fs::OpenOptions::new().write(true).open(&seg2).unwrap();
        f.set_len((last_at + cut) as u64).unwrap();
        drop(f);
        assert_eq!(
            read_log(dir2.path(), 1 << 16).unwrap(),
            written[..keep],
            "file cut at byte {cut}"
        );
        // After recovery the log appends again right where the valid prefix ends.
        let mut log = SegmentedLog::open(dir2.path(), small_opts(1 << 16)).unwrap();
        assert_eq!(log.next_lsn(), Lsn(keep as u64 + 1));
        log.append::<SyncData>(&[entry(1, 99, cmid(9, 9), 5)])
            .unwrap()
            .wait()
            .unwrap();
        drop(log);
        assert_eq!(read_log(dir2.path(), 1 << 16).unwrap().len(), keep + 1);
    }
}

#[test]
fn garbage_or_zeros_after_the_tail_are_cut_and_reported() {
    let src = tempfile::tempdir().unwrap();
    let written = {
        let mut log = SegmentedLog::open(src.path(), small_opts(1 << 16)).unwrap();
        fill(&mut log, 4, 2, 30)
    };
    let seg = segments(src.path()).pop().unwrap();
    let (at, len) = *record_offsets(&seg).last().unwrap();
    let end = at + len;
    let mut rng = Rng(42);
    for garbage in [
        vec![0u8; 100],
        (0..300).map(|_| rng.next() as u8).collect(),
        b"STLR\x01\x02".to_vec(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let seg_copy = dir.path().join(seg.file_name().unwrap());
        let mut data = fs::read(&seg_copy).unwrap();
        data[end..end + garbage.len()].copy_from_slice(&garbage);
        fs::write(&seg_copy, &data).unwrap();
        let log = SegmentedLog::open(dir.path(), small_opts(1 << 16)).unwrap();
        let rep = log.recovery().clone();
        drop(log);
        if garbage.iter().any(|&b| b != 0) {
            assert_eq!(rep.truncated_at, Some((seg_copy.clone(), end as u64)));
            assert!(rep.zeroed_bytes > 0);
        }
        assert_eq!(read_log(dir.path(), 1 << 16).unwrap(), written);
        // The garbage is gone from the file (zeroed), so a later scan cannot trip on it.
        let data = fs::read(&seg_copy).unwrap();
        assert!(data[end..].iter().all(|&b| b == 0));
    }
}

#[test]
fn bit_flip_in_a_middle_record_refuses_to_open_naming_file_and_offset() {
    let src = tempfile::tempdir().unwrap();
    {
        let mut log = SegmentedLog::open(src.path(), small_opts(1 << 16)).unwrap();
        fill(&mut log, 6, 2, 30);
    }
    let seg = segments(src.path()).pop().unwrap();
    let recs = record_offsets(&seg);
    let (at, len) = recs[2];
    for bit in [0usize, 5 * 8 + 3, 9 * 8, 17 * 8 + 1, (len - 1) * 8 + 7] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let seg_copy = dir.path().join(seg.file_name().unwrap());
        let mut data = fs::read(&seg_copy).unwrap();
        data[at + bit / 8] ^= 1 << (bit % 8);
        fs::write(&seg_copy, &data).unwrap();
        let err = SegmentedLog::open(dir.path(), small_opts(1 << 16)).unwrap_err();
        match &err {
            LogError::Corrupt { path, offset, .. } => {
                assert_eq!(path, &seg_copy);
                assert_eq!(*offset, at as u64);
            }
            other => panic!("bit {bit}: expected Corrupt, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&seg_copy.display().to_string()) && msg.contains(&format!("offset {at}")),
            "{msg}"
        );
        // Refusing must not have modified the file.
        assert_eq!(fs::read(&seg_copy).unwrap(), data);
    }
}

#[test]
fn damage_in_an_earlier_segment_refuses_even_when_later_segments_are_fine() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = SegmentedLog::open(dir.path(), small_opts(4096)).unwrap();
        fill(&mut log, 40, 2, 60);
    }
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    let (at, _) = record_offsets(&segs[0])[1];
    let mut data = fs::read(&segs[0]).unwrap();
    data[at + 30] ^= 0x40;
    fs::write(&segs[0], &data).unwrap();
    assert!(matches!(
        SegmentedLog::open(dir.path(), small_opts(4096)),
        Err(LogError::Corrupt { .. })
    ));
    // A segment whose header is damaged while later segments hold data: also refused.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = SegmentedLog::open(dir.path(), small_opts(4096)).unwrap();
        fill(&mut log, 40, 2, 60);
    }
    let segs = segments(dir.path());
    let mut data = fs::read(&segs[1]).unwrap();
    data[3] ^= 1;
    fs::write(&segs[1], &data).unwrap();
    assert!(matches!(
        SegmentedLog::open(dir.path(), small_opts(4096)),
        Err(LogError::Corrupt { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// fault injection: write/fsync errors and a full disk

#[derive(Debug, Default)]
struct Faults {
    /// Fail the n-th write (1-based; 0 = never).
    fail_write: AtomicU64,
    /// Fail the n-th fdatasync.
    fail_sync: AtomicU64,
    /// Fail preallocation of spare segments with ENOSPC while set.
    disk_full: AtomicU64,
    /// Tear the failing write after this many bytes (u64::MAX = write nothing).
    torn_at: AtomicU64,
    errno: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    log: Mutex<Vec<String>>,
    /// Refuse every page-cache release while set (the release is advice; nothing may break).
    fail_release: AtomicU64,
    /// Segments whose page cache the log released, in order.
    released: Mutex<Vec<PathBuf>>,
}

impl FaultHook for Faults {
    fn before(&self, op: &IoOp<'_>) -> Option<Fault> {
        let err = || io::Error::from_raw_os_error(self.errno.load(Ordering::SeqCst) as i32);
        match op {
            IoOp::Write { .. } => {
                let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
                if n == self.fail_write.load(Ordering::SeqCst) {
                    self.log.lock().unwrap().push(format!("fail write {n}"));
                    let torn = self.torn_at.load(Ordering::SeqCst);
                    return Some(if torn == u64::MAX {
                        Fault::Fail(err())
                    } else {
                        Fault::TornWrite(torn as usize, err())
                    });
                }
                None
            }
            IoOp::SyncData { .. } => {
                let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
                (n == self.fail_sync.load(Ordering::SeqCst)).then(|| Fault::Fail(err()))
            }
            IoOp::Preallocate { .. } => (self.disk_full.load(Ordering::SeqCst) != 0)
                .then(|| Fault::Fail(io::Error::from_raw_os_error(28))),
            IoOp::Install { .. } => None,
            IoOp::ReleaseCache { path } => {
                self.released.lock().unwrap().push(path.to_path_buf());
                (self.fail_release.load(Ordering::SeqCst) != 0)
                    .then(|| Fault::Fail(io::Error::from_raw_os_error(22)))
            }
        }
    }
}

fn faulty(segment_bytes: u64, f: &Arc<Faults>) -> LogOptions {
    LogOptions {
        fault_hook: Some(f.clone()),
        ..small_opts(segment_bytes)
    }
}

/// Appends five single-entry batches 20 ms apart, each acknowledged, and returns how many
/// `fdatasync`s they took.
fn syncs_for_spaced_batches(interval: Duration) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let f = Arc::new(Faults::default());
    let opts = LogOptions {
        commit_interval_min: interval,
        ..faulty(1 << 20, &f)
    };
    let mut log = SegmentedLog::open(dir.path(), opts).unwrap();
    log.append::<SyncData>(&[entry(1, 1, cmid(9, 1), 50)])
        .and_then(|c| c.wait())
        .unwrap();
    let before = f.syncs.load(Ordering::SeqCst);
    let mut pending = Vec::new();
    for seq in 2..=6 {
        std::thread::sleep(Duration::from_millis(20));
        pending.push(
            log.append::<SyncData>(&[entry(1, seq, cmid(9, seq), 50)])
                .unwrap(),
        );
    }
    let mut last = Lsn(0);
    for c in pending {
        last = c.wait().unwrap().last_lsn();
    }
    assert_eq!(last, Lsn(6));
    drop(log);
    let reopened = SegmentedLog::open(dir.path(), small_opts(1 << 20)).unwrap();
    assert_eq!(reopened.durable_lsn().unwrap(), Lsn(6));
    f.syncs.load(Ordering::SeqCst) - before
}

/// `commit_interval_min`: batches that arrive within the interval after a commit wait and share
/// the next commit's write and fdatasync; with no interval each gets its own commit.
#[test]
fn commit_interval_gathers_batches_into_one_fdatasync() {
    assert_eq!(syncs_for_spaced_batches(Duration::from_secs(1)), 1);
    assert!(syncs_for_spaced_batches(Duration::ZERO) >= 2);
}

/// Appends batches one by one until one fails; returns (acknowledged entries, the error).
fn append_until_error(log: &mut SegmentedLog, limit: u64) -> (Vec<Entry>, LogError) {
    let mut acked = Vec::new();
    for i in 0..limit {
        let batch = vec![
            entry(1, i * 2 + 1, cmid(3, i * 2), 50),
            entry(1, i * 2 + 2, cmid(3, i * 2 + 1), 50),
        ];
        match log.append::<SyncData>(&batch).and_then(|c| c.wait()) {
            Ok(_) => acked.extend(batch),
            Err(e) => return (acked, e),
        }
    }
    panic!("no fault happened in {limit} batches");
}

#[test]
fn fsync_error_poisons_the_log_and_nothing_later_is_acknowledged() {
    for errno in [5, 28] {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Faults {
            fail_sync: AtomicU64::new(4),
            errno: AtomicU64::new(errno),
            ..Faults::default()
        });
        let mut log = SegmentedLog::open(dir.path(), faulty(1 << 16, &f)).unwrap();
        let (acked, err) = append_until_error(&mut log, 100);
        assert_eq!(
            acked.len(),
            6,
            "three batches were synced before the failing fsync"
        );
        assert!(matches!(err, LogError::Poisoned(_)), "{err}");
        assert_eq!(err.is_no_space(), errno == 28, "{err}");
        // Every later append fails at once; the durable watermark never moves again.
        assert!(
            log.append::<SyncData>(&[entry(1, 99, cmid(4, 4), 1)])
                .is_err()
        );
        assert!(log.durable_lsn().is_err());
        drop(log);
        // Reopening recovers from disk: every acknowledged entry is there (the failed batch may be
        // too — it was written but never acknowledged).
        let got = read_log(dir.path(), 1 << 16).unwrap();
        assert!(got.len() == acked.len() || got.len() == acked.len() + 2);
        assert_eq!(got[..acked.len()], acked[..]);
    }
}

#[test]
fn pipelined_waiters_all_fail_when_the_group_fails() {
    let dir = tempfile::tempdir().unwrap();
    let f = Arc::new(Faults {
        fail_sync: AtomicU64::new(2),
        errno: AtomicU64::new(5),
        ..Faults::default()
    });
    let mut log = SegmentedLog::open(dir.path(), faulty(1 << 20, &f)).unwrap();
    // The first group commit (one batch) succeeds; the second, whatever it holds, fails.
    log.append::<SyncData>(&[entry(1, 1, cmid(5, 999), 200)])
        .unwrap()
        .wait()
        .unwrap();
    let mut pending = Vec::new();
    for i in 1..200 {
        match log.append::<SyncData>(&[entry(1, i + 1, cmid(5, i), 200)]) {
            Ok(c) => pending.push(c),
            Err(_) => break,
        }
    }
    let results: Vec<bool> = pending.into_iter().map(|c| c.wait().is_ok()).collect();
    assert!(
        !results[0],
        "the batch in the failed group is not acknowledged"
    );
    // Acknowledged batches form a prefix: after the first failure nothing is ever acknowledged.
    let first_fail = results
        .iter()
        .position(|ok| !ok)
        .expect("some batch failed");
    assert!(results[first_fail..].iter().all(|ok| !ok));
}

#[test]
fn write_errors_and_torn_writes_are_never_acknowledged() {
    for torn in [u64::MAX, 0, 7, 30, 90] {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Faults {
            fail_write: AtomicU64::new(5),
            torn_at: AtomicU64::new(torn),
            errno: AtomicU64::new(5),
            ..Faults::default()
        });
        let mut log = SegmentedLog::open(dir.path(), faulty(1 << 16, &f)).unwrap();
        let (acked, err) = append_until_error(&mut log, 100);
        assert_eq!(acked.len(), 8);
        assert!(!err.is_no_space());
        drop(log);
        let got = read_log(dir.path(), 1 << 16).unwrap();
        assert_eq!(
            got, acked,
            "torn at {torn}: the torn record is cut on recovery"
        );
    }
}

#[test]
fn full_disk_gives_a_clear_error_and_service_resumes_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let f = Arc::new(Faults {
        errno: AtomicU64::new(5),
        ..Faults::default()
    });
    // Small segments: the first rollover needs a new preallocated segment, which hits ENOSPC.
    let mut log = SegmentedLog::open(dir.path(), faulty(4096, &f)).unwrap();
    // Let the first spare get made, then fill the disk.
    std::thread::sleep(Duration::from_millis(50));
    f.disk_full.store(1, Ordering::SeqCst);
    let mut acked = Vec::new();
    let err = loop {
        let i = acked.len() as u64;
        let batch = vec![entry(2, i + 1, cmid(6, i), 300)];
        match log.append::<SyncData>(&batch).and_then(|c| c.wait()) {
            Ok(_) => acked.extend(batch),
            Err(e) => break e,
        }
        assert!(acked.len() < 1000, "disk never filled");
    };
    assert!(err.is_no_space(), "{err}");
    assert!(err.to_string().contains("storage full"), "{err}");
    assert!(
        log.append::<SyncData>(&[entry(2, 999, cmid(6, 999), 1)])
            .is_err()
    );
    drop(log);
    // Space returns: reopen, everything acknowledged is there, appends work again.
    f.disk_full.store(0, Ordering::SeqCst);
    let mut log = SegmentedLog::open(dir.path(), faulty(4096, &f)).unwrap();
    let n = log.next_lsn().0 - 1;
    assert!(n >= acked.len() as u64);
    for i in 0..40 {
        log.append::<SyncData>(&[entry(3, i + 1, cmid(8, i), 300)])
            .unwrap()
            .wait()
            .unwrap();
    }
    drop(log);
    let got = read_log(dir.path(), 4096).unwrap();
    assert_eq!(got[..acked.len()], acked[..]);
    assert_eq!(got.len() as u64, n + 40);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap().keep();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount(8)");
        assert!(
            st.success(),
            "mounting a {size} tmpfs at {} failed: this test fills a real filesystem and needs root",
            dir.display()
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// The same as above on a real filesystem that runs out of space (a 256 KiB
/// tmpfs): the kernel's ENOSPC, not an injected one.
#[test]
fn real_full_filesystem_gives_a_clear_error_and_service_resumes() {
    let fs_root = Tmpfs::mount("256k");
    let dir = fs_root.0.join("log");
    fs::create_dir(&dir).unwrap();
    // Space that can be given back later.
    let filler = fs_root.0.join("filler");
    fs::write(&filler, vec![1u8; 96 * 1024]).unwrap();
    let mut log = SegmentedLog::open(&dir, small_opts(16 * 1024)).unwrap();
    let mut acked = Vec::new();
    let err = loop {
        let i = acked.len() as u64;
        let batch = vec![entry(4, i + 1, cmid(9, i), 1000)];
        match log.append::<SyncData>(&batch).and_then(|c| c.wait()) {
            Ok(_) => acked.extend(batch),
            Err(e) => break e,
        }
        assert!(acked.len() < 10_000, "the filesystem never filled");
    };
    assert!(err.is_no_space(), "{err}");
    assert!(err.to_string().contains("storage full"), "{err}");
    assert!(!acked.is_empty(), "nothing fit before the disk filled");
    // Nothing later is acknowledged.
    assert!(
        log.append::<SyncData>(&[entry(4, 9_999, cmid(9, 9_999), 1)])
            .and_then(|c| c.wait())
            .is_err()
    );
    drop(log);
    // Space returns; reopening recovers every acknowledged entry and appends work again.
    fs::remove_file(&filler).unwrap();
    let mut log = SegmentedLog::open(&dir, small_opts(16 * 1024)).unwrap();
    let first_new = log.next_lsn().0;
    for i in 0..10 {
        log.append::<SyncData>(&[entry(5, i + 1, cmid(10, i), 1000)])
            .unwrap()
            .wait()
            .unwrap();
    }
    drop(log);
    let got = read_log(&dir, 16 * 1024).unwrap();
    assert_eq!(got[..acked.len()], acked[..]);
    assert_eq!(got.len() as u64, first_new - 1 + 10);
}

// ---------------------------------------------------------------------------------------------
// the index: replay, rebuild, dedup across restarts

fn index_dump(shard: &EmbeddedShard, convs: &[u128]) -> Vec<Entry> {
    let ix = shard.index();
    let mut out = Vec::new();
    for &c in convs {
        let mut after = Seq(0);
        loop {
            let page = ix.after(ConvId(c), after, 100).unwrap();
            let Some(last) = page.last() else { break };
            after = last.seq;
            out.extend(page);
        }
    }
    out
}

#[test]
fn index_reads_latest_before_after_and_dedup_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let mut shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 12)).unwrap();
        let w = fill(&mut shard, 30, 3, 20);
        shard.index().wait_applied(Lsn(90)).unwrap();
        w
    };
    let shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 12)).unwrap();
    // The clean close checkpointed every sealed segment: only the last one is read again.
    let r = shard.open_report();
    assert!(!r.index_rebuilt, "{r:?}");
    assert_eq!(r.log.skipped_segments, r.log.segments - 1, "{r:?}");
    assert!(r.log.segments >= 3, "{r:?}");
    assert!(r.replayed_records < 30 / 2, "{r:?}");
    let ix = shard.index();
    assert_eq!(ix.len(), 90);
    let conv1: Vec<Entry> = written
        .iter()
        .filter(|e| e.conv == ConvId(1))
        .cloned()
        .collect();
    assert_eq!(ix.last_seq(ConvId(1)).unwrap(), Seq(30));
    assert_eq!(ix.latest(ConvId(1), 5).unwrap(), conv1[25..]);
    assert_eq!(ix.before(ConvId(1), Seq(10), 3).unwrap(), conv1[6..9]);
    assert_eq!(ix.after(ConvId(1), Seq(28), 10).unwrap(), conv1[28..]);
    assert_eq!(
        ix.entry(ConvId(1), Seq(7)).unwrap().as_ref(),
        Some(&conv1[6])
    );
    assert_eq!(ix.entry(ConvId(1), Seq(31)).unwrap(), None);
    assert_eq!(ix.last_seq(ConvId(77)).unwrap(), Seq::NONE);
    for e in &written {
        assert_eq!(ix.dedup(e.conv, e.client_msg_id).unwrap(), Some(e.seq));
    }
    assert_eq!(ix.dedup(ConvId(1), cmid(123, 456)).unwrap(), None);
}

/// Conversations of several 4,096-entry chunks: every id is found, whether its chunk is full
/// (a tag table) or filling (a scan), after a clean restart (tags from the index files) and after a
/// rebuild (a fresh tag key); ids never sent are not.
#[test]
fn dedup_finds_every_id_in_conversations_of_many_chunks_across_restart_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let mut shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 20)).unwrap();
        let w = fill(&mut shard, 270, 100, 8);
        shard.index().wait_applied(Lsn(27_000)).unwrap();
        w
    };
    let check = |shard: &EmbeddedShard| {
        let ix = shard.index();
        assert_eq!(ix.len(), 27_000);
        for e in &written {
            assert_eq!(ix.dedup(e.conv, e.client_msg_id).unwrap(), Some(e.seq));
        }
        for n in [27_000, 27_001, u64::MAX] {
            for c in 1..=3 {
                assert_eq!(ix.dedup(ConvId(c), cmid(7, n)).unwrap(), None);
            }
        }
        // An id of conversation 1 asked of conversation 2.
        assert_eq!(ix.dedup(ConvId(2), written[0].client_msg_id).unwrap(), None);
    };
    {
        let shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 20)).unwrap();
        assert!(!shard.open_report().index_rebuilt);
        check(&shard);
    }
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    let shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 20)).unwrap();
    assert!(shard.open_report().index_rebuilt);
    check(&shard);
}

#[test]
fn a_stalled_index_applier_is_backpressure_on_append_not_memory() {
    // The index is applied on the log's I/O thread after each commit's completions fired; the
    // apply waits on `gate` while the test holds it. The commit being applied is acknowledged
    // anyway; later appends queue behind the stalled thread, their bytes stay in flight, so
    // `append` must turn to Busy (never block, never queue unboundedly), and service must resume
    // once the index catches up.
    let gate = Arc::new(Mutex::new(()));
    let held = gate.lock().unwrap();
    let g = gate.clone();
    let dir = tempfile::tempdir().unwrap();
    let opts = ShardOptions {
        log: LogOptions {
            segment_bytes: 1 << 20,
            inflight_bytes_max: 16 * 1024,
            ..LogOptions::default()
        },
        apply_hook: Some(Arc::new(move || drop(g.lock().unwrap()))),
        ..ShardOptions::default()
    };
    let mut shard = EmbeddedShard::open(dir.path(), opts).unwrap();
    shard
        .append::<SyncData>(&[entry(1, 1, cmid(7, 0), 1000)])
        .unwrap()
        .wait()
        .expect("acknowledged before the index applies it");
    let mut accepted = 1u64;
    let mut pending = Vec::new();
    let busy = loop {
        let e = entry(1, accepted + 1, cmid(7, accepted), 1000);
        match shard.append::<SyncData>(&[e]) {
            Ok(c) => {
                pending.push(c);
                accepted += 1;
            }
            Err(err) => break err,
        }
        assert!(accepted < 1000, "a stalled index never pushed back");
    };
    assert!(matches!(busy, LogError::Busy { .. }), "{busy:?}");
    assert!(shard.log().unwrap().inflight_bytes() <= 16 * 1024 + 2048);
    assert!(shard.index().applied_lsn() < Lsn(accepted));
    drop(held);
    for c in pending {
        c.wait().expect("durable once the index moves again");
    }
    shard.index().wait_applied(Lsn(accepted)).unwrap();
    // Released bytes are visible once the applier dropped the records it applied.
    let mut tries = 0;
    while shard.log().unwrap().inflight_bytes() > 0 {
        tries += 1;
        assert!(tries < 10_000, "in-flight bytes never released");
        std::thread::sleep(Duration::from_millis(1));
    }
    let e = entry(1, accepted + 1, cmid(7, accepted), 1000);
    shard.append::<SyncData>(&[e]).unwrap().wait().unwrap();
    shard.index().wait_applied(Lsn(accepted + 1)).unwrap();
    assert_eq!(
        shard.index().last_seq(ConvId(1)).unwrap(),
        Seq(accepted + 1)
    );
}

#[test]
fn index_deleted_corrupted_or_behind_is_rebuilt_with_identical_reads() {
    let dir = tempfile::tempdir().unwrap();
    let convs = [1, 2, 3];
    let before = {
        let mut shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 14)).unwrap();
        fill(&mut shard, 50, 4, 30);
        shard.index().wait_applied(Lsn(200)).unwrap();
        index_dump(&shard, &convs)
    };
    assert_eq!(before.len(), 200);
    // 1. deleted
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    {
        let shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 14)).unwrap();
        assert!(shard.open_report().index_rebuilt);
        assert_eq!(shard.open_report().replayed_records, 50);
        assert_eq!(index_dump(&shard, &convs), before);
    }
    // 2. corrupted: overwrite every file of the index with garbage
    let mut rng = Rng(7);
    for e in walk(&dir.path().join("index")) {
        let len = fs::metadata(&e).unwrap().len() as usize;
        fs::write(
            &e,
            (0..len.max(16))
                .map(|_| rng.next() as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    }
    {
        let shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 14)).unwrap();
        assert!(
            shard.open_report().index_rebuilt,
            "{:?}",
            shard.open_report()
        );
        assert_eq!(index_dump(&shard, &convs), before);
    }
    // 3. behind: an index saved earlier, with the log grown since, is caught up by replay
    let old_index = tempfile::tempdir().unwrap();
    copy_tree(&dir.path().join("index"), old_index.path());
    let after = {
        let mut shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 14)).unwrap();
        let c = shard
            .append::<SyncData>(&[entry(1, 68, cmid(11, 1), 10), entry(2, 67, cmid(11, 2), 10)])
            .unwrap();
        let lsn = c.wait().unwrap().last_lsn();
        shard.index().wait_applied(lsn).unwrap();
        index_dump(&shard, &convs)
    };
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    copy_tree(old_index.path(), &dir.path().join("index"));
    {
        let shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 14)).unwrap();
        let r = shard.open_report();
        assert!(!r.index_rebuilt, "{r:?}");
        assert!(r.log.skipped_segments > 0, "{r:?}");
        assert_eq!(index_dump(&shard, &convs), after);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else {
            fs::copy(&p, &dest).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// metadata and cursors

#[test]
fn metadata_records_round_trip_durably_with_conditions_and_cursors() {
    use starling_storage::meta::{Device, Member, OneTimePrekey, OtpRecord, Role, User, keys};
    use starling_storage::{
        CursorStore, DeliveryCursor, EmbeddedMeta, MetaBatch, MetadataStore, ReadCursor,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let user = User {
        id: UserId(1),
        phone_e164: "+15550001".into(),
        display_name: "Ann".into(),
        password_hash: None,
        created_ms: TimestampMs(5),
        account: None,
    };
    {
        let meta = EmbeddedMeta::open(&path).unwrap();
        let mut b = MetaBatch::default();
        b.expect::<User>(&keys::user(UserId(1)), None).put(&user);
        for d in 1..=2 {
            b.put(&Device {
                user: UserId(1),
                device: DeviceId(d),
                name: format!("phone {d}"),
                platform: "ios".into(),
                identity_key: vec![d as u8; 32],
                created_ms: TimestampMs(1),
                last_seen_ms: TimestampMs(2),
            });
        }
        b.add_member(&Member {
            group: ConvId(9),
            user: UserId(1),
            role: Role::Owner,
            joined_ms: TimestampMs(3),
            joined_seq: None,
        });
        for id in [3, 1, 2] {
            b.put(&OneTimePrekey {
                user: UserId(1),
                device: DeviceId(1),
                id,
                public_key: vec![id as u8],
            });
        }
        meta.commit(&b).unwrap();
        // A conditional write that lost the race changes nothing.
        let mut b = MetaBatch::default();
        b.expect::<User>(&keys::user(UserId(1)), None).put(&User {
            display_name: "Bob".into(),
            ..user.clone()
        });
        assert!(matches!(
            meta.commit(&b),
            Err(starling_storage::StorageError::Conflict { table: "users" })
        ));
        // OTP attempts via compare-and-set.
        let otp = OtpRecord {
            ident: "+15550001".into(),
            code_hmac: [7; 32],
            expires_ms: TimestampMs(100),
            attempts_left: 0,
            created_ms: TimestampMs(1),
        };
        meta.commit(MetaBatch::default().put(&otp)).unwrap();
        let key = otp.ident.as_bytes();
        let mut b = MetaBatch::default();
        b.expect(key, Some(&otp)).put(&OtpRecord {
            attempts_left: 1,
            ..otp.clone()
        });
        meta.commit(&b).unwrap();
        assert!(meta.commit(&b).is_err(), "the same CAS twice must conflict");
        meta.advance_delivery(&[
            DeliveryCursor {
                conv: ConvId(9),
                user: UserId(1),
                device: DeviceId(1),
                seq: Seq(10),
            },
            DeliveryCursor {
                conv: ConvId(9),
                user: UserId(1),
                device: DeviceId(2),
                seq: Seq(4),
            },
        ])
        .unwrap();
        // Cursors never move backwards.
        meta.advance_delivery(&[DeliveryCursor {
            conv: ConvId(9),
            user: UserId(1),
            device: DeviceId(1),
            seq: Seq(3),
        }])
        .unwrap();
        meta.advance_read(&[ReadCursor {
            conv: ConvId(9),
            user: UserId(1),
            seq: Seq(8),
        }])
        .unwrap();
    }
    let meta = EmbeddedMeta::open(&path).unwrap();
    assert_eq!(
        meta.get::<User>(&keys::user(UserId(1))).unwrap(),
        Some(user)
    );
    assert_eq!(
        meta.scan::<Device>(&keys::user(UserId(1)), 10)
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        meta.get::<OtpRecord>(b"+15550001")
            .unwrap()
            .unwrap()
            .attempts_left,
        1
    );
    let prefix = keys::device(UserId(1), DeviceId(1));
    let ids: Vec<u32> = std::iter::from_fn(|| meta.pop_first::<OneTimePrekey>(&prefix).unwrap())
        .map(|p| p.id)
        .collect();
    assert_eq!(
        ids,
        [1, 2, 3],
        "one-time prekeys are handed out once, in order"
    );
    assert_eq!(
        meta.scan::<Member>(&ConvId(9).0.to_be_bytes(), 10)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        meta.delivery_cursor(ConvId(9), UserId(1), DeviceId(1))
            .unwrap(),
        Seq(10)
    );
    assert_eq!(meta.delivery_cursors(ConvId(9)).unwrap().len(), 2);
    assert_eq!(meta.read_cursor(ConvId(9), UserId(1)).unwrap(), Seq(8));
    assert_eq!(meta.read_cursor(ConvId(8), UserId(1)).unwrap(), Seq::NONE);
}

// ---------------------------------------------------------------------------------------------
// committed on-disk fixtures of format version 1

const FIXTURE_SEGMENT_BYTES: u64 = 2048;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The entries every v1 fixture holds: 12 batches of 1..=3 entries over two conversations.
fn fixture_batches() -> Vec<Vec<Entry>> {
    let mut seqs = [0u64; 2];
    let mut n = 0;
    (0..12)
        .map(|b| {
            (0..=(b % 3))
                .map(|_| {
                    let c = (n % 2) as usize;
                    seqs[c] += 1;
                    n += 1;
                    entry(
                        c as u128 + 1,
                        seqs[c],
                        cmid(0xF1, n),
                        20 + (n as usize * 7) % 50,
                    )
                })
                .collect()
        })
        .collect()
}

fn write_fixture_log(dir: &Path) {
    let mut log = SegmentedLog::open(dir, small_opts(FIXTURE_SEGMENT_BYTES)).unwrap();
    for b in fixture_batches() {
        log.append::<SyncData>(&b).unwrap().wait().unwrap();
    }
    drop(log);
    let _ = fs::remove_file(dir.join("spare.tmp")); // the next spare segment: not part of the format
}

/// Regenerate with `STARLING_WRITE_FIXTURES=1 cargo test -p starling-storage --test storage fixtures`.
#[test]
fn fixtures_v1_are_read_and_the_writer_still_produces_them() {
    let valid = fixture_dir("v1-valid");
    if std::env::var_os("STARLING_WRITE_FIXTURES").is_some() {
        for name in ["v1-valid", "v1-torn-tail", "v1-bitflip-middle"] {
            let _ = fs::remove_dir_all(fixture_dir(name));
        }
        write_fixture_log(&valid);
        // Torn tail: the last record of the last segment half written.
        let torn = fixture_dir("v1-torn-tail");
        copy_dir(&valid, &torn);
        let last = segments(&torn).pop().unwrap();
        let (at, len) = *record_offsets(&last).last().unwrap();
        let mut d = fs::read(&last).unwrap();
        d[at + len / 2..].fill(0);
        fs::write(&last, d).unwrap();
        // Bit flip in the middle record of the first segment.
        let flip = fixture_dir("v1-bitflip-middle");
        copy_dir(&valid, &flip);
        let first = segments(&flip).remove(0);
        let recs = record_offsets(&first);
        let (at, _) = recs[recs.len() / 2];
        let mut d = fs::read(&first).unwrap();
        d[at + 40] ^= 0x08;
        fs::write(&first, d).unwrap();
    }
    let expected: Vec<Entry> = fixture_batches().concat();
    // 1. The writer still produces these bytes exactly (format stability).
    let fresh = tempfile::tempdir().unwrap();
    write_fixture_log(fresh.path());
    let names: Vec<_> = segments(&valid)
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    assert!(names.len() >= 2, "the fixture spans segments");
    for n in &names {
        assert_eq!(
            fs::read(fresh.path().join(n)).unwrap(),
            fs::read(valid.join(n)).unwrap(),
            "{n:?}"
        );
    }
    // 2. Reading each fixture (from a copy: recovery repairs in place).
    let check = |name: &str| -> Result<Vec<Entry>, LogError> {
        let d = tempfile::tempdir().unwrap();
        copy_dir(&fixture_dir(name), d.path());
        read_log(d.path(), FIXTURE_SEGMENT_BYTES)
    };
    assert_eq!(check("v1-valid").unwrap(), expected);
    let torn = check("v1-torn-tail").unwrap();
    let last_batch = fixture_batches().pop().unwrap().len();
    assert_eq!(torn, expected[..expected.len() - last_batch]);
    match check("v1-bitflip-middle") {
        Err(LogError::Corrupt { path, offset, .. }) => {
            assert!(
                path.ends_with("00000000000000000001.seg"),
                "{}",
                path.display()
            );
            assert!(offset > 32);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// The index points into the log instead of copying entries: a read checks the entry's CRC, so
/// bytes changed under it are an error naming the segment, never a wrong message.
#[test]
fn sealed_segments_beyond_the_cached_count_are_released_oldest_first_and_stay_readable() {
    for fail in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Faults::default());
        f.fail_release.store(u64::from(fail), Ordering::SeqCst);
        let opts = ShardOptions {
            log: LogOptions {
                cached_sealed_segments: 1,
                ..faulty(1 << 16, &f)
            },
            ..ShardOptions::default()
        };
        let mut shard = EmbeddedShard::open(dir.path(), opts).unwrap();
        let written = fill(&mut shard, 60, 10, 500);
        let last = shard.log().unwrap().durable_lsn().unwrap();
        shard.index().wait_applied(last).unwrap();
        let segs = segments(&dir.path().join("log"));
        assert!(segs.len() >= 5, "the fill spans several segments: {segs:?}");
        // Sealed: all but the live (last) one; the newest sealed one stays cached.
        let expect = &segs[..segs.len() - 2];
        // The spare maker releases just before it makes the next spare: wait for it (bounded).
        for _ in 0..1000 {
            if f.released.lock().unwrap().len() >= expect.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            &f.released.lock().unwrap()[..],
            expect,
            "fail_release = {fail}"
        );
        // Released or not, every entry reads back whole and checked, from the index and the log.
        let mut by_index = index_dump(&shard, &[1, 2, 3]);
        by_index.sort_by_key(|e| (e.conv, e.seq));
        let mut want = written.clone();
        want.sort_by_key(|e| (e.conv, e.seq));
        assert_eq!(by_index, want);
        drop(shard);
        assert_eq!(read_log(&dir.path().join("log"), 1 << 16).unwrap(), written);
    }
}

#[test]
fn index_reads_entries_from_the_log_and_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), shard_opts(1 << 16)).unwrap();
    let e = entry(7, 1, cmid(70, 1), 300);
    let lsn = shard
        .append::<SyncData>(std::slice::from_ref(&e))
        .unwrap()
        .wait()
        .unwrap()
        .last_lsn();
    shard.index().wait_applied(lsn).unwrap();
    let ix = shard.index().clone();
    assert_eq!(ix.entry(ConvId(7), Seq(1)).unwrap(), Some(e.clone()));
    assert_eq!(ix.after(ConvId(7), Seq(0), 10).unwrap(), vec![e.clone()]);
    assert_eq!(ix.dedup(ConvId(7), cmid(70, 1)).unwrap(), Some(Seq(1)));
    // Flip one byte of the body in the segment file.
    let seg = walk(&dir.path().join("log"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let mut data = fs::read(&seg).unwrap();
    let at = data
        .windows(e.body.len())
        .position(|w| w == &e.body[..])
        .expect("the body is in the segment");
    data[at + 10] ^= 0x40;
    fs::write(&seg, &data).unwrap();
    let err = ix.entry(ConvId(7), Seq(1)).unwrap_err().to_string();
    assert!(err.contains("checksum") && err.contains(".seg"), "{err}");
    assert!(ix.after(ConvId(7), Seq(0), 10).is_err());
}

#[path = "storage/crash.rs"]
mod crash;
#[path = "storage/crash_retention.rs"]
mod crash_retention;
#[path = "storage/paging.rs"]
mod paging;
#[path = "storage/reopen.rs"]
mod reopen;
#[path = "storage/retention.rs"]
mod retention;
#[path = "storage/scale.rs"]
mod scale;
