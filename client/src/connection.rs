//! The low-level connection: one TCP (+TLS) stream, the frame codec, request
//! and response correlation by `request_id`, server pushes on their own
//! queue, Ping heartbeats and the idle deadline from `Welcome.limits`.
//!
//! One I/O task per connection owns the socket. Handles ([`Connection`],
//! cheap to clone) talk to it through a bounded queue; pushes come out of
//! [`Pushes`]. Every queue is bounded: an application that stops draining
//! pushes gets its connection closed (and, through [`crate::Client`], a
//! reconnect and a sync), never unbounded memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use starling_protocol::limits::{
    FRAME_BYTES_MAX_DEFAULT, FRAME_BYTES_MAX_FLOOR, negotiate_frame_bytes_max,
};
use starling_protocol::v1::{self, frame::Body};
use starling_protocol::{EncodeError, FrameDecoder, FrameEncoder, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::error::{ClientError, ServerError};
use crate::tls::{self, TlsTrust};

/// How the bytes travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TLS 1.3 with the given trust (the default for everything).
    Tls(TlsTrust),
    /// Unencrypted TCP: only for loopback benchmarks against a server that
    /// explicitly enabled its plaintext listener.
    DangerousPlaintext,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `HOST:PORT` (an IPv6 host in brackets).
    pub server: String,
    /// TLS or plain TCP.
    pub transport: Transport,
    /// TCP connect plus TLS handshake must finish within this.
    pub connect_timeout: Duration,
    /// A request without an answer after this fails with a timeout.
    pub request_timeout: Duration,
    /// Largest frame we accept (announced in Hello; clamped by the protocol).
    pub frame_bytes_max: u32,
    /// Pushes (and Sync responses) queued for the application before the
    /// connection is closed as too slow.
    pub push_queue_frames_max: usize,
    /// Describes this client in Hello.
    pub client: v1::ClientInfo,
}

impl ConnectOptions {
    /// Defaults: 10 s connect, 15 s requests, 64 KiB frames, 4,096 queued
    /// pushes, client "starling-sdk".
    #[must_use]
    pub fn new(server: impl Into<String>, transport: Transport) -> Self {
        Self {
            server: server.into(),
            transport,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            push_queue_frames_max: 4096,
            client: v1::ClientInfo {
                app: "starling-sdk".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                platform: std::env::consts::OS.to_owned(),
            },
        }
    }
}

/// Splits `HOST:PORT` into its host (brackets removed) and port.
pub(crate) fn split_host_port(server: &str) -> Result<(&str, u16), ClientError> {
    let bad = || ClientError::InvalidArgument(format!("server must be HOST:PORT, got {server:?}"));
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

/// What waits for frames with a given `request_id`.
enum Pending {
    /// One answer.
    One(oneshot::Sender<v1::Frame>),
    /// A stream of answers (Sync): ends with `SyncDone` or `Error`.
    Stream(mpsc::Sender<v1::Frame>),
}

struct State {
    pending: HashMap<u64, Pending>,
    /// Set once the I/O task has stopped: why.
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    next_request_id: AtomicU64,
    out: mpsc::Sender<Out>,
    closed_rx: watch::Receiver<bool>,
    welcome: Mutex<Option<v1::Welcome>>,
    inflight: Mutex<Option<Arc<Semaphore>>>,
    request_timeout: Duration,
    frame_bytes_max: u32,
    push_queue_frames_max: usize,
    client: v1::ClientInfo,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(
            self.state()
                .closed
                .clone()
                .unwrap_or_else(|| "connection closed".to_owned()),
        )
    }
}

/// What the writer task is asked to do. The frame is boxed: a `Message` inside it makes it
/// hundreds of bytes, and the queue holds `Close` too.
enum Out {
    Frame(Box<v1::Frame>),
    Close,
}

/// A handle on one open connection. Clones share the connection; it closes
/// when [`close`](Self::close) is called, the server hangs up, or the last
/// handle and the [`Pushes`] are dropped.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Frames the server pushed (`request_id` 0 or not matching a request):
/// `Deliver`, `Receipt`, `Goodbye`, connection-level `Error`, ...
#[derive(Debug)]
pub struct Pushes {
    rx: mpsc::Receiver<v1::Frame>,
}

