//! Metadata: users, devices, sessions, OTPs, groups and members, the contact-discovery index,
//! prekeys, push tokens, blocks — and cursors. Embedded backend: redb, every commit with
//! immediate durability (fsync before `commit` returns).
//!
//! Records are encoded by hand (fixed-width little-endian integers, u32-length-prefixed bytes):
//! no serialization framework to pin, and every decoder is a bounds-checked reader that returns
//! an error, never panics, on damaged bytes. Keys are big-endian so prefix scans are ordered.

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::StorageError;
use crate::traits::{CursorStore, DeliveryCursor, ReadCursor};
use crate::types::{ConvId, DeviceId, Seq, TimestampMs, UserId};

/// The most records a setting may make one bounded scan ask for (`router.blocks_max`). Scans
/// themselves return everything up to the caller's `limit`: no store caps a scan silently.
pub const SCAN_RECORDS_MAX: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// encoding helpers

/// Appends fields to a record's bytes.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    /// A u8.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A little-endian u128.
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// The bytes as they are (a fixed-width field).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// u32 length, then the bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
}

/// Reads fields back; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
    table: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], table: &'static str) -> Reader<'a> {
        Reader { b, table }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if self.b.len() < n {
            return Err(StorageError::Decode {
                table: self.table,
                reason: format!("truncated (need {n})"),
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    /// A u8.
    pub fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }
    /// A 0/1 byte; any other value is damage, not `true` (found by the `meta_record` fuzz
    /// target: a damaged "has a password" tag read as "no password").
    pub fn bool(&mut self) -> Result<bool, StorageError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(StorageError::Decode {
                table: self.table,
                reason: format!("flag byte {v} is neither 0 nor 1"),
            }),
        }
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, StorageError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, StorageError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// A little-endian u128.
    pub fn u128(&mut self) -> Result<u128, StorageError> {
        let mut a = [0; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(a))
    }
    /// u32 length, then the bytes.
    pub fn bytes(&mut self) -> Result<Vec<u8>, StorageError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// A fixed 32-byte array.
    pub fn arr32(&mut self) -> Result<[u8; 32], StorageError> {
        let mut a = [0; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    /// A fixed 16-byte array.
    pub fn arr16(&mut self) -> Result<[u8; 16], StorageError> {
        let mut a = [0; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    /// A UTF-8 string.
    pub fn string(&mut self) -> Result<String, StorageError> {
        let table = self.table;
        String::from_utf8(self.bytes()?).map_err(|_| StorageError::Decode {
            table,
            reason: "not UTF-8".into(),
        })
    }
    /// How many bytes are left to read.
    pub fn remaining(&self) -> usize {
        self.b.len()
    }
    /// Whether every byte was read (a record's optional newer-version tail is absent).
    pub fn at_end(&self) -> bool {
        self.b.is_empty()
    }
    /// The version byte of a record's tail: `expected`, or damage.
    pub fn version(&mut self, expected: u8) -> Result<(), StorageError> {
        match self.u8()? {
            v if v == expected => Ok(()),
            v => Err(StorageError::Decode {
                table: self.table,
                reason: format!("unknown record version {v}"),
            }),
        }
    }
    fn finish(&self) -> Result<(), StorageError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(StorageError::Decode {
                table: self.table,
                reason: "trailing bytes".into(),
            })
        }
    }
}

/// A metadata record: its table, its key, and its encoding.
pub trait Record: Sized {
    /// The table (redb table name; a PostgreSQL table later).
    const TABLE: &'static str;
    /// The primary key (big-endian parts, so prefixes group related records).
    fn key(&self) -> Vec<u8>;
    /// Encodes the record (including its key fields).
    fn encode(&self, w: &mut Writer);
    /// Decodes a record written by `encode`.
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError>;
}

pub(crate) fn decode<R: Record>(b: &[u8]) -> Result<R, StorageError> {
    let mut r = Reader::new(b, R::TABLE);
    let v = R::decode(&mut r)?;
    r.finish()?;
    Ok(v)
}

pub(crate) fn encode<R: Record>(rec: &R) -> Vec<u8> {
    let mut w = Writer::default();
    rec.encode(&mut w);
    w.0
}

/// Key helpers: big-endian concatenations.
pub mod keys {
    use super::{DeviceId, UserId};

    /// `user`.
    pub fn user(u: UserId) -> Vec<u8> {
        u.0.to_be_bytes().to_vec()
    }
    /// `user ‖ device`.
    pub fn device(u: UserId, d: DeviceId) -> Vec<u8> {
        let mut k = user(u);
        k.extend_from_slice(&d.0.to_be_bytes());
        k
    }
    /// `group ‖ user`.
    pub fn member(group: u128, u: UserId) -> Vec<u8> {
        let mut k = group.to_be_bytes().to_vec();
        k.extend_from_slice(&u.0.to_be_bytes());
        k
    }
    /// `user ‖ device ‖ prekey id`.
    pub fn prekey(u: UserId, d: DeviceId, id: u32) -> Vec<u8> {
        let mut k = device(u, d);
        k.extend_from_slice(&id.to_be_bytes());
        k
    }
}

/// One encoded sample of every record type, in the order `crate::fuzzing::meta_record` numbers
/// the tables.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn sample_records() -> Vec<Vec<u8>> {
        let t = TimestampMs(1_700_000_000_000);
        let (u, d, g) = (UserId(42), DeviceId(3), ConvId(0xC0FFEE << 64 | 7));
        vec![
            encode(&User {
                id: u,
                phone_e164: "+15551234567".into(),
                display_name: "Ada".into(),
                password_hash: Some("$argon2id$v=19$x".into()),
                created_ms: t,
                account: None,
            }),
            encode(&IdentIndex {
                ident: "phone:+15551234567".into(),
                user: u,
            }),
            encode(&Device {
                user: u,
                device: d,
                name: "phone".into(),
                platform: "android".into(),
                identity_key: vec![5; 32],
                created_ms: t,
                last_seen_ms: t,
            }),
            encode(&Session {
                id: 1,
                user: u,
                device: d,
                refresh_token_hash: [2; 32],
                created_ms: t,
                expires_ms: t,
                revoked: true,
            }),
            encode(&OtpRecord {
                ident: "phone:+15551234567".into(),
                code_hmac: [3; 32],
                expires_ms: t,
                attempts_left: 2,
                created_ms: t,
            }),
            encode(&Group {
                id: g,
                name: "climbers".into(),
                created_by: u,
                created_ms: t,
                epoch: 4,
                settings: None,
            }),
            encode(&Member {
                group: g,
                user: u,
                role: Role::Admin,
                joined_ms: t,
                joined_seq: None,
            }),
            encode(&MemberOf { user: u, group: g }),
            encode(&ContactIndex {
                phone_hmac: [4; 32],
                user: u,
            }),
            encode(&SignedPrekey {
                user: u,
                device: d,
                id: 9,
                public_key: vec![6; 32],
                signature: vec![7; 64],
            }),
            encode(&OneTimePrekey {
                user: u,
                device: d,
                id: 10,
                public_key: vec![8; 32],
            }),
            encode(&PushToken {
                user: u,
                device: d,
                provider: "fcm".into(),
                token: b"tok".to_vec(),
                app_id: "org.example.chat".into(),
                sandbox: true,
                updated_ms: t,
            }),
            encode(&Block {
                user: u,
                blocked: UserId(43),
                created_ms: t,
            }),
            encode(&DirectPair {
                low: u,
                high: UserId(43),
                conv: g,
            }),
            encode(&DirectConv {
                conv: g,
                low: u,
                high: UserId(43),
                created_ms: t,
            }),
            encode(&Group {
                id: g,
                name: "climbers".into(),
                created_by: u,
                created_ms: t,
                epoch: 5,
                settings: Some(GroupSettings {
                    only_admins_send: true,
                    avatar: b"media".to_vec(),
                    pending: Some(PendingEvent {
                        version: 5,
                        event: b"event".to_vec(),
                    }),
                }),
            }),
            encode(&Member {
                group: g,
                user: u,
                role: Role::Member,
                joined_ms: t,
                joined_seq: Some(9),
            }),
            encode(&FormerMember {
                group: g,
                user: u,
                joined_seq: 3,
                left_seq: 9,
            }),
            encode(&Contact {
                user: u,
                contact: UserId(43),
                created_ms: t,
            }),
            encode(&Presence {
                user: u,
                last_seen_ms: t,
                hide_last_seen: true,
            }),
            encode(&User {
                id: u,
                phone_e164: String::new(),
                display_name: "Ada".into(),
                password_hash: None,
                created_ms: t,
                account: Some(AccountFields {
                    email: "ada@example.org".into(),
                    about: "counting".into(),
                    next_device_id: 4,
                }),
            }),
            encode(&crate::accounts::RefreshToken {
                hash: [5; 32],
                session: 7,
                current: true,
            }),
            encode(&crate::accounts::DeviceSession {
                user: u,
                device: d,
                session: 7,
            }),
            encode(&crate::accounts::RateWindow {
                key: "otp-ip:10.0.0.1".into(),
                start_ms: t.0,
                window_ms: 3_600_000,
                count: 2,
            }),
            encode(&crate::accounts::Counter {
                name: "user".into(),
                next: 43,
            }),
            encode(&crate::keys::DeviceIdentity {
                user: u,
                device: d,
                identity_key: vec![9; 32],
                registration_id: 77,
                updated_ms: t,
            }),
            encode(&crate::push::OutboxEntry {
                user: u,
                device: d,
                conv: 77,
                seq: 5,
                sender: 43,
                due_ms: t.0,
                sent_seq: 4,
                sent_ms: t.0,
                attempts: 2,
            }),
            encode(&crate::push::DeadLetter {
                id: 1,
                user: u,
                device: d,
                conv: 77,
                seq: 5,
                provider: "web_push".into(),
                reason: "400".into(),
                at_ms: t.0,
            }),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// records

macro_rules! record {
    ($(#[$m:meta])* $name:ident, $table:literal, key($s:ident) $key:block, enc($sw:ident, $w:ident) $enc:block, dec($r:ident) $dec:block) => {
        $(#[$m])*
        impl Record for $name {
            const TABLE: &'static str = $table;
            fn key(&self) -> Vec<u8> { let $s = self; $key }
            fn encode(&self, $w: &mut Writer) { let $sw = self; $enc }
            fn decode($r: &mut Reader<'_>) -> Result<Self, StorageError> { $dec }
        }
    };
}

/// An account: the one record of a user, read by the accounts front door (sign-in, profile)
/// and by the router (conversation titles, membership checks). Key: user id. Sign-in lookups go
/// through [`IdentIndex`], contact discovery through [`ContactIndex`]; the account's writes are
/// in [`crate::accounts`].
///
/// Encoding: version 1 is `id ‖ phone ‖ display_name ‖ password? ‖ created_ms`; version 2
/// appends `2u8 ‖ email ‖ about ‖ next_device_id` ([`AccountFields`]). A record decodes to
/// exactly the version it was written in (`account` is `None` for version 1, as written by
/// releases before the one account store), so it re-encodes to the same bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    /// Id.
    pub id: UserId,
    /// E.164 phone number (empty: registered by e-mail).
    pub phone_e164: String,
    /// Display name.
    pub display_name: String,
    /// Argon2id PHC string, if the account has a password.
    pub password_hash: Option<String>,
    /// Created at.
    pub created_ms: TimestampMs,
    /// Version 2's fields; `None` in a version-1 record (read as empty).
    pub account: Option<AccountFields>,
}

/// The fields of an account beyond version 1 of [`User`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountFields {
    /// E-mail (empty: registered by phone).
    pub email: String,
    /// Status text.
    pub about: String,
    /// The next device id to hand out (device ids start at 1).
    pub next_device_id: u32,
}

record!(User, "users", key(s) { keys::user(s.id) },
    enc(s, w) { w.u64(s.id.0).bytes(s.phone_e164.as_bytes()).bytes(s.display_name.as_bytes());
        match &s.password_hash { Some(h) => { w.u8(1).bytes(h.as_bytes()); } None => { w.u8(0); } }
        w.u64(s.created_ms.0);
        if let Some(a) = &s.account {
            w.u8(2).bytes(a.email.as_bytes()).bytes(a.about.as_bytes()).u32(a.next_device_id);
        } },
    dec(r) { let mut u = User { id: UserId(r.u64()?), phone_e164: r.string()?, display_name: r.string()?,
        password_hash: if r.bool()? { Some(r.string()?) } else { None }, created_ms: TimestampMs(r.u64()?), account: None };
        if !r.at_end() {
            r.version(2)?;
            u.account = Some(AccountFields { email: r.string()?, about: r.string()?, next_device_id: r.u32()? });
        }
        Ok(u) });

/// A sign-in identifier → its user (unique). Key: the identifier as the accounts front door
/// spells it (`phone:+15551234567`, `email:ana@example.org`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentIndex {
    /// The identifier.
    pub ident: String,
    /// Its user.
    pub user: UserId,
}
record!(IdentIndex, "idents", key(s) { s.ident.as_bytes().to_vec() },
    enc(s, w) { w.bytes(s.ident.as_bytes()).u64(s.user.0); },
    dec(r) { Ok(IdentIndex { ident: r.string()?, user: UserId(r.u64()?) }) });

/// A device of a user. Key: user ‖ device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Owner.
    pub user: UserId,
    /// Id within the user.
    pub device: DeviceId,
    /// Name shown in the device list.
    pub name: String,
    /// Platform tag ("ios", "android", "desktop", ...).
    pub platform: String,
    /// The device's public identity key (E2E), if registered.
    pub identity_key: Vec<u8>,
    /// Created at.
    pub created_ms: TimestampMs,
    /// Last seen.
    pub last_seen_ms: TimestampMs,
}
record!(Device, "devices", key(s) { keys::device(s.user, s.device) },
    enc(s, w) { w.u64(s.user.0).u32(s.device.0).bytes(s.name.as_bytes()).bytes(s.platform.as_bytes())
        .bytes(&s.identity_key).u64(s.created_ms.0).u64(s.last_seen_ms.0); },
    dec(r) { Ok(Device { user: UserId(r.u64()?), device: DeviceId(r.u32()?), name: r.string()?, platform: r.string()?,
        identity_key: r.bytes()?, created_ms: TimestampMs(r.u64()?), last_seen_ms: TimestampMs(r.u64()?) }) });

/// A sign-in session of one device. Key: session id (big-endian). Only a hash of the refresh
/// token is stored; [`crate::accounts::RefreshToken`] maps each hash back to its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Session id (carried in access tokens; checked on every connect).
    pub id: u64,
    /// User.
    pub user: UserId,
    /// Device.
    pub device: DeviceId,
    /// SHA-256 of the current refresh token.
    pub refresh_token_hash: [u8; 32],
    /// Created at.
    pub created_ms: TimestampMs,
    /// When the current refresh token expires.
    pub expires_ms: TimestampMs,
    /// Revoked by logout, device removal or refresh-token reuse.
    pub revoked: bool,
}
record!(Session, "sessions", key(s) { s.id.to_be_bytes().to_vec() },
    enc(s, w) { w.u64(s.id).u64(s.user.0).u32(s.device.0).raw(&s.refresh_token_hash);
        w.u64(s.created_ms.0).u64(s.expires_ms.0).u8(u8::from(s.revoked)); },
    dec(r) { Ok(Session { id: r.u64()?, user: UserId(r.u64()?), device: DeviceId(r.u32()?), refresh_token_hash: r.arr32()?,
        created_ms: TimestampMs(r.u64()?), expires_ms: TimestampMs(r.u64()?), revoked: r.bool()? }) });

/// A pending one-time code. Key: the identifier (as in [`IdentIndex`]). The code is stored as
/// an HMAC only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtpRecord {
    /// The identifier it was sent to.
    pub ident: String,
    /// HMAC-SHA256(secret, identifier ‖ code).
    pub code_hmac: [u8; 32],
    /// Expires at.
    pub expires_ms: TimestampMs,
    /// Guesses left (each VerifyOtp or Login with a code spends one).
    pub attempts_left: u32,
    /// When it was sent.
    pub created_ms: TimestampMs,
}
record!(OtpRecord, "otps", key(s) { s.ident.as_bytes().to_vec() },
    enc(s, w) { w.bytes(s.ident.as_bytes()).raw(&s.code_hmac).u64(s.expires_ms.0).u32(s.attempts_left).u64(s.created_ms.0); },
    dec(r) { Ok(OtpRecord { ident: r.string()?, code_hmac: r.arr32()?, expires_ms: TimestampMs(r.u64()?), attempts_left: r.u32()?,
        created_ms: TimestampMs(r.u64()?) }) });

/// A group (its conversation id is the group id). Key: group id.
///
/// Encoding: version 1 is `id ‖ name ‖ created_by ‖ created_ms ‖ epoch`; version 2 appends
/// `2u8 ‖ settings` ([`GroupSettings`]). A record decodes to exactly the version it was
/// written in (`settings` is `None` for version 1), so it re-encodes to the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Group id = its conversation id.
    pub id: ConvId,
    /// Name.
    pub name: String,
    /// Creator.
    pub created_by: UserId,
    /// Created at.
    pub created_ms: TimestampMs,
    /// Bumped on every change that has an event (the group's version on the wire).
    pub epoch: u64,
    /// Version 2's fields; `None` in a version-1 record.
    pub settings: Option<GroupSettings>,
}

