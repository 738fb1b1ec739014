//! The profile directory: small JSON files, each replaced atomically (write a
//! temporary file, fsync it, rename it over the old one, fsync the
//! directory), so a crash leaves either the old or the new version.
//!
//! - `credentials.json` — the session (tokens; mode 0600).
//! - `cursors.json` — per conversation, the highest contiguous seq handed to
//!   the application. Never moves backwards.
//! - `outbox.json` — messages accepted by [`crate::Client::send`] but not yet
//!   acknowledged, each with its `client_msg_id`; an entry leaves only when
//!   its `SendAck` (or a permanent rejection) arrives.
//! - `contacts.json` — `+phone` → user id, as contact discovery resolved
//!   them, so that a phone number is looked up once, not on every command.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use starling_protocol::v1;

use crate::error::ClientError;
use crate::ids::ClientMsgId;

/// A profile directory.
#[derive(Debug, Clone)]
pub struct Profile {
    dir: PathBuf,
}

/// The session stored in `credentials.json`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The user.
    pub user_id: u64,
    /// This device.
    pub device_id: u32,
    /// The session.
    pub session_id: u64,
    /// Short-lived access token.
    pub access_token: String,
    /// When it expires (ms since the epoch).
    pub access_expires_at_ms: u64,
    /// Single-use refresh token.
    pub refresh_token: String,
    /// When it expires.
    pub refresh_expires_at_ms: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are secrets: never in logs.
        f.debug_struct("Credentials")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("session_id", &self.session_id)
            .field("access_expires_at_ms", &self.access_expires_at_ms)
            .finish_non_exhaustive()
    }
}

impl From<&v1::SessionGranted> for Credentials {
    fn from(g: &v1::SessionGranted) -> Self {
        Self {
            user_id: g.user_id,
            device_id: g.device_id,
            session_id: g.session_id,
            access_token: g.access_token.clone(),
            access_expires_at_ms: g.access_expires_at_ms,
            refresh_token: g.refresh_token.clone(),
            refresh_expires_at_ms: g.refresh_expires_at_ms,
        }
    }
}

const CREDENTIALS: &str = "credentials.json";
const CURSORS: &str = "cursors.json";
const OUTBOX: &str = "outbox.json";
const CONTACTS: &str = "contacts.json";

/// Phone numbers remembered in `contacts.json`; beyond, the entry that sorts
/// first is dropped (it is looked up again when needed).
pub const CONTACTS_MAX: usize = 10_000;

impl Profile {
    /// Opens (creating, mode 0700) a profile directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ClientError> {
        let dir = dir.into();
        let io = |source| ClientError::Profile {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(Self { dir })
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored session, if any.
    pub fn credentials(&self) -> Result<Option<Credentials>, ClientError> {
        read_json(&self.dir.join(CREDENTIALS))
    }

    /// Stores the session (atomically, owner-only).
    pub fn save_credentials(&self, creds: &Credentials) -> Result<(), ClientError> {
        write_json(&self.dir.join(CREDENTIALS), creds)
    }

    /// Forgets the session (after logout).
    pub fn clear_credentials(&self) -> Result<(), ClientError> {
        let path = self.dir.join(CREDENTIALS);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir).map_err(|source| ClientError::Profile { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ClientError::Profile { path, source }),
        }
    }

    /// Opens the cursor store for `user_id`; cursors of another user (a
    /// different account logged in with this profile before) are dropped.
    pub fn cursors(&self, user_id: u64) -> Result<CursorStore, ClientError> {
        CursorStore::open(self.dir.join(CURSORS), user_id)
    }

    /// Opens the outbox.
    pub fn outbox(&self) -> Result<Outbox, ClientError> {
        Outbox::open(self.dir.join(OUTBOX))
    }

    /// Opens the phone numbers resolved for `user_id`; those of another
    /// user (a different account logged in with this profile before) are
    /// dropped.
    pub fn contacts(&self, user_id: u64) -> Result<ContactBook, ClientError> {
        ContactBook::open(self.dir.join(CONTACTS), user_id)
    }
}

/// `contacts.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ContactFile {
    user_id: u64,
    /// `+phone` (E.164, as typed) → user id.
    phones: BTreeMap<String, u64>,
}

/// Phone numbers resolved by contact discovery, persisted (at most
/// [`CONTACTS_MAX`]). Numbers that matched nobody are not remembered.
#[derive(Debug)]
pub struct ContactBook {
    path: PathBuf,
    file: ContactFile,
}

