//! The push notifier: wakes devices that did not get an entry of their conversations (a
//! message, a group change; also a large group's entries, which are only announced) within
//! `push.grace_ms`, with a content-free notification through their push service. See
//! `docs/design/push.md`.
//!
//! - **Feed.** Each shard's router keeps a [`Notice`] of every entry it makes durable; the
//!   shard's driver hands them over a bounded queue (`push.queue_notices_max`) with
//!   `try_send`: a shard never waits; a full queue drops the notice and counts it.
//! - **Outbox.** The notifier thread turns a notice into one durable row per recipient device
//!   that has a push token of a configured provider and conversation
//!   (`starling_storage::push::OutboxEntry`), due `grace_ms` later. A row that is already
//!   pending takes the new seq (collapse); a row sent less than `collapse_ms` ago is due when
//!   that interval ends. At most `push.outbox_entries_max` rows: beyond, a notice for a new
//!   device and conversation is dropped and counted.
//! - **Sending.** A due row whose device's delivery cursor reached its seq is settled without
//!   a notification; otherwise the provider sends one naming the conversation, the seq and
//!   the unread count (seq - the user's read cursor). 2xx: sent. 429, 5xx or no answer: retried
//!   with exponential backoff and full jitter (at least `Retry-After`), up to
//!   `push.attempts_max`. An invalid token (Web Push 404/410, FCM 404/UNREGISTERED, APNs 410 or 400
//!   BadDeviceToken/Unregistered, the operator webhook's 404/410) is removed. Other refusals go to
//!   the dead letters. The row is written before and after each send, so a crash sends a
//!   notification at most once more (at least once), and a restart resumes from the rows.

pub mod apns;
pub mod fcm;
pub mod http;
mod notifier;
pub mod webhook;
pub mod webpush;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Duration;

use starling_router::Notice;
use starling_storage::EmbeddedMeta;
use starling_storage::meta::PushToken;
use starling_storage::push::PushStore;

use crate::config::PushConfig;

pub use webpush::WebPush;

/// What a notification says: never any content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The conversation.
    pub conversation_id: u64,
    /// Its latest seq the device has not received.
    pub seq: u64,
    /// Entries after the user's read cursor.
    pub unread_count: u64,
}

impl Notification {
    /// The payload: `{"v":1,"conversation_id":"<decimal>","seq":N,"unread_count":N}` (the
    /// conversation id is a string: it may exceed 2^53).
    #[must_use]
    pub fn payload(&self) -> String {
        serde_json::json!({
            "v": 1,
            "conversation_id": self.conversation_id.to_string(),
            "seq": self.seq,
            "unread_count": self.unread_count,
        })
        .to_string()
    }

    /// The key a push service collapses notifications by: one per conversation (22
    /// base64url characters: Web Push's `Topic` allows 32).
    #[must_use]
    pub fn collapse_key(&self) -> String {
        use base64::Engine as _;
        let mut k = [0u8; 16];
        k[8..].copy_from_slice(&self.conversation_id.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k)
    }
}

/// A push service's verdict on one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted.
    Sent,
    /// Try again later (429, 5xx, no answer); `after_ms` from `Retry-After`.
    Retry {
        /// The service's `Retry-After`, in ms.
        after_ms: Option<u64>,
        /// What happened.
        why: String,
    },
    /// The token is no longer valid: remove it.
    InvalidToken(String),
    /// Refused for good: a dead letter.
    Failed(String),
}

/// A push service client (blocking; shared by the notifier's sender threads, which call
/// `send` concurrently).
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// The provider's name (the platform of the tokens it serves, or "webhook").
    fn name(&self) -> &'static str;
    /// Whether it serves tokens of `provider` (`PushToken::provider`): its own name, unless
    /// it serves several platforms (the operator webhook).
    fn serves(&self, provider: &str) -> bool {
        provider == self.name()
    }
    /// Sends one notification to `token`.
    fn send(&self, token: &PushToken, n: &Notification, now_ms: u64) -> Outcome;
    /// Most notifications one [`Provider::send_batch`] takes (1: one request per sender).
    fn batch_max(&self) -> usize {
        1
    }
    /// Sends several notifications (at most [`Provider::batch_max`]), concurrently where the
    /// protocol allows: one outcome each, in order.
    fn send_batch(&self, batch: &[(&PushToken, &Notification)], now_ms: u64) -> Vec<Outcome> {
        batch.iter().map(|(t, n)| self.send(t, n, now_ms)).collect()
    }
}

