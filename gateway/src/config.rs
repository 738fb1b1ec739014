//! Configuration: defaults, then a TOML file, then `STARLING_*` environment
//! variables and command-line flags (flags win). Every value is checked at
//! start-up ([`Config::validate`]); a bad value stops the server with a
//! message naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod keys;
mod media;
mod push;
mod router;

pub use keys::KeysConfig;
pub use media::MediaConfig;
pub use push::{
    ApnsConfig, FcmConfig, PushConfig, WEBHOOK_PLATFORMS, WebPushConfig, WebhookConfig,
};
pub use router::RouterConfig;

/// Which I/O driver the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DriverChoice {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring only (start-up fails if unavailable).
    IoUring,
    /// The readiness (epoll) fallback driver.
    Epoll,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The scheduling priority of a pool of background threads, relative to the
/// shards (which run at the process's own priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThreadPriority {
    /// The shards' priority.
    Normal,
    /// Nice 19: a small share of a CPU the shards also want.
    Low,
    /// `SCHED_IDLE`: the scheduler's lowest weight (about 0.3% of a CPU
    /// others want); a waking shard preempts it at once.
    Idle,
}

/// Where one-time codes go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OtpSenderConfig {
    /// Append `<identifier> <code>` to `<data>/otp.log` and log it (development).
    Dev,
    /// POST `{"identifier": .., "code": ..}` to an `http://` URL.
    Webhook {
        /// The URL, `http://host:port/path`.
        url: String,
    },
}

/// Per-connection and per-shard limits, sized at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most open connections one shard holds; more are refused.
    pub connections_per_shard_max: usize,
    /// Largest frame accepted from a client, in bytes.
    pub frame_bytes_max: u32,
    /// Most requests the server holds for one connection: read and not yet
    /// answered (a Sync until its SyncDone). More are refused with
    /// TOO_MANY_IN_FLIGHT (advertised in Welcome).
    pub inflight_requests_max: u32,
    /// Most bytes the gateway buffers for one connection beyond what its socket
    /// holds; more closes it as a slow consumer.
    pub outbound_bytes_max: usize,
    /// A connection's backlog (bytes of answers and pushes queued for it that
    /// its socket has not taken) above which it is "behind": pushes stop and it
    /// gets `MessagesAvailable` once the backlog is down to half of this
    /// (protocol/README.md, "Flow control").
    pub push_backlog_bytes_max: u64,
    /// A connection whose backlog stays above `push_backlog_bytes_max` this
    /// long, or whose socket takes nothing for this long while bytes wait, is
    /// closed with Goodbye{SLOW_CONSUMER}.
    pub slow_consumer_close_ms: u64,
    /// How often clients should ping (advertised in Welcome).
    pub heartbeat_ms: u32,
    /// A connection from which no frame arrived for this long is closed
    /// (Goodbye{HEARTBEAT_TIMEOUT}).
    pub idle_timeout_ms: u32,
    /// The TLS handshake must finish within this long of accept.
    pub handshake_timeout_ms: u64,
    /// Hello must arrive within this long of the handshake.
    pub hello_timeout_ms: u64,
    /// Granularity of the per-shard timer wheel.
    pub timer_tick_ms: u64,
    /// On shutdown, how long connections get to drain.
    pub shutdown_drain_ms: u64,
    /// Verified access tokens cached per shard (0: no cache).
    pub token_cache_entries: usize,
    /// Most users one connection may follow with SubscribePresence (a request
    /// that would take it beyond is refused with INVALID_ARGUMENT; one request
    /// names at most 1,000).
    pub presence_subscriptions_max: usize,
    /// Typing frames one connection may send per second, sustained; beyond
    /// it they are dropped (request_id 0) or refused with RATE_LIMITED.
    pub typing_per_s: u32,
    /// ... and at once (a token bucket of this size).
    pub typing_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            connections_per_shard_max: 100_000,
            frame_bytes_max: starling_protocol::limits::FRAME_BYTES_MAX_DEFAULT,
            inflight_requests_max: 64,
            outbound_bytes_max: 1024 * 1024,
            push_backlog_bytes_max: 256 * 1024,
            slow_consumer_close_ms: 30_000,
            heartbeat_ms: 30_000,
            idle_timeout_ms: 90_000,
            handshake_timeout_ms: 10_000,
            hello_timeout_ms: 10_000,
            timer_tick_ms: 100,
            shutdown_drain_ms: 5_000,
            token_cache_entries: 16_384,
            presence_subscriptions_max: 2_000,
            typing_per_s: 3,
            typing_burst: 10,
        }
    }
}