/// A group's settings and its change in progress (version 2 of [`Group`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupSettings {
    /// Only admins may send.
    pub only_admins_send: bool,
    /// The avatar, as the wire's encoded `MediaRef` (empty: none). Opaque here.
    pub avatar: Vec<u8>,
    /// A change committed here whose event may not be in the conversation's log yet.
    pub pending: Option<PendingEvent>,
}

/// The marker of a group change whose event is not known to be durable: the event's body,
/// written with the change, so that whoever loads the group can sequence it if the log lacks
/// it (the event's `client_msg_id` is derived from the group and `version`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEvent {
    /// The group's version the change made (the event's identity).
    pub version: u64,
    /// The event, as it goes into the log entry's body. Opaque here.
    pub event: Vec<u8>,
}

record!(Group, "groups", key(s) { s.id.0.to_be_bytes().to_vec() },
enc(s, w) {
    w.u128(s.id.0).bytes(s.name.as_bytes()).u64(s.created_by.0).u64(s.created_ms.0).u64(s.epoch);
    if let Some(st) = &s.settings {
        w.u8(2).u8(u8::from(st.only_admins_send)).bytes(&st.avatar);
        match &st.pending {
            None => { w.u8(0); }
            Some(p) => { w.u8(1).u64(p.version).bytes(&p.event); }
        }
    }
},
dec(r) {
    let mut g = Group { id: ConvId(r.u128()?), name: r.string()?, created_by: UserId(r.u64()?), created_ms: TimestampMs(r.u64()?), epoch: r.u64()?, settings: None };
    if !r.at_end() {
        r.version(2)?;
        let only_admins_send = r.bool()?;
        let avatar = r.bytes()?;
        let pending = if r.bool()? { Some(PendingEvent { version: r.u64()?, event: r.bytes()? }) } else { None };
        g.settings = Some(GroupSettings { only_admins_send, avatar, pending });
    }
    Ok(g)
});

