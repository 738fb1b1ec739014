//! Argon2id password hashes (PHC strings), and the one rule that keeps
//! sign-in from telling who has an account: every password login costs
//! exactly one Argon2id verification with the configured parameters. An
//! identifier with no account, or an account with no password, is verified
//! against a fixed dummy PHC string made at start-up with the same
//! parameters (and a random password nobody knows), so it takes as long and
//! fails the same way.
//!
//! Both operations are CPU-heavy (tens of ms) and run only on the hashing
//! pool ([`crate::runtime::CpuPool`]), never on a shard or the blocking pool.

use argon2::{PasswordHasher as _, PasswordVerifier as _};

/// Shortest password accepted by SetPassword, in characters.
pub const PASSWORD_CHARS_MIN: usize = 8;
/// Longest password accepted by SetPassword, in characters.
pub const PASSWORD_CHARS_MAX: usize = 256;

/// A failure to hash (ours, not the client's).
#[derive(Debug, Clone, thiserror::Error)]
pub enum HashError {
    /// The configured Argon2 parameters were refused.
    #[error("argon2 parameters: {0}")]
    Params(String),
    /// No randomness for a salt.
    #[error("no randomness for a salt")]
    Random,
    /// Hashing failed.
    #[error("argon2: {0}")]
    Hash(String),
}

/// The password hasher: Argon2id with the configured costs.
#[derive(Debug)]
pub struct Passwords {
    argon: argon2::Argon2<'static>,
    /// Verified instead of a hash that does not exist.
    dummy_phc: String,
    rng: ring::rand::SystemRandom,
}

impl Passwords {
    /// A hasher with `memory_kib` and `iterations` (one lane), and its dummy
    /// PHC string (which costs one hash now).
    ///
    /// # Errors
    /// The parameters are refused, or there is no randomness.
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, HashError> {
        let params = argon2::Params::new(memory_kib, iterations, 1, None)
            .map_err(|e| HashError::Params(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut p = Self {
            argon,
            dummy_phc: String::new(),
            rng: ring::rand::SystemRandom::new(),
        };
        let secret: [u8; 32] = ring::rand::generate(&p.rng)
            .map_err(|_| HashError::Random)?
            .expose();
        p.dummy_phc = p.hash(&hex::encode(secret))?;
        Ok(p)
    }

    /// Hashes `password` with a fresh salt into a PHC string.
    ///
    /// # Errors
    /// No randomness, or Argon2 failed.
    pub fn hash(&self, password: &str) -> Result<String, HashError> {
        let salt: [u8; 16] = ring::rand::generate(&self.rng)
            .map_err(|_| HashError::Random)?
            .expose();
        self.argon
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| HashError::Hash(e.to_string()))
    }

    /// Whether `password` matches `phc`. With no `phc` (no account, or no
    /// password set) it verifies against the dummy instead and answers
    /// false: the same work either way.
    #[must_use]
    pub fn verify(&self, password: &str, phc: Option<&str>) -> bool {
        let matches = self
            .argon
            .verify_password(password.as_bytes(), phc.unwrap_or(&self.dummy_phc))
            .is_ok();
        matches && phc.is_some()
    }

    /// The dummy PHC string (for tests of its parameters).
    #[must_use]
    pub fn dummy_phc(&self) -> &str {
        &self.dummy_phc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `$argon2id$v=19$m=..,t=..,p=..` head of a PHC string.
    fn params_of(phc: &str) -> &str {
        phc.rsplitn(3, '$').nth(2).unwrap()
    }

    #[test]
    fn hashes_verify_and_the_dummy_has_the_same_parameters() {
        let p = Passwords::new(64, 1).unwrap();
        let h = p.hash("correct horse").unwrap();
        assert!(p.verify("correct horse", Some(&h)));
        assert!(!p.verify("wrong horse", Some(&h)));
        // No hash: never a match, checked against the dummy.
        assert!(!p.verify("correct horse", None));
        assert!(!p.verify("", None));
        assert_eq!(params_of(&h), "$argon2id$v=19$m=64,t=1,p=1");
        assert_eq!(params_of(p.dummy_phc()), params_of(&h));
        // A stored string that is not a PHC string is a mismatch, not a panic.
        assert!(!p.verify("x", Some("not a phc string")));
        // Salted: the same password hashes differently.
        assert_ne!(p.hash("correct horse").unwrap(), h);
        assert!(matches!(Passwords::new(1, 1), Err(HashError::Params(_))));
    }
}
