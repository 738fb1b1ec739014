//! Accounts in the metadata store: users, sign-in identifiers, devices, sessions and their
//! refresh tokens, pending one-time codes and the durable rate-limit windows of the accounts
//! front door, behind one trait ([`AccountStore`]) that every metadata backend implements. The
//! embedded backend implements it on `meta.redb` ([`EmbeddedMeta`]), so the [`User`] the router
//! reads for conversation titles is the account itself: there is no second copy to keep in step.
//!
//! Every method is one atomic transaction, durable (fsync'ed) before it returns when it writes;
//! one that changes nothing commits nothing (no fsync), so a refused guess at an unknown
//! identifier costs a read. All of them block: call them from the accounts' blocking pool (or,
//! for the password lookup of a login, the hashing pool), never from a shard thread.
//!
//! Records of this module beyond [`crate::meta`]'s ([`User`], [`IdentIndex`], [`Device`],
//! [`Session`], [`OtpRecord`], [`ContactIndex`]): [`RefreshToken`], [`DeviceSession`],
//! [`RateWindow`] and [`Counter`].

use redb::{ReadableTable, WriteTransaction};

use crate::error::StorageError;
use crate::meta::{
    AccountFields, ContactIndex, Device, EmbeddedMeta, IdentIndex, MetadataStore, OtpRecord,
    PushToken, Reader, Record, Session, User, Writer, decode, encode, keys, table,
};
use crate::types::{DeviceId, TimestampMs, UserId};

// ---------------------------------------------------------------------------------------------
// records

/// A refresh token's hash → its session, and whether it is the session's current token (a
/// replaced token presented again revokes the session). Key: the SHA-256 of the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshToken {
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// Its session.
    pub session: u64,
    /// Still the session's current token.
    pub current: bool,
}

impl Record for RefreshToken {
    const TABLE: &'static str = "refresh_tokens";
    fn key(&self) -> Vec<u8> {
        self.hash.to_vec()
    }
    fn encode(&self, w: &mut Writer) {
        w.raw(&self.hash)
            .u64(self.session)
            .u8(u8::from(self.current));
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        Ok(RefreshToken {
            hash: r.arr32()?,
            session: r.u64()?,
            current: r.bool()?,
        })
    }
}

/// A session of a device (the index that revokes a removed device's sessions). Key: user ‖
/// device ‖ session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSession {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The session.
    pub session: u64,
}

impl Record for DeviceSession {
    const TABLE: &'static str = "device_sessions";
    fn key(&self) -> Vec<u8> {
        let mut k = keys::device(self.user, self.device);
        k.extend_from_slice(&self.session.to_be_bytes());
        k
    }
    fn encode(&self, w: &mut Writer) {
        w.u64(self.user.0).u32(self.device.0).u64(self.session);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        Ok(DeviceSession {
            user: UserId(r.u64()?),
            device: DeviceId(r.u32()?),
            session: r.u64()?,
        })
    }
}

/// A durable rate-limit window of the accounts front door (one-time codes per IP and per
/// identifier, failed passwords per identifier). Key: the limiter's key. Bounded by the
/// limiter (`accounts.rate_windows_max`), which deletes the rows it drops; ended windows are
/// deleted at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateWindow {
    /// The limiter's key (`otp-ip:10.0.0.1`, ...).
    pub key: String,
    /// When its first event happened (Unix ms).
    pub start_ms: u64,
    /// How long it lasts.
    pub window_ms: u64,
    /// Events counted in it.
    pub count: u32,
}

impl Record for RateWindow {
    const TABLE: &'static str = "rate_windows";
    fn key(&self) -> Vec<u8> {
        self.key.as_bytes().to_vec()
    }
    fn encode(&self, w: &mut Writer) {
        w.bytes(self.key.as_bytes())
            .u64(self.start_ms)
            .u64(self.window_ms)
            .u32(self.count);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        Ok(RateWindow {
            key: r.string()?,
            start_ms: r.u64()?,
            window_ms: r.u64()?,
            count: r.u32()?,
        })
    }
}

/// A named counter: the next id to hand out (`user`, `session`), or a marker
/// ([`ACCOUNTS_IMPORTED`]). Key: the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The name.
    pub name: String,
    /// The next value.
    pub next: u64,
}

impl Record for Counter {
    const TABLE: &'static str = "counters";
    fn key(&self) -> Vec<u8> {
        self.name.as_bytes().to_vec()
    }
    fn encode(&self, w: &mut Writer) {
        w.bytes(self.name.as_bytes()).u64(self.next);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        Ok(Counter {
            name: r.string()?,
            next: r.u64()?,
        })
    }
}