impl Pushes {
    /// The next push; `None` once the connection has closed and every
    /// queued push was read.
    pub async fn recv(&mut self) -> Option<v1::Frame> {
        self.rx.recv().await
    }
}

/// The frames answering one streaming request (Sync): everything with its
/// `request_id`, ending with `SyncDone` or `Error`.
#[derive(Debug)]
pub struct ResponseStream {
    rx: mpsc::Receiver<v1::Frame>,
    done: bool,
    conn: Connection,
}

impl ResponseStream {
    /// The next frame; `Ok(None)` after the terminating frame; an error if
    /// the connection closed first.
    pub async fn next(&mut self) -> Result<Option<v1::Frame>, ClientError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(frame) => {
                if matches!(frame.body, Some(Body::SyncDone(_) | Body::Error(_)) | None) {
                    self.done = true;
                }
                Ok(Some(frame))
            }
            None => {
                self.done = true;
                Err(self.conn.shared.closed_error())
            }
        }
    }
}

impl Connection {
    /// Opens TCP (and TLS) to `opts.server` and starts the I/O task. Sends
    /// nothing yet: call [`hello`](Self::hello) next.
    pub async fn connect(opts: &ConnectOptions) -> Result<(Connection, Pushes), ClientError> {
        let what = "TCP connect and TLS handshake";
        tokio::time::timeout(opts.connect_timeout, Self::connect_inner(opts))
            .await
            .map_err(|_| ClientError::Timeout {
                what,
                after: opts.connect_timeout,
            })?
    }

