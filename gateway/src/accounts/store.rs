//! Account state behind a narrow trait ([`AccountStore`]), with a redb
//! implementation ([`RedbAccountStore`], immediate durability).
//!
//! `starling-storage` will own the metadata store; until its API lands on
//! main, the gateway keeps this small store of its own. Swapping it means
//! implementing [`AccountStore`] on top of the storage crate.

use std::path::Path;

use redb::{
    ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _, TableDefinition,
};
use serde::{Deserialize, Serialize};

use super::limits::{Window, WindowRow};

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
    /// Guesses left (each VerifyOtp or Login with a code spends one).
    pub attempts_left: u32,
    /// When it was sent.
    pub sent_at_ms: u64,
}

/// What storing a new code did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtpIssue {
    /// Stored (replacing any earlier code for the identifier).
    Issued,
    /// Not stored: a live code was sent less than the resend interval ago;
    /// a new one can be requested in this many ms.
    TooSoon(u64),
}

/// The durable rate-limit windows to write: rows to put, keys to delete.
pub type WindowWrites = (Vec<WindowRow>, Vec<String>);

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
/// blocking and run on the blocking pool (or, for the password lookups of a
/// login, the hashing pool), never on a shard thread.
pub trait AccountStore: Send + Sync + std::fmt::Debug {
    /// Stores `rec` as the pending code for `ident` unless a live code was
    /// sent less than `resend_ms` before `now_ms`. With it, in the same
    /// transaction, writes the rate-limit windows `windows` returns (called
    /// only once the code is certain to be stored).
    fn otp_issue(
        &self,
        ident: &str,
        rec: &OtpRec,
        resend_ms: u64,
        now_ms: u64,
        windows: &dyn Fn() -> WindowWrites,
    ) -> Result<OtpIssue, StoreError>;
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
    /// Every durable rate-limit window.
    fn windows_load(&self) -> Result<Vec<WindowRow>, StoreError>;
    /// Puts and deletes durable rate-limit windows.
    fn windows_write(&self, rows: &[WindowRow], deletes: &[String]) -> Result<(), StoreError>;
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
/// Rate-limit window key → (start ms, window ms, count). Bounded: the
/// limiter keeps at most `accounts.rate_windows_max` and deletes the rows it
/// drops; ended windows are deleted at start-up.
const WINDOWS: TableDefinition<'_, &str, (u64, u64, u32)> = TableDefinition::new("rate_windows");

fn put_windows(
    tx: &redb::WriteTransaction,
    (rows, deletes): (&[WindowRow], &[String]),
) -> Result<(), StoreError> {
    if rows.is_empty() && deletes.is_empty() {
        return Ok(());
    }
    let mut t = tx.open_table(WINDOWS)?;
    for k in deletes {
        t.remove(k.as_str())?;
    }
    for (k, w) in rows {
        t.insert(k.as_str(), (w.start_ms, w.window_ms, w.count))?;
    }
    Ok(())
}

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
        tx.open_table(WINDOWS)?;
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
    fn otp_issue(
        &self,
        ident: &str,
        rec: &OtpRec,
        resend_ms: u64,
        now_ms: u64,
        windows: &dyn Fn() -> WindowWrites,
    ) -> Result<OtpIssue, StoreError> {
        let tx = self.db.begin_write()?;
        if let Some(prev) = get_json::<_, OtpRec>(&tx, OTPS, ident)?
            && prev.expires_at_ms > now_ms
            && prev.sent_at_ms.saturating_add(resend_ms) > now_ms
        {
            // Nothing written.
            tx.abort()?;
            return Ok(OtpIssue::TooSoon(
                prev.sent_at_ms.saturating_add(resend_ms) - now_ms,
            ));
        }
        put_json(&tx, OTPS, ident, rec)?;
        let (rows, deletes) = windows();
        put_windows(&tx, (&rows, &deletes))?;
        tx.commit()?;
        Ok(OtpIssue::Issued)
    }