/// The counter naming the next user id.
pub const USER_IDS: &str = "user";
/// The counter naming the next session id.
pub const SESSION_IDS: &str = "session";
/// The marker written, in the same transaction, with the accounts imported from a data dir's
/// former `accounts.redb` (its value: when, Unix ms).
pub const ACCOUNTS_IMPORTED: &str = "accounts_imported";

// ---------------------------------------------------------------------------------------------
// the trait

/// What storing a new one-time code did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtpIssue {
    /// Stored (replacing any earlier code for the identifier).
    Issued,
    /// Not stored: a live code was sent less than the resend interval ago; a new one can be
    /// requested in this many ms.
    TooSoon(u64),
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
    /// Rotated; the session as it now is.
    Rotated(Box<Session>),
    /// The token was already used: this session is now revoked.
    Reused(u64),
    /// The session is revoked.
    Revoked,
    /// The token expired.
    Expired,
    /// Not a token we issued.
    Unknown,
}

/// The durable rate-limit windows to write with a change: rows to put, keys to delete.
pub type WindowWrites = (Vec<RateWindow>, Vec<String>);

/// A new device's session: what [`AccountStore::sign_in`] creates.
#[derive(Debug, Clone)]
pub struct SignIn<'a> {
    /// The user.
    pub user: UserId,
    /// The new device's name.
    pub device_name: &'a str,
    /// The new device's platform.
    pub platform: &'a str,
    /// SHA-256 of the session's first refresh token.
    pub refresh_hash: [u8; 32],
    /// When that token expires.
    pub refresh_expires: TimestampMs,
    /// Now (the device's creation and last-seen time).
    pub now: TimestampMs,
}