    async fn connect_inner(opts: &ConnectOptions) -> Result<(Connection, Pushes), ClientError> {
        let (host, port) = split_host_port(&opts.server)?;
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        match &opts.transport {
            Transport::DangerousPlaintext => Ok(Self::start(tcp, opts)),
            Transport::Tls(trust) => {
                let cfg = tls::client_config(trust)?;
                let name = tls::server_name(host)?;
                let stream = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        ClientError::Tls(format!("handshake with {}: {e}", opts.server))
                    })?;
                Ok(Self::start(stream, opts))
            }
        }
    }

    /// Runs the protocol over an already connected byte stream (tests,
    /// custom transports).
    pub fn start<S>(stream: S, opts: &ConnectOptions) -> (Connection, Pushes)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(256);
        let (push_tx, push_rx) = mpsc::channel(opts.push_queue_frames_max.max(1));
        let (closed_tx, closed_rx) = watch::channel(false);
        let frame_bytes_max = negotiate_frame_bytes_max(opts.frame_bytes_max);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
            }),
            next_request_id: AtomicU64::new(1),
            out: out_tx,
            closed_rx,
            welcome: Mutex::new(None),
            inflight: Mutex::new(None),
            request_timeout: opts.request_timeout,
            frame_bytes_max,
            push_queue_frames_max: opts.push_queue_frames_max.max(1),
            client: opts.client.clone(),
        });
        let io = IoTask {
            shared: Arc::downgrade(&shared),
            decoder: FrameDecoder::new(frame_bytes_max),
            encoder: FrameEncoder::new(FRAME_BYTES_MAX_DEFAULT),
            push_tx,
            heartbeat: None,
            idle_timeout: None,
            last_sent: Instant::now(),
            last_received: Instant::now(),
            ping_nonce: 0,
        };
        let state_handle = Arc::clone(&shared);
        tokio::spawn(async move {
            let reason = io.run(stream, out_rx).await;
            let mut st = state_handle.state();
            st.closed = Some(reason);
            // Dropping the senders wakes every waiter with "closed".
            st.pending.clear();
            drop(st);
            let _ = closed_tx.send(true);
        });
        (Connection { shared }, Pushes { rx: push_rx })
    }

    /// Connects and says Hello in one step.
    pub async fn connect_hello(
        opts: &ConnectOptions,
        access_token: Option<&str>,
    ) -> Result<(Connection, Pushes, v1::Welcome), ClientError> {
        let (conn, pushes) = Self::connect(opts).await?;
        let welcome = conn.hello(access_token).await?;
        Ok((conn, pushes, welcome))
    }

    /// Sends Hello (with an access token to authenticate at once) and waits
    /// for Welcome, whose limits then apply to this connection. A token the
    /// server refuses does not fail Hello: the Welcome then has no
    /// `authenticated` and says why in `auth_error`, and the connection is
    /// open and unauthenticated (send `Refresh`, whose `SessionGranted`
    /// authenticates it, or `Authenticate`). An `Error` answer (a protocol
    /// version the server does not speak) leaves the connection waiting for
    /// its Hello.
    pub async fn hello(&self, access_token: Option<&str>) -> Result<v1::Welcome, ClientError> {
        let hello = v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: Some(self.shared.client.clone()),
            access_token: access_token.unwrap_or_default().to_owned(),
            frame_bytes_max: self.shared.frame_bytes_max,
        };
        let welcome = match self.request(Body::Hello(hello)).await? {
            Body::Welcome(w) => w,
            other => return Err(ClientError::unexpected("Welcome", Some(&other))),
        };
        let inflight = welcome
            .limits
            .as_ref()
            .map_or(64, |l| l.inflight_requests_max)
            .max(1);
        let inflight = usize::try_from(inflight).unwrap_or(64);
        *self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Semaphore::new(inflight)));
        *self
            .shared
            .welcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(welcome.clone());
        Ok(welcome)
    }

    /// The Welcome of this connection, once [`hello`](Self::hello) succeeded.
    #[must_use]
    pub fn welcome(&self) -> Option<v1::Welcome> {
        self.shared
            .welcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The optional features the server offers on this connection
    /// (`Welcome.features`; names in `starling_protocol::features`). Empty
    /// before Welcome.
    #[must_use]
    pub fn features(&self) -> Vec<String> {
        self.welcome().map(|w| w.features).unwrap_or_default()
    }

    /// Whether the server offers `feature` (e.g. `"groups"`). A request of a
    /// feature it does not offer is answered `NOT_SUPPORTED`.
    #[must_use]
    pub fn supports(&self, feature: &str) -> bool {
        self.shared
            .welcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|w| w.features.iter().any(|f| f == feature))
    }

    /// Sends a request and waits for its answer. An `Error` answer becomes
    /// [`ClientError::Server`]. At most `inflight_requests_max` requests
    /// are outstanding; more wait their turn here.
    pub async fn request(&self, body: Body) -> Result<Body, ClientError> {
        let semaphore = self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let _permit = match semaphore {
            Some(s) => Some(s.acquire_owned().await.map_err(|_| ClientError::Stopped)?),
            None => None,
        };
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::One(tx))?;
        if let Err(e) = self.transmit(id, body).await {
            self.shared.state().pending.remove(&id);
            return Err(e);
        }
        let after = self.shared.request_timeout;
        let frame = match tokio::time::timeout(after, rx).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(_)) => return Err(self.shared.closed_error()),
            Err(_) => {
                self.shared.state().pending.remove(&id);
                return Err(ClientError::Timeout {
                    what: "answer from the server",
                    after,
                });
            }
        };
        match frame.body {
            Some(Body::Error(e)) => Err(ClientError::Server(ServerError::from(e))),
            Some(body) => Ok(body),
            None => Err(ClientError::unexpected("an answer", None)),
        }
    }

    /// Sends a request whose answer is a stream of frames (Sync).
    pub async fn request_stream(&self, body: Body) -> Result<ResponseStream, ClientError> {
        let (tx, rx) = mpsc::channel(self.shared.push_queue_frames_max);
        let id = self.register(Pending::Stream(tx))?;
        if let Err(e) = self.transmit(id, body).await {
            self.shared.state().pending.remove(&id);
            return Err(e);
        }
        Ok(ResponseStream {
            rx,
            done: false,
            conn: self.clone(),
        })
    }

    /// Sends a one-way frame (`DeliveryAck`, `ReadCursor`, `Typing`), with
    /// `request_id` 0: nothing answers it unless it fails. Every other frame
    /// is a request and goes through [`request`](Self::request) (the server
    /// refuses a request with `request_id` 0).
    pub async fn send_oneway(&self, body: Body) -> Result<(), ClientError> {
        self.transmit(0, body).await
    }

    /// Sends a frame that normally gets no answer but with a `request_id`,
    /// and waits up to `grace` for an `Error` (or any answer) to it. Returns
    /// `Ok(None)` when nothing came back in time (accepted silently).
    pub async fn send_checked(
        &self,
        body: Body,
        grace: Duration,
    ) -> Result<Option<Body>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::One(tx))?;
        if let Err(e) = self.transmit(id, body).await {
            self.shared.state().pending.remove(&id);
            return Err(e);
        }
        // A Ping round trip first: the server has read our frame by then.
        let _ = self.request(Body::Ping(v1::Ping { nonce: id })).await;
        let res = tokio::time::timeout(grace, rx).await;
        self.shared.state().pending.remove(&id);
        match res {
            Ok(Ok(v1::Frame {
                body: Some(Body::Error(e)),
                ..
            })) => Err(ClientError::Server(ServerError::from(e))),
            Ok(Ok(frame)) => Ok(frame.body),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Ok(None),
        }
    }

    /// Asks the I/O task to close the connection (queued frames are written
    /// first).
    pub fn close(&self) {
        let _ = self.shared.out.try_send(Out::Close);
    }

    /// True once the connection has stopped.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.shared.state().closed.is_some()
    }

    /// Why the connection stopped (`None` while it is open).
    #[must_use]
    pub fn close_reason(&self) -> Option<String> {
        self.shared.state().closed.clone()
    }

    /// Waits until the connection has stopped.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed_rx.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn register(&self, pending: Pending) -> Result<u64, ClientError> {
        let mut st = self.shared.state();
        if let Some(reason) = &st.closed {
            return Err(ClientError::Closed(reason.clone()));
        }
        let id = self.shared.next_request_id.fetch_add(1, Ordering::Relaxed);
        st.pending.insert(id, pending);
        Ok(id)
    }

    async fn transmit(&self, request_id: u64, body: Body) -> Result<(), ClientError> {
        let frame = v1::Frame {
            request_id,
            body: Some(body),
        };
        let max = self
            .welcome()
            .and_then(|w| w.limits)
            .map_or(FRAME_BYTES_MAX_DEFAULT, |l| l.frame_bytes_max)
            .max(FRAME_BYTES_MAX_FLOOR);
        let len = prost::Message::encoded_len(&frame);
        if len > usize::try_from(max).unwrap_or(usize::MAX) {
            return Err(ClientError::Encode(EncodeError::Oversized { len, max }));
        }
        self.shared
            .out
            .send(Out::Frame(Box::new(frame)))
            .await
            .map_err(|_| self.shared.closed_error())
    }
}