/// A member's role. The router writes `Member` and `Admin` only and reads `Owner` (which no
/// release wrote) as `Admin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Can send.
    Member,
    /// Can add/remove members.
    Admin,
    /// Created it; can delete it.
    Owner,
}

/// A group member. Key: group ‖ user. [`MemberOf`] is its reverse index; write both in one batch
/// (see [`MetaBatch::add_member`]).
///
/// Encoding: version 1 is `group ‖ user ‖ role ‖ joined_ms`; version 2 appends
/// `2u8 ‖ joined_seq`. `joined_seq` is `None` exactly in a version-1 record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Group.
    pub group: ConvId,
    /// Member.
    pub user: UserId,
    /// Role.
    pub role: Role,
    /// Joined at.
    pub joined_ms: TimestampMs,
    /// The seq of the event that added them (`Some(0)`: that event is not sequenced yet).
    pub joined_seq: Option<u64>,
}
record!(Member, "members", key(s) { keys::member(s.group.0, s.user) },
enc(s, w) {
    w.u128(s.group.0).u64(s.user.0).u8(match s.role { Role::Member => 0, Role::Admin => 1, Role::Owner => 2 }).u64(s.joined_ms.0);
    if let Some(seq) = s.joined_seq { w.u8(2).u64(seq); }
},
dec(r) {
    let mut m = Member { group: ConvId(r.u128()?), user: UserId(r.u64()?),
        role: match r.u8()? { 0 => Role::Member, 1 => Role::Admin, 2 => Role::Owner,
            _ => return Err(StorageError::Decode { table: "members", reason: "unknown role".into() }) },
        joined_ms: TimestampMs(r.u64()?), joined_seq: None };
    if !r.at_end() {
        r.version(2)?;
        m.joined_seq = Some(r.u64()?);
    }
    Ok(m)
});