/// Account state, one atomic and durable transaction per method (see the module's docs for
/// where they may run).
pub trait AccountStore: Send + Sync + std::fmt::Debug {
    /// Stores `rec` as the pending code for `rec.ident` unless a live code was sent less than
    /// `resend_ms` before `now_ms`. With it, in the same transaction, writes the rate-limit
    /// windows `windows` returns (called only once the code is certain to be stored).
    fn otp_issue(
        &self,
        rec: &OtpRecord,
        resend_ms: u64,
        now_ms: u64,
        windows: &dyn Fn() -> WindowWrites,
    ) -> Result<OtpIssue, StorageError>;
    /// Checks a guess atomically: consumes the code when `matches` says so, otherwise spends
    /// one attempt.
    fn otp_consume(
        &self,
        ident: &str,
        now_ms: u64,
        matches: &dyn Fn(&OtpRecord) -> bool,
    ) -> Result<OtpOutcome, StorageError>;
    /// The user registered under `ident`.
    fn user_by_ident(&self, ident: &str) -> Result<Option<UserId>, StorageError>;
    /// Creates `user` (its id is assigned here) under `ident` unless one exists, indexed for
    /// contact discovery under `phone_key`; returns (id, created).
    fn user_create(
        &self,
        ident: &str,
        user: &User,
        phone_key: Option<&[u8; 32]>,
    ) -> Result<(UserId, bool), StorageError>;
    /// Reads a user.
    fn user_get(&self, user: UserId) -> Result<Option<User>, StorageError>;
    /// Changes a user with `f` (read, changed and written in one transaction, so two changes
    /// of one user at once both land); returns the user as written, `None` if there is none.
    fn user_update(
        &self,
        user: UserId,
        f: &dyn Fn(&mut User),
    ) -> Result<Option<User>, StorageError>;
    /// The user whose phone key (HMAC(pepper, SHA-256(E.164))) is this.
    fn user_by_phone_key(&self, key: &[u8; 32]) -> Result<Option<UserId>, StorageError>;
    /// Adds a device and its first session; returns (device id, session id).
    fn sign_in(&self, s: &SignIn<'_>) -> Result<(DeviceId, u64), StorageError>;
    /// The user's devices, by id.
    fn devices(&self, user: UserId) -> Result<Vec<Device>, StorageError>;
    /// Removes a device (and its push token) and revokes its sessions (returned); `None` if
    /// there is no such device.
    fn device_remove(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<Vec<u64>>, StorageError>;
    /// Raises the last-seen times of these devices (never lowers one; skips removed devices),
    /// in one transaction.
    fn devices_seen(&self, seen: &[(UserId, DeviceId, TimestampMs)]) -> Result<(), StorageError>;
    /// Reads a session.
    fn session_get(&self, session: u64) -> Result<Option<Session>, StorageError>;
    /// Revokes a session; false if unknown.
    fn session_revoke(&self, session: u64) -> Result<bool, StorageError>;
    /// Presents refresh token `old` (its SHA-256); on success it is replaced by `new`, which
    /// expires at `new_expires`.
    fn refresh_rotate(
        &self,
        old: &[u8; 32],
        new: &[u8; 32],
        new_expires: TimestampMs,
        now_ms: u64,
    ) -> Result<RotateOutcome, StorageError>;
    /// Registers `token` as its device's push token, replacing the one it had; false (nothing
    /// written) if the device does not exist (removed meanwhile).
    fn push_token_set(&self, token: &PushToken) -> Result<bool, StorageError>;
    /// Forgets a device's push token; false (nothing written) if it had none.
    fn push_token_remove(&self, user: UserId, device: DeviceId) -> Result<bool, StorageError>;
    /// A device's push token.
    fn push_token(&self, user: UserId, device: DeviceId)
    -> Result<Option<PushToken>, StorageError>;
    /// Every durable rate-limit window.
    fn windows_load(&self) -> Result<Vec<RateWindow>, StorageError>;
    /// Puts and deletes durable rate-limit windows.
    fn windows_write(&self, rows: &[RateWindow], deletes: &[String]) -> Result<(), StorageError>;
}

// ---------------------------------------------------------------------------------------------
// the embedded backend

fn get_in<R: Record>(tx: &WriteTransaction, key: &[u8]) -> Result<Option<R>, StorageError> {
    let t = tx.open_table(table(R::TABLE))?;
    let v = t.get(key)?;
    match v {
        Some(g) => Ok(Some(decode(g.value())?)),
        None => Ok(None),
    }
}

fn put_in<R: Record>(tx: &WriteTransaction, rec: &R) -> Result<(), StorageError> {
    tx.open_table(table(R::TABLE))?
        .insert(rec.key().as_slice(), encode(rec).as_slice())?;
    Ok(())
}

fn delete_in<R: Record>(tx: &WriteTransaction, key: &[u8]) -> Result<bool, StorageError> {
    Ok(tx.open_table(table(R::TABLE))?.remove(key)?.is_some())
}

fn next_id(tx: &WriteTransaction, name: &str) -> Result<u64, StorageError> {
    let next = get_in::<Counter>(tx, name.as_bytes())?.map_or(1, |c| c.next);
    put_in(
        tx,
        &Counter {
            name: name.to_owned(),
            next: next + 1,
        },
    )?;
    Ok(next)
}

fn put_windows(
    tx: &WriteTransaction,
    rows: &[RateWindow],
    deletes: &[String],
) -> Result<(), StorageError> {
    for k in deletes {
        delete_in::<RateWindow>(tx, k.as_bytes())?;
    }
    for w in rows {
        put_in(tx, w)?;
    }
    Ok(())
}

/// Revokes a session; its device's push token goes with it (nobody is signed in there any
/// more to be woken).
fn revoke_in(tx: &WriteTransaction, s: &mut Session) -> Result<(), StorageError> {
    s.revoked = true;
    delete_in::<PushToken>(tx, &keys::device(s.user, s.device))?;
    put_in(tx, s)
}

impl EmbeddedMeta {
    /// Runs `f` in one write transaction, committed (durably) if it returns `Ok(Some(_))`,
    /// aborted (nothing written, no fsync) if `Ok(None)` with `unchanged` as the answer.
    fn account_write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<Result<T, T>, StorageError>,
    ) -> Result<T, StorageError> {
        self.watch(|| {
            let tx = self.write_txn()?;
            match f(&tx)? {
                Ok(v) => {
                    tx.commit()?;
                    Ok(v)
                }
                Err(v) => {
                    tx.abort()?;
                    Ok(v)
                }
            }
        })
    }
}

impl AccountStore for EmbeddedMeta {
    fn otp_issue(
        &self,
        rec: &OtpRecord,
        resend_ms: u64,
        now_ms: u64,
        windows: &dyn Fn() -> WindowWrites,
    ) -> Result<OtpIssue, StorageError> {
        self.account_write(|tx| {
            if let Some(prev) = get_in::<OtpRecord>(tx, rec.ident.as_bytes())?
                && prev.expires_ms.0 > now_ms
                && prev.created_ms.0.saturating_add(resend_ms) > now_ms
            {
                let wait = prev.created_ms.0.saturating_add(resend_ms) - now_ms;
                return Ok(Err(OtpIssue::TooSoon(wait)));
            }
            put_in(tx, rec)?;
            let (rows, deletes) = windows();
            put_windows(tx, &rows, &deletes)?;
            Ok(Ok(OtpIssue::Issued))
        })
    }

