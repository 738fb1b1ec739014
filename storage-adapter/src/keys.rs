//! The end-to-end key directory at rest (`protocol/README.md`, "End-to-end key directory"):
//! per device an identity key ([`DeviceIdentity`]), a signed prekey
//! ([`meta::SignedPrekey`](crate::meta::SignedPrekey)) and a stock of one-time prekeys
//! ([`meta::OneTimePrekey`](crate::meta::OneTimePrekey)), and [`KeyDirectory`], the logic of
//! the **one** writer of those tables.
//!
//! Exactly-once hand-out of one-time prekeys rests on that: every claim and every upload of a
//! node goes through one `KeyDirectory`, run on one thread, which collects the claims of many
//! fetches into one open [`MetaBatch`] (group commit) and answers them only after
//! [`KeyDirectory::commit`] made it durable. Within an open batch it remembers how many keys of
//! each device it has already taken, so two fetches in one batch never take the same key; a
//! crash before the commit loses claims that nobody was told about, never hands one out twice.
//!
//! **Is not:** cryptography. The caller verifies signatures (the storage crate knows no
//! algorithm); this module checks shapes (lengths, counts, duplicates) and the stock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::error::StorageError;
use crate::meta::{
    MetaBatch, MetadataStore, OneTimePrekey, Reader, Record, SignedPrekey, Writer, keys,
};
use crate::types::{DeviceId, TimestampMs, UserId};

/// Bytes of every public key in the directory: an Ed25519 identity key, X25519 prekeys.
pub const KEY_BYTES: usize = 32;
/// Bytes of the signed prekey's Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Most one-time prekeys one upload may carry.
pub const ONE_TIME_PREKEYS_PER_UPLOAD_MAX: usize = 100;
/// Most devices of one user the directory reads for one fetch.
pub const DEVICES_PER_USER_MAX: usize = 256;
/// Entries of the stock cache before it is dropped and refilled from the store as used.
const STOCK_CACHE_MAX: usize = 1 << 20;
/// One-time prekeys read ahead per device (the next ones a fetch takes), so that a busy
/// device's claims cost one scan per this many.
const READ_AHEAD: usize = 64;
/// Devices with read-ahead keys before the read-ahead is dropped and refilled as used.
const READ_AHEAD_DEVICES_MAX: usize = 1 << 14;
/// Users whose devices are cached before the cache is dropped and refilled as used.
const DEVICE_CACHE_USERS_MAX: usize = 1 << 16;

/// A user's devices with keys: identity and signed prekey, in device order.
type DeviceList = Arc<Vec<(DeviceIdentity, SignedPrekey)>>;

/// A device's identity key (E2E). Key: user ‖ device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Owner.
    pub user: UserId,
    /// Device.
    pub device: DeviceId,
    /// Ed25519 public key, [`KEY_BYTES`].
    pub identity_key: Vec<u8>,
    /// The device's E2E library's registration id (opaque).
    pub registration_id: u32,
    /// When it was last uploaded.
    pub updated_ms: TimestampMs,
}

impl Record for DeviceIdentity {
    const TABLE: &'static str = "device_identities";
    fn key(&self) -> Vec<u8> {
        keys::device(self.user, self.device)
    }
    fn encode(&self, w: &mut Writer) {
        w.u64(self.user.0)
            .u32(self.device.0)
            .bytes(&self.identity_key)
            .u32(self.registration_id)
            .u64(self.updated_ms.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        Ok(DeviceIdentity {
            user: UserId(r.u64()?),
            device: DeviceId(r.u32()?),
            identity_key: r.bytes()?,
            registration_id: r.u32()?,
            updated_ms: TimestampMs(r.u64()?),
        })
    }
}

/// Why a key request is refused (nothing was written for it).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The request is malformed or over a limit (the client's fault).
    #[error("{0}")]
    Invalid(String),
    /// A one-time prekey id is already in the stock with another key.
    #[error("{0}")]
    AlreadyExists(String),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// One UploadKeys, as the wire carried it (lengths not yet checked).
#[derive(Clone, Debug, Default)]
pub struct Upload {
    /// New identity key (empty: unchanged).
    pub identity_key: Vec<u8>,
    /// New registration id (0: unchanged).
    pub registration_id: u32,
    /// New signed prekey: (id, public key, signature).
    pub signed_prekey: Option<(u32, Vec<u8>, Vec<u8>)>,
    /// One-time prekeys to add: (id, public key).
    pub one_time_prekeys: Vec<(u32, Vec<u8>)>,
}

impl Upload {
    /// Nothing to change: the upload only asks for the count.
    pub fn is_empty(&self) -> bool {
        self.identity_key.is_empty()
            && self.registration_id == 0
            && self.signed_prekey.is_none()
            && self.one_time_prekeys.is_empty()
    }
}

/// What a sender needs to start a session with one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The device's identity.
    pub identity: DeviceIdentity,
    /// Its signed prekey.
    pub signed: SignedPrekey,
    /// One one-time prekey, taken from the stock (in the open batch).
    pub one_time: Option<OneTimePrekey>,
}

