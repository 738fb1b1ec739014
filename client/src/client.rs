//! The high-level client: a session from the profile, kept alive by a
//! background driver task that reconnects with full-jitter backoff,
//! refreshes tokens, flushes the outbox under the same `client_msg_id`s,
//! syncs from the persisted cursors, fills gaps, and hands messages to the
//! application through [`Events`] in seq order per conversation, each once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), starling_client::ClientError> {
//! use starling_client::{Client, ClientConfig, ConnectOptions, Event, Target, TlsTrust, Transport};
//!
//! let connect = ConnectOptions::new(
//!     "127.0.0.1:7443",
//!     Transport::Tls(TlsTrust::CaFile("data/tls/ca.pem".into())),
//! );
//! let (client, mut events) = Client::start(ClientConfig::new(connect, "profile-dir"))?;
//! client.send_text(Target::User(42), "hello").await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         println!("{} #{}: {:?}", m.conversation_id, m.seq, m.body);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use starling_protocol::v1::{self, ErrorCode, frame::Body};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::backoff::{Backoff, BackoffConfig};
use crate::clock::unix_ms;
use crate::connection::{ConnectOptions, Connection, Pushes};
use crate::error::{ClientError, ServerError};
use crate::ids::ClientMsgId;
use crate::reorder::{FetchRange, Released, Reorder};
use crate::store::{Credentials, CursorStore, Outbox, OutboxEntry, Profile, Target};

/// Refresh the access token when it expires within this margin.
const TOKEN_MARGIN_MS: u64 = 30_000;

/// How the high-level client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where and how to connect.
    pub connect: ConnectOptions,
    /// The profile directory (credentials, cursors, outbox).
    pub profile_dir: PathBuf,
    /// Reconnect delays.
    pub backoff: BackoffConfig,
    /// Retry delays for a message the server refused for a transient reason
    /// while connected (overload, outage).
    pub send_retry: BackoffConfig,
    /// Sync on connect and process `Deliver` pushes (advancing cursors).
    /// One-shot tools that do not show messages turn this off, so that
    /// messages stay unread-by-this-device for the next sync.
    pub receive_messages: bool,
    /// Events buffered for the application before the driver waits.
    pub events_max: usize,
    /// Messages held per conversation while a gap is being fetched.
    pub ahead_messages_max: usize,
    /// How long requests on [`Client`] wait for a connection.
    pub connected_wait: Duration,
}

impl ClientConfig {
    /// Defaults: backoff 250 ms .. 30 s, send retry 1 s .. 60 s, receive
    /// messages, 1,024 events, 10,000 held messages, 20 s connected wait.
    #[must_use]
    pub fn new(connect: ConnectOptions, profile_dir: impl Into<PathBuf>) -> Self {
        Self {
            connect,
            profile_dir: profile_dir.into(),
            backoff: BackoffConfig::default(),
            send_retry: BackoffConfig {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(60),
            },
            receive_messages: true,
            events_max: 1024,
            ahead_messages_max: 10_000,
            connected_wait: Duration::from_secs(20),
        }
    }
}

/// What the client tells the application, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection is up and authenticated.
    Connected {
        /// The user.
        user_id: u64,
        /// This device.
        device_id: u32,
        /// The server's software version.
        server_version: String,
        /// The optional features the server offers (`Welcome.features`).
        features: Vec<String>,
    },
    /// The connection was lost; the next attempt is in `retry_in`.
    Disconnected {
        /// Why.
        reason: String,
        /// Delay before reconnecting.
        retry_in: Duration,
    },
    /// The sync after (re)connecting finished, gaps included.
    Synced {
        /// Messages the Sync carried.
        messages: u32,
        /// Receipts the Sync carried.
        receipts: u32,
    },
    /// The server refused the Sync.
    SyncFailed(ServerError),
    /// A message, in seq order per conversation, each exactly once.
    Message(v1::Message),
    /// A delivered/read receipt.
    Receipt(v1::Receipt),
    /// An outbox message was accepted (it is durable on the server).
    Sent(v1::SendAck),
    /// An outbox message was refused for good and removed from the outbox.
    SendFailed {
        /// Its id.
        client_msg_id: ClientMsgId,
        /// The server's reason.
        error: ServerError,
    },
    /// Someone is typing.
    Typing(v1::Typing),
    /// A followed user's presence changed.
    Presence(v1::PresenceUpdate),
    /// A group changed.
    GroupChanged(v1::GroupChanged),
    /// An `Error` not tied to a request of ours (connection-level, or a
    /// failed gap fetch).
    ServerError(ServerError),
    /// A local problem (the profile could not be written, ...).
    LocalError(String),
    /// The session ended for good; the client has stopped. Log in again.
    LoggedOut {
        /// Why.
        reason: String,
    },
}

/// The application's end of the event stream.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

/// A sign-in identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identifier {
    /// E.164 phone number, e.g. `+14155550100`.
    Phone(String),
    /// E-mail address.
    Email(String),
}