/// A former member of a group: one that left or was removed, and may still read the group's
/// conversation from `joined_seq` up to `left_seq` (the event of its removal). Key: group ‖
/// user. Its [`MemberOf`] stays, so the group stays in the user's conversations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormerMember {
    /// Group.
    pub group: ConvId,
    /// The former member.
    pub user: UserId,
    /// The seq of the event of its (latest) join.
    pub joined_seq: u64,
    /// The seq of the event of its removal (0: that event is not sequenced yet).
    pub left_seq: u64,
}
record!(FormerMember, "former_members", key(s) { keys::member(s.group.0, s.user) },
    enc(s, w) { w.u128(s.group.0).u64(s.user.0).u64(s.joined_seq).u64(s.left_seq); },
    dec(r) { Ok(FormerMember { group: ConvId(r.u128()?), user: UserId(r.u64()?), joined_seq: r.u64()?, left_seq: r.u64()? }) });

/// Reverse membership: user → groups. Key: user ‖ group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberOf {
    /// Member.
    pub user: UserId,
    /// Group.
    pub group: ConvId,
}
record!(MemberOf, "member_of", key(s) { let mut k = keys::user(s.user); k.extend_from_slice(&s.group.0.to_be_bytes()); k },
    enc(s, w) { w.u64(s.user.0).u128(s.group.0); },
    dec(r) { Ok(MemberOf { user: UserId(r.u64()?), group: ConvId(r.u128()?) }) });

/// Contact discovery: HMAC(pepper, E.164) → user. Uploaded address books are never stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactIndex {
    /// HMAC(pepper, E.164).
    pub phone_hmac: [u8; 32],
    /// Its user.
    pub user: UserId,
}
record!(ContactIndex, "contacts", key(s) { s.phone_hmac.to_vec() },
    enc(s, w) { w.0.extend_from_slice(&s.phone_hmac); w.u64(s.user.0); },
    dec(r) { Ok(ContactIndex { phone_hmac: r.arr32()?, user: UserId(r.u64()?) }) });

