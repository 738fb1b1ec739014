//! A shard whose log failed is reopened in place (`EmbeddedShard::detach_failed`,
//! `FailedShard::reopen`): every acknowledged entry is there, nothing after the durable lsn
//! is (not even a record that reached the disk whole before its fdatasync failed), reads of the
//! old index keep working meanwhile, a reopen while the fault is still there fails and can be
//! tried again, and appends continue right after the last durable lsn.

use super::*;

/// How the log fails.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// The 3rd fdatasync fails (a commit's, inside the first segment): its group is whole in
    /// the page cache, never acknowledged.
    Sync,
    /// The 6th write is torn after 40 bytes.
    TornWrite,
    /// No spare segment can be made (a full disk): the first rollover fails.
    DiskFull,
}

fn faults(mode: Mode) -> Arc<Faults> {
    let f = Faults {
        errno: AtomicU64::new(5),
        torn_at: AtomicU64::new(u64::MAX),
        ..Faults::default()
    };
    match mode {
        Mode::Sync => f.fail_sync.store(3, Ordering::SeqCst),
        Mode::TornWrite => {
            f.fail_write.store(6, Ordering::SeqCst);
            f.torn_at.store(40, Ordering::SeqCst);
        }
        Mode::DiskFull => {}
    }
    Arc::new(f)
}

fn opts(f: &Arc<Faults>) -> ShardOptions {
    ShardOptions {
        log: faulty(4096, f),
        ..ShardOptions::default()
    }
}

/// Appends two-entry batches (conversation 1), each waited for, until one fails; then a few
/// more that must fail too. Returns the acknowledged entries.
fn append_until_failed(shard: &mut EmbeddedShard) -> Vec<Entry> {
    let mut acked = Vec::new();
    for i in 0..500u64 {
        let n = acked.len() as u64;
        let batch = vec![
            entry(1, n + 1, cmid(21, i * 2), 300),
            entry(1, n + 2, cmid(21, i * 2 + 1), 300),
        ];
        match shard.append::<SyncData>(&batch).and_then(|c| c.wait()) {
            Ok(_) => acked.extend(batch),
            Err(e) => {
                assert!(matches!(e, LogError::Poisoned(_)), "{e}");
                assert!(
                    shard
                        .append::<SyncData>(&[entry(1, 999, cmid(22, i), 1)])
                        .is_err(),
                    "a failed log takes nothing more"
                );
                return acked;
            }
        }
    }
    panic!("the log never failed");
}

#[test]
fn a_failed_shard_reopens_in_place_with_exactly_what_was_acknowledged() {
    for mode in [Mode::Sync, Mode::TornWrite, Mode::DiskFull] {
        let dir = tempfile::tempdir().unwrap();
        let f = faults(mode);
        let mut shard = EmbeddedShard::open(dir.path(), opts(&f)).unwrap();
        if matches!(mode, Mode::DiskFull) {
            // The first spare exists; the next one cannot be made.
            std::thread::sleep(Duration::from_millis(50));
            f.disk_full.store(1, Ordering::SeqCst);
        }
        let acked = append_until_failed(&mut shard);
        assert!(acked.len() >= 2, "{mode:?}: something was acknowledged");
        let (durable, _) = shard.failed_at().expect("the log failed");
        assert_eq!(durable, Lsn(acked.len() as u64), "{mode:?}");

        let mut failed = shard.detach_failed().expect("a failed log detaches");
        assert!(shard.detach_failed().is_none(), "only once");
        assert!(matches!(
            shard.append::<SyncData>(&[entry(1, 1, cmid(23, 1), 1)]),
            Err(LogError::Closed)
        ));
        assert_eq!(failed.durable_lsn(), durable);
        // Reads keep working from the old index meanwhile.
        assert!(
            index_dump(&shard, &[1]) == acked,
            "{mode:?}: reads while failed"
        );

        // The fault is still there: the attempt fails (a full disk at the probe for room for
        // the next segment) and changes nothing acknowledged.
        match mode {
            Mode::Sync | Mode::TornWrite => f
                .fail_write
                .store(f.writes.load(Ordering::SeqCst) + 1, Ordering::SeqCst),
            Mode::DiskFull => {}
        }
        let still = failed.reopen(opts(&f));
        let Err(e) = still else {
            panic!("{mode:?}: reopened with the fault still there")
        };
        println!("{mode:?}: reopen while the fault lasts: {e}");
        // The condition clears.
        f.fail_write.store(0, Ordering::SeqCst);
        f.fail_sync.store(0, Ordering::SeqCst);
        f.disk_full.store(0, Ordering::SeqCst);
        let (mut reopened, cut) = failed
            .reopen(opts(&f))
            .expect("reopens once the fault is gone");
        let cut_bytes = cut.zeroed_bytes;
        if matches!(mode, Mode::Sync) {
            assert!(
                cut_bytes > 0,
                "the unacknowledged group was on disk: {cut_bytes}"
            );
        }
        drop(shard);
        assert_eq!(reopened.next_lsn(), Lsn(durable.0 + 1), "{mode:?}");
        assert!(
            index_dump(&reopened, &[1]) == acked,
            "{mode:?}: nothing after {durable:?}"
        );
        let mut logged = Vec::new();
        reopened
            .log()
            .unwrap()
            .scan(Lsn(1), |r| {
                logged.push(r.first_lsn);
                true
            })
            .unwrap();
        assert_eq!(
            logged.len() * 2,
            acked.len(),
            "{mode:?}: the log holds the acknowledged records only"
        );

        // Appends continue right after the durable lsn.
        let mut more = Vec::new();
        for i in 0..40u64 {
            let seq = acked.len() as u64 + i + 1;
            let e = entry(1, seq, cmid(24, i), 300);
            let done = reopened
                .append::<SyncData>(std::slice::from_ref(&e))
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(done.first_lsn(), Lsn(durable.0 + 1 + i));
            more.push(e);
        }
        drop(reopened);
        let all: Vec<Entry> = acked.iter().chain(&more).cloned().collect();
        let again = EmbeddedShard::open(dir.path(), shard_opts(4096)).unwrap();
        assert!(
            index_dump(&again, &[1]) == all,
            "{mode:?}: after a restart too"
        );
        drop(again);
        let log = SegmentedLog::open(&dir.path().join("log"), small_opts(4096)).unwrap();
        let mut logged = Vec::new();
        log.scan(Lsn(1), |r| {
            logged.extend(r.entries().unwrap());
            true
        })
        .unwrap();
        assert!(
            logged == all,
            "{mode:?}: the log holds {:?}",
            logged.iter().map(|e| e.seq.0).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_healthy_shard_does_not_detach() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = EmbeddedShard::open(dir.path(), shard_opts(4096)).unwrap();
    fill(&mut shard, 3, 2, 10);
    assert!(shard.failed_at().is_none());
    assert!(shard.detach_failed().is_none());
    assert!(
        shard
            .append::<SyncData>(&[entry(1, 99, cmid(25, 1), 1)])
            .is_ok()
    );
}