impl Identifier {
    fn to_wire(&self) -> v1::Identifier {
        use v1::identifier::Kind;
        v1::Identifier {
            kind: Some(match self {
                Identifier::Phone(p) => Kind::Phone(p.clone()),
                Identifier::Email(e) => Kind::Email(e.clone()),
            }),
        }
    }
}

/// How [`Client::login`] proves the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginCredential {
    /// A code from [`Client::request_otp`].
    OtpCode(String),
    /// The account password.
    Password(String),
}

/// Where a history page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryAnchor {
    /// The newest messages.
    Latest,
    /// Messages with seq below this, newest of them.
    Before(u64),
    /// Messages with seq above this, oldest of them.
    After(u64),
}

/// The connection as handles see it.
#[derive(Debug, Clone)]
enum ConnState {
    Connecting { last_error: Option<String> },
    Up(Connection),
    Stopped(String),
}

enum Command {
    Send {
        entry: OutboxEntry,
        reply: oneshot::Sender<Result<v1::SendAck, ClientError>>,
    },
    Reconnect(String),
    Shutdown,
}

enum Internal {
    SendResult {
        epoch: u64,
        id: ClientMsgId,
        result: Result<Body, ClientError>,
    },
    RetrySend {
        epoch: u64,
        id: ClientMsgId,
    },
    Sync {
        epoch: u64,
        frame: v1::Frame,
    },
    Page {
        epoch: u64,
        range: FetchRange,
        result: Result<Body, ClientError>,
    },
}

enum SessionEnd {
    Lost {
        reason: String,
        reconnect_after: Duration,
    },
    SessionLost(String),
    Shutdown,
}

/// A signed-in client. Cheap to clone; the driver stops when
/// [`shutdown`](Self::shutdown) is called or every handle is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    cmd_tx: mpsc::Sender<Command>,
    state_rx: watch::Receiver<ConnState>,
    profile: Profile,
    user_id: u64,
    device_id: u32,
    connected_wait: Duration,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Send { .. } => "Send",
            Command::Reconnect(_) => "Reconnect",
            Command::Shutdown => "Shutdown",
        })
    }
}

// ------------------------------------------------------------ account flows

impl Client {
    /// Asks the server to send a one-time code to `identifier`.
    pub async fn request_otp(
        connect: &ConnectOptions,
        identifier: &Identifier,
    ) -> Result<v1::OtpSent, ClientError> {
        let (conn, _pushes, _) = Connection::connect_hello(connect, None).await?;
        let res = conn
            .request(Body::RequestOtp(v1::RequestOtp {
                identifier: Some(identifier.to_wire()),
            }))
            .await;
        conn.close();
        match res? {
            Body::OtpSent(s) => Ok(s),
            other => Err(ClientError::unexpected("OtpSent", Some(&other))),
        }
    }

    /// Verifies a one-time code (registering the user if new) and stores
    /// the new session in `profile`.
    pub async fn verify_otp(
        connect: &ConnectOptions,
        profile: &Profile,
        identifier: &Identifier,
        code: &str,
        display_name: &str,
        device: v1::DeviceInfo,
    ) -> Result<v1::SessionGranted, ClientError> {
        let body = Body::VerifyOtp(v1::VerifyOtp {
            identifier: Some(identifier.to_wire()),
            code: code.to_owned(),
            device: Some(device),
            display_name: display_name.to_owned(),
        });
        Self::sign_in(connect, profile, body).await
    }

    /// Signs in an existing user and stores the new session in `profile`.
    pub async fn login(
        connect: &ConnectOptions,
        profile: &Profile,
        identifier: &Identifier,
        credential: LoginCredential,
        device: v1::DeviceInfo,
    ) -> Result<v1::SessionGranted, ClientError> {
        use v1::login::Credential;
        let body = Body::Login(v1::Login {
            identifier: Some(identifier.to_wire()),
            credential: Some(match credential {
                LoginCredential::OtpCode(c) => Credential::OtpCode(c),
                LoginCredential::Password(p) => Credential::Password(p),
            }),
            device: Some(device),
        });
        Self::sign_in(connect, profile, body).await
    }

    async fn sign_in(
        connect: &ConnectOptions,
        profile: &Profile,
        body: Body,
    ) -> Result<v1::SessionGranted, ClientError> {
        let (conn, _pushes, _) = Connection::connect_hello(connect, None).await?;
        let res = conn.request(body).await;
        conn.close();
        match res? {
            Body::SessionGranted(g) => {
                profile.save_credentials(&Credentials::from(&g))?;
                Ok(g)
            }
            other => Err(ClientError::unexpected("SessionGranted", Some(&other))),
        }
    }
}

// ------------------------------------------------------------- the session

