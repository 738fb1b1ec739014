//! Key material for the server's end-to-end key directory (`protocol/README.md`, "End-to-end
//! key directory"): a device's Ed25519 identity key, its X25519 signed prekey (signed by the
//! identity key) and one-time prekeys, generated here and kept, private halves included, in
//! the profile directory (`keys.json`, owner-only, replaced atomically, written before anything
//! is uploaded); and the check of a fetched bundle's signature.
//!
//! This is key management, not a messaging protocol: sessions and message encryption are the
//! E2E library's (for Olm, the signed prekey slot carries the device's Curve25519 identity key).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom as _;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::error::ClientError;
use crate::v1;

/// Most one-time prekeys in one `UploadKeys` (the protocol's limit).
pub const ONE_TIME_PREKEYS_PER_UPLOAD_MAX: u32 = 100;

/// The file in the profile directory.
const FILE: &str = "keys.json";

/// A device's key material (secret: keep it in the profile directory only).
#[derive(Serialize, Deserialize)]
pub struct DeviceKeys {
    /// The Ed25519 identity key pair, PKCS#8 (hex).
    identity_pkcs8: String,
    /// The registration id uploaded with the identity.
    registration_id: u32,
    /// The signed prekey: id and X25519 secret (hex).
    signed_prekey: (u32, String),
    /// One-time prekeys not yet known to be used: id → X25519 secret (hex).
    one_time: BTreeMap<u32, String>,
    /// The next one-time prekey id.
    next_id: u32,
    /// Whether the identity and signed prekey have been uploaded.
    published: bool,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("identity_key", &hex::encode(self.identity_key()))
            .field("one_time", &self.one_time.len())
            .finish_non_exhaustive()
    }
}

fn random<const N: usize>() -> Result<[u8; N], ClientError> {
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ClientError::InvalidArgument("no system randomness".into()))?;
    Ok(b)
}