    fn otp_consume(
        &self,
        ident: &str,
        now_ms: u64,
        matches: &dyn Fn(&OtpRecord) -> bool,
    ) -> Result<OtpOutcome, StorageError> {
        self.account_write(|tx| {
            let Some(mut rec) = get_in::<OtpRecord>(tx, ident.as_bytes())? else {
                return Ok(Err(OtpOutcome::Expired));
            };
            if rec.expires_ms.0 <= now_ms {
                delete_in::<OtpRecord>(tx, ident.as_bytes())?;
                return Ok(Ok(OtpOutcome::Expired));
            }
            if rec.attempts_left == 0 {
                return Ok(Err(OtpOutcome::Exhausted));
            }
            if matches(&rec) {
                delete_in::<OtpRecord>(tx, ident.as_bytes())?;
                return Ok(Ok(OtpOutcome::Accepted));
            }
            rec.attempts_left -= 1;
            put_in(tx, &rec)?;
            Ok(Ok(OtpOutcome::Wrong(rec.attempts_left)))
        })
    }

    fn user_by_ident(&self, ident: &str) -> Result<Option<UserId>, StorageError> {
        Ok(self.get::<IdentIndex>(ident.as_bytes())?.map(|i| i.user))
    }

    fn user_create(
        &self,
        ident: &str,
        user: &User,
        phone_key: Option<&[u8; 32]>,
    ) -> Result<(UserId, bool), StorageError> {
        self.account_write(|tx| {
            if let Some(i) = get_in::<IdentIndex>(tx, ident.as_bytes())? {
                return Ok(Err((i.user, false)));
            }
            let id = UserId(next_id(tx, USER_IDS)?);
            put_in(
                tx,
                &IdentIndex {
                    ident: ident.to_owned(),
                    user: id,
                },
            )?;
            if let Some(k) = phone_key {
                put_in(
                    tx,
                    &ContactIndex {
                        phone_hmac: *k,
                        user: id,
                    },
                )?;
            }
            let mut u = user.clone();
            u.id = id;
            let a = u.account.get_or_insert_with(AccountFields::default);
            a.next_device_id = a.next_device_id.max(1);
            put_in(tx, &u)?;
            Ok(Ok((id, true)))
        })
    }

    fn user_get(&self, user: UserId) -> Result<Option<User>, StorageError> {
        self.get::<User>(&keys::user(user))
    }

    fn user_update(
        &self,
        user: UserId,
        f: &dyn Fn(&mut User),
    ) -> Result<Option<User>, StorageError> {
        self.account_write(|tx| {
            let Some(mut u) = get_in::<User>(tx, &keys::user(user))? else {
                return Ok(Err(None));
            };
            f(&mut u);
            u.id = user;
            put_in(tx, &u)?;
            Ok(Ok(Some(u)))
        })
    }

    fn user_by_phone_key(&self, key: &[u8; 32]) -> Result<Option<UserId>, StorageError> {
        Ok(self.get::<ContactIndex>(key)?.map(|c| c.user))
    }

    fn sign_in(&self, s: &SignIn<'_>) -> Result<(DeviceId, u64), StorageError> {
        self.account_write(|tx| {
            let Some(mut user) = get_in::<User>(tx, &keys::user(s.user))? else {
                return Err(StorageError::Unavailable(format!("no user {}", s.user.0)));
            };
            let a = user.account.get_or_insert_with(AccountFields::default);
            let device = DeviceId(a.next_device_id.max(1));
            a.next_device_id = device.0 + 1;
            put_in(tx, &user)?;
            put_in(
                tx,
                &Device {
                    user: s.user,
                    device,
                    name: s.device_name.to_owned(),
                    platform: s.platform.to_owned(),
                    identity_key: Vec::new(),
                    created_ms: s.now,
                    last_seen_ms: s.now,
                },
            )?;
            let session = next_id(tx, SESSION_IDS)?;
            put_in(
                tx,
                &Session {
                    id: session,
                    user: s.user,
                    device,
                    refresh_token_hash: s.refresh_hash,
                    created_ms: s.now,
                    expires_ms: s.refresh_expires,
                    revoked: false,
                },
            )?;
            put_in(
                tx,
                &RefreshToken {
                    hash: s.refresh_hash,
                    session,
                    current: true,
                },
            )?;
            put_in(
                tx,
                &DeviceSession {
                    user: s.user,
                    device,
                    session,
                },
            )?;
            Ok(Ok((device, session)))
        })
    }

    fn devices(&self, user: UserId) -> Result<Vec<Device>, StorageError> {
        self.scan::<Device>(&keys::user(user), usize::MAX)
    }

