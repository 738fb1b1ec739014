//! Counters and the Prometheus text endpoint. Shards bump relaxed atomics in
//! their own [`ShardMetrics`] (no sharing of cache lines on the hot path);
//! a plain thread serves `GET /metrics` by reading them.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use starling_storage::stats::{BUCKET_BOUNDS_US, LatencyHistogram, LogStats};
use starling_storage::{DenseIndex, IndexStats};

/// A per-shard gauge of the message index: name, help, value.
type IndexGauge = (&'static str, &'static str, fn(&IndexStats) -> u64);

use crate::health::Health;

/// A counter's name, help text and field of a shard's `T`.
type Counter<T> = (&'static str, &'static str, fn(&T) -> &AtomicU64);

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Open connections (gauge).
    pub connections: AtomicI64,
    /// Connections accepted.
    pub accepts: AtomicU64,
    /// Connections refused because the shard was full.
    pub refused: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub handshake_failures: AtomicU64,
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Frames sent.
    pub frames_out: AtomicU64,
    /// Bytes received (on the socket).
    pub bytes_in: AtomicU64,
    /// Bytes sent (on the socket).
    pub bytes_out: AtomicU64,
    /// Connections closed for silence.
    pub heartbeat_timeouts: AtomicU64,
    /// Connections closed for a missed handshake/Hello deadline.
    pub deadline_timeouts: AtomicU64,
    /// Connections closed as slow consumers (Goodbye{SLOW_CONSUMER}).
    pub slow_consumer_closes: AtomicU64,
    /// Connections closed for bad frames.
    pub protocol_errors: AtomicU64,
    /// Access tokens accepted from the shard's cache (no verify, no store read).
    pub token_cache_hits: AtomicU64,
    /// Authenticated connections closed because their access token expired.
    pub token_expiries: AtomicU64,
    /// TLS handshakes that resumed a session from a ticket.
    pub tls_resumptions: AtomicU64,
    /// From the read that brought a Send to the queueing of its SendAck (after the log made
    /// it durable): the server's part of the sender's wait.
    pub send_ack: LatencyHistogram,
    /// Copied from the shard's router after each of its turns (it lives on the shard thread).
    pub router: RouterMetrics,
}

/// The router's counters, mirrored for the metrics thread.
#[derive(Debug, Default)]
pub struct RouterMetrics {
    /// Messages acknowledged durable.
    pub messages_acked: AtomicU64,
    /// Sends answered from dedup (retries).
    pub duplicates: AtomicU64,
    /// Deliver frames pushed to connections.
    pub pushed: AtomicU64,
    /// MessagesAvailable hints sent to slow consumers.
    pub hints: AtomicU64,
    /// Idle conversation states dropped from memory.
    pub convs_evicted: AtomicU64,
    /// Conversation states in memory (gauge).
    pub convs_loaded: AtomicU64,
    /// Typing frames dropped or refused over a connection's rate limit.
    pub typing_dropped: AtomicU64,
    /// Last seen times not written (the metadata writer was full).
    pub presence_unwritten: AtomicU64,
    /// Storage reads handed to the read threads.
    pub reads_submitted: AtomicU64,
    /// Storage reads made on a shard thread (paths the read gate does not cover).
    pub inline_reads: AtomicU64,
}

impl RouterMetrics {
    /// Mirrors the router's counters (relaxed stores: the metrics thread only reads).
    pub fn mirror(&self, s: &starling_router::ShardStats, loaded: usize) {
        self.messages_acked
            .store(s.messages_acked, Ordering::Relaxed);
        self.duplicates.store(s.duplicates, Ordering::Relaxed);
        self.pushed.store(s.pushed, Ordering::Relaxed);
        self.hints.store(s.hints, Ordering::Relaxed);
        self.convs_evicted.store(s.convs_evicted, Ordering::Relaxed);
        self.convs_loaded.store(loaded as u64, Ordering::Relaxed);
        self.typing_dropped
            .store(s.typing_dropped, Ordering::Relaxed);
        self.presence_unwritten
            .store(s.presence_unwritten, Ordering::Relaxed);
        self.reads_submitted
            .store(s.reads_submitted, Ordering::Relaxed);
        self.inline_reads.store(s.inline_reads, Ordering::Relaxed);
    }
}

