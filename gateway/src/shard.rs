//! A shard: one pinned thread running one single-threaded runtime, with its
//! own listeners (SO_REUSEPORT), connections, timer wheel and scratch
//! buffers. Shards share nothing mutable on the data path; the only
//! cross-shard traffic is a low-rate control queue ([`Control`]) drained on
//! each timer tick.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::task::{Poll, Waker};

use starling_protocol::FrameKind;
use starling_protocol::v1::ErrorCode;
use starling_router::Transmit;

use crate::accounts::Accounts;
use crate::clock;
use crate::config::Config;
use crate::messaging::ShardRouter;
use crate::metrics::{self, Metrics, ShardMetrics};
use crate::runtime::{self, Ready};
use crate::tokencache::TokenCache;
use crate::wheel::{ConnId, TimerWheel};

/// Messages between shards (and from the signal thread).
#[derive(Debug)]
pub enum Control {
    /// Close the connections of these sessions (and forget their tokens).
    RevokeSessions {
        /// The revoked sessions.
        sessions: Vec<u64>,
        /// [`Shared::revocation_epoch`] after this revocation.
        epoch: u64,
    },
    /// Queue a key directory push on this shard's connections of its users
    /// (`crate::keys`).
    Push(Arc<crate::keys::Push>),
    /// Stop accepting, say Goodbye, drain, stop.
    Shutdown,
    /// A storage fault (see [`crate::health`]): stop accepting, let the answers on their way
    /// arrive for [`crate::health::FAULT_ANSWER_GRACE_MS`], say `Goodbye{STORAGE_FAILURE}`,
    /// drain, stop.
    Fault,
}

/// State shared by all shards (read-only after start, or internally synced).
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub cfg: Config,
    /// Accounts service.
    pub accounts: Arc<Accounts>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// TLS configuration.
    pub tls: Arc<rustls::ServerConfig>,
    /// One control sender per shard.
    pub controls: Vec<mpsc::Sender<Control>>,
    /// Counts revocations. A shard trusts its token cache only while it has
    /// processed every revocation counted here (see [`Shard::token_cache_current`]).
    pub revocation_epoch: AtomicU64,
    /// Whether the process serves; where storage faults are reported.
    pub health: Arc<crate::health::Health>,
    /// The media endpoint, if `[media] listen` is set.
    pub media: Option<Arc<crate::media::Media>>,
    /// The end-to-end key directory (`None` without messaging).
    pub keys: Option<crate::keys::KeyService>,
}

impl Shared {
    /// Asks every shard to close the connections of `sessions`.
    pub fn revoke_sessions(&self, sessions: &[u64]) {
        if sessions.is_empty() {
            return;
        }
        let epoch = self.revocation_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        for c in &self.controls {
            let _ = c.send(Control::RevokeSessions {
                sessions: sessions.to_vec(),
                epoch,
            });
        }
    }
}

/// Why the shard is closing a connection from outside its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// Missed the TLS handshake or Hello deadline.
    Deadline,
    /// Silent for longer than the idle timeout.
    Idle,
    /// Its session was revoked.
    Revoked,
    /// The server is shutting down.
    Shutdown,
    /// Closing took too long (the peer does not read).
    CloseTimeout,
    /// The router asked for the close (e.g. `SLOW_CONSUMER`).
    Router(ErrorCode),
    /// The access token that authenticated the connection expired.
    TokenExpired,
    /// A storage fault stops the server (see [`crate::health`]).
    StorageFault,
    /// A frame for the peer (an answer or a push) is larger than the frame limit the peer
    /// negotiated in Hello; it could neither be sent nor silently dropped.
    FrameTooLarge,
    /// The peer does not read: its socket took nothing for `limits.slow_consumer_close_ms`
    /// while bytes waited, or more than `limits.outbound_bytes_max` waited.
    SlowConsumer,
}

