//! Identifiers the client chooses, and the randomness behind them.

use std::fmt;

use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use starling_protocol::limits::CLIENT_MSG_ID_BYTES;

/// The 16-byte id a device gives each message it sends. A retry carries the
/// same id, so the server stores the message once. Shown and stored as 32
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientMsgId(pub [u8; CLIENT_MSG_ID_BYTES]);

impl ClientMsgId {
    /// A fresh random id from the operating system's CSPRNG.
    pub fn random() -> Result<Self, ring::error::Unspecified> {
        let mut id = [0u8; CLIENT_MSG_ID_BYTES];
        SystemRandom::new().fill(&mut id)?;
        Ok(Self(id))
    }

    /// Parses the id from wire bytes (must be exactly 16 bytes).
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; CLIENT_MSG_ID_BYTES]>::try_from(bytes).ok().map(Self)
    }

    /// Parses 32 hex digits.
    #[must_use]
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0u8; CLIENT_MSG_ID_BYTES];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(Self(id))
    }
}

impl fmt::Display for ClientMsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ClientMsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientMsgId({self})")
    }
}

impl Serialize for ClientMsgId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ClientMsgId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ClientMsgId::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("client_msg_id must be 32 hex digits"))
    }
}

/// A random `u64` seed from the operating system (0 if it is unavailable,
/// which only weakens jitter).
pub(crate) fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    match SystemRandom::new().fill(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}

/// SplitMix64: a tiny, seedable generator for jitter (not for secrets).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max` (the tiny modulo bias is irrelevant for jitter).
    pub(crate) fn up_to(&mut self, max: u64) -> u64 {
        match max.checked_add(1) {
            Some(n) => self.next_u64() % n,
            None => self.next_u64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_msg_id_round_trips_as_hex() {
        let id = ClientMsgId::random().unwrap();
        assert_eq!(ClientMsgId::from_hex(&id.to_string()), Some(id));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json.len(), 34);
        assert_eq!(serde_json::from_str::<ClientMsgId>(&json).unwrap(), id);
        assert_ne!(ClientMsgId::random().unwrap(), id);
        assert_eq!(ClientMsgId::from_bytes(&[1; 15]), None);
        assert!(serde_json::from_str::<ClientMsgId>("\"zz\"").is_err());
    }
}