/// Authentication failure reasons counted separately.
pub const AUTH_FAILURE_REASONS: &[&str] = &[
    "token_expired",
    "token_invalid",
    "session_revoked",
    "otp_invalid",
    "otp_expired",
    "otp_attempts_exceeded",
    "invalid_credentials",
    "refresh_token_reused",
    "rate_limited",
];

/// All counters of the process.
#[derive(Debug)]
pub struct Metrics {
    /// Per shard, indexed by shard number.
    pub shards: Vec<ShardMetrics>,
    auth_failures: Vec<AtomicU64>,
    /// Per shard, its log's I/O statistics (empty without messaging storage).
    logs: Vec<Arc<LogStats>>,
    /// Per shard, its message index (replaced when a failed log is reopened in place).
    indexes: Vec<std::sync::RwLock<Arc<DenseIndex>>>,
    /// Per shard, what retention removed from its log (empty without messaging storage).
    retention: Vec<Arc<starling_storage::log::RetentionStats>>,
    /// The media endpoint's counters (zero without one).
    media: Arc<crate::media::MediaStats>,
    /// The push notifier's counters.
    pub push: Arc<crate::push::PushMetrics>,
}

/// Adds 1.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n`.
pub fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

impl Metrics {
    /// Counters for `shards` shards, and their logs' statistics (indexed by shard).
    #[must_use]
    pub fn new(shards: usize, logs: Vec<Arc<LogStats>>) -> Self {
        Self {
            logs,
            indexes: Vec::new(),
            retention: Vec::new(),
            push: Arc::default(),
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            auth_failures: AUTH_FAILURE_REASONS
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            media: Arc::default(),
        }
    }

    /// These metrics with the shards' message indexes (indexed by shard) as gauges.
    #[must_use]
    pub fn with_indexes(mut self, indexes: Vec<Arc<DenseIndex>>) -> Self {
        self.indexes = indexes.into_iter().map(std::sync::RwLock::new).collect();
        self
    }

    /// Shard `shard`'s index was replaced (its log was reopened in place).
    pub fn set_index(&self, shard: usize, index: Arc<DenseIndex>) {
        if let Some(slot) = self.indexes.get(shard) {
            *slot
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = index;
        }
    }

    /// These metrics with the media endpoint's counters.
    #[must_use]
    pub fn with_media(mut self, media: Arc<crate::media::MediaStats>) -> Self {
        self.media = media;
        self
    }

    /// These metrics with each shard's retention counters (in shard order).
    #[must_use]
    pub fn with_retention(
        mut self,
        retention: Vec<Arc<starling_storage::log::RetentionStats>>,
    ) -> Self {
        self.retention = retention;
        self
    }