    fn device_remove(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<Vec<u64>>, StorageError> {
        self.account_write(|tx| {
            if !delete_in::<Device>(tx, &keys::device(user, device))? {
                return Ok(Err(None));
            }
            delete_in::<PushToken>(tx, &keys::device(user, device))?;
            let prefix = keys::device(user, device);
            let mut found = Vec::new();
            {
                let t = tx.open_table(table(DeviceSession::TABLE))?;
                for item in t.range(prefix.as_slice()..)? {
                    let (k, v) = item?;
                    if !k.value().starts_with(&prefix) {
                        break;
                    }
                    found.push(decode::<DeviceSession>(v.value())?);
                }
            }
            let mut revoked = Vec::new();
            for ds in found {
                delete_in::<DeviceSession>(tx, &ds.key())?;
                if let Some(mut s) = get_in::<Session>(tx, &ds.session.to_be_bytes())?
                    && !s.revoked
                {
                    revoke_in(tx, &mut s)?;
                    revoked.push(ds.session);
                }
            }
            Ok(Ok(Some(revoked)))
        })
    }

    fn devices_seen(&self, seen: &[(UserId, DeviceId, TimestampMs)]) -> Result<(), StorageError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.account_write(|tx| {
            let mut changed = false;
            for &(user, device, at) in seen {
                if let Some(mut d) = get_in::<Device>(tx, &keys::device(user, device))?
                    && at > d.last_seen_ms
                {
                    d.last_seen_ms = at;
                    put_in(tx, &d)?;
                    changed = true;
                }
            }
            Ok(if changed { Ok(()) } else { Err(()) })
        })
    }

    fn push_token_set(&self, token: &PushToken) -> Result<bool, StorageError> {
        self.account_write(|tx| {
            if get_in::<Device>(tx, &keys::device(token.user, token.device))?.is_none() {
                return Ok(Err(false));
            }
            put_in(tx, token)?;
            Ok(Ok(true))
        })
    }

    fn push_token_remove(&self, user: UserId, device: DeviceId) -> Result<bool, StorageError> {
        self.account_write(|tx| {
            Ok(
                if delete_in::<PushToken>(tx, &keys::device(user, device))? {
                    Ok(true)
                } else {
                    Err(false)
                },
            )
        })
    }

    fn push_token(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<PushToken>, StorageError> {
        self.get::<PushToken>(&keys::device(user, device))
    }

    fn session_get(&self, session: u64) -> Result<Option<Session>, StorageError> {
        self.get::<Session>(&session.to_be_bytes())
    }

    fn session_revoke(&self, session: u64) -> Result<bool, StorageError> {
        self.account_write(|tx| match get_in::<Session>(tx, &session.to_be_bytes())? {
            Some(mut s) => {
                revoke_in(tx, &mut s)?;
                Ok(Ok(true))
            }
            None => Ok(Err(false)),
        })
    }

    fn refresh_rotate(
        &self,
        old: &[u8; 32],
        new: &[u8; 32],
        new_expires: TimestampMs,
        now_ms: u64,
    ) -> Result<RotateOutcome, StorageError> {
        self.account_write(|tx| {
            let Some(token) = get_in::<RefreshToken>(tx, old)? else {
                return Ok(Err(RotateOutcome::Unknown));
            };
            let Some(mut s) = get_in::<Session>(tx, &token.session.to_be_bytes())? else {
                return Ok(Err(RotateOutcome::Unknown));
            };
            if s.revoked {
                return Ok(Err(RotateOutcome::Revoked));
            }
            if !token.current {
                revoke_in(tx, &mut s)?;
                return Ok(Ok(RotateOutcome::Reused(s.id)));
            }
            if s.expires_ms.0 <= now_ms {
                return Ok(Err(RotateOutcome::Expired));
            }
            put_in(
                tx,
                &RefreshToken {
                    current: false,
                    ..token
                },
            )?;
            put_in(
                tx,
                &RefreshToken {
                    hash: *new,
                    session: s.id,
                    current: true,
                },
            )?;
            s.refresh_token_hash = *new;
            s.expires_ms = new_expires;
            put_in(tx, &s)?;
            Ok(Ok(RotateOutcome::Rotated(Box::new(s))))
        })
    }

    fn windows_load(&self) -> Result<Vec<RateWindow>, StorageError> {
        self.scan::<RateWindow>(&[], usize::MAX)
    }

    fn windows_write(&self, rows: &[RateWindow], deletes: &[String]) -> Result<(), StorageError> {
        if rows.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        self.account_write(|tx| {
            put_windows(tx, rows, deletes)?;
            Ok(Ok(()))
        })
    }
}

#[cfg(test)]
mod tests;
