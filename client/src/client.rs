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
use std::sync::{Arc, Mutex};
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
    /// A delivered/read receipt (in a group: only our own read cursor,
    /// moved by another of our devices).
    Receipt(v1::Receipt),
    /// In a group: how many members received and read our recent messages
    /// (coalesced; also once per group after a Sync). Ask
    /// [`Client::receipts`] for who they are.
    GroupReceipts(v1::GroupReceipts),
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
    /// An earlier message was edited, deleted for everyone or reacted to: a
    /// change entry of the conversation (a `Message` with `change` set; an
    /// edit's new content in `content_type` and `body`), handed over in seq
    /// order with the messages, each once. Apply it to your copy of
    /// `change.target_seq` (history and Sync also serve that message as it
    /// is now).
    MessageChanged(v1::Message),
    /// A group changed: an entry of the group's conversation (a `Message`
    /// with `group_changed` set), handed over in seq order with the
    /// messages, each once, whether it came live, by Sync or by a gap fetch.
    GroupChanged {
        /// The group's conversation.
        conversation_id: u64,
        /// The entry's seq.
        seq: u64,
        /// When the server sequenced it.
        server_ts_ms: u64,
        /// What changed, by whom.
        change: v1::GroupChanged,
    },
    /// This device's stock of one-time prekeys on the server fell below its
    /// low-stock threshold (the count left): upload more.
    PrekeyCount(u32),
    /// A user we share a conversation with (or our own user) gained or lost
    /// devices: fetch new key bundles before messaging them end to end.
    DeviceListChanged(v1::DeviceListChanged),
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

