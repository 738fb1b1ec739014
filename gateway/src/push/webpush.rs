//! Web Push: a notification is an HTTP POST to the subscription's endpoint (RFC 8030) with
//! VAPID authentication (RFC 8292: an ES256 JWT for the endpoint's origin, signed with the
//! server's key, and that key) and the payload encrypted for the subscription's keys (RFC 8291,
//! `aes128gcm` of RFC 8188: ECDH P-256 with a fresh key per message, HKDF-SHA-256, AES-128-GCM,
//! one record). Everything is ring's.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use ring::{aead, agreement, hkdf};

use super::http::{self, Url};
use super::{Notification, Outcome, Provider};
use crate::accounts::push::{WebPushKeys, web_push_keys};
use crate::config::WebPushConfig;
use starling_storage::meta::PushToken;

/// The record size announced in the header (one record carries the whole payload).
const RECORD_SIZE: u32 = 4096;
/// How long a VAPID token is valid (RFC 8292 allows at most 24 h).
const VAPID_TTL_S: u64 = 12 * 3600;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The Web Push provider.
#[derive(Debug)]
pub struct WebPush {
    key: EcdsaKeyPair,
    public_b64: String,
    subject: String,
    ttl_s: u32,
    http: http::Client,
    private_endpoints: bool,
    rng: SystemRandom,
}

/// Reads a PKCS#8 key from PEM (`-----BEGIN PRIVATE KEY-----`) or DER.
pub(super) fn pkcs8(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(bytes.to_vec());
    };
    let b64: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    anyhow::ensure!(!b64.is_empty(), "no PRIVATE KEY (PKCS#8) PEM block");
    Ok(base64::engine::general_purpose::STANDARD.decode(b64.trim())?)
}

impl WebPush {
    /// The provider of `[push.web_push]`, checking push services' certificates with `tls`.
    pub fn new(
        cfg: &WebPushConfig,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let path = &cfg.vapid_private_key_file;
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "push.web_push.vapid_private_key_file {}: {e}",
                path.display()
            )
        })?;
        let rng = SystemRandom::new();
        let der = pkcs8(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "push.web_push.vapid_private_key_file {}: {e}",
                path.display()
            )
        })?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).map_err(
            |e| {
                anyhow::anyhow!(
                    "push.web_push.vapid_private_key_file {}: not a P-256 PKCS#8 key ({e})",
                    path.display()
                )
            },
        )?;
        Ok(Self {
            public_b64: b64(key.public_key().as_ref()),
            key,
            subject: cfg.vapid_subject.clone(),
            ttl_s: cfg.ttl_s,
            http: http::Client::new(tls, timeout),
            private_endpoints: cfg.dangerous_allow_private_endpoints,
            rng,
        })
    }

    /// The application server key (the VAPID public key, uncompressed, base64url): what the
    /// web app passes as `applicationServerKey` when it subscribes.
    #[must_use]
    pub fn public_key(&self) -> &str {
        &self.public_b64
    }

    /// The VAPID `Authorization` header value for `origin`.
    fn authorization(&self, origin: &str, now_s: u64) -> Result<String, String> {
        let header = b64(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = b64(serde_json::json!({
            "aud": origin,
            "exp": now_s + VAPID_TTL_S,
            "sub": self.subject,
        })
        .to_string()
        .as_bytes());
        let input = format!("{header}.{claims}");
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| "signing the VAPID token failed".to_owned())?;
        Ok(format!(
            "vapid t={input}.{}, k={}",
            b64(sig.as_ref()),
            self.public_b64
        ))
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]) -> Result<(), String> {
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| "HKDF failed".to_owned())
}