/// Accounts, tokens and abuse limits.
///
/// Every refusal of a limit below is `RATE_LIMITED` with a message saying
/// which limit and a `retry_after_ms` saying when a retry can pass it. "Per
/// IP" means per IPv4 address, or per IPv6 /64. The one-time-code budgets and
/// the failed-password budget are written to the metadata store
/// (`<data>/meta.redb`) when they change (the latter from an identifier's
/// second failure on), so a restart does not reset them; the others are in
/// memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsConfig {
    /// A one-time code is valid this long.
    pub otp_ttl_ms: u64,
    /// Guesses allowed per code (VerifyOtp, or Login with the code), the
    /// right one included: the last wrong one burns the code.
    pub otp_attempts_max: u32,
    /// Minimum time between two codes for one identifier.
    pub otp_resend_ms: u64,
    /// Codes sent per identifier per hour (durable).
    pub otp_requests_per_identifier_per_hour: u32,
    /// Codes sent per client IP per hour (durable).
    pub otp_requests_per_ip_per_hour: u32,
    /// Access token lifetime.
    pub access_token_ttl_ms: u64,
    /// Refresh token lifetime.
    pub refresh_token_ttl_ms: u64,
    /// New phone numbers a user may look up with DiscoverContacts per hour
    /// (a fixed window from the first lookup). Numbers the user already
    /// looked up in the window cost nothing again; a request that would go
    /// past the budget is refused whole.
    pub discover_numbers_per_hour: u32,
    /// Looked-up numbers remembered over all users (8 bytes each, plus the
    /// set's overhead). When full, the numbers of the windows that end
    /// soonest are forgotten (their counts are kept): a forgotten number
    /// costs its user again. At least `discover_numbers_per_hour`.
    pub discover_numbers_remembered_max: usize,
    /// Threads for blocking work (store reads and writes, webhooks). Password
    /// hashing has threads of its own (`password_hash_threads`).
    pub blocking_threads: usize,
    /// Argon2id memory cost in KiB.
    pub argon2_memory_kib: u32,
    /// Argon2id iterations.
    pub argon2_iterations: u32,
    /// Threads that hash passwords (Argon2id for Login by password and
    /// SetPassword). Nothing else runs on them, and nothing else hashes.
    pub password_hash_threads: usize,
    /// The hashing threads' priority: `idle` (`SCHED_IDLE`: they run on CPU
    /// time the shards leave, and a waking shard preempts them at once),
    /// `low` (nice 19) or `normal` (the shards' own). Measured in
    /// docs/benchmarks/abuse.md, "Password-login flood".
    pub password_hash_priority: ThreadPriority,
    /// Password checks admitted but not finished (waiting for a hashing
    /// thread, or hashing); more are refused at once, without a hash.
    pub password_queue_max: u32,
    /// Password checks admitted per second over all clients (a token bucket)...
    pub password_checks_per_sec: u32,
    /// ... of which this many may come at once after a quiet spell.
    pub password_checks_burst: u32,
    /// Password checks in progress at once per client IP.
    pub password_checks_inflight_per_ip_max: u32,
    /// Password checks per client IP per minute.
    pub password_checks_per_ip_per_minute: u32,
    /// Failed password logins per identifier per hour (counted whether or
    /// not the identifier has an account; durable from an identifier's
    /// second failure on, so a restart forgets at most one).
    pub password_failures_per_identifier_per_hour: u32,
    /// Rate-limit windows kept (each IP or identifier counting toward a
    /// limit has one); beyond it, the ones that end soonest are dropped.
    pub rate_windows_max: usize,
    /// Devices' last-seen times (noted when a device connects, authenticates
    /// or disconnects, never per heartbeat) are written at most this often,
    /// all in one transaction.
    pub last_seen_flush_ms: u64,
    /// Devices whose last-seen time waits for that write, at most; a note
    /// for one more wakes the writer early and is dropped.
    pub last_seen_pending_max: usize,
    /// Where codes are delivered.
    pub otp_sender: OtpSenderConfig,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            otp_ttl_ms: 5 * 60 * 1000,
            otp_attempts_max: 5,
            otp_resend_ms: 30_000,
            otp_requests_per_identifier_per_hour: 5,
            otp_requests_per_ip_per_hour: 30,
            access_token_ttl_ms: 15 * 60 * 1000,
            refresh_token_ttl_ms: 30 * 24 * 3600 * 1000,
            discover_numbers_per_hour: 2_000,
            discover_numbers_remembered_max: 1_000_000,
            blocking_threads: 4,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            password_hash_threads: 1,
            password_hash_priority: ThreadPriority::Idle,
            password_queue_max: 16,
            password_checks_per_sec: 20,
            password_checks_burst: 20,
            password_checks_inflight_per_ip_max: 2,
            password_checks_per_ip_per_minute: 30,
            password_failures_per_identifier_per_hour: 20,
            rate_windows_max: 100_000,
            last_seen_flush_ms: 1000,
            last_seen_pending_max: 100_000,
            otp_sender: OtpSenderConfig::Dev,
        }
    }
}