impl Client {
    /// Starts the driver for the session stored in the profile. Must be
    /// called inside a tokio runtime. Fails at once if the profile has no
    /// credentials.
    pub fn start(cfg: ClientConfig) -> Result<(Client, Events), ClientError> {
        let profile = Profile::open(&cfg.profile_dir)?;
        let creds = profile
            .credentials()?
            .ok_or_else(|| ClientError::NotLoggedIn(cfg.profile_dir.clone()))?;
        let cursors = profile.cursors(creds.user_id)?;
        let outbox = profile.outbox()?;
        let reorder = Reorder::new(
            cursors.all().iter().map(|(c, s)| (*c, *s)),
            cfg.ahead_messages_max,
        );
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (event_tx, event_rx) = mpsc::channel(cfg.events_max.max(1));
        let (state_tx, state_rx) = watch::channel(ConnState::Connecting { last_error: None });
        let (internal_tx, internal_rx) = mpsc::channel(1024);
        let client = Client {
            cmd_tx,
            state_rx,
            profile: profile.clone(),
            user_id: creds.user_id,
            device_id: creds.device_id,
            connected_wait: cfg.connected_wait,
        };
        let driver = Driver {
            send_retry: cfg.send_retry,
            cfg,
            profile,
            creds,
            cursors,
            outbox,
            reorder,
            events: event_tx,
            state: state_tx,
            cmd_rx,
            internal_tx,
            internal_rx,
            epoch: 0,
            in_flight: HashSet::new(),
            fresh: HashSet::new(),
            retries: HashMap::new(),
            waiters: HashMap::new(),
            sync_done: None,
        };
        tokio::spawn(driver.run());
        Ok((client, Events { rx: event_rx }))
    }

    /// The signed-in user.
    #[must_use]
    pub fn user_id(&self) -> u64 {
        self.user_id
    }

    /// This device.
    #[must_use]
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The profile this client uses.
    #[must_use]
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The current connection, waiting up to `ClientConfig::connected_wait`
    /// for one.
    pub async fn connection(&self) -> Result<Connection, ClientError> {
        let mut rx = self.state_rx.clone();
        let wait = self.connected_wait;
        let res = tokio::time::timeout(
            wait,
            rx.wait_for(|s| {
                matches!(s, ConnState::Up(c) if !c.is_closed())
                    || matches!(s, ConnState::Stopped(_))
            }),
        )
        .await;
        match res {
            Ok(Ok(state)) => match &*state {
                ConnState::Up(c) => Ok(c.clone()),
                ConnState::Stopped(reason) => Err(ClientError::SessionLost(reason.clone())),
                ConnState::Connecting { .. } => Err(ClientError::Stopped),
            },
            Ok(Err(_)) => Err(ClientError::Stopped),
            Err(_) => {
                let last = match &*self.state_rx.borrow() {
                    ConnState::Connecting {
                        last_error: Some(e),
                    } => e.clone(),
                    _ => "no connection".to_owned(),
                };
                Err(ClientError::Closed(format!(
                    "not connected after {} ms: {last}",
                    wait.as_millis()
                )))
            }
        }
    }

    /// Sends a request on the current connection. On `TOKEN_EXPIRED` the
    /// driver reconnects (refreshing the token) and the request is retried
    /// once.
    pub async fn request(&self, body: Body) -> Result<Body, ClientError> {
        let conn = self.connection().await?;
        match conn.request(body.clone()).await {
            Err(ClientError::Server(e)) if e.code() == ErrorCode::TokenExpired => {
                let _ = self
                    .cmd_tx
                    .send(Command::Reconnect("access token expired".to_owned()))
                    .await;
                conn.closed().await;
                self.connection().await?.request(body).await
            }
            other => other,
        }
    }