/// The connection's I/O loop.
struct IoTask {
    /// Weak, so that dropping every handle closes the connection.
    shared: std::sync::Weak<Shared>,
    decoder: FrameDecoder,
    encoder: FrameEncoder,
    push_tx: mpsc::Sender<v1::Frame>,
    heartbeat: Option<Duration>,
    idle_timeout: Option<Duration>,
    last_sent: Instant,
    last_received: Instant,
    ping_nonce: u64,
}

/// Reads at least this much spare room before each socket read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

impl IoTask {
    /// Runs until the connection ends; returns why.
    async fn run<S>(mut self, stream: S, mut out_rx: mpsc::Receiver<Out>) -> String
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut wbuf = BytesMut::new();
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                read = async {
                    let buf = self.decoder.read_buf();
                    if buf.capacity() - buf.len() < READ_CHUNK_BYTES {
                        buf.reserve(READ_CHUNK_BYTES);
                    }
                    reader.read_buf(buf).await
                } => {
                    match read {
                        Ok(0) => {
                            return match self.decoder.handle_eof() {
                                Ok(()) => "server closed the connection".to_owned(),
                                Err(e) => format!("server closed the connection mid-frame: {e}"),
                            };
                        }
                        Ok(_) => {
                            self.last_received = Instant::now();
                            if let Err(reason) = self.drain_frames(&mut wbuf) {
                                return reason;
                            }
                            if !wbuf.is_empty() {
                                if let Err(e) = write_out(&mut writer, &mut wbuf).await {
                                    return format!("write failed: {e}");
                                }
                                self.last_sent = Instant::now();
                            }
                            self.decoder.release_buffer();
                        }
                        Err(e) => return format!("read failed: {e}"),
                    }
                }
                out = out_rx.recv() => {
                    let Some(Out::Frame(frame)) = out else {
                        let _ = writer.shutdown().await;
                        return "closed by the client".to_owned();
                    };
                    if let Err(reason) = self.encode(&frame, &mut wbuf) {
                        return reason;
                    }
                    // Coalesce whatever else is queued into one write.
                    let mut close = false;
                    while let Ok(more) = out_rx.try_recv() {
                        match more {
                            Out::Frame(f) => {
                                if let Err(reason) = self.encode(&f, &mut wbuf) {
                                    return reason;
                                }
                            }
                            Out::Close => {
                                close = true;
                                break;
                            }
                        }
                    }
                    if let Err(e) = write_out(&mut writer, &mut wbuf).await {
                        return format!("write failed: {e}");
                    }
                    self.last_sent = Instant::now();
                    if close {
                        let _ = writer.shutdown().await;
                        return "closed by the client".to_owned();
                    }
                }
                () = sleep_until_opt(deadline) => {
                    let now = Instant::now();
                    if let Some(idle) = self.idle_timeout
                        && now >= self.last_received + idle
                    {
                        return format!("server silent for {} ms", idle.as_millis());
                    }
                    if let Some(hb) = self.heartbeat
                        && now >= self.last_sent + hb
                    {
                        self.ping_nonce += 1;
                        let ping = v1::Frame {
                            request_id: 0,
                            body: Some(Body::Ping(v1::Ping { nonce: self.ping_nonce })),
                        };
                        if let Err(reason) = self.encode(&ping, &mut wbuf) {
                            return reason;
                        }
                        if let Err(e) = write_out(&mut writer, &mut wbuf).await {
                            return format!("write failed: {e}");
                        }
                        self.last_sent = Instant::now();
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let hb = self.heartbeat.map(|d| self.last_sent + d);
        let idle = self.idle_timeout.map(|d| self.last_received + d);
        match (hb, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Appends `frame` to the write buffer. [`Connection::transmit`] checked
    /// the size already; should the limit have shrunk since, the frame is
    /// dropped and its waiter told "closed" instead of failing the whole
    /// connection.
    fn encode(&self, frame: &v1::Frame, wbuf: &mut BytesMut) -> Result<(), String> {
        if self.encoder.encode(frame, wbuf).is_err()
            && let Some(shared) = self.shared.upgrade()
        {
            shared.state().pending.remove(&frame.request_id);
        }
        Ok(())
    }

    /// Routes every whole frame in the decoder. `Err` closes the connection.
    fn drain_frames(&mut self, wbuf: &mut BytesMut) -> Result<(), String> {
        loop {
            let frame = match self.decoder.poll_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) if !e.is_fatal() => continue,
                Err(e) => return Err(format!("server sent an invalid frame: {e}")),
            };
            self.route(frame, wbuf)?;
        }
    }

    fn route(&mut self, frame: v1::Frame, wbuf: &mut BytesMut) -> Result<(), String> {
        match &frame.body {
            Some(Body::Ping(p)) => {
                let pong = v1::Frame {
                    request_id: frame.request_id,
                    body: Some(Body::Pong(v1::Pong { nonce: p.nonce })),
                };
                return self.encode(&pong, wbuf);
            }
            Some(Body::Pong(_)) if frame.request_id == 0 => return Ok(()),
            Some(Body::Welcome(w)) => {
                if let Some(l) = &w.limits {
                    if l.frame_bytes_max > 0 {
                        self.encoder.set_frame_bytes_max(l.frame_bytes_max);
                    }
                    self.heartbeat =
                        (l.heartbeat_ms > 0).then(|| Duration::from_millis(l.heartbeat_ms.into()));
                    self.idle_timeout = (l.idle_timeout_ms > 0)
                        .then(|| Duration::from_millis(l.idle_timeout_ms.into()));
                }
            }
            _ => {}
        }
        let Some(shared) = self.shared.upgrade() else {
            return Err("closed by the client".to_owned());
        };
        let mut st = shared.state();
        if frame.request_id != 0 {
            match st.pending.remove(&frame.request_id) {
                Some(Pending::One(tx)) => {
                    let _ = tx.send(frame);
                    return Ok(());
                }
                Some(Pending::Stream(tx)) => {
                    let id = frame.request_id;
                    let last =
                        matches!(frame.body, Some(Body::SyncDone(_) | Body::Error(_)) | None);
                    match tx.try_send(frame) {
                        Ok(()) => {
                            if !last {
                                st.pending.insert(id, Pending::Stream(tx));
                            }
                            return Ok(());
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            return Err("the application did not read the sync stream fast enough"
                                .to_owned());
                        }
                    }
                }
                None => {}
            }
        }
        drop(st);
        match self.push_tx.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(format!(
                "the application did not read pushes fast enough ({} queued)",
                shared.push_queue_frames_max
            )),
        }
    }
}