impl Event {
    /// The event for a conversation entry: [`Event::GroupChanged`] for a
    /// group event, [`Event::MessageChanged`] for a change of an earlier
    /// message, [`Event::Message`] otherwise (also for entries of a history
    /// page).
    #[must_use]
    pub fn from_entry(mut m: v1::Message) -> Event {
        if m.change.is_some() {
            return Event::MessageChanged(m);
        }
        match m.group_changed.take() {
            Some(change) => Event::GroupChanged {
                conversation_id: m.conversation_id,
                seq: m.seq,
                server_ts_ms: m.server_ts_ms,
                change: *change,
            },
            None => Event::Message(m),
        }
    }
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
    /// Presence subscriptions and state, restored on every connection.
    sticky: Arc<Mutex<Sticky>>,
    /// How media transfers trust the server's media endpoint: the connection's TLS trust
    /// (`None` over plaintext).
    media_trust: Option<crate::tls::TlsTrust>,
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

mod account;
mod changes;
mod driver;
mod groups;
mod keys;
mod presence;
mod push;

pub use push::PushToken;

use driver::Driver;
use presence::Sticky;

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
        )
        .for_user(creds.user_id);
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
            sticky: Arc::new(Mutex::new(Sticky::default())),
            media_trust: match &cfg.connect.transport {
                crate::connection::Transport::Tls(t) => Some(t.clone()),
                crate::connection::Transport::DangerousPlaintext => None,
            },
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
            sticky: client.sticky.clone(),
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
        self.send_with_media(to, content_type, body, None).await
    }

    /// [`send`](Self::send) with an attachment (from [`upload_file`](Self::upload_file)).
    pub async fn send_with_media(
        &self,
        to: Target,
        content_type: &str,
        body: Vec<u8>,
        media: Option<&v1::MediaRef>,
    ) -> Result<v1::SendAck, ClientError> {
        let client_msg_id = ClientMsgId::random()
            .map_err(|_| ClientError::InvalidArgument("no randomness for client_msg_id".into()))?;
        let entry = OutboxEntry {
            client_msg_id,
            to,
            content_type: content_type.to_owned(),
            body,
            queued_at_ms: unix_ms(),
            media: media.map(prost::Message::encode_to_vec).unwrap_or_default(),
            reply_to_seq: 0,
            change: Vec::new(),
            set_timer: None,
        };
        self.queue(entry).await
    }

    /// Queues `entry` in the outbox (durably) and waits for its `SendAck` (see
    /// [`send`](Self::send)).
    async fn queue(&self, entry: OutboxEntry) -> Result<v1::SendAck, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.cmd_tx
            .send(Command::Send { entry, reply })
            .await
            .map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Uploads the file at `path` to the server's media endpoint (hashing it first, then
    /// streaming it) and returns the `MediaRef` to send it with.
    pub async fn upload_file(
        &self,
        path: &std::path::Path,
        content_type: &str,
        progress: crate::media::Progress,
    ) -> Result<v1::MediaRef, ClientError> {
        let trust = self.media_trust()?;
        let (sha, size) = crate::media::hash_file(path).await?;
        let grant = match self
            .request(Body::RequestUpload(v1::RequestUpload {
                content_type: content_type.to_owned(),
                size_bytes: size,
                sha256: sha.to_vec().into(),
            }))
            .await?
        {
            Body::UploadGrant(g) => g,
            other => return Err(ClientError::unexpected("UploadGrant", Some(&other))),
        };
        crate::media::put_file(trust, &grant, path, progress).await?;
        Ok(v1::MediaRef {
            media_id: grant.media_id,
            content_type: content_type.to_owned(),
            size_bytes: size,
            sha256: sha.to_vec().into(),
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    /// Downloads the media of message `seq` of `conversation_id` (which must name `media_id`)
    /// into `dest`, checking its SHA-256. Returns the bytes written.
    pub async fn download_media(
        &self,
        media_id: &str,
        conversation_id: u64,
        seq: u64,
        dest: &std::path::Path,
        progress: crate::media::Progress,
    ) -> Result<u64, ClientError> {
        let trust = self.media_trust()?;
        let grant = self.download_grant(media_id, conversation_id, seq).await?;
        crate::media::get_to_file(trust, &grant, dest, progress).await
    }

    /// Uploads the image at `path` and makes it the profile's avatar.
    pub async fn set_avatar(
        &self,
        path: &std::path::Path,
        content_type: &str,
        progress: crate::media::Progress,
    ) -> Result<v1::Profile, ClientError> {
        let avatar = self.upload_file(path, content_type, progress).await?;
        self.update_profile(v1::UpdateProfile {
            avatar: Some(Box::new(avatar)),
            ..Default::default()
        })
        .await
    }

    /// Downloads `user_id`'s avatar `media_id` (from their `Profile.avatar`) into `dest`.
    pub async fn download_avatar(
        &self,
        media_id: &str,
        user_id: u64,
        dest: &std::path::Path,
        progress: crate::media::Progress,
    ) -> Result<u64, ClientError> {
        let trust = self.media_trust()?;
        let grant = match self
            .request(Body::RequestDownload(v1::RequestDownload {
                media_id: media_id.to_owned(),
                user_id,
                ..Default::default()
            }))
            .await?
        {
            Body::DownloadGrant(g) => g,
            other => return Err(ClientError::unexpected("DownloadGrant", Some(&other))),
        };
        crate::media::get_to_file(trust, &grant, dest, progress).await
    }

    /// A `DownloadGrant` for the media of message `seq` of `conversation_id`.
    pub async fn download_grant(
        &self,
        media_id: &str,
        conversation_id: u64,
        seq: u64,
    ) -> Result<v1::DownloadGrant, ClientError> {
        match self
            .request(Body::RequestDownload(v1::RequestDownload {
                media_id: media_id.to_owned(),
                conversation_id,
                seq,
                user_id: 0,
            }))
            .await?
        {
            Body::DownloadGrant(g) => Ok(g),
            other => Err(ClientError::unexpected("DownloadGrant", Some(&other))),
        }
    }

    fn media_trust(&self) -> Result<&crate::tls::TlsTrust, ClientError> {
        self.media_trust.as_ref().ok_or_else(|| {
            ClientError::InvalidArgument(
                "media transfers need a TLS connection (its trust is used for the media \
                 endpoint)"
                    .into(),
            )
        })
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

#[cfg(test)]
mod tests;