/// The notifier's counters, rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct PushMetrics {
    /// Notices handed to the notifier.
    pub notices_queued: AtomicU64,
    /// Notices a shard dropped because the queue was full.
    pub queue_full_dropped: AtomicU64,
    /// Notices for a new device and conversation dropped because the outbox was full.
    pub outbox_full_dropped: AtomicU64,
    /// Entries merged into a pending or recently sent row (collapsed).
    pub collapsed: AtomicU64,
    /// Rows in the outbox (gauge).
    pub outbox_entries: AtomicU64,
    /// Notifications accepted by a push service.
    pub sent: AtomicU64,
    /// Due rows settled without a notification: the device had the entries by then.
    pub delivered_in_time: AtomicU64,
    /// Attempts that will be retried.
    pub retries: AtomicU64,
    /// Tokens removed because the push service said they are invalid.
    pub invalid_tokens_removed: AtomicU64,
    /// Dead letters in the store (gauge).
    pub dead_letters: AtomicU64,
    /// Durable writes of the outbox that failed (the notifier then stops).
    pub store_errors: AtomicU64,
    /// Notifications handed to the sender threads and not answered yet (gauge).
    pub in_flight: AtomicU64,
}

impl PushMetrics {
    /// Appends the Prometheus text of the counters.
    pub fn render(&self, s: &mut String) {
        let rows: [(&str, &str, &str, &AtomicU64); 12] = [
            (
                "starling_push_notices_queued_total",
                "counter",
                "Durable entries handed to the push notifier.",
                &self.notices_queued,
            ),
            (
                "starling_push_queue_full_dropped_total",
                "counter",
                "Entries a shard dropped because the notifier's queue (push.queue_notices_max) was full.",
                &self.queue_full_dropped,
            ),
            (
                "starling_push_outbox_full_dropped_total",
                "counter",
                "Entries for a new device and conversation dropped because the outbox (push.outbox_entries_max) was full.",
                &self.outbox_full_dropped,
            ),
            (
                "starling_push_collapsed_total",
                "counter",
                "Entries merged into a pending or recently sent notification.",
                &self.collapsed,
            ),
            (
                "starling_push_outbox_entries",
                "gauge",
                "Rows of the durable notification outbox.",
                &self.outbox_entries,
            ),
            (
                "starling_push_in_flight",
                "gauge",
                "Notifications with the sender threads, not answered yet.",
                &self.in_flight,
            ),
            (
                "starling_push_sent_total",
                "counter",
                "Notifications accepted by a push service.",
                &self.sent,
            ),
            (
                "starling_push_delivered_in_time_total",
                "counter",
                "Due notifications not sent: the device had received the entries.",
                &self.delivered_in_time,
            ),
            (
                "starling_push_retries_total",
                "counter",
                "Notification attempts to be retried (429, 5xx, no answer).",
                &self.retries,
            ),
            (
                "starling_push_invalid_tokens_removed_total",
                "counter",
                "Push tokens removed because their service said they are invalid.",
                &self.invalid_tokens_removed,
            ),
            (
                "starling_push_dead_letters",
                "gauge",
                "Notifications refused for good (the dead-letter table).",
                &self.dead_letters,
            ),
            (
                "starling_push_store_errors_total",
                "counter",
                "Failed writes of the outbox (the notifier stops).",
                &self.store_errors,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// Where the shards hand notices to the notifier.
#[derive(Debug, Clone)]
pub struct NoticeSender {
    tx: SyncSender<notifier::Event>,
    metrics: Arc<PushMetrics>,
}

impl NoticeSender {
    /// Hands a notice over without waiting: dropped and counted if the queue is full.
    pub fn send(&self, n: Notice) {
        match self.tx.try_send(notifier::Event::Notice(n)) {
            Ok(()) => {
                self.metrics.notices_queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics
                    .queue_full_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Starts the notifier thread and its `push.senders` sender threads if a provider is
/// configured; returns where to send notices.
pub fn start(
    cfg: &PushConfig,
    meta: Arc<EmbeddedMeta>,
    metrics: Arc<PushMetrics>,
) -> anyhow::Result<Option<NoticeSender>> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let tls = http::tls_config(&cfg.ca_file)?;
    let mut providers: Vec<Box<dyn Provider>> = Vec::new();
    if let Some(w) = &cfg.web_push {
        providers.push(Box::new(WebPush::new(w, tls.clone(), timeout)?));
    }
    if let Some(f) = &cfg.fcm {
        providers.push(Box::new(fcm::Fcm::new(f, tls.clone(), timeout)?));
    }
    if let Some(a) = &cfg.apns {
        providers.push(Box::new(apns::Apns::new(a, &tls, timeout, cfg.priority)?));
    }
    if let Some(w) = &cfg.webhook {
        providers.push(Box::new(webhook::Webhook::new(w, tls.clone(), timeout)?));
    }
    let rows = meta.outbox_load()?;
    let dead = meta.dead_letters_count()?;
    metrics.dead_letters.store(dead, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_notices_max);
    let jobs = notifier::senders(cfg.senders, cfg.priority, providers.into(), &tx)?;
    let mut n = notifier::Notifier::new(cfg.clone(), meta, jobs, metrics.clone(), rows);
    std::thread::Builder::new()
        .name("starling-push".into())
        .spawn(move || n.run(&rx))?;
    Ok(Some(NoticeSender { tx, metrics }))
}
