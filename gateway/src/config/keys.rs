//! `[keys]`: the end-to-end key directory (`gateway/src/keys.rs`, `protocol/README.md`, "End-to-end
//! key directory").

use serde::Deserialize;

use super::ConfigError;

/// The key directory's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Most one-time prekeys the server holds per device; an `UploadKeys` that would exceed it
    /// is refused whole (`INVALID_ARGUMENT`). Between 1 and 100000.
    pub one_time_prekeys_max: u32,
    /// A device whose stock fetches take from this many or more to fewer gets a `PrekeyCount`
    /// push, once per crossing. At most `one_time_prekeys_max`; 0: never.
    pub low_stock_threshold: u32,
    /// Most key requests waiting for the directory's writer thread; beyond it they are refused
    /// with `OVERLOADED`. Between 1 and 1048576.
    pub queue_max: usize,
    /// Most requests whose writes share one commit (group commit). Between 1 and 65536.
    pub batch_max: usize,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            one_time_prekeys_max: 500,
            low_stock_threshold: 20,
            queue_max: 65_536,
            batch_max: 2_048,
        }
    }
}

impl KeysConfig {
    /// Checks each value.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if !(1..=100_000).contains(&self.one_time_prekeys_max) {
            return bad("keys.one_time_prekeys_max", "must be between 1 and 100000");
        }
        if self.low_stock_threshold > self.one_time_prekeys_max {
            return bad(
                "keys.low_stock_threshold",
                "must be at most keys.one_time_prekeys_max",
            );
        }
        if !(1..=1 << 20).contains(&self.queue_max) {
            return bad("keys.queue_max", "must be between 1 and 1048576");
        }
        if !(1..=1 << 16).contains(&self.batch_max) {
            return bad("keys.batch_max", "must be between 1 and 65536");
        }
        Ok(())
    }
}