/// A device whose stock fell below the low-stock threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowStock {
    /// Owner.
    pub user: UserId,
    /// Device.
    pub device: DeviceId,
    /// One-time prekeys left.
    pub remaining: u32,
}

/// The one writer of the key tables (see the module docs).
#[derive(Debug)]
pub struct KeyDirectory<M> {
    meta: Arc<M>,
    stock_max: u32,
    low_stock: u32,
    /// One-time prekeys per device as of the open batch (committed + the batch's changes).
    stock: HashMap<(UserId, DeviceId), u32>,
    /// Keys of each device taken in the open batch (always the first ones in key order).
    claimed: HashMap<(UserId, DeviceId), usize>,
    /// The next keys of each device in key order, in the store and not taken (read ahead).
    ahead: HashMap<(UserId, DeviceId), VecDeque<OneTimePrekey>>,
    /// Each user's devices with keys, as stored (cached).
    devices: HashMap<UserId, DeviceList>,
    /// Users whose keys the open batch changes.
    touched: Vec<UserId>,
    batch: MetaBatch,
    ops: usize,
}

impl<M: MetadataStore> KeyDirectory<M> {
    /// The directory over `meta`: at most `stock_max` one-time prekeys per device; a claim that
    /// takes a stock from `low_stock` or more to below it is reported ([`LowStock`]).
    pub fn new(meta: Arc<M>, stock_max: u32, low_stock: u32) -> Self {
        KeyDirectory {
            meta,
            stock_max,
            low_stock,
            stock: HashMap::new(),
            claimed: HashMap::new(),
            ahead: HashMap::new(),
            devices: HashMap::new(),
            touched: Vec::new(),
            batch: MetaBatch::default(),
            ops: 0,
        }
    }

    /// Whether the open batch holds writes.
    pub fn has_pending(&self) -> bool {
        self.ops > 0
    }