/// The X25519 public key of `secret` (RFC 7748: clamped scalar times the base point).
#[must_use]
pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    curve25519_dalek::MontgomeryPoint::mul_base_clamped(*secret).to_bytes()
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
    /// New keys: an identity, a signed prekey, no one-time prekeys yet.
    ///
    /// # Errors
    /// No system randomness.
    pub fn generate() -> Result<Self, ClientError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| ClientError::InvalidArgument("cannot generate an identity key".into()))?;
        let reg = u32::from_le_bytes(random::<4>()?) & 0x3fff;
        Ok(DeviceKeys {
            identity_pkcs8: hex::encode(pkcs8.as_ref()),
            registration_id: reg.max(1),
            signed_prekey: (1, hex::encode(random::<32>()?)),
            one_time: BTreeMap::new(),
            next_id: 1,
            published: false,
        })
    }

    fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// The keys kept in profile directory `dir`, or new ones (not yet saved).
    ///
    /// # Errors
    /// The file cannot be read or is damaged.
    pub fn load_or_generate(dir: &Path) -> Result<Self, ClientError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| ClientError::ProfileFormat { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::generate(),
            Err(source) => Err(ClientError::Profile { path, source }),
        }
    }

    /// Writes the keys to profile directory `dir` (atomically, owner-only).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, dir: &Path) -> Result<(), ClientError> {
        let path = Self::path(dir);
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|source| ClientError::ProfileFormat {
                path: path.clone(),
                source,
            })?;
        crate::store::atomic_write(&path, &bytes)
            .map_err(|source| ClientError::Profile { path, source })
    }

    fn identity(&self) -> Ed25519KeyPair {
        let pkcs8 = hex::decode(&self.identity_pkcs8).unwrap_or_default();
        // Only ever written from a generated key pair; a damaged file fails `load`'s callers
        // here with an empty key, which the server refuses.
        Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap_or_else(|_| {
            Ed25519KeyPair::from_seed_unchecked(&[0; 32]).unwrap_or_else(|_| unreachable!())
        })
    }

    /// The Ed25519 identity public key.
    #[must_use]
    pub fn identity_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.identity().public_key().as_ref());
        k
    }

    fn secret(hex_secret: &str) -> [u8; 32] {
        let mut s = [0u8; 32];
        if let Ok(b) = hex::decode(hex_secret)
            && b.len() == 32
        {
            s.copy_from_slice(&b);
        }
        s
    }

    /// The signed prekey's id and X25519 public key.
    #[must_use]
    pub fn signed_prekey_public(&self) -> (u32, [u8; 32]) {
        (
            self.signed_prekey.0,
            x25519_public(&Self::secret(&self.signed_prekey.1)),
        )
    }

    /// The X25519 secret of one-time prekey `id`, if this device still has it.
    #[must_use]
    pub fn one_time_secret(&self, id: u32) -> Option<[u8; 32]> {
        self.one_time.get(&id).map(|s| Self::secret(s))
    }

    /// One-time prekeys kept here.
    #[must_use]
    pub fn one_time_count(&self) -> usize {
        self.one_time.len()
    }

    /// An `UploadKeys` with `count` new one-time prekeys (at most
    /// [`ONE_TIME_PREKEYS_PER_UPLOAD_MAX`]), and the identity and signed prekey if they were
    /// never uploaded. Save the keys before sending it; call [`DeviceKeys::published`] once it
    /// was answered.
    ///
    /// # Errors
    /// `count` above the limit; no system randomness.
    pub fn next_upload(&mut self, count: u32) -> Result<v1::UploadKeys, ClientError> {
        if count > ONE_TIME_PREKEYS_PER_UPLOAD_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "at most {ONE_TIME_PREKEYS_PER_UPLOAD_MAX} one-time prekeys per upload"
            )));
        }
        let mut up = v1::UploadKeys::default();
        if !self.published {
            let (id, public) = self.signed_prekey_public();
            up.identity_key = self.identity_key().to_vec().into();
            up.registration_id = self.registration_id;
            up.signed_prekey = Some(v1::SignedPrekey {
                key_id: id,
                public_key: public.to_vec().into(),
                signature: self.identity().sign(&public).as_ref().to_vec().into(),
            });
        }
        for _ in 0..count {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            let secret = random::<32>()?;
            self.one_time.insert(id, hex::encode(secret));
            up.one_time_prekeys.push(v1::OneTimePrekey {
                key_id: id,
                public_key: x25519_public(&secret).to_vec().into(),
            });
        }
        Ok(up)
    }

    /// The server accepted an upload: later ones carry only new one-time prekeys.
    pub fn published(&mut self) {
        self.published = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_signed_and_x25519_matches_rfc7748() {
        // RFC 7748 §6.1, Alice's key pair.
        let secret: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            hex::encode(x25519_public(&secret)),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut k = DeviceKeys::load_or_generate(dir.path()).unwrap();
        let up = k.next_upload(3).unwrap();
        assert_eq!(up.one_time_prekeys.len(), 3);
        let bundle = v1::KeyBundle {
            identity_key: up.identity_key.clone(),
            signed_prekey: up.signed_prekey.clone(),
            ..Default::default()
        };
        assert!(verify_bundle(&bundle));
        k.published();
        k.save(dir.path()).unwrap();
        let mut again = DeviceKeys::load_or_generate(dir.path()).unwrap();
        assert_eq!(again.identity_key(), k.identity_key());
        let next = again.next_upload(1).unwrap();
        assert!(next.identity_key.is_empty() && next.signed_prekey.is_none());
        assert_eq!(next.one_time_prekeys[0].key_id, 4);
        assert!(again.next_upload(101).is_err());
        let mut forged = bundle;
        forged.signed_prekey.as_mut().unwrap().public_key = vec![1; 32].into();
        assert!(!verify_bundle(&forged));
    }
}
