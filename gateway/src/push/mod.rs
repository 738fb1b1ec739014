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
pub mod webhook;
pub mod webpush;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use starling_router::Notice;
use starling_storage::meta::PushToken;
use starling_storage::push::{DeadLetter, OutboxEntry, PushStore};
use starling_storage::{ConvId, CursorStore, DeviceId, EmbeddedMeta, UserId};

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

/// A push service client (blocking; runs on the notifier's thread).
pub trait Provider: Send + std::fmt::Debug {
    /// The provider's name (the platform of the tokens it serves, or "webhook").
    fn name(&self) -> &'static str;
    /// Whether it serves tokens of `provider` (`PushToken::provider`): its own name, unless
    /// it serves several platforms (the operator webhook).
    fn serves(&self, provider: &str) -> bool {
        provider == self.name()
    }
    /// Sends one notification to `token`.
    fn send(&mut self, token: &PushToken, n: &Notification, now_ms: u64) -> Outcome;
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
}

impl PushMetrics {
    /// Appends the Prometheus text of the counters.
    pub fn render(&self, s: &mut String) {
        let rows: [(&str, &str, &str, &AtomicU64); 11] = [
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
    tx: SyncSender<Notice>,
    metrics: Arc<PushMetrics>,
}

impl NoticeSender {
    /// Hands a notice over without waiting: dropped and counted if the queue is full.
    pub fn send(&self, n: Notice) {
        match self.tx.try_send(n) {
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

/// Starts the notifier thread if a provider is configured; returns where to send notices.
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
        providers.push(Box::new(apns::Apns::new(a, &tls, timeout)?));
    }
    if let Some(w) = &cfg.webhook {
        providers.push(Box::new(webhook::Webhook::new(w, tls.clone(), timeout)?));
    }
    let rows = meta.outbox_load()?;
    let dead = meta.dead_letters_count()?;
    metrics.dead_letters.store(dead, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_notices_max);
    let mut n = Notifier::new(cfg.clone(), meta, providers, metrics.clone(), rows);
    std::thread::Builder::new()
        .name("starling-push".into())
        .spawn(move || n.run(&rx))?;
    Ok(Some(NoticeSender { tx, metrics }))
}

type Key = (UserId, DeviceId, u64);

struct Notifier {
    cfg: PushConfig,
    meta: Arc<EmbeddedMeta>,
    providers: Vec<Box<dyn Provider>>,
    metrics: Arc<PushMetrics>,
    rows: HashMap<Key, OutboxEntry>,
    /// (when, row): a pending row's due time, a sent row's end of collapse interval. Stale
    /// timers (the row changed) are skipped when they come up.
    timers: BTreeSet<(u64, Key)>,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

fn key(e: &OutboxEntry) -> Key {
    (e.user, e.device, e.conv)
}

impl Notifier {
    fn new(
        cfg: PushConfig,
        meta: Arc<EmbeddedMeta>,
        providers: Vec<Box<dyn Provider>>,
        metrics: Arc<PushMetrics>,
        loaded: Vec<OutboxEntry>,
    ) -> Self {
        let mut n = Self {
            cfg,
            meta,
            providers,
            metrics,
            rows: HashMap::new(),
            timers: BTreeSet::new(),
            rng: ring::rand::SystemRandom::new(),
        };
        for e in loaded {
            n.schedule(&e);
            n.rows.insert(key(&e), e);
        }
        n.gauge();
        n
    }

    fn gauge(&self) {
        self.metrics
            .outbox_entries
            .store(self.rows.len() as u64, Ordering::Relaxed);
    }

    fn schedule(&mut self, e: &OutboxEntry) {
        let when = if e.pending() {
            e.due_ms
        } else {
            e.sent_ms.saturating_add(self.cfg.collapse_ms)
        };
        self.timers.insert((when, key(e)));
    }

    fn run(&mut self, rx: &Receiver<Notice>) {
        loop {
            let now = crate::clock::unix_ms();
            let wait = self
                .timers
                .first()
                .map_or(1000, |&(t, _)| t.saturating_sub(now).clamp(1, 1000));
            let mut batch = Vec::new();
            match rx.recv_timeout(Duration::from_millis(wait)) {
                Ok(n) => {
                    batch.push(n);
                    while batch.len() < 4096 {
                        match rx.try_recv() {
                            Ok(n) => batch.push(n),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let r = self
                .take(&batch, crate::clock::unix_ms())
                .and_then(|()| self.due(crate::clock::unix_ms()));
            if let Err(e) = r {
                // The outbox cannot be written: stop rather than send what is not recorded.
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "push notifier stops: the outbox cannot be written");
                return;
            }
        }
    }

    /// Turns notices into outbox rows, written in one transaction.
    fn take(&mut self, batch: &[Notice], now: u64) -> Result<(), starling_storage::StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tokens: HashMap<u64, Vec<PushToken>> = HashMap::new();
        let mut puts: HashMap<Key, OutboxEntry> = HashMap::new();
        for n in batch {
            for &user in n.members.iter() {
                if user.0 == n.sender {
                    continue;
                }
                let list = match tokens.entry(user.0) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(self.meta.push_tokens(user)?)
                    }
                };
                for t in list.iter() {
                    if !self.providers.iter().any(|p| p.serves(&t.provider)) {
                        continue;
                    }
                    let k = (user, t.device, n.conversation_id);
                    let e = match self.rows.get(&k) {
                        Some(old) if n.seq <= old.seq => continue,
                        Some(old) => {
                            self.metrics.collapsed.fetch_add(1, Ordering::Relaxed);
                            let mut e = old.clone();
                            if !old.pending() {
                                e.due_ms = (now + self.cfg.grace_ms)
                                    .max(old.sent_ms.saturating_add(self.cfg.collapse_ms));
                            }
                            e.seq = n.seq;
                            e.sender = n.sender;
                            e
                        }
                        None if self.rows.len() >= self.cfg.outbox_entries_max => {
                            self.metrics
                                .outbox_full_dropped
                                .fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        None => OutboxEntry {
                            user,
                            device: t.device,
                            conv: n.conversation_id,
                            seq: n.seq,
                            sender: n.sender,
                            due_ms: now + self.cfg.grace_ms,
                            sent_seq: 0,
                            sent_ms: 0,
                            attempts: 0,
                        },
                    };
                    self.schedule(&e);
                    self.rows.insert(k, e.clone());
                    puts.insert(k, e);
                }
            }
        }
        let puts: Vec<OutboxEntry> = puts.into_values().collect();
        self.gauge();
        self.meta.outbox_write(&puts, &[])
    }

    /// Sends (or settles, or forgets) every row whose time has come.
    fn due(&mut self, now: u64) -> Result<(), starling_storage::StorageError> {
        while let Some(&(when, k)) = self.timers.first() {
            if when > now {
                break;
            }
            self.timers.pop_first();
            let Some(e) = self.rows.get(&k).cloned() else {
                continue;
            };
            if e.pending() {
                if e.due_ms == when {
                    self.send(e, now)?;
                }
            } else if e.sent_ms.saturating_add(self.cfg.collapse_ms) == when {
                self.rows.remove(&k);
                self.meta.outbox_write(&[], &[k])?;
            }
        }
        self.gauge();
        Ok(())
    }

    fn settle(
        &mut self,
        mut e: OutboxEntry,
        sent_ms: u64,
    ) -> Result<(), starling_storage::StorageError> {
        e.sent_seq = e.seq;
        e.sent_ms = sent_ms;
        e.attempts = 0;
        self.meta.outbox_write(std::slice::from_ref(&e), &[])?;
        self.schedule(&e);
        self.rows.insert(key(&e), e);
        Ok(())
    }

    fn forget(&mut self, k: Key) -> Result<(), starling_storage::StorageError> {
        self.rows.remove(&k);
        self.meta.outbox_write(&[], &[k])
    }

    fn send(&mut self, mut e: OutboxEntry, now: u64) -> Result<(), starling_storage::StorageError> {
        let k = key(&e);
        let conv = ConvId(u128::from(e.conv));
        let delivered = self.meta.delivery_cursor(conv, e.user, e.device)?;
        if delivered.0 >= e.seq {
            self.metrics
                .delivered_in_time
                .fetch_add(1, Ordering::Relaxed);
            // Nothing was sent: the next entry waits only for the grace period.
            return self.settle(e, 0);
        }
        let token = self
            .meta
            .push_tokens(e.user)?
            .into_iter()
            .find(|t| t.device == e.device);
        let Some(token) = token else {
            return self.forget(k);
        };
        let Some(p) = self
            .providers
            .iter_mut()
            .find(|p| p.serves(&token.provider))
        else {
            return self.forget(k);
        };
        let read = self.meta.read_cursor(conv, e.user)?;
        let n = Notification {
            conversation_id: e.conv,
            seq: e.seq,
            unread_count: e.seq.saturating_sub(read.0),
        };
        match p.send(&token, &n, now) {
            Outcome::Sent => {
                self.metrics.sent.fetch_add(1, Ordering::Relaxed);
                self.settle(e, now)
            }
            Outcome::Retry { after_ms, why } => {
                e.attempts += 1;
                if e.attempts >= self.cfg.attempts_max {
                    let reason = format!("{} attempts, last: {why}", e.attempts);
                    return self.dead(e, token.provider, reason);
                }
                self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                let cap = self
                    .cfg
                    .retry_base_ms
                    .saturating_mul(1 << e.attempts.min(20))
                    .min(self.cfg.retry_max_ms);
                let jitter: [u8; 8] = ring::rand::generate(&self.rng)
                    .map(ring::rand::Random::expose)
                    .unwrap_or_default();
                let backoff = u64::from_le_bytes(jitter) % cap.max(1) + 1;
                let wait = backoff.max(after_ms.unwrap_or(0).min(self.cfg.retry_max_ms));
                tracing::info!(user = e.user.0, device = e.device.0, attempts = e.attempts, wait_ms = wait, %why, "push notification retried");
                e.due_ms = now + wait;
                self.meta.outbox_write(std::slice::from_ref(&e), &[])?;
                self.schedule(&e);
                self.rows.insert(k, e);
                Ok(())
            }
            Outcome::InvalidToken(why) => {
                tracing::info!(user = e.user.0, device = e.device.0, %why, "push token invalid: removed");
                self.meta
                    .push_token_remove_if(e.user, e.device, &token.token)?;
                self.metrics
                    .invalid_tokens_removed
                    .fetch_add(1, Ordering::Relaxed);
                self.forget(k)
            }
            Outcome::Failed(why) => self.dead(e, token.provider, why),
        }
    }

    fn dead(
        &mut self,
        e: OutboxEntry,
        provider: String,
        reason: String,
    ) -> Result<(), starling_storage::StorageError> {
        tracing::warn!(user = e.user.0, device = e.device.0, %reason, "push notification refused: dead letter");
        self.meta.dead_letter_add(&DeadLetter {
            id: 0,
            user: e.user,
            device: e.device,
            conv: e.conv,
            seq: e.seq,
            provider,
            reason,
            at_ms: crate::clock::unix_ms(),
        })?;
        self.rows.remove(&key(&e));
        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