impl ContactBook {
    fn open(path: PathBuf, user_id: u64) -> Result<Self, ClientError> {
        let file = match read_json::<ContactFile>(&path)? {
            Some(f) if f.user_id == user_id => f,
            _ => ContactFile {
                user_id,
                phones: BTreeMap::new(),
            },
        };
        Ok(Self { path, file })
    }

    /// The user a phone number was resolved to.
    #[must_use]
    pub fn get(&self, phone: &str) -> Option<u64> {
        self.file.phones.get(phone).copied()
    }

    /// Remembers that `phone` is `user_id` (on disk before it returns).
    pub fn insert(&mut self, phone: &str, user_id: u64) -> Result<(), ClientError> {
        if self.get(phone) == Some(user_id) {
            return Ok(());
        }
        if !self.file.phones.contains_key(phone) && self.file.phones.len() >= CONTACTS_MAX {
            self.file.phones.pop_first();
        }
        self.file.phones.insert(phone.to_owned(), user_id);
        write_json(&self.path, &self.file)
    }

    /// Forgets a phone number (it is looked up again next time).
    pub fn remove(&mut self, phone: &str) -> Result<(), ClientError> {
        if self.file.phones.remove(phone).is_some() {
            write_json(&self.path, &self.file)?;
        }
        Ok(())
    }

    /// Every remembered number.
    #[must_use]
    pub fn all(&self) -> &BTreeMap<String, u64> {
        &self.file.phones
    }
}

/// `cursors.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CursorFile {
    user_id: u64,
    /// conversation_id → highest contiguous seq handed to the application.
    cursors: BTreeMap<u64, u64>,
}

/// Per-conversation cursors, persisted. Monotonic: [`advance`](Self::advance)
/// never moves a cursor backwards.
#[derive(Debug)]
pub struct CursorStore {
    path: PathBuf,
    file: CursorFile,
    dirty: bool,
}

impl CursorStore {
    fn open(path: PathBuf, user_id: u64) -> Result<Self, ClientError> {
        let file = match read_json::<CursorFile>(&path)? {
            Some(f) if f.user_id == user_id => f,
            _ => CursorFile {
                user_id,
                cursors: BTreeMap::new(),
            },
        };
        Ok(Self {
            path,
            file,
            dirty: false,
        })
    }

    /// The cursor of a conversation (0: nothing yet).
    #[must_use]
    pub fn get(&self, conversation_id: u64) -> u64 {
        self.file
            .cursors
            .get(&conversation_id)
            .copied()
            .unwrap_or(0)
    }

    /// Every known cursor.
    #[must_use]
    pub fn all(&self) -> &BTreeMap<u64, u64> {
        &self.file.cursors
    }

    /// Moves a cursor forward to `seq`; returns false (and changes nothing)
    /// if it is already there or beyond. Call [`save`](Self::save) after.
    pub fn advance(&mut self, conversation_id: u64, seq: u64) -> bool {
        let cur = self.file.cursors.entry(conversation_id).or_insert(0);
        if seq > *cur {
            *cur = seq;
            self.dirty = true;
            true
        } else {
            false
        }
    }

    /// Writes the cursors if they changed since the last save.
    pub fn save(&mut self) -> Result<(), ClientError> {
        if self.dirty {
            write_json(&self.path, &self.file)?;
            self.dirty = false;
        }
        Ok(())
    }
}

/// Who a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A user (their 1:1 conversation).
    User(u64),
    /// A conversation by id (1:1 or group).
    Conversation(u64),
}

impl Target {
    pub(crate) fn to_wire(self) -> v1::Recipient {
        use v1::recipient::Target as T;
        v1::Recipient {
            target: Some(match self {
                Target::User(u) => T::UserId(u),
                Target::Conversation(c) => T::ConversationId(c),
            }),
        }
    }
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Its id; every retry uses it.
    pub client_msg_id: ClientMsgId,
    /// Where it goes.
    pub to: Target,
    /// Type of the body, e.g. `text/plain`.
    pub content_type: String,
    /// The body (hex in the file).
    #[serde(with = "hex_bytes")]
    pub body: Vec<u8>,
    /// When it was queued (ms since the epoch).
    pub queued_at_ms: u64,
    /// The attachment, an encoded `MediaRef` (hex in the file; empty: none; absent in files
    /// written before media existed).
    #[serde(default, with = "hex_bytes")]
    pub media: Vec<u8>,
    /// The seq of the message it replies to (0: none; absent in files written before replies).
    #[serde(default)]
    pub reply_to_seq: u64,
    /// An edit, delete or reaction of an earlier message instead of a new message: an encoded
    /// `MessageChange` (hex in the file; empty: a message; absent in files written before
    /// changes existed).
    #[serde(default, with = "hex_bytes")]
    pub change: Vec<u8>,
    /// A change of the conversation's disappearing-messages timer to this many seconds (0: off)
    /// instead of a message (absent in files written before timers existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_timer: Option<u64>,
}

