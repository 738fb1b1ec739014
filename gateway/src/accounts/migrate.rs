//! Start-up migration of a data dir made before the one account store:
//! releases up to then kept accounts in `<data>/accounts.redb` (JSON
//! records in redb tables of the gateway's own), beside `meta.redb`'s
//! copy of each user's name. [`run`] moves every record of the old file
//! into the metadata store — users, identifiers, phone keys, devices,
//! sessions, refresh tokens, pending codes, the counters and the
//! rate-limit windows — in **one** transaction together with a marker
//! ([`ACCOUNTS_IMPORTED`]), then renames the old file to
//! `accounts.redb.migrated` (never deletes it) and fsyncs the directory.
//!
//! Crash safety: a crash before the commit leaves nothing imported and the
//! old file in place, so the next start does it all again; a crash after the
//! commit and before the rename leaves the marker, so the next start only
//! renames. The old file is never written.
//!
//! Refused, with an error naming what to do: an old file that cannot be
//! read, one whose records are damaged, a metadata store that already holds
//! accounts of its own (both would be the truth), and an old file whose
//! `.migrated` name is taken.
//!
//! The old format's reader lives here and nowhere else.

use std::path::Path;

use anyhow::{Context as _, bail};
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use starling_storage::accounts::{
    ACCOUNTS_IMPORTED, Counter, DeviceSession, RateWindow, RefreshToken,
};
use starling_storage::meta::{
    AccountFields, ContactIndex, Device, IdentIndex, OtpRecord, Session, User,
};
use starling_storage::{
    DeviceId, EmbeddedMeta, MetaBatch, MetadataStore as _, TimestampMs, UserId,
};

/// The old file's name in the data dir.
pub const OLD_FILE: &str = "accounts.redb";
/// What it is renamed to once its records are in the metadata store.
pub const MOVED_FILE: &str = "accounts.redb.migrated";

/// The old format: a user.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OldUser {
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

/// The old format: a device.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OldDevice {
    /// Name.
    pub name: String,
    /// Platform.
    pub platform: String,
    /// Registration time.
    pub created_at_ms: u64,
    /// Last connection time.
    pub last_seen_ms: u64,
}

/// The old format: a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OldSession {
    /// The user.
    pub user_id: u64,
    /// The device.
    pub device_id: u32,
    /// Creation time.
    pub created_at_ms: u64,
    /// Revoked.
    pub revoked: bool,
    /// SHA-256 (hex) of the current refresh token.
    pub refresh_sha256: String,
    /// When the current refresh token expires.
    pub refresh_expires_at_ms: u64,
}

/// The old format: a pending code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OldOtp {
    /// HMAC-SHA256(secret, identifier ‖ code), hex.
    pub mac: String,
    /// Expiry.
    pub expires_at_ms: u64,
    /// Guesses left.
    pub attempts_left: u32,
    /// When it was sent.
    pub sent_at_ms: u64,
}

/// The old format's tables.
pub mod tables {
    use redb::TableDefinition;

    /// Identifier → pending code (JSON).
    pub const OTPS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("otps");
    /// Identifier → user.
    pub const IDENTS: TableDefinition<'_, &str, u64> = TableDefinition::new("idents");
    /// User → user (JSON).
    pub const USERS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("users");
    /// Phone key → user.
    pub const PHONES: TableDefinition<'_, &[u8], u64> = TableDefinition::new("phone_keys");
    /// (user, device) → device (JSON).
    pub const DEVICES: TableDefinition<'_, (u64, u32), &[u8]> = TableDefinition::new("devices");
    /// Session → session (JSON).
    pub const SESSIONS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("sessions");
    /// Refresh SHA-256 hex → (session, current).
    pub const REFRESH: TableDefinition<'_, &str, (u64, bool)> =
        TableDefinition::new("refresh_tokens");
    /// Counter name → next value.
    pub const COUNTERS: TableDefinition<'_, &str, u64> = TableDefinition::new("counters");
    /// Window key → (start ms, window ms, count).
    pub const WINDOWS: TableDefinition<'_, &str, (u64, u64, u32)> =
        TableDefinition::new("rate_windows");
}
use tables::*;

/// What [`run`] moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Moved {
    /// Users.
    pub users: usize,
    /// Devices.
    pub devices: usize,
    /// Sessions.
    pub sessions: usize,
    /// Everything else (identifiers, phone keys, refresh tokens, codes, counters, windows).
    pub other: usize,
}

