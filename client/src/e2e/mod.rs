//! End-to-end encryption on the server's key directory (`protocol/README.md`, "End-to-end key
//! directory" and "End-to-end encrypted messages (client convention)").
//!
//! A device's key material is a vodozemac Olm [`Account`], kept with its Olm sessions in the
//! profile directory (`olm.json`, owner-only, replaced atomically, written before anything is
//! uploaded or sent). It maps onto the directory as: identity key = the account's Ed25519 key;
//! signed prekey = the account's Curve25519 identity key, signed by the Ed25519 key; one-time
//! prekeys = the account's one-time keys (marked published once an upload was answered).
//!
//! [`olm`] builds and opens the message container (one Olm message per recipient device).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom as _;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use vodozemac::olm::{Account, AccountPickle, Session, SessionPickle};

use crate::error::ClientError;
use crate::v1;

pub mod olm;

/// Most one-time prekeys in one `UploadKeys` (the protocol's limit).
pub const ONE_TIME_PREKEYS_PER_UPLOAD_MAX: u32 = 100;

/// The file in the profile directory.
const FILE: &str = "olm.json";
/// The file of earlier versions (raw key pairs that cannot become an Olm account).
const LEGACY_FILE: &str = "keys.json";
/// The format version of `olm.json`.
const STATE_VERSION: u32 = 1;
/// The signed prekey's id (the Olm identity key never changes).
const SIGNED_PREKEY_ID: u32 = 1;

/// One Olm session with a peer device, as stored.
#[derive(Serialize, Deserialize)]
struct StoredSession {
    /// The peer device's Curve25519 identity key (base64).
    peer_key: String,
    session: SessionPickle,
}

/// One Olm session with a peer device.
pub(crate) struct PeerSession {
    /// The peer device's Curve25519 identity key (base64).
    pub(crate) peer_key: String,
    pub(crate) session: Session,
}

/// What `olm.json` holds.
#[derive(Serialize, Deserialize)]
struct State {
    version: u32,
    account: AccountPickle,
    registration_id: u32,
    /// Whether the identity and signed prekey have been uploaded.
    published: bool,
    /// Olm sessions per peer device (`"user:device"`), most recently used first.
    #[serde(default)]
    sessions: BTreeMap<String, Vec<StoredSession>>,
    /// Plaintexts this device decrypted or sent, by `"conversation:seq"`: an Olm message opens
    /// once, so `history` after `sync` reads them from here.
    #[serde(default)]
    plaintexts: BTreeMap<String, String>,
}

/// A device's key material and Olm sessions (secret: keep it in the profile directory only).
pub struct DeviceKeys {
    pub(crate) account: Account,
    registration_id: u32,
    published: bool,
    pub(crate) sessions: BTreeMap<String, Vec<PeerSession>>,
    pub(crate) plaintexts: BTreeMap<String, String>,
    /// Plaintexts of containers sealed and not yet acknowledged, by the container's SHA-256:
    /// this device's own copy, delivered back as soon as the server acknowledges it, opens
    /// from here before [`DeviceKeys::remember_sent`] keeps it by seq (not saved).
    pub(crate) sealing: BTreeMap<[u8; 32], String>,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("identity_key", &hex::encode(self.identity_key()))
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// Whether a fetched bundle's signed prekey carries a valid Ed25519 signature by its identity
/// key (the server checked it on upload; a client checks again).
#[must_use]
pub fn verify_bundle(b: &v1::KeyBundle) -> bool {
    b.signed_prekey.as_ref().is_some_and(|s| {
        UnparsedPublicKey::new(&ED25519, &b.identity_key)
            .verify(&s.public_key, &s.signature)
            .is_ok()
    })
}

impl DeviceKeys {
    /// A new Olm account (identity keys, no one-time keys yet).
    ///
    /// # Errors
    /// No system randomness.
    pub fn generate() -> Result<Self, ClientError> {
        let mut b = [0u8; 4];
        ring::rand::SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| ClientError::InvalidArgument("no system randomness".into()))?;
        Ok(DeviceKeys {
            account: Account::new(),
            registration_id: (u32::from_le_bytes(b) & 0x3fff).max(1),
            published: false,
            sessions: BTreeMap::new(),
            plaintexts: BTreeMap::new(),
            sealing: BTreeMap::new(),
        })
    }

    fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// The account kept in profile directory `dir`, or a new one (not yet saved).
    ///
    /// # Errors
    /// The file cannot be read or is damaged; the profile holds keys of an earlier version
    /// (`keys.json`), which cannot become an Olm account (`FAILED_PRECONDITION`-like
    /// [`ClientError::InvalidArgument`] naming what to do).
    pub fn load_or_generate(dir: &Path) -> Result<Self, ClientError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let s: State = serde_json::from_slice(&bytes)
                    .map_err(|source| ClientError::ProfileFormat { path, source })?;
                if s.version != STATE_VERSION {
                    return Err(ClientError::InvalidArgument(format!(
                        "{}: version {} of the end-to-end keys is not known to this version",
                        dir.join(FILE).display(),
                        s.version
                    )));
                }
                Ok(DeviceKeys {
                    account: Account::from_pickle(s.account),
                    registration_id: s.registration_id,
                    published: s.published,
                    sessions: s
                        .sessions
                        .into_iter()
                        .map(|(k, v)| {
                            let v = v
                                .into_iter()
                                .map(|s| PeerSession {
                                    peer_key: s.peer_key,
                                    session: Session::from_pickle(s.session),
                                })
                                .collect();
                            (k, v)
                        })
                        .collect(),
                    plaintexts: s.plaintexts,
                    sealing: BTreeMap::new(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let legacy = dir.join(LEGACY_FILE);
                if legacy.exists() {
                    return Err(ClientError::InvalidArgument(format!(
                        "{} holds end-to-end keys of an earlier version (raw key pairs, not an \
                         Olm account); they cannot be migrated: remove it and run `keys upload` \
                         to publish a new identity for this device",
                        legacy.display()
                    )));
                }
                Self::generate()
            }
            Err(source) => Err(ClientError::Profile { path, source }),
        }
    }

    /// Writes the account and sessions to profile directory `dir` (atomically, owner-only).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, dir: &Path) -> Result<(), ClientError> {
        let path = Self::path(dir);
        let state = State {
            version: STATE_VERSION,
            account: self.account.pickle(),
            registration_id: self.registration_id,
            published: self.published,
            sessions: self
                .sessions
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .iter()
                        .map(|s| StoredSession {
                            peer_key: s.peer_key.clone(),
                            session: s.session.pickle(),
                        })
                        .collect();
                    (k.clone(), v)
                })
                .collect(),
            plaintexts: self.plaintexts.clone(),
        };
        let bytes = serde_json::to_vec(&state).map_err(|source| ClientError::ProfileFormat {
            path: path.clone(),
            source,
        })?;
        crate::store::atomic_write(&path, &bytes)
            .map_err(|source| ClientError::Profile { path, source })
    }

    /// The Ed25519 identity public key.
    #[must_use]
    pub fn identity_key(&self) -> [u8; 32] {
        *self.account.ed25519_key().as_bytes()
    }

    /// The Curve25519 identity key (the signed prekey's public key).
    #[must_use]
    pub fn curve25519_key(&self) -> [u8; 32] {
        self.account.curve25519_key().to_bytes()
    }

    /// One-time keys the account holds (published or not; used ones are removed).
    #[must_use]
    pub fn one_time_count(&self) -> usize {
        self.account.stored_one_time_key_count()
    }

    /// An `UploadKeys` with `count` new one-time prekeys (at most
    /// [`ONE_TIME_PREKEYS_PER_UPLOAD_MAX`]) plus any generated earlier and not yet published,
    /// and the identity and signed prekey if they were never uploaded. Save the keys before
    /// sending it; call [`DeviceKeys::published`] once it was answered.
    ///
    /// # Errors
    /// `count` above the limit.
    pub fn next_upload(&mut self, count: u32) -> Result<v1::UploadKeys, ClientError> {
        if count > ONE_TIME_PREKEYS_PER_UPLOAD_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "at most {ONE_TIME_PREKEYS_PER_UPLOAD_MAX} one-time prekeys per upload"
            )));
        }
        let mut up = v1::UploadKeys::default();
        if !self.published {
            let curve = self.curve25519_key();
            up.identity_key = self.identity_key().to_vec().into();
            up.registration_id = self.registration_id;
            up.signed_prekey = Some(v1::SignedPrekey {
                key_id: SIGNED_PREKEY_ID,
                public_key: curve.to_vec().into(),
                signature: self.account.sign(curve).to_bytes().to_vec().into(),
            });
        }
        let pending = self.account.one_time_keys().len();
        let room = (ONE_TIME_PREKEYS_PER_UPLOAD_MAX as usize).saturating_sub(pending);
        self.account
            .generate_one_time_keys((count as usize).min(room));
        let mut keys: Vec<_> = self.account.one_time_keys().into_iter().collect();
        keys.sort_by_key(|(id, _)| *id);
        for (id, public) in keys {
            up.one_time_prekeys.push(v1::OneTimePrekey {
                key_id: wire_key_id(id)?,
                public_key: public.to_vec().into(),
            });
        }
        Ok(up)
    }

    /// The server accepted an upload: its one-time keys are published, later uploads carry
    /// only new ones.
    pub fn published(&mut self) {
        self.published = true;
        self.account.mark_keys_as_published();
    }
}