impl OutboxEntry {
    /// The attachment, if any (an entry whose stored MediaRef does not decode has none).
    #[must_use]
    pub fn media_ref(&self) -> Option<Box<v1::MediaRef>> {
        if self.media.is_empty() {
            return None;
        }
        prost::Message::decode(&self.media[..]).ok().map(Box::new)
    }

    /// The change it makes, if it is one (an entry whose stored change does not decode is
    /// none).
    #[must_use]
    pub fn change(&self) -> Option<Box<v1::MessageChange>> {
        if self.change.is_empty() {
            return None;
        }
        prost::Message::decode(&self.change[..]).ok().map(Box::new)
    }

    /// The `Send` frame body for this entry (the same for every attempt; `first_attempt` is
    /// false — only the driver knows whether an earlier copy was ever written).
    #[must_use]
    pub fn to_send(&self) -> v1::Send {
        v1::Send {
            client_msg_id: self.client_msg_id.0.to_vec().into(),
            to: Some(self.to.to_wire()),
            content_type: self.content_type.clone(),
            body: self.body.clone().into(),
            media: self.media_ref(),
            reply_to_seq: self.reply_to_seq,
            first_attempt: false,
            change: self.change(),
            set_timer: self
                .set_timer
                .map(|seconds| Box::new(v1::DisappearingTimer { seconds })),
        }
    }
}

mod hex_bytes {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// `outbox.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct OutboxFile {
    entries: Vec<OutboxEntry>,
}

/// Messages waiting for their `SendAck`, in the order they were queued.
/// Every change is on disk before the call returns.
#[derive(Debug)]
pub struct Outbox {
    path: PathBuf,
    file: OutboxFile,
}

impl Outbox {
    fn open(path: PathBuf) -> Result<Self, ClientError> {
        let file = read_json(&path)?.unwrap_or_default();
        Ok(Self { path, file })
    }

    /// Queues a message durably.
    pub fn push(&mut self, entry: OutboxEntry) -> Result<(), ClientError> {
        self.file.entries.push(entry);
        if let Err(e) = write_json(&self.path, &self.file) {
            self.file.entries.pop();
            return Err(e);
        }
        Ok(())
    }

    /// Removes a message (acknowledged or rejected for good).
    pub fn remove(&mut self, id: &ClientMsgId) -> Result<Option<OutboxEntry>, ClientError> {
        let Some(pos) = self
            .file
            .entries
            .iter()
            .position(|e| e.client_msg_id == *id)
        else {
            return Ok(None);
        };
        let entry = self.file.entries.remove(pos);
        write_json(&self.path, &self.file)?;
        Ok(Some(entry))
    }

    /// Removes every message.
    pub fn clear(&mut self) -> Result<usize, ClientError> {
        let n = self.file.entries.len();
        self.file.entries.clear();
        write_json(&self.path, &self.file)?;
        Ok(n)
    }

    /// The queued messages, oldest first.
    #[must_use]
    pub fn entries(&self) -> &[OutboxEntry] {
        &self.file.entries
    }

    /// The entry with this id.
    #[must_use]
    pub fn find(&self, id: &ClientMsgId) -> Option<&OutboxEntry> {
        self.file.entries.iter().find(|e| e.client_msg_id == *id)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, ClientError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| ClientError::ProfileFormat {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ClientError::Profile {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ClientError> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|source| ClientError::ProfileFormat {
            path: path.to_owned(),
            source,
        })?;
    bytes.push(b'\n');
    atomic_write(path, &bytes).map_err(|source| ClientError::Profile {
        path: path.to_owned(),
        source,
    })
}

/// Replaces `path` with `bytes`: temp file (mode 0600) + fsync + rename +
/// directory fsync.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> OutboxEntry {
        OutboxEntry {
            client_msg_id: ClientMsgId::random().unwrap(),
            to: Target::User(u64::from(n)),
            content_type: "text/plain".to_owned(),
            body: vec![n, 0, 255],
            queued_at_ms: 1000 + u64::from(n),
            media: Vec::new(),
            reply_to_seq: 0,
            change: Vec::new(),
            set_timer: None,
        }
    }

