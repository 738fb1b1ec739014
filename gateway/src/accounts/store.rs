//! Account state behind a narrow trait ([`AccountStore`]), with a redb
//! implementation ([`RedbAccountStore`], immediate durability).
//!
//! `starling-storage` will own the metadata store; until its API lands on
//! main, the gateway keeps this small store of its own. Swapping it means
//! implementing [`AccountStore`] on top of the storage crate.

use std::path::Path;

use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

/// A failure of the store (whose fault: ours / the disk's).
#[derive(Debug, thiserror::Error)]
#[error("account store: {0}")]
pub struct StoreError(String);

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                let e = starling_storage::StorageError::from(e);
                if e.is_fault() {
                    // The disk failed: redb refuses everything until reopened.
                    crate::health::report_fault(&format!("accounts.redb: {e}"));
                }
                StoreError(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A user.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserRec {
    /// Name shown to others.
    pub display_name: String,
    /// Status text.
    pub about: String,
    /// Phone (E.164), if registered by phone.
    pub phone: Option<String>,
    /// E-mail, if registered by e-mail.
    pub email: Option<String>,
    /// Creation time.
    pub created_at_ms: u64,
    /// Argon2id PHC string.
    pub password_hash: Option<String>,
    /// Next device id to hand out.
    pub next_device_id: u32,
}

/// A device of a user.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceRec {
    /// Name.
    pub name: String,
    /// Platform.
    pub platform: String,
    /// Registration time.
    pub created_at_ms: u64,
    /// Last connection time.
    pub last_seen_ms: u64,
}

/// A session (one sign-in of one device).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRec {
    /// The user.
    pub user_id: u64,
    /// The device.
    pub device_id: u32,
    /// Creation time.
    pub created_at_ms: u64,
    /// Revoked by logout, device removal or refresh-token reuse.
    pub revoked: bool,
    /// SHA-256 (hex) of the current refresh token.
    pub refresh_sha256: String,
    /// When the current refresh token expires.
    pub refresh_expires_at_ms: u64,
}

/// A pending one-time code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OtpRec {
    /// HMAC-SHA256(secret, identifier ‖ code), hex.
    pub mac: String,
    /// Expiry.
    pub expires_at_ms: u64,
    /// Wrong guesses left.
    pub attempts_left: u32,
    /// When it was sent.
    pub sent_at_ms: u64,
}

/// What checking a code did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtpOutcome {
    /// Correct; the code is consumed.
    Accepted,
    /// Wrong; this many guesses are left.
    Wrong(u32),
    /// None pending, or expired.
    Expired,
    /// No guesses left.
    Exhausted,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// Rotated; the session.
    Rotated(u64, Box<SessionRecView>),
    /// The token was already used: the session is now revoked.
    Reused(u64),
    /// The session is revoked.
    Revoked,
    /// The token expired.
    Expired,
    /// Not a token we issued.
    Unknown,
}

/// The parts of a session a caller needs after rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecView {
    /// The user.
    pub user_id: u64,
    /// The device.
    pub device_id: u32,
}