/// Encrypts `plaintext` for the subscription's keys (RFC 8291): the `aes128gcm` body.
pub fn encrypt(
    keys: &WebPushKeys,
    plaintext: &[u8],
    rng: &SystemRandom,
) -> Result<Vec<u8>, String> {
    let fail = |what: &str| format!("Web Push encryption: {what}");
    let mine = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, rng)
        .map_err(|_| fail("no key"))?;
    let as_public = mine
        .compute_public_key()
        .map_err(|_| fail("no public key"))?;
    let as_public = as_public.as_ref().to_vec();
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, keys.p256dh);
    let ecdh = agreement::agree_ephemeral(mine, &peer, <[u8]>::to_vec)
        .map_err(|_| fail("the subscription's key is not a P-256 point"))?;
    let mut ikm = [0u8; 32];
    hkdf(
        &keys.auth,
        &ecdh,
        &[b"WebPush: info\0", &keys.p256dh, &as_public],
        &mut ikm,
    )?;
    let salt: [u8; 16] = ring::rand::generate(rng)
        .map_err(|_| fail("no randomness"))?
        .expose();
    let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
    hkdf(&salt, &ikm, &[b"Content-Encoding: aes128gcm\0"], &mut cek)?;
    hkdf(&salt, &ikm, &[b"Content-Encoding: nonce\0"], &mut nonce)?;
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_128_GCM, &cek).map_err(|_| fail("AES key"))?,
    );
    // The last (and only) record: the payload and its delimiter 0x02, no padding.
    let mut record = plaintext.to_vec();
    record.push(2);
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::empty(),
        &mut record,
    )
    .map_err(|_| fail("AES-GCM"))?;
    let mut body = Vec::with_capacity(16 + 4 + 1 + 65 + record.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(u8::try_from(as_public.len()).map_err(|_| fail("key id"))?);
    body.extend_from_slice(&as_public);
    body.extend_from_slice(&record);
    Ok(body)
}

impl Provider for WebPush {
    fn name(&self) -> &'static str {
        "web_push"
    }

    fn send(&self, token: &PushToken, n: &Notification, now_ms: u64) -> Outcome {
        let Ok(json) = std::str::from_utf8(&token.token) else {
            return Outcome::InvalidToken("the stored subscription is not UTF-8".into());
        };
        let keys = match web_push_keys(json) {
            Ok(k) => k,
            Err(e) => return Outcome::InvalidToken(e.message),
        };
        let url = match Url::parse(&keys.endpoint) {
            Ok(u) => u,
            Err(e) => return Outcome::InvalidToken(e),
        };
        let body = match encrypt(&keys, n.payload().as_bytes(), &self.rng) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e),
        };
        let auth = match self.authorization(&url.origin(), now_ms / 1000) {
            Ok(a) => a,
            Err(e) => return Outcome::Failed(e),
        };
        let headers = [
            ("Authorization", auth),
            ("TTL", self.ttl_s.to_string()),
            ("Urgency", "high".to_owned()),
            ("Topic", n.collapse_key()),
            ("Content-Encoding", "aes128gcm".to_owned()),
            ("Content-Type", "application/octet-stream".to_owned()),
        ];
        let reach = if self.private_endpoints {
            http::Reach::Any
        } else {
            http::Reach::PublicOnly
        };
        match self.http.post(&url, &headers, &body, reach) {
            // A subscription naming an internal host is never sent to (the server would be a
            // client's way into its own network): the token goes.
            Err(http::PostError::Refused(why)) => Outcome::InvalidToken(why),
            Err(http::PostError::Failed(e)) => Outcome::Retry {
                after_ms: None,
                why: e,
            },
            Ok(r) => match r.status {
                200..=299 => Outcome::Sent,
                404 | 410 => Outcome::InvalidToken(format!("{} {}", r.status, r.body.trim())),
                429 | 500..=599 => Outcome::Retry {
                    after_ms: r.retry_after_s.map(|s| s.saturating_mul(1000)),
                    why: format!("{} {}", r.status, r.body.trim()),
                },
                s => Outcome::Failed(format!("{s} {}", r.body.trim())),
            },
        }
    }
}
