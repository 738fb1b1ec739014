//! One connection's task: TLS (rustls's unbuffered API driven from per-shard
//! scratch buffers, in `conn/tls.rs`), the frame codec, the Hello/auth state machine, limits
//! and orderly close. Readiness-then-read: while idle the task holds no read
//! buffer and no write buffer; it waits on the socket's readiness or a kill
//! from the shard.
//!
//! Per-connection memory while idle: the task's state ([`Conn`]), rustls's
//! record-layer keys and state machine ([`Tls`]), and three empty,
//! unallocated buffers: `out` (encoded frames not yet written or
//! encrypted), `wire` (ciphertext the socket did not take) and
//! `Tls::partial_in` (the tail of a read that did not make a whole TLS
//! record). Each is allocated only while it holds bytes and freed when it
//! drains.

use std::future::poll_fn;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf as _, BytesMut};
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_protocol::{FrameDecoder, FrameEncoder, FrameKind, PROTOCOL_VERSION};
use starling_router::Transmit;

use crate::accounts::{Access, Accounts, ApiError, Granted, Principal};
use crate::clock;
use crate::messaging::{Router, router_conn};
use crate::metrics;
use crate::runtime::{self, Ready};
use crate::shard::{ConnCtl, Kill, Shard};
use crate::tokencache::TokenKey;
use crate::wheel::ConnId;

mod media;
mod tls;
use tls::TLS_ENCRYPT_CHUNK_BYTES;
pub use tls::{Fed, TLS_RECORD_BYTES_MAX, Tls};

/// What one read produced.
enum Got {
    /// Nothing to read after all.
    Nothing,
    /// Bytes for the decoder.
    Data,
    /// Bytes, then the peer's close_notify.
    DataThenClose,
}

/// The least room a read gets in the shard's scratch buffer.
const READ_BYTES_MIN: usize = TLS_RECORD_BYTES_MAX;

/// Why the task stops reading.
#[derive(Debug)]
enum Stop {
    /// Close after flushing what is queued.
    Flush,
    /// Close at once (I/O error, peer gone).
    Now,
}

struct Conn {
    id: ConnId,
    /// Registered with the shard's router (authenticated).
    router_open: bool,
    welcomed: bool,
    handshake_done: bool,
    shard: Rc<Shard>,
    ctl: Rc<ConnCtl>,
    io: Ready<TcpStream>,
    /// `None`: `dangerous_plaintext_listen` (loopback benchmarks only).
    tls: Option<Box<Tls>>,
    decoder: FrameDecoder,
    encoder: FrameEncoder,
    /// Encoded frames not yet written (plain) or encrypted (TLS).
    out: BytesMut,
    /// TLS records not yet taken by the socket.
    wire: Vec<u8>,
    principal: Option<Principal>,
    peer: SocketAddr,
    /// Clock readings shared by every frame of one read, or of one batch of output.
    clock: PhaseClock,
}

/// Clock readings taken at most once per phase (a read and the frames it brought, or the
/// output queued after it) instead of once per frame: at tens of thousands of frames a second
/// the reads showed in profiles (docs/design/performance-decisions.md).
/// 0 = not read yet in this phase (16 bytes, not 32: the connection future is kept small).
#[derive(Debug, Default)]
struct PhaseClock {
    mono_us: u64,
    unix_ms: u64,
}

impl PhaseClock {
    /// Starts a phase: the next reading is fresh.
    fn reset(&mut self) {
        *self = Self::default();
    }

    fn mono_us(&mut self) -> u64 {
        if self.mono_us == 0 {
            self.mono_us = clock::mono_us();
        }
        self.mono_us
    }

    fn mono_ms(&mut self) -> u64 {
        self.mono_us() / 1000
    }

    fn unix_ms(&mut self) -> u64 {
        if self.unix_ms == 0 {
            self.unix_ms = clock::unix_ms();
        }
        self.unix_ms
    }
}

/// Runs a freshly accepted connection to completion.
pub async fn run(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, tls: bool) {
    let Some(mut conn) = Conn::new(&shard, stream, peer, tls) else {
        return;
    };
    conn.drive().await;
    let id = conn.id;
    if let Some(p) = conn.principal {
        shard.shared.accounts.seen(p, clock::unix_ms());
    }
    if conn.router_open
        && let Some(r) = &shard.router
    {
        r.with(|rs, now| rs.handle_conn_closed(router_conn(id), now));
    }
    shard.unregister(id);
}

enum Wake {
    Ready,
    /// Router frames wait to be written.
    Outbound,
    Kill(Kill),
    Failed,
}