/// Account state. Every method is one atomic, durable transaction; all are
/// blocking and run on the blocking pool, never on a shard thread.
pub trait AccountStore: Send + Sync + std::fmt::Debug {
    /// Stores (replaces) the pending code for `ident`.
    fn otp_put(&self, ident: &str, rec: &OtpRec) -> Result<(), StoreError>;
    /// The pending code for `ident`.
    fn otp_get(&self, ident: &str) -> Result<Option<OtpRec>, StoreError>;
    /// Checks a guess atomically: consumes the code when `matches` says so,
    /// otherwise spends one attempt.
    fn otp_consume(
        &self,
        ident: &str,
        now_ms: u64,
        matches: &dyn Fn(&OtpRec) -> bool,
    ) -> Result<OtpOutcome, StoreError>;
    /// The user registered under `ident`.
    fn user_by_ident(&self, ident: &str) -> Result<Option<u64>, StoreError>;
    /// Creates a user under `ident` unless one exists; returns (id, created).
    fn user_create(
        &self,
        ident: &str,
        rec: &UserRec,
        phone_key: Option<&[u8]>,
    ) -> Result<(u64, bool), StoreError>;
    /// Reads a user.
    fn user_get(&self, user_id: u64) -> Result<Option<UserRec>, StoreError>;
    /// Writes a user.
    fn user_put(&self, user_id: u64, rec: &UserRec) -> Result<(), StoreError>;
    /// The user whose phone key (HMAC(pepper, SHA-256(E.164))) is this.
    fn user_by_phone_key(&self, key: &[u8]) -> Result<Option<u64>, StoreError>;
    /// Adds a device; returns its id.
    fn device_create(&self, user_id: u64, rec: &DeviceRec) -> Result<u32, StoreError>;
    /// The user's devices.
    fn devices(&self, user_id: u64) -> Result<Vec<(u32, DeviceRec)>, StoreError>;
    /// Removes a device and revokes its sessions; `None` if there is no such device.
    fn device_remove(&self, user_id: u64, device_id: u32) -> Result<Option<Vec<u64>>, StoreError>;
    /// Creates a session; returns its id.
    fn session_create(&self, rec: &SessionRec) -> Result<u64, StoreError>;
    /// Reads a session.
    fn session_get(&self, session_id: u64) -> Result<Option<SessionRec>, StoreError>;
    /// Revokes a session; false if unknown.
    fn session_revoke(&self, session_id: u64) -> Result<bool, StoreError>;
    /// Presents refresh token `old` (SHA-256 hex); on success it is replaced by `new`.
    fn refresh_rotate(
        &self,
        old: &str,
        new: &str,
        new_expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<RotateOutcome, StoreError>;
}

const OTPS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("otps");
const IDENTS: TableDefinition<'_, &str, u64> = TableDefinition::new("idents");
const USERS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("users");
const PHONES: TableDefinition<'_, &[u8], u64> = TableDefinition::new("phone_keys");
const DEVICES: TableDefinition<'_, (u64, u32), &[u8]> = TableDefinition::new("devices");
const SESSIONS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("sessions");
/// refresh SHA-256 hex → (session id, still current).
const REFRESH: TableDefinition<'_, &str, (u64, bool)> = TableDefinition::new("refresh_tokens");
const COUNTERS: TableDefinition<'_, &str, u64> = TableDefinition::new("counters");

/// The redb-backed store in `<data>/accounts.redb`.
#[derive(Debug)]
pub struct RedbAccountStore {
    db: redb::Database,
}

fn next_id(tx: &redb::WriteTransaction, name: &str) -> Result<u64, StoreError> {
    let mut t = tx.open_table(COUNTERS)?;
    let next = t.get(name)?.map_or(1, |v| v.value());
    t.insert(name, next + 1)?;
    Ok(next)
}

fn put_json<K: redb::Key + 'static>(
    tx: &redb::WriteTransaction,
    def: TableDefinition<'_, K, &[u8]>,
    key: K::SelfType<'_>,
    v: &impl Serialize,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(v)?;
    tx.open_table(def)?.insert(key, bytes.as_slice())?;
    Ok(())
}

fn get_json<K: redb::Key + 'static, T: for<'de> Deserialize<'de>>(
    tx: &redb::WriteTransaction,
    def: TableDefinition<'_, K, &[u8]>,
    key: K::SelfType<'_>,
) -> Result<Option<T>, StoreError> {
    let t = tx.open_table(def)?;
    let v = t.get(key)?;
    match v {
        Some(g) => Ok(Some(serde_json::from_slice(g.value())?)),
        None => Ok(None),
    }
}

