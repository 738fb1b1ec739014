//! The router's hash maps: std's, with foldhash (seeded per process) instead of SipHash. The
//! router hashes several keys per message (conversation, client_msg_id, users, connections), and
//! SipHash showed in profiles (docs/design/performance-decisions.md).

/// std's `HashMap` with foldhash.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// std's `HashSet` with foldhash.
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