    /// Queues a message in the outbox (durably) and waits for its
    /// `SendAck`. If this attempt fails for a transient reason the result is
    /// [`ClientError::StillQueued`]: the message stays in the outbox and is
    /// retried (same `client_msg_id`) until acknowledged or refused.
    pub async fn send(
        &self,
        to: Target,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<v1::SendAck, ClientError> {
        let client_msg_id = ClientMsgId::random()
            .map_err(|_| ClientError::InvalidArgument("no randomness for client_msg_id".into()))?;
        let entry = OutboxEntry {
            client_msg_id,
            to,
            content_type: content_type.to_owned(),
            body,
            queued_at_ms: unix_ms(),
        };
        let (reply, rx) = oneshot::channel();
        self.cmd_tx
            .send(Command::Send { entry, reply })
            .await
            .map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// [`send`](Self::send) with a `text/plain` UTF-8 body.
    pub async fn send_text(&self, to: Target, text: &str) -> Result<v1::SendAck, ClientError> {
        self.send(to, "text/plain", text.as_bytes().to_vec()).await
    }

    /// The optional features the server offers (`Welcome.features` of the
    /// current connection; names in `starling_protocol::features`). Requests
    /// of other features are answered `NOT_SUPPORTED`.
    pub async fn server_features(&self) -> Result<Vec<String>, ClientError> {
        Ok(self.connection().await?.features())
    }

    /// The caller's own profile.
    pub async fn me(&self) -> Result<v1::Profile, ClientError> {
        match self.request(Body::GetMe(v1::GetMe {})).await? {
            Body::Profile(p) => Ok(p),
            other => Err(ClientError::unexpected("Profile", Some(&other))),
        }
    }

    /// Changes profile fields.
    pub async fn update_profile(
        &self,
        update: v1::UpdateProfile,
    ) -> Result<v1::Profile, ClientError> {
        match self.request(Body::UpdateProfile(update)).await? {
            Body::Profile(p) => Ok(p),
            other => Err(ClientError::unexpected("Profile", Some(&other))),
        }
    }

    /// The caller's devices.
    pub async fn devices(&self) -> Result<v1::DeviceList, ClientError> {
        match self.request(Body::ListDevices(v1::ListDevices {})).await? {
            Body::DeviceList(d) => Ok(d),
            other => Err(ClientError::unexpected("DeviceList", Some(&other))),
        }
    }

    /// A page of a conversation's history (ascending seqs).
    pub async fn history(
        &self,
        conversation_id: u64,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> Result<v1::HistoryPage, ClientError> {
        use v1::get_history::Anchor;
        let anchor = match anchor {
            HistoryAnchor::Latest => None,
            HistoryAnchor::Before(s) => Some(Anchor::BeforeSeq(s)),
            HistoryAnchor::After(s) => Some(Anchor::AfterSeq(s)),
        };
        let req = v1::GetHistory {
            conversation_id,
            anchor,
            limit,
        };
        match self.request(Body::GetHistory(req)).await? {
            Body::HistoryPage(p) => Ok(p),
            other => Err(ClientError::unexpected("HistoryPage", Some(&other))),
        }
    }

    /// One page of the conversation list (most recent first).
    pub async fn conversations(
        &self,
        limit: u32,
        cursor: Vec<u8>,
    ) -> Result<v1::ConversationList, ClientError> {
        let req = v1::ListConversations {
            limit,
            cursor: cursor.into(),
        };
        match self.request(Body::ListConversations(req)).await? {
            Body::ConversationList(l) => Ok(l),
            other => Err(ClientError::unexpected("ConversationList", Some(&other))),
        }
    }

    /// The 1:1 conversation with `user_id`, found in the conversation list
    /// (`None` if there is none yet).
    pub async fn conversation_with(&self, user_id: u64) -> Result<Option<u64>, ClientError> {
        let mut cursor = Vec::new();
        // Bounded: at most this many pages.
        for _ in 0..100 {
            let page = self.conversations(0, cursor).await?;
            if let Some(c) = page.conversations.iter().find(|c| {
                c.peer_user_id == user_id && c.kind == v1::ConversationKind::Direct as i32
            }) {
                return Ok(Some(c.conversation_id));
            }
            if page.next_cursor.is_empty() {
                break;
            }
            cursor = page.next_cursor.to_vec();
        }
        Ok(None)
    }

    /// Marks every message of the conversation up to `up_to_seq` read.
    /// `ReadCursor` has no answer; an `Error` arriving within a short grace
    /// period (after a Ping round trip) is reported.
    pub async fn mark_read(&self, conversation_id: u64, up_to_seq: u64) -> Result<(), ClientError> {
        let conn = self.connection().await?;
        let body = Body::ReadCursor(v1::ReadCursor {
            conversation_id,
            up_to_seq,
        });
        conn.send_checked(body, Duration::from_millis(300)).await?;
        Ok(())
    }

    /// Refuses messages from `user_id`.
    pub async fn block(&self, user_id: u64) -> Result<(), ClientError> {
        self.expect_done(Body::Block(v1::Block { user_id })).await
    }

    /// Accepts messages from `user_id` again.
    pub async fn unblock(&self, user_id: u64) -> Result<(), ClientError> {
        self.expect_done(Body::Unblock(v1::Unblock { user_id }))
            .await
    }

    /// Finds registered users by phone number (hashed with SHA-256 before
    /// it leaves the device).
    pub async fn discover_phones(
        &self,
        phones: &[&str],
    ) -> Result<Vec<(String, u64)>, ClientError> {
        let hashes: Vec<(String, Vec<u8>)> = phones
            .iter()
            .map(|p| {
                let h = ring::digest::digest(&ring::digest::SHA256, p.as_bytes());
                ((*p).to_owned(), h.as_ref().to_vec())
            })
            .collect();
        let req = v1::DiscoverContacts {
            phone_sha256: hashes.iter().map(|(_, h)| h.clone().into()).collect(),
        };
        let matches = match self.request(Body::DiscoverContacts(req)).await? {
            Body::ContactMatches(m) => m.matches,
            other => return Err(ClientError::unexpected("ContactMatches", Some(&other))),
        };
        Ok(hashes
            .into_iter()
            .filter_map(|(phone, h)| {
                matches
                    .iter()
                    .find(|m| m.phone_sha256[..] == h[..])
                    .map(|m| (phone, m.user_id))
            })
            .collect())
    }

    /// Resolves a user given as a decimal user id or a `+` phone number. A
    /// phone number is looked up (contact discovery, which the server
    /// rate-limits) only the first time: the answer is remembered in the
    /// profile's `contacts.json`.
    pub async fn resolve_user(&self, who: &str) -> Result<u64, ClientError> {
        if who.starts_with('+') {
            let mut book = self.profile.contacts(self.user_id)?;
            if let Some(u) = book.get(who) {
                return Ok(u);
            }
            let uid = self
                .discover_phones(&[who])
                .await?
                .first()
                .map(|(_, u)| *u)
                .ok_or_else(|| ClientError::InvalidArgument(format!("{who} is not registered")))?;
            book.insert(who, uid)?;
            return Ok(uid);
        }
        who.parse().map_err(|_| {
            ClientError::InvalidArgument(format!("{who:?} is neither a user id nor a +phone"))
        })
    }

    /// Ends this session on the server, forgets the credentials and stops
    /// the client.
    pub async fn logout(&self) -> Result<(), ClientError> {
        self.expect_done(Body::Logout(v1::Logout { session_id: 0 }))
            .await?;
        self.profile.clear_credentials()?;
        self.shutdown().await;
        Ok(())
    }

    /// Stops the driver (closing the connection). The outbox and cursors
    /// stay on disk.
    pub async fn shutdown(&self) {
        let _ = self.cmd_tx.send(Command::Shutdown).await;
        let mut rx = self.state_rx.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            rx.wait_for(|s| matches!(s, ConnState::Stopped(_))),
        )
        .await;
    }

    async fn expect_done(&self, body: Body) -> Result<(), ClientError> {
        match self.request(body).await? {
            Body::Done(_) => Ok(()),
            other => Err(ClientError::unexpected("Done", Some(&other))),
        }
    }
}

// --------------------------------------------------------------- the driver

struct Driver {
    cfg: ClientConfig,
    send_retry: BackoffConfig,
    profile: Profile,
    creds: Credentials,
    cursors: CursorStore,
    outbox: Outbox,
    reorder: Reorder,
    events: mpsc::Sender<Event>,
    state: watch::Sender<ConnState>,
    cmd_rx: mpsc::Receiver<Command>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    /// Incremented per connection; results of older connections are stale.
    epoch: u64,
    /// Outbox entries with a Send outstanding on the current connection.
    in_flight: HashSet<ClientMsgId>,
    /// Outbox entries queued by this process and never written to a connection: their first
    /// Send says `first_attempt` (the server then skips its durable dedup lookup). Entries
    /// reloaded from disk are never here, so after a restart every resend is a plain retry.
    fresh: HashSet<ClientMsgId>,
    /// Per-message retry backoff after transient refusals.
    retries: HashMap<ClientMsgId, Backoff>,
    /// Callers of `Client::send` waiting for the outcome of their message.
    waiters: HashMap<ClientMsgId, oneshot::Sender<Result<v1::SendAck, ClientError>>>,
    /// The Sync finished (counts), waiting for gap fetches before `Synced`.
    sync_done: Option<(u32, u32)>,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.cfg.backoff);
        loop {
            self.epoch += 1;
            let end = match self.connect().await {
                Ok((conn, pushes, welcome)) => {
                    backoff.reset();
                    let end = self.session(&conn, pushes, &welcome).await;
                    conn.close();
                    end
                }
                Err(ClientError::SessionLost(reason)) => SessionEnd::SessionLost(reason),
                Err(e) => SessionEnd::Lost {
                    reason: e.to_string(),
                    reconnect_after: Duration::ZERO,
                },
            };
            self.in_flight.clear();
            self.reorder.handle_disconnect();
            self.sync_done = None;
            match end {
                SessionEnd::Shutdown => {
                    self.stop("client shut down".to_owned());
                    return;
                }
                SessionEnd::SessionLost(reason) => {
                    self.emit(Event::LoggedOut {
                        reason: reason.clone(),
                    })
                    .await;
                    self.stop(reason);
                    return;
                }
                SessionEnd::Lost {
                    reason,
                    reconnect_after,
                } => {
                    let delay = backoff.next_delay().max(reconnect_after);
                    self.state.send_replace(ConnState::Connecting {
                        last_error: Some(reason.clone()),
                    });
                    self.emit(Event::Disconnected {
                        reason,
                        retry_in: delay,
                    })
                    .await;
                    if !self.wait_offline(delay).await {
                        self.stop("client shut down".to_owned());
                        return;
                    }
                }
            }
        }
    }

