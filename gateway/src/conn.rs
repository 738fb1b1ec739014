//! One connection's task: TLS (rustls driven directly from per-shard
//! scratch buffers), the frame codec, the Hello/auth state machine, limits
//! and orderly close. Readiness-then-read: while idle the task holds no read
//! buffer; it waits on the socket's readiness or a kill from the shard.

use std::future::poll_fn;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_protocol::{FrameDecoder, FrameEncoder, PROTOCOL_VERSION};

use crate::accounts::{Access, Accounts, ApiError, Granted, Principal};
use crate::clock;
use crate::messaging::{Router, router_conn};
use crate::metrics;
use crate::runtime::{self, Ready};
use crate::shard::{ConnCtl, Kill, Shard};
use crate::tokencache::TokenKey;
use crate::wheel::ConnId;

/// The byte transport under the frames.
enum Transport {
    Tls(Box<rustls::ServerConnection>),
    /// `dangerous_plaintext_listen`: loopback benchmarks only.
    Plain {
        out: Vec<u8>,
    },
}

/// Why the task stops reading.
#[derive(Debug)]
enum Stop {
    /// Close after flushing what is queued.
    Flush,
    /// Close at once (I/O error, peer gone).
    Now,
}

impl Transport {
    fn is_handshaking(&self) -> bool {
        match self {
            Transport::Tls(t) => t.is_handshaking(),
            Transport::Plain { .. } => false,
        }
    }

    fn wants_write(&self) -> bool {
        match self {
            Transport::Tls(t) => t.wants_write(),
            Transport::Plain { out } => !out.is_empty(),
        }
    }

    fn write_to(&mut self, s: &TcpStream) -> io::Result<usize> {
        match self {
            Transport::Tls(t) => t.write_tls(&mut &*s),
            Transport::Plain { out } => {
                let n = (&*s).write(out)?;
                out.drain(..n);
                Ok(n)
            }
        }
    }

    fn queue(&mut self, bytes: &[u8], limit: usize) -> bool {
        match self {
            Transport::Tls(t) => t.writer().write_all(bytes).is_ok(),
            Transport::Plain { out } => {
                if out.len() + bytes.len() > limit {
                    return false;
                }
                out.extend_from_slice(bytes);
                true
            }
        }
    }

    fn close_notify(&mut self) {
        if let Transport::Tls(t) = self {
            t.send_close_notify();
        }
    }
}

struct Conn {
    id: ConnId,
    /// Registered with the shard's router (authenticated).
    router_open: bool,
    shard: Rc<Shard>,
    ctl: Rc<ConnCtl>,
    io: Ready<TcpStream>,
    peer: SocketAddr,
    transport: Transport,
    decoder: FrameDecoder,
    encoder: FrameEncoder,
    out_scratch: BytesMut,
    welcomed: bool,
    principal: Option<Principal>,
    handshake_done: bool,
}