impl Kill {
    /// The code sent in Goodbye/Error.
    #[must_use]
    pub fn code(self) -> ErrorCode {
        match self {
            Kill::Deadline | Kill::CloseTimeout => ErrorCode::DeadlineExceeded,
            Kill::Idle => ErrorCode::HeartbeatTimeout,
            Kill::Revoked => ErrorCode::SessionRevoked,
            Kill::Shutdown => ErrorCode::ShuttingDown,
            Kill::Router(code) => code,
            Kill::TokenExpired => ErrorCode::TokenExpired,
            Kill::FrameTooLarge => ErrorCode::FrameTooLarge,
            Kill::SlowConsumer => ErrorCode::SlowConsumer,
            Kill::StorageFault => ErrorCode::StorageFailure,
        }
    }
}

/// What the shard knows about one connection (the task owns the rest).
#[derive(Debug, Default)]
pub struct ConnCtl {
    /// Monotonic ms after which the connection is killed.
    pub deadline_ms: Cell<u64>,
    /// What the deadline is for: `Kill::Deadline` or `Kill::Idle`.
    pub deadline_kind: Cell<Option<Kill>>,
    /// Monotonic ms at which the access token that authenticated the
    /// connection expires (0: not authenticated by a token).
    token_expires_ms: Cell<u64>,
    /// Monotonic ms at which a connection whose socket takes nothing is closed as a slow
    /// consumer (0: no write is stalled).
    write_deadline_ms: Cell<u64>,
    /// Bytes that waited for the socket when the stalled-write deadline was last set (0:
    /// not set); fewer waiting at the next stall means the socket took some.
    write_stalled_with: Cell<usize>,
    /// Requests read and not yet answered, which the in-flight limit counts: (request id, µs
    /// clock of the read that brought it if it is a Send, else 0). Unallocated when empty.
    requests: RefCell<VecDeque<(u64, u64)>>,
    /// The due time of the connection's live wheel entry (older entries
    /// with another due time are stale).
    filed_ms: Cell<u64>,
    /// Set by the shard; taken by the task.
    kill: Cell<Option<Kill>>,
    waker: RefCell<Option<Waker>>,
    /// The authenticated session (0: none).
    pub session_id: Cell<u64>,
    /// The authenticated user and device (for the key directory's pushes).
    pub principal: Cell<Option<(u64, u32)>>,
    /// The connection has used the key directory (UploadKeys or FetchKeyBundles): it gets
    /// the directory's pushes from then on.
    pub keys_pushes: Cell<bool>,
    /// Frames from the router (encoded by it) waiting to be written.
    outbound: RefCell<VecDeque<Transmit>>,
}