    fn stop(&mut self, reason: String) {
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(ClientError::Stopped));
        }
        self.state.send_replace(ConnState::Stopped(reason));
    }

    /// Sleeps `delay` while still queueing sends. False: shut down.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Shutdown) => return false,
                    Some(Command::Send { entry, reply }) => {
                        self.enqueue(entry, reply);
                    }
                    Some(Command::Reconnect(_)) => {}
                },
            }
        }
    }

    /// Connects and authenticates: Hello with the access token unless it is
    /// about to expire; if the server refused it (`Welcome.auth_error`) or it
    /// was not sent, Refresh on the same connection, whose `SessionGranted`
    /// authenticates it (no second Hello). A refused refresh ends the
    /// session.
    async fn connect(&mut self) -> Result<(Connection, Pushes, v1::Welcome), ClientError> {
        let (conn, pushes) = Connection::connect(&self.cfg.connect).await?;
        let token = (self.creds.access_expires_at_ms > unix_ms() + TOKEN_MARGIN_MS)
            .then(|| self.creds.access_token.clone());
        let w = conn.hello(token.as_deref()).await?;
        if w.authenticated.is_none() {
            self.refresh(&conn).await?;
        }
        Ok((conn, pushes, w))
    }

    async fn refresh(&mut self, conn: &Connection) -> Result<(), ClientError> {
        let req = Body::Refresh(v1::Refresh {
            refresh_token: self.creds.refresh_token.clone(),
        });
        match conn.request(req).await {
            Ok(Body::SessionGranted(g)) => {
                self.creds = Credentials::from(&g);
                self.profile.save_credentials(&self.creds)?;
                Ok(())
            }
            Ok(other) => Err(ClientError::unexpected("SessionGranted", Some(&other))),
            Err(ClientError::Server(e)) if !e.is_transient() => Err(ClientError::SessionLost(
                format!("token refresh refused: {e}"),
            )),
            Err(e) => Err(e),
        }
    }

    async fn session(
        &mut self,
        conn: &Connection,
        mut pushes: Pushes,
        welcome: &v1::Welcome,
    ) -> SessionEnd {
        self.state.send_replace(ConnState::Up(conn.clone()));
        self.emit(Event::Connected {
            user_id: self.creds.user_id,
            device_id: self.creds.device_id,
            server_version: welcome.server_version.clone(),
            features: welcome.features.clone(),
        })
        .await;
        let queued: Vec<ClientMsgId> = self
            .outbox
            .entries()
            .iter()
            .map(|e| e.client_msg_id)
            .collect();
        for id in queued {
            self.transmit_send(conn, id);
        }
        if self.cfg.receive_messages {
            self.start_sync(conn).await;
            for range in self.reorder.open_gaps() {
                self.fetch(conn, range);
            }
        }
        let mut reconnect_after = Duration::ZERO;
        loop {
            tokio::select! {
                push = pushes.recv() => match push {
                    None => {
                        return SessionEnd::Lost {
                            reason: conn.close_reason().unwrap_or_else(|| "connection closed".into()),
                            reconnect_after,
                        };
                    }
                    Some(frame) => {
                        if let Some(end) = self.handle_push(conn, frame, &mut reconnect_after).await {
                            return end;
                        }
                    }
                },
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Shutdown) => return SessionEnd::Shutdown,
                    Some(Command::Send { entry, reply }) => {
                        let id = entry.client_msg_id;
                        if self.enqueue(entry, reply) {
                            self.transmit_send(conn, id);
                        }
                    }
                    Some(Command::Reconnect(reason)) => {
                        return SessionEnd::Lost { reason, reconnect_after: Duration::ZERO };
                    }
                },
                Some(int) = self.internal_rx.recv() => {
                    if let Some(end) = self.handle_internal(conn, int).await {
                        return end;
                    }
                }
            }
        }
    }

    async fn start_sync(&mut self, conn: &Connection) {
        let last_seq = self.cursors.all().iter().map(|(c, s)| (*c, *s)).collect();
        let Ok(mut stream) = conn.request_stream(Body::Sync(v1::Sync { last_seq })).await else {
            return; // The connection is closing; the session loop sees it.
        };
        let tx = self.internal_tx.clone();
        let epoch = self.epoch;
        tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Ok(Some(frame)) => {
                        if tx.send(Internal::Sync { epoch, frame }).await.is_err() {
                            return;
                        }
                    }
                    // Closed: the session loop sees the connection end.
                    Ok(None) | Err(_) => return,
                }
            }
        });
    }

    /// Puts a new message into the outbox. False if it could not be stored
    /// (the caller was told).
    fn enqueue(
        &mut self,
        entry: OutboxEntry,
        reply: oneshot::Sender<Result<v1::SendAck, ClientError>>,
    ) -> bool {
        let id = entry.client_msg_id;
        if let Err(e) = self.outbox.push(entry) {
            let _ = reply.send(Err(e));
            return false;
        }
        self.waiters.insert(id, reply);
        self.fresh.insert(id);
        true
    }

    fn transmit_send(&mut self, conn: &Connection, id: ClientMsgId) {
        if self.in_flight.contains(&id) {
            return;
        }
        let Some(entry) = self.outbox.find(&id) else {
            return;
        };
        let mut send = entry.to_send();
        // Marked before the bytes leave: if this write is lost, the resend is a retry.
        send.first_attempt = self.fresh.remove(&id);
        let body = Body::Send(send);
        self.in_flight.insert(id);
        let conn = conn.clone();
        let tx = self.internal_tx.clone();
        let epoch = self.epoch;
        tokio::spawn(async move {
            let result = conn.request(body).await;
            let _ = tx.send(Internal::SendResult { epoch, id, result }).await;
        });
    }

    fn fetch(&mut self, conn: &Connection, range: FetchRange) {
        let req = Body::GetHistory(v1::GetHistory {
            conversation_id: range.conversation_id,
            anchor: Some(v1::get_history::Anchor::AfterSeq(range.after_seq)),
            limit: range.limit(),
        });
        let conn = conn.clone();
        let tx = self.internal_tx.clone();
        let epoch = self.epoch;
        tokio::spawn(async move {
            let result = conn.request(req).await;
            let _ = tx
                .send(Internal::Page {
                    epoch,
                    range,
                    result,
                })
                .await;
        });
    }

    async fn handle_push(
        &mut self,
        conn: &Connection,
        frame: v1::Frame,
        reconnect_after: &mut Duration,
    ) -> Option<SessionEnd> {
        match frame.body? {
            Body::Goodbye(g) => {
                *reconnect_after = Duration::from_millis(g.reconnect_after_ms.into());
                let e = ServerError {
                    code_num: g.code,
                    message: g.message,
                    retry_after_ms: g.reconnect_after_ms,
                };
                if e.is_session_lost() {
                    return Some(SessionEnd::SessionLost(format!("server said goodbye: {e}")));
                }
                None
            }
            Body::Error(e) => {
                let e = ServerError::from(e);
                if e.code() == ErrorCode::TokenExpired {
                    return Some(SessionEnd::Lost {
                        reason: "access token expired".to_owned(),
                        reconnect_after: Duration::ZERO,
                    });
                }
                if e.is_session_lost() {
                    return Some(SessionEnd::SessionLost(e.to_string()));
                }
                self.emit(Event::ServerError(e)).await;
                None
            }
            body => {
                self.handle_message_frame(conn, body).await;
                None
            }
        }
    }

    /// Frames that can come as pushes or inside a Sync.
    async fn handle_message_frame(&mut self, conn: &Connection, body: Body) {
        match body {
            Body::Deliver(d) => {
                if let (true, Some(m)) = (self.cfg.receive_messages, d.message) {
                    let released = self.reorder.handle_message(m);
                    self.accept(conn, released).await;
                }
            }
            Body::Receipt(r) => self.emit(Event::Receipt(r)).await,
            Body::MessagesAvailable(a) => {
                if self.cfg.receive_messages
                    && let Some(range) = self
                        .reorder
                        .handle_available(a.conversation_id, a.up_to_seq)
                {
                    self.fetch(conn, range);
                }
            }
            Body::SendAck(ack) => {
                // An answer that lost its request (our other devices get our
                // messages as Deliver): either way that seq exists.
                if let Some(id) = ClientMsgId::from_bytes(&ack.client_msg_id)
                    && self.outbox.find(&id).is_some()
                {
                    self.on_ack(conn, id, ack).await;
                } else if self.cfg.receive_messages
                    && let Some(range) = self.reorder.handle_available(ack.conversation_id, ack.seq)
                {
                    self.fetch(conn, range);
                }
            }
            Body::Typing(t) => self.emit(Event::Typing(t)).await,
            Body::PresenceUpdate(p) => self.emit(Event::Presence(p)).await,
            Body::GroupChanged(g) => self.emit(Event::GroupChanged(g)).await,
            _ => {}
        }
    }

    async fn handle_internal(&mut self, conn: &Connection, int: Internal) -> Option<SessionEnd> {
        match int {
            Internal::SendResult { epoch, id, result } => {
                if epoch == self.epoch {
                    self.in_flight.remove(&id);
                }
                return self.on_send_result(conn, epoch, id, result).await;
            }
            Internal::RetrySend { epoch, id } => {
                if epoch == self.epoch {
                    self.transmit_send(conn, id);
                }
            }
            Internal::Sync { epoch, frame } if epoch == self.epoch => match frame.body {
                Some(Body::SyncDone(done)) => {
                    for t in &done.truncated {
                        if let Some(range) = self
                            .reorder
                            .handle_available(t.conversation_id, t.up_to_seq)
                        {
                            self.fetch(conn, range);
                        }
                    }
                    self.sync_done = Some((done.messages, done.receipts));
                    self.maybe_synced().await;
                }
                Some(Body::Error(e)) => {
                    let e = ServerError::from(e);
                    if e.code() == ErrorCode::TokenExpired {
                        return Some(SessionEnd::Lost {
                            reason: "access token expired".to_owned(),
                            reconnect_after: Duration::ZERO,
                        });
                    }
                    self.emit(Event::SyncFailed(e)).await;
                }
                Some(body) => self.handle_message_frame(conn, body).await,
                None => {}
            },
            Internal::Page {
                epoch,
                range,
                result,
            } if epoch == self.epoch => {
                match result {
                    Ok(Body::HistoryPage(p)) => {
                        let released = self.reorder.handle_page(range.conversation_id, p.messages);
                        self.accept(conn, released).await;
                    }
                    Ok(other) => {
                        self.reorder.handle_fetch_failed(range.conversation_id);
                        let e = ClientError::unexpected("HistoryPage", Some(&other));
                        self.emit(Event::LocalError(e.to_string())).await;
                    }
                    Err(ClientError::Server(e)) => {
                        self.reorder.handle_fetch_failed(range.conversation_id);
                        self.emit(Event::ServerError(e)).await;
                    }
                    Err(_) => self.reorder.handle_fetch_failed(range.conversation_id),
                }
                self.maybe_synced().await;
            }
            Internal::Sync { .. } | Internal::Page { .. } => {}
        }
        None
    }

    async fn on_send_result(
        &mut self,
        conn: &Connection,
        epoch: u64,
        id: ClientMsgId,
        result: Result<Body, ClientError>,
    ) -> Option<SessionEnd> {
        let error = match result {
            Ok(Body::SendAck(ack)) => {
                self.on_ack(conn, id, ack).await;
                return None;
            }
            Ok(other) => ClientError::unexpected("SendAck", Some(&other)),
            Err(e) => e,
        };
        if error.server().map(ServerError::code) == Some(ErrorCode::TokenExpired) {
            // Retried after the reconnect; the caller hears "queued".
            self.tell_waiter(id, Err(still_queued(id, error)));
            return Some(SessionEnd::Lost {
                reason: "access token expired".to_owned(),
                reconnect_after: Duration::ZERO,
            });
        }
        if !error.is_transient() {
            // Refused for good: retrying the same bytes cannot help.
            if let Err(e) = self.outbox.remove(&id) {
                self.emit(Event::LocalError(e.to_string())).await;
            }
            self.retries.remove(&id);
            if let ClientError::Server(e) = &error {
                self.emit(Event::SendFailed {
                    client_msg_id: id,
                    error: e.clone(),
                })
                .await;
            }
            self.tell_waiter(id, Err(error));
            return None;
        }
        let hint = error.server().map_or(Duration::ZERO, |e| {
            Duration::from_millis(e.retry_after_ms.into())
        });
        self.tell_waiter(id, Err(still_queued(id, error)));
        if epoch == self.epoch {
            let cfg = self.send_retry;
            let delay = self
                .retries
                .entry(id)
                .or_insert_with(|| Backoff::new(cfg))
                .next_delay()
                .max(hint);
            let tx = self.internal_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(Internal::RetrySend { epoch, id }).await;
            });
        }
        None
    }

    async fn on_ack(&mut self, conn: &Connection, id: ClientMsgId, ack: v1::SendAck) {
        self.retries.remove(&id);
        let entry = match self.outbox.remove(&id) {
            Ok(entry) => entry,
            Err(e) => {
                self.emit(Event::LocalError(e.to_string())).await;
                None
            }
        };
        self.tell_waiter(id, Ok(ack.clone()));
        let Some(entry) = entry else {
            return; // A second ack for the same message.
        };
        self.emit(Event::Sent(ack.clone())).await;
        if self.cfg.receive_messages {
            // Our own message takes its place in the conversation's order.
            let own = v1::Message {
                conversation_id: ack.conversation_id,
                seq: ack.seq,
                sender_user_id: self.creds.user_id,
                sender_device_id: self.creds.device_id,
                client_msg_id: ack.client_msg_id.clone(),
                server_ts_ms: ack.server_ts_ms,
                content_type: entry.content_type,
                body: entry.body.into(),
                media: None,
                reply_to_seq: 0,
            };
            let released = self.reorder.handle_message(own);
            self.accept(conn, released).await;
        }
    }

    fn tell_waiter(&mut self, id: ClientMsgId, result: Result<v1::SendAck, ClientError>) {
        if let Some(w) = self.waiters.remove(&id) {
            let _ = w.send(result);
        }
    }

    /// Hands released messages to the application, then persists the
    /// cursors and acknowledges delivery to the server.
    async fn accept(&mut self, conn: &Connection, released: Released) {
        let mut acked: Vec<(u64, u64)> = Vec::new();
        for m in released.messages {
            let (conv, seq) = (m.conversation_id, m.seq);
            self.emit(Event::Message(m)).await;
            self.cursors.advance(conv, seq);
            match acked.iter_mut().find(|(c, _)| *c == conv) {
                Some(a) => a.1 = seq,
                None => acked.push((conv, seq)),
            }
        }
        if !acked.is_empty() {
            if let Err(e) = self.cursors.save() {
                self.emit(Event::LocalError(e.to_string())).await;
            }
            for (conversation_id, up_to_seq) in acked {
                let ack = Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id,
                    up_to_seq,
                });
                let _ = conn.send_oneway(ack).await;
            }
        }
        if let Some(range) = released.fetch {
            self.fetch(conn, range);
        }
    }

    async fn maybe_synced(&mut self) {
        if self.reorder.fetching() {
            return;
        }
        if let Some((messages, receipts)) = self.sync_done.take() {
            self.emit(Event::Synced { messages, receipts }).await;
        }
    }

    async fn emit(&self, event: Event) {
        // The application may have dropped its Events: that is allowed.
        let _ = self.events.send(event).await;
    }
}

fn still_queued(client_msg_id: ClientMsgId, cause: ClientError) -> ClientError {
    ClientError::StillQueued {
        client_msg_id,
        cause: Box::new(cause),
    }
}