/// The embedded storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// A shard's group commit starts no sooner than this many µs after its previous one
    /// ended, so that the batches arriving meanwhile share its write and `fdatasync`
    /// (docs/design/log.md, "Commit interval"). 0: commit as soon as anything is queued.
    pub commit_interval_min_us: u32,
    /// CPUs for each shard's log writer thread. Unset: the CPUs the process may run on that
    /// no shard is pinned to, if there are any, else wherever the shards run. `[]`: never
    /// pinned (`gateway/src/cpus.rs`).
    pub io_cpus: Option<Vec<usize>>,
    /// Sealed log segments (64 MiB each) a shard leaves in the page cache; older ones are
    /// released so their memory is reused for the next segment (docs/design/log.md, "Page
    /// cache"). Reads of released segments go to the disk. A large number: never released.
    pub cached_sealed_segments: u32,
    /// Memory for the message index, in bytes, shared equally by the shards: resident
    /// conversations' pointers, the buffers of segments not checkpointed yet, and the index
    /// files' heads (bloom filters, directory fences). Past it, pointers of conversations not
    /// used lately leave memory and are read back from the index files when needed
    /// (docs/design/log.md, "The index"). At least 16 MiB per shard.
    pub index_memory_bytes: u64,
    /// The server's retention, in seconds: an entry (message, change, group or timer event)
    /// is no longer served once its server timestamp is this old, and the log segments holding
    /// only such entries are removed (docs/design/retention.md). 0: keep forever.
    pub retention_secs: u64,
    /// The server's retention after delivery, in seconds: an entry is no longer served once
    /// every member of its conversation received it (on any of their devices; their other
    /// devices have this long to fetch it) this long ago, and its segment may go
    /// (docs/design/retention.md). Unset: no such bound. 0: gone as soon as everyone received
    /// it. With `retention_secs` as well, whichever comes first: `retention_secs` is then how
    /// long a message nobody fetches is kept. The time of delivery is recorded late by up to
    /// a sixteenth of this (10 s to 5 min), never early.
    pub retention_after_delivery_secs: Option<u64>,
    /// How often the retention thread looks for log segments to remove, in ms (1,000 to
    /// 86,400,000). A segment goes at most this long after its last entry may.
    pub retention_sweep_ms: u64,
    /// After a shard's log failed (a write or `fdatasync` error, a full disk, a read-only
    /// filesystem), how often its recovery in place is tried (docs/design/log.md, "Recovery in
    /// place"): reopen the log and index, cut back to what was durable. Meanwhile the shard
    /// refuses writes with `STORAGE_FAILURE` and serves reads. Between 100 and 60000.
    pub recovery_retry_ms: u64,
}

