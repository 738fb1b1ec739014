//! The notifier: one thread (`starling-push`) that owns the outbox (rows in memory, written
//! through to `meta.redb`) and decides what to send, and `push.senders` sender threads
//! (`starling-push-send`) that carry out the requests to the push services.
//!
//! Each turn of the notifier's loop takes every event waiting (notices from the shards,
//! answers from the senders), applies them to the rows, picks the rows that are due, and
//! writes every row it changed in **one** durable transaction. A due row whose durable copy
//! names the seq to send is handed to the senders at once (while the transaction commits); a
//! row this turn changed, only after the commit. So a row is durable before its request goes
//! out (a crash sends it once more, never loses it), and the outbox costs one fsync per turn
//! however many notifications the turn carried: under load a turn gathers what arrived during
//! the previous turn's fsync.
//!
//! The notifier, the senders and the APNs runtime's thread run at `push.priority` (default
//! `idle`: `SCHED_IDLE`, which a waking shard preempts at once): notifications are background
//! work that yields the CPU to the shards, so the message path's latency does not pay for
//! them; under a CPU shortage they fall behind (and the queue from the shards, when full,
//! drops and counts notices).
//!
//! At most `push.in_flight_max` rows are with the senders at once; a row with the senders is
//! not picked again (a newer entry for it waits for the answer, which reschedules it). A
//! sender takes one job of a one-request-at-a-time provider (HTTP/1.1: Web Push, FCM, the
//! webhook) or a batch of up to `batch_max` of a multiplexing one (APNs: one `send_batch`
//! puts them on the HTTP/2 connection at once), so a batch costs the thread hand-offs of one
//! request.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use starling_router::Notice;
use starling_storage::meta::PushToken;
use starling_storage::push::{DeadLetter, OutboxEntry, PushStore as _};
use starling_storage::{ConvId, CursorStore as _, DeviceId, EmbeddedMeta, StorageError, UserId};

use super::{Notification, Outcome, Provider, PushMetrics};
use crate::config::{PushConfig, ThreadPriority};

/// Events the notifier thread waits for, in one queue so one blocking receive serves both.
#[derive(Debug)]
pub(super) enum Event {
    /// A durable entry, from a shard.
    Notice(Notice),
    /// A sender's answers to one batch.
    Done(Vec<Done>),
}

/// One notification for a sender to carry out.
#[derive(Debug)]
pub(super) struct Job {
    key: Key,
    /// The seq the notification names (the row may take newer ones meanwhile).
    seq: u64,
    token: PushToken,
    provider: usize,
    n: Notification,
}

/// What a push service answered to a [`Job`].
#[derive(Debug)]
pub(super) struct Done {
    job: Job,
    outcome: Outcome,
    at_ms: u64,
}

type Key = (UserId, DeviceId, u64);

fn key(e: &OutboxEntry) -> Key {
    (e.user, e.device, e.conv)
}

/// The sender threads: where to hand them jobs, and the providers they share. They stop when
/// this is dropped (the notifier stopped).
pub(super) struct Senders {
    jobs: Sender<Vec<Job>>,
    providers: Arc<[Box<dyn Provider>]>,
}

/// Starts `count` sender threads sharing `providers`; they answer on `events`.
pub(super) fn senders(
    count: usize,
    priority: ThreadPriority,
    providers: Arc<[Box<dyn Provider>]>,
    events: &SyncSender<Event>,
) -> anyhow::Result<Senders> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Job>>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..count {
        let rx = rx.clone();
        let events = events.clone();
        let providers = providers.clone();
        std::thread::Builder::new()
            .name(format!("starling-push-send-{i}"))
            .spawn(move || {
                background(priority);
                loop {
                    // Nothing panics under this lock: a poisoned one is still a queue.
                    let jobs = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(jobs) = jobs else { return };
                    let Some(first) = jobs.first() else { continue };
                    let p = &providers[first.provider];
                    let now = crate::clock::unix_ms();
                    let outcomes = if let [job] = jobs.as_slice() {
                        vec![p.send(&job.token, &job.n, now)]
                    } else {
                        let batch: Vec<_> = jobs.iter().map(|j| (&j.token, &j.n)).collect();
                        p.send_batch(&batch, now)
                    };
                    let at_ms = crate::clock::unix_ms();
                    let done = jobs
                        .into_iter()
                        .zip(outcomes)
                        .map(|(job, outcome)| Done {
                            job,
                            outcome,
                            at_ms,
                        })
                        .collect();
                    if events.send(Event::Done(done)).is_err() {
                        return;
                    }
                }
            })?;
    }
    Ok(Senders {
        jobs: tx,
        providers,
    })
}