/// The directory's key id of an account's one-time key: its counter plus one (vodozemac
/// counts from 0; the base64 form is the counter's 8 big-endian bytes).
fn wire_key_id(id: vodozemac::KeyId) -> Result<u32, ClientError> {
    let raw = vodozemac::base64_decode(id.to_base64()).unwrap_or_default();
    let n = <[u8; 8]>::try_from(raw.as_slice()).map_or(u64::MAX, u64::from_be_bytes);
    u32::try_from(n.saturating_add(1)).map_err(|_| {
        ClientError::InvalidArgument("the account's one-time key ids are exhausted".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_signed_persist_and_publish_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = DeviceKeys::load_or_generate(dir.path()).unwrap();
        let up = k.next_upload(3).unwrap();
        assert_eq!(up.one_time_prekeys.len(), 3);
        assert_eq!(up.one_time_prekeys[0].key_id, 1);
        assert_eq!(up.identity_key.as_ref(), k.identity_key());
        let bundle = v1::KeyBundle {
            identity_key: up.identity_key.clone(),
            signed_prekey: up.signed_prekey.clone(),
            ..Default::default()
        };
        assert!(verify_bundle(&bundle));
        assert_eq!(
            bundle.signed_prekey.as_ref().unwrap().public_key.as_ref(),
            k.curve25519_key()
        );
        // Not answered: the next upload repeats the same keys with the same ids.
        k.save(dir.path()).unwrap();
        let mut again = DeviceKeys::load_or_generate(dir.path()).unwrap();
        let retry = again.next_upload(0).unwrap();
        assert_eq!(retry.one_time_prekeys, up.one_time_prekeys);
        again.published();
        again.save(dir.path()).unwrap();
        let mut third = DeviceKeys::load_or_generate(dir.path()).unwrap();
        assert_eq!(third.identity_key(), k.identity_key());
        let next = third.next_upload(1).unwrap();
        assert!(next.identity_key.is_empty() && next.signed_prekey.is_none());
        assert_eq!(next.one_time_prekeys.len(), 1);
        assert_eq!(next.one_time_prekeys[0].key_id, 4);
        assert!(third.next_upload(101).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut forged = bundle;
        forged.signed_prekey.as_mut().unwrap().public_key = vec![1; 32].into();
        assert!(!verify_bundle(&forged));
    }

    #[test]
    fn an_earlier_keys_json_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEGACY_FILE), b"{}").unwrap();
        let err = DeviceKeys::load_or_generate(dir.path()).unwrap_err();
        assert!(err.to_string().contains("remove it"), "{err}");
        std::fs::write(dir.path().join(FILE), b"not json").unwrap();
        assert!(matches!(
            DeviceKeys::load_or_generate(dir.path()),
            Err(ClientError::ProfileFormat { .. })
        ));
    }
}
