//! The simulation's faulty in-memory disk, log and index.

use super::*;

// ---------------------------------------------------------------------------------------------
// the faulty in-memory disk, log and index

/// What survives a crash: the synced bytes of one shard's log.
#[derive(Default)]
pub(super) struct Disk {
    pub(super) synced: Vec<u8>,
}

#[derive(Default)]
pub(super) struct IndexState {
    pub(super) entries: BTreeMap<(ConvId, u64), Entry>,
    pub(super) dedup: HashMap<(ConvId, ClientMsgId), u64>,
    pub(super) applied: Lsn,
}

#[derive(Default)]
pub(super) struct SimIndex(pub(super) Mutex<IndexState>);

impl SimIndex {
    pub(super) fn apply(&self, records: &[Vec<u8>]) {
        let mut s = self.0.lock().unwrap();
        for r in records {
            let view = decode_record(r).expect("the sim encodes valid records");
            for e in view.entries().expect("valid entries") {
                if e.seq != Seq::NONE {
                    if !e.client_msg_id.is_none() {
                        s.dedup.insert((e.conv, e.client_msg_id), e.seq.0);
                    }
                    s.entries.insert((e.conv, e.seq.0), e);
                }
            }
            s.applied = view.last_lsn();
        }
    }
}

impl MessageIndex for SimIndex {
    fn latest(&self, conv: ConvId, limit: usize) -> Result<Vec<Entry>, StorageError> {
        self.before(conv, Seq(u64::MAX), limit)
    }
    fn before(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let s = self.0.lock().unwrap();
        let mut v: Vec<Entry> = s
            .entries
            .range((conv, 0)..(conv, seq.0))
            .rev()
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect();
        v.reverse();
        Ok(v)
    }
    fn after(&self, conv: ConvId, seq: Seq, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let s = self.0.lock().unwrap();
        Ok(s.entries
            .range((conv, seq.0.saturating_add(1))..=(conv, u64::MAX))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, StorageError> {
        Ok(self.0.lock().unwrap().entries.get(&(conv, seq.0)).cloned())
    }
    fn last_seq(&self, conv: ConvId) -> Result<Seq, StorageError> {
        let s = self.0.lock().unwrap();
        Ok(Seq(s
            .entries
            .range((conv, 0)..=(conv, u64::MAX))
            .next_back()
            .map_or(0, |(k, _)| k.1)))
    }
    fn dedup(&self, conv: ConvId, id: ClientMsgId) -> Result<Option<Seq>, StorageError> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .dedup
            .get(&(conv, id))
            .map(|s| Seq(*s)))
    }
    fn indexed_lsn(&self) -> Lsn {
        self.0.lock().unwrap().applied
    }
}

/// A `DurableLog` over a [`Disk`]: appends are buffered ("page cache") until `sim_sync`.
pub(super) struct SimLog {
    pub(super) disk: Arc<Mutex<Disk>>,
    pub(super) unsynced: Vec<(Vec<u8>, Lsn)>,
    pub(super) to_index: VecDeque<Vec<u8>>,
    pub(super) index: Arc<SimIndex>,
    pub(super) next_lsn: Lsn,
    pub(super) src: CompletionSource,
}

impl DurableLog for SimLog {
    fn append<L: Level>(&mut self, entries: &[Entry]) -> Result<Completion<L>, LogError> {
        self.src.durable()?;
        if entries.is_empty() {
            return Err(LogError::InvalidBatch("empty batch"));
        }
        if self.unsynced.len() >= 64 {
            return Err(LogError::Busy {
                inflight_bytes: 0,
                limit_bytes: 0,
            });
        }
        let first = self.next_lsn;
        let last = Lsn(first.0 + entries.len() as u64 - 1);
        let mut bytes = Vec::new();
        encode_record(first, entries, &mut bytes);
        self.unsynced.push((bytes, last));
        self.next_lsn = Lsn(last.0 + 1);
        Ok(self.src.completion(first, last))
    }
    fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }
    fn durable_lsn(&self) -> Result<Lsn, LogError> {
        self.src.durable()
    }
}

impl SimLog {
    /// Recovers from `disk`: keeps every whole record, cuts a torn tail, rebuilds the index.
    pub(super) fn recover(disk: Arc<Mutex<Disk>>) -> SimLog {
        let index = Arc::new(SimIndex::default());
        let mut last = Lsn::ZERO;
        {
            let mut d = disk.lock().unwrap();
            let mut pos = 0;
            let mut recs = Vec::new();
            while let Ok(view) = decode_record(&d.synced[pos..]) {
                last = view.last_lsn();
                recs.push(d.synced[pos..pos + view.total_bytes()].to_vec());
                pos += view.total_bytes();
            }
            d.synced.truncate(pos); // a torn tail is cut, never replayed
            index.apply(&recs);
        }
        SimLog {
            disk,
            unsynced: Vec::new(),
            to_index: VecDeque::new(),
            index,
            next_lsn: Lsn(last.0 + 1),
            src: CompletionSource::new(last, None),
        }
    }

    /// fdatasync: everything buffered becomes durable, or the sync fails and poisons the log
    /// (the buffered records stay in limbo: a crash may or may not persist them).
    pub(super) fn sim_sync(&mut self, fail: bool) -> Vec<Entry> {
        if self.unsynced.is_empty() || self.src.durable().is_err() {
            return Vec::new();
        }
        if fail {
            self.src.fail(LogError::Io {
                op: "fdatasync",
                path: PathBuf::from("sim"),
                source: Arc::new(io::Error::other("injected fsync failure")),
            });
            return Vec::new();
        }
        let mut d = self.disk.lock().unwrap();
        let mut out = Vec::new();
        let mut last = Lsn::ZERO;
        for (bytes, l) in self.unsynced.drain(..) {
            d.synced.extend_from_slice(&bytes);
            out.extend(decode_record(&bytes).unwrap().entries().unwrap());
            self.to_index.push_back(bytes);
            last = l;
        }
        drop(d);
        self.src.advance(last, Some(last));
        out
    }

    /// The index catches up by up to `n` records (it lags the log).
    pub(super) fn apply_index(&mut self, n: usize) {
        let recs: Vec<Vec<u8>> = (0..n).filter_map(|_| self.to_index.pop_front()).collect();
        self.index.apply(&recs);
    }

    /// A crash: unsynced records may persist as a prefix, the next one possibly torn.
    pub(super) fn crash(self, rng: &mut Rng) {
        let mut d = self.disk.lock().unwrap();
        for (bytes, _) in &self.unsynced {
            match rng.below(3) {
                0 => d.synced.extend_from_slice(bytes),
                1 => {
                    let cut = rng.below(bytes.len() as u64) as usize;
                    d.synced.extend_from_slice(&bytes[..cut]);
                    break;
                }
                _ => break,
            }
        }
    }
}