    fn otp_consume(
        &self,
        ident: &str,
        now_ms: u64,
        matches: &dyn Fn(&OtpRec) -> bool,
    ) -> Result<OtpOutcome, StoreError> {
        let tx = self.db.begin_write()?;
        let Some(mut rec) = get_json::<_, OtpRec>(&tx, OTPS, ident)? else {
            // Nothing changes: aborted, not committed (no fsync), so guesses at
            // identifiers without a code cost a read.
            tx.abort()?;
            return Ok(OtpOutcome::Expired);
        };
        let outcome = if rec.expires_at_ms <= now_ms {
            tx.open_table(OTPS)?.remove(ident)?;
            OtpOutcome::Expired
        } else if rec.attempts_left == 0 {
            tx.abort()?;
            return Ok(OtpOutcome::Exhausted);
        } else if matches(&rec) {
            tx.open_table(OTPS)?.remove(ident)?;
            OtpOutcome::Accepted
        } else {
            rec.attempts_left -= 1;
            put_json(&tx, OTPS, ident, &rec)?;
            OtpOutcome::Wrong(rec.attempts_left)
        };
        tx.commit()?;
        Ok(outcome)
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

    fn windows_load(&self) -> Result<Vec<WindowRow>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(WINDOWS)?;
        let mut out = Vec::with_capacity(usize::try_from(t.len()?).unwrap_or(0));
        for row in t.iter()? {
            let (k, v) = row?;
            let (start_ms, window_ms, count) = v.value();
            out.push((
                k.value().to_owned(),
                Window {
                    start_ms,
                    window_ms,
                    count,
                },
            ));
        }
        Ok(out)
    }

    fn windows_write(&self, rows: &[WindowRow], deletes: &[String]) -> Result<(), StoreError> {
        if rows.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        self.write(|tx| put_windows(tx, (rows, deletes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sent_at_ms: u64) -> OtpRec {
        OtpRec {
            mac: "00".into(),
            expires_at_ms: sent_at_ms + 300_000,
            attempts_left: 5,
            sent_at_ms,
        }
    }

    fn window(start_ms: u64, count: u32) -> Window {
        Window {
            start_ms,
            window_ms: 3_600_000,
            count,
        }
    }

    #[test]
    fn a_code_and_its_rate_limit_windows_are_written_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.redb");
        let store = RedbAccountStore::open(&path).unwrap();
        let rows = || {
            (
                vec![
                    ("otp-ip:10.0.0.1".to_owned(), window(1000, 1)),
                    ("otp-ident:email:a@x.org".to_owned(), window(1000, 1)),
                ],
                Vec::new(),
            )
        };
        assert_eq!(
            store
                .otp_issue("email:a@x.org", &rec(1000), 30_000, 1000, &rows)
                .unwrap(),
            OtpIssue::Issued
        );
        // Within the resend interval: refused, and the windows are not asked for.
        let never = || -> WindowWrites { panic!("windows written for a refused code") };
        assert_eq!(
            store
                .otp_issue("email:a@x.org", &rec(21_000), 30_000, 21_000, &never)
                .unwrap(),
            OtpIssue::TooSoon(10_000)
        );
        // After it: stored again, and a window is replaced while another is deleted.
        let more = || {
            (
                vec![("otp-ip:10.0.0.1".to_owned(), window(1000, 2))],
                vec!["otp-ident:email:a@x.org".to_owned()],
            )
        };
        assert_eq!(
            store
                .otp_issue("email:a@x.org", &rec(31_000), 30_000, 31_000, &more)
                .unwrap(),
            OtpIssue::Issued
        );
        drop(store);
        // Durable: a reopened store has them.
        let store = RedbAccountStore::open(&path).unwrap();
        assert_eq!(
            store.windows_load().unwrap(),
            vec![("otp-ip:10.0.0.1".to_owned(), window(1000, 2))]
        );
        store
            .windows_write(
                &[("password-failures:email:a@x.org".to_owned(), window(5, 3))],
                &["otp-ip:10.0.0.1".to_owned()],
            )
            .unwrap();
        assert_eq!(
            store.windows_load().unwrap(),
            vec![("password-failures:email:a@x.org".to_owned(), window(5, 3))]
        );
    }
}