    /// Makes the open batch durable (one commit). On failure the batch is dropped and the
    /// stock cache forgotten (it is reloaded from the store).
    pub fn commit(&mut self) -> Result<(), StorageError> {
        self.claimed.clear();
        for u in std::mem::take(&mut self.touched) {
            self.devices.remove(&u);
        }
        if self.ops == 0 {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.ops = 0;
        let r = self.meta.commit(&batch);
        if r.is_err() {
            self.stock.clear();
            self.ahead.clear();
            self.devices.clear();
        }
        r
    }

    /// One-time prekeys `user`'s `device` holds as of the open batch.
    pub fn stock(&mut self, user: UserId, device: DeviceId) -> Result<u32, StorageError> {
        if let Some(&n) = self.stock.get(&(user, device)) {
            return Ok(n);
        }
        if self.stock.len() >= STOCK_CACHE_MAX {
            self.stock.clear();
        }
        let n = self
            .meta
            .scan::<OneTimePrekey>(&keys::device(user, device), usize::MAX)?
            .len();
        // The count is never above the stock limit in force when the keys were uploaded.
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.stock.insert((user, device), n);
        Ok(n)
    }

    /// Adds `up` to `user`'s `device` in the open batch, after checking its shape and the
    /// stock; `verify(identity_key, public_key, signature)` checks the signed prekey's
    /// signature. Returns the stock after it. An empty upload changes nothing and returns the
    /// stock. The caller commits the batch before answering.
    ///
    /// # Errors
    /// [`KeyError::Invalid`] for a bad length, count, missing key or signature;
    /// [`KeyError::AlreadyExists`] for a one-time prekey id stored with another key;
    /// [`KeyError::Storage`]. Nothing is added to the batch then.
    pub fn upload(
        &mut self,
        user: UserId,
        device: DeviceId,
        up: &Upload,
        now: TimestampMs,
        verify: impl Fn(&[u8], &[u8], &[u8]) -> bool,
    ) -> Result<u32, KeyError> {
        check_shapes(up)?;
        let prefix = keys::device(user, device);
        let current = self.meta.get::<DeviceIdentity>(&prefix)?;
        if up.is_empty() {
            return Ok(if current.is_some() {
                self.stock(user, device)?
            } else {
                0
            });
        }
        let given = (!up.identity_key.is_empty()).then_some(up.identity_key.as_slice());
        let identity: Vec<u8> = match (given, &current) {
            (Some(k), _) => k.to_vec(),
            (None, Some(c)) => c.identity_key.clone(),
            (None, None) => {
                return Err(KeyError::Invalid(
                    "this device has no keys yet: its first UploadKeys must carry identity_key \
                     and signed_prekey"
                        .into(),
                ));
            }
        };
        let new_identity = current.as_ref().is_none_or(|c| c.identity_key != identity);
        if new_identity && up.signed_prekey.is_none() {
            return Err(KeyError::Invalid(
                "a new identity_key needs a signed_prekey signed by it in the same UploadKeys"
                    .into(),
            ));
        }
        if let Some((_, public_key, signature)) = &up.signed_prekey
            && !verify(&identity, public_key, signature)
        {
            return Err(KeyError::Invalid(
                "signed_prekey.signature is not a valid Ed25519 signature of \
                 signed_prekey.public_key by identity_key"
                    .into(),
            ));
        }
        // A new identity starts over: the one-time prekeys of the old one go.
        let stored = if new_identity {
            self.meta.scan::<OneTimePrekey>(&prefix, usize::MAX)?
        } else {
            Vec::new()
        };
        let before = if new_identity {
            0
        } else {
            self.stock(user, device)?
        };
        let mut added = Vec::with_capacity(up.one_time_prekeys.len());
        for (id, public_key) in &up.one_time_prekeys {
            if !new_identity
                && let Some(k) = self
                    .meta
                    .get::<OneTimePrekey>(&keys::prekey(user, device, *id))?
            {
                if k.public_key == *public_key {
                    continue; // a retried upload: already in the stock
                }
                return Err(KeyError::AlreadyExists(format!(
                    "one-time prekey {id} is already in the stock with another public key; \
                     use new key ids"
                )));
            }
            added.push(OneTimePrekey {
                user,
                device,
                id: *id,
                public_key: public_key.clone(),
            });
        }
        let after = before as usize + added.len();
        if after > self.stock_max as usize {
            return Err(KeyError::Invalid(format!(
                "the stock would hold {after} one-time prekeys, more than the {} a device may \
                 have ({before} now): upload fewer",
                self.stock_max
            )));
        }
        for k in &stored {
            self.batch.delete::<OneTimePrekey>(&k.key());
        }
        if given.is_some() || up.registration_id != 0 || current.is_none() {
            self.batch.put(&DeviceIdentity {
                user,
                device,
                identity_key: identity,
                registration_id: if up.registration_id != 0 {
                    up.registration_id
                } else {
                    current.as_ref().map_or(0, |c| c.registration_id)
                },
                updated_ms: now,
            });
        }
        if let Some((id, public_key, signature)) = &up.signed_prekey {
            self.batch.put(&SignedPrekey {
                user,
                device,
                id: *id,
                public_key: public_key.clone(),
                signature: signature.clone(),
            });
        }
        for k in &added {
            self.batch.put(k);
        }
        self.ops += 1 + stored.len() + added.len();
        self.ahead.remove(&(user, device));
        self.touch(user);
        let after = u32::try_from(after).unwrap_or(u32::MAX);
        self.stock.insert((user, device), after);
        Ok(after)
    }

    /// Bundles of `user`'s devices that have keys (`devices` empty: all; else those of them),
    /// in device order, each with one one-time prekey taken from its stock in the open batch
    /// when one is left. Also returns the devices whose stock this took below the low-stock
    /// threshold. The caller commits the batch before answering.
    pub fn fetch(
        &mut self,
        user: UserId,
        devices: &[u32],
    ) -> Result<(Vec<Bundle>, Vec<LowStock>), StorageError> {
        let mut bundles = Vec::new();
        let mut low = Vec::new();
        for (identity, signed) in self.devices(user)?.iter() {
            let device = identity.device;
            if !devices.is_empty() && !devices.contains(&device.0) {
                continue;
            }
            let prefix = keys::device(user, device);
            let stock = self.stock(user, device)?;
            let mut one_time = None;
            if stock > 0 {
                let taken = self.claimed.get(&(user, device)).copied().unwrap_or(0);
                if let Some(k) = self.next_one_time(user, device, &prefix, taken)? {
                    self.batch.delete::<OneTimePrekey>(&k.key());
                    self.ops += 1;
                    self.claimed.insert((user, device), taken + 1);
                    let left = stock - 1;
                    self.stock.insert((user, device), left);
                    if stock >= self.low_stock && left < self.low_stock {
                        low.push(LowStock {
                            user,
                            device,
                            remaining: left,
                        });
                    }
                    one_time = Some(k);
                }
            }
            bundles.push(Bundle {
                identity: identity.clone(),
                signed: signed.clone(),
                one_time,
            });
        }
        Ok((bundles, low))
    }

    /// Bundles of `user`'s devices that have keys (`devices` empty: all; else those of them),
    /// in device order, without one-time prekeys: a listing that takes nothing and changes
    /// nothing, so it needs no commit.
    pub fn list(&mut self, user: UserId, devices: &[u32]) -> Result<Vec<Bundle>, StorageError> {
        Ok(self
            .devices(user)?
            .iter()
            .filter(|(identity, _)| devices.is_empty() || devices.contains(&identity.device.0))
            .map(|(identity, signed)| Bundle {
                identity: identity.clone(),
                signed: signed.clone(),
                one_time: None,
            })
            .collect())
    }

    /// `user`'s devices with keys and their signed prekeys, from the cache or the store.
    fn devices(&mut self, user: UserId) -> Result<DeviceList, StorageError> {
        if let Some(d) = self.devices.get(&user) {
            return Ok(d.clone());
        }
        let mut list = Vec::new();
        for identity in self
            .meta
            .scan::<DeviceIdentity>(&keys::user(user), DEVICES_PER_USER_MAX)?
        {
            // An identity is always stored together with its signed prekey.
            if let Some(signed) = self
                .meta
                .get::<SignedPrekey>(&keys::device(user, identity.device))?
            {
                list.push((identity, signed));
            }
        }
        if self.devices.len() >= DEVICE_CACHE_USERS_MAX {
            self.devices.clear();
        }
        let list = Arc::new(list);
        self.devices.insert(user, list.clone());
        Ok(list)
    }

    /// `user`'s keys change in the open batch: their cached devices go now and at the commit
    /// (a fetch in between would cache what the store still holds).
    fn touch(&mut self, user: UserId) {
        self.devices.remove(&user);
        self.touched.push(user);
    }

    /// The lowest one-time prekey of the device not taken in the open batch (`taken` were),
    /// from the read-ahead, refilled from the store when empty: the keys taken are always
    /// the first ones in key order, so the store's first `taken` are the batch's.
    fn next_one_time(
        &mut self,
        user: UserId,
        device: DeviceId,
        prefix: &[u8],
        taken: usize,
    ) -> Result<Option<OneTimePrekey>, StorageError> {
        let empty = self
            .ahead
            .get(&(user, device))
            .is_none_or(VecDeque::is_empty);
        if empty {
            if self.ahead.len() >= READ_AHEAD_DEVICES_MAX {
                self.ahead.clear();
            }
            let next: VecDeque<OneTimePrekey> = self
                .meta
                .scan::<OneTimePrekey>(prefix, taken + READ_AHEAD)?
                .into_iter()
                .skip(taken)
                .collect();
            self.ahead.insert((user, device), next);
        }
        Ok(self
            .ahead
            .get_mut(&(user, device))
            .and_then(VecDeque::pop_front))
    }

    /// Deletes every key of `user`'s `device` (revoked) in the open batch.
    pub fn remove_device(&mut self, user: UserId, device: DeviceId) -> Result<(), StorageError> {
        let prefix = keys::device(user, device);
        for k in self.meta.scan::<OneTimePrekey>(&prefix, usize::MAX)? {
            self.batch.delete::<OneTimePrekey>(&k.key());
            self.ops += 1;
        }
        self.batch
            .delete::<SignedPrekey>(&prefix)
            .delete::<DeviceIdentity>(&prefix);
        self.ops += 2;
        self.stock.insert((user, device), 0);
        self.ahead.remove(&(user, device));
        self.touch(user);
        Ok(())
    }
}

/// Lengths, counts and duplicate ids of an upload.
fn check_shapes(up: &Upload) -> Result<(), KeyError> {
    let bad = |m: String| Err(KeyError::Invalid(m));
    if !up.identity_key.is_empty() && up.identity_key.len() != KEY_BYTES {
        return bad(format!(
            "identity_key must be {KEY_BYTES} bytes (an Ed25519 public key), not {}",
            up.identity_key.len()
        ));
    }
    if let Some((_, public_key, signature)) = &up.signed_prekey {
        if public_key.len() != KEY_BYTES {
            return bad(format!(
                "signed_prekey.public_key must be {KEY_BYTES} bytes (X25519), not {}",
                public_key.len()
            ));
        }
        if signature.len() != SIGNATURE_BYTES {
            return bad(format!(
                "signed_prekey.signature must be {SIGNATURE_BYTES} bytes (Ed25519), not {}",
                signature.len()
            ));
        }
    }
    if up.one_time_prekeys.len() > ONE_TIME_PREKEYS_PER_UPLOAD_MAX {
        return bad(format!(
            "at most {ONE_TIME_PREKEYS_PER_UPLOAD_MAX} one-time prekeys per UploadKeys, not {}",
            up.one_time_prekeys.len()
        ));
    }
    let mut ids: Vec<u32> = Vec::with_capacity(up.one_time_prekeys.len());
    for (id, public_key) in &up.one_time_prekeys {
        if public_key.len() != KEY_BYTES {
            return bad(format!(
                "one-time prekey {id}: public_key must be {KEY_BYTES} bytes (X25519), not {}",
                public_key.len()
            ));
        }
        ids.push(*id);
    }
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return bad(format!("one-time prekey id {} appears twice", w[0]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemMeta;

    const U: UserId = UserId(7);
    const D: DeviceId = DeviceId(1);

    fn ok(_: &[u8], _: &[u8], _: &[u8]) -> bool {
        true
    }

    fn upload(first: u32, n: u32) -> Upload {
        Upload {
            identity_key: vec![1; 32],
            registration_id: 5,
            signed_prekey: Some((1, vec![2; 32], vec![3; 64])),
            one_time_prekeys: (first..first + n).map(|i| (i, vec![i as u8; 32])).collect(),
        }
    }

    fn dir(stock_max: u32, low: u32) -> (Arc<MemMeta>, KeyDirectory<MemMeta>) {
        let meta = Arc::new(MemMeta::default());
        (meta.clone(), KeyDirectory::new(meta, stock_max, low))
    }

    #[test]
    fn claims_in_one_batch_are_distinct_and_durable_after_commit() {
        let (meta, mut d) = dir(100, 3);
        assert_eq!(
            d.upload(U, D, &upload(10, 5), TimestampMs(1), ok).unwrap(),
            5
        );
        d.commit().unwrap();
        let mut got = Vec::new();
        let mut lows = Vec::new();
        for _ in 0..7 {
            let (b, low) = d.fetch(U, &[]).unwrap();
            assert_eq!(b.len(), 1);
            got.push(b[0].one_time.as_ref().map(|k| k.id));
            lows.extend(low);
        }
        assert_eq!(
            got,
            [Some(10), Some(11), Some(12), Some(13), Some(14), None, None]
        );
        // 5 → 4 → 3 → 2: crossed below 3 once.
        assert_eq!(lows.len(), 1);
        assert_eq!(lows[0].remaining, 2);
        // Not yet durable; then durable.
        assert_eq!(
            meta.scan::<OneTimePrekey>(&keys::user(U), 99)
                .unwrap()
                .len(),
            5
        );
        d.commit().unwrap();
        assert!(
            meta.scan::<OneTimePrekey>(&keys::user(U), 99)
                .unwrap()
                .is_empty()
        );
        // A fresh directory (restart) agrees.
        let mut d2 = KeyDirectory::new(meta, 100, 3);
        assert_eq!(d2.stock(U, D).unwrap(), 0);
    }

    /// A listing takes nothing: the stock and the next claim are as before it.
    #[test]
    fn a_listing_takes_no_one_time_prekey() {
        let (_, mut d) = dir(100, 3);
        let d2 = DeviceId(2);
        d.upload(U, D, &upload(10, 4), TimestampMs(1), ok).unwrap();
        d.upload(U, d2, &upload(20, 4), TimestampMs(1), ok).unwrap();
        d.commit().unwrap();
        for _ in 0..3 {
            let b = d.list(U, &[]).unwrap();
            assert_eq!(b.len(), 2);
            assert!(b.iter().all(|b| b.one_time.is_none()));
            assert_eq!(b[0].identity.device, D);
            assert_eq!(b[1].signed.public_key, vec![2; 32]);
        }
        let only = d.list(U, &[2]).unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].identity.device, d2);
        assert!(d.list(U, &[9]).unwrap().is_empty());
        assert!(d.list(UserId(99), &[]).unwrap().is_empty());
        assert!(!d.has_pending());
        assert_eq!(d.stock(U, D).unwrap(), 4);
        let (b, _) = d.fetch(U, &[1]).unwrap();
        assert_eq!(b[0].one_time.as_ref().map(|k| k.id), Some(10));
    }

    /// Past the read-ahead, across commits and with an upload in between: every key once, in
    /// key order, then none.
    #[test]
    fn claims_past_the_read_ahead_and_across_uploads_stay_in_order() {
        let (_, mut d) = dir(1000, 0);
        for first in [1, 101] {
            let mut up = upload(first, 100);
            if first > 1 {
                up.identity_key.clear();
                up.signed_prekey = None;
            }
            d.upload(U, D, &up, TimestampMs(1), ok).unwrap();
            d.commit().unwrap();
        }
        let mut got = Vec::new();
        let mut take = |d: &mut KeyDirectory<MemMeta>, n: usize| {
            for _ in 0..n {
                got.push(
                    d.fetch(U, &[]).unwrap().0[0]
                        .one_time
                        .as_ref()
                        .map(|k| k.id),
                );
            }
            d.commit().unwrap();
        };
        take(&mut d, 130);
        // More keys arrive (ids below and above those left).
        let mut more = upload(1000, 10);
        more.identity_key.clear();
        more.signed_prekey = None;
        d.upload(U, D, &more, TimestampMs(2), ok).unwrap();
        d.commit().unwrap();
        take(&mut d, 85);
        let want: Vec<Option<u32>> = (1..=200)
            .chain(1000..1010)
            .map(Some)
            .chain(std::iter::repeat_n(None, 5))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn uploads_are_checked() {
        let (_, mut d) = dir(8, 2);
        let empty = Upload::default();
        assert_eq!(d.upload(U, D, &empty, TimestampMs(1), ok).unwrap(), 0);
        let mut no_identity = upload(1, 1);
        no_identity.identity_key.clear();
        assert!(matches!(
            d.upload(U, D, &no_identity, TimestampMs(1), ok),
            Err(KeyError::Invalid(_))
        ));
        let mut short = upload(1, 1);
        short.identity_key.pop();
        assert!(matches!(
            d.upload(U, D, &short, TimestampMs(1), ok),
            Err(KeyError::Invalid(_))
        ));
        let mut dup = upload(1, 2);
        dup.one_time_prekeys[1].0 = 1;
        assert!(matches!(
            d.upload(U, D, &dup, TimestampMs(1), ok),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            d.upload(U, D, &upload(1, 101), TimestampMs(1), ok),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            d.upload(U, D, &upload(1, 1), TimestampMs(1), |_, _, _| false),
            Err(KeyError::Invalid(_))
        ));
        assert!(!d.has_pending());
        assert_eq!(
            d.upload(U, D, &upload(1, 6), TimestampMs(1), ok).unwrap(),
            6
        );
        d.commit().unwrap();
        // Over the stock limit.
        assert!(matches!(
            d.upload(U, D, &upload(100, 3), TimestampMs(1), ok),
            Err(KeyError::Invalid(_))
        ));
        // A retry is accepted; another key under a stored id is not.
        assert_eq!(
            d.upload(U, D, &upload(1, 6), TimestampMs(1), ok).unwrap(),
            6
        );
        let mut other = upload(1, 1);
        other.one_time_prekeys[0].1 = vec![99; 32];
        assert!(matches!(
            d.upload(U, D, &other, TimestampMs(1), ok),
            Err(KeyError::AlreadyExists(_))
        ));
        // A new identity drops the old stock.
        let mut fresh = upload(50, 2);
        fresh.identity_key = vec![9; 32];
        assert_eq!(d.upload(U, D, &fresh, TimestampMs(2), ok).unwrap(), 2);
        d.commit().unwrap();
        let (b, _) = d.fetch(U, &[]).unwrap();
        assert_eq!(b[0].one_time.as_ref().map(|k| k.id), Some(50));
        assert_eq!(b[0].identity.identity_key, vec![9; 32]);
        d.remove_device(U, D).unwrap();
        d.commit().unwrap();
        assert!(d.fetch(U, &[]).unwrap().0.is_empty());
    }
}
