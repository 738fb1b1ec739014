//! Conversation ids and shard ownership (see `docs/design/messaging.md`, "Conversation ids").
//!
//! The wire names a conversation with a `u64`; storage's `ConvId` is a `u128` holding the same
//! value. The top bit tells the kind: clear for a direct (1:1) conversation, set for a group.
//! A direct conversation's id is derived from the user pair (`direct_candidate`), probing further
//! candidates on the (rare) collision; the pair → id binding is written once to metadata under
//! compare-and-set, so shards racing to create it agree. Group ids are allocated by the group API
//! with the top bit set.

use starling_storage::ConvId;

/// The bit that marks a group conversation id.
pub const GROUP_BIT: u64 = 1 << 63;

/// Whether `conv` names a group.
pub fn is_group(conv: u64) -> bool {
    conv & GROUP_BIT != 0
}

/// Storage's id for the wire id `conv`.
pub fn conv_id(conv: u64) -> ConvId {
    ConvId(u128::from(conv))
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
pub fn owner_shard(conv: u64, shards: usize) -> usize {
    debug_assert!(shards > 0);
    (mix64(conv) % shards.max(1) as u64) as usize
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
pub fn direct_candidate(a: u64, b: u64, attempt: u32) -> u64 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let h = mix64(mix64(lo ^ 0x5354_4152_4C49_4E47) ^ hi.rotate_left(17) ^ u64::from(attempt));
    let id = h & !GROUP_BIT;
    if id == 0 { 1 } else { id }
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
                assert!(!is_group(id) && id != 0);
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
        assert!(is_group(GROUP_BIT | 5));
    }

    /// `OWNER_SHARD_MAPPING` names these results: if this test has to change, so does the name.
    #[test]
    fn owner_shard_is_the_recorded_mapping() {
        assert_eq!(OWNER_SHARD_MAPPING, "mix64-mod/1");
        let got: Vec<usize> = [1u64, 2, 3, 1000, u64::MAX, GROUP_BIT | 7]
            .iter()
            .map(|&c| owner_shard(c, 7))
            .collect();
        assert_eq!(got, [6, 1, 4, 0, 0, 1]);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        assert_eq!(owner_shard(5, 1), 0);
    }
}