    /// Counts an authentication failure (`reason` from [`AUTH_FAILURE_REASONS`]).
    pub fn auth_failure(&self, reason: &str) {
        if let Some(i) = AUTH_FAILURE_REASONS.iter().position(|r| *r == reason) {
            inc(&self.auth_failures[i]);
        }
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::new();
        let gauge = |s: &mut String, name: &str, help: &str, f: &dyn Fn(&ShardMetrics) -> i64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (i, m) in self.shards.iter().enumerate() {
                let _ = writeln!(s, "{name}{{shard=\"{i}\"}} {}", f(m));
            }
        };
        gauge(&mut s, "starling_connections", "Open connections.", &|m| {
            m.connections.load(Ordering::Relaxed)
        });
        gauge(
            &mut s,
            "starling_conversations_loaded",
            "Conversation states in the router's memory.",
            &|m| i64::try_from(m.router.convs_loaded.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        );
        let index_stats: Vec<_> = self
            .indexes
            .iter()
            .map(|ix| {
                ix.read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .stats()
            })
            .collect();
        let index_gauges: [IndexGauge; 5] = [
            (
                "starling_index_memory_bytes",
                "Memory the message index holds (resident pointers, buffers of segments not \
                 checkpointed, index files' heads).",
                |x| x.memory_bytes,
            ),
            (
                "starling_index_budget_bytes",
                "The message index's memory budget.",
                |x| x.budget_bytes,
            ),
            (
                "starling_index_resident_conversations",
                "Conversations with pointers in memory.",
                |x| x.resident_convs,
            ),
            (
                "starling_index_checkpointed_segments",
                "Log segments whose index file is written (a restart does not read them).",
                |x| x.checkpointed_segments,
            ),
            (
                "starling_index_live_segments",
                "Log segments not checkpointed yet (a restart after a crash replays them).",
                |x| x.live_segments,
            ),
        ];
        for (name, help, f) in index_gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (i, x) in index_stats.iter().enumerate() {
                let _ = writeln!(s, "{name}{{shard=\"{i}\"}} {}", f(x));
            }
        }
        let counters: [Counter<ShardMetrics>; 23] = [
            ("starling_accepts_total", "Connections accepted.", |m| {
                &m.accepts
            }),
            (
                "starling_connections_refused_total",
                "Connections refused (shard full).",
                |m| &m.refused,
            ),
            (
                "starling_tls_handshake_failures_total",
                "TLS handshakes failed or timed out.",
                |m| &m.handshake_failures,
            ),
            ("starling_frames_in_total", "Frames received.", |m| {
                &m.frames_in
            }),
            ("starling_frames_out_total", "Frames sent.", |m| {
                &m.frames_out
            }),
            ("starling_bytes_in_total", "Bytes received.", |m| {
                &m.bytes_in
            }),
            ("starling_bytes_out_total", "Bytes sent.", |m| &m.bytes_out),
            (
                "starling_heartbeat_timeouts_total",
                "Connections closed for silence.",
                |m| &m.heartbeat_timeouts,
            ),
            (
                "starling_deadline_timeouts_total",
                "Connections closed for a missed handshake or Hello deadline.",
                |m| &m.deadline_timeouts,
            ),
            (
                "starling_slow_consumer_closes_total",
                "Connections closed because they did not read what was sent to them.",
                |m| &m.slow_consumer_closes,
            ),
            (
                "starling_protocol_errors_total",
                "Connections closed for bad frames.",
                |m| &m.protocol_errors,
            ),
            (
                "starling_token_cache_hits_total",
                "Access tokens accepted from the shard's verified-token cache.",
                |m| &m.token_cache_hits,
            ),
            (
                "starling_token_expiries_total",
                "Authenticated connections closed at their access token's expiry.",
                |m| &m.token_expiries,
            ),
            (
                "starling_tls_resumptions_total",
                "TLS handshakes resumed from a session ticket.",
                |m| &m.tls_resumptions,
            ),
            (
                "starling_messages_acked_total",
                "Messages made durable and acknowledged.",
                |m| &m.router.messages_acked,
            ),
            (
                "starling_send_duplicates_total",
                "Sends answered from dedup (retries of an acknowledged message).",
                |m| &m.router.duplicates,
            ),
            (
                "starling_delivers_pushed_total",
                "Deliver frames pushed to online devices (not counting Sync).",
                |m| &m.router.pushed,
            ),
            (
                "starling_slow_consumer_hints_total",
                "MessagesAvailable hints sent instead of pushes to devices over their budget.",
                |m| &m.router.hints,
            ),
            (
                "starling_conversations_evicted_total",
                "Idle conversation states dropped from memory.",
                |m| &m.router.convs_evicted,
            ),
            (
                "starling_typing_dropped_total",
                "Typing frames dropped or refused over a connection's rate limit.",
                |m| &m.router.typing_dropped,
            ),
            (
                "starling_presence_last_seen_unwritten_total",
                "Last seen times not written because the metadata writer was full.",
                |m| &m.router.presence_unwritten,
            ),
            (
                "starling_storage_reads_total",
                "Storage reads (conversation states, pages, dedup lookups, conversation lists) run off the shard threads.",
                |m| &m.router.reads_submitted,
            ),
            (
                "starling_storage_inline_reads_total",
                "Storage reads a shard thread made itself, on paths the read gate does not cover yet.",
                |m| &m.router.inline_reads,
            ),
        ];
        per_shard_counters(&mut s, self.shards.iter(), &counters);
        histogram(
            &mut s,
            "starling_send_ack_seconds",
            "From the read that brought a Send to the queueing of its SendAck (durable).",
            self.shards.iter().map(|m| &m.send_ack),
        );
        let log_counters: [Counter<LogStats>; 3] = [
            (
                "starling_log_syncs_total",
                "Group commits of the message log that ended in an fdatasync.",
                |l| &l.syncs,
            ),
            (
                "starling_log_records_total",
                "Records (append batches) written to the message log.",
                |l| &l.records,
            ),
            (
                "starling_log_bytes_total",
                "Record bytes written to the message log.",
                |l| &l.bytes,
            ),
        ];
        per_shard_counters(&mut s, self.logs.iter().map(|l| &**l), &log_counters);
        histogram(
            &mut s,
            "starling_log_commit_seconds",
            "Write plus fdatasync of one group commit of the message log.",
            self.logs.iter().map(|l| &l.commit),
        );
        histogram(
            &mut s,
            "starling_log_segment_switch_seconds",
            "One switch of the message log to its next segment: the wait for the preallocated \
             spare, its rename and the directory fsync (no commit completes meanwhile).",
            self.logs.iter().map(|l| &l.segment_switch),
        );
        let retention_counters: [Counter<starling_storage::log::RetentionStats>; 3] = [
            (
                "starling_retention_removed_segments_total",
                "Log segments removed by retention (every entry past retention or expired).",
                |r| &r.removed_segments,
            ),
            (
                "starling_retention_removed_bytes_total",
                "Bytes of the log segments removed by retention.",
                |r| &r.removed_bytes,
            ),
            (
                "starling_retention_sweeps_total",
                "Retention sweeps of the shard's log.",
                |r| &r.sweeps,
            ),
        ];
        per_shard_counters(
            &mut s,
            self.retention.iter().map(|r| &**r),
            &retention_counters,
        );
        let name = "starling_log_oldest_segment_lsn";
        let _ = writeln!(
            s,
            "# HELP {name} Base lsn of the oldest log segment kept after the last retention \
             sweep (0: no sweep yet).\n# TYPE {name} gauge"
        );
        for (i, r) in self.retention.iter().enumerate() {
            let v = r.oldest_kept_base.load(Ordering::Relaxed);
            let _ = writeln!(s, "{name}{{shard=\"{i}\"}} {v}");
        }
        let name = "starling_auth_failures_total";
        let _ = writeln!(
            s,
            "# HELP {name} Authentication failures by reason.\n# TYPE {name} counter"
        );
        for (reason, c) in AUTH_FAILURE_REASONS.iter().zip(&self.auth_failures) {
            let _ = writeln!(
                s,
                "{name}{{reason=\"{reason}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let m = &self.media;
        for (name, help, c) in [
            (
                "starling_media_uploads_total",
                "Media objects stored.",
                &m.uploads,
            ),
            (
                "starling_media_uploads_refused_total",
                "Media uploads refused or broken off (nothing stored).",
                &m.uploads_refused,
            ),
            (
                "starling_media_downloads_total",
                "Media downloads served.",
                &m.downloads,
            ),
            (
                "starling_media_collected_total",
                "Unreferenced media objects deleted by the collector.",
                &m.collected,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        self.push.render(&mut s);
        s
    }
}

/// Writes Prometheus counters with a series per shard: (name, help, field of a shard's `T`).
fn per_shard_counters<'a, T: 'a>(
    s: &mut String,
    shards: impl Iterator<Item = &'a T> + Clone,
    counters: &[Counter<T>],
) {
    for (name, help, f) in counters {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
        for (i, m) in shards.clone().enumerate() {
            let _ = writeln!(
                s,
                "{name}{{shard=\"{i}\"}} {}",
                f(m).load(Ordering::Relaxed)
            );
        }
    }
}

/// Writes one Prometheus histogram (seconds) with a series per shard.
fn histogram<'a>(
    s: &mut String,
    name: &str,
    help: &str,
    per_shard: impl Iterator<Item = &'a LatencyHistogram>,
) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (i, h) in per_shard.enumerate() {
        let snap = h.snapshot();
        for (bound, n) in BUCKET_BOUNDS_US.iter().zip(&snap.cumulative) {
            let le = Duration::from_micros(*bound).as_secs_f64();
            let _ = writeln!(s, "{name}_bucket{{shard=\"{i}\",le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "{name}_bucket{{shard=\"{i}\",le=\"+Inf\"}} {}",
            snap.cumulative.last().copied().unwrap_or(0)
        );
        let sum = Duration::from_micros(snap.sum_us).as_secs_f64();
        let _ = writeln!(s, "{name}_sum{{shard=\"{i}\"}} {sum}");
        let _ = writeln!(s, "{name}_count{{shard=\"{i}\"}} {}", snap.count);
    }
}

/// Serves `GET /metrics` (with the health gauges), `GET /healthz` and
/// `GET /readyz` on `listener` until the process exits (a plain thread:
/// scrapes and probes are rare and tiny). The probes answer `200` with `ok`,
/// or `503` with the reason on one line (see [`crate::health`]).
pub fn serve(listener: TcpListener, metrics: &Metrics, health: &Health) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(crate::clock::ms(2000)));
        let _ = stream.set_write_timeout(Some(crate::clock::ms(2000)));
        // The request line, whatever segments it came in (up to 1 KiB of head).
        let mut req = [0u8; 1024];
        let mut n = 0;
        while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut req[n..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        let head = &req[..n];
        let probe = |r: Result<(), String>| match r {
            Ok(()) => ("200 OK", "ok\n".to_owned()),
            Err(why) => ("503 Service Unavailable", format!("{why}\n")),
        };
        let (status, body) = if path_is(head, b"/metrics") {
            ("200 OK", metrics.render() + &health.render())
        } else if path_is(head, b"/healthz") {
            probe(health.liveness())
        } else if path_is(head, b"/readyz") {
            probe(health.readiness())
        } else {
            ("404 Not Found", "not found\n".to_owned())
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// Whether the request head is `GET <path>` (with or without a query).
fn path_is(head: &[u8], path: &[u8]) -> bool {
    head.strip_prefix(b"GET ")
        .and_then(|rest| rest.strip_prefix(path))
        .is_some_and(|rest| rest.starts_with(b" ") || rest.starts_with(b"?"))
}

#[cfg(test)]
mod tests {
    use super::path_is;

    #[test]
    fn paths_match_exactly_with_or_without_a_query() {
        assert!(path_is(b"GET /readyz HTTP/1.1\r\n", b"/readyz"));
        assert!(path_is(b"GET /metrics?x=1 HTTP/1.1\r\n", b"/metrics"));
        assert!(!path_is(b"GET /readyzz HTTP/1.1\r\n", b"/readyz"));
        assert!(!path_is(b"POST /readyz HTTP/1.1\r\n", b"/readyz"));
        assert!(!path_is(b"GET /ready", b"/readyz"));
    }
}