impl Conn {
    /// Registers the connection with the shard (first deadline: the
    /// handshake's, or Hello's on a plain listener).
    fn new(shard: &Rc<Shard>, stream: TcpStream, peer: SocketAddr, tls: bool) -> Option<Self> {
        let limits = &shard.shared.cfg.limits;
        let first_deadline = clock::mono_ms()
            + if tls {
                limits.handshake_timeout_ms
            } else {
                limits.hello_timeout_ms
            };
        let (id, ctl) = shard.register(first_deadline);
        let tls = if tls {
            match Tls::new(shard.shared.tls.clone()) {
                Ok(t) => Some(Box::new(t)),
                Err(e) => {
                    tracing::error!(error = %e, "tls session setup failed");
                    shard.unregister(id);
                    return None;
                }
            }
        } else {
            None
        };
        let io = match Ready::new(stream) {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(error = %e, "registering socket failed");
                shard.unregister(id);
                return None;
            }
        };
        Some(Conn {
            id,
            router_open: false,
            handshake_done: tls.is_none(),
            welcomed: false,
            shard: shard.clone(),
            ctl,
            io,
            tls,
            decoder: FrameDecoder::new(limits.frame_bytes_max),
            encoder: FrameEncoder::default(),
            out: BytesMut::new(),
            wire: Vec::new(),
            principal: None,
            peer,
            clock: PhaseClock::default(),
        })
    }

    async fn wait(&self, write: bool) -> Wake {
        poll_fn(|cx| {
            if let Some(k) = self.ctl.poll_kill(cx.waker()) {
                return Poll::Ready(Wake::Kill(k));
            }
            if !write && self.ctl.has_outbound() {
                return Poll::Ready(Wake::Outbound);
            }
            if !write
                && let Some(r) = &self.shard.router
                && r.pause_reading(cx.waker())
            {
                // A ring to another shard is full: leave the socket unread
                // (TCP pushes back) until the router drains it.
                return Poll::Pending;
            }
            let r = if write {
                self.io.poll_writable(cx)
            } else {
                self.io.poll_readable(cx)
            };
            match r {
                Poll::Ready(Ok(())) => Poll::Ready(Wake::Ready),
                Poll::Ready(Err(_)) => Poll::Ready(Wake::Failed),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// True while bytes wait for the socket.
    fn wants_write(&self) -> bool {
        !self.out.is_empty() || !self.wire.is_empty()
    }

    /// Writes what it can without waiting. Err: give up on the connection.
    /// Buffers that drain are freed (an idle connection holds none).
    fn write_some(&mut self) -> io::Result<()> {
        let s = self.io.get();
        let m = self.shard.metrics();
        let Some(tls) = &mut self.tls else {
            while !self.out.is_empty() {
                let n = (&*s).write(&self.out)?;
                metrics::add(&m.bytes_out, n);
                self.out.advance(n);
            }
            self.out = BytesMut::new();
            return Ok(());
        };
        loop {
            // Frames are encrypted behind the records already waiting (e.g. a
            // session ticket before Welcome), so that one write carries both.
            while !self.out.is_empty() && self.wire.len() < TLS_ENCRYPT_CHUNK_BYTES {
                let take = self.out.len().min(TLS_ENCRYPT_CHUNK_BYTES);
                if !tls.encrypt(&self.out[..take], &mut self.wire) {
                    return Err(io::Error::other("TLS cannot send"));
                }
                self.out.advance(take);
            }
            if self.wire.is_empty() {
                break;
            }
            let n = (&*s).write(&self.wire)?;
            metrics::add(&m.bytes_out, n);
            if n == self.wire.len() {
                self.wire.clear();
            } else {
                self.wire.drain(..n);
            }
        }
        self.out = BytesMut::new();
        self.wire = Vec::new();
        Ok(())
    }

    /// Writes everything queued. Err: give up on the connection. While the socket takes
    /// nothing, the shard's slow-consumer deadline runs (`limits.slow_consumer_close_ms`,
    /// restarted whenever the socket takes some bytes).
    async fn flush(&mut self, closing: bool) -> Result<(), ()> {
        while self.wants_write() {
            match self.write_some() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.shard.write_stalled(
                        self.id,
                        &self.ctl,
                        self.out.len() + self.wire.len(),
                        self.shard.shared.cfg.limits.slow_consumer_close_ms,
                    );
                    match self.wait(true).await {
                        Wake::Ready | Wake::Outbound => {}
                        Wake::Failed => return Err(()),
                        Wake::Kill(k) => {
                            if closing || k == Kill::CloseTimeout {
                                return Err(());
                            }
                            self.on_kill(k);
                            return Box::pin(self.flush(true)).await;
                        }
                    }
                }
                Err(_) => return Err(()),
            }
        }
        self.ctl.clear_write_deadline();
        Ok(())
    }

    async fn drive(&mut self) {
        // The listener defers accept until the client's first bytes are
        // there (TCP_DEFER_ACCEPT), so the first read needs no readiness
        // wait (an io_uring poll or epoll round trip per connection). If
        // nothing is there after all, the read says WouldBlock and the loop
        // waits as usual.
        let mut first = true;
        loop {
            let wake = if first {
                first = false;
                Wake::Ready
            } else {
                self.wait(false).await
            };
            let readable = match wake {
                Wake::Failed => return,
                Wake::Kill(k) => {
                    if matches!(k, Kill::Shutdown | Kill::StorageFault) {
                        // Answers the router already queued go out before the Goodbye.
                        self.queue_outbound();
                    }
                    self.on_kill(k);
                    let _ = self.flush(true).await;
                    return;
                }
                Wake::Ready => true,
                Wake::Outbound => false,
            };
            let stop = if readable {
                // Boxed: request handling (blocking-pool calls and their
                // futures) needs far more state than waiting, and the task's
                // future is sized for its largest await point.
                Box::pin(self.read_and_handle()).await
            } else {
                None
            };
            // Idle connections keep no read buffer.
            self.decoder.release_buffer();
            let closing = matches!(stop, Some(Stop::Flush));
            if matches!(stop, Some(Stop::Now)) {
                return;
            }
            if closing {
                self.start_closing();
            }
            let routed = self.queue_outbound();
            if self.flush(closing).await.is_err() || closing {
                return;
            }
            if routed > 0
                && let Some(r) = &self.shard.router
            {
                let id = router_conn(self.id);
                let now = self.clock.unix_ms();
                r.with_at(now, |rs, now| rs.handle_conn_flushed(id, routed, now));
            }
        }
    }

    /// Queues TLS close_notify after whatever is queued.
    fn close_notify(&mut self) {
        if let Some(tls) = &mut self.tls {
            if !self.out.is_empty() {
                let out = std::mem::take(&mut self.out);
                if !tls.encrypt(&out, &mut self.wire) {
                    return;
                }
            }
            tls.close_notify(&mut self.wire);
        }
    }

    /// Queues the router's frames (encoded by it) for this connection into the transport;
    /// returns the bytes queued.
    fn queue_outbound(&mut self) -> u64 {
        self.clock.reset();
        let mut bytes = 0u64;
        for t in self.ctl.take_outbound() {
            bytes += self.send_encoded(&t) as u64;
        }
        bytes
    }

    fn on_kill(&mut self, k: Kill) {
        let m = self.shard.metrics();
        match k {
            Kill::Deadline if !self.handshake_done => {
                metrics::inc(&m.handshake_failures);
                metrics::inc(&m.deadline_timeouts);
                // No TLS yet: nothing can be said.
                return;
            }
            Kill::Deadline => {
                metrics::inc(&m.deadline_timeouts);
                self.error(0, ErrorCode::DeadlineExceeded, "no Hello in time");
            }
            Kill::Idle => {
                metrics::inc(&m.heartbeat_timeouts);
                self.goodbye(k.code(), "idle timeout: no frame received", 0);
            }
            Kill::Revoked => self.goodbye(k.code(), "session revoked", 0),
            Kill::Shutdown => self.goodbye(k.code(), "server shutting down", 1000),
            Kill::StorageFault => self.goodbye(
                k.code(),
                "storage failed; the server restarts. A Send without a SendAck: retry it with \
                 the same client_msg_id and first_attempt = false after reconnecting",
                crate::health::FAULT_RECONNECT_AFTER_MS,
            ),
            Kill::Router(code) => {
                if code == ErrorCode::SlowConsumer {
                    metrics::inc(&m.slow_consumer_closes);
                    self.goodbye(
                        code,
                        "slow consumer: the backlog of frames for this connection stayed over \
                         its limit; reconnect and Sync",
                        0,
                    );
                } else {
                    self.goodbye(code, "closed by the router", 0);
                }
            }
            Kill::TokenExpired => self.goodbye(
                k.code(),
                "access token expired: refresh it and reconnect",
                0,
            ),
            Kill::SlowConsumer => {
                metrics::inc(&m.slow_consumer_closes);
                self.goodbye(
                    k.code(),
                    "slow consumer: the connection did not read what the server sent it; \
                     reconnect and Sync",
                    0,
                );
            }
            Kill::FrameTooLarge => self.goodbye(
                k.code(),
                "a frame for this connection exceeds the frame_bytes_max it asked for in Hello; \
                 reconnect with a larger limit",
                0,
            ),
            Kill::CloseTimeout => {}
        }
        self.start_closing();
    }

    /// Queues close_notify and gives the peer 2 s to take what is queued.
    fn start_closing(&mut self) {
        self.close_notify();
        self.shard.set_deadline(
            self.id,
            &self.ctl,
            clock::mono_ms() + 2000,
            Kill::CloseTimeout,
        );
    }

    /// Reads what is available and handles every whole frame.
    async fn read_and_handle(&mut self) -> Option<Stop> {
        let eof = match self.read_some() {
            Ok(Got::Nothing) => return None,
            Ok(Got::Data) => false,
            Ok(Got::DataThenClose) => true,
            Err(stop) => return Some(stop),
        };
        if !self.handshake_done
            && let Some(tls) = &self.tls
            && !tls.is_handshaking()
        {
            self.handshake_done = true;
            if tls.resumed() {
                metrics::inc(&self.shard.metrics().tls_resumptions);
            }
            let hello_by = clock::mono_ms() + self.shard.shared.cfg.limits.hello_timeout_ms;
            self.ctl.set_deadline(hello_by, Kill::Deadline);
        }
        self.clock.reset();
        loop {
            match self.decoder.poll_frame() {
                Ok(None) if eof => {
                    // close_notify: answer what came before it, then close
                    // (with nothing to answer, at once: no write to a peer
                    // that is gone).
                    return Some(match self.on_eof() {
                        Stop::Now if self.wants_write() => Stop::Flush,
                        stop => stop,
                    });
                }
                Ok(None) => return None,
                Ok(Some(frame)) => {
                    metrics::inc(&self.shard.metrics().frames_in);
                    self.heard();
                    if let Some(stop) = self.on_frame(frame).await {
                        return Some(stop);
                    }
                }
                Err(e) => {
                    if !e.is_fatal() {
                        // A frame of a kind this server does not know is a frame all the same.
                        self.heard();
                    }
                    let code = ErrorCode::from(&e);
                    self.refuse(e.request_id(), code, &e.to_string());
                    if e.is_fatal() {
                        metrics::inc(&self.shard.metrics().protocol_errors);
                        return Some(Stop::Flush);
                    }
                }
            }
        }
    }

    /// A frame arrived: after Welcome, the idle deadline (`limits.idle_timeout_ms`) starts
    /// again. Any frame counts, not only Ping.
    fn heard(&mut self) {
        if self.welcomed {
            let idle = u64::from(self.shard.shared.cfg.limits.idle_timeout_ms);
            let now = self.clock.mono_ms();
            self.ctl.set_deadline(now + idle, Kill::Idle);
        }
    }

    /// One read into the shard's scratch buffer (after the kept partial TLS
    /// record), through TLS (decrypted in place), into the frame decoder.
    fn read_some(&mut self) -> Result<Got, Stop> {
        let shard = self.shard.clone();
        let mut scratch = shard.read_scratch.borrow_mut();
        let pre = self.tls.as_ref().map_or(0, |t| t.partial_in().len());
        if scratch.len() < pre + READ_BYTES_MIN {
            scratch.resize(pre + READ_BYTES_MIN, 0);
        }
        if let Some(t) = &self.tls {
            scratch[..pre].copy_from_slice(t.partial_in());
        }
        let n = match self.io.get().read(&mut scratch[pre..]) {
            Ok(0) => {
                drop(scratch);
                return Err(self.on_eof());
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return Ok(Got::Nothing);
            }
            Err(_) => return Err(Stop::Now),
        };
        metrics::add(&shard.metrics().bytes_in, n);
        let Some(tls) = &mut self.tls else {
            self.decoder.handle_bytes(&scratch[..n]);
            return Ok(Got::Data);
        };
        let decoder = &mut self.decoder;
        match tls.feed(&mut scratch[..pre + n], &mut self.wire, |p| {
            decoder.handle_bytes(p);
        }) {
            Ok(Fed::Open) => Ok(Got::Data),
            Ok(Fed::PeerClosed) => Ok(Got::DataThenClose),
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "tls error");
                if tls.is_handshaking() {
                    metrics::inc(&shard.metrics().handshake_failures);
                }
                // Send the alert rustls prepared, then close.
                Err(Stop::Flush)
            }
        }
    }

    fn on_eof(&mut self) -> Stop {
        if let Err(e) = self.decoder.handle_eof() {
            // The peer may have only half-closed: tell it why.
            metrics::inc(&self.shard.metrics().protocol_errors);
            self.error(0, ErrorCode::from(&e), &e.to_string());
            return Stop::Flush;
        }
        Stop::Now
    }

    /// Queues an answer (or a push, with request id 0).
    fn send(&mut self, request_id: u64, body: Body) {
        let frame = v1::Frame {
            request_id,
            body: Some(body),
        };
        self.send_frame(&frame, true);
    }

    /// Encodes and queues one frame; returns its encoded size (0 if not sent). `settles`: it
    /// answers a request admitted into the in-flight count.
    fn send_frame(&mut self, frame: &v1::Frame, settles: bool) -> usize {
        let before = self.out.len();
        if let Err(e) = self.encoder.encode(frame, &mut self.out) {
            self.out.truncate(before);
            tracing::warn!(error = %e, "frame too large for the peer's limit; closing");
            self.ctl.kill(Kill::FrameTooLarge);
            return 0;
        }
        self.queued(
            before,
            frame.request_id,
            frame.body.as_ref().map(Body::kind),
            settles,
        )
    }

    /// Answers a frame that was never admitted into the in-flight count (refused before it
    /// was carried out) with an Error.
    fn refuse(&mut self, request_id: u64, code: ErrorCode, message: &str) {
        let frame = v1::Frame {
            request_id,
            body: Some(Body::Error(v1::Error {
                code: code as i32,
                message: message.to_owned(),
                retry_after_ms: 0,
            })),
        };
        self.send_frame(&frame, false);
    }

    /// Queues one frame the router encoded; returns its size (0 if not sent).
    fn send_encoded(&mut self, t: &Transmit) -> usize {
        // The router does not know the peer's frame limit: it is checked here, as the encoder
        // checks it for the gateway's own frames. A frame that does not fit is not dropped
        // (the peer would wait forever for an answer, or miss a message until its next sync):
        // the connection is closed with FRAME_TOO_LARGE, and what was not sent stays durable
        // for the device's next sync.
        let max = u64::from(self.encoder.frame_bytes_max());
        if starling_protocol::framed_payload_len(&t.bytes).is_none_or(|len| len > max) {
            tracing::warn!(
                bytes = t.bytes.len(),
                max,
                "router frame too large for the peer's limit; closing"
            );
            self.ctl.kill(Kill::FrameTooLarge);
            return 0;
        }
        let before = self.out.len();
        self.out.extend_from_slice(&t.bytes);
        // Settled when the router queued it for this connection (`Shard::push_outbound`).
        self.queued(before, t.request_id, t.kind, false)
    }

    /// A frame was appended to `out` from `before` on: enforces the outbound budget (undoing
    /// the append beyond it), counts it and, if it is the gateway's final answer to a request
    /// (`settles`), ends that request's turn in the in-flight count.
    fn queued(
        &mut self,
        before: usize,
        request_id: u64,
        kind: Option<FrameKind>,
        settles: bool,
    ) -> usize {
        let limit = self.shard.shared.cfg.limits.outbound_bytes_max;
        if self.out.len() + self.wire.len() > limit {
            // Over the outbound budget: the peer is not reading.
            self.out.truncate(before);
            self.ctl.kill(Kill::SlowConsumer);
            return 0;
        }
        metrics::inc(&self.shard.metrics().frames_out);
        if settles {
            self.ctl.settle(request_id, kind);
        }
        self.out.len() - before
    }

    /// Admits request `rid` (just read) into the in-flight count, or refuses it with
    /// TOO_MANY_IN_FLIGHT when the connection already holds `limits.inflight_requests_max`.
    fn admit(&mut self, rid: u64, is_send: bool) -> bool {
        let max = self.shard.shared.cfg.limits.inflight_requests_max as usize;
        if self.ctl.inflight() >= max {
            self.refuse(
                rid,
                ErrorCode::TooManyInFlight,
                &format!(
                    "{max} requests are in flight on this connection (limits.inflight_requests_max); \
                     this one was not carried out: send it again after an answer"
                ),
            );
            return false;
        }
        let read_us = if is_send {
            self.clock.mono_us().max(1)
        } else {
            0
        };
        self.ctl.admit(rid, read_us);
        true
    }

    fn error(&mut self, request_id: u64, code: ErrorCode, message: &str) {
        self.send(
            request_id,
            Body::Error(v1::Error {
                code: code as i32,
                message: message.to_owned(),
                retry_after_ms: 0,
            }),
        );
    }

    fn api_error(&mut self, request_id: u64, e: ApiError) {
        self.send(
            request_id,
            Body::Error(v1::Error {
                code: e.code as i32,
                message: e.message,
                retry_after_ms: e.retry_after_ms,
            }),
        );
    }

    fn goodbye(&mut self, code: ErrorCode, message: &str, reconnect_after_ms: u32) {
        self.send(
            0,
            Body::Goodbye(v1::Goodbye {
                code: code as i32,
                message: message.to_owned(),
                reconnect_after_ms,
            }),
        );
    }

    fn accounts(&self) -> Arc<Accounts> {
        self.shard.shared.accounts.clone()
    }

    /// Marks the connection authenticated as `p` by an access token that
    /// expires at `expires_at_ms` (unix), notes its device as seen and
    /// registers it with the router.
    fn authenticated(&mut self, p: Principal, expires_at_ms: u64) {
        self.principal = Some(p);
        self.ctl.session_id.set(p.session_id);
        let now = clock::unix_ms();
        self.shard.shared.accounts.seen(p, now);
        self.ctl.principal.set(Some((p.user_id, p.device_id)));
        let left_ms = expires_at_ms.saturating_sub(now);
        self.shard
            .set_token_expiry(self.id, &self.ctl, clock::mono_ms() + left_ms.max(1));
        let Some(r) = self.shard.router.clone() else {
            return;
        };
        let id = router_conn(self.id);
        r.with(|rs, now| {
            if self.router_open {
                rs.handle_conn_closed(id, now);
            }
            rs.handle_conn_opened(
                id,
                starling_storage::UserId(p.user_id),
                starling_storage::DeviceId(p.device_id),
                now,
            );
        });
        self.router_open = true;
    }

    /// Checks an access token: the shard's cache first; else the signature
    /// on this thread and the session in one blocking-pool call. Returns who it names and its expiry (unix ms).
    async fn check_token(&self, token: String) -> Result<Access, ApiError> {
        let now = clock::unix_ms();
        let key = TokenKey::of(&token);
        let epoch = self.shard.revocation_epoch();
        let cached = if self.shard.token_cache_current() {
            self.shard.token_cache.borrow_mut().get(&key, now)
        } else {
            None
        };
        if let Some(a) = cached {
            metrics::inc(&self.shard.metrics().token_cache_hits);
            return Ok(a);
        }
        let access = self.shard.shared.accounts.verify_access(&token, now)?;
        drop(token);
        self.call(move |acc, _| acc.check_session(&access).map(drop))
            .await?;
        if self.shard.revocation_epoch() == epoch {
            self.shard
                .token_cache
                .borrow_mut()
                .insert(key, access, clock::unix_ms());
        }
        Ok(access)
    }

    /// Login by password: admitted (or refused) here on the shard without a
    /// hash or a store access, hashed on the hashing pool, answered after the
    /// store work on the blocking pool.
    async fn password_login(&self, req: v1::Login) -> Result<Granted, ApiError> {
        let accounts = self.accounts();
        let login = accounts.admit_password_login(req, self.peer.ip(), clock::unix_ms())?;
        let checked = accounts.check_password_login(login).await?;
        self.call(move |acc, now| acc.finish_password_login(checked, now))
            .await
    }

    /// SetPassword: admitted here, hashed on the hashing pool, stored on the
    /// blocking pool.
    async fn set_password(&self, p: Principal, req: v1::SetPassword) -> Result<(), ApiError> {
        let accounts = self.accounts();
        let new = accounts.admit_set_password(req, self.peer.ip(), clock::unix_ms())?;
        let phc = accounts.hash_new_password(new).await?;
        self.call(move |acc, _| acc.store_password(p, phc)).await
    }

    /// Runs `f` on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Accounts, u64) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let accounts = self.accounts();
        let now = clock::unix_ms();
        runtime::blocking(move || f(&accounts, now))
            .await
            .unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "internal error")))
    }

    /// Checks a frame's place in the protocol (first frame, request id, in-flight limit),
    /// then carries it out.
    async fn on_frame(&mut self, frame: v1::Frame) -> Option<Stop> {
        let rid = frame.request_id;
        let Some(body) = frame.body else {
            self.refuse(rid, ErrorCode::UnknownFrameType, "frame has no body");
            return None;
        };
        if !self.welcomed && !matches!(body, Body::Hello(_)) {
            self.refuse(
                rid,
                ErrorCode::UnexpectedFrame,
                "the first frame must be Hello",
            );
            return Some(Stop::Flush);
        }
        if is_server_only(&body) {
            self.refuse(rid, ErrorCode::UnexpectedFrame, "server-to-client frame");
            return None;
        }
        if rid == 0 {
            if !is_one_way(&body) {
                let name = body.kind().name();
                self.refuse(
                    0,
                    ErrorCode::InvalidArgument,
                    &format!("{name} is a request: it needs a non-zero request_id"),
                );
                return None;
            }
        } else if !matches!(body, Body::Pong(_)) && !self.admit(rid, matches!(body, Body::Send(_)))
        {
            return None;
        }
        if !self.welcomed {
            return self.on_hello(rid, body).await;
        }
        match body {
            Body::Hello(_) => self.error(
                rid,
                ErrorCode::UnexpectedFrame,
                "Hello was already received",
            ),
            Body::Ping(p) => self.send(rid, Body::Pong(v1::Pong { nonce: p.nonce })),
            Body::Pong(_) => {}
            Body::Authenticate(a) => match self.check_token(a.access_token).await {
                Ok(a) => {
                    self.authenticated(a.principal, a.expires_at_ms);
                    self.send(rid, Body::Done(v1::Done {}));
                }
                Err(e) => self.api_error(rid, e),
            },
            Body::RequestOtp(req) => {
                let ip = self.peer.ip();
                match self
                    .call(move |acc, now| acc.request_otp(&req, ip, now))
                    .await
                {
                    Ok(sent) => self.send(rid, Body::OtpSent(sent)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::VerifyOtp(req) => {
                let r = self.call(move |acc, now| acc.verify_otp(&req, now)).await;
                crate::keys::device_added(&self.shard, r.as_ref().ok().map(|g| g.principal));
                self.granted(rid, r).await;
            }
            Body::Login(req) => {
                let r = if matches!(req.credential, Some(v1::login::Credential::Password(_))) {
                    self.password_login(req).await
                } else {
                    self.call(move |acc, now| acc.login_otp(&req, now)).await
                };
                crate::keys::device_added(&self.shard, r.as_ref().ok().map(|g| g.principal));
                self.granted(rid, r).await;
            }
            Body::Refresh(req) => {
                let shared = self.shard.shared.clone();
                let r = self
                    .call(move |acc, now| {
                        acc.refresh(&req, now).map_err(|(e, reused)| {
                            if let Some(sid) = reused {
                                shared.revoke_sessions(&[sid]);
                            }
                            e
                        })
                    })
                    .await;
                self.granted(rid, r).await;
            }
            other => {
                let Some(p) = self.principal else {
                    return self.unauthenticated_or_unsupported(rid, &other);
                };
                self.on_authenticated(rid, p, other).await;
            }
        }
        None
    }

    fn unauthenticated_or_unsupported(&mut self, rid: u64, body: &Body) -> Option<Stop> {
        match self.unsupported(body) {
            Some(feature) => self.not_supported(rid, body, feature),
            None => self.error(rid, ErrorCode::Unauthenticated, "authenticate first"),
        }
        None
    }

    /// The feature `body` needs if this server does not offer it.
    fn unsupported(&self, body: &Body) -> Option<&'static str> {
        let feature = starling_protocol::features::of(body.kind())?;
        (!self.shard.offers(feature)).then_some(feature)
    }

    fn not_supported(&mut self, rid: u64, body: &Body, feature: &str) {
        let name = body.kind().name();
        self.error(
            rid,
            ErrorCode::NotSupported,
            &format!(
                "{name} needs the feature \"{feature}\", which this server does not offer \
                 (see Welcome.features); do not retry it here"
            ),
        );
    }

    /// Whether this server offers the key directory (`e2e_keys`).
    fn offers_keys(&self) -> bool {
        self.shard.offers(starling_protocol::features::E2E_KEYS)
    }

    async fn granted(&mut self, rid: u64, r: Result<Granted, ApiError>) {
        match r {
            Ok(g) => {
                self.authenticated(g.principal, g.frame.access_expires_at_ms);
                self.send(rid, Body::SessionGranted(g.frame));
            }
            Err(e) => self.api_error(rid, e),
        }
    }

    /// The first frame (the caller checked that it is Hello).
    async fn on_hello(&mut self, rid: u64, body: Body) -> Option<Stop> {
        let Body::Hello(h) = body else {
            return Some(Stop::Flush);
        };
        if h.protocol_version != PROTOCOL_VERSION {
            self.error(
                rid,
                ErrorCode::UnsupportedProtocolVersion,
                &format!("this server speaks protocol version {PROTOCOL_VERSION}"),
            );
            return Some(Stop::Flush);
        }
        let (mut authenticated, mut auth_error) = (None, None);
        if !h.access_token.is_empty() {
            match self.check_token(h.access_token).await {
                Ok(a) => authenticated = Some(a),
                // Welcomed all the same, unauthenticated: the client refreshes or sends
                // Authenticate on this connection.
                Err(e) => {
                    auth_error = Some(v1::Error {
                        code: e.code as i32,
                        message: e.message,
                        retry_after_ms: e.retry_after_ms,
                    });
                }
            }
        }
        let (limits, router) = (&self.shard.shared.cfg.limits, &self.shard.shared.cfg.router);
        self.encoder
            .set_frame_bytes_max(starling_protocol::limits::negotiate_frame_bytes_max(
                h.frame_bytes_max,
            ));
        let welcome = v1::Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_version: format!("starling {}", env!("CARGO_PKG_VERSION")),
            limits: Some(v1::Limits {
                frame_bytes_max: limits.frame_bytes_max,
                // What the router accepts in a Send (`[router]`; validated to fit a frame).
                body_bytes_max: u32::try_from(router.body_bytes_max).unwrap_or(u32::MAX),
                inflight_requests_max: limits.inflight_requests_max,
                heartbeat_ms: limits.heartbeat_ms,
                idle_timeout_ms: limits.idle_timeout_ms,
                // What the router returns at most per conversation and Sync.
                sync_messages_max: u32::try_from(router.sync_messages_max).unwrap_or(u32::MAX),
            }),
            server_time_ms: clock::unix_ms(),
            authenticated: authenticated.map(|a| a.principal.to_wire()),
            auth_error,
            features: self
                .shard
                .features()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        let idle = u64::from(limits.idle_timeout_ms);
        self.welcomed = true;
        self.ctl.set_deadline(clock::mono_ms() + idle, Kill::Idle);
        if let Some(a) = authenticated {
            self.authenticated(a.principal, a.expires_at_ms);
        }
        self.send(rid, Body::Welcome(welcome));
        None
    }

    /// Hands a messaging frame to the shard's router, whose answers arrive already encoded.
    fn hand_to_router(&mut self, rid: u64, body: Body) {
        if let Some(r) = &self.shard.router {
            let (id, frame) = (
                router_conn(self.id),
                v1::Frame {
                    request_id: rid,
                    body: Some(body),
                },
            );
            let now = self.clock.unix_ms();
            r.with_at(now, |rs, now| rs.handle_frame(id, frame, now));
        }
    }

    async fn on_authenticated(&mut self, rid: u64, p: Principal, body: Body) {
        match body {
            Body::Logout(l) => {
                let shared = self.shard.shared.clone();
                let sid = l.session_id;
                match self.call(move |acc, _| acc.logout(p, sid)).await {
                    Ok(revoked) => {
                        self.send(rid, Body::Done(v1::Done {}));
                        self.shard.forget_sessions(&[revoked]);
                        shared.revoke_sessions(&[revoked]);
                    }
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::SetPassword(req) => match self.set_password(p, req).await {
                Ok(()) => self.send(rid, Body::Done(v1::Done {})),
                Err(e) => self.api_error(rid, e),
            },
            Body::GetMe(_) => {
                let media = self.shard.shared.media.clone();
                let me = move |acc: &Accounts, _| {
                    let mut prof = acc.get_me(p)?;
                    media::fill_avatar(media.as_deref(), &mut prof)?;
                    Ok(prof)
                };
                match self.call(me).await {
                    Ok(prof) => self.send(rid, Body::Profile(prof)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::UpdateProfile(req) => self.update_profile(rid, p, req).await,
            Body::ListDevices(_) => match self.call(move |acc, _| acc.list_devices(p)).await {
                Ok(list) => self.send(rid, Body::DeviceList(list)),
                Err(e) => self.api_error(rid, e),
            },
            Body::RemoveDevice(req) => {
                let shared = self.shard.shared.clone();
                let device = req.device_id;
                let r = self.call(move |acc, _| acc.remove_device(p, device)).await;
                // Its keys leave the directory (durably) before the removal is answered.
                let r = match r {
                    Ok(revoked) => crate::keys::device_removed(&self.shard, p.user_id, device)
                        .await
                        .map(|()| revoked),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(revoked) => {
                        self.send(rid, Body::Done(v1::Done {}));
                        self.shard.forget_sessions(&revoked);
                        shared.revoke_sessions(&revoked);
                    }
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::DiscoverContacts(req) => {
                // The matches become the caller's contacts (durably) before they are answered.
                let meta = self.shard.router.as_ref().map(|r| r.meta.clone());
                let discover = move |acc: &Accounts, now| {
                    crate::profiles::discover(meta.as_deref(), acc, p, &req, now)
                };
                match self.call(discover).await {
                    Ok(m) => self.send(rid, Body::ContactMatches(m)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::GetProfiles(req) if self.shard.router.is_some() => {
                let meta = self.shard.router.as_ref().map(|r| r.meta.clone());
                let media = self.shard.shared.media.clone();
                let get = move |acc: &Accounts, _| match &meta {
                    Some(meta) => {
                        let mut profiles = crate::profiles::get_profiles(meta, acc, p, &req)?;
                        for prof in &mut profiles.profiles {
                            media::fill_avatar(media.as_deref(), prof)?;
                        }
                        Ok(profiles)
                    }
                    None => Ok(v1::Profiles::default()),
                };
                match self.call(get).await {
                    Ok(profiles) => self.send(rid, Body::Profiles(profiles)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::RegisterPushToken(req) if self.shard.router.is_some() => {
                match self
                    .call(move |acc, now| acc.register_push_token(p, &req, now))
                    .await
                {
                    Ok(()) => self.send(rid, Body::Done(v1::Done {})),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::UnregisterPushToken(_) if self.shard.router.is_some() => {
                match self.call(move |acc, _| acc.unregister_push_token(p)).await {
                    Ok(()) => self.send(rid, Body::Done(v1::Done {})),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::RequestUpload(req) => self.request_upload(rid, req),
            Body::Send(s) if s.media.is_some() && self.router_open => {
                self.send_with_media(rid, s).await;
            }
            Body::UploadKeys(req) if self.offers_keys() => {
                self.ctl.keys_pushes.set(true);
                let r = crate::keys::upload(&self.shard, p, req).await;
                match r {
                    Ok(count) => self.send(rid, Body::PrekeyCount(count)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::FetchKeyBundles(req) if self.offers_keys() => {
                self.ctl.keys_pushes.set(true);
                let r = crate::keys::fetch(&self.shard, p, req).await;
                match r {
                    Ok(bundles) => self.send(rid, Body::KeyBundles(bundles)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::RequestDownload(r) if r.user_id != 0 => self.avatar_download(rid, p, r).await,
            other if Router::handles(&other) && self.router_open => self.hand_to_router(rid, other),
            other => {
                let feature = starling_protocol::features::of(other.kind()).unwrap_or("none");
                self.not_supported(rid, &other, feature);
            }
        }
    }
}

/// Frames a client may send with request id 0: they want no answer (Ping is answered all
/// the same, with the Pong carrying the Ping's request id).
fn is_one_way(body: &Body) -> bool {
    matches!(
        body,
        Body::DeliveryAck(_)
            | Body::ReadCursor(_)
            | Body::Typing(_)
            | Body::Ping(_)
            | Body::Pong(_)
    )
}

/// Frames only the server sends.
fn is_server_only(body: &Body) -> bool {
    matches!(
        body,
        Body::Welcome(_)
            | Body::Error(_)
            | Body::Goodbye(_)
            | Body::Done(_)
            | Body::OtpSent(_)
            | Body::SessionGranted(_)
            | Body::Profile(_)
            | Body::Profiles(_)
            | Body::DeviceList(_)
            | Body::ContactMatches(_)
            | Body::SendAck(_)
            | Body::Deliver(_)
            | Body::Receipt(_)
            | Body::GroupReceipts(_)
            | Body::ReceiptDetail(_)
            | Body::MessagesAvailable(_)
            | Body::SyncDone(_)
            | Body::HistoryPage(_)
            | Body::ConversationList(_)
            | Body::GroupInfo(_)
            | Body::GroupChanged(_)
            | Body::PresenceSnapshot(_)
            | Body::PresenceUpdate(_)
            | Body::UploadGrant(_)
            | Body::DownloadGrant(_)
            | Body::PrekeyCount(_)
            | Body::KeyBundles(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> (
        tempfile::TempDir,
        Arc<rustls::ServerConfig>,
        Arc<rustls::ClientConfig>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::tls::ensure_dev_material(dir.path()).unwrap();
        let server = crate::tls::server_config(&m).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject as _;
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(&m.ca_pem).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (dir, server, Arc::new(client))
    }

    /// The server side as the gateway drives it, fed `chunk` bytes at a time.
    struct Side {
        tls: Tls,
        got: Vec<u8>,
        closed: bool,
    }

    impl Side {
        fn feed(&mut self, mut bytes: &[u8], chunk: usize) -> Result<Vec<u8>, rustls::Error> {
            let mut wire = Vec::new();
            while !bytes.is_empty() {
                let n = chunk.min(bytes.len());
                let mut buf = self.tls.partial_in().to_vec();
                buf.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                let got = &mut self.got;
                if self
                    .tls
                    .feed(&mut buf, &mut wire, |p| got.extend_from_slice(p))?
                    == Fed::PeerClosed
                {
                    self.closed = true;
                }
            }
            Ok(wire)
        }
    }

    fn client_out(c: &mut rustls::ClientConnection) -> Vec<u8> {
        let mut v = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut v).unwrap();
        }
        v
    }

    /// Gives `bytes` to the client; returns the plaintext they carried.
    fn client_in(c: &mut rustls::ClientConnection, mut bytes: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        while !bytes.is_empty() {
            c.read_tls(&mut bytes).unwrap();
            c.process_new_packets().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&buf[..n]);
            }
        }
        plain
    }

    fn pair(chunk: usize) -> (Side, rustls::ClientConnection, tempfile::TempDir) {
        let (dir, scfg, ccfg) = configs();
        let mut s = Side {
            tls: Tls::new(scfg).unwrap(),
            got: Vec::new(),
            closed: false,
        };
        let mut c = rustls::ClientConnection::new(ccfg, "localhost".try_into().unwrap()).unwrap();
        for _ in 0..8 {
            if !c.is_handshaking() && !s.tls.is_handshaking() {
                break;
            }
            let to_server = client_out(&mut c);
            let to_client = s.feed(&to_server, chunk).unwrap();
            client_in(&mut c, &to_client);
        }
        assert!(!s.tls.is_handshaking() && !c.is_handshaking());
        (s, c, dir)
    }

    #[test]
    fn tls_byte_at_a_time_and_large_messages() {
        for chunk in [1, 7, 1000, usize::MAX] {
            let (mut s, mut c, _dir) = pair(chunk);
            // 100 KiB each way: several records, split anywhere.
            let msg: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
            c.set_buffer_limit(None);
            c.writer().write_all(&msg).unwrap();
            let to_server = client_out(&mut c);
            let wire = s.feed(&to_server, chunk).unwrap();
            assert!(wire.is_empty());
            assert_eq!(s.got, msg, "chunk {chunk}");
            // An idle connection keeps no partial record.
            assert!(s.tls.partial_in().is_empty());
            let mut wire = Vec::new();
            assert!(s.tls.encrypt(&msg, &mut wire));
            assert_eq!(client_in(&mut c, &wire), msg);
            // close_notify from the client ends the stream.
            c.send_close_notify();
            let to_server = client_out(&mut c);
            s.feed(&to_server, chunk).unwrap();
            assert!(s.closed);
        }
    }

    #[test]
    fn tls_garbage_gets_an_alert_and_an_error() {
        let (_dir, scfg, _) = configs();
        let mut t = Tls::new(scfg).unwrap();
        let mut wire = Vec::new();
        let mut junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(t.feed(&mut junk, &mut wire, |_| {}).is_err());
        // An alert record (content type 21).
        assert_eq!(wire.first(), Some(&21), "{wire:?}");
        // Application data cannot be sent before the handshake.
        let (_dir2, scfg, _) = configs();
        let mut t = Tls::new(scfg).unwrap();
        assert!(!t.encrypt(b"x", &mut Vec::new()));
    }

    /// The connection task's future is what compio boxes per connection.
    #[test]
    fn connection_future_stays_small() {
        fn future_size<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = future_size(run as fn(_, _, _, _) -> _);
        let conn = std::mem::size_of::<Conn>();
        eprintln!(
            "run future: {size} B, Conn: {conn} B, Tls: {} B",
            std::mem::size_of::<Tls>()
        );
        assert!(size <= 512, "connection future is {size} B");
    }
}