/// A device's signed prekey (E2E). Key: user ‖ device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedPrekey {
    /// Owner.
    pub user: UserId,
    /// Device.
    pub device: DeviceId,
    /// Prekey id.
    pub id: u32,
    /// Public key.
    pub public_key: Vec<u8>,
    /// Signature by the identity key.
    pub signature: Vec<u8>,
}
record!(SignedPrekey, "signed_prekeys", key(s) { keys::device(s.user, s.device) },
    enc(s, w) { w.u64(s.user.0).u32(s.device.0).u32(s.id).bytes(&s.public_key).bytes(&s.signature); },
    dec(r) { Ok(SignedPrekey { user: UserId(r.u64()?), device: DeviceId(r.u32()?), id: r.u32()?, public_key: r.bytes()?, signature: r.bytes()? }) });

/// A one-time prekey; each is handed out once ([`MetadataStore::pop_first`]). Key: user ‖ device ‖ id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OneTimePrekey {
    /// Owner.
    pub user: UserId,
    /// Device.
    pub device: DeviceId,
    /// Prekey id.
    pub id: u32,
    /// Public key.
    pub public_key: Vec<u8>,
}
record!(OneTimePrekey, "one_time_prekeys", key(s) { keys::prekey(s.user, s.device, s.id) },
    enc(s, w) { w.u64(s.user.0).u32(s.device.0).u32(s.id).bytes(&s.public_key); },
    dec(r) { Ok(OneTimePrekey { user: UserId(r.u64()?), device: DeviceId(r.u32()?), id: r.u32()?, public_key: r.bytes()? }) });

/// A device's push token: where the notifier wakes the device when it has no live connection.
/// One per device (registering again replaces it); removed with the device, by
/// UnregisterPushToken, and when the provider says the token is no longer valid. Key: user ‖
/// device. Written through [`crate::accounts::AccountStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushToken {
    /// Owner.
    pub user: UserId,
    /// Device.
    pub device: DeviceId,
    /// The provider: "apns", "fcm" or "web_push".
    pub provider: String,
    /// The token (for Web Push, the subscription JSON as registered).
    pub token: Vec<u8>,
    /// The app's bundle / package id (APNs: the `apns-topic`).
    pub app_id: String,
    /// APNs: use the sandbox environment.
    pub sandbox: bool,
    /// Registered at.
    pub updated_ms: TimestampMs,
}
record!(PushToken, "push_tokens", key(s) { keys::device(s.user, s.device) },
    enc(s, w) { w.u64(s.user.0).u32(s.device.0).bytes(s.provider.as_bytes()).bytes(&s.token).bytes(s.app_id.as_bytes()).u8(u8::from(s.sandbox)).u64(s.updated_ms.0); },
    dec(r) { Ok(PushToken { user: UserId(r.u64()?), device: DeviceId(r.u32()?), provider: r.string()?, token: r.bytes()?, app_id: r.string()?, sandbox: r.bool()?, updated_ms: TimestampMs(r.u64()?) }) });

/// `user` blocks `blocked`. Key: user ‖ blocked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Who blocks.
    pub user: UserId,
    /// Who is blocked.
    pub blocked: UserId,
    /// Since.
    pub created_ms: TimestampMs,
}
record!(Block, "blocks", key(s) { let mut k = keys::user(s.user); k.extend_from_slice(&s.blocked.0.to_be_bytes()); k },
    enc(s, w) { w.u64(s.user.0).u64(s.blocked.0).u64(s.created_ms.0); },
    dec(r) { Ok(Block { user: UserId(r.u64()?), blocked: UserId(r.u64()?), created_ms: TimestampMs(r.u64()?) }) });

/// The direct (1:1) conversation of two users, by pair. Key: low user ‖ high user. Written
/// together with [`DirectConv`] under compare-and-set, so shards racing to create it agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectPair {
    /// The smaller user id.
    pub low: UserId,
    /// The larger user id (equal to `low` for a note-to-self conversation).
    pub high: UserId,
    /// Its conversation.
    pub conv: ConvId,
}
record!(DirectPair, "direct_pairs", key(s) { let mut k = keys::user(s.low); k.extend_from_slice(&s.high.0.to_be_bytes()); k },
    enc(s, w) { w.u64(s.low.0).u64(s.high.0).u128(s.conv.0); },
    dec(r) { Ok(DirectPair { low: UserId(r.u64()?), high: UserId(r.u64()?), conv: ConvId(r.u128()?) }) });

/// A direct conversation by id (the reverse of [`DirectPair`]). Key: conversation id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectConv {
    /// The conversation.
    pub conv: ConvId,
    /// The smaller user id.
    pub low: UserId,
    /// The larger user id.
    pub high: UserId,
    /// Created at.
    pub created_ms: TimestampMs,
}
record!(DirectConv, "direct_convs", key(s) { s.conv.0.to_be_bytes().to_vec() },
    enc(s, w) { w.u128(s.conv.0).u64(s.low.0).u64(s.high.0).u64(s.created_ms.0); },
    dec(r) { Ok(DirectConv { conv: ConvId(r.u128()?), low: UserId(r.u64()?), high: UserId(r.u64()?), created_ms: TimestampMs(r.u64()?) }) });

/// `user` found `contact` through contact discovery: `contact`'s presence and profile are
/// visible to `user`. Key: user ‖ contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contact {
    /// Whose contact.
    pub user: UserId,
    /// The contact.
    pub contact: UserId,
    /// Since.
    pub created_ms: TimestampMs,
}
record!(Contact, "contacts_of", key(s) { let mut k = keys::user(s.user); k.extend_from_slice(&s.contact.0.to_be_bytes()); k },
    enc(s, w) { w.u64(s.user.0).u64(s.contact.0).u64(s.created_ms.0); },
    dec(r) { Ok(Contact { user: UserId(r.u64()?), contact: UserId(r.u64()?), created_ms: TimestampMs(r.u64()?) }) });