    #[test]
    fn outbox_survives_reopen_with_the_same_client_msg_ids() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path().join("p")).unwrap();
        let (a, b, c) = (entry(1), entry(2), entry(3));
        {
            let mut ob = profile.outbox().unwrap();
            for e in [&a, &b, &c] {
                ob.push(e.clone()).unwrap();
            }
            assert_eq!(ob.remove(&b.client_msg_id).unwrap(), Some(b.clone()));
            assert_eq!(ob.remove(&b.client_msg_id).unwrap(), None);
        }
        // "Restart": the retry uses exactly the ids and bytes queued before.
        let ob = profile.outbox().unwrap();
        assert_eq!(ob.entries(), &[a.clone(), c.clone()]);
        let send = ob.entries()[0].to_send();
        assert_eq!(&send.client_msg_id[..], &a.client_msg_id.0[..]);
        assert_eq!(&send.body[..], &[1, 0, 255]);
        assert_eq!(
            send.to.unwrap().target,
            Some(v1::recipient::Target::UserId(1))
        );
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(profile.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["outbox.json".to_owned()]);
    }

    #[test]
    fn cursors_are_monotonic_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        {
            let mut cs = profile.cursors(7).unwrap();
            assert_eq!(cs.get(1), 0);
            assert!(cs.advance(1, 5));
            assert!(!cs.advance(1, 3), "a cursor never moves backwards");
            assert!(!cs.advance(1, 5));
            assert!(cs.advance(2, 1));
            cs.save().unwrap();
            assert!(cs.advance(1, 9));
            // Not saved: lost on "crash".
        }
        let mut cs = profile.cursors(7).unwrap();
        assert_eq!(cs.get(1), 5);
        assert_eq!(cs.get(2), 1);
        assert!(!cs.advance(1, 4));
        // Another user on the same profile starts from scratch.
        assert!(profile.cursors(8).unwrap().all().is_empty());
    }

    #[test]
    fn credentials_round_trip_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        assert_eq!(profile.credentials().unwrap(), None);
        let creds = Credentials {
            user_id: 1,
            device_id: 2,
            session_id: 3,
            access_token: "secret-a".to_owned(),
            access_expires_at_ms: 4,
            refresh_token: "secret-r".to_owned(),
            refresh_expires_at_ms: 5,
        };
        profile.save_credentials(&creds).unwrap();
        assert_eq!(profile.credentials().unwrap(), Some(creds.clone()));
        assert!(!format!("{creds:?}").contains("secret"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(CREDENTIALS))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        profile.clear_credentials().unwrap();
        profile.clear_credentials().unwrap();
        assert_eq!(profile.credentials().unwrap(), None);
    }

    #[test]
    fn contacts_persist_per_user_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        {
            let mut book = profile.contacts(7).unwrap();
            assert_eq!(book.get("+15550100001"), None);
            book.insert("+15550100001", 42).unwrap();
            book.insert("+15550100002", 43).unwrap();
            book.remove("+15550100002").unwrap();
        }
        let book = profile.contacts(7).unwrap();
        assert_eq!(book.get("+15550100001"), Some(42));
        assert_eq!(book.get("+15550100002"), None);
        // Another user on the same profile starts from scratch.
        assert!(profile.contacts(8).unwrap().all().is_empty());
        let mut book = profile.contacts(9).unwrap();
        for i in 0..CONTACTS_MAX {
            book.file.phones.insert(format!("+1{i:010}"), 1);
        }
        book.insert("+19999999999", 2).unwrap();
        assert_eq!(book.all().len(), CONTACTS_MAX);
        assert_eq!(book.get("+19999999999"), Some(2));
    }

    #[test]
    fn a_timer_change_survives_reopen_and_older_files_read_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        let timer = OutboxEntry {
            to: Target::Conversation(9),
            content_type: String::new(),
            body: Vec::new(),
            set_timer: Some(60),
            ..entry(4)
        };
        profile.outbox().unwrap().push(timer.clone()).unwrap();
        let ob = profile.outbox().unwrap();
        assert_eq!(ob.entries(), std::slice::from_ref(&timer));
        let send = ob.entries()[0].to_send();
        assert_eq!(send.set_timer.map(|t| t.seconds), Some(60));
        // A message is written without the field, as before timers existed, and reads back.
        let plain = serde_json::to_string(&entry(5)).unwrap();
        assert!(!plain.contains("set_timer"), "{plain}");
        let back: OutboxEntry = serde_json::from_str(&plain).unwrap();
        assert_eq!(back.set_timer, None);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(OUTBOX), "{not json").unwrap();
        let err = profile.outbox().unwrap_err();
        assert!(matches!(err, ClientError::ProfileFormat { .. }), "{err}");
    }
}
