//! A per-shard cache of verified access tokens. Mobile clients reconnect
//! with the same access token many times during its lifetime; a hit skips
//! the Ed25519 verify and the session lookup in the store.
//!
//! Keyed by SHA-256 of the whole token (a hit means these exact bytes were
//! verified before, and their session was live then). An entry holds only
//! the principal and the token's expiry. Entries are dropped at expiry
//! (checked on every lookup, swept periodically) and when their session is
//! revoked ([`TokenCache::forget_sessions`], driven by the shard's control
//! queue, so another shard's cache forgets within one timer tick). The cache
//! is bounded: when full, expired entries go first, then an arbitrary one.

use std::collections::HashMap;

use crate::accounts::Access;

/// SHA-256 of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    /// The key of `token`.
    #[must_use]
    pub fn of(token: &str) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        Self(k)
    }
}

/// The cache (one per shard; not shared).
#[derive(Debug)]
pub struct TokenCache {
    map: HashMap<TokenKey, Access>,
    entries_max: usize,
}

impl TokenCache {
    /// A cache of at most `entries_max` tokens (0: caching off).
    #[must_use]
    pub fn new(entries_max: usize) -> Self {
        Self {
            map: HashMap::new(),
            entries_max,
        }
    }

    /// The cached verification of `key`, if it has not expired at `now_unix_ms`.
    pub fn get(&mut self, key: &TokenKey, now_unix_ms: u64) -> Option<Access> {
        let a = *self.map.get(key)?;
        if a.expires_at_ms <= now_unix_ms {
            self.map.remove(key);
            return None;
        }
        Some(a)
    }

    /// Remembers a verified token whose session was checked.
    pub fn insert(&mut self, key: TokenKey, access: Access, now_unix_ms: u64) {
        if self.entries_max == 0 || access.expires_at_ms <= now_unix_ms {
            return;
        }
        if self.map.len() >= self.entries_max && !self.map.contains_key(&key) {
            self.sweep(now_unix_ms);
            if self.map.len() >= self.entries_max
                && let Some(victim) = self.map.keys().next().copied()
            {
                self.map.remove(&victim);
            }
        }
        self.map.insert(key, access);
    }

    /// Drops every token of these sessions (they were revoked).
    pub fn forget_sessions(&mut self, session_ids: &[u64]) {
        self.map
            .retain(|_, a| !session_ids.contains(&a.principal.session_id));
    }

    /// Drops expired entries.
    pub fn sweep(&mut self, now_unix_ms: u64) {
        self.map.retain(|_, a| a.expires_at_ms > now_unix_ms);
    }

    /// Entries held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::Principal;

    fn access(sid: u64, exp: u64) -> Access {
        Access {
            principal: Principal {
                user_id: 1,
                device_id: 1,
                session_id: sid,
            },
            expires_at_ms: exp,
        }
    }

    #[test]
    fn expiry_revocation_and_bound() {
        let mut c = TokenCache::new(2);
        let (a, b, d) = (TokenKey::of("a"), TokenKey::of("b"), TokenKey::of("d"));
        c.insert(a, access(1, 1000), 0);
        assert_eq!(c.get(&a, 999), Some(access(1, 1000)));
        // Dropped at expiry.
        assert_eq!(c.get(&a, 1000), None);
        assert!(c.is_empty());
        // Already expired: not cached.
        c.insert(a, access(1, 1000), 1000);
        assert!(c.is_empty());
        // Revocation forgets every token of the session.
        c.insert(a, access(1, 5000), 0);
        c.insert(b, access(2, 5000), 0);
        c.forget_sessions(&[1]);
        assert_eq!(c.get(&a, 10), None);
        assert!(c.get(&b, 10).is_some());
        // Bounded: expired entries go first, then an arbitrary one.
        c.insert(a, access(1, 20), 0);
        c.insert(d, access(3, 5000), 30);
        assert_eq!(c.len(), 2);
        assert!(c.get(&d, 31).is_some() && c.get(&b, 31).is_some());
        c.insert(a, access(1, 5000), 40);
        assert_eq!(c.len(), 2);
        assert!(c.get(&a, 41).is_some());
        // Caching off.
        let mut off = TokenCache::new(0);
        off.insert(a, access(1, 5000), 0);
        assert!(off.is_empty());
    }
}