/// The smallest index budget per shard the configuration accepts.
pub const INDEX_MEMORY_PER_SHARD_MIN: u64 = 16 << 20;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            commit_interval_min_us: 300,
            io_cpus: None,
            cached_sealed_segments: 2,
            index_memory_bytes: 1 << 30,
            retention_secs: 0,
            retention_after_delivery_secs: None,
            retention_sweep_ms: 60_000,
            recovery_retry_ms: 1000,
        }
    }
}

/// Shortest server retention (`storage.retention_secs`, 0 aside), in seconds.
const RETENTION_SECS_MIN: u64 = 60;
/// Longest server retention, in seconds: 100 years.
const RETENTION_SECS_MAX: u64 = 100 * 365 * 24 * 3600;

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory (TLS material, keys, metadata, otp.log).
    pub data_dir: PathBuf,
    /// TLS listener.
    pub listen: SocketAddr,
    /// Plain-TCP listener for loopback benchmarks. Unencrypted: never expose.
    pub dangerous_plaintext_listen: Option<SocketAddr>,
    /// Prometheus `/metrics` listener (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Number of shards (0: automatic). A data directory records its shard count when it is
    /// first used (`<data>/layout.toml`, see `crate::layout`): conversations are spread over the
    /// shards by it, so it cannot change afterwards. With 0, a new data directory gets one shard
    /// per core and an existing one keeps its recorded count (also on a machine with another
    /// number of cores); an explicit count must equal the recorded one, or the start is refused.
    pub shards: usize,
    /// I/O driver.
    pub driver: DriverChoice,
    /// Log format.
    pub log_format: LogFormat,
    /// Connection limits.
    pub limits: LimitsConfig,
    /// Account settings.
    pub accounts: AccountsConfig,
    /// Embedded storage settings.
    pub storage: StorageConfig,
    /// Messaging limits.
    pub router: RouterConfig,
    /// The HTTPS media endpoint (off unless `media.listen` is set).
    pub media: MediaConfig,
    /// The end-to-end key directory.
    pub keys: KeysConfig,
    /// Push notifications.
    pub push: PushConfig,
    /// Let the kernel back the heap with transparent huge pages (default: no). The allocator
    /// asks for them (`MADV_HUGEPAGE`), and a thread that touches a new 2 MiB region then
    /// spends milliseconds zeroing it inside the page fault, which a kernel without preemption
    /// does not interrupt, while SendAcks wait (docs/design/performance-decisions.md, "No
    /// transparent huge pages by default"). Off, the same memory is zeroed 4 KiB per fault.
    pub transparent_huge_pages: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./starling-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            dangerous_plaintext_listen: None,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            shards: 0,
            driver: DriverChoice::Auto,
            log_format: LogFormat::Human,
            limits: LimitsConfig::default(),
            accounts: AccountsConfig::default(),
            storage: StorageConfig::default(),
            router: RouterConfig::default(),
            media: MediaConfig::default(),
            keys: KeysConfig::default(),
            push: PushConfig::default(),
            transparent_huge_pages: false,
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/mistyped keys.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config value `{key}`: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses TOML over the defaults.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The number of shards `shards` asks for on this machine (`0`: one per core). The count a
    /// start runs with is the data directory's (`crate::layout::resolve`).
    #[must_use]
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        } else {
            self.shards
        }
    }

    /// The router's configuration for each shard: `[router]`, with the slow-consumer limits of
    /// `[limits]`. The one place the gateway builds a `starling_router::ShardConfig`.
    #[must_use]
    pub fn shard_config(&self) -> starling_router::ShardConfig {
        starling_router::ShardConfig {
            retention_ms: self.storage.retention_secs.saturating_mul(1000),
            retention_after_delivery_ms: self
                .storage
                .retention_after_delivery_secs
                .map(|s| s.saturating_mul(1000)),
            ..self.router.shard_config(&self.limits)
        }
    }

    /// Checks every value; the first bad one is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        let l = &self.limits;
        let a = &self.accounts;
        if self.shards > 1024 {
            return bad("shards", "at most 1024");
        }
        if l.connections_per_shard_max == 0 {
            return bad("limits.connections_per_shard_max", "must be at least 1");
        }
        if !(starling_protocol::limits::FRAME_BYTES_MAX_FLOOR
            ..=starling_protocol::limits::FRAME_BYTES_MAX_CEILING)
            .contains(&l.frame_bytes_max)
        {
            return bad("limits.frame_bytes_max", "must be between 1024 and 1048576");
        }
        if l.inflight_requests_max == 0 || l.inflight_requests_max > 4096 {
            return bad("limits.inflight_requests_max", "must be between 1 and 4096");
        }
        if l.push_backlog_bytes_max < u64::from(l.frame_bytes_max) {
            return bad(
                "limits.push_backlog_bytes_max",
                "must hold at least one maximal frame",
            );
        }
        if l.slow_consumer_close_ms < l.timer_tick_ms {
            return bad(
                "limits.slow_consumer_close_ms",
                "must be at least limits.timer_tick_ms",
            );
        }
        if l.outbound_bytes_max < l.frame_bytes_max as usize * 2 {
            return bad(
                "limits.outbound_bytes_max",
                "must hold at least two maximal frames",
            );
        }
        if l.presence_subscriptions_max == 0 || l.presence_subscriptions_max > 1 << 20 {
            return bad(
                "limits.presence_subscriptions_max",
                "must be between 1 and 1048576",
            );
        }
        if l.typing_per_s == 0 || l.typing_burst == 0 {
            return bad(
                "limits.typing_per_s",
                "typing_per_s and typing_burst must be at least 1",
            );
        }
        if l.timer_tick_ms == 0 || l.timer_tick_ms > 1000 {
            return bad("limits.timer_tick_ms", "must be between 1 and 1000");
        }
        if let Some(cpus) = &self.storage.io_cpus
            && cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize)
        {
            return bad(
                "storage.io_cpus",
                "CPU numbers must be below 1024 (CPU_SETSIZE)",
            );
        }
        if u64::from(l.heartbeat_ms) >= u64::from(l.idle_timeout_ms) {
            return bad(
                "limits.idle_timeout_ms",
                "must be longer than limits.heartbeat_ms",
            );
        }
        for (key, v) in [
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms),
            ("limits.hello_timeout_ms", l.hello_timeout_ms),
            ("limits.idle_timeout_ms", u64::from(l.idle_timeout_ms)),
        ] {
            if v < l.timer_tick_ms {
                return bad(key, "must be at least limits.timer_tick_ms");
            }
        }
        if self.storage.index_memory_bytes < INDEX_MEMORY_PER_SHARD_MIN {
            return bad(
                "storage.index_memory_bytes",
                "at least 16777216 (16 MiB) per shard",
            );
        }
        if self.storage.commit_interval_min_us > 10_000 {
            return bad(
                "storage.commit_interval_min_us",
                "at most 10000 (every acknowledgement may wait this long)",
            );
        }
        if self.storage.retention_secs != 0
            && !(RETENTION_SECS_MIN..=RETENTION_SECS_MAX).contains(&self.storage.retention_secs)
        {
            return bad(
                "storage.retention_secs",
                "0 (keep forever) or from 60 to 3153600000 (100 years)",
            );
        }
        if self
            .storage
            .retention_after_delivery_secs
            .is_some_and(|s| s > RETENTION_SECS_MAX)
        {
            return bad(
                "storage.retention_after_delivery_secs",
                "at most 3153600000 (100 years); leave it out for no bound after delivery",
            );
        }
        if !(1_000..=86_400_000).contains(&self.storage.retention_sweep_ms) {
            return bad(
                "storage.retention_sweep_ms",
                "must be between 1000 and 86400000",
            );
        }
        if !(100..=60_000).contains(&self.storage.recovery_retry_ms) {
            return bad("storage.recovery_retry_ms", "must be between 100 and 60000");
        }
        if a.otp_attempts_max == 0 || a.otp_attempts_max > 20 {
            return bad("accounts.otp_attempts_max", "must be between 1 and 20");
        }
        if a.otp_ttl_ms < 10_000 {
            return bad("accounts.otp_ttl_ms", "must be at least 10000");
        }
        if a.access_token_ttl_ms < 1000 || a.access_token_ttl_ms > 24 * 3600 * 1000 {
            return bad(
                "accounts.access_token_ttl_ms",
                "must be between 1 s and 24 h",
            );
        }
        if a.blocking_threads == 0 || a.blocking_threads > 64 {
            return bad("accounts.blocking_threads", "must be between 1 and 64");
        }
        if !(10..=60_000).contains(&a.last_seen_flush_ms) {
            return bad(
                "accounts.last_seen_flush_ms",
                "must be between 10 and 60000",
            );
        }
        if !(1..=10_000_000).contains(&a.last_seen_pending_max) {
            return bad(
                "accounts.last_seen_pending_max",
                "must be between 1 and 10000000",
            );
        }
        if a.password_hash_threads == 0 || a.password_hash_threads > 64 {
            return bad("accounts.password_hash_threads", "must be between 1 and 64");
        }
        for (key, v) in [
            ("accounts.password_queue_max", a.password_queue_max),
            (
                "accounts.password_checks_per_sec",
                a.password_checks_per_sec,
            ),
            ("accounts.password_checks_burst", a.password_checks_burst),
            (
                "accounts.password_checks_inflight_per_ip_max",
                a.password_checks_inflight_per_ip_max,
            ),
            (
                "accounts.password_checks_per_ip_per_minute",
                a.password_checks_per_ip_per_minute,
            ),
            (
                "accounts.password_failures_per_identifier_per_hour",
                a.password_failures_per_identifier_per_hour,
            ),
            (
                "accounts.discover_numbers_per_hour",
                a.discover_numbers_per_hour,
            ),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if a.password_queue_max > 100_000 {
            return bad("accounts.password_queue_max", "at most 100000");
        }
        if a.rate_windows_max < 1000 {
            return bad("accounts.rate_windows_max", "must be at least 1000");
        }
        if a.discover_numbers_remembered_max < a.discover_numbers_per_hour as usize {
            return bad(
                "accounts.discover_numbers_remembered_max",
                "must be at least accounts.discover_numbers_per_hour",
            );
        }
        if a.argon2_memory_kib < 8 || a.argon2_iterations == 0 {
            return bad(
                "accounts.argon2_memory_kib",
                "argon2 costs too low (memory >= 8 KiB, iterations >= 1)",
            );
        }
        self.router.validate(&self.limits)?;
        self.media.validate()?;
        self.keys.validate()?;
        self.push.validate()?;
        if let OtpSenderConfig::Webhook { url } = &a.otp_sender
            && crate::accounts::sender::parse_http_url(url).is_none()
        {
            return bad("accounts.otp_sender.url", "must be http://host:port/path");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn toml_overrides_and_rejects_unknown_keys() {
        let c = Config::from_toml(
            "listen = \"127.0.0.1:9000\"\ndriver = \"epoll\"\n[limits]\nhello_timeout_ms = 500\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.driver, DriverChoice::Epoll);
        assert_eq!(c.limits.hello_timeout_ms, 500);
        assert!(Config::from_toml("lisen = \"x\"").is_err());
        let mut c = Config::default();
        c.limits.timer_tick_ms = 0;
        assert!(c.validate().is_err());
        assert!(!Config::default().transparent_huge_pages);
        assert_eq!(Config::default().storage.io_cpus, None);
        let c = Config::from_toml("[storage]\nio_cpus = [1]\n").unwrap();
        assert_eq!(c.storage.io_cpus, Some(vec![1]));
        let c = Config::from_toml("[storage]\nio_cpus = [4096]\n").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml("transparent_huge_pages = true\n").unwrap();
        assert!(c.transparent_huge_pages);
        let c = Config::from_toml("[storage]\ncommit_interval_min_us = 0\n").unwrap();
        assert_eq!(c.storage.commit_interval_min_us, 0);
        c.validate().unwrap();
        let c = Config::from_toml("[storage]\ncommit_interval_min_us = 20000\n").unwrap();
        assert!(c.validate().is_err());
        assert_eq!(Config::default().storage.cached_sealed_segments, 2);
        assert_eq!(Config::default().storage.recovery_retry_ms, 1000);
        let c = Config::from_toml("[storage]\nrecovery_retry_ms = 250\n").unwrap();
        assert_eq!(c.storage.recovery_retry_ms, 250);
        c.validate().unwrap();
        let c = Config::from_toml("[storage]\nrecovery_retry_ms = 10\n").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("storage.recovery_retry_ms"), "{e}");
        let c = Config::from_toml("[storage]\ncached_sealed_segments = 0\n").unwrap();
        assert_eq!(c.storage.cached_sealed_segments, 0);
        c.validate().unwrap();
        assert_eq!(Config::default().storage.retention_secs, 0);
        assert_eq!(Config::default().shard_config().retention_ms, 0);
        let c = Config::from_toml(
            "[storage]
retention_secs = 3600
",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.shard_config().retention_ms, 3_600_000);
        let c = Config::from_toml("[storage]\nretention_sweep_ms = 10\n").unwrap();
        assert!(c.validate().is_err());
        for bad in ["1", "59", "3153600001"] {
            let c = Config::from_toml(&format!(
                "[storage]
retention_secs = {bad}
"
            ))
            .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("storage.retention_secs"), "{e}");
        }
        assert_eq!(
            Config::default().shard_config().retention_after_delivery_ms,
            None
        );
        for (v, ok) in [
            ("0", Some(0)),
            ("86400", Some(86_400_000)),
            ("3153600001", None),
        ] {
            let c = Config::from_toml(&format!(
                "[storage]
retention_after_delivery_secs = {v}
"
            ))
            .unwrap();
            match ok {
                Some(ms) => {
                    c.validate().unwrap();
                    assert_eq!(c.shard_config().retention_after_delivery_ms, Some(ms));
                }
                None => {
                    let e = c.validate().unwrap_err().to_string();
                    assert!(e.contains("storage.retention_after_delivery_secs"), "{e}");
                }
            }
        }
    }

    #[test]
    fn password_limits_are_checked() {
        let c = Config::from_toml(
            "[accounts]\npassword_hash_threads = 2\npassword_hash_priority = \"low\"\npassword_queue_max = 4\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.accounts.password_hash_threads,
                c.accounts.password_hash_priority,
                c.accounts.password_queue_max
            ),
            (2, ThreadPriority::Low, 4)
        );
        c.validate().unwrap();
        assert_eq!(
            Config::default().accounts.password_hash_priority,
            ThreadPriority::Idle
        );
        assert!(Config::from_toml("[accounts]\npassword_hash_priority = \"high\"\n").is_err());
        for bad in [
            "password_hash_threads = 0",
            "password_queue_max = 0",
            "password_checks_per_sec = 0",
            "password_checks_burst = 0",
            "password_checks_inflight_per_ip_max = 0",
            "password_checks_per_ip_per_minute = 0",
            "password_failures_per_identifier_per_hour = 0",
            "rate_windows_max = 10",
            "discover_numbers_per_hour = 0",
            "discover_numbers_remembered_max = 10",
        ] {
            let c = Config::from_toml(&format!("[accounts]\n{bad}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(e.contains(&format!("accounts.{key}")), "{bad}: {e}");
        }
    }

    #[test]
    fn last_seen_settings_are_checked() {
        let c = Config::from_toml(
            "[accounts]
last_seen_flush_ms = 250
last_seen_pending_max = 7
",
        )
        .unwrap();
        assert_eq!(
            (
                c.accounts.last_seen_flush_ms,
                c.accounts.last_seen_pending_max
            ),
            (250, 7)
        );
        c.validate().unwrap();
        for bad in [
            "last_seen_flush_ms = 0",
            "last_seen_flush_ms = 60001",
            "last_seen_pending_max = 0",
        ] {
            let c = Config::from_toml(&format!("[accounts]\n{bad}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(e.contains(&format!("accounts.{key}")), "{bad}: {e}");
        }
    }
}
