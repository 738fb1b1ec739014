//! Access tokens: EdDSA (Ed25519) JWTs with a pinned algorithm and a `kid`
//! naming the signing key. The key pair is generated on first start in
//! `<data>/keys/`. Verification accepts only `alg = EdDSA` and a known
//! `kid`; the session id inside is then checked against the store by the
//! caller.
//!
//! Tokens are issued with `jsonwebtoken` but verified here with `ring`'s
//! Ed25519 directly (header checked first, then the signature over
//! `header.payload`, then the claims): it is pure CPU (~tens of µs), cheap
//! enough to run on a shard thread.

use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair as _;
use serde::{Deserialize, Serialize};

/// The claims we put in a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// User id (decimal).
    pub sub: String,
    /// Device id.
    pub dev: u32,
    /// Session id.
    pub sid: u64,
    /// Issued at (seconds).
    pub iat: u64,
    /// Expires (seconds).
    pub exp: u64,
}

const ISSUER: &str = "starling";

/// The header fields verification looks at (others are ignored).
#[derive(Debug, Deserialize)]
struct JwtHeader {
    alg: String,
    kid: Option<String>,
}

/// Longest token accepted for verification (ours are ~300 bytes).
const TOKEN_BYTES_MAX: usize = 4096;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Past its expiry.
    Expired,
    /// Malformed, wrong algorithm, unknown key or bad signature.
    Invalid,
}

/// Signs and verifies access tokens.
pub struct TokenKeys {
    kid: String,
    encoding: EncodingKey,
    public: ring::signature::UnparsedPublicKey<Vec<u8>>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Loads the signing key from `dir`, generating it on first start.
    pub fn load_or_generate(dir: &Path) -> anyhow::Result<Self> {
        crate::fsutil::create_dir_durable(dir)?;
        let path = dir.join("access-token-ed25519.pk8");
        if !path.exists() {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| anyhow::anyhow!("generating the token signing key"))?;
            crate::fsutil::write_atomic(&path, pkcs8.as_ref(), 0o600)?;
        }
        let pkcs8 = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_pkcs8(&pkcs8).with_context(|| format!("loading {}", path.display()))
    }

    /// Keys from a PKCS#8 Ed25519 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> anyhow::Result<Self> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| anyhow::anyhow!("not an Ed25519 PKCS#8 key: {e}"))?;
        let public = pair.public_key().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &public);
        let kid = hex::encode(&digest.as_ref()[..8]);
        Ok(Self {
            kid,
            encoding: EncodingKey::from_ed_der(pkcs8),
            public: ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public),
        })
    }

    /// The key id.
    #[must_use]
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Issues a token for a session; returns it and its expiry (ms).
    pub fn issue(
        &self,
        user_id: u64,
        device_id: u32,
        session_id: u64,
        now_ms: u64,
        ttl_ms: u64,
    ) -> anyhow::Result<(String, u64)> {
        let exp_ms = now_ms + ttl_ms;
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: user_id.to_string(),
            dev: device_id,
            sid: session_id,
            iat: now_ms / 1000,
            exp: exp_ms.div_ceil(1000),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)?;
        Ok((token, exp_ms))
    }

    /// Verifies algorithm (`EdDSA` only), key id, signature, issuer and
    /// expiry at `now_ms`. Pure CPU; no allocation beyond the decoded parts.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Invalid);
        }
        let (signed, sig_b64) = token.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let (header_b64, claims_b64) = signed.split_once('.').ok_or(TokenError::Invalid)?;
        let header = B64.decode(header_b64).map_err(|_| TokenError::Invalid)?;
        let header: JwtHeader = serde_json::from_slice(&header).map_err(|_| TokenError::Invalid)?;
        if header.alg != "EdDSA" || header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(TokenError::Invalid);
        }
        let sig = B64.decode(sig_b64).map_err(|_| TokenError::Invalid)?;
        self.public
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| TokenError::Invalid)?;
        let claims = B64.decode(claims_b64).map_err(|_| TokenError::Invalid)?;
        let claims: Claims = serde_json::from_slice(&claims).map_err(|_| TokenError::Invalid)?;
        if claims.iss != ISSUER {
            return Err(TokenError::Invalid);
        }
        if claims.exp.saturating_mul(1000) <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        TokenKeys::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn round_trip_expiry_and_forgery() {
        let k = keys();
        let (t, exp) = k.issue(7, 2, 9, 1_000_000, 60_000).unwrap();
        assert_eq!(exp, 1_060_000);
        let c = k.verify(&t, 1_000_500).unwrap();
        assert_eq!((c.sub.as_str(), c.dev, c.sid), ("7", 2, 9));
        assert_eq!(k.verify(&t, 1_060_000).unwrap_err(), TokenError::Expired);
        // Another key (same kid forged into the header) fails.
        let other = keys();
        let (t2, _) = other.issue(7, 2, 9, 1_000_000, 60_000).unwrap();
        assert_eq!(k.verify(&t2, 1_000_500).unwrap_err(), TokenError::Invalid);
        // alg=none / HS256 tokens are refused before any key is used.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiI3In0.";
        assert_eq!(k.verify(none, 0).unwrap_err(), TokenError::Invalid);
        // Tampered payload.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = {
            let (t3, _) = k.issue(8, 2, 9, 1_000_000, 60_000).unwrap();
            t3.split('.').nth(1).unwrap().to_owned()
        };
        parts[1] = &forged;
        assert_eq!(
            k.verify(&parts.join("."), 1_000_500).unwrap_err(),
            TokenError::Invalid
        );
        // Truncated, empty, extra dots, garbage.
        for bad in ["", ".", "..", "a.b.c", &t[..t.len() - 3], &format!("{t}.x")] {
            assert_eq!(k.verify(bad, 1_000_500).unwrap_err(), TokenError::Invalid);
        }
        // HS256 header with our kid is refused.
        let hs = jsonwebtoken::encode(
            &Header {
                kid: Some(k.kid().to_owned()),
                ..Header::new(Algorithm::HS256)
            },
            &c,
            &jsonwebtoken::EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(k.verify(&hs, 1_000_500).unwrap_err(), TokenError::Invalid);
    }
}