/// Gives the calling thread `push.priority` (see the module docs).
pub(super) fn background(priority: ThreadPriority) {
    if let Err(e) = crate::runtime::set_priority(priority) {
        tracing::warn!(error = %e, ?priority, "a push thread keeps its priority");
    }
}

/// Why the notifier stops.
enum Stop {
    Store(StorageError),
    Senders,
}

impl From<StorageError> for Stop {
    fn from(e: StorageError) -> Self {
        Stop::Store(e)
    }
}

/// Row changes of one turn, written in one transaction.
#[derive(Default)]
struct Writes {
    puts: HashMap<Key, OutboxEntry>,
    deletes: HashSet<Key>,
}

impl Writes {
    fn put(&mut self, e: &OutboxEntry) {
        self.deletes.remove(&key(e));
        self.puts.insert(key(e), e.clone());
    }

    fn delete(&mut self, k: Key) {
        self.puts.remove(&k);
        self.deletes.insert(k);
    }

    /// Forgets `k` without writing (a transaction of its own already removed it).
    fn drop_key(&mut self, k: Key) {
        self.puts.remove(&k);
        self.deletes.remove(&k);
    }
}

pub(super) struct Notifier {
    cfg: PushConfig,
    meta: Arc<EmbeddedMeta>,
    providers: Arc<[Box<dyn Provider>]>,
    jobs: Sender<Vec<Job>>,
    metrics: Arc<PushMetrics>,
    rows: HashMap<Key, OutboxEntry>,
    /// (when, row): a pending row's due time, a sent row's end of collapse interval. Stale
    /// timers (the row changed) are skipped when they come up.
    timers: BTreeSet<(u64, Key)>,
    /// Rows with the senders.
    in_flight: HashSet<Key>,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("rows", &self.rows.len())
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    pub(super) fn new(
        cfg: PushConfig,
        meta: Arc<EmbeddedMeta>,
        Senders { jobs, providers }: Senders,
        metrics: Arc<PushMetrics>,
        loaded: Vec<OutboxEntry>,
    ) -> Self {
        let mut n = Self {
            cfg,
            meta,
            providers,
            jobs,
            metrics,
            rows: HashMap::new(),
            timers: BTreeSet::new(),
            in_flight: HashSet::new(),
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
        self.metrics
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
    }

    fn in_flight_max(&self) -> usize {
        self.cfg.in_flight_max
    }

    fn schedule(&mut self, e: &OutboxEntry) {
        let when = if e.pending() {
            e.due_ms
        } else {
            e.sent_ms.saturating_add(self.cfg.collapse_ms)
        };
        self.timers.insert((when, key(e)));
    }

    pub(super) fn run(&mut self, rx: &Receiver<Event>) {
        background(self.cfg.priority);
        loop {
            let now = crate::clock::unix_ms();
            let wait = match self.timers.first() {
                // Due rows wait for a sender to answer (an event) rather than a timer.
                _ if self.in_flight.len() >= self.in_flight_max() => 1000,
                Some(&(t, _)) => t.saturating_sub(now).clamp(1, 1000),
                None => 1000,
            };
            let mut events = Vec::new();
            match rx.recv_timeout(Duration::from_millis(wait)) {
                Ok(e) => {
                    events.push(e);
                    while events.len() < 8192 {
                        match rx.try_recv() {
                            Ok(e) => events.push(e),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            match self.turn(events) {
                Ok(()) => {}
                Err(Stop::Store(e)) => {
                    // The outbox cannot be written: stop rather than send what is not
                    // recorded. The senders stop with the job queue.
                    self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "push notifier stops: the outbox cannot be written");
                    return;
                }
                Err(Stop::Senders) => {
                    tracing::error!("push notifier stops: every sender thread is gone");
                    return;
                }
            }
        }
    }

    /// Applies `events`, picks the due rows, writes every change durably, then hands the
    /// picked rows to the senders.
    fn turn(&mut self, events: Vec<Event>) -> Result<(), Stop> {
        let mut w = Writes::default();
        let mut notices = Vec::new();
        for e in events {
            match e {
                Event::Notice(n) => notices.push(n),
                Event::Done(done) => {
                    for d in done {
                        self.answered(d, &mut w)?;
                    }
                }
            }
        }
        let now = crate::clock::unix_ms();
        self.take(&notices, now, &mut w)?;
        let jobs = self.due(now, &mut w)?;
        // A row whose durable copy is what is sent goes out at once, while the transaction
        // commits; one this turn changed (a newer seq) only once the commit is done.
        let (clean, dirty): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| !w.puts.contains_key(&j.key));
        self.hand_out(clean)?;
        let puts: Vec<OutboxEntry> = w.puts.into_values().collect();
        let deletes: Vec<Key> = w.deletes.into_iter().collect();
        self.meta.outbox_write(&puts, &deletes)?;
        self.hand_out(dirty)?;
        self.gauge();
        Ok(())
    }

    /// Hands jobs to the senders: one provider's in batches of its `batch_max`.
    fn hand_out(&mut self, jobs: Vec<Job>) -> Result<(), Stop> {
        let mut by_provider: Vec<Vec<Job>> = Vec::new();
        by_provider.resize_with(self.providers.len(), Vec::new);
        for job in jobs {
            self.in_flight.insert(job.key);
            by_provider[job.provider].push(job);
        }
        for (p, mut jobs) in by_provider.into_iter().enumerate() {
            let max = self.providers[p].batch_max().max(1);
            while !jobs.is_empty() {
                let rest = jobs.split_off(jobs.len().min(max));
                if self.jobs.send(jobs).is_err() {
                    // Every sender thread is gone (a provider panicked in each): nothing can
                    // be sent; stop as for a store error rather than pile up rows.
                    return Err(Stop::Senders);
                }
                jobs = rest;
            }
        }
        Ok(())
    }

    /// Turns notices into outbox rows.
    fn take(&mut self, batch: &[Notice], now: u64, w: &mut Writes) -> Result<(), StorageError> {
        let mut tokens: HashMap<u64, Vec<PushToken>> = HashMap::new();
        for n in batch {
            for &user in n.members.iter() {
                if user.0 == n.sender {
                    continue;
                }
                let list = match tokens.entry(user.0) {
                    Entry::Occupied(o) => o.into_mut(),
                    Entry::Vacant(v) => v.insert(self.meta.push_tokens(user)?),
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
                    w.put(&e);
                    self.rows.insert(k, e);
                }
            }
        }
        Ok(())
    }

    /// The rows whose time has come: settled or forgotten here, or returned as jobs (at most
    /// what the senders may still take).
    fn due(&mut self, now: u64, w: &mut Writes) -> Result<Vec<Job>, StorageError> {
        let mut jobs = Vec::new();
        let mut tokens: HashMap<u64, Vec<PushToken>> = HashMap::new();
        while let Some(&(when, k)) = self.timers.first() {
            if when > now || self.in_flight.len() + jobs.len() >= self.in_flight_max() {
                break;
            }
            self.timers.pop_first();
            let Some(e) = self.rows.get(&k).cloned() else {
                continue;
            };
            if self.in_flight.contains(&k) {
                // Its answer reschedules it.
                continue;
            }
            if e.pending() {
                if e.due_ms == when
                    && let Some(job) = self.prepare(e, w, &mut tokens)?
                {
                    jobs.push(job);
                }
            } else if e.sent_ms.saturating_add(self.cfg.collapse_ms) == when {
                self.rows.remove(&k);
                w.delete(k);
            }
        }
        Ok(jobs)
    }

    /// A due row: settled if its device got the entries meanwhile, forgotten if its token
    /// or provider is gone, otherwise a job.
    fn prepare(
        &mut self,
        mut e: OutboxEntry,
        w: &mut Writes,
        tokens: &mut HashMap<u64, Vec<PushToken>>,
    ) -> Result<Option<Job>, StorageError> {
        let k = key(&e);
        let conv = ConvId(u128::from(e.conv));
        let delivered = self.meta.delivery_cursor(conv, e.user, e.device)?;
        if delivered.0 >= e.seq {
            self.metrics
                .delivered_in_time
                .fetch_add(1, Ordering::Relaxed);
            // Nothing was sent: the next entry waits only for the grace period.
            e.sent_seq = e.seq;
            e.sent_ms = 0;
            e.attempts = 0;
            self.schedule(&e);
            w.put(&e);
            self.rows.insert(k, e);
            return Ok(None);
        }
        let list = match tokens.entry(e.user.0) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(self.meta.push_tokens(e.user)?),
        };
        let token = list.iter().find(|t| t.device == e.device).cloned();
        let provider = token
            .as_ref()
            .and_then(|t| self.providers.iter().position(|p| p.serves(&t.provider)));
        let (Some(token), Some(provider)) = (token, provider) else {
            self.rows.remove(&k);
            w.delete(k);
            return Ok(None);
        };
        let read = self.meta.read_cursor(conv, e.user)?;
        Ok(Some(Job {
            key: k,
            seq: e.seq,
            token,
            provider,
            n: Notification {
                conversation_id: e.conv,
                seq: e.seq,
                unread_count: e.seq.saturating_sub(read.0),
            },
        }))
    }

    /// A sender's answer.
    fn answered(&mut self, d: Done, w: &mut Writes) -> Result<(), StorageError> {
        let Done {
            job,
            outcome,
            at_ms,
        } = d;
        let k = job.key;
        self.in_flight.remove(&k);
        let Some(mut e) = self.rows.get(&k).cloned() else {
            return Ok(());
        };
        match outcome {
            Outcome::Sent => {
                self.metrics.sent.fetch_add(1, Ordering::Relaxed);
                e.sent_seq = job.seq;
                e.sent_ms = at_ms;
                e.attempts = 0;
                if e.pending() {
                    // Entries that came while it was in flight: the next interval.
                    e.due_ms =
                        (at_ms + self.cfg.grace_ms).max(at_ms.saturating_add(self.cfg.collapse_ms));
                }
            }
            Outcome::Retry { after_ms, why } => {
                e.attempts += 1;
                if e.attempts >= self.cfg.attempts_max {
                    let reason = format!("{} attempts, last: {why}", e.attempts);
                    return self.dead(&e, job.token.provider, reason, w);
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
                e.due_ms = at_ms + wait;
            }
            Outcome::InvalidToken(why) => {
                tracing::info!(user = e.user.0, device = e.device.0, %why, "push token invalid: removed");
                self.meta
                    .push_token_remove_if(e.user, e.device, &job.token.token)?;
                self.metrics
                    .invalid_tokens_removed
                    .fetch_add(1, Ordering::Relaxed);
                self.rows.remove(&k);
                w.delete(k);
                return Ok(());
            }
            Outcome::Failed(why) => return self.dead(&e, job.token.provider, why, w),
        }
        self.schedule(&e);
        w.put(&e);
        self.rows.insert(k, e);
        Ok(())
    }

    fn dead(
        &mut self,
        e: &OutboxEntry,
        provider: String,
        reason: String,
        w: &mut Writes,
    ) -> Result<(), StorageError> {
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
        // The dead letter's transaction removed the row.
        self.rows.remove(&key(e));
        w.drop_key(key(e));
        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