/// Migrates `<data_dir>/accounts.redb` into `meta`, if there is one.
/// Returns the one line to print about it (`None`: nothing to migrate).
///
/// # Errors
/// The migration is refused (see the module's docs); the message says what
/// to do. Nothing is changed then.
pub fn run(data_dir: &Path, meta: &EmbeddedMeta) -> anyhow::Result<Option<String>> {
    let old = data_dir.join(OLD_FILE);
    if !old.exists() {
        return Ok(None);
    }
    let moved_to = data_dir.join(MOVED_FILE);
    if moved_to.exists() {
        bail!(
            "{} and {} are both in the data dir: move one of them out of it (the first holds \
             accounts of a release before the one account store, the second those already \
             moved into meta.redb)",
            old.display(),
            moved_to.display()
        );
    }
    let imported = meta
        .get::<Counter>(ACCOUNTS_IMPORTED.as_bytes())
        .context("reading meta.redb")?
        .is_some();
    let line = if imported {
        // The records went in with the marker; the rename did not happen.
        format!(
            "accounts: {} was already moved into meta.redb; renamed it to {}",
            old.display(),
            moved_to.display()
        )
    } else {
        if !meta
            .scan::<IdentIndex>(&[], 1)
            .context("reading meta.redb")?
            .is_empty()
        {
            bail!(
                "{} holds accounts of a release before the one account store, but meta.redb \
                 already holds accounts of its own: keep one. Move {} out of the data dir to \
                 keep meta.redb's accounts, or restore the meta.redb that came with it.",
                old.display(),
                old.display()
            );
        }
        let (batch, moved) = read_old(&old, now_ms())?;
        meta.commit(&batch)
            .context("writing the moved accounts into meta.redb")?;
        format!(
            "accounts: moved {} users, {} devices, {} sessions and {} other records from {} \
             into meta.redb; the old file is kept as {} (delete it once you no longer need it)",
            moved.users,
            moved.devices,
            moved.sessions,
            moved.other,
            old.display(),
            moved_to.display()
        )
    };
    std::fs::rename(&old, &moved_to)
        .with_context(|| format!("renaming {} to {}", old.display(), moved_to.display()))?;
    crate::fsutil::fsync_dir(data_dir)?;
    Ok(Some(line))
}

fn now_ms() -> u64 {
    crate::clock::unix_ms()
}

fn refuse_damaged(old: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot move the accounts of {} into meta.redb: {what}. Nothing was changed. Restore \
         the file from a backup, or move it out of the data dir to start without those accounts.",
        old.display()
    )
}

fn hash32(old: &Path, hex_str: &str, what: &str) -> anyhow::Result<[u8; 32]> {
    hex::decode(hex_str)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| refuse_damaged(old, format!("{what} {hex_str:?} is not 32 hex bytes")))
}