/// What outlives a user's connections of their presence: when their last connection went, and
/// whether others may see it. Key: user. Written when the last connection goes and when
/// `hide_last_seen` changes, never per heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    /// The user.
    pub user: UserId,
    /// When their last connection went (0: never seen going).
    pub last_seen_ms: TimestampMs,
    /// Others see last_seen_ms = 0.
    pub hide_last_seen: bool,
}
record!(Presence, "presence", key(s) { keys::user(s.user) },
    enc(s, w) { w.u64(s.user.0).u64(s.last_seen_ms.0).u8(u8::from(s.hide_last_seen)); },
    dec(r) { Ok(Presence { user: UserId(r.u64()?), last_seen_ms: TimestampMs(r.u64()?), hide_last_seen: r.bool()? }) });

// ---------------------------------------------------------------------------------------------
// the store

#[derive(Debug)]
pub(crate) enum Op {
    Put {
        table: &'static str,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: &'static str,
        key: Vec<u8>,
    },
    Expect {
        table: &'static str,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
}

/// An atomic set of metadata writes, optionally conditional (compare-and-set).
#[derive(Debug, Default)]
pub struct MetaBatch {
    pub(crate) ops: Vec<Op>,
}

impl MetaBatch {
    /// Inserts or replaces `rec`.
    pub fn put<R: Record>(&mut self, rec: &R) -> &mut Self {
        self.ops.push(Op::Put {
            table: R::TABLE,
            key: rec.key(),
            value: encode(rec),
        });
        self
    }
    /// Deletes the record of type `R` at `key`.
    pub fn delete<R: Record>(&mut self, key: &[u8]) -> &mut Self {
        self.ops.push(Op::Delete {
            table: R::TABLE,
            key: key.to_vec(),
        });
        self
    }
    /// Fails the whole batch with [`StorageError::Conflict`] unless the record at `key` is
    /// currently `expected` (`None` = absent). For OTP attempt counters, unique phones, etc.
    pub fn expect<R: Record>(&mut self, key: &[u8], expected: Option<&R>) -> &mut Self {
        self.ops.push(Op::Expect {
            table: R::TABLE,
            key: key.to_vec(),
            value: expected.map(encode),
        });
        self
    }
    /// Adds a member and its reverse index together.
    pub fn add_member(&mut self, m: &Member) -> &mut Self {
        self.put(m).put(&MemberOf {
            user: m.user,
            group: m.group,
        })
    }
    /// Removes a member and its reverse index together.
    pub fn remove_member(&mut self, group: ConvId, user: UserId) -> &mut Self {
        let rev = MemberOf { user, group }.key();
        self.delete::<Member>(&keys::member(group.0, user))
            .delete::<MemberOf>(&rev)
    }
}

/// The metadata seam.
pub trait MetadataStore {
    /// The record of type `R` at `key`.
    fn get<R: Record>(&self, key: &[u8]) -> Result<Option<R>, StorageError>;
    /// Records of type `R` whose key starts with `prefix`, in key order, at most `limit`.
    fn scan<R: Record>(&self, prefix: &[u8], limit: usize) -> Result<Vec<R>, StorageError>;
    /// Applies `batch` atomically; durable (fsync'ed) when it returns `Ok`.
    fn commit(&self, batch: &MetaBatch) -> Result<(), StorageError>;
    /// Removes and returns the first record with `prefix` (one-time prekeys), durably.
    fn pop_first<R: Record>(&self, prefix: &[u8]) -> Result<Option<R>, StorageError>;
}

const DELIVERY: TableDefinition<'static, &[u8], u64> = TableDefinition::new("delivery_cursors");
const READ: TableDefinition<'static, &[u8], u64> = TableDefinition::new("read_cursors");

pub(crate) fn table(name: &'static str) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// Told the first time the store fails for a reason of the disk (see [`EmbeddedMeta::fault`]).
pub type FaultHook = Box<dyn Fn(&StorageError) + Send + Sync>;

/// The embedded metadata store (one redb file per node).
///
/// After an I/O error redb latches it: every later operation fails (`PreviousIo`) until the
/// database is reopened. The store remembers the first such failure ([`EmbeddedMeta::fault`])
/// and tells the hook set with [`EmbeddedMeta::set_fault_hook`], so that the embedder can stop
/// serving instead of failing every request that touches metadata.
pub struct EmbeddedMeta {
    pub(crate) db: Database,
    fault: OnceLock<String>,
    fault_hook: OnceLock<FaultHook>,
}

impl fmt::Debug for EmbeddedMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedMeta")
            .field("fault", &self.fault.get())
            .finish_non_exhaustive()
    }
}

impl EmbeddedMeta {
    /// Opens (creating if needed) the metadata file at `path`.
    pub fn open(path: &Path) -> Result<EmbeddedMeta, StorageError> {
        Ok(EmbeddedMeta {
            db: Database::create(path)?,
            fault: OnceLock::new(),
            fault_hook: OnceLock::new(),
        })
    }

    /// The first failure of the disk under this store ([`StorageError::is_fault`]), if one
    /// happened: the store must be reopened (the process restarted) to be used again.
    pub fn fault(&self) -> Option<&str> {
        self.fault.get().map(String::as_str)
    }

    /// Calls `hook` (once, on the thread that met it) at the store's first fault. Only the first
    /// hook set is kept.
    pub fn set_fault_hook(&self, hook: FaultHook) {
        let _ = self.fault_hook.set(hook);
    }

    /// Runs one operation, noting a fault of the disk.
    pub(crate) fn watch<T>(
        &self,
        op: impl FnOnce() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let r = op();
        if let Err(e) = &r
            && e.is_fault()
            && self.fault.set(e.to_string()).is_ok()
            && let Some(hook) = self.fault_hook.get()
        {
            hook(e);
        }
        r
    }

    pub(crate) fn db_read(&self) -> Result<redb::ReadTransaction, StorageError> {
        Ok(self.db.begin_read()?)
    }

    pub(crate) fn write_txn(&self) -> Result<redb::WriteTransaction, StorageError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        Ok(tx)
    }
}