impl RedbAccountStore {
    /// Opens (or creates) the store.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        // Create every table so reads never meet a missing one.
        tx.open_table(OTPS)?;
        tx.open_table(IDENTS)?;
        tx.open_table(USERS)?;
        tx.open_table(PHONES)?;
        tx.open_table(DEVICES)?;
        tx.open_table(SESSIONS)?;
        tx.open_table(REFRESH)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Self { db })
    }

    fn read<K: redb::Key + 'static, T: for<'de> Deserialize<'de>>(
        &self,
        def: TableDefinition<'_, K, &[u8]>,
        key: K::SelfType<'_>,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(def)?;
        match t.get(key)? {
            Some(g) => Ok(Some(serde_json::from_slice(g.value())?)),
            None => Ok(None),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.db.begin_write()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

impl AccountStore for RedbAccountStore {
    fn otp_put(&self, ident: &str, rec: &OtpRec) -> Result<(), StoreError> {
        self.write(|tx| put_json(tx, OTPS, ident, rec))
    }

    fn otp_get(&self, ident: &str) -> Result<Option<OtpRec>, StoreError> {
        self.read(OTPS, ident)
    }

    fn otp_consume(
        &self,
        ident: &str,
        now_ms: u64,
        matches: &dyn Fn(&OtpRec) -> bool,
    ) -> Result<OtpOutcome, StoreError> {
        self.write(|tx| {
            let Some(mut rec) = get_json::<_, OtpRec>(tx, OTPS, ident)? else {
                return Ok(OtpOutcome::Expired);
            };
            if rec.expires_at_ms <= now_ms {
                tx.open_table(OTPS)?.remove(ident)?;
                return Ok(OtpOutcome::Expired);
            }
            if rec.attempts_left == 0 {
                return Ok(OtpOutcome::Exhausted);
            }
            if matches(&rec) {
                tx.open_table(OTPS)?.remove(ident)?;
                return Ok(OtpOutcome::Accepted);
            }
            rec.attempts_left -= 1;
            put_json(tx, OTPS, ident, &rec)?;
            Ok(OtpOutcome::Wrong(rec.attempts_left))
        })
    }

    fn user_by_ident(&self, ident: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(IDENTS)?;
        Ok(t.get(ident)?.map(|g| g.value()))
    }

    fn user_create(
        &self,
        ident: &str,
        rec: &UserRec,
        phone_key: Option<&[u8]>,
    ) -> Result<(u64, bool), StoreError> {
        self.write(|tx| {
            if let Some(existing) = tx.open_table(IDENTS)?.get(ident)?.map(|g| g.value()) {
                return Ok((existing, false));
            }
            let id = next_id(tx, "user")?;
            tx.open_table(IDENTS)?.insert(ident, id)?;
            if let Some(k) = phone_key {
                tx.open_table(PHONES)?.insert(k, id)?;
            }
            put_json(tx, USERS, id, rec)?;
            Ok((id, true))
        })
    }

    fn user_get(&self, user_id: u64) -> Result<Option<UserRec>, StoreError> {
        self.read(USERS, user_id)
    }

    fn user_put(&self, user_id: u64, rec: &UserRec) -> Result<(), StoreError> {
        self.write(|tx| put_json(tx, USERS, user_id, rec))
    }

    fn user_by_phone_key(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PHONES)?;
        Ok(t.get(key)?.map(|g| g.value()))
    }

    fn device_create(&self, user_id: u64, rec: &DeviceRec) -> Result<u32, StoreError> {
        self.write(|tx| {
            let Some(mut user) = get_json::<_, UserRec>(tx, USERS, user_id)? else {
                return Err(StoreError(format!("no user {user_id}")));
            };
            user.next_device_id = user.next_device_id.max(1);
            let id = user.next_device_id;
            user.next_device_id += 1;
            put_json(tx, USERS, user_id, &user)?;
            put_json(tx, DEVICES, (user_id, id), rec)?;
            Ok(id)
        })
    }

    fn devices(&self, user_id: u64) -> Result<Vec<(u32, DeviceRec)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEVICES)?;
        let mut out = Vec::new();
        for row in t.range((user_id, 0)..=(user_id, u32::MAX))? {
            let (k, v) = row?;
            out.push((k.value().1, serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    fn device_remove(&self, user_id: u64, device_id: u32) -> Result<Option<Vec<u64>>, StoreError> {
        self.write(|tx| {
            if tx
                .open_table(DEVICES)?
                .remove((user_id, device_id))?
                .is_none()
            {
                return Ok(None);
            }
            let mut revoked = Vec::new();
            let mut sessions = tx.open_table(SESSIONS)?;
            let mut changed = Vec::new();
            for row in sessions.iter()? {
                let (k, v) = row?;
                let mut s: SessionRec = serde_json::from_slice(v.value())?;
                if s.user_id == user_id && s.device_id == device_id && !s.revoked {
                    s.revoked = true;
                    changed.push((k.value(), serde_json::to_vec(&s)?));
                }
            }
            for (k, v) in changed {
                sessions.insert(k, v.as_slice())?;
                revoked.push(k);
            }
            Ok(Some(revoked))
        })
    }

    fn session_create(&self, rec: &SessionRec) -> Result<u64, StoreError> {
        self.write(|tx| {
            let id = next_id(tx, "session")?;
            put_json(tx, SESSIONS, id, rec)?;
            tx.open_table(REFRESH)?
                .insert(rec.refresh_sha256.as_str(), (id, true))?;
            Ok(id)
        })
    }

    fn session_get(&self, session_id: u64) -> Result<Option<SessionRec>, StoreError> {
        self.read(SESSIONS, session_id)
    }

    fn session_revoke(&self, session_id: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let Some(mut s) = get_json::<_, SessionRec>(tx, SESSIONS, session_id)? else {
                return Ok(false);
            };
            s.revoked = true;
            put_json(tx, SESSIONS, session_id, &s)?;
            Ok(true)
        })
    }

    fn refresh_rotate(
        &self,
        old: &str,
        new: &str,
        new_expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<RotateOutcome, StoreError> {
        self.write(|tx| {
            let entry = tx.open_table(REFRESH)?.get(old)?.map(|g| g.value());
            let Some((sid, current)) = entry else {
                return Ok(RotateOutcome::Unknown);
            };
            let Some(mut s) = get_json::<_, SessionRec>(tx, SESSIONS, sid)? else {
                return Ok(RotateOutcome::Unknown);
            };
            if s.revoked {
                return Ok(RotateOutcome::Revoked);
            }
            if !current {
                s.revoked = true;
                put_json(tx, SESSIONS, sid, &s)?;
                return Ok(RotateOutcome::Reused(sid));
            }
            if s.refresh_expires_at_ms <= now_ms {
                return Ok(RotateOutcome::Expired);
            }
            let mut t = tx.open_table(REFRESH)?;
            t.insert(old, (sid, false))?;
            t.insert(new, (sid, true))?;
            drop(t);
            s.refresh_sha256 = new.to_owned();
            s.refresh_expires_at_ms = new_expires_at_ms;
            put_json(tx, SESSIONS, sid, &s)?;
            Ok(RotateOutcome::Rotated(
                sid,
                Box::new(SessionRecView {
                    user_id: s.user_id,
                    device_id: s.device_id,
                }),
            ))
        })
    }
}