async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await?;
    buf.clear();
    Ok(())
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_protocol::v1::ErrorCode;

    /// The far end of an in-memory stream, speaking frames.
    struct FakeServer {
        io: tokio::io::DuplexStream,
        decoder: FrameDecoder,
    }

    impl FakeServer {
        async fn recv(&mut self) -> v1::Frame {
            loop {
                if let Some(frame) = self.decoder.poll_frame().unwrap() {
                    return frame;
                }
                let n = self.io.read_buf(self.decoder.read_buf()).await.unwrap();
                assert!(n > 0, "client closed");
            }
        }

        async fn send(&mut self, request_id: u64, body: Body) {
            let mut buf = BytesMut::new();
            FrameEncoder::default()
                .encode(
                    &v1::Frame {
                        request_id,
                        body: Some(body),
                    },
                    &mut buf,
                )
                .unwrap();
            self.io.write_all(&buf).await.unwrap();
        }
    }

    fn pair() -> (Connection, Pushes, FakeServer) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let opts = ConnectOptions::new("test:1", Transport::DangerousPlaintext);
        let (conn, pushes) = Connection::start(client_io, &opts);
        let server = FakeServer {
            io: server_io,
            decoder: FrameDecoder::default(),
        };
        (conn, pushes, server)
    }

    fn welcome(heartbeat_ms: u32) -> Body {
        Body::Welcome(v1::Welcome {
            protocol_version: 1,
            server_version: "fake".into(),
            limits: Some(v1::Limits {
                frame_bytes_max: 4096,
                heartbeat_ms,
                idle_timeout_ms: 0,
                inflight_requests_max: 8,
                ..v1::Limits::default()
            }),
            ..v1::Welcome::default()
        })
    }

    #[tokio::test]
    async fn responses_correlate_pushes_separate_and_heartbeats_follow_welcome() {
        let (conn, mut pushes, mut server) = pair();
        let hello = tokio::spawn({
            let conn = conn.clone();
            async move { conn.hello(Some("tok")).await }
        });
        let f = server.recv().await;
        let Some(Body::Hello(h)) = &f.body else {
            panic!("{f:?}")
        };
        assert_eq!(h.access_token, "tok");
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        server.send(f.request_id, welcome(50)).await;
        hello.await.unwrap().unwrap();

        // Two requests answered in reverse order, with a push in between.
        let a = tokio::spawn({
            let conn = conn.clone();
            async move { conn.request(Body::GetMe(v1::GetMe {})).await }
        });
        let b = tokio::spawn({
            let conn = conn.clone();
            async move { conn.request(Body::ListDevices(v1::ListDevices {})).await }
        });
        let (f1, f2) = (server.recv().await, server.recv().await);
        let (me, devices) = if matches!(f1.body, Some(Body::GetMe(_))) {
            (f1, f2)
        } else {
            (f2, f1)
        };
        server
            .send(
                0,
                Body::Receipt(v1::Receipt {
                    up_to_seq: 3,
                    ..v1::Receipt::default()
                }),
            )
            .await;
        server
            .send(
                devices.request_id,
                Body::Error(v1::Error {
                    code: ErrorCode::RateLimited as i32,
                    message: "slow down".into(),
                    retry_after_ms: 10,
                }),
            )
            .await;
        server
            .send(
                me.request_id,
                Body::Profile(v1::Profile {
                    user_id: 7,
                    ..v1::Profile::default()
                }),
            )
            .await;
        assert!(matches!(a.await.unwrap(), Ok(Body::Profile(p)) if p.user_id == 7));
        let err = b.await.unwrap().unwrap_err();
        assert_eq!(err.server().unwrap().code(), ErrorCode::RateLimited);
        assert!(err.is_transient());
        let push = pushes.recv().await.unwrap();
        assert!(matches!(push.body, Some(Body::Receipt(r)) if r.up_to_seq == 3));

        // Idle for longer than heartbeat_ms: the client pings.
        let ping = tokio::time::timeout(Duration::from_secs(5), server.recv())
            .await
            .unwrap();
        assert!(matches!(ping.body, Some(Body::Ping(_))), "{ping:?}");
        // And it answers the server's pings.
        server.send(9, Body::Ping(v1::Ping { nonce: 42 })).await;
        let pong = loop {
            let f = server.recv().await;
            if matches!(f.body, Some(Body::Pong(_))) {
                break f;
            }
        };
        assert_eq!(pong.request_id, 9);
        assert!(matches!(pong.body, Some(Body::Pong(p)) if p.nonce == 42));

        // Frames above the server's limit are refused locally.
        let big = Body::Send(v1::Send {
            body: vec![0u8; 8192].into(),
            ..v1::Send::default()
        });
        assert!(matches!(
            conn.request(big).await,
            Err(ClientError::Encode(_))
        ));

        // The server hangs up: waiters and pushes end, with a reason.
        let pending = tokio::spawn({
            let conn = conn.clone();
            async move { conn.request(Body::GetMe(v1::GetMe {})).await }
        });
        let _ = server.recv().await;
        drop(server);
        assert!(matches!(
            pending.await.unwrap(),
            Err(ClientError::Closed(_))
        ));
        while pushes.recv().await.is_some() {}
        conn.closed().await;
        assert!(conn.close_reason().unwrap().contains("server closed"));
        assert!(matches!(
            conn.request(Body::GetMe(v1::GetMe {})).await,
            Err(ClientError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_sync_stream_ends_at_sync_done_and_garbage_closes_the_connection() {
        let (conn, _pushes, mut server) = pair();
        let stream = tokio::spawn({
            let conn = conn.clone();
            async move {
                let mut s = conn.request_stream(Body::Sync(v1::Sync::default())).await?;
                let mut kinds = Vec::new();
                while let Some(f) = s.next().await? {
                    kinds.push(f.body.map(|b| b.kind().name()));
                }
                Ok::<_, ClientError>(kinds)
            }
        });
        let sync = server.recv().await;
        let deliver = Body::Deliver(v1::Deliver {
            message: Some(v1::Message::default()),
        });
        server.send(sync.request_id, deliver).await;
        server
            .send(sync.request_id, Body::SyncDone(v1::SyncDone::default()))
            .await;
        let kinds = stream.await.unwrap().unwrap();
        assert_eq!(kinds, vec![Some("deliver"), Some("sync_done")]);

        // An over-long length prefix is fatal for the connection.
        server.io.write_all(&[0xff; 6]).await.unwrap();
        conn.closed().await;
        assert!(conn.close_reason().unwrap().contains("invalid frame"));
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            split_host_port("127.0.0.1:7443").unwrap(),
            ("127.0.0.1", 7443)
        );
        assert_eq!(split_host_port("[::1]:7443").unwrap(), ("::1", 7443));
        assert_eq!(
            split_host_port("example.org:1").unwrap(),
            ("example.org", 1)
        );
        for bad in ["nohost", ":1", "h:99999", "h:x"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }
}