pub(crate) fn map_table_err(e: redb::TableError) -> Result<(), StorageError> {
    match e {
        redb::TableError::TableDoesNotExist(_) => Ok(()),
        e => Err(e.into()),
    }
}

impl MetadataStore for EmbeddedMeta {
    fn get<R: Record>(&self, key: &[u8]) -> Result<Option<R>, StorageError> {
        self.watch(|| {
            let tx = self.db.begin_read()?;
            let t = match tx.open_table(table(R::TABLE)) {
                Ok(t) => t,
                Err(e) => return map_table_err(e).map(|()| None),
            };
            match t.get(key)? {
                Some(v) => Ok(Some(decode(v.value())?)),
                None => Ok(None),
            }
        })
    }

    fn scan<R: Record>(&self, prefix: &[u8], limit: usize) -> Result<Vec<R>, StorageError> {
        self.watch(|| {
            let tx = self.db.begin_read()?;
            let t = match tx.open_table(table(R::TABLE)) {
                Ok(t) => t,
                Err(e) => return map_table_err(e).map(|()| Vec::new()),
            };
            let mut out = Vec::new();
            for item in t.range(prefix..)? {
                let (k, v) = item?;
                if !k.value().starts_with(prefix) || out.len() >= limit {
                    break;
                }
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
    }

    fn commit(&self, batch: &MetaBatch) -> Result<(), StorageError> {
        self.watch(|| {
            let tx = self.write_txn()?;
            for op in &batch.ops {
                match op {
                    Op::Put {
                        table: name,
                        key,
                        value,
                    } => {
                        tx.open_table(table(name))?
                            .insert(key.as_slice(), value.as_slice())?;
                    }
                    Op::Delete { table: name, key } => {
                        tx.open_table(table(name))?.remove(key.as_slice())?;
                    }
                    Op::Expect {
                        table: name,
                        key,
                        value,
                    } => {
                        let t = tx.open_table(table(name))?;
                        let cur = t.get(key.as_slice())?.map(|g| g.value().to_vec());
                        if cur != *value {
                            drop(t);
                            tx.abort()?;
                            return Err(StorageError::Conflict { table: name });
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn pop_first<R: Record>(&self, prefix: &[u8]) -> Result<Option<R>, StorageError> {
        self.watch(|| {
            let tx = self.write_txn()?;
            let found = {
                let mut t = tx.open_table(table(R::TABLE))?;
                let first = match t.range(prefix..)?.next() {
                    Some(item) => {
                        let (k, v) = item?;
                        k.value()
                            .starts_with(prefix)
                            .then(|| (k.value().to_vec(), v.value().to_vec()))
                    }
                    None => None,
                };
                match first {
                    Some((k, v)) => {
                        t.remove(k.as_slice())?;
                        Some(decode::<R>(&v)?)
                    }
                    None => None,
                }
            };
            tx.commit()?;
            Ok(found)
        })
    }
}

fn delivery_key(conv: ConvId, user: UserId, device: DeviceId) -> [u8; 28] {
    let mut k = [0u8; 28];
    k[..16].copy_from_slice(&conv.0.to_be_bytes());
    k[16..24].copy_from_slice(&user.0.to_be_bytes());
    k[24..].copy_from_slice(&device.0.to_be_bytes());
    k
}

fn read_key(conv: ConvId, user: UserId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&conv.0.to_be_bytes());
    k[16..].copy_from_slice(&user.0.to_be_bytes());
    k
}

impl CursorStore for EmbeddedMeta {
    fn advance_delivery(&self, cursors: &[DeliveryCursor]) -> Result<(), StorageError> {
        self.watch(|| {
            let tx = self.write_txn()?;
            {
                let mut t = tx.open_table(DELIVERY)?;
                for c in cursors {
                    let k = delivery_key(c.conv, c.user, c.device);
                    let cur = t.get(k.as_slice())?.map_or(0, |g| g.value());
                    if c.seq.0 > cur {
                        t.insert(k.as_slice(), c.seq.0)?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn advance_read(&self, cursors: &[ReadCursor]) -> Result<(), StorageError> {
        self.watch(|| {
            let tx = self.write_txn()?;
            {
                let mut t = tx.open_table(READ)?;
                for c in cursors {
                    let k = read_key(c.conv, c.user);
                    let cur = t.get(k.as_slice())?.map_or(0, |g| g.value());
                    if c.seq.0 > cur {
                        t.insert(k.as_slice(), c.seq.0)?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn delivery_cursor(
        &self,
        conv: ConvId,
        user: UserId,
        device: DeviceId,
    ) -> Result<Seq, StorageError> {
        self.watch(|| {
            let tx = self.db.begin_read()?;
            let t = match tx.open_table(DELIVERY) {
                Ok(t) => t,
                Err(e) => return map_table_err(e).map(|()| Seq::NONE),
            };
            Ok(Seq(t
                .get(delivery_key(conv, user, device).as_slice())?
                .map_or(0, |g| g.value())))
        })
    }

    fn read_cursor(&self, conv: ConvId, user: UserId) -> Result<Seq, StorageError> {
        self.watch(|| {
            let tx = self.db.begin_read()?;
            let t = match tx.open_table(READ) {
                Ok(t) => t,
                Err(e) => return map_table_err(e).map(|()| Seq::NONE),
            };
            Ok(Seq(t
                .get(read_key(conv, user).as_slice())?
                .map_or(0, |g| g.value())))
        })
    }

    fn delivery_cursors(&self, conv: ConvId) -> Result<Vec<DeliveryCursor>, StorageError> {
        self.watch(|| {
            let tx = self.db.begin_read()?;
            let t = match tx.open_table(DELIVERY) {
                Ok(t) => t,
                Err(e) => return map_table_err(e).map(|()| Vec::new()),
            };
            let prefix = conv.0.to_be_bytes();
            let mut out = Vec::new();
            for item in t.range(prefix.as_slice()..)? {
                let (k, v) = item?;
                let k = k.value();
                if !k.starts_with(&prefix) {
                    break;
                }
                let mut r = Reader::new(&k[16..], "delivery_cursors");
                let mut be8 = [0u8; 8];
                be8.copy_from_slice(r.take(8)?);
                let mut be4 = [0u8; 4];
                be4.copy_from_slice(r.take(4)?);
                out.push(DeliveryCursor {
                    conv,
                    user: UserId(u64::from_be_bytes(be8)),
                    device: DeviceId(u32::from_be_bytes(be4)),
                    seq: Seq(v.value()),
                });
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// redb's in-memory backend whose writes and syncs fail once `fail` is set, as on a full
    /// or read-only disk.
    #[derive(Debug)]
    struct FailingBackend {
        inner: redb::backends::InMemoryBackend,
        fail: Arc<AtomicBool>,
    }

    impl FailingBackend {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for FailingBackend {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    #[test]
    fn the_first_disk_failure_is_latched_and_reported_once() {
        let fail = Arc::new(AtomicBool::new(false));
        let db = Database::builder()
            .create_with_backend(FailingBackend {
                inner: redb::backends::InMemoryBackend::new(),
                fail: fail.clone(),
            })
            .unwrap();
        let meta = EmbeddedMeta {
            db,
            fault: OnceLock::new(),
            fault_hook: OnceLock::new(),
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        meta.set_fault_hook(Box::new(move |e| {
            assert!(e.is_fault());
            c.fetch_add(1, Ordering::SeqCst);
        }));
        let user = |id| User {
            id: UserId(id),
            phone_e164: String::new(),
            display_name: "A".into(),
            password_hash: None,
            created_ms: TimestampMs(1),
            account: None,
        };
        meta.commit(MetaBatch::default().put(&user(1))).unwrap();
        // A request's own problem is not a fault of the store.
        let e = meta
            .commit(MetaBatch::default().expect::<User>(&keys::user(UserId(1)), None))
            .unwrap_err();
        assert!(matches!(e, StorageError::Conflict { .. }) && !e.is_fault());
        assert_eq!(meta.fault(), None);

        fail.store(true, Ordering::SeqCst);
        let e = meta.commit(MetaBatch::default().put(&user(2))).unwrap_err();
        assert!(e.is_fault(), "{e}");
        assert_eq!(meta.fault(), Some(e.to_string().as_str()));
        // Later failures (redb latches the error) keep the first reason and the hook quiet.
        fail.store(false, Ordering::SeqCst);
        let _ = meta.commit(MetaBatch::default().put(&user(3)));
        let _ = meta.advance_read(&[ReadCursor {
            conv: ConvId(1),
            user: UserId(1),
            seq: Seq(1),
        }]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(meta.fault(), Some(e.to_string().as_str()));
    }

    #[test]
    fn flag_bytes_other_than_zero_or_one_are_refused() {
        let user = User {
            id: UserId(1),
            phone_e164: "+15550000000".into(),
            display_name: "A".into(),
            password_hash: None,
            created_ms: TimestampMs(5),
            account: None,
        };
        let mut b = encode(&user);
        assert_eq!(decode::<User>(&b).unwrap(), user);
        let tag = b.len() - 9; // the password tag, then created_ms
        b[tag] = 2;
        assert!(matches!(
            decode::<User>(&b),
            Err(StorageError::Decode { table: "users", .. })
        ));

        let session = Session {
            id: 1,
            user: UserId(1),
            device: DeviceId(1),
            refresh_token_hash: [2; 32],
            created_ms: TimestampMs(1),
            expires_ms: TimestampMs(2),
            revoked: false,
        };
        let mut b = encode(&session);
        *b.last_mut().unwrap() = 7;
        assert!(decode::<Session>(&b).is_err());
    }

    #[test]
    fn group_and_member_records_of_either_version_decode_to_exactly_what_was_written() {
        let v1 = Member {
            group: ConvId(7),
            user: UserId(1),
            role: Role::Admin,
            joined_ms: TimestampMs(5),
            joined_seq: None,
        };
        let v2 = Member {
            joined_seq: Some(4),
            ..v1.clone()
        };
        let (b1, b2) = (encode(&v1), encode(&v2));
        assert_eq!(b2.len(), b1.len() + 9);
        assert_eq!(decode::<Member>(&b1).unwrap(), v1);
        assert_eq!(decode::<Member>(&b2).unwrap(), v2);
        // An unknown version, or a tail cut short, is damage.
        let mut bad = b2.clone();
        bad[b1.len()] = 3;
        assert!(decode::<Member>(&bad).is_err());
        assert!(decode::<Member>(&b2[..b2.len() - 1]).is_err());

        let g = Group {
            id: ConvId(7),
            name: "g".into(),
            created_by: UserId(1),
            created_ms: TimestampMs(1),
            epoch: 2,
            settings: Some(GroupSettings {
                only_admins_send: true,
                avatar: Vec::new(),
                pending: None,
            }),
        };
        let b = encode(&g);
        assert_eq!(decode::<Group>(&b).unwrap(), g);
        let mut bad = b.clone();
        *bad.last_mut().unwrap() = 2; // the pending flag
        assert!(decode::<Group>(&bad).is_err());
    }

    #[test]
    fn a_scan_returns_everything_up_to_the_callers_limit() {
        let meta = crate::MemMeta::new();
        let mut b = MetaBatch::default();
        for g in 0..SCAN_RECORDS_MAX as u128 + 5 {
            b.put(&MemberOf {
                user: UserId(1),
                group: ConvId(g),
            });
        }
        meta.commit(&b).unwrap();
        let all = meta
            .scan::<MemberOf>(&keys::user(UserId(1)), usize::MAX)
            .unwrap();
        assert_eq!(all.len(), SCAN_RECORDS_MAX + 5);
        assert_eq!(
            meta.scan::<MemberOf>(&keys::user(UserId(1)), 3)
                .unwrap()
                .len(),
            3
        );
    }
}