/// Runs a freshly accepted connection to completion.
pub async fn run(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, tls: bool) {
    let limits = shard.shared.cfg.limits.clone();
    let now = clock::mono_ms();
    let first_deadline = now
        + if tls {
            limits.handshake_timeout_ms
        } else {
            limits.hello_timeout_ms
        };
    let (id, ctl) = shard.register(first_deadline);
    let transport = if tls {
        match rustls::ServerConnection::new(shard.shared.tls.clone()) {
            Ok(mut c) => {
                c.set_buffer_limit(Some(limits.outbound_bytes_max));
                Transport::Tls(Box::new(c))
            }
            Err(e) => {
                tracing::error!(error = %e, "tls session setup failed");
                shard.unregister(id);
                return;
            }
        }
    } else {
        Transport::Plain { out: Vec::new() }
    };
    let io = match Ready::new(stream) {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(error = %e, "registering socket failed");
            shard.unregister(id);
            return;
        }
    };
    let mut conn = Conn {
        id,
        router_open: false,
        handshake_done: !tls,
        shard: shard.clone(),
        ctl,
        io,
        peer,
        transport,
        decoder: FrameDecoder::new(limits.frame_bytes_max),
        encoder: FrameEncoder::default(),
        out_scratch: BytesMut::new(),
        welcomed: false,
        principal: None,
    };
    conn.drive().await;
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

    /// Writes everything queued. Err: give up on the connection.
    async fn flush(&mut self, closing: bool) -> Result<(), ()> {
        while self.transport.wants_write() {
            match self.transport.write_to(self.io.get()) {
                Ok(n) => metrics::add(&self.shard.metrics().bytes_out, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.wait(true).await {
                    Wake::Ready | Wake::Outbound => {}
                    Wake::Failed => return Err(()),
                    Wake::Kill(k) => {
                        if closing || k == Kill::CloseTimeout {
                            return Err(());
                        }
                        self.on_kill(k);
                        return Box::pin(self.flush(true)).await;
                    }
                },
                Err(_) => return Err(()),
            }
        }
        Ok(())
    }

    async fn drive(&mut self) {
        loop {
            let readable = match self.wait(false).await {
                Wake::Failed => return,
                Wake::Kill(k) => {
                    self.on_kill(k);
                    let _ = self.flush(true).await;
                    return;
                }
                Wake::Ready => true,
                Wake::Outbound => false,
            };
            let stop = if readable {
                self.read_and_handle().await
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
                self.transport.close_notify();
                self.shard.set_deadline(
                    self.id,
                    &self.ctl,
                    clock::mono_ms() + 2000,
                    Kill::CloseTimeout,
                );
            }
            let routed = self.queue_outbound();
            if self.flush(closing).await.is_err() || closing {
                return;
            }
            if routed > 0
                && let Some(r) = &self.shard.router
            {
                let id = router_conn(self.id);
                r.with(|rs, now| rs.handle_conn_flushed(id, routed, now));
            }
        }
    }

    /// Encodes the router's frames for this connection into the transport;
    /// returns the bytes queued.
    fn queue_outbound(&mut self) -> u64 {
        let mut bytes = 0u64;
        for frame in self.ctl.take_outbound() {
            bytes += self.send_frame(&frame) as u64;
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
            Kill::Router(code) => self.goodbye(code, "closed by the router", 0),
            Kill::TokenExpired => self.goodbye(
                k.code(),
                "access token expired: refresh it and reconnect",
                0,
            ),
            Kill::CloseTimeout => {}
        }
        self.transport.close_notify();
        self.shard.set_deadline(
            self.id,
            &self.ctl,
            clock::mono_ms() + 2000,
            Kill::CloseTimeout,
        );
    }

    /// Reads what is available and handles every whole frame.
    async fn read_and_handle(&mut self) -> Option<Stop> {
        let shard = self.shard.clone();
        {
            let mut scratch = shard.read_scratch.borrow_mut();
            let res = self.io.get().read(&mut scratch);
            match res {
                Ok(0) => {
                    drop(scratch);
                    return Some(self.on_eof());
                }
                Ok(n) => {
                    metrics::add(&self.shard.metrics().bytes_in, n);
                    if let Err(stop) = self.ingest(&scratch[..n]) {
                        return Some(stop);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return None,
                Err(_) => return Some(Stop::Now),
            }
        }
        if !self.handshake_done && !self.transport.is_handshaking() {
            self.handshake_done = true;
            let hello_by = clock::mono_ms() + self.shard.shared.cfg.limits.hello_timeout_ms;
            self.ctl.set_deadline(hello_by, Kill::Deadline);
        }
        let inflight_max = self.shard.shared.cfg.limits.inflight_requests_max;
        let mut requests = 0u32;
        loop {
            match self.decoder.poll_frame() {
                Ok(None) => return None,
                Ok(Some(frame)) => {
                    metrics::inc(&self.shard.metrics().frames_in);
                    if self.welcomed {
                        let idle = u64::from(self.shard.shared.cfg.limits.idle_timeout_ms);
                        self.ctl.set_deadline(clock::mono_ms() + idle, Kill::Idle);
                    }
                    if frame.request_id != 0 {
                        requests += 1;
                        if requests > inflight_max {
                            self.error(
                                frame.request_id,
                                ErrorCode::TooManyInFlight,
                                "too many requests outstanding",
                            );
                            continue;
                        }
                    }
                    if let Some(stop) = self.on_frame(frame).await {
                        return Some(stop);
                    }
                }
                Err(e) => {
                    let code = ErrorCode::from(&e);
                    self.error(e.request_id(), code, &e.to_string());
                    if e.is_fatal() {
                        metrics::inc(&self.shard.metrics().protocol_errors);
                        return Some(Stop::Flush);
                    }
                }
            }
        }
    }

    /// Feeds received bytes through TLS into the decoder.
    fn ingest(&mut self, mut data: &[u8]) -> Result<(), Stop> {
        match &mut self.transport {
            Transport::Plain { .. } => {
                self.decoder.handle_bytes(data);
                Ok(())
            }
            Transport::Tls(tls) => {
                let mut plain = self.shard.plain_scratch.borrow_mut();
                while !data.is_empty() {
                    match tls.read_tls(&mut data) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(_) => return Err(Stop::Now),
                    }
                    if let Err(e) = tls.process_new_packets() {
                        tracing::debug!(peer = %self.peer, error = %e, "tls error");
                        if tls.is_handshaking() {
                            metrics::inc(&self.shard.metrics().handshake_failures);
                        }
                        // rustls queued an alert; send it and close.
                        return Err(Stop::Flush);
                    }
                    loop {
                        match tls.reader().read(&mut plain) {
                            Ok(0) => break,
                            Ok(n) => self.decoder.handle_bytes(&plain[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => return Err(Stop::Now),
                        }
                    }
                }
                Ok(())
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

    fn send(&mut self, request_id: u64, body: Body) {
        let frame = v1::Frame {
            request_id,
            body: Some(body),
        };
        self.send_frame(&frame);
    }

    /// Encodes and queues one frame; returns its encoded size (0 if not sent).
    fn send_frame(&mut self, frame: &v1::Frame) -> usize {
        self.out_scratch.clear();
        if let Err(e) = self.encoder.encode(frame, &mut self.out_scratch) {
            tracing::error!(error = %e, "response too large for the peer");
            return 0;
        }
        let limit = self.shard.shared.cfg.limits.outbound_bytes_max;
        if self.transport.queue(&self.out_scratch, limit) {
            metrics::inc(&self.shard.metrics().frames_out);
            self.out_scratch.len()
        } else {
            // Over the outbound budget: the peer is not reading.
            self.ctl.kill(Kill::CloseTimeout);
            0
        }
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
    /// expires at `expires_at_ms` (unix) and registers it with the router.
    /// `mirrored`: the user is known to be in the node's metadata already.
    async fn authenticated(&mut self, p: Principal, expires_at_ms: u64, mirrored: bool) {
        self.principal = Some(p);
        self.ctl.session_id.set(p.session_id);
        let left_ms = expires_at_ms.saturating_sub(clock::unix_ms());
        self.shard
            .set_token_expiry(self.id, &self.ctl, clock::mono_ms() + left_ms.max(1));
        let Some(r) = self.shard.router.clone() else {
            return;
        };
        if !mirrored {
            // The router resolves recipients in the node's metadata: make
            // sure this user is there before it can be written to.
            let (meta, accounts) = (r.meta.clone(), self.accounts());
            if runtime::blocking(move || crate::messaging::ensure_user(&meta, &accounts, p))
                .await
                .is_none()
            {
                tracing::error!(
                    user = p.user_id,
                    "mirroring the user into metadata panicked"
                );
            }
        }
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
    /// on this thread and the session (plus the user's metadata mirror) in
    /// one blocking-pool call. Returns who it names and its expiry (unix ms).
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
        let meta = self.shard.router.as_ref().map(|r| r.meta.clone());
        self.call(move |acc, _| {
            let p = acc.check_session(&access)?;
            if let Some(meta) = meta {
                // The router resolves recipients in the node's metadata.
                crate::messaging::ensure_user(&meta, acc, p);
            }
            Ok(())
        })
        .await?;
        if self.shard.revocation_epoch() == epoch {
            self.shard
                .token_cache
                .borrow_mut()
                .insert(key, access, clock::unix_ms());
        }
        Ok(access)
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

    async fn on_frame(&mut self, frame: v1::Frame) -> Option<Stop> {
        let rid = frame.request_id;
        let Some(body) = frame.body else {
            self.error(rid, ErrorCode::UnknownFrameType, "frame has no body");
            return None;
        };
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
            Body::Authenticate(a) => {
                match self.check_token(a.access_token).await {
                    Ok(a) => {
                        self.authenticated(a.principal, a.expires_at_ms, true)
                            .await;
                        self.send(rid, Body::Done(v1::Done {}));
                    }
                    Err(e) => self.api_error(rid, e),
                }
            }
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
                self.granted(rid, r).await;
            }
            Body::Login(req) => {
                let r = self.call(move |acc, now| acc.login(&req, now)).await;
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
                    return self.unauthenticated_or_unsupported(rid, other);
                };
                self.on_authenticated(rid, p, other).await;
            }
        }
        None
    }

    fn unauthenticated_or_unsupported(&mut self, rid: u64, body: Body) -> Option<Stop> {
        if is_server_only(&body) {
            self.error(rid, ErrorCode::UnexpectedFrame, "server-to-client frame");
        } else {
            self.error(rid, ErrorCode::Unauthenticated, "authenticate first");
        }
        None
    }

    async fn granted(&mut self, rid: u64, r: Result<Granted, ApiError>) {
        match r {
            Ok(g) => {
                self.authenticated(g.principal, g.frame.access_expires_at_ms, false)
                    .await;
                self.send(rid, Body::SessionGranted(g.frame));
            }
            Err(e) => self.api_error(rid, e),
        }
    }

    async fn on_hello(&mut self, rid: u64, body: Body) -> Option<Stop> {
        let Body::Hello(h) = body else {
            self.error(
                rid,
                ErrorCode::UnexpectedFrame,
                "the first frame must be Hello",
            );
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
        let mut authenticated = None;
        if !h.access_token.is_empty() {
            match self.check_token(h.access_token).await {
                Ok(a) => authenticated = Some(a),
                Err(e) => {
                    // Stay before Hello: the client may refresh and retry.
                    self.api_error(rid, e);
                    return None;
                }
            }
        }
        let limits = &self.shard.shared.cfg.limits;
        self.encoder
            .set_frame_bytes_max(starling_protocol::limits::negotiate_frame_bytes_max(
                h.frame_bytes_max,
            ));
        let welcome = v1::Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_version: format!("starling {}", env!("CARGO_PKG_VERSION")),
            limits: Some(v1::Limits {
                frame_bytes_max: limits.frame_bytes_max,
                body_bytes_max: starling_protocol::limits::BODY_BYTES_MAX_DEFAULT,
                inflight_requests_max: limits.inflight_requests_max,
                heartbeat_ms: limits.heartbeat_ms,
                idle_timeout_ms: limits.idle_timeout_ms,
                sync_messages_max: 1000,
            }),
            server_time_ms: clock::unix_ms(),
            authenticated: authenticated.map(|a| a.principal.to_wire()),
        };
        let idle = u64::from(limits.idle_timeout_ms);
        self.welcomed = true;
        self.ctl.set_deadline(clock::mono_ms() + idle, Kill::Idle);
        if let Some(a) = authenticated {
            self.authenticated(a.principal, a.expires_at_ms, true).await;
        }
        self.send(rid, Body::Welcome(welcome));
        None
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
            Body::SetPassword(req) => {
                match self.call(move |acc, _| acc.set_password(p, &req)).await {
                    Ok(()) => self.send(rid, Body::Done(v1::Done {})),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::GetMe(_) => match self.call(move |acc, _| acc.get_me(p)).await {
                Ok(prof) => self.send(rid, Body::Profile(prof)),
                Err(e) => self.api_error(rid, e),
            },
            Body::UpdateProfile(req) => {
                match self.call(move |acc, _| acc.update_profile(p, &req)).await {
                    Ok(prof) => self.send(rid, Body::Profile(prof)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::ListDevices(_) => match self.call(move |acc, _| acc.list_devices(p)).await {
                Ok(list) => self.send(rid, Body::DeviceList(list)),
                Err(e) => self.api_error(rid, e),
            },
            Body::RemoveDevice(req) => {
                let shared = self.shard.shared.clone();
                match self
                    .call(move |acc, _| acc.remove_device(p, req.device_id))
                    .await
                {
                    Ok(revoked) => {
                        self.send(rid, Body::Done(v1::Done {}));
                        self.shard.forget_sessions(&revoked);
                        shared.revoke_sessions(&revoked);
                    }
                    Err(e) => self.api_error(rid, e),
                }
            }
            Body::DiscoverContacts(req) => {
                match self.call(move |acc, now| acc.discover(p, &req, now)).await {
                    Ok(m) => self.send(rid, Body::ContactMatches(m)),
                    Err(e) => self.api_error(rid, e),
                }
            }
            other if is_server_only(&other) => {
                self.error(rid, ErrorCode::UnexpectedFrame, "server-to-client frame");
            }
            other if Router::handles(&other) && self.router_open => {
                if let Some(r) = &self.shard.router {
                    let (id, frame) = (
                        router_conn(self.id),
                        v1::Frame {
                            request_id: rid,
                            body: Some(other),
                        },
                    );
                    r.with(|rs, now| rs.handle_frame(id, frame, now));
                }
            }
            other => {
                let name = other.kind().name();
                self.send(
                    rid,
                    Body::Error(v1::Error {
                        code: ErrorCode::Unavailable as i32,
                        message: format!("{name}: not implemented yet"),
                        retry_after_ms: 0,
                    }),
                );
            }
        }
    }
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