/// Reads every record of the old file at `old` into one batch (with the
/// marker, stamped `now_ms`).
fn read_old(old: &Path, now_ms: u64) -> anyhow::Result<(MetaBatch, Moved)> {
    let damaged = |e: &dyn std::fmt::Display| refuse_damaged(old, e);
    let db = redb::Database::open(old).map_err(|e| damaged(&e))?;
    let tx = db.begin_read().map_err(|e| damaged(&e))?;
    let mut b = MetaBatch::default();
    let mut moved = Moved::default();
    // Every row of a table (none if the table was never created).
    macro_rules! each {
        ($def:expr, |$k:ident, $v:ident| $body:block) => {
            match tx.open_table($def) {
                Ok(t) => {
                    for r in t.iter().map_err(|e| damaged(&e))? {
                        let ($k, $v) = r.map_err(|e| damaged(&e))?;
                        $body
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(damaged(&e)),
            }
        };
    }
    fn json<T: for<'de> Deserialize<'de>>(table: &str, bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("a record of {table}: {e}"))
    }
    each!(USERS, |k, v| {
        let u: OldUser = json("users", v.value()).map_err(|e| damaged(&e))?;
        b.put(&User {
            id: UserId(k.value()),
            phone_e164: u.phone.unwrap_or_default(),
            display_name: u.display_name,
            password_hash: u.password_hash,
            created_ms: TimestampMs(u.created_at_ms),
            account: Some(AccountFields {
                email: u.email.unwrap_or_default(),
                about: u.about,
                next_device_id: u.next_device_id.max(1),
            }),
        });
        moved.users += 1;
    });
    each!(IDENTS, |k, v| {
        b.put(&IdentIndex {
            ident: k.value().to_owned(),
            user: UserId(v.value()),
        });
        moved.other += 1;
    });
    each!(PHONES, |k, v| {
        let phone_hmac =
            <[u8; 32]>::try_from(k.value()).map_err(|_| damaged(&"a phone key is not 32 bytes"))?;
        b.put(&ContactIndex {
            phone_hmac,
            user: UserId(v.value()),
        });
        moved.other += 1;
    });
    each!(DEVICES, |k, v| {
        let (user, device) = k.value();
        let d: OldDevice = json("devices", v.value()).map_err(|e| damaged(&e))?;
        b.put(&Device {
            user: UserId(user),
            device: DeviceId(device),
            name: d.name,
            platform: d.platform,
            identity_key: Vec::new(),
            created_ms: TimestampMs(d.created_at_ms),
            last_seen_ms: TimestampMs(d.last_seen_ms),
        });
        moved.devices += 1;
    });
    each!(SESSIONS, |k, v| {
        let s: OldSession = json("sessions", v.value()).map_err(|e| damaged(&e))?;
        let (user, device) = (UserId(s.user_id), DeviceId(s.device_id));
        b.put(&Session {
            id: k.value(),
            user,
            device,
            refresh_token_hash: hash32(old, &s.refresh_sha256, "a refresh token hash")?,
            created_ms: TimestampMs(s.created_at_ms),
            expires_ms: TimestampMs(s.refresh_expires_at_ms),
            revoked: s.revoked,
        });
        b.put(&DeviceSession {
            user,
            device,
            session: k.value(),
        });
        moved.sessions += 1;
    });
    each!(REFRESH, |k, v| {
        let (session, current) = v.value();
        b.put(&RefreshToken {
            hash: hash32(old, k.value(), "a refresh token hash")?,
            session,
            current,
        });
        moved.other += 1;
    });
    each!(OTPS, |k, v| {
        let o: OldOtp = json("otps", v.value()).map_err(|e| damaged(&e))?;
        b.put(&OtpRecord {
            ident: k.value().to_owned(),
            code_hmac: hash32(old, &o.mac, "a code's MAC")?,
            expires_ms: TimestampMs(o.expires_at_ms),
            attempts_left: o.attempts_left,
            created_ms: TimestampMs(o.sent_at_ms),
        });
        moved.other += 1;
    });
    each!(COUNTERS, |k, v| {
        b.put(&Counter {
            name: k.value().to_owned(),
            next: v.value(),
        });
        moved.other += 1;
    });
    each!(WINDOWS, |k, v| {
        let (start_ms, window_ms, count) = v.value();
        b.put(&RateWindow {
            key: k.value().to_owned(),
            start_ms,
            window_ms,
            count,
        });
        moved.other += 1;
    });
    b.put(&Counter {
        name: ACCOUNTS_IMPORTED.to_owned(),
        next: now_ms,
    });
    Ok((b, moved))
}

/// Writes a data dir's `accounts.redb` in the old format (for the
/// migration's tests; a release before the one account store wrote exactly
/// these tables and records).
#[doc(hidden)]
pub mod old_format {
    use super::*;

    /// The records to write.
    #[derive(Debug, Default)]
    pub struct OldAccounts {
        /// (ident, user id, user, phone key).
        pub users: Vec<(String, u64, OldUser, Option<Vec<u8>>)>,
        /// (user, device, device).
        pub devices: Vec<(u64, u32, OldDevice)>,
        /// (session id, session, earlier refresh hashes (hex) no longer current).
        pub sessions: Vec<(u64, OldSession, Vec<String>)>,
        /// (ident, code).
        pub otps: Vec<(String, OldOtp)>,
        /// (name, next).
        pub counters: Vec<(String, u64)>,
        /// (key, (start, window, count)).
        pub windows: Vec<(String, (u64, u64, u32))>,
    }

    fn put_json<K: redb::Key + 'static>(
        tx: &redb::WriteTransaction,
        def: TableDefinition<'_, K, &[u8]>,
        key: K::SelfType<'_>,
        v: &impl Serialize,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(v)?;
        tx.open_table(def)?.insert(key, bytes.as_slice())?;
        Ok(())
    }

    /// Writes `a` to `path` as the old store did.
    ///
    /// # Errors
    /// redb failed.
    pub fn write(path: &Path, a: &OldAccounts) -> anyhow::Result<()> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        for (ident, id, u, phone_key) in &a.users {
            tx.open_table(IDENTS)?.insert(ident.as_str(), *id)?;
            if let Some(k) = phone_key {
                tx.open_table(PHONES)?.insert(k.as_slice(), *id)?;
            }
            put_json(&tx, USERS, *id, u)?;
        }
        for (u, d, rec) in &a.devices {
            put_json(&tx, DEVICES, (*u, *d), rec)?;
        }
        for (id, s, earlier) in &a.sessions {
            put_json(&tx, SESSIONS, *id, s)?;
            let mut t = tx.open_table(REFRESH)?;
            t.insert(s.refresh_sha256.as_str(), (*id, true))?;
            for e in earlier {
                t.insert(e.as_str(), (*id, false))?;
            }
        }
        for (ident, o) in &a.otps {
            put_json(&tx, OTPS, ident.as_str(), o)?;
        }
        for (name, next) in &a.counters {
            tx.open_table(COUNTERS)?.insert(name.as_str(), *next)?;
        }
        for (k, w) in &a.windows {
            tx.open_table(WINDOWS)?.insert(k.as_str(), *w)?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
