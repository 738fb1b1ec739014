//! An in-memory metadata and cursor store with the embedded store's semantics (atomic,
//! conditional batches; monotonic cursors), for tests and the router's deterministic simulator.
//! "Durable" here means "survives dropping the router that used it": the store outlives a
//! simulated crash. Writes can be made to fail ([`MemMeta::set_fail_writes`]) to exercise error
//! paths.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::StorageError;
use crate::meta::{MetaBatch, MetadataStore, Op, Record, decode};
use crate::traits::{CursorStore, DeliveryCursor, ReadCursor};
use crate::types::{ConvId, DeviceId, Seq, UserId};

type Tables = BTreeMap<(&'static str, Vec<u8>), Vec<u8>>;

#[derive(Debug, Default)]
struct State {
    tables: Tables,
    delivery: BTreeMap<(ConvId, UserId, DeviceId), Seq>,
    read: BTreeMap<(ConvId, UserId), Seq>,
}

/// In-memory [`MetadataStore`] + [`CursorStore`].
#[derive(Debug, Default)]
pub struct MemMeta {
    state: Mutex<State>,
    fail_writes: AtomicBool,
    writes: AtomicU64,
}

impl MemMeta {
    /// An empty store.
    pub fn new() -> MemMeta {
        MemMeta::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// While set, every write fails with [`StorageError::Unavailable`] and changes nothing.
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::Relaxed);
    }

    /// Durable write calls (commits and cursor batches) that succeeded so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn check_write(&self) -> Result<(), StorageError> {
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(StorageError::Unavailable("injected write failure".into()));
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl MetadataStore for MemMeta {
    fn get<R: Record>(&self, key: &[u8]) -> Result<Option<R>, StorageError> {
        let s = self.lock();
        match s.tables.get(&(R::TABLE, key.to_vec())) {
            Some(v) => Ok(Some(decode(v)?)),
            None => Ok(None),
        }
    }

    fn scan<R: Record>(&self, prefix: &[u8], limit: usize) -> Result<Vec<R>, StorageError> {
        let s = self.lock();
        let mut out = Vec::new();
        for ((t, k), v) in s.tables.range((R::TABLE, prefix.to_vec())..) {
            if out.len() >= limit || *t != R::TABLE || !k.starts_with(prefix) {
                break;
            }
            out.push(decode(v)?);
        }
        Ok(out)
    }

    fn commit(&self, batch: &MetaBatch) -> Result<(), StorageError> {
        self.check_write()?;
        let mut s = self.lock();
        for op in &batch.ops {
            if let Op::Expect { table, key, value } = op
                && s.tables.get(&(*table, key.clone())) != value.as_ref()
            {
                return Err(StorageError::Conflict { table });
            }
        }
        for op in &batch.ops {
            match op {
                Op::Put { table, key, value } => {
                    s.tables.insert((*table, key.clone()), value.clone());
                }
                Op::Delete { table, key } => {
                    s.tables.remove(&(*table, key.clone()));
                }
                Op::Expect { .. } => {}
            }
        }
        Ok(())
    }

    fn pop_first<R: Record>(&self, prefix: &[u8]) -> Result<Option<R>, StorageError> {
        self.check_write()?;
        let mut s = self.lock();
        let found = s
            .tables
            .range((R::TABLE, prefix.to_vec())..)
            .next()
            .filter(|((t, k), _)| *t == R::TABLE && k.starts_with(prefix))
            .map(|(k, _)| k.clone());
        match found {
            Some(k) => match s.tables.remove(&k) {
                Some(v) => Ok(Some(decode(&v)?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }
}

impl CursorStore for MemMeta {
    fn advance_delivery(&self, cursors: &[DeliveryCursor]) -> Result<(), StorageError> {
        self.check_write()?;
        let mut s = self.lock();
        for c in cursors {
            let v = s.delivery.entry((c.conv, c.user, c.device)).or_default();
            *v = (*v).max(c.seq);
        }
        Ok(())
    }

    fn advance_read(&self, cursors: &[ReadCursor]) -> Result<(), StorageError> {
        self.check_write()?;
        let mut s = self.lock();
        for c in cursors {
            let v = s.read.entry((c.conv, c.user)).or_default();
            *v = (*v).max(c.seq);
        }
        Ok(())
    }

    fn delivery_cursor(
        &self,
        conv: ConvId,
        user: UserId,
        device: DeviceId,
    ) -> Result<Seq, StorageError> {
        Ok(self
            .lock()
            .delivery
            .get(&(conv, user, device))
            .copied()
            .unwrap_or_default())
    }

    fn read_cursor(&self, conv: ConvId, user: UserId) -> Result<Seq, StorageError> {
        Ok(self
            .lock()
            .read
            .get(&(conv, user))
            .copied()
            .unwrap_or_default())
    }

    fn delivery_cursors(&self, conv: ConvId) -> Result<Vec<DeliveryCursor>, StorageError> {
        Ok(self
            .lock()
            .delivery
            .range((conv, UserId(0), DeviceId(0))..=(conv, UserId(u64::MAX), DeviceId(u32::MAX)))
            .map(|(&(conv, user, device), &seq)| DeliveryCursor {
                conv,
                user,
                device,
                seq,
            })
            .collect())
    }
}
