//! Conversation and connection ids, and shard ownership (see `docs/design/messaging.md`, "Conversation ids").
//!
//! A conversation is named by a [`ConvId`]: the wire's `uint64`. Storage's
//! `starling_storage::ConvId` is a `u128` holding the same value ([`ConvId::storage`]); the router
//! only ever writes 64-bit ids there. The top bit tells the kind: clear for a direct (1:1)
//! conversation, set for a group. A direct conversation's id is derived from the user pair
//! (`direct_candidate`), probing further candidates on the (rare) collision; the pair → id
//! binding is written once to metadata under compare-and-set, so shards racing to create it
//! agree. Group ids are drawn by CreateGroup with the top bit set and pinned the same way
//! (`shard/groups/create.rs`).

use starling_storage::ConvId as StoredConvId;

/// The bit of a [`ConvId`] that marks a group conversation.
pub const GROUP_BIT: u64 = 1 << 63;

/// A conversation's id, as the wire names it (`conversation_id`, a `uint64`; 0 names none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvId(pub u64);

impl ConvId {
    /// The conversation a frame's `conversation_id` names: `None` for 0, which names none.
    pub fn from_wire(id: u64) -> Option<ConvId> {
        (id != 0).then_some(ConvId(id))
    }

    /// Whether this is a group conversation (else a direct one).
    pub fn is_group(self) -> bool {
        self.0 & GROUP_BIT != 0
    }

    /// Storage's id for this conversation (the same value, widened).
    pub fn storage(self) -> StoredConvId {
        StoredConvId(u128::from(self.0))
    }

    /// The conversation a stored id names: its low 64 bits (the router writes no wider ids).
    pub fn from_storage(id: StoredConvId) -> ConvId {
        ConvId(id.0 as u64)
    }
}

/// A connection, named by the gateway; unique within its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A connection anywhere in the node: its shard and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The shard that owns the connection.
    pub shard: usize,
    /// The connection.
    pub conn: ConnId,
}

/// splitmix64's finalizer: a cheap, well-mixing bijection on u64.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The identity and version of [`owner_shard`], recorded in each data directory with its shard
/// count. A server refuses a data directory recorded with another mapping: its conversations
/// would be looked for on the wrong shards. Any change to `owner_shard`'s results needs a new
/// name here (and a way to move existing data).
pub const OWNER_SHARD_MAPPING: &str = "mix64-mod/1";

/// The shard that sequences `conv` among `shards` shards.
pub fn owner_shard(conv: ConvId, shards: usize) -> usize {
    debug_assert!(shards > 0);
    (mix64(conv.0) % shards.max(1) as u64) as usize
}

/// The home shard of `user` among `shards` shards: where every Block/Unblock of the user is
/// rate-limited, counted and written, so that one metadata writer orders them and one token
/// bucket limits them whichever shards the user's devices are connected to.
pub fn home_shard(user: u64, shards: usize) -> usize {
    debug_assert!(shards > 0);
    (mix64(user ^ 0x484F_4D45_5348_5244) % shards.max(1) as u64) as usize
}

/// The `attempt`-th candidate id for the direct conversation of users `a` and `b` (order does
/// not matter): never 0, top bit clear.
pub fn direct_candidate(a: u64, b: u64, attempt: u32) -> ConvId {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let h = mix64(mix64(lo ^ 0x5354_4152_4C49_4E47) ^ hi.rotate_left(17) ^ u64::from(attempt));
    let id = h & !GROUP_BIT;
    ConvId(if id == 0 { 1 } else { id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_ids_are_symmetric_direct_and_spread_over_shards() {
        let mut per_shard = [0u32; 4];
        for a in 1..200u64 {
            for b in a..a + 5 {
                let id = direct_candidate(a, b, 0);
                assert_eq!(id, direct_candidate(b, a, 0));
                assert!(!id.is_group() && id.0 != 0);
                assert_ne!(id, direct_candidate(a, b, 1));
                per_shard[owner_shard(id, 4)] += 1;
            }
        }
        assert!(per_shard.iter().all(|&n| n > 150), "{per_shard:?}");
        let mut homes = [0u32; 4];
        for u in 1..1000u64 {
            homes[home_shard(u, 4)] += 1;
        }
        assert!(homes.iter().all(|&n| n > 200), "{homes:?}");
        assert!(ConvId(GROUP_BIT | 5).is_group());
        assert_eq!(ConvId::from_wire(0), None);
        let big = ConvId(GROUP_BIT | 9);
        assert_eq!(ConvId::from_storage(big.storage()), big);
        assert_eq!(big.storage().0, u128::from(GROUP_BIT | 9));
    }

    /// `OWNER_SHARD_MAPPING` names these results: if this test has to change, so does the name.
    #[test]
    fn owner_shard_is_the_recorded_mapping() {
        assert_eq!(OWNER_SHARD_MAPPING, "mix64-mod/1");
        let got: Vec<usize> = [1u64, 2, 3, 1000, u64::MAX, GROUP_BIT | 7]
            .iter()
            .map(|&c| owner_shard(ConvId(c), 7))
            .collect();
        assert_eq!(got, [6, 1, 4, 0, 0, 1]);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        assert_eq!(owner_shard(ConvId(5), 1), 0);
    }
}