impl ConnCtl {
    /// Asks the task to close.
    pub fn kill(&self, why: Kill) {
        if self.kill.get().is_none() {
            self.kill.set(Some(why));
        }
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Queues a frame from the router and wakes the task.
    pub fn push_outbound(&self, frame: Transmit) {
        self.outbound.borrow_mut().push_back(frame);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Whether router frames wait.
    #[must_use]
    pub fn has_outbound(&self) -> bool {
        !self.outbound.borrow().is_empty()
    }

    /// Takes the router frames that wait.
    pub fn take_outbound(&self) -> VecDeque<Transmit> {
        std::mem::take(&mut *self.outbound.borrow_mut())
    }

    /// A pending kill, if any; otherwise remembers the waker.
    pub fn poll_kill(&self, waker: &Waker) -> Option<Kill> {
        if let Some(k) = self.kill.take() {
            return Some(k);
        }
        let mut w = self.waker.borrow_mut();
        if !w.as_ref().is_some_and(|old| old.will_wake(waker)) {
            *w = Some(waker.clone());
        }
        None
    }

    /// Moves the deadline (later or earlier).
    pub fn set_deadline(&self, deadline_ms: u64, kind: Kill) {
        self.deadline_ms.set(deadline_ms);
        self.deadline_kind.set(Some(kind));
    }

    /// Clears the stalled-write deadline (the socket took everything).
    pub fn clear_write_deadline(&self) {
        self.write_deadline_ms.set(0);
        self.write_stalled_with.set(0);
    }

    /// Requests held (read, not yet answered).
    #[must_use]
    pub fn inflight(&self) -> usize {
        self.requests.borrow().len()
    }

    /// Request `request_id` was read: it counts until its final answer is queued.
    /// `send_read_us`: the µs clock of the read, for a Send (0 otherwise).
    pub fn admit(&self, request_id: u64, send_read_us: u64) {
        self.requests
            .borrow_mut()
            .push_back((request_id, send_read_us));
    }

    /// A frame is queued for the connection. If it is a request's final answer (a frame with
    /// its request id other than Deliver, Receipt and GroupReceipts, which are parts of a
    /// Sync's answer; SyncDone ends it), that request no longer counts as in flight. Returns
    /// the read time of a Send answered by this SendAck.
    pub fn settle(&self, request_id: u64, kind: Option<FrameKind>) -> Option<u64> {
        if request_id == 0
            || matches!(
                kind,
                Some(FrameKind::Deliver | FrameKind::Receipt | FrameKind::GroupReceipts)
            )
        {
            return None;
        }
        let mut requests = self.requests.borrow_mut();
        // Answers come nearly in request order, so the front is nearly always it.
        let i = requests.iter().position(|&(rid, _)| rid == request_id)?;
        let (_, read_us) = requests.remove(i)?;
        if requests.is_empty() {
            // An idle connection owns no buffer (one small allocation per burst of requests).
            *requests = VecDeque::new();
        }
        (kind == Some(FrameKind::SendAck) && read_us != 0).then_some(read_us)
    }
}

/// One shard's state; lives on its thread only.
#[derive(Debug)]
pub struct Shard {
    /// Shard number.
    pub index: usize,
    /// Shared state.
    pub shared: Arc<Shared>,
    conns: RefCell<HashMap<ConnId, Rc<ConnCtl>>>,
    wheel: RefCell<TimerWheel>,
    /// Verified access tokens (see [`crate::tokencache`]).
    pub token_cache: RefCell<TokenCache>,
    /// The last [`Shared::revocation_epoch`] this shard applied.
    seen_revocation_epoch: Cell<u64>,
    last_sweep_ms: Cell<u64>,
    next_id: Cell<u64>,
    shutting_down: Cell<bool>,
    /// After a fault: when (monotonic ms) the connections get their Goodbye; 0: not pending.
    fault_goodbye_ms: Cell<u64>,
    /// Once shutting down: when (monotonic ms) the drain ends, whatever is left.
    drain_until_ms: Cell<u64>,
    accept_wakers: RefCell<Vec<Waker>>,
    /// Ciphertext read scratch (per shard, not per connection).
    pub read_scratch: RefCell<Vec<u8>>,
    /// The shard's messaging core, if messaging is enabled.
    pub router: Option<Rc<ShardRouter>>,
}

/// Read scratch size: a kept partial TLS record plus a read of at least a
/// whole record (it grows if a partial handshake message is longer).
pub const READ_SCRATCH_BYTES: usize = 2 * crate::conn::TLS_RECORD_BYTES_MAX;

impl Shard {
    /// A new shard.
    #[must_use]
    pub fn new(index: usize, shared: Arc<Shared>, router: Option<Rc<ShardRouter>>) -> Self {
        let tick = shared.cfg.limits.timer_tick_ms;
        Self {
            index,
            wheel: RefCell::new(TimerWheel::new(tick, 1024, clock::mono_ms())),
            token_cache: RefCell::new(TokenCache::new(shared.cfg.limits.token_cache_entries)),
            seen_revocation_epoch: Cell::new(0),
            last_sweep_ms: Cell::new(0),
            shared,
            conns: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            shutting_down: Cell::new(false),
            fault_goodbye_ms: Cell::new(0),
            drain_until_ms: Cell::new(0),
            accept_wakers: RefCell::new(Vec::new()),
            read_scratch: RefCell::new(vec![0; READ_SCRATCH_BYTES]),
            router,
        }
    }

    /// Queues a router frame for connection `id` (dropped if it is gone); a final answer
    /// settles its request (`now_us`: the monotonic µs clock, for the SendAck latency).
    pub fn push_outbound(&self, id: ConnId, frame: Transmit, now_us: u64) {
        if let Some(ctl) = self.conns.borrow().get(&id) {
            if let Some(read_us) = ctl.settle(frame.request_id, frame.kind) {
                self.metrics()
                    .send_ack
                    .record_us(now_us.saturating_sub(read_us));
            }
            ctl.push_outbound(frame);
        }
    }

    /// Asks connection `id` to close.
    pub fn kill_conn(&self, id: ConnId, why: Kill) {
        if let Some(ctl) = self.conns.borrow().get(&id) {
            ctl.kill(why);
        }
    }

    /// Whether this server offers `feature` (a name of the registry,
    /// `starling_protocol::features`): signing in and contact discovery always; the rest with
    /// messaging; media with its endpoint; the key directory when it runs.
    #[must_use]
    pub fn offers(&self, feature: &str) -> bool {
        use starling_protocol::features::{
            ALL, CONTACT_DISCOVERY, E2E_KEYS, MEDIA, PASSWORD_LOGIN,
        };
        match feature {
            PASSWORD_LOGIN | CONTACT_DISCOVERY => true,
            _ if self.router.is_none() => false,
            MEDIA => self.shared.media.is_some(),
            E2E_KEYS => self.shared.keys.is_some(),
            f => ALL.contains(&f),
        }
    }

    /// The optional features this server offers (`Welcome.features`), in the registry's order.
    #[must_use]
    pub fn features(&self) -> Vec<&'static str> {
        starling_protocol::features::ALL
            .iter()
            .copied()
            .filter(|f| self.offers(f))
            .collect()
    }

    /// This shard's counters.
    #[must_use]
    pub fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.index]
    }

    /// True once shutdown began.
    #[must_use]
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// Registers a connection with a first deadline.
    pub fn register(&self, deadline_ms: u64) -> (ConnId, Rc<ConnCtl>) {
        let id = ConnId(self.next_id.get());
        self.next_id.set(id.0 + 1);
        let ctl = Rc::new(ConnCtl::default());
        ctl.set_deadline(deadline_ms, Kill::Deadline);
        ctl.filed_ms.set(deadline_ms);
        self.conns.borrow_mut().insert(id, ctl.clone());
        self.wheel.borrow_mut().schedule(id, deadline_ms);
        self.metrics()
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (id, ctl)
    }

    /// Sets a connection's deadline; if it is earlier than the connection's
    /// wheel entry, files a new entry (the old one goes stale).
    pub fn set_deadline(&self, id: ConnId, ctl: &ConnCtl, deadline_ms: u64, kind: Kill) {
        ctl.set_deadline(deadline_ms, kind);
        self.file_by(id, ctl, deadline_ms);
    }

    /// Closes the connection with `Kill::TokenExpired` at `expires_ms`
    /// (monotonic; 0: never), replacing any earlier token expiry.
    pub fn set_token_expiry(&self, id: ConnId, ctl: &ConnCtl, expires_ms: u64) {
        ctl.token_expires_ms.set(expires_ms);
        if expires_ms != 0 {
            self.file_by(id, ctl, expires_ms);
        }
    }

    /// A write to connection `id` would block with `waiting` bytes unwritten. The first
    /// time, and whenever fewer bytes wait than at the last stall (the socket took some),
    /// the connection gets `close_ms` more before it is closed with `Kill::SlowConsumer`.
    pub fn write_stalled(&self, id: ConnId, ctl: &ConnCtl, waiting: usize, close_ms: u64) {
        let before = ctl.write_stalled_with.get();
        if before == 0 || waiting < before {
            ctl.write_stalled_with.set(waiting.max(1));
            let due = clock::mono_ms() + close_ms;
            ctl.write_deadline_ms.set(due);
            self.file_by(id, ctl, due);
        }
    }

    fn file_by(&self, id: ConnId, ctl: &ConnCtl, due_ms: u64) {
        if due_ms < ctl.filed_ms.get() {
            ctl.filed_ms.set(due_ms);
            self.wheel.borrow_mut().schedule(id, due_ms);
        }
    }

    /// Forgets revoked sessions' tokens at once (the revocation reaches
    /// every shard's cache through its control queue as well).
    pub fn forget_sessions(&self, session_ids: &[u64]) {
        self.token_cache.borrow_mut().forget_sessions(session_ids);
    }

    /// True when this shard has applied every revocation so far, so its
    /// token cache can be trusted. Between a revocation and the next timer
    /// tick (when the control queue is drained) it is false, and tokens are
    /// checked in full against the store.
    #[must_use]
    pub fn token_cache_current(&self) -> bool {
        self.seen_revocation_epoch.get() == self.shared.revocation_epoch.load(Ordering::Acquire)
    }

    /// The revocation epoch now (a token check records it before reading
    /// the store and fills the cache only if it has not moved).
    #[must_use]
    pub fn revocation_epoch(&self) -> u64 {
        self.shared.revocation_epoch.load(Ordering::Acquire)
    }

    /// Forgets a connection (its wheel entry is dropped when it comes up).
    pub fn unregister(&self, id: ConnId) {
        if self.conns.borrow_mut().remove(&id).is_some() {
            self.metrics()
                .connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn tick(&self, now_ms: u64) {
        let conns = self.conns.borrow();
        let m = self.metrics();
        self.wheel.borrow_mut().advance(now_ms, |id, filed_ms| {
            let ctl = conns.get(&id)?;
            if ctl.filed_ms.get() != filed_ms {
                // Superseded by an earlier entry for the same connection.
                return None;
            }
            let token_exp = ctl.token_expires_ms.get();
            let write_dl = ctl.write_deadline_ms.get();
            let deadline = ctl.deadline_ms.get();
            let kind = if token_exp != 0 && token_exp <= now_ms {
                ctl.token_expires_ms.set(0);
                metrics::inc(&m.token_expiries);
                Some(Kill::TokenExpired)
            } else if write_dl != 0 && write_dl <= now_ms {
                ctl.write_deadline_ms.set(0);
                Some(Kill::SlowConsumer)
            } else if deadline <= now_ms {
                Some(ctl.deadline_kind.get().unwrap_or(Kill::Deadline))
            } else {
                None
            };
            let next = match kind {
                Some(kind) => {
                    ctl.kill(kind);
                    // Keep an entry: a connection that ignores its kill (it
                    // is in a blocking-pool call) is looked at again, with a
                    // close timeout.
                    let close_by = now_ms + 2000;
                    ctl.set_deadline(close_by, Kill::CloseTimeout);
                    close_by
                }
                None => [token_exp, write_dl]
                    .into_iter()
                    .filter(|&t| t != 0)
                    .fold(deadline, u64::min),
            };
            ctl.filed_ms.set(next);
            Some(next)
        });
    }

    /// Stops accepting and sets the end of the drain, `drain_ms` from now; false if already
    /// shutting down.
    fn stop_accepting(&self, now_ms: u64, drain_ms: u64) -> bool {
        if self.shutting_down.replace(true) {
            return false;
        }
        self.drain_until_ms.set(now_ms + drain_ms);
        for w in self.accept_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        true
    }

    fn kill_all(&self, why: Kill) {
        for ctl in self.conns.borrow().values() {
            ctl.kill(why);
        }
    }

    fn control(&self, msg: Control, now_ms: u64) {
        match msg {
            Control::RevokeSessions {
                sessions: ids,
                epoch,
            } => {
                self.forget_sessions(&ids);
                self.seen_revocation_epoch
                    .set(self.seen_revocation_epoch.get().max(epoch));
                for ctl in self.conns.borrow().values() {
                    let sid = ctl.session_id.get();
                    if sid != 0 && ids.contains(&sid) {
                        ctl.kill(Kill::Revoked);
                    }
                }
            }
            Control::Push(push) => {
                for (&id, ctl) in self.conns.borrow().iter() {
                    if let Some((user, device)) = ctl.principal.get()
                        && ctl.keys_pushes.get()
                        && push.is_for(user, device)
                    {
                        ctl.push_outbound(Transmit {
                            conn: crate::messaging::router_conn(id),
                            bytes: push.bytes.clone(),
                            request_id: 0,
                            kind: Some(push.kind),
                        });
                    }
                }
            }
            Control::Shutdown => {
                if self.stop_accepting(now_ms, self.shared.cfg.limits.shutdown_drain_ms) {
                    self.kill_all(Kill::Shutdown);
                }
            }
            Control::Fault => {
                let grace = crate::health::FAULT_ANSWER_GRACE_MS;
                if self.stop_accepting(now_ms, grace + self.shared.cfg.limits.shutdown_drain_ms) {
                    // Connections stopped reading at the fault (`Health::faulted`); the
                    // answers already on their way get the grace to arrive first.
                    self.fault_goodbye_ms.set(now_ms + grace);
                }
            }
        }
    }

    /// Runs the shard until shutdown has drained.
    pub async fn run(
        self: Rc<Self>,
        listeners: Vec<(TcpListener, bool)>,
        controls: mpsc::Receiver<Control>,
    ) {
        if let Some(r) = &self.router {
            runtime::spawn(crate::messaging::drive(self.clone(), r.clone()));
        }
        for (l, tls) in listeners {
            match Ready::new(l) {
                Ok(l) => runtime::spawn(accept_loop(self.clone(), l, tls)),
                Err(e) => tracing::error!(shard = self.index, error = %e, "listener setup failed"),
            }
        }
        let tick = self.shared.cfg.limits.timer_tick_ms;
        loop {
            runtime::sleep_ms(tick).await;
            let now = clock::mono_ms();
            while let Ok(msg) = controls.try_recv() {
                self.control(msg, now);
            }
            let goodbye = self.fault_goodbye_ms.get();
            if goodbye != 0 && now >= goodbye {
                self.fault_goodbye_ms.set(0);
                self.kill_all(Kill::StorageFault);
            }
            self.tick(now);
            let unix_now = clock::unix_ms();
            if unix_now >= self.last_sweep_ms.get() + 1000 {
                self.last_sweep_ms.set(unix_now);
                self.token_cache.borrow_mut().sweep(unix_now);
            }
            if self.shutting_down.get()
                && ((self.conns.borrow().is_empty() && self.fault_goodbye_ms.get() == 0)
                    || now >= self.drain_until_ms.get())
            {
                break;
            }
        }
    }
}

/// accept4(2) with SOCK_NONBLOCK: the socket comes out non-blocking (one
/// syscall instead of two) and with TCP_NODELAY inherited from the listener.
fn accept_nonblocking(l: &TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (s, addr) = socket2::SockRef::from(l).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| std::io::Error::other("accepted a non-IP socket"))?;
    Ok((s.into(), addr))
}

async fn accept_loop(shard: Rc<Shard>, listener: Ready<TcpListener>, tls: bool) {
    loop {
        let accepted = poll_fn(|cx| {
            if shard.shutting_down() {
                return Poll::Ready(None);
            }
            loop {
                match accept_nonblocking(listener.get()) {
                    Ok(s) => return Poll::Ready(Some(Ok(s))),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        match listener.poll_readable(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                            Poll::Pending => {
                                let mut ws = shard.accept_wakers.borrow_mut();
                                if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                                    ws.push(cx.waker().clone());
                                }
                                return Poll::Pending;
                            }
                        }
                    }
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
        })
        .await;
        match accepted {
            None => return,
            Some(Ok((stream, peer))) => {
                metrics::inc(&shard.metrics().accepts);
                if shard.conns.borrow().len() >= shard.shared.cfg.limits.connections_per_shard_max {
                    metrics::inc(&shard.metrics().refused);
                    drop(stream);
                    continue;
                }
                runtime::spawn(crate::conn::run(shard.clone(), stream, peer, tls));
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(shard = shard.index, error = %e, "accept failed");
                runtime::sleep_ms(50).await;
            }
        }
    }
}
